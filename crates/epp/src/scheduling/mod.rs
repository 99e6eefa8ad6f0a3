//! Scheduling: profiles of filters → weighted scorers → picker, run by a profile handler.
//!
//! The scheduler is built once from the EndpointPickerConfig (see [`crate::config`]) and is
//! immutable afterwards; a cycle reads only the request and the candidates it is given, so
//! any number of cycles run in parallel without locks.

mod framework;
pub mod plugins;
mod scheduler;

pub use framework::{
    CycleCache, EndpointsChanged, Filter, Picker, PluginHandle, PreRequest, PrefixHashes, PrefixHit,
    ProfileHandler, ProfileRun, SchedulerObserver, SchedulingRequest, SchedulingResult, Scorer, Timer,
};
pub use scheduler::{Named, Profile, Scheduler, WeightedScorer};

/// Why a cycle produced no endpoint.
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
