//! The parameters of `precise-prefix-cache-producer` (and the deprecated
//! `precise-prefix-cache-scorer`), as llm-d-router v0.10 names them, decoded strictly, with
//! its defaults. Every accepted field acts; the ones that cannot act here are refused with
//! the reason (see [`PreciseParams::resolve`]).

use std::time::Duration;

use serde::Deserialize;

use super::index::{DEFAULT_MAX_KEYS, DEFAULT_PODS_PER_KEY};
use super::keys::DEFAULT_BLOCK_TOKENS;
use crate::config::cli::go_duration;

/// Bytes one key costs in the index with its engine block (`docs/benchmarks.md`, the
/// `index_memory` bench): how `costAwareMemoryConfig.size` becomes a key bound.
pub const BYTES_PER_KEY: u64 = 242;

/// The producer's parameters as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreciseParams {
    /// Block size and seed.
    pub token_processor_config: Option<TokenProcessorConfig>,
    /// The index.
    pub indexer_config: Option<IndexerConfig>,
    /// Where events come from.
    pub kv_events_config: Option<KvEventsConfig>,
    /// Record picks at once, before the engine's events arrive.
    pub speculative_indexing: Option<bool>,
    /// How long a speculative entry lives once its request has ended (Go duration, `2s`; v0.10
    /// counts from the pick, see the producer).
    #[serde(rename = "speculativeTTL")]
    pub speculative_ttl: Option<String>,
}

/// `tokenProcessorConfig`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenProcessorConfig {
    /// Tokens per block (deprecated spelling).
    pub block_size: Option<i64>,
    /// Tokens per block (wins).
    pub block_size_tokens: Option<i64>,
    /// The chain's seed.
    pub hash_seed: Option<String>,
}

/// `indexerConfig`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexerConfig {
    /// The block index.
    pub kv_block_index_config: Option<KvBlockIndexConfig>,
    /// Tier weights.
    pub kv_cache_backend_configs: Option<Vec<BackendConfig>>,
    /// The deprecated tokenizer pool (refused: configure a `token-producer`).
    pub tokenizers_pool_config: Option<serde_yaml::Value>,
}

/// `indexerConfig.kvBlockIndexConfig`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KvBlockIndexConfig {
    /// The in-memory index's bounds.
    pub in_memory_config: Option<InMemoryConfig>,
    /// A byte budget instead of a key count.
    pub cost_aware_memory_config: Option<CostAwareConfig>,
    /// Redis (refused).
    pub redis_config: Option<serde_yaml::Value>,
    /// Count index operations in the metrics.
    pub enable_metrics: Option<bool>,
    /// Log the index's counters this often (nanoseconds, as v0.10 decodes it). Acts with or
    /// without `enableMetrics` (v0.10's own samples set it beside `enableMetrics: false`).
    pub metrics_logging_interval: Option<i64>,
}

/// `inMemoryConfig`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InMemoryConfig {
    /// Keys held at most.
    pub size: Option<i64>,
    /// Endpoints per key at most.
    pub pod_cache_size: Option<i64>,
}

/// `costAwareMemoryConfig`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CostAwareConfig {
    /// A size such as `2GiB`, `500MB`, `1048576`.
    pub size: Option<String>,
}

/// One tier weight.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendConfig {
    /// The tier (`gpu`, `cpu`, ...; the event's `medium`, lowercased).
    pub name: String,
    /// Its weight per block.
    pub weight: f64,
}

/// `kvEventsConfig`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KvEventsConfig {
    /// Central mode: the address the EPP binds for engines to connect to.
    pub zmq_endpoint: Option<String>,
    /// The subscription prefix.
    pub topic_filter: Option<String>,
    /// Ingestion workers.
    pub concurrency: Option<i64>,
    /// `vllm` (or `sglang`, refused).
    pub engine_type: Option<String>,
    /// Subscribe to each endpoint's publisher (needs the endpoint-notification-source).
    pub discover_pods: Option<bool>,
    /// Per-endpoint ports.
    pub pod_discovery_config: Option<PodDiscoveryConfig>,
}

/// `kvEventsConfig.podDiscoveryConfig`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodDiscoveryConfig {
    /// The publisher's port (plus the endpoint's rank).
    pub socket_port: Option<i64>,
    /// The replay socket's port (plus the rank); 0 or absent: no replay.
    pub replay_socket_port: Option<i64>,
    /// Only endpoints whose labels match (`key=value,...`).
    pub pod_label_selector: Option<String>,
    /// Refused: the pool has one namespace.
    pub pod_namespace: Option<String>,
}

/// The parameters resolved, defaults applied, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Tokens per block.
    pub block_tokens: usize,
    /// The chain's seed.
    pub hash_seed: String,
    /// Keys held at most.
    pub max_keys: usize,
    /// Endpoints per key at most.
    pub pods_per_key: usize,
    /// Tier weights.
    pub tiers: Vec<(String, f64)>,
    /// Count index operations in the metrics.
    pub enable_metrics: bool,
    /// Log the counters this often.
    pub log_interval: Option<Duration>,
    /// Central mode's bind address.
    pub central: Option<String>,
    /// The subscription prefix.
    pub topic_filter: String,
    /// Ingestion workers.
    pub workers: usize,
    /// Per-endpoint subscriptions wanted (acts when wired to an endpoint-notification-source).
    pub discover_pods: bool,
    /// The publisher's base port.
    pub socket_port: u16,
    /// The replay socket's base port.
    pub replay_port: Option<u16>,
    /// Label selector (`key=value` pairs, all must match).
    pub selector: Vec<(String, String)>,
    /// Whether `podDiscoveryConfig` was written (it acts only when endpoints are followed).
    pub pod_discovery_written: bool,
    /// Speculative indexing.
    pub speculative: bool,
    /// Its TTL.
    pub speculative_ttl: Duration,
}

/// Parses `2GiB`, `500MB`, `64Ki`, `1048576` into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let unit = unit.trim().to_ascii_lowercase();
    let mult: f64 = match unit.trim_end_matches('b') {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024.0 * 1024.0,
        "gi" => 1024.0 * 1024.0 * 1024.0,
        "ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = num * mult;
    (bytes.is_finite() && bytes >= 1.0).then_some(bytes as u64)
}

fn positive(name: &str, v: Option<i64>, default: usize) -> Result<usize, String> {
    match v {
        None | Some(0) => Ok(default),
        Some(v) if v > 0 => usize::try_from(v).map_err(|_| format!("{name} is too large")),
        Some(v) => Err(format!("{name} must be > 0 (got {v})")),
    }
}

fn port(name: &str, v: i64) -> Result<u16, String> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{name} must be a port number (got {v})"))
}

impl PreciseParams {
    /// Applies llm-d-router v0.10's defaults and refuses what cannot act here.
    pub fn resolve(&self) -> Result<Resolved, String> {
        let tp = self.token_processor_config.clone().unwrap_or_default();
        let block = match (tp.block_size_tokens, tp.block_size) {
            (Some(t), _) if t != 0 => t,
            (_, Some(b)) if b != 0 => b,
            _ => DEFAULT_BLOCK_TOKENS as i64,
        };
        if block <= 0 {
            return Err(format!(
                "tokenProcessorConfig: blockSizeTokens must be greater than 0, got {block}"
            ));
        }
        let ix = self.indexer_config.clone().unwrap_or_default();
        if ix.tokenizers_pool_config.is_some() {
            return Err("indexerConfig.tokenizersPoolConfig is not supported; configure a token-producer plugin instead".into());
        }
        let kb = ix.kv_block_index_config.clone().unwrap_or_default();
        if kb.redis_config.is_some() {
            return Err("indexerConfig.kvBlockIndexConfig.redisConfig: this EPP keeps its index in memory (each replica builds the same index from the engines' events); remove redisConfig".into());
        }
        let mem = kb.in_memory_config.clone().unwrap_or_default();
        let mut max_keys = positive("inMemoryConfig.size", mem.size, DEFAULT_MAX_KEYS)?;
        let pods_per_key = positive(
            "inMemoryConfig.podCacheSize",
            mem.pod_cache_size,
            DEFAULT_PODS_PER_KEY,
        )?;
        if let Some(c) = &kb.cost_aware_memory_config {
            let size = c.size.as_deref().unwrap_or("2GiB");
            let bytes = parse_size(size)
                .ok_or_else(|| format!("costAwareMemoryConfig.size: {size:?} is not a size (e.g. 2GiB)"))?;
            if mem.size.is_some() {
                return Err("costAwareMemoryConfig wins over inMemoryConfig.size; set one".into());
            }
            max_keys = usize::try_from(bytes / BYTES_PER_KEY)
                .unwrap_or(usize::MAX)
                .max(1);
        }
        let tiers = match &ix.kv_cache_backend_configs {
            Some(list) => {
                for b in list {
                    if !(b.weight.is_finite() && b.weight >= 0.0) {
                        return Err(format!(
                            "kvCacheBackendConfigs: weight of {:?} must be >= 0",
                            b.name
                        ));
                    }
                }
                list.iter()
                    .map(|b| (b.name.to_ascii_lowercase(), b.weight))
                    .collect()
            }
            None => vec![("gpu".into(), 1.0), ("cpu".into(), 0.8)],
        };
        let enable_metrics = kb.enable_metrics.unwrap_or(false);
        let log_interval = match kb.metrics_logging_interval {
            None | Some(0) => None,
            Some(ns) if ns > 0 => Some(Duration::from_nanos(ns as u64)),
            Some(ns) => {
                return Err(format!(
                    "metricsLoggingInterval must be >= 0 nanoseconds (got {ns})"
                ));
            }
        };
        let ev = self.kv_events_config.clone().unwrap_or_default();
        match ev.engine_type.as_deref() {
            None | Some("") | Some("vllm") => {}
            Some("sglang") => {
                return Err(
                    "kvEventsConfig.engineType sglang: SGLang's event format is not supported yet; use vllm"
                        .into(),
                );
            }
            Some(other) => {
                return Err(format!(
                    "kvEventsConfig.engineType {other:?}: known types are vllm (and sglang)"
                ));
            }
        }
        let workers = match ev.concurrency {
            None => 4,
            Some(n) if n > 0 => usize::try_from(n).unwrap_or(4).min(256),
            Some(n) => return Err(format!("kvEventsConfig.concurrency must be > 0 (got {n})")),
        };
        let central = ev.zmq_endpoint.clone().filter(|e| !e.is_empty());
        if let Some(c) = &central
            && !c.starts_with("tcp://")
            && !c.starts_with("ipc://")
        {
            return Err(format!(
                "kvEventsConfig.zmqEndpoint {c:?} must be tcp://host:port or ipc://path"
            ));
        }
        let pd = ev.pod_discovery_config.clone().unwrap_or_default();
        if pd.pod_namespace.is_some() {
            return Err("kvEventsConfig.podDiscoveryConfig.podNamespace: the pool's endpoints are the only ones followed; remove it".into());
        }
        let socket_port = port("podDiscoveryConfig.socketPort", pd.socket_port.unwrap_or(5557))?;
        let replay_port = match pd.replay_socket_port {
            None | Some(0) => None,
            Some(p) if p < 0 => None,
            Some(p) => Some(port("podDiscoveryConfig.replaySocketPort", p)?),
        };
        let selector = match &pd.pod_label_selector {
            None => Vec::new(),
            Some(s) => s
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| {
                    p.split_once('=')
                        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_start_matches('=').to_owned()))
                        .ok_or_else(|| format!("podLabelSelector {s:?}: only key=value terms are supported"))
                })
                .collect::<Result<_, _>>()?,
        };
        let speculative = self.speculative_indexing.unwrap_or(false);
        let speculative_ttl = match self.speculative_ttl.as_deref() {
            None | Some("") => Duration::from_secs(2),
            Some(s) => {
                if !speculative {
                    return Err("speculativeTTL only acts with speculativeIndexing: true".into());
                }
                let d = go_duration(s).map_err(|e| format!("speculativeTTL: {e}"))?;
                if d.is_zero() { Duration::from_secs(2) } else { d }
            }
        };
        Ok(Resolved {
            block_tokens: block as usize,
            hash_seed: tp.hash_seed.unwrap_or_default(),
            max_keys,
            pods_per_key,
            tiers,
            enable_metrics,
            log_interval,
            central,
            topic_filter: ev.topic_filter.unwrap_or_else(|| "kv@".into()),
            workers,
            discover_pods: ev.discover_pods.unwrap_or(true),
            socket_port,
            replay_port,
            selector,
            pod_discovery_written: ev.pod_discovery_config.is_some(),
            speculative,
            speculative_ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(y: &str) -> Result<Resolved, String> {
        let p: PreciseParams = serde_yaml::from_str(y).map_err(|e| e.to_string())?;
        p.resolve()
    }

    #[test]
    fn defaults_are_v0_10s() {
        let r = resolve("{}").unwrap();
        assert_eq!(r.block_tokens, 16);
        assert_eq!((r.max_keys, r.pods_per_key), (100_000_000, 10));
        assert_eq!(r.tiers, vec![("gpu".into(), 1.0), ("cpu".into(), 0.8)]);
        assert_eq!(
            (r.topic_filter.as_str(), r.workers, r.discover_pods),
            ("kv@", 4, true)
        );
        assert_eq!((r.socket_port, r.replay_port), (5557, None));
        assert_eq!(
            (r.speculative, r.speculative_ttl),
            (false, Duration::from_secs(2))
        );
        assert!(r.central.is_none());
    }

    #[test]
    fn the_reference_examples_resolve() {
        let r = resolve(
            "tokenProcessorConfig: {blockSize: 64}\nindexerConfig: {kvBlockIndexConfig: {enableMetrics: true}}",
        )
        .unwrap();
        assert_eq!(r.block_tokens, 64);
        assert!(r.enable_metrics);
        let r = resolve("tokenProcessorConfig: {blockSize: 16, hashSeed: \"42\"}\nkvEventsConfig: {zmqEndpoint: tcp://0.0.0.0:5557}\nindexerConfig: {kvBlockIndexConfig: {enableMetrics: false}}").unwrap();
        assert_eq!(r.central.as_deref(), Some("tcp://0.0.0.0:5557"));
        assert_eq!(r.hash_seed, "42");
        let r = resolve("tokenProcessorConfig: {blockSizeTokens: 16}\nspeculativeIndexing: true\nkvEventsConfig: {topicFilter: \"kv@\", concurrency: 32, discoverPods: true, podDiscoveryConfig: {socketPort: 5557, replaySocketPort: 5558}}").unwrap();
        assert_eq!((r.workers, r.replay_port, r.speculative), (32, Some(5558), true));
        let r = resolve("indexerConfig: {kvBlockIndexConfig: {costAwareMemoryConfig: {size: 2GiB}, enableMetrics: true, metricsLoggingInterval: 6000000000}}").unwrap();
        assert_eq!(r.max_keys, (2u64 << 30) as usize / BYTES_PER_KEY as usize);
        assert_eq!(r.log_interval, Some(Duration::from_secs(6)));
        // v0.10's own sample logs without enabling the counters.
        let r = resolve(
            "indexerConfig: {kvBlockIndexConfig: {enableMetrics: false, metricsLoggingInterval: 6000000000}}",
        )
        .unwrap();
        assert_eq!(
            (r.enable_metrics, r.log_interval),
            (false, Some(Duration::from_secs(6)))
        );
    }

    #[test]
    fn what_cannot_act_is_refused() {
        for (y, word) in [
            (
                "indexerConfig: {kvBlockIndexConfig: {redisConfig: {address: redis://x}}}",
                "redisConfig",
            ),
            (
                "indexerConfig: {tokenizersPoolConfig: {modelName: m}}",
                "token-producer",
            ),
            (
                "indexerConfig: {kvBlockIndexConfig: {valkeyConfig: {}}}",
                "valkeyConfig",
            ),
            ("kvEventsConfig: {engineType: sglang}", "sglang"),
            ("kvEventsConfig: {concurrency: -1}", "concurrency"),
            (
                "kvEventsConfig: {podDiscoveryConfig: {podNamespace: x}}",
                "podNamespace",
            ),
            ("kvEventsConfig: {zmqEndpoint: \"localhost:5557\"}", "tcp://"),
            ("speculativeTTL: 5s", "speculativeIndexing"),
            ("tokenProcessorConfig: {blockSizeTokens: -3}", "blockSizeTokens"),
            (
                "indexerConfig: {kvBlockIndexConfig: {metricsLoggingInterval: 1m, enableMetrics: true}}",
                "metricsLoggingInterval",
            ),
            (
                "kvEventsConfig: {podDiscoveryConfig: {podLabelSelector: \"app in (a,b)\"}}",
                "key=value",
            ),
            ("tokenProcessorConfig: {blocksize: 3}", "blocksize"),
        ] {
            let e = resolve(y).unwrap_err();
            assert!(e.contains(word), "{y}: {e}");
        }
        assert_eq!(parse_size("500MB"), Some(500_000_000));
        assert_eq!(parse_size("1Ki"), Some(1024));
        assert_eq!(parse_size("lots"), None);
    }
}
