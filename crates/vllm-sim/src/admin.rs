//! Test hooks under `/sim/`: they let a test force the load a router sees, break or stall
//! the metrics endpoint, and read what the simulator actually did, without touching the
//! vLLM-shaped API.
//!
//! * `PUT /sim/overrides` with `{"waiting": u32?, "running": u32?, "kv_cache_usage": f64?}`:
//!   `/metrics` reports these values instead of the real ones (fields left out stay real)
//!   until `DELETE /sim/overrides`. Answers the overrides now in force.
//! * `PUT /sim/metrics-mode` with body `ok`, `error` (`/metrics` answers 503) or `hang`
//!   (`/metrics` does not answer until the mode changes or the server shuts down);
//!   `GET /sim/metrics-mode` reads it.
//! * `GET /sim/stats`: [`SimStats`] as JSON.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::metrics::Overrides;
use super::openai::{ApiError, json_response};
use super::server::Simulator;

/// How `GET /metrics` behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsMode {
    /// Normal answers.
    #[default]
    Ok,
    /// 503 with an error body.
    Error,
    /// No answer until the mode changes or the server shuts down.
    Hang,
}

impl MetricsMode {
    /// Parses `ok`, `error` or `hang` (surrounding whitespace and quotes ignored).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().trim_matches('"') {
            "ok" => Some(Self::Ok),
            "error" => Some(Self::Error),
            "hang" => Some(Self::Hang),
            _ => None,
        }
    }

    /// The name accepted by [`MetricsMode::parse`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Hang => "hang",
        }
    }
}

/// What the simulator did so far (`GET /sim/stats`). Real figures, never overridden.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimStats {
    /// The `x-vllm-sim-id` of this instance.
    pub id: String,
    /// The base model.
    pub model: String,
    /// Inference requests accepted (completions and chat; a batch of prompts counts once).
    pub requests_received: u64,
    /// Engine requests (one per prompt) that produced all their tokens.
    pub requests_served: u64,
    /// Engine requests running now.
    pub running: usize,
    /// Engine requests waiting now.
    pub waiting: usize,
    /// Referenced KV blocks over all blocks.
    pub kv_cache_usage: f64,
    /// Referenced KV blocks.
    pub used_blocks: usize,
    /// Blocks holding a cached prefix block.
    pub cached_blocks: usize,
    /// All KV blocks.
    pub num_blocks: usize,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_cache_queries: u64,
    /// Prompt tokens found there.
    pub prefix_cache_hits: u64,
    /// Preemptions.
    pub preemptions: u64,
    /// Output tokens produced.
    pub generation_tokens: u64,
    /// The current `/metrics` mode.
    pub metrics_mode: MetricsMode,
    /// `/metrics` calls being held by the `hang` mode right now.
    pub metrics_calls_hanging: usize,
    /// The overrides in force.
    pub overrides: Overrides,
}

pub(super) async fn put_overrides(State(sim): State<Arc<Simulator>>, body: Bytes) -> Response {
    let o: Overrides = match serde_json::from_slice(&body) {
        Ok(o) => o,
        Err(e) => return ApiError::bad_request(format!("bad overrides: {e}")).into_response(),
    };
    if let Some(kv) = o.kv_cache_usage
        && !(kv.is_finite() && kv >= 0.0)
    {
        return ApiError::bad_request("kv_cache_usage must be a finite number >= 0").into_response();
    }
    sim.set_overrides(o);
    json_response(StatusCode::OK, serde_json::to_string(&o).unwrap_or_default())
}

pub(super) async fn delete_overrides(State(sim): State<Arc<Simulator>>) -> StatusCode {
    sim.set_overrides(Overrides::default());
    StatusCode::NO_CONTENT
}

pub(super) async fn put_metrics_mode(State(sim): State<Arc<Simulator>>, body: Bytes) -> Response {
    let mode = std::str::from_utf8(&body).ok().and_then(MetricsMode::parse);
    match mode {
        Some(m) => {
            sim.set_metrics_mode(m);
            StatusCode::NO_CONTENT.into_response()
        }
        None => ApiError::bad_request("metrics mode must be one of: ok, error, hang").into_response(),
    }
}

pub(super) async fn get_metrics_mode(State(sim): State<Arc<Simulator>>) -> &'static str {
    sim.metrics_mode().as_str()
}

pub(super) async fn get_stats(State(sim): State<Arc<Simulator>>) -> Response {
    json_response(
        StatusCode::OK,
        serde_json::to_string(&sim.stats()).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!(MetricsMode::parse(" hang\n"), Some(MetricsMode::Hang));
        assert_eq!(MetricsMode::parse("\"error\""), Some(MetricsMode::Error));
        assert_eq!(MetricsMode::parse("OK"), None);
        for m in [MetricsMode::Ok, MetricsMode::Error, MetricsMode::Hang] {
            assert_eq!(MetricsMode::parse(m.as_str()), Some(m));
        }
    }

    #[test]
    fn overrides_are_strict_json() {
        let o: Overrides = serde_json::from_str(r#"{"waiting":3,"kv_cache_usage":0.5}"#).unwrap();
        assert_eq!(
            o,
            Overrides {
                waiting: Some(3),
                running: None,
                kv_cache_usage: Some(0.5)
            }
        );
        assert!(serde_json::from_str::<Overrides>(r#"{"queue":3}"#).is_err());
        assert!(serde_json::from_str::<Overrides>(r#"{"waiting":-1}"#).is_err());
    }
}
