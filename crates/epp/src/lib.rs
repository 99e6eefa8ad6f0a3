//! endpoint-picker: an Envoy ext_proc endpoint picker (EPP) for the Kubernetes Gateway API
//! Inference Extension.
//!
//! A gateway asks the EPP, for every inference request, which model-server endpoint should
//! serve it. The EPP answers from an immutable snapshot of the pool's endpoints and their
//! scraped load, a prefix-cache index of where each prompt prefix probably lives, and the
//! scheduling profiles of an `EndpointPickerConfig`.
//!
//! Modules, one concern each:
//! * [`protocol`]: the ext_proc stream state machine and wire messages;
//! * [`request`]: request headers and body parsing;
//! * [`requestcontrol`]: the director's pipeline (admission, dispatch, producers, scheduling,
//!   pre-request) and InferenceObjective priorities;
//! * [`config`]: flags, environment and the EndpointPickerConfig, resolved once at start-up;
//! * [`framework`]: the plugin contracts and the typed data plugins share;
//! * [`plugins`]: the in-tree plugins and their factory;
//! * [`scheduling`]: profiles and the scheduler;
//! * [`datalayer`]: endpoints and their attributes, published as snapshots, and the
//!   collector that runs data sources;
//! * [`k8s`]: InferencePool/pod/objective discovery, leader election, metrics auth;
//! * [`observability`]: metrics, health, logs;
//! * [`app`]: the wiring.
//!
//! The simulated vLLM server the tests and benchmarks use is its own crate, `vllm-sim`.

#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod datalayer;
pub mod flowcontrol;
pub mod framework;
pub mod k8s;
pub mod observability;
pub mod plugins;
pub mod protocol;
pub mod request;
pub mod requestcontrol;
pub mod scheduling;
