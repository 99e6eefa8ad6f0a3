//! Fault injection through a real Envoy and the real `epp` binary: a model server whose
//! metrics hang, fail, turn to garbage or are cut short; whose requests hang, fail, or are cut
//! mid-response; that disappears; and the picker itself killed and restarted under load.
//! Requests keep flowing, failing servers are avoided, nothing panics, every request gets an
//! answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use epp_testkit::e2e::*;
use epp_testkit::faulty::{FaultyServer, MetricsFault, RequestFault};

const SEED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/default-plugins.yaml");

/// Fast scrapes, a short staleness and a short ejection, so each phase takes a second or two.
const FLAGS: &[&str] = &[
    "--config-file",
    SEED,
    "--refresh-metrics-interval=50ms",
    "--metrics-staleness-threshold=400ms",
    "--endpoint-failure-threshold=3",
    "--endpoint-ejection-time=1500ms",
    "--destination-limit=1",
];

/// Envoy's shape with a 2 s route timeout, so a hanging server gets a 504, not a hung client.
async fn envoy(shape: Shape, epp_port: u16, pool: &[std::net::SocketAddr]) -> Envoy {
    Envoy::start_edited(shape, epp_port, pool, |s| s.replace("timeout: 0s", "timeout: 2s")).await
}

/// Sends `n` chat requests one after another and returns (status, served by) of each. Every
/// request must get an answer (a status), whatever the fault.
async fn send(client: &reqwest::Client, envoy: &Envoy, n: usize, tag: &str) -> Vec<(u16, Option<String>)> {
    let mut out = Vec::new();
    for i in 0..n {
        let r = client
            .post(envoy.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(chat(&format!("{tag} {i}"), false))
            .send()
            .await;
        match r {
            Ok(r) => {
                let status = r.status().as_u16();
                let served = r
                    .headers()
                    .get("x-vllm-sim-id")
                    .map(|v| v.to_str().unwrap().to_owned());
                // A body cut mid-way is an answer too (the client sees a broken body).
                let _ = r.bytes().await;
                out.push((status, served));
            }
            Err(e) => panic!("{tag} {i}: no answer at all: {e}"),
        }
    }
    out
}

fn served_by(results: &[(u16, Option<String>)], id: &str) -> usize {
    results.iter().filter(|(_, s)| s.as_deref() == Some(id)).count()
}

/// Waits until requests reach `faulty` again (its figures are fresh and it is not ejected).
async fn until_served_by(client: &reqwest::Client, envoy: &Envoy, faulty: &FaultyServer) {
    for _ in 0..100 {
        let r = send(client, envoy, 1, "probe").await;
        if r[0].1.as_deref() == Some(faulty.id.as_str()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} never got traffic back", faulty.id);
}

#[tokio::test]
async fn failing_model_servers_are_avoided_and_every_request_is_answered() {
    let _serial = SERIAL.lock().await;
    let client = client();
    let healthy = sims(2).await;
    for s in &healthy {
        s.set_load(4, 0.4);
    }
    // The faulty server reports itself idle, so a picker that trusts it would send it everything.
    let mut faulty = FaultyServer::start(0, 0.0).await;
    let mut pool: Vec<_> = healthy.iter().map(|s| s.addr).collect();
    pool.push(faulty.addr);
    let mut epp = Epp::start(&pool, FLAGS).await;
    let envoy = envoy(Shape::AiGateway, epp.grpc_port, &pool).await;
    until_served_by(&client, &envoy, &faulty).await;

    // Metrics faults: the server's figures go stale and it is passed over; requests all succeed.
    for fault in [
        MetricsFault::Hang,
        MetricsFault::Error,
        MetricsFault::Garbage,
        MetricsFault::Truncated,
    ] {
        faulty.set_metrics(fault);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let r = send(&client, &envoy, 20, &format!("{fault:?}")).await;
        assert!(r.iter().all(|(s, _)| *s == 200), "{fault:?}: {r:?}");
        assert_eq!(
            served_by(&r, &faulty.id),
            0,
            "{fault:?}: the faulty server was still picked: {r:?}"
        );
        faulty.set_metrics(MetricsFault::None);
        until_served_by(&client, &envoy, &faulty).await;
    }

    // Request faults with healthy-looking metrics: after three 5xx answers in a row the server
    // is ejected and the rest go elsewhere.
    for fault in [RequestFault::Error, RequestFault::Hang] {
        faulty.set_requests(fault);
        let r = send(&client, &envoy, 12, &format!("{fault:?}")).await;
        let failed = r.iter().filter(|(s, _)| *s >= 500).count();
        assert!((1..=3).contains(&failed), "{fault:?}: {failed} failures: {r:?}");
        assert!(
            r[failed..]
                .iter()
                .all(|(s, served)| *s == 200 && served.as_deref() != Some(faulty.id.as_str())),
            "{fault:?}: {r:?}"
        );
        faulty.set_requests(RequestFault::None);
        until_served_by(&client, &envoy, &faulty).await;
    }

    // Cut mid-response: every request is answered, and only requests the faulty server took go
    // wrong (a cut before the headers reach the gateway is a 503, which counts; a cut after them
    // cannot be told from a client that went away).
    faulty.set_requests(RequestFault::CloseMidResponse);
    let seen = faulty.requests_seen();
    let r = send(&client, &envoy, 10, "cut").await;
    let hits = faulty.requests_seen() - seen;
    let bad = r.iter().filter(|(s, _)| *s != 200).count() as u64;
    assert!(hits > 0, "the cut fault was never exercised: {r:?}");
    assert!(
        bad <= hits,
        "{bad} bad answers but only {hits} requests reached the faulty server: {r:?}"
    );
    faulty.set_requests(RequestFault::None);

    // Gone: refused connections and failed scrapes; after a short while nothing goes there.
    faulty.disappear().await;
    let r = send(&client, &envoy, 10, "gone").await;
    let failed = r.iter().filter(|(s, _)| *s >= 500).count();
    assert!(failed <= 3, "{failed} failures after the server went away: {r:?}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = send(&client, &envoy, 20, "after").await;
    assert!(r.iter().all(|(s, _)| *s == 200), "{r:?}");
    // Every answer came from a healthy server (which one is the profile's choice: these prompts
    // share a prefix).
    assert!(
        r.iter()
            .all(|(_, s)| s.as_deref().is_some_and(|s| healthy.iter().any(|h| h.id == s))),
        "{r:?}"
    );

    // Nothing panicked: the picker is still the same process and says so.
    assert!(epp.child.try_wait().unwrap().is_none(), "epp exited");
    let log = std::fs::read_to_string(&epp.log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    let page = epp.metrics().await;
    assert!(page.contains("inference_pool_ready_pods"), "{page}");
}

/// A bounded load: `workers` clients sending until `stop`, each result kept with its time.
fn load(
    client: reqwest::Client,
    url: String,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<(tokio::time::Instant, u16)>>> {
    (0..workers)
        .map(|w| {
            let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) && i < 2000 {
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(chat(&format!("load {w} {i}"), false))
                        .send()
                        .await;
                    let status = match r {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(_) => 0,
                    };
                    out.push((tokio::time::Instant::now(), status));
                    i += 1;
                }
                out
            })
        })
        .collect()
}

#[tokio::test]
async fn the_picker_killed_under_load_fail_open_keeps_serving_and_strict_recovers() {
    let _serial = SERIAL.lock().await;
    let client = client();
    let healthy = sims(2).await;
    let pool: Vec<_> = healthy.iter().map(|s| s.addr).collect();
    let mut epp = Epp::start(&pool, FLAGS).await;
    let port = epp.grpc_port;
    let open = envoy(Shape::FailOpen, port, &pool).await;
    let strict = envoy(Shape::AiGateway, port, &pool).await;

    let stop = Arc::new(AtomicBool::new(false));
    let open_load = load(client.clone(), open.url("/v1/chat/completions"), 2, stop.clone());
    let strict_load = load(
        client.clone(),
        strict.url("/v1/chat/completions"),
        2,
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Killed without warning (SIGKILL), down for a second, then back on the same port.
    let _ = epp.child.kill();
    let _ = epp.child.wait();
    let down_at = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(epp);
    let epp = Epp::start_on(port, &pool, FLAGS).await;
    let back_at = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);

    let mut open_results = Vec::new();
    for h in open_load {
        open_results.extend(h.await.unwrap());
    }
    let mut strict_results = Vec::new();
    for h in strict_load {
        strict_results.extend(h.await.unwrap());
    }
    assert!(open_results.len() > 20 && strict_results.len() > 20);
    // Fail-open: every request served, through the outage too.
    let bad: Vec<_> = open_results.iter().filter(|(_, s)| *s != 200).collect();
    assert!(
        bad.is_empty(),
        "fail-open failed {} of {}: {bad:?}",
        bad.len(),
        open_results.len()
    );
    assert!(
        open_results.iter().any(|(t, _)| *t > down_at && *t < back_at),
        "no request during the outage"
    );
    // Strict: every request answered (5xx while the picker is down), and served again as soon
    // as it is back (within half a second of it being ready).
    assert!(
        strict_results.iter().all(|(_, s)| *s != 0),
        "a request got no answer"
    );
    let after: Vec<_> = strict_results
        .iter()
        .filter(|(t, _)| *t > back_at + Duration::from_millis(500))
        .collect();
    assert!(
        !after.is_empty() && after.iter().all(|(_, s)| *s == 200),
        "strict shape did not recover: {after:?}"
    );
    let log = std::fs::read_to_string(&epp.log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test]
async fn without_ejection_a_failing_server_keeps_getting_requests() {
    // The control for the ejection above: with --endpoint-failure-threshold=0 a server that
    // fails every request while it reports itself idle keeps receiving them.
    let _serial = SERIAL.lock().await;
    let client = client();
    let healthy = sims(2).await;
    for s in &healthy {
        s.set_load(4, 0.4);
    }
    let faulty = FaultyServer::start(0, 0.0).await;
    let mut pool: Vec<_> = healthy.iter().map(|s| s.addr).collect();
    pool.push(faulty.addr);
    let flags: Vec<&str> = FLAGS
        .iter()
        .map(|f| {
            if f.starts_with("--endpoint-failure-threshold") {
                "--endpoint-failure-threshold=0"
            } else {
                f
            }
        })
        .collect();
    let epp = Epp::start(&pool, &flags).await;
    let envoy = envoy(Shape::AiGateway, epp.grpc_port, &pool).await;
    until_served_by(&client, &envoy, &faulty).await;
    faulty.set_requests(RequestFault::Error);
    let r = send(&client, &envoy, 12, "no ejection").await;
    let failed = r.iter().filter(|(s, _)| *s >= 500).count();
    assert!(
        failed >= 10,
        "only {failed} of 12 reached the failing server: {r:?}"
    );
}
