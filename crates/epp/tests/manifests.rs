//! The Kubernetes manifests in `manifests/`: the offline schema validation of
//! `scripts/validate-manifests` (strict Kubernetes schemas for built-in kinds, the CRDs in
//! `manifests/crds` for InferencePool and InferenceObjective), and checks in Rust of what a
//! schema cannot see: the reference example's flags, probes and ports, the ConfigMap being the
//! repository's config, references between objects, the restricted pod security standard, and
//! the kustomizations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use endpoint_picker::config::EndpointPickerConfig;
use endpoint_picker::config::cli::parse_args;
use serde::Deserialize;
use serde_yaml::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// The reference example's EPP arguments (GIE v1.0 `inferencepool-resources.yaml`, Envoy AI
/// Gateway InferencePool guide), in order.
const REFERENCE_ARGS: &[&str] = &[
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
    "/config/default-plugins.yaml",
];

const IMAGE: &str = "ghcr.io/endpoint-picker/epp:latest";

const CRD_FILES: &[&str] = &[
    "inference.networking.k8s.io_inferencepools.yaml",
    "inference.networking.x-k8s.io_inferencepools.yaml",
    "inference.networking.x-k8s.io_inferenceobjectives.yaml",
];

/// The validator scripts install into the shared `.venv`; one at a time.
static SCRIPT: Mutex<()> = Mutex::new(());

fn manifests_dir() -> PathBuf {
    Path::new(ROOT).join("manifests")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn parse_all(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// Every Kubernetes object in `manifests/` (kustomizations and CRDs left out).
fn objects() -> Vec<Value> {
    yaml_files(&manifests_dir())
        .iter()
        .filter(|p| !p.ends_with("kustomization.yaml") && !p.parent().unwrap().ends_with("crds"))
        .flat_map(|p| parse_all(p))
        .collect()
}

fn object(kind: &str, name: &str) -> Value {
    let mut found: Vec<Value> = objects()
        .into_iter()
        .filter(|o| str_at(o, "kind") == kind && str_at(o, "metadata.name") == name)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind}/{name} in manifests/");
    found.pop().unwrap()
}

/// The value at a dotted path (`spec.ports.0.port`); panics naming the path when it is absent.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('.') {
        let next = match key.parse::<usize>() {
            Ok(i) => cur.get(i),
            Err(_) => cur.get(key),
        };
        cur = next.unwrap_or_else(|| panic!("missing {path} (at {key})"));
    }
    cur
}

fn str_at<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string"))
}

fn i64_at(v: &Value, path: &str) -> i64 {
    at(v, path)
        .as_i64()
        .unwrap_or_else(|| panic!("{path} is not an integer"))
}

fn seq_at<'a>(v: &'a Value, path: &str) -> &'a Vec<Value> {
    at(v, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("{path} is not a list"))
}

fn strings(v: &Value, path: &str) -> Vec<String> {
    seq_at(v, path)
        .iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("{path}: not a string"))
                .to_owned()
        })
        .collect()
}

fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    seq_at(deployment, "spec.template.spec.containers")
        .iter()
        .find(|c| str_at(c, "name") == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn run_script(envs: &[(&str, &Path)]) -> (bool, String) {
    let _one = SCRIPT.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new(Path::new(ROOT).join("scripts/validate-manifests"));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run scripts/validate-manifests");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn validate_manifests_script_passes() {
    let (ok, output) = run_script(&[]);
    assert!(ok, "scripts/validate-manifests failed:\n{output}");
    assert!(output.contains(", 0 errors"), "{output}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}

fn edit(path: &Path, after: &str, insert: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(after), "{}: no {after:?}", path.display());
    std::fs::write(path, text.replacen(after, &format!("{after}{insert}"), 1)).unwrap();
}

/// The validation is not vacuous: an unknown field fails, in a built-in kind and in a custom
/// resource.
#[test]
fn validate_manifests_script_rejects_unknown_fields() {
    let dir = std::env::temp_dir().join(format!("epp-manifests-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&manifests_dir(), &dir);
    edit(
        &dir.join("epp-deployment.yaml"),
        "      terminationGracePeriodSeconds: 130\n",
        "      terminationGracePeriod: 130\n",
    );
    edit(
        &dir.join("inferencepool.yaml"),
        "    failureMode: FailClose\n",
        "    failureMod: FailOpen\n",
    );
    let (ok, output) = run_script(&[("MANIFESTS_DIR", &dir)]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!ok, "unknown fields passed:\n{output}");
    let failed = |object: &str, field: &str| {
        output
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains(object) && l.contains(&format!("'{field}'")))
    };
    assert!(
        failed("Deployment/mistral-epp", "terminationGracePeriod"),
        "{output}"
    );
    assert!(failed("InferencePool/mistral", "failureMod"), "{output}");
}

#[test]
fn every_manifest_parses() {
    let files = yaml_files(&manifests_dir());
    assert!(files.len() >= 9, "{files:?}");
    for file in files {
        let docs = parse_all(&file);
        assert!(!docs.is_empty(), "{}: no document", file.display());
        for doc in &docs {
            assert!(doc.is_mapping(), "{}: not a mapping", file.display());
            str_at(doc, "apiVersion");
            let kind = str_at(doc, "kind");
            if kind == "Kustomization" {
                seq_at(doc, "resources");
            } else {
                str_at(doc, "metadata.name");
            }
        }
    }
}

#[test]
fn epp_args_are_the_reference_examples() {
    let deployment = object("Deployment", "mistral-epp");
    let epp = container(&deployment, "epp");
    assert_eq!(strings(epp, "args"), REFERENCE_ARGS);
    assert!(epp.get("command").is_none(), "the image's entrypoint must run");
    // This binary accepts them as they are.
    let cli = parse_args(
        std::iter::once("epp")
            .chain(REFERENCE_ARGS.iter().copied())
            .map(OsString::from),
    )
    .unwrap();
    cli.validate().unwrap();
    assert_eq!(cli.pool_name, "mistral");
    assert_eq!(
        endpoint_picker::config::resolve::namespace(&cli, &|_| None),
        "default"
    );
    assert_eq!(
        (cli.grpc_port, cli.grpc_health_port, cli.metrics_port),
        (9002, 9003, 9090)
    );
    assert_eq!(
        cli.config_file.as_deref(),
        Some(Path::new("/config/default-plugins.yaml"))
    );
}

#[test]
fn configmap_is_the_repository_config() {
    let cm = object("ConfigMap", "plugins-config");
    let expected = std::fs::read_to_string(Path::new(ROOT).join("config/default-plugins.yaml")).unwrap();
    let value = at(&cm, "data")
        .get("default-plugins.yaml")
        .and_then(Value::as_str);
    assert_eq!(value, Some(expected.as_str()), "key default-plugins.yaml");
    assert_eq!(at(&cm, "data").as_mapping().unwrap().len(), 1);
    let config = EndpointPickerConfig::from_text(&expected, "plugins-config").unwrap();
    config.build_scheduler(Some(1)).unwrap();
}

#[test]
fn epp_deployment_matches_the_reference_shape() {
    let d = object("Deployment", "mistral-epp");
    assert_eq!(str_at(&d, "metadata.namespace"), "default");
    assert_eq!(i64_at(&d, "spec.replicas"), 1);
    assert_eq!(str_at(&d, "spec.selector.matchLabels.app"), "mistral-epp");
    assert_eq!(str_at(&d, "spec.template.metadata.labels.app"), "mistral-epp");
    let pod = at(&d, "spec.template.spec");
    assert_eq!(str_at(pod, "serviceAccountName"), "mistral-epp");
    assert_eq!(i64_at(pod, "terminationGracePeriodSeconds"), 130);

    let epp = container(&d, "epp");
    assert_eq!(str_at(epp, "image"), IMAGE);
    let ports: Vec<(String, i64)> = seq_at(epp, "ports")
        .iter()
        .map(|p| (str_at(p, "name").to_owned(), i64_at(p, "containerPort")))
        .collect();
    assert_eq!(
        ports,
        [
            ("grpc".into(), 9002),
            ("grpc-health".into(), 9003),
            ("metrics".into(), 9090)
        ]
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        let p = at(epp, probe);
        assert_eq!(i64_at(p, "grpc.port"), 9003, "{probe}");
        assert_eq!(str_at(p, "grpc.service"), "inference-extension", "{probe}");
        assert_eq!(i64_at(p, "initialDelaySeconds"), 5, "{probe}");
        assert_eq!(i64_at(p, "periodSeconds"), 10, "{probe}");
    }
    let namespace = seq_at(epp, "env")
        .iter()
        .find(|e| str_at(e, "name") == "NAMESPACE")
        .expect("env NAMESPACE");
    assert_eq!(
        str_at(namespace, "valueFrom.fieldRef.fieldPath"),
        "metadata.namespace"
    );

    assert_eq!(str_at(epp, "resources.requests.cpu"), "250m");
    assert_eq!(str_at(epp, "resources.requests.memory"), "128Mi");
    assert_eq!(str_at(epp, "resources.limits.memory"), "1Gi");

    let mount = &seq_at(epp, "volumeMounts")[0];
    assert_eq!(str_at(mount, "mountPath"), "/config");
    let volume = seq_at(pod, "volumes")
        .iter()
        .find(|v| str_at(v, "name") == str_at(mount, "name"))
        .expect("the mounted volume");
    assert_eq!(str_at(volume, "configMap.name"), "plugins-config");
    // --config-file names the ConfigMap's key under the mount.
    let config_file = REFERENCE_ARGS[REFERENCE_ARGS.iter().position(|a| *a == "--config-file").unwrap() + 1];
    assert_eq!(
        config_file,
        format!("{}/default-plugins.yaml", str_at(mount, "mountPath"))
    );
    let cm = object("ConfigMap", "plugins-config");
    assert!(at(&cm, "data").get("default-plugins.yaml").is_some());
}

#[test]
fn service_pool_and_objectives_refer_to_each_other() {
    let epp = object("Deployment", "mistral-epp");
    let svc = object("Service", "mistral-epp");
    assert_eq!(
        at(&svc, "spec.selector"),
        at(&epp, "spec.template.metadata.labels")
    );
    let ports = seq_at(&svc, "spec.ports");
    let grpc = ports
        .iter()
        .find(|p| i64_at(p, "port") == 9002)
        .expect("port 9002");
    assert_eq!(i64_at(grpc, "targetPort"), 9002);
    assert_eq!(str_at(grpc, "appProtocol"), "http2");
    let metrics = ports
        .iter()
        .find(|p| i64_at(p, "port") == 9090)
        .expect("port 9090");
    assert_eq!(i64_at(metrics, "targetPort"), 9090);

    let pool = object("InferencePool", "mistral");
    assert_eq!(str_at(&pool, "apiVersion"), "inference.networking.k8s.io/v1");
    assert_eq!(str_at(&pool, "metadata.namespace"), "default");
    assert_eq!(str_at(&pool, "spec.endpointPickerRef.name"), "mistral-epp");
    assert_eq!(i64_at(&pool, "spec.endpointPickerRef.port.number"), 9002);
    assert_eq!(str_at(&pool, "spec.endpointPickerRef.failureMode"), "FailClose");

    // The pool selects the simulated servers, on the port they serve.
    let upstream = object("Deployment", "mistral-upstream");
    let labels = at(&upstream, "spec.template.metadata.labels")
        .as_mapping()
        .unwrap();
    let selector = at(&pool, "spec.selector.matchLabels").as_mapping().unwrap();
    assert_eq!(str_at(&pool, "spec.selector.matchLabels.app"), "mistral-upstream");
    for (k, v) in selector {
        assert_eq!(
            labels.get(k),
            Some(v),
            "pool selector {k:?} does not match the model servers"
        );
    }
    let target: Vec<i64> = seq_at(&pool, "spec.targetPorts")
        .iter()
        .map(|p| i64_at(p, "number"))
        .collect();
    assert_eq!(target, [8000]);
    let sim = container(&upstream, "vllm-sim");
    assert_eq!(i64_at(&seq_at(sim, "ports")[0], "containerPort"), 8000);

    let mut priorities = Vec::new();
    for o in objects()
        .iter()
        .filter(|o| str_at(o, "kind") == "InferenceObjective")
    {
        assert_eq!(str_at(o, "apiVersion"), "inference.networking.x-k8s.io/v1alpha2");
        assert_eq!(str_at(o, "spec.poolRef.name"), "mistral");
        priorities.push((str_at(o, "metadata.name").to_owned(), i64_at(o, "spec.priority")));
    }
    priorities.sort();
    assert_eq!(priorities, [("mistral".into(), 10), ("mistral-batch".into(), -1)]);
}

fn rule_grants(rules: &[Value], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        strings(r, "apiGroups").iter().any(|g| g == group)
            && strings(r, "resources").iter().any(|x| x == resource)
            && strings(r, "verbs").iter().any(|v| v == verb)
    })
}

#[test]
fn rbac_grants_what_the_picker_needs() {
    object("ServiceAccount", "mistral-epp");
    let role = object("Role", "pod-read");
    let rules = seq_at(&role, "rules");
    for (group, resource, verbs) in [
        (
            "inference.networking.x-k8s.io",
            "inferenceobjectives",
            &["get", "watch", "list"][..],
        ),
        (
            "inference.networking.x-k8s.io",
            "inferencepools",
            &["get", "watch", "list"],
        ),
        (
            "inference.networking.k8s.io",
            "inferencepools",
            &["get", "watch", "list"],
        ),
        ("", "pods", &["get", "watch", "list"]),
        ("coordination.k8s.io", "leases", &["get", "create", "update"]),
        ("", "events", &["create"]),
    ] {
        for verb in verbs {
            assert!(
                rule_grants(rules, group, resource, verb),
                "pod-read lacks {verb} {group}/{resource}"
            );
        }
    }
    let auth = object("ClusterRole", "auth-reviewer");
    let rules = seq_at(&auth, "rules");
    assert!(rule_grants(
        rules,
        "authentication.k8s.io",
        "tokenreviews",
        "create"
    ));
    assert!(rule_grants(
        rules,
        "authorization.k8s.io",
        "subjectaccessreviews",
        "create"
    ));

    for (kind, name, role_kind, role) in [
        ("RoleBinding", "pod-read-binding", "Role", "pod-read"),
        (
            "ClusterRoleBinding",
            "auth-reviewer-binding",
            "ClusterRole",
            "auth-reviewer",
        ),
    ] {
        let b = object(kind, name);
        assert_eq!(str_at(&b, "roleRef.kind"), role_kind);
        assert_eq!(str_at(&b, "roleRef.name"), role);
        let subject = &seq_at(&b, "subjects")[0];
        assert_eq!(str_at(subject, "kind"), "ServiceAccount");
        assert_eq!(str_at(subject, "name"), "mistral-epp");
        assert_eq!(str_at(subject, "namespace"), "default");
    }

    let reader = object("ClusterRole", "epp-metrics-reader");
    let rules = seq_at(&reader, "rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(strings(&rules[0], "nonResourceURLs"), ["/metrics"]);
    assert_eq!(strings(&rules[0], "verbs"), ["get"]);
}

#[test]
fn model_servers_run_vllm_sim() {
    let d = object("Deployment", "mistral-upstream");
    assert_eq!(i64_at(&d, "spec.replicas"), 3);
    assert_eq!(str_at(&d, "spec.selector.matchLabels.app"), "mistral-upstream");
    let sim = container(&d, "vllm-sim");
    assert_eq!(str_at(sim, "image"), IMAGE);
    assert_eq!(strings(sim, "command"), ["/vllm-sim"]);
    let args = strings(sim, "args");
    assert_eq!(
        args[..6],
        ["--host", "0.0.0.0", "--port", "8000", "--model", "mistral"]
    );
    assert_eq!(str_at(sim, "readinessProbe.httpGet.path"), "/health");
    assert_eq!(i64_at(sim, "readinessProbe.httpGet.port"), 8000);

    // The arguments parse with the flags of the binary the image ships, and give a valid setup.
    let cli = <vllm_sim::cli::Cli as clap::Parser>::try_parse_from(
        std::iter::once("vllm-sim").chain(args.iter().map(String::as_str)),
    )
    .unwrap_or_else(|e| panic!("vllm-sim rejects the manifest's arguments: {e}"));
    cli.sim_config().validate().unwrap();
}

/// The restricted Pod Security Standard, on every pod template.
#[test]
fn pods_meet_the_restricted_pod_security_standard() {
    let deployments: Vec<Value> = objects()
        .into_iter()
        .filter(|o| str_at(o, "kind") == "Deployment")
        .collect();
    assert_eq!(deployments.len(), 2);
    for d in &deployments {
        let name = str_at(d, "metadata.name");
        let pod = at(d, "spec.template.spec");
        assert_eq!(
            at(pod, "securityContext.runAsNonRoot").as_bool(),
            Some(true),
            "{name}"
        );
        // Numeric, so the kubelet can verify runAsNonRoot whatever the image's USER says.
        assert!(i64_at(pod, "securityContext.runAsUser") > 0, "{name}");
        assert_eq!(
            str_at(pod, "securityContext.seccompProfile.type"),
            "RuntimeDefault",
            "{name}"
        );
        assert!(
            pod.get("hostNetwork").is_none() && pod.get("hostPID").is_none(),
            "{name}"
        );
        for c in seq_at(pod, "containers") {
            let sc = at(c, "securityContext");
            let what = format!("{name}/{}", str_at(c, "name"));
            assert_eq!(
                at(sc, "allowPrivilegeEscalation").as_bool(),
                Some(false),
                "{what}"
            );
            assert_eq!(at(sc, "readOnlyRootFilesystem").as_bool(), Some(true), "{what}");
            assert_eq!(at(sc, "runAsNonRoot").as_bool(), Some(true), "{what}");
            assert_eq!(strings(sc, "capabilities.drop"), ["ALL"], "{what}");
            assert!(sc.get("capabilities").unwrap().get("add").is_none(), "{what}");
            assert_eq!(str_at(sc, "seccompProfile.type"), "RuntimeDefault", "{what}");
            assert!(
                c.get("resources").and_then(|r| r.get("limits")).is_some(),
                "{what}: no limits"
            );
        }
    }
}

/// What the API server would refuse and the schemas do not say: names of ports.
#[test]
fn port_names_are_valid_and_unique() {
    let valid = |n: &str| {
        !n.is_empty()
            && n.len() <= 15
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && n.bytes().any(|b| b.is_ascii_lowercase())
            && !n.starts_with('-')
            && !n.ends_with('-')
            && !n.contains("--")
    };
    for o in objects() {
        let ports: Vec<&Value> = match str_at(&o, "kind") {
            "Service" => seq_at(&o, "spec.ports").iter().collect(),
            "Deployment" => seq_at(&o, "spec.template.spec.containers")
                .iter()
                .flat_map(|c| seq_at(c, "ports"))
                .collect(),
            _ => continue,
        };
        let names: Vec<&str> = ports.iter().filter_map(|p| p.get("name")?.as_str()).collect();
        if str_at(&o, "kind") == "Service" && ports.len() > 1 {
            assert_eq!(
                names.len(),
                ports.len(),
                "a multi-port Service must name every port"
            );
        }
        assert!(names.iter().all(|n| valid(n)), "{names:?}");
        assert_eq!(
            names.iter().collect::<BTreeSet<_>>().len(),
            names.len(),
            "{names:?}"
        );
    }
}

#[test]
fn kustomizations_list_existing_files() {
    let dir = manifests_dir();
    for k in yaml_files(&dir)
        .into_iter()
        .filter(|p| p.ends_with("kustomization.yaml"))
    {
        let doc = &parse_all(&k)[0];
        let base = k.parent().unwrap();
        for r in strings(doc, "resources") {
            assert!(
                base.join(&r).is_file(),
                "{}: {r} does not exist{}",
                k.display(),
                if CRD_FILES.contains(&r.as_str()) {
                    " (the CRDs are generated from the Rust types)"
                } else {
                    ""
                }
            );
        }
    }

    // The top level applies every manifest of the directory but not the CRDs.
    let top = strings(&parse_all(&dir.join("kustomization.yaml"))[0], "resources");
    let expected: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(top.iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert_eq!(top.len(), expected.len(), "duplicates in {top:?}");
    assert!(top.iter().all(|r| !r.contains("crds")), "{top:?}");

    let crds = strings(&parse_all(&dir.join("crds/kustomization.yaml"))[0], "resources");
    assert_eq!(crds, CRD_FILES);
}
