//! `lora-affinity-scorer`: prefer endpoints that already run the requested adapter.
//!
//! 1.0 if the target model is an active adapter; 0.8 if the endpoint has room to load one
//! more (active + waiting < max); 0.6 if the adapter is queued there; else 0. A base model
//! on servers without LoRA metrics therefore scores 0 everywhere, which changes no ranking.

use crate::datalayer::EndpointState;
use crate::scheduling::{SchedulingRequest, Scorer};

/// See the module docs.
#[derive(Debug, Default)]
pub struct LoraAffinityScorer;

impl Scorer for LoraAffinityScorer {
    fn score(&self, req: &SchedulingRequest<'_>, candidates: &[&EndpointState], scores: &mut [f64]) {
        let target = req.target_model;
        for (s, c) in scores.iter_mut().zip(candidates) {
            let lora = &c.metrics.lora;
            *s = if lora.is_active(target) {
                1.0
            } else if (lora.active.len() + lora.waiting.len()) < lora.max_active as usize {
                0.8
            } else if lora.is_waiting(target) {
                0.6
            } else {
                0.0
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::datalayer::{Endpoint, LoraInfo, Metrics};
    use crate::scheduling::plugins::testing::request;

    fn state(active: &[&str], waiting: &[&str], max: u32) -> EndpointState {
        EndpointState::new(
            Arc::new(Endpoint::from_address("10.0.0.1:8000".parse().unwrap())),
            Arc::new(Metrics {
                lora: LoraInfo {
                    active: active.iter().map(|s| Arc::from(*s)).collect(),
                    waiting: waiting.iter().map(|s| Arc::from(*s)).collect(),
                    max_active: max,
                },
                ..Metrics::default()
            }),
        )
    }

    #[test]
    fn tiers() {
        let s = [
            state(&["sql"], &[], 2),
            state(&["a"], &[], 2),
            state(&["a", "b"], &["sql"], 2),
            state(&["a", "b"], &[], 2),
        ];
        let cands: Vec<_> = s.iter().collect();
        let headers = Default::default();
        let req = request(&headers, "sql", b"");
        let mut out = vec![0.0; 4];
        LoraAffinityScorer.score(&req, &cands, &mut out);
        assert_eq!(out, vec![1.0, 0.8, 0.6, 0.0]);
    }
}
