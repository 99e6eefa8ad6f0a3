//! The ext_proc protocol, driven by a real tonic client against the in-process server: the
//! reference's hermetic cases plus the modes and edge cases the reference does not cover.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use endpoint_picker::datalayer::{LoraInfo, Metrics};
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use epp_testkit::extproc::*;

const PROMPT_BODY: &str = r#"{"max_tokens":100,"model":"my-model","prompt":"test1","temperature":0}"#;

async fn seed_epp() -> Epp {
    start(SEED_CONFIG, &[]).await
}

#[tokio::test]
async fn lower_queue_and_kv_wins() {
    let epp = seed_epp().await;
    epp.set_pool(&[
        ("10.0.0.1:8000", 3, 0.2),
        ("10.0.0.2:8000", 0, 0.1),
        ("10.0.0.3:8000", 10, 0.2),
    ]);
    for _ in 0..5 {
        let mut c = epp.open().await;
        c.send(request_headers(&post("/v1/completions"), false)).await;
        c.assert_silent().await; // the headers answer waits for the body
        c.send(request_body(PROMPT_BODY.as_bytes(), true)).await;
        let head = c.recv().await;
        assert_eq!(destination(&head), "10.0.0.2:8000");
        assert_eq!(
            set_header(&head, "content-length"),
            Some(PROMPT_BODY.len().to_string().as_str())
        );
        let body = c.recv().await;
        assert_eq!(streamed(&body), (PROMPT_BODY.as_bytes().to_vec(), true));
    }
}

#[tokio::test]
async fn invalid_json_is_a_400_with_the_reference_body() {
    let epp = seed_epp().await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/completions"), false)).await;
    c.send(request_body(b"{\"model\": \"m\", \"prompt\": ", true))
        .await;
    let r = c.recv().await;
    assert_eq!(
        immediate(&r),
        (
            400,
            "inference gateway: BadRequest - Error unmarshaling request body".into()
        )
    );
    assert!(c.end().await.unwrap().is_none(), "stream must close cleanly");
    let rec = epp.records.finished.lock();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].error, Some((400, "BadRequest")));
}

#[tokio::test]
async fn missing_model_and_missing_prompt_are_400() {
    let epp = seed_epp().await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let (r, _) = chat(&epp, r#"{"messages":[{"role":"user","content":"hi"}]}"#, &[]).await;
    assert_eq!(
        immediate(&r),
        (
            400,
            "inference gateway: BadRequest - model not found in request body".into()
        )
    );
    let (r, _) = chat(&epp, r#"{"model":"m","messages":[]}"#, &[]).await;
    assert_eq!(
        immediate(&r),
        (
            400,
            "inference gateway: BadRequest - messages not found in request".into()
        )
    );
}

#[tokio::test]
async fn lora_affinity_beats_higher_kv() {
    let config = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: lora-affinity-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: lora-affinity-scorer
    weight: 2
";
    let epp = start(config, &[]).await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.1), ("10.0.0.2:8000", 0, 0.6)]);
    let lora = |active: &[&str], max| Metrics {
        kv_cache_usage: 0.6,
        lora: LoraInfo {
            active: active.iter().map(|s| (*s).into()).collect(),
            waiting: vec![],
            max_active: max,
        },
        updated_at: Some(tokio::time::Instant::now()),
        ..Metrics::default()
    };
    epp.set_metrics(
        "10.0.0.1:8000",
        Metrics {
            kv_cache_usage: 0.1,
            ..lora(&["a", "b"], 2)
        },
    );
    epp.set_metrics("10.0.0.2:8000", lora(&["sql-lora"], 1));
    let (r, _) = chat(&epp, &chat_body("sql-lora", "select"), &[]).await;
    assert_eq!(destination(&r), "10.0.0.2:8000");
    // Neither endpoint has room for another adapter: the lower KV wins.
    let (r, _) = chat(&epp, &chat_body("base", "hello"), &[]).await;
    assert_eq!(destination(&r), "10.0.0.1:8000");
}

#[tokio::test]
async fn body_split_over_several_messages_is_returned_whole_and_in_order() {
    let epp = seed_epp().await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let text = "x".repeat(150_000);
    let body = chat_body("m", &text);
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/chat/completions"), false))
        .await;
    let parts: Vec<&[u8]> = body.as_bytes().chunks(40_000).collect();
    for p in &parts {
        c.send(request_body(p, false)).await;
    }
    c.assert_silent().await;
    c.send(request_body(b"", true)).await; // Envoy often ends with an empty chunk
    let head = c.recv().await;
    assert_eq!(destination(&head), "10.0.0.1:8000");
    assert_eq!(
        set_header(&head, "content-length"),
        Some(body.len().to_string().as_str())
    );
    let mut got = Vec::new();
    loop {
        let (bytes, eos) = streamed(&c.recv().await);
        assert!(bytes.len() <= 62_000);
        got.extend_from_slice(&bytes);
        if eos {
            break;
        }
    }
    assert_eq!(got, body.as_bytes());
}

#[tokio::test]
async fn oversized_chunk_is_cut_into_62000_byte_pieces() {
    let epp = seed_epp().await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let body = chat_body("m", &"y".repeat(200_000));
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/chat/completions"), false))
        .await;
    c.send(request_body(body.as_bytes(), true)).await;
    c.recv().await;
    let mut sizes = Vec::new();
    loop {
        let (bytes, eos) = streamed(&c.recv().await);
        sizes.push(bytes.len());
        if eos {
            break;
        }
    }
    assert_eq!(sizes.iter().sum::<usize>(), body.len());
    assert!(sizes[..sizes.len() - 1].iter().all(|s| *s == 62_000), "{sizes:?}");
}

#[tokio::test]
async fn header_only_request_is_routed_at_once() {
    let epp = seed_epp().await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0), ("10.0.0.2:8000", 0, 0.0)]);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..30 {
        let mut c = epp.open().await;
        c.send(request_headers(
            &[(":method", "GET"), (":path", "/v1/models")],
            true,
        ))
        .await;
        let r = c.recv().await;
        let d = destination(&r);
        assert!(set_header(&r, "content-length").is_none());
        seen.insert(d);
    }
    assert_eq!(seen.len(), 2, "random pick should reach both endpoints: {seen:?}");
}

#[tokio::test]
async fn subset_hint_all_some_none() {
    let epp = seed_epp().await;
    epp.set_pool(&[
        ("10.0.0.1:8000", 0, 0.0),
        ("10.0.0.2:8000", 9, 0.9),
        ("[fd00::3]:8000", 5, 0.5),
    ]);
    let body = chat_body("m", "hi");
    let run = |md: Option<Metadata>| {
        let epp = &epp;
        let body = body.clone();
        async move {
            let mut c = epp.open().await;
            c.send_with_metadata(request_headers(&post("/v1/chat/completions"), false), md.clone())
                .await;
            c.send_with_metadata(request_body(body.as_bytes(), true), md)
                .await;
            c.recv().await
        }
    };
    // No hint: the best endpoint overall.
    assert_eq!(destination(&run(None).await), "10.0.0.1:8000");
    // Some: only the hinted endpoints (an entry with a port names that port only; IPv6
    // accepted).
    let r = run(Some(subset(&["10.0.0.2:9999", "[fd00::3]:8000"]))).await;
    assert_eq!(destination(&r), "[fd00::3]:8000");
    // None match, or an empty list: 503.
    let r = run(Some(subset(&["10.9.9.9:8000"]))).await;
    assert_eq!(immediate(&r).0, 503);
    let r = run(Some(subset(&[]))).await;
    assert_eq!(
        immediate(&r),
        (
            503,
            "inference gateway: ServiceUnavailable - failed to find candidate pods for serving the request"
                .into()
        )
    );
    // Header-only requests honour the hint too.
    let mut c = epp.open().await;
    c.send_with_metadata(
        request_headers(&[(":method", "GET")], true),
        Some(subset(&["10.0.0.2"])),
    )
    .await;
    assert_eq!(destination(&c.recv().await), "10.0.0.2:8000");
}

#[tokio::test]
async fn empty_pool() {
    let epp = seed_epp().await;
    let (r, _) = chat(&epp, &chat_body("m", "hi"), &[]).await;
    assert_eq!(immediate(&r).0, 503);
    let mut c = epp.open().await;
    c.send(request_headers(&[(":method", "GET")], true)).await;
    assert_eq!(
        immediate(&c.recv().await),
        (
            500,
            "inference gateway: Internal - no pods available in datastore".into()
        )
    );
}

#[tokio::test]
async fn unsynced_pool_fails_the_stream_so_the_gateway_failure_mode_applies() {
    let epp = seed_epp().await;
    epp.store.clear();
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/chat/completions"), false))
        .await;
    c.send(request_body(chat_body("m", "hi").as_bytes(), true)).await;
    let err = c.end().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
}

#[tokio::test]
async fn response_path_passes_chunks_through_and_reads_json_usage() {
    let epp = seed_epp().await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/chat/completions"), false))
        .await;
    c.send(request_body(chat_body("m", "hi").as_bytes(), true)).await;
    c.recv().await;
    c.recv().await;
    c.send_with_metadata(
        response_headers(&[(":status", "200"), ("content-type", "application/json")], false),
        Some(served("10.0.0.1:8000")),
    )
    .await;
    let r = c.recv().await;
    assert!(common(&r).header_mutation.is_none());
    let body = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/vllm-0.32-cpu/response_chat.json"
    ))
    .unwrap();
    let parts: Vec<&[u8]> = body.chunks(300).collect();
    let mut echoed = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        c.send(response_body(p, last)).await;
        let (bytes, eos) = streamed(&c.recv().await);
        assert_eq!(eos, last);
        echoed.extend_from_slice(&bytes);
    }
    assert_eq!(echoed, body);
    c.close();
    assert!(c.end().await.unwrap().is_none());
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let rec = epp.records.finished.lock();
    let rec = rec.last().unwrap();
    assert_eq!(rec.served.as_deref(), Some("10.0.0.1:8000"));
    assert!(rec.response_complete && !rec.streaming);
    let usage = rec.usage.unwrap();
    assert_eq!(
        (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
        (Some(239), Some(24), Some(263))
    );
}

#[tokio::test]
async fn sse_usage_and_response_trailers() {
    let epp = seed_epp().await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/chat/completions"), false))
        .await;
    c.send(request_body(
        br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        true,
    ))
    .await;
    c.recv().await;
    c.recv().await;
    c.send(response_headers(
        &[
            (":status", "200"),
            ("content-type", "text/event-stream; charset=utf-8"),
        ],
        false,
    ))
    .await;
    c.recv().await;
    let stream = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/vllm-0.32-cpu/response_stream.txt"
    ))
    .unwrap();
    for p in stream.chunks(97) {
        c.send(response_body(p, false)).await;
        assert_eq!(streamed(&c.recv().await).0, p.to_vec());
    }
    c.send(response_trailers()).await;
    assert!(is_response_trailers(&c.recv().await));
    c.close();
    assert!(c.end().await.unwrap().is_none());
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let rec = epp.records.finished.lock();
    let rec = rec.last().unwrap();
    assert!(rec.streaming && rec.response_complete);
    let u = rec.usage.expect("usage from the last data event");
    assert!(
        u.completion_tokens.unwrap() > 0 && u.prompt_tokens.unwrap() > 0,
        "{u:?}"
    );
}

#[tokio::test]
async fn buffered_mode_answers_headers_at_once_and_routes_on_the_body_message() {
    let epp = seed_epp().await;
    epp.set_pool(&[("10.0.0.1:8000", 4, 0.0), ("10.0.0.2:8000", 0, 0.0)]);
    let mut c = epp
        .open()
        .await
        .with_modes(BodySendMode::Buffered, BodySendMode::None);
    c.send(request_headers(&post("/v1/completions"), false)).await;
    let head = c.recv().await;
    assert!(is_request_headers(&head));
    assert!(
        common(&head).header_mutation.is_none(),
        "headers answer must not route yet"
    );
    c.send(request_body(PROMPT_BODY.as_bytes(), true)).await;
    let body = c.recv().await;
    assert_eq!(destination(&body), "10.0.0.2:8000");
    assert!(
        common(&body).body_mutation.is_none(),
        "the body passes untouched in BUFFERED mode"
    );
    c.send(response_headers(&[(":status", "200")], false)).await;
    c.recv().await;
}

#[tokio::test]
async fn request_trailers_end_the_body() {
    let epp = seed_epp().await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let body = chat_body("m", "trailers");
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/chat/completions"), false))
        .await;
    c.send(request_body(body.as_bytes(), false)).await;
    c.assert_silent().await;
    c.send(request_trailers()).await;
    let head = c.recv().await;
    assert_eq!(destination(&head), "10.0.0.1:8000");
    let (bytes, eos) = streamed(&c.recv().await);
    assert_eq!(bytes, body.as_bytes());
    assert!(!eos, "trailers, not the last chunk, end the body");
    assert!(is_request_trailers(&c.recv().await));
}

#[tokio::test]
async fn spoofed_destination_header_is_overwritten() {
    let epp = seed_epp().await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let (r, _) = chat(
        &epp,
        &chat_body("m", "hi"),
        &[("x-gateway-destination-endpoint", "6.6.6.6:80")],
    )
    .await;
    assert_eq!(destination(&r), "10.0.0.1:8000");
    let opt = common(&r)
        .header_mutation
        .as_ref()
        .unwrap()
        .set_headers
        .iter()
        .find(|o| o.header.as_ref().unwrap().key == "x-gateway-destination-endpoint")
        .unwrap();
    // OVERWRITE_IF_EXISTS_OR_ADD: the client's copy is replaced, never appended to.
    assert_eq!(opt.append_action, 2);
    assert!(
        opt.header.as_ref().unwrap().value.is_empty(),
        "value must travel in raw_value"
    );
}

#[tokio::test]
async fn three_endpoints_best_first() {
    let config = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: max-score-picker
  parameters:
    maxNumOfEndpoints: 3
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
";
    let epp = start(config, &[]).await;
    epp.set_pool(&[
        ("10.0.0.1:8000", 6, 0.0),
        ("10.0.0.2:8000", 0, 0.0),
        ("[fd00::9]:8000", 2, 0.0),
        ("10.0.0.4:8000", 9, 0.0),
    ]);
    let (r, _) = chat(&epp, &chat_body("m", "hi"), &[]).await;
    assert_eq!(destination(&r), "10.0.0.2:8000,[fd00::9]:8000,10.0.0.1:8000");

    // A gateway that takes exactly one endpoint (ORIGINAL_DST) gets one.
    let one = start(config, &["--destination-limit=1"]).await;
    one.set_pool(&[("10.0.0.1:8000", 6, 0.0), ("10.0.0.2:8000", 0, 0.0)]);
    let (r, _) = chat(&one, &chat_body("m", "hi"), &[]).await;
    assert_eq!(destination(&r), "10.0.0.2:8000");
}

#[tokio::test]
async fn model_rewrite_splices_the_body_and_keeps_everything_else() {
    let epp = seed_epp().await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let body = "{\"temperature\": 0.70, \"model\":\"food-review\",\n \"prompt\": \"<b>&\"}";
    let mut c = epp.open().await;
    let mut h = post("/v1/completions");
    h.push(("x-gateway-model-name-rewrite", "food-review-v2"));
    c.send(request_headers(&h, false)).await;
    c.send(request_body(body.as_bytes(), true)).await;
    let head = c.recv().await;
    let (bytes, eos) = streamed(&c.recv().await);
    assert!(eos);
    let expected = "{\"temperature\": 0.70, \"model\":\"food-review-v2\",\n \"prompt\": \"<b>&\"}";
    assert_eq!(std::str::from_utf8(&bytes).unwrap(), expected);
    assert_eq!(
        set_header(&head, "content-length"),
        Some(expected.len().to_string().as_str())
    );
    // Without a rewrite, not one byte changes (no re-serialisation).
    let (_, echoed) = chat(
        &epp,
        "{ \"model\" : \"m\" , \"messages\":[{\"role\":\"user\",\"content\":\"\\u00e9\"}] }",
        &[],
    )
    .await;
    assert_eq!(
        echoed,
        "{ \"model\" : \"m\" , \"messages\":[{\"role\":\"user\",\"content\":\"\\u00e9\"}] }".as_bytes()
    );
}

#[tokio::test]
async fn oversized_body_is_a_413_not_an_oom() {
    let epp = start(SEED_CONFIG, &["--max-body-bytes=100000"]).await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/completions"), false)).await;
    c.send(request_body(&[b' '; 60_000], false)).await;
    c.send(request_body(&[b' '; 60_000], false)).await;
    let (status, body) = immediate(&c.recv().await);
    assert_eq!(status, 413);
    assert!(body.contains("100000"), "{body}");
}

#[tokio::test]
async fn generated_request_id_is_sent_upstream_and_given_one_is_kept() {
    let epp = seed_epp().await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let (r, _) = chat(&epp, &chat_body("m", "hi"), &[]).await;
    let id = set_header(&r, "x-request-id").expect("generated id");
    assert_eq!(id.len(), 36);
    let (r, _) = chat(&epp, &chat_body("m", "hi"), &[("x-request-id", "abc-123")]).await;
    assert!(set_header(&r, "x-request-id").is_none());
    assert!(
        epp.records
            .routed
            .lock()
            .iter()
            .any(|r| r.request_id == "abc-123")
    );
}

#[tokio::test]
async fn shared_prefix_sticks_to_one_endpoint() {
    let epp = seed_epp().await;
    epp.set_pool(&[
        ("10.0.0.1:8000", 0, 0.1),
        ("10.0.0.2:8000", 0, 0.1),
        ("10.0.0.3:8000", 0, 0.1),
    ]);
    let system = "You are a helpful assistant. ".repeat(40);
    let mut picks = std::collections::HashSet::new();
    for i in 0..8 {
        let body = serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": format!("question {i}")}
        ]})
        .to_string();
        let (r, _) = chat(&epp, &body, &[]).await;
        picks.insert(destination(&r));
    }
    assert_eq!(picks.len(), 1, "{picks:?}");
}

#[tokio::test]
async fn conformance_test_filter_steers_and_refuses_without_header() {
    let config = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
schedulingProfiles:
- name: conformance-profile
  plugins:
  - pluginRef: header-based-testing-filter
";
    let epp = start(config, &[]).await;
    epp.set_pool(&[("10.0.0.1:3000", 0, 0.0), ("10.0.0.2:3000", 0, 0.0)]);
    let body =
        r#"{"model":"conformance-fake-model","prompt":"Write as if you were a critic: San Francisco"}"#;
    let mut c = epp.open().await;
    let mut h = post("/v1/completions");
    h.push(("test-epp-endpoint-selection", "10.0.0.2"));
    c.send(request_headers(&h, false)).await;
    c.send(request_body(body.as_bytes(), true)).await;
    assert_eq!(destination(&c.recv().await), "10.0.0.2:3000");
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/completions"), false)).await;
    c.send(request_body(body.as_bytes(), true)).await;
    assert_eq!(immediate(&c.recv().await).0, 429);
}

#[tokio::test]
async fn out_of_order_and_unsupported_modes_are_errors() {
    let epp = seed_epp().await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let mut c = epp.open().await;
    c.send(request_body(b"{}", true)).await;
    assert_eq!(c.end().await.unwrap_err().code(), tonic::Code::FailedPrecondition);
    let mut c = epp
        .open()
        .await
        .with_modes(BodySendMode::Streamed, BodySendMode::None);
    c.send(request_headers(&post("/v1/completions"), false)).await;
    let (status, body) = immediate(&c.recv().await);
    assert_eq!(status, 500);
    assert!(body.contains("STREAMED"), "{body}");
}

#[tokio::test]
async fn sheddable_requests_get_429_only_when_the_pool_is_saturated() {
    let epp = start(SEED_CONFIG, &[]).await;
    epp.objectives
        .replace([("batch".to_owned(), -1), ("chat".to_owned(), 5)].into());
    // Every endpoint over the queue threshold (5): saturation (9/5 + 7/5) / 2 = 1.6.
    epp.set_pool(&[("10.0.0.1:8000", 9, 0.5), ("10.0.0.2:8000", 7, 0.9)]);
    let body = chat_body("m", "hi");
    let (r, _) = chat(&epp, &body, &[("x-gateway-inference-objective", "batch")]).await;
    assert_eq!(
        immediate(&r),
        (
            429,
            "inference gateway: InferencePoolResourceExhausted - system saturated, sheddable request dropped"
                .into()
        )
    );
    let (r, _) = chat(&epp, &body, &[("x-gateway-inference-objective", "chat")]).await;
    assert_eq!(destination(&r), "10.0.0.2:8000");
    let (r, _) = chat(&epp, &body, &[]).await;
    destination(&r);
    // Room left on average (max(2/5, 0.5/0.8) and max(5/5, 0.5/0.8): 0.81): it goes through.
    epp.set_pool(&[("10.0.0.1:8000", 2, 0.5), ("10.0.0.2:8000", 5, 0.5)]);
    let (r, _) = chat(&epp, &body, &[("x-gateway-inference-objective", "batch")]).await;
    assert_eq!(destination(&r), "10.0.0.1:8000");
}

/// A `utilization-detector` referenced as the saturation detector acts with its parameters:
/// pods at queue 6 are below its threshold of 8, so a sheddable request is admitted, where the
/// default threshold of 5 would shed it.
#[tokio::test]
async fn the_referenced_utilization_detector_uses_its_thresholds() {
    let config = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- name: detector
  type: utilization-detector
  parameters: {queueDepthThreshold: 8}
saturationDetector:
  pluginRef: detector
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
";
    let body = chat_body("m", "hi");
    let sheddable = [("x-gateway-inference-objective", "batch")];
    for (config, admitted) in [(config, true), (SEED_CONFIG, false)] {
        let epp = start(config, &[]).await;
        epp.objectives.replace([("batch".to_owned(), -1)].into());
        epp.set_pool(&[("10.0.0.1:8000", 6, 0.1), ("10.0.0.2:8000", 6, 0.1)]);
        let (r, _) = chat(&epp, &body, &sheddable).await;
        if admitted {
            destination(&r);
        } else {
            assert_eq!(immediate(&r).0, 429);
        }
    }
}

#[tokio::test]
async fn a_request_counts_against_its_endpoint_until_its_response_completes() {
    let epp = seed_epp().await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.1), ("10.0.0.2:8000", 0, 0.1)]);
    // Both report 0.1 of a 6,400-token KV cache; no scrape comes during the test.
    for addr in ["10.0.0.1:8000", "10.0.0.2:8000"] {
        epp.set_metrics(
            addr,
            endpoint_picker::datalayer::Metrics {
                kv_cache_usage: 0.1,
                cache_block_size: Some(16),
                cache_num_blocks: Some(400),
                updated_at: Some(tokio::time::Instant::now()),
                ..Default::default()
            },
        );
    }
    let load = endpoint_picker::framework::data::DataKey::<
        endpoint_picker::framework::attributes::InFlightLoad,
    >::named("inflight-load-producer");
    let unscraped = |addr: &str| {
        let snap = epp.store.load();
        let state = snap.find(addr.parse().unwrap()).unwrap();
        state.get(load).unwrap().tokens_since_scrape()
    };
    // About 1,000 prompt tokens each, all different: no prefix is shared.
    let body = |i: usize| chat_body("m", &format!("request {i}: {}", "word ".repeat(800)));

    // A burst of requests between two scrapes alternates between the two servers instead of
    // all going to the first one that looked least loaded.
    let mut open = Vec::new();
    let mut picks = Vec::new();
    for i in 0..4 {
        let mut c = epp.open().await;
        c.send(request_headers(&post("/v1/chat/completions"), false))
            .await;
        c.send(request_body(body(i).as_bytes(), true)).await;
        picks.push(destination(&c.recv().await));
        c.recv().await;
        open.push(c);
    }
    picks.sort();
    assert_eq!(
        picks,
        ["10.0.0.1:8000", "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.2:8000"]
    );
    let before = unscraped("10.0.0.1:8000");
    assert!(
        before > 1_500,
        "two requests of ~1,000 tokens in flight: {before}"
    );

    // Responses complete: the load they added is released.
    for mut c in open {
        c.send(response_headers(&[(":status", "200")], false)).await;
        c.recv().await;
        c.send(response_body(b"{}", true)).await;
        c.recv().await;
        c.close();
        let _ = c.end().await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(unscraped("10.0.0.1:8000"), 0);
    assert_eq!(unscraped("10.0.0.2:8000"), 0);
}
