//! `vllm-sim`: a simulated vLLM server, so that the picker can be tested end to end against
//! many model servers on one machine, with load, prefix caching and LoRA behaving as a router
//! sees them on vLLM 0.32, and without a GPU or a model.
//!
//! * [`config`]: the settings ([`SimConfig`]);
//! * [`cache`]: KV blocks with prefix caching and LRU eviction;
//! * [`engine`]: running slots, the FCFS queue, prefill/decode timing, preemption;
//! * [`metrics`]: the Prometheus exposition with vLLM's families and labels;
//! * [`openai`]: request and response shapes;
//! * [`admin`]: the `/sim/` test hooks;
//! * [`server`]: the axum routes, [`Simulator`] and [`serve`].
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use vllm_sim::{SimConfig, Simulator, serve};
//! let sim = Simulator::new(SimConfig { time_scale: 0.01, ..SimConfig::default() });
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! serve(listener, sim, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod admin;
pub mod cache;
pub mod cli;
pub mod config;
pub mod engine;
pub mod kvevents;
pub mod metrics;
pub mod openai;
pub mod server;

pub use admin::{MetricsMode, SimStats};
pub use config::{SimConfig, SimConfigError};
pub use metrics::Overrides;
pub use server::{SIM_ID_HEADER, Simulator, serve};

/// The prompt renderer and tokenizer the simulator uses with `--tokenizer`.
pub use vllm_prompt;
