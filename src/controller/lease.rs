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
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
    /// guards has stopped writing. Returns an error when leadership is lost (not renewed in
    /// time, or taken over), after publishing `false`, so the process exits and restarts clean
    /// rather than keep a controller that may still be writing.
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
        loop {
            // A leader's round may take until its deadline; a follower's is bounded so a
            // hung request does not stall it.
            let deadline = match renewed {
                Some(renewed) => renew_deadline(renewed, self.duration),
                None => Instant::now() + renew_every,
            };
            let outcome = tokio::select! {
                () = until.cancelled() => {
                    return self.stop(&leader).await;
                }
                outcome = tokio::time::timeout_at(deadline, self.round(&mut observed)) => {
                    match outcome {
                        Ok(result) => result.map_err(RoundError::Api),
                        Err(_) => Err(RoundError::TimedOut),
                    }
                }
            };
            match outcome {
                Ok(Some(sent)) => {
                    if renewed.is_none() {
                        tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                        leader.send_replace(true);
                    }
                    renewed = Some(sent);
                }
                Ok(None) if renewed.is_some() => {
                    leader.send_replace(false);
                    return Err(LeaseError::Lost(self.name.clone()));
                }
                Ok(None) => {}
                Err(source) => {
                    if let Some(last) = renewed
                        && Instant::now() >= renew_deadline(last, self.duration)
                    {
                        leader.send_replace(false);
                        return Err(LeaseError::RenewFailed {
                            name: self.name.clone(),
                            within: renew_deadline(last, self.duration) - last,
                            source,
                        });
                    }
                    tracing::warn!(lease = %self.name, error = %source, "leader election round failed");
                }
            }
            let next = match renewed {
                // Renew early enough to retry within the deadline.
                Some(_) => Instant::now() + renew_every,
                None => Instant::now() + retry_every,
            };
            let next = match renewed {
                Some(last) => next.min(renew_deadline(last, self.duration)),
                None => next,
            };
            tokio::select! {
                () = until.cancelled() => return self.stop(&leader).await,
                () = tokio::time::sleep_until(next) => {}
            }
        }
    }

    /// Stop leading (whatever the Lease guards has stopped) and release the Lease if held.
    async fn stop(&self, leader: &watch::Sender<bool>) -> Result<(), LeaseError> {
        if *leader.borrow() {
            leader.send_replace(false);
            self.release().await;
            tracing::info!(lease = %self.name, "released leadership");
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
}
