//! The scheduling contract: filters narrow the candidates, scorers rate them, a picker
//! chooses, a profile handler decides which profiles run and which result is primary (the
//! reference's `framework/interface/scheduling`).
//!
//! Every method is synchronous and pure with respect to the request: all a plugin needs is in
//! the [`SchedulingRequest`], the [`CycleState`] filled by the data producers before the cycle,
//! and the candidates' snapshot attributes.
//!
//! Scores are dense: a scorer writes one `f64` per candidate into a slice aligned with the
//! candidates. The framework clamps each to `[0, 1]` (NaN counts as 0), multiplies by the
//! profile's weight and sums; higher is better (the reference's contract, without its
//! per-scorer map).

use std::ops::Deref;
use std::sync::Arc;

use rand::rngs::SmallRng;
use tokio::time::Instant;

use super::data::CycleState;
use crate::datalayer::EndpointState;
use crate::request::{ApiKind, RequestHeaders};

/// What the scheduler knows about one request.
#[derive(Debug)]
pub struct SchedulingRequest<'a> {
    /// `x-request-id` (or the generated one).
    pub request_id: &'a str,
    /// The model named in the body.
    pub model: &'a str,
    /// The model the request will be served as (after `x-llm-d-model-name-rewrite` or its alias `x-gateway-model-name-rewrite`).
    pub target_model: &'a str,
    /// The bytes the prefix index hashes (see [`crate::request::ParsedBody::prefix_input`]).
    pub prefix_input: &'a [u8],
    /// `cache_salt` of the body.
    pub cache_salt: Option<&'a str>,
    /// The whole request body (a token producer renders and tokenizes it).
    pub body: &'a [u8],
    /// The API the body is for.
    pub api: ApiKind,
    /// All request headers.
    pub headers: &'a RequestHeaders,
    /// Priority from the request's InferenceObjective (0 without one); below 0 is sheddable.
    pub priority: i32,
    /// The client's cap on generated tokens, when it set one (see
    /// [`crate::request::ParsedBody::max_output_tokens`]).
    pub max_output_tokens: Option<u64>,
    /// The cycle's notion of "now" for metric ages.
    pub now: Instant,
}

impl<'a> SchedulingRequest<'a> {
    /// A request of priority 0 timed now.
    pub fn new(
        request_id: &'a str,
        target_model: &'a str,
        prefix_input: &'a [u8],
        cache_salt: Option<&'a str>,
        headers: &'a RequestHeaders,
    ) -> Self {
        Self {
            request_id,
            model: target_model,
            target_model,
            prefix_input,
            cache_salt,
            body: &[],
            api: ApiKind::Completions,
            headers,
            priority: 0,
            max_output_tokens: None,
            now: Instant::now(),
        }
    }
}

/// One candidate endpoint of a cycle: its snapshot state and its position in the cycle's
/// initial candidate list, which stays the same through filters, so that data a producer
/// stored per candidate (indexed by that position) is found again after filtering.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'s> {
    /// The endpoint's state in the request's snapshot.
    pub state: &'s EndpointState,
    /// Position in the cycle's initial candidate list.
    pub index: usize,
}

impl Deref for Candidate<'_> {
    type Target = EndpointState;

    fn deref(&self) -> &EndpointState {
        self.state
    }
}

/// Numbers `states` as a cycle's initial candidate list.
pub fn candidates<'s>(states: impl IntoIterator<Item = &'s EndpointState>) -> Vec<Candidate<'s>> {
    states
        .into_iter()
        .enumerate()
        .map(|(index, state)| Candidate { state, index })
        .collect()
}

/// Narrows the candidate list. The output keeps the input's entries; order may change.
pub trait Filter: Send + Sync {
    /// The candidates that remain.
    fn filter<'s>(
        &self,
        req: &SchedulingRequest<'_>,
        state: &CycleState,
        candidates: &[Candidate<'s>],
    ) -> Vec<Candidate<'s>>;
}

/// Rates candidates.
pub trait Scorer: Send + Sync {
    /// Writes a score per candidate into `scores` (zeroed, same length as `candidates`).
    fn score(
        &self,
        req: &SchedulingRequest<'_>,
        state: &CycleState,
        candidates: &[Candidate<'_>],
        scores: &mut [f64],
    );
}

/// Chooses endpoints from scored candidates.
pub trait Picker: Send + Sync {
    /// Indices into `candidates`, best first, at most the picker's endpoint count.
    fn pick(&self, candidates: &[Candidate<'_>], scores: &[f64], rng: &mut SmallRng) -> Vec<usize>;
}

/// Why a profile or a cycle produced no endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulingError {
    /// The cycle was given no candidates.
    #[error("no candidate endpoints")]
    NoCandidates,
    /// A filter removed every candidate.
    #[error(
        "no pods available for the given request: filter '{filter}' of profile '{profile}' removed every candidate"
    )]
    FilteredOut {
        /// Profile name.
        profile: String,
        /// Filter plugin name.
        filter: String,
    },
    /// The picker chose nothing.
    #[error("picker '{picker}' of profile '{profile}' chose no endpoint")]
    NothingPicked {
        /// Profile name.
        profile: String,
        /// Picker plugin name.
        picker: String,
    },
    /// The profile handler could not form a result.
    #[error("{0}")]
    Handler(String),
}

/// An endpoint a profile chose: its state and its index in the cycle's candidate list.
#[derive(Debug, Clone)]
pub struct Target {
    /// The endpoint's state in the request's snapshot.
    pub state: EndpointState,
    /// Position in the cycle's initial candidate list (see [`Candidate::index`]).
    pub index: usize,
}

impl Deref for Target {
    type Target = EndpointState;

    fn deref(&self) -> &EndpointState {
        &self.state
    }
}

/// The outcome of running one profile.
#[derive(Debug, Clone)]
pub struct ProfileRun {
    /// Index of the profile in the scheduler.
    pub profile: usize,
    /// Profile name.
    pub name: Arc<str>,
    /// Chosen endpoints, best first, or why none.
    pub outcome: Result<Vec<Target>, SchedulingError>,
}

/// The decision of a scheduling cycle: every profile's targets by name, and which profile's
/// targets the gateway receives. Other named targets (a `prefill` profile in P/D
/// disaggregation, say) reach the request through pre-request plugins, as headers.
#[derive(Debug, Clone)]
pub struct SchedulingResult {
    /// All profile runs.
    pub runs: Vec<ProfileRun>,
    /// Index into `runs` of the primary profile.
    pub primary: usize,
}

impl SchedulingResult {
    /// The primary profile's endpoints, best first.
    pub fn targets(&self) -> &[Target] {
        match self.runs.get(self.primary).map(|r| &r.outcome) {
            Some(Ok(targets)) => targets,
            _ => &[],
        }
    }

    /// The endpoints of the profile named `profile`, if it ran and chose some.
    pub fn targets_of(&self, profile: &str) -> Option<&[Target]> {
        self.runs
            .iter()
            .find(|r| &*r.name == profile)
            .and_then(|r| r.outcome.as_deref().ok())
    }

    /// The primary profile's name.
    pub fn primary_name(&self) -> Option<&Arc<str>> {
        self.runs.get(self.primary).map(|r| &r.name)
    }

    /// The [`PREFILL_PROFILE`]'s first endpoint, when that profile ran, chose one, and it is
    /// not the primary endpoint: the other endpoint that takes part in the request.
    pub fn prefill_target(&self) -> Option<&Target> {
        let primary = self.targets().first().map(|t| t.endpoint.address);
        self.targets_of(PREFILL_PROFILE)
            .and_then(<[_]>::first)
            .filter(|p| Some(p.endpoint.address) != primary)
    }
}

/// The profile whose endpoint shares a request with the primary one in P/D disaggregation
/// (hard-coded in llm-d-router v0.10, as here).
pub const PREFILL_PROFILE: &str = "prefill";

/// Decides which profiles run and what the result is. It sees the request, so it may choose
/// profiles by header or body (a P/D handler runs `prefill` only for long prompts, say).
pub trait ProfileHandler: Send + Sync {
    /// Profiles (indices into `profile_names`) to run next, given the runs so far; empty ends
    /// the cycle. Each profile runs at most once per cycle.
    fn pick_profiles(
        &self,
        req: &SchedulingRequest<'_>,
        profile_names: &[Arc<str>],
        runs: &[ProfileRun],
    ) -> Vec<usize>;

    /// Builds the cycle's result from all runs.
    fn process_results(
        &self,
        req: &SchedulingRequest<'_>,
        runs: Vec<ProfileRun>,
    ) -> Result<SchedulingResult, SchedulingError>;
}
