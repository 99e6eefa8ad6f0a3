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
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::time::{Duration, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::extract::EngineMetrics;
use super::{Endpoint, EndpointStore};

/// Pod label selecting the engine mapping, as the reference.
pub const ENGINE_LABEL: &str = "inference.networking.k8s.io/engine-type";
/// Largest `/metrics` page read.
const MAX_PAGE_BYTES: usize = 16 << 20;

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
        }
    }

    fn url(&self, endpoint: &Endpoint) -> String {
        let port = self
            .port
            .or(endpoint.metrics_port)
            .unwrap_or(endpoint.address.port());
        let host = match endpoint.address.ip() {
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        };
        format!("{}://{host}:{port}{}", self.scheme, self.path)
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
#[error("cannot build the metrics HTTP client: {0}")]
pub struct ScrapeError(#[source] reqwest::Error);

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
        .map_err(ScrapeError)?;
    let (ready_tx, ready_rx) = watch::channel(false);
    let supervisor = Supervisor {
        store,
        config: Arc::new(config),
        client,
        tracker: tracker.clone(),
        cancel,
        ready: ready_tx,
    };
    tracker.spawn(supervisor.run());
    Ok(ready_rx)
}

struct Supervisor {
    store: Arc<EndpointStore>,
    config: Arc<ScrapeConfig>,
    client: reqwest::Client,
    tracker: TaskTracker,
    cancel: CancellationToken,
    ready: watch::Sender<bool>,
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

/// Spreads the first scrapes of many endpoints over one interval.
fn jitter(endpoint: &Endpoint, interval: Duration) -> Duration {
    let h = xxhash_rust::xxh64::xxh64(endpoint.hostport.as_bytes(), 0);
    let nanos = interval.as_nanos().max(1) as u64;
    Duration::from_nanos(h % nanos)
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<String, String> {
    let mut resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let mut page = Vec::with_capacity(64 << 10);
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if page.len() + chunk.len() > MAX_PAGE_BYTES {
            return Err(format!("metrics page larger than {MAX_PAGE_BYTES} bytes"));
        }
        page.extend_from_slice(&chunk);
    }
    String::from_utf8(page).map_err(|_| "metrics page is not UTF-8".to_owned())
}

async fn scrape_loop(
    endpoint: Arc<Endpoint>,
    store: Arc<EndpointStore>,
    client: reqwest::Client,
    config: Arc<ScrapeConfig>,
    cancel: CancellationToken,
    first: Option<mpsc::UnboundedSender<()>>,
) {
    // Reports the first attempt when it happens, or when the scraper stops before it.
    let mut first = FirstAttempt(first);
    let url = config.url(&endpoint);
    let engine = config.engine_for(&endpoint);
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
            r = tokio::time::timeout(config.timeout, fetch(&client, &url)) => r,
        };
        let result = match outcome {
            Ok(Ok(page)) => {
                let previous = store
                    .load()
                    .state_of(&endpoint)
                    .map(|s| (*s.metrics).clone())
                    .unwrap_or_default();
                match engine.extract(&page, &previous, Instant::now()) {
                    Some(metrics) => {
                        store.update_metrics(&endpoint, metrics);
                        Ok(())
                    }
                    None => Err(format!("no {} metric found on the page", engine.engine)),
                }
            }
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
