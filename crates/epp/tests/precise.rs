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
