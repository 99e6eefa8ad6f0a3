//! The director: from a complete request to a routing decision, through the request-control
//! pipeline of [`crate::framework::requestcontrol`]: parse → candidates → admission →
//! dispatch → data producers → scheduling → pre-request.
//!
//! It is the one place where the data layer (snapshot), the request (parsed body, headers,
//! subset hint) and the scheduler meet. When nothing makes the request wait, the whole path is
//! one synchronous call with no I/O: one snapshot load, one parse, one cycle, the pre-request
//! hooks and the optional body rewrite. A dispatcher that answers [`Admit::Wait`] turns the
//! call into [`Routing::Wait`]; the protocol layer awaits it and calls
//! [`Director::route_dispatched`], which parses again (only waiting requests pay for that).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::datalayer::health::{EjectionPolicy, max_ejected};
use crate::datalayer::{Endpoint, EndpointState, EndpointStore, Snapshot};
use crate::framework::data::CycleState;
use crate::framework::plugin::{Named, PluginObserver};
use crate::framework::requestcontrol::{
    Admit, DataProducer, DispatchError, DispatchRequest, Dispatcher, HeldSet, PreRequest, PreRequestContext,
    SaturationDetector, Wait,
};
use crate::framework::scheduling::{
    Candidate, SchedulingError, SchedulingRequest, SchedulingResult, candidates,
};
use crate::request::{ParsedBody, RequestError, RequestHeaders, keys, parse_body, rewrite_model};
use crate::requestcontrol::objectives::PriorityLookup;
use crate::scheduling::Scheduler;

/// Default limit on request bodies: 64 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 << 20;
/// Default metrics age after which an endpoint is passed over (the reference's
/// `--metrics-staleness-threshold`).
pub const DEFAULT_STALENESS: Duration = Duration::from_secs(2);

/// Director settings.
#[derive(Debug, Clone)]
pub struct DirectorConfig {
    /// Bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
    /// Bytes of request bodies buffered across all streams at once
    /// (`--max-buffered-body-bytes`; see `protocol::budget`).
    pub body_budget_bytes: usize,
    /// At most this many endpoints in the destination list (1 for ORIGINAL_DST gateways,
    /// which reject lists); `None` returns what the picker chose.
    pub max_destinations: Option<usize>,
    /// Ignore the gateway's subset hint (the reference's `--disable-endpoint-subset-filter`).
    pub ignore_subset_hint: bool,
    /// Endpoints whose metrics are older than this (or never scraped) are passed over while
    /// any candidate has fresh metrics: a model server that stopped answering its metrics is
    /// avoided, yet a pool whose scrapes all fail still serves. `None` disables this.
    pub staleness: Option<Duration>,
    /// Endpoints answering this many 5xx in a row are passed over for a while, while any
    /// candidate is not ejected (see `datalayer::health`).
    pub ejection: EjectionPolicy,
}

impl Default for DirectorConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            body_budget_bytes: crate::protocol::budget::DEFAULT_BODY_BUDGET_BYTES,
            max_destinations: None,
            ignore_subset_hint: false,
            staleness: Some(DEFAULT_STALENESS),
            ejection: EjectionPolicy::default(),
        }
    }
}

/// The request-control plugins the director runs, as the configuration placed them.
#[derive(Clone)]
pub struct RequestControl {
    /// Admission's saturation detector.
    pub saturation: Named<dyn SaturationDetector>,
    /// Data producers, in configuration order.
    pub producers: Vec<Named<dyn DataProducer>>,
    /// Pre-request plugins, in configuration order.
    pub pre_request: Vec<Named<dyn PreRequest>>,
}

impl std::fmt::Debug for RequestControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestControl")
            .field("saturation", &self.saturation)
            .field("producers", &self.producers)
            .field("pre_request", &self.pre_request)
            .finish()
    }
}

/// The endpoints a gateway allows for this request (`envoy.lb.subset_hint`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Subset {
    /// No hint: every endpoint.
    #[default]
    All,
    /// Only endpoints these entries name.
    Only(Vec<SubsetEntry>),
}

/// One entry of the subset hint. The protocol's entries are `ip:port`; an entry with a port
/// names that endpoint only (two endpoints on one pod IP, multi-port and data-parallel pools,
/// stay apart), an entry without one (`10.0.0.5`, `[fd00::5]`, as older gateways send) names
/// every port of that IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubsetEntry {
    /// The IP.
    pub ip: IpAddr,
    /// The port, when the entry has one.
    pub port: Option<u16>,
}

impl SubsetEntry {
    /// Parses `ip:port`, `[v6]:port`, `[v6]` or a bare IP; `None` for anything else (a host
    /// name, say).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
            return Some(Self {
                ip: addr.ip(),
                port: Some(addr.port()),
            });
        }
        let ip = s.strip_prefix('[').and_then(|v| v.strip_suffix(']')).unwrap_or(s);
        ip.parse().ok().map(|ip| Self { ip, port: None })
    }

    fn allows(&self, address: SocketAddr) -> bool {
        self.ip == address.ip() && self.port.is_none_or(|p| p == address.port())
    }
}

impl Subset {
    fn allows(&self, address: SocketAddr) -> bool {
        match self {
            Self::All => true,
            Self::Only(entries) => entries.iter().any(|e| e.allows(address)),
        }
    }
}

/// Identity of one request, from its headers.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// All headers.
    pub headers: RequestHeaders,
    /// `x-request-id`, or a generated UUIDv4.
    pub request_id: String,
    /// Whether `request_id` was generated (then it is sent upstream too).
    pub generated_id: bool,
    /// When the request's headers arrived.
    pub received: Instant,
}

impl RequestInfo {
    /// Reads the request id, generating one when absent.
    pub fn from_headers(headers: RequestHeaders) -> Self {
        let (request_id, generated_id) = match headers
            .get_ignore_case(keys::REQUEST_ID)
            .filter(|v| !v.is_empty())
        {
            Some(id) => (id.to_owned(), false),
            None => (uuid::Uuid::new_v4().to_string(), true),
        };
        Self {
            headers,
            request_id,
            generated_id,
            received: Instant::now(),
        }
    }
}

/// A routing decision.
pub struct Decision {
    /// `ip:port[,ip:port...]`, best first: the header and metadata value.
    pub destinations: String,
    /// The primary endpoint.
    pub primary: Arc<Endpoint>,
    /// The scheduling cycle's result: every profile's chosen endpoints, by profile name, best
    /// first (`None` for bodyless requests, which are not scheduled).
    pub result: Option<SchedulingResult>,
    /// Request headers pre-request plugins add.
    pub headers: Vec<(String, String)>,
    /// Response headers pre-request plugins add (set when the response's headers pass).
    pub response_headers: Vec<(String, String)>,
    /// The body to forward when it had to change (model rewrite); `None` forwards it as is.
    pub body: Option<Vec<u8>>,
    /// The body's model (empty for bodyless requests).
    pub model: String,
    /// The model the request is served as.
    pub target_model: String,
    /// `stream: true` in the body.
    pub stream: bool,
    /// What plugins hold for the request's lifetime: keep it until the response completes or
    /// the stream ends (in-flight load is released when it drops).
    pub held: HeldSet,
}

impl std::fmt::Debug for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decision")
            .field("destinations", &self.destinations)
            .field("result", &self.result)
            .field("headers", &self.headers)
            .field("model", &self.model)
            .field("target_model", &self.target_model)
            .field("held", &self.held.len())
            .finish_non_exhaustive()
    }
}

/// What [`Director::route`] gives.
// Returned once per request and taken apart at once: boxing the decision would cost an
// allocation on every routed request to save a move of a few hundred bytes.
#[allow(clippy::large_enum_variant)]
pub enum Routing {
    /// Routed now.
    Ready(Decision),
    /// The dispatcher made the request wait: await this, then call
    /// [`Director::route_dispatched`]. Dropping it withdraws the request.
    Wait(Wait),
}

/// Why no decision was made. The protocol layer maps each to an HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectorError {
    /// The request is malformed or too large.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Discovery has not delivered the pool yet.
    #[error("the endpoint pool is not synced yet")]
    NotSynced,
    /// A bodyless request found an empty pool.
    #[error("no pods available in datastore")]
    NoEndpoints,
    /// No endpoint is left after the subset hint (or the pool is empty).
    #[error("failed to find candidate pods for serving the request")]
    NoCandidates,
    /// The scheduler chose nothing.
    #[error("failed to find target pod: {0}")]
    Scheduling(#[from] SchedulingError),
    /// A sheddable request (priority < 0) met a saturated pool.
    #[error("system saturated, sheddable request dropped")]
    Shed,
    /// The dispatcher refused the request or it waited too long.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
}

/// Joins endpoints into the destination list.
fn destination_list<'a>(endpoints: impl Iterator<Item = &'a Endpoint>) -> String {
    let mut out = String::new();
    for e in endpoints {
        if !out.is_empty() {
            out.push(',');
        }
        let _ = write!(out, "{}", e.hostport);
    }
    out
}

/// Routes requests. Shared by all streams; immutable.
pub struct Director {
    store: Arc<EndpointStore>,
    scheduler: Arc<Scheduler>,
    config: DirectorConfig,
    control: RequestControl,
    priorities: Arc<dyn PriorityLookup>,
    dispatcher: Option<Arc<dyn Dispatcher>>,
}

impl std::fmt::Debug for Director {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Director")
            .field("config", &self.config)
            .field("control", &self.control)
            .field("dispatcher", &self.dispatcher.is_some())
            .finish_non_exhaustive()
    }
}

impl Director {
    /// A director over `store` and `scheduler`, running `control`'s plugins, with priorities
    /// from `priorities`.
    pub fn new(
        store: Arc<EndpointStore>,
        scheduler: Arc<Scheduler>,
        config: DirectorConfig,
        control: RequestControl,
        priorities: Arc<dyn PriorityLookup>,
    ) -> Self {
        Self {
            store,
            scheduler,
            config,
            control,
            priorities,
            dispatcher: None,
        }
    }

    /// Lets `dispatcher` decide when admitted requests are scheduled.
    pub fn with_dispatcher(mut self, dispatcher: Arc<dyn Dispatcher>) -> Self {
        self.dispatcher = Some(dispatcher);
        self
    }

    /// Attaches plugin timers for the request-control plugins.
    pub fn with_observer(mut self, observer: &dyn PluginObserver) -> Self {
        for p in &mut self.control.producers {
            p.attach(observer, "PrepareData");
        }
        for p in &mut self.control.pre_request {
            p.attach(observer, "PreRequest");
        }
        self.control.saturation.attach(observer, "AdmitRequest");
        self
    }

    /// The settings.
    pub fn config(&self) -> &DirectorConfig {
        &self.config
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.scheduler
    }

    /// The endpoint store.
    pub fn store(&self) -> &Arc<EndpointStore> {
        &self.store
    }

    /// The endpoints a request may go to, numbered as the cycle's candidates: those the
    /// subset hint allows; of those the ones not ejected for failures, if there are any; and of
    /// those the ones with fresh metrics, if there are any.
    fn allowed<'s>(
        &self,
        endpoints: &'s [EndpointState],
        subset: &Subset,
        now: Instant,
    ) -> Vec<Candidate<'s>> {
        let mut allowed: Vec<Candidate<'s>> = Vec::with_capacity(endpoints.len());
        match subset {
            // Without a hint no endpoint's identity needs reading.
            Subset::Only(_) if !self.config.ignore_subset_hint => {
                for state in endpoints {
                    if subset.allows(state.endpoint.address) {
                        let index = allowed.len();
                        allowed.push(Candidate { state, index });
                    }
                }
            }
            _ => allowed.extend(
                endpoints
                    .iter()
                    .enumerate()
                    .map(|(index, state)| Candidate { state, index }),
            ),
        }
        // Ejected first: an endpoint known to fail requests is worse than one whose load is
        // unknown.
        if self.config.ejection.consecutive_failures > 0 {
            keep_if_any(&mut allowed, |c| !c.state.health().is_ejected(now));
        }
        if let Some(staleness) = self.config.staleness {
            keep_if_any(&mut allowed, |c| c.metrics().is_fresh(now, staleness));
        }
        allowed
    }

    /// Records the outcome of a response from `address` (the endpoint that served it) for
    /// passive health: a 5xx status counts against it, anything else for it.
    pub fn record_outcome(&self, address: SocketAddr, status: u16) {
        let snapshot = self.store.load();
        let Some(state) = snapshot.find(address) else {
            return;
        };
        if status >= 500 {
            let now = Instant::now();
            let ejected = snapshot
                .endpoints()
                .iter()
                .filter(|e| e.health().is_ejected(now))
                .count();
            let may_eject = ejected < max_ejected(snapshot.endpoints().len());
            if state.health().failure(&self.config.ejection, now, may_eject) {
                tracing::warn!(
                    endpoint = %address,
                    consecutive = self.config.ejection.consecutive_failures,
                    "endpoint answered server errors in a row; passed over for a while"
                );
            }
        } else {
            state.health().success();
        }
    }

    fn synced_snapshot(&self) -> Result<Arc<Snapshot>, DirectorError> {
        let snapshot = self.store.load();
        if !snapshot.is_synced() {
            return Err(DirectorError::NotSynced);
        }
        Ok(snapshot)
    }

    /// A request without a body (e.g. GET): a random endpoint within the subset.
    pub fn route_without_body(&self, subset: &Subset) -> Result<Decision, DirectorError> {
        let snapshot = self.synced_snapshot()?;
        if snapshot.endpoints().is_empty() {
            return Err(DirectorError::NoEndpoints);
        }
        let allowed = self.allowed(snapshot.endpoints(), subset, Instant::now());
        let chosen = self
            .scheduler
            .random_endpoint(&allowed)
            .ok_or(DirectorError::NoCandidates)?
            .state;
        Ok(Decision {
            destinations: chosen.endpoint.hostport.to_string(),
            primary: chosen.endpoint.clone(),
            result: None,
            headers: Vec::new(),
            response_headers: Vec::new(),
            body: None,
            model: String::new(),
            target_model: String::new(),
            stream: false,
            held: HeldSet::default(),
        })
    }

    /// The request's priority from its objective header (0 without or with an unknown one).
    pub fn priority(&self, headers: &RequestHeaders) -> i32 {
        headers
            .control(keys::OBJECTIVE)
            .and_then(|o| self.priorities.priority(o))
            .unwrap_or(0)
    }

    /// A complete request body: parse, admit, dispatch, schedule, run the pre-request hooks,
    /// rewrite if needed.
    pub fn route(&self, info: &RequestInfo, body: &[u8], subset: &Subset) -> Result<Routing, DirectorError> {
        let parsed = parse_body(body, info.headers.path())?;
        let snapshot = self.synced_snapshot()?;
        let now = Instant::now();
        let cands = self.allowed(snapshot.endpoints(), subset, now);
        // With flow control an empty pool is a waiting room (v0.10): requests queue until
        // endpoints appear or their TTL passes.
        if cands.is_empty() && (self.dispatcher.is_none() || !snapshot.endpoints().is_empty()) {
            return Err(DirectorError::NoCandidates);
        }
        let priority = self.priority(&info.headers);
        // Flow control replaces shedding (v0.10 uses one admission controller or the other).
        if self.dispatcher.is_none()
            && priority < 0
            && self.control.saturation.timed(|d| d.saturation(&cands, now)) >= 1.0
        {
            return Err(DirectorError::Shed);
        }
        let mut waits: Vec<Wait> = Vec::new();
        if !self.control.producers.is_empty() {
            let req = scheduling_request(info, body, &parsed, priority, now);
            waits.extend(
                self.control
                    .producers
                    .iter()
                    .filter_map(|p| p.plugin.prefetch(&req)),
            );
        }
        let mut admitted_now: Option<&Arc<dyn Dispatcher>> = None;
        if let Some(dispatcher) = &self.dispatcher {
            let pool = candidates(snapshot.endpoints());
            let req = DispatchRequest {
                request_id: &info.request_id,
                priority,
                fairness_id: info
                    .headers
                    .control(keys::FAIRNESS_ID)
                    .unwrap_or(keys::DEFAULT_FAIRNESS_ID),
                bytes: body.len(),
                model: &parsed.model,
                target_model: info.headers.control(keys::MODEL_REWRITE).unwrap_or(&parsed.model),
                received: info.received,
                slo_ttft: info
                    .headers
                    .control(keys::SLO_TTFT_MS)
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_millis),
                pool: &pool,
            };
            match dispatcher.dispatch(&req) {
                Admit::Wait(wait) => waits.push(wait),
                Admit::Now => admitted_now = Some(dispatcher),
            }
        }
        if !waits.is_empty()
            && let Some(d) = admitted_now.take()
        {
            d.scheduled();
        }
        match waits.len() {
            0 => {
                let decision = self.schedule(info, body, &parsed, &cands, priority, now);
                if let Some(d) = admitted_now {
                    d.scheduled();
                }
                decision.map(Routing::Ready)
            }
            1 => Ok(Routing::Wait(waits.remove(0))),
            _ => Ok(Routing::Wait(Box::pin(async move {
                for w in waits {
                    w.await?;
                }
                Ok(())
            }))),
        }
    }

    /// A request the dispatcher let through after waiting: parse again and schedule on the
    /// current snapshot (admission has been done).
    pub fn route_dispatched(
        &self,
        info: &RequestInfo,
        body: &[u8],
        subset: &Subset,
    ) -> Result<Decision, DirectorError> {
        let parsed = parse_body(body, info.headers.path())?;
        let snapshot = self.synced_snapshot()?;
        let now = Instant::now();
        let allowed = self.allowed(snapshot.endpoints(), subset, now);
        if allowed.is_empty() {
            return Err(DirectorError::NoCandidates);
        }
        let priority = self.priority(&info.headers);
        self.schedule(info, body, &parsed, &allowed, priority, now)
    }

    fn schedule(
        &self,
        info: &RequestInfo,
        body: &[u8],
        parsed: &ParsedBody<'_>,
        cands: &[Candidate<'_>],
        priority: i32,
        now: Instant,
    ) -> Result<Decision, DirectorError> {
        let req = scheduling_request(info, body, parsed, priority, now);
        let target_model = req.target_model;
        let mut state = CycleState::default();
        for p in &self.control.producers {
            p.timed(|p| p.prepare(&req, cands, &mut state));
        }
        let result = self.scheduler.schedule(&req, &state, cands)?;
        let limit = self.config.max_destinations.unwrap_or(usize::MAX).max(1);
        let targets = result.targets();
        let Some(primary) = targets.first() else {
            return Err(DirectorError::Scheduling(SchedulingError::Handler(
                "the primary profile chose no endpoint".into(),
            )));
        };
        let destinations = destination_list(targets.iter().take(limit).map(|t| &*t.endpoint));
        let primary = primary.endpoint.clone();
        let mut ctx = PreRequestContext::default();
        for p in &self.control.pre_request {
            p.timed(|p| p.pre_request(&req, &state, &result, &mut ctx));
        }
        let (headers, response_headers, held) = ctx.into_parts();
        let body = (target_model != parsed.model)
            .then(|| rewrite_model(body, parsed.model_span.clone(), target_model));
        Ok(Decision {
            destinations,
            primary,
            result: Some(result),
            headers,
            response_headers,
            body,
            model: parsed.model.to_string(),
            target_model: target_model.to_owned(),
            stream: parsed.stream,
            held,
        })
    }
}

/// What the scheduler and the producers know of a parsed request.
fn scheduling_request<'a>(
    info: &'a RequestInfo,
    body: &'a [u8],
    parsed: &'a ParsedBody<'a>,
    priority: i32,
    now: Instant,
) -> SchedulingRequest<'a> {
    SchedulingRequest {
        request_id: &info.request_id,
        model: &parsed.model,
        target_model: info.headers.control(keys::MODEL_REWRITE).unwrap_or(&parsed.model),
        prefix_input: &parsed.prefix_input,
        cache_salt: parsed.cache_salt.as_deref(),
        body,
        api: parsed.api,
        headers: &info.headers,
        priority,
        max_output_tokens: parsed.max_output_tokens,
        now,
    }
}

/// Keeps the candidates `keep` accepts when it accepts some but not all, renumbering them; a
/// filter that would leave none is not applied (a pool that is all stale or all ejected still
/// serves).
fn keep_if_any(allowed: &mut Vec<Candidate<'_>>, keep: impl Fn(&Candidate<'_>) -> bool) {
    let kept = allowed.iter().filter(|c| keep(c)).count();
    if kept > 0 && kept < allowed.len() {
        allowed.retain(|c| keep(c));
        for (index, c) in allowed.iter_mut().enumerate() {
            c.index = index;
        }
    }
}
