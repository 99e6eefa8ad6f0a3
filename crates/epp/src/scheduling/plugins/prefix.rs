//! `prefix-cache-scorer`: prefer the endpoint that probably holds the longest prefix of the
//! prompt in its KV cache.
//!
//! Score = leading blocks of the request found in the endpoint's index entry / blocks of the
//! request (0 when the prompt is shorter than one block). After each decision the primary
//! endpoint is credited with all of the request's blocks (fallbacks are not: the request
//! will most likely run on the primary).
//!
//! Parameters (unknown keys ignored, as the reference):
//! * `blockSizeTokens` (16): tokens per block; a block is 4 bytes per token of prompt text.
//!   `blockSize` (v1.1–v1.3) and `hashBlockSize` (v1.0) give the block size in bytes instead.
//! * `maxPrefixBlocksToMatch` (256), or `maxPrefixTokensToMatch` (tokens, wins when > 0).
//! * `lruCapacityPerServer` (31,250): blocks remembered per endpoint.
//! * `autoTune` (true): where the size is not set explicitly, take the block size from the
//!   endpoints' `cache_config_info` and the per-endpoint capacity from their block count, so
//!   the index models each server's real cache.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Deserialize;

use crate::datalayer::{EndpointState, Snapshot};
use crate::prefix::hash::{DEFAULT_BLOCK_BYTES, DEFAULT_MAX_BLOCKS, block_hashes_into, chain_seed};
use crate::prefix::{DEFAULT_CAPACITY_PER_ENDPOINT, PrefixIndex};
use crate::scheduling::{
    EndpointsChanged, PreRequest, PrefixHashes, PrefixHit, SchedulingRequest, SchedulingResult, Scorer,
};

use crate::datalayer::BYTES_PER_TOKEN;

/// The plugin's parameters as written in the config.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrefixParams {
    auto_tune: Option<bool>,
    block_size_tokens: Option<i64>,
    block_size: Option<i64>,
    hash_block_size: Option<i64>,
    max_prefix_blocks_to_match: Option<i64>,
    max_prefix_tokens_to_match: Option<i64>,
    lru_capacity_per_server: Option<i64>,
}

fn positive(v: Option<i64>) -> Option<usize> {
    v.filter(|v| *v > 0).and_then(|v| usize::try_from(v).ok())
}

/// See the module docs.
#[derive(Debug)]
pub struct PrefixCacheScorer {
    index: Arc<PrefixIndex>,
    /// Explicit block size in bytes; `None` means the default or auto-tuned size.
    block_bytes: Option<usize>,
    max_blocks: Option<usize>,
    max_tokens: Option<usize>,
    explicit_capacity: bool,
    auto_tune: bool,
}

impl PrefixCacheScorer {
    /// A scorer with its own index, configured by `params`.
    pub fn new(params: &PrefixParams) -> Self {
        let block_bytes = positive(params.block_size_tokens)
            .map(|t| t.saturating_mul(BYTES_PER_TOKEN))
            .or_else(|| positive(params.block_size))
            .or_else(|| positive(params.hash_block_size));
        let capacity = positive(params.lru_capacity_per_server).and_then(|c| u32::try_from(c).ok());
        Self {
            index: Arc::new(PrefixIndex::new(
                capacity.unwrap_or(DEFAULT_CAPACITY_PER_ENDPOINT),
            )),
            block_bytes,
            max_blocks: positive(params.max_prefix_blocks_to_match),
            max_tokens: positive(params.max_prefix_tokens_to_match),
            explicit_capacity: capacity.is_some(),
            auto_tune: params.auto_tune.unwrap_or(true),
        }
    }

    /// The index (for metrics and tests).
    pub fn index(&self) -> &Arc<PrefixIndex> {
        &self.index
    }

    /// Block size in bytes for a cycle: explicit, else the first endpoint's reported block
    /// size when auto-tuning, else 64.
    fn block_bytes_for<'a>(&self, mut endpoints: impl Iterator<Item = &'a EndpointState>) -> usize {
        if let Some(b) = self.block_bytes {
            return b;
        }
        if self.auto_tune
            && let Some(tokens) = endpoints.next().and_then(|e| e.metrics.cache_block_size)
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

    /// Runs `f` on the request's hashes for `block_bytes`, computing them at most once per
    /// cycle.
    fn with_hashes<R>(
        &self,
        req: &SchedulingRequest<'_>,
        block_bytes: usize,
        f: impl FnOnce(&[u64]) -> R,
    ) -> R {
        let max_blocks = self.max_blocks_for(block_bytes);
        let mut cached = req.cache.prefix.borrow_mut();
        let fresh =
            !matches!(&*cached, Some(p) if p.block_bytes == block_bytes && p.max_blocks == max_blocks);
        if fresh {
            let mut hashes = Vec::new();
            let seed = chain_seed(req.target_model, req.cache_salt);
            block_hashes_into(seed, req.prefix_input, block_bytes, max_blocks, &mut hashes);
            *cached = Some(PrefixHashes {
                block_bytes,
                max_blocks,
                hashes,
            });
        }
        f(cached.as_ref().map(|p| p.hashes.as_slice()).unwrap_or_default())
    }
}

impl Scorer for PrefixCacheScorer {
    fn score(&self, req: &SchedulingRequest<'_>, candidates: &[&EndpointState], scores: &mut [f64]) {
        let block_bytes = self.block_bytes_for(candidates.iter().copied());
        self.with_hashes(req, block_bytes, |hashes| {
            if hashes.is_empty() {
                return;
            }
            let total = hashes.len() as f64;
            self.index.leading_matches(
                candidates.iter().map(|c| c.endpoint.address),
                hashes,
                |i, matched| {
                    if let Some(s) = scores.get_mut(i) {
                        *s = matched as f64 / total;
                    }
                },
            );
        });
    }
}

impl PreRequest for PrefixCacheScorer {
    fn pre_request(&self, req: &SchedulingRequest<'_>, result: &SchedulingResult) {
        let Some(primary) = result.targets().first() else {
            return;
        };
        let block_bytes = match &*req.cache.prefix.borrow() {
            Some(p) => p.block_bytes,
            None => self.block_bytes_for(std::iter::once(primary)),
        };
        let capacity = if self.auto_tune && !self.explicit_capacity {
            primary
                .metrics
                .cache_num_blocks
                .and_then(|b| u32::try_from(b).ok())
        } else {
            None
        };
        self.with_hashes(req, block_bytes, |hashes| {
            if !hashes.is_empty() {
                req.cache.prefix_hit.set(Some(PrefixHit {
                    matched_blocks: self.index.leading_match(primary.endpoint.address, hashes),
                    total_blocks: hashes.len(),
                    block_bytes,
                }));
            }
            self.index.record(primary.endpoint.address, hashes, capacity);
        });
    }
}

impl EndpointsChanged for PrefixCacheScorer {
    fn endpoints_changed(&self, snapshot: &Snapshot) {
        let live: HashSet<SocketAddr> = snapshot.endpoints().iter().map(|e| e.endpoint.address).collect();
        self.index.retain(|a| live.contains(&a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::ProfileRun;
    use crate::scheduling::plugins::testing::{request, states_at};

    fn result_for(state: &EndpointState) -> SchedulingResult {
        SchedulingResult {
            runs: vec![ProfileRun {
                profile: 0,
                name: "default".into(),
                outcome: Ok(vec![state.clone()]),
            }],
            primary: 0,
        }
    }

    #[test]
    fn picked_endpoint_scores_its_prefix_afterwards() {
        let scorer = PrefixCacheScorer::new(&PrefixParams::default());
        let s = states_at(&["10.0.0.1:8000", "10.0.0.2:8000"]);
        let cands: Vec<_> = s.iter().collect();
        let headers = Default::default();
        let prompt = vec![b'x'; 64 * 10];
        let req = request(&headers, "m", &prompt);
        let mut scores = vec![0.0; 2];
        scorer.score(&req, &cands, &mut scores);
        assert_eq!(scores, vec![0.0, 0.0]);
        scorer.pre_request(&req, &result_for(&s[1]));

        // Same first 5 blocks, different tail: half the blocks match on endpoint 2.
        let mut other = prompt.clone();
        other[64 * 5] = b'y';
        let req = request(&headers, "m", &other);
        let mut scores = vec![0.0; 2];
        scorer.score(&req, &cands, &mut scores);
        assert_eq!(scores, vec![0.0, 0.5]);

        // Another model never shares.
        let req = request(&headers, "other-model", &prompt);
        let mut scores = vec![0.0; 2];
        scorer.score(&req, &cands, &mut scores);
        assert_eq!(scores, vec![0.0, 0.0]);
    }

    #[test]
    fn parameters_of_every_version() {
        let p: PrefixParams =
            serde_yaml::from_str("blockSizeTokens: 32\nmaxPrefixTokensToMatch: 320").unwrap();
        let s = PrefixCacheScorer::new(&p);
        assert_eq!(s.block_bytes, Some(128));
        assert_eq!(s.max_blocks_for(128), 10);
        let p: PrefixParams = serde_yaml::from_str("hashBlockSize: 100\nunknownKey: 1").unwrap();
        assert_eq!(PrefixCacheScorer::new(&p).block_bytes, Some(100));
        let p: PrefixParams = serde_yaml::from_str("blockSize: 80\nlruCapacityPerServer: 5").unwrap();
        let s = PrefixCacheScorer::new(&p);
        assert_eq!(s.block_bytes, Some(80));
        assert!(s.explicit_capacity);
        assert!(serde_yaml::from_str::<PrefixParams>("blockSizeTokens: lots").is_err());
    }

    #[test]
    fn forgets_departed_endpoints() {
        let scorer = PrefixCacheScorer::new(&PrefixParams::default());
        let s = states_at(&["10.0.0.1:8000"]);
        let headers = Default::default();
        let req = request(&headers, "m", &[b'x'; 128]);
        scorer.pre_request(&req, &result_for(&s[0]));
        assert_eq!(scorer.index().endpoints(), 1);
        scorer.endpoints_changed(&Snapshot::default());
        assert_eq!(scorer.index().endpoints(), 0);
    }
}
