//! The collector: runs the configured data sources and publishes what their extractors find.
//!
//! For each polling source a supervisor follows the endpoint set (a `watch` notification from
//! the store) and keeps exactly one poll loop per endpoint: new endpoints get one, departed
//! endpoints have theirs cancelled. Subscribing sources run on their own. All writes go
//! through one bounded queue to one publisher, which gathers them for a few milliseconds and
//! publishes one snapshot per batch. Every task lives in one [`TaskTracker`] under one
//! [`CancellationToken`], so shutdown stops every loop and waits for them.
//!
//! A poll that fails (connection error, timeout, non-200) or a payload an extractor finds
//! nothing in changes nothing: the endpoint's attributes keep their old timestamp and age, so
//! staleness-aware consumers see them go stale instead of seeing zeros. Failures are logged
//! once per transition, not once per tick.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::sync::{mpsc, watch};
use tokio::time::{Duration, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Endpoint, EndpointStore, Writes};
use crate::framework::data::{Attributes, KeyId};
use crate::framework::datalayer::{
    Extractor, PollingSource, Publisher, SubscribingSource, SubscriptionContext, keep_declared,
};
use crate::framework::plugin::Named;

/// A polling source and the extractors the configuration pairs with it.
#[derive(Clone)]
pub struct PollingPlan {
    /// The source plugin.
    pub source: Named<dyn PollingSource>,
    /// Its extractors, in configuration order.
    pub extractors: Vec<Named<dyn Extractor>>,
}

/// Every source the collector runs.
#[derive(Clone, Default)]
pub struct Sources {
    /// Polling sources.
    pub polling: Vec<PollingPlan>,
    /// Subscribing sources.
    pub subscribing: Vec<Named<dyn SubscribingSource>>,
}

impl Sources {
    /// Whether nothing is collected (`dataLayer.injectDefaults: false` and no sources).
    pub fn is_empty(&self) -> bool {
        self.polling.is_empty() && self.subscribing.is_empty()
    }
}

/// How the collector runs.
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    /// Poll interval of sources that set none (`--refresh-metrics-interval`).
    pub default_interval: Duration,
    /// Run the collector on a dedicated single-threaded runtime. Thousands of small scrapes a
    /// second cost a third less CPU without work stealing between threads, and they stay off
    /// the threads that serve requests. Tests keep it on the caller's runtime so they can
    /// pause its clock.
    pub dedicated_thread: bool,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        Self {
            default_interval: Duration::from_millis(50),
            dedicated_thread: false,
        }
    }
}

/// Why collection could not start.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// The collector's runtime could not be built.
    #[error("cannot start the data-layer thread: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Writes waiting to be published.
const UPDATE_QUEUE: usize = 4096;
/// How long the publisher gathers writes before publishing one snapshot: at 100 endpoints and
/// 50 ms that is about ten scrapes per snapshot instead of one.
const PUBLISH_WINDOW: Duration = Duration::from_millis(5);

/// Starts the collector on `tracker`. The returned receiver turns `true` once the pool is
/// synced and every endpoint present then has been polled once by every polling source
/// (successfully or not). A subscribing source that fails cancels `cancel`: the EPP stops
/// rather than run on without its data.
pub fn spawn(
    store: Arc<EndpointStore>,
    sources: Sources,
    config: CollectorConfig,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<watch::Receiver<bool>, CollectorError> {
    let (ready_tx, ready_rx) = watch::channel(false);
    let (updates_tx, updates_rx) = mpsc::channel(UPDATE_QUEUE);
    let publisher = Publisher::new(updates_tx);
    let inner = if config.dedicated_thread {
        TaskTracker::new()
    } else {
        tracker.clone()
    };
    let start = {
        let inner = inner.clone();
        let cancel = cancel.clone();
        move || {
            inner.spawn(publish(store.clone(), updates_rx, cancel.clone()));
            let (first_tx, first_rx) = mpsc::unbounded_channel();
            for plan in sources.polling {
                inner.spawn(
                    Supervisor {
                        store: store.clone(),
                        plan: Arc::new(plan),
                        interval: config.default_interval,
                        tracker: inner.clone(),
                        cancel: cancel.clone(),
                        first: first_tx.clone(),
                        publisher: publisher.clone(),
                    }
                    .run(),
                );
            }
            drop(first_tx);
            inner.spawn(readiness(store.clone(), first_rx, ready_tx, cancel.clone()));
            for source in sources.subscribing {
                let ctx = SubscriptionContext {
                    store: store.clone(),
                    publisher: publisher.only(source.plugin.writes(), &source.name),
                    cancel: cancel.clone(),
                };
                let cancel = cancel.clone();
                inner.spawn(async move {
                    if let Err(error) = source.plugin.clone().run(ctx).await {
                        tracing::error!(source = %source.name, %error, "data source failed; shutting down");
                        cancel.cancel();
                    }
                });
            }
        }
    };
    if !config.dedicated_thread {
        start();
        return Ok(ready_rx);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("epp-datalayer")
        .build()
        .map_err(CollectorError::Runtime)?;
    tracker.spawn_blocking(move || {
        runtime.block_on(async move {
            start();
            cancel.cancelled().await;
            inner.close();
            inner.wait().await;
        });
    });
    Ok(ready_rx)
}

/// What a supervisor reports about the first round: how many loops it started at first sync
/// (`Started`), then one `Polled` per first attempt.
enum First {
    Started(usize),
    Polled,
}

/// Turns readiness on once every first-round loop of every source has polled once.
async fn readiness(
    store: Arc<EndpointStore>,
    mut first: mpsc::UnboundedReceiver<First>,
    ready: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    let mut changes = store.subscribe();
    // Without polling sources, readiness only waits for the pool.
    let mut outstanding: i64 = 0;
    let mut reports_open = true;
    loop {
        if store.load().is_synced() && outstanding <= 0 && !reports_open {
            ready.send_replace(true);
            return;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            msg = first.recv(), if reports_open => match msg {
                Some(First::Started(n)) => outstanding += n as i64,
                Some(First::Polled) => outstanding -= 1,
                None => reports_open = false,
            },
        }
    }
}

struct Supervisor {
    store: Arc<EndpointStore>,
    plan: Arc<PollingPlan>,
    interval: Duration,
    tracker: TaskTracker,
    cancel: CancellationToken,
    first: mpsc::UnboundedSender<First>,
    publisher: Publisher,
}

impl Supervisor {
    async fn run(self) {
        let mut changes = self.store.subscribe();
        let mut running: HashMap<usize, (Arc<Endpoint>, CancellationToken)> = HashMap::new();
        let mut first = Some(self.first.clone());
        drop(self.first);
        let interval = self.plan.source.plugin.interval().unwrap_or(self.interval);
        loop {
            // Seen before loading, never after: a change landing between the two would be
            // marked seen with the older set in hand, and nothing else wakes this loop.
            changes.mark_unchanged();
            let snapshot = self.store.load();
            let live: HashMap<usize, &Arc<Endpoint>> = snapshot
                .endpoints()
                .iter()
                .map(|e| (Arc::as_ptr(&e.endpoint) as usize, &e.endpoint))
                .collect();
            running.retain(|key, (endpoint, token)| {
                let keep = live.contains_key(key);
                if !keep {
                    tracing::debug!(endpoint = %endpoint.hostport, source = %self.plan.source.name, "stopping poller");
                    token.cancel();
                }
                keep
            });
            // The endpoints present at the first sync make up the first round.
            let round = if snapshot.is_synced() { first.take() } else { None };
            if let Some(tx) = &round {
                let _ = tx.send(First::Started(live.len()));
            }
            for (key, endpoint) in &live {
                if running.contains_key(key) {
                    continue;
                }
                let token = self.cancel.child_token();
                self.tracker.spawn(poll_loop(PollLoop {
                    endpoint: (*endpoint).clone(),
                    plan: self.plan.clone(),
                    interval,
                    cancel: token.clone(),
                    first: FirstAttempt(round.clone()),
                    publisher: self.publisher.clone(),
                }));
                running.insert(*key, ((*endpoint).clone(), token));
            }
            drop(round);
            tokio::select! {
                () = self.cancel.cancelled() => break,
                changed = changes.changed() => if changed.is_err() { break },
            }
        }
        for (_, token) in running.values() {
            token.cancel();
        }
    }
}

/// Publishes writes in batches: one snapshot per window instead of one per write.
async fn publish(
    store: Arc<EndpointStore>,
    mut updates: mpsc::Receiver<(Arc<Endpoint>, Writes)>,
    cancel: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            () = cancel.cancelled() => return,
            u = updates.recv() => match u { Some(u) => u, None => return },
        };
        batch.push(first);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(PUBLISH_WINDOW) => {}
        }
        while let Ok(u) = updates.try_recv() {
            batch.push(u);
        }
        store.publish(batch.drain(..));
    }
}

/// Spreads the first polls of many endpoints over one interval.
fn jitter(endpoint: &Endpoint, interval: Duration) -> Duration {
    let h = xxhash_rust::xxh64::xxh64(endpoint.hostport.as_bytes(), 0);
    let nanos = interval.as_nanos().max(1) as u64;
    Duration::from_nanos(h % nanos)
}

struct PollLoop {
    endpoint: Arc<Endpoint>,
    plan: Arc<PollingPlan>,
    interval: Duration,
    cancel: CancellationToken,
    first: FirstAttempt,
    publisher: Publisher,
}

async fn poll_loop(l: PollLoop) {
    let PollLoop {
        endpoint,
        plan,
        interval,
        cancel,
        mut first,
        publisher,
    } = l;
    let source = &plan.source;
    let mut hints: Vec<String> = plan
        .extractors
        .iter()
        .flat_map(|x| x.plugin.hints(&endpoint))
        .collect();
    hints.sort_unstable();
    hints.dedup();
    let mut poller = match source.plugin.poller(&endpoint, &hints) {
        Ok(p) => p,
        Err(error) => {
            tracing::error!(endpoint = %endpoint.hostport, source = %source.name, %error, "cannot poll this endpoint");
            return;
        }
    };
    let timeout = source.plugin.timeout();
    tracing::debug!(endpoint = %endpoint.hostport, source = %source.name, target = %poller.target(), "starting poller");
    // The first poll goes out at once (readiness waits for it); later ones are spread.
    let start = Instant::now() + jitter(&endpoint, interval);
    let mut ticker = tokio::time::interval_at(start, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    let mut immediate = true;
    // What this source's extractors last wrote for the endpoint: they are its only writers.
    let mut last = Attributes::default();
    let declared: Vec<(Vec<KeyId>, AtomicBool)> = plan
        .extractors
        .iter()
        .map(|x| (x.plugin.writes(), AtomicBool::new(false)))
        .collect();
    loop {
        if !immediate {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
        }
        immediate = false;
        let outcome = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            r = tokio::time::timeout(timeout, poller.poll()) => r,
        };
        let result: Result<Writes, String> = match outcome {
            Err(_) => Err(format!("timed out after {timeout:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(payload)) => {
                let now = Instant::now();
                let mut writes: Writes = Vec::new();
                let mut errors: Vec<String> = Vec::new();
                for (x, (keys, warned)) in plan.extractors.iter().zip(&declared) {
                    match x.plugin.extract(&endpoint, &*payload, &last, now) {
                        Ok(mut w) => {
                            keep_declared(&mut w, keys, &x.name, warned);
                            writes.extend(w);
                        }
                        Err(e) => errors.push(format!("{}: {e}", x.name)),
                    }
                }
                if writes.is_empty() {
                    Err(errors.join("; "))
                } else {
                    Ok(writes)
                }
            }
        };
        match result {
            Ok(writes) => {
                for (k, v) in &writes {
                    last.set_raw(*k, v.clone());
                }
                // Bounded queue: a stalled publisher slows pollers; it never grows.
                if !publisher.publish(endpoint.clone(), writes).await {
                    return;
                }
                if failing {
                    failing = false;
                    tracing::info!(endpoint = %endpoint.hostport, source = %source.name, "polling recovered");
                }
            }
            Err(error) if !failing => {
                failing = true;
                // The poller may have moved since it started (a narrowed metrics page).
                tracing::warn!(endpoint = %endpoint.hostport, source = %source.name, target = %poller.target(), %error, "polling failing; figures will go stale");
            }
            Err(_) => {}
        }
        first.report();
    }
}

/// Reports a loop's first attempt when it happens, or when the loop stops before it.
struct FirstAttempt(Option<mpsc::UnboundedSender<First>>);

impl FirstAttempt {
    fn report(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(First::Polled);
        }
    }
}

impl Drop for FirstAttempt {
    fn drop(&mut self) {
        self.report();
    }
}

#[cfg(test)]
mod tests;
