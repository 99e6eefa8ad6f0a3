//! Pickers: `max-score-picker`, `random-picker`, `weighted-random-picker`.
//!
//! Each returns up to `maxNumOfEndpoints` candidates, best first; the first is the primary
//! endpoint and the rest are fallbacks the gateway may retry on.

use rand::RngExt;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;

use crate::framework::scheduling::{Candidate, Picker};

/// Highest total score wins; ties are broken uniformly at random.
#[derive(Debug)]
pub struct MaxScorePicker {
    /// Endpoints returned (at least 1).
    pub max_endpoints: usize,
}

impl Picker for MaxScorePicker {
    fn pick(&self, candidates: &[Candidate<'_>], scores: &[f64], rng: &mut SmallRng) -> Vec<usize> {
        let n = candidates.len().min(scores.len());
        if n == 0 {
            return Vec::new();
        }
        if self.max_endpoints <= 1 {
            // One pass with reservoir sampling over the tied maxima: no shuffle, no sort.
            let mut best = 0;
            let mut ties = 1u32;
            for i in 1..n {
                match scores[i].total_cmp(&scores[best]) {
                    std::cmp::Ordering::Greater => {
                        best = i;
                        ties = 1;
                    }
                    std::cmp::Ordering::Equal => {
                        ties += 1;
                        if rng.random_range(0..ties) == 0 {
                            best = i;
                        }
                    }
                    std::cmp::Ordering::Less => {}
                }
            }
            return vec![best];
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(rng);
        // Stable: equal scores keep their shuffled order.
        order.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
        order.truncate(self.max_endpoints);
        order
    }
}

/// Uniformly random endpoints, ignoring scores.
#[derive(Debug)]
pub struct RandomPicker {
    /// Endpoints returned (at least 1).
    pub max_endpoints: usize,
}

impl Picker for RandomPicker {
    fn pick(&self, candidates: &[Candidate<'_>], _scores: &[f64], rng: &mut SmallRng) -> Vec<usize> {
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        order.shuffle(rng);
        order.truncate(self.max_endpoints);
        order
    }
}

/// Random endpoints with probability growing with score (A-Res weighted sampling without
/// replacement: key = U^(1/score)). Zero scores come last; all-zero behaves like random.
#[derive(Debug)]
pub struct WeightedRandomPicker {
    /// Endpoints returned (at least 1).
    pub max_endpoints: usize,
}

impl Picker for WeightedRandomPicker {
    fn pick(&self, candidates: &[Candidate<'_>], scores: &[f64], rng: &mut SmallRng) -> Vec<usize> {
        let n = candidates.len().min(scores.len());
        if !scores[..n].iter().any(|s| *s > 0.0) {
            return RandomPicker {
                max_endpoints: self.max_endpoints,
            }
            .pick(&candidates[..n], scores, rng);
        }
        let mut keyed: Vec<(f64, usize)> = (0..n)
            .map(|i| {
                let s = scores[i];
                let key = if s > 0.0 {
                    let u: f64 = rng.random::<f64>().max(1e-10);
                    u.powf(1.0 / s)
                } else {
                    0.0
                };
                (key, i)
            })
            .collect();
        keyed.shuffle(rng);
        keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
        keyed
            .into_iter()
            .take(self.max_endpoints)
            .map(|(_, i)| i)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::framework::scheduling::candidates;
    use crate::plugins::testing::states;

    #[test]
    fn max_score_takes_the_best_and_breaks_ties_evenly() {
        let s = states(&[(0, 0.0); 4]);
        let cands = candidates(&s);
        let picker = MaxScorePicker { max_endpoints: 1 };
        let mut rng = SmallRng::seed_from_u64(7);
        assert_eq!(picker.pick(&cands, &[0.1, 0.9, 0.3, 0.2], &mut rng), vec![1]);
        let mut counts = [0u32; 4];
        for _ in 0..4000 {
            counts[picker.pick(&cands, &[1.0, 1.0, 0.5, 1.0], &mut rng)[0]] += 1;
        }
        assert_eq!(counts[2], 0);
        for i in [0, 1, 3] {
            assert!((1100..1600).contains(&counts[i]), "{counts:?}");
        }
    }

    #[test]
    fn max_score_returns_n_best_first() {
        let s = states(&[(0, 0.0); 4]);
        let cands = candidates(&s);
        let picker = MaxScorePicker { max_endpoints: 3 };
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(
            picker.pick(&cands, &[0.1, 0.9, 0.3, 0.2], &mut rng),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn weighted_random_prefers_high_scores_and_skips_zero_until_needed() {
        let s = states(&[(0, 0.0); 3]);
        let cands = candidates(&s);
        let picker = WeightedRandomPicker { max_endpoints: 1 };
        let mut rng = SmallRng::seed_from_u64(3);
        let mut counts = [0u32; 3];
        for _ in 0..3000 {
            counts[picker.pick(&cands, &[0.9, 0.1, 0.0], &mut rng)[0]] += 1;
        }
        assert_eq!(counts[2], 0);
        assert!(counts[0] > counts[1] * 3, "{counts:?}");
        let all = WeightedRandomPicker { max_endpoints: 3 }.pick(&cands, &[0.9, 0.1, 0.0], &mut rng);
        assert_eq!(all.len(), 3);
        assert_eq!(all[2], 2);
    }

    #[test]
    fn random_picker_returns_distinct() {
        let s = states(&[(0, 0.0); 5]);
        let cands = candidates(&s);
        let mut rng = SmallRng::seed_from_u64(3);
        let mut got = RandomPicker { max_endpoints: 5 }.pick(&cands, &[0.0; 5], &mut rng);
        got.sort_unstable();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }
}
