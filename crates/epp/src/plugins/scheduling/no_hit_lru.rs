//! `no-hit-lru-scorer`: spread the prompts that hit no cache over the endpoints that least
//! recently took one (llm-d-router v0.10's `scorer/nohitlru`).
//!
//! A cold prompt (one no endpoint holds any block of) creates a whole new prefix wherever it
//! goes, and every later turn of it will follow it there. Placed on load alone, from figures
//! scraped up to 50 ms ago, a run of cold prompts lands on the same server and new
//! conversations pile up 2:4 instead of 3:3. This scorer remembers, per endpoint, when it last
//! took a cold prompt, and ranks the candidates by that.
//!
//! Scores, as v0.10:
//! * a warm request (some endpoint holds some of its blocks) gives every candidate 0.5, so the
//!   scorer does not disturb the prefix scorer's choice;
//! * a cold one ranks endpoints that never took a cold prompt first (in candidate order),
//!   then the others from least to most recently used; rank `r` of `n` candidates scores
//!   `1 - r / (n - 1)`;
//! * a single candidate scores 1.
//!
//! After the decision of a cold request, the primary profile's endpoint and a `prefill`
//! profile's endpoint become the most recently used.
//!
//! Which prefix producer says "cold": the one `prefixMatchInfoProducerName` names, else the
//! configuration's, else an `approx-prefix-cache-producer` is added (v0.10 reads the default
//! producer's key). A request is cold when that producer found none of its blocks on any
//! endpoint of the cycle, or produced nothing for it.
//!
//! Differences from v0.10, on purpose:
//! * the recency is a stamp on each endpoint's attributes (a counter bumped with one atomic
//!   store), not a locked LRU map, so scoring takes no lock;
//! * ranks are among the cycle's candidates; v0.10 ranks among every endpoint its LRU holds,
//!   so after a filter two candidates can both score 0 there;
//! * `lruSize` (1024, > 0) still bounds how many endpoints count as used: beyond the `lruSize`
//!   most recently used candidates, an endpoint counts as never used, as it would once
//!   evicted from v0.10's LRU;
//! * a request is cold when no endpoint of the cycle holds its blocks (v0.10 looks at the
//!   candidates left after the filters); the scoring and the recording agree on it.
//!
//! v0.10's deprecated `prefixPluginType` and `prefixPluginName` were never read there; they are
//! refused here, naming `prefixMatchInfoProducerName`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;

use crate::datalayer::{EndpointState, StoreHook};
use crate::framework::attributes::PrefixMatch;
use crate::framework::data::{CycleState, DataKey, KeyId};
use crate::framework::requestcontrol::{PreRequest, PreRequestContext};
use crate::framework::scheduling::{Candidate, SchedulingRequest, SchedulingResult, Scorer};

/// v0.10's default LRU size.
pub const DEFAULT_LRU_SIZE: i64 = 1024;

/// Parameters as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NoHitLruParams {
    /// How many endpoints count as used.
    pub lru_size: Option<i64>,
    /// The prefix producer to read (bound by the configuration builder).
    pub prefix_match_info_producer_name: Option<String>,
    /// Deprecated, never read by v0.10 (refused).
    pub prefix_plugin_type: Option<serde_yaml::Value>,
    /// Deprecated, never read by v0.10 (refused).
    pub prefix_plugin_name: Option<serde_yaml::Value>,
}

/// Why the parameters are unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NoHitLruParamError {
    /// Not a positive size.
    #[error("lruSize must be > 0, got {0}")]
    LruSize(i64),
    /// A deprecated field v0.10 never read.
    #[error(
        "{0} is deprecated and was never read by llm-d-router v0.10; name the prefix producer in prefixMatchInfoProducerName"
    )]
    Deprecated(&'static str),
}

/// When an endpoint last took a cold request: a stamp from the scorer's clock, 0 for never.
/// Shared by every snapshot the endpoint is in.
#[derive(Debug, Clone, Default)]
pub struct ColdUse {
    last: Arc<AtomicU64>,
}

/// See the module docs.
#[derive(Debug)]
pub struct NoHitLruScorer {
    key: DataKey<ColdUse>,
    prefix: Option<DataKey<PrefixMatch>>,
    clock: AtomicU64,
    size: usize,
}

impl NoHitLruScorer {
    /// A scorer named `name`, telling cold requests by `prefix`'s matches (every request is
    /// cold without it).
    pub fn new(
        name: &str,
        prefix: Option<DataKey<PrefixMatch>>,
        params: &NoHitLruParams,
    ) -> Result<Self, NoHitLruParamError> {
        if params.prefix_plugin_type.is_some() {
            return Err(NoHitLruParamError::Deprecated("prefixPluginType"));
        }
        if params.prefix_plugin_name.is_some() {
            return Err(NoHitLruParamError::Deprecated("prefixPluginName"));
        }
        let size = params.lru_size.unwrap_or(DEFAULT_LRU_SIZE);
        if size <= 0 {
            return Err(NoHitLruParamError::LruSize(size));
        }
        Ok(Self {
            key: DataKey::named(name),
            prefix,
            clock: AtomicU64::new(0),
            size: usize::try_from(size).unwrap_or(usize::MAX),
        })
    }

    /// Whether no endpoint of the cycle holds any block of the request.
    fn cold(&self, state: &CycleState) -> bool {
        match self.prefix.and_then(|k| state.get(k)) {
            Some(m) => m.matched.iter().all(|b| *b == 0),
            None => true,
        }
    }

    fn last_use(&self, c: &EndpointState) -> u64 {
        c.get(self.key).map_or(0, |u| u.last.load(Ordering::Relaxed))
    }
}

impl Scorer for NoHitLruScorer {
    fn score(
        &self,
        _req: &SchedulingRequest<'_>,
        state: &CycleState,
        candidates: &[Candidate<'_>],
        scores: &mut [f64],
    ) {
        if !self.cold(state) {
            scores.fill(0.5);
            return;
        }
        let n = candidates.len();
        if n <= 1 {
            scores.fill(1.0);
            return;
        }
        // (last use, position); the used ones sorted oldest first.
        let mut used: Vec<(u64, usize)> = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| (self.last_use(c), i))
            .filter(|(t, _)| *t > 0)
            .collect();
        used.sort_unstable();
        // Beyond the `size` most recent, an endpoint has fallen out of the LRU.
        let forgotten = used.len().saturating_sub(self.size);
        let mut rank = vec![usize::MAX; n];
        for (r, &(_, i)) in used[forgotten..].iter().enumerate() {
            rank[i] = r;
        }
        let never = n - (used.len() - forgotten);
        let scale = 1.0 / (n - 1) as f64;
        let mut next_never = 0;
        for (s, r) in scores.iter_mut().zip(rank) {
            let r = if r == usize::MAX {
                next_never += 1;
                next_never - 1
            } else {
                never + r
            };
            *s = (1.0 - r as f64 * scale).max(0.0);
        }
    }
}

impl PreRequest for NoHitLruScorer {
    fn pre_request(
        &self,
        _req: &SchedulingRequest<'_>,
        state: &CycleState,
        result: &SchedulingResult,
        _ctx: &mut PreRequestContext,
    ) {
        if !self.cold(state) {
            return;
        }
        let primary = result.targets().first();
        for target in primary.into_iter().chain(result.prefill_target()) {
            if let Some(u) = target.get(self.key) {
                let now = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
                u.last.store(now, Ordering::Relaxed);
            }
        }
    }
}

impl StoreHook for NoHitLruScorer {
    fn on_write(&self, state: &mut EndpointState, written: &[KeyId]) {
        if written.is_empty() {
            state.set(self.key, Arc::new(ColdUse::default()));
        }
    }

    fn on_replace(&self, state: &mut EndpointState, previous: &EndpointState) {
        // A relabelled endpoint is the same server, with the same prefixes.
        let kept = previous.get(self.key).cloned().unwrap_or_default();
        state.set(self.key, Arc::new(kept));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datalayer::{Endpoint, EndpointStore};
    use crate::framework::scheduling::{ProfileRun, Target, candidates};
    use crate::plugins::testing::request;

    const PREFIX: &str = "no-hit-lru-test-prefix";

    fn pool(scorer: &Arc<NoHitLruScorer>, n: usize) -> EndpointStore {
        let store = EndpointStore::with_hooks(vec![scorer.clone()]);
        store.set_endpoints(
            (1..=n).map(|i| Endpoint::from_address(format!("10.0.0.{i}:8000").parse().unwrap())),
        );
        store
    }

    fn scorer(size: Option<i64>) -> Arc<NoHitLruScorer> {
        let params = NoHitLruParams {
            lru_size: size,
            ..NoHitLruParams::default()
        };
        Arc::new(NoHitLruScorer::new("no-hit-lru-test", Some(DataKey::named(PREFIX)), &params).unwrap())
    }

    fn cycle(matched: &[u32]) -> CycleState {
        let mut state = CycleState::default();
        state.put(
            DataKey::<PrefixMatch>::named(PREFIX),
            PrefixMatch {
                total_blocks: 4,
                matched: matched.to_vec(),
                ..PrefixMatch::default()
            },
        );
        state
    }

    fn scores(s: &NoHitLruScorer, eps: &[EndpointState], state: &CycleState) -> Vec<f64> {
        let headers = Default::default();
        let req = request(&headers, "m", b"");
        let mut out = vec![0.0; eps.len()];
        s.score(&req, state, &candidates(eps), &mut out);
        out
    }

    /// Records a decision for the endpoint at `index`.
    fn chose(s: &NoHitLruScorer, eps: &[EndpointState], index: usize, state: &CycleState) {
        let result = SchedulingResult {
            runs: vec![ProfileRun {
                profile: 0,
                name: "default".into(),
                outcome: Ok(vec![Target {
                    state: eps[index].clone(),
                    index,
                }]),
            }],
            primary: 0,
        };
        let headers = Default::default();
        let req = request(&headers, "m", b"");
        s.pre_request(&req, state, &result, &mut PreRequestContext::default());
    }

    #[test]
    fn cold_requests_go_round_the_least_recently_used() {
        let s = scorer(None);
        let store = pool(&s, 3);
        let eps: Vec<EndpointState> = store.load().endpoints().to_vec();
        let cold = cycle(&[0, 0, 0]);
        // Nobody used yet: candidate order.
        assert_eq!(scores(&s, &eps, &cold), vec![1.0, 0.5, 0.0]);
        let mut picks = Vec::new();
        for _ in 0..6 {
            let out = scores(&s, &eps, &cold);
            let best = (0..3).max_by(|a, b| out[*a].total_cmp(&out[*b])).unwrap();
            picks.push(best);
            chose(&s, &eps, best, &cold);
        }
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2], "cold prompts are spread evenly");
        // 2 then 0 then 1 were used last: 1 is the least recently used.
        chose(&s, &eps, 2, &cold);
        chose(&s, &eps, 0, &cold);
        assert_eq!(scores(&s, &eps, &cold), vec![0.0, 1.0, 0.5]);
    }

    #[test]
    fn warm_requests_score_neutral_and_are_not_recorded() {
        let s = scorer(None);
        let store = pool(&s, 2);
        let eps: Vec<EndpointState> = store.load().endpoints().to_vec();
        let warm = cycle(&[0, 3]);
        assert_eq!(scores(&s, &eps, &warm), vec![0.5, 0.5]);
        chose(&s, &eps, 0, &warm);
        // Endpoint 0 took a warm request only: it still ranks as never used.
        assert_eq!(scores(&s, &eps, &cycle(&[0, 0])), vec![1.0, 0.0]);
        // No prefix data at all is cold.
        assert_eq!(scores(&s, &eps, &CycleState::default()), vec![1.0, 0.0]);
    }

    #[test]
    fn never_used_rank_first_and_lru_size_forgets_the_oldest() {
        let s = scorer(Some(1));
        let store = pool(&s, 3);
        let eps: Vec<EndpointState> = store.load().endpoints().to_vec();
        let cold = cycle(&[0, 0, 0]);
        chose(&s, &eps, 0, &cold);
        chose(&s, &eps, 1, &cold);
        // Only the most recent (1) is remembered; 0 and 2 count as never used, in order.
        assert_eq!(scores(&s, &eps, &cold), vec![1.0, 0.0, 0.5]);
        let s = scorer(None);
        let store = pool(&s, 3);
        let eps: Vec<EndpointState> = store.load().endpoints().to_vec();
        chose(&s, &eps, 0, &cold);
        chose(&s, &eps, 1, &cold);
        assert_eq!(scores(&s, &eps, &cold), vec![0.5, 0.0, 1.0]);
        // A single candidate scores 1.
        assert_eq!(scores(&s, &eps[1..2], &cold), vec![1.0]);
    }

    #[test]
    fn recency_survives_a_new_listing_of_the_pool() {
        let s = scorer(None);
        let store = pool(&s, 2);
        let cold = cycle(&[0, 0]);
        let eps: Vec<EndpointState> = store.load().endpoints().to_vec();
        chose(&s, &eps, 0, &cold);
        // The pool is listed again: endpoint 0 keeps its stamp.
        store.set_endpoints(
            (1..=2).map(|i| Endpoint::from_address(format!("10.0.0.{i}:8000").parse().unwrap())),
        );
        let eps: Vec<EndpointState> = store.load().endpoints().to_vec();
        assert_eq!(scores(&s, &eps, &cold), vec![0.0, 1.0]);
    }

    #[test]
    fn unusable_parameters_are_refused() {
        let new = |p: NoHitLruParams| NoHitLruScorer::new("x", None, &p).unwrap_err();
        assert_eq!(
            new(NoHitLruParams {
                lru_size: Some(0),
                ..NoHitLruParams::default()
            }),
            NoHitLruParamError::LruSize(0)
        );
        assert_eq!(
            new(NoHitLruParams {
                prefix_plugin_name: Some("prefix-cache-scorer".into()),
                ..NoHitLruParams::default()
            }),
            NoHitLruParamError::Deprecated("prefixPluginName")
        );
    }
}
