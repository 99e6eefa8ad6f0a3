//! Endpoint identity and the per-endpoint load figures the scheduler scores on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::{Duration, Instant};

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

/// The load figures of one endpoint as last scraped.
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
    /// The endpoint's sent-token total (see [`super::Dispatched`]) when these figures were
    /// published; set by the store.
    pub sent_tokens_at_scrape: u64,
    /// The endpoint's finished-token total when these figures were published.
    pub done_tokens_at_scrape: u64,
}

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
