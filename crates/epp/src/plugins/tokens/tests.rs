//! The token producer: local tokenization equal to vLLM's (the golden fixtures), long prompts
//! encoded off the request's thread with the same result, the render backend against a real
//! HTTP server, and the backends that are refused.

use std::sync::Arc;

use super::*;
use crate::plugins::testing::states_at;
use crate::request::RequestHeaders;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/vllm-0.32-cpu/tokenization"
);

fn local() -> TokenProducer {
    let p: TokenParams = serde_yaml::from_str(&format!("local: {{path: {FIXTURE}}}")).unwrap();
    TokenProducer::new("tok", &p).unwrap()
}

fn chat_request<'a>(headers: &'a RequestHeaders, body: &'a [u8]) -> SchedulingRequest<'a> {
    SchedulingRequest {
        body,
        api: ApiKind::ChatCompletions,
        ..SchedulingRequest::new("req-1", "tiny", b"", None, headers)
    }
}

fn produced(p: &TokenProducer, req: &SchedulingRequest<'_>) -> Option<TokenizedPrompt> {
    let s = states_at(&["10.0.0.1:8000"]);
    let mut state = CycleState::default();
    p.prepare(req, &crate::framework::scheduling::candidates(&s), &mut state);
    state.get(p.key()).cloned()
}

#[test]
fn local_tokens_are_vllms() {
    let p = local();
    let headers = RequestHeaders::default();
    for line in std::fs::read_to_string(format!("{FIXTURE}/tokenize_cases.jsonl"))
        .unwrap()
        .lines()
        .take(12)
    {
        let case: serde_json::Value = serde_json::from_str(line).unwrap();
        if case["kind"] != "chat" {
            continue;
        }
        let body = serde_json::to_vec(&case["request"]).unwrap();
        let req = chat_request(&headers, &body);
        assert!(p.prefetch(&req).is_none(), "short prompts are encoded inline");
        let want: Vec<u32> = serde_json::from_value(case["response"]["tokens"].clone()).unwrap();
        assert_eq!(produced(&p, &req).unwrap().prompts, vec![want], "{}", case["id"]);
    }
    // A body that is not a chat request: nothing written, nothing panics.
    let req = chat_request(&headers, b"{\"messages\": 5}");
    assert!(produced(&p, &req).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_prompts_are_encoded_off_the_request_thread() {
    let p = local();
    let headers = RequestHeaders::default();
    let text: String = (0..4000).map(|i| format!("word{i} ")).collect();
    let body = serde_json::to_vec(
        &serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": text}]}),
    )
    .unwrap();
    let req = chat_request(&headers, &body);
    let wait = p.prefetch(&req).expect("a long uncached prompt waits");
    wait.await.unwrap();
    let from_stash = produced(&p, &req).unwrap();
    // The stash is taken once; the inline path (now from the segment cache) agrees.
    let inline = produced(&p, &req).unwrap();
    assert_eq!(from_stash, inline);
    assert!(from_stash.prompts[0].len() > 4000);
    // Now cached: no wait.
    assert!(p.prefetch(&req).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_backend_asks_vllm() {
    use axum::routing::post;
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions/render",
            post(|body: String| async move {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["model"], "served-name");
                axum::Json(serde_json::json!({"token_ids": [5, 6, 7], "features": null}))
            }),
        )
        .route(
            "/v1/completions/render",
            post(|| async { (http::StatusCode::BAD_REQUEST, "no") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let params: TokenParams = serde_yaml::from_str(&format!(
        "modelName: served-name\nvllm: {{url: \"http://{addr}/\", timeout: 2s}}"
    ))
    .unwrap();
    let p = TokenProducer::new("tok", &params).unwrap();
    let headers = RequestHeaders::default();
    let body = br#"{"model":"tiny","messages":[{"role":"user","content":"hi"}]}"#;
    let req = chat_request(&headers, body);
    p.prefetch(&req).unwrap().await.unwrap();
    assert_eq!(produced(&p, &req).unwrap().prompts, vec![vec![5, 6, 7]]);
    // A failing render leaves the request without tokens.
    let body = br#"{"model":"tiny","prompt":"hi"}"#;
    let req = SchedulingRequest {
        api: ApiKind::Completions,
        ..chat_request(&headers, body)
    };
    p.prefetch(&req).unwrap().await.unwrap();
    assert!(produced(&p, &req).is_none());
}

#[test]
fn render_answers_name_media() {
    let f = serde_json::json!({
        "mm_hashes": {"image": ["h2", "h1"]},
        "mm_placeholders": {"image": [{"offset": 40, "length": 10}, {"offset": 5, "length": 3}]}
    });
    assert_eq!(
        media_items(Some(&f))
            .into_iter()
            .map(|m| (m.identifier, m.offset, m.length))
            .collect::<Vec<_>>(),
        vec![("h1".into(), 5, 3), ("h2".into(), 40, 10)]
    );
    assert!(media_items(None).is_empty());
}

#[test]
fn backends_that_cannot_give_engine_tokens_are_refused() {
    for (yaml, word) in [
        ("{}", "needs a backend"),
        ("estimate: {}", "pseudo-tokens"),
        ("udsTokenizerConfig: {socketFile: /tmp/x}", "udsTokenizerConfig"),
        ("local: {path: /nonexistent}", "/nonexistent"),
        ("{local: {path: /x}, modelName: m}", "not both"),
        ("{modelName: m, vllm: {url: \"https://x\"}}", "http://"),
        ("{modelName: m, vllm: {timeout: soon}}", "timeout"),
    ] {
        let p: TokenParams = serde_yaml::from_str(yaml).unwrap();
        let e = TokenProducer::new("tok", &p).unwrap_err();
        assert!(e.contains(word), "{yaml}: {e}");
    }
    let _ = Arc::new(local());
}
