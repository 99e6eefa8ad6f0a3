//! Load scorers: waiting queue, running requests, KV-cache utilisation.
//!
//! The queue and running scorers are min-max normalised over *this cycle's* candidates, so
//! the least loaded candidate always scores 1 and the most loaded 0, whatever the absolute
//! numbers; when all are equal, all score 1. The KV scorer is absolute: `1 - utilisation`.

use crate::datalayer::{EndpointState, Metrics};
use crate::scheduling::{SchedulingRequest, Scorer};

/// Writes `(max - x) / (max - min)` for each candidate's `value`, or 1 when all are equal.
fn min_max_inverse(candidates: &[&EndpointState], value: fn(&Metrics) -> u32, scores: &mut [f64]) {
    let (mut min, mut max) = (u32::MAX, 0u32);
    for c in candidates {
        let v = value(&c.metrics);
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
    let range = f64::from(max - min);
    for (s, c) in scores.iter_mut().zip(candidates) {
        *s = f64::from(max - value(&c.metrics)) / range;
    }
}

/// `queue-scorer`: fewer waiting requests is better.
#[derive(Debug, Default)]
pub struct QueueScorer;

impl Scorer for QueueScorer {
    fn score(&self, _req: &SchedulingRequest<'_>, candidates: &[&EndpointState], scores: &mut [f64]) {
        min_max_inverse(candidates, |m| m.waiting_queue, scores);
    }
}

/// `running-requests-size-scorer`: fewer running requests is better.
#[derive(Debug, Default)]
pub struct RunningRequestsScorer;

impl Scorer for RunningRequestsScorer {
    fn score(&self, _req: &SchedulingRequest<'_>, candidates: &[&EndpointState], scores: &mut [f64]) {
        min_max_inverse(candidates, |m| m.running, scores);
    }
}

/// `kv-cache-utilization-scorer`: more free KV cache is better.
#[derive(Debug, Default)]
pub struct KvCacheScorer;

impl Scorer for KvCacheScorer {
    fn score(&self, _req: &SchedulingRequest<'_>, candidates: &[&EndpointState], scores: &mut [f64]) {
        for (s, c) in scores.iter_mut().zip(candidates) {
            *s = 1.0 - c.metrics.kv_cache_usage;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::plugins::testing::{request, states};

    #[test]
    fn queue_is_min_max_normalised() {
        let s = states(&[(0, 0.0), (5, 0.0), (10, 0.0)]);
        let cands: Vec<_> = s.iter().collect();
        let headers = Default::default();
        let req = request(&headers, "m", b"");
        let mut out = vec![0.0; 3];
        QueueScorer.score(&req, &cands, &mut out);
        assert_eq!(out, vec![1.0, 0.5, 0.0]);
        let s = states(&[(3, 0.0), (3, 0.0)]);
        let cands: Vec<_> = s.iter().collect();
        let mut out = vec![0.0; 2];
        QueueScorer.score(&req, &cands, &mut out);
        assert_eq!(out, vec![1.0, 1.0]);
    }

    #[test]
    fn kv_is_one_minus_usage() {
        let s = states(&[(0, 0.25), (0, 0.9)]);
        let cands: Vec<_> = s.iter().collect();
        let headers = Default::default();
        let req = request(&headers, "m", b"");
        let mut out = vec![0.0; 2];
        KvCacheScorer.score(&req, &cands, &mut out);
        assert!((out[0] - 0.75).abs() < 1e-9 && (out[1] - 0.1).abs() < 1e-9);
    }
}
