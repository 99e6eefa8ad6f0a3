//! A model server that fails on demand, for fault-injection tests: its `/metrics` (a captured
//! vLLM page with the load a test sets) and its OpenAI endpoints each answer normally, hang,
//! answer 500, send garbage or a truncated page, or close the connection mid-response; and the
//! whole server can disappear (stop listening, drop its connections).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::model_server::vllm_page;

/// How `/metrics` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsFault {
    /// The vLLM page with the configured load.
    None,
    /// Never answers.
    Hang,
    /// 500.
    Error,
    /// 200 with bytes that are no metrics page (not even UTF-8).
    Garbage,
    /// 200, half the page, then the connection is cut.
    Truncated,
}

/// How `/v1/*` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFault {
    /// A small chat completion.
    None,
    /// Never answers.
    Hang,
    /// 500 with an OpenAI-shaped error.
    Error,
    /// 200, the first bytes of the body, then the connection is cut.
    CloseMidResponse,
}

/// What the server does now.
#[derive(Debug)]
pub struct Faults {
    /// `/metrics`.
    pub metrics: MetricsFault,
    /// `/v1/*`.
    pub requests: RequestFault,
    /// Reported waiting queue.
    pub waiting: u32,
    /// Reported KV-cache use.
    pub kv: f64,
    /// Requests received on `/v1/*`.
    pub requests_seen: u64,
    /// Gone: connections still open are answered 503 and closed on their next request.
    pub gone: bool,
}

/// A running faulty server.
pub struct FaultyServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its `x-vllm-sim-id` (as `vllm-sim` names itself).
    pub id: String,
    /// The faults, changeable at any time.
    pub faults: Arc<Mutex<Faults>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

type Shared = (Arc<Mutex<Faults>>, String);

/// A body that sends `first` and then fails, which makes hyper cut the connection.
fn cut_after(first: String) -> Body {
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from(first)),
        Err(std::io::Error::other("connection cut on purpose")),
    ];
    Body::from_stream(futures_util::stream::iter(chunks))
}

/// What a connection opened before the server went away gets: the connection is closed (new
/// ones are refused, the listener is gone); the request in hand is answered 503, as a
/// terminating pod's proxy would.
fn gone() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, [("connection", "close")], "gone").into_response()
}

async fn metrics(State((faults, _)): State<Shared>) -> Response {
    let (mode, text) = {
        let f = faults.lock();
        if f.gone {
            return gone();
        }
        (f.metrics, vllm_page(f.waiting, 0, f.kv))
    };
    match mode {
        MetricsFault::None => text.into_response(),
        MetricsFault::Hang => std::future::pending().await,
        MetricsFault::Error => (StatusCode::INTERNAL_SERVER_ERROR, "engine dead").into_response(),
        MetricsFault::Garbage => {
            (StatusCode::OK, vec![0xffu8, 0xfe, 0x00, b'{', 0x80, b'\n', 0xc3]).into_response()
        }
        MetricsFault::Truncated => {
            let half = text[..text.len() / 2].to_owned();
            Response::new(cut_after(half))
        }
    }
}

async fn completion(State((faults, id)): State<Shared>, _body: Bytes) -> Response {
    let mode = {
        let mut f = faults.lock();
        if f.gone {
            return gone();
        }
        f.requests_seen += 1;
        f.requests
    };
    let ok = serde_json::json!({
        "id": "cmpl-faulty",
        "object": "chat.completion",
        "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    })
    .to_string();
    let mut response = match mode {
        RequestFault::None => (StatusCode::OK, [("content-type", "application/json")], ok).into_response(),
        RequestFault::Hang => std::future::pending().await,
        RequestFault::Error => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "application/json")],
            r#"{"error":{"message":"engine dead","type":"InternalServerError","code":500}}"#,
        )
            .into_response(),
        RequestFault::CloseMidResponse => Response::new(cut_after(ok[..ok.len() / 3].to_owned())),
    };
    if let Ok(v) = id.parse() {
        response.headers_mut().insert("x-vllm-sim-id", v);
    }
    response
}

impl FaultyServer {
    /// A healthy server reporting `waiting` and `kv` until a fault is set.
    pub async fn start(waiting: u32, kv: f64) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let id = format!("faulty-{}", addr.port());
        let faults = Arc::new(Mutex::new(Faults {
            metrics: MetricsFault::None,
            requests: RequestFault::None,
            waiting,
            kv,
            requests_seen: 0,
            gone: false,
        }));
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/v1/chat/completions", post(completion))
            .route("/v1/completions", post(completion))
            .with_state((faults.clone(), id.clone()));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = rx.await;
            });
            // A hung handler would hold a graceful shutdown open: the server is aborted instead
            // when it disappears (see `disappear`).
            let _ = serve.await;
        });
        Self {
            addr,
            id,
            faults,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Sets the `/metrics` fault.
    pub fn set_metrics(&self, fault: MetricsFault) {
        self.faults.lock().metrics = fault;
    }

    /// Sets the `/v1/*` fault.
    pub fn set_requests(&self, fault: RequestFault) {
        self.faults.lock().requests = fault;
    }

    /// Requests received so far.
    pub fn requests_seen(&self) -> u64 {
        self.faults.lock().requests_seen
    }

    /// Stops listening and drops every connection: connections are refused from now on.
    pub async fn disappear(&mut self) {
        self.faults.lock().gone = true;
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
    }
}

impl Drop for FaultyServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
