//! The simulator's KV events against a real vLLM 0.32 capture: the same requests give the
//! same `BlockStored` token slices as the real server published (`fixtures/vllm-0.32-cpu/
//! tokenization/kv`), in vLLM's message layout; evictions give `BlockRemoved` and a cache
//! reset `AllBlocksCleared`. A raw libzmq SUB socket reads them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use rmpv::Value;
use serde_json::Value as Json;
use vllm_sim::kvevents::{Publisher, PublisherConfig};
use vllm_sim::{SimConfig, Simulator, serve, vllm_prompt};

const KV: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/vllm-0.32-cpu/tokenization"
);

/// A port free on 127.0.0.1 a moment ago, below Linux's ephemeral range (32768-60999) so that
/// no outgoing connection takes it before the simulator binds it.
fn free_port() -> u16 {
    let start = std::process::id() % 12_000;
    (0..12_000)
        .map(|i| 20_000 + ((start + i) % 12_000) as u16)
        .find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free port in 20000-31999")
}

fn field<'a>(event: &'a Value, name: &str) -> &'a Value {
    let Value::Map(m) = event else {
        panic!("an event is a map: {event}")
    };
    &m.iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {name}"))
        .1
}

/// The next message's `(topic, seq, events)`.
fn next(sub: &zmq::Socket) -> Option<(String, u64, Vec<Value>)> {
    if sub.poll(zmq::POLLIN, 3000).unwrap() == 0 {
        return None;
    }
    let frames = sub.recv_multipart(0).unwrap();
    assert_eq!(frames.len(), 3, "topic, sequence, payload");
    let seq = u64::from_be_bytes(frames[1].as_slice().try_into().unwrap());
    let Value::Array(batch) = rmpv::decode::read_value(&mut frames[2].as_slice()).unwrap() else {
        panic!("the payload is an array")
    };
    assert_eq!(batch.len(), 3, "[ts, events, data_parallel_rank]");
    let Value::Array(events) = batch[1].clone() else {
        panic!("events")
    };
    Some((String::from_utf8(frames[0].clone()).unwrap(), seq, events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_carry_the_tokens_a_real_vllm_published() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = free_port();
    let publisher = Publisher::start(PublisherConfig {
        endpoint: format!("tcp://127.0.0.1:{port}"),
        bind: Some(true),
        replay_endpoint: None,
        topic: "kv@127.0.0.1:8000@tiny".into(),
        buffer_steps: 100,
        dp_rank: 0,
        ..Default::default()
    })
    .unwrap();
    let model = Arc::new(vllm_prompt::Model::load(std::path::Path::new(KV), 1 << 20).unwrap());
    // As the capture's server: blocks of 32, a small cache so that evictions happen.
    let config = SimConfig {
        block_size: 32,
        kv_blocks: 60,
        time_scale: 0.0,
        ..SimConfig::default()
    };
    let sim = Simulator::with_parts(config, Some(model), Some(publisher));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, sim, std::future::pending()));
    let ctx = zmq::Context::new();
    let sub = ctx.socket(zmq::SUB).unwrap();
    sub.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    sub.set_subscribe(b"kv@").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let client = reqwest::Client::new();
    let requests: Vec<Json> = std::fs::read_to_string(format!("{KV}/kv/requests_with_tokens.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let captured: Vec<Json> = std::fs::read_to_string(format!("{KV}/kv/kv_events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The first request from an empty cache: vLLM stored its 24 prompt blocks in one event.
    let send = |r: &Json| {
        let body = r["request"].to_string();
        let client = client.clone();
        async move {
            let resp = client
                .post(format!("http://{addr}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
    };
    send(&requests[0]).await;
    let (topic, seq, events) = next(&sub).expect("an event message");
    assert_eq!((topic.as_str(), seq), ("kv@127.0.0.1:8000@tiny", 0));
    let stored = &events[0];
    assert_eq!(field(stored, "type").as_str(), Some("BlockStored"));
    assert!(field(stored, "parent_block_hash").is_nil());
    assert_eq!(field(stored, "block_size").as_u64(), Some(32));
    let tokens: Vec<u64> = match field(stored, "token_ids") {
        Value::Array(a) => a.iter().map(|t| t.as_u64().unwrap()).collect(),
        other => panic!("{other}"),
    };
    let real: Vec<u64> = serde_json::from_value(captured[0]["payload"][1][0]["token_ids"].clone()).unwrap();
    assert_eq!(tokens, real, "the real server's first BlockStored tokens");
    // A request sharing the prefix stores only its new blocks, after the shared parent.
    send(&requests[1]).await;
    let (_, seq, events) = next(&sub).unwrap();
    assert_eq!(seq, 1);
    assert!(field(&events[0], "parent_block_hash").as_u64().is_some());
    let real: Vec<u64> = serde_json::from_value(captured[1]["payload"][1][0]["token_ids"].clone()).unwrap();
    let tokens: Vec<u64> = match field(&events[0], "token_ids") {
        Value::Array(a) => a.iter().map(|t| t.as_u64().unwrap()).collect(),
        other => panic!("{other}"),
    };
    assert_eq!(tokens, real);
    // A long unrelated prompt does not fit beside them: blocks are evicted first.
    send(&requests[9]).await;
    let (_, _, events) = next(&sub).unwrap();
    let types: Vec<&str> = events
        .iter()
        .map(|e| field(e, "type").as_str().unwrap())
        .collect();
    assert!(
        types.contains(&"BlockRemoved") && types.last() == Some(&"BlockStored"),
        "{types:?}"
    );
    // A reset (when nothing runs) publishes AllBlocksCleared.
    let r = client
        .post(format!("http://{addr}/reset_prefix_cache"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), r#"{"success":true}"#);
    let (_, _, events) = next(&sub).unwrap();
    assert_eq!(field(&events[0], "type").as_str(), Some("AllBlocksCleared"));
}

async fn post_json(client: &reqwest::Client, url: &str, body: String) -> Json {
    let r = client
        .post(url)
        .body(body)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    serde_json::from_slice(&r).unwrap()
}

#[tokio::test]
async fn tokenize_and_render_answer_as_vllm() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let model = Arc::new(vllm_prompt::Model::load(std::path::Path::new(KV), 1 << 20).unwrap());
    let sim = Simulator::with_parts(SimConfig::default(), Some(model), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, sim, std::future::pending()));
    let client = reqwest::Client::new();
    for line in std::fs::read_to_string(format!("{KV}/tokenize_cases.jsonl"))
        .unwrap()
        .lines()
        .take(20)
    {
        let case: Json = serde_json::from_str(line).unwrap();
        let body = case["request"].to_string();
        let r = post_json(&client, &format!("http://{addr}/tokenize"), body.clone()).await;
        assert_eq!(r["tokens"], case["response"]["tokens"], "{}", case["id"]);
        assert_eq!(r["count"], case["response"]["count"]);
        let path = if case["kind"] == "chat" {
            "/v1/chat/completions/render"
        } else {
            "/v1/completions/render"
        };
        let r = post_json(&client, &format!("http://{addr}{path}"), body).await;
        let ids = if case["kind"] == "chat" {
            &r["token_ids"]
        } else {
            &r[0]["token_ids"]
        };
        assert_eq!(*ids, case["response"]["tokens"], "{}", case["id"]);
    }
}
