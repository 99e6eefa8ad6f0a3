//! `precise-prefix-cache-producer`: which candidate holds the longest prefix of the prompt in
//! its KV cache, as the engines themselves reported it (llm-d-router v0.10's plugin of that
//! name).
//!
//! * **Before scheduling** it keys the request's token ids (from its `token-producer`) into
//!   the picker's blocks ([`super::keys`]), the LoRA adapter folded in when the request names
//!   one some endpoint stored blocks under, and stores a [`PrefixMatch`] for the
//!   `prefix-cache-scorer`: per candidate the leading blocks it holds, weighted by tier
//!   (`kvCacheBackendConfigs`: GPU 1, CPU 0.8), truncated as v0.10 does. A request without
//!   tokens (no token producer result, or media a local tokenizer cannot expand) scores 0.
//! * **After the decision**, with `speculativeIndexing`, the primary endpoint (and a
//!   `prefill` profile's) is recorded at once, closing the window before the engine's events
//!   arrive. The entries stay while the request is in flight (an engine keeps a running
//!   request's blocks, and one queued at the engine has published nothing yet) and
//!   `speculativeTTL` after it ends; v0.10 counts the TTL from the pick, so a request queued
//!   at the engine longer than that loses its credit before its blocks exist.
//! * **In the background** (a subscribing source the collector runs): the ZMQ subscriptions
//!   ([`super::subscriber`]), `concurrency` ingestion workers, a sweeper of expired
//!   speculative entries, the optional metrics log, and the pool: an endpoint that leaves is
//!   forgotten, and with `discoverPods` (wired to an `endpoint-notification-source`) each
//!   endpoint of the pool is subscribed to.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};

use super::index::{PodId, PreciseIndex};
use super::ingest::Ingest;
use super::keys::KeyScheme;
use super::params::Resolved;
use super::subscriber::{Resolver, Subscriber, SubscriberConfig, Target, Work};
use crate::datalayer::{Endpoint, EndpointState, EndpointStore};
use crate::framework::attributes::{PrefixMatch, TokenizedPrompt};
use crate::framework::data::{CycleState, DataKey, KeyId};
use crate::framework::datalayer::{EndpointExtractor, SourceError, SubscribingSource, SubscriptionContext};
use crate::framework::plugin::{CounterFamily, PluginMetrics};
use crate::framework::requestcontrol::{DataProducer, PreRequest, PreRequestContext};
use crate::framework::scheduling::{Candidate, SchedulingRequest, SchedulingResult};

/// Blocks keyed per prompt at most: 131,072 tokens at 16 per block (v0.10's token cap of the
/// approximate producer); bounds the request path's hashing.
pub const MAX_BLOCKS: usize = 8192;
/// Messages queued per ingestion worker.
const WORK_QUEUE: usize = 1024;

/// Counters the producer keeps in its own atomics, read when metrics are scraped.
#[derive(Debug, Default)]
struct Counters {
    lookups: AtomicU64,
    hits: AtomicU64,
}

/// See the module docs.
pub struct PreciseProducer {
    name: Arc<str>,
    config: Resolved,
    ingest: Arc<Ingest>,
    tokens: DataKey<TokenizedPrompt>,
    matches: DataKey<PrefixMatch>,
    /// Set when an `endpoint-notification-source` lists this producer as its extractor.
    follow_pods: AtomicBool,
    counters: Arc<Counters>,
    lookup_latency: Option<[Histogram; 2]>,
    skipped: CounterFamily,
    received: CounterFamily,
}

impl std::fmt::Debug for PreciseProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreciseProducer")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Metric names: llm-d-router v0.10's, each with its deprecated `kvcache_` alias where v0.10
/// emits both.
const INDEX_COUNTERS: &[(&str, &str, &str)] = &[
    (
        "llm_d_router_epp_kv_cache_index_admissions",
        "kvcache_index_admissions",
        "Keys added to the KV-block index",
    ),
    (
        "llm_d_router_epp_kv_cache_index_evictions",
        "kvcache_index_evictions",
        "Entries removed from the KV-block index",
    ),
    (
        "llm_d_router_epp_kv_cache_index_lookup_requests",
        "kvcache_index_lookup_requests",
        "Lookups in the KV-block index",
    ),
    (
        "llm_d_router_epp_kv_cache_index_lookup_hits",
        "kvcache_index_lookup_hits",
        "Blocks found for the best endpoint, summed over lookups",
    ),
    (
        "llm_d_router_epp_kv_cache_index_max_pod_hit_count",
        "kvcache_index_max_pod_hit_count",
        "Blocks found for the best endpoint, summed over lookups",
    ),
];

impl PreciseProducer {
    /// A producer named `name` reading tokens from `tokens`, configured by `config`, with its
    /// metric families registered in `metrics`.
    pub fn new(
        name: &str,
        tokens: DataKey<TokenizedPrompt>,
        config: Resolved,
        metrics: &PluginMetrics,
    ) -> Self {
        let index = Arc::new(PreciseIndex::new(
            config.max_keys,
            config.pods_per_key,
            &config.tiers,
        ));
        let ingest = Arc::new(Ingest::new(
            index.clone(),
            KeyScheme::new(config.block_tokens, &config.hash_seed),
        ));
        let counters = Arc::new(Counters::default());
        let enabled = config.enable_metrics;
        for (i, (name, alias, help)) in INDEX_COUNTERS.iter().enumerate() {
            for n in [name, alias] {
                let (index, counters) = (index.clone(), counters.clone());
                metrics.counter_fn(
                    n,
                    help,
                    Arc::new(move || {
                        if !enabled {
                            return 0;
                        }
                        let v = match i {
                            0 => index.stats.admissions.load(Ordering::Relaxed),
                            1 => index.stats.evictions.load(Ordering::Relaxed),
                            2 => counters.lookups.load(Ordering::Relaxed),
                            _ => counters.hits.load(Ordering::Relaxed),
                        };
                        i64::try_from(v).unwrap_or(i64::MAX)
                    }),
                );
            }
        }
        let size = index.clone();
        metrics.gauge_fn(
            "llm_d_router_epp_kv_cache_index_keys",
            "Keys held in the KV-block index",
            Arc::new(move || i64::try_from(size.keys()).unwrap_or(i64::MAX)),
        );
        let buckets = || {
            [
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            ]
            .into_iter()
        };
        let lookup_latency = enabled.then(|| {
            [
                metrics.histogram(
                    "llm_d_router_epp_kv_cache_index_lookup_latency_seconds",
                    "Latency of KV-block index lookups",
                    buckets(),
                ),
                metrics.histogram(
                    "kvcache_index_lookup_latency_seconds",
                    "Latency of KV-block index lookups",
                    buckets(),
                ),
            ]
        });
        Self {
            name: name.into(),
            config,
            ingest,
            tokens,
            matches: DataKey::named(name),
            follow_pods: AtomicBool::new(false),
            counters,
            lookup_latency,
            skipped: metrics.counter(
                "llm_d_router_epp_kv_cache_events_stores_skipped",
                "Stored blocks the index skipped, by cache kind and reason",
            ),
            received: metrics.counter(
                "llm_d_router_epp_kv_cache_events_messages_received",
                "KV-event messages received, by subscription",
            ),
        }
    }

    /// The key of its [`PrefixMatch`].
    pub fn match_key(&self) -> DataKey<PrefixMatch> {
        self.matches
    }

    /// The index (tests, benches).
    pub fn ingest(&self) -> &Arc<Ingest> {
        &self.ingest
    }

    /// Follow the pool's endpoints (subscribe to each one's publisher): the producer is
    /// listed under an `endpoint-notification-source`. `false` when `discoverPods` is off.
    pub fn follow_pods(&self) -> bool {
        if !self.config.discover_pods {
            return false;
        }
        self.follow_pods.store(true, Ordering::Relaxed);
        true
    }

    /// Whether the producer will receive any events: a central socket, or endpoints followed.
    pub fn has_event_source(&self) -> bool {
        self.config.central.is_some() || self.follow_pods.load(Ordering::Relaxed)
    }

    /// The request's keys, per prompt.
    fn keys(&self, req: &SchedulingRequest<'_>, prompt: &TokenizedPrompt) -> Vec<Vec<u64>> {
        let lora = self
            .ingest
            .is_adapter(req.target_model)
            .then_some(req.target_model);
        prompt
            .prompts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|tokens| {
                let mut keys = Vec::with_capacity(tokens.len() / self.config.block_tokens);
                self.ingest.scheme().request_keys(
                    tokens,
                    lora,
                    req.cache_salt,
                    &prompt.media,
                    MAX_BLOCKS,
                    &mut keys,
                );
                keys
            })
            .collect()
    }
}

impl DataProducer for PreciseProducer {
    fn prepare(&self, req: &SchedulingRequest<'_>, candidates: &[Candidate<'_>], state: &mut CycleState) {
        let block_tokens = self.config.block_tokens;
        let mut found = PrefixMatch {
            total_blocks: 0,
            block_tokens,
            block_bytes: block_tokens * crate::datalayer::BYTES_PER_TOKEN,
            matched: vec![0; candidates.len()],
            hashes: Vec::new(),
        };
        let keys = state
            .get(self.tokens)
            .filter(|p| !p.has_media)
            .map(|prompt| self.keys(req, prompt));
        if let Some(keys) = keys {
            let started = std::time::Instant::now();
            let index = self.ingest.index();
            let pods: Vec<Option<PodId>> = candidates
                .iter()
                .map(|c| index.known_pod(&c.endpoint.address))
                .collect();
            let mut weighted = vec![0.0; candidates.len()];
            for keys in keys {
                let m = index.lookup(&keys, &pods, req.now);
                let best = m.iter().map(|m| m.blocks).max().unwrap_or(0);
                self.counters.lookups.fetch_add(1, Ordering::Relaxed);
                self.counters.hits.fetch_add(u64::from(best), Ordering::Relaxed);
                for (w, m) in weighted.iter_mut().zip(&m) {
                    *w += m.weighted;
                }
                found.total_blocks += keys.len();
                found.hashes.extend(keys);
            }
            for (m, w) in found.matched.iter_mut().zip(&weighted) {
                // v0.10 truncates the weighted count.
                *m = *w as u32;
            }
            if let Some(h) = &self.lookup_latency {
                let s = started.elapsed().as_secs_f64();
                h[0].observe(s);
                h[1].observe(s);
            }
        }
        state.put(self.matches, found);
    }
}

impl PreRequest for PreciseProducer {
    fn pre_request(
        &self,
        req: &SchedulingRequest<'_>,
        state: &CycleState,
        result: &SchedulingResult,
        ctx: &mut PreRequestContext,
    ) {
        if !self.config.speculative {
            return;
        }
        let Some(found) = state.get(self.matches).filter(|f| !f.hashes.is_empty()) else {
            return;
        };
        let index = self.ingest.index();
        let record = |e: &Endpoint| {
            let pod = index.pod(e.address);
            index
                .speculate(pod, &found.hashes, self.config.speculative_ttl, req.now, true)
                .then_some(pod)
        };
        let Some(primary) = result.targets().first() else {
            return;
        };
        let mut pods: smallvec::SmallVec<[PodId; 2]> = smallvec::SmallVec::new();
        pods.extend(record(&primary.endpoint));
        if let Some(prefill) = result.prefill_target() {
            pods.extend(record(&prefill.endpoint));
        }
        if !pods.is_empty() {
            ctx.hold(Pinned {
                ingest: self.ingest.clone(),
                pods,
                keys: found.hashes.clone(),
                ttl: self.config.speculative_ttl,
            });
        }
    }
}

/// A request's pin on its speculative entries, released when the request ends: the entries
/// then live `speculativeTTL` more, long enough for the engine's events to land.
struct Pinned {
    ingest: Arc<Ingest>,
    pods: smallvec::SmallVec<[PodId; 2]>,
    keys: Vec<u64>,
    ttl: Duration,
}

impl crate::framework::requestcontrol::Hold for Pinned {}

impl Drop for Pinned {
    fn drop(&mut self) {
        let index = self.ingest.index();
        let now = Instant::now();
        for pod in &self.pods {
            index.unpin(*pod, &self.keys, self.ttl, now);
        }
    }
}

/// The data-parallel rank of an endpoint: the `-rank-<i>` suffix Kubernetes discovery gives
/// the endpoints of a pod with several target ports (0 otherwise).
pub fn rank_of(endpoint: &Endpoint) -> u16 {
    endpoint
        .name
        .rsplit_once("-rank-")
        .and_then(|(_, r)| r.parse().ok())
        .unwrap_or(0)
}

fn tcp(ip: IpAddr, port: u16) -> String {
    format!(
        "tcp://{}",
        crate::datalayer::format_hostport(SocketAddr::new(ip, port))
    )
}

impl PreciseProducer {
    fn targets(&self, endpoints: &[EndpointState]) -> Vec<Target> {
        let index = self.ingest.index();
        endpoints
            .iter()
            .filter(|e| {
                self.config
                    .selector
                    .iter()
                    .all(|(k, v)| e.endpoint.labels.get(k) == Some(v))
            })
            .map(|e| {
                let rank = rank_of(&e.endpoint);
                let ip = e.endpoint.address.ip();
                Target {
                    pod: index.pod(e.endpoint.address),
                    name: e.endpoint.name.clone(),
                    endpoint: tcp(ip, self.config.socket_port.saturating_add(rank)),
                    replay: self.config.replay_port.map(|p| tcp(ip, p.saturating_add(rank))),
                }
            })
            .collect()
    }

    /// Central mode: the endpoint a topic names (`kv@<ip:port>@<model>`; an IP alone names
    /// the pool's endpoint at that IP, or with several, the one at the message's rank).
    fn resolver(&self, store: Arc<EndpointStore>) -> Resolver {
        let index = self.ingest.index().clone();
        Arc::new(move |topic: &str, rank: Option<i64>| {
            let mut parts = topic.split('@');
            let (_, Some(id)) = (parts.next(), parts.next()) else {
                return None;
            };
            let snapshot = store.load();
            if let Ok(addr) = id.parse::<SocketAddr>() {
                return snapshot.find(addr).map(|_| index.pod(addr));
            }
            let ip: IpAddr = id.trim_matches(|c| c == '[' || c == ']').parse().ok()?;
            let mut at_ip: Vec<SocketAddr> = snapshot
                .endpoints()
                .iter()
                .map(|e| e.endpoint.address)
                .filter(|a| a.ip() == ip)
                .collect();
            at_ip.sort_by_key(SocketAddr::port);
            let addr = match at_ip.as_slice() {
                [one] => *one,
                many => *many.get(usize::try_from(rank.unwrap_or(0)).ok()?)?,
            };
            Some(index.pod(addr))
        })
    }

    async fn work(
        ingest: Arc<Ingest>,
        mut rx: mpsc::Receiver<Work>,
        skipped: CounterFamily,
        received: CounterFamily,
    ) {
        while let Some(work) = rx.recv().await {
            match work {
                Work::Events { pod, source, events } => {
                    let applied = ingest.apply(pod, &events);
                    for (skip, kind) in applied.skipped {
                        skipped
                            .get_or_create(&vec![
                                ("cache_kind", kind.to_owned()),
                                ("reason", skip.reason().to_owned()),
                            ])
                            .inc();
                    }
                    received
                        .get_or_create(&vec![("pod_identifier", source.to_string())])
                        .inc();
                }
                Work::Clear { pod } => ingest.index().clear(pod),
                Work::Forget { pod } => ingest.forget(pod),
            }
        }
    }
}

impl EndpointExtractor for PreciseProducer {
    fn attach(&self) -> Result<(), String> {
        if self.follow_pods() {
            Ok(())
        } else {
            Err("kvEventsConfig.discoverPods is false, so following the pool's endpoints does nothing; remove it from the endpoint-notification-source or set discoverPods: true".into())
        }
    }

    fn idle(&self) -> Option<String> {
        if !self.has_event_source() {
            return Some("it receives no KV events: set kvEventsConfig.zmqEndpoint (engines connect to the EPP) or list it as an extractor of an endpoint-notification-source in dataLayer.sources (the EPP connects to each endpoint's publisher)".into());
        }
        (self.config.pod_discovery_written && !self.follow_pods.load(Ordering::Relaxed)).then(|| {
            "kvEventsConfig.podDiscoveryConfig only acts when the producer follows the pool's endpoints: list it as an extractor of an endpoint-notification-source, or remove podDiscoveryConfig".into()
        })
    }
}

impl SubscribingSource for PreciseProducer {
    fn writes(&self) -> Vec<KeyId> {
        Vec::new()
    }

    fn run(
        self: Arc<Self>,
        ctx: SubscriptionContext,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<(), SourceError>> + Send>> {
        Box::pin(async move {
            let mut workers = Vec::with_capacity(self.config.workers);
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..self.config.workers {
                let (tx, rx) = mpsc::channel(WORK_QUEUE);
                workers.push(tx);
                tasks.spawn(Self::work(
                    self.ingest.clone(),
                    rx,
                    self.skipped.clone(),
                    self.received.clone(),
                ));
            }
            let follow = self.follow_pods.load(Ordering::Relaxed);
            let config = SubscriberConfig {
                central: self.config.central.clone(),
                topic_filter: self.config.topic_filter.clone(),
            };
            let resolver = self.resolver(ctx.store.clone());
            let departures = workers.clone();
            let started = tokio::task::spawn_blocking(move || Subscriber::start(config, resolver, workers))
                .await
                .map_err(|e| SourceError::Failed(format!("KV-event subscriber: {e}")))?;
            let (subscriber, bound) = started.map_err(|e| SourceError::Failed(e.to_string()))?;
            if let Some(b) = bound {
                tracing::info!(producer = %self.name, endpoint = %b, "listening for KV events");
            }
            let stats = subscriber.stats.clone();
            let mut changes = ctx.store.subscribe();
            let mut live: Vec<(SocketAddr, Arc<str>)> = Vec::new();
            let mut sweep = tokio::time::interval(Duration::from_millis(50));
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut shard = 0usize;
            let mut log = self.config.log_interval.map(|i| {
                let mut t = tokio::time::interval_at(Instant::now() + i, i);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            loop {
                // The pool: forget departed endpoints, follow the present ones. Marked seen
                // before loading so that a change landing meanwhile wakes the wait below.
                changes.mark_unchanged();
                let snapshot = ctx.store.load();
                let now_live: Vec<(SocketAddr, Arc<str>)> = snapshot
                    .endpoints()
                    .iter()
                    .map(|e| (e.endpoint.address, e.endpoint.name.clone()))
                    .collect();
                for (gone, name) in live.iter().filter(|a| !now_live.contains(a)) {
                    if let Some(pod) = self.ingest.index().known_pod(gone)
                        && let Some(w) = departures.get(pod as usize % departures.len().max(1))
                    {
                        // Through the endpoint's worker, behind its queued events.
                        let _ = w.send(Work::Forget { pod }).await;
                    }
                    self.received.remove(&vec![("pod_identifier", name.to_string())]);
                }
                live = now_live;
                if follow {
                    subscriber.set_targets(self.targets(snapshot.endpoints()));
                }
                loop {
                    tokio::select! {
                        () = ctx.cancel.cancelled() => {
                            drop(subscriber);
                            tasks.shutdown().await;
                            return Ok(());
                        }
                        changed = changes.changed() => {
                            if changed.is_err() {
                                return Ok(());
                            }
                            break;
                        }
                        _ = sweep.tick() => {
                            // All 64 shards every 3.2 s: expired speculative entries go.
                            if self.ingest.index().speculative_entries() > 0 {
                                self.ingest.index().sweep(shard, Instant::now());
                                shard = (shard + 1) % PreciseIndex::SHARDS;
                            }
                        }
                        _ = async { match &mut log { Some(t) => { t.tick().await; } None => std::future::pending().await } } => {
                            let ix = self.ingest.index();
                            tracing::info!(
                                producer = %self.name,
                                keys = ix.keys(),
                                speculative = ix.speculative_entries(),
                                admissions = ix.stats.admissions.load(Ordering::Relaxed),
                                evictions = ix.stats.evictions.load(Ordering::Relaxed),
                                lookups = self.counters.lookups.load(Ordering::Relaxed),
                                hits = self.counters.hits.load(Ordering::Relaxed),
                                messages = self.ingest.messages.load(Ordering::Relaxed),
                                gaps = stats.gaps.load(Ordering::Relaxed),
                                replays = stats.replays.load(Ordering::Relaxed),
                                replay_failures = stats.replay_failures.load(Ordering::Relaxed),
                                "KV-block index"
                            );
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
