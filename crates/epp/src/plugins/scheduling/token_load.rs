//! `token-load-scorer`: prefer the endpoint with fewer tokens in flight (GIE v1.5 /
//! llm-d-router v0.10).
//!
//! A candidate's load is the tokens this EPP has routed to it and not yet seen finish (its
//! `InFlightLoad` attribute, kept by an `inflight-load-producer`) plus what this request
//! would add there: its prompt tokens less the prefix the candidate already holds (from the
//! prefix producer's `PrefixMatch`, when there is one), plus the output tokens the in-flight
//! producer estimates for it when it estimates output (`EstimatedOutput`), as v0.10 adds the
//! request's uncached tokens. Score = `1 - min(1, load / queueThresholdTokens)`; an idle candidate scores 1.
//!
//! Unlike the queue scorer it is not normalised over the candidates: two servers at 10 % and
//! 12 % of the threshold score 0.90 and 0.88, not 1 and 0, so it nudges rather than flips.
//!
//! Parameters (unknown ones are refused): `queueThresholdTokens` (4,194,304, about 128
//! requests of 32K tokens; ≤ 0 means the default, as v0.10), `inFlightLoadProducerName` (the
//! producer to read; without it, the one in the configuration, else one is added).
//!
//! This plugin is the worked example of `docs/writing-plugins.md`.

use serde::Deserialize;

use crate::datalayer::estimate_tokens;
use crate::framework::attributes::{EstimatedOutput, InFlightLoad, PrefixMatch};
use crate::framework::data::{CycleState, DataKey};
use crate::framework::scheduling::{Candidate, SchedulingRequest, Scorer};

/// The default threshold: 128 requests of 32K tokens.
pub const DEFAULT_QUEUE_THRESHOLD_TOKENS: i64 = 4_194_304;

/// Parameters as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenLoadParams {
    /// Tokens at which a candidate scores 0.
    pub queue_threshold_tokens: Option<i64>,
    /// The in-flight producer to read (bound by the configuration builder).
    pub in_flight_load_producer_name: Option<String>,
}

/// See the module docs.
#[derive(Debug)]
pub struct TokenLoadScorer {
    threshold: f64,
    load: DataKey<InFlightLoad>,
    output: DataKey<EstimatedOutput>,
    prefix: Option<DataKey<PrefixMatch>>,
}

impl TokenLoadScorer {
    /// A scorer reading the in-flight producer named `load` (its load attribute and its
    /// output estimate), discounting the request's tokens with `prefix` when given.
    pub fn new(load: &str, prefix: Option<DataKey<PrefixMatch>>, params: &TokenLoadParams) -> Self {
        let threshold = params
            .queue_threshold_tokens
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_QUEUE_THRESHOLD_TOKENS);
        Self {
            threshold: threshold as f64,
            load: DataKey::named(load),
            output: DataKey::named(load),
            prefix,
        }
    }
}

impl Scorer for TokenLoadScorer {
    fn score(
        &self,
        req: &SchedulingRequest<'_>,
        state: &CycleState,
        candidates: &[Candidate<'_>],
        scores: &mut [f64],
    ) {
        let prompt = req.prefix_input.len();
        let found = self.prefix.and_then(|k| state.get(k));
        let output = state.get(self.output).map_or(0, |o| o.tokens);
        for (s, c) in scores.iter_mut().zip(candidates) {
            let in_flight = c.get(self.load).map_or(0, InFlightLoad::tokens);
            let cached = found.map_or(0, |m| m.matched(c.index).saturating_mul(m.block_bytes));
            let this = estimate_tokens(prompt.saturating_sub(cached)).saturating_add(output);
            let load = (in_flight.max(0) as f64 + this as f64).min(self.threshold);
            *s = 1.0 - load / self.threshold;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::framework::scheduling::candidates;
    use crate::plugins::testing::{request, states};

    #[test]
    fn fewer_tokens_in_flight_score_higher() {
        let load = DataKey::<InFlightLoad>::named("token-load-test");
        let mut s = states(&[(0, 0.0), (0, 0.0), (0, 0.0)]);
        let loads = [InFlightLoad::new(), InFlightLoad::new(), InFlightLoad::new()];
        for (st, l) in s.iter_mut().zip(&loads) {
            st.set(load, Arc::new(l.clone()));
        }
        let _a = loads[0].counters.start(250);
        let _b = loads[1].counters.start(5_000);
        let scorer = TokenLoadScorer::new(
            "token-load-test",
            None,
            &TokenLoadParams {
                queue_threshold_tokens: Some(1_000),
                ..TokenLoadParams::default()
            },
        );
        let headers = Default::default();
        // A prompt of 400 bytes adds 100 tokens wherever it goes.
        let prompt = [b'x'; 400];
        let req = request(&headers, "m", &prompt);
        let mut out = vec![0.0; 3];
        scorer.score(&req, &CycleState::default(), &candidates(&s), &mut out);
        assert_eq!(out, vec![0.65, 0.0, 0.9]);
    }

    #[test]
    fn the_prefix_a_candidate_holds_is_not_counted() {
        let prefix = DataKey::<PrefixMatch>::named("token-load-test-prefix");
        let s = states(&[(0, 0.0), (0, 0.0)]);
        let mut state = CycleState::default();
        state.put(
            prefix,
            PrefixMatch {
                total_blocks: 6,
                block_tokens: 16,
                block_bytes: 64,
                matched: vec![0, 5],
                hashes: Vec::new(),
            },
        );
        let scorer = TokenLoadScorer::new(
            "token-load-test-2",
            Some(prefix),
            &TokenLoadParams {
                queue_threshold_tokens: Some(100),
                ..TokenLoadParams::default()
            },
        );
        let headers = Default::default();
        let prompt = [b'x'; 400];
        let req = request(&headers, "m", &prompt);
        let mut out = vec![0.0; 2];
        scorer.score(&req, &state, &candidates(&s), &mut out);
        // 100 tokens on the first; 400 - 320 cached bytes = 20 tokens on the second.
        assert_eq!(out, vec![0.0, 0.8]);
        // The producer's output estimate counts on every candidate.
        state.put(
            DataKey::<EstimatedOutput>::named("token-load-test-2"),
            EstimatedOutput { tokens: 10 },
        );
        scorer.score(&req, &state, &candidates(&s), &mut out);
        assert_eq!(out, vec![0.0, 0.7]);
    }

    #[test]
    fn a_threshold_of_zero_is_the_default() {
        let p: TokenLoadParams = serde_yaml::from_str("queueThresholdTokens: 0").unwrap();
        let s = TokenLoadScorer::new("x", None, &p);
        assert_eq!(s.threshold, DEFAULT_QUEUE_THRESHOLD_TOKENS as f64);
        assert!(serde_yaml::from_str::<TokenLoadParams>("threshold: 5").is_err());
    }
}
