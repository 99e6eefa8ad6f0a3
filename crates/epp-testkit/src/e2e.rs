//! End-to-end fixtures: in-process `vllm-sim` servers, the real `epp` binary and a real Envoy,
//! all on 127.0.0.1 with free ports. Every process is killed when its handle drops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use vllm_sim::{Overrides, SimConfig, Simulator, serve};

pub use crate::{envoy_bin, free_port};

fn scratch_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("epp-e2e-{}-{tag}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One in-process simulated vLLM server.
pub struct Sim {
    pub addr: SocketAddr,
    pub id: String,
    pub sim: Arc<Simulator>,
    stop: Option<oneshot::Sender<()>>,
}

impl Sim {
    pub async fn start(tweak: impl FnOnce(&mut SimConfig)) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), tweak).await
    }

    /// A sim listening on `addr` (any 127.0.0.0/8 address works on Linux loopback).
    pub async fn start_on(addr: SocketAddr, tweak: impl FnOnce(&mut SimConfig)) -> Self {
        Self::start_full(addr, tweak, None, None).await
    }

    /// A sim that tokenizes with the real vLLM fixture model's tokenizer and publishes KV
    /// events as `events` says.
    pub async fn start_tokenizing(
        addr: SocketAddr,
        tweak: impl FnOnce(&mut SimConfig),
        events: Option<vllm_sim::kvevents::PublisherConfig>,
    ) -> Self {
        let model =
            vllm_sim::vllm_prompt::Model::load(&crate::fixtures().join("tokenization"), 16 << 20).unwrap();
        Self::start_full(addr, tweak, Some(Arc::new(model)), events).await
    }

    /// A sim with every part given.
    pub async fn start_full(
        addr: SocketAddr,
        tweak: impl FnOnce(&mut SimConfig),
        prompts: Option<Arc<vllm_sim::vllm_prompt::Model>>,
        events: Option<vllm_sim::kvevents::PublisherConfig>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let id = format!("sim-{}", addr.port());
        let mut config = SimConfig {
            served_by: id.clone(),
            time_scale: 0.05,
            ..SimConfig::default()
        };
        tweak(&mut config);
        let publisher = events.map(|e| vllm_sim::kvevents::Publisher::start(e).unwrap());
        let sim = Simulator::with_parts(config, prompts, publisher);
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(serve(listener, sim.clone(), async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            id,
            sim,
            stop: Some(tx),
        }
    }

    /// Reported load (what the EPP scrapes), independent of real traffic.
    pub fn set_load(&self, waiting: u32, kv: f64) {
        self.sim.set_overrides(Overrides {
            waiting: Some(waiting),
            running: None,
            kv_cache_usage: Some(kv),
        });
    }

    /// Stops serving (connections are refused afterwards).
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop();
    }
}

pub async fn sims(n: usize) -> Vec<Sim> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Sim::start(|_| {}).await);
    }
    out
}

/// The real `epp` binary as a child process.
pub struct Epp {
    pub child: Child,
    pub grpc_port: u16,
    pub metrics_port: u16,
    pub log: PathBuf,
}

impl Epp {
    /// Starts `epp` with a static pool of `endpoints` and waits until it is ready.
    pub async fn start(endpoints: &[SocketAddr], extra: &[&str]) -> Self {
        Self::start_on(free_port(), endpoints, extra).await
    }

    pub async fn start_on(grpc_port: u16, endpoints: &[SocketAddr], extra: &[&str]) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let list = endpoints
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut args: Vec<&str> = vec!["--static-endpoints", &list];
        args.extend(extra);
        Self::start_args(grpc_port, &args).await
    }

    /// Starts `epp` with `extra` flags (discovery included) on `grpc_port` and free ports for
    /// the rest, and waits until it is ready.
    pub async fn start_args(grpc_port: u16, extra: &[&str]) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let metrics_port = free_port();
        let mut args: Vec<String> = vec![
            "--bind-address=127.0.0.1".into(),
            format!("--grpc-port={grpc_port}"),
            format!("--grpc-health-port={}", free_port()),
            format!("--metrics-port={metrics_port}"),
            "--v=3".into(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let dir = scratch_dir("epp");
        let log = dir.join("epp.log");
        let child = Command::new(crate::epp_bin())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let epp = Self {
            child,
            grpc_port,
            metrics_port,
            log,
        };
        epp.wait_ready().await;
        epp
    }

    async fn wait_ready(&self) {
        let url = format!("http://127.0.0.1:{}/readyz", self.metrics_port);
        for _ in 0..300 {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "epp not ready; log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// SIGTERM: graceful shutdown.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its status code.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        for _ in 0..500 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("epp did not exit");
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Epp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ways gateways put an EPP in front of a pool (`examples/envoy/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    AiGateway,
    /// The AI Gateway shape with the response body not sent to the EPP.
    AiGatewayNoResponseBody,
    OverrideHost,
    FailOpen,
    /// No EPP: a round-robin cluster of the pool (the routing baseline).
    RoundRobin,
}

impl Shape {
    pub const ALL: [Shape; 4] = [
        Shape::AiGateway,
        Shape::AiGatewayNoResponseBody,
        Shape::OverrideHost,
        Shape::FailOpen,
    ];

    fn file(self) -> &'static str {
        match self {
            Shape::AiGateway => "ai-gateway.yaml",
            Shape::AiGatewayNoResponseBody => "ai-gateway-no-response-body.yaml",
            Shape::OverrideHost => "override-host.yaml",
            Shape::FailOpen => "fail-open.yaml",
            Shape::RoundRobin => "round-robin.yaml",
        }
    }
}

/// The `{{POOL_LB_ENDPOINTS}}` lines of the example configurations: one `lb_endpoints` entry
/// per pool address.
pub fn pool_lb_endpoints(pool: &[SocketAddr]) -> String {
    pool.iter()
        .map(|a| {
            format!(
                "        - endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}\n",
                a.ip(),
                a.port()
            )
        })
        .collect()
}

/// A real Envoy running one of the example configurations.
pub struct Envoy {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub log: PathBuf,
}

impl Envoy {
    pub async fn start(shape: Shape, epp_port: u16, pool: &[SocketAddr]) -> Self {
        Self::start_edited(shape, epp_port, pool, |s| s.to_owned()).await
    }

    /// Starts `shape` after `edit` has changed its configuration text.
    pub async fn start_edited(
        shape: Shape,
        epp_port: u16,
        pool: &[SocketAddr],
        edit: impl Fn(&str) -> String,
    ) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let template = edit(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../examples/envoy")
                    .join(shape.file()),
            )
            .unwrap(),
        );
        let port = free_port();
        let admin_port = free_port();
        let endpoints = pool_lb_endpoints(pool);
        let config = template
            .replace("{{LISTEN_PORT}}", &port.to_string())
            .replace("{{ADMIN_PORT}}", &admin_port.to_string())
            .replace("{{EPP_PORT}}", &epp_port.to_string())
            .replace("{{POOL_LB_ENDPOINTS}}\n", &endpoints);
        let dir = scratch_dir("envoy");
        let path = dir.join("envoy.yaml");
        std::fs::write(&path, config).unwrap();
        let log = dir.join("envoy.log");
        let child = Command::new(envoy_bin())
            .args([
                "-c",
                path.to_str().unwrap(),
                "--disable-hot-restart",
                "--log-level",
                "warn",
                "--concurrency",
                "2",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let envoy = Self {
            child,
            port,
            admin_port,
            log,
        };
        let ready = format!("http://127.0.0.1:{admin_port}/ready");
        for _ in 0..500 {
            if let Ok(r) = reqwest::get(&ready).await
                && r.status().is_success()
            {
                return envoy;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "envoy not ready; log:\n{}",
            std::fs::read_to_string(&envoy.log).unwrap_or_default()
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response: status, serving sim (if any), body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub served_by: Option<String>,
    pub body: Vec<u8>,
    pub headers: reqwest::header::HeaderMap,
}

impl Reply {
    /// A response header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub async fn post(
    client: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let served_by = r
        .headers()
        .get("x-vllm-sim-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap().to_vec();
    Reply {
        status,
        served_by,
        body,
        headers,
    }
}

pub fn chat(text: &str, stream: bool) -> String {
    serde_json::json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 8,
        "stream": stream,
        "stream_options": {"include_usage": stream},
    })
    .to_string()
}

pub fn completion(text: &str, stream: bool) -> String {
    serde_json::json!({"model": "tiny", "prompt": text, "max_tokens": 8, "stream": stream}).to_string()
}

/// Waits until the EPP's scrapes reflect the sims' reported load (two scrape intervals and a
/// publish window are plenty; this polls the EPP's own per-pod queue gauge instead of sleeping
/// blindly).
pub async fn wait_scraped(epp: &Epp, sims: &[&Sim], queues: &[u32]) {
    for _ in 0..200 {
        let text = epp.metrics().await;
        let all = sims
            .iter()
            .zip(queues)
            .all(|(s, q)| text.contains(&format!("model_server_pod=\"{}\"}} {q}", s.addr)));
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("EPP never saw the queues {queues:?}:\n{}", epp.metrics().await);
}

/// e2e tests each start Envoy and the EPP; on two cores they run one at a time.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
