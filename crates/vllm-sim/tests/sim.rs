//! The simulated vLLM server over real HTTP: in-process servers on 127.0.0.1:0 driven with
//! reqwest, compared against the vLLM 0.32 captures in `fixtures/`, plus the binary's
//! flags and signal handling.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Client, Response, StatusCode};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vllm_sim::{SIM_ID_HEADER, SimConfig, Simulator, serve};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/vllm-0.32-cpu");

struct Sim {
    addr: SocketAddr,
    sim: Arc<Simulator>,
    client: Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Sim {
    async fn start(config: SimConfig) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sim = Simulator::new(config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, sim.clone(), async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            sim,
            client: Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn post(&self, path: &str, body: &str) -> Response {
        self.client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    async fn put(&self, path: &str, body: &str) -> Response {
        self.client
            .put(self.url(path))
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    async fn metrics(&self) -> String {
        let r = self.get("/metrics").await;
        assert_eq!(r.status(), StatusCode::OK);
        r.text().await.unwrap()
    }

    async fn stats(&self) -> Value {
        serde_json::from_str(&self.get("/sim/stats").await.text().await.unwrap()).unwrap()
    }

    /// Stops accepting and waits (bounded) for the server to finish.
    async fn shutdown(&mut self) -> std::io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap()
            .unwrap()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn fast() -> SimConfig {
    SimConfig {
        served_by: "sim-a".into(),
        time_scale: 0.0,
        ..SimConfig::default()
    }
}

fn sim_id(r: &Response) -> String {
    r.headers()
        .get(SIM_ID_HEADER)
        .expect("x-vllm-sim-id header")
        .to_str()
        .unwrap()
        .to_owned()
}

async fn json(r: Response) -> Value {
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}

fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap()).unwrap()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

/// The `data:` payloads of an SSE body.
fn events(body: &str) -> Vec<String> {
    assert!(body.ends_with("\n\n"), "events end with a blank line");
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("data event").to_owned())
        .collect()
}

/// The sample value of the first series of `family` whose line contains `labels`.
fn sample(text: &str, family: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} ")))
        .find(|l| l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {family} {labels} in metrics"))
}

/// Polls `f` every 20 ms, at most `tries` times, until it holds.
async fn eventually<F, Fut>(tries: usize, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..tries {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn completion_and_chat_have_the_vllm_shapes() {
    let sim = Sim::start(fast()).await;
    let r = sim
        .post(
            "/v1/completions",
            r#"{"model":"tiny","prompt":"0123456789abcdef0123","max_tokens":5}"#,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sim_id(&r), "sim-a");
    let c = json(r).await;
    let fixture = fixture_json("response_completion.json");
    assert_eq!(keys(&c), keys(&fixture));
    assert_eq!(keys(&c["choices"][0]), keys(&fixture["choices"][0]));
    assert_eq!(keys(&c["usage"]), keys(&fixture["usage"]));
    assert!(c["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["model"], "tiny");
    assert!(c["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    assert!(!c["choices"][0]["text"].as_str().unwrap().is_empty());
    // 20 bytes at 4 bytes per token.
    assert_eq!(c["usage"]["prompt_tokens"], 5);
    assert_eq!(c["usage"]["completion_tokens"], 5);
    assert_eq!(c["usage"]["total_tokens"], 10);

    let r = sim
        .post(
            "/v1/chat/completions",
            r#"{"model":"tiny","messages":[{"role":"system","content":"be brief"},
               {"role":"user","content":[{"type":"text","text":"hello"}]}],"max_completion_tokens":3}"#,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sim_id(&r), "sim-a");
    let c = json(r).await;
    let fixture = fixture_json("response_chat.json");
    assert_eq!(keys(&c), keys(&fixture));
    assert_eq!(keys(&c["choices"][0]), keys(&fixture["choices"][0]));
    assert_eq!(
        keys(&c["choices"][0]["message"]),
        keys(&fixture["choices"][0]["message"])
    );
    assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["choices"][0]["message"]["role"], "assistant");
    // "system" + "be brief" + "user" + "hello" = 23 bytes: 6 tokens.
    assert_eq!(c["usage"]["prompt_tokens"], 6);
    assert_eq!(c["usage"]["completion_tokens"], 3);

    // Without max_tokens the configured default applies; without a model the base model.
    let c = json(sim.post("/v1/completions", r#"{"prompt":"hi"}"#).await).await;
    assert_eq!(c["usage"]["completion_tokens"], 16);
    assert_eq!(c["model"], "tiny");
}

#[tokio::test]
async fn a_prompt_batch_gives_one_choice_per_prompt() {
    let sim = Sim::start(fast()).await;
    let c = json(
        sim.post(
            "/v1/completions",
            r#"{"prompt":["aaaa","bbbbbbbb","c"],"max_tokens":2}"#,
        )
        .await,
    )
    .await;
    let choices = c["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, ch) in choices.iter().enumerate() {
        assert_eq!(ch["index"], i);
    }
    assert_eq!(c["usage"]["prompt_tokens"], 1 + 2 + 1);
    assert_eq!(c["usage"]["completion_tokens"], 6);
    let s = sim.stats().await;
    assert_eq!(s["requests_received"], 1);
    assert_eq!(s["requests_served"], 3);
}

#[tokio::test]
async fn streamed_chat_matches_the_captured_stream() {
    let sim = Sim::start(fast()).await;
    let body = r#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":4,"stream":true,
                  "stream_options":{"include_usage":true}}"#;
    let r = sim.post("/v1/chat/completions", body).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sim_id(&r), "sim-a");
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let ev = events(&r.text().await.unwrap());
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    // Role chunk, 4 tokens, usage.
    assert_eq!(chunks.len(), 6);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks[1..5]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert!(!text.is_empty());
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "length");
    assert!(chunks[3]["choices"][0]["finish_reason"].is_null());
    let usage = &chunks[5];
    assert_eq!(usage["choices"], Value::Array(vec![]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    assert_eq!(usage["usage"]["prompt_tokens"], 3);
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    assert!(
        chunks
            .iter()
            .all(|c| c["id"] == id && c["object"] == "chat.completion.chunk")
    );

    // The same key sets as vLLM's chunks, at the top level and per choice.
    let captured = std::fs::read_to_string(format!("{FIXTURES}/response_stream.txt")).unwrap();
    let captured: Vec<Value> = events(&captured)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let shapes = |cs: &[Value]| -> BTreeSet<(BTreeSet<String>, Option<BTreeSet<String>>)> {
        cs.iter()
            .map(|c| (keys(c), c["choices"].get(0).map(keys)))
            .collect()
    };
    assert_eq!(shapes(&chunks), shapes(&captured));

    // The same text as without streaming.
    let plain = json(
        sim.post(
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":4}"#,
        )
        .await,
    )
    .await;
    assert_eq!(plain["choices"][0]["message"]["content"], text);
}

#[tokio::test]
async fn streams_without_include_usage_have_no_usage_chunk() {
    let sim = Sim::start(fast()).await;
    for (path, body) in [
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":3,"stream":true}"#,
        ),
        (
            "/v1/completions",
            r#"{"prompt":"x","max_tokens":3,"stream":true,"stream_options":{"include_usage":false}}"#,
        ),
    ] {
        let ev = events(&sim.post(path, body).await.text().await.unwrap());
        assert_eq!(ev.last().unwrap(), "[DONE]");
        for e in &ev[..ev.len() - 1] {
            let v: Value = serde_json::from_str(e).unwrap();
            assert!(v.get("usage").is_none(), "{path}: {e}");
            assert_eq!(v["choices"].as_array().unwrap().len(), 1);
        }
    }
    // A streamed batch: every prompt's tokens, then usage for all.
    let body = r#"{"prompt":["a","b"],"max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#;
    let ev = events(&sim.post("/v1/completions", body).await.text().await.unwrap());
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let per_index = |i: u64| {
        chunks
            .iter()
            .filter(|c| c["choices"].get(0).is_some_and(|ch| ch["index"] == i))
            .count()
    };
    assert_eq!((per_index(0), per_index(1)), (3, 3));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 6);
    assert_eq!(chunks.last().unwrap()["object"], "text_completion");
}

#[tokio::test]
async fn a_client_that_leaves_aborts_its_request() {
    let sim = start_timed(SimConfig {
        decode_seconds_per_token: 0.05,
        ..fast()
    })
    .await;
    let mut r = sim
        .post(
            "/v1/completions",
            r#"{"prompt":"hello","max_tokens":200,"stream":true}"#,
        )
        .await;
    let first = r.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: {"));
    assert_eq!(sim.stats().await["running"], 1);
    drop(r);
    assert!(
        eventually(250, || async { sim.stats().await["running"] == 0 }).await,
        "the request was not aborted"
    );
    let m = sim.metrics().await;
    assert_eq!(
        sample(&m, "vllm:request_success_total", "finished_reason=\"abort\""),
        1.0
    );
    assert_eq!(sample(&m, "vllm:kv_cache_usage_perc", ""), 0.0);
}

/// A server whose delays are real (time scale 1).
async fn start_timed(config: SimConfig) -> Sim {
    Sim::start(SimConfig {
        time_scale: 1.0,
        ..config
    })
    .await
}

#[tokio::test]
async fn models_health_and_version() {
    let sim = Sim::start(SimConfig {
        max_loras: 2,
        lora_adapters: vec!["ad-1".into(), "ad-2".into()],
        ..fast()
    })
    .await;
    let r = sim.get("/health").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sim_id(&r), "sim-a");
    let m = json(sim.get("/v1/models").await).await;
    let fixture = fixture_json("v1_models.json");
    assert_eq!(keys(&m), keys(&fixture));
    assert_eq!(keys(&m["data"][0]), keys(&fixture["data"][0]));
    assert_eq!(
        keys(&m["data"][0]["permission"][0]),
        keys(&fixture["data"][0]["permission"][0])
    );
    let ids: Vec<&str> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "ad-1", "ad-2"]);
    assert_eq!(m["data"][0]["max_model_len"], 1024 * 16);
    assert_eq!(m["data"][1]["parent"], "tiny");
    let v = json(sim.get("/version").await).await;
    assert_eq!(v, fixture_json("version.json"));
}

/// What SGLang's router (`sglang-router` 0.3.2) asks of a worker: `/health` at start-up and
/// every minute; its metadata probes must get 404, as from vLLM, so that it registers the
/// worker without a model and never tries to download a tokenizer; and it forwards requests
/// re-serialized with its own fields added (`max_tokens` renamed for chat), as captured here.
#[tokio::test]
async fn serves_what_sglang_router_sends() {
    let sim = Sim::start(fast()).await;
    assert_eq!(sim.get("/health").await.status(), StatusCode::OK);
    for probe in [
        "/server_info",
        "/get_server_info",
        "/model_info",
        "/get_model_info",
    ] {
        let r = sim.get(probe).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{probe}");
        assert_eq!(sim_id(&r), "sim-a");
    }
    let chat = r#"{"messages":[{"role":"system","content":"You are helpful."},
        {"role":"user","content":[{"type":"text","text":"hi"}]}],"model":"tiny","logprobs":false,
        "max_completion_tokens":3,"stream":false,"no_stop_trim":false,"ignore_eos":false,
        "continue_final_message":false,"skip_special_tokens":true,"separate_reasoning":true,
        "stream_reasoning":true,"return_hidden_states":false}"#;
    let c = json(sim.post("/v1/chat/completions", chat).await).await;
    assert_eq!(c["usage"]["completion_tokens"], 3, "{c}");
    let completion = r#"{"model":"tiny","prompt":"hello world","max_tokens":2,"stream":true,
        "stream_options":{"include_usage":true},"echo":false,"no_stop_trim":false,
        "ignore_eos":false,"skip_special_tokens":true,"return_hidden_states":false,
        "cache_salt":"s1"}"#;
    let r = sim.post("/v1/completions", completion).await;
    assert_eq!(r.status(), StatusCode::OK);
    let events = events(&r.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(events[events.len() - 2].contains(r#""completion_tokens":2"#));
    assert_eq!(sim.stats().await["requests_received"], 2);
}

#[tokio::test]
async fn errors_are_openai_shaped_and_tagged() {
    let sim = Sim::start(SimConfig {
        max_body_bytes: 1024,
        kv_blocks: 8,
        ..fast()
    })
    .await;
    let check = |status: StatusCode, kind: &'static str| {
        move |r: (StatusCode, String, Value)| {
            assert_eq!(r.0, status, "{}", r.2);
            assert_eq!(r.1, "sim-a");
            assert_eq!(r.2["error"]["type"], kind, "{}", r.2);
            assert_eq!(r.2["error"]["code"], status.as_u16());
            assert!(r.2["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
            r.2
        }
    };
    let call = |path: &'static str, body: String| {
        let sim = &sim;
        async move {
            let r = sim.post(path, &body).await;
            let status = r.status();
            let id = sim_id(&r);
            (status, id, json(r).await)
        }
    };
    let e = check(StatusCode::NOT_FOUND, "NotFoundError")(
        call("/v1/completions", r#"{"model":"gpt-9","prompt":"x"}"#.into()).await,
    );
    assert_eq!(e["error"]["param"], "model");
    assert_eq!(e["error"]["message"], "The model `gpt-9` does not exist.");
    check(StatusCode::NOT_FOUND, "NotFoundError")(
        call(
            "/v1/chat/completions",
            r#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#.into(),
        )
        .await,
    );
    for bad in [
        r#"{"prompt": "#,
        r#"{"max_tokens":3}"#,
        r#"{"prompt":"x","max_tokens":0}"#,
        r#"{"prompt":[]}"#,
        r#"{"prompt":"x","stream":"yes"}"#,
    ] {
        check(StatusCode::BAD_REQUEST, "BadRequestError")(call("/v1/completions", bad.into()).await);
    }
    check(StatusCode::BAD_REQUEST, "BadRequestError")(
        call("/v1/chat/completions", r#"{"messages":[]}"#.into()).await,
    );
    // 8 blocks of 16 tokens: 128 tokens of context.
    let e = check(StatusCode::BAD_REQUEST, "BadRequestError")(
        call("/v1/completions", r#"{"prompt":"x","max_tokens":128}"#.into()).await,
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length is 128")
    );
    check(StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLargeError")(
        call(
            "/v1/completions",
            format!(r#"{{"prompt":"{}"}}"#, "x".repeat(2000)),
        )
        .await,
    );
    let r = sim.get("/no/such/route").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(sim_id(&r), "sim-a");
    let r = sim.get("/v1/completions").await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(sim_id(&r), "sim-a");
    // Nothing above reached the engine.
    assert_eq!(sim.stats().await["requests_received"], 0);
}

#[tokio::test]
async fn prefix_cache_hits_show_in_metrics_and_stats() {
    let sim = Sim::start(fast()).await;
    // 640 bytes: 160 tokens, 10 full blocks of 16.
    let prompt = "abcdefghij".repeat(64);
    let body = format!(r#"{{"prompt":"{prompt}","max_tokens":2}}"#);
    sim.post("/v1/completions", &body).await.text().await.unwrap();
    let m = sim.metrics().await;
    assert_eq!(sample(&m, "vllm:prefix_cache_queries_total", ""), 160.0);
    assert_eq!(sample(&m, "vllm:prefix_cache_hits_total", ""), 0.0);
    sim.post("/v1/completions", &body).await.text().await.unwrap();
    // All but the last block hit (vLLM always recomputes the last prompt token).
    let m = sim.metrics().await;
    assert_eq!(sample(&m, "vllm:prefix_cache_queries_total", ""), 320.0);
    assert_eq!(sample(&m, "vllm:prefix_cache_hits_total", ""), 144.0);
    assert_eq!(sample(&m, "vllm:prompt_tokens_total", ""), 320.0);
    assert_eq!(sample(&m, "vllm:generation_tokens_total", ""), 4.0);
    assert_eq!(
        sample(&m, "vllm:request_success_total", "finished_reason=\"length\""),
        2.0
    );
    assert_eq!(sample(&m, "vllm:time_to_first_token_seconds_count", ""), 2.0);
    assert_eq!(sample(&m, "vllm:e2e_request_latency_seconds_count", ""), 2.0);
    let s = sim.stats().await;
    assert_eq!(s["prefix_cache_queries"], 320);
    assert_eq!(s["prefix_cache_hits"], 144);
    assert_eq!(s["requests_served"], 2);
    // Another model's chain (a cache salt here) does not hit.
    let salted = format!(r#"{{"prompt":"{prompt}","max_tokens":2,"cache_salt":"tenant"}}"#);
    sim.post("/v1/completions", &salted).await.text().await.unwrap();
    assert_eq!(sim.stats().await["prefix_cache_hits"], 144);
    // Finished requests leave their blocks cached but unreferenced.
    assert_eq!(sample(&sim.metrics().await, "vllm:kv_cache_usage_perc", ""), 0.0);
    assert!(sim.stats().await["cached_blocks"].as_u64().unwrap() >= 10);
}

#[tokio::test]
async fn running_and_waiting_follow_max_num_seqs() {
    let sim = start_timed(SimConfig {
        max_num_seqs: 2,
        decode_seconds_per_token: 0.02,
        ..fast()
    })
    .await;
    let mut streams = Vec::new();
    for i in 0..5 {
        let body = format!(r#"{{"prompt":"request {i}","max_tokens":100,"stream":true}}"#);
        streams.push(sim.post("/v1/completions", &body).await);
    }
    let seen = eventually(250, || async {
        let m = sim.metrics().await;
        sample(&m, "vllm:num_requests_running", "") == 2.0
            && sample(&m, "vllm:num_requests_waiting", "") == 3.0
    })
    .await;
    assert!(seen, "{}", sim.metrics().await);
    let m = sim.metrics().await;
    assert_eq!(
        sample(&m, "vllm:num_requests_waiting_by_reason", "reason=\"capacity\""),
        3.0
    );
    assert!(sample(&m, "vllm:kv_cache_usage_perc", "") > 0.0);
    drop(streams);
    assert!(eventually(250, || async { sim.stats().await["running"] == 0 }).await);
    assert_eq!(sim.stats().await["waiting"], 0);
}

#[tokio::test]
async fn overrides_replace_the_reported_load() {
    let sim = Sim::start(fast()).await;
    let r = sim
        .put(
            "/sim/overrides",
            r#"{"waiting":7,"running":3,"kv_cache_usage":0.75}"#,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sim_id(&r), "sim-a");
    let m = sim.metrics().await;
    assert_eq!(sample(&m, "vllm:num_requests_waiting", ""), 7.0);
    assert_eq!(sample(&m, "vllm:num_requests_running", ""), 3.0);
    assert_eq!(sample(&m, "vllm:kv_cache_usage_perc", ""), 0.75);
    // Stats stay real.
    let s = sim.stats().await;
    assert_eq!((s["waiting"].as_u64(), s["running"].as_u64()), (Some(0), Some(0)));
    assert_eq!(s["overrides"]["waiting"], 7);
    // The same through the library API.
    assert_eq!(sim.sim.overrides().running, Some(3));
    assert!(
        sim.sim
            .metrics_text()
            .contains("vllm:num_requests_waiting{engine=\"0\",model_name=\"tiny\"} 7.0\n")
    );

    // A partial override leaves the other values real.
    sim.put("/sim/overrides", r#"{"kv_cache_usage":0.5}"#).await;
    let m = sim.metrics().await;
    assert_eq!(sample(&m, "vllm:num_requests_waiting", ""), 0.0);
    assert_eq!(sample(&m, "vllm:kv_cache_usage_perc", ""), 0.5);

    for bad in [
        r#"{"queue":1}"#,
        r#"{"waiting":-1}"#,
        "nope",
        r#"{"kv_cache_usage":-0.5}"#,
    ] {
        let r = sim.put("/sim/overrides", bad).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    let r = sim.client.delete(sim.url("/sim/overrides")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let m = sim.metrics().await;
    assert_eq!(sample(&m, "vllm:kv_cache_usage_perc", ""), 0.0);
    assert_eq!(sample(&m, "vllm:num_requests_running", ""), 0.0);
}

#[tokio::test]
async fn metrics_mode_breaks_and_stalls_the_metrics_endpoint() {
    let mut sim = Sim::start(fast()).await;
    assert_eq!(
        sim.put("/sim/metrics-mode", "error").await.status(),
        StatusCode::NO_CONTENT
    );
    let r = sim.get("/metrics").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(sim_id(&r), "sim-a");
    assert_eq!(sim.get("/sim/metrics-mode").await.text().await.unwrap(), "error");
    assert_eq!(
        sim.put("/sim/metrics-mode", "sideways").await.status(),
        StatusCode::BAD_REQUEST
    );

    // Hang: no answer until the mode changes back.
    sim.put("/sim/metrics-mode", "hang").await;
    let pending = tokio::spawn({
        let (client, url) = (sim.client.clone(), sim.url("/metrics"));
        async move { client.get(url).send().await.unwrap().status() }
    });
    assert!(eventually(500, || async { sim.stats().await["metrics_calls_hanging"] == 1 }).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished());
    sim.put("/sim/metrics-mode", "ok").await;
    let status = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sim.stats().await["metrics_calls_hanging"], 0);

    // A hanging scrape does not hold up shutdown; it gets 503.
    sim.put("/sim/metrics-mode", "hang").await;
    let pending = tokio::spawn({
        let (client, url) = (sim.client.clone(), sim.url("/metrics"));
        async move { client.get(url).send().await.unwrap().status() }
    });
    assert!(eventually(500, || async { sim.sim.stats().metrics_calls_hanging == 1 }).await);
    sim.shutdown().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn shutdown_lets_in_flight_streams_finish() {
    let mut sim = start_timed(SimConfig {
        decode_seconds_per_token: 0.01,
        ..fast()
    })
    .await;
    let mut r = sim
        .post(
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":30,"stream":true}"#,
        )
        .await;
    let mut body = r.chunk().await.unwrap().unwrap().to_vec();
    let addr = sim.addr;
    let stop = sim.stop.take().unwrap();
    stop.send(()).unwrap();
    while let Some(chunk) = r.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    let body = String::from_utf8(body).unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"));
    let tokens = events(&body)
        .iter()
        .filter(|e| e.contains("\"content\"") && !e.contains("\"role\""))
        .count();
    assert_eq!(tokens, 30);
    sim.shutdown().await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn lora_requests_info_tracks_running_and_waiting_adapters() {
    let sim = start_timed(SimConfig {
        max_num_seqs: 4,
        max_loras: 1,
        lora_adapters: vec!["ad-1".into(), "ad-2".into()],
        decode_seconds_per_token: 0.02,
        ..fast()
    })
    .await;
    let m = sim.metrics().await;
    assert!(m.contains("# TYPE vllm:lora_requests_info gauge"));
    assert!(
        !m.contains("vllm:lora_requests_info{"),
        "no series before any request"
    );

    let first = sim
        .post(
            "/v1/completions",
            r#"{"model":"ad-1","prompt":"one","max_tokens":100,"stream":true}"#,
        )
        .await;
    assert!(eventually(250, || async { sim.stats().await["running"] == 1 }).await);
    let second = sim
        .post(
            "/v1/completions",
            r#"{"model":"ad-2","prompt":"two","max_tokens":100,"stream":true}"#,
        )
        .await;
    assert!(eventually(250, || async { sim.stats().await["waiting"] == 1 }).await);
    let m = sim.metrics().await;
    let current = m
        .lines()
        .filter(|l| l.starts_with("vllm:lora_requests_info{"))
        .max_by(|a, b| {
            let v = |l: &str| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
            v(a).total_cmp(&v(b))
        })
        .unwrap();
    assert!(
        current.starts_with(
            r#"vllm:lora_requests_info{max_lora="1",running_lora_adapters="ad-1",waiting_lora_adapters="ad-2"} "#
        ),
        "{current}"
    );
    assert_eq!(
        sample(&m, "vllm:num_requests_waiting_by_reason", "reason=\"deferred\""),
        1.0
    );
    // The answer names the adapter.
    let mut first = first;
    let chunk = first.chunk().await.unwrap().unwrap();
    let event = std::str::from_utf8(&chunk).unwrap().split("\n\n").next().unwrap();
    let first_chunk: Value = serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(first_chunk["model"], "ad-1");
    drop(second);
}

/// Families of a Prometheus text page: name → (type, label key sets of its samples).
fn families(text: &str) -> BTreeMap<String, (String, BTreeSet<Vec<String>>)> {
    let mut out: BTreeMap<String, (String, BTreeSet<Vec<String>>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            out.entry(name.to_owned()).or_default().0 = kind.to_owned();
        }
    }
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name_end = line.find(['{', ' ']).unwrap();
        let name = &line[..name_end];
        let family = if out.contains_key(name) {
            name.to_owned()
        } else {
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or_else(|| panic!("sample {name} has no TYPE"));
            assert!(["histogram", "summary"].contains(&out[base].0.as_str()), "{name}");
            base.to_owned()
        };
        let mut label_keys = Vec::new();
        if line[name_end..].starts_with('{') {
            let mut rest = &line[name_end + 1..];
            while !rest.starts_with('}') {
                let eq = rest.find('=').unwrap();
                let key = rest[..eq].trim_start_matches(',');
                if key != "le" {
                    label_keys.push(key.to_owned());
                }
                // Skip the quoted value, honouring escapes.
                let bytes = rest.as_bytes();
                let mut i = eq + 2;
                while bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                rest = rest[i + 1..].trim_start_matches(',');
            }
        }
        label_keys.sort();
        out.get_mut(&family).unwrap().1.insert(label_keys);
    }
    out
}

#[tokio::test]
async fn metric_families_match_the_vllm_fixtures() {
    let sim = Sim::start(SimConfig {
        max_loras: 2,
        lora_adapters: vec!["tiny-lora".into()],
        ..fast()
    })
    .await;
    sim.post(
        "/v1/chat/completions",
        r#"{"model":"tiny-lora","messages":[{"role":"user","content":"hello"}],"max_tokens":3}"#,
    )
    .await
    .text()
    .await
    .unwrap();
    sim.post("/v1/completions", r#"{"prompt":"hello","max_tokens":3}"#)
        .await
        .text()
        .await
        .unwrap();
    let r = sim.get("/metrics").await;
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = r.text().await.unwrap();
    let ours = families(&text);

    let mut theirs: BTreeMap<String, (String, BTreeSet<Vec<String>>)> = BTreeMap::new();
    for f in [
        "metrics_idle.txt",
        "metrics_busy.txt",
        "metrics_after.txt",
        "variant_lora/metrics_idle.txt",
        "variant_lora/metrics_busy.txt",
        "variant_lora/metrics_after.txt",
    ] {
        let text = std::fs::read_to_string(format!("{FIXTURES}/{f}")).unwrap();
        for (name, (kind, label_sets)) in families(&text) {
            let e = theirs
                .entry(name)
                .or_insert_with(|| (kind.clone(), BTreeSet::new()));
            assert_eq!(e.0, kind);
            e.1.extend(label_sets);
        }
    }

    for required in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:cache_config_info",
        "vllm:request_success_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:lora_requests_info",
    ] {
        assert!(ours.contains_key(required), "missing {required}");
        assert!(theirs.contains_key(required), "fixtures lack {required}");
    }
    assert!(!ours.contains_key("vllm:gpu_cache_usage_perc"));
    let mut compared = 0;
    for (name, (kind, label_sets)) in ours.iter().filter(|(n, _)| n.starts_with("vllm:")) {
        let Some((their_kind, their_sets)) = theirs.get(name) else {
            panic!("{name} is not a vLLM 0.32 family");
        };
        assert_eq!(kind, their_kind, "TYPE of {name}");
        assert_eq!(label_sets, their_sets, "label keys of {name}");
        compared += 1;
    }
    assert!(compared >= 40, "{compared}");
    assert_eq!(sample(&text, "vllm:cache_config_info", ""), 1.0);
    assert_eq!(sample(&text, "vllm:cache_config_info", "block_size=\"16\""), 1.0);
    assert!(text.contains("num_gpu_blocks=\"1024\""));
    // The same HELP text as vLLM for the families a router reads.
    let fixture = std::fs::read_to_string(format!("{FIXTURES}/metrics_busy.txt")).unwrap();
    for family in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_hits_total",
        "vllm:cache_config_info",
    ] {
        let help = |t: &str| {
            t.lines()
                .find(|l| l.starts_with(&format!("# HELP {family} ")))
                .map(str::to_owned)
        };
        assert_eq!(help(&text), help(&fixture), "{family}");
    }
}

mod binary {
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;

    use super::*;

    const BIN: &str = env!("CARGO_BIN_EXE_vllm-sim");

    struct Guard(Child);

    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn bad_flags_exit_non_zero_with_a_message() {
        for args in [
            &["--bogus"][..],
            &["--max-num-seqs", "0"],
            &["--kv-blocks", "99999999"],
            &["--port", "70000"],
            &["--time-scale=nan"],
            &["--decode-ms-per-token", "fast"],
            &["--lora-adapters", "a,b"],
            &["--max-loras", "1", "--lora-adapters", "tiny"],
        ] {
            let out = Command::new(BIN).args(args).output().unwrap();
            assert!(!out.status.success(), "{args:?}");
            assert!(!out.stderr.is_empty(), "{args:?}");
        }
        let help = Command::new(BIN).arg("--help").output().unwrap();
        assert!(help.status.success());
        let help = String::from_utf8(help.stdout).unwrap();
        for flag in [
            "--host",
            "--port",
            "--model",
            "--id",
            "--max-num-seqs",
            "--kv-blocks",
            "--block-size",
            "--prefill-ms-per-token",
            "--decode-ms-per-token",
            "--output-tokens",
            "--time-scale",
            "--max-loras",
            "--lora-adapters",
        ] {
            assert!(help.contains(flag), "{flag}");
        }
    }

    #[tokio::test]
    async fn serves_and_stops_on_sigterm() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut child = Guard(
            Command::new(BIN)
                .args(["--port", "0", "--time-scale", "0.01", "--model", "m1"])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stderr = child.0.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let addr = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("start-up log line");
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        let client = Client::new();
        let r = client
            .post(format!("http://{addr}/v1/completions"))
            .body(r#"{"model":"m1","prompt":"hi","max_tokens":2}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        // The default id is host:port.
        assert_eq!(sim_id(&r), addr);

        let pid = child.0.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(killed.success());
        let mut status = None;
        for _ in 0..500 {
            if let Some(s) = child.0.try_wait().unwrap() {
                status = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = status.expect("exited after SIGTERM");
        assert!(status.success(), "{status:?}");
    }
}

/// As vLLM 0.32 does (fixtures `metrics_idle.txt` against `metrics_idle_narrowed.txt`):
/// `/metrics` sends every family whatever `name[]` asks, `/metrics/` only the asked ones.
#[tokio::test]
async fn name_filter_is_honoured_only_with_a_trailing_slash() {
    let sim = Sim::start(fast()).await;
    let q =
        "?name%5B%5D=vllm:num_requests_waiting&name%5B%5D=vllm:kv_cache_usage_perc&name%5B%5D=vllm:nothing";
    let full = sim.metrics().await;
    let ignored = sim.get(&format!("/metrics{q}")).await.text().await.unwrap();
    assert_eq!(
        ignored.lines().filter(|l| !l.starts_with('#')).count(),
        full.lines().filter(|l| !l.starts_with('#')).count()
    );
    let r = sim.get(&format!("/metrics/{q}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let narrowed = r.text().await.unwrap();
    let samples: Vec<&str> = narrowed
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    assert_eq!(samples, ["vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]);
    assert!(
        narrowed.contains("# TYPE vllm:num_requests_waiting gauge"),
        "{narrowed}"
    );
    // Without names the whole page.
    assert_eq!(sim.get("/metrics/").await.text().await.unwrap().len(), full.len());
}
