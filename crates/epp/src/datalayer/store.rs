//! The published endpoint snapshot and its single writer path.
//!
//! Every writer (discovery, data sources, stateful plugins through their hooks) goes through
//! the store, serialised by a writer-only mutex so that concurrent updates never lose each
//! other. Readers load the current [`Snapshot`] with one atomic operation and never wait.
//! Writers replace whole attributes: a source writes only the keys it was given at start-up
//! (one writer per key, checked when the configuration is built), so a scrape and an event
//! stream feeding the same endpoint never overwrite each other's data.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::futures::Notified;
use tokio::sync::{Notify, watch};

use super::{Endpoint, EndpointState, METRICS, Metrics};
use crate::framework::data::{KeyId, Value};

/// An immutable view of the pool. Requests load it once and never see it change.
#[derive(Debug, Default)]
pub struct Snapshot {
    endpoints: Vec<EndpointState>,
    synced: bool,
    generation: u64,
}

impl Snapshot {
    /// The endpoints, in discovery order.
    pub fn endpoints(&self) -> &[EndpointState] {
        &self.endpoints
    }

    /// Whether discovery has delivered the pool at least once.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Bumped each time the *set* of endpoints changes (not on attribute updates).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The state of `endpoint` (same object), if it is still in the pool.
    pub fn state_of(&self, endpoint: &Arc<Endpoint>) -> Option<&EndpointState> {
        self.endpoints.iter().find(|e| Arc::ptr_eq(&e.endpoint, endpoint))
    }

    /// The endpoint at `address`, if present.
    pub fn find(&self, address: SocketAddr) -> Option<&EndpointState> {
        self.endpoints.iter().find(|e| e.endpoint.address == address)
    }
}

/// A plugin's say in what the snapshot holds for an endpoint: called by the store, off the
/// request path, when an endpoint joins the pool and whenever attributes of an endpoint are
/// written, inside the same publication. A hook writes only keys its plugin owns. The
/// in-flight load plugin uses this to attach its counters to new endpoints and to stamp them
/// at the moment a scrape is published, so that scorers read the scrape and the stamp from
/// one snapshot.
pub trait StoreHook: Send + Sync {
    /// `state` is entering the pool (`written` is empty) or has just had `written` replaced.
    fn on_write(&self, state: &mut EndpointState, written: &[KeyId]);

    /// `state` replaces `previous`: the same server (name and address) with new labels or
    /// metrics port. By default it enters as a new endpoint.
    fn on_replace(&self, state: &mut EndpointState, _previous: &EndpointState) {
        self.on_write(state, &[]);
    }
}

/// One source's writes for one endpoint.
pub type Writes = Vec<(KeyId, Value)>;

/// Holder of the current [`Snapshot`]: see the module docs.
pub struct EndpointStore {
    current: ArcSwap<Snapshot>,
    writer: Mutex<()>,
    set_changes: watch::Sender<u64>,
    published: Notify,
    hooks: Vec<Arc<dyn StoreHook>>,
}

impl std::fmt::Debug for EndpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointStore")
            .field("current", &self.current.load())
            .field("hooks", &self.hooks.len())
            .finish()
    }
}

impl Default for EndpointStore {
    fn default() -> Self {
        Self::new()
    }
}

impl EndpointStore {
    /// An empty, not yet synced store without hooks.
    pub fn new() -> Self {
        Self::with_hooks(Vec::new())
    }

    /// An empty store that calls `hooks` on every write.
    pub fn with_hooks(hooks: Vec<Arc<dyn StoreHook>>) -> Self {
        Self {
            current: ArcSwap::from_pointee(Snapshot::default()),
            writer: Mutex::new(()),
            set_changes: watch::Sender::new(0),
            published: Notify::new(),
            hooks,
        }
    }

    /// The current snapshot (one atomic load).
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Resolves after the next snapshot is published (new figures or a new endpoint set).
    /// Create it, enable it, then read the snapshot, so that no publication is missed.
    pub fn published(&self) -> Notified<'_> {
        self.published.notified()
    }

    /// Notified with the new generation whenever the endpoint set changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.set_changes.subscribe()
    }

    /// Replaces the endpoint set and marks the pool synced. Endpoints that were already known
    /// (same name, address and labels) keep their attributes; new ones start with what the
    /// hooks attach, and one that only changed labels or metrics port starts with what the
    /// hooks carry over ([`StoreHook::on_replace`]: in-flight counts survive a relabel).
    pub fn set_endpoints(&self, endpoints: impl IntoIterator<Item = Endpoint>) {
        let _guard = self.writer.lock();
        let old = self.current.load();
        let next: Vec<EndpointState> = endpoints
            .into_iter()
            .map(|ep| match old.endpoints.iter().find(|s| *s.endpoint == ep) {
                Some(existing) => existing.clone(),
                None => {
                    let previous = old
                        .endpoints
                        .iter()
                        .find(|s| s.endpoint.name == ep.name && s.endpoint.address == ep.address);
                    let mut state = EndpointState::new(Arc::new(ep));
                    if let Some(p) = previous {
                        state.keep_health(p);
                    }
                    for hook in &self.hooks {
                        match previous {
                            Some(p) => hook.on_replace(&mut state, p),
                            None => hook.on_write(&mut state, &[]),
                        }
                    }
                    state
                }
            })
            .collect();
        let same_set = old.synced
            && next.len() == old.endpoints.len()
            && next
                .iter()
                .zip(old.endpoints.iter())
                .all(|(a, b)| Arc::ptr_eq(&a.endpoint, &b.endpoint));
        if same_set {
            return;
        }
        let generation = old.generation + 1;
        self.current.store(Arc::new(Snapshot {
            endpoints: next,
            synced: true,
            generation,
        }));
        self.set_changes.send_replace(generation);
        self.published.notify_waiters();
    }

    /// Removes every endpoint and marks the pool not synced (e.g. the InferencePool was deleted).
    pub fn clear(&self) {
        let _guard = self.writer.lock();
        let generation = self.current.load().generation + 1;
        self.current.store(Arc::new(Snapshot {
            endpoints: Vec::new(),
            synced: false,
            generation,
        }));
        self.set_changes.send_replace(generation);
        self.published.notify_waiters();
    }

    /// Publishes several writes in one new snapshot (later entries for one endpoint and key
    /// win). Writes for endpoints no longer in the pool are dropped, so a late scrape cannot
    /// resurrect an endpoint. Returns how many endpoints were updated.
    pub fn publish(&self, updates: impl IntoIterator<Item = (Arc<Endpoint>, Writes)>) -> usize {
        let _guard = self.writer.lock();
        let old = self.current.load();
        let mut endpoints: Option<Vec<EndpointState>> = None;
        let mut updated = 0;
        let mut written: Vec<KeyId> = Vec::new();
        for (endpoint, writes) in updates {
            let Some(pos) = old
                .endpoints
                .iter()
                .position(|s| Arc::ptr_eq(&s.endpoint, &endpoint))
            else {
                continue;
            };
            let eps = endpoints.get_or_insert_with(|| old.endpoints.clone());
            let state = &mut eps[pos];
            written.clear();
            for (key, value) in writes {
                state.set_raw(key, value);
                written.push(key);
            }
            for hook in &self.hooks {
                hook.on_write(state, &written);
            }
            updated += 1;
        }
        if let Some(endpoints) = endpoints {
            self.current.store(Arc::new(Snapshot {
                endpoints,
                synced: old.synced,
                generation: old.generation,
            }));
            self.published.notify_waiters();
        }
        updated
    }

    /// Publishes new [`Metrics`] for `endpoint` (tests and tools that stand in for a scraper).
    /// Returns `false` when the endpoint has left the pool meanwhile.
    pub fn update_metrics(&self, endpoint: &Arc<Endpoint>, metrics: Metrics) -> bool {
        let value: Value = Arc::new(metrics);
        self.publish([(endpoint.clone(), vec![(METRICS.id(), value)])]) == 1
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::framework::data::DataKey;

    fn ep(addr: &str) -> Endpoint {
        Endpoint::from_address(addr.parse().unwrap())
    }

    #[test]
    fn attributes_survive_an_unchanged_set_and_late_writes_are_dropped() {
        let store = EndpointStore::new();
        assert!(!store.load().is_synced());
        store.set_endpoints([ep("10.0.0.1:8000"), ep("10.0.0.2:8000")]);
        let snap = store.load();
        assert!(snap.is_synced());
        assert_eq!(snap.generation(), 1);
        let first = snap.endpoints()[0].endpoint.clone();
        let m = Metrics {
            waiting_queue: 7,
            ..Metrics::default()
        };
        assert!(store.update_metrics(&first, m));
        // Same set again: nothing changes, attributes kept.
        store.set_endpoints([ep("10.0.0.1:8000"), ep("10.0.0.2:8000")]);
        let snap = store.load();
        assert_eq!(snap.generation(), 1);
        assert_eq!(snap.endpoints()[0].metrics().waiting_queue, 7);
        // First endpoint leaves: its late scrape must not come back.
        store.set_endpoints([ep("10.0.0.2:8000")]);
        assert!(!store.update_metrics(&first, Metrics::default()));
        let snap = store.load();
        assert_eq!(snap.generation(), 2);
        assert_eq!(snap.endpoints().len(), 1);
        assert!(snap.find("10.0.0.1:8000".parse().unwrap()).is_none());
    }

    #[test]
    fn two_writers_of_one_endpoint_keep_each_others_data() {
        let events = DataKey::<u64>::named("event-source");
        let store = EndpointStore::new();
        store.set_endpoints([ep("10.0.0.1:8000")]);
        let e = store.load().endpoints()[0].endpoint.clone();
        store.publish([(e.clone(), vec![(events.id(), Arc::new(5u64) as Value)])]);
        store.update_metrics(
            &e,
            Metrics {
                running: 3,
                ..Metrics::default()
            },
        );
        store.publish([(e.clone(), vec![(events.id(), Arc::new(6u64) as Value)])]);
        let snap = store.load();
        let state = &snap.endpoints()[0];
        assert_eq!(state.metrics().running, 3);
        assert_eq!(state.get(events), Some(&6));
    }

    struct Counting {
        joined: AtomicUsize,
        written: AtomicUsize,
    }

    impl StoreHook for Counting {
        fn on_write(&self, state: &mut EndpointState, written: &[KeyId]) {
            let stamp = DataKey::<usize>::named("hook");
            if written.is_empty() {
                self.joined.fetch_add(1, Ordering::Relaxed);
            } else if written.contains(&METRICS.id()) {
                let n = self.written.fetch_add(1, Ordering::Relaxed) + 1;
                state.set(stamp, Arc::new(n));
            }
        }
    }

    #[test]
    fn hooks_see_new_endpoints_and_writes_in_the_same_publication() {
        let hook = Arc::new(Counting {
            joined: AtomicUsize::new(0),
            written: AtomicUsize::new(0),
        });
        let store = EndpointStore::with_hooks(vec![hook.clone()]);
        store.set_endpoints([ep("10.0.0.1:8000"), ep("10.0.0.2:8000")]);
        store.set_endpoints([ep("10.0.0.1:8000"), ep("10.0.0.3:8000")]);
        assert_eq!(hook.joined.load(Ordering::Relaxed), 3);
        let e = store.load().endpoints()[0].endpoint.clone();
        store.update_metrics(&e, Metrics::default());
        let snap = store.load();
        assert_eq!(snap.endpoints()[0].get(DataKey::<usize>::named("hook")), Some(&1));
    }

    #[test]
    fn subscribers_see_set_changes_only() {
        let store = EndpointStore::new();
        let rx = store.subscribe();
        store.set_endpoints([ep("10.0.0.1:8000")]);
        assert_eq!(*rx.borrow(), 1);
        let e = store.load().endpoints()[0].endpoint.clone();
        store.update_metrics(&e, Metrics::default());
        assert_eq!(*rx.borrow(), 1);
        store.clear();
        assert_eq!(*rx.borrow(), 2);
        assert!(!store.load().is_synced());
    }
}
