//! Leader election through a `coordination.k8s.io` Lease: every replica serves admission,
//! only the holder reconciles and writes.
//!
//! Expiry is judged as client-go's leaderelection does, by this replica's monotonic clock
//! alone: another holder's Lease has expired once its record has not changed for the Lease
//! duration since this replica saw it change. The holder's `renewTime` is another node's wall
//! clock and is never compared with ours. The leader, for its part, stops writing when it has
//! not renewed within two thirds of the duration since it sent its last successful renewal,
//! so it has stopped well before anyone may consider the Lease expired.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// What a replica does with the Lease it just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStep {
    /// No Lease exists: create it, holding it.
    Create,
    /// Free or expired: take it over.
    Acquire,
    /// Ours: renew it.
    Renew,
    /// Held by another replica that is alive.
    Wait,
}

/// The Lease record as last read, and when (by this replica's monotonic clock) it was first
/// seen in that state.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub record: Option<LeaseSpec>,
    pub since: Instant,
}

/// The observation after reading `record` at `now`: its time moves only when the record
/// changed, as a live holder's renewals change it.
pub fn observe(previous: Option<Observed>, record: Option<&LeaseSpec>, now: Instant) -> Observed {
    match previous {
        Some(previous) if previous.record.as_ref() == record => previous,
        _ => Observed {
            record: record.cloned(),
            since: now,
        },
    }
}

/// Lease duration used when the record names none.
const DEFAULT_LEASE_SECONDS: i32 = 15;

/// Decide from the observed Lease record what `identity` does at `now`.
pub fn lease_step(observed: &Observed, identity: &str, now: Instant) -> LeaseStep {
    let Some(spec) = &observed.record else {
        return LeaseStep::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => LeaseStep::Renew,
        None | Some("") => LeaseStep::Acquire,
        Some(_) => {
            let seconds = spec
                .lease_duration_seconds
                .unwrap_or(DEFAULT_LEASE_SECONDS)
                .max(1);
            let duration = Duration::from_secs(u64::from(seconds.unsigned_abs()));
            if now < observed.since + duration {
                LeaseStep::Wait
            } else {
                LeaseStep::Acquire
            }
        }
    }
}

/// The Lease spec after `step` by `identity`; `now` is only recorded (for people reading the
/// Lease), never used to judge expiry.
pub fn next_spec(
    current: Option<&LeaseSpec>,
    step: LeaseStep,
    identity: &str,
    now: Timestamp,
    duration: Duration,
) -> LeaseSpec {
    let seconds = i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let transitions = current.and_then(|s| s.lease_transitions).unwrap_or(0);
    match step {
        LeaseStep::Renew => LeaseSpec {
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(seconds),
            ..current.cloned().unwrap_or_default()
        },
        LeaseStep::Create | LeaseStep::Acquire | LeaseStep::Wait => LeaseSpec {
            holder_identity: Some(identity.to_owned()),
            lease_duration_seconds: Some(seconds),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if step == LeaseStep::Create {
                0
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        },
    }
}

/// The instant by which a leader that sent its last successful renewal at `renewed` must have
/// renewed again, or stop writing. Others wait a whole `duration` from when they saw that
/// renewal, which was written after it was sent; the third left over absorbs clock rate
/// differences and the time to stop.
pub fn renew_deadline(renewed: Instant, duration: Duration) -> Instant {
    renewed + duration.mul_f64(2.0 / 3.0)
}

/// Why a read-decide-write round on the Lease failed.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    #[error("failed to read or write the Lease")]
    Api(#[source] kube::Error),
    #[error("the API server did not answer in time")]
    TimedOut,
}

/// Why leader election stopped.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lost the leader Lease {0}: another replica holds it now")]
    Lost(String),
    #[error("failed to renew the leader Lease {name} within {within:?} of the last renewal")]
    RenewFailed {
        name: String,
        within: Duration,
        #[source]
        source: RoundError,
    },
}

/// Leader election settings.
#[derive(Debug, Clone)]
pub struct Elector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

impl Elector {
    /// One read-decide-write round. `Ok(Some(sent))`: we hold the Lease, by a write sent at
    /// `sent`.
    async fn round(&self, observed: &mut Option<Observed>) -> Result<Option<Instant>, kube::Error> {
        let existing = self.api.get_opt(&self.name).await?;
        let now = Instant::now();
        let record = existing.as_ref().and_then(|l| l.spec.as_ref());
        let current = observe(observed.take(), record, now);
        let step = lease_step(&current, &self.identity, now);
        *observed = Some(current);
        if step == LeaseStep::Wait {
            return Ok(None);
        }
        let spec = next_spec(
            record,
            step,
            &self.identity,
            Timestamp::now(),
            self.duration,
        );
        // Keeping the read resourceVersion makes the write conditional: two replicas taking
        // over an expired Lease at once cannot both succeed.
        let mut metadata = existing.map(|l| l.metadata).unwrap_or_default();
        metadata.name = Some(self.name.clone());
        let lease = Lease {
            metadata,
            spec: Some(spec),
        };
        let params = PostParams {
            dry_run: false,
            field_manager: Some(crate::api::FIELD_MANAGER.to_owned()),
        };
        let sent = Instant::now();
        let written = if step == LeaseStep::Create {
            self.api.create(&params, &lease).await
        } else {
            self.api.replace(&self.name, &params, &lease).await
        };
        match written {
            Ok(_) => Ok(Some(sent)),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Give the Lease up so another replica takes over at once.
    async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            let ours = lease
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref())
                == Some(self.identity.as_str());
            if ours {
                if let Some(spec) = lease.spec.as_mut() {
                    spec.holder_identity = None;
                }
                // Conditional on the read resourceVersion: a Lease taken over meanwhile is
                // left alone.
                let _ = self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await;
            }
        }
    }

    /// Hold or wait for the Lease, publishing leadership on `leader`, until `until` is
    /// cancelled; then release it if held. Pass a token cancelled once whatever the Lease
    /// guards has stopped writing (see [`Elector::lead`]). Returns an error when leadership is
    /// lost (not renewed by its deadline, or taken over), after publishing `false`, so the
    /// process exits and restarts clean rather than keep a controller that may still write.
    pub async fn hold(
        self,
        leader: watch::Sender<bool>,
        until: CancellationToken,
    ) -> Result<(), LeaseError> {
        let renew_every = self.duration / 3;
        let retry_every = self.duration / 5;
        let mut observed = None;
        // Set while leading: when the last successful renewal was sent.
        let mut renewed: Option<Instant> = None;
        let mut last_error = None;
        loop {
            let deadline = renewed.map(|last| renew_deadline(last, self.duration));
            if let (Some(last), Some(deadline)) = (renewed, deadline)
                && Instant::now() >= deadline
            {
                leader.send_replace(false);
                return Err(LeaseError::RenewFailed {
                    name: self.name.clone(),
                    within: deadline - last,
                    source: last_error.unwrap_or(RoundError::TimedOut),
                });
            }
            // A leader's round may take until its deadline; a follower's is bounded so a
            // hung request does not stall it.
            let round_deadline = deadline.unwrap_or_else(|| Instant::now() + renew_every);
            let outcome = tokio::select! {
                () = until.cancelled() => return self.stop(&leader, renew_every).await,
                outcome = tokio::time::timeout_at(round_deadline, self.round(&mut observed)) => {
                    match outcome {
                        Ok(result) => result.map_err(RoundError::Api),
                        Err(_) => Err(RoundError::TimedOut),
                    }
                }
            };
            let wait = match outcome {
                Ok(Some(sent)) => {
                    if renewed.is_none() {
                        tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                        leader.send_replace(true);
                    }
                    renewed = Some(sent);
                    last_error = None;
                    renew_every
                }
                Ok(None) if renewed.is_some() => {
                    leader.send_replace(false);
                    return Err(LeaseError::Lost(self.name.clone()));
                }
                Ok(None) => retry_every,
                Err(error) => {
                    tracing::warn!(lease = %self.name, %error, "leader election round failed");
                    last_error = Some(error);
                    retry_every
                }
            };
            // A leader wakes by its deadline at the latest, to stop writing then.
            let mut next = Instant::now() + wait;
            if let Some(last) = renewed {
                next = next.min(renew_deadline(last, self.duration));
            }
            tokio::select! {
                () = until.cancelled() => return self.stop(&leader, renew_every).await,
                () = tokio::time::sleep_until(next) => {}
            }
        }
    }

    /// Hold or wait for the Lease until `stop`, running `work` while leading: `work` is given
    /// a future that resolves on `stop` (stop gracefully then; the Lease is still renewed
    /// meanwhile), and is dropped at once if leadership is lost. The Lease is released only
    /// after `work` has ended, so no replica takes over while this one may still write.
    pub async fn lead<W, F>(self, stop: CancellationToken, work: W) -> Result<(), LeaseError>
    where
        W: FnOnce(WaitForCancellationFutureOwned) -> F,
        F: Future<Output = ()>,
    {
        self.lead_reporting(stop, |_| {}, work).await
    }

    /// [`Elector::lead`], telling `report` each time this replica starts or stops holding the
    /// Lease (for the leader gauge); `false` is reported last, once the election has ended.
    pub async fn lead_reporting<W, F>(
        self,
        stop: CancellationToken,
        mut report: impl FnMut(bool),
        work: W,
    ) -> Result<(), LeaseError>
    where
        W: FnOnce(WaitForCancellationFutureOwned) -> F,
        F: Future<Output = ()>,
    {
        let (leader_tx, mut leader) = watch::channel(false);
        let mut reported = leader.clone();
        let report_changes = async move {
            loop {
                report(*reported.borrow_and_update());
                // Fails once the election has ended and dropped its sender.
                if reported.changed().await.is_err() {
                    break;
                }
            }
            report(false);
        };
        let work_ended = CancellationToken::new();
        let election = self.hold(leader_tx, work_ended.clone());
        let guarded = async move {
            // However this ends, the elector may release the Lease afterwards.
            let _ended = work_ended.drop_guard();
            tokio::select! {
                () = stop.cancelled() => return,
                became = leader.wait_for(|leading| *leading) => if became.is_err() { return },
            }
            let lost = leader.wait_for(|leading| !*leading);
            tokio::select! {
                () = work(stop.cancelled_owned()) => {}
                // Another replica may acquire the Lease soon: nothing more may be written.
                _ = lost => tracing::warn!("leadership lost; stopped at once"),
            }
        };
        let (result, (), ()) = tokio::join!(election, guarded, report_changes);
        result
    }

    /// Stop leading and release the Lease if held (within `bound`: a hung release must not
    /// hold up shutdown; the Lease then expires on its own).
    async fn stop(&self, leader: &watch::Sender<bool>, bound: Duration) -> Result<(), LeaseError> {
        if *leader.borrow() {
            leader.send_replace(false);
            if tokio::time::timeout(bound, self.release()).await.is_ok() {
                tracing::info!(lease = %self.name, "released leadership");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn wall(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(wall(renewed))),
            acquire_time: Some(MicroTime(wall(0))),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }
    }

    /// `record` as first observed at `since`.
    fn seen(record: Option<LeaseSpec>, since: Instant) -> Observed {
        observe(None, record.as_ref(), since)
    }

    #[test]
    fn a_missing_lease_is_created() {
        let t0 = Instant::now();
        assert_eq!(lease_step(&seen(None, t0), "a", t0), LeaseStep::Create);
    }

    #[test]
    fn our_own_lease_is_renewed() {
        let t0 = Instant::now();
        let observed = seen(Some(held_by("a", 0)), t0);
        assert_eq!(
            lease_step(&observed, "a", t0 + 100 * SECOND),
            LeaseStep::Renew
        );
    }

    #[test]
    fn another_holder_expires_a_lease_duration_after_its_record_was_seen_to_change() {
        let t0 = Instant::now();
        let observed = seen(Some(held_by("b", 0)), t0);
        assert_eq!(
            lease_step(&observed, "a", t0 + 14 * SECOND),
            LeaseStep::Wait
        );
        assert_eq!(
            lease_step(&observed, "a", t0 + 15 * SECOND),
            LeaseStep::Acquire
        );
    }

    #[test]
    fn a_renewal_restarts_the_wait_and_an_unchanged_record_does_not() {
        let t0 = Instant::now();
        let first = seen(Some(held_by("b", 0)), t0);
        let unchanged = observe(
            Some(first.clone()),
            Some(&held_by("b", 0)),
            t0 + 10 * SECOND,
        );
        assert_eq!(
            unchanged.since, t0,
            "re-reading the same record is no sign of life"
        );
        let renewed = observe(Some(unchanged), Some(&held_by("b", 5)), t0 + 10 * SECOND);
        assert_eq!(renewed.since, t0 + 10 * SECOND);
        assert_eq!(lease_step(&renewed, "a", t0 + 20 * SECOND), LeaseStep::Wait);
        assert_eq!(
            lease_step(&renewed, "a", t0 + 25 * SECOND),
            LeaseStep::Acquire
        );
    }

    #[test]
    fn the_holders_wall_clock_is_not_compared_with_ours() {
        let t0 = Instant::now();
        // A holder whose clock runs an hour behind looks long expired by its renewTime, and
        // one an hour ahead looks alive for an hour: neither matters, only when we saw the
        // record change.
        let slow = seen(Some(held_by("b", -3600)), t0);
        assert_eq!(lease_step(&slow, "a", t0 + SECOND), LeaseStep::Wait);
        let fast = seen(Some(held_by("b", 3600)), t0);
        assert_eq!(lease_step(&fast, "a", t0 + 15 * SECOND), LeaseStep::Acquire);
    }

    #[test]
    fn a_released_lease_is_taken_over_at_once() {
        let t0 = Instant::now();
        let mut released = held_by("b", 0);
        released.holder_identity = None;
        assert_eq!(
            lease_step(&seen(Some(released), t0), "a", t0),
            LeaseStep::Acquire
        );
        let mut emptied = held_by("b", 0);
        emptied.holder_identity = Some(String::new());
        assert_eq!(
            lease_step(&seen(Some(emptied), t0), "a", t0),
            LeaseStep::Acquire
        );
    }

    #[test]
    fn a_leader_must_renew_within_two_thirds_of_the_duration() {
        let renewed = Instant::now();
        assert_eq!(renew_deadline(renewed, 15 * SECOND), renewed + 10 * SECOND);
    }

    #[test]
    fn the_leader_stops_before_a_follower_may_take_over() {
        // The follower sees the renewal no earlier than it was sent, and waits a whole
        // duration from then; the leader stops at its deadline, before that.
        let duration = 15 * SECOND;
        let sent = Instant::now();
        let seen_by_follower = seen(Some(held_by("leader", 0)), sent);
        let deadline = renew_deadline(sent, duration);
        assert_eq!(
            lease_step(&seen_by_follower, "follower", deadline),
            LeaseStep::Wait
        );
        assert_eq!(
            lease_step(&seen_by_follower, "follower", sent + duration),
            LeaseStep::Acquire
        );
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let current = held_by("b", 0);
        let taken = next_spec(
            Some(&current),
            LeaseStep::Acquire,
            "a",
            wall(20),
            Duration::from_secs(15),
        );
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.renew_time, Some(MicroTime(wall(20))));
        let mine = held_by("a", 0);
        let renewed = next_spec(
            Some(&mine),
            LeaseStep::Renew,
            "a",
            wall(5),
            Duration::from_secs(15),
        );
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, mine.acquire_time);
        assert_eq!(renewed.renew_time, Some(MicroTime(wall(5))));
        let created = next_spec(
            None,
            LeaseStep::Create,
            "a",
            wall(0),
            Duration::from_secs(15),
        );
        assert_eq!(created.lease_transitions, Some(0));
        assert_eq!(created.lease_duration_seconds, Some(15));
    }

    // -----------------------------------------------------------------------------------
    // The elector against a fake API server holding one Lease, on tokio's paused clock.

    use crate::testing::{ApiServerHandle, mock_client};
    use http::{Method, Response};
    use http_body_util::BodyExt as _;
    use kube::client::Body;
    use std::sync::{Arc, Mutex};

    const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases";

    /// What the fake API server holds and saw: each accepted write with its time and holder.
    #[derive(Default)]
    struct FakeLeases {
        lease: Option<Lease>,
        writes: Vec<(Instant, Option<String>)>,
        version: u64,
        failing: bool,
    }

    fn shared() -> Arc<Mutex<FakeLeases>> {
        Arc::new(Mutex::new(FakeLeases::default()))
    }

    fn status(code: u16) -> Response<Body> {
        let reason = match code {
            404 => "NotFound",
            409 => "Conflict",
            _ => "InternalError",
        };
        let body = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": "fake"});
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    }

    async fn serve(mut handle: ApiServerHandle, state: Arc<Mutex<FakeLeases>>) {
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().clone();
            let path = request.uri().path().to_owned();
            let bytes = request.into_body().collect().await.unwrap().to_bytes();
            let mut state = state.lock().unwrap();
            let response = if state.failing {
                status(500)
            } else if method == Method::GET {
                match &state.lease {
                    Some(lease) => Response::new(Body::from(serde_json::to_vec(lease).unwrap())),
                    None => status(404),
                }
            } else {
                assert!(path.starts_with(LEASE_PATH), "{method} {path}");
                let mut lease: Lease = serde_json::from_slice(&bytes).unwrap();
                let stored_version = state
                    .lease
                    .as_ref()
                    .and_then(|l| l.metadata.resource_version.clone());
                if method == Method::PUT && lease.metadata.resource_version != stored_version {
                    status(409)
                } else {
                    state.version += 1;
                    lease.metadata.resource_version = Some(state.version.to_string());
                    let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
                    state.writes.push((Instant::now(), holder));
                    state.lease = Some(lease.clone());
                    Response::new(Body::from(serde_json::to_vec(&lease).unwrap()))
                }
            };
            send.send_response(response);
        }
    }

    fn elector(state: &Arc<Mutex<FakeLeases>>) -> Elector {
        let (client, handle) = mock_client();
        tokio::spawn(serve(handle, state.clone()));
        Elector {
            api: Api::namespaced(client, "ns"),
            name: "lease".into(),
            identity: "me".into(),
            duration: 15 * SECOND,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_renew_stops_leading_at_its_deadline() {
        let state = shared();
        let (leader_tx, mut leader) = watch::channel(false);
        let holding = tokio::spawn(elector(&state).hold(leader_tx, CancellationToken::new()));
        leader.wait_for(|leading| *leading).await.unwrap();
        let (acquired, _) = state.lock().unwrap().writes[0].clone();
        state.lock().unwrap().failing = true;
        let error = holding.await.unwrap().unwrap_err();
        assert_eq!(
            Instant::now(),
            acquired + 10 * SECOND,
            "stepped down two thirds of the duration after the last renewal was sent"
        );
        assert!(!*leader.borrow());
        let LeaseError::RenewFailed { within, source, .. } = error else {
            panic!("expected a renewal failure, got {error:?}");
        };
        assert_eq!(within, 10 * SECOND);
        assert!(matches!(source, RoundError::Api(_)), "{source:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_is_released_only_after_the_work_has_stopped_and_renewed_meanwhile() {
        let state = shared();
        let stop = CancellationToken::new();
        let ended = Arc::new(Mutex::new(None));
        let recorded = ended.clone();
        let leading = tokio::spawn(elector(&state).lead(stop.clone(), |shutdown| async move {
            shutdown.await;
            // A graceful stop longer than a renewal interval.
            tokio::time::sleep(7 * SECOND).await;
            *recorded.lock().unwrap() = Some(Instant::now());
        }));
        while state.lock().unwrap().writes.is_empty() {
            tokio::time::sleep(SECOND).await;
        }
        let stopped = Instant::now();
        stop.cancel();
        leading.await.unwrap().unwrap();
        let ended = ended.lock().unwrap().expect("the work ran and ended");
        let writes = state.lock().unwrap().writes.clone();
        let (released, holder) = writes.last().unwrap().clone();
        assert_eq!(holder, None, "the Lease is released");
        assert!(
            released >= ended,
            "released at {released:?}, work ended at {ended:?}"
        );
        assert!(
            writes.iter().any(|(at, holder)| *at > stopped
                && *at < ended
                && holder.as_deref() == Some("me")),
            "the Lease is renewed while the work stops gracefully: {writes:?}"
        );
    }

    /// Another replica takes the Lease over (as after a long pause of this one).
    fn take_over(state: &Arc<Mutex<FakeLeases>>) {
        let mut state = state.lock().unwrap();
        state.version += 1;
        let version = state.version.to_string();
        let lease = state.lease.as_mut().unwrap();
        lease.metadata.resource_version = Some(version);
        lease.spec.as_mut().unwrap().holder_identity = Some("other".into());
    }

    #[tokio::test(start_paused = true)]
    async fn the_leader_gauge_is_one_while_the_lease_is_held_and_zero_once_it_is_lost() {
        let state = shared();
        // Held by another live replica at first.
        state.lock().unwrap().lease = Some(Lease {
            metadata: kube::api::ObjectMeta {
                name: Some("lease".into()),
                resource_version: Some("0".into()),
                ..Default::default()
            },
            spec: Some(held_by("other", 0)),
        });
        let gauge = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        let reported = gauge.clone();
        let leading = tokio::spawn(elector(&state).lead_reporting(
            CancellationToken::new(),
            move |leading| {
                reported.set(i64::from(leading));
            },
            |shutdown| shutdown,
        ));
        tokio::time::sleep(5 * SECOND).await;
        assert_eq!(gauge.get(), 0, "a follower is not the leader");
        // The other holder stops renewing: its Lease expires and this replica takes it.
        let became = tokio::time::timeout(60 * SECOND, async {
            while gauge.get() == 0 {
                tokio::time::sleep(SECOND / 10).await;
            }
        })
        .await;
        assert!(became.is_ok(), "the gauge never showed leadership");
        let holder = state.lock().unwrap().writes.last().unwrap().1.clone();
        assert_eq!(
            holder.as_deref(),
            Some("me"),
            "the gauge is 1 on the holder"
        );
        take_over(&state);
        let error = leading.await.unwrap().unwrap_err();
        assert!(matches!(error, LeaseError::Lost(_)), "{error:?}");
        assert_eq!(gauge.get(), 0, "leadership lost");
    }

    #[tokio::test(start_paused = true)]
    async fn the_leader_gauge_drops_to_zero_when_the_lease_is_released() {
        let state = shared();
        let stop = CancellationToken::new();
        let gauge = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        let reported = gauge.clone();
        let leading = tokio::spawn(elector(&state).lead_reporting(
            stop.clone(),
            move |leading| {
                reported.set(i64::from(leading));
            },
            |shutdown| shutdown,
        ));
        while gauge.get() == 0 {
            tokio::time::sleep(SECOND).await;
        }
        stop.cancel();
        leading.await.unwrap().unwrap();
        assert_eq!(gauge.get(), 0);
        let writes = state.lock().unwrap().writes.clone();
        assert_eq!(writes.last().unwrap().1, None, "the Lease was released");
    }

    #[tokio::test(start_paused = true)]
    async fn lost_leadership_drops_the_work_at_once_and_releases_nothing() {
        struct DropFlag(Arc<Mutex<bool>>);
        impl Drop for DropFlag {
            fn drop(&mut self) {
                *self.0.lock().unwrap() = true;
            }
        }
        let state = shared();
        let dropped = Arc::new(Mutex::new(false));
        let flag = DropFlag(dropped.clone());
        let leading = tokio::spawn(elector(&state).lead(
            CancellationToken::new(),
            |shutdown| async move {
                let _flag = flag;
                shutdown.await;
            },
        ));
        while state.lock().unwrap().writes.is_empty() {
            tokio::time::sleep(SECOND).await;
        }
        take_over(&state);
        let error = leading.await.unwrap().unwrap_err();
        assert!(matches!(error, LeaseError::Lost(_)), "{error:?}");
        assert!(*dropped.lock().unwrap(), "the work was dropped");
        let state = state.lock().unwrap();
        assert_eq!(
            state.writes.len(),
            1,
            "no renewal or release after the takeover"
        );
        assert_eq!(
            state
                .lease
                .as_ref()
                .unwrap()
                .spec
                .as_ref()
                .unwrap()
                .holder_identity
                .as_deref(),
            Some("other")
        );
    }
}
