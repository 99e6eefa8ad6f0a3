//! `sglang-smoke`: SGLang's router (PyPI `sglang-router`, policy `cache_aware`) in front of four
//! in-process vllm-sim servers, through the `SglangRouter` helper that routing benchmarks use.
//!
//! Sends 20 chat requests sharing a 2 KB system prompt (every other one streamed) and two
//! completions, prints which simulator served each (the `x-vllm-sim-id` header, which the router
//! passes back) and each simulator's counters, and checks that the router kept the shared prefix
//! on one simulator. (The unrelated completions land there too: on a prefix miss the router
//! picks the worker with the fewest requests in flight, and with sequential requests that is a
//! tie, which goes to the first worker in its list.) Then drops the router (its process is
//! killed and waited for) and stops the simulators. Loopback only; bounded.
//!
//! `cargo bench --bench sglang_smoke` (the interpreter comes from `scripts/ensure-sglang-router`:
//! `$SGLANG_ROUTER_PYTHON`, else `.venv/bin/python`, installing `sglang-router` there).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use epp_testkit::sglang::SglangRouter;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vllm_sim::{SIM_ID_HEADER, SimConfig, Simulator, serve};

const SIMS: usize = 4;
const CHATS: usize = 20;
const MAX_TOKENS: u32 = 8;

/// The interpreter `scripts/ensure-sglang-router` names (it installs the router if needed).
fn router_python() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/ensure-sglang-router");
    let out = Command::new(script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/ensure-sglang-router");
    assert!(
        out.status.success(),
        "scripts/ensure-sglang-router failed: {}",
        out.status
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

struct Sim {
    addr: SocketAddr,
    sim: Arc<Simulator>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start_sim(i: usize) -> Sim {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sim = Simulator::new(SimConfig {
        served_by: format!("sim-{i}"),
        time_scale: 0.1,
        ..SimConfig::default()
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, sim.clone(), async move {
        let _ = stopped.await;
    }));
    Sim {
        addr,
        sim,
        stop,
        task,
    }
}

/// What one request through the router came back with.
struct Answer {
    served_by: String,
    text: String,
    events: usize,
}

/// POSTs `body` to the router; a streamed answer is read to `data: [DONE]`.
async fn send(client: &reqwest::Client, url: &str, body: &Value) -> Answer {
    let stream = body["stream"].as_bool().unwrap_or(false);
    let mut resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let served_by = resp
        .headers()
        .get(SIM_ID_HEADER)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_else(|| "(no x-vllm-sim-id)".to_owned());
    let mut raw = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        raw.extend_from_slice(&chunk);
    }
    let raw = String::from_utf8(raw).unwrap();
    assert!(status.is_success(), "{url}: {status}: {raw}");
    if !stream {
        let v: Value = serde_json::from_str(&raw).unwrap();
        let choice = &v["choices"][0];
        let text = choice["message"]["content"]
            .as_str()
            .or(choice["text"].as_str())
            .unwrap();
        return Answer {
            served_by,
            text: text.to_owned(),
            events: 0,
        };
    }
    assert!(
        raw.ends_with("data: [DONE]\n\n"),
        "stream not ended by [DONE]: {raw}"
    );
    let mut text = String::new();
    let mut events = 0;
    for data in raw.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        events += 1;
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        let choice = &v["choices"][0];
        let piece = choice["delta"]["content"].as_str().or(choice["text"].as_str());
        text.push_str(piece.unwrap_or(""));
    }
    Answer {
        served_by,
        text,
        events,
    }
}

async fn run() {
    let python = router_python();
    let sims: Vec<Sim> = futures_util::future::join_all((1..=SIMS).map(start_sim)).await;
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();
    for s in &sims {
        println!("{} on {}", s.sim.config().served_by, s.addr);
    }

    let started = Instant::now();
    let router = SglangRouter::start(&python, &addrs, &[]).await;
    println!(
        "SGLang router (cache_aware) on {}, all {SIMS} workers healthy after {:.1?}\n",
        router.url,
        started.elapsed()
    );

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let system = "You are a meticulous assistant for a logistics company; answer briefly. ".repeat(30)
        [..2048]
        .to_owned();
    let chat_url = format!("{}/v1/chat/completions", router.url);
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    let mut first = None;
    for i in 0..CHATS {
        let stream = i % 2 == 1;
        let body = json!({
            "model": "tiny",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": format!("Question {i}: where is parcel {}?", 1000 + i * 7)},
            ],
            "max_tokens": MAX_TOKENS,
            "stream": stream,
        });
        let a = send(&client, &chat_url, &body).await;
        assert!(!a.text.is_empty(), "chat {i}: empty answer");
        println!(
            "chat {i:>2} {:<10} -> {}  ({} chars{})",
            if stream { "streamed" } else { "unstreamed" },
            a.served_by,
            a.text.len(),
            if stream {
                format!(", {} events", a.events)
            } else {
                String::new()
            }
        );
        first.get_or_insert_with(|| a.served_by.clone());
        *served.entry(a.served_by).or_default() += 1;
    }

    let mut completions: BTreeMap<String, usize> = BTreeMap::new();
    for stream in [false, true] {
        let body = json!({
            "model": "tiny",
            "prompt": "Write a haiku about routers. ".repeat(8),
            "max_tokens": MAX_TOKENS,
            "stream": stream,
        });
        let a = send(&client, &format!("{}/v1/completions", router.url), &body).await;
        assert!(!a.text.is_empty(), "completion: empty answer");
        println!(
            "completion {:<10} -> {}  ({} chars)",
            if stream { "streamed" } else { "unstreamed" },
            a.served_by,
            a.text.len()
        );
        *completions.entry(a.served_by).or_default() += 1;
    }

    println!("\nsimulator  chats  completions  received  prefix hits / queries (tokens)");
    for s in &sims {
        let st = s.sim.stats();
        let chats = served.get(&st.id).copied().unwrap_or(0);
        let comps = completions.get(&st.id).copied().unwrap_or(0);
        println!(
            "{:<9}  {chats:>5}  {comps:>11}  {:>8}  {:>6} / {}",
            st.id, st.requests_received, st.prefix_cache_hits, st.prefix_cache_queries
        );
        assert_eq!(
            st.requests_received,
            (chats + comps) as u64,
            "{}: the x-vllm-sim-id headers and /sim/stats disagree",
            st.id
        );
    }
    let (top, top_count) = served.iter().max_by_key(|(_, n)| **n).unwrap();
    println!(
        "\ncache-aware stickiness: {top_count}/{CHATS} chats on {top} (the first went to {})",
        first.unwrap()
    );
    assert!(
        *top_count >= CHATS - 2,
        "expected the shared system prompt to keep chats on one simulator: {served:?}"
    );

    let url = router.url.clone();
    drop(router);
    let gone = client.get(format!("{url}/health")).send().await.is_err();
    assert!(gone, "the router still answers after drop");
    println!("router stopped (its process was killed and reaped)");

    for s in sims {
        let _ = s.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), s.task)
            .await
            .expect("simulator did not stop")
            .unwrap()
            .unwrap();
    }
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}
