//! Profiles and the scheduler that runs them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use super::SchedulingError;
use super::framework::{
    EndpointsChanged, Filter, Picker, PreRequest, ProfileHandler, ProfileRun, SchedulerObserver,
    SchedulingRequest, SchedulingResult, Scorer, Timer,
};
use crate::datalayer::{EndpointState, Snapshot};
use crate::prefix::PrefixIndex;

/// A plugin role with the name and type it was configured under.
pub struct Named<T: ?Sized> {
    /// Configured plugin name.
    pub name: Arc<str>,
    /// Plugin type.
    pub type_name: Arc<str>,
    /// The plugin.
    pub plugin: Arc<T>,
    /// Duration observer, attached by [`Scheduler::with_observer`].
    pub timer: Option<Timer>,
}

impl<T: ?Sized> Named<T> {
    /// A named plugin without timer.
    pub fn new(name: Arc<str>, type_name: Arc<str>, plugin: Arc<T>) -> Self {
        Self {
            name,
            type_name,
            plugin,
            timer: None,
        }
    }

    /// Runs `f` on the plugin, timing it when a timer is attached.
    fn timed<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        match &self.timer {
            Some(timer) => {
                let start = std::time::Instant::now();
                let r = f(&self.plugin);
                timer(start.elapsed());
                r
            }
            None => f(&self.plugin),
        }
    }

    fn attach(&mut self, observer: &dyn SchedulerObserver, point: &'static str) {
        self.timer = observer.plugin_timer(point, &self.type_name, &self.name);
    }
}

impl<T: ?Sized> Clone for Named<T> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            type_name: self.type_name.clone(),
            plugin: self.plugin.clone(),
            timer: self.timer.clone(),
        }
    }
}

impl<T: ?Sized> std::fmt::Debug for Named<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

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
        candidates: &[&'s EndpointState],
        rng: &mut SmallRng,
    ) -> Result<Vec<&'s EndpointState>, SchedulingError> {
        if candidates.is_empty() {
            return Err(SchedulingError::NoCandidates);
        }
        let mut filtered: Option<Vec<&'s EndpointState>> = None;
        for f in &self.filters {
            let next = f.timed(|p| p.filter(req, filtered.as_deref().unwrap_or(candidates)));
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
                ws.scorer.timed(|p| p.score(req, cands, &mut scratch));
                for (t, s) in totals.iter_mut().zip(&scratch) {
                    *t += ws.weight * clamp_score(*s);
                }
            }
        }

        let picks = self.picker.timed(|p| p.pick(cands, &totals, rng));
        let mut chosen: Vec<&'s EndpointState> = Vec::with_capacity(picks.len());
        for i in picks {
            if let Some(c) = cands.get(i)
                && !chosen.iter().any(|x| std::ptr::eq(*x, *c))
            {
                chosen.push(c);
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
    pre_request: Vec<Named<dyn PreRequest>>,
    endpoints_changed: Vec<Arc<dyn EndpointsChanged>>,
    prefix_indexes: Vec<Arc<PrefixIndex>>,
    observer: Option<Arc<dyn SchedulerObserver>>,
    seed: u64,
    cycles: AtomicU64,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("profiles", &self.profiles)
            .field("handler", &self.handler)
            .field("pre_request", &self.pre_request)
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
    pub fn new(
        profiles: Vec<Profile>,
        handler: Named<dyn ProfileHandler>,
        pre_request: Vec<Named<dyn PreRequest>>,
        endpoints_changed: Vec<Arc<dyn EndpointsChanged>>,
        prefix_indexes: Vec<Arc<PrefixIndex>>,
        seed: Option<u64>,
    ) -> Self {
        let seed = seed.unwrap_or_else(|| rand::rng().random());
        Self {
            profile_names: profiles.iter().map(|p| p.name.clone()).collect(),
            profiles,
            handler,
            pre_request,
            endpoints_changed,
            prefix_indexes,
            observer: None,
            seed,
            cycles: AtomicU64::new(0),
        }
    }

    /// Attaches an observer: per-plugin timers, cycle durations and prefix hits.
    pub fn with_observer(mut self, observer: Arc<dyn SchedulerObserver>) -> Self {
        for p in &mut self.profiles {
            for f in &mut p.filters {
                f.attach(&*observer, "Filter");
            }
            for s in &mut p.scorers {
                s.scorer.attach(&*observer, "Scorer");
            }
            p.picker.attach(&*observer, "Picker");
        }
        for h in &mut self.pre_request {
            h.attach(&*observer, "PreRequest");
        }
        self.handler.attach(&*observer, "ProfilePicker");
        self.observer = Some(observer);
        self
    }

    /// The prefix indexes of the configured plugins.
    pub fn prefix_indexes(&self) -> &[Arc<PrefixIndex>] {
        &self.prefix_indexes
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

    /// Runs a cycle over `candidates`.
    pub fn schedule(
        &self,
        req: &SchedulingRequest<'_>,
        candidates: &[&EndpointState],
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
                .timed(|h| h.pick_profiles(&self.profile_names, &runs));
            let fresh: Vec<usize> = next
                .into_iter()
                .filter(|i| *i < self.profiles.len() && !runs.iter().any(|r| r.profile == *i))
                .collect();
            if fresh.is_empty() {
                break;
            }
            for i in fresh {
                let profile = &self.profiles[i];
                let outcome = profile
                    .run(req, candidates, &mut rng)
                    .map(|eps| eps.into_iter().cloned().collect());
                runs.push(ProfileRun {
                    profile: i,
                    name: profile.name.clone(),
                    outcome,
                });
            }
        }
        let result = self.handler.plugin.process_results(runs);
        if let Some(o) = &self.observer {
            o.cycle(start.elapsed());
        }
        result
    }

    /// Runs the pre-request hooks on a decision.
    pub fn pre_request(&self, req: &SchedulingRequest<'_>, result: &SchedulingResult) {
        for hook in &self.pre_request {
            hook.timed(|p| p.pre_request(req, result));
        }
        if let (Some(o), Some(hit)) = (&self.observer, req.cache.prefix_hit.get()) {
            o.prefix_hit(hit);
        }
    }

    /// Tells stateful plugins about a new endpoint set.
    pub fn endpoints_changed(&self, snapshot: &Snapshot) {
        for hook in &self.endpoints_changed {
            hook.endpoints_changed(snapshot);
        }
    }

    /// A uniformly random candidate, for requests that carry no body to schedule on.
    pub fn random_endpoint<'s>(&self, candidates: &[&'s EndpointState]) -> Option<&'s EndpointState> {
        if candidates.is_empty() {
            return None;
        }
        let i = self.rng().random_range(0..candidates.len());
        candidates.get(i).copied()
    }
}
