//! The per-stream state machine: one ext_proc stream carries one HTTP request and response.
//!
//! It is synchronous: [`ExtProcStream::handle`] takes one message from Envoy and appends the
//! answers to send, in order. Ordering rules it keeps (Envoy rejects anything else):
//! * FULL_DUPLEX_STREAMED: the request-headers answer waits until the body is complete (the
//!   pick needs the body); then come the headers answer and every body chunk, the last one
//!   with `end_of_stream` unless request trailers end the body, which are answered last.
//! * BUFFERED: the headers are answered at once, the single body message with the routing
//!   header mutation; the body itself passes untouched.
//! * A header-only request (GET) is routed at once, to a random endpoint.
//! * When the dispatcher makes a request wait, [`ExtProcStream::handle`] returns
//!   [`Step::Wait`]; the driver awaits it (buffering whatever Envoy sends meanwhile) and calls
//!   [`ExtProcStream::resume`], which sends the answers the routing step would have sent.
//!
//! The stream never ends itself before the whole body has been returned: ending early makes
//! Envoy forward an empty body.

use std::borrow::Cow;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, Metadata};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, CommonResponse, HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, body_mutation,
};
use envoy_types::pb::google::protobuf::{Struct, value::Kind};

use super::budget::{BodyBudget, Lease};
use super::error::{ErrorAnswer, StreamError};
use super::observer::{RequestObserver, RequestRecord};
use super::usage::UsageParser;
use super::wire;
use crate::framework::requestcontrol::{DispatchError, HeldSet, Wait};
use crate::request::{RequestError, RequestHeaders, keys};
use crate::requestcontrol::{Decision, Director, DirectorError, RequestInfo, Routing, Subset, SubsetEntry};

/// Whether the stream goes on after a message.
pub enum Step {
    /// Wait for the next message.
    Continue,
    /// Send what was queued, then close the stream with OK.
    Close,
    /// Send what was queued, then fail the stream with this status.
    Fail(tonic::Status),
    /// The request waits for dispatch: await this, then call [`ExtProcStream::resume`].
    Wait(Wait),
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Continue => f.write_str("Continue"),
            Self::Close => f.write_str("Close"),
            Self::Fail(s) => write!(f, "Fail({s})"),
            Self::Wait(_) => f.write_str("Wait"),
        }
    }
}

/// What a request waiting for dispatch will be answered with once it may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Full duplex: the headers answer and the body chunks; trailers end the body when set.
    FullDuplex {
        /// Request trailers ended the body: end the chunks without EoS and answer them last.
        trailers: bool,
    },
    /// Buffered: the body answer with the routing mutation.
    Buffered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before request headers.
    Start,
    /// Full-duplex: collecting the body before answering the headers.
    CollectingBody,
    /// Buffered: headers answered, waiting for the body message.
    AwaitingBufferedBody,
    /// The request was routed and forwarded.
    Routed,
}

/// State of one ext_proc stream.
pub struct ExtProcStream {
    director: Arc<Director>,
    observer: Arc<dyn RequestObserver>,
    request_mode: BodySendMode,
    response_mode: BodySendMode,
    first: bool,
    phase: Phase,
    info: Option<RequestInfo>,
    subset: Subset,
    chunks: Vec<Vec<u8>>,
    body_len: usize,
    usage: Option<UsageParser>,
    record: RequestRecord,
    span: tracing::Span,
    /// What plugins hold for the request until its response is complete.
    held: HeldSet,
    /// Headers plugins add to the response, sent with the response-headers answer.
    response_headers: Vec<(String, String)>,
    /// A request waiting for dispatch.
    pending: Option<Pending>,
    /// The wait the director handed out, until the driver takes it.
    waiting: Option<Wait>,
    /// This stream's share of the body budget, held while the body is buffered.
    lease: Lease,
}

impl ExtProcStream {
    /// A new stream, buffering its body within `budget`.
    pub fn new(director: Arc<Director>, observer: Arc<dyn RequestObserver>, budget: Arc<BodyBudget>) -> Self {
        Self {
            director,
            observer,
            // Without protocol_config (older Envoys) assume the reference's mode.
            request_mode: BodySendMode::FullDuplexStreamed,
            response_mode: BodySendMode::FullDuplexStreamed,
            first: true,
            phase: Phase::Start,
            info: None,
            subset: Subset::All,
            chunks: Vec::new(),
            body_len: 0,
            usage: None,
            record: RequestRecord::new(),
            span: tracing::info_span!(
                "ext_proc",
                request_id = tracing::field::Empty,
                model = tracing::field::Empty,
                pick = tracing::field::Empty
            ),
            held: HeldSet::default(),
            response_headers: Vec::new(),
            pending: None,
            waiting: None,
            lease: Lease::new(budget),
        }
    }

    /// The report so far.
    pub fn record(&self) -> &RequestRecord {
        &self.record
    }

    /// Handles one message from Envoy, appending answers to `out`.
    pub fn handle(&mut self, msg: ProcessingRequest, out: &mut Vec<ProcessingResponse>) -> Step {
        let span = self.span.clone();
        let _entered = span.enter();
        if self.first {
            self.first = false;
            if let Some(pc) = &msg.protocol_config {
                self.request_mode =
                    BodySendMode::try_from(pc.request_body_mode).unwrap_or(BodySendMode::None);
                self.response_mode =
                    BodySendMode::try_from(pc.response_body_mode).unwrap_or(BodySendMode::None);
            }
        }
        if let Some(md) = &msg.metadata_context {
            self.read_metadata(md);
        }
        let result = match msg.request {
            Some(Request::RequestHeaders(h)) => self.request_headers(h, out),
            Some(Request::RequestBody(b)) => self.request_body(b, out),
            Some(Request::RequestTrailers(_)) => self.request_trailers(out),
            Some(Request::ResponseHeaders(h)) => {
                self.response_headers(&h);
                let added = std::mem::take(&mut self.response_headers);
                out.push(wire::response_headers_set(&added));
                Ok(Step::Continue)
            }
            Some(Request::ResponseBody(b)) => {
                self.response_body(b, out);
                Ok(Step::Continue)
            }
            Some(Request::ResponseTrailers(_)) => {
                self.complete_response();
                out.push(wire::trailers(false));
                Ok(Step::Continue)
            }
            None => Ok(Step::Continue),
        };
        match result {
            Ok(step) => step,
            Err(e) => self.fail(e, out),
        }
    }

    fn fail(&mut self, err: StreamError, out: &mut Vec<ProcessingResponse>) -> Step {
        // Free the buffered body at once; nothing of it will be sent.
        self.chunks = Vec::new();
        match err.answer() {
            ErrorAnswer::Immediate {
                status,
                code,
                body,
                dropped_reason,
            } => {
                tracing::debug!(request_id = %self.record.request_id, status, code, error = %err, "request refused");
                self.record.error = Some((status, code));
                self.record.scheduling_failed = err.is_scheduling_failure();
                let mut answer = wire::immediate(status, body);
                if let Some(reason) = dropped_reason {
                    wire::add_immediate_header(&mut answer, keys::REQUEST_DROPPED_REASON, reason);
                }
                out.push(answer);
                Step::Close
            }
            ErrorAnswer::Abort(status) => {
                tracing::warn!(request_id = %self.record.request_id, error = %err, "failing the ext_proc stream");
                Step::Fail(status)
            }
        }
    }

    /// Subset hint (request path) and served endpoint (response path).
    fn read_metadata(&mut self, md: &Metadata) {
        if self.phase != Phase::Routed {
            self.subset = subset_from(md.filter_metadata.get(keys::SUBSET_NAMESPACE));
        } else if let Some(served) = md
            .filter_metadata
            .get(keys::LB_NAMESPACE)
            .and_then(|s| s.fields.get(keys::DESTINATION_SERVED))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
        {
            if self.record.served.as_deref() != Some(served.as_str()) {
                tracing::debug!(request_id = %self.record.request_id, served = %served, picked = ?self.record.destinations, "served endpoint reported");
            }
            self.record.served = Some(served);
        }
    }

    fn request_headers(
        &mut self,
        h: HttpHeaders,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<Step, StreamError> {
        if self.phase != Phase::Start {
            return Err(StreamError::OutOfOrder("request headers"));
        }
        let info = RequestInfo::from_headers(headers_of(h.headers));
        self.record.request_id.clone_from(&info.request_id);
        self.span.record("request_id", info.request_id.as_str());
        self.record.objective = info.headers.control(keys::OBJECTIVE).map(str::to_owned);
        self.info = Some(info);

        if h.end_of_stream || self.request_mode == BodySendMode::None {
            // Nothing to read: route at once to a random endpoint.
            let mut decision = self.director.route_without_body(&self.subset)?;
            let (common, md) = self.routing(&decision, None);
            out.push(wire::request_headers(common, Some(md)));
            self.routed(&mut decision);
            return Ok(Step::Continue);
        }
        // A declared length is checked now, before any byte is kept: above the body limit it is
        // a 413, and one that could not fit in the budget as it stands is refused at once. It is
        // not reserved: a client could otherwise hold the budget with headers alone.
        let declared = self
            .info
            .as_ref()
            .and_then(|i| i.headers.get_ignore_case("content-length"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        if let Some(len) = declared {
            let limit = self.director.config().max_body_bytes;
            if len > limit {
                return Err(DirectorError::Request(RequestError::BodyTooLarge { limit }).into());
            }
            if !self.lease.could_cover(len) {
                return Err(StreamError::BodyBudget {
                    limit: self.lease.budget_limit(),
                });
            }
        }
        match self.request_mode {
            BodySendMode::FullDuplexStreamed => self.phase = Phase::CollectingBody,
            BodySendMode::Buffered | BodySendMode::BufferedPartial => {
                self.phase = Phase::AwaitingBufferedBody;
                out.push(wire::request_headers(CommonResponse::default(), None));
            }
            BodySendMode::Streamed => return Err(StreamError::UnsupportedBodyMode("STREAMED")),
            BodySendMode::Grpc => return Err(StreamError::UnsupportedBodyMode("GRPC")),
            BodySendMode::None => {}
        }
        Ok(Step::Continue)
    }

    fn reserve(&mut self, bytes: usize) -> Result<(), StreamError> {
        if self.lease.cover(bytes) {
            Ok(())
        } else {
            Err(StreamError::BodyBudget {
                limit: self.lease.budget_limit(),
            })
        }
    }

    fn append(&mut self, body: Vec<u8>) -> Result<(), StreamError> {
        self.body_len += body.len();
        let limit = self.director.config().max_body_bytes;
        if self.body_len > limit {
            return Err(DirectorError::Request(RequestError::BodyTooLarge { limit }).into());
        }
        self.reserve(self.body_len)?;
        if !body.is_empty() {
            self.chunks.push(body);
        }
        Ok(())
    }

    fn request_body(&mut self, b: HttpBody, out: &mut Vec<ProcessingResponse>) -> Result<Step, StreamError> {
        match self.phase {
            Phase::CollectingBody => {
                self.append(b.body)?;
                if b.end_of_stream {
                    if self.body_len == 0 {
                        return self.route_empty(false, out);
                    }
                    return self.route_full_duplex(false, out);
                }
                Ok(Step::Continue)
            }
            Phase::AwaitingBufferedBody => {
                // The whole (or, in BUFFERED_PARTIAL, the available) body is in this message.
                self.append(b.body)?;
                if self.body_len == 0 {
                    return self.route_empty(false, out);
                }
                let mut chunks = std::mem::take(&mut self.chunks);
                let body = if chunks.len() == 1 {
                    chunks.pop().unwrap_or_default()
                } else {
                    chunks.concat()
                };
                match self.decide(&body)? {
                    Some(decision) => {
                        self.answer_buffered(decision, body.len(), out);
                        Ok(Step::Continue)
                    }
                    None => {
                        self.chunks = vec![body];
                        self.wait(Pending::Buffered)
                    }
                }
            }
            Phase::Routed => {
                // Extra body messages after a decision (buffered partial): pass them on.
                if self.request_mode == BodySendMode::FullDuplexStreamed {
                    out.push(wire::request_body_chunk(b.body, b.end_of_stream));
                } else {
                    out.push(wire::request_body(CommonResponse::default(), None));
                }
                Ok(Step::Continue)
            }
            Phase::Start => Err(StreamError::OutOfOrder("request body before headers")),
        }
    }

    fn request_trailers(&mut self, out: &mut Vec<ProcessingResponse>) -> Result<Step, StreamError> {
        match self.phase {
            Phase::CollectingBody if self.body_len == 0 => {
                self.route_empty(true, out)?;
            }
            Phase::CollectingBody => {
                if let step @ Step::Wait(_) = self.route_full_duplex(true, out)? {
                    return Ok(step);
                }
            }
            Phase::AwaitingBufferedBody => {
                // Trailers without a body message: an empty body, routed as no body; the
                // trailers answer carries the routing.
                return self.route_empty(true, out);
            }
            Phase::Start | Phase::Routed => {}
        }
        out.push(wire::trailers(true));
        Ok(Step::Continue)
    }

    /// An empty body is no body (a proxy that always sends a body message, a `GET /v1/models`):
    /// routed like a header-only request, to a random allowed endpoint. The answer keeps the
    /// stream's shape: full duplex answers the headers and passes the (empty) body on, ending it
    /// unless trailers follow; buffered answers the body message, or, after trailers without a
    /// body message, the headers were answered already and only the trailers remain.
    fn route_empty(
        &mut self,
        trailers: bool,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<Step, StreamError> {
        let mut decision = self.director.route_without_body(&self.subset)?;
        let (common, md) = self.routing(&decision, None);
        match self.phase {
            Phase::CollectingBody => {
                out.push(wire::request_headers(common, Some(md)));
                wire::push_body_chunks(Vec::new(), !trailers, out);
            }
            // The headers were answered; the destination travels as metadata on the trailers
            // answer (Envoy applies dynamic metadata from any answer before load balancing).
            _ if trailers => out.push(ProcessingResponse {
                dynamic_metadata: Some(md),
                ..wire::trailers(true)
            }),
            _ => out.push(wire::request_body(common, Some(md))),
        }
        self.routed(&mut decision);
        Ok(Step::Continue)
    }

    /// Parks the request until the dispatcher lets it go on.
    fn wait(&mut self, pending: Pending) -> Result<Step, StreamError> {
        let Some(wait) = self.waiting.take() else {
            return Err(StreamError::OutOfOrder("dispatch wait without a ticket"));
        };
        self.pending = Some(pending);
        Ok(Step::Wait(wait))
    }

    /// Continues a request that waited for dispatch: `outcome` is what the wait resolved to.
    /// Appends the answers the routing step would have sent, in order.
    pub fn resume(&mut self, outcome: Result<(), DispatchError>, out: &mut Vec<ProcessingResponse>) -> Step {
        let span = self.span.clone();
        let _entered = span.enter();
        let result = match (self.pending.take(), outcome) {
            (None, _) => Err(StreamError::OutOfOrder("resume without a waiting request")),
            (Some(_), Err(e)) => Err(DirectorError::Dispatch(e).into()),
            (Some(pending), Ok(())) => self.dispatched(pending, out),
        };
        match result {
            Ok(step) => step,
            Err(e) => self.fail(e, out),
        }
    }

    fn dispatched(
        &mut self,
        pending: Pending,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<Step, StreamError> {
        let chunks = std::mem::take(&mut self.chunks);
        match pending {
            Pending::FullDuplex { trailers } => {
                let decision = {
                    let joined = join(&chunks);
                    self.decide_dispatched(&joined)?
                };
                self.answer_full_duplex(decision, chunks, trailers, out);
                if trailers {
                    out.push(wire::trailers(true));
                }
            }
            Pending::Buffered => {
                let body = chunks.concat();
                let decision = self.decide_dispatched(&body)?;
                self.answer_buffered(decision, body.len(), out);
            }
        }
        Ok(Step::Continue)
    }

    fn answer_buffered(
        &mut self,
        mut decision: Decision,
        body_len: usize,
        out: &mut Vec<ProcessingResponse>,
    ) {
        let content_length = decision.body.as_ref().map(Vec::len);
        let (mut common, md) = self.routing(&decision, content_length);
        // The rewritten body moves into the answer: no second copy.
        if let Some(new_body) = decision.body.take() {
            common.body_mutation = Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::Body(new_body)),
            });
        }
        out.push(wire::request_body(common, Some(md)));
        self.record.request_bytes = content_length.unwrap_or(body_len);
        self.routed(&mut decision);
    }

    /// Full-duplex end of body: decide, then send the headers answer and the body chunks.
    fn route_full_duplex(
        &mut self,
        trailers: bool,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<Step, StreamError> {
        let chunks = std::mem::take(&mut self.chunks);
        let decision = {
            let joined = join(&chunks);
            self.decide(&joined)?
        };
        match decision {
            Some(decision) => {
                self.answer_full_duplex(decision, chunks, trailers, out);
                Ok(Step::Continue)
            }
            None => {
                self.chunks = chunks;
                self.wait(Pending::FullDuplex { trailers })
            }
        }
    }

    fn answer_full_duplex(
        &mut self,
        mut decision: Decision,
        chunks: Vec<Vec<u8>>,
        trailers: bool,
        out: &mut Vec<ProcessingResponse>,
    ) {
        let body_chunks = match decision.body.take() {
            Some(new_body) => vec![new_body],
            None => chunks,
        };
        let len: usize = body_chunks.iter().map(Vec::len).sum();
        let (common, md) = self.routing(&decision, Some(len));
        out.push(wire::request_headers(common, Some(md)));
        wire::push_body_chunks(body_chunks, !trailers, out);
        self.record.request_bytes = len;
        self.routed(&mut decision);
    }

    /// Routes on `body`: the decision, or `None` when the dispatcher made the request wait
    /// (the ticket is kept in `self.waiting`).
    fn decide(&mut self, body: &[u8]) -> Result<Option<Decision>, StreamError> {
        let Some(info) = &self.info else {
            return Err(StreamError::OutOfOrder("request body before headers"));
        };
        match self.director.route(info, body, &self.subset)? {
            Routing::Ready(decision) => {
                self.note_models(&decision);
                Ok(Some(decision))
            }
            Routing::Wait(wait) => {
                tracing::debug!(request_id = %info.request_id, "request waits for dispatch");
                self.waiting = Some(wait);
                Ok(None)
            }
        }
    }

    fn decide_dispatched(&mut self, body: &[u8]) -> Result<Decision, StreamError> {
        let Some(info) = &self.info else {
            return Err(StreamError::OutOfOrder("request body before headers"));
        };
        let decision = self.director.route_dispatched(info, body, &self.subset)?;
        self.note_models(&decision);
        Ok(decision)
    }

    fn note_models(&mut self, decision: &Decision) {
        self.record.model.clone_from(&decision.model);
        self.record.target_model.clone_from(&decision.target_model);
    }

    /// Header mutation and metadata of a decision.
    fn routing(&self, decision: &Decision, content_length: Option<usize>) -> (CommonResponse, Struct) {
        let mut headers = vec![wire::set_header(
            keys::DESTINATION,
            decision.destinations.as_bytes(),
        )];
        if let Some(len) = content_length {
            headers.push(wire::set_header("content-length", len.to_string().as_bytes()));
        }
        if let Some(info) = self.info.as_ref().filter(|i| i.generated_id) {
            headers.push(wire::set_header(keys::REQUEST_ID, info.request_id.as_bytes()));
        }
        for (name, value) in &decision.headers {
            headers.push(wire::set_header(name, value.as_bytes()));
        }
        (
            wire::routing_common(headers),
            wire::lb_metadata(&decision.destinations),
        )
    }

    fn routed(&mut self, decision: &mut Decision) {
        self.phase = Phase::Routed;
        // The body is handed to the gateway: its bytes leave this stream's share.
        self.lease.release();
        self.held = std::mem::take(&mut decision.held);
        self.response_headers = std::mem::take(&mut decision.response_headers);
        self.record.destinations = Some(decision.destinations.clone());
        self.record.primary = Some(decision.primary.clone());
        self.span.record("model", decision.target_model.as_str());
        self.span.record("pick", decision.destinations.as_str());
        tracing::debug!(model = %decision.model, target_model = %decision.target_model, pick = %decision.destinations, "request routed");
        self.observer.routed(&self.record);
    }

    fn response_headers(&mut self, h: &HttpHeaders) {
        // One pass over the headers for what the response path reads: the type and the status.
        let mut sse = false;
        let mut status = None;
        for hv in h.headers.iter().flat_map(|m| &m.headers) {
            let value: &[u8] = if hv.raw_value.is_empty() {
                hv.value.as_bytes()
            } else {
                &hv.raw_value
            };
            if hv.key == ":status" {
                status = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u16>().ok());
            } else if hv.key.eq_ignore_ascii_case("content-type") {
                sse |= memchr::memmem::find(value, b"text/event-stream").is_some();
            }
        }
        self.record.streaming = sse;
        self.record.response_body_sent = self.response_mode != BodySendMode::None;
        self.usage = Some(UsageParser::new(sse));
        self.record.response_status = status;
        // Passive health: the endpoint that served (as the gateway reports it), else the pick.
        if let (Some(status), Some(primary)) = (status, &self.record.primary) {
            let served = self
                .record
                .served
                .as_deref()
                .and_then(|s| s.parse::<std::net::SocketAddr>().ok())
                .unwrap_or(primary.address);
            self.director.record_outcome(served, status);
        }
        if h.end_of_stream {
            self.complete_response();
        }
    }

    fn response_body(&mut self, b: HttpBody, out: &mut Vec<ProcessingResponse>) {
        if self.record.response_bytes == 0 && !b.body.is_empty() {
            // The first bytes: the server has the prompt and is generating.
            self.held.response_started();
        }
        self.record.response_bytes += b.body.len();
        self.usage
            .get_or_insert_with(|| UsageParser::new(false))
            .feed(&b.body);
        let eos = b.end_of_stream;
        if self.response_mode == BodySendMode::FullDuplexStreamed {
            out.push(wire::response_body_chunk(b.body, eos));
        } else {
            out.push(wire::response_body_continue());
        }
        if eos {
            self.complete_response();
        }
    }

    fn complete_response(&mut self) {
        if self.record.response_complete {
            return;
        }
        self.record.response_complete = true;
        self.held.clear();
        if let Some(mut p) = self.usage.take() {
            self.record.usage = p.finish();
        }
    }
}

impl Drop for ExtProcStream {
    fn drop(&mut self) {
        // Without the response body (response_body_mode NONE) and with response_trailer_mode
        // SEND, Envoy keeps the ext_proc stream open until the HTTP response ends and then
        // closes it: the stream's end is the response's end, as the last body chunk is in the
        // other modes (docs/envoy.md, "Response bodies").
        if self.response_mode == BodySendMode::None && self.record.response_status.is_some() {
            self.complete_response();
        }
        if !self.first {
            self.observer.finished(&self.record);
        }
    }
}

/// The body as one slice: in place when it arrived in one piece, joined (the one copy)
/// otherwise.
fn join(chunks: &[Vec<u8>]) -> Cow<'_, [u8]> {
    match chunks {
        [] => Cow::Borrowed(&[]),
        [one] => Cow::Borrowed(one.as_slice()),
        many => Cow::Owned(many.concat()),
    }
}

/// Envoy's header map as owned `(name, value)` pairs: `raw_value` when set, else `value`.
fn headers_of(map: Option<HeaderMap>) -> RequestHeaders {
    let mut headers = RequestHeaders::default();
    for hv in map.map(|m| m.headers).unwrap_or_default() {
        let value = if hv.raw_value.is_empty() {
            hv.value
        } else {
            String::from_utf8(hv.raw_value)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
        };
        headers.push(hv.key, value);
    }
    headers
}

/// The subset hint: absent namespace or key (or not a list) → all endpoints; a list → only
/// the endpoints its entries name ([`SubsetEntry`]: with a port that endpoint, without one every
/// port of the IP); an empty or unparseable list allows none.
fn subset_from(ns: Option<&Struct>) -> Subset {
    let Some(list) = ns
        .and_then(|s| s.fields.get(keys::DESTINATION_SUBSET))
        .and_then(|v| match &v.kind {
            Some(Kind::ListValue(l)) => Some(l),
            _ => None,
        })
    else {
        return Subset::All;
    };
    let ips = list
        .values
        .iter()
        .filter_map(|v| match &v.kind {
            Some(Kind::StringValue(s)) => SubsetEntry::parse(s),
            _ => None,
        })
        .collect();
    Subset::Only(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_entries_keep_their_port_and_are_ipv6_safe() {
        let e = |ip: &str, port| {
            Some(SubsetEntry {
                ip: ip.parse().unwrap(),
                port,
            })
        };
        assert_eq!(SubsetEntry::parse("10.0.0.1:8000"), e("10.0.0.1", Some(8000)));
        assert_eq!(SubsetEntry::parse("[fd00::1]:8000"), e("fd00::1", Some(8000)));
        assert_eq!(SubsetEntry::parse("[fd00::1]"), e("fd00::1", None));
        assert_eq!(SubsetEntry::parse("fd00::1"), e("fd00::1", None));
        assert_eq!(SubsetEntry::parse(" 10.0.0.1 "), e("10.0.0.1", None));
        assert_eq!(SubsetEntry::parse("pod-a:80"), None);
    }
}
