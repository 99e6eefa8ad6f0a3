//! The plugin framework: the contracts plugins implement and the typed data they share. It
//! knows no particular plugin: the in-tree plugins live in [`crate::plugins`], and everything
//! outside that module reaches them only through these traits and keys.
//!
//! * [`data`]: typed keys, per-endpoint attributes, per-request cycle state;
//! * [`attributes`]: the data contracts producers and consumers share;
//! * [`scheduling`]: filters, scorers, pickers, profile handlers;
//! * [`requestcontrol`]: admission, dispatch, data producers, pre-request hooks;
//! * [`datalayer`]: data sources and extractors;
//! * [`flowcontrol`]: ordering, fairness and usage-limit policies of the flow-control queue;
//! * [`plugin`]: plugin instances, their roles, names and metrics.

pub mod attributes;
pub mod data;
pub mod datalayer;
pub mod flowcontrol;
pub mod plugin;
pub mod requestcontrol;
pub mod scheduling;
