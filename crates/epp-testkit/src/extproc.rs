//! Shared fixtures: an in-process EPP on 127.0.0.1, built through the same builder the `epp`
//! binary uses, and a real tonic ext_proc client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use endpoint_picker::app::{self, Hooks, Running};
use endpoint_picker::config::EppConfig;
use endpoint_picker::config::cli::parse_args;
use endpoint_picker::config::resolve::DiscoveryPlan;
use endpoint_picker::datalayer::collector::Sources;
use endpoint_picker::datalayer::{Endpoint, EndpointStore, Metrics};
use endpoint_picker::framework::requestcontrol::Dispatcher;
use endpoint_picker::protocol::{RequestObserver, RequestRecord};
use endpoint_picker::requestcontrol::ObjectiveTable;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse,
    ProtocolConfiguration, body_mutation,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Records every finished request.
#[derive(Default)]
pub struct Collect {
    pub routed: Mutex<Vec<RequestRecord>>,
    pub finished: Mutex<Vec<RequestRecord>>,
}

impl RequestObserver for Collect {
    fn routed(&self, record: &RequestRecord) {
        self.routed.lock().push(record.clone());
    }
    fn finished(&self, record: &RequestRecord) {
        self.finished.lock().push(record.clone());
    }
}

/// A running in-process EPP whose pool and figures the test sets.
pub struct Epp {
    /// ext_proc address (plaintext).
    pub addr: SocketAddr,
    /// Metrics port address.
    pub metrics_addr: SocketAddr,
    /// The endpoint store.
    pub store: Arc<EndpointStore>,
    /// Every request report.
    pub records: Arc<Collect>,
    /// InferenceObjective priorities.
    pub objectives: Arc<ObjectiveTable>,
    running: Option<Running>,
}

impl Drop for Epp {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
        }
    }
}

pub const SEED_CONFIG: &str = include_str!("../../../config/default-plugins.yaml");

/// The flags every in-process EPP gets: plaintext, free ports on 127.0.0.1.
const BASE_FLAGS: &[&str] = &[
    "--secure-serving=false",
    "--bind-address=127.0.0.1",
    "--grpc-port=0",
    "--grpc-health-port=0",
    "--metrics-port=0",
    // Satisfies flag validation; replaced by a pool the test sets.
    "--static-endpoints=127.0.0.1:1",
];

/// Starts an EPP with `config` (YAML) and extra `flags`, exactly as `epp` wires itself except
/// that the test sets the pool ([`Epp::set_pool`]) and the endpoints' figures, instead of
/// discovery and data sources. The store starts empty but synced; ties are broken with a
/// fixed seed.
pub async fn start(config: &str, flags: &[&str]) -> Epp {
    start_with(config, flags, None).await
}

/// [`start`] with a dispatcher that decides when requests are scheduled.
pub async fn start_with(config: &str, flags: &[&str], dispatcher: Option<Arc<dyn Dispatcher>>) -> Epp {
    let text = format!("--config-text={config}");
    let args = std::iter::once("epp")
        .chain(BASE_FLAGS.iter().copied())
        .chain(std::iter::once(text.as_str()))
        .chain(flags.iter().copied());
    let cli = parse_args(args.map(Into::into)).unwrap();
    let mut resolved = EppConfig::resolve(cli, &|_| None, Some(42)).unwrap();
    resolved.discovery = DiscoveryPlan::Manual;
    resolved.plugins.sources = Sources::default();
    resolved.collector.dedicated_thread = false;
    let epp = launch(resolved, dispatcher).await;
    epp.store.set_endpoints(Vec::<Endpoint>::new());
    epp
}

/// Starts the app on `resolved`, recording every finished request.
async fn launch(resolved: EppConfig, dispatcher: Option<Arc<dyn Dispatcher>>) -> Epp {
    let records = Arc::new(Collect::default());
    let running = app::start_config(
        resolved,
        Hooks {
            observer: Some(records.clone()),
            dispatcher,
        },
    )
    .await
    .unwrap();
    Epp {
        addr: running.grpc_addr,
        metrics_addr: running.metrics_addr,
        store: running.store.clone(),
        objectives: running.objectives.clone(),
        records,
        running: Some(running),
    }
}

/// An in-process EPP as `epp` runs it (TLS on the ext_proc port, as Envoy in `e2e` expects),
/// discovery and scraping included, over the static pool `endpoints`; unlike the binary, the
/// test can set InferenceObjective priorities ([`Epp::objectives`]).
pub async fn start_live(config: &str, endpoints: &[SocketAddr], flags: &[&str]) -> Epp {
    let text = format!("--config-text={config}");
    let pool = format!(
        "--static-endpoints={}",
        endpoints
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let args = std::iter::once("epp")
        .chain(BASE_FLAGS[1..BASE_FLAGS.len() - 1].iter().copied())
        .chain([text.as_str(), pool.as_str()])
        .chain(flags.iter().copied());
    let cli = parse_args(args.map(Into::into)).unwrap();
    let resolved = EppConfig::resolve(cli, &|_| None, Some(42)).unwrap();
    launch(resolved, None).await
}

impl Epp {
    /// Starts the EPP's graceful shutdown (as SIGTERM does).
    pub fn shutdown(&self) {
        if let Some(r) = &self.running {
            r.shutdown();
        }
    }

    /// Replaces the pool with endpoints at `addrs` carrying `(waiting queue, kv usage)`.
    pub fn set_pool(&self, pool: &[(&str, u32, f64)]) {
        self.store.set_endpoints(
            pool.iter()
                .map(|(a, _, _)| Endpoint::from_address(a.parse().unwrap())),
        );
        let snap = self.store.load();
        for (state, (_, q, kv)) in snap.endpoints().iter().zip(pool) {
            self.store.update_metrics(
                &state.endpoint,
                Metrics {
                    waiting_queue: *q,
                    kv_cache_usage: *kv,
                    updated_at: Some(tokio::time::Instant::now()),
                    ..Metrics::default()
                },
            );
        }
    }

    /// Publishes `metrics` for the endpoint at `addr`.
    pub fn set_metrics(&self, addr: &str, metrics: Metrics) {
        let snap = self.store.load();
        let state = snap.find(addr.parse().unwrap()).unwrap();
        self.store.update_metrics(&state.endpoint, metrics);
    }

    /// Opens an ext_proc stream.
    pub async fn open(&self) -> Conversation {
        open(self.addr).await
    }
}

/// Opens a plaintext ext_proc stream to `addr`.
pub async fn open(addr: SocketAddr) -> Conversation {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    open_on(channel).await
}

/// Opens an ext_proc stream on `channel`.
pub async fn open_on(channel: tonic::transport::Channel) -> Conversation {
    let mut client = ExternalProcessorClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel(64);
    let inbound = client
        .process(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    Conversation {
        tx: Some(tx),
        inbound,
        first: true,
        mode: None,
    }
}

/// One ext_proc stream, driven message by message like Envoy does.
pub struct Conversation {
    tx: Option<mpsc::Sender<ProcessingRequest>>,
    inbound: tonic::Streaming<ProcessingResponse>,
    first: bool,
    mode: Option<(BodySendMode, BodySendMode)>,
}

impl Conversation {
    /// Announces the body modes on the first message (as Envoy's protocol_config).
    pub fn with_modes(mut self, request: BodySendMode, response: BodySendMode) -> Self {
        self.mode = Some((request, response));
        self
    }

    pub async fn send(&mut self, request: Request) {
        self.send_with_metadata(request, None).await;
    }

    pub async fn send_with_metadata(&mut self, request: Request, metadata: Option<Metadata>) {
        let protocol_config = if self.first {
            self.first = false;
            self.mode.map(|(req, resp)| ProtocolConfiguration {
                request_body_mode: req as i32,
                response_body_mode: resp as i32,
                ..ProtocolConfiguration::default()
            })
        } else {
            None
        };
        let msg = ProcessingRequest {
            request: Some(request),
            metadata_context: metadata,
            protocol_config,
            ..ProcessingRequest::default()
        };
        self.tx.as_ref().unwrap().send(msg).await.unwrap();
    }

    /// Ends the client side of the stream.
    pub fn close(&mut self) {
        self.tx = None;
    }

    /// The next answer (fails the test after 5 s).
    pub async fn recv(&mut self) -> ProcessingResponse {
        tokio::time::timeout(Duration::from_secs(5), self.inbound.message())
            .await
            .expect("no answer within 5 s")
            .expect("stream failed")
            .expect("stream ended")
    }

    /// The stream's end: `Ok(None)` for a clean close, `Err` for a gRPC error.
    pub async fn end(&mut self) -> Result<Option<ProcessingResponse>, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(5), self.inbound.message())
            .await
            .expect("no end within 5 s")
    }

    /// Asserts nothing arrives for a short while.
    pub async fn assert_silent(&mut self) {
        let r = tokio::time::timeout(Duration::from_millis(100), self.inbound.message()).await;
        assert!(r.is_err(), "unexpected answer: {r:?}");
    }
}

pub fn header_map(headers: &[(&str, &str)]) -> HeaderMap {
    HeaderMap {
        headers: headers
            .iter()
            .map(|(k, v)| HeaderValue {
                key: (*k).to_owned(),
                value: String::new(),
                raw_value: v.as_bytes().to_vec(),
            })
            .collect(),
    }
}

pub fn request_headers(headers: &[(&str, &str)], end_of_stream: bool) -> Request {
    Request::RequestHeaders(HttpHeaders {
        headers: Some(header_map(headers)),
        end_of_stream,
        ..HttpHeaders::default()
    })
}

pub fn post(path: &str) -> Vec<(&str, &str)> {
    vec![
        (":method", "POST"),
        (":path", path),
        (":authority", "gw"),
        ("content-type", "application/json"),
    ]
}

pub fn request_body(body: &[u8], end_of_stream: bool) -> Request {
    Request::RequestBody(HttpBody {
        body: body.to_vec(),
        end_of_stream,
        ..HttpBody::default()
    })
}

pub fn request_trailers() -> Request {
    Request::RequestTrailers(HttpTrailers::default())
}

pub fn response_headers(headers: &[(&str, &str)], end_of_stream: bool) -> Request {
    Request::ResponseHeaders(HttpHeaders {
        headers: Some(header_map(headers)),
        end_of_stream,
        ..HttpHeaders::default()
    })
}

pub fn response_body(body: &[u8], end_of_stream: bool) -> Request {
    Request::ResponseBody(HttpBody {
        body: body.to_vec(),
        end_of_stream,
        ..HttpBody::default()
    })
}

pub fn response_trailers() -> Request {
    Request::ResponseTrailers(HttpTrailers::default())
}

/// `metadata_context` with a subset hint.
pub fn subset(items: &[&str]) -> Metadata {
    let list = ListValue {
        values: items
            .iter()
            .map(|s| Value {
                kind: Some(Kind::StringValue((*s).to_owned())),
            })
            .collect(),
    };
    let ns = Struct {
        fields: [(
            "x-gateway-destination-endpoint-subset".to_owned(),
            Value {
                kind: Some(Kind::ListValue(list)),
            },
        )]
        .into(),
    };
    Metadata {
        filter_metadata: [("envoy.lb.subset_hint".to_owned(), ns)].into(),
        ..Metadata::default()
    }
}

/// `metadata_context` reporting the served endpoint.
pub fn served(endpoint: &str) -> Metadata {
    let ns = Struct {
        fields: [(
            "x-gateway-destination-endpoint-served".to_owned(),
            Value {
                kind: Some(Kind::StringValue(endpoint.to_owned())),
            },
        )]
        .into(),
    };
    Metadata {
        filter_metadata: [("envoy.lb".to_owned(), ns)].into(),
        ..Metadata::default()
    }
}

/// The common response of a headers or body answer.
pub fn common(r: &ProcessingResponse) -> &CommonResponse {
    match &r.response {
        Some(Response::RequestHeaders(h)) | Some(Response::ResponseHeaders(h)) => {
            h.response.as_ref().unwrap()
        }
        Some(Response::RequestBody(BodyResponse { response: Some(c) }))
        | Some(Response::ResponseBody(BodyResponse { response: Some(c) })) => c,
        other => panic!("not a headers/body answer: {other:?}"),
    }
}

/// A header set by the answer (value from raw_value).
pub fn set_header<'a>(r: &'a ProcessingResponse, key: &str) -> Option<&'a str> {
    common(r).header_mutation.as_ref().and_then(|m| {
        m.set_headers
            .iter()
            .filter_map(|o| o.header.as_ref())
            .find(|h| h.key.eq_ignore_ascii_case(key))
            .map(|h| std::str::from_utf8(&h.raw_value).unwrap())
    })
}

/// The `envoy.lb` / `x-gateway-destination-endpoint` metadata of an answer.
pub fn lb_metadata(r: &ProcessingResponse) -> Option<&str> {
    let ns = r.dynamic_metadata.as_ref()?.fields.get("envoy.lb")?;
    let Some(Kind::StructValue(s)) = &ns.kind else {
        return None;
    };
    match &s.fields.get("x-gateway-destination-endpoint")?.kind {
        Some(Kind::StringValue(v)) => Some(v),
        _ => None,
    }
}

/// The destination of a routing answer, checked to be identical in header and metadata.
pub fn destination(r: &ProcessingResponse) -> String {
    let header = set_header(r, "x-gateway-destination-endpoint").expect("no destination header");
    assert_eq!(Some(header), lb_metadata(r), "header and metadata disagree");
    assert!(common(r).clear_route_cache, "route cache not cleared");
    header.to_owned()
}

/// The bytes and end-of-stream flag of a streamed body answer.
pub fn streamed(r: &ProcessingResponse) -> (Vec<u8>, bool) {
    match &common(r).body_mutation.as_ref().and_then(|m| m.mutation.as_ref()) {
        Some(body_mutation::Mutation::StreamedResponse(s)) => (s.body.clone(), s.end_of_stream),
        other => panic!("not a streamed body: {other:?}"),
    }
}

/// Status and body of an immediate response.
pub fn immediate(r: &ProcessingResponse) -> (i32, String) {
    match &r.response {
        Some(Response::ImmediateResponse(i)) => (
            i.status.as_ref().unwrap().code,
            String::from_utf8(i.body.clone()).unwrap(),
        ),
        other => panic!("not an immediate response: {other:?}"),
    }
}

/// A header of an immediate response, if set.
pub fn immediate_header(r: &ProcessingResponse, name: &str) -> Option<String> {
    match &r.response {
        Some(Response::ImmediateResponse(i)) => i.headers.as_ref()?.set_headers.iter().find_map(|h| {
            let h = h.header.as_ref()?;
            (h.key == name).then(|| String::from_utf8_lossy(&h.raw_value).into_owned())
        }),
        other => panic!("not an immediate response: {other:?}"),
    }
}

pub fn is_request_headers(r: &ProcessingResponse) -> bool {
    matches!(r.response, Some(Response::RequestHeaders(_)))
}

pub fn is_request_trailers(r: &ProcessingResponse) -> bool {
    matches!(r.response, Some(Response::RequestTrailers(_)))
}

pub fn is_response_trailers(r: &ProcessingResponse) -> bool {
    matches!(r.response, Some(Response::ResponseTrailers(_)))
}

/// Sends a chat request (full duplex, one body message) and returns the headers answer and
/// the reassembled body.
pub async fn chat(epp: &Epp, body: &str, extra: &[(&str, &str)]) -> (ProcessingResponse, Vec<u8>) {
    chat_on(epp.open().await, body, extra).await
}

/// [`chat`] on an open conversation.
pub async fn chat_on(
    mut c: Conversation,
    body: &str,
    extra: &[(&str, &str)],
) -> (ProcessingResponse, Vec<u8>) {
    let mut headers = post("/v1/chat/completions");
    headers.extend_from_slice(extra);
    c.send(request_headers(&headers, false)).await;
    c.send(request_body(body.as_bytes(), true)).await;
    let head = c.recv().await;
    if !is_request_headers(&head) {
        return (head, Vec::new());
    }
    let mut out = Vec::new();
    loop {
        let r = c.recv().await;
        let (bytes, eos) = streamed(&r);
        out.extend_from_slice(&bytes);
        if eos {
            break;
        }
    }
    (head, out)
}

pub fn chat_body(model: &str, text: &str) -> String {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]}).to_string()
}
