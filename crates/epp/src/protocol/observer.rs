//! A per-request report for metrics and logs, handed out by the protocol layer.

use std::sync::Arc;

use tokio::time::Instant;

use super::usage::Usage;
use crate::datalayer::Endpoint;

/// What one request did. Built up while its stream runs.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// `x-request-id` or the generated id (empty until request headers arrive).
    pub request_id: String,
    /// Model named in the body.
    pub model: String,
    /// Model served (after rewrite).
    pub target_model: String,
    /// The objective header (`x-llm-d-inference-objective`, or its alias `x-gateway-inference-objective`).
    pub objective: Option<String>,
    /// Destination list sent to the gateway.
    pub destinations: Option<String>,
    /// The primary endpoint chosen.
    pub primary: Option<Arc<Endpoint>>,
    /// Endpoint the gateway reports as having served the request.
    pub served: Option<String>,
    /// Request body bytes forwarded.
    pub request_bytes: usize,
    /// Response body bytes seen.
    pub response_bytes: usize,
    /// Whether the gateway sends this EPP the response body (its response body mode is not
    /// `NONE`); without it `response_bytes` and `usage` say nothing about the response.
    pub response_body_sent: bool,
    /// Token usage from the response.
    pub usage: Option<Usage>,
    /// Local reply sent instead of routing: status and reference code.
    pub error: Option<(u16, &'static str)>,
    /// Whether the error (if any) came from scheduling: no candidates, a scheduling error or
    /// shedding, not a bad request, the body budget or a dispatch outcome.
    pub scheduling_failed: bool,
    /// The response's `:status`, once response headers arrived.
    pub response_status: Option<u16>,
    /// Whether the response was an SSE stream.
    pub streaming: bool,
    /// Whether the response reached its end.
    pub response_complete: bool,
    /// When the stream started.
    pub started: Instant,
}

impl RequestRecord {
    /// An empty record starting now.
    pub fn new() -> Self {
        Self {
            request_id: String::new(),
            model: String::new(),
            target_model: String::new(),
            objective: None,
            destinations: None,
            primary: None,
            served: None,
            request_bytes: 0,
            response_bytes: 0,
            response_body_sent: false,
            usage: None,
            error: None,
            scheduling_failed: false,
            response_status: None,
            streaming: false,
            response_complete: false,
            started: Instant::now(),
        }
    }
}

impl Default for RequestRecord {
    fn default() -> Self {
        Self::new()
    }
}

/// Receives request reports. Calls are made on the request path: keep them cheap.
pub trait RequestObserver: Send + Sync {
    /// A routing decision was sent.
    fn routed(&self, _record: &RequestRecord) {}
    /// The stream ended (normally, by error, or because the gateway went away).
    fn finished(&self, _record: &RequestRecord) {}
}

/// An observer that ignores everything.
#[derive(Debug, Default)]
pub struct NoopObserver;

impl RequestObserver for NoopObserver {}
