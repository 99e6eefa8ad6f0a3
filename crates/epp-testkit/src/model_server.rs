//! A fake model server for data-layer tests: serves a real vLLM `/metrics` page (captured from
//! vLLM 0.32) with the load figures replaced by whatever the test sets, and can fail, hang or
//! answer slowly on demand.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parking_lot::Mutex;
use tokio::sync::oneshot;

const PAGE: &str = include_str!("../../../fixtures/vllm-0.32-cpu/metrics_idle.txt");

/// How `/metrics` answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Ok,
    Error,
    Hang,
    Delay(Duration),
}

#[derive(Debug)]
pub struct Load {
    pub waiting: u32,
    pub running: u32,
    pub kv: f64,
    pub mode: Mode,
    pub scrapes: u64,
}

pub struct ModelServer {
    pub addr: SocketAddr,
    pub load: Arc<Mutex<Load>>,
    _stop: oneshot::Sender<()>,
}

fn page(load: &Load) -> String {
    PAGE.lines()
        .map(|l| {
            if l.starts_with("vllm:num_requests_waiting{") {
                format!(
                    "vllm:num_requests_waiting{{engine=\"0\",model_name=\"tiny\"}} {}.0",
                    load.waiting
                )
            } else if l.starts_with("vllm:num_requests_running{") {
                format!(
                    "vllm:num_requests_running{{engine=\"0\",model_name=\"tiny\"}} {}.0",
                    load.running
                )
            } else if l.starts_with("vllm:kv_cache_usage_perc{") {
                format!(
                    "vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"tiny\"}} {}",
                    load.kv
                )
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

async fn metrics(State(load): State<Arc<Mutex<Load>>>) -> Response {
    let mode = {
        let mut l = load.lock();
        l.scrapes += 1;
        l.mode
    };
    match mode {
        Mode::Ok => {}
        Mode::Error => return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response(),
        Mode::Hang => std::future::pending::<()>().await,
        Mode::Delay(d) => tokio::time::sleep(d).await,
    }
    let text = page(&load.lock());
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

impl ModelServer {
    pub async fn start(waiting: u32, kv: f64) -> Self {
        Self::start_with(waiting, kv, Mode::Ok).await
    }

    pub async fn start_with(waiting: u32, kv: f64, mode: Mode) -> Self {
        let load = Arc::new(Mutex::new(Load {
            waiting,
            running: 0,
            kv,
            mode,
            scrapes: 0,
        }));
        let app = Router::new()
            .route("/metrics", get(metrics))
            .with_state(load.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            load,
            _stop: tx,
        }
    }

    pub fn set(&self, waiting: u32, kv: f64) {
        let mut l = self.load.lock();
        l.waiting = waiting;
        l.kv = kv;
    }

    pub fn set_mode(&self, mode: Mode) {
        self.load.lock().mode = mode;
    }

    pub fn scrapes(&self) -> u64 {
        self.load.lock().scrapes
    }
}
