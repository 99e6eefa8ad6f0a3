//! Routing quality: the same workload, at the same load, against the same pool of model
//! servers, through each routing strategy a user could pick:
//!
//! * `round-robin`: Envoy with a round-robin cluster (what a Kubernetes Service gives);
//! * `affinity`: no router, the client sends group `g` to server `g % n` (perfect static group
//!   affinity: the hit-rate upper bound for `shared_prefix`);
//! * `epp-random`: Envoy + this EPP with `random-picker`;
//! * `epp-default`: Envoy + this EPP with the seed ConfigMap's profile (queue, KV, prefix, weight 1);
//! * `epp-v14`: Envoy + this EPP with the v1.4+ weights (queue 2, KV 2, prefix 3);
//! * `epp-builtin`: Envoy + this EPP with no configuration: the built-in default profile;
//! * `epp-baseline`: llm-d-router v0.10's "optimized baseline": the v1.4 weights plus
//!   `no-hit-lru-scorer` (weight 2), which spreads prompts no server holds;
//! * `epp-active`: prefix 3, KV 2 and `active-request-scorer` 2 (what this EPP has in flight
//!   on each server) in place of the queue scorer; `epp-active-queue` adds the queue scorer at
//!   weight 1;
//! * `sglang`: SGLang's Python-packaged router (`sglang-router`), policy `cache_aware`;
//! * `smg-cache-aware`, `smg-prefix-hash`, `smg-least-load`: the Shepherd Model Gateway (PyPI
//!   `smg`) with that policy;
//! * `vllm-router-cache-aware`, `vllm-router-power-of-two`: vLLM's router (PyPI `vllm-router`);
//! * `epp-precise`: Envoy + this EPP with the v1.4 weights, the prefix scorer reading the
//!   precise producer (the servers' KV events, the model's tokenizer in process);
//! * `epp-precise-lru`: the same with `no-hit-lru-scorer` (weight 2), as `epp-baseline`;
//! * `epp-precise-2`, `epp-v14-2`: the same two profiles with two EPP replicas behind one
//!   Envoy (ext_proc streams balanced between them), which share nothing;
//! * `vllm-router-kv-aware`: vLLM's router, policy `kv_aware`, on the same servers' KV events
//!   (it asks each server's `/v1/chat/completions/render` for tokens).
//!
//! Servers (`--backend`): `sim` (default) runs `--servers 4` simulators, restarted between
//! strategies so each starts with cold caches. When a precise strategy runs, every strategy of
//! that run gets simulators that tokenize with the fixture model's tokenizer and publish KV
//! events, each on its own loopback address. `vllm` runs `--servers 2` real vLLM servers (CPU
//! build, the tiny model of `scripts/ensure-vllm`, `--kv-blocks 96` blocks of 32 tokens,
//! `--max-num-seqs 4`), each pinned to one core, started once and their prefix caches reset
//! between strategies; the KV-event strategies are not run there (vLLM would bind its event
//! socket on every interface).
//!
//! Load: Poisson `--rates` (requests/s, `--duration` seconds each), or a closed loop with
//! `--concurrency` requests in flight sending `--requests` requests (default: each question of
//! each group once, shuffled). `--repeat n` runs each cell n times (seeds +100 apart). The
//! `shared_prefix` shape takes `--groups`, `--questions` and `--system-prompt-len`.
//! `--reset-every <s>` resets one server's prefix cache every `s` seconds during each run.
//! An EPP strategy named with the suffix `+no-response-body` (`epp-v14+no-response-body`) runs
//! behind the gateway shape that sends the EPP no response body.
//!
//! For each strategy and load: TTFT p50/p90/p99 (streaming, observed at the client), the
//! inter-token latency (ITL: gaps between content chunks) p50/p90, end-to-end latency p50/p90,
//! output tokens/s, the servers' prefix-cache hit rate (`prefix_cache_hits /
//! prefix_cache_queries`), the requests each server took, and, on simulators, how often a
//! group's request went to another server than the group's previous one (`moved`). Results go
//! to stdout (a Markdown table) and `<out>/results-<workload>[-vllm][-seed<n>].json`.
//!
//! `cargo bench --bench routing_quality -- [--backend sim|vllm] [--rates 5,10,20,30,40]
//!  [--duration 25] [--concurrency 4] [--requests n] [--repeat 1] [--strategies a,b,...]
//!  [--workload shared_prefix|multi_turn|control] [--groups g] [--questions q]
//!  [--system-prompt-len tokens] [--out target/routing-quality] [--servers n]
//!  [--reset-every <seconds>] [--seed 42] [--epp-arg=<flag> ...] [--client own|inference-perf]`
//!
//! `--client inference-perf` sends the load with the field's load generator instead (see
//! `inference_perf.rs`; `shared_prefix` only, no `affinity`); results are named
//! `results-<workload>[-vllm][-seed<n>]-inference-perf.json`.
//!
//! Envoy comes from `$ENVOY_BIN` or `.venv`; SGLang's router from `$SGLANG_ROUTER_PYTHON` or
//! `.venv`; `vllm-router` from `$VLLM_ROUTER_BIN` or `.venv`, `smg` from `$SMG_BIN` or `.venv-smg`; vLLM from
//! `$VLLM_SERVE` or `.venv-vllm` (`scripts/routing-quality` installs them and plots).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod front;
mod inference_perf;
mod pool;
mod workload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use epp_testkit::e2e::Sim;
pub(crate) use front::Front;
use front::{EventPorts, Strategy, front};
pub(crate) use pool::Pool;
use pool::VllmOptions;
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

/// One request's outcome.
#[derive(Debug, Default, Clone)]
struct Sample {
    ok: bool,
    ttft: Duration,
    e2e: Duration,
    /// Gaps between successive content chunks after the first (inter-token latency).
    itl: Vec<Duration>,
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
    let mut last = None;
    // A stream cut short is a failure, not a fast answer.
    let mut done = false;
    while let Ok(Some(chunk)) = resp.chunk().await {
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let Some(data) = line.strip_prefix(b"data: ") else {
                continue;
            };
            if data.trim_ascii() == b"[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
                continue;
            };
            if v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                let now = start.elapsed();
                first.get_or_insert(now);
                if let Some(prev) = last.replace(now) {
                    sample.itl.push(now - prev);
                }
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                sample.output_tokens = n;
            }
        }
    }
    sample.e2e = start.elapsed();
    sample.ttft = first.unwrap_or(sample.e2e);
    sample.ok = first.is_some() && done;
    sample
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64()
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct RateResult {
    workload: String,
    strategy: String,
    /// `sim` or `vllm`.
    backend: &'static str,
    /// Who sent the load: `own` (this bench) or `inference-perf`.
    client: &'static str,
    /// Offered Poisson rate (requests/s); 0 in closed-loop runs.
    rate: f64,
    /// Requests kept in flight in closed-loop runs (`--concurrency`); 0 for Poisson runs.
    concurrency: usize,
    requests: usize,
    ok: usize,
    ttft_p50: f64,
    ttft_p90: f64,
    ttft_p99: f64,
    /// Inter-token latency over every gap between content chunks of every request.
    itl_p50: f64,
    itl_p90: f64,
    e2e_p50: f64,
    e2e_p90: f64,
    output_tokens_per_s: f64,
    hit_rate: f64,
    /// Requests each server took.
    spread: Vec<usize>,
    /// Of the requests that follow an earlier one of their group (conversation, system
    /// prompt) in sending order, the share served by another server than that one; absent
    /// when the servers do not say who served (real vLLM).
    moved: Option<f64>,
}

/// Resets one server's prefix cache every `every` (round robin, running requests preempted)
/// until dropped.
fn resetter(pool: &Pool, every: Duration) -> tokio::task::JoinHandle<()> {
    let urls = pool.reset_urls();
    tokio::spawn(async move {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        for url in urls.iter().cycle() {
            tick.tick().await;
            let _ = client.post(url).send().await;
        }
    })
}

/// How requests are offered.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Load {
    /// Poisson arrivals at this many requests per second.
    Rate(f64),
    /// A closed loop keeping this many requests in flight.
    Concurrency(usize),
}

async fn run_load(
    front: &Front,
    pool: &Pool,
    workload: &Workload,
    load: Load,
    count: usize,
    seed: u64,
    reset_every: Option<Duration>,
) -> RateResult {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(180))
        .build()
        .unwrap();
    let before = pool.counters().await;
    let resets = reset_every.map(|every| resetter(pool, every));
    let start = tokio::time::Instant::now();
    let (groups, samples) = match load {
        Load::Rate(rate) => {
            let requests = workload.requests(count, seed);
            let arrivals = poisson_arrivals(rate, count, seed ^ 0x5eed);
            poisson(front, &client, workload, requests, arrivals, start).await
        }
        Load::Concurrency(n) => closed(front, &client, workload.requests_once(count, seed), n).await,
    };
    let wall = start.elapsed().as_secs_f64();
    if let Some(r) = resets {
        r.abort();
    }
    let (hit_rate, spread) = pool.counters().await.since(&before);
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let mut ttft: Vec<Duration> = ok.iter().map(|s| s.ttft).collect();
    let mut e2e: Vec<Duration> = ok.iter().map(|s| s.e2e).collect();
    let mut itl: Vec<Duration> = ok.iter().flat_map(|s| s.itl.iter().copied()).collect();
    ttft.sort_unstable();
    e2e.sort_unstable();
    itl.sort_unstable();
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
    let (rate, concurrency) = match load {
        Load::Rate(r) => (r, 0),
        Load::Concurrency(n) => (0.0, n),
    };
    RateResult {
        workload: workload.name().to_owned(),
        strategy: String::new(),
        backend: pool.backend(),
        client: "own",
        rate,
        concurrency,
        requests: samples.len(),
        ok: ok.len(),
        ttft_p50: pct(&ttft, 0.5),
        ttft_p90: pct(&ttft, 0.9),
        ttft_p99: pct(&ttft, 0.99),
        itl_p50: pct(&itl, 0.5),
        itl_p90: pct(&itl, 0.9),
        e2e_p50: pct(&e2e, 0.5),
        e2e_p90: pct(&e2e, 0.9),
        output_tokens_per_s: ok.iter().map(|s| s.output_tokens).sum::<u64>() as f64 / wall,
        hit_rate,
        spread,
        moved: (follows > 0).then(|| moved as f64 / follows as f64),
    }
}

/// Sends `requests` at `arrivals` (seconds from `start`); returns each one's group and sample.
async fn poisson(
    front: &Front,
    client: &reqwest::Client,
    workload: &Workload,
    requests: Vec<workload::Request>,
    arrivals: Vec<f64>,
    start: tokio::time::Instant,
) -> (Vec<usize>, Vec<Sample>) {
    let mut tasks = Vec::with_capacity(requests.len());
    let mut groups = Vec::with_capacity(requests.len());
    // Closed loop: a turn that arrives while its conversation's previous turn is still being
    // answered waits for that answer (each turn's task holds a sender its successor awaits);
    // TTFT counts from the send.
    let mut turns: HashMap<usize, tokio::sync::oneshot::Receiver<()>> = HashMap::new();
    for (req, at) in requests.into_iter().zip(arrivals) {
        tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
        let client = client.clone();
        let url = front.url("/v1/chat/completions", req.group);
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
    let mut samples = Vec::with_capacity(tasks.len());
    for t in tasks {
        samples.push(t.await.unwrap());
    }
    (groups, samples)
}

/// Sends `requests` in order, `n` at a time (each worker takes the next one when its last is
/// answered); returns each one's group and sample in sending order.
async fn closed(
    front: &Front,
    client: &reqwest::Client,
    requests: Vec<workload::Request>,
    n: usize,
) -> (Vec<usize>, Vec<Sample>) {
    let groups: Vec<usize> = requests.iter().map(|r| r.group).collect();
    let queue = Arc::new(parking_lot::Mutex::new(
        requests
            .into_iter()
            .enumerate()
            .collect::<std::collections::VecDeque<_>>(),
    ));
    let urls: Vec<String> = groups
        .iter()
        .map(|g| front.url("/v1/chat/completions", *g))
        .collect();
    let urls = Arc::new(urls);
    let workers: Vec<_> = (0..n.max(1))
        .map(|_| {
            let (queue, client, urls) = (queue.clone(), client.clone(), urls.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                loop {
                    let next = queue.lock().pop_front();
                    let Some((i, req)) = next else { break };
                    done.push((i, send(&client, &urls[i], req.body).await));
                }
                done
            })
        })
        .collect();
    let mut samples = vec![Sample::default(); groups.len()];
    for w in workers {
        for (i, s) in w.await.unwrap() {
            samples[i] = s;
        }
    }
    (groups, samples)
}

/// The suffix that runs an EPP strategy behind the gateway shape sending it no response body.
const LEAN: &str = "+no-response-body";

struct Options {
    /// Extra `epp` flags (`--epp-arg=--refresh-metrics-interval=10ms`, repeatable).
    epp_args: Vec<String>,
    loads: Vec<Load>,
    duration: f64,
    /// Requests per closed-loop run (`--requests`; default: the workload's distinct requests).
    requests: Option<usize>,
    /// Each strategy, and whether it runs behind the gateway shape without response bodies
    /// (`<strategy>+no-response-body`).
    strategies: Vec<(Strategy, bool)>,
    workload: Workload,
    out: PathBuf,
    /// Servers in the pool (`--servers`, or `--sims`).
    servers: usize,
    /// Real vLLM servers instead of simulated ones (`--backend vllm`).
    vllm: Option<VllmOptions>,
    reset_every: Option<Duration>,
    /// First seed; load `i` uses `seed + i` (repeat a run with another seed to see its spread).
    seed: u64,
    /// Runs of each strategy at each load (`--repeat`), with seeds `seed`, `seed + 100`, ...
    repeat: usize,
    /// The load comes from `inference-perf` (`--client inference-perf`).
    inference_perf: bool,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let list = |s: String| -> Vec<String> { s.split(',').map(|x| x.trim().to_owned()).collect() };
    let vllm = match get("--backend").as_deref() {
        None | Some("sim") => None,
        Some("vllm") => Some(VllmOptions {
            serve: get("--vllm-serve")
                .or_else(|| std::env::var("VLLM_SERVE").ok())
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/../../.venv-vllm/serve-tiny"
                    ))
                }),
            kv_blocks: get("--kv-blocks").map_or(96, |n| n.parse().unwrap()),
            max_num_seqs: get("--max-num-seqs").map_or(4, |n| n.parse().unwrap()),
        }),
        Some(other) => panic!("unknown backend {other} (sim or vllm)"),
    };
    let loads = match get("--concurrency") {
        Some(c) => list(c)
            .iter()
            .map(|n| Load::Concurrency(n.parse().unwrap()))
            .collect(),
        None => list(get("--rates").unwrap_or_else(|| "5,10,20,30,40".into()))
            .iter()
            .map(|r| Load::Rate(r.parse().unwrap()))
            .collect(),
    };
    let mut workload = match get("--workload").as_deref() {
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
    };
    if let Workload::SharedPrefix {
        groups,
        prompts_per_group,
        system_prompt_len,
        ..
    } = &mut workload
    {
        let set = |flag: &str, v: &mut usize| {
            if let Some(n) = get(flag) {
                *v = n.parse().unwrap();
            }
        };
        set("--groups", groups);
        set("--questions", prompts_per_group);
        set("--system-prompt-len", system_prompt_len);
    }
    let strategies: Vec<(Strategy, bool)> = get("--strategies")
        .map(|s| {
            list(s)
                .iter()
                .map(|x| match x.strip_suffix(LEAN) {
                    Some(base) if Strategy::parse(base).is_epp() => (Strategy::parse(base), true),
                    Some(_) => panic!("{x}: only an epp-* strategy runs behind a gateway shape"),
                    None => (Strategy::parse(x), false),
                })
                .collect()
        })
        .unwrap_or_else(|| Strategy::ALL.iter().map(|s| (*s, false)).collect());
    let inference_perf = match get("--client").as_deref() {
        None | Some("own") => false,
        Some("inference-perf") => true,
        Some(other) => panic!("unknown client {other} (own or inference-perf)"),
    };
    if inference_perf && get("--reset-every").is_some() {
        panic!("--reset-every needs the bench's own client");
    }
    if inference_perf && strategies.iter().any(|(s, _)| *s == Strategy::Affinity) {
        panic!("affinity needs the bench's own client: inference-perf does not say which group a request is");
    }
    if vllm.is_some() {
        if let Some((s, _)) = strategies.iter().find(|(s, _)| s.needs_events()) {
            panic!(
                "{} is not run on real vLLM: its servers would have to bind KV-event sockets on every interface",
                s.name()
            );
        }
        if let Some((s, _)) = strategies.iter().find(|(s, _)| s.replicas() > 1) {
            panic!("{} (two EPP replicas) is not run on real vLLM yet", s.name());
        }
    }
    Options {
        epp_args: args
            .iter()
            .filter_map(|a| a.strip_prefix("--epp-arg="))
            .map(str::to_owned)
            .collect(),
        loads,
        duration: get("--duration").map(|d| d.parse().unwrap()).unwrap_or(25.0),
        requests: get("--requests").map(|n| n.parse().unwrap()),
        strategies,
        workload,
        out: get("--out")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target/routing-quality")),
        servers: get("--servers")
            .or_else(|| get("--sims"))
            .map(|n| n.parse().unwrap())
            .unwrap_or(if vllm.is_some() { 2 } else { 4 }),
        vllm,
        reset_every: get("--reset-every").map(|s| Duration::from_secs_f64(s.parse().unwrap())),
        seed: get("--seed").map(|s| s.parse().unwrap()).unwrap_or(42),
        repeat: get("--repeat").map_or(1, |n| n.parse().unwrap()),
        inference_perf,
    }
}

/// Starts `n` simulators; with `events`, tokenizing ones that publish KV events, each on its
/// own loopback address.
async fn start_sims(n: usize, events: Option<EventPorts>, strategy: Strategy) -> Pool {
    let mut sims = Vec::new();
    for i in 0..n {
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
                        // vllm-router subscribes to the empty topic; the EPP's filter is the
                        // reference's `kv@`.
                        topic: if strategy == Strategy::KvAware {
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
    Pool::Sims(sims)
}

fn row(r: &RateResult) -> String {
    let load = if r.concurrency > 0 {
        format!("c{}", r.concurrency)
    } else {
        format!("{}", r.rate)
    };
    format!(
        "| {} | {load} | {}/{} | {:.3} | {:.3} | {:.3} | {:.1} | {:.3} | {:.3} | {:.0} | {:.1} % | {} | {:?} |",
        r.strategy,
        r.ok,
        r.requests,
        r.ttft_p50,
        r.ttft_p90,
        r.ttft_p99,
        r.itl_p50 * 1000.0,
        r.e2e_p50,
        r.e2e_p90,
        r.output_tokens_per_s,
        r.hit_rate * 100.0,
        r.moved.map_or("–".into(), |m| format!("{:.0} %", m * 100.0)),
        r.spread
    )
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let opts = options();
    std::fs::create_dir_all(&opts.out).unwrap();
    let mut results: Vec<RateResult> = Vec::new();
    let backend = if opts.vllm.is_some() {
        "real vLLM"
    } else {
        "simulated"
    };
    println!(
        "workload {} · {} {backend} servers · loads {:?} · {} s per rate\n",
        opts.workload.name(),
        opts.servers,
        opts.loads,
        opts.duration
    );
    println!(
        "| strategy | load | ok/sent | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 ms | E2E p50 | E2E p90 | out tok/s | hit rate | moved | spread |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let events = opts.strategies.iter().any(|(s, _)| s.needs_events()).then(|| {
        let ips: Vec<std::net::IpAddr> = (0..opts.servers)
            .map(|i| format!("127.0.0.{}", 10 + i).parse().unwrap())
            .collect();
        let ports = epp_testkit::free_ports_on(&ips, 2);
        EventPorts {
            socket: ports[0],
            replay: ports[1],
        }
    });
    // Real servers start once (about a minute) and are reset between strategies.
    let real = match &opts.vllm {
        Some(v) => Some(Pool::start_vllm(v, opts.servers).await),
        None => None,
    };
    for (strategy, lean) in &opts.strategies {
        // Simulators restart for every strategy; real servers are emptied instead.
        let sims = match &real {
            Some(p) => {
                p.reset().await;
                None
            }
            None => Some(start_sims(opts.servers, events, *strategy).await),
        };
        let pool = sims
            .as_ref()
            .or(real.as_ref())
            .expect("simulators or real servers");
        let front = front(*strategy, *lean, &pool.addrs(), &opts.epp_args, events).await;
        for (i, load) in opts.loads.iter().enumerate() {
            for run in 0..opts.repeat {
                let seed = opts.seed + i as u64 + 100 * run as u64;
                let count = match load {
                    Load::Rate(rate) => ((rate * opts.duration).round() as usize).max(1),
                    Load::Concurrency(_) => opts.requests.unwrap_or(opts.workload.distinct()),
                };
                // Real servers keep their caches between runs: empty them before every run
                // after the strategy's first.
                if (i > 0 || run > 0) && real.is_some() {
                    pool.reset().await;
                }
                let mut r = if opts.inference_perf {
                    let dir = opts.out.join("inference-perf").join(format!(
                        "{}{}-{i}-{run}",
                        strategy.name(),
                        if *lean { LEAN } else { "" }
                    ));
                    inference_perf::measure(&front, pool, &opts.workload, *load, opts.duration, count, &dir)
                        .await
                } else {
                    run_load(&front, pool, &opts.workload, *load, count, seed, opts.reset_every).await
                };
                r.strategy = format!("{}{}", strategy.name(), if *lean { LEAN } else { "" });
                println!("{}", row(&r));
                results.push(r);
                if let Front::Router(router) = &front
                    && *strategy == Strategy::KvAware
                {
                    eprintln!("vllm-router: {}", router.kv_counters().await);
                }
            }
        }
        drop(front);
        // Before the pause: the next simulators bind the same KV-event ports.
        drop(sims);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut suffix = match (opts.vllm.is_some(), opts.seed) {
        (false, 42) => String::new(),
        (true, 42) => "-vllm".to_owned(),
        (false, s) => format!("-seed{s}"),
        (true, s) => format!("-vllm-seed{s}"),
    };
    if opts.inference_perf {
        suffix.push_str("-inference-perf");
    }
    let path = opts
        .out
        .join(format!("results-{}{suffix}.json", opts.workload.name()));
    std::fs::write(&path, serde_json::to_string_pretty(&results).unwrap()).unwrap();
    println!("\nresults: {}", path.display());
}
