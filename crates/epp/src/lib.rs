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
//! * [`request`]: request parsing and the director that turns a request into a decision;
//! * [`config`]: the EndpointPickerConfig, validated once at start-up;
//! * [`scheduling`]: profiles, filters, scorers, pickers;
//! * [`prefix`]: the approximate prefix-cache index;
//! * [`datalayer`]: endpoints and their metrics, published as snapshots;
//! * [`k8s`]: InferencePool/pod/objective discovery, leader election, metrics auth;
//! * [`admission`]: shedding sheddable requests when the pool is saturated;
//! * [`observability`]: metrics, health, logs.
//!
//! The simulated vLLM server the tests and benchmarks use is its own crate, `vllm-sim`.

#![forbid(unsafe_code)]

pub mod admission;
pub mod app;
pub mod config;
pub mod datalayer;
pub mod k8s;
pub mod observability;
pub mod prefix;
pub mod protocol;
pub mod request;
pub mod scheduling;
