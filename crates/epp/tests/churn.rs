//! Pod churn: pods added, made unready and deleted at a steady rate on a fake API server while
//! ext_proc traffic flows through the real `epp` binary (Kubernetes discovery, a real kube
//! client, a real gRPC client). No request may be sent to a pod more than 1 s after it left
//! the pool, and pods that joined get traffic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use epp_testkit::apiserver::FakeApiServer;
use epp_testkit::e2e::{Epp, SERIAL, free_port};
use epp_testkit::extproc::{chat_body, destination, open, post, request_body, request_headers};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::time::Instant;

const SEED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/default-plugins.yaml");
const PORT: u16 = 8000;

fn pool() -> Value {
    json!({
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": "churn", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "churn"}},
            "targetPorts": [{"number": PORT}],
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}
        }
    })
}

fn pod(i: u32, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("pod-{i}"), "namespace": "default", "labels": {"app": "churn"}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": {"phase": "Running", "podIP": ip(i),
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    })
}

/// Pod `i`'s IP: one loopback address each (nothing listens there; only the pick matters).
fn ip(i: u32) -> String {
    format!("127.0.{}.{}", 1 + i / 200, 10 + i % 200)
}

#[tokio::test]
async fn no_request_goes_to_a_pod_more_than_a_second_after_it_left() {
    let _serial = SERIAL.lock().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = FakeApiServer::start().await;
    api.apply(pool());
    let mut next = 0u32;
    for _ in 0..6 {
        api.apply(pod(next, true));
        next += 1;
    }
    let kubeconfig = std::env::temp_dir().join(format!("churn-kubeconfig-{}", api.addr.port()));
    api.write_kubeconfig(&kubeconfig);
    let grpc_port = free_port();
    let kubeconfig_flag = format!("--kubeconfig={}", kubeconfig.display());
    let epp = Epp::start_args(
        grpc_port,
        &[
            "--pool-name=churn",
            "--pool-namespace=default",
            &kubeconfig_flag,
            "--secure-serving=false",
            "--metrics-endpoint-auth=false",
            "--config-file",
            SEED,
            "--refresh-metrics-interval=100ms",
        ],
    )
    .await;
    let addr = format!("127.0.0.1:{grpc_port}").parse().unwrap();

    // When each pod left the pool (made unready or deleted), by address.
    let left: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic: Vec<_> = (0..2)
        .map(|w| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut picks: Vec<(Instant, String)> = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) && i < 20_000 {
                    let mut c = open(addr).await;
                    let body = chat_body("m", &format!("churn {w} {i}"));
                    c.send(request_headers(&post("/v1/chat/completions"), false))
                        .await;
                    c.send(request_body(body.as_bytes(), true)).await;
                    let sent = Instant::now();
                    let answer = c.recv().await;
                    picks.push((sent, destination(&answer)));
                    i += 1;
                }
                picks
            })
        })
        .collect();

    // Churn for 6 s: every 150 ms a pod joins, the oldest ready pod turns unready, and the oldest
    // unready pod is deleted.
    let mut ready: Vec<u32> = (0..next).collect();
    let mut unready: Vec<u32> = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(150)).await;
        api.apply(pod(next, true));
        ready.push(next);
        next += 1;
        if ready.len() > 4 {
            let i = ready.remove(0);
            left.lock().insert(format!("{}:{PORT}", ip(i)), Instant::now());
            api.apply(pod(i, false));
            unready.push(i);
        }
        if unready.len() > 2 {
            let i = unready.remove(0);
            assert!(api.delete("v1", "Pod", "default", &format!("pod-{i}")));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut picks = Vec::new();
    for t in traffic {
        picks.extend(t.await.unwrap());
    }
    assert!(picks.len() > 200, "too little traffic: {}", picks.len());

    let left = left.lock();
    let mut late: Vec<(String, Duration)> = Vec::new();
    let mut per_pod: BTreeMap<String, usize> = BTreeMap::new();
    for (at, dest) in &picks {
        *per_pod.entry(dest.clone()).or_default() += 1;
        if let Some(gone) = left.get(dest)
            && *at > *gone + Duration::from_secs(1)
        {
            late.push((dest.clone(), *at - *gone));
        }
    }
    assert!(
        late.is_empty(),
        "picks more than 1 s after the pod left: {late:?}"
    );
    // Pods that joined during the churn got traffic: the pool followed the API both ways.
    let joined_late = per_pod
        .keys()
        .filter(|d| !(0..6).any(|i| **d == format!("{}:{PORT}", ip(i))))
        .count();
    assert!(
        joined_late >= 20,
        "only {joined_late} of the pods that joined were picked: {per_pod:?}"
    );
    drop(epp);
    let _ = std::fs::remove_file(kubeconfig);
}
