//! `prefix-cache-scorer`: prefer the endpoint that probably holds the longest prefix of the
//! prompt in its KV cache, as its prefix producer found it.
//!
//! Score = `(1 - w) × ratio + w × length²`, where `ratio` is the leading blocks the candidate
//! holds over the request's blocks, `length` the held prefix in tokens over
//! `matchLengthScaleTokens` (capped at 1), and `w` is `matchLengthWeight` (0 by default, so the
//! score is the ratio, as in GIE). A request shorter than one block scores 0 everywhere.
//!
//! Parameters (llm-d-router v0.10; unknown ones are refused):
//! * `prefixMatchInfoProducerName`: the `approx-prefix-cache-producer` to read. Without it,
//!   the one such producer in the configuration; without any, one is added.
//! * `matchLengthWeight` (0, in [0, 1]) and `matchLengthScaleTokens` (8,192, > 0 when the
//!   weight is).
//!
//! GIE v1.0–v1.4 configured the index on this plugin (`blockSizeTokens`, `hashBlockSize`, ...,
//! see [`super::PRODUCER_PARAMS`]); such parameters are handed to the producer added for it,
//! as GIE v1.5 does.

use serde::Deserialize;

use crate::framework::attributes::PrefixMatch;
use crate::framework::data::{CycleState, DataKey};
use crate::framework::scheduling::{Candidate, SchedulingRequest, Scorer};

/// The scorer's own parameters. Producer parameters written here are taken off by the
/// configuration builder before these are decoded.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScorerParams {
    /// The producer to read.
    pub prefix_match_info_producer_name: Option<String>,
    /// Weight of the match length against the match ratio.
    pub match_length_weight: Option<f64>,
    /// Tokens of prefix that count as a full-length match.
    pub match_length_scale_tokens: Option<i64>,
}

/// Why the parameters are unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScorerParamError {
    /// `matchLengthWeight` outside [0, 1].
    #[error("matchLengthWeight must be between 0.0 and 1.0, got {0}")]
    Weight(f64),
    /// `matchLengthScaleTokens` not positive while the weight is.
    #[error(
        "matchLengthScaleTokens must be greater than 0 when matchLengthWeight is greater than 0, got {0}"
    )]
    Scale(i64),
    /// A scale written without the weight that uses it.
    #[error("matchLengthScaleTokens only acts with matchLengthWeight > 0")]
    ScaleWithoutWeight,
}

/// See the module docs.
#[derive(Debug)]
pub struct PrefixCacheScorer {
    matches: DataKey<PrefixMatch>,
    length_weight: f64,
    scale_tokens: f64,
}

impl PrefixCacheScorer {
    /// A scorer reading `matches` (its producer's key).
    pub fn new(matches: DataKey<PrefixMatch>, params: &ScorerParams) -> Result<Self, ScorerParamError> {
        let length_weight = params.match_length_weight.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&length_weight) {
            return Err(ScorerParamError::Weight(length_weight));
        }
        if length_weight == 0.0 && params.match_length_scale_tokens.is_some() {
            return Err(ScorerParamError::ScaleWithoutWeight);
        }
        let scale = params.match_length_scale_tokens.unwrap_or(8_192);
        if length_weight > 0.0 && scale <= 0 {
            return Err(ScorerParamError::Scale(scale));
        }
        Ok(Self {
            matches,
            length_weight,
            scale_tokens: scale.max(1) as f64,
        })
    }
}

impl Scorer for PrefixCacheScorer {
    fn score(
        &self,
        _req: &SchedulingRequest<'_>,
        state: &CycleState,
        candidates: &[Candidate<'_>],
        scores: &mut [f64],
    ) {
        let Some(found) = state.get(self.matches) else {
            return;
        };
        if found.total_blocks == 0 {
            return;
        }
        let per_block = 1.0 / found.total_blocks as f64;
        for (s, c) in scores.iter_mut().zip(candidates) {
            let matched = found.matched(c.index) as f64;
            let ratio = matched * per_block;
            let length = if self.length_weight > 0.0 {
                let l = (matched * found.block_tokens as f64 / self.scale_tokens).min(1.0);
                l * l
            } else {
                0.0
            };
            *s = self.length_weight * length + (1.0 - self.length_weight) * ratio;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framework::scheduling::candidates;
    use crate::plugins::testing::{request, states_at};

    fn score_with(params: &ScorerParams, matched: Vec<u32>, total: usize) -> Vec<f64> {
        let key = DataKey::<PrefixMatch>::named("scorer-test");
        let scorer = PrefixCacheScorer::new(key, params).unwrap();
        let s = states_at(&["10.0.0.1:8000", "10.0.0.2:8000"]);
        let mut state = CycleState::default();
        state.put(
            key,
            PrefixMatch {
                total_blocks: total,
                block_tokens: 16,
                block_bytes: 64,
                matched,
                hashes: Vec::new(),
            },
        );
        let headers = Default::default();
        let req = request(&headers, "m", b"");
        let mut out = vec![0.0; 2];
        scorer.score(&req, &state, &candidates(&s), &mut out);
        out
    }

    #[test]
    fn ratio_by_default_and_length_when_weighted() {
        assert_eq!(
            score_with(&ScorerParams::default(), vec![5, 10], 10),
            vec![0.5, 1.0]
        );
        assert_eq!(
            score_with(&ScorerParams::default(), vec![0, 0], 0),
            vec![0.0, 0.0]
        );
        let weighted = ScorerParams {
            match_length_weight: Some(0.5),
            match_length_scale_tokens: Some(320),
            ..ScorerParams::default()
        };
        // 10 blocks of 16 tokens = 160 of 320 tokens: length 0.5, squared 0.25.
        let out = score_with(&weighted, vec![10, 0], 20);
        assert!((out[0] - (0.5 * 0.25 + 0.5 * 0.5)).abs() < 1e-12, "{out:?}");
        assert_eq!(out[1], 0.0);
    }

    #[test]
    fn bad_parameters_are_refused() {
        let key = DataKey::<PrefixMatch>::named("x");
        let p = |w: f64, s: i64| ScorerParams {
            match_length_weight: Some(w),
            match_length_scale_tokens: Some(s),
            ..ScorerParams::default()
        };
        assert_eq!(
            PrefixCacheScorer::new(key, &p(1.5, 10)).unwrap_err(),
            ScorerParamError::Weight(1.5)
        );
        assert_eq!(
            PrefixCacheScorer::new(key, &p(0.5, 0)).unwrap_err(),
            ScorerParamError::Scale(0)
        );
        assert_eq!(
            PrefixCacheScorer::new(key, &p(0.0, 100)).unwrap_err(),
            ScorerParamError::ScaleWithoutWeight
        );
        assert!(PrefixCacheScorer::new(key, &ScorerParams::default()).is_ok());
    }
}
