//! Flow control (GIE v1.4–v1.5, llm-d-router v0.10; the `flowControl` feature gate): when the
//! pool is saturated, requests wait in the picker instead of piling onto full model servers,
//! ordered by priority band (the InferenceObjective's priority), shared between tenants (the
//! `x-llm-d-inference-fairness-id` header) by each band's fairness policy, bounded in requests
//! and bytes, and dispatched as capacity frees.
//!
//! * [`config`]: the resolved `flowControl` section and its v0.10 defaults;
//! * [`queue`]: bands, flows and limits, as plain data;
//! * [`controller`]: the dispatcher the director asks, its wait and its dispatch task;
//! * [`metrics`]: the `llm_d_epp_flow_control_*` families.
//!
//! The policies themselves are plugins ([`crate::plugins::flowcontrol`]) behind the contracts
//! of [`crate::framework::flowcontrol`]; the saturation detector is the admission detector.

pub mod config;
pub mod controller;
pub mod metrics;
pub mod queue;

pub use controller::FlowController;

#[cfg(test)]
mod tests;
