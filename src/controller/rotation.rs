//! A key rotation reported as one event per round, not one per AgentSecret: a rotation
//! re-wraps every AgentSecret of the cluster, and thousands of identical events would bury
//! everything else (and cost the API server as many writes again).
//!
//! Re-wraps are counted as the reconciles write them; a round ends once none has been written
//! for [`ROTATION_QUIET`] and none waits for a rate-limit slot (during a rotation a re-wrap is
//! granted a slot at least every second). Its summary is recorded on the operator's leader
//! Lease, the one object that stands for the operator as a whole and exists while it reconciles:
//! `kubectl describe lease -n <operator namespace> <lease name>` shows it. It names key ids and
//! counts only.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use super::Context;

/// A round ends once no re-wrap has been written for this long.
pub const ROTATION_QUIET: Duration = Duration::from_secs(10);

/// How often the end of a round is looked for.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Re-wraps of the round in progress.
#[derive(Debug, Default)]
pub struct RotationTracker {
    round: Mutex<Option<Round>>,
}

#[derive(Debug)]
struct Round {
    summary: RotationSummary,
    last: Instant,
}

/// What one rotation round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationSummary {
    /// Data keys re-wrapped, by the key they were wrapped under before.
    pub from: BTreeMap<String, u64>,
    /// Data keys re-wrapped, by the primary key they are wrapped under now (one, unless the
    /// primary changed again during the round).
    pub to: BTreeMap<String, u64>,
    /// Re-wraps the API server refused (retried with backoff, counted again then).
    pub failed: u64,
}

impl RotationTracker {
    /// Count one re-wrap from key `from` to the primary `to`, written or refused.
    pub fn record(&self, from: &str, to: &str, written: bool) {
        let mut round = self.round.lock().unwrap_or_else(|e| e.into_inner());
        let round = round.get_or_insert_with(|| Round {
            summary: RotationSummary::default(),
            last: Instant::now(),
        });
        round.last = Instant::now();
        if written {
            *round.summary.from.entry(from.to_owned()).or_default() += 1;
            *round.summary.to.entry(to.to_owned()).or_default() += 1;
        } else {
            round.summary.failed += 1;
        }
    }

    /// The summary of the round in progress if nothing was recorded for `quiet` until `now`;
    /// taken, so the next re-wrap starts a new round.
    pub fn take_if_quiet(&self, now: Instant, quiet: Duration) -> Option<RotationSummary> {
        let mut round = self.round.lock().unwrap_or_else(|e| e.into_inner());
        if round.as_ref()?.last + quiet > now {
            return None;
        }
        round.take().map(|round| round.summary)
    }
}

impl RotationSummary {
    /// Data keys re-wrapped in the round.
    pub fn rewrapped(&self) -> u64 {
        self.from.values().sum()
    }

    /// The event summarising the round: a warning if some re-wraps were refused.
    pub fn event(&self) -> Event {
        let mut note = format!(
            "key rotation: {} data keys re-wrapped under the primary key",
            self.rewrapped()
        );
        let list = |keys: &BTreeMap<String, u64>| {
            let listed: Vec<String> = keys.iter().map(|(id, n)| format!("{id:?} ({n})")).collect();
            listed.join(", ")
        };
        let to = list(&self.to);
        let from = list(&self.from);
        if !to.is_empty() {
            let _ = write!(note, " {to}");
        }
        if !from.is_empty() {
            let _ = write!(note, ", from {from}");
        }
        if self.failed > 0 {
            let _ = write!(
                note,
                "; {} re-wraps failed and are retried (see the AgentSecret controller's log)",
                self.failed
            );
        }
        Event {
            type_: if self.failed == 0 {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: "Rewrapped".into(),
            note: Some(truncate(note, MAX_NOTE)),
            action: "Rewrap".into(),
            secondary: None,
        }
    }
}

/// The API server refuses an event note over 1 kB.
const MAX_NOTE: usize = 1024;

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// The Lease named `name` in `namespace`, as an event's object.
pub fn lease_reference(namespace: Option<&str>, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("coordination.k8s.io/v1".into()),
        kind: Some("Lease".into()),
        namespace: namespace.map(str::to_owned),
        name: Some(name.to_owned()),
        ..ObjectReference::default()
    }
}

/// Record the summary of each rotation round on `regarding` as the round ends; runs until
/// dropped.
pub async fn report_rotations(ctx: Arc<Context>, regarding: ObjectReference) {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        if ctx.rewrap_limiter.has_promises() {
            continue;
        }
        if let Some(summary) = ctx.rotation.take_if_quiet(Instant::now(), ROTATION_QUIET) {
            publish(&ctx, &summary, &regarding).await;
        }
    }
}

/// Record the summary of a round cut short (the controllers stopping), if any.
pub async fn report_unfinished_rotation(ctx: &Context, regarding: &ObjectReference) {
    if let Some(summary) = ctx.rotation.take_if_quiet(Instant::now(), Duration::ZERO) {
        publish(ctx, &summary, regarding).await;
    }
}

async fn publish(ctx: &Context, summary: &RotationSummary, regarding: &ObjectReference) {
    tracing::info!(
        rewrapped = summary.rewrapped(),
        failed = summary.failed,
        "key rotation round ended"
    );
    // A recorder of its own: the shared one folds events of the same reason on the same object
    // into a series for six minutes, keeping the first note, and each round's counts matter.
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    if let Err(error) = recorder.publish(&summary.event(), regarding).await {
        tracing::warn!(%error, "failed to record the key rotation event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_round_ends_once_no_rewrap_was_written_for_the_quiet_period() {
        let tracker = RotationTracker::default();
        assert_eq!(tracker.take_if_quiet(Instant::now(), ROTATION_QUIET), None);
        for _ in 0..3 {
            tracker.record("k1", "k2", true);
            tokio::time::advance(SECOND).await;
        }
        tracker.record("k0", "k2", true);
        let last = Instant::now();
        assert_eq!(
            tracker.take_if_quiet(last + ROTATION_QUIET - SECOND, ROTATION_QUIET),
            None,
            "still in progress"
        );
        let summary = tracker
            .take_if_quiet(last + ROTATION_QUIET, ROTATION_QUIET)
            .unwrap();
        assert_eq!(summary.rewrapped(), 4);
        assert_eq!(
            summary.from,
            [("k0".to_owned(), 1), ("k1".to_owned(), 3)].into()
        );
        assert_eq!(summary.to, [("k2".to_owned(), 4)].into());
        assert_eq!(
            tracker.take_if_quiet(last + 10 * ROTATION_QUIET, ROTATION_QUIET),
            None,
            "a round is reported once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_summary_names_keys_and_counts_and_warns_of_failures() {
        let tracker = RotationTracker::default();
        tracker.record("k1", "k2", true);
        tracker.record("k1", "k2", true);
        let event = tracker
            .take_if_quiet(Instant::now(), Duration::ZERO)
            .unwrap()
            .event();
        assert_eq!(event.type_, EventType::Normal);
        assert_eq!(event.reason, "Rewrapped");
        assert_eq!(
            event.note.as_deref(),
            Some(
                "key rotation: 2 data keys re-wrapped under the primary key \"k2\" (2), from \"k1\" (2)"
            )
        );

        tracker.record("k1", "k2", true);
        tracker.record("k1", "k2", false);
        let event = tracker
            .take_if_quiet(Instant::now(), Duration::ZERO)
            .unwrap()
            .event();
        assert_eq!(event.type_, EventType::Warning);
        let note = event.note.unwrap();
        assert!(note.contains("1 data keys re-wrapped"), "{note}");
        assert!(note.contains("1 re-wraps failed"), "{note}");
    }

    #[test]
    fn a_note_stays_within_the_api_servers_limit() {
        let summary = RotationSummary {
            from: (0..200).map(|i| (format!("key-{i:04}"), 1)).collect(),
            to: [("k".to_owned(), 200)].into(),
            failed: 0,
        };
        let note = summary.event().note.unwrap();
        assert_eq!(note.len(), MAX_NOTE);
        assert!(note.ends_with("..."));
    }
}
