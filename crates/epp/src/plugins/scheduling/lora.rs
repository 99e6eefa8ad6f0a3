//! `lora-affinity-scorer`: prefer endpoints that already run the requested adapter.
//!
//! 1.0 if the target model is an active adapter; 0.8 if the endpoint has room to load one
//! more (active + waiting < max); 0.6 if the adapter is queued there; else 0. A base model
//! on servers without LoRA metrics therefore scores 0 everywhere, which changes no ranking.

use crate::framework::data::CycleState;
use crate::framework::scheduling::{Candidate, SchedulingRequest, Scorer};

/// See the module docs.
#[derive(Debug, Default)]
pub struct LoraAffinityScorer;

impl Scorer for LoraAffinityScorer {
    fn score(
        &self,
        req: &SchedulingRequest<'_>,
        _state: &CycleState,
        candidates: &[Candidate<'_>],
        scores: &mut [f64],
    ) {
        let target = req.target_model;
        for (s, c) in scores.iter_mut().zip(candidates) {
            let lora = &c.metrics().lora;
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
    use crate::datalayer::{Endpoint, EndpointState, LoraInfo, Metrics};
    use crate::plugins::testing::{request, score};

    fn state(active: &[&str], waiting: &[&str], max: u32) -> EndpointState {
        EndpointState::with_metrics(
            Arc::new(Endpoint::from_address("10.0.0.1:8000".parse().unwrap())),
            Metrics {
                lora: LoraInfo {
                    active: active.iter().map(|s| Arc::from(*s)).collect(),
                    waiting: waiting.iter().map(|s| Arc::from(*s)).collect(),
                    max_active: max,
                },
                ..Metrics::default()
            },
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
        let headers = Default::default();
        let req = request(&headers, "sql", b"");
        assert_eq!(score(&LoraAffinityScorer, &req, &s), vec![1.0, 0.8, 0.6, 0.0]);
    }
}
