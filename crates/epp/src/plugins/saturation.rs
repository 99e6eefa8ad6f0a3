//! Saturation detectors: `utilization-detector` and `concurrency-detector` (GIE v1.5 /
//! llm-d-router v0.10). Each is both a [`SaturationDetector`], which admission asks whether
//! a sheddable request may go on (saturation ≥ 1.0 sheds it), and a [`Filter`] a profile may
//! reference to keep requests off full endpoints.
//!
//! `utilization-detector` reads the scraped figures:
//! * saturation = the mean over the candidates of `max(queue / queueDepthThreshold,
//!   kv / kvCacheUtilThreshold)`; an endpoint whose figures are missing or older than
//!   `metricsStalenessThreshold` counts as 1.0 (fail closed), no candidates is 1.0;
//! * as a filter it keeps fresh endpoints under `threshold × (1 + headroom)` on both, and
//!   keeps everything when that would keep nothing (fail open).
//!
//! Parameters: `queueDepthThreshold` (5, > 0), `kvCacheUtilThreshold` (0.8, in (0, 1]),
//! `metricsStalenessThreshold` (200ms, > 0), `headroom` (0, ≥ 0). The environment variables
//! `SD_QUEUE_DEPTH_THRESHOLD`, `SD_KV_CACHE_UTIL_THRESHOLD`, `SD_METRICS_STALENESS_THRESHOLD`
//! (v1.0–v1.4) and the top-level `saturationDetector` thresholds (v1.2–v1.4) set the defaults
//! of the detector the EPP adds when none is referenced.
//!
//! This is the v1.4+ gradient. GIE v1.0–v1.3 shed only when *no* candidate had room; v1.5 and
//! v0.10 agree on the gradient, and this EPP follows them.
//!
//! `concurrency-detector` reads the in-flight load this EPP counts (an `InFlightLoad`
//! attribute, from an `inflight-load-producer`):
//! * `requests` mode: saturation = requests in flight / (`maxConcurrency` × endpoints);
//!   `tokens`: tokens in flight / (`maxTokenConcurrency` × endpoints); `hybrid`: the mean over
//!   endpoints of the larger of the two ratios;
//! * as a filter it keeps endpoints under `limit × (1 + headroom)` (both limits in hybrid),
//!   and may keep none.
//!
//! Parameters: `concurrencyMode` (`requests`), `maxConcurrency` (100, > 0),
//! `maxTokenConcurrency` (1,000,000, > 0), `headroom` (0, ≥ 0), `inFlightLoadProducerName`.

use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::framework::attributes::InFlightLoad;
use crate::framework::data::{CycleState, DataKey};
use crate::framework::requestcontrol::{SaturationDetector, Unseen};
use crate::framework::scheduling::{Candidate, Filter, SchedulingRequest};

/// Why detector parameters are unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DetectorParamError {
    /// A threshold out of range.
    #[error("{name} must be {rule}, got {value}")]
    Range {
        /// Parameter.
        name: &'static str,
        /// What it must be.
        rule: &'static str,
        /// What it was.
        value: String,
    },
    /// A duration that does not parse.
    #[error("metricsStalenessThreshold: {0}")]
    Duration(String),
}

fn range(name: &'static str, rule: &'static str, value: impl ToString) -> DetectorParamError {
    DetectorParamError::Range {
        name,
        rule,
        value: value.to_string(),
    }
}

/// `utilization-detector` parameters as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UtilizationParams {
    /// Ideal waiting-queue depth of one endpoint.
    pub queue_depth_threshold: Option<i64>,
    /// Ideal KV-cache utilisation of one endpoint.
    pub kv_cache_util_threshold: Option<f64>,
    /// Older figures count as saturated, e.g. `200ms`.
    pub metrics_staleness_threshold: Option<String>,
    /// Burst allowance of the filter, as a fraction.
    pub headroom: Option<f64>,
}

/// The resolved thresholds of a `utilization-detector`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Utilization {
    /// Ideal waiting-queue depth.
    pub queue_depth: f64,
    /// Ideal KV-cache utilisation.
    pub kv_cache_util: f64,
    /// Staleness threshold.
    pub staleness: Duration,
    /// Filter headroom.
    pub headroom: f64,
}

impl Default for Utilization {
    fn default() -> Self {
        Self {
            queue_depth: 5.0,
            kv_cache_util: 0.8,
            staleness: Duration::from_millis(200),
            headroom: 0.0,
        }
    }
}

impl Utilization {
    /// `base` overridden by `params`, validated as the reference validates them.
    pub fn new(base: Self, params: &UtilizationParams) -> Result<Self, DetectorParamError> {
        let mut u = base;
        if let Some(q) = params.queue_depth_threshold {
            if q <= 0 {
                return Err(range("queueDepthThreshold", "strictly positive", q));
            }
            u.queue_depth = q as f64;
        }
        if let Some(kv) = params.kv_cache_util_threshold {
            if !(kv > 0.0 && kv <= 1.0) {
                return Err(range("kvCacheUtilThreshold", "in (0.0, 1.0]", kv));
            }
            u.kv_cache_util = kv;
        }
        if let Some(s) = &params.metrics_staleness_threshold {
            let d = crate::config::cli::go_duration(s).map_err(DetectorParamError::Duration)?;
            if d.is_zero() {
                return Err(range("metricsStalenessThreshold", "strictly positive", s));
            }
            u.staleness = d;
        }
        if let Some(h) = params.headroom {
            if !(h.is_finite() && h >= 0.0) {
                return Err(range("headroom", "a non-negative number", h));
            }
            u.headroom = h;
        }
        Ok(u)
    }

    fn score(&self, c: &Candidate<'_>, now: Instant) -> Option<f64> {
        let m = c.metrics();
        m.is_fresh(now, self.staleness).then(|| {
            (f64::from(m.waiting_queue) / self.queue_depth).max(m.kv_cache_usage / self.kv_cache_util)
        })
    }
}

impl SaturationDetector for Utilization {
    fn saturation(&self, candidates: &[Candidate<'_>], now: Instant) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        let total: f64 = candidates.iter().map(|c| self.score(c, now).unwrap_or(1.0)).sum();
        total / candidates.len() as f64
    }

    /// Each endpoint's queue grows by its share of the requests dispatched after its scrape.
    fn saturation_with(&self, candidates: &[Candidate<'_>], now: Instant, unseen: &Unseen<'_>) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        let n = candidates.len() as f64;
        let total: f64 = candidates
            .iter()
            .map(|c| {
                let m = c.metrics();
                if !m.is_fresh(now, self.staleness) {
                    return 1.0;
                }
                let queue = f64::from(m.waiting_queue) + unseen.since(m.updated_at) as f64 / n;
                (queue / self.queue_depth).max(m.kv_cache_usage / self.kv_cache_util)
            })
            .sum();
        total / n
    }
}

impl Filter for Utilization {
    fn filter<'s>(
        &self,
        req: &SchedulingRequest<'_>,
        _state: &CycleState,
        candidates: &[Candidate<'s>],
    ) -> Vec<Candidate<'s>> {
        let q_limit = self.queue_depth * (1.0 + self.headroom);
        let kv_limit = self.kv_cache_util * (1.0 + self.headroom);
        let kept: Vec<Candidate<'s>> = candidates
            .iter()
            .filter(|c| {
                let m = c.metrics();
                m.is_fresh(req.now, self.staleness)
                    && f64::from(m.waiting_queue) < q_limit
                    && m.kv_cache_usage < kv_limit
            })
            .copied()
            .collect();
        if kept.is_empty() {
            candidates.to_vec()
        } else {
            kept
        }
    }
}

/// How a `concurrency-detector` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyMode {
    /// Requests in flight.
    Requests,
    /// Tokens in flight.
    Tokens,
    /// The more constraining of the two, per endpoint.
    Hybrid,
}

/// `concurrency-detector` parameters as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConcurrencyParams {
    /// Counting mode.
    pub concurrency_mode: Option<ConcurrencyMode>,
    /// Ideal requests in flight per endpoint.
    pub max_concurrency: Option<i64>,
    /// Ideal tokens in flight per endpoint.
    pub max_token_concurrency: Option<i64>,
    /// Burst allowance of the filter, as a fraction.
    pub headroom: Option<f64>,
    /// The in-flight producer to read.
    pub in_flight_load_producer_name: Option<String>,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Concurrency {
    mode: ConcurrencyMode,
    max_requests: f64,
    max_tokens: f64,
    headroom: f64,
    load: DataKey<InFlightLoad>,
}

impl Concurrency {
    /// A detector reading `load`, configured by `params`.
    pub fn new(load: DataKey<InFlightLoad>, params: &ConcurrencyParams) -> Result<Self, DetectorParamError> {
        let max_requests = params.max_concurrency.unwrap_or(100);
        if max_requests <= 0 {
            return Err(range("maxConcurrency", "strictly positive", max_requests));
        }
        let max_tokens = params.max_token_concurrency.unwrap_or(1_000_000);
        if max_tokens <= 0 {
            return Err(range("maxTokenConcurrency", "strictly positive", max_tokens));
        }
        let headroom = params.headroom.unwrap_or(0.0);
        if !(headroom.is_finite() && headroom >= 0.0) {
            return Err(range("headroom", "a non-negative number", headroom));
        }
        Ok(Self {
            mode: params.concurrency_mode.unwrap_or(ConcurrencyMode::Requests),
            max_requests: max_requests as f64,
            max_tokens: max_tokens as f64,
            headroom,
            load,
        })
    }

    fn load_of(&self, c: &Candidate<'_>) -> (f64, f64) {
        c.get(self.load)
            .map_or((0.0, 0.0), |l| (l.requests() as f64, l.tokens() as f64))
    }
}

impl SaturationDetector for Concurrency {
    fn saturation(&self, candidates: &[Candidate<'_>], _now: Instant) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        let n = candidates.len() as f64;
        let loads = candidates.iter().map(|c| self.load_of(c));
        match self.mode {
            ConcurrencyMode::Requests => loads.map(|(r, _)| r).sum::<f64>() / (self.max_requests * n),
            ConcurrencyMode::Tokens => loads.map(|(_, t)| t).sum::<f64>() / (self.max_tokens * n),
            ConcurrencyMode::Hybrid => {
                loads
                    .map(|(r, t)| (r / self.max_requests).max(t / self.max_tokens))
                    .sum::<f64>()
                    / n
            }
        }
    }

    /// Requests dispatched and not yet scheduled count as in flight, spread evenly; in tokens
    /// each counts as the mean of the requests in flight.
    fn saturation_with(&self, candidates: &[Candidate<'_>], _now: Instant, unseen: &Unseen<'_>) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        let n = candidates.len() as f64;
        let (requests, tokens) = candidates
            .iter()
            .map(|c| self.load_of(c))
            .fold((0.0, 0.0), |(r, t), (cr, ct)| (r + cr, t + ct));
        let extra = unseen.unscheduled as f64;
        let extra_tokens = if requests > 0.0 {
            extra * tokens / requests
        } else {
            0.0
        };
        let share = (extra / n, extra_tokens / n);
        match self.mode {
            ConcurrencyMode::Requests => (requests + extra) / (self.max_requests * n),
            ConcurrencyMode::Tokens => (tokens + extra_tokens) / (self.max_tokens * n),
            ConcurrencyMode::Hybrid => {
                candidates
                    .iter()
                    .map(|c| {
                        let (r, t) = self.load_of(c);
                        ((r + share.0) / self.max_requests).max((t + share.1) / self.max_tokens)
                    })
                    .sum::<f64>()
                    / n
            }
        }
    }
}

impl Filter for Concurrency {
    fn filter<'s>(
        &self,
        _req: &SchedulingRequest<'_>,
        _state: &CycleState,
        candidates: &[Candidate<'s>],
    ) -> Vec<Candidate<'s>> {
        let req_limit = (self.max_requests * (1.0 + self.headroom)).floor();
        let tok_limit = (self.max_tokens * (1.0 + self.headroom)).floor();
        candidates
            .iter()
            .filter(|c| {
                let (r, t) = self.load_of(c);
                match self.mode {
                    ConcurrencyMode::Requests => r < req_limit,
                    ConcurrencyMode::Tokens => t < tok_limit,
                    ConcurrencyMode::Hybrid => r < req_limit && t < tok_limit,
                }
            })
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::framework::scheduling::candidates;
    use crate::plugins::testing::{request, states};

    #[test]
    fn utilization_is_the_mean_roofline_and_stale_is_full() {
        let u = Utilization::default();
        let now = Instant::now();
        let s = states(&[(5, 0.4), (0, 0.4)]);
        let c = candidates(&s);
        // max(5/5, 0.4/0.8) = 1 and max(0, 0.5) = 0.5.
        assert!((u.saturation(&c, now) - 0.75).abs() < 1e-12);
        let mut stale = states(&[(0, 0.0)]);
        let mut m = stale[0].metrics().clone();
        m.updated_at = None;
        stale[0].set(crate::datalayer::METRICS, Arc::new(m));
        assert_eq!(u.saturation(&candidates(&stale), now), 1.0);
        assert_eq!(u.saturation(&[], now), 1.0);
    }

    #[test]
    fn utilization_parameters_act_and_are_checked() {
        let p: UtilizationParams = serde_yaml::from_str("queueDepthThreshold: 8").unwrap();
        let u = Utilization::new(Utilization::default(), &p).unwrap();
        let s = states(&[(6, 0.1), (6, 0.1)]);
        assert!(u.saturation(&candidates(&s), Instant::now()) < 1.0);
        assert!(Utilization::default().saturation(&candidates(&s), Instant::now()) >= 1.0);
        for bad in [
            "queueDepthThreshold: 0",
            "kvCacheUtilThreshold: 1.5",
            "metricsStalenessThreshold: 0s",
            "metricsStalenessThreshold: soon",
            "headroom: -1",
        ] {
            let p: UtilizationParams = serde_yaml::from_str(bad).unwrap();
            assert!(Utilization::new(Utilization::default(), &p).is_err(), "{bad}");
        }
        assert!(serde_yaml::from_str::<UtilizationParams>("queueDepth: 3").is_err());
    }

    #[test]
    fn utilization_filter_keeps_room_and_fails_open() {
        let u = Utilization {
            headroom: 0.2,
            ..Utilization::default()
        };
        let s = states(&[(5, 0.1), (6, 0.1), (0, 0.97)]);
        let headers = Default::default();
        let req = request(&headers, "m", b"");
        let kept = u.filter(&req, &CycleState::default(), &candidates(&s));
        assert_eq!(kept.iter().map(|c| c.index).collect::<Vec<_>>(), vec![0]);
        let full = states(&[(9, 0.1), (9, 0.1)]);
        assert_eq!(
            u.filter(&req, &CycleState::default(), &candidates(&full)).len(),
            2
        );
    }

    #[test]
    fn concurrency_counts_what_is_in_flight() {
        let key = DataKey::<InFlightLoad>::named("concurrency-test");
        let mut s = states(&[(0, 0.0), (0, 0.0)]);
        let loads = [InFlightLoad::new(), InFlightLoad::new()];
        for (st, l) in s.iter_mut().zip(&loads) {
            st.set(key, Arc::new(l.clone()));
        }
        let _g: Vec<_> = (0..3).map(|_| loads[0].counters.start(1_000)).collect();
        let p: ConcurrencyParams = serde_yaml::from_str("maxConcurrency: 2").unwrap();
        let d = Concurrency::new(key, &p).unwrap();
        let c = candidates(&s);
        assert!((d.saturation(&c, Instant::now()) - 0.75).abs() < 1e-12);
        let headers = Default::default();
        let req = request(&headers, "m", b"");
        let kept = d.filter(&req, &CycleState::default(), &c);
        assert_eq!(kept.iter().map(|c| c.index).collect::<Vec<_>>(), vec![1]);
        let p: ConcurrencyParams =
            serde_yaml::from_str("concurrencyMode: tokens\nmaxTokenConcurrency: 1000").unwrap();
        let d = Concurrency::new(key, &p).unwrap();
        assert!((d.saturation(&c, Instant::now()) - 1.5).abs() < 1e-12);
        let p: ConcurrencyParams =
            serde_yaml::from_str("concurrencyMode: hybrid\nmaxConcurrency: 6").unwrap();
        let d = Concurrency::new(key, &p).unwrap();
        // Endpoint 1: max(3/6, 3000/1e6) = 0.5; endpoint 2: 0.
        assert!((d.saturation(&c, Instant::now()) - 0.25).abs() < 1e-12);
        assert!(serde_yaml::from_str::<ConcurrencyParams>("concurrencyMode: bytes").is_err());
        let p: ConcurrencyParams = serde_yaml::from_str("maxConcurrency: 0").unwrap();
        assert!(Concurrency::new(key, &p).is_err());
    }

    #[test]
    fn unseen_dispatches_count_until_the_figures_show_them() {
        let u = Utilization::default();
        let s = states(&[(0, 0.0), (0, 0.0)]);
        let c = candidates(&s);
        let scraped = s[0].metrics().updated_at.unwrap();
        let now = scraped + Duration::from_millis(10);
        let before = scraped - Duration::from_millis(5);
        let after = scraped + Duration::from_millis(5);
        // Four dispatched after the scrape: two more waiting per endpoint of threshold 5.
        let at = [before, after, after, after, after];
        let unseen = Unseen {
            unscheduled: 0,
            dispatched_at: &at,
        };
        assert_eq!(unseen.since(Some(scraped)), 4);
        assert!((u.saturation_with(&c, now, &unseen) - 0.4).abs() < 1e-12);
        assert_eq!(u.saturation_with(&c, now, &Unseen::default()), 0.0);

        let key = DataKey::<InFlightLoad>::named("concurrency-unseen");
        let mut s = states(&[(0, 0.0), (0, 0.0)]);
        let load = InFlightLoad::new();
        for st in s.iter_mut() {
            st.set(key, Arc::new(load.clone()));
        }
        let _g = load.counters.start(100);
        let p: ConcurrencyParams = serde_yaml::from_str("maxConcurrency: 2").unwrap();
        let d = Concurrency::new(key, &p).unwrap();
        let c = candidates(&s);
        let unseen = Unseen {
            unscheduled: 2,
            dispatched_at: &[],
        };
        // Both endpoints read the same counter (1 each) plus one unscheduled each: 4 / 4.
        assert!((d.saturation_with(&c, now, &unseen) - 1.0).abs() < 1e-12);
    }
}
