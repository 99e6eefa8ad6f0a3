//! Scheduling: profiles of filters → weighted scorers → picker, run by a profile handler.
//!
//! The scheduler is built once from the EndpointPickerConfig (see [`crate::config`]) and is
//! immutable afterwards; a cycle reads only the request, the cycle state and the candidates it
//! is given, so any number of cycles run in parallel without locks. The contracts it runs are
//! in [`crate::framework::scheduling`]; the in-tree plugins in [`crate::plugins`].

mod scheduler;

pub use scheduler::{Profile, Scheduler, WeightedScorer};
