//! Request control: the pipeline around a scheduling cycle (the [`Director`]) and the
//! InferenceObjective priorities it reads ([`objectives`]).

mod director;
pub mod objectives;

pub use director::{
    DEFAULT_MAX_BODY_BYTES, DEFAULT_STALENESS, Decision, Director, DirectorConfig, DirectorError,
    RequestControl, RequestInfo, Routing, Subset, SubsetEntry,
};
pub use objectives::{ObjectiveTable, PriorityLookup};
