//! Overload: a pool of `vllm-sim` servers behind a real Envoy, offered about twice what it can
//! serve, by two tenants at 3:1, each sending a critical (priority 10) and a sheddable
//! (priority -1) objective. Three front ends side by side:
//!
//! * `flow-control`: this EPP with `featureGates: [flowControl]`, round-robin fairness in every
//!   band, a concurrency detector at the servers' running slots (also filtering endpoints
//!   without a free slot), the sheddable band held back to half the slots, a bounded negative
//!   band;
//! * `no-flow-control`: the same EPP and detector without the gate (sheddable requests are
//!   refused 429 while the pool is saturated, everything else is routed at once);
//! * `round-robin`: Envoy alone.
//!
//! First the pool's capacity is measured (closed loop at its slot count) and the critical
//! objective's unloaded TTFT (flow control, a quarter of capacity). Every request is counted:
//! served (200), or refused with its status and `x-llm-d-request-dropped-reason`.
//!
//! `cargo bench --bench overload -- [--duration 20] [--load 2.0] [--min-ceiling 0.5] [--out DIR]`
//! (`scripts/overload` also plots the result).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use epp_testkit::e2e::{Envoy, Shape, Sim};
use epp_testkit::extproc::{Epp, start_live};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

const SIMS: usize = 4;
const SLOTS: u32 = 2;
const OUTPUT_TOKENS: u32 = 24;

/// The EPP's configuration: with flow control, bands with round-robin fairness, the lowest
/// band held back to half the slots (`priority-holdback-policy`) so that critical requests
/// find room, and the detector also filtering endpoints without a free slot; without, the
/// same scorers and detector (which then sheds sheddable requests at saturation).
fn config(flow_control: bool, min_ceiling: f64) -> String {
    let (gate, fc, policies, filter) = if flow_control {
        (
            "featureGates: [flowControl]\n",
            "flowControl:
  defaultRequestTTL: 10s
  saturationDetector: {pluginRef: slots}
  usageLimitPolicyPluginRef: holdback
  defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy}
  defaultNegativePriorityBand: {maxRequests: 32, fairnessPolicyRef: round-robin-fairness-policy}
  priorityBands:
  - {priority: 10, fairnessPolicyRef: round-robin-fairness-policy}
",
            "- type: round-robin-fairness-policy
- name: holdback
  type: priority-holdback-policy
  parameters: {minCeiling: MIN}
",
            "  - {pluginRef: slots}\n",
        )
    } else {
        (
            "",
            "flowControl:\n  saturationDetector: {pluginRef: slots}\n",
            "",
            "",
        )
    };
    let policies = policies.replace("MIN", &min_ceiling.to_string());
    format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
{gate}{fc}plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- name: slots
  type: concurrency-detector
  parameters: {{maxConcurrency: {SLOTS}}}
{policies}schedulingProfiles:
- name: default
  plugins:
{filter}  - {{pluginRef: queue-scorer, weight: 2}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
"
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
enum Class {
    Critical,
    Sheddable,
}

#[derive(Debug, Clone)]
struct Request {
    tenant: &'static str,
    class: Class,
    body: String,
}

#[derive(Debug, Default, Clone)]
struct Sample {
    status: u16,
    reason: Option<String>,
    ttft: Option<Duration>,
}

fn body(rng: &mut SmallRng) -> String {
    let words = [
        "alpha", "bravo", "cargo", "delta", "ember", "fjord", "gamma", "harbor",
    ];
    let text: Vec<&str> = (0..160)
        .map(|_| words[rng.random_range(0..words.len())])
        .collect();
    serde_json::json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": text.join(" ")}],
        "max_tokens": OUTPUT_TOKENS,
        "stream": true,
    })
    .to_string()
}

/// `count` requests: tenant A three times as often as B, one in five critical.
fn requests(count: usize, seed: u64) -> Vec<Request> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..count)
        .map(|_| Request {
            tenant: if rng.random_range(0..4) < 3 {
                "tenant-a"
            } else {
                "tenant-b"
            },
            class: if rng.random_range(0..5) == 0 {
                Class::Critical
            } else {
                Class::Sheddable
            },
            body: body(&mut rng),
        })
        .collect()
}

async fn send(client: &reqwest::Client, url: &str, req: &Request) -> Sample {
    let start = Instant::now();
    let objective = match req.class {
        Class::Critical => "critical",
        Class::Sheddable => "sheddable",
    };
    let Ok(mut resp) = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-llm-d-inference-fairness-id", req.tenant)
        .header("x-llm-d-inference-objective", objective)
        .body(req.body.clone())
        .send()
        .await
    else {
        return Sample::default();
    };
    let mut sample = Sample {
        status: resp.status().as_u16(),
        reason: resp
            .headers()
            .get("x-llm-d-request-dropped-reason")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        ttft: None,
    };
    while let Ok(Some(chunk)) = resp.chunk().await {
        if sample.ttft.is_none() && sample.status == 200 && chunk.windows(6).any(|w| w == b"data: ") {
            sample.ttft = Some(start.elapsed());
        }
    }
    sample
}

fn pct(mut v: Vec<Duration>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64()
}

/// Poisson arrivals at `rate` for `requests`, all answered before returning.
async fn run(url: &str, rate: f64, requests: Vec<Request>, seed: u64) -> Vec<(Request, Sample)> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let url: Arc<str> = url.into();
    let mut rng = SmallRng::seed_from_u64(seed);
    let start = tokio::time::Instant::now();
    let mut at = 0.0;
    let mut tasks = Vec::with_capacity(requests.len());
    for req in requests {
        at += -rng.random::<f64>().max(1e-12).ln() / rate;
        tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let s = send(&client, &url, &req).await;
            (req, s)
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Requests per second the pool completes with every slot busy (closed loop, one client per
/// slot).
async fn capacity(url: &str) -> f64 {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let reqs = requests(400, 1);
    let per = (SIMS as u32 * SLOTS) as usize;
    let start = Instant::now();
    let deadline = Duration::from_secs(5);
    let mut tasks = Vec::new();
    for w in 0..per {
        let (client, url, reqs) = (client.clone(), url.to_owned(), reqs.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0u32;
            let mut i = w;
            while start.elapsed() < deadline {
                if send(&client, &url, &reqs[i % reqs.len()]).await.status == 200 {
                    done += 1;
                }
                i += per;
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    f64::from(total) / start.elapsed().as_secs_f64()
}

#[derive(Debug, serde::Serialize)]
struct ClassResult {
    mode: String,
    class: Class,
    tenant: String,
    sent: usize,
    served: usize,
    refused: BTreeMap<String, usize>,
    unanswered: usize,
    ttft_p50: f64,
    ttft_p90: f64,
}

fn summarize(mode: &str, samples: &[(Request, Sample)]) -> Vec<ClassResult> {
    let mut out = Vec::new();
    for class in [Class::Critical, Class::Sheddable] {
        for tenant in ["tenant-a", "tenant-b"] {
            let mine: Vec<&Sample> = samples
                .iter()
                .filter(|(r, _)| r.class == class && r.tenant == tenant)
                .map(|(_, s)| s)
                .collect();
            let mut refused = BTreeMap::new();
            for s in mine.iter().filter(|s| s.status != 200 && s.status != 0) {
                *refused
                    .entry(format!("{} {}", s.status, s.reason.as_deref().unwrap_or("-")))
                    .or_insert(0) += 1;
            }
            let ttft: Vec<Duration> = mine.iter().filter_map(|s| s.ttft).collect();
            out.push(ClassResult {
                mode: mode.to_owned(),
                class,
                tenant: tenant.to_owned(),
                sent: mine.len(),
                served: mine.iter().filter(|s| s.status == 200).count(),
                refused,
                unanswered: mine.iter().filter(|s| s.status == 0).count(),
                ttft_p50: pct(ttft.clone(), 0.5),
                ttft_p90: pct(ttft, 0.9),
            });
        }
    }
    out
}

fn ttft_p90(samples: &[(Request, Sample)], class: Class) -> f64 {
    pct(
        samples
            .iter()
            .filter(|(r, _)| r.class == class)
            .filter_map(|(_, s)| s.ttft)
            .collect(),
        0.9,
    )
}

enum Front {
    /// The EPP is kept alive by being held here.
    Epp {
        _epp: Box<Epp>,
        envoy: Envoy,
    },
    RoundRobin(Envoy),
}

impl Front {
    fn url(&self) -> String {
        match self {
            Self::Epp { envoy: e, .. } | Self::RoundRobin(e) => e.url("/v1/chat/completions"),
        }
    }
}

async fn front(mode: &str, pool: &[SocketAddr], min_ceiling: f64) -> Front {
    if mode == "round-robin" {
        return Front::RoundRobin(Envoy::start(Shape::RoundRobin, 0, pool).await);
    }
    let epp = start_live(&config(mode == "flow-control", min_ceiling), pool, &[]).await;
    epp.objectives.replace(
        [("critical".to_owned(), 10), ("sheddable".to_owned(), -1)]
            .into_iter()
            .collect(),
    );
    let envoy = Envoy::start(Shape::AiGateway, epp.addr.port(), pool).await;
    // Wait until the EPP serves (its pool scraped once).
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let probe = Request {
        tenant: "probe",
        class: Class::Critical,
        body: body(&mut SmallRng::seed_from_u64(0)),
    };
    for _ in 0..100 {
        if send(&client, &envoy.url("/v1/chat/completions"), &probe)
            .await
            .status
            == 200
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Front::Epp {
        _epp: Box::new(epp),
        envoy,
    }
}

fn arg(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let duration: f64 = arg(&args, "--duration").map_or(20.0, |d| d.parse().unwrap());
    let load: f64 = arg(&args, "--load").map_or(2.0, |d| d.parse().unwrap());
    let min_ceiling: f64 = arg(&args, "--min-ceiling").map_or(0.5, |d| d.parse().unwrap());
    let out = PathBuf::from(arg(&args, "--out").unwrap_or_else(|| "target/overload".into()));
    std::fs::create_dir_all(&out).unwrap();

    let mut sims = Vec::new();
    for _ in 0..SIMS {
        sims.push(
            Sim::start(|c| {
                c.max_num_seqs = SLOTS;
                c.time_scale = 1.0;
            })
            .await,
        );
    }
    let pool: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();

    let cap = {
        let f = front("round-robin", &pool, min_ceiling).await;
        capacity(&f.url()).await
    };
    let rate = cap * load;
    let count = (rate * duration).round() as usize;
    println!(
        "pool: {SIMS} vllm-sim servers × {SLOTS} slots, {OUTPUT_TOKENS} output tokens; capacity {cap:.1} requests/s; offered {rate:.1}/s ({load}×) for {duration} s = {count} requests; holdback minCeiling {min_ceiling}\n"
    );

    let unloaded = {
        let f = front("flow-control", &pool, min_ceiling).await;
        let n = ((cap / 4.0) * duration.min(10.0)) as usize;
        run(&f.url(), cap / 4.0, requests(n, 7), 7).await
    };
    let base = ttft_p90(&unloaded, Class::Critical);
    println!(
        "critical TTFT p90 unloaded (flow control, {:.1}/s): {base:.3} s\n",
        cap / 4.0
    );

    println!(
        "| mode | class | tenant | sent | served | refused (status reason: n) | unanswered | TTFT p50 | TTFT p90 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut all: Vec<ClassResult> = Vec::new();
    let mut headline = Vec::new();
    for mode in ["flow-control", "no-flow-control", "round-robin"] {
        let f = front(mode, &pool, min_ceiling).await;
        let samples = run(&f.url(), rate, requests(count, 42), 42).await;
        drop(f);
        for r in summarize(mode, &samples) {
            println!(
                "| {} | {:?} | {} | {} | {} | {} | {} | {:.3} | {:.3} |",
                r.mode,
                r.class,
                r.tenant,
                r.sent,
                r.served,
                r.refused
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.unanswered,
                r.ttft_p50,
                r.ttft_p90
            );
            all.push(r);
        }
        let shed: Vec<&(Request, Sample)> = samples
            .iter()
            .filter(|(r, s)| r.class == Class::Sheddable && s.status == 200)
            .collect();
        let a = shed.iter().filter(|(r, _)| r.tenant == "tenant-a").count();
        let share_a = a as f64 / shed.len().max(1) as f64;
        headline.push(serde_json::json!({
            "mode": mode,
            "critical_ttft_p90": ttft_p90(&samples, Class::Critical),
            "critical_ttft_p90_over_unloaded": ttft_p90(&samples, Class::Critical) / base,
            "sheddable_ttft_p90": ttft_p90(&samples, Class::Sheddable),
            "sheddable_served_share_tenant_a": share_a,
            "answered": samples.iter().filter(|(_, s)| s.status != 0).count(),
            "sent": samples.len(),
        }));
    }
    println!();
    println!(
        "| mode | critical TTFT p90 (× unloaded) | sheddable TTFT p90 | tenant A's share of served sheddable | answered |"
    );
    println!("|---|---|---|---|---|");
    for h in &headline {
        println!(
            "| {} | {:.3} s ({:.2}×) | {:.3} s | {:.1} % | {}/{} |",
            h["mode"].as_str().unwrap(),
            h["critical_ttft_p90"].as_f64().unwrap(),
            h["critical_ttft_p90_over_unloaded"].as_f64().unwrap(),
            h["sheddable_ttft_p90"].as_f64().unwrap(),
            100.0 * h["sheddable_served_share_tenant_a"].as_f64().unwrap(),
            h["answered"],
            h["sent"]
        );
    }
    let json = serde_json::json!({
        "min_ceiling": min_ceiling,
        "capacity": cap,
        "rate": rate,
        "unloaded_critical_ttft_p90": base,
        "headline": headline,
        "classes": all,
    });
    let path = out.join("overload.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("\nresults: {}", path.display());
}
