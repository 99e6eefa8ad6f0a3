//! What operators see: Prometheus metrics, health and readiness, logs.
//!
//! * [`metrics`]: the EPP's metric families under the reference's names;
//! * [`pool`]: pool gauges computed from the snapshot at scrape time;
//! * [`labels`]: bounds on label values clients choose;
//! * [`health`]: gRPC health with the reference's answers;
//! * [`admin`]: the HTTP metrics port;
//! * [`logging`]: `tracing` set up from the reference's `--v` / `--zap-*` flags.

pub mod admin;
pub mod health;
pub mod labels;
pub mod logging;
pub mod metrics;
mod pool;
