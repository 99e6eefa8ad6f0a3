//! The director: from a complete request to a routing decision.
//!
//! It is the one place where the data layer (snapshot), the request (parsed body, headers,
//! subset hint) and the scheduler meet. It is synchronous and does no I/O: one snapshot
//! load, one parse, one scheduling cycle, the pre-request hooks, and the optional body
//! rewrite.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{RequestError, RequestHeaders, keys, parse_body, rewrite_model};
use crate::admission::Admission;
use crate::datalayer::{Endpoint, EndpointState, EndpointStore};
use crate::scheduling::{Scheduler, SchedulingError, SchedulingRequest};

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
    /// At most this many endpoints in the destination list (1 for ORIGINAL_DST gateways,
    /// which reject lists); `None` returns what the picker chose.
    pub max_destinations: Option<usize>,
    /// Ignore the gateway's subset hint (the reference's `--disable-endpoint-subset-filter`).
    pub ignore_subset_hint: bool,
    /// Endpoints whose metrics are older than this (or never scraped) are passed over while
    /// any candidate has fresh metrics: a model server that stopped answering its metrics is
    /// avoided, yet a pool whose scrapes all fail still serves. `None` disables this.
    pub staleness: Option<Duration>,
}

impl Default for DirectorConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_destinations: None,
            ignore_subset_hint: false,
            staleness: Some(DEFAULT_STALENESS),
        }
    }
}

/// The endpoints a gateway allows for this request (`envoy.lb.subset_hint`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Subset {
    /// No hint: every endpoint.
    #[default]
    All,
    /// Only endpoints with these IPs (ports are ignored, as in the reference).
    Only(Vec<IpAddr>),
}

impl Subset {
    fn allows(&self, ip: IpAddr) -> bool {
        match self {
            Self::All => true,
            Self::Only(ips) => ips.contains(&ip),
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
        }
    }
}

/// A routing decision.
#[derive(Debug)]
pub struct Decision {
    /// `ip:port[,ip:port...]`, best first: the header and metadata value.
    pub destinations: String,
    /// The primary endpoint.
    pub primary: Arc<Endpoint>,
    /// The body to forward when it had to change (model rewrite); `None` forwards it as is.
    pub body: Option<Vec<u8>>,
    /// The body's model (empty for bodyless requests).
    pub model: String,
    /// The model the request is served as.
    pub target_model: String,
    /// `stream: true` in the body.
    pub stream: bool,
    /// The request's share of the primary endpoint's load until the request ends; hold it for
    /// the request's life (body requests only).
    pub in_flight: Option<crate::datalayer::InFlight>,
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
#[derive(Debug)]
pub struct Director {
    store: Arc<EndpointStore>,
    scheduler: Arc<Scheduler>,
    config: DirectorConfig,
    admission: Option<Admission>,
}

impl Director {
    /// A director over `store` and `scheduler`.
    pub fn new(store: Arc<EndpointStore>, scheduler: Arc<Scheduler>, config: DirectorConfig) -> Self {
        Self {
            store,
            scheduler,
            config,
            admission: None,
        }
    }

    /// Sheds sheddable requests when the pool is saturated.
    pub fn with_admission(mut self, admission: Admission) -> Self {
        self.admission = Some(admission);
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

    /// The endpoints a request may go to: those the subset hint allows, and of those the ones
    /// with fresh metrics if there are any.
    fn candidates<'s>(&self, endpoints: &'s [EndpointState], subset: &Subset) -> Vec<&'s EndpointState> {
        let allowed: Vec<&'s EndpointState> = if self.config.ignore_subset_hint {
            endpoints.iter().collect()
        } else {
            endpoints
                .iter()
                .filter(|e| subset.allows(e.endpoint.address.ip()))
                .collect()
        };
        let Some(staleness) = self.config.staleness else {
            return allowed;
        };
        let now = Instant::now();
        if allowed.iter().all(|e| e.metrics.is_fresh(now, staleness)) {
            return allowed;
        }
        let fresh: Vec<&'s EndpointState> = allowed
            .iter()
            .copied()
            .filter(|e| e.metrics.is_fresh(now, staleness))
            .collect();
        if fresh.is_empty() { allowed } else { fresh }
    }

    /// A request without a body (e.g. GET): a random endpoint within the subset.
    pub fn route_without_body(&self, subset: &Subset) -> Result<Decision, DirectorError> {
        let snapshot = self.store.load();
        if !snapshot.is_synced() {
            return Err(DirectorError::NotSynced);
        }
        if snapshot.endpoints().is_empty() {
            return Err(DirectorError::NoEndpoints);
        }
        let candidates = self.candidates(snapshot.endpoints(), subset);
        let chosen = self
            .scheduler
            .random_endpoint(&candidates)
            .ok_or(DirectorError::NoCandidates)?;
        Ok(Decision {
            destinations: chosen.endpoint.hostport.to_string(),
            primary: chosen.endpoint.clone(),
            body: None,
            model: String::new(),
            target_model: String::new(),
            stream: false,
            in_flight: None,
        })
    }

    /// A complete request body: parse, schedule, run pre-request hooks, rewrite if needed.
    pub fn route(&self, info: &RequestInfo, body: &[u8], subset: &Subset) -> Result<Decision, DirectorError> {
        let parsed = parse_body(body, info.headers.path())?;
        let target_model = info.headers.control(keys::MODEL_REWRITE).unwrap_or(&parsed.model);

        let snapshot = self.store.load();
        if !snapshot.is_synced() {
            return Err(DirectorError::NotSynced);
        }
        let candidates = self.candidates(snapshot.endpoints(), subset);
        if candidates.is_empty() {
            return Err(DirectorError::NoCandidates);
        }
        if let Some(admission) = &self.admission {
            admission
                .admit(info.headers.control(keys::OBJECTIVE), &candidates)
                .map_err(|_| DirectorError::Shed)?;
        }

        let req = SchedulingRequest::new(
            &info.request_id,
            target_model,
            &parsed.prefix_input,
            parsed.cache_salt.as_deref(),
            &info.headers,
        );
        let result = self.scheduler.schedule(&req, &candidates)?;
        let limit = self.config.max_destinations.unwrap_or(usize::MAX).max(1);
        let targets = result.targets();
        let Some(primary) = targets.first() else {
            return Err(DirectorError::Scheduling(SchedulingError::Handler(
                "the primary profile chose no endpoint".into(),
            )));
        };
        let destinations = destination_list(targets.iter().take(limit).map(|t| &*t.endpoint));
        self.scheduler.pre_request(&req, &result);
        // Until the next scrape shows it, the KV scorer counts this request itself: its prompt
        // less what the primary already held (as the prefix plugin just found).
        let cached_bytes = req
            .cache
            .prefix_hit
            .get()
            .map_or(0, |hit| hit.matched_blocks.saturating_mul(hit.block_bytes));
        let uncached = parsed.prefix_input.len().saturating_sub(cached_bytes);
        let in_flight = primary
            .dispatch
            .start(crate::datalayer::estimate_tokens(uncached));
        let primary = primary.endpoint.clone();

        let body = (target_model != parsed.model)
            .then(|| rewrite_model(body, parsed.model_span.clone(), target_model));
        Ok(Decision {
            destinations,
            primary,
            body,
            model: parsed.model.to_string(),
            target_model: target_model.to_owned(),
            stream: parsed.stream,
            in_flight: Some(in_flight),
        })
    }
}
