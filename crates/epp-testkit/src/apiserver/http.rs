//! The HTTP side of the fake API server: authentication, routing, CRUD, lists, watches,
//! TokenReview/SubjectAccessReview and discovery.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State as AxumState};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::Stream;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::aux;
use super::state::{Filter, KindInfo, ObjKey, State, WatchMsg, WatchStartError};
use super::util::{
    FieldSelector, LabelSelector, hex_decode, hex_encode, json_patch, merge_patch, status_object,
};
use super::{Shared, TOKEN};

type Params = HashMap<String, String>;

/// An error answer (a `Status` object).
struct Fail {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl Fail {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    /// Adds `details` naming the object, as the API server does for errors about one object.
    fn about(mut self, info: &KindInfo, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": info.group, "kind": info.plural}));
        self
    }

    fn bad(msg: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", msg)
    }
}

type Reply = Result<Response, Fail>;

fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

fn fail_response(fail: Fail) -> Response {
    json_response(
        fail.code,
        &status_object(fail.code, fail.reason, &fail.message, fail.details),
    )
}

/// The parts of a resource path.
struct Target {
    kind: usize,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

/// The single handler behind every path.
pub async fn handle(AxumState(shared): AxumState<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), ToString::to_string);
    shared.log_request(format!("{} {}", parts.method, path_and_query));
    if !shared.state.lock().available {
        return fail_response(Fail::new(
            503,
            "ServiceUnavailable",
            "the server is currently unavailable",
        ));
    }
    let expected = format!("Bearer {TOKEN}");
    if parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(expected.as_str())
    {
        return fail_response(Fail::new(401, "Unauthorized", "Unauthorized"));
    }
    let body = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => return fail_response(Fail::bad(format!("reading the body: {e}"))),
    };
    let params: Params = Query::try_from_uri(&parts.uri).map(|q| q.0).unwrap_or_default();
    let path = parts.uri.path().trim_matches('/').to_string();
    let segs: Vec<&str> = if path.is_empty() {
        Vec::new()
    } else {
        path.split('/').collect()
    };
    match route(&shared, &parts.method, &segs, &parts.headers, &params, body) {
        Ok(resp) => resp,
        Err(fail) => fail_response(fail),
    }
}

fn not_found() -> Fail {
    Fail::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    segs: &[&str],
    headers: &HeaderMap,
    params: &Params,
    body: Bytes,
) -> Reply {
    let (group, version, rest) = match segs {
        [] => {
            return Ok(json_response(
                200,
                &json!({"paths": ["/api", "/api/v1", "/apis", "/version"]}),
            ));
        }
        ["version"] => return Ok(json_response(200, &aux::version_info())),
        ["healthz" | "readyz" | "livez"] => return Ok((StatusCode::OK, "ok").into_response()),
        ["api"] => {
            return Ok(json_response(
                200,
                &json!({"kind": "APIVersions", "versions": ["v1"]}),
            ));
        }
        ["apis"] => return Ok(json_response(200, &aux::group_list(&shared.state.lock()))),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group] => {
            let found = aux::group(&shared.state.lock(), group);
            return found.map(|g| json_response(200, &g)).ok_or_else(not_found);
        }
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(not_found()),
    };
    if rest.is_empty() {
        return aux::resource_list(&shared.state.lock(), group, version)
            .map(|l| json_response(200, &l))
            .ok_or_else(not_found);
    }
    match (group, version, rest) {
        ("authentication.k8s.io", "v1", ["tokenreviews"]) => {
            return review(shared, method, body, aux::token_review);
        }
        ("authorization.k8s.io", "v1", ["subjectaccessreviews"]) => {
            return review(shared, method, body, aux::subject_access_review);
        }
        _ => {}
    }
    let (namespace, plural, tail) = match rest {
        ["namespaces", ns, plural, tail @ ..] => (Some(ns.to_string()), *plural, tail),
        [plural, tail @ ..] => (None, *plural, tail),
        [] => return Err(not_found()),
    };
    let kind = shared
        .state
        .lock()
        .kind_by_plural(group, version, plural)
        .ok_or_else(not_found)?;
    let namespaced = shared.state.lock().kinds[kind].namespaced;
    let (name, status) = match tail {
        [] => (None, false),
        [name] => (Some(name.to_string()), false),
        [name, "status"] => (Some(name.to_string()), true),
        _ => return Err(not_found()),
    };
    if (namespace.is_some() && !namespaced) || (namespaced && namespace.is_none() && name.is_some()) {
        return Err(not_found());
    }
    let target = Target {
        kind,
        namespace,
        name,
        status,
    };
    let watch = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
    match *method {
        Method::GET if watch && !target.status => start_watch(shared, &target, headers, params),
        Method::GET if target.name.is_some() => get_item(shared, &target, headers),
        Method::GET => list(shared, &target, headers, params),
        Method::POST if target.name.is_none() && (target.namespace.is_some() || !namespaced) => {
            create(shared, &target, &body)
        }
        Method::PUT if target.name.is_some() => replace(shared, &target, &body),
        Method::PATCH if target.name.is_some() => patch(shared, &target, headers, &body),
        Method::DELETE if target.status => {
            Err(Fail::new(405, "MethodNotAllowed", "status cannot be deleted"))
        }
        Method::DELETE if target.name.is_some() => delete_item(shared, &target, &body),
        Method::DELETE => delete_collection(shared, &target, params),
        _ => Err(Fail::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method ({method})"),
        )),
    }
}

// ----- reviews -----

fn review(shared: &Shared, method: &Method, body: Bytes, answer: fn(&State, &Value) -> Value) -> Reply {
    if *method != Method::POST {
        return Err(Fail::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method ({method})"),
        ));
    }
    let mut obj: Value =
        serde_json::from_slice(&body).map_err(|e| Fail::bad(format!("invalid body: {e}")))?;
    if !obj.is_object() {
        return Err(Fail::bad("the body must be an object"));
    }
    obj["status"] = answer(&shared.state.lock(), &obj);
    Ok(json_response(201, &obj))
}

// ----- reads -----

fn wants_metadata_only(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"))
}

fn key_of(target: &Target) -> ObjKey {
    (
        target.kind,
        target.namespace.clone().unwrap_or_default(),
        target.name.clone().unwrap_or_default(),
    )
}

fn missing(info: &KindInfo, name: &str) -> Fail {
    Fail::new(
        404,
        "NotFound",
        format!("{} {name:?} not found", info.qualified()),
    )
    .about(info, name)
}

fn filter_of(target: &Target, headers: &HeaderMap, params: &Params) -> Result<Filter, Fail> {
    let labels =
        LabelSelector::parse(params.get("labelSelector").map_or("", String::as_str)).map_err(Fail::bad)?;
    let mut fields =
        FieldSelector::parse(params.get("fieldSelector").map_or("", String::as_str)).map_err(Fail::bad)?;
    if let Some(name) = &target.name {
        fields = fields.with_name(name);
    }
    Ok(Filter {
        kind: target.kind,
        namespace: target.namespace.clone(),
        labels,
        fields,
        metadata_only: wants_metadata_only(headers),
    })
}

fn get_item(shared: &Shared, target: &Target, headers: &HeaderMap) -> Reply {
    let st = shared.state.lock();
    let key = key_of(target);
    let obj = st
        .objects
        .get(&key)
        .ok_or_else(|| missing(&st.kinds[key.0], &key.2))?;
    let filter = Filter {
        kind: target.kind,
        namespace: None,
        labels: LabelSelector::default(),
        fields: FieldSelector::default(),
        metadata_only: wants_metadata_only(headers),
    };
    Ok(json_response(200, &filter.present(obj)))
}

fn list(shared: &Shared, target: &Target, headers: &HeaderMap, params: &Params) -> Reply {
    let filter = filter_of(target, headers, params)?;
    let limit = match params.get("limit").map(|l| l.parse::<usize>()) {
        None => usize::MAX,
        Some(Ok(0)) => usize::MAX,
        Some(Ok(n)) => n,
        Some(Err(_)) => return Err(Fail::bad("invalid limit")),
    };
    let st = shared.state.lock();
    // A continue token is "<rv of the first page>|<namespace>|<name of the last item sent>".
    let (list_rv, after) = match params.get("continue").filter(|c| !c.is_empty()) {
        None => (st.rv, None),
        Some(token) => {
            let decoded = hex_decode(token).ok_or_else(|| Fail::bad("invalid continue token"))?;
            let mut parts = decoded.splitn(3, '|');
            let (Some(rv), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(Fail::bad("invalid continue token"));
            };
            let rv: u64 = rv.parse().map_err(|_| Fail::bad("invalid continue token"))?;
            if rv < st.floor {
                return Err(Fail::new(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter.",
                ));
            }
            (rv, Some((target.kind, ns.to_string(), name.to_string())))
        }
    };
    let mut matching = st
        .objects_of(target.kind)
        .filter(|(k, _)| after.as_ref().is_none_or(|a| *k > a))
        .filter(|(_, o)| filter.matches(o));
    let mut items = Vec::new();
    let mut last_key = None;
    for (k, o) in matching.by_ref().take(limit) {
        items.push(filter.present(o));
        last_key = Some(k);
    }
    let remaining = matching.count();
    let info = &st.kinds[target.kind];
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if remaining > 0
        && let Some((_, ns, name)) = last_key
    {
        metadata["continue"] = Value::String(hex_encode(&format!("{list_rv}|{ns}|{name}")));
        metadata["remainingItemCount"] = json!(remaining);
    }
    let (api_version, kind) = if filter.metadata_only {
        (
            "meta.k8s.io/v1".to_string(),
            "PartialObjectMetadataList".to_string(),
        )
    } else {
        (info.api_version(), format!("{}List", info.kind))
    };
    Ok(json_response(
        200,
        &json!({"apiVersion": api_version, "kind": kind, "metadata": metadata, "items": items}),
    ))
}

// ----- watches -----

/// Removes the watch from the server when its response body goes away.
struct WatchGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.shared.state.lock().watchers.retain(|w| w.id != self.id);
    }
}

/// The body of a watch response: one JSON event per line until the channel says otherwise, the
/// server goes away or `timeoutSeconds` passes.
struct WatchBody {
    rx: mpsc::UnboundedReceiver<WatchMsg>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    done: bool,
    _guard: Option<WatchGuard>,
}

impl Stream for WatchBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(WatchMsg::Line(line))) => return Poll::Ready(Some(Ok(line))),
            Poll::Ready(Some(WatchMsg::End) | None) => {
                self.done = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(WatchMsg::Abort)) => {
                self.done = true;
                return Poll::Ready(Some(Err(std::io::Error::other("watch connection dropped"))));
            }
            Poll::Pending => {}
        }
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.done = true;
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

fn stream_response(body: WatchBody) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response()
}

fn parse_rv(rv: Option<&String>) -> Result<Option<u64>, Fail> {
    match rv.map(String::as_str) {
        None | Some("" | "0") => Ok(None),
        Some(rv) => rv
            .parse()
            .map(Some)
            .map_err(|_| Fail::bad(format!("invalid resource version {rv:?}"))),
    }
}

fn start_watch(shared: &Arc<Shared>, target: &Target, headers: &HeaderMap, params: &Params) -> Reply {
    let filter = filter_of(target, headers, params)?;
    let flag = |name: &str| matches!(params.get(name).map(String::as_str), Some("true" | "1"));
    let bookmarks = flag("allowWatchBookmarks");
    let send_initial = flag("sendInitialEvents");
    let rv_match = params.get("resourceVersionMatch").map_or("", String::as_str);
    let mut rv = parse_rv(params.get("resourceVersion"))?;
    if send_initial {
        if rv_match != "NotOlderThan" {
            return Err(Fail::bad(
                "sendInitialEvents requires resourceVersionMatch=NotOlderThan",
            ));
        }
        if !bookmarks {
            return Err(Fail::bad("sendInitialEvents requires allowWatchBookmarks=true"));
        }
        // The initial events are the current state, which is not older than any given version.
        rv = None;
    } else if !rv_match.is_empty() {
        return Err(Fail::bad(
            "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        ));
    }
    let timeout = match params.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(_)) => return Err(Fail::bad("invalid timeoutSeconds")),
    };
    let deadline = timeout
        .filter(|t| *t > 0)
        .map(|t| Box::pin(tokio::time::sleep(Duration::from_secs(t))));
    let mut st = shared.state.lock();
    match st.watch(filter, rv, bookmarks, send_initial) {
        Ok((id, rx)) => {
            let guard = WatchGuard {
                shared: shared.clone(),
                id,
            };
            drop(st);
            Ok(stream_response(WatchBody {
                rx,
                deadline,
                done: false,
                _guard: Some(guard),
            }))
        }
        Err(WatchStartError::Gone(message)) => {
            if st.gone_as_http_status {
                return Err(Fail::new(410, "Expired", message));
            }
            // As the real API server: 200, then a single ERROR event with a 410 Status.
            let (tx, rx) = mpsc::unbounded_channel();
            let status = status_object(410, "Expired", &message, None);
            let _ = tx.send(WatchMsg::Line(super::state::event_line("ERROR", &status)));
            let _ = tx.send(WatchMsg::End);
            Ok(stream_response(WatchBody {
                rx,
                deadline: None,
                done: false,
                _guard: None,
            }))
        }
    }
}

// ----- writes -----

fn parse_object(body: &[u8]) -> Result<Value, Fail> {
    let obj: Value = serde_json::from_slice(body)
        .or_else(|_| serde_yaml::from_slice(body))
        .map_err(|e| Fail::bad(format!("invalid body: {e}")))?;
    if obj.is_object() {
        Ok(obj)
    } else {
        Err(Fail::bad("the body must be an object"))
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn check_namespace(obj: &Value, target: &Target) -> Result<(), Fail> {
    match (meta_str(obj, "namespace"), &target.namespace) {
        (Some(ns), Some(want)) if ns != want => Err(Fail::bad(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => Ok(()),
    }
}

fn conflict(info: &KindInfo, name: &str) -> Fail {
    Fail::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} {name:?}: the object has been modified; \
             please apply your changes to the latest version and try again",
            info.qualified()
        ),
    )
    .about(info, name)
}

fn create(shared: &Shared, target: &Target, body: &[u8]) -> Reply {
    let mut obj = parse_object(body)?;
    check_namespace(&obj, target)?;
    let mut st = shared.state.lock();
    let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
        (Some(name), _) => name.to_string(),
        (None, Some(prefix)) => {
            let prefix = prefix.to_string();
            st.generate_name(&prefix)
        }
        (None, None) => {
            return Err(Fail::new(
                422,
                "Invalid",
                "metadata.name: Required value: name or generateName is required",
            ));
        }
    };
    if let Some(meta) = obj["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
    }
    let key = (target.kind, target.namespace.clone().unwrap_or_default(), name);
    if st.objects.contains_key(&key) {
        let info = &st.kinds[key.0];
        return Err(Fail::new(
            409,
            "AlreadyExists",
            format!("{} {:?} already exists", info.qualified(), key.2),
        )
        .about(info, &key.2));
    }
    let stored = st.store(key, obj, None);
    Ok(json_response(201, &stored))
}

/// Combines a written object with the stored one according to the subresource written.
fn merge_subresource(info: &KindInfo, status_write: bool, stored: &Value, mut new: Value) -> Value {
    if status_write {
        let mut out = stored.clone();
        out["status"] = new.get("status").cloned().unwrap_or(Value::Null);
        if let Some(rv) = new.pointer("/metadata/resourceVersion").cloned() {
            out["metadata"]["resourceVersion"] = rv;
        }
        out
    } else {
        if info.status_subresource {
            match stored.get("status") {
                Some(status) => new["status"] = status.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        new
    }
}

fn replace(shared: &Shared, target: &Target, body: &[u8]) -> Reply {
    let obj = parse_object(body)?;
    check_namespace(&obj, target)?;
    let key = key_of(target);
    if meta_str(&obj, "name").is_some_and(|n| n != key.2) {
        return Err(Fail::bad(
            "the name of the object does not match the name on the URL",
        ));
    }
    let mut st = shared.state.lock();
    let info = st.kinds[key.0].clone();
    let stored = st
        .objects
        .get(&key)
        .cloned()
        .ok_or_else(|| missing(&info, &key.2))?;
    if meta_str(&obj, "resourceVersion").is_some_and(|rv| Some(rv) != meta_str(&stored, "resourceVersion")) {
        return Err(conflict(&info, &key.2));
    }
    let new = merge_subresource(&info, target.status, &stored, obj);
    let stored = st.store(key, new, Some(stored));
    Ok(json_response(200, &stored))
}

fn patch(shared: &Shared, target: &Target, headers: &HeaderMap, body: &[u8]) -> Reply {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let content_type = content_type.split(';').next().unwrap_or("").trim().to_string();
    let key = key_of(target);
    let mut st = shared.state.lock();
    let info = st.kinds[key.0].clone();
    let stored = st.objects.get(&key).cloned();
    let patched = match (content_type.as_str(), &stored) {
        ("application/apply-patch+yaml", None) if !target.status => {
            let obj = parse_object(body)?;
            check_namespace(&obj, target)?;
            let obj = merge_subresource(&info, target.status, &Value::Null, obj);
            let created = st.store(key, obj, None);
            return Ok(json_response(201, &created));
        }
        (_, None) => return Err(missing(&info, &key.2)),
        (
            "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/apply-patch+yaml",
            Some(stored),
        ) => {
            let patch = parse_object(body)?;
            let mut doc = (**stored).clone();
            merge_patch(&mut doc, &patch);
            doc
        }
        ("application/json-patch+json", Some(stored)) => {
            let ops: Value =
                serde_json::from_slice(body).map_err(|e| Fail::bad(format!("invalid body: {e}")))?;
            json_patch(stored, &ops).map_err(|e| Fail::new(422, "Invalid", e))?
        }
        (other, Some(_)) => {
            return Err(Fail::new(
                415,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format ({other:?})"),
            ));
        }
    };
    let stored = stored.unwrap_or_default();
    if meta_str(&patched, "resourceVersion")
        .is_some_and(|rv| Some(rv) != meta_str(&stored, "resourceVersion"))
    {
        return Err(conflict(&info, &key.2));
    }
    let new = merge_subresource(&info, target.status, &stored, patched);
    let stored = st.store(key, new, Some(stored));
    Ok(json_response(200, &stored))
}

fn delete_item(shared: &Shared, target: &Target, body: &[u8]) -> Reply {
    let key = key_of(target);
    let mut st = shared.state.lock();
    let info = st.kinds[key.0].clone();
    let stored = st
        .objects
        .get(&key)
        .cloned()
        .ok_or_else(|| missing(&info, &key.2))?;
    if !body.is_empty() {
        let opts: Value =
            serde_json::from_slice(body).map_err(|e| Fail::bad(format!("invalid body: {e}")))?;
        for field in ["uid", "resourceVersion"] {
            let want = opts
                .pointer(&format!("/preconditions/{field}"))
                .and_then(Value::as_str);
            if want.is_some_and(|w| Some(w) != meta_str(&stored, field)) {
                return Err(conflict(&info, &key.2));
            }
        }
    }
    let removed = st.remove(&key).unwrap_or(stored);
    Ok(json_response(200, &removed))
}

fn delete_collection(shared: &Shared, target: &Target, params: &Params) -> Reply {
    let filter = filter_of(target, &HeaderMap::new(), params)?;
    let mut st = shared.state.lock();
    let keys: Vec<ObjKey> = st
        .objects_of(target.kind)
        .filter(|(_, o)| filter.matches(o))
        .map(|(k, _)| k.clone())
        .collect();
    let items: Vec<Value> = keys
        .iter()
        .filter_map(|k| st.remove(k))
        .map(|o| (*o).clone())
        .collect();
    let info = &st.kinds[target.kind];
    Ok(json_response(
        200,
        &json!({
            "apiVersion": info.api_version(),
            "kind": format!("{}List", info.kind),
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        }),
    ))
}
