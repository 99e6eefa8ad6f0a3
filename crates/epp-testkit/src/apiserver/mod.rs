//! An in-memory fake Kubernetes API server for integration tests, served over real HTTP on
//! 127.0.0.1, close enough to the real REST protocol for `kube` clients, `kube-runtime` watchers
//! and reflectors, and child processes given a kubeconfig.
//!
//! It serves pods, InferencePools (`inference.networking.k8s.io/v1` and
//! `inference.networking.x-k8s.io/v1alpha2`), InferenceObjectives, Leases and a few more core
//! kinds (more with [`FakeApiServer::register_kind`]): get, list (label/field selectors,
//! `limit`/`continue`), watch (resume from a resourceVersion, synthetic ADDED events for `""`/`"0"`,
//! selector transitions, bookmarks, streaming lists, `timeoutSeconds`), create, replace (optimistic
//! concurrency on `metadata.resourceVersion`), merge/JSON/apply patches, delete and the `status`
//! subresource; plus TokenReview and SubjectAccessReview, and fault injection (forgotten history,
//! dropped watches, unavailability). Every request must carry `Authorization: Bearer` [`TOKEN`].
//!
//! A watch resuming from a resourceVersion older than the retained history is answered as the
//! real API server's watch cache does: HTTP 200 and a single ERROR event carrying a 410 `Status`
//! (the `kube-runtime` watcher then relists). [`FakeApiServer::set_gone_as_http_status`] switches
//! to a plain HTTP 410 answer instead.
//!
//! Known differences from a real API server:
//! - no admission, validation, defaulting or schemas: any JSON object is stored as sent;
//! - one identity: only [`TOKEN`] may call the API, and it may do anything (no RBAC);
//! - DELETE is immediate (no finalizers, graceful deletion, `deletionTimestamp` or garbage
//!   collection), and namespaces need not exist;
//! - a strategic merge patch is applied as a JSON merge patch, and server-side apply as a merge
//!   patch that creates missing objects (no field managers, `managedFields` or apply conflicts);
//! - every write bumps the resourceVersion and sends MODIFIED, even when nothing changed;
//! - lists ignore `resourceVersion`/`resourceVersionMatch` and always show the current state;
//!   later pages of a paginated list are not a snapshot (they carry the first page's
//!   resourceVersion, so a watch from it replays whatever changed meanwhile);
//! - bookmarks are only sent on [`FakeApiServer::send_bookmarks`] (and to end the initial events
//!   of a streaming list), a watch from a resourceVersion newer than the latest is not refused,
//!   and `timeoutSeconds` is exact rather than randomised;
//! - any dotted field path is accepted in field selectors;
//! - SubjectAccessReview only grants non-resource attributes (resource attributes are denied);
//! - JSON over HTTP/1.1 only (no protobuf, Table output, compression, TLS or HTTP/2);
//! - the history keeps the last 10 000 events.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

mod aux;
mod http;
mod state;
pub mod util;

use state::{KindInfo, ObjKey, State};

/// The bearer token clients built from [`FakeApiServer::kube_config`] and
/// [`FakeApiServer::write_kubeconfig`] send; requests without it get 401.
pub const TOKEN: &str = "test-token";

/// At most this many requests are kept for [`FakeApiServer::requests`] (the oldest are dropped).
const MAX_LOGGED_REQUESTS: usize = 100_000;

/// State shared by the server task and the handle.
pub(crate) struct Shared {
    state: Mutex<State>,
    requests: Mutex<Vec<String>>,
}

impl Shared {
    fn log_request(&self, line: String) {
        let mut requests = self.requests.lock();
        if requests.len() >= MAX_LOGGED_REQUESTS {
            requests.drain(..MAX_LOGGED_REQUESTS / 2);
        }
        requests.push(line);
    }
}

/// A running fake API server; it stops (closing every connection) when dropped.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The server's runtime goes away with its thread, closing every connection.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.shared.state.lock().watchers.clear();
    }
}

/// Accepts connections until `stop` fires; each connection is served by its own task.
async fn serve(listener: std::net::TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let listener = TcpListener::from_std(listener).expect("register the listener");
    let router = Router::new().fallback(http::handle).with_state(shared);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let service = TowerToHyperService::new(router.clone());
                    connections.spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                // E.g. out of file descriptors: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

impl FakeApiServer {
    /// Binds 127.0.0.1 on an ephemeral port and serves plain HTTP/1.1 from a thread of its own
    /// (so a test may block its own runtime, e.g. waiting for a child process, without stalling
    /// the server).
    pub async fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fake API server");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            requests: Mutex::new(Vec::new()),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let server_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".to_string())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the fake API server's runtime");
                runtime.block_on(serve(listener, server_shared, stop_rx));
            })
            .expect("spawn the fake API server thread");
        Self {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client configuration for in-process `kube` clients: this server, bearer [`TOKEN`],
    /// default namespace `default`.
    pub fn kube_config(&self) -> kube::Config {
        let mut config = kube::Config::new(self.url().parse().expect("server URL"));
        config.default_namespace = "default".to_string();
        config.auth_info.token = Some(TOKEN.to_string().into());
        config
    }

    /// The kubeconfig YAML [`Self::write_kubeconfig`] writes.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
             users:\n- name: fake\n  user:\n    token: {TOKEN}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\npreferences: {{}}\n",
            url = self.url()
        )
    }

    /// Writes a kubeconfig (current context set) for child processes (`--kubeconfig`, `KUBECONFIG`).
    pub fn write_kubeconfig(&self, path: &Path) {
        std::fs::write(path, self.kubeconfig_yaml()).expect("write the kubeconfig");
    }

    /// Adds a resource kind, e.g. `register_kind("apps/v1", "Deployment", "deployments", true)`.
    pub fn register_kind(&self, api_version: &str, kind: &str, plural: &str, namespaced: bool) {
        let mut st = self.shared.state.lock();
        if st.kind_by_type(api_version, kind).is_none() {
            st.kinds
                .push(KindInfo::new(api_version, kind, plural, namespaced, false));
        }
    }

    fn key(st: &State, api_version: &str, kind: &str, namespace: &str, name: &str) -> ObjKey {
        let idx = st
            .kind_by_type(api_version, kind)
            .unwrap_or_else(|| panic!("the fake API server does not know {api_version} {kind}"));
        let ns = if st.kinds[idx].namespaced {
            namespace.to_string()
        } else {
            String::new()
        };
        (idx, ns, name.to_string())
    }

    /// Creates or replaces an object, keyed by (apiVersion, kind, metadata.namespace — `default`
    /// when missing —, metadata.name). Sets resourceVersion, uid, creationTimestamp and generation,
    /// sends ADDED/MODIFIED to the matching watches and returns the stored object. Unlike an HTTP
    /// write it stores the whole object, `status` included.
    pub fn apply(&self, obj: Value) -> Value {
        let text = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or("").to_string();
        let (api_version, kind, name) = (text("/apiVersion"), text("/kind"), text("/metadata/name"));
        let namespace = Some(text("/metadata/namespace")).filter(|n| !n.is_empty());
        assert!(!name.is_empty(), "apply: metadata.name is required");
        let mut st = self.shared.state.lock();
        let key = Self::key(
            &st,
            &api_version,
            &kind,
            namespace.as_deref().unwrap_or("default"),
            &name,
        );
        let prev = st.objects.get(&key).cloned();
        (*st.store(key, obj, prev)).clone()
    }

    /// Deletes an object, sending DELETED (with a new resourceVersion); false if it did not exist.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let mut st = self.shared.state.lock();
        let key = Self::key(&st, api_version, kind, namespace, name);
        st.remove(&key).is_some()
    }

    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.shared.state.lock();
        let key = Self::key(&st, api_version, kind, namespace, name);
        st.objects.get(&key).map(|o| (**o).clone())
    }

    /// The objects of a kind in `namespace` (`""`: all namespaces), ordered by namespace and name.
    pub fn list(&self, api_version: &str, kind: &str, namespace: &str) -> Vec<Value> {
        let st = self.shared.state.lock();
        let (idx, _, _) = Self::key(&st, api_version, kind, namespace, "");
        st.objects_of(idx)
            .filter(|(k, _)| namespace.is_empty() || k.1 == namespace)
            .map(|(_, o)| (**o).clone())
            .collect()
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> String {
        self.shared.state.lock().rv.to_string()
    }

    /// Forgets the event history: resuming a watch (or a paginated list) from an older
    /// resourceVersion fails with 410 Gone, and open watches get an ERROR event (410) and end.
    pub fn expire_history(&self) {
        self.shared.state.lock().expire_history();
    }

    /// Breaks every open watch connection (no terminating event or chunk).
    pub fn drop_watches(&self) {
        self.shared.state.lock().drop_watches();
    }

    /// Sends a BOOKMARK at the current resourceVersion on every open watch that allowed them.
    pub fn send_bookmarks(&self) {
        self.shared.state.lock().send_bookmarks();
    }

    pub fn open_watches(&self) -> usize {
        self.shared.state.lock().open_watches()
    }

    /// How a watch from a forgotten resourceVersion is refused: by default as the real API server
    /// does (HTTP 200, then one ERROR event carrying a 410 `Status`); with `true` as an HTTP 410
    /// response. (`kube-runtime`'s watcher only relists on the former; on the latter it retries the
    /// same resourceVersion.)
    pub fn set_gone_as_http_status(&self, on: bool) {
        self.shared.state.lock().gone_as_http_status = on;
    }

    /// `METHOD path?query` of every request so far, oldest first.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().clone()
    }

    pub fn clear_requests(&self) {
        self.shared.requests.lock().clear();
    }

    /// TokenReview: `token` authenticates as `user`.
    pub fn add_token(&self, token: &str, user: &str) {
        self.shared
            .state
            .lock()
            .tokens
            .insert(token.to_string(), user.to_string());
    }

    pub fn remove_token(&self, token: &str) {
        self.shared.state.lock().tokens.remove(token);
    }

    /// SubjectAccessReview: `user` may `verb` the non-resource URL `path` (a trailing `*` matches
    /// any suffix; verb `*` any verb). Everything not allowed is denied.
    pub fn allow(&self, user: &str, path: &str, verb: &str) {
        self.shared
            .state
            .lock()
            .allowed
            .push((user.to_string(), path.to_string(), verb.to_string()));
    }

    /// Withdraws every grant of `user`.
    pub fn revoke(&self, user: &str) {
        self.shared.state.lock().allowed.retain(|(u, _, _)| u != user);
    }

    /// When false every request gets 503 and open watches are dropped.
    pub fn set_available(&self, up: bool) {
        let mut st = self.shared.state.lock();
        st.available = up;
        if !up {
            st.drop_watches();
        }
    }

    /// Polls `cond` every few milliseconds until it holds or `within` passes; returns whether it held.
    pub async fn wait_until(&self, within: Duration, mut cond: impl FnMut(&Self) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if cond(self) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
