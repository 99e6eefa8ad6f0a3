//! The runnable EPP: static pool, scraping real vLLM-shaped `/metrics` over HTTP, health,
//! TLS, the metrics port, and start-up errors of the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use endpoint_picker::app::{self, Running};
use endpoint_picker::config::cli::parse_args;
use epp_testkit::extproc::*;
use epp_testkit::model_server::{Mode, ModelServer};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn start(endpoints: &[SocketAddr], extra: &[&str]) -> Running {
    let list = endpoints
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut args: Vec<String> = vec![
        "epp".into(),
        "--static-endpoints".into(),
        list,
        "--bind-address".into(),
        "127.0.0.1".into(),
        "--grpc-port=0".into(),
        "--grpc-health-port=0".into(),
        "--metrics-port=0".into(),
        "--refresh-metrics-interval=20ms".into(),
        "--config-file".into(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/default-plugins.yaml").into(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let cli = parse_args(args.into_iter().map(OsString::from)).unwrap();
    app::start(&cli).await.unwrap()
}

async fn health(addr: SocketAddr, service: &str) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let r = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap();
    ServingStatus::try_from(r.into_inner().status).unwrap()
}

async fn wait_serving(addr: SocketAddr) {
    // Up to 20 s: on a loaded 2-core machine the first scrape can take a while.
    for _ in 0..1000 {
        if health(addr, "inference-extension").await == ServingStatus::Serving {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never became SERVING");
}

/// Waits until every endpoint has metrics matching `pred`.
async fn wait_metrics(epp: &Running, pred: impl Fn(&endpoint_picker::datalayer::Metrics) -> bool) {
    for _ in 0..250 {
        let snap = epp.store.load();
        if !snap.endpoints().is_empty() && snap.endpoints().iter().all(|e| pred(e.metrics())) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("metrics never matched");
}

async fn pick(epp: &Running) -> String {
    let (r, _) = chat_on(open(epp.grpc_addr).await, &chat_body("tiny", "hello there"), &[]).await;
    destination(&r)
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn least_loaded_model_server_wins() {
    let a = ModelServer::start(4, 0.5).await;
    let b = ModelServer::start(0, 0.1).await;
    let c = ModelServer::start(9, 0.9).await;
    let epp = start(&[a.addr, b.addr, c.addr], &["--secure-serving=false"]).await;
    wait_serving(epp.health_addr).await;
    wait_metrics(&epp, |m| m.updated_at.is_some()).await;
    for _ in 0..5 {
        assert_eq!(pick(&epp).await, b.addr.to_string());
    }
    // Load moves: the scraper sees it and so does the next pick.
    b.set(20, 0.95);
    a.set(0, 0.05);
    wait_metrics(&epp, |m| m.waiting_queue != 0 || m.kv_cache_usage < 0.1).await;
    assert_eq!(pick(&epp).await, a.addr.to_string());
    epp.shutdown();
    epp.wait().await;
}

#[tokio::test]
async fn a_server_whose_metrics_stop_goes_stale_and_is_avoided() {
    let a = ModelServer::start(5, 0.5).await;
    let b = ModelServer::start(0, 0.0).await;
    let epp = start(
        &[a.addr, b.addr],
        &[
            "--secure-serving=false",
            "--metrics-staleness-threshold=300ms",
            "--model-server-metrics-timeout=100ms",
        ],
    )
    .await;
    wait_serving(epp.health_addr).await;
    wait_metrics(&epp, |m| m.updated_at.is_some()).await;
    assert_eq!(pick(&epp).await, b.addr.to_string());
    // b stops answering its metrics: its last figures (idle) would keep winning if trusted.
    b.set_mode(Mode::Error);
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..5 {
        assert_eq!(pick(&epp).await, a.addr.to_string());
    }
    // Both stale: the pool still serves (fail open).
    a.set_mode(Mode::Hang);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let p = pick(&epp).await;
    assert!(p == a.addr.to_string() || p == b.addr.to_string());
    // b recovers and is preferred again.
    a.set_mode(Mode::Ok);
    b.set_mode(Mode::Ok);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(pick(&epp).await, b.addr.to_string());
    epp.shutdown();
}

#[tokio::test]
async fn health_is_serving_only_after_the_first_scrape() {
    let slow = ModelServer::start_with(0, 0.0, Mode::Delay(Duration::from_millis(700))).await;
    let epp = start(&[slow.addr], &["--secure-serving=false"]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        health(epp.health_addr, "inference-extension").await,
        ServingStatus::NotServing
    );
    assert_eq!(get(epp.metrics_addr, "/readyz").await.0, 503);
    wait_serving(epp.health_addr).await;
    assert!(slow.scrapes() >= 1);
    // Any service name, as the reference without leader election.
    assert_eq!(health(epp.health_addr, "").await, ServingStatus::Serving);
    assert_eq!(
        health(epp.health_addr, "envoy.service.ext_proc.v3.ExternalProcessor").await,
        ServingStatus::Serving
    );
    assert_eq!(get(epp.metrics_addr, "/readyz").await.0, 200);
    assert_eq!(get(epp.metrics_addr, "/healthz").await.0, 200);
    epp.shutdown();
}

/// `# TYPE` lines of an exposition, as `name type`, sorted.
fn families(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(str::to_owned)
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn metrics_port_shows_the_reference_families_and_picks_per_endpoint() {
    let a = ModelServer::start(0, 0.1).await;
    let b = ModelServer::start(3, 0.4).await;
    let epp = start(&[a.addr, b.addr], &["--secure-serving=false"]).await;
    wait_serving(epp.health_addr).await;
    wait_metrics(&epp, |m| m.updated_at.is_some()).await;
    for _ in 0..3 {
        assert_eq!(pick(&epp).await, a.addr.to_string());
    }
    // A complete request/response with usage, and an error.
    let mut c = open(epp.grpc_addr).await;
    c.send(request_headers(&post("/v1/chat/completions"), false))
        .await;
    c.send(request_body(chat_body("tiny", "again").as_bytes(), true))
        .await;
    c.recv().await;
    c.recv().await;
    c.send(response_headers(
        &[(":status", "200"), ("content-type", "application/json")],
        false,
    ))
    .await;
    c.recv().await;
    c.send(response_body(
        br#"{"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#,
        true,
    ))
    .await;
    c.recv().await;
    c.close();
    let _ = c.end().await;
    let (r, _) = chat_on(open(epp.grpc_addr).await, "{bad json", &[]).await;
    assert_eq!(immediate(&r).0, 400);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (status, text) = get(epp.metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    let golden: Vec<String> = include_str!("golden/metric_families.txt")
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        families(&text),
        golden,
        "metric families changed; update tests/golden/metric_families.txt on purpose"
    );

    let pod_a = a.addr.to_string();
    let picks = format!(
        "inference_extension_scheduler_attempts_total{{status=\"success\",target_model_name=\"tiny\",pod_name=\"{pod_a}\",namespace=\"default\",port=\"{}\"}} 4",
        a.addr.port()
    );
    assert!(text.contains(&picks), "{picks} not in\n{text}");
    assert!(
        text.contains("inference_objective_request_total{model_name=\"tiny\",target_model_name=\"tiny\"} 4"),
        "{text}"
    );
    assert!(text.contains("error_code=\"BadRequest\"} 1"), "{text}");
    assert!(
        text.contains(
            "inference_objective_input_tokens_sum{model_name=\"tiny\",target_model_name=\"tiny\"} 7.0"
        ),
        "{text}"
    );
    assert!(
        text.contains("inference_pool_ready_pods{name=\"static\"} 2"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "inference_pool_per_pod_queue_size{{name=\"static\",model_server_pod=\"{}\"}} 3",
            b.addr
        )),
        "{text}"
    );
    assert!(
        text.contains("inference_objective_running_requests{model_name=\"tiny\"} 0"),
        "{text}"
    );
    epp.shutdown();
}

#[tokio::test]
async fn tls_is_on_by_default_and_off_on_request() {
    let a = ModelServer::start(0, 0.0).await;
    let epp = start(&[a.addr], &[]).await;
    wait_serving(epp.health_addr).await;
    let pem = epp.self_signed_cert.clone().expect("a generated certificate");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pem))
        .domain_name("localhost");
    let channel = tonic::transport::Channel::from_shared(format!("https://{}", epp.grpc_addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (r, _) = chat_on(open_on(channel).await, &chat_body("tiny", "over tls"), &[]).await;
    assert_eq!(destination(&r), a.addr.to_string());
    // A plaintext client cannot talk to the TLS port.
    let plain = tonic::transport::Channel::from_shared(format!("http://{}", epp.grpc_addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut client = envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::new(channel);
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        assert!(
            client
                .process(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .is_err()
        );
    }
    epp.shutdown();

    let epp = start(&[a.addr], &["--secure-serving=false"]).await;
    assert!(epp.self_signed_cert.is_none());
    wait_serving(epp.health_addr).await;
    assert_eq!(pick(&epp).await, a.addr.to_string());
    epp.shutdown();
}

/// A TLS channel to `addr` that trusts only `pem` (as the name `localhost`).
async fn tls_channel(
    addr: SocketAddr,
    pem: &[u8],
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pem))
        .domain_name("localhost");
    tonic::transport::Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

#[tokio::test]
async fn cert_reload_serves_rotated_certificate_files_without_a_restart() {
    use endpoint_picker::protocol::tls::self_signed;
    let a = ModelServer::start(0, 0.0).await;
    let dir = std::env::temp_dir().join(format!("epp-cert-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (first, second) = (self_signed().unwrap(), self_signed().unwrap());
    std::fs::write(dir.join("tls.crt"), &first.cert).unwrap();
    std::fs::write(dir.join("tls.key"), &first.key).unwrap();
    let path = format!("--cert-path={}", dir.display());
    let epp = start(&[a.addr], &[&path, "--enable-cert-reload"]).await;
    wait_serving(epp.health_addr).await;
    assert!(
        epp.self_signed_cert.is_none(),
        "the files' certificate, not a generated one"
    );
    let channel = tls_channel(epp.grpc_addr, &first.cert).await.unwrap();
    let (r, _) = chat_on(open_on(channel).await, &chat_body("tiny", "first"), &[]).await;
    assert_eq!(destination(&r), a.addr.to_string());
    assert!(tls_channel(epp.grpc_addr, &second.cert).await.is_err());

    // Rotate in place, key first: a Secret volume update or cert-manager renewal.
    std::fs::write(dir.join("tls.key"), &second.key).unwrap();
    std::fs::write(dir.join("tls.crt"), &second.cert).unwrap();
    let mut rotated = None;
    for _ in 0..100 {
        if let Ok(channel) = tls_channel(epp.grpc_addr, &second.cert).await {
            rotated = Some(channel);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let channel = rotated.expect("the new certificate within 10 s");
    let (r, _) = chat_on(open_on(channel).await, &chat_body("tiny", "second"), &[]).await;
    assert_eq!(destination(&r), a.addr.to_string());
    assert!(tls_channel(epp.grpc_addr, &first.cert).await.is_err());
    epp.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_bad_cert_path_stops_start_up_naming_the_file() {
    let a = ModelServer::start(0, 0.0).await;
    let dir = std::env::temp_dir().join(format!("epp-cert-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (x, y) = (
        endpoint_picker::protocol::tls::self_signed().unwrap(),
        endpoint_picker::protocol::tls::self_signed().unwrap(),
    );
    std::fs::write(dir.join("tls.crt"), &x.cert).unwrap();
    std::fs::write(dir.join("tls.key"), &y.key).unwrap();
    let args: Vec<String> = vec![
        "epp".into(),
        "--static-endpoints".into(),
        a.addr.to_string(),
        "--bind-address=127.0.0.1".into(),
        "--grpc-port=0".into(),
        "--grpc-health-port=0".into(),
        "--metrics-port=0".into(),
        format!("--cert-path={}", dir.display()),
    ];
    let cli = parse_args(args.into_iter().map(OsString::from)).unwrap();
    let Err(err) = app::start(&cli).await else {
        panic!("a mismatched key must be refused")
    };
    let err = err.to_string();
    assert!(err.contains("tls.key") && err.contains("does not match"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn health_checking_adds_health_on_the_ext_proc_port() {
    let a = ModelServer::start(0, 0.0).await;
    let epp = start(&[a.addr], &["--secure-serving=false", "--health-checking"]).await;
    wait_serving(epp.health_addr).await;
    assert_eq!(
        health(epp.grpc_addr, "envoy.service.ext_proc.v3.ExternalProcessor").await,
        ServingStatus::Serving
    );
    epp.shutdown();
}

fn run_epp(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_and_bad_config_exit_non_zero_naming_the_problem() {
    let (code, err) = run_epp(&["--static-endpoints", "127.0.0.1:1", "--frobnicate"]);
    assert_ne!(code, 0);
    assert!(err.contains("--frobnicate"), "{err}");
    let (code, err) = run_epp(&["--static-endpoints", "127.0.0.1:1", "--grpc-port", "ninety"]);
    assert_ne!(code, 0);
    assert!(err.contains("--grpc-port"), "{err}");
    let (code, err) = run_epp(&["--grpc-port=0"]);
    assert_ne!(code, 0);
    assert!(err.contains("--pool-name"), "{err}");
    let (code, err) = run_epp(&[
        "--static-endpoints",
        "127.0.0.1:1",
        "--config-text",
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n  nmae: q\n",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown field `nmae`"), "{err}");
    let (code, err) = run_epp(&["--static-endpoints", "localhost:80"]);
    assert_ne!(code, 0);
    assert!(err.contains("localhost:80"), "{err}");
    let (code, err) = run_epp(&[
        "--static-endpoints",
        "127.0.0.1:1",
        "--config-file",
        "/no/such/file.yaml",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("/no/such/file.yaml"), "{err}");
}
