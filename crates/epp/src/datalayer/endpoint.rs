//! Endpoint identity, the per-endpoint load figures of the model-server protocol, and the
//! snapshot entry that carries both.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::{Duration, Instant};

use super::health::EndpointHealth;
use crate::framework::data::{Attributes, DataKey, KeyId, Value};

/// One routable model-server endpoint: a pod (or one data-parallel rank of a pod) at `ip:port`.
///
/// Endpoints are immutable; a changed pod becomes a new `Endpoint` in a new snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Stable name: the pod name (`<pod>-rank-<i>` for several target ports) or, for static
    /// pools, the address itself.
    pub name: Arc<str>,
    /// Where the gateway sends the request.
    pub address: SocketAddr,
    /// `address` as the gateway expects it (`10.0.0.1:8000`, `[fd00::1]:8000`), formatted once.
    pub hostport: Arc<str>,
    /// Pod labels (engine type, LoRA hints, test selectors).
    pub labels: BTreeMap<String, String>,
    /// Port serving `/metrics` when it differs from `address`'s port.
    pub metrics_port: Option<u16>,
}

impl Endpoint {
    /// An endpoint without labels.
    pub fn new(name: impl Into<Arc<str>>, address: SocketAddr) -> Self {
        Self {
            name: name.into(),
            address,
            hostport: format_hostport(address).into(),
            labels: BTreeMap::new(),
            metrics_port: None,
        }
    }

    /// An endpoint named after its address, as static pools name them.
    pub fn from_address(address: SocketAddr) -> Self {
        let hostport: Arc<str> = format_hostport(address).into();
        Self {
            name: hostport.clone(),
            address,
            hostport,
            labels: BTreeMap::new(),
            metrics_port: None,
        }
    }

    /// Adds a label (builder style).
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// `ip:port`, with IPv6 addresses in brackets: the form of Go's `net.JoinHostPort`, which is
/// what gateways parse in `x-gateway-destination-endpoint`.
pub fn format_hostport(address: SocketAddr) -> String {
    // `SocketAddr`'s Display is exactly that, minus IPv6 scope ids and flow info, which pod
    // addresses never carry.
    match address {
        SocketAddr::V4(v4) => v4.to_string(),
        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
    }
}

/// LoRA adapter state reported by vLLM's `vllm:lora_requests_info`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoraInfo {
    /// Adapters with running requests (loaded).
    pub active: Vec<Arc<str>>,
    /// Adapters with waiting requests.
    pub waiting: Vec<Arc<str>>,
    /// `max_lora`: how many adapters may be loaded at once (0 when unknown).
    pub max_active: u32,
}

impl LoraInfo {
    /// Whether `model` is loaded.
    pub fn is_active(&self, model: &str) -> bool {
        self.active.iter().any(|m| &**m == model)
    }

    /// Whether `model` has waiting requests.
    pub fn is_waiting(&self, model: &str) -> bool {
        self.waiting.iter().any(|m| &**m == model)
    }
}

/// The load figures of one endpoint as last scraped: the signals of the reference's model
/// server protocol (`docs/proposals/003-model-server-protocol`), written by the
/// `core-metrics-extractor` under [`METRICS`] and read by the load scorers, the saturation
/// detectors and the pool gauges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// Requests waiting in the model server's queue.
    pub waiting_queue: u32,
    /// Requests being decoded.
    pub running: u32,
    /// KV-cache utilisation, nominally 0..=1.
    pub kv_cache_usage: f64,
    /// LoRA adapters.
    pub lora: LoraInfo,
    /// Tokens per KV-cache block (`cache_config_info` `block_size`), when reported.
    pub cache_block_size: Option<u32>,
    /// Number of KV-cache blocks (`cache_config_info` `num_gpu_blocks`), when reported.
    pub cache_num_blocks: Option<u64>,
    /// When these figures were scraped; `None` until the first successful scrape.
    pub updated_at: Option<Instant>,
}

/// The key of [`Metrics`]: one per endpoint, whatever engine or extractor produced it.
pub const METRICS: DataKey<Metrics> = DataKey::reserved(0);

/// Figures of an endpoint never scraped.
static UNSCRAPED: Metrics = Metrics {
    waiting_queue: 0,
    running: 0,
    kv_cache_usage: 0.0,
    lora: LoraInfo {
        active: Vec::new(),
        waiting: Vec::new(),
        max_active: 0,
    },
    cache_block_size: None,
    cache_num_blocks: None,
    updated_at: None,
};

impl Metrics {
    /// Age of the figures at `now`; `None` if never scraped.
    pub fn age(&self, now: Instant) -> Option<Duration> {
        self.updated_at.map(|t| now.saturating_duration_since(t))
    }

    /// KV-cache capacity in tokens (`block_size × num_gpu_blocks`), when reported.
    pub fn cache_capacity_tokens(&self) -> Option<u64> {
        let blocks = self.cache_num_blocks?;
        let size = u64::from(self.cache_block_size?);
        (blocks > 0 && size > 0).then(|| blocks * size)
    }

    /// Whether the figures were scraped no longer than `threshold` before `now`.
    pub fn is_fresh(&self, now: Instant, threshold: Duration) -> bool {
        self.age(now).is_some_and(|age| age <= threshold)
    }
}

/// One endpoint and its attributes, as one snapshot holds it.
///
/// The model server's figures ([`METRICS`]), which every load scorer reads for every
/// candidate, are kept in a field of their own; every other attribute in a small list. Both
/// are written only through [`EndpointState::set_raw`] (the store and its hooks).
#[derive(Debug, Clone)]
pub struct EndpointState {
    /// Identity and address.
    pub endpoint: Arc<Endpoint>,
    metrics: Arc<Metrics>,
    attrs: Attributes,
    health: Arc<EndpointHealth>,
}

/// The figures of every endpoint not scraped yet, shared.
static UNSCRAPED_ARC: std::sync::LazyLock<Arc<Metrics>> =
    std::sync::LazyLock::new(|| Arc::new(UNSCRAPED.clone()));

impl EndpointState {
    /// An endpoint with no attributes yet.
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        Self {
            endpoint,
            metrics: UNSCRAPED_ARC.clone(),
            attrs: Attributes::default(),
            health: Arc::default(),
        }
    }

    /// The endpoint's passive health, shared by every snapshot that holds the endpoint.
    pub fn health(&self) -> &Arc<EndpointHealth> {
        &self.health
    }

    /// Carries `previous`'s health over (the same endpoint, relabelled).
    pub(crate) fn keep_health(&mut self, previous: &EndpointState) {
        self.health = previous.health.clone();
    }

    /// An endpoint with `metrics` (tests and benches).
    pub fn with_metrics(endpoint: Arc<Endpoint>, metrics: Metrics) -> Self {
        let mut s = Self::new(endpoint);
        s.set(METRICS, Arc::new(metrics));
        s
    }

    /// The endpoint's load figures; all zero with `updated_at: None` before the first scrape.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// An attribute.
    pub fn get<T: std::any::Any>(&self, key: DataKey<T>) -> Option<&T> {
        if key.id() == METRICS.id() {
            // Present once a writer has set it.
            if Arc::ptr_eq(&self.metrics, &UNSCRAPED_ARC) {
                return None;
            }
            let m: &Metrics = &self.metrics;
            return (m as &dyn std::any::Any).downcast_ref::<T>();
        }
        self.attrs.get(key)
    }

    /// Sets an attribute.
    pub fn set<T: std::any::Any + Send + Sync>(&mut self, key: DataKey<T>, value: Arc<T>) {
        self.set_raw(key.id(), value);
    }

    /// Sets an attribute from an untyped value. A [`METRICS`] value that is not [`Metrics`]
    /// is dropped (no writer is configured to send one).
    pub fn set_raw(&mut self, id: KeyId, value: Value) {
        if id == METRICS.id() {
            if let Ok(m) = value.downcast::<Metrics>() {
                self.metrics = m;
            }
            return;
        }
        self.attrs.set_raw(id, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostport_brackets_ipv6() {
        assert_eq!(format_hostport("10.0.0.1:8000".parse().unwrap()), "10.0.0.1:8000");
        assert_eq!(
            format_hostport("[fd00::1]:8000".parse().unwrap()),
            "[fd00::1]:8000"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn freshness_follows_tokio_time() {
        let m = Metrics {
            updated_at: Some(Instant::now()),
            ..Metrics::default()
        };
        assert!(m.is_fresh(Instant::now(), Duration::from_millis(200)));
        tokio::time::advance(Duration::from_millis(201)).await;
        assert!(!m.is_fresh(Instant::now(), Duration::from_millis(200)));
        assert!(!Metrics::default().is_fresh(Instant::now(), Duration::from_secs(1)));
    }
}
