//! Non-resource answers of the fake API server: version, discovery documents, and the status
//! of TokenReviews and SubjectAccessReviews.

use serde_json::{Value, json};

use super::state::State;

pub fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0",
        "gitCommit": "fake",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// The API groups with their versions (review groups included), in table order.
fn groups(st: &State) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    let reviews = [("authentication.k8s.io", "v1"), ("authorization.k8s.io", "v1")];
    let pairs = st
        .kinds
        .iter()
        .map(|k| (k.group.as_str(), k.version.as_str()))
        .chain(reviews);
    for (group, version) in pairs.filter(|(g, _)| !g.is_empty()) {
        match groups.iter_mut().find(|(name, _)| name == group) {
            Some((_, versions)) if !versions.iter().any(|v| v == version) => {
                versions.push(version.to_string())
            }
            Some(_) => {}
            None => groups.push((group.to_string(), vec![version.to_string()])),
        }
    }
    groups
}

fn api_group(name: &str, versions: &[String]) -> Value {
    let gvs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": name,
        "versions": gvs,
        "preferredVersion": gvs[0],
    })
}

/// `/apis`.
pub fn group_list(st: &State) -> Value {
    let groups: Vec<Value> = groups(st)
        .iter()
        .map(|(name, versions)| api_group(name, versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`.
pub fn group(st: &State, name: &str) -> Option<Value> {
    groups(st)
        .iter()
        .find(|(g, _)| g == name)
        .map(|(g, versions)| api_group(g, versions))
}

fn api_resource(name: &str, kind: &str, namespaced: bool, verbs: &[&str]) -> Value {
    json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": verbs})
}

/// `/api/v1`, `/apis/{group}/{version}`.
pub fn resource_list(st: &State, group: &str, version: &str) -> Option<Value> {
    let verbs = [
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ];
    let mut resources: Vec<Value> = Vec::new();
    for k in st
        .kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
    {
        let mut resource = api_resource(&k.plural, &k.kind, k.namespaced, &verbs);
        resource["singularName"] = Value::String(k.kind.to_lowercase());
        resources.push(resource);
        if k.status_subresource {
            let status = format!("{}/status", k.plural);
            resources.push(api_resource(
                &status,
                &k.kind,
                k.namespaced,
                &["get", "patch", "update"],
            ));
        }
    }
    match (group, version) {
        ("authentication.k8s.io", "v1") => {
            resources.push(api_resource("tokenreviews", "TokenReview", false, &["create"]));
        }
        ("authorization.k8s.io", "v1") => {
            resources.push(api_resource(
                "subjectaccessreviews",
                "SubjectAccessReview",
                false,
                &["create"],
            ));
        }
        _ => {}
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

// ----- reviews -----

pub fn token_review(st: &State, obj: &Value) -> Value {
    let token = obj.pointer("/spec/token").and_then(Value::as_str).unwrap_or("");
    let audiences = obj.pointer("/spec/audiences").cloned();
    let user = st.tokens.get(token).cloned();
    let mut status = match user {
        Some(user) => json!({
            "authenticated": true,
            "user": {"username": user, "uid": format!("uid-{user}"), "groups": ["system:authenticated"]},
        }),
        None => json!({"authenticated": false, "user": {}, "error": "invalid bearer token"}),
    };
    if let Some(audiences) = audiences {
        status["audiences"] = audiences;
    }
    status
}

pub fn subject_access_review(st: &State, obj: &Value) -> Value {
    let user = obj.pointer("/spec/user").and_then(Value::as_str).unwrap_or("");
    let Some(attrs) = obj.pointer("/spec/nonResourceAttributes") else {
        return json!({"allowed": false, "reason": "no rule grants this resource access"});
    };
    let path = attrs.get("path").and_then(Value::as_str).unwrap_or("");
    let verb = attrs.get("verb").and_then(Value::as_str).unwrap_or("");
    let allowed = st.allowed.iter().any(|(u, p, v)| {
        let path_ok = match p.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => p == path,
        };
        u == user && path_ok && (v == verb || v == "*")
    });
    if allowed {
        json!({"allowed": true, "reason": "allowed by the fake API server"})
    } else {
        json!({"allowed": false, "reason": format!("{user:?} may not {verb} {path}")})
    }
}
