//! Request-control extension points: what runs around a scheduling cycle (the reference's
//! `framework/interface/requestcontrol` and `flowcontrol`).
//!
//! The director runs them in this order for every request with a body:
//! 1. admission: a [`SaturationDetector`] says how full the candidates are; a sheddable
//!    request (priority < 0) meets a saturated pool with 429;
//! 2. dispatch: a [`Dispatcher`] may make the request wait ([`Admit::Wait`]), which is where
//!    flow control queues go; without one, or when it answers [`Admit::Now`], the request
//!    goes on in the same synchronous call;
//! 3. [`DataProducer`]s compute per-request data into the cycle state;
//! 4. the scheduling cycle;
//! 5. [`PreRequest`] plugins see the decision, may add request headers, and may hold
//!    something for the request's lifetime (released when its response completes or its
//!    stream ends).
//!
//! [`EndpointsChanged`] plugins hear about endpoint-set changes off the request path.

use std::future::Future;
use std::pin::Pin;

use tokio::time::Instant;

use super::data::CycleState;
use super::scheduling::{Candidate, SchedulingRequest, SchedulingResult};
use crate::datalayer::EndpointState;

/// Computes data for one request before it is scheduled (the reference's `PrepareData`).
pub trait DataProducer: Send + Sync {
    /// Work too slow for the request path, done before the request is scheduled: a future
    /// that does it elsewhere (a blocking thread, an HTTP call), after which `prepare` finds
    /// it done. The request waits for it as it waits for dispatch, and then goes through the
    /// director again. `None` (the default) when `prepare` is cheap for this request. The
    /// future resolves `Ok` even when the work failed: `prepare` then finds nothing.
    fn prefetch(&self, _req: &SchedulingRequest<'_>) -> Option<Wait> {
        None
    }

    /// Writes what the producer found for `candidates` into `state`.
    fn prepare(&self, req: &SchedulingRequest<'_>, candidates: &[Candidate<'_>], state: &mut CycleState);
}

/// Something a pre-request plugin keeps for a request: dropped when the response completes
/// or the stream ends, told when the response starts.
pub trait Hold: Send {
    /// The response's first body chunk arrived: the server has read the prompt and is
    /// generating. Called at most once; nothing by default.
    fn response_started(&mut self) {}
}

/// Something kept for a request's lifetime.
pub type Held = Box<dyn Hold>;

/// Request headers to add, as `(name, value)`.
pub type AddedHeaders = Vec<(String, String)>;

/// Whether a plugin may set the response header `name` (lowercase): a valid header name that
/// is not a pseudo-header, a framing header (`content-length`, `transfer-encoding`) or one the
/// protocol owns (the destination, the drop reason; see `request::keys::is_system_owned`).
/// Plugins check configured names with it at start-up.
pub fn settable_response_header(name: &str) -> bool {
    http::HeaderName::from_bytes(name.as_bytes()).is_ok()
        && name.bytes().all(|b| !b.is_ascii_uppercase())
        && name != "transfer-encoding"
        && !crate::request::keys::is_system_owned(name)
}

/// What pre-request plugins hand back to the director.
#[derive(Default)]
pub struct PreRequestContext {
    headers: AddedHeaders,
    response_headers: AddedHeaders,
    held: HeldSet,
}

/// What a request holds for its lifetime: the first item inline (the in-flight load guard,
/// usually the only one), the rest in a list.
#[derive(Default)]
pub struct HeldSet {
    first: Option<Held>,
    rest: Vec<Held>,
}

impl HeldSet {
    fn push(&mut self, h: Held) {
        if self.first.is_none() {
            self.first = Some(h);
        } else {
            self.rest.push(h);
        }
    }

    /// How many items are held.
    pub fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tells everything held that the response started.
    pub fn response_started(&mut self) {
        for h in self.first.iter_mut().chain(self.rest.iter_mut()) {
            h.response_started();
        }
    }

    /// Drops everything held.
    pub fn clear(&mut self) {
        self.first = None;
        self.rest.clear();
    }
}

impl std::fmt::Debug for PreRequestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreRequestContext")
            .field("headers", &self.headers)
            .field("response_headers", &self.response_headers)
            .field("held", &self.held.len())
            .finish()
    }
}

impl PreRequestContext {
    /// Adds a header to the request sent upstream. Header names the protocol owns (the
    /// destination, its subset and served keys, `content-length`) are refused and logged: a
    /// plugin cannot redirect a request behind the scheduler's back.
    pub fn set_header(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into().to_ascii_lowercase();
        if crate::request::keys::is_system_owned(&name) {
            tracing::warn!(header = %name, "a pre-request plugin tried to set a system-owned header; ignored");
            return;
        }
        self.headers.push((name, value.into()));
    }

    /// Adds a header to the response sent back to the client (a session token, say), at the
    /// response's headers. Names [`settable_response_header`] refuses, and values that are
    /// not valid header values, are dropped and logged.
    pub fn set_response_header(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into().to_ascii_lowercase();
        let value = value.into();
        if !settable_response_header(&name) || http::HeaderValue::from_str(&value).is_err() {
            tracing::warn!(header = %name, "a pre-request plugin tried to set a response header it may not set, or an invalid value; ignored");
            return;
        }
        self.response_headers.push((name, value));
    }

    /// The response headers added, in order.
    pub fn response_headers(&self) -> &[(String, String)] {
        &self.response_headers
    }

    /// Keeps `guard` until the request's response completes or its stream ends, whichever
    /// comes first, then drops it; tells it when the response starts. In-flight accounting
    /// releases its share this way.
    pub fn hold(&mut self, guard: impl Hold + 'static) {
        self.held.push(Box::new(guard));
    }

    /// How many guards are held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The added headers, in order.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// Splits into request headers, response headers and held guards.
    pub fn into_parts(self) -> (AddedHeaders, AddedHeaders, HeldSet) {
        (self.headers, self.response_headers, self.held)
    }
}

/// Runs after the decision, before the request is forwarded.
pub trait PreRequest: Send + Sync {
    /// Observes the decision; may add headers and hold guards through `ctx`.
    fn pre_request(
        &self,
        req: &SchedulingRequest<'_>,
        state: &CycleState,
        result: &SchedulingResult,
        ctx: &mut PreRequestContext,
    );
}

/// How full a set of endpoints is (the reference's `SaturationDetector`): 0 is idle, 1.0 or
/// more means saturated. Pure: it reads only the candidates' attributes.
pub trait SaturationDetector: Send + Sync {
    /// The saturation of `candidates` at `now`; no candidates is 1.0.
    fn saturation(&self, candidates: &[Candidate<'_>], now: Instant) -> f64;

    /// The saturation once `unseen` is counted: requests flow control let through that the
    /// candidates' figures may not show yet, as if spread evenly over them. Flow control asks
    /// this between dispatches, so that one fresh scrape does not release the whole queue onto
    /// the pool. The default ignores `unseen`.
    fn saturation_with(&self, candidates: &[Candidate<'_>], now: Instant, unseen: &Unseen<'_>) -> f64 {
        let _ = unseen;
        self.saturation(candidates, now)
    }
}

/// Requests flow control dispatched that a saturation detector may not see yet.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unseen<'a> {
    /// Dispatched and not yet scheduled: no in-flight count is booked for them.
    pub unscheduled: usize,
    /// When the recent dispatches happened, oldest first: an endpoint's scraped figures do
    /// not show the requests dispatched after its scrape.
    pub dispatched_at: &'a [Instant],
}

impl Unseen<'_> {
    /// How many recent dispatches happened after `t` (all of them when `t` is `None`).
    pub fn since(&self, t: Option<Instant>) -> usize {
        match t {
            None => self.dispatched_at.len(),
            Some(t) => self.dispatched_at.len() - self.dispatched_at.partition_point(|d| *d <= t),
        }
    }
}

/// Told when the set of endpoints changes (off the request path), to drop per-endpoint state.
pub trait EndpointsChanged: Send + Sync {
    /// The new set.
    fn endpoints_changed(&self, endpoints: &[EndpointState]);
}

/// What the dispatch step knows of a request.
#[derive(Debug, Clone)]
pub struct DispatchRequest<'a> {
    /// Request id.
    pub request_id: &'a str,
    /// Priority (0 without an objective).
    pub priority: i32,
    /// Fairness id from the request headers (`default-flow` without one).
    pub fairness_id: &'a str,
    /// Body bytes.
    pub bytes: usize,
    /// The model the client asked for.
    pub model: &'a str,
    /// The model after any rewrite header.
    pub target_model: &'a str,
    /// When the EPP received the request.
    pub received: Instant,
    /// The TTFT objective from `x-llm-d-slo-ttft-ms` (alias `x-slo-ttft-ms`), in whole
    /// milliseconds; `None` when absent or not a non-negative integer.
    pub slo_ttft: Option<std::time::Duration>,
    /// The whole pool in the director's snapshot (not narrowed by a subset hint), for the
    /// saturation check.
    pub pool: &'a [Candidate<'a>],
}

/// Why a waiting request was not dispatched: llm-d-router v0.10's flow-control outcomes
/// (`requestcontrol/admission.go`), each with its status and `x-llm-d-request-dropped-reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    /// The queue is full (429 `rejected-saturated`).
    #[error("request rejected pre-queue: queue at capacity")]
    Saturated,
    /// The queue is full, or the request waited its TTL, while the pool has no endpoints
    /// (503 `rejected-no-endpoints`).
    #[error("no endpoints available")]
    NoEndpoints,
    /// The request waited its TTL (429 `rejected-ttl-expired`).
    #[error("request timed out in queue: request evicted from queue: request TTL expired")]
    Expired,
    /// The band was full and a smaller tenant's request took this one's place (429
    /// `evicted-queue-pressure`; a reason v0.10 defines, used here by round-robin fairness).
    #[error("request evicted from queue: queue at capacity and its tenant held the largest share")]
    PushedOut,
    /// The client went away while the request waited (503 `rejected-context-cancelled`; the
    /// gateway has gone, so nobody reads it).
    #[error("client disconnected: request evicted from queue: request context cancelled")]
    Cancelled,
    /// The EPP is shutting down (503 `rejected-shutting-down`).
    #[error("flow controller shutting down: request evicted from queue: flow controller is not running")]
    Shutdown,
    /// Any other refusal by a dispatcher (429, no reason header).
    #[error("{0}")]
    Rejected(String),
}

impl DispatchError {
    /// The `x-llm-d-request-dropped-reason` value, where the reference sets one.
    pub fn dropped_reason(&self) -> Option<&'static str> {
        Some(match self {
            Self::Saturated => "rejected-saturated",
            Self::NoEndpoints => "rejected-no-endpoints",
            Self::Expired => "rejected-ttl-expired",
            Self::PushedOut => "evicted-queue-pressure",
            Self::Cancelled => "rejected-context-cancelled",
            Self::Shutdown => "rejected-shutting-down",
            Self::Rejected(_) => return None,
        })
    }
}

/// A request's wait for dispatch; dropping it withdraws the request (the client went away).
pub type Wait = Pin<Box<dyn Future<Output = Result<(), DispatchError>> + Send>>;

/// The dispatch decision for one request.
pub enum Admit {
    /// Go on at once, in the same call (the fast path: no task, no allocation).
    Now,
    /// Wait until the future resolves, then schedule.
    Wait(Wait),
}

impl std::fmt::Debug for Admit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Now => "Now",
            Self::Wait(_) => "Wait",
        })
    }
}

/// Decides when an admitted request may be scheduled: the seam where flow control queues
/// requests by priority and fairness.
pub trait Dispatcher: Send + Sync {
    /// Admits `req` now or makes it wait.
    fn dispatch(&self, req: &DispatchRequest<'_>) -> Admit;

    /// The director is done with a request this dispatcher admitted with [`Admit::Now`]: it
    /// has been scheduled (its endpoint's load counts it now), or failed to be, or went on to
    /// wait for a data producer. Called exactly once per `Admit::Now`, on the same call path;
    /// nothing by default.
    fn scheduled(&self) {}
}
