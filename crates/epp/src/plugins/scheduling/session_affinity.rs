//! `session-affinity-scorer`: send a session's requests back to the endpoint that served it
//! (llm-d-router v0.10's `scorer/sessionaffinity`, both of its strategies).
//!
//! * `encoded_endpoint_header` (the default, stateless): the response carries the endpoint
//!   that served it in a header (`x-session-token`: base64 of `<namespace>/<pod>`), the client
//!   sends it back, and that endpoint scores 1 (the others 0). Nothing is kept here, so any
//!   replica, or the reference itself, reads the same token.
//! * `session_id`: the client sends an identifier of its own (`x-session-id` by default, or
//!   the first non-empty of the configured `sources`); this scorer binds it to the endpoint its
//!   first request went to, scores that endpoint 1 while it is a candidate, and writes nothing
//!   back. An unbound session scores 0 everywhere (the other scorers place it); a session
//!   whose endpoint is not among the candidates (gone, or filtered out) moves to wherever the
//!   request goes; one whose endpoint was a candidate but lost to other scorers stays bound. A
//!   binding unused for `evictionTtlSeconds` is dropped by a sweep every
//!   `evictionSweepSeconds` (so it lives up to TTL + sweep, as v0.10's).
//!
//! `profileName` pins the endpoint of that profile (a `prefill` profile, say) instead of the
//! primary one; a request that did not run the profile pins nothing.
//!
//! Parameters (unknown ones are refused): `strategy`, `encodedEndpointHeaderConfig {header}`,
//! `sessionIdConfig {sources [{header}], evictionTtlSeconds (300; 0 is the default, as v0.10),
//! evictionSweepSeconds (10; likewise), maxSessions (100,000)}`, `profileName`. Beyond v0.10,
//! on purpose:
//! * the configuration of the strategy not chosen is refused (v0.10 ignores it);
//! * a `profileName` that names no scheduling profile is refused (v0.10 then pins nothing);
//! * a token header that is not a valid header name, or one the protocol owns (pseudo-headers,
//!   `content-length`, the destination and drop-reason headers), is refused;
//! * durations under 1 ms are refused (a zero sweep period cannot tick);
//! * `attribute` sources (request attributes a v0.10 plugin publishes) are refused: no plugin
//!   here publishes them;
//! * `maxSessions` (ours) bounds the bindings, since clients choose the identifiers: a new
//!   session beyond it is not bound (its requests are placed by the other scorers) until
//!   sweeps make room. Identifiers are kept as 64-bit hashes seeded per process (a client cannot
//!   build an identifier that lands on another's binding), so their length costs nothing.
//!
//! The scorer acts only when a profile lists it: its other roles serve the scorer.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use dashmap::DashMap;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::framework::data::{CycleState, DataKey};
use crate::framework::plugin::Background;
use crate::framework::requestcontrol::{DataProducer, PreRequest, PreRequestContext};
use crate::framework::scheduling::{Candidate, SchedulingRequest, SchedulingResult, Scorer};

/// The header of the `encoded_endpoint_header` strategy by default.
pub const DEFAULT_TOKEN_HEADER: &str = "x-session-token";
/// The header a `session_id` strategy reads by default.
pub const DEFAULT_SESSION_ID_HEADER: &str = "x-session-id";
/// A token longer than this is not decoded (no endpoint name is that long).
const MAX_TOKEN_BYTES: usize = 1024;

/// Parameters as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionAffinityParams {
    /// `encoded_endpoint_header` or `session_id`.
    pub strategy: Option<String>,
    /// The stateless strategy's settings.
    pub encoded_endpoint_header_config: Option<EncodedHeaderConfig>,
    /// The stateful strategy's settings.
    pub session_id_config: Option<SessionIdConfig>,
    /// The profile whose endpoint is pinned (the primary one without it).
    pub profile_name: Option<String>,
}

/// `encodedEndpointHeaderConfig`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EncodedHeaderConfig {
    /// The request and response header carrying the token.
    pub header: Option<String>,
}

/// `sessionIdConfig`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionIdConfig {
    /// Where the identifier is read, first non-empty wins.
    pub sources: Option<Vec<SessionIdSource>>,
    /// Seconds a binding survives unused.
    pub eviction_ttl_seconds: Option<f64>,
    /// Seconds between sweeps of expired bindings.
    pub eviction_sweep_seconds: Option<f64>,
    /// Bindings kept at most (ours).
    pub max_sessions: Option<i64>,
}

/// One place the session identifier is read from.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionIdSource {
    /// A request header.
    pub header: Option<String>,
    /// A request attribute (refused: nothing here publishes one).
    pub attribute: Option<String>,
    /// The attribute's producer (refused with it).
    pub producer: Option<String>,
}

/// Why the parameters are unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SessionAffinityParamError {
    /// Unknown strategy.
    #[error("strategy must be \"encoded_endpoint_header\" or \"session_id\", got {0:?}")]
    Strategy(String),
    /// The other strategy's settings.
    #[error("{0} only acts with strategy: {1}")]
    OtherStrategy(&'static str, &'static str),
    /// A source without exactly a header.
    #[error(
        "sessionIdConfig.sources[{0}]: only header sources are supported (no plugin here publishes request attributes), and a source needs a header"
    )]
    Source(usize),
    /// A negative, non-finite, too small or too large duration.
    #[error("sessionIdConfig.{0} must be a number of seconds from 0.001 (0 is the default), got {1}")]
    Seconds(&'static str, f64),
    /// A header name that is invalid or that the protocol owns.
    #[error("encodedEndpointHeaderConfig.header {0:?} is not a header this plugin may set")]
    Header(String),
    /// A non-positive bound.
    #[error("sessionIdConfig.maxSessions must be > 0, got {0}")]
    MaxSessions(i64),
}

/// A header name as v0.10 normalises it: trimmed, lowercase, the default when empty.
fn header_name(name: Option<&str>, default: &str) -> String {
    match name.map(str::trim).filter(|n| !n.is_empty()) {
        Some(n) => n.to_ascii_lowercase(),
        None => default.to_owned(),
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct SessionAffinityScorer {
    namespace: Arc<str>,
    profile: Option<String>,
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    Encoded { header: String },
    SessionId(Arc<Bindings>, DataKey<SessionState>),
}

/// The `session_id` strategy's bindings.
#[derive(Debug)]
pub struct Bindings {
    headers: Vec<String>,
    ttl: Duration,
    sweep: Duration,
    max: usize,
    map: DashMap<u64, Binding>,
    /// Bindings held (the map's length without locking every shard).
    count: AtomicUsize,
    /// Seed of the identifiers' hashes.
    seed: u64,
}

#[derive(Debug, Clone)]
struct Binding {
    endpoint: Arc<str>,
    last_seen: Instant,
}

/// What the `session_id` strategy found for a request before the cycle: the session, its
/// endpoint, and whether the scorer saw that endpoint among its candidates.
#[derive(Debug)]
pub struct SessionState {
    id: u64,
    bound: Option<Arc<str>>,
    present: AtomicBool,
}

impl SessionAffinityScorer {
    /// A scorer named `name` for endpoints of `namespace` (the pool's).
    pub fn new(
        name: &str,
        namespace: &str,
        params: &SessionAffinityParams,
    ) -> Result<Self, SessionAffinityParamError> {
        let strategy = params.strategy.as_deref().unwrap_or("encoded_endpoint_header");
        let mode = match strategy {
            "encoded_endpoint_header" => {
                if params.session_id_config.is_some() {
                    return Err(SessionAffinityParamError::OtherStrategy(
                        "sessionIdConfig",
                        "session_id",
                    ));
                }
                let header = params
                    .encoded_endpoint_header_config
                    .as_ref()
                    .and_then(|c| c.header.as_deref());
                let header = header_name(header, DEFAULT_TOKEN_HEADER);
                if !crate::framework::requestcontrol::settable_response_header(&header) {
                    return Err(SessionAffinityParamError::Header(header));
                }
                Mode::Encoded { header }
            }
            "session_id" => {
                if params.encoded_endpoint_header_config.is_some() {
                    return Err(SessionAffinityParamError::OtherStrategy(
                        "encodedEndpointHeaderConfig",
                        "encoded_endpoint_header",
                    ));
                }
                let c = params.session_id_config.clone().unwrap_or_default();
                Mode::SessionId(Arc::new(Bindings::new(&c)?), DataKey::named(name))
            }
            other => return Err(SessionAffinityParamError::Strategy(other.to_owned())),
        };
        Ok(Self {
            namespace: namespace.into(),
            profile: params.profile_name.clone().filter(|p| !p.is_empty()),
            mode,
        })
    }

    /// The scheduling profile whose endpoint this instance pins, when not the primary one.
    pub fn profile(&self) -> Option<&str> {
        self.profile.as_deref()
    }

    /// The bindings to sweep, for the `session_id` strategy.
    pub fn bindings(&self) -> Option<Arc<Bindings>> {
        match &self.mode {
            Mode::SessionId(b, _) => Some(b.clone()),
            Mode::Encoded { .. } => None,
        }
    }

    /// Whether it computes per-request state before the cycle (the `session_id` strategy).
    pub fn produces_state(&self) -> bool {
        matches!(self.mode, Mode::SessionId(..))
    }

    /// The token decoded (`<namespace>/<pod>`), when it is one.
    fn decode(token: &[u8]) -> Option<String> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return None;
        }
        String::from_utf8(BASE64.decode(token).ok()?).ok()
    }

    /// The endpoint this instance pins for `result`.
    fn pinned<'r>(&self, result: &'r SchedulingResult) -> Option<&'r Arc<str>> {
        let targets = match &self.profile {
            Some(p) => result.targets_of(p)?,
            None => result.targets(),
        };
        targets.first().map(|t| &t.endpoint.name)
    }
}

impl Bindings {
    fn new(c: &SessionIdConfig) -> Result<Self, SessionAffinityParamError> {
        let headers = match &c.sources {
            None => vec![DEFAULT_SESSION_ID_HEADER.to_owned()],
            Some(s) if s.is_empty() => vec![DEFAULT_SESSION_ID_HEADER.to_owned()],
            Some(sources) => sources
                .iter()
                .enumerate()
                .map(|(i, s)| match (&s.header, &s.attribute, &s.producer) {
                    (Some(h), None, None) if !h.trim().is_empty() => Ok(header_name(Some(h), "")),
                    _ => Err(SessionAffinityParamError::Source(i)),
                })
                .collect::<Result<_, _>>()?,
        };
        // 0 (or unset) is the default, as v0.10's ApplyDefaults.
        let seconds = |v: Option<f64>, default: f64, name| {
            let v = v.filter(|v| *v != 0.0).unwrap_or(default);
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| *d >= Duration::from_millis(1))
                .ok_or(SessionAffinityParamError::Seconds(name, v))
        };
        let max = c.max_sessions.unwrap_or(100_000);
        if max <= 0 {
            return Err(SessionAffinityParamError::MaxSessions(max));
        }
        Ok(Self {
            headers,
            ttl: seconds(c.eviction_ttl_seconds, 300.0, "evictionTtlSeconds")?,
            sweep: seconds(c.eviction_sweep_seconds, 10.0, "evictionSweepSeconds")?,
            max: usize::try_from(max).unwrap_or(usize::MAX),
            map: DashMap::new(),
            count: AtomicUsize::new(0),
            seed: rand::random(),
        })
    }

    /// The hash of the request's session identifier, if it carries one.
    fn session(&self, req: &SchedulingRequest<'_>) -> Option<u64> {
        self.headers
            .iter()
            .filter_map(|h| req.headers.get(h))
            .map(str::trim)
            .find(|v| !v.is_empty())
            .map(|v| xxhash_rust::xxh3::xxh3_64_with_seed(v.as_bytes(), self.seed))
    }

    /// Sessions bound now.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether no session is bound.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the bindings unused for longer than the TTL. The scan takes each shard's read
    /// lock in turn; each removal one shard's write lock, briefly, so that requests binding
    /// sessions meanwhile wait for one entry at most.
    fn sweep_once(&self, now: Instant) {
        let expired = |b: &Binding| now.saturating_duration_since(b.last_seen) > self.ttl;
        let old: Vec<u64> = self
            .map
            .iter()
            .filter(|e| expired(e.value()))
            .map(|e| *e.key())
            .collect();
        for id in old {
            if self.map.remove_if(&id, |_, b| expired(b)).is_some() {
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Binds, refreshes or moves `session` after a decision for `picked`.
    fn record(&self, s: &SessionState, picked: &Arc<str>, now: Instant) {
        let fresh = || Binding {
            endpoint: picked.clone(),
            last_seen: now,
        };
        match self.map.get_mut(&s.id) {
            Some(mut b) if b.endpoint == *picked => b.last_seen = now,
            // Moved only when the bound endpoint was not a candidate, and only from the
            // endpoint this request saw bound (a concurrent request may have moved it).
            Some(mut b) => {
                if !s.present.load(Ordering::Relaxed) && Some(&b.endpoint) == s.bound.as_ref() {
                    *b = fresh();
                }
            }
            None => {
                if self.len() < self.max
                    && let dashmap::Entry::Vacant(v) = self.map.entry(s.id)
                {
                    v.insert(fresh());
                    self.count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

impl DataProducer for SessionAffinityScorer {
    fn prepare(&self, req: &SchedulingRequest<'_>, _candidates: &[Candidate<'_>], state: &mut CycleState) {
        let Mode::SessionId(b, key) = &self.mode else {
            return;
        };
        if let Some(id) = b.session(req) {
            let bound = b.map.get(&id).map(|e| e.endpoint.clone());
            state.put(
                *key,
                SessionState {
                    id,
                    bound,
                    present: AtomicBool::new(false),
                },
            );
        }
    }
}

impl Scorer for SessionAffinityScorer {
    fn score(
        &self,
        req: &SchedulingRequest<'_>,
        state: &CycleState,
        candidates: &[Candidate<'_>],
        scores: &mut [f64],
    ) {
        // The pinned endpoint scores 1; `scores` comes zeroed.
        let mut pin = |name: &str| {
            let mut found = false;
            for (s, c) in scores.iter_mut().zip(candidates) {
                if *c.endpoint.name == *name {
                    *s = 1.0;
                    found = true;
                }
            }
            found
        };
        match &self.mode {
            Mode::Encoded { header } => {
                let token = req
                    .headers
                    .get(header)
                    .and_then(|t| Self::decode(t.trim().as_bytes()));
                if let Some(name) = token
                    .as_deref()
                    .and_then(|t| t.strip_prefix(&*self.namespace)?.strip_prefix('/'))
                {
                    pin(name);
                }
            }
            Mode::SessionId(_, key) => {
                if let Some(st) = state.get(*key)
                    && let Some(bound) = &st.bound
                    && pin(bound)
                {
                    st.present.store(true, Ordering::Relaxed);
                }
            }
        }
    }
}

impl PreRequest for SessionAffinityScorer {
    fn pre_request(
        &self,
        _req: &SchedulingRequest<'_>,
        state: &CycleState,
        result: &SchedulingResult,
        ctx: &mut PreRequestContext,
    ) {
        let Some(picked) = self.pinned(result) else {
            return;
        };
        match &self.mode {
            Mode::Encoded { header } => {
                let token = BASE64.encode(format!("{}/{}", self.namespace, picked));
                ctx.set_response_header(header.clone(), token);
            }
            Mode::SessionId(b, key) => {
                if let Some(s) = state.get(*key) {
                    b.record(s, picked, Instant::now());
                }
            }
        }
    }
}

impl Background for Bindings {
    fn run(self: Arc<Self>, cancel: CancellationToken) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let mut tick = tokio::time::interval(self.sweep);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = tick.tick() => self.sweep_once(Instant::now()),
                }
            }
        })
    }
}

#[cfg(test)]
#[path = "session_affinity_tests.rs"]
mod tests;
