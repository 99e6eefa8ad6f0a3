//! The data layer's plugins act with their parameters, end to end: the real EPP (`app::start`)
//! scraping fake model servers over real HTTP and HTTPS on 127.0.0.1.
//!
//! Each case was accepted and then ignored before the data layer became plugins: a
//! `metrics-data-source` `port` or `scheme`, a `core-metrics-extractor` engine the EPP does
//! not know, a `utilization-detector`'s thresholds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use endpoint_picker::app::{self, Running};
use endpoint_picker::config::cli::parse_args;
use endpoint_picker::datalayer::Metrics;
use epp_testkit::extproc::*;
use epp_testkit::model_server::{ModelServer, TlsServer, issue, not_found_server};

const HEAD: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n";

async fn start(endpoints: &[SocketAddr], config: &str, extra: &[&str]) -> Running {
    let list = endpoints
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut args: Vec<String> = vec![
        "epp".into(),
        format!("--static-endpoints={list}"),
        "--bind-address=127.0.0.1".into(),
        "--grpc-port=0".into(),
        "--grpc-health-port=0".into(),
        "--metrics-port=0".into(),
        "--secure-serving=false".into(),
        "--refresh-metrics-interval=20ms".into(),
        format!("--config-text={HEAD}{config}"),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let cli = parse_args(args.into_iter().map(OsString::from)).unwrap();
    app::start(&cli).await.unwrap()
}

/// The endpoint's figures once scraped, or `None` after `wait`.
async fn scraped(epp: &Running, wait: Duration) -> Option<Metrics> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let snap = epp.store.load();
        if let Some(e) = snap.endpoints().first()
            && e.metrics().updated_at.is_some()
        {
            return Some(e.metrics().clone());
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const SCORER: &str = "- type: queue-scorer\n";

/// Case 1: a sidecar answers 404 on the serving port's `/metrics`; the metrics live on
/// another port, named by the source's `port` parameter.
#[tokio::test]
async fn metrics_data_source_port_is_scraped() {
    let metrics = ModelServer::start(7, 0.25).await;
    let (serving, _stop) = not_found_server().await;
    let port = metrics.addr.port();
    let with_port =
        format!("plugins:\n{SCORER}- type: metrics-data-source\n  parameters: {{port: {port}}}\n");
    let epp = start(&[serving], &with_port, &[]).await;
    let m = scraped(&epp, Duration::from_secs(5))
        .await
        .expect("never scraped the metrics port");
    assert_eq!((m.waiting_queue, m.kv_cache_usage), (7, 0.25));
    assert!(metrics.scrapes() > 0);
    epp.shutdown();
    // Without the parameter the serving port is scraped, and its 404 leaves the figures unset.
    let epp = start(&[serving], &format!("plugins:\n{SCORER}"), &[]).await;
    assert!(scraped(&epp, Duration::from_millis(400)).await.is_none());
    epp.shutdown();
    // The flag is the default under the parameter.
    let flag = format!("--model-server-metrics-port={port}");
    let epp = start(&[serving], &format!("plugins:\n{SCORER}"), &[&flag]).await;
    assert_eq!(
        scraped(&epp, Duration::from_secs(5)).await.unwrap().waiting_queue,
        7
    );
}

/// Case 2: a server that exposes its metrics over TLS only, scraped with `scheme: https`;
/// its certificate is checked against `caCertPath`, or not at all with `insecureSkipVerify`.
#[tokio::test]
async fn metrics_data_source_scheme_https_and_its_tls_settings() {
    let tls = TlsServer::new();
    let server = ModelServer::start_tls(3, 0.5, &tls).await;
    let dir = std::env::temp_dir().join(format!("epp-datalayer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &tls.ca_pem).unwrap();
    let ca = ca.display().to_string();

    let source =
        |params: &str| format!("plugins:\n{SCORER}- type: metrics-data-source\n  parameters: {params}\n");
    let https = source("{scheme: https}");
    let epp = start(&[server.addr], &https, &[]).await;
    let m = scraped(&epp, Duration::from_secs(5))
        .await
        .expect("never scraped over https");
    assert_eq!(m.waiting_queue, 3);
    epp.shutdown();
    // Plain HTTP against the TLS port gets nothing.
    let epp = start(&[server.addr], &format!("plugins:\n{SCORER}"), &[]).await;
    assert!(scraped(&epp, Duration::from_millis(400)).await.is_none());
    epp.shutdown();
    // Verification against the right CA passes; with verification on and no CA it fails.
    let epp = start(
        &[server.addr],
        &source(&format!("{{scheme: https, caCertPath: '{ca}'}}")),
        &[],
    )
    .await;
    assert_eq!(
        scraped(&epp, Duration::from_secs(5)).await.unwrap().waiting_queue,
        3
    );
    epp.shutdown();
    let epp = start(
        &[server.addr],
        &source("{scheme: https, insecureSkipVerify: false}"),
        &[],
    )
    .await;
    assert!(scraped(&epp, Duration::from_millis(400)).await.is_none());
    epp.shutdown();

    // Mutual TLS: the server wants a client certificate from its client CA.
    let client = issue(&["epp"]);
    let mtls = TlsServer::requiring_clients(&client.ca_pem);
    let strict = ModelServer::start_tls(4, 0.5, &mtls).await;
    let (cert, key) = (dir.join("client.pem"), dir.join("client.key"));
    std::fs::write(&cert, &client.cert_pem).unwrap();
    std::fs::write(&key, &client.key_pem).unwrap();
    let with_client = source(&format!(
        "{{scheme: https, clientCertPath: '{}', clientKeyPath: '{}'}}",
        cert.display(),
        key.display()
    ));
    let epp = start(&[strict.addr], &with_client, &[]).await;
    assert_eq!(
        scraped(&epp, Duration::from_secs(5)).await.unwrap().waiting_queue,
        4
    );
    epp.shutdown();
    let epp = start(&[strict.addr], &https, &[]).await;
    assert!(scraped(&epp, Duration::from_millis(400)).await.is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Case 3: an engine the EPP does not know, described by `engineConfigs` and made the default.
#[tokio::test]
async fn core_metrics_extractor_reads_a_configured_engine() {
    let page = "# TYPE myengine:num_requests_waiting gauge\nmyengine:num_requests_waiting{model=\"m\"} 6\nmyengine:num_requests_running 2\nmyengine:kv_cache_usage 0.4\n";
    let server = ModelServer::start_page(page).await;
    let config = format!(
        "plugins:
{SCORER}- type: core-metrics-extractor
  parameters:
    defaultEngine: myengine
    engineConfigs:
    - name: myengine
      queuedRequestsSpec: myengine:num_requests_waiting
      runningRequestsSpec: myengine:num_requests_running
      kvUsageSpec: myengine:kv_cache_usage
"
    );
    let epp = start(&[server.addr], &config, &[]).await;
    let m = scraped(&epp, Duration::from_secs(5))
        .await
        .expect("custom engine never read");
    assert_eq!((m.waiting_queue, m.running, m.kv_cache_usage), (6, 2, 0.4));
    epp.shutdown();
    // The built-in vLLM mapping finds nothing on that page.
    let epp = start(&[server.addr], &format!("plugins:\n{SCORER}"), &[]).await;
    assert!(scraped(&epp, Duration::from_millis(400)).await.is_none());
}

/// Case 4, with scraped figures: the referenced `utilization-detector` sheds with its own
/// threshold (8), not the default (5).
#[tokio::test]
async fn the_utilization_detector_threshold_acts_on_scraped_queues() {
    let a = ModelServer::start(6, 0.1).await;
    let b = ModelServer::start(6, 0.1).await;
    let detector = format!(
        "plugins:\n{SCORER}- name: detector\n  type: utilization-detector\n  parameters: {{queueDepthThreshold: 8, metricsStalenessThreshold: 1s}}\nflowControl:\n  saturationDetector: {{pluginRef: detector}}\n"
    );
    let defaults = format!("plugins:\n{SCORER}");
    let body = chat_body("tiny", "hello");
    for (config, admitted) in [(detector, true), (defaults, false)] {
        let epp = start(&[a.addr, b.addr], &config, &["--metrics-staleness-threshold=10s"]).await;
        epp.objectives.replace([("batch".to_owned(), -1)].into());
        scraped(&epp, Duration::from_secs(5)).await.unwrap();
        let (r, _) = chat_on(
            open(epp.grpc_addr).await,
            &body,
            &[("x-gateway-inference-objective", "batch")],
        )
        .await;
        if admitted {
            destination(&r);
        } else {
            assert_eq!(immediate(&r).0, 429);
        }
        epp.shutdown();
    }
}

/// A declared source or extractor that no section uses is refused at start, as is a
/// parameter the plugin does not have.
#[tokio::test]
async fn unusable_data_layer_configs_fail_before_any_port_is_bound() {
    for (config, want) in [
        (
            format!("plugins:\n{SCORER}- type: metrics-data-source\n  parameters: {{portNumber: 9400}}\n"),
            "unknown field `portNumber`",
        ),
        (
            format!(
                "plugins:\n{SCORER}- name: a\n  type: metrics-data-source\n- name: b\n  type: metrics-data-source\n"
            ),
            "2 plugins of type metrics-data-source are declared but not listed",
        ),
    ] {
        let args = [
            "epp".to_owned(),
            "--static-endpoints=127.0.0.1:1".to_owned(),
            "--secure-serving=false".to_owned(),
            format!("--config-text={HEAD}{config}"),
        ];
        let cli = parse_args(args.into_iter().map(OsString::from)).unwrap();
        let err = app::start(&cli).await.unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
}
