//! `core-metrics-extractor`: reads the model-server protocol's figures (queue, running, KV,
//! LoRA, cache geometry) from a `metrics-data-source` page into the endpoint's [`Metrics`]
//! (GIE v1.5 / llm-d-router v0.10).
//!
//! The engine of an endpoint comes from its pod label `engineLabelKey` (default
//! `llm-d.ai/engine-type`, as llm-d-router v0.10; GIE v1.5's
//! `inference.networking.k8s.io/engine-type` is read when that label is absent), else
//! `defaultEngine` (the `--engine` flag, `vllm`). Built-in engines: `vllm`, `sglang`,
//! `trtllm-serve`, `triton-tensorrt-llm`, `triton`. The reference's metric-name flags
//! (`--total-queued-requests-metric`, ...) change the built-in mapping of the default engine.
//!
//! `engineConfigs` entries name an engine and its metric specs (`queuedRequestsSpec`,
//! `runningRequestsSpec`, `kvUsageSpec`, `loraSpec`, `cacheInfoSpec` with
//! `cacheBlockSizeLabelName` / `cacheNumBlocksLabelName`, or `cacheBlockSizeSpec` /
//! `cacheNumBlocksSpec`); an entry with a built-in name replaces that engine's whole mapping,
//! and an absent spec is not scraped. `customMetrics` is refused: no plugin here reads
//! attributes by name.
//!
//! Every value is range-checked and several series of one family are combined by the rules of
//! [`super::figures`]; a refused value is counted in
//! `inference_extension_model_server_refused_samples_total{family,reason}` and logged once per
//! endpoint and family.
//!
//! A page without one configured series is not an update (the figures age, as v1.5 and
//! v0.10); with the `enableLegacyMetrics` feature gate any successful scrape refreshes them,
//! as GIE v1.0 did.

use std::any::{Any, TypeId};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::time::Instant;

use super::prom::{CacheInfo, ENGINES, EngineMetrics, MetricSpec, Refused, SpecError};
use crate::datalayer::{Endpoint, METRICS, Metrics, Writes};
use crate::framework::data::{Attributes, KeyId, Value};
use crate::framework::datalayer::{ExtractError, Extractor};
use crate::framework::plugin::{CounterFamily, PluginMetrics};

/// The refused-sample counter.
pub const REFUSED_FAMILY: &str = "inference_extension_model_server_refused_samples";

/// How many (endpoint, family) pairs are remembered as already logged; the set is cleared when
/// full, so churn cannot grow it and a lasting fault is logged again now and then.
const WARNED_CAP: usize = 4096;

/// llm-d-router v0.10's engine label.
pub const ENGINE_LABEL: &str = "llm-d.ai/engine-type";
/// GIE's engine label, read when [`ENGINE_LABEL`] is absent.
pub const GIE_ENGINE_LABEL: &str = "inference.networking.k8s.io/engine-type";

/// The extractor's settings before its parameters apply (from the flags).
#[derive(Debug, Clone, Default)]
pub struct ExtractorDefaults {
    /// `--engine`.
    pub engine: String,
    /// The metric-name flags, as given: (flag, spec).
    pub metric_flags: Vec<(&'static str, String)>,
    /// `enableLegacyMetrics`: any successful scrape refreshes the figures.
    pub legacy_freshness: bool,
}

/// One `engineConfigs` entry.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EngineConfig {
    /// Engine name (the label value).
    pub name: String,
    /// Waiting requests.
    pub queued_requests_spec: Option<String>,
    /// Running requests.
    pub running_requests_spec: Option<String>,
    /// KV-cache utilisation.
    pub kv_usage_spec: Option<String>,
    /// LoRA info.
    pub lora_spec: Option<String>,
    /// Cache config info series (geometry in labels).
    pub cache_info_spec: Option<String>,
    /// Label with tokens per block (default `block_size`).
    pub cache_block_size_label_name: Option<String>,
    /// Label with the block count (default `num_gpu_blocks`).
    pub cache_num_blocks_label_name: Option<String>,
    /// Tokens per block as a gauge.
    pub cache_block_size_spec: Option<String>,
    /// Block count as a gauge.
    pub cache_num_blocks_spec: Option<String>,
    /// Refused (see the module docs).
    pub custom_metrics: Option<serde_yaml::Value>,
}

/// Parameters as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtractorParams {
    /// Pod label naming the engine.
    pub engine_label_key: Option<String>,
    /// Engine of endpoints without the label.
    pub default_engine: Option<String>,
    /// Engine mappings.
    #[serde(default)]
    pub engine_configs: Vec<EngineConfig>,
}

/// Why the parameters are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractorParamError {
    /// A spec string that does not parse.
    #[error("{context}: {source}")]
    Spec {
        /// Flag or `engineConfigs[name].field`.
        context: String,
        /// Cause.
        #[source]
        source: SpecError,
    },
    /// An entry without a name.
    #[error("engineConfigs[{0}]: name must not be empty")]
    EmptyName(usize),
    /// Two entries with one name.
    #[error("engineConfigs: engine '{0}' is configured twice")]
    Duplicate(String),
    /// The default engine has no mapping.
    #[error("defaultEngine '{0}' is neither a built-in engine ({builtin}) nor in engineConfigs", builtin = ENGINES.join(", "))]
    UnknownDefault(String),
    /// `customMetrics` given.
    #[error(
        "engineConfigs[{0}].customMetrics is not supported: no plugin of this EPP reads endpoint attributes by name; remove it"
    )]
    CustomMetrics(String),
    /// Cache geometry given both ways.
    #[error(
        "engineConfigs[{0}]: give cacheInfoSpec (labels) or cacheBlockSizeSpec/cacheNumBlocksSpec (gauges), not both"
    )]
    CacheBothWays(String),
}

fn parse(
    context: impl Fn() -> String,
    spec: Option<&str>,
) -> Result<Option<MetricSpec>, ExtractorParamError> {
    match spec {
        None => Ok(None),
        Some(s) => MetricSpec::parse(s).map_err(|source| ExtractorParamError::Spec {
            context: context(),
            source,
        }),
    }
}

fn mapping(c: &EngineConfig) -> Result<EngineMetrics, ExtractorParamError> {
    let ctx = |field: &'static str| {
        let name = c.name.clone();
        move || format!("engineConfigs[{name}].{field}")
    };
    if c.custom_metrics.is_some() {
        return Err(ExtractorParamError::CustomMetrics(c.name.clone()));
    }
    let labels = parse(ctx("cacheInfoSpec"), c.cache_info_spec.as_deref())?;
    let block_size = parse(ctx("cacheBlockSizeSpec"), c.cache_block_size_spec.as_deref())?;
    let num_blocks = parse(ctx("cacheNumBlocksSpec"), c.cache_num_blocks_spec.as_deref())?;
    let cache = match (labels, block_size.is_some() || num_blocks.is_some()) {
        (Some(_), true) => return Err(ExtractorParamError::CacheBothWays(c.name.clone())),
        (Some(spec), false) => Some(CacheInfo::Labels {
            spec,
            block_size_label: c
                .cache_block_size_label_name
                .clone()
                .unwrap_or_else(|| "block_size".into()),
            num_blocks_label: c
                .cache_num_blocks_label_name
                .clone()
                .unwrap_or_else(|| "num_gpu_blocks".into()),
        }),
        (None, true) => Some(CacheInfo::Gauges {
            block_size,
            num_blocks,
        }),
        (None, false) => None,
    };
    Ok(EngineMetrics {
        engine: c.name.clone(),
        queued: parse(ctx("queuedRequestsSpec"), c.queued_requests_spec.as_deref())?,
        running: parse(ctx("runningRequestsSpec"), c.running_requests_spec.as_deref())?,
        kv_usage: parse(ctx("kvUsageSpec"), c.kv_usage_spec.as_deref())?
            .into_iter()
            .collect(),
        lora: parse(ctx("loraSpec"), c.lora_spec.as_deref())?,
        cache,
    })
}

/// `engine`'s built-in mapping with the reference's metric-name flags applied.
fn with_flags(
    mut m: EngineMetrics,
    flags: &[(&'static str, String)],
) -> Result<EngineMetrics, ExtractorParamError> {
    for (flag, value) in flags {
        let spec = parse(|| format!("--{flag}"), Some(value))?;
        match *flag {
            "total-queued-requests-metric" => m.queued = spec,
            "total-running-requests-metric" => m.running = spec,
            "kv-cache-usage-percentage-metric" => m.kv_usage = spec.into_iter().collect(),
            "lora-info-metric" => m.lora = spec,
            "cache-info-metric" => {
                m.cache = spec.map(|spec| match m.cache.take() {
                    Some(CacheInfo::Labels {
                        block_size_label,
                        num_blocks_label,
                        ..
                    }) => CacheInfo::Labels {
                        spec,
                        block_size_label,
                        num_blocks_label,
                    },
                    _ => CacheInfo::Labels {
                        spec,
                        block_size_label: "block_size".into(),
                        num_blocks_label: "num_gpu_blocks".into(),
                    },
                });
            }
            _ => {}
        }
    }
    Ok(m)
}

/// See the module docs.
pub struct CoreMetricsExtractor {
    label: String,
    engines: HashMap<String, Arc<EngineMetrics>>,
    default: Arc<EngineMetrics>,
    legacy_freshness: bool,
    refused: CounterFamily,
    warned: Mutex<HashSet<(SocketAddr, String)>>,
}

impl std::fmt::Debug for CoreMetricsExtractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreMetricsExtractor")
            .field("label", &self.label)
            .field("default", &self.default.engine)
            .finish_non_exhaustive()
    }
}

impl CoreMetricsExtractor {
    /// An extractor from `defaults` overridden by `params`, counting refused samples in
    /// `metrics`.
    pub fn new(
        defaults: &ExtractorDefaults,
        params: &ExtractorParams,
        metrics: &PluginMetrics,
    ) -> Result<Self, ExtractorParamError> {
        let default_name = params
            .default_engine
            .clone()
            .unwrap_or_else(|| defaults.engine.clone());
        let mut engines: HashMap<String, Arc<EngineMetrics>> = HashMap::new();
        for name in ENGINES {
            if let Some(m) = EngineMetrics::builtin(name) {
                let m = if *name == default_name {
                    with_flags(m, &defaults.metric_flags)?
                } else {
                    m
                };
                engines.insert((*name).to_owned(), Arc::new(m));
            }
        }
        let mut seen: Vec<&str> = Vec::new();
        for (i, c) in params.engine_configs.iter().enumerate() {
            if c.name.is_empty() {
                return Err(ExtractorParamError::EmptyName(i));
            }
            if seen.contains(&c.name.as_str()) {
                return Err(ExtractorParamError::Duplicate(c.name.clone()));
            }
            seen.push(&c.name);
            engines.insert(c.name.clone(), Arc::new(mapping(c)?));
        }
        let default = engines
            .get(&default_name)
            .cloned()
            .ok_or(ExtractorParamError::UnknownDefault(default_name))?;
        Ok(Self {
            label: params
                .engine_label_key
                .clone()
                .unwrap_or_else(|| ENGINE_LABEL.to_owned()),
            engines,
            default,
            legacy_freshness: defaults.legacy_freshness,
            refused: metrics.counter(
                REFUSED_FAMILY,
                "[ALPHA] Model-server metric samples not taken because their value is out of range (NaN, infinite, negative, a utilisation above 1, a size beyond its bound)",
            ),
            warned: Mutex::new(HashSet::new()),
        })
    }

    fn count_refused(&self, endpoint: &Endpoint, refused: Vec<Refused>) {
        for r in refused {
            self.refused
                .get_or_create(&vec![
                    ("family", r.family.clone()),
                    ("reason", r.reason.as_str().to_owned()),
                ])
                .inc();
            let mut warned = self.warned.lock();
            if warned.len() >= WARNED_CAP {
                warned.clear();
            }
            if warned.insert((endpoint.address, r.family.clone())) {
                tracing::warn!(
                    endpoint = %endpoint.address,
                    family = %r.family,
                    value = r.value,
                    reason = r.reason.as_str(),
                    "model server reported an out-of-range value; it is not taken (logged once per endpoint and family)"
                );
            }
        }
    }

    /// The mapping `endpoint` is read with.
    pub fn engine_for(&self, endpoint: &Endpoint) -> &EngineMetrics {
        let label = endpoint.labels.get(&self.label).or_else(|| {
            (self.label == ENGINE_LABEL)
                .then(|| endpoint.labels.get(GIE_ENGINE_LABEL))
                .flatten()
        });
        label.and_then(|e| self.engines.get(e)).unwrap_or(&self.default)
    }
}

impl Extractor for CoreMetricsExtractor {
    fn input(&self) -> TypeId {
        TypeId::of::<Bytes>()
    }

    fn writes(&self) -> Vec<KeyId> {
        vec![METRICS.id()]
    }

    fn hints(&self, endpoint: &Endpoint) -> Vec<String> {
        self.engine_for(endpoint).sample_names()
    }

    fn extract(
        &self,
        endpoint: &Endpoint,
        payload: &dyn Any,
        previous: &Attributes,
        now: Instant,
    ) -> Result<Writes, ExtractError> {
        let page = payload
            .downcast_ref::<Bytes>()
            .ok_or(ExtractError::WrongInput("a metrics page"))?;
        let page = std::str::from_utf8(page).map_err(|_| ExtractError::NotUtf8)?;
        let engine = self.engine_for(endpoint);
        let before = previous.get(METRICS);
        let empty = Metrics::default();
        let mut refused = Vec::new();
        let extracted = engine.extract(page, before.unwrap_or(&empty), now, &mut refused);
        if !refused.is_empty() {
            self.count_refused(endpoint, refused);
        }
        let metrics = match extracted {
            Some(m) => m,
            None if self.legacy_freshness => Metrics {
                updated_at: Some(now),
                ..before.cloned().unwrap_or_default()
            },
            None => return Err(ExtractError::NothingFound(engine.engine.clone())),
        };
        let value: Value = Arc::new(metrics);
        Ok(vec![(METRICS.id(), value)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> ExtractorDefaults {
        ExtractorDefaults {
            engine: "vllm".into(),
            ..ExtractorDefaults::default()
        }
    }

    fn extractor(yaml: &str) -> Result<CoreMetricsExtractor, ExtractorParamError> {
        CoreMetricsExtractor::new(
            &defaults(),
            &serde_yaml::from_str(yaml).unwrap(),
            &PluginMetrics::default(),
        )
    }

    fn metrics_of(x: &CoreMetricsExtractor, ep: &Endpoint, page: &str) -> Result<Metrics, ExtractError> {
        let writes = x.extract(
            ep,
            &Bytes::from(page.to_owned()),
            &Attributes::default(),
            Instant::now(),
        )?;
        Ok(writes[0].1.downcast_ref::<Metrics>().unwrap().clone())
    }

    const MINE: &str = "myengine:num_requests_waiting 6\nmyengine:running 2\nmyengine:kv 0.5\n";

    #[test]
    fn a_configured_engine_is_read_as_default_or_by_label() {
        let x = extractor(
            "defaultEngine: myengine\nengineConfigs:\n- name: myengine\n  queuedRequestsSpec: myengine:num_requests_waiting\n  runningRequestsSpec: myengine:running\n  kvUsageSpec: myengine:kv\n",
        )
        .unwrap();
        let ep = Endpoint::from_address("10.0.0.1:8000".parse().unwrap());
        let m = metrics_of(&x, &ep, MINE).unwrap();
        assert_eq!((m.waiting_queue, m.running, m.kv_cache_usage), (6, 2, 0.5));
        assert_eq!(
            x.hints(&ep),
            [
                "myengine:kv",
                "myengine:kv_total",
                "myengine:num_requests_waiting",
                "myengine:num_requests_waiting_total",
                "myengine:running",
                "myengine:running_total"
            ]
        );
        // A vLLM-labelled endpoint still reads vLLM names (either label key).
        for key in [ENGINE_LABEL, GIE_ENGINE_LABEL] {
            let vllm = ep.clone().with_label(key, "vllm");
            assert!(metrics_of(&x, &vllm, MINE).is_err());
            let m = metrics_of(&x, &vllm, "vllm:num_requests_waiting 3\n").unwrap();
            assert_eq!(m.waiting_queue, 3);
        }
        // The built-in default does not know the custom names.
        let plain = extractor("{}").unwrap();
        assert_eq!(
            metrics_of(&plain, &ep, MINE).unwrap_err(),
            ExtractError::NothingFound("vllm".into())
        );
    }

    #[test]
    fn a_custom_label_key_and_replaced_builtins() {
        let x = extractor(
            "engineLabelKey: serving/engine\nengineConfigs:\n- name: sglang\n  queuedRequestsSpec: q\n",
        )
        .unwrap();
        let ep =
            Endpoint::from_address("10.0.0.1:8000".parse().unwrap()).with_label("serving/engine", "sglang");
        assert_eq!(metrics_of(&x, &ep, "q 4\n").unwrap().waiting_queue, 4);
        // The replaced mapping reads nothing else.
        assert!(metrics_of(&x, &ep, "sglang:num_queue_reqs 4\n").is_err());
        // Only the configured label key counts.
        let other =
            Endpoint::from_address("10.0.0.2:8000".parse().unwrap()).with_label(GIE_ENGINE_LABEL, "sglang");
        assert_eq!(x.engine_for(&other).engine, "vllm");
    }

    #[test]
    fn refused_samples_are_counted_by_family_and_reason() {
        let metrics = PluginMetrics::default();
        let x = CoreMetricsExtractor::new(&defaults(), &ExtractorParams::default(), &metrics).unwrap();
        let ep = Endpoint::from_address("10.0.0.1:8000".parse().unwrap());
        let page = Bytes::from_static(b"vllm:kv_cache_usage_perc -0.3875\nvllm:num_requests_waiting 1\n");
        for _ in 0..3 {
            let w = x
                .extract(&ep, &page, &Attributes::default(), Instant::now())
                .unwrap();
            let m = w[0].1.downcast_ref::<Metrics>().unwrap();
            assert_eq!((m.kv_cache_usage, m.waiting_queue), (1.0, 1));
        }
        let counter = metrics.counter(REFUSED_FAMILY, "");
        let labels = vec![
            ("family", "vllm:kv_cache_usage_perc".to_owned()),
            ("reason", "negative".to_owned()),
        ];
        assert_eq!(counter.get_or_create(&labels).get(), 3);
        assert_eq!(
            x.warned.lock().len(),
            1,
            "logged once for the endpoint and family"
        );
    }

    #[test]
    fn mistakes_are_named() {
        for (yaml, want) in [
            ("defaultEngine: nope", "defaultEngine 'nope'"),
            ("engineConfigs:\n- name: ''\n", "engineConfigs[0]: name"),
            ("engineConfigs:\n- name: a\n- name: a\n", "configured twice"),
            (
                "engineConfigs:\n- name: a\n  kvUsageSpec: 'x{y'\n",
                "engineConfigs[a].kvUsageSpec",
            ),
            (
                "engineConfigs:\n- name: a\n  customMetrics: [{attributeKey: k, metricSpec: m}]\n",
                "customMetrics is not supported",
            ),
            (
                "engineConfigs:\n- name: a\n  cacheInfoSpec: c\n  cacheNumBlocksSpec: n\n",
                "not both",
            ),
        ] {
            let e = extractor(yaml).unwrap_err().to_string();
            assert!(e.contains(want), "{yaml}: {e}");
        }
        assert!(serde_yaml::from_str::<ExtractorParams>("engines: []").is_err());
    }

    #[test]
    fn flags_change_the_default_engine_and_legacy_freshness() {
        let d = ExtractorDefaults {
            engine: "vllm".into(),
            metric_flags: vec![
                (
                    "total-queued-requests-metric",
                    "nv_trt_llm_request_metrics{request_type=waiting}".into(),
                ),
                ("lora-info-metric", String::new()),
            ],
            legacy_freshness: true,
        };
        let x =
            CoreMetricsExtractor::new(&d, &ExtractorParams::default(), &PluginMetrics::default()).unwrap();
        let ep = Endpoint::from_address("10.0.0.1:8000".parse().unwrap());
        let m = metrics_of(
            &x,
            &ep,
            "nv_trt_llm_request_metrics{request_type=\"waiting\"} 7\n",
        )
        .unwrap();
        assert_eq!(m.waiting_queue, 7);
        assert!(x.engine_for(&ep).lora.is_none());
        // A page without a configured series still refreshes the figures under the legacy rule.
        assert!(metrics_of(&x, &ep, "up 1\n").unwrap().updated_at.is_some());
        let bad = ExtractorDefaults {
            metric_flags: vec![("kv-cache-usage-percentage-metric", "a{b".into())],
            ..d
        };
        let e = CoreMetricsExtractor::new(&bad, &ExtractorParams::default(), &PluginMetrics::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--kv-cache-usage-percentage-metric"), "{e}");
    }
}
