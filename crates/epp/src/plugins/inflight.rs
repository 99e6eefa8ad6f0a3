//! `inflight-load-producer`: what this EPP has routed to each endpoint and not yet seen
//! finish (llm-d-router v0.10's in-flight load producer).
//!
//! It keeps an [`InFlightLoad`] attribute on every endpoint: live counters of requests and
//! tokens in flight, attached when the endpoint joins the pool (a store hook) and restamped
//! whenever the endpoint's model-server figures are published, in the same snapshot. After
//! each decision it counts the request against the primary endpoint of every profile that ran
//! (as v0.10), until the response completes or the stream ends; the count is released by a
//! guard the director holds for the request.
//!
//! A request weighs its estimated *uncached* prompt tokens: prompt bytes / 4, less the blocks
//! the prefix producer found on that endpoint. With `addEstimatedOutputTokens`, also
//! `round(prompt tokens × outputRatio)`, capped at `maxEstimatedOutputTokens`.
//!
//! Consumers: the `kv-cache-utilization-scorer` (load sent and finished since the scrape) and
//! the `concurrency-detector` (requests or tokens in flight).
//!
//! Parameters (unknown ones are refused): `prefixMatchInfoProducerName` (the prefix producer
//! whose match discounts the prompt; without it, the one in the configuration, if any),
//! `addEstimatedOutputTokens` (false), `outputRatio` (1.5, ≥ 0), `maxEstimatedOutputTokens`
//! (none, ≥ 0), `syncCrossReplicaState` (accepted either way: this EPP has no cross-replica
//! syncer, its `dataLayer.crossReplicaSyncerPluginRef` is refused, so the load is always this
//! replica's own). The request's own `max_tokens` is not read.

use std::sync::Arc;

use serde::Deserialize;

use crate::datalayer::{EndpointState, METRICS, StoreHook, estimate_tokens};
use crate::framework::attributes::{InFlightLoad, PrefixMatch};
use crate::framework::data::{CycleState, DataKey, KeyId};
use crate::framework::requestcontrol::{PreRequest, PreRequestContext};
use crate::framework::scheduling::{SchedulingRequest, SchedulingResult};

/// Parameters as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InFlightParams {
    /// The prefix producer to read.
    pub prefix_match_info_producer_name: Option<String>,
    /// Count estimated output tokens too.
    pub add_estimated_output_tokens: Option<bool>,
    /// Output tokens per prompt token.
    pub output_ratio: Option<f64>,
    /// Cap on estimated output tokens per request.
    pub max_estimated_output_tokens: Option<i64>,
    /// Cross-replica synchronisation (no syncer exists here; see the module docs).
    pub sync_cross_replica_state: Option<bool>,
}

/// Why the parameters are unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InFlightParamError {
    /// Negative or non-finite ratio.
    #[error("outputRatio must be a finite number ≥ 0, got {0}")]
    Ratio(f64),
    /// Negative cap.
    #[error("maxEstimatedOutputTokens must be ≥ 0, got {0}")]
    Cap(i64),
}

/// See the module docs.
#[derive(Debug)]
pub struct InFlightProducer {
    key: DataKey<InFlightLoad>,
    prefix: Option<DataKey<PrefixMatch>>,
    output: Option<(f64, Option<u64>)>,
}

impl InFlightProducer {
    /// A producer named `name`, discounting with `prefix`'s matches when given.
    pub fn new(
        name: &str,
        prefix: Option<DataKey<PrefixMatch>>,
        params: &InFlightParams,
    ) -> Result<Self, InFlightParamError> {
        let ratio = params.output_ratio.unwrap_or(1.5);
        if !(ratio.is_finite() && ratio >= 0.0) {
            return Err(InFlightParamError::Ratio(ratio));
        }
        let cap = match params.max_estimated_output_tokens {
            Some(c) if c < 0 => return Err(InFlightParamError::Cap(c)),
            Some(c) => u64::try_from(c).ok(),
            None => None,
        };
        Ok(Self {
            key: DataKey::named(name),
            prefix,
            output: params
                .add_estimated_output_tokens
                .unwrap_or(false)
                .then_some((ratio, cap)),
        })
    }

    /// The attribute key this producer keeps.
    pub fn key(&self) -> DataKey<InFlightLoad> {
        self.key
    }

    fn tokens(&self, req: &SchedulingRequest<'_>, state: &CycleState, candidate: usize) -> u64 {
        let cached = self
            .prefix
            .and_then(|k| state.get(k))
            .map_or(0, |m| m.matched(candidate).saturating_mul(m.block_bytes));
        let uncached = estimate_tokens(req.prefix_input.len().saturating_sub(cached));
        let output = match self.output {
            Some((ratio, cap)) => {
                let est = (estimate_tokens(req.prefix_input.len()) as f64 * ratio).round() as u64;
                cap.map_or(est, |c| est.min(c))
            }
            None => 0,
        };
        uncached.saturating_add(output)
    }
}

impl StoreHook for InFlightProducer {
    fn on_write(&self, state: &mut EndpointState, written: &[KeyId]) {
        if written.is_empty() {
            state.set(self.key, Arc::new(InFlightLoad::new()));
        } else if written.contains(&METRICS.id())
            && let Some(load) = state.get(self.key)
        {
            let stamped = load.stamped();
            state.set(self.key, Arc::new(stamped));
        }
    }
}

impl PreRequest for InFlightProducer {
    fn pre_request(
        &self,
        req: &SchedulingRequest<'_>,
        state: &CycleState,
        result: &SchedulingResult,
        ctx: &mut PreRequestContext,
    ) {
        for (i, run) in result.runs.iter().enumerate() {
            let Some(target) = run.outcome.as_ref().ok().and_then(|t| t.first()) else {
                continue;
            };
            // Each endpoint counts the request once, however many profiles chose it.
            let first = |r: &crate::framework::scheduling::ProfileRun| {
                r.outcome.as_ref().ok().and_then(|t| t.first()).map(|t| t.index)
            };
            if result.runs[..i].iter().any(|r| first(r) == Some(target.index)) {
                continue;
            }
            if let Some(load) = target.get(self.key) {
                ctx.hold(load.counters.start(self.tokens(req, state, target.index)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datalayer::{Endpoint, EndpointStore, Metrics};
    use crate::framework::scheduling::{ProfileRun, Target};
    use crate::plugins::testing::request;

    fn store_with(p: &Arc<InFlightProducer>) -> EndpointStore {
        let store = EndpointStore::with_hooks(vec![p.clone()]);
        store.set_endpoints([
            Endpoint::from_address("10.0.0.1:8000".parse().unwrap()),
            Endpoint::from_address("10.0.0.2:8000".parse().unwrap()),
        ]);
        store
    }

    fn result(target: &EndpointState, index: usize) -> SchedulingResult {
        SchedulingResult {
            runs: vec![ProfileRun {
                profile: 0,
                name: "default".into(),
                outcome: Ok(vec![Target {
                    state: target.clone(),
                    index,
                }]),
            }],
            primary: 0,
        }
    }

    #[test]
    fn counts_uncached_tokens_until_released_and_restamps_on_scrape() {
        let prefix = DataKey::<PrefixMatch>::named("inflight-test-prefix");
        let p = Arc::new(InFlightProducer::new("load", Some(prefix), &InFlightParams::default()).unwrap());
        let store = store_with(&p);
        let snap = store.load();
        let headers = Default::default();
        let prompt = vec![b'x'; 4_000];
        let req = request(&headers, "m", &prompt);
        let mut state = CycleState::default();
        // 10 blocks of 64 bytes are cached on the second endpoint.
        state.put(
            prefix,
            PrefixMatch {
                total_blocks: 62,
                block_tokens: 16,
                block_bytes: 64,
                matched: vec![0, 10],
                hashes: Vec::new(),
            },
        );
        let mut ctx = PreRequestContext::default();
        p.pre_request(&req, &state, &result(&snap.endpoints()[1], 1), &mut ctx);
        let load = |i: usize| store.load().endpoints()[i].get(p.key()).unwrap().clone();
        assert_eq!((load(1).requests(), load(1).tokens()), (1, 840));
        assert_eq!(load(0).requests(), 0);
        // A scrape of the second endpoint is stamped: what it was sent is now seen by it.
        store.update_metrics(&snap.endpoints()[1].endpoint, Metrics::default());
        assert_eq!(load(1).tokens_since_scrape(), 0);
        // The response completes.
        drop(ctx);
        assert_eq!((load(1).requests(), load(1).tokens()), (0, 0));
        assert_eq!(load(1).tokens_since_scrape(), -840);
    }

    #[test]
    fn estimated_output_tokens_and_bad_parameters() {
        let params = InFlightParams {
            add_estimated_output_tokens: Some(true),
            output_ratio: Some(0.5),
            max_estimated_output_tokens: Some(100),
            ..InFlightParams::default()
        };
        let p = Arc::new(InFlightProducer::new("out", None, &params).unwrap());
        let store = store_with(&p);
        let snap = store.load();
        let headers = Default::default();
        let prompt = vec![b'x'; 400];
        let req = request(&headers, "m", &prompt);
        let mut ctx = PreRequestContext::default();
        p.pre_request(
            &req,
            &CycleState::default(),
            &result(&snap.endpoints()[0], 0),
            &mut ctx,
        );
        // 100 prompt tokens + min(50, 100) output tokens.
        assert_eq!(snap.endpoints()[0].get(p.key()).unwrap().tokens(), 150);
        let bad = |ratio: f64, cap: i64| InFlightParams {
            output_ratio: Some(ratio),
            max_estimated_output_tokens: Some(cap),
            ..InFlightParams::default()
        };
        assert!(InFlightProducer::new("x", None, &bad(-1.0, 1)).is_err());
        assert!(InFlightProducer::new("x", None, &bad(1.0, -1)).is_err());
    }
}
