//! The fake Kubernetes API server, driven by the real `kube` client, watcher and reflector.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::time::Duration;

use epp_testkit::apiserver::{FakeApiServer, TOKEN};
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams, WatchEvent, WatchParams,
};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

fn client(server: &FakeApiServer) -> Client {
    Client::try_from(server.kube_config()).unwrap()
}

fn pod(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "vllm"}]},
        "status": {"podIP": "10.0.0.1", "phase": "Running"},
    })
}

fn typed_pod(name: &str, labels: Value) -> Pod {
    serde_json::from_value(pod(name, labels)).unwrap()
}

fn api_error(res: Result<impl std::fmt::Debug, kube::Error>) -> Box<kube::core::Status> {
    match res {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.expect("timed out")
}

/// Waits until `cond` holds (polling), failing the test after [`WAIT`].
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn names<K>(store: &Store<K>) -> Vec<String>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut names: Vec<String> = store.state().iter().map(|o| o.name_any()).collect();
    names.sort();
    names
}

/// A reflector over pods, driven by a spawned task with the default backoff.
async fn pod_reflector(server: &FakeApiServer, config: watcher::Config) -> (Store<Pod>, JoinHandle<()>) {
    let api: Api<Pod> = Api::namespaced(client(server), "default");
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    let task = tokio::spawn(async move { stream.for_each(|_| async {}).await });
    bounded(reader.wait_until_ready()).await.unwrap();
    (reader, task)
}

type Events = futures_util::stream::BoxStream<'static, Result<WatchEvent<Pod>, kube::Error>>;

async fn watch_pods(server: &FakeApiServer, params: &WatchParams, rv: &str) -> Events {
    let pods: Api<Pod> = Api::namespaced(client(server), "default");
    pods.watch(params, rv).await.unwrap().boxed()
}

/// The next event as (type, object name); bookmarks and errors give their resourceVersion and
/// code; the end of the stream is ("END", "").
async fn next_event(events: &mut Events) -> (&'static str, String) {
    match bounded(events.try_next()).await.unwrap() {
        Some(WatchEvent::Added(p)) => ("ADDED", p.name_any()),
        Some(WatchEvent::Modified(p)) => ("MODIFIED", p.name_any()),
        Some(WatchEvent::Deleted(p)) => ("DELETED", p.name_any()),
        Some(WatchEvent::Bookmark(b)) => ("BOOKMARK", b.metadata.resource_version),
        Some(WatchEvent::Error(e)) => ("ERROR", e.code.to_string()),
        None => ("END", String::new()),
    }
}

fn count(server: &FakeApiServer, pred: impl Fn(&str) -> bool) -> usize {
    server.requests().iter().filter(|r| pred(r)).count()
}

fn is_pod_list(r: &str) -> bool {
    r.starts_with("GET /api/v1/namespaces/default/pods") && !r.contains("watch=")
}

fn is_pod_watch(r: &str) -> bool {
    r.starts_with("GET /api/v1/namespaces/default/pods") && r.contains("watch=true")
}

#[tokio::test]
async fn pods_get_list_create_replace_delete() {
    let server = FakeApiServer::start().await;
    let pods: Api<Pod> = Api::namespaced(client(&server), "default");

    let created = pods
        .create(&PostParams::default(), &typed_pod("a", json!({"app": "x"})))
        .await
        .unwrap();
    let rv = created.resource_version().unwrap();
    assert!(created.uid().is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.namespace().as_deref(), Some("default"));
    let again = api_error(
        pods.create(&PostParams::default(), &typed_pod("a", json!({})))
            .await,
    );
    assert_eq!((again.code, again.reason.as_str()), (409, "AlreadyExists"));

    server.apply(pod("b", json!({"app": "y"})));
    let list = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        list.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(list.metadata.resource_version, Some(server.resource_version()));
    assert_eq!(pods.get("a").await.unwrap().labels()["app"], "x");

    // Replace with the current resourceVersion works; with a stale one it conflicts.
    let mut fresh = pods.get("a").await.unwrap();
    fresh.labels_mut().insert("app".into(), "z".into());
    let replaced = pods.replace("a", &PostParams::default(), &fresh).await.unwrap();
    assert_ne!(replaced.resource_version().unwrap(), rv);
    assert_eq!(replaced.uid(), created.uid());
    let mut stale = created.clone();
    stale.labels_mut().insert("app".into(), "stale".into());
    let conflict = api_error(pods.replace("a", &PostParams::default(), &stale).await);
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        server.get("v1", "Pod", "default", "a").unwrap()["metadata"]["labels"]["app"],
        "z"
    );

    // Writes to the main resource keep the status; the status subresource changes only it.
    let mut no_status = pods.get("a").await.unwrap();
    no_status.status = None;
    let kept = pods
        .replace("a", &PostParams::default(), &no_status)
        .await
        .unwrap();
    assert_eq!(kept.status.unwrap().pod_ip.as_deref(), Some("10.0.0.1"));
    let patched = pods
        .patch_status(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"podIP": "10.0.0.9"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.status.unwrap().pod_ip.as_deref(), Some("10.0.0.9"));
    let merged = pods
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"extra": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.labels().get("extra").map(String::as_str), Some("1"));

    let deleted = pods.delete("a", &DeleteParams::default()).await.unwrap();
    assert_eq!(deleted.left().unwrap().name_any(), "a");
    let missing = api_error(pods.get("a").await);
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, r#"pods "a" not found"#);
    assert_eq!(
        missing.details.map(|d| (d.name, d.kind)),
        Some(("a".into(), "pods".into()))
    );
    assert!(pods.get_opt("a").await.unwrap().is_none());
    assert!(server.delete("v1", "Pod", "default", "b"));
    assert!(!server.delete("v1", "Pod", "default", "b"));
    assert!(pods.list(&ListParams::default()).await.unwrap().items.is_empty());
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.starts_with("POST /api/v1/namespaces/default/pods"))
    );
}

#[tokio::test]
async fn list_selectors_and_pagination() {
    let server = FakeApiServer::start().await;
    for (name, app) in [
        ("p1", "web"),
        ("p2", "web"),
        ("p3", "db"),
        ("p4", "web"),
        ("p5", "cache"),
    ] {
        server.apply(pod(name, json!({"app": app, "idx": name})));
    }
    server
        .apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "other", "namespace": "ns2"}}));
    let pods: Api<Pod> = Api::namespaced(client(&server), "default");
    let names_of =
        |list: kube::core::ObjectList<Pod>| list.items.iter().map(|p| p.name_any()).collect::<Vec<_>>();

    let web = pods.list(&ListParams::default().labels("app=web")).await.unwrap();
    assert_eq!(names_of(web), ["p1", "p2", "p4"]);
    let not_web = pods
        .list(&ListParams::default().labels("app!=web,idx"))
        .await
        .unwrap();
    assert_eq!(names_of(not_web), ["p3", "p5"]);
    let set = pods
        .list(&ListParams::default().labels("app in (db, cache)"))
        .await
        .unwrap();
    assert_eq!(names_of(set), ["p3", "p5"]);
    let by_name = pods
        .list(&ListParams::default().fields("metadata.name=p2"))
        .await
        .unwrap();
    assert_eq!(names_of(by_name), ["p2"]);
    let all: Api<Pod> = Api::all(client(&server));
    let ns2 = all
        .list(&ListParams::default().fields("metadata.namespace!=default"))
        .await
        .unwrap();
    assert_eq!(names_of(ns2), ["other"]);

    let first = pods.list(&ListParams::default().limit(2)).await.unwrap();
    let token = first.metadata.continue_.clone().unwrap();
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    assert_eq!(names_of(first), ["p1", "p2"]);
    let second = pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    let token = second.metadata.continue_.clone().unwrap();
    assert_eq!(names_of(second), ["p3", "p4"]);
    let last = pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert!(last.metadata.continue_.is_none());
    assert_eq!(names_of(last), ["p5"]);

    // A continue token from before the history was forgotten is 410 Gone.
    server.apply(pod("p6", json!({})));
    server.expire_history();
    server.delete("v1", "Pod", "default", "p6");
    let gone = api_error(
        pods.list(&ListParams::default().limit(2).continue_token(&token))
            .await,
    );
    assert_eq!(gone.code, 410);

    // The watcher pages through the initial list.
    let (store, task) = pod_reflector(&server, watcher::Config::default().page_size(2)).await;
    assert_eq!(names(&store), ["p1", "p2", "p3", "p4", "p5"]);
    assert!(server.requests().iter().any(|r| r.contains("continue=")));
    task.abort();
}

#[tokio::test]
async fn custom_kinds_and_leases() {
    let server = FakeApiServer::start().await;
    let client = client(&server);
    for (group, version) in [
        ("inference.networking.k8s.io", "v1"),
        ("inference.networking.x-k8s.io", "v1alpha2"),
    ] {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, "InferencePool"),
            "inferencepools",
        );
        let pools: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
        let pool = DynamicObject::new("pool", &ar).data(json!({"spec": {"targetPorts": [{"number": 8000}]}}));
        pools.create(&PostParams::default(), &pool).await.unwrap();
        let got = pools.get("pool").await.unwrap();
        assert_eq!(got.data["spec"]["targetPorts"][0]["number"], 8000);
        assert_eq!(got.types.unwrap().api_version, ar.api_version);
        assert_eq!(server.list(&ar.api_version, "InferencePool", "default").len(), 1);
    }
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("inference.networking.x-k8s.io", "v1alpha2", "InferenceObjective"),
        "inferenceobjectives",
    );
    server.apply(json!({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
        "kind": "InferenceObjective",
        "metadata": {"name": "chat", "namespace": "default"},
        "spec": {"priority": 2, "poolRef": {"name": "pool"}},
    }));
    let objectives: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let list = objectives.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].data["spec"]["priority"], 2);
    // Server-side apply creates, then merges.
    let ssa = PatchParams::apply("test").force();
    let applied = objectives
        .patch(
            "batch",
            &ssa,
            &Patch::Apply(
                json!({"apiVersion": ar.api_version, "kind": "InferenceObjective", "spec": {"priority": 0}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(applied.metadata.generation, Some(1));
    let applied = objectives
        .patch("batch", &ssa, &Patch::Apply(json!({"spec": {"priority": 1}})))
        .await
        .unwrap();
    assert_eq!(
        (
            applied.data["spec"]["priority"].as_i64(),
            applied.metadata.generation
        ),
        (Some(1), Some(2))
    );

    // Leader election relies on optimistic concurrency on leases.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "epp-leader"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
    }))
    .unwrap();
    let mine = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut theirs = mine.clone();
    theirs.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases
        .replace("epp-leader", &PostParams::default(), &theirs)
        .await
        .unwrap();
    let mut renew = mine;
    renew.spec.as_mut().unwrap().lease_duration_seconds = Some(30);
    let conflict = api_error(leases.replace("epp-leader", &PostParams::default(), &renew).await);
    assert_eq!(conflict.code, 409);
    let current = leases.get("epp-leader").await.unwrap();
    assert_eq!(current.spec.unwrap().holder_identity.as_deref(), Some("b"));

    // Discovery finds the custom kinds.
    let gvk = GroupVersionKind::gvk("inference.networking.k8s.io", "v1", "InferencePool");
    let (found, caps) = kube::discovery::pinned_kind(&client, &gvk).await.unwrap();
    assert_eq!(
        (found.plural.as_str(), caps.scope),
        ("inferencepools", kube::discovery::Scope::Namespaced)
    );

    // JSON patch, unknown paths and methods, as raw requests.
    let json_patch =
        http::Request::patch("/apis/coordination.k8s.io/v1/namespaces/default/leases/epp-leader")
            .header("content-type", "application/json-patch+json")
            .body(br#"[{"op":"replace","path":"/spec/holderIdentity","value":"c"}]"#.to_vec())
            .unwrap();
    let patched: Value = client.request(json_patch).await.unwrap();
    assert_eq!(patched["spec"]["holderIdentity"], "c");
    let unknown = http::Request::get("/apis/example.com/v1/namespaces/default/widgets")
        .body(Vec::new())
        .unwrap();
    let status = api_error(client.request::<Value>(unknown).await);
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    let get_review = http::Request::get("/apis/authentication.k8s.io/v1/tokenreviews")
        .body(Vec::new())
        .unwrap();
    assert_eq!(api_error(client.request::<Value>(get_review).await).code, 405);
}

#[tokio::test]
async fn reflector_follows_adds_updates_deletes() {
    let server = FakeApiServer::start().await;
    server.apply(pod("a", json!({"app": "x"})));
    let (store, task) = pod_reflector(&server, watcher::Config::default()).await;
    assert_eq!(names(&store), ["a"]);
    bounded(server.wait_until(WAIT, |s| s.open_watches() == 1)).await;

    server.apply(pod("b", json!({"app": "x"})));
    eventually("b added", || names(&store) == ["a", "b"]).await;
    server.apply(pod("a", json!({"app": "changed"})));
    eventually("a updated", || {
        store
            .state()
            .iter()
            .any(|p| p.labels().get("app").is_some_and(|v| v == "changed"))
    })
    .await;
    server.delete("v1", "Pod", "default", "a");
    eventually("a deleted", || names(&store) == ["b"]).await;
    // One list (limit=500, as the default watcher asks), then one watch from its resourceVersion.
    assert_eq!(count(&server, is_pod_list), 1);
    assert!(
        server
            .requests()
            .iter()
            .any(|r| is_pod_watch(r) && r.contains("allowWatchBookmarks=true"))
    );
    task.abort();
}

#[tokio::test]
async fn label_selector_transitions() {
    let server = FakeApiServer::start().await;
    server.apply(pod("early", json!({"app": "web"})));
    server.apply(pod("other", json!({"app": "db"})));
    let mut events = watch_pods(&server, &WatchParams::default().labels("app=web"), "0").await;
    let mut next = async || next_event(&mut events).await;
    assert_eq!(next().await, ("ADDED", "early".into()));
    server.apply(pod("early", json!({"app": "db"})));
    assert_eq!(next().await, ("DELETED", "early".into()));
    server.apply(pod("other", json!({"app": "web"})));
    assert_eq!(next().await, ("ADDED", "other".into()));
    server.apply(pod("other", json!({"app": "web", "more": "1"})));
    assert_eq!(next().await, ("MODIFIED", "other".into()));
    server.delete("v1", "Pod", "default", "early");
    server.delete("v1", "Pod", "default", "other");
    assert_eq!(next().await, ("DELETED", "other".into()));

    // A reflector with the same selector sees the same transitions.
    let (store, task) = pod_reflector(&server, watcher::Config::default().labels("app=web")).await;
    assert!(names(&store).is_empty());
    server.apply(pod("c", json!({"app": "web"})));
    eventually("c matches", || names(&store) == ["c"]).await;
    server.apply(pod("c", json!({"app": "db"})));
    eventually("c stops matching", || names(&store).is_empty()).await;
    task.abort();
}

#[tokio::test]
async fn expired_history_makes_the_watcher_relist() {
    let server = FakeApiServer::start().await;
    server.apply(pod("a", json!({})));
    server.apply(pod("b", json!({})));
    let (store, task) = pod_reflector(&server, watcher::Config::default()).await;
    bounded(server.wait_until(WAIT, |s| s.open_watches() == 1)).await;
    assert_eq!(count(&server, is_pod_list), 1);

    server.expire_history();
    server.delete("v1", "Pod", "default", "a");
    server.apply(pod("c", json!({})));
    eventually("relisted", || names(&store) == ["b", "c"]).await;
    assert_eq!(count(&server, is_pod_list), 2);
    server.apply(pod("d", json!({})));
    eventually("watching again", || names(&store) == ["b", "c", "d"]).await;
    task.abort();

    // A watch resuming from before the forgotten history gets the real server's answer: an ERROR
    // event with a 410 Status, or (optionally) an HTTP 410.
    let pods: Api<Pod> = Api::namespaced(client(&server), "default");
    server.expire_history();
    let mut events = watch_pods(&server, &WatchParams::default(), "2").await;
    assert_eq!(next_event(&mut events).await, ("ERROR", "410".into()));
    assert_eq!(next_event(&mut events).await, ("END", String::new()));
    server.set_gone_as_http_status(true);
    let gone = api_error(pods.watch(&WatchParams::default(), "2").await.map(|_| ()));
    assert_eq!((gone.code, gone.reason.as_str()), (410, "Expired"));
}

#[tokio::test]
async fn dropped_watches_resume_without_losing_events() {
    let server = FakeApiServer::start().await;
    server.apply(pod("a", json!({})));
    let (store, task) = pod_reflector(&server, watcher::Config::default()).await;
    bounded(server.wait_until(WAIT, |s| s.open_watches() == 1)).await;
    let rv = server.resource_version();

    server.drop_watches();
    assert_eq!(server.open_watches(), 0);
    // Changes while the watcher reconnects.
    server.apply(pod("b", json!({})));
    server.delete("v1", "Pod", "default", "a");
    server.apply(pod("c", json!({})));
    eventually("resumed", || names(&store) == ["b", "c"]).await;
    bounded(server.wait_until(WAIT, |s| s.open_watches() == 1)).await;
    let watches: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| is_pod_watch(r))
        .collect();
    assert!(watches.len() >= 2, "{watches:?}");
    assert!(
        watches[1].contains(&format!("resourceVersion={rv}")),
        "{watches:?}"
    );
    // Resumed from the history, not relisted.
    assert_eq!(count(&server, is_pod_list), 1);
    task.abort();
}

#[tokio::test]
async fn bookmarks_and_timeouts() {
    let server = FakeApiServer::start().await;
    server.apply(pod("a", json!({})));
    let rv = server.resource_version();
    let mut with = watch_pods(&server, &WatchParams::default(), &rv).await;
    let mut without = watch_pods(&server, &WatchParams::default().disable_bookmarks(), &rv).await;
    bounded(server.wait_until(WAIT, |s| s.open_watches() == 2)).await;
    server.apply(pod("b", json!({})));
    server.send_bookmarks();
    let bookmark_rv = server.resource_version();
    server.apply(pod("c", json!({})));
    assert_eq!(next_event(&mut with).await, ("ADDED", "b".into()));
    assert_eq!(next_event(&mut with).await, ("BOOKMARK", bookmark_rv));
    assert_eq!(next_event(&mut with).await, ("ADDED", "c".into()));
    assert_eq!(next_event(&mut without).await, ("ADDED", "b".into()));
    assert_eq!(next_event(&mut without).await, ("ADDED", "c".into()));

    // timeoutSeconds ends the stream cleanly.
    let mut short = watch_pods(
        &server,
        &WatchParams::default().timeout(1),
        &server.resource_version(),
    )
    .await;
    assert_eq!(next_event(&mut short).await, ("END", String::new()));

    // Streaming lists: initial ADDED events, then the initial-events-end bookmark.
    let (store, task) = pod_reflector(&server, watcher::Config::default().streaming_lists()).await;
    assert_eq!(names(&store), ["a", "b", "c"]);
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.contains("sendInitialEvents=true"))
    );
    assert_eq!(count(&server, is_pod_list), 0);
    server.apply(pod("d", json!({})));
    eventually("d via the streaming watch", || names(&store).len() == 4).await;
    task.abort();

    // The metadata-only watcher gets PartialObjectMetadata.
    let metadata: Api<PartialObjectMeta<Pod>> = Api::namespaced(client(&server), "default");
    let metas = watcher(metadata, watcher::Config::default())
        .applied_objects()
        .boxed();
    let first: Vec<_> = bounded(metas.take(4).try_collect::<Vec<_>>()).await.unwrap();
    assert_eq!(first.len(), 4);
}

#[tokio::test]
async fn authentication_and_reviews() {
    let server = FakeApiServer::start().await;
    let mut anonymous = server.kube_config();
    anonymous.auth_info.token = None;
    let pods: Api<Pod> = Api::namespaced(Client::try_from(anonymous).unwrap(), "default");
    let denied = api_error(pods.list(&ListParams::default()).await);
    assert_eq!((denied.code, denied.reason.as_str()), (401, "Unauthorized"));
    let mut wrong = server.kube_config();
    wrong.auth_info.token = Some(format!("{TOKEN}x").into());
    let pods: Api<Pod> = Api::namespaced(Client::try_from(wrong).unwrap(), "default");
    assert_eq!(api_error(pods.list(&ListParams::default()).await).code, 401);

    let client = client(&server);
    server.add_token("scraper-token", "system:serviceaccount:monitoring:prometheus");
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = |token: &str| TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let known = reviews
        .create(&PostParams::default(), &review("scraper-token"))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(known.authenticated, Some(true));
    assert_eq!(
        known.user.unwrap().username.as_deref(),
        Some("system:serviceaccount:monitoring:prometheus")
    );
    let unknown = reviews
        .create(&PostParams::default(), &review("nope"))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(unknown.authenticated, Some(false));

    server.allow("system:serviceaccount:monitoring:prometheus", "/metrics", "get");
    let sars: Api<SubjectAccessReview> = Api::all(client);
    let sar = |user: &str, path: &str, verb: &str| SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.into()),
            non_resource_attributes: Some(NonResourceAttributes {
                path: Some(path.into()),
                verb: Some(verb.into()),
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let allowed = |s: SubjectAccessReview| s.status.unwrap().allowed;
    let user = "system:serviceaccount:monitoring:prometheus";
    assert!(allowed(
        sars.create(&PostParams::default(), &sar(user, "/metrics", "get"))
            .await
            .unwrap()
    ));
    assert!(!allowed(
        sars.create(&PostParams::default(), &sar(user, "/metrics", "post"))
            .await
            .unwrap()
    ));
    assert!(!allowed(
        sars.create(&PostParams::default(), &sar("someone", "/metrics", "get"))
            .await
            .unwrap()
    ));
    assert!(!allowed(
        sars.create(&PostParams::default(), &sar(user, "/debug", "get"))
            .await
            .unwrap()
    ));
}

#[tokio::test]
async fn unavailability_then_recovery() {
    let server = FakeApiServer::start().await;
    server.apply(pod("a", json!({})));
    let (store, task) = pod_reflector(&server, watcher::Config::default()).await;
    bounded(server.wait_until(WAIT, |s| s.open_watches() == 1)).await;

    server.set_available(false);
    assert_eq!(server.open_watches(), 0);
    server.apply(pod("b", json!({})));
    let mut no_retry = server.kube_config();
    no_retry.default_retry = false;
    let pods: Api<Pod> = Api::namespaced(Client::try_from(no_retry).unwrap(), "default");
    let unavailable = api_error(pods.list(&ListParams::default()).await);
    assert_eq!(
        (unavailable.code, unavailable.reason.as_str()),
        (503, "ServiceUnavailable")
    );
    // The watcher keeps trying (and failing) to resume.
    let before = server.requests().len();
    bounded(server.wait_until(WAIT, |s| s.requests()[before..].iter().any(|r| is_pod_watch(r)))).await;
    assert_eq!(names(&store), ["a"]);

    server.set_available(true);
    eventually("recovered", || names(&store) == ["a", "b"]).await;
    server.apply(pod("c", json!({})));
    eventually("watching again", || names(&store) == ["a", "b", "c"]).await;
    task.abort();
}

#[tokio::test]
async fn kubeconfig_file_and_shutdown() {
    let server = FakeApiServer::start().await;
    server.apply(pod("a", json!({})));
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fake-kubeconfig-{}", server.addr.port()));
    server.write_kubeconfig(&path);
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client);
    assert_eq!(pods.list(&ListParams::default()).await.unwrap().items.len(), 1);
    let _ = std::fs::remove_file(&path);

    // The server runs on a thread of its own: it answers while this test blocks its runtime (as
    // when waiting synchronously for a child process).
    let addr = server.addr;
    let blocking = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(WAIT)).unwrap();
        let request = format!(
            "GET /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
        );
        conn.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).unwrap();
        response
    });
    let response = blocking.join().unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200") && response.contains(r#""kind":"PodList""#),
        "{response}"
    );

    // Dropping the server ends open watches.
    let mut events = pods
        .watch(&WatchParams::default(), &server.resource_version())
        .await
        .unwrap()
        .boxed();
    bounded(server.wait_until(WAIT, |s| s.open_watches() == 1)).await;
    drop(server);
    let end = bounded(events.next()).await;
    assert!(matches!(end, None | Some(Err(_))), "{end:?}");
}

/// Sends one HTTP/1.1 request over a plain TCP connection and returns everything the server
/// sends until it closes the connection.
async fn raw_request(server: &FakeApiServer, target: &str, token: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    bounded(conn.read_to_end(&mut response)).await.unwrap();
    String::from_utf8(response).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_http_framing() {
    let server = FakeApiServer::start().await;
    server.apply(pod("a", json!({})));

    let denied = raw_request(&server, "/api/v1/namespaces/default/pods", None).await;
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    assert!(denied.contains("content-type: application/json"), "{denied}");
    assert!(
        denied.contains(r#""kind":"Status""#) && denied.contains(r#""reason":"Unauthorized""#),
        "{denied}"
    );
    let unknown = raw_request(&server, "/apis/example.com/v1/widgets", Some(TOKEN)).await;
    assert!(
        unknown.starts_with("HTTP/1.1 404") && unknown.contains(r#""reason":"NotFound""#),
        "{unknown}"
    );

    // A watch without a resourceVersion starts with the current objects; timeoutSeconds ends it
    // cleanly (terminating chunk).
    let timed = raw_request(
        &server,
        "/api/v1/namespaces/default/pods?watch=1&timeoutSeconds=1",
        Some(TOKEN),
    )
    .await;
    assert!(timed.starts_with("HTTP/1.1 200"), "{timed}");
    assert!(timed.contains("transfer-encoding: chunked"), "{timed}");
    assert!(timed.contains(r#"{"type":"ADDED","object":{"#), "{timed}");
    assert!(timed.ends_with("0\r\n\r\n"), "{timed}");

    // drop_watches breaks the connection instead: no terminating chunk.
    let dropped = {
        let reader = raw_request(&server, "/api/v1/namespaces/default/pods?watch=true", Some(TOKEN));
        let dropper = async {
            assert!(server.wait_until(WAIT, |s| s.open_watches() == 1).await);
            server.drop_watches();
        };
        tokio::join!(reader, dropper).0
    };
    assert!(dropped.contains(r#""type":"ADDED""#), "{dropped}");
    assert!(!dropped.ends_with("0\r\n\r\n"), "{dropped}");
}

#[test]
fn selector_parsing() {
    use epp_testkit::apiserver::util::{FieldSelector, LabelSelector};
    let obj = json!({"metadata": {"name": "a", "namespace": "ns", "labels": {"app": "x", "tier": "web"}}});
    let labels = |s: &str| LabelSelector::parse(s).unwrap().matches(&obj);
    assert!(labels(""));
    assert!(labels("app=x,tier==web"));
    assert!(labels("app!=y,!missing,tier"));
    assert!(labels("app in (x, y), tier notin (db)"));
    assert!(!labels("app in (y)"));
    assert!(!labels("missing"));
    assert!(!labels("app=x,tier=db"));
    assert!(LabelSelector::parse("app in x").is_err());
    let fields = |s: &str| FieldSelector::parse(s).unwrap().matches(&obj);
    assert!(fields("metadata.name=a,metadata.namespace!=default"));
    assert!(!fields("metadata.name=b"));
    assert!(FieldSelector::parse("metadata.name").is_err());
}
