//! The published endpoint snapshot and its single writer path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::{Endpoint, Metrics};

/// One endpoint together with its latest metrics, as seen by one scheduling cycle.
#[derive(Debug, Clone)]
pub struct EndpointState {
    /// Identity and address.
    pub endpoint: Arc<Endpoint>,
    /// Latest scraped figures (default, with `updated_at: None`, until the first scrape).
    pub metrics: Arc<Metrics>,
    /// What this EPP has sent the endpoint; shared by every snapshot the endpoint is in.
    pub dispatch: Arc<Dispatched>,
}

impl EndpointState {
    /// An endpoint with `metrics` and nothing dispatched yet.
    pub fn new(endpoint: Arc<Endpoint>, metrics: Arc<Metrics>) -> Self {
        Self {
            endpoint,
            metrics,
            dispatch: Arc::default(),
        }
    }

    /// The change in the endpoint's load, in estimated uncached prompt tokens, since its
    /// metrics were scraped: what this EPP has sent it since, minus what finished since.
    /// Negative when more finished than arrived.
    pub fn unscraped_tokens(&self) -> i64 {
        let m = &self.metrics;
        let sent = self.dispatch.sent().saturating_sub(m.sent_tokens_at_scrape);
        let done = self.dispatch.done().saturating_sub(m.done_tokens_at_scrape);
        i64::try_from(sent).unwrap_or(i64::MAX) - i64::try_from(done).unwrap_or(i64::MAX)
    }
}

/// Running totals of the estimated uncached prompt tokens routed to one endpoint, and of those
/// whose requests have finished. Scrapes come every 50 ms or so; requests start and finish in
/// between, and without these counts every request of a burst would see the same figures and
/// go to the same, apparently least loaded, server. Request-path cost: one relaxed atomic add
/// at the pick and one when the request ends.
#[derive(Debug, Default)]
pub struct Dispatched {
    sent: AtomicU64,
    done: AtomicU64,
}

/// One routed request's share of an endpoint's load; adds it to the finished total when
/// dropped (when the response is complete or the stream ends, whichever comes first).
#[derive(Debug)]
pub struct InFlight {
    dispatch: Arc<Dispatched>,
    tokens: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.dispatch.done.fetch_add(self.tokens, Ordering::Relaxed);
    }
}

impl Dispatched {
    /// Records a request of about `tokens` uncached prompt tokens sent to the endpoint.
    pub fn start(self: &Arc<Self>, tokens: u64) -> InFlight {
        self.sent.fetch_add(tokens, Ordering::Relaxed);
        InFlight {
            dispatch: self.clone(),
            tokens,
        }
    }

    /// Tokens sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Tokens of finished requests so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

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

    /// Bumped each time the *set* of endpoints changes (not on metric updates).
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

/// Holder of the current [`Snapshot`].
///
/// Readers call [`EndpointStore::load`]; writers (discovery, scrapers) go through the methods
/// below, which are serialised by a writer-only mutex so that concurrent metric updates never
/// lose each other. Readers never take that mutex.
#[derive(Debug)]
pub struct EndpointStore {
    current: ArcSwap<Snapshot>,
    writer: Mutex<()>,
    set_changes: watch::Sender<u64>,
}

impl Default for EndpointStore {
    fn default() -> Self {
        Self::new()
    }
}

impl EndpointStore {
    /// An empty, not yet synced store.
    pub fn new() -> Self {
        Self {
            current: ArcSwap::from_pointee(Snapshot::default()),
            writer: Mutex::new(()),
            set_changes: watch::Sender::new(0),
        }
    }

    /// The current snapshot (one atomic load).
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Notified with the new generation whenever the endpoint set changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.set_changes.subscribe()
    }

    /// Replaces the endpoint set and marks the pool synced. Endpoints that were already known
    /// (same name, address and labels) keep their metrics; new ones start unscraped.
    pub fn set_endpoints(&self, endpoints: impl IntoIterator<Item = Endpoint>) {
        let _guard = self.writer.lock();
        let old = self.current.load();
        let next: Vec<EndpointState> = endpoints
            .into_iter()
            .map(|ep| match old.endpoints.iter().find(|s| *s.endpoint == ep) {
                Some(existing) => existing.clone(),
                None => EndpointState::new(Arc::new(ep), Arc::new(Metrics::default())),
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
    }

    /// Publishes new metrics for `endpoint`. Returns `false` (and changes nothing) when the
    /// endpoint has left the pool meanwhile, so a late scrape cannot resurrect it.
    pub fn update_metrics(&self, endpoint: &Arc<Endpoint>, metrics: Metrics) -> bool {
        self.update_metrics_batch([(endpoint.clone(), metrics)]) == 1
    }

    /// Publishes several metric updates in one new snapshot (later entries for the same
    /// endpoint win). Updates for endpoints no longer in the pool are dropped. Returns how
    /// many endpoints were updated. Each update is stamped with the endpoint's dispatch total
    /// at publication: what was sent before counts as seen by the scrape.
    pub fn update_metrics_batch(&self, updates: impl IntoIterator<Item = (Arc<Endpoint>, Metrics)>) -> usize {
        let _guard = self.writer.lock();
        let old = self.current.load();
        let mut endpoints: Option<Vec<EndpointState>> = None;
        let mut updated = 0;
        for (endpoint, mut metrics) in updates {
            let Some(pos) = old
                .endpoints
                .iter()
                .position(|s| Arc::ptr_eq(&s.endpoint, &endpoint))
            else {
                continue;
            };
            let eps = endpoints.get_or_insert_with(|| old.endpoints.clone());
            // Finished first: a request that ends between the two loads counts as still running.
            metrics.done_tokens_at_scrape = eps[pos].dispatch.done();
            metrics.sent_tokens_at_scrape = eps[pos].dispatch.sent();
            eps[pos].metrics = Arc::new(metrics);
            updated += 1;
        }
        if let Some(endpoints) = endpoints {
            self.current.store(Arc::new(Snapshot {
                endpoints,
                synced: old.synced,
                generation: old.generation,
            }));
        }
        updated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str) -> Endpoint {
        Endpoint::from_address(addr.parse().unwrap())
    }

    #[test]
    fn metrics_survive_an_unchanged_set_and_late_scrapes_are_dropped() {
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
        // Same set again: nothing changes, metrics kept.
        store.set_endpoints([ep("10.0.0.1:8000"), ep("10.0.0.2:8000")]);
        let snap = store.load();
        assert_eq!(snap.generation(), 1);
        assert_eq!(snap.endpoints()[0].metrics.waiting_queue, 7);
        // First endpoint leaves: its late scrape must not come back.
        store.set_endpoints([ep("10.0.0.2:8000")]);
        assert!(!store.update_metrics(&first, Metrics::default()));
        let snap = store.load();
        assert_eq!(snap.generation(), 2);
        assert_eq!(snap.endpoints().len(), 1);
        assert!(snap.find("10.0.0.1:8000".parse().unwrap()).is_none());
    }

    #[test]
    fn dispatches_count_until_the_next_scrape_and_survive_set_changes() {
        let store = EndpointStore::new();
        store.set_endpoints([ep("10.0.0.1:8000"), ep("10.0.0.2:8000")]);
        let snap = store.load();
        let (a, b) = (&snap.endpoints()[0], &snap.endpoints()[1]);
        let first = a.dispatch.start(300);
        let second = a.dispatch.start(200);
        assert_eq!((a.unscraped_tokens(), b.unscraped_tokens()), (500, 0));
        // A request that finishes before the next scrape no longer counts.
        drop(second);
        assert_eq!(a.unscraped_tokens(), 300);
        // A scrape published now has seen the one still running.
        store.update_metrics(&a.endpoint, Metrics::default());
        let snap = store.load();
        assert_eq!(snap.endpoints()[0].unscraped_tokens(), 0);
        // It finishes after the scrape: the scraped load overstates by that much.
        drop(first);
        assert_eq!(snap.endpoints()[0].unscraped_tokens(), -300);
        let _third = snap.endpoints()[0].dispatch.start(70);
        // The endpoint set changes; the surviving endpoint keeps its counts.
        store.set_endpoints([ep("10.0.0.1:8000"), ep("10.0.0.3:8000")]);
        let snap = store.load();
        assert_eq!(snap.endpoints()[0].unscraped_tokens(), -230);
        assert_eq!(snap.endpoints()[1].unscraped_tokens(), 0);
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
