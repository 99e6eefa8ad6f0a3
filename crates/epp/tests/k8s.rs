//! Kubernetes discovery, leader election and metrics auth against a fake API server served
//! over real HTTP on 127.0.0.1, driven by the real kube client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use endpoint_picker::datalayer::EndpointStore;
use endpoint_picker::datalayer::discovery::EndpointSource;
use endpoint_picker::k8s::discovery::{KubeSource, POOL_GROUP, PoolRef};
use endpoint_picker::requestcontrol::{ObjectiveTable, PriorityLookup};
use epp_testkit::apiserver::FakeApiServer;
use epp_testkit::e2e::*;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn pool(name: &str, labels: &[(&str, &str)], ports: &[u16]) -> Value {
    json!({
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
            "targetPorts": ports.iter().map(|p| json!({"number": p})).collect::<Vec<_>>(),
            "endpointPickerRef": {"name": "mistral-epp", "port": {"number": 9002}}
        }
    })
}

fn pod(name: &str, ip: &str, ready: bool, labels: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default",
            "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": {"phase": "Running", "podIP": ip,
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    })
}

fn objective(name: &str, priority: i32, pool: &str) -> Value {
    json!({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"priority": priority, "poolRef": {"name": pool}}
    })
}

fn addrs(store: &EndpointStore) -> Vec<String> {
    let mut v: Vec<String> = store
        .load()
        .endpoints()
        .iter()
        .map(|e| e.endpoint.hostport.to_string())
        .collect();
    v.sort();
    v
}

/// Polls until `cond` holds; the snapshot must follow the API within 1 s.
async fn within_1s(what: &str, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("not within 1 s: {what}");
}

#[tokio::test]
async fn the_snapshot_follows_pool_pods_and_objectives_through_watch_failures() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = FakeApiServer::start().await;
    api.apply(pool("mistral", &[("app", "m")], &[8000]));
    api.apply(pod("p1", "10.0.0.1", true, &[("app", "m")]));
    api.apply(pod("p2", "10.0.0.2", true, &[("app", "m")]));
    api.apply(pod("other", "10.0.0.9", true, &[("app", "x")]));
    let client = kube::Client::try_from(api.kube_config()).unwrap();
    let store = Arc::new(EndpointStore::new());
    let objectives = Arc::new(ObjectiveTable::default());
    let source = KubeSource::new(
        client,
        "default".into(),
        PoolRef::Pool {
            name: "mistral".into(),
            group: POOL_GROUP.into(),
        },
        objectives.clone(),
    );
    let cancel = CancellationToken::new();
    let task = tokio::spawn(Box::new(source).run(store.clone(), cancel.clone()));

    within_1s("initial sync", || {
        store.load().is_synced() && addrs(&store) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    })
    .await;

    // Unready and removed pods leave; once gone they stay gone.
    api.apply(pod("p2", "10.0.0.2", false, &[("app", "m")]));
    within_1s("unready pod removed", || addrs(&store) == ["10.0.0.1:8000"]).await;
    api.apply(pod("p3", "10.0.0.3", true, &[("app", "m")]));
    within_1s("new pod added", || {
        addrs(&store) == ["10.0.0.1:8000", "10.0.0.3:8000"]
    })
    .await;
    api.delete("v1", "Pod", "default", "p3");
    within_1s("deleted pod removed", || addrs(&store) == ["10.0.0.1:8000"]).await;
    for _ in 0..20 {
        assert!(
            !addrs(&store).contains(&"10.0.0.3:8000".to_owned()),
            "a removed pod came back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Labels change under the selector, then the selector changes.
    api.apply(pod("p1", "10.0.0.1", true, &[("app", "x")]));
    within_1s("relabelled pod removed", || {
        addrs(&store).is_empty() && store.load().is_synced()
    })
    .await;
    api.apply(pool("mistral", &[("app", "x")], &[8000]));
    within_1s("selector change", || {
        addrs(&store) == ["10.0.0.1:8000", "10.0.0.9:8000"]
    })
    .await;

    // Objectives of this pool come and go; others are ignored.
    api.apply(objective("batch", -1, "mistral"));
    api.apply(objective("critical", 5, "mistral"));
    api.apply(objective("elsewhere", 7, "another-pool"));
    within_1s("objectives", || {
        objectives.priority("batch") == Some(-1) && objectives.priority("critical") == Some(5)
    })
    .await;
    assert_eq!(objectives.priority("elsewhere"), None);
    api.delete(
        "inference.networking.x-k8s.io/v1alpha2",
        "InferenceObjective",
        "default",
        "batch",
    );
    within_1s("objective removed", || objectives.priority("batch").is_none()).await;

    // 410 Gone: the watchers relist and keep following.
    api.expire_history();
    api.apply(pod("p4", "10.0.0.4", true, &[("app", "x")]));
    within_1s("after 410", || {
        addrs(&store).contains(&"10.0.0.4:8000".to_owned())
    })
    .await;
    // A dropped watch connection: they reconnect (default backoff) and miss nothing.
    api.drop_watches();
    api.delete("v1", "Pod", "default", "p4");
    api.apply(pod("p5", "10.0.0.5", true, &[("app", "x")]));
    tokio::time::timeout(Duration::from_secs(10), async {
        while addrs(&store) != ["10.0.0.1:8000", "10.0.0.5:8000", "10.0.0.9:8000"] {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("after a dropped watch");
    api.send_bookmarks();

    // The pool is deleted: nothing to serve, not synced (readiness drops); back when recreated.
    api.delete(
        "inference.networking.k8s.io/v1",
        "InferencePool",
        "default",
        "mistral",
    );
    within_1s("pool deleted", || {
        !store.load().is_synced() && addrs(&store).is_empty()
    })
    .await;
    api.apply(pool("mistral", &[("app", "x")], &[8000, 8001]));
    within_1s("pool recreated with two ranks", || {
        store.load().is_synced()
            && addrs(&store).len() == 6
            && store
                .load()
                .endpoints()
                .iter()
                .any(|e| &*e.endpoint.name == "p1-rank-1")
    })
    .await;

    cancel.cancel();
    task.await.unwrap().unwrap();
}

/// The seed manifest's ConfigMap content, verbatim.
const SEED_CONFIGMAP: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: prefix-cache-scorer
";

#[tokio::test]
async fn the_seed_manifest_args_serve_the_mistral_pool_and_metrics_auth_answers_401_403_200() {
    let _serial = SERIAL.lock().await;
    let api = FakeApiServer::start().await;
    // Three model servers on their own loopback addresses, one port, like pods.
    let port = free_port();
    let mut sims = Vec::new();
    for i in 2..5u8 {
        let addr = std::net::SocketAddr::new([127, 0, 0, i].into(), port);
        sims.push(Sim::start_on(addr, |_| {}).await);
        api.apply(pod(
            &format!("mistral-upstream-{i}"),
            &format!("127.0.0.{i}"),
            true,
            &[("app", "mistral-upstream")],
        ));
    }
    api.apply(pool("mistral", &[("app", "mistral-upstream")], &[port]));
    api.apply(objective("mistral", 10, "mistral"));
    let dir = std::env::temp_dir().join(format!("epp-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let config = dir.join("default-plugins.yaml");
    std::fs::write(&config, SEED_CONFIGMAP).unwrap();
    // The Deployment's args, verbatim but for the mount path of the ConfigMap.
    let args = [
        "--pool-name",
        "mistral",
        "--pool-namespace",
        "default",
        "--v",
        "4",
        "--zap-encoder",
        "json",
        "--grpc-port",
        "9002",
        "--grpc-health-port",
        "9003",
        "--config-file",
        config.to_str().unwrap(),
    ];
    let log = dir.join("epp.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(args)
        .env("KUBECONFIG", &kubeconfig)
        .env("NAMESPACE", "default")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _epp = KillOnDrop(child);
    let http = client();
    let mut last = String::new();
    for _ in 0..300 {
        match http.get("http://127.0.0.1:9090/readyz").send().await {
            Ok(r) if r.status().is_success() => {
                last.clear();
                break;
            }
            Ok(r) => last = format!("{}", r.status()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        last.is_empty(),
        "epp not ready ({last}):\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // Picks through Envoy (AI Gateway shape, TLS to the EPP as the seed's Service implies).
    let addrs: Vec<_> = sims.iter().map(|s| s.addr).collect();
    let envoy = Envoy::start(Shape::AiGateway, 9002, &addrs).await;
    let mut served = std::collections::HashSet::new();
    for i in 0..9 {
        let r = post(
            &http,
            &envoy.url("/v1/chat/completions"),
            chat(&format!("hello {i}"), false),
            &[("x-gateway-inference-objective", "mistral")],
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        served.insert(r.served_by.unwrap());
    }
    assert!(served.iter().all(|s| sims.iter().any(|x| &x.id == s)));

    // Metrics auth: no token 401, unknown token 401, known but not allowed 403, allowed 200.
    api.add_token("prometheus-token", "system:serviceaccount:monitoring:prometheus");
    api.add_token("intruder-token", "system:serviceaccount:default:intruder");
    api.allow("system:serviceaccount:monitoring:prometheus", "/metrics", "get");
    let get = |token: Option<&str>| {
        let mut r = http.get("http://127.0.0.1:9090/metrics");
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap() }
    };
    assert_eq!(get(None).await.status(), 401);
    assert_eq!(get(Some("made-up")).await.status(), 401);
    assert_eq!(get(Some("intruder-token")).await.status(), 403);
    let ok = get(Some("prometheus-token")).await;
    assert_eq!(ok.status(), 200);
    let text = ok.text().await.unwrap();
    assert!(
        text.contains("inference_pool_ready_pods{name=\"mistral\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("inference_extension_scheduler_attempts_total"),
        "{text}"
    );
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn readiness(port: u16, service: &str) -> Option<i32> {
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()?;
    Some(r.into_inner().status)
}

const SERVING: i32 = 1;

#[tokio::test]
async fn one_leader_at_a_time_and_the_standby_takes_over() {
    let _serial = SERIAL.lock().await;
    let api = FakeApiServer::start().await;
    let sim = Sim::start(|_| {}).await;
    api.apply(pod("m-1", "127.0.0.1", true, &[("app", "m")]));
    api.apply(pool("mistral", &[("app", "m")], &[sim.addr.port()]));
    let dir = std::env::temp_dir().join(format!("epp-le-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);

    let start = |name: &str| {
        let health = free_port();
        let grpc = free_port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_epp"))
            .args([
                "--pool-name=mistral",
                "--bind-address=127.0.0.1",
                &format!("--grpc-port={grpc}"),
                &format!("--grpc-health-port={health}"),
                &format!("--metrics-port={}", free_port()),
                &format!("--kubeconfig={}", kubeconfig.display()),
                "--secure-serving=false",
                "--ha-enable-leader-election",
                "--ha-lease-duration=3s",
                "--ha-renew-deadline=2s",
                "--ha-retry-period=200ms",
            ])
            .env("POD_NAME", name)
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap();
        (KillOnDrop(child), health, grpc)
    };
    let (a, a_health, a_grpc) = start("epp-a");
    let (b, b_health, b_grpc) = start("epp-b");

    // Both are live (and answering) first.
    for port in [a_health, b_health] {
        let mut live = false;
        for _ in 0..200 {
            if readiness(port, "liveness").await == Some(SERVING) {
                live = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(live, "an EPP never answered its liveness probe");
    }
    // Exactly one becomes ready, and stays the only one over several renewals.
    let mut leader = None;
    for _ in 0..200 {
        let ra = readiness(a_health, "readiness").await;
        let rb = readiness(b_health, "readiness").await;
        if (ra == Some(SERVING)) ^ (rb == Some(SERVING)) {
            leader = Some(if ra == Some(SERVING) { 'a' } else { 'b' });
            break;
        }
        assert!(!(ra == Some(SERVING) && rb == Some(SERVING)), "two leaders");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leader = leader.expect("no leader elected");
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ra = readiness(a_health, "readiness").await == Some(SERVING);
        let rb = readiness(b_health, "readiness").await == Some(SERVING);
        assert_eq!((ra, rb), (leader == 'a', leader == 'b'), "leadership flapped");
    }
    // A follower still answers ext_proc.
    let follower_grpc = if leader == 'a' { b_grpc } else { a_grpc };
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{follower_grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut stream = client
        .process(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest {
        request: Some(
            envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request::RequestHeaders(
                envoy_types::pb::envoy::service::ext_proc::v3::HttpHeaders {
                    end_of_stream: true,
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        answer.response,
        Some(envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response::RequestHeaders(_))
    ));

    // The leader stops (SIGTERM releases the lease): the standby takes over quickly.
    let (stopping, standby_health) = if leader == 'a' {
        (&a, b_health)
    } else {
        (&b, a_health)
    };
    std::process::Command::new("kill")
        .args(["-TERM", &stopping.0.id().to_string()])
        .status()
        .unwrap();
    let mut took_over = false;
    for _ in 0..100 {
        if readiness(standby_health, "readiness").await == Some(SERVING) {
            took_over = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(took_over, "the standby never became leader");
    let lease = api
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            "default",
            "epp-default-mistral.gateway-api-inference-extension.sigs.k8s.io",
        )
        .expect("lease");
    let holder = lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let standby = if leader == 'a' { "epp-b" } else { "epp-a" };
    assert!(holder.starts_with(standby), "holder {holder}");
}
