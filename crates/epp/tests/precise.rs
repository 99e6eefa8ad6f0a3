//! Precise prefix-cache routing configured as llm-d-router v0.10 configures it: the
//! reference's example configurations load (with a tokenizer of ours where they name vLLM's
//! render sidecar), producers run in order, and configurations that would leave the producer
//! without tokens or without events are refused with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use endpoint_picker::config::{EndpointPickerConfig, PluginSet};
use endpoint_picker::plugins::Defaults;

const TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/vllm-0.32-cpu/tokenization"
);

fn set(text: &str) -> Result<PluginSet, String> {
    EndpointPickerConfig::from_text(text, "precise.yaml")
        .and_then(|c| c.build(&Defaults::builtin(), Some(1)))
        .map_err(|e| e.to_string())
}

fn local_tokens() -> String {
    format!("- type: token-producer\n  parameters:\n    local: {{path: {TOKENIZER}}}\n")
}

/// llm-d-router v0.10's `deploy/config/epp-precise-prefix-cache-config.yaml` (per-endpoint
/// subscriptions through the endpoint-notification-source), without its P/D `decode-filter`.
fn per_pod() -> String {
    format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
{}- type: endpoint-notification-source
- type: metrics-data-source
- type: core-metrics-extractor
- type: single-profile-handler
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig:
      blockSize: 64
    indexerConfig:
      kvBlockIndexConfig:
        enableMetrics: true
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: precise-prefix-cache-producer
- type: kv-cache-utilization-scorer
- type: queue-scorer
- type: max-score-picker
dataLayer:
  sources:
    - pluginRef: metrics-data-source
      extractors:
        - pluginRef: core-metrics-extractor
    - pluginRef: endpoint-notification-source
      extractors:
        - pluginRef: precise-prefix-cache-producer
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: prefix-cache-scorer
        weight: 2.0
      - pluginRef: kv-cache-utilization-scorer
        weight: 1.0
      - pluginRef: queue-scorer
        weight: 1.0
      - pluginRef: max-score-picker
",
        local_tokens()
    )
}

/// v0.10's `sim-epp-tokenizer-vllm-http-config.yaml` (central socket, vLLM render sidecar),
/// without its `decode-filter`.
const CENTRAL_RENDER: &str = r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters:
    modelName: "tiny"
    vllm:
      url: "http://localhost:8000"
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig:
      blockSize: 16
      hashSeed: "42"
    kvEventsConfig:
      zmqEndpoint: tcp://127.0.0.1:0
    indexerConfig:
      kvBlockIndexConfig:
        enableMetrics: false
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: precise-prefix-cache-producer
- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 10
"#;

#[test]
fn the_references_examples_load() {
    let s = set(&per_pod()).unwrap();
    let producers: Vec<&str> = s.control.producers.iter().map(|p| &*p.name).collect();
    assert_eq!(producers, ["token-producer", "precise-prefix-cache-producer"]);
    // The producer runs its subscription although no source lists it as one.
    assert!(
        s.sources
            .subscribing
            .iter()
            .any(|x| &*x.name == "precise-prefix-cache-producer")
    );
    let s = set(CENTRAL_RENDER).unwrap();
    assert_eq!(s.control.producers.len(), 2);
    // Producers run by what they produce, whatever the order they are written in.
    let tokens_last = CENTRAL_RENDER.replace(
        "- type: token-producer\n  parameters:\n    modelName: \"tiny\"\n    vllm:\n      url: \"http://localhost:8000\"\n",
        "",
    )
    .replace(
        "- type: single-profile-handler\n",
        "- type: single-profile-handler\n- type: token-producer\n  parameters: {modelName: tiny}\n",
    );
    assert_ne!(tokens_last, CENTRAL_RENDER);
    let s = set(&tokens_last).unwrap();
    let producers: Vec<&str> = s.control.producers.iter().map(|p| &*p.name).collect();
    assert_eq!(producers, ["token-producer", "precise-prefix-cache-producer"]);
}

#[test]
fn the_documented_example_loads() {
    let yaml = epp_testkit::documented_yaml("plugins.md", "### Precise prefix routing, configured");
    let s = set(&yaml.replace("/models/llama-3.1-8b-instruct", TOKENIZER)).unwrap();
    let producers: Vec<&str> = s.control.producers.iter().map(|p| &*p.name).collect();
    assert_eq!(producers, ["token-producer", "precise-prefix-cache-producer"]);
}

#[test]
fn the_deprecated_scorer_brings_its_own_producer() {
    let text = format!(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n{}- type: precise-prefix-cache-scorer\n  parameters:\n    tokenProcessorConfig: {{blockSizeTokens: 16, hashSeed: \"42\"}}\n    kvEventsConfig: {{zmqEndpoint: \"tcp://127.0.0.1:0\"}}\n",
        local_tokens()
    );
    let s = set(&text).unwrap();
    let p = &s.scheduler.profiles()[0];
    assert_eq!(&*p.scorers[0].scorer.name, "precise-prefix-cache-scorer");
    assert_eq!(s.control.producers.len(), 2);
    let both = text + "- type: precise-prefix-cache-producer\n";
    assert!(set(&both).unwrap_err().contains("two indexes"));
}

#[test]
fn a_producer_without_tokens_or_events_is_refused() {
    // No token producer: one is added, and it has no backend.
    let text = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: precise-prefix-cache-producer\n  parameters: {kvEventsConfig: {zmqEndpoint: \"tcp://127.0.0.1:0\"}}\n- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}\n";
    let e = set(text).unwrap_err();
    assert!(e.contains("token-producer") && e.contains("backend"), "{e}");
    // The estimating backend is refused too.
    let e = set(&text.replace(
        "plugins:\n",
        "plugins:\n- type: token-producer\n  parameters: {estimate: {}}\n",
    ))
    .unwrap_err();
    assert!(e.contains("pseudo-tokens"), "{e}");
    // Tokens, but events from nowhere.
    let e = set(&per_pod().replace(
        "    - pluginRef: endpoint-notification-source\n      extractors:\n        - pluginRef: precise-prefix-cache-producer\n",
        "",
    ))
    .unwrap_err();
    assert!(
        e.contains("receives no KV events") || e.contains("endpoint-notification-source"),
        "{e}"
    );
    // Wired, but told not to follow endpoints.
    let e = set(&per_pod().replace(
        "        enableMetrics: true\n",
        "        enableMetrics: true\n    kvEventsConfig: {discoverPods: false}\n",
    ))
    .unwrap_err();
    assert!(e.contains("discoverPods"), "{e}");
    // Something other than a producer under the notification source.
    let e = set(&per_pod().replace(
        "        - pluginRef: precise-prefix-cache-producer\n",
        "        - pluginRef: queue-scorer\n",
    ))
    .unwrap_err();
    assert!(e.contains("endpoint extractor"), "{e}");
}

// ---------------------------------------------------------------------------------------
// End to end: simulated vLLM servers that tokenize with the real model's tokenizer and
// publish KV events as vLLM does; the picker subscribes to each; the test is the gateway
// (asks the picker over ext_proc, then sends the request where it was told).

mod e2e {
    use std::ffi::OsString;
    use std::net::SocketAddr;
    use std::time::Duration;

    use endpoint_picker::app::{self, Running};
    use endpoint_picker::config::cli::parse_args;
    use epp_testkit::e2e::Sim;
    use epp_testkit::extproc::{chat_on, destination, open};
    use epp_testkit::free_ports_on;
    use vllm_sim::kvevents::PublisherConfig;

    use super::TOKENIZER;

    struct Pool {
        sims: Vec<Sim>,
        socket_port: u16,
        replay_port: u16,
    }

    /// `n` sims on 127.0.0.2.. (one IP each, as pods have), publishing on one port number.
    async fn pool(n: usize) -> Pool {
        let ips: Vec<std::net::IpAddr> = (0..n)
            .map(|i| format!("127.0.0.{}", i + 2).parse().unwrap())
            .collect();
        let ports = free_ports_on(&ips, 2);
        let (socket_port, replay_port) = (ports[0], ports[1]);
        let mut sims = Vec::new();
        for i in 0..n {
            let ip = format!("127.0.0.{}", i + 2);
            let addr: SocketAddr = format!("{ip}:0").parse().unwrap();
            let sim = Sim::start_tokenizing(
                addr,
                |c| {
                    c.kv_blocks = 2048;
                    c.time_scale = 0.01;
                },
                Some(PublisherConfig {
                    endpoint: format!("tcp://{ip}:{socket_port}"),
                    bind: Some(true),
                    replay_endpoint: Some(format!("tcp://{ip}:{replay_port}")),
                    // The reference's topic convention; its default filter is `kv@`.
                    topic: format!("kv@{ip}@tiny"),
                    buffer_steps: 1000,
                    dp_rank: 0,
                    ..Default::default()
                }),
            )
            .await;
            sims.push(sim);
        }
        Pool {
            sims,
            socket_port,
            replay_port,
        }
    }

    fn config(p: &Pool, producer: &str) -> String {
        format!(
            "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters: {{local: {{path: {TOKENIZER}}}}}
- type: endpoint-notification-source
{producer}
- type: queue-scorer
- type: max-score-picker
dataLayer:
  sources:
  - pluginRef: endpoint-notification-source
    extractors: [{{pluginRef: precise-prefix-cache-producer}}]
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
  - {{pluginRef: queue-scorer, weight: 1}}
  - {{pluginRef: max-score-picker}}
",
        )
        .replace("{{SOCKET}}", &p.socket_port.to_string())
        .replace("{{REPLAY}}", &p.replay_port.to_string())
    }

    const PRECISE: &str = "- type: precise-prefix-cache-producer
  parameters:
    kvEventsConfig: {podDiscoveryConfig: {socketPort: {{SOCKET}}, replaySocketPort: {{REPLAY}}}}
    indexerConfig: {kvBlockIndexConfig: {enableMetrics: true}}
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}";

    async fn epp(p: &Pool, text: &str) -> Running {
        let list = p
            .sims
            .iter()
            .map(|s| s.addr.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let args: Vec<String> = vec![
            "epp".into(),
            "--static-endpoints".into(),
            list,
            "--bind-address".into(),
            "127.0.0.1".into(),
            "--grpc-port=0".into(),
            "--grpc-health-port=0".into(),
            "--metrics-port=0".into(),
            "--refresh-metrics-interval=20ms".into(),
            "--secure-serving=false".into(),
            format!("--config-text={text}"),
        ];
        let cli = parse_args(args.into_iter().map(OsString::from)).unwrap();
        let running = app::start(&cli).await.unwrap();
        // Scraped, so that the queue scorer sees the servers.
        for _ in 0..250 {
            let s = running.store.load();
            if s.endpoints().iter().all(|e| e.metrics().updated_at.is_some()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        running
    }

    fn body(system: &str, question: &str) -> String {
        serde_json::json!({
            "model": "tiny",
            "max_tokens": 2,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]
        })
        .to_string()
    }

    fn system_prompt(group: usize) -> String {
        (0..60)
            .map(|i| format!("rule {group}.{i}: answer carefully. "))
            .collect()
    }

    async fn pick(epp: &Running, body: &str) -> String {
        let (r, _) = chat_on(open(epp.grpc_addr).await, body, &[]).await;
        destination(&r)
    }

    async fn send(to: &str, body: &str) {
        let r = reqwest::Client::new()
            .post(format!("http://{to}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    }

    async fn index_keys(epp: &Running) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", epp.metrics_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("llm_d_router_epp_kv_cache_index_keys "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until every picker's index holds more or fewer keys than `before` (as `grown`).
    async fn settled(epps: &[&Running], before: &[f64], grown: bool) -> Vec<f64> {
        for _ in 0..400 {
            let now = futures_util::future::join_all(epps.iter().map(|e| index_keys(e))).await;
            if now
                .iter()
                .zip(before)
                .all(|(n, b)| if grown { n > b } else { n < b })
            {
                // Let the rest of the same events land.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return futures_util::future::join_all(epps.iter().map(|e| index_keys(e))).await;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the index never moved from {before:?}");
    }

    /// Subscriptions are connected once a request's events reach the picker.
    async fn warm_up(p: &Pool, epps: &[&Running]) {
        for (i, sim) in p.sims.iter().enumerate() {
            let before = futures_util::future::join_all(epps.iter().map(|e| index_keys(e))).await;
            for attempt in 0..50 {
                send(
                    &sim.addr.to_string(),
                    &body(&format!("warm-up {i} {attempt} {}", system_prompt(100 + i)), "hi"),
                )
                .await;
                let now = futures_util::future::join_all(epps.iter().map(|e| index_keys(e))).await;
                if now.iter().zip(&before).all(|(n, b)| n > b) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_cache_gets_no_stale_credit() {
        let p = pool(3).await;
        let epp = epp(&p, &config(&p, PRECISE)).await;
        warm_up(&p, &[&epp]).await;
        // Server 0 holds the prefix but reports a queue: only its cache draws requests there.
        p.sims[0].set_load(5, 0.1);
        let holder = p.sims[0].addr.to_string();
        let before = index_keys(&epp).await;
        send(&holder, &body(&system_prompt(1), "first question")).await;
        let before = settled(&[&epp], &[before], true).await;
        for q in 0..3 {
            let b = body(&system_prompt(1), &format!("question {q}"));
            assert_eq!(pick(&epp, &b).await, holder, "the server holding the prefix wins");
        }
        // The server's cache is reset; its AllBlocksCleared reaches the picker.
        let r = reqwest::Client::new()
            .post(format!("http://{holder}/reset_prefix_cache"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(r, r#"{"success":true}"#);
        settled(&[&epp], &before, false).await;
        for q in 0..5 {
            let b = body(&system_prompt(1), &format!("after reset {q}"));
            let to = pick(&epp, &b).await;
            assert_ne!(to, holder, "no credit for blocks the server dropped");
            send(&to, &b).await;
        }
        epp.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_without_a_link_agree() {
        let p = pool(3).await;
        let text = config(&p, PRECISE);
        let (a, b) = (epp(&p, &text).await, epp(&p, &text).await);
        warm_up(&p, &[&a, &b]).await;
        let replicas = [&a, &b];
        for group in 0..6 {
            // The first request of a group goes where one replica says.
            let before = futures_util::future::join_all(replicas.iter().map(|e| index_keys(e))).await;
            let first = body(&system_prompt(group), "opening question");
            let home = pick(replicas[group % 2], &first).await;
            send(&home, &first).await;
            settled(&replicas, &before, true).await;
            // Both replicas learned it from the server itself.
            for q in 0..4 {
                let b = body(&system_prompt(group), &format!("follow-up {q}"));
                let via = replicas[(group + q + 1) % 2];
                assert_eq!(pick(via, &b).await, home, "group {group}, follow-up {q}");
                send(&home, &b).await;
            }
        }
        a.shutdown();
        b.shutdown();
    }
}
