//! The routing strategies the benchmark compares and what each puts in front of the pool: an
//! Envoy (round robin, or with one or two EPPs and a profile), a peer router as a child process
//! (`sglang-router`, `smg`, `vllm-router`), or nothing (the client keeps each group on one
//! server: the affinity upper bound).

use std::path::PathBuf;
use std::time::Duration;

use epp_testkit::e2e::{Envoy, Epp, Shape};
use epp_testkit::sglang;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    RoundRobin,
    EppRandom,
    EppDefault,
    EppV14,
    EppBaseline,
    EppActive,
    EppActiveQueue,
    EppBuiltin,
    Sglang,
    EppPrecise,
    EppPreciseLru,
    EppPrecise2,
    EppV14x2,
    KvAware,
    Affinity,
    SmgCacheAware,
    SmgPrefixHash,
    SmgLeastLoad,
    VllmRouterCacheAware,
    VllmRouterPowerOfTwo,
}

impl Strategy {
    pub const ALL: [Strategy; 20] = [
        Self::RoundRobin,
        Self::EppRandom,
        Self::EppDefault,
        Self::EppV14,
        Self::EppBaseline,
        Self::EppActive,
        Self::EppActiveQueue,
        Self::EppBuiltin,
        Self::Sglang,
        Self::EppPrecise,
        Self::EppPreciseLru,
        Self::EppPrecise2,
        Self::EppV14x2,
        Self::KvAware,
        Self::Affinity,
        Self::SmgCacheAware,
        Self::SmgPrefixHash,
        Self::SmgLeastLoad,
        Self::VllmRouterCacheAware,
        Self::VllmRouterPowerOfTwo,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::EppRandom => "epp-random",
            Self::EppDefault => "epp-default",
            Self::EppV14 => "epp-v14",
            Self::EppBaseline => "epp-baseline",
            Self::EppActive => "epp-active",
            Self::EppActiveQueue => "epp-active-queue",
            Self::EppBuiltin => "epp-builtin",
            Self::Sglang => "sglang",
            Self::EppPrecise => "epp-precise",
            Self::EppPreciseLru => "epp-precise-lru",
            Self::EppPrecise2 => "epp-precise-2",
            Self::EppV14x2 => "epp-v14-2",
            Self::KvAware => "vllm-router-kv-aware",
            Self::Affinity => "affinity",
            Self::SmgCacheAware => "smg-cache-aware",
            Self::SmgPrefixHash => "smg-prefix-hash",
            Self::SmgLeastLoad => "smg-least-load",
            Self::VllmRouterCacheAware => "vllm-router-cache-aware",
            Self::VllmRouterPowerOfTwo => "vllm-router-power-of-two",
        }
    }

    /// Whether the servers must publish KV events (and so tokenize).
    pub fn needs_events(self) -> bool {
        matches!(
            self,
            Self::EppPrecise | Self::EppPreciseLru | Self::EppPrecise2 | Self::KvAware
        )
    }

    /// EPP replicas behind Envoy.
    pub fn replicas(self) -> usize {
        if matches!(self, Self::EppPrecise2 | Self::EppV14x2) {
            2
        } else {
            1
        }
    }

    /// Whether it puts this EPP behind Envoy (and so can take the lean gateway shape).
    pub fn is_epp(self) -> bool {
        self.name().starts_with("epp-")
    }

    pub fn parse(s: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .unwrap_or_else(|| panic!("unknown strategy {s}"))
    }
}

const RANDOM_CONFIG: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
";

/// A configuration whose one profile is `scorers` (type, weight), each a plugin of its own
/// type with default parameters.
fn scored(scorers: &[(&str, u32)]) -> String {
    let (plugins, profile) = scorer_lines(scorers);
    format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
{plugins}schedulingProfiles:
- name: default
  plugins:
{profile}"
    )
}

/// The `plugins:` entries and the profile's `plugins:` entries of `scorers` (type, weight).
fn scorer_lines(scorers: &[(&str, u32)]) -> (String, String) {
    let mut plugins = String::new();
    let mut profile = String::new();
    for (name, weight) in scorers {
        plugins.push_str(&format!("- type: {name}\n"));
        profile.push_str(&format!("  - {{pluginRef: {name}, weight: {weight}}}\n"));
    }
    (plugins, profile)
}

/// The v1.4+ weights: queue 2, KV 2, prefix 3.
const V14: [(&str, u32); 3] = [
    ("queue-scorer", 2),
    ("kv-cache-utilization-scorer", 2),
    ("prefix-cache-scorer", 3),
];

/// The scorer `epp-baseline` and `epp-precise-lru` add to the v1.4 weights.
const NO_HIT_LRU: (&str, u32) = ("no-hit-lru-scorer", 2);

/// Prefix 3, KV 2 and `active-request-scorer` 2 (requests this EPP has in flight on each
/// endpoint, exact and current, instead of the scraped waiting queue); `queue` > 0 adds the
/// queue scorer at that weight.
fn active_config(queue: u32) -> String {
    let mut scorers = vec![
        ("active-request-scorer", 2),
        ("kv-cache-utilization-scorer", 2),
        ("prefix-cache-scorer", 3),
    ];
    if queue > 0 {
        scorers.push(("queue-scorer", queue));
    }
    scored(&scorers)
}

/// The KV-event ports every tokenizing server publishes on (each on its own address).
#[derive(Debug, Clone, Copy)]
pub struct EventPorts {
    pub socket: u16,
    pub replay: u16,
}

/// The v1.4 weights with the prefix scorer reading the precise producer, subscribed to every
/// server (replay on), speculative entries on (as llm-d's perf configuration); with `lru`, the
/// no-hit LRU scorer too.
fn precise_config(ports: EventPorts, lru: bool) -> String {
    let (plugin, entry) = scorer_lines(if lru { &[NO_HIT_LRU] } else { &[] });
    let tokenizer = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/vllm-0.32-cpu/tokenization"
    );
    format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters: {{local: {{path: {tokenizer}}}}}
- type: endpoint-notification-source
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {{blockSizeTokens: 16}}
    kvEventsConfig: {{podDiscoveryConfig: {{socketPort: {}, replaySocketPort: {}}}}}
    speculativeIndexing: true
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: queue-scorer
- type: kv-cache-utilization-scorer
{plugin}dataLayer:
  sources:
  - pluginRef: endpoint-notification-source
    extractors: [{{pluginRef: precise-prefix-cache-producer}}]
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 2}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
{entry}",
        ports.socket, ports.replay
    )
}

/// What sits in front of the pool for one strategy; dropping it stops everything (the EPP is
/// held only to keep it running).
pub enum Front {
    Envoy(Envoy),
    Epp(Envoy, #[allow(dead_code)] Vec<Epp>),
    Sglang(sglang::SglangRouter),
    Router(PeerRouter),
    /// No router: the client sends each group's requests to server `group % n` (perfect static
    /// group affinity, the hit-rate upper bound).
    Affinity(Vec<std::net::SocketAddr>),
}

impl Front {
    /// Where to send a request of `group`.
    pub fn url(&self, path: &str, group: usize) -> String {
        match self {
            Front::Envoy(e) | Front::Epp(e, _) => e.url(path),
            Front::Sglang(r) => format!("{}{path}", r.url),
            Front::Router(r) => format!("http://127.0.0.1:{}{path}", r.port),
            Front::Affinity(pool) => format!("http://{}{path}", pool[group % pool.len()]),
        }
    }
}

/// A peer router run as a child process (vLLM's `vllm-router`, SGLang's `smg`), bound to
/// 127.0.0.1 with its metrics on another 127.0.0.1 port; killed on drop.
pub struct PeerRouter {
    child: std::process::Child,
    port: u16,
    metrics_port: u16,
    name: &'static str,
}

impl Drop for PeerRouter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary from `$<var>`, else the project's `<venv>/bin/<name>`.
fn venv_bin(var: &str, venv: &str, name: &str) -> PathBuf {
    std::env::var(var).map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .join(venv)
            .join("bin")
            .join(name)
    })
}

impl PeerRouter {
    /// Its KV-routing counters (`vllm_router_kv_*`), for the log.
    pub async fn kv_counters(&self) -> String {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let text = client
            .get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .send()
            .await
            .ok();
        let text = match text {
            Some(r) => r.text().await.unwrap_or_default(),
            None => String::new(),
        };
        text.lines()
            .filter(|l| l.starts_with("vllm_router_kv_"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// vLLM's router with `policy`; with `events`, `kv_aware` subscribed to each server's KV
    /// events.
    async fn vllm_router(pool: &[std::net::SocketAddr], policy: &str, events: Option<EventPorts>) -> Self {
        let bin = venv_bin("VLLM_ROUTER_BIN", ".venv", "vllm-router");
        let (port, metrics_port) = ports();
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--prometheus-host", "127.0.0.1"])
            .args(["--prometheus-port", &metrics_port.to_string()])
            .arg("--worker-urls")
            .args(pool.iter().map(|a| format!("http://{a}")))
            .args(["--policy", policy])
            .args(["--worker-startup-check-interval", "1", "--log-level", "warning"]);
        if let Some(events) = events {
            cmd.args(["--router-temperature", "0"]).args([
                "--kv-event-model",
                "tiny",
                "--kv-event-block-size",
                "16",
            ]);
            for a in pool {
                cmd.args([
                    "--kv-event-source",
                    &format!("http://{a}=tcp://{}:{}", a.ip(), events.socket),
                ]);
            }
        }
        Self::spawn(
            cmd,
            "vllm-router",
            port,
            metrics_port,
            "scripts/ensure-vllm-router",
        )
        .await
    }

    /// SGLang's Shepherd Model Gateway (`smg launch`) with `policy`, its defaults otherwise.
    async fn smg(pool: &[std::net::SocketAddr], policy: &str) -> Self {
        let bin = venv_bin("SMG_BIN", ".venv-smg", "smg");
        let (port, metrics_port) = ports();
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["launch", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--prometheus-host", "127.0.0.1"])
            .args(["--prometheus-port", &metrics_port.to_string()])
            .arg("--worker-urls")
            .args(pool.iter().map(|a| format!("http://{a}")))
            .args(["--policy", policy, "--log-level", "warn"]);
        Self::spawn(cmd, "smg", port, metrics_port, "scripts/ensure-smg").await
    }

    async fn spawn(
        mut cmd: std::process::Command,
        name: &'static str,
        port: u16,
        metrics_port: u16,
        installer: &str,
    ) -> Self {
        let log = std::env::temp_dir().join(format!("{name}-{port}.log"));
        let child = cmd
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {name}: {e} ({installer} installs it)"));
        let mut router = Self {
            child,
            port,
            metrics_port,
            name,
        };
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        for _ in 0..600 {
            if let Some(status) = router.child.try_wait().unwrap() {
                panic!("{name} exited with {status}; {}", router.log());
            }
            // Ready when it answers and routes: a model listing goes through to a worker.
            if let Ok(r) = client
                .get(format!("http://127.0.0.1:{port}/v1/models"))
                .send()
                .await
                && r.status().is_success()
            {
                return router;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{name} did not start; {}", router.log());
    }

    fn log(&self) -> String {
        let log = std::env::temp_dir().join(format!("{}-{}.log", self.name, self.port));
        format!(
            "log:\n{}{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
        )
    }
}

/// Two ports free on 127.0.0.1 a moment ago.
fn ports() -> (u16, u16) {
    let p = epp_testkit::free_ports_on(&["127.0.0.1".parse().unwrap()], 2);
    (p[0], p[1])
}

/// Starts what `strategy` puts in front of `pool`.
/// With `lean`, the EPP strategies use the gateway shape that sends the EPP no response body
/// (`examples/envoy/ai-gateway-no-response-body.yaml`).
pub async fn front(
    strategy: Strategy,
    lean: bool,
    pool: &[std::net::SocketAddr],
    extra_epp_args: &[String],
    events: Option<EventPorts>,
) -> Front {
    let seed = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/default-plugins.yaml");
    let epp_args: Vec<String> = match strategy {
        Strategy::RoundRobin => return Front::Envoy(Envoy::start(Shape::RoundRobin, 0, pool).await),
        Strategy::Sglang => {
            let python = std::env::var("SGLANG_ROUTER_PYTHON")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python"))
                });
            return Front::Sglang(sglang::SglangRouter::start(&python, pool, &[]).await);
        }
        Strategy::EppRandom => vec![format!("--config-text={RANDOM_CONFIG}")],
        Strategy::EppDefault => vec!["--config-file".into(), seed.into()],
        Strategy::EppV14 | Strategy::EppV14x2 => vec![format!("--config-text={}", scored(&V14))],
        Strategy::EppBuiltin => vec![],
        // llm-d-router v0.10's "optimized baseline" (today also the built-in default).
        Strategy::EppBaseline => {
            let [queue, kv, prefix] = V14;
            vec![format!(
                "--config-text={}",
                scored(&[queue, kv, prefix, NO_HIT_LRU])
            )]
        }
        Strategy::EppActive => vec![format!("--config-text={}", active_config(0))],
        Strategy::EppActiveQueue => vec![format!("--config-text={}", active_config(1))],
        Strategy::EppPrecise | Strategy::EppPrecise2 | Strategy::EppPreciseLru => {
            let ports = events.expect("a precise strategy runs on servers that publish events");
            let lru = strategy == Strategy::EppPreciseLru;
            vec![format!("--config-text={}", precise_config(ports, lru))]
        }
        Strategy::KvAware => {
            let ports = events.expect("kv_aware runs on servers that publish events");
            return Front::Router(PeerRouter::vllm_router(pool, "kv_aware", Some(ports)).await);
        }
        Strategy::VllmRouterCacheAware => {
            return Front::Router(PeerRouter::vllm_router(pool, "cache_aware", None).await);
        }
        Strategy::VllmRouterPowerOfTwo => {
            return Front::Router(PeerRouter::vllm_router(pool, "power_of_two", None).await);
        }
        Strategy::SmgCacheAware => return Front::Router(PeerRouter::smg(pool, "cache_aware").await),
        Strategy::SmgPrefixHash => return Front::Router(PeerRouter::smg(pool, "prefix_hash").await),
        Strategy::SmgLeastLoad => return Front::Router(PeerRouter::smg(pool, "least_load").await),
        Strategy::Affinity => return Front::Affinity(pool.to_vec()),
    };
    let mut args: Vec<&str> = epp_args.iter().map(String::as_str).collect();
    args.push("--destination-limit=1");
    args.extend(extra_epp_args.iter().map(String::as_str));
    let mut epps = Vec::new();
    for _ in 0..strategy.replicas() {
        epps.push(Epp::start(pool, &args).await);
    }
    // Further replicas join the first one's cluster: Envoy balances ext_proc streams over them.
    let others: Vec<u16> = epps.iter().skip(1).map(|e| e.grpc_port).collect();
    let shape = if lean {
        Shape::AiGatewayNoResponseBody
    } else {
        Shape::AiGateway
    };
    let envoy = Envoy::start_edited(shape, epps[0].grpc_port, pool, |t| {
        let line = "        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: {{EPP_PORT}}}}}\n";
        let mut lines = line.to_owned();
        for p in &others {
            lines.push_str(&line.replace("{{EPP_PORT}}", &p.to_string()));
        }
        assert!(others.is_empty() || t.contains(line), "the EPP cluster's endpoint line moved");
        t.replace(line, &lines)
    })
    .await;
    Front::Epp(envoy, epps)
}
