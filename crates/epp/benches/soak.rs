//! `soak`: sustained load through a real Envoy and the real `epp` binary to a pool of
//! `vllm-sim` servers, watching what an operator watches over hours: the picker's resident
//! memory, errors, and the size of its metrics page while clients send ever new model names.
//!
//! Every request names a model no one sent before (`client-<n>`) and asks, with
//! `x-llm-d-model-name-rewrite: tiny`, for the model the pool serves: the metrics page must
//! not grow with the number of distinct names. Half the requests stream.
//!
//! `cargo bench --bench soak -- [SECONDS] [RATE]` (default 600 s at 100 requests/s; the first
//! minute, or a tenth of the run if shorter, is warm-up). Needs Envoy (`scripts/ensure-envoy`).
//! Loopback only; the load is bounded by the duration and the rate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use epp_testkit::e2e::{Envoy, Epp, Shape, client, sims};
use tokio::time::Instant;

const SEED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/default-plugins.yaml");

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let seconds: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(600);
    let rate: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100);
    let warmup = Duration::from_secs((seconds / 10).min(60));
    let pool_sims = sims(4).await;
    let pool: Vec<_> = pool_sims.iter().map(|s| s.addr).collect();
    let epp = Epp::start(&pool, &["--config-file", SEED, "--metrics-endpoint-auth=false"]).await;
    let pid = epp.child.id();
    let envoy = Envoy::start(Shape::AiGateway, epp.grpc_port, &pool).await;
    let url = envoy.url("/v1/chat/completions");
    let http = client();
    let counts = Arc::new(Counts::default());
    println!(
        "soak: {seconds} s at {rate} requests/s, warm-up {} s, epp pid {pid}",
        warmup.as_secs()
    );

    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut samples: Vec<(u64, u64, usize)> = Vec::new();
    let mut next_sample = Duration::ZERO;
    let in_flight = Arc::new(tokio::sync::Semaphore::new(256));
    let mut n: u64 = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        if start.elapsed() >= next_sample {
            let page = epp.metrics().await.len();
            samples.push((start.elapsed().as_secs(), rss_kib(pid), page));
            println!(
                "t={:>4}s rss={} KiB metrics={} B sent={} ok={} errors={}",
                start.elapsed().as_secs(),
                rss_kib(pid),
                page,
                counts.sent.load(Ordering::Relaxed),
                counts.ok.load(Ordering::Relaxed),
                counts.errors.load(Ordering::Relaxed)
            );
            next_sample += Duration::from_secs(10);
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            counts.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        n += 1;
        let (http, url, counts) = (http.clone(), url.clone(), counts.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let stream = n.is_multiple_of(2);
            let body = serde_json::json!({
                "model": format!("client-{n}"),
                "messages": [{"role": "system", "content": format!("You are assistant {}.", n % 16)},
                             {"role": "user", "content": format!("question {n}")}],
                "max_tokens": 8,
                "stream": stream,
            })
            .to_string();
            counts.sent.fetch_add(1, Ordering::Relaxed);
            let r = http
                .post(&url)
                .header("content-type", "application/json")
                .header("x-llm-d-model-name-rewrite", "tiny")
                .body(body)
                .send()
                .await;
            let ok = match r {
                Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                _ => false,
            };
            if ok {
                counts.ok.fetch_add(1, Ordering::Relaxed);
            } else {
                counts.errors.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    // Let the last requests finish.
    let _ = tokio::time::timeout(Duration::from_secs(30), in_flight.acquire_many(256)).await;
    let page = epp.metrics().await.len();
    samples.push((start.elapsed().as_secs(), rss_kib(pid), page));

    let after_warmup: Vec<_> = samples
        .iter()
        .filter(|(t, _, _)| *t >= warmup.as_secs())
        .collect();
    let (first_rss, first_page) = after_warmup.first().map(|s| (s.1, s.2)).unwrap_or_default();
    let (last_rss, last_page) = samples.last().map(|s| (s.1, s.2)).unwrap_or_default();
    let (min_rss, max_rss) = after_warmup
        .iter()
        .fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s.1), hi.max(s.1)));
    let sent = counts.sent.load(Ordering::Relaxed);
    let errors = counts.errors.load(Ordering::Relaxed);
    println!("---");
    println!(
        "requests sent {sent}, ok {}, errors {errors}",
        counts.ok.load(Ordering::Relaxed)
    );
    println!("distinct client model names {n}");
    println!(
        "epp RSS after warm-up {first_rss} KiB, at the end {last_rss} KiB ({:+.1} %), range {min_rss}..{max_rss} KiB",
        (last_rss as f64 / first_rss.max(1) as f64 - 1.0) * 100.0
    );
    println!("metrics page after warm-up {first_page} B, at the end {last_page} B");
    let log = std::fs::read_to_string(&epp.log).unwrap_or_default();
    println!("panics in the epp log: {}", log.matches("panicked").count());
    // The pass marks: no error, RSS at the end within ±5 % of after warm-up, and a metrics page
    // that did not grow by more than 1 % while every request brought a new model name.
    let rss_drift = (last_rss as f64 / first_rss.max(1) as f64 - 1.0).abs();
    let page_growth = last_page as f64 / first_page.max(1) as f64 - 1.0;
    let pass = errors == 0 && !log.contains("panicked") && rss_drift <= 0.05 && page_growth <= 0.01;
    println!("{}", if pass { "PASS" } else { "FAIL" });
    if !pass {
        std::process::exit(1);
    }
}
