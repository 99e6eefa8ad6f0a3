//! Leader election on a `coordination.k8s.io` Lease, as controller-runtime does it: the holder
//! renews every retry period; a lease not renewed within its duration may be taken over; a
//! conflicting write (another replica got there first) loses. Leadership gates only readiness:
//! followers keep serving ext_proc, so a gateway can use any replica it is sent to.
//!
//! The lease is released on shutdown (holder cleared), so a standby takes over within one
//! retry period instead of waiting for the lease to expire.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Lease timings.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTimings {
    /// How long a lease is valid after a renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down.
    pub renew_deadline: Duration,
    /// Time between attempts.
    pub retry_period: Duration,
}

impl Default for LeaseTimings {
    /// controller-runtime's defaults: 15 s, 10 s, 2 s.
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The lease name the reference uses for a pool.
pub fn lease_name(namespace: &str, pool: &str) -> String {
    format!("epp-{namespace}-{pool}.gateway-api-inference-extension.sigs.k8s.io")
}

/// An elector for one lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: LeaseTimings,
}

impl std::fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElector")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish()
    }
}

enum Attempt {
    Leading,
    Following(Option<String>),
}

impl LeaderElector {
    /// An elector for lease `name` in `api`'s namespace, as `identity`.
    pub fn new(api: Api<Lease>, name: String, identity: String, timings: LeaseTimings) -> Self {
        Self {
            api,
            name,
            identity,
            timings,
        }
    }

    /// Campaigns until `cancel`; `leader` follows this replica's leadership.
    pub async fn run(self, leader: watch::Sender<bool>, cancel: CancellationToken) {
        let mut last_renewal: Option<tokio::time::Instant> = None;
        let mut following: Option<String> = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leading) => {
                    if !*leader.borrow() {
                        tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                    }
                    last_renewal = Some(tokio::time::Instant::now());
                    leader.send_replace(true);
                }
                Ok(Attempt::Following(holder)) => {
                    if *leader.borrow() {
                        tracing::warn!(lease = %self.name, ?holder, "lost the lease");
                    } else if holder != following {
                        tracing::info!(lease = %self.name, ?holder, "following");
                    }
                    following = holder;
                    last_renewal = None;
                    leader.send_replace(false);
                }
                Err(error) => {
                    let expired = last_renewal.is_some_and(|t| t.elapsed() > self.timings.renew_deadline);
                    tracing::warn!(lease = %self.name, %error, "lease update failed");
                    if expired && *leader.borrow() {
                        tracing::warn!(lease = %self.name, "could not renew within the deadline; stepping down");
                        leader.send_replace(false);
                        last_renewal = None;
                    }
                }
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(self.timings.retry_period) => {}
            }
        }
        if *leader.borrow() {
            leader.send_replace(false);
            if let Err(error) = self.release().await {
                tracing::warn!(lease = %self.name, %error, "could not release the lease");
            } else {
                tracing::info!(lease = %self.name, "released the lease");
            }
        }
    }

    fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
        let Some(MicroTime(renewed)) = spec.renew_time else {
            return true;
        };
        let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
        now.as_second() > renewed.as_second() + duration
    }

    async fn try_acquire_or_renew(&self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let duration = i32::try_from(self.timings.lease_duration.as_secs()).unwrap_or(15);
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following(None)),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() == Some(self.identity.as_str()) {
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(duration);
        } else if holder.is_none() || Self::expired(spec, now) {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(duration);
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        } else {
            return Ok(Attempt::Following(holder));
        }
        // The replace carries the read resourceVersion: a concurrent writer makes it fail.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following(holder)),
            Err(e) => Err(e),
        }
    }

    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_expiry() {
        assert_eq!(
            lease_name("default", "mistral"),
            "epp-default-mistral.gateway-api-inference-extension.sigs.k8s.io"
        );
        let now = Timestamp::now();
        let spec = |ago: i64| LeaseSpec {
            renew_time: Some(MicroTime(Timestamp::from_second(now.as_second() - ago).unwrap())),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        };
        assert!(!LeaderElector::expired(&spec(5), now));
        assert!(LeaderElector::expired(&spec(20), now));
        assert!(LeaderElector::expired(&LeaseSpec::default(), now));
    }
}
