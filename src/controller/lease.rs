//! Leader election through a `coordination.k8s.io` Lease: every replica serves admission,
//! only the holder reconciles and writes.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use std::time::Duration;
use tokio::sync::watch;
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

/// Decide from the Lease's spec (if any) what `identity` does at `now`.
pub fn lease_step(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> LeaseStep {
    let Some(spec) = spec else {
        return LeaseStep::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => LeaseStep::Renew,
        None | Some("") => LeaseStep::Acquire,
        Some(_) => {
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15).max(1));
            let last = spec
                .renew_time
                .as_ref()
                .or(spec.acquire_time.as_ref())
                .map(|t| t.0);
            match last {
                Some(last) if last + SignedDuration::from_secs(duration) > now => LeaseStep::Wait,
                _ => LeaseStep::Acquire,
            }
        }
    }
}

/// The Lease spec after `step` by `identity` at `now`.
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

/// Why leader election stopped.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lost the leader Lease {0}: another replica holds it now")]
    Lost(String),
    #[error("failed to renew the leader Lease {name} within its duration: {reason}")]
    RenewFailed { name: String, reason: String },
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
    /// One read-decide-write round. `Ok(true)`: we hold the Lease now.
    async fn round(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let existing = self.api.get_opt(&self.name).await?;
        let spec = existing.as_ref().and_then(|l| l.spec.as_ref());
        let step = lease_step(spec, &self.identity, now);
        if step == LeaseStep::Wait {
            return Ok(false);
        }
        let spec = next_spec(spec, step, &self.identity, now, self.duration);
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
        let written = if step == LeaseStep::Create {
            self.api.create(&params, &lease).await
        } else {
            self.api.replace(&self.name, &params, &lease).await
        };
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
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
                let _ = self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await;
            }
        }
    }

    /// Hold or wait for the Lease until `stop`, publishing leadership on `leader`. Returns an
    /// error when leadership is lost, so the process exits and restarts clean rather than
    /// keep a controller that may still be writing.
    pub async fn run(
        self,
        leader: watch::Sender<bool>,
        stop: CancellationToken,
    ) -> Result<(), LeaseError> {
        let renew_every = self.duration / 3;
        let retry_every = self.duration / 5;
        let mut last_renewal: Option<tokio::time::Instant> = None;
        loop {
            let leading = *leader.borrow();
            // A round that hangs (no client read timeout) must not keep a stale leader.
            let outcome = match tokio::time::timeout(renew_every, self.round()).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {renew_every:?}")),
            };
            match outcome {
                Ok(true) => {
                    last_renewal = Some(tokio::time::Instant::now());
                    if !leading {
                        tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                        leader.send_replace(true);
                    }
                }
                Ok(false) if leading => {
                    leader.send_replace(false);
                    return Err(LeaseError::Lost(self.name.clone()));
                }
                Ok(false) => {}
                Err(reason) => {
                    // Stop writing before another replica may consider the Lease expired.
                    let expired = last_renewal
                        .is_some_and(|t| t.elapsed() >= self.duration.mul_f32(2.0 / 3.0));
                    if leading && expired {
                        leader.send_replace(false);
                        return Err(LeaseError::RenewFailed {
                            name: self.name.clone(),
                            reason,
                        });
                    }
                    tracing::warn!(lease = %self.name, error = %reason, "leader election round failed");
                }
            }
            let wait = if *leader.borrow() {
                renew_every
            } else {
                retry_every
            };
            tokio::select! {
                () = stop.cancelled() => {
                    if *leader.borrow() {
                        leader.send_replace(false);
                        self.release().await;
                        tracing::info!(lease = %self.name, "released leadership");
                    }
                    return Ok(());
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            acquire_time: Some(MicroTime(at(0))),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_missing_lease_is_created() {
        assert_eq!(lease_step(None, "a", at(0)), LeaseStep::Create);
    }

    #[test]
    fn our_own_lease_is_renewed() {
        assert_eq!(
            lease_step(Some(&held_by("a", 0)), "a", at(100)),
            LeaseStep::Renew
        );
    }

    #[test]
    fn a_live_lease_of_another_replica_is_left_alone() {
        assert_eq!(
            lease_step(Some(&held_by("b", 0)), "a", at(14)),
            LeaseStep::Wait
        );
    }

    #[test]
    fn an_expired_or_released_lease_is_taken_over() {
        assert_eq!(
            lease_step(Some(&held_by("b", 0)), "a", at(15)),
            LeaseStep::Acquire
        );
        let mut released = held_by("b", 0);
        released.holder_identity = None;
        assert_eq!(lease_step(Some(&released), "a", at(1)), LeaseStep::Acquire);
        let mut never_renewed = held_by("b", 0);
        never_renewed.renew_time = None;
        never_renewed.acquire_time = None;
        assert_eq!(
            lease_step(Some(&never_renewed), "a", at(1)),
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
            at(20),
            Duration::from_secs(15),
        );
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.renew_time, Some(MicroTime(at(20))));
        let mine = held_by("a", 0);
        let renewed = next_spec(
            Some(&mine),
            LeaseStep::Renew,
            "a",
            at(5),
            Duration::from_secs(15),
        );
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, mine.acquire_time);
        assert_eq!(renewed.renew_time, Some(MicroTime(at(5))));
        let created = next_spec(None, LeaseStep::Create, "a", at(0), Duration::from_secs(15));
        assert_eq!(created.lease_transitions, Some(0));
        assert_eq!(created.lease_duration_seconds, Some(15));
    }
}
