//! Load scorers: `queue-scorer`, `running-requests-size-scorer`,
//! `kv-cache-utilization-scorer`.
//!
//! The queue and running scorers are min-max normalised over *this cycle's* candidates, as the
//! reference's: the least loaded candidate scores 1 and the most loaded 0, whatever the
//! absolute numbers; when all are equal, all score 1. The KV scorer is absolute:
//! `1 - utilisation`, where utilisation is the scraped figure corrected by what this EPP has
//! seen since the scrape: the uncached prompt tokens of requests it sent the server, minus
//! those of requests that finished, as a share of the server's KV capacity when the server
//! reports it (an [`InFlightLoad`] attribute from the in-flight load producer). Scrapes are
//! 50 ms apart; without the correction every request of a burst sees the same figures and
//! goes to the same server, which then queues them while its peers idle.

use crate::datalayer::{EndpointState, Metrics};
use crate::framework::attributes::InFlightLoad;
use crate::framework::data::{CycleState, DataKey};
use crate::framework::scheduling::{Candidate, SchedulingRequest, Scorer};

/// Writes `(max - x) / (max - min)` for each candidate's `value`, or 1 when all are equal.
fn min_max_inverse(candidates: &[Candidate<'_>], value: fn(&Metrics) -> u32, scores: &mut [f64]) {
    let (mut min, mut max) = (u32::MAX, 0u32);
    for c in candidates {
        let v = value(c.metrics());
        min = min.min(v);
        max = max.max(v);
    }
    if candidates.is_empty() {
        return;
    }
    if max == min {
        scores.fill(1.0);
        return;
    }
    // One division, not one per candidate: the scale is the same for all, so the order and
    // the ties of the scores are those of the exact quotients.
    let scale = 1.0 / f64::from(max - min);
    for (s, c) in scores.iter_mut().zip(candidates) {
        *s = f64::from(max - value(c.metrics())) * scale;
    }
}

/// `queue-scorer`: fewer waiting requests is better.
#[derive(Debug, Default)]
pub struct QueueScorer;

impl Scorer for QueueScorer {
    fn score(
        &self,
        _req: &SchedulingRequest<'_>,
        _state: &CycleState,
        candidates: &[Candidate<'_>],
        scores: &mut [f64],
    ) {
        min_max_inverse(candidates, |m| m.waiting_queue, scores);
    }
}

/// `running-requests-size-scorer`: fewer running requests is better.
#[derive(Debug, Default)]
pub struct RunningRequestsScorer;

impl Scorer for RunningRequestsScorer {
    fn score(
        &self,
        _req: &SchedulingRequest<'_>,
        _state: &CycleState,
        candidates: &[Candidate<'_>],
        scores: &mut [f64],
    ) {
        min_max_inverse(candidates, |m| m.running, scores);
    }
}

/// Scraped KV utilisation corrected by the requests sent and finished since the scrape (when
/// the endpoint has the `load` attribute), as a share of KV capacity, within [0, 1].
pub fn estimated_kv_usage(c: &EndpointState, load: Option<DataKey<InFlightLoad>>) -> f64 {
    let m = c.metrics();
    // The attribute is only looked up where it can change the figure.
    let pending = m
        .cache_capacity_tokens()
        .and_then(|capacity| {
            let load = c.get(load?)?;
            Some(load.tokens_since_scrape() as f64 / capacity as f64)
        })
        .unwrap_or(0.0);
    (m.kv_cache_usage + pending).clamp(0.0, 1.0)
}

/// `kv-cache-utilization-scorer`: more free KV cache is better.
#[derive(Debug, Default)]
pub struct KvCacheScorer {
    /// The in-flight load attribute that corrects the scraped figure, if any producer keeps one.
    pub in_flight: Option<DataKey<InFlightLoad>>,
}

impl Scorer for KvCacheScorer {
    fn score(
        &self,
        _req: &SchedulingRequest<'_>,
        _state: &CycleState,
        candidates: &[Candidate<'_>],
        scores: &mut [f64],
    ) {
        for (s, c) in scores.iter_mut().zip(candidates) {
            *s = 1.0 - estimated_kv_usage(c, self.in_flight);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::plugins::testing::{request, score, states};

    #[test]
    fn queue_is_min_max_normalised() {
        let s = states(&[(0, 0.0), (5, 0.0), (10, 0.0)]);
        let headers = Default::default();
        let req = request(&headers, "m", b"");
        assert_eq!(score(&QueueScorer, &req, &s), vec![1.0, 0.5, 0.0]);
        let s = states(&[(3, 0.0), (3, 0.0)]);
        assert_eq!(score(&QueueScorer, &req, &s), vec![1.0, 1.0]);
    }

    #[test]
    fn kv_counts_prompts_sent_since_the_scrape() {
        let key = DataKey::<InFlightLoad>::named("test-load");
        let mut s = states(&[(0, 0.25), (0, 0.25), (0, 0.9)]);
        let loads: Vec<InFlightLoad> = (0..3).map(|_| InFlightLoad::new()).collect();
        for (st, load) in s.iter_mut().zip(&loads) {
            let mut m = st.metrics().clone();
            (m.cache_block_size, m.cache_num_blocks) = (Some(16), Some(400));
            st.set(crate::datalayer::METRICS, Arc::new(m));
            st.set(key, Arc::new(load.clone()));
        }
        // 1,280 tokens sent to the first since its scrape: a fifth of 6,400 tokens of KV.
        let _a = loads[0].counters.start(1_280);
        let _c = loads[2].counters.start(100_000);
        // One that was running at the scrape finishes on the second: 640 tokens freed.
        let done = loads[1].counters.start(640);
        s[1].set(key, Arc::new(loads[1].stamped()));
        drop(done);
        let headers = Default::default();
        let req = request(&headers, "m", b"");
        let out = score(&KvCacheScorer { in_flight: Some(key) }, &req, &s);
        assert!((out[0] - 0.55).abs() < 1e-9, "{out:?}");
        assert!((out[1] - 0.85).abs() < 1e-9, "{out:?}");
        assert_eq!(out[2], 0.0, "capped at full");
        // Without an in-flight producer the scraped figure is used as it is.
        let out = score(&KvCacheScorer { in_flight: None }, &req, &s);
        assert!((out[0] - 0.75).abs() < 1e-9);
        // Without a reported capacity too.
        let bare = states(&[(0, 0.25)]);
        let out = score(&KvCacheScorer { in_flight: Some(key) }, &req, &bare);
        assert!((out[0] - 0.75).abs() < 1e-9);
    }

    #[test]
    fn kv_is_one_minus_usage() {
        let s = states(&[(0, 0.25), (0, 0.9)]);
        let headers = Default::default();
        let req = request(&headers, "m", b"");
        let out = score(&KvCacheScorer::default(), &req, &s);
        assert!((out[0] - 0.75).abs() < 1e-9 && (out[1] - 0.1).abs() < 1e-9);
    }
}
