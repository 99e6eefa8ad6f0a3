//! EPP CPU and memory while scraping 100 (or `--endpoints N`) model servers every 50 ms (the
//! reference's default interval), measured on the real `epp` binary from /proc.
//!
//! `cargo bench --bench scrape_cpu [-- --filtered] [--endpoints 1000]` — in-process servers on
//! 127.0.0.1
//! answer `/metrics` with a page captured from vLLM 0.32 under load (54 KB); with
//! `--filtered` they honour `?name[]=` as vLLM's Python Prometheus client does and send only
//! the requested series. The EPP runs as a child process with a static pool of them. After a
//! warm-up, the EPP's user+system CPU time over the measurement window gives its average core
//! use.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::RawQuery;
use axum::routing::get;

const PAGE: &str = include_str!("../../../fixtures/vllm-0.32-cpu/metrics_busy.txt");
const ENDPOINTS: usize = 100;
const WARMUP: Duration = Duration::from_secs(5);
const WINDOW: Duration = Duration::from_secs(20);

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the ")" of the command name: state is field 3; utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kb / 1024.0
}

/// The page as the Python Prometheus client serves it for `?name[]=a&name[]=b`: only those
/// samples (and their family's HELP/TYPE lines). Without the parameter: the whole page.
fn page_for(query: Option<&str>, honour_filter: bool) -> String {
    let names: Vec<String> = query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "name%5B%5D" || *k == "name[]")
        .map(|(_, v)| v.replace("%3A", ":"))
        .collect();
    if !honour_filter || names.is_empty() {
        return PAGE.to_owned();
    }
    PAGE.lines()
        .filter(|l| {
            let name = if let Some(rest) = l.strip_prefix("# HELP ").or_else(|| l.strip_prefix("# TYPE ")) {
                rest.split(' ').next().unwrap_or("")
            } else {
                l.split(['{', ' ']).next().unwrap_or("")
            };
            names.iter().any(|n| n == name)
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let honour_filter = args.iter().any(|a| a == "--filtered");
    let endpoints = args
        .iter()
        .position(|a| a == "--endpoints")
        .and_then(|i| args.get(i + 1))
        .map_or(ENDPOINTS, |n| n.parse().expect("--endpoints takes a number"));
    let scrapes = Arc::new(AtomicU64::new(0));
    let mut addrs = Vec::new();
    for _ in 0..endpoints {
        let counter = scrapes.clone();
        let app = Router::new().route(
            "/metrics",
            get(move |RawQuery(q): RawQuery| {
                counter.fetch_add(1, Ordering::Relaxed);
                let page = page_for(q.as_deref(), honour_filter);
                async move { ([("content-type", "text/plain; version=0.0.4")], page) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap().to_string());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_epp"))
        .args([
            "--static-endpoints",
            &addrs.join(","),
            "--bind-address",
            "127.0.0.1",
            "--grpc-port=0",
            "--grpc-health-port=0",
            "--metrics-port=0",
            "--refresh-metrics-interval=50ms",
            "--v=1",
        ])
        .env(
            "TOKIO_WORKER_THREADS",
            std::env::var("EPP_WORKERS").unwrap_or_else(|_| "2".into()),
        )
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    tokio::time::sleep(WARMUP).await;
    let (cpu0, n0, t0) = (cpu_seconds(pid), scrapes.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(WINDOW).await;
    let (cpu1, n1, elapsed) = (cpu_seconds(pid), scrapes.load(Ordering::Relaxed), t0.elapsed());
    let rss = rss_mib(pid);
    let _ = child.kill();
    let _ = child.wait();
    let secs = elapsed.as_secs_f64();
    let served = page_for(Some("name[]=vllm:num_requests_waiting&name[]=vllm:num_requests_running&name[]=vllm:kv_cache_usage_perc&name[]=vllm:cache_config_info&name[]=vllm:lora_requests_info"), honour_filter).len();
    println!(
        "scrape_cpu endpoints={endpoints} interval=50ms servers_honour_name_filter={honour_filter} page_bytes={served} scrapes_per_s={:.0} epp_cores={:.3} epp_rss_mib={:.1}",
        (n1 - n0) as f64 / secs,
        (cpu1 - cpu0) / secs,
        rss
    );
}
