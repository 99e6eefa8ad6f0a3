//! The fault kinds of hostile or odd input, each with the right value, driven through a real
//! gRPC client against the in-process EPP: empty bodies from non-Envoy clients, subset hints
//! with ports, the current reference's header names, client-chosen metric labels, the body
//! budget across streams and response usage per API shape.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use epp_testkit::extproc::*;

async fn metrics_page(addr: SocketAddr) -> String {
    let r = reqwest::get(format!("http://{addr}/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

const NO_AUTH: &[&str] = &["--metrics-endpoint-auth=false"];

#[tokio::test]
async fn an_empty_body_is_routed_like_no_body() {
    let epp = start(SEED_CONFIG, &[]).await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let get = [(":method", "GET"), (":path", "/v1/models")];

    // Full duplex: headers without end-of-stream, then an empty body message with it.
    let mut c = epp.open().await;
    c.send(request_headers(&get, false)).await;
    c.send(request_body(b"", true)).await;
    let head = c.recv().await;
    assert!(is_request_headers(&head), "{head:?}");
    assert_eq!(destination(&head), "10.0.0.1:8000");
    assert_eq!(set_header(&head, "content-length"), None);
    assert_eq!(streamed(&c.recv().await), (Vec::new(), true));

    // Full duplex, trailers and no body at all.
    let mut c = epp.open().await;
    c.send(request_headers(&get, false)).await;
    c.send(request_trailers()).await;
    assert_eq!(destination(&c.recv().await), "10.0.0.1:8000");
    assert_eq!(streamed(&c.recv().await), (Vec::new(), false));
    assert!(is_request_trailers(&c.recv().await));

    // Buffered: the body message is empty.
    let mut c = epp
        .open()
        .await
        .with_modes(BodySendMode::Buffered, BodySendMode::None);
    c.send(request_headers(&get, false)).await;
    assert!(is_request_headers(&c.recv().await));
    c.send(request_body(b"", true)).await;
    let body = c.recv().await;
    assert_eq!(destination(&body), "10.0.0.1:8000");
    assert_eq!(lb_metadata(&body), Some("10.0.0.1:8000"));

    // Buffered, trailers without a body message: the trailers answer carries the routing.
    let mut c = epp
        .open()
        .await
        .with_modes(BodySendMode::Buffered, BodySendMode::None);
    c.send(request_headers(&get, false)).await;
    c.recv().await;
    c.send(request_trailers()).await;
    let t = c.recv().await;
    assert!(is_request_trailers(&t));
    assert_eq!(lb_metadata(&t), Some("10.0.0.1:8000"));

    // A body that is not empty but not JSON is still a 400.
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/completions"), false)).await;
    c.send(request_body(b" ", true)).await;
    assert_eq!(immediate(&c.recv().await).0, 400);
    assert!(
        epp.records
            .finished
            .lock()
            .iter()
            .all(|r| r.error.is_none_or(|e| e.0 == 400))
    );
}

#[tokio::test]
async fn subset_entries_with_a_port_match_that_port_only() {
    let epp = start(SEED_CONFIG, &[]).await;
    // Two endpoints on one pod IP (data parallel); :8001 is the better one.
    epp.set_pool(&[
        ("10.0.0.5:8001", 0, 0.0),
        ("10.0.0.5:8002", 9, 0.9),
        ("10.0.0.6:8000", 5, 0.5),
    ]);
    let body = chat_body("m", "hi");
    let pick = |hint: Vec<&'static str>| {
        let epp = &epp;
        let body = body.clone();
        async move {
            let mut c = epp.open().await;
            let md = Some(subset(&hint));
            c.send_with_metadata(request_headers(&post("/v1/chat/completions"), false), md.clone())
                .await;
            c.send_with_metadata(request_body(body.as_bytes(), true), md)
                .await;
            destination(&c.recv().await)
        }
    };
    for _ in 0..5 {
        assert_eq!(pick(vec!["10.0.0.5:8002"]).await, "10.0.0.5:8002");
    }
    // Without a port the entry names every port of the IP (older gateways send bare IPs).
    assert_eq!(pick(vec!["10.0.0.5"]).await, "10.0.0.5:8001");
    assert_eq!(
        pick(vec!["10.0.0.5:9999", "10.0.0.6:8000"]).await,
        "10.0.0.6:8000"
    );
}

#[tokio::test]
async fn current_and_deprecated_header_names() {
    let epp = start(SEED_CONFIG, &[]).await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    for (rewrite, objective) in [
        ("x-llm-d-model-name-rewrite", "x-llm-d-inference-objective"),
        ("x-gateway-model-name-rewrite", "x-gateway-inference-objective"),
    ] {
        let (r, body) = chat(
            &epp,
            &chat_body("public-name", "hi"),
            &[(rewrite, "served-name"), (objective, "critical")],
        )
        .await;
        assert_eq!(destination(&r), "10.0.0.1:8000");
        assert!(
            String::from_utf8_lossy(&body).contains("\"served-name\""),
            "{rewrite}: {}",
            String::from_utf8_lossy(&body)
        );
        let routed = epp.records.routed.lock().last().cloned().unwrap();
        assert_eq!(routed.target_model, "served-name", "{rewrite}");
        assert_eq!(routed.objective.as_deref(), Some("critical"), "{objective}");
    }
    // Both present: the current name wins.
    let (_, body) = chat(
        &epp,
        &chat_body("public-name", "hi"),
        &[
            ("x-gateway-model-name-rewrite", "old"),
            ("x-llm-d-model-name-rewrite", "new"),
        ],
    )
    .await;
    assert!(String::from_utf8_lossy(&body).contains("\"new\""));
}

#[tokio::test]
async fn client_chosen_model_names_do_not_grow_the_metrics_page() {
    let flags = [NO_AUTH, &["--max-model-label-values=5"]].concat();
    let epp = start(SEED_CONFIG, &flags).await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0), ("10.0.0.2:8000", 0, 0.0)]);
    for i in 0..3 {
        chat(&epp, &chat_body(&format!("model-{i}"), "hi"), &[]).await;
    }
    let small = metrics_page(epp.metrics_addr).await.len();
    for i in 3..60 {
        chat(&epp, &chat_body(&format!("random-{i}"), "hi"), &[]).await;
    }
    let page = metrics_page(epp.metrics_addr).await;
    let models: std::collections::BTreeSet<&str> = page
        .lines()
        .filter(|l| l.starts_with("inference_objective_request_total{"))
        .filter_map(|l| l.split("model_name=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(models.len(), 6, "five admitted names and 'other': {models:?}");
    assert!(models.contains("other") && models.contains("model-0"));
    assert!(page.contains("inference_extension_metric_label_overflow_total{label=\"model_name\"} 55"));
    // 57 more names, and the page grew by a bounded amount only (the new series of the cap).
    assert!(page.len() < small * 3, "{} vs {small}", page.len());

    // Series keyed by an endpoint go when the endpoint leaves.
    assert!(page.contains("pod_name=\"10.0.0.2:8000\""));
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let page = metrics_page(epp.metrics_addr).await;
    assert!(!page.contains("pod_name=\"10.0.0.2:8000\""), "{page}");
    assert!(page.contains("pod_name=\"10.0.0.1:8000\""));
}

#[tokio::test]
async fn the_body_budget_refuses_the_stream_that_would_exceed_it_and_no_other() {
    let epp = start(
        SEED_CONFIG,
        &["--max-body-bytes=1000", "--max-buffered-body-bytes=1500"],
    )
    .await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let body = |n: usize| {
        let text = "x".repeat(n - chat_body("m", "").len());
        chat_body("m", &text)
    };
    let headers = |len: usize| {
        let mut h = post("/v1/chat/completions");
        h.push(("content-length", Box::leak(len.to_string().into_boxed_str())));
        h
    };
    // Headers alone hold nothing: ten streams declaring 1000 bytes each and sending none.
    let mut idle = Vec::new();
    for _ in 0..10 {
        let mut c = epp.open().await;
        c.send(request_headers(&headers(1000), false)).await;
        idle.push(c);
    }
    // A sends 900 bytes of its body in two chunks: 900 are charged.
    let a_body = body(900);
    let mut a = epp.open().await;
    a.send(request_headers(&headers(900), false)).await;
    a.send(request_body(&a_body.as_bytes()[..450], false)).await;
    a.send(request_body(&a_body.as_bytes()[450..800], false)).await;
    a.assert_silent().await;
    // B declares 750: 800 + 750 > 1500 is refused before any byte is kept, with a clear message.
    let mut b = epp.open().await;
    b.send(request_headers(&headers(750), false)).await;
    let (status, message) = immediate(&b.recv().await);
    assert_eq!(status, 503);
    assert!(message.contains("--max-buffered-body-bytes"), "{message}");
    // C, chunked (no length), fits with 500 bytes and is refused when it grows past the budget.
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/chat/completions"), false))
        .await;
    c.send(request_body(&[b' '; 500], false)).await;
    c.assert_silent().await;
    c.send(request_body(&[b' '; 300], false)).await;
    assert_eq!(immediate(&c.recv().await).0, 503);
    // A goes on undisturbed and its body is forwarded whole.
    a.send(request_body(&a_body.as_bytes()[800..], true)).await;
    assert_eq!(destination(&a.recv().await), "10.0.0.1:8000");
    let mut forwarded = Vec::new();
    loop {
        let (bytes, eos) = streamed(&a.recv().await);
        forwarded.extend(bytes);
        if eos {
            break;
        }
    }
    assert_eq!(forwarded, a_body.as_bytes());
    // Once A is routed its bytes are returned: a 1000-byte body fits, idle streams or not.
    let b_body = body(1000);
    let mut b = epp.open().await;
    b.send(request_headers(&headers(1000), false)).await;
    b.send(request_body(b_body.as_bytes(), true)).await;
    assert_eq!(destination(&b.recv().await), "10.0.0.1:8000");
    // A declared length above --max-body-bytes is a 413 before any byte is buffered.
    let mut d = epp.open().await;
    d.send(request_headers(&headers(5000), false)).await;
    assert_eq!(immediate(&d.recv().await).0, 413);
    drop(idle);
    // Refusals for the budget are no scheduling failures.
    let page_records = epp.records.finished.lock();
    assert!(
        page_records
            .iter()
            .filter(|r| r.error.is_some())
            .all(|r| !r.scheduling_failed)
    );
}

#[tokio::test]
async fn a_budget_below_the_body_limit_is_refused_at_start() {
    let args = [
        "epp",
        "--static-endpoints=127.0.0.1:1",
        "--max-body-bytes=1000",
        "--max-buffered-body-bytes=999",
    ];
    let e = endpoint_picker::config::cli::parse_args(args.iter().map(Into::into))
        .map_err(|e| e.to_string())
        .and_then(|cli| cli.validate().map_err(|e| e.to_string()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--max-buffered-body-bytes (999)") && e.contains("--max-body-bytes (1000)"),
        "{e}"
    );
}

#[tokio::test]
async fn a_streamed_responses_api_answer_records_its_usage() {
    let epp = start(SEED_CONFIG, &[]).await;
    epp.set_pool(&[("10.0.0.1:8000", 0, 0.0)]);
    let body = r#"{"model":"m","input":"hi","stream":true}"#;
    let mut c = epp.open().await;
    c.send(request_headers(&post("/v1/responses"), false)).await;
    c.send(request_body(body.as_bytes(), true)).await;
    c.recv().await;
    c.recv().await;
    c.send(response_headers(
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
    ))
    .await;
    c.recv().await;
    let events = [
        "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hello\"}\n\n",
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\",\"usage\":{\"input_tokens\":7,\"output_tokens\":2,\"total_tokens\":9}}}\n\n",
    ];
    for (i, e) in events.iter().enumerate() {
        c.send(response_body(e.as_bytes(), i + 1 == events.len())).await;
        c.recv().await;
    }
    c.close();
    let _ = c.end().await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let finished = epp.records.finished.lock().last().cloned().unwrap();
    let usage = finished.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (Some(7), Some(2)));
}
