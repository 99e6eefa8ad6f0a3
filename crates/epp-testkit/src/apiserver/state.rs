//! The state of the fake API server: the table of known kinds, the object store, the event
//! history (for watch resumption) and the open watches.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::util::{FieldSelector, LabelSelector, now_rfc3339, status_object};

/// How many events the history keeps; older ones are forgotten (and resuming from them is 410 Gone).
const MAX_HISTORY: usize = 10_000;

/// A resource kind the server serves.
#[derive(Clone, Debug)]
pub struct KindInfo {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
    /// Whether the kind has a `status` subresource (then writes to the main resource keep the
    /// stored status and writes to `/status` change only the status).
    pub status_subresource: bool,
}

impl KindInfo {
    pub fn new(api_version: &str, kind: &str, plural: &str, namespaced: bool, status: bool) -> Self {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        Self {
            group: group.to_string(),
            version: version.to_string(),
            kind: kind.to_string(),
            plural: plural.to_string(),
            namespaced,
            status_subresource: status,
        }
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods`, `leases.coordination.k8s.io` (as in the API server's error messages).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// The kinds every server starts with.
pub fn builtin_kinds() -> Vec<KindInfo> {
    vec![
        KindInfo::new("v1", "Pod", "pods", true, true),
        KindInfo::new("v1", "ConfigMap", "configmaps", true, false),
        KindInfo::new("v1", "Secret", "secrets", true, false),
        KindInfo::new("v1", "Service", "services", true, true),
        KindInfo::new("v1", "Namespace", "namespaces", false, true),
        KindInfo::new("v1", "Event", "events", true, false),
        KindInfo::new("events.k8s.io/v1", "Event", "events", true, false),
        KindInfo::new("coordination.k8s.io/v1", "Lease", "leases", true, false),
        KindInfo::new(
            "inference.networking.k8s.io/v1",
            "InferencePool",
            "inferencepools",
            true,
            true,
        ),
        KindInfo::new(
            "inference.networking.x-k8s.io/v1alpha2",
            "InferencePool",
            "inferencepools",
            true,
            true,
        ),
        KindInfo::new(
            "inference.networking.x-k8s.io/v1alpha2",
            "InferenceObjective",
            "inferenceobjectives",
            true,
            true,
        ),
    ]
}

/// (kind index, namespace — empty for cluster-scoped kinds, name).
pub type ObjKey = (usize, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvType {
    Added,
    Modified,
    Deleted,
}

/// One change, as kept in the history.
pub struct HistEvent {
    pub rv: u64,
    pub kind: usize,
    pub typ: EvType,
    /// The new object (for `Deleted`: the last state, carrying the deletion's resourceVersion).
    pub obj: Arc<Value>,
    /// The previous object (`Modified` only), to compute selector transitions.
    pub prev: Option<Arc<Value>>,
}

/// Which objects a watch (or list) selects.
#[derive(Clone, Debug)]
pub struct Filter {
    pub kind: usize,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    /// `Accept: ...;as=PartialObjectMetadata...`: send metadata only.
    pub metadata_only: bool,
}

impl Filter {
    pub fn matches(&self, obj: &Value) -> bool {
        let ns_ok = match &self.namespace {
            Some(ns) => {
                obj.pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    == ns
            }
            None => true,
        };
        ns_ok && self.labels.matches(obj) && self.fields.matches(obj)
    }

    pub fn present(&self, obj: &Value) -> Value {
        if self.metadata_only {
            json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
            })
        } else {
            obj.clone()
        }
    }
}

/// What a watch stream is told to do.
pub enum WatchMsg {
    /// One newline-terminated JSON event.
    Line(Bytes),
    /// End the response cleanly.
    End,
    /// Break the connection (no terminating chunk).
    Abort,
}

pub struct Watcher {
    pub id: u64,
    pub filter: Filter,
    pub bookmarks: bool,
    pub tx: mpsc::UnboundedSender<WatchMsg>,
}

pub fn event_line(typ: &str, obj: &Value) -> Bytes {
    // Written by hand to keep the API server's field order: type, then object.
    let mut line = format!("{{\"type\":\"{typ}\",\"object\":").into_bytes();
    line.extend(serde_json::to_vec(obj).unwrap_or_default());
    line.extend(b"}\n");
    Bytes::from(line)
}

fn set_rv(obj: &mut Value, rv: u64) {
    obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
}

/// Why a watch could not start.
pub enum WatchStartError {
    /// The requested resourceVersion is older than the retained history.
    Gone(String),
}

pub struct State {
    pub kinds: Vec<KindInfo>,
    pub rv: u64,
    /// The oldest resourceVersion a watch may resume from.
    pub floor: u64,
    pub objects: BTreeMap<ObjKey, Arc<Value>>,
    pub history: VecDeque<HistEvent>,
    pub watchers: Vec<Watcher>,
    pub next_watcher: u64,
    pub name_seq: u64,
    pub tokens: HashMap<String, String>,
    /// (user, path, verb) granted for non-resource SubjectAccessReviews.
    pub allowed: Vec<(String, String, String)>,
    pub available: bool,
    /// Answer a watch from a forgotten resourceVersion with HTTP 410 instead of an ERROR event.
    pub gone_as_http_status: bool,
}

impl Default for State {
    fn default() -> Self {
        Self {
            kinds: builtin_kinds(),
            rv: 1,
            floor: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            watchers: Vec::new(),
            next_watcher: 1,
            name_seq: 0,
            tokens: HashMap::new(),
            allowed: Vec::new(),
            available: true,
            gone_as_http_status: false,
        }
    }
}

impl State {
    pub fn kind_by_type(&self, api_version: &str, kind: &str) -> Option<usize> {
        self.kinds
            .iter()
            .position(|k| k.api_version() == api_version && k.kind == kind)
    }

    pub fn kind_by_plural(&self, group: &str, version: &str, plural: &str) -> Option<usize> {
        self.kinds
            .iter()
            .position(|k| k.group == group && k.version == version && k.plural == plural)
    }

    /// The objects of `kind` (all namespaces), in (namespace, name) order.
    pub fn objects_of(&self, kind: usize) -> impl Iterator<Item = (&ObjKey, &Arc<Value>)> {
        self.objects
            .range((kind, String::new(), String::new())..(kind + 1, String::new(), String::new()))
    }

    pub fn generate_name(&mut self, prefix: &str) -> String {
        self.name_seq += 1;
        format!("{prefix}{:05x}", self.name_seq)
    }

    /// Stores `obj` under `key` (creating it when `prev` is None), filling in the server-managed
    /// metadata, records the event and sends it to the matching watches.
    pub fn store(&mut self, key: ObjKey, mut obj: Value, prev: Option<Arc<Value>>) -> Arc<Value> {
        let info = &self.kinds[key.0];
        if !obj.is_object() {
            obj = json!({});
        }
        obj["apiVersion"] = Value::String(info.api_version());
        obj["kind"] = Value::String(info.kind.clone());
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj["metadata"] = json!({});
        }
        let meta = &mut obj["metadata"];
        meta["name"] = Value::String(key.2.clone());
        if info.namespaced {
            meta["namespace"] = Value::String(key.1.clone());
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        let generation = match &prev {
            Some(p) => {
                for field in ["uid", "creationTimestamp"] {
                    meta[field] = p["metadata"][field].clone();
                }
                let old = p
                    .pointer("/metadata/generation")
                    .and_then(Value::as_u64)
                    .unwrap_or(1);
                if p.get("spec") == obj.get("spec") {
                    old
                } else {
                    old + 1
                }
            }
            None => {
                meta["uid"] = Value::String(uuid::Uuid::new_v4().to_string());
                meta["creationTimestamp"] = Value::String(now_rfc3339());
                1
            }
        };
        obj["metadata"]["generation"] = json!(generation);
        self.rv += 1;
        set_rv(&mut obj, self.rv);
        let obj = Arc::new(obj);
        self.objects.insert(key.clone(), obj.clone());
        let typ = if prev.is_some() {
            EvType::Modified
        } else {
            EvType::Added
        };
        self.record(HistEvent {
            rv: self.rv,
            kind: key.0,
            typ,
            obj: obj.clone(),
            prev,
        });
        obj
    }

    /// Removes an object, recording a DELETED event carrying a new resourceVersion.
    pub fn remove(&mut self, key: &ObjKey) -> Option<Arc<Value>> {
        let old = self.objects.remove(key)?;
        self.rv += 1;
        let mut last = (*old).clone();
        set_rv(&mut last, self.rv);
        let last = Arc::new(last);
        self.record(HistEvent {
            rv: self.rv,
            kind: key.0,
            typ: EvType::Deleted,
            obj: last.clone(),
            prev: None,
        });
        Some(last)
    }

    fn record(&mut self, ev: HistEvent) {
        self.watchers.retain(|w| {
            if let Some(line) = watch_event(&w.filter, &ev) {
                w.tx.send(WatchMsg::Line(line)).is_ok()
            } else {
                !w.tx.is_closed()
            }
        });
        self.history.push_back(ev);
        while self.history.len() > MAX_HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
    }

    /// Registers a watch. `rv` is the request's resourceVersion ("" or "0": start with synthetic
    /// ADDED events for the current objects); `initial_events_end` adds the streaming-list
    /// BOOKMARK after those.
    pub fn watch(
        &mut self,
        filter: Filter,
        rv: Option<u64>,
        bookmarks: bool,
        initial_events_end: bool,
    ) -> Result<(u64, mpsc::UnboundedReceiver<WatchMsg>), WatchStartError> {
        let (tx, rx) = mpsc::unbounded_channel();
        match rv {
            None => {
                for (_, obj) in self.objects_of(filter.kind) {
                    if filter.matches(obj) {
                        let _ = tx.send(WatchMsg::Line(event_line("ADDED", &filter.present(obj))));
                    }
                }
                if initial_events_end {
                    let mut bookmark = self.bookmark(filter.kind);
                    bookmark["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                    let _ = tx.send(WatchMsg::Line(event_line("BOOKMARK", &bookmark)));
                }
            }
            Some(rv) if rv < self.floor => {
                return Err(WatchStartError::Gone(format!(
                    "too old resource version: {rv} ({})",
                    self.floor
                )));
            }
            Some(rv) => {
                for ev in self.history.iter().filter(|ev| ev.rv > rv) {
                    if let Some(line) = watch_event(&filter, ev) {
                        let _ = tx.send(WatchMsg::Line(line));
                    }
                }
            }
        }
        let id = self.next_watcher;
        self.next_watcher += 1;
        self.watchers.push(Watcher {
            id,
            filter,
            bookmarks,
            tx,
        });
        Ok((id, rx))
    }

    /// A BOOKMARK object for `kind` at the current resourceVersion.
    pub fn bookmark(&self, kind: usize) -> Value {
        let info = &self.kinds[kind];
        json!({
            "apiVersion": info.api_version(),
            "kind": info.kind,
            "metadata": {"resourceVersion": self.rv.to_string()},
        })
    }

    pub fn send_bookmarks(&mut self) {
        let lines: Vec<_> = self
            .watchers
            .iter()
            .filter(|w| w.bookmarks)
            .map(|w| (w.id, event_line("BOOKMARK", &self.bookmark(w.filter.kind))))
            .collect();
        for (id, line) in lines {
            if let Some(w) = self.watchers.iter().find(|w| w.id == id) {
                let _ = w.tx.send(WatchMsg::Line(line));
            }
        }
    }

    /// Forgets the history; open watches get an ERROR event (410) and end.
    pub fn expire_history(&mut self) {
        self.history.clear();
        self.floor = self.rv;
        let status = status_object(
            410,
            "Expired",
            "The resourceVersion for the provided watch is too old.",
            None,
        );
        for w in self.watchers.drain(..) {
            let _ = w.tx.send(WatchMsg::Line(event_line("ERROR", &status)));
            let _ = w.tx.send(WatchMsg::End);
        }
    }

    /// Breaks every open watch connection.
    pub fn drop_watches(&mut self) {
        for w in self.watchers.drain(..) {
            let _ = w.tx.send(WatchMsg::Abort);
        }
    }

    pub fn open_watches(&mut self) -> usize {
        self.watchers.retain(|w| !w.tx.is_closed());
        self.watchers.len()
    }
}

/// The event (if any) a watch with `filter` sees for `ev`, following the API server's rules for
/// selector transitions: an object that starts matching is ADDED, one that stops matching is
/// DELETED (with its previous content and the event's resourceVersion).
pub fn watch_event(filter: &Filter, ev: &HistEvent) -> Option<Bytes> {
    if ev.kind != filter.kind {
        return None;
    }
    let now = filter.matches(&ev.obj);
    match ev.typ {
        EvType::Added => now.then(|| event_line("ADDED", &filter.present(&ev.obj))),
        EvType::Deleted => now.then(|| event_line("DELETED", &filter.present(&ev.obj))),
        EvType::Modified => {
            let before = ev.prev.as_deref().is_some_and(|p| filter.matches(p));
            match (before, now) {
                (true, true) => Some(event_line("MODIFIED", &filter.present(&ev.obj))),
                (false, true) => Some(event_line("ADDED", &filter.present(&ev.obj))),
                (true, false) => {
                    let mut old = ev.prev.as_deref().cloned().unwrap_or_default();
                    set_rv(&mut old, ev.rv);
                    Some(event_line("DELETED", &filter.present(&old)))
                }
                (false, false) => None,
            }
        }
    }
}
