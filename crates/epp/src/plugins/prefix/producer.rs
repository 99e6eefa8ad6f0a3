//! `approx-prefix-cache-producer`: which candidate probably holds the longest prefix of the
//! prompt in its KV cache, learned from this EPP's own routing decisions (the reference's
//! approximate prefix index, GIE v1.5 / llm-d-router v0.10).
//!
//! Before scheduling it hashes the request's prefix input into chained blocks and looks each
//! candidate up in its index, storing a [`PrefixMatch`] in the cycle state for the
//! `prefix-cache-scorer` (and the in-flight producer's cached-prefix discount). After the
//! decision it credits the primary endpoint, and the endpoint of a profile named `prefill`
//! (P/D disaggregation, as the reference from v1.3), with all of the request's blocks,
//! inserted last-block-first so that under pressure a prompt is forgotten from its tail, as a
//! KV cache frees blocks. Endpoints that leave the pool are dropped from the index.
//!
//! Parameters (unknown ones are refused):
//! * `blockSizeTokens` (16): tokens per block; a block is 4 bytes of prompt text per token.
//!   `blockSize` (v1.1–v1.3) and `hashBlockSize` (v1.0) give the block size in bytes instead.
//! * `maxPrefixBlocksToMatch` (256), or `maxPrefixTokensToMatch` (tokens, wins when > 0).
//! * `lruCapacityPerServer` (31,250): blocks remembered per endpoint.
//! * `autoTune` (true): where the size is not set explicitly, take the block size from the
//!   first candidate's `cache_config_info` and a new endpoint's capacity from its block count,
//!   so the index models each server's real cache.
//!
//! The defaults are GIE v1.5's. llm-d-router v0.10 raised the match caps (2,048 blocks or
//! 131,072 tokens) for tokenised prompts; this producer hashes prompt bytes, where the v1.5
//! caps bound the request-path cost at 256 xxh64 calls (`docs/plugins.md`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::metrics::histogram::Histogram;
use serde::Deserialize;

use super::hash::{DEFAULT_BLOCK_BYTES, DEFAULT_MAX_BLOCKS, block_hashes_into, chain_seed};
use super::{DEFAULT_CAPACITY_PER_ENDPOINT, PrefixIndex};
use crate::datalayer::{BYTES_PER_TOKEN, EndpointState};
use crate::framework::attributes::PrefixMatch;
use crate::framework::data::{CycleState, DataKey};
use crate::framework::plugin::PluginMetrics;
use crate::framework::requestcontrol::{DataProducer, EndpointsChanged, PreRequest, PreRequestContext};
use crate::framework::scheduling::{Candidate, SchedulingRequest, SchedulingResult};

/// The producer's parameters as written in the config.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProducerParams {
    /// Derive block size and capacity from the servers' cache info.
    pub auto_tune: Option<bool>,
    /// Tokens per block (v1.4+).
    pub block_size_tokens: Option<i64>,
    /// Bytes per block (v1.1–v1.3).
    pub block_size: Option<i64>,
    /// Bytes per block (v1.0).
    pub hash_block_size: Option<i64>,
    /// Block limit.
    pub max_prefix_blocks_to_match: Option<i64>,
    /// Token limit (wins over the block limit when > 0).
    pub max_prefix_tokens_to_match: Option<i64>,
    /// Blocks remembered per endpoint.
    pub lru_capacity_per_server: Option<i64>,
}

impl ProducerParams {
    /// Refuses values the reference would refuse or that cannot mean what they say: block
    /// sizes, the block limit and the capacity must be > 0 when set; the token limit ≥ 0 (0
    /// means unset, as in both references). A 0 block limit means "unlimited" in
    /// llm-d-router v0.10 and "the default" in GIE v1.5; this producer keeps a cap (see
    /// docs/plugins.md), so 0 is refused rather than read either way.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("blockSizeTokens", self.block_size_tokens),
            ("blockSize", self.block_size),
            ("hashBlockSize", self.hash_block_size),
            ("lruCapacityPerServer", self.lru_capacity_per_server),
            ("maxPrefixBlocksToMatch", self.max_prefix_blocks_to_match),
        ] {
            if let Some(v) = v
                && v <= 0
            {
                return Err(format!("{name} must be > 0 (got {v}); omit it for the default"));
            }
        }
        if let Some(v) = self.max_prefix_tokens_to_match
            && v < 0
        {
            return Err(format!("maxPrefixTokensToMatch must be >= 0 (got {v})"));
        }
        let sizes: Vec<&str> = [
            (self.block_size_tokens.is_some(), "blockSizeTokens"),
            (self.block_size.is_some(), "blockSize"),
            (self.hash_block_size.is_some(), "hashBlockSize"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        if sizes.len() > 1 {
            return Err(format!(
                "{} each set the block size; keep one",
                sizes.join(" and ")
            ));
        }
        if self.max_prefix_tokens_to_match.is_some_and(|t| t > 0) && self.max_prefix_blocks_to_match.is_some()
        {
            return Err(
                "maxPrefixTokensToMatch > 0 wins over maxPrefixBlocksToMatch; remove one (or set maxPrefixTokensToMatch: 0)"
                    .into(),
            );
        }
        if let Some(v) = self.lru_capacity_per_server
            && u32::try_from(v).is_err()
        {
            return Err(format!(
                "lruCapacityPerServer must be at most {} (got {v})",
                u32::MAX
            ));
        }
        Ok(())
    }
}

/// The parameter names [`ProducerParams`] reads, so that a `prefix-cache-scorer` written for
/// GIE v1.0–v1.4 can hand its producer parameters over.
pub const PRODUCER_PARAMS: &[&str] = &[
    "autoTune",
    "blockSizeTokens",
    "blockSize",
    "hashBlockSize",
    "maxPrefixBlocksToMatch",
    "maxPrefixTokensToMatch",
    "lruCapacityPerServer",
];

fn positive(v: Option<i64>) -> Option<usize> {
    v.filter(|v| *v > 0).and_then(|v| usize::try_from(v).ok())
}

/// See the module docs.
pub struct PrefixProducer {
    index: Arc<PrefixIndex>,
    /// Explicit block size in bytes; `None` means the default or auto-tuned size.
    block_bytes: Option<usize>,
    max_blocks: Option<usize>,
    max_tokens: Option<usize>,
    explicit_capacity: bool,
    auto_tune: bool,
    matches: DataKey<PrefixMatch>,
    hit_ratio: Histogram,
    hit_bytes: Histogram,
}

impl std::fmt::Debug for PrefixProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixProducer")
            .field("block_bytes", &self.block_bytes)
            .field("max_blocks", &self.max_blocks)
            .field("auto_tune", &self.auto_tune)
            .finish_non_exhaustive()
    }
}

impl PrefixProducer {
    /// A producer named `name` with its own index, configured by `params`, reporting the
    /// reference's prefix-indexer metric families.
    pub fn new(name: &str, params: &ProducerParams, metrics: &PluginMetrics) -> Self {
        let block_bytes = positive(params.block_size_tokens)
            .map(|t| t.saturating_mul(BYTES_PER_TOKEN))
            .or_else(|| positive(params.block_size))
            .or_else(|| positive(params.hash_block_size));
        let capacity = positive(params.lru_capacity_per_server).and_then(|c| u32::try_from(c).ok());
        let index = Arc::new(PrefixIndex::new(
            capacity.unwrap_or(DEFAULT_CAPACITY_PER_ENDPOINT),
        ));
        let size = index.clone();
        metrics.gauge_fn(
            "inference_extension_prefix_indexer_size",
            "[ALPHA] Size of the prefix indexer",
            Arc::new(move || i64::try_from(size.entries()).unwrap_or(i64::MAX)),
        );
        Self {
            index,
            block_bytes,
            max_blocks: positive(params.max_prefix_blocks_to_match),
            max_tokens: positive(params.max_prefix_tokens_to_match),
            explicit_capacity: capacity.is_some(),
            auto_tune: params.auto_tune.unwrap_or(true),
            matches: DataKey::named(name),
            hit_ratio: metrics.histogram(
                "inference_extension_prefix_indexer_hit_ratio",
                "[ALPHA] Ratio of the request's prefix blocks found on the chosen endpoint",
                (0..=10).map(|i| f64::from(i) / 10.0),
            ),
            hit_bytes: metrics.histogram(
                "inference_extension_prefix_indexer_hit_bytes",
                "[ALPHA] Length of the request's prefix found on the chosen endpoint, in bytes",
                std::iter::once(0.0).chain((4..=16).map(|p| f64::from(1u32 << p))),
            ),
        }
    }

    /// The key under which this producer stores its [`PrefixMatch`].
    pub fn match_key(&self) -> DataKey<PrefixMatch> {
        self.matches
    }

    /// The index (for tests and benches).
    pub fn index(&self) -> &Arc<PrefixIndex> {
        &self.index
    }

    /// Block size in bytes for a cycle: explicit, else the first endpoint's reported block
    /// size when auto-tuning, else 64.
    fn block_bytes_for(&self, first: Option<&EndpointState>) -> usize {
        if let Some(b) = self.block_bytes {
            return b;
        }
        if self.auto_tune
            && let Some(tokens) = first.and_then(|e| e.metrics().cache_block_size)
            && tokens > 0
        {
            return tokens as usize * BYTES_PER_TOKEN;
        }
        DEFAULT_BLOCK_BYTES
    }

    fn max_blocks_for(&self, block_bytes: usize) -> usize {
        if let Some(tokens) = self.max_tokens {
            let block_tokens = (block_bytes / BYTES_PER_TOKEN).max(1);
            return (tokens / block_tokens).max(1);
        }
        self.max_blocks.unwrap_or(DEFAULT_MAX_BLOCKS)
    }

    fn record(&self, target: &EndpointState, hashes: &[u64]) {
        let capacity = if self.auto_tune && !self.explicit_capacity {
            target
                .metrics()
                .cache_num_blocks
                .and_then(|b| u32::try_from(b).ok())
        } else {
            None
        };
        self.index.record(target.endpoint.address, hashes, capacity);
    }
}

impl DataProducer for PrefixProducer {
    fn prepare(&self, req: &SchedulingRequest<'_>, candidates: &[Candidate<'_>], state: &mut CycleState) {
        let block_bytes = self.block_bytes_for(candidates.first().map(|c| c.state));
        let max_blocks = self.max_blocks_for(block_bytes);
        let mut hashes = Vec::new();
        let seed = chain_seed(req.target_model, req.cache_salt);
        block_hashes_into(seed, req.prefix_input, block_bytes, max_blocks, &mut hashes);
        let mut matched: Vec<u32> = Vec::with_capacity(candidates.len());
        if hashes.is_empty() {
            matched.resize(candidates.len(), 0);
        } else {
            // Called once per candidate, in order.
            self.index
                .leading_matches(candidates.iter().map(|c| c.endpoint.address), &hashes, |_, m| {
                    matched.push(u32::try_from(m).unwrap_or(u32::MAX));
                });
        }
        state.put(
            self.matches,
            PrefixMatch {
                total_blocks: hashes.len(),
                block_tokens: (block_bytes / BYTES_PER_TOKEN).max(1),
                block_bytes,
                matched,
                hashes,
            },
        );
    }
}

impl PreRequest for PrefixProducer {
    fn pre_request(
        &self,
        _req: &SchedulingRequest<'_>,
        state: &CycleState,
        result: &SchedulingResult,
        _ctx: &mut PreRequestContext,
    ) {
        let Some(found) = state.get(self.matches) else {
            return;
        };
        let hashes = &found.hashes;
        let Some(primary) = result.targets().first() else {
            return;
        };
        if found.total_blocks > 0 {
            let matched = found.matched(primary.index);
            self.hit_ratio.observe(matched as f64 / found.total_blocks as f64);
            self.hit_bytes.observe((matched * found.block_bytes) as f64);
        }
        self.record(primary, hashes);
        if let Some(prefill) = result.prefill_target() {
            self.record(prefill, hashes);
        }
    }
}

impl EndpointsChanged for PrefixProducer {
    fn endpoints_changed(&self, endpoints: &[EndpointState]) {
        let live: HashSet<SocketAddr> = endpoints.iter().map(|e| e.endpoint.address).collect();
        self.index.set_live(live);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framework::scheduling::{ProfileRun, Target, candidates};
    use crate::plugins::testing::{request, states_at};

    pub(crate) fn result_for(states: &[(&str, &EndpointState, usize)]) -> SchedulingResult {
        SchedulingResult {
            runs: states
                .iter()
                .enumerate()
                .map(|(i, (name, s, index))| ProfileRun {
                    profile: i,
                    name: (*name).into(),
                    outcome: Ok(vec![Target {
                        state: (*s).clone(),
                        index: *index,
                    }]),
                })
                .collect(),
            primary: 0,
        }
    }

    fn prepared(p: &PrefixProducer, req: &SchedulingRequest<'_>, s: &[EndpointState]) -> CycleState {
        let mut state = CycleState::default();
        p.prepare(req, &candidates(s), &mut state);
        state
    }

    #[test]
    fn picked_endpoint_matches_its_prefix_afterwards() {
        let p = PrefixProducer::new("p", &ProducerParams::default(), &PluginMetrics::default());
        let s = states_at(&["10.0.0.1:8000", "10.0.0.2:8000"]);
        let headers = Default::default();
        let prompt = vec![b'x'; 64 * 10];
        let req = request(&headers, "m", &prompt);
        let state = prepared(&p, &req, &s);
        assert_eq!(state.get(p.match_key()).unwrap().matched, vec![0, 0]);
        p.pre_request(
            &req,
            &state,
            &result_for(&[("default", &s[1], 1)]),
            &mut PreRequestContext::default(),
        );

        // Same first 5 blocks, different tail: half the blocks match on endpoint 2.
        let mut other = prompt.clone();
        other[64 * 5] = b'y';
        let req = request(&headers, "m", &other);
        let m = prepared(&p, &req, &s).get(p.match_key()).unwrap().clone();
        assert_eq!((m.matched, m.total_blocks), (vec![0, 5], 10));

        // Another model never shares.
        let req = request(&headers, "other-model", &prompt);
        assert_eq!(
            prepared(&p, &req, &s).get(p.match_key()).unwrap().matched,
            vec![0, 0]
        );
    }

    #[test]
    fn a_prefill_profile_is_credited_too() {
        let p = PrefixProducer::new("p", &ProducerParams::default(), &PluginMetrics::default());
        let s = states_at(&["10.0.0.1:8000", "10.0.0.2:8000"]);
        let headers = Default::default();
        let prompt = vec![b'z'; 64 * 4];
        let req = request(&headers, "m", &prompt);
        let state = prepared(&p, &req, &s);
        let result = result_for(&[("decode", &s[0], 0), ("prefill", &s[1], 1)]);
        p.pre_request(&req, &state, &result, &mut PreRequestContext::default());
        assert_eq!(
            prepared(&p, &req, &s).get(p.match_key()).unwrap().matched,
            vec![4, 4]
        );
    }

    #[test]
    fn parameters_of_every_version() {
        let m = PluginMetrics::default();
        let params = |y: &str| serde_yaml::from_str::<ProducerParams>(y);
        let s = PrefixProducer::new(
            "a",
            &params("blockSizeTokens: 32\nmaxPrefixTokensToMatch: 320").unwrap(),
            &m,
        );
        assert_eq!(s.block_bytes, Some(128));
        assert_eq!(s.max_blocks_for(128), 10);
        assert_eq!(
            PrefixProducer::new("b", &params("hashBlockSize: 100").unwrap(), &m).block_bytes,
            Some(100)
        );
        let s = PrefixProducer::new(
            "c",
            &params("blockSize: 80\nlruCapacityPerServer: 5").unwrap(),
            &m,
        );
        assert_eq!(s.block_bytes, Some(80));
        assert!(s.explicit_capacity);
        assert!(params("blockSizeTokens: lots").is_err());
        let e = params("unknownKey: 1").unwrap_err().to_string();
        assert!(e.contains("unknown field `unknownKey`"), "{e}");
        // Every listed name is a real parameter.
        for name in PRODUCER_PARAMS {
            let v = if *name == "autoTune" { "true" } else { "1" };
            assert!(params(&format!("{name}: {v}")).is_ok(), "{name}");
        }
    }

    #[test]
    fn forgets_departed_endpoints() {
        let p = PrefixProducer::new("p", &ProducerParams::default(), &PluginMetrics::default());
        let s = states_at(&["10.0.0.1:8000"]);
        let headers = Default::default();
        let prompt = [b'x'; 128];
        let req = request(&headers, "m", &prompt);
        let state = prepared(&p, &req, &s);
        p.pre_request(
            &req,
            &state,
            &result_for(&[("default", &s[0], 0)]),
            &mut PreRequestContext::default(),
        );
        assert_eq!(p.index().endpoints(), 1);
        p.endpoints_changed(&[]);
        assert_eq!(p.index().endpoints(), 0);
    }
}
