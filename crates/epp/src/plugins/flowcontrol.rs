//! Flow-control policies under llm-d-router v0.10's type names
//! (`pkg/epp/framework/plugins/flowcontrol/`):
//!
//! * ordering within a flow: `fcfs-ordering-policy` (enqueue time), `edf-ordering-policy`
//!   (enqueue time + the queue TTL; without a TTL, never), `slo-deadline-ordering-policy`
//!   (receive time + the `x-llm-d-slo-ttft-ms` header; without one, never);
//! * fairness between the flows (fairness ids) of a band: `global-strict-fairness-policy` (the
//!   flow whose head comes first in the band's ordering: one order across tenants) and
//!   `round-robin-fairness-policy` (flows in turn, sorted by id, starting after the one
//!   served last);
//! * `static-usage-limit-policy`: one ceiling, `threshold` (1.0, in (0, 1]), for every band.
//!
//! None takes parameters but the usage limit's `threshold`. The reference does not check the
//! threshold's range; this EPP refuses a value outside (0, 1], which would never or always
//! gate.

use serde::Deserialize;
use tokio::time::Instant;

use crate::framework::flowcontrol::{
    FairnessPolicy, FlowHead, OrderingPolicy, QueuedRequest, UsageLimitPolicy,
};

/// `fcfs-ordering-policy`: first come, first served.
#[derive(Debug, Default)]
pub struct Fcfs;

impl OrderingPolicy for Fcfs {
    fn key(&self, req: &QueuedRequest) -> Option<Instant> {
        Some(req.enqueued)
    }
}

/// `edf-ordering-policy`: earliest queue deadline (enqueue time + TTL) first. With one TTL for
/// every request (the reference has no per-request TTL either) this is FCFS.
#[derive(Debug, Default)]
pub struct Edf;

impl OrderingPolicy for Edf {
    fn key(&self, req: &QueuedRequest) -> Option<Instant> {
        req.ttl.filter(|t| !t.is_zero()).map(|t| req.enqueued + t)
    }
}

/// `slo-deadline-ordering-policy`: earliest TTFT deadline (receive time + the request's
/// `x-llm-d-slo-ttft-ms`) first; requests without one go last, in arrival order.
#[derive(Debug, Default)]
pub struct SloDeadline;

impl OrderingPolicy for SloDeadline {
    fn key(&self, req: &QueuedRequest) -> Option<Instant> {
        req.slo_ttft.map(|d| req.received + d)
    }
}

/// Whether head `a` comes before head `b` in a band's ordering (no key last, then arrival).
fn before(a: &FlowHead<'_>, b: &FlowHead<'_>) -> bool {
    match (a.key, b.key) {
        (Some(x), Some(y)) if x != y => x < y,
        (Some(_), None) => true,
        (None, Some(_)) => false,
        _ => a.seq < b.seq,
    }
}

/// `global-strict-fairness-policy`: the flow whose head comes first.
#[derive(Debug, Default)]
pub struct GlobalStrict;

impl FairnessPolicy for GlobalStrict {
    fn select(&self, flows: &[FlowHead<'_>], _last: Option<&str>) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, f) in flows.iter().enumerate() {
            if best.is_none_or(|b| before(f, &flows[b])) {
                best = Some(i);
            }
        }
        best
    }
}

/// `round-robin-fairness-policy`: the first flow after the one served last, in id order.
#[derive(Debug, Default)]
pub struct RoundRobin;

impl FairnessPolicy for RoundRobin {
    fn select(&self, flows: &[FlowHead<'_>], last: Option<&str>) -> Option<usize> {
        if flows.is_empty() {
            return None;
        }
        let next = last.map_or(0, |last| flows.partition_point(|f| f.id <= last));
        Some(if next == flows.len() { 0 } else { next })
    }
}

/// `static-usage-limit-policy` parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticUsageParams {
    /// Saturation at which every band stops being served (default 1.0).
    pub threshold: Option<f64>,
}

/// `static-usage-limit-policy`: every band is served while saturation < `threshold`.
#[derive(Debug)]
pub struct StaticUsageLimit {
    threshold: f64,
}

impl StaticUsageLimit {
    /// The policy from its parameters; a threshold outside (0, 1] is refused.
    pub fn new(p: &StaticUsageParams) -> Result<Self, String> {
        let threshold = p.threshold.unwrap_or(1.0);
        if !(threshold > 0.0 && threshold <= 1.0) {
            return Err(format!("threshold must be in (0, 1], got {threshold}"));
        }
        Ok(Self { threshold })
    }
}

impl UsageLimitPolicy for StaticUsageLimit {
    fn ceilings(&self, _saturation: f64, _priorities: &[i32], ceilings: &mut [f64]) {
        ceilings.fill(self.threshold);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn queued(enqueued_ms: u64, ttl_ms: Option<u64>, slo_ms: Option<u64>) -> QueuedRequest {
        let base = Instant::now();
        QueuedRequest {
            enqueued: base + Duration::from_millis(enqueued_ms),
            received: base,
            ttl: ttl_ms.map(Duration::from_millis),
            slo_ttft: slo_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn ordering_keys() {
        let a = queued(5, Some(100), Some(50));
        let b = queued(10, Some(100), Some(20));
        assert!(Fcfs.key(&a) < Fcfs.key(&b));
        assert!(Edf.key(&a) < Edf.key(&b));
        assert_eq!(Edf.key(&queued(5, None, None)), None);
        assert_eq!(Edf.key(&queued(5, Some(0), None)), None);
        // b's SLO deadline (received + 20 ms) comes before a's (received + 50 ms).
        assert!(SloDeadline.key(&b) < SloDeadline.key(&a));
        assert_eq!(SloDeadline.key(&queued(0, None, None)), None);
    }

    fn head(id: &str, key: Option<Instant>, seq: u64) -> FlowHead<'_> {
        FlowHead { id, key, seq }
    }

    #[test]
    fn global_strict_serves_the_earliest_head() {
        let t = Instant::now();
        let flows = [
            head("a", Some(t + Duration::from_millis(3)), 7),
            head("b", Some(t + Duration::from_millis(1)), 9),
            head("c", None, 1),
        ];
        assert_eq!(GlobalStrict.select(&flows, None), Some(1));
        let ties = [head("a", Some(t), 7), head("b", Some(t), 2), head("c", None, 1)];
        assert_eq!(GlobalStrict.select(&ties, Some("b")), Some(1));
        let keyless = [head("a", None, 7), head("b", None, 2)];
        assert_eq!(GlobalStrict.select(&keyless, None), Some(1));
        assert_eq!(GlobalStrict.select(&[], None), None);
    }

    #[test]
    fn round_robin_takes_turns_in_id_order() {
        let flows = [head("a", None, 0), head("c", None, 0), head("d", None, 0)];
        assert_eq!(RoundRobin.select(&flows, None), Some(0));
        assert_eq!(RoundRobin.select(&flows, Some("a")), Some(1));
        // The last one served ("b") left: the next id after it.
        assert_eq!(RoundRobin.select(&flows, Some("b")), Some(1));
        assert_eq!(RoundRobin.select(&flows, Some("d")), Some(0));
        assert_eq!(RoundRobin.select(&[], Some("d")), None);
    }

    #[test]
    fn static_threshold_is_checked_and_applied() {
        let p: StaticUsageParams = serde_yaml::from_str("threshold: 0.6").unwrap();
        let mut c = [0.0; 3];
        StaticUsageLimit::new(&p)
            .unwrap()
            .ceilings(0.9, &[5, 0, -1], &mut c);
        assert_eq!(c, [0.6; 3]);
        for bad in ["threshold: 0", "threshold: 1.5", "threshold: -1"] {
            let p: StaticUsageParams = serde_yaml::from_str(bad).unwrap();
            assert!(StaticUsageLimit::new(&p).is_err(), "{bad}");
        }
        assert!(serde_yaml::from_str::<StaticUsageParams>("limit: 1").is_err());
    }
}
