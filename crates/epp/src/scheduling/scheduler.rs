//! Profiles and the scheduler that runs them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::framework::data::CycleState;
use crate::framework::plugin::{Named, PluginObserver};
use crate::framework::scheduling::{
    Candidate, Filter, Picker, ProfileHandler, ProfileRun, SchedulingError, SchedulingRequest,
    SchedulingResult, Scorer, Target,
};

/// A scorer with its profile weight.
#[derive(Clone, Debug)]
pub struct WeightedScorer {
    /// The scorer.
    pub scorer: Named<dyn Scorer>,
    /// Multiplier of its clamped score.
    pub weight: f64,
}

/// One scheduling profile: filters in order, weighted scorers, one picker.
#[derive(Clone, Debug)]
pub struct Profile {
    /// Profile name.
    pub name: Arc<str>,
    /// Filters, applied in order.
    pub filters: Vec<Named<dyn Filter>>,
    /// Scorers and weights.
    pub scorers: Vec<WeightedScorer>,
    /// The picker.
    pub picker: Named<dyn Picker>,
}

/// A score as the framework counts it: clamped to `[0, 1]`, NaN as 0.
fn clamp_score(s: f64) -> f64 {
    if s.is_nan() { 0.0 } else { s.clamp(0.0, 1.0) }
}

impl Profile {
    /// Runs filters, scorers and picker over `candidates`; returns the chosen endpoints.
    pub fn run<'s>(
        &self,
        req: &SchedulingRequest<'_>,
        state: &CycleState,
        candidates: &[Candidate<'s>],
        rng: &mut SmallRng,
    ) -> Result<Vec<Candidate<'s>>, SchedulingError> {
        if candidates.is_empty() {
            return Err(SchedulingError::NoCandidates);
        }
        let mut filtered: Option<Vec<Candidate<'s>>> = None;
        for f in &self.filters {
            let next = f.timed(|p| p.filter(req, state, filtered.as_deref().unwrap_or(candidates)));
            if next.is_empty() {
                return Err(SchedulingError::FilteredOut {
                    profile: self.name.to_string(),
                    filter: f.name.to_string(),
                });
            }
            filtered = Some(next);
        }
        let cands = filtered.as_deref().unwrap_or(candidates);

        let mut totals = vec![0.0; cands.len()];
        if !self.scorers.is_empty() {
            let mut scratch = vec![0.0; cands.len()];
            for ws in &self.scorers {
                scratch.fill(0.0);
                ws.scorer.timed(|p| p.score(req, state, cands, &mut scratch));
                for (t, s) in totals.iter_mut().zip(&scratch) {
                    *t += ws.weight * clamp_score(*s);
                }
            }
        }

        let picks = self.picker.timed(|p| p.pick(cands, &totals, rng));
        let mut chosen: Vec<Candidate<'s>> = Vec::with_capacity(picks.len());
        for i in picks {
            if let Some(c) = cands.get(i)
                && !chosen.iter().any(|x| x.index == c.index)
            {
                chosen.push(*c);
            }
        }
        if chosen.is_empty() {
            return Err(SchedulingError::NothingPicked {
                profile: self.name.to_string(),
                picker: self.picker.name.to_string(),
            });
        }
        Ok(chosen)
    }
}

/// Runs the configured profiles. Immutable after construction; shared by all streams.
pub struct Scheduler {
    profiles: Vec<Profile>,
    profile_names: Vec<Arc<str>>,
    handler: Named<dyn ProfileHandler>,
    observer: Option<Arc<dyn PluginObserver>>,
    seed: u64,
    cycles: AtomicU64,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("profiles", &self.profiles)
            .field("handler", &self.handler)
            .finish()
    }
}

/// splitmix64: turns a counter into well-spread seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Scheduler {
    /// A scheduler over `profiles`. `seed` makes tie-breaks reproducible; `None` seeds from
    /// the operating system.
    pub fn new(profiles: Vec<Profile>, handler: Named<dyn ProfileHandler>, seed: Option<u64>) -> Self {
        let seed = seed.unwrap_or_else(|| rand::rng().random());
        Self {
            profile_names: profiles.iter().map(|p| p.name.clone()).collect(),
            profiles,
            handler,
            observer: None,
            seed,
            cycles: AtomicU64::new(0),
        }
    }

    /// Attaches an observer: per-plugin timers and cycle durations.
    pub fn with_observer(mut self, observer: Arc<dyn PluginObserver>) -> Self {
        for p in &mut self.profiles {
            for f in &mut p.filters {
                f.attach(&*observer, "Filter");
            }
            for s in &mut p.scorers {
                s.scorer.attach(&*observer, "Scorer");
            }
            p.picker.attach(&*observer, "Picker");
        }
        self.handler.attach(&*observer, "ProfilePicker");
        self.observer = Some(observer);
        self
    }

    /// The profiles, in configuration order.
    pub fn profiles(&self) -> &[Profile] {
        &self.profiles
    }

    /// The profile handler.
    pub fn handler(&self) -> &Named<dyn ProfileHandler> {
        &self.handler
    }

    /// A fresh generator for one cycle: deterministic for a given seed and cycle count, and
    /// free of shared mutable state apart from one relaxed counter.
    pub fn rng(&self) -> SmallRng {
        let n = self.cycles.fetch_add(1, Ordering::Relaxed);
        SmallRng::seed_from_u64(mix(self.seed ^ mix(n)))
    }

    /// Runs a cycle over `candidates`, with what the data producers stored in `state`.
    pub fn schedule(
        &self,
        req: &SchedulingRequest<'_>,
        state: &CycleState,
        candidates: &[Candidate<'_>],
    ) -> Result<SchedulingResult, SchedulingError> {
        if candidates.is_empty() {
            return Err(SchedulingError::NoCandidates);
        }
        let start = std::time::Instant::now();
        let mut rng = self.rng();
        let mut runs: Vec<ProfileRun> = Vec::with_capacity(self.profiles.len());
        // A handler that keeps asking for profiles cannot loop forever: each runs once.
        for _ in 0..=self.profiles.len() {
            let next = self
                .handler
                .timed(|h| h.pick_profiles(req, &self.profile_names, &runs));
            let fresh: Vec<usize> = next
                .into_iter()
                .filter(|i| *i < self.profiles.len() && !runs.iter().any(|r| r.profile == *i))
                .collect();
            if fresh.is_empty() {
                break;
            }
            for i in fresh {
                let profile = &self.profiles[i];
                let outcome = profile.run(req, state, candidates, &mut rng).map(|eps| {
                    eps.into_iter()
                        .map(|c| Target {
                            state: c.state.clone(),
                            index: c.index,
                        })
                        .collect()
                });
                runs.push(ProfileRun {
                    profile: i,
                    name: profile.name.clone(),
                    outcome,
                });
            }
        }
        let result = self.handler.plugin.process_results(req, runs);
        if let Some(o) = &self.observer {
            o.cycle(start.elapsed());
        }
        result
    }

    /// A uniformly random candidate, for requests that carry no body to schedule on.
    pub fn random_endpoint<T: Copy>(&self, candidates: &[T]) -> Option<T> {
        if candidates.is_empty() {
            return None;
        }
        let i = self.rng().random_range(0..candidates.len());
        candidates.get(i).copied()
    }
}
