//! Load scorers: waiting queue, running requests, KV-cache utilisation.
//!
//! The queue and running scorers are min-max normalised over *this cycle's* candidates, so
//! the least loaded candidate always scores 1 and the most loaded 0, whatever the absolute
//! numbers; when all are equal, all score 1. The KV scorer is absolute: `1 - utilisation`,
//! where utilisation is the scraped figure corrected by what this EPP has seen since the
//! scrape: the uncached prompt tokens of requests it sent the server, minus those of requests
//! that finished, as a share of the server's KV capacity when the server reports it. Scrapes
//! are 50 ms apart; without the correction every request of a burst sees the same figures and
//! goes to the same server, which then queues them while its peers idle.

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

/// Scraped KV utilisation corrected by the requests sent and finished since the scrape, as a
/// share of KV capacity, within [0, 1].
pub fn estimated_kv_usage(c: &EndpointState) -> f64 {
    let pending = match c.metrics.cache_capacity_tokens() {
        Some(capacity) => c.unscraped_tokens() as f64 / capacity as f64,
        None => 0.0,
    };
    (c.metrics.kv_cache_usage + pending).clamp(0.0, 1.0)
}

/// `kv-cache-utilization-scorer`: more free KV cache is better.
#[derive(Debug, Default)]
pub struct KvCacheScorer;

impl Scorer for KvCacheScorer {
    fn score(&self, _req: &SchedulingRequest<'_>, candidates: &[&EndpointState], scores: &mut [f64]) {
        for (s, c) in scores.iter_mut().zip(candidates) {
            *s = 1.0 - estimated_kv_usage(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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
    fn kv_counts_prompts_sent_since_the_scrape() {
        let mut s = states(&[(0, 0.25), (0, 0.25), (0, 0.9)]);
        for st in &mut s {
            let mut m = (*st.metrics).clone();
            (m.cache_block_size, m.cache_num_blocks) = (Some(16), Some(400));
            st.metrics = Arc::new(m);
        }
        // 1,280 tokens sent to the first since its scrape: a fifth of 6,400 tokens of KV.
        let _a = s[0].dispatch.start(1_280);
        let _c = s[2].dispatch.start(100_000);
        // One that was running at the scrape finishes on the second: 640 tokens freed.
        let done = s[1].dispatch.start(640);
        let mut m = (*s[1].metrics).clone();
        m.sent_tokens_at_scrape = 640;
        s[1].metrics = Arc::new(m);
        drop(done);
        let cands: Vec<_> = s.iter().collect();
        let headers = Default::default();
        let req = request(&headers, "m", b"");
        let mut out = vec![0.0; 3];
        KvCacheScorer.score(&req, &cands, &mut out);
        assert!((out[0] - 0.55).abs() < 1e-9, "{out:?}");
        assert!((out[1] - 0.85).abs() < 1e-9, "{out:?}");
        assert_eq!(out[2], 0.0, "capped at full");
        // Without a reported capacity the scraped figure is used as it is.
        let bare = states(&[(0, 0.25)]);
        let _b = bare[0].dispatch.start(1_280);
        let mut out = vec![0.0; 1];
        KvCacheScorer.score(&req, &bare.iter().collect::<Vec<_>>(), &mut out);
        assert!((out[0] - 0.75).abs() < 1e-9);
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
