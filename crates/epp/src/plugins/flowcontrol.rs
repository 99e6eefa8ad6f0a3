//! Flow-control policies under llm-d-router v0.10's type names
//! (`pkg/epp/framework/plugins/flowcontrol/`):
//!
//! * ordering within a flow: `fcfs-ordering-policy` (enqueue time), `edf-ordering-policy`
//!   (enqueue time + the queue TTL; without a TTL, never), `slo-deadline-ordering-policy`
//!   (receive time + the `x-llm-d-slo-ttft-ms` header; without one, never);
//! * fairness between the flows (fairness ids) of a band: `global-strict-fairness-policy` (the
//!   flow whose head comes first in the band's ordering: one order across tenants) and
//!   `round-robin-fairness-policy` (flows in turn, sorted by id, starting after the one
//!   served last). Beyond the reference, a full round-robin band admits a newcomer from a
//!   flow smaller than the largest by pushing out the largest flow's newest request (429
//!   `evicted-queue-pressure`): otherwise the tenant sending most fills the band and the
//!   others' requests are refused at the door, and taking turns shares nothing;
//! * `static-usage-limit-policy`: one ceiling, `threshold` (1.0, in (0, 1]), for every band;
//! * `priority-holdback-policy` (v0.10 alpha): ceilings spread linearly from `maxCeiling` (1.0)
//!   for the highest band to `minCeiling` (required, in [0, 1)) for the lowest, by rank
//!   (`domain: rank`, the default: equal steps) or by priority value (`domain: value`); with
//!   one band, `maxCeiling`. Lower bands stop while room is left for higher ones
//!   (`usagelimits/priorityholdback/`).
//!
//! The ordering and fairness policies take no parameters. The reference does not check the
//! static threshold's range; this EPP refuses a value outside (0, 1], which would never or
//! always gate.

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

    /// Taking turns is only fair if every tenant can wait its turn: a full band pushes out the
    /// largest flow's newest request for a smaller flow's newcomer.
    fn shares_capacity(&self) -> bool {
        true
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

/// `priority-holdback-policy` parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HoldbackParams {
    /// Interpolation curve: `linear`, the only one.
    pub shape: Option<String>,
    /// `rank` (default) or `value`.
    pub domain: Option<String>,
    /// Ceiling of the lowest band, in [0, 1); required.
    pub min_ceiling: Option<f64>,
    /// Ceiling of the highest band, in (0, 1]; 1.0 by default.
    pub max_ceiling: Option<f64>,
}

/// `priority-holdback-policy`: see the module docs.
#[derive(Debug)]
pub struct PriorityHoldback {
    by_value: bool,
    min: f64,
    max: f64,
}

impl PriorityHoldback {
    /// The policy from its parameters; every problem is reported, joined.
    pub fn new(p: &HoldbackParams) -> Result<Self, String> {
        let mut errs = Vec::new();
        if let Some(shape) = p.shape.as_deref().filter(|s| *s != "linear") {
            errs.push(format!("unsupported shape \"{shape}\", must be \"linear\""));
        }
        let by_value = match p.domain.as_deref() {
            None | Some("rank") => false,
            Some("value") => true,
            Some(other) => {
                errs.push(format!(
                    "unsupported domain \"{other}\", must be one of: \"rank\", \"value\""
                ));
                false
            }
        };
        let max = p.max_ceiling.unwrap_or(1.0);
        if !(max > 0.0 && max <= 1.0) {
            errs.push(format!("maxCeiling must be in (0.0, 1.0], got {max}"));
        }
        let min = match p.min_ceiling {
            None => {
                errs.push("minCeiling is required".to_owned());
                0.0
            }
            Some(min) => {
                if !(0.0..1.0).contains(&min) {
                    errs.push(format!("minCeiling must be in [0.0, 1.0), got {min}"));
                } else if min >= max {
                    errs.push(format!(
                        "minCeiling ({min}) must be strictly less than maxCeiling ({max})"
                    ));
                }
                min
            }
        };
        if errs.is_empty() {
            Ok(Self { by_value, min, max })
        } else {
            Err(errs.join("; "))
        }
    }
}

impl UsageLimitPolicy for PriorityHoldback {
    fn ceilings(&self, _saturation: f64, priorities: &[i32], ceilings: &mut [f64]) {
        let n = priorities.len();
        if n <= 1 {
            ceilings.fill(self.max);
            return;
        }
        let spread = self.max - self.min;
        if self.by_value {
            let (hi, lo) = (f64::from(priorities[0]), f64::from(priorities[n - 1]));
            for (c, p) in ceilings.iter_mut().zip(priorities) {
                *c = if hi == lo {
                    self.max
                } else {
                    self.min + (f64::from(*p) - lo) / (hi - lo) * spread
                };
            }
        } else {
            for (i, c) in ceilings.iter_mut().enumerate().take(n) {
                *c = self.max - i as f64 * spread / (n - 1) as f64;
            }
        }
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

    #[test]
    fn holdback_spreads_ceilings_by_rank_or_value() {
        let rank = PriorityHoldback::new(&serde_yaml::from_str("minCeiling: 0.5").unwrap()).unwrap();
        let mut c = [0.0; 3];
        rank.ceilings(0.0, &[10, 0, -1], &mut c);
        assert_eq!(c, [1.0, 0.75, 0.5]);
        let mut one = [0.0];
        rank.ceilings(0.0, &[3], &mut one);
        assert_eq!(one, [1.0]);
        let value = PriorityHoldback::new(
            &serde_yaml::from_str("domain: value\nminCeiling: 0.2\nmaxCeiling: 0.8").unwrap(),
        )
        .unwrap();
        value.ceilings(0.0, &[10, 0, -10], &mut c);
        assert!((c[0] - 0.8).abs() < 1e-12 && (c[1] - 0.5).abs() < 1e-12 && (c[2] - 0.2).abs() < 1e-12);
        for (bad, want) in [
            ("{}", "minCeiling is required"),
            ("minCeiling: 1.0", "minCeiling must be in [0.0, 1.0)"),
            ("{minCeiling: 0.5, maxCeiling: 0.4}", "strictly less"),
            ("{minCeiling: 0.5, shape: sigmoid}", "unsupported shape"),
            ("{minCeiling: 0.5, domain: log}", "unsupported domain"),
        ] {
            let e = PriorityHoldback::new(&serde_yaml::from_str(bad).unwrap()).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
