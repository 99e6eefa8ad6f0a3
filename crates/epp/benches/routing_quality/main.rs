//! Routing quality: the same workload, at the same request rates, against the same pool of
//! simulated vLLM servers, through each routing strategy a user could pick:
//!
//! * `round-robin`: Envoy with a round-robin cluster (what a Kubernetes Service gives);
//! * `epp-random`: Envoy + this EPP with `random-picker`;
//! * `epp-default`: Envoy + this EPP with the seed ConfigMap's profile (queue, KV, prefix, weight 1);
//! * `epp-v14`: Envoy + this EPP with the v1.4+ default weights (queue 2, KV 2, prefix 3);
//! * `epp-baseline`: llm-d-router v0.10's "optimized baseline": the v1.4 weights plus
//!   `no-hit-lru-scorer` (weight 2), which spreads prompts no server holds;
//! * `sglang`: SGLang's router, policy `cache_aware`;
//! * `epp-precise`: Envoy + this EPP with the v1.4 weights, the prefix scorer reading the
//!   precise producer (the servers' KV events, the model's tokenizer in process);
//! * `epp-precise-lru`: the same with `no-hit-lru-scorer` (weight 2), as `epp-baseline`;
//! * `epp-precise-2`, `epp-v14-2`: the same two profiles with two EPP replicas behind one
//!   Envoy (ext_proc streams balanced between them), which share nothing;
//! * `vllm-router-kv-aware`: vLLM's own router (PyPI `vllm-router`), policy `kv_aware`, on the
//!   same servers' KV events (it asks each server's `/v1/chat/completions/render` for tokens).
//!
//! When a precise strategy runs, every strategy of that run gets servers that tokenize with the
//! fixture model's tokenizer and publish KV events (`--tokenizer` and `--kv-events-config` of
//! `vllm-sim`), each on its own loopback address, so all strategies see the same servers.
//! `--reset-every <s>` resets one server's prefix cache (round robin, running requests
//! preempted) every `s` seconds during each rate: caches emptied mid-run.
//!
//! The sims restart between strategies so every strategy starts with cold caches. For each
//! strategy and rate: TTFT p50/p90/p99 (streaming, observed at the client), end-to-end
//! latency p50/p90, output tokens/s, the sims' prefix-cache hit rate
//! (`prefix_cache_hits / prefix_cache_queries`), how often a group's request went to another
//! server than the group's previous one (`moved`) and the spread of requests over the sims.
//! Results go to stdout (a Markdown table) and `<out>/results-<workload>[-seed<n>].json`.
//!
//! `cargo bench --bench routing_quality -- [--rates 5,10,20,30,40] [--duration 25]
//!  [--strategies round-robin,epp-random,epp-default,epp-v14,epp-baseline,sglang,epp-precise,
//!  epp-precise-lru,epp-precise-2,epp-v14-2,vllm-router-kv-aware]
//!  [--workload shared_prefix|multi_turn|control] [--out target/routing-quality] [--sims 4]
//!  [--reset-every <seconds>] [--seed 42] [--epp-arg=<flag> ...]`
//!
//! Envoy comes from `$ENVOY_BIN` or `.venv`; SGLang's router from `$SGLANG_ROUTER_PYTHON` or
//! `.venv`; vLLM's router from `$VLLM_ROUTER_BIN` or `.venv` (`scripts/routing-quality` installs
//! them and plots the results).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod workload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use epp_testkit::e2e::{Envoy, Epp, Shape, Sim};
use epp_testkit::sglang;
use workload::{Workload, poisson_arrivals};

/// The simulated pool: small KV caches (400 blocks of 16 tokens: room for about four of the
/// workload's system prompts per server), prefill dominated by uncached tokens, 4 slots.
fn sim_config(c: &mut vllm_sim::SimConfig) {
    c.time_scale = 1.0;
    c.kv_blocks = 400;
    c.block_size = 16;
    c.max_num_seqs = 4;
    c.prefill_seconds_per_token = 0.0004;
    c.decode_seconds_per_token = 0.008;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    RoundRobin,
    EppRandom,
    EppDefault,
    EppV14,
    EppBaseline,
    Sglang,
    EppPrecise,
    EppPreciseLru,
    EppPrecise2,
    EppV14x2,
    KvAware,
}

impl Strategy {
    const ALL: [Strategy; 11] = [
        Self::RoundRobin,
        Self::EppRandom,
        Self::EppDefault,
        Self::EppV14,
        Self::EppBaseline,
        Self::Sglang,
        Self::EppPrecise,
        Self::EppPreciseLru,
        Self::EppPrecise2,
        Self::EppV14x2,
        Self::KvAware,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::EppRandom => "epp-random",
            Self::EppDefault => "epp-default",
            Self::EppV14 => "epp-v14",
            Self::EppBaseline => "epp-baseline",
            Self::Sglang => "sglang",
            Self::EppPrecise => "epp-precise",
            Self::EppPreciseLru => "epp-precise-lru",
            Self::EppPrecise2 => "epp-precise-2",
            Self::EppV14x2 => "epp-v14-2",
            Self::KvAware => "vllm-router-kv-aware",
        }
    }

    /// Whether the servers must publish KV events (and so tokenize).
    fn needs_events(self) -> bool {
        matches!(
            self,
            Self::EppPrecise | Self::EppPreciseLru | Self::EppPrecise2 | Self::KvAware
        )
    }

    /// EPP replicas behind Envoy.
    fn replicas(self) -> usize {
        if matches!(self, Self::EppPrecise2 | Self::EppV14x2) {
            2
        } else {
            1
        }
    }

    fn parse(s: &str) -> Self {
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

/// The scorer `epp-baseline` and `epp-precise-lru` add, and its place in the profile.
const NO_HIT_LRU: (&str, &str) = (
    "- type: no-hit-lru-scorer\n",
    "  - {pluginRef: no-hit-lru-scorer, weight: 2}\n",
);

/// llm-d-router v0.10's "optimized baseline" profile.
fn baseline_config() -> String {
    format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
{}schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 2}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
{}",
        NO_HIT_LRU.0, NO_HIT_LRU.1
    )
}

/// The KV-event ports every tokenizing server publishes on (each on its own address).
#[derive(Debug, Clone, Copy)]
struct EventPorts {
    socket: u16,
    replay: u16,
}

/// The v1.4 weights with the prefix scorer reading the precise producer, subscribed to every
/// server (replay on), speculative entries on (as llm-d's perf configuration); with `lru`, the
/// no-hit LRU scorer too.
fn precise_config(ports: EventPorts, lru: bool) -> String {
    let (plugin, entry) = if lru { NO_HIT_LRU } else { ("", "") };
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
enum Front {
    Envoy(Envoy),
    Epp(Envoy, #[allow(dead_code)] Vec<Epp>),
    Sglang(sglang::SglangRouter),
    VllmRouter(VllmRouter),
}

impl Front {
    fn url(&self, path: &str) -> String {
        match self {
            Front::Envoy(e) | Front::Epp(e, _) => e.url(path),
            Front::Sglang(r) => format!("{}{path}", r.url),
            Front::VllmRouter(r) => format!("http://127.0.0.1:{}{path}", r.port),
        }
    }
}

/// vLLM's router with `kv_aware`, subscribed to each server's KV events; killed on drop.
struct VllmRouter {
    child: std::process::Child,
    port: u16,
    metrics_port: u16,
}

impl Drop for VllmRouter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl VllmRouter {
    /// Its KV-routing counters (`vllm_router_kv_*`), for the log.
    async fn kv_counters(&self) -> String {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
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

    async fn start(pool: &[std::net::SocketAddr], events: EventPorts) -> Self {
        let bin = std::env::var("VLLM_ROUTER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../../.venv/bin/vllm-router"
                ))
            });
        let port = epp_testkit::free_port();
        let metrics_port = epp_testkit::free_port();
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--prometheus-host",
                "127.0.0.1",
                "--prometheus-port",
                &metrics_port.to_string(),
            ])
            .arg("--worker-urls")
            .args(pool.iter().map(|a| format!("http://{a}")))
            .args(["--policy", "kv_aware", "--router-temperature", "0"])
            .args(["--kv-event-model", "tiny", "--kv-event-block-size", "16"])
            .args(["--worker-startup-check-interval", "1", "--log-level", "warning"]);
        for a in pool {
            cmd.args([
                "--kv-event-source",
                &format!("http://{a}=tcp://{}:{}", a.ip(), events.socket),
            ]);
        }
        let log = std::env::temp_dir().join(format!("vllm-router-{port}.log"));
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e} (scripts/ensure-vllm-router installs it)",
                    bin.display()
                )
            });
        let router = Self {
            child,
            port,
            metrics_port,
        };
        let client = reqwest::Client::new();
        for _ in 0..600 {
            if let Ok(r) = client.get(format!("http://127.0.0.1:{port}/health")).send().await
                && r.status().is_success()
            {
                return router;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "vllm-router did not start; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

async fn front(
    strategy: Strategy,
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
        Strategy::EppV14 | Strategy::EppV14x2 => vec![],
        Strategy::EppBaseline => vec![format!("--config-text={}", baseline_config())],
        Strategy::EppPrecise | Strategy::EppPrecise2 | Strategy::EppPreciseLru => {
            let ports = events.expect("a precise strategy runs on servers that publish events");
            let lru = strategy == Strategy::EppPreciseLru;
            vec![format!("--config-text={}", precise_config(ports, lru))]
        }
        Strategy::KvAware => {
            let ports = events.expect("kv_aware runs on servers that publish events");
            return Front::VllmRouter(VllmRouter::start(pool, ports).await);
        }
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
    let envoy = Envoy::start_edited(Shape::AiGateway, epps[0].grpc_port, pool, |t| {
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

/// One request's outcome.
#[derive(Debug, Default, Clone)]
struct Sample {
    ok: bool,
    ttft: Duration,
    e2e: Duration,
    output_tokens: u64,
    served_by: Option<String>,
}

async fn send(client: &reqwest::Client, url: &str, body: String) -> Sample {
    let start = Instant::now();
    let mut sample = Sample::default();
    let Ok(mut resp) = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    else {
        return sample;
    };
    if !resp.status().is_success() {
        return sample;
    }
    sample.served_by = resp
        .headers()
        .get("x-vllm-sim-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut buf = Vec::new();
    let mut first = None;
    while let Ok(Some(chunk)) = resp.chunk().await {
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let Some(data) = line.strip_prefix(b"data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
                continue;
            };
            if first.is_none()
                && v["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            {
                first = Some(start.elapsed());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                sample.output_tokens = n;
            }
        }
    }
    sample.e2e = start.elapsed();
    sample.ttft = first.unwrap_or(sample.e2e);
    sample.ok = first.is_some();
    sample
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64()
}

#[derive(Debug, serde::Serialize)]
struct RateResult {
    workload: String,
    strategy: String,
    rate: f64,
    requests: usize,
    ok: usize,
    ttft_p50: f64,
    ttft_p90: f64,
    ttft_p99: f64,
    e2e_p50: f64,
    e2e_p90: f64,
    output_tokens_per_s: f64,
    hit_rate: f64,
    spread: Vec<usize>,
    /// Of the requests that follow an earlier one of their group (conversation, system
    /// prompt) in sending order, the share served by another server than that one.
    moved: f64,
}

fn hits(sims: &[Sim]) -> (u64, u64) {
    sims.iter().fold((0, 0), |(h, q), s| {
        let st = s.sim.stats();
        (h + st.prefix_cache_hits, q + st.prefix_cache_queries)
    })
}

/// Resets one server's prefix cache every `every` (round robin, running requests preempted)
/// until dropped.
fn resetter(sims: &[Sim], every: Duration) -> tokio::task::JoinHandle<()> {
    let urls: Vec<String> = sims
        .iter()
        .map(|s| format!("http://{}/reset_prefix_cache?reset_running_requests=true", s.addr))
        .collect();
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        for url in urls.iter().cycle() {
            tick.tick().await;
            let _ = client.post(url).send().await;
        }
    })
}

async fn run_rate(
    front: &Front,
    sims: &[Sim],
    workload: &Workload,
    rate: f64,
    duration: f64,
    seed: u64,
    reset_every: Option<Duration>,
) -> RateResult {
    let count = ((rate * duration).round() as usize).max(1);
    let requests = workload.requests(count, seed);
    let arrivals = poisson_arrivals(rate, count, seed ^ 0x5eed);
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(180))
        .build()
        .unwrap();
    let url = Arc::new(front.url("/v1/chat/completions"));
    let (h0, q0) = hits(sims);
    let resets = reset_every.map(|every| resetter(sims, every));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(count);
    let mut groups = Vec::with_capacity(count);
    // Closed loop: a turn that arrives while its conversation's previous turn is still being
    // answered waits for that answer (each turn's task holds a sender its successor awaits);
    // TTFT counts from the send.
    let mut turns: HashMap<usize, tokio::sync::oneshot::Receiver<()>> = HashMap::new();
    for (req, at) in requests.into_iter().zip(arrivals) {
        tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
        let (client, url) = (client.clone(), url.clone());
        groups.push(req.group);
        let (answered, next) = tokio::sync::oneshot::channel::<()>();
        let previous = if workload.closed_loop() {
            turns.insert(req.group, next)
        } else {
            None
        };
        tasks.push(tokio::spawn(async move {
            if let Some(previous) = previous {
                // Err: the previous turn's task dropped its sender, i.e. it finished.
                let _ = previous.await;
            }
            let sample = send(&client, &url, req.body).await;
            drop(answered);
            sample
        }));
    }
    let mut samples = Vec::with_capacity(count);
    for t in tasks {
        samples.push(t.await.unwrap());
    }
    let wall = start.elapsed().as_secs_f64();
    if let Some(r) = resets {
        r.abort();
    }
    let (h1, q1) = hits(sims);
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let mut ttft: Vec<Duration> = ok.iter().map(|s| s.ttft).collect();
    let mut e2e: Vec<Duration> = ok.iter().map(|s| s.e2e).collect();
    ttft.sort_unstable();
    e2e.sort_unstable();
    let spread = sims
        .iter()
        .map(|s| {
            samples
                .iter()
                .filter(|x| x.served_by.as_deref() == Some(s.id.as_str()))
                .count()
        })
        .collect();
    let mut last: HashMap<usize, &str> = HashMap::new();
    let (mut follows, mut moved) = (0usize, 0usize);
    for (g, s) in groups.iter().zip(&samples) {
        let Some(by) = s.served_by.as_deref() else {
            continue;
        };
        if let Some(prev) = last.insert(*g, by) {
            follows += 1;
            moved += usize::from(prev != by);
        }
    }
    RateResult {
        workload: workload.name().to_owned(),
        strategy: String::new(),
        rate,
        requests: count,
        ok: ok.len(),
        ttft_p50: pct(&ttft, 0.5),
        ttft_p90: pct(&ttft, 0.9),
        ttft_p99: pct(&ttft, 0.99),
        e2e_p50: pct(&e2e, 0.5),
        e2e_p90: pct(&e2e, 0.9),
        output_tokens_per_s: ok.iter().map(|s| s.output_tokens).sum::<u64>() as f64 / wall,
        hit_rate: if q1 > q0 {
            (h1 - h0) as f64 / (q1 - q0) as f64
        } else {
            0.0
        },
        spread,
        moved: if follows > 0 {
            moved as f64 / follows as f64
        } else {
            0.0
        },
    }
}

struct Options {
    /// Extra `epp` flags (`--epp-arg=--refresh-metrics-interval=10ms`, repeatable).
    epp_args: Vec<String>,
    rates: Vec<f64>,
    duration: f64,
    strategies: Vec<Strategy>,
    workload: Workload,
    out: PathBuf,
    sims: usize,
    reset_every: Option<Duration>,
    /// First seed; rate `i` uses `seed + i` (repeat a run with another seed to see its spread).
    seed: u64,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    Options {
        epp_args: args
            .iter()
            .filter_map(|a| a.strip_prefix("--epp-arg="))
            .map(str::to_owned)
            .collect(),
        rates: get("--rates")
            .unwrap_or_else(|| "5,10,20,30,40".into())
            .split(',')
            .map(|r| r.trim().parse().unwrap())
            .collect(),
        duration: get("--duration").map(|d| d.parse().unwrap()).unwrap_or(25.0),
        strategies: get("--strategies")
            .map(|s| s.split(',').map(|x| Strategy::parse(x.trim())).collect())
            .unwrap_or_else(|| Strategy::ALL.to_vec()),
        workload: match get("--workload").as_deref() {
            None | Some("shared_prefix") => Workload::shared_prefix(),
            Some("multi_turn") => Workload::MultiTurn {
                conversations: 24,
                turns: 8,
                system_prompt_len: 400,
                turn_len: 64,
                output_len: 24,
            },
            Some("control") => Workload::Control {
                prompt_len: 1200,
                output_len: 24,
            },
            Some(other) => panic!("unknown workload {other}"),
        },
        out: get("--out")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target/routing-quality")),
        sims: get("--sims").map(|n| n.parse().unwrap()).unwrap_or(4),
        reset_every: get("--reset-every").map(|s| Duration::from_secs_f64(s.parse().unwrap())),
        seed: get("--seed").map(|s| s.parse().unwrap()).unwrap_or(42),
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let opts = options();
    std::fs::create_dir_all(&opts.out).unwrap();
    let mut results: Vec<RateResult> = Vec::new();
    println!(
        "workload {} · {} sims · rates {:?}/s · {} s per rate\n",
        opts.workload.name(),
        opts.sims,
        opts.rates,
        opts.duration
    );
    println!(
        "| strategy | rate | ok/sent | TTFT p50 | TTFT p90 | TTFT p99 | E2E p50 | E2E p90 | out tok/s | hit rate | moved | spread |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let events = opts.strategies.iter().any(|s| s.needs_events()).then(|| {
        let ips: Vec<std::net::IpAddr> = (0..opts.sims)
            .map(|i| format!("127.0.0.{}", 10 + i).parse().unwrap())
            .collect();
        let ports = epp_testkit::free_ports_on(&ips, 2);
        EventPorts {
            socket: ports[0],
            replay: ports[1],
        }
    });
    for strategy in &opts.strategies {
        let mut sims = Vec::new();
        for i in 0..opts.sims {
            sims.push(match events {
                None => Sim::start(sim_config).await,
                Some(ports) => {
                    let ip = format!("127.0.0.{}", 10 + i);
                    Sim::start_tokenizing(
                        format!("{ip}:0").parse().unwrap(),
                        sim_config,
                        Some(vllm_sim::kvevents::PublisherConfig {
                            endpoint: format!("tcp://{ip}:{}", ports.socket),
                            bind: Some(true),
                            replay_endpoint: Some(format!("tcp://{ip}:{}", ports.replay)),
                            // vllm-router subscribes to the empty topic; the EPP's filter
                            // is the reference's `kv@`.
                            topic: if *strategy == Strategy::KvAware {
                                String::new()
                            } else {
                                format!("kv@{ip}@tiny")
                            },
                            buffer_steps: 10_000,
                            dp_rank: 0,
                            ..Default::default()
                        }),
                    )
                    .await
                }
            });
        }
        let pool: Vec<_> = sims.iter().map(|s| s.addr).collect();
        let front = front(*strategy, &pool, &opts.epp_args, events).await;
        for (i, rate) in opts.rates.iter().enumerate() {
            let mut r = run_rate(
                &front,
                &sims,
                &opts.workload,
                *rate,
                opts.duration,
                opts.seed + i as u64,
                opts.reset_every,
            )
            .await;
            r.strategy = strategy.name().to_owned();
            println!(
                "| {} | {} | {}/{} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.1} % | {:.0} % | {:?} |",
                r.strategy,
                r.rate,
                r.ok,
                r.requests,
                r.ttft_p50,
                r.ttft_p90,
                r.ttft_p99,
                r.e2e_p50,
                r.e2e_p90,
                r.output_tokens_per_s,
                r.hit_rate * 100.0,
                r.moved * 100.0,
                r.spread
            );
            results.push(r);
            if let Front::VllmRouter(router) = &front {
                eprintln!("vllm-router: {}", router.kv_counters().await);
            }
        }
        drop(front);
        drop(sims);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let suffix = if opts.seed == 42 {
        String::new()
    } else {
        format!("-seed{}", opts.seed)
    };
    let path = opts
        .out
        .join(format!("results-{}{suffix}.json", opts.workload.name()));
    std::fs::write(&path, serde_json::to_string_pretty(&results).unwrap()).unwrap();
    println!("\nresults: {}", path.display());
}
