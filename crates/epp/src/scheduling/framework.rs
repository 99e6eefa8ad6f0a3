//! The plugin contract: filters narrow the candidates, scorers rate them, a picker chooses,
//! a profile handler decides which profiles run and which result is primary.
//!
//! Every plugin method is synchronous and pure with respect to the request: all a plugin
//! needs is in the [`SchedulingRequest`] and the candidates' snapshot state. The only
//! mutation a plugin may perform is in [`PreRequest`] (after the decision) and
//! [`EndpointsChanged`] (off the request path), e.g. the prefix index.
//!
//! Scores are dense: a scorer writes one `f64` per candidate into a slice aligned with the
//! candidates. The framework clamps each to `[0, 1]` (NaN counts as 0), multiplies by the
//! profile's weight and sums; higher is better.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use tokio::time::Instant;

use crate::datalayer::{EndpointState, Snapshot};
use crate::request::RequestHeaders;

/// What the scheduler knows about one request.
#[derive(Debug)]
pub struct SchedulingRequest<'a> {
    /// `x-request-id` (or the generated one).
    pub request_id: &'a str,
    /// The model the request will be served as (after `x-gateway-model-name-rewrite`).
    pub target_model: &'a str,
    /// The bytes the prefix index hashes (see [`crate::request::ParsedBody::prefix_input`]).
    pub prefix_input: &'a [u8],
    /// `cache_salt` of the body.
    pub cache_salt: Option<&'a str>,
    /// All request headers.
    pub headers: &'a RequestHeaders,
    /// The cycle's notion of "now" for metric ages.
    pub now: Instant,
    /// Values derived once per cycle and shared between plugins.
    pub cache: CycleCache,
}

impl<'a> SchedulingRequest<'a> {
    /// A request with an empty cycle cache.
    pub fn new(
        request_id: &'a str,
        target_model: &'a str,
        prefix_input: &'a [u8],
        cache_salt: Option<&'a str>,
        headers: &'a RequestHeaders,
    ) -> Self {
        Self {
            request_id,
            target_model,
            prefix_input,
            cache_salt,
            headers,
            now: Instant::now(),
            cache: CycleCache::default(),
        }
    }
}

/// Typed per-cycle memo: derived values that more than one plugin or phase needs.
#[derive(Debug, Default)]
pub struct CycleCache {
    /// Prefix block hashes, computed by the first prefix plugin that needs them and reused by
    /// its `PreRequest` step.
    pub prefix: RefCell<Option<PrefixHashes>>,
    /// How much of the prompt the primary endpoint held, as seen by the prefix plugin's
    /// `PreRequest` step (for the hit-ratio metrics).
    pub prefix_hit: Cell<Option<PrefixHit>>,
}

/// The primary endpoint's prefix match of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixHit {
    /// Leading blocks the endpoint held.
    pub matched_blocks: usize,
    /// Blocks of the request.
    pub total_blocks: usize,
    /// Bytes per block.
    pub block_bytes: usize,
}

/// Observes one plugin call's duration.
pub type Timer = Arc<dyn Fn(Duration) + Send + Sync>;

/// Where the scheduler reports what it measures. Timers are requested once per plugin when
/// the observer is attached, so the request path does no label lookups.
pub trait SchedulerObserver: Send + Sync {
    /// A timer for `plugin_name` (of `plugin_type`) at `extension_point`, or `None`.
    fn plugin_timer(
        &self,
        extension_point: &'static str,
        plugin_type: &str,
        plugin_name: &str,
    ) -> Option<Timer>;
    /// One whole scheduling cycle took `elapsed`.
    fn cycle(&self, elapsed: Duration);
    /// The primary endpoint's prefix match.
    fn prefix_hit(&self, hit: PrefixHit);
}

/// Block hashes of the request's prefix input under one block size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixHashes {
    /// Bytes per block used.
    pub block_bytes: usize,
    /// Block limit used.
    pub max_blocks: usize,
    /// The chained hashes.
    pub hashes: Vec<u64>,
}

/// Narrows the candidate list. The output keeps the input's references; order may change.
pub trait Filter: Send + Sync {
    /// The candidates that remain.
    fn filter<'s>(
        &self,
        req: &SchedulingRequest<'_>,
        candidates: &[&'s EndpointState],
    ) -> Vec<&'s EndpointState>;
}

/// Rates candidates.
pub trait Scorer: Send + Sync {
    /// Writes a score per candidate into `scores` (zeroed, same length as `candidates`).
    fn score(&self, req: &SchedulingRequest<'_>, candidates: &[&EndpointState], scores: &mut [f64]);
}

/// Chooses endpoints from scored candidates.
pub trait Picker: Send + Sync {
    /// Indices into `candidates`, best first, at most the picker's endpoint count.
    fn pick(&self, candidates: &[&EndpointState], scores: &[f64], rng: &mut SmallRng) -> Vec<usize>;
}

/// The outcome of running one profile.
#[derive(Debug, Clone)]
pub struct ProfileRun {
    /// Index of the profile in the scheduler.
    pub profile: usize,
    /// Profile name.
    pub name: Arc<str>,
    /// Chosen endpoints, best first, or why none.
    pub outcome: Result<Vec<EndpointState>, super::SchedulingError>,
}

/// The decision of a scheduling cycle.
#[derive(Debug, Clone)]
pub struct SchedulingResult {
    /// All profile runs.
    pub runs: Vec<ProfileRun>,
    /// Index into `runs` of the primary profile, whose endpoints the gateway receives.
    pub primary: usize,
}

impl SchedulingResult {
    /// The primary profile's endpoints, best first.
    pub fn targets(&self) -> &[EndpointState] {
        match self.runs.get(self.primary).map(|r| &r.outcome) {
            Some(Ok(targets)) => targets,
            _ => &[],
        }
    }
}

/// Decides which profiles run and what the result is.
pub trait ProfileHandler: Send + Sync {
    /// Profiles (indices into `profiles`) to run next, given the runs so far; empty ends the
    /// cycle.
    fn pick_profiles(&self, profile_names: &[Arc<str>], runs: &[ProfileRun]) -> Vec<usize>;

    /// Builds the cycle's result from all runs.
    fn process_results(&self, runs: Vec<ProfileRun>) -> Result<SchedulingResult, super::SchedulingError>;
}

/// Runs after the decision, before the request is forwarded (e.g. records the pick in the
/// prefix index).
pub trait PreRequest: Send + Sync {
    /// Observes the decision.
    fn pre_request(&self, req: &SchedulingRequest<'_>, result: &SchedulingResult);
}

/// Told when the set of endpoints changes (off the request path), to drop per-endpoint state.
pub trait EndpointsChanged: Send + Sync {
    /// The new set.
    fn endpoints_changed(&self, snapshot: &Snapshot);
}

/// One instantiated plugin and the roles it plays. Each role points at the same object.
#[derive(Clone, Default)]
pub struct PluginHandle {
    /// Filter role.
    pub filter: Option<Arc<dyn Filter>>,
    /// Scorer role.
    pub scorer: Option<Arc<dyn Scorer>>,
    /// Picker role.
    pub picker: Option<Arc<dyn Picker>>,
    /// Profile-handler role.
    pub profile_handler: Option<Arc<dyn ProfileHandler>>,
    /// Pre-request hook.
    pub pre_request: Option<Arc<dyn PreRequest>>,
    /// Endpoint-set hook.
    pub endpoints_changed: Option<Arc<dyn EndpointsChanged>>,
    /// The prefix index the plugin keeps, for the index-size metric.
    pub prefix_index: Option<Arc<crate::prefix::PrefixIndex>>,
}

impl std::fmt::Debug for PluginHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHandle")
            .field("filter", &self.filter.is_some())
            .field("scorer", &self.scorer.is_some())
            .field("picker", &self.picker.is_some())
            .field("profile_handler", &self.profile_handler.is_some())
            .field("pre_request", &self.pre_request.is_some())
            .finish()
    }
}

impl PluginHandle {
    /// Whether the plugin takes part in a profile (filter, scorer or picker).
    pub fn is_profile_member(&self) -> bool {
        self.filter.is_some() || self.scorer.is_some() || self.picker.is_some()
    }
}
