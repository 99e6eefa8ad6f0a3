//! Passive health: endpoints that keep answering 5xx are ejected for a while, as Envoy's
//! outlier detection does for the clusters it balances (`consecutive_5xx` 5,
//! `base_ejection_time` 30 s, the ejection growing with each repeat up to 10×, at most 10 % of
//! the pool ejected at once but always one). The gateway
//! cannot do it for a pool it reaches through the picker's destination, and a model server whose
//! `/metrics` still looks healthy while every request fails (a wedged engine, a broken adapter)
//! would otherwise keep attracting traffic because it looks idle.
//!
//! The state is a few atomics per endpoint, shared by every snapshot that holds the endpoint:
//! writes come from the response path (one request's outcome), reads from the candidate filter.
//! No lock, no map.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tokio::time::{Duration, Instant};

/// When to eject an endpoint and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionPolicy {
    /// Consecutive 5xx answers that eject (`--endpoint-failure-threshold`).
    pub consecutive_failures: u32,
    /// First ejection time; the n-th consecutive ejection lasts n times as long, up to
    /// [`MAX_EJECTION_FACTOR`] times (`--endpoint-ejection-time`).
    pub base: Duration,
}

/// Longest ejection, as a multiple of the base (Envoy's `max_ejection_time` default is 10×).
pub const MAX_EJECTION_FACTOR: u32 = 10;

/// Share of a pool that may be ejected at once, in percent (Envoy's `max_ejection_percent`
/// default); at least one endpoint may always be.
pub const MAX_EJECTION_PERCENT: usize = 10;

/// How many of `pool` endpoints may be ejected at once: 10 %, at least one.
pub fn max_ejected(pool: usize) -> usize {
    (pool * MAX_EJECTION_PERCENT / 100).max(1)
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base: Duration::from_secs(30),
        }
    }
}

/// Milliseconds since a process-wide origin, on tokio's clock (so tests can pause it).
fn millis(now: Instant) -> u64 {
    static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(now.saturating_duration_since(*ORIGIN).as_millis()).unwrap_or(u64::MAX)
}

/// One endpoint's recent outcomes.
#[derive(Debug, Default)]
pub struct EndpointHealth {
    consecutive: AtomicU32,
    ejections: AtomicU32,
    /// `millis()` until which the endpoint is ejected; 0 when it is not.
    ejected_until: AtomicU64,
}

impl EndpointHealth {
    /// Records an answer that was not a server error.
    pub fn success(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// Records a server error (5xx); returns whether it ejected the endpoint. `may_eject` is
    /// false when the pool has as many endpoints ejected as it may (see
    /// [`max_ejected`]); failures of an endpoint already ejected (requests sent before its
    /// ejection) do not count again.
    pub fn failure(&self, policy: &EjectionPolicy, now: Instant, may_eject: bool) -> bool {
        if policy.consecutive_failures == 0 || self.is_ejected(now) {
            return false;
        }
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if n < policy.consecutive_failures || !may_eject {
            return false;
        }
        // One thread crossing the threshold ejects; a concurrent one finds the count reset.
        if self
            .consecutive
            .compare_exchange(n, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        let times = (self.ejections.fetch_add(1, Ordering::Relaxed) + 1).min(MAX_EJECTION_FACTOR);
        let until = now
            .checked_add(policy.base.saturating_mul(times))
            .map_or(u64::MAX, millis);
        self.ejected_until.store(until.max(1), Ordering::Relaxed);
        true
    }

    /// Whether the endpoint is ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && millis(now) < until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_for_a_growing_while() {
        let policy = EjectionPolicy {
            consecutive_failures: 3,
            base: Duration::from_secs(10),
        };
        let h = EndpointHealth::default();
        let fail = |h: &EndpointHealth| h.failure(&policy, Instant::now(), true);
        assert!(!fail(&h));
        assert!(!fail(&h));
        h.success();
        assert!(!fail(&h));
        assert!(!fail(&h));
        assert!(
            !h.is_ejected(Instant::now()),
            "a success in between resets the count"
        );
        assert!(fail(&h));
        assert!(h.is_ejected(Instant::now()));
        // Failures of requests sent before the ejection do not count again.
        for _ in 0..10 {
            assert!(!fail(&h));
        }
        tokio::time::advance(Duration::from_millis(10_001)).await;
        assert!(!h.is_ejected(Instant::now()));
        // Failing again at once: the second ejection lasts twice as long.
        for _ in 0..3 {
            fail(&h);
        }
        tokio::time::advance(Duration::from_secs(15)).await;
        assert!(h.is_ejected(Instant::now()));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!h.is_ejected(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn off_capped_and_saturating() {
        let off = EjectionPolicy {
            consecutive_failures: 0,
            base: Duration::from_secs(10),
        };
        let h = EndpointHealth::default();
        for _ in 0..10 {
            assert!(!h.failure(&off, Instant::now(), true));
        }
        assert!(!h.is_ejected(Instant::now()));
        // A pool at its ejection cap ejects no more.
        let policy = EjectionPolicy {
            consecutive_failures: 3,
            ..off
        };
        for _ in 0..10 {
            assert!(!h.failure(&policy, Instant::now(), false));
        }
        assert!(!h.is_ejected(Instant::now()));
        // A huge base saturates instead of panicking.
        let long = EjectionPolicy {
            consecutive_failures: 1,
            base: Duration::MAX,
        };
        let h = EndpointHealth::default();
        assert!(h.failure(&long, Instant::now(), true));
        assert!(h.is_ejected(Instant::now()));
        assert_eq!((max_ejected(3), max_ejected(10), max_ejected(25)), (1, 1, 2));
    }
}
