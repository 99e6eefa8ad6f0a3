//! Scrapers: one owned, cancellable task per endpoint polling its `/metrics`.
//!
//! A supervisor task follows the endpoint set (a `watch` notification from the store) and
//! keeps exactly one scraper per endpoint: new endpoints get one, departed endpoints have
//! theirs cancelled. All tasks live in one [`TaskTracker`] under one [`CancellationToken`], so
//! shutdown stops every scraper and waits for them.
//!
//! A scrape that fails (connection error, timeout, non-200, or a page without one configured
//! series) changes nothing: the endpoint's figures keep their old timestamp and age, so
//! staleness-aware consumers see them go stale. Failures are logged once per transition, not
//! once per tick.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::time::{Duration, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::extract::EngineMetrics;
use super::fetch::Fetcher;
use super::{Endpoint, EndpointStore, Metrics};

/// Pod label selecting the engine mapping, as the reference.
pub const ENGINE_LABEL: &str = "inference.networking.k8s.io/engine-type";

/// How endpoints are scraped.
#[derive(Debug, Clone)]
pub struct ScrapeConfig {
    /// `http` or `https`.
    pub scheme: String,
    /// Path of the metrics page.
    pub path: String,
    /// Port of the metrics page for every endpoint (`None`: the endpoint's own).
    pub port: Option<u16>,
    /// Time between scrapes of one endpoint.
    pub interval: Duration,
    /// Limit on one scrape.
    pub timeout: Duration,
    /// Skip certificate verification for `https`.
    pub insecure_skip_verify: bool,
    /// Mapping used when an endpoint has no engine label.
    pub default_engine: Arc<EngineMetrics>,
    /// Mappings selectable by the engine label.
    pub engines: HashMap<String, Arc<EngineMetrics>>,
    /// Ask for only the needed series (`?name[]=...`, honoured by the Python Prometheus
    /// client that vLLM and SGLang serve their metrics with): a vLLM page shrinks from ~50 KB
    /// to under 1 KB. Servers that ignore the parameter send the whole page, which works too.
    pub name_filter: bool,
    /// Run scrapers on a dedicated single-threaded runtime. Thousands of small scrapes a
    /// second cost a third less CPU without work stealing between threads, and they stay off
    /// the threads that serve requests. Tests keep them on the caller's runtime so they can
    /// pause its clock.
    pub dedicated_thread: bool,
}

impl ScrapeConfig {
    /// vLLM over plain HTTP on the endpoint's port, every 50 ms, 1 s timeout.
    pub fn new(default_engine: EngineMetrics) -> Self {
        Self {
            scheme: "http".into(),
            path: "/metrics".into(),
            port: None,
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
            insecure_skip_verify: true,
            default_engine: Arc::new(default_engine),
            engines: super::extract::ENGINES
                .iter()
                .filter_map(|e| EngineMetrics::builtin(e).map(|m| ((*e).to_owned(), Arc::new(m))))
                .collect(),
            name_filter: true,
            dedicated_thread: false,
        }
    }

    fn url(&self, endpoint: &Endpoint, engine: &EngineMetrics) -> Result<reqwest::Url, String> {
        let port = self
            .port
            .or(endpoint.metrics_port)
            .unwrap_or(endpoint.address.port());
        let host = match endpoint.address.ip() {
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        };
        let mut url = reqwest::Url::parse(&format!("{}://{host}:{port}{}", self.scheme, self.path))
            .map_err(|e| format!("invalid metrics URL: {e}"))?;
        if self.name_filter {
            let mut query = url.query_pairs_mut();
            for name in engine.sample_names() {
                query.append_pair("name[]", &name);
            }
        }
        Ok(url)
    }

    fn engine_for(&self, endpoint: &Endpoint) -> Arc<EngineMetrics> {
        endpoint
            .labels
            .get(ENGINE_LABEL)
            .and_then(|e| self.engines.get(e))
            .unwrap_or(&self.default_engine)
            .clone()
    }
}

/// Why scraping could not start.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The HTTPS client could not be built.
    #[error("cannot build the metrics HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// The scrapers' runtime could not be built.
    #[error("cannot start the scraper thread: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Starts the scraper supervisor on `tracker`. The returned receiver turns `true` once the
/// pool is synced and every endpoint present then has been scraped once (successfully or not).
pub fn spawn_scrapers(
    store: Arc<EndpointStore>,
    config: ScrapeConfig,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<watch::Receiver<bool>, ScrapeError> {
    // reqwest is built without a bundled crypto provider; install ring (a no-op if done).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(config.timeout)
        .danger_accept_invalid_certs(config.insecure_skip_verify)
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .no_proxy()
        .build()
        .map_err(ScrapeError::Client)?;
    let (ready_tx, ready_rx) = watch::channel(false);
    let (updates_tx, updates_rx) = mpsc::channel(UPDATE_QUEUE);
    let dedicated = config.dedicated_thread;
    let inner = if dedicated {
        TaskTracker::new()
    } else {
        tracker.clone()
    };
    let supervisor = Supervisor {
        store: store.clone(),
        config: Arc::new(config),
        client,
        tracker: inner.clone(),
        cancel: cancel.clone(),
        ready: ready_tx,
        updates: updates_tx,
    };
    if !dedicated {
        tracker.spawn(publish(store, updates_rx, cancel));
        tracker.spawn(supervisor.run());
        return Ok(ready_rx);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("epp-scrapers")
        .build()
        .map_err(ScrapeError::Runtime)?;
    tracker.spawn_blocking(move || {
        runtime.block_on(async move {
            inner.spawn(publish(store, updates_rx, cancel.clone()));
            inner.spawn(supervisor.run());
            cancel.cancelled().await;
            inner.close();
            inner.wait().await;
        });
    });
    Ok(ready_rx)
}

struct Supervisor {
    store: Arc<EndpointStore>,
    config: Arc<ScrapeConfig>,
    client: reqwest::Client,
    tracker: TaskTracker,
    cancel: CancellationToken,
    ready: watch::Sender<bool>,
    updates: mpsc::Sender<(Arc<Endpoint>, Metrics)>,
}

impl Supervisor {
    async fn run(self) {
        let mut changes = self.store.subscribe();
        let mut running: HashMap<usize, (Arc<Endpoint>, CancellationToken)> = HashMap::new();
        // First attempts of the endpoints present when the pool first synced.
        let (first_tx, mut first_rx) = mpsc::unbounded_channel::<()>();
        let mut pending_first: Option<usize> = None;
        loop {
            let snapshot = self.store.load();
            changes.mark_unchanged();
            let live: HashMap<usize, &Arc<Endpoint>> = snapshot
                .endpoints()
                .iter()
                .map(|e| (Arc::as_ptr(&e.endpoint) as usize, &e.endpoint))
                .collect();
            running.retain(|key, (endpoint, token)| {
                let keep = live.contains_key(key);
                if !keep {
                    tracing::debug!(endpoint = %endpoint.hostport, "stopping scraper");
                    token.cancel();
                }
                keep
            });
            let counting_first = pending_first.is_none() && snapshot.is_synced();
            for (key, endpoint) in &live {
                if running.contains_key(key) {
                    continue;
                }
                let token = self.cancel.child_token();
                let first = counting_first.then(|| first_tx.clone());
                self.tracker.spawn(scrape_loop(
                    (*endpoint).clone(),
                    self.store.clone(),
                    self.client.clone(),
                    self.config.clone(),
                    token.clone(),
                    first,
                    self.updates.clone(),
                ));
                running.insert(*key, ((*endpoint).clone(), token));
            }
            if counting_first {
                pending_first = Some(live.len());
            }
            if pending_first == Some(0) {
                self.ready.send_replace(true);
            }
            tokio::select! {
                () = self.cancel.cancelled() => break,
                changed = changes.changed() => if changed.is_err() { break },
                Some(()) = first_rx.recv(), if pending_first.is_some_and(|n| n > 0) => {
                    pending_first = pending_first.map(|n| n - 1);
                }
            }
        }
        for (_, token) in running.values() {
            token.cancel();
        }
    }
}

/// Scrape results waiting to be published.
const UPDATE_QUEUE: usize = 4096;
/// How long the publisher gathers results before publishing one snapshot: at 100 endpoints
/// and 50 ms that is about ten results per snapshot instead of one.
const PUBLISH_WINDOW: Duration = Duration::from_millis(5);

/// Publishes scrape results in batches: one snapshot per window instead of one per scrape.
async fn publish(
    store: Arc<EndpointStore>,
    mut updates: mpsc::Receiver<(Arc<Endpoint>, Metrics)>,
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
        store.update_metrics_batch(batch.drain(..));
    }
}

/// Spreads the first scrapes of many endpoints over one interval.
fn jitter(endpoint: &Endpoint, interval: Duration) -> Duration {
    let h = xxhash_rust::xxh64::xxh64(endpoint.hostport.as_bytes(), 0);
    let nanos = interval.as_nanos().max(1) as u64;
    Duration::from_nanos(h % nanos)
}

async fn scrape_loop(
    endpoint: Arc<Endpoint>,
    store: Arc<EndpointStore>,
    client: reqwest::Client,
    config: Arc<ScrapeConfig>,
    cancel: CancellationToken,
    first: Option<mpsc::UnboundedSender<()>>,
    updates: mpsc::Sender<(Arc<Endpoint>, Metrics)>,
) {
    // Reports the first attempt when it happens, or when the scraper stops before it.
    let mut first = FirstAttempt(first);
    let engine = config.engine_for(&endpoint);
    let url = match config.url(&endpoint, &engine) {
        Ok(url) => url,
        Err(error) => {
            tracing::error!(endpoint = %endpoint.hostport, %error, "cannot scrape this endpoint");
            return;
        }
    };
    let port = url.port_or_known_default().unwrap_or(endpoint.address.port());
    let mut fetcher = match Fetcher::new(&url, SocketAddr::new(endpoint.address.ip(), port), &client) {
        Ok(f) => f,
        Err(error) => {
            tracing::error!(endpoint = %endpoint.hostport, %error, "cannot scrape this endpoint");
            return;
        }
    };
    tracing::debug!(endpoint = %endpoint.hostport, %url, engine = %engine.engine, "starting scraper");
    // The first scrape goes out at once (readiness waits for it); later ones are spread.
    let start = Instant::now() + jitter(&endpoint, config.interval);
    let mut ticker = tokio::time::interval_at(start, config.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    let mut immediate = true;
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
            r = tokio::time::timeout(config.timeout, fetcher.fetch()) => r,
        };
        let result = match outcome {
            Ok(Ok(page)) => match std::str::from_utf8(&page) {
                Err(_) => Err("metrics page is not UTF-8".to_owned()),
                Ok(page) => {
                    let previous = store
                        .load()
                        .state_of(&endpoint)
                        .map(|s| (*s.metrics).clone())
                        .unwrap_or_default();
                    match engine.extract(page, &previous, Instant::now()) {
                        Some(metrics) => {
                            // Bounded queue: a stalled publisher slows scrapers; it never grows.
                            if updates.send((endpoint.clone(), metrics)).await.is_err() {
                                return;
                            }
                            Ok(())
                        }
                        None => Err(format!("no {} metric found on the page", engine.engine)),
                    }
                }
            },
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("timed out after {:?}", config.timeout)),
        };
        match result {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(endpoint = %endpoint.hostport, "metrics scrape recovered");
            }
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(endpoint = %endpoint.hostport, %url, %error, "metrics scrape failing; figures will go stale");
            }
            _ => {}
        }
        first.report();
    }
}

struct FirstAttempt(Option<mpsc::UnboundedSender<()>>);

impl FirstAttempt {
    fn report(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for FirstAttempt {
    fn drop(&mut self) {
        self.report();
    }
}
