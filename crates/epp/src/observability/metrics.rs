//! The EPP's own Prometheus metrics, under the reference's current (v1.1+) names, so existing
//! dashboards and alerts keep working.
//!
//! Request families are fed by [`RequestObserver`] (one call when a request is routed, one
//! when its stream ends), scheduler families by [`PluginObserver`] (per-plugin timers
//! resolved once at start-up, so the request path does no label lookups for them), the
//! families plugins register for themselves (prefix-index hits, say) through
//! [`PluginMetrics`], and the pool gauges are computed from the current snapshot when
//! `/metrics` is scraped.
//!
//! Label values a client chooses (the body's `model`, the rewrite header) are bounded by
//! [`BoundedLabel`]; series keyed by an endpoint (the pick counter) are removed at the first
//! scrape after the endpoint left the pool.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::labels::{BoundedLabel, OVERFLOW};
use super::pool::PoolCollector;
use crate::datalayer::EndpointStore;
use crate::framework::plugin::{PluginMetrics, PluginObserver, Timer};
use crate::protocol::{RequestObserver, RequestRecord};

/// `model_name`, `target_model_name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// Model in the request.
    pub model_name: String,
    /// Model served.
    pub target_model_name: String,
}

/// Error counter labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Model in the request.
    pub model_name: String,
    /// Model served.
    pub target_model_name: String,
    /// Reference error code (`BadRequest`, `ServiceUnavailable`, ...).
    pub error_code: String,
}

/// Running-requests gauge labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunningLabels {
    /// Model in the request.
    pub model_name: String,
}

/// Plugin timing labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// `Filter`, `Scorer`, `Picker`, `ProfilePicker`, `PreRequest`.
    pub extension_point: String,
    /// Plugin type.
    pub plugin_type: String,
    /// Plugin name.
    pub plugin_name: String,
}

/// Picks per endpoint (the reference's v1.5 `scheduler_attempts_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// `success` or `failure`.
    pub status: String,
    /// Model served.
    pub target_model_name: String,
    /// Endpoint name (pod, rank, or address).
    pub pod_name: String,
    /// Pool namespace.
    pub namespace: String,
    /// Endpoint port.
    pub port: String,
}

/// Build identity.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InfoLabels {
    /// Source revision.
    pub commit: String,
    /// Build reference (version).
    pub build_ref: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0,
        15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0, 1200.0, 1800.0,
        2700.0, 3600.0,
    ])
}

fn request_size_histogram() -> Histogram {
    // 64 B … 64 KiB by doubling, then 128 KiB … 8 MiB, then 16 MiB … 1 GiB, as the reference.
    Histogram::new((6..=30).map(|p| f64::from(1u32 << p)))
}

fn response_size_histogram() -> Histogram {
    Histogram::new([
        1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32778.0,
        65536.0,
    ])
}

fn input_token_histogram() -> Histogram {
    let mut b = vec![1.0];
    b.extend((3..=20).map(|p| if p == 15 { 32778.0 } else { f64::from(1u32 << p) }));
    Histogram::new(b)
}

fn output_token_histogram() -> Histogram {
    let mut b = vec![1.0];
    b.extend((3..=13).map(|p| f64::from(1u32 << p)));
    Histogram::new(b)
}

fn scheduler_histogram() -> Histogram {
    Histogram::new([0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1])
}

/// All EPP metric families and the registry that exposes them.
pub struct EppMetrics {
    registry: Registry,
    namespace: String,
    request_total: Family<ModelLabels, Counter>,
    request_error_total: Family<ErrorLabels, Counter>,
    request_duration: HistogramFamily<ModelLabels>,
    request_sizes: HistogramFamily<ModelLabels>,
    response_sizes: HistogramFamily<ModelLabels>,
    input_tokens: HistogramFamily<ModelLabels>,
    output_tokens: HistogramFamily<ModelLabels>,
    running_requests: Family<RunningLabels, Gauge>,
    scheduler_e2e: Histogram,
    plugin_duration: HistogramFamily<PluginLabels>,
    attempts: Family<AttemptLabels, Counter>,
    /// Endpoints (name, port) with pick-counter series, to remove those that left.
    picked: ArcSwap<HashSet<(Arc<str>, u16)>>,
    /// Endpoints that left, with how many more prunes remove their series again (a pick
    /// routed just before the departure may recreate one).
    departed: Mutex<HashMap<(Arc<str>, u16), u8>>,
    models: BoundedLabel,
    overflow: Family<Vec<(&'static str, &'static str)>, Counter>,
    store: Arc<EndpointStore>,
}

impl std::fmt::Debug for EppMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EppMetrics").finish_non_exhaustive()
    }
}

impl EppMetrics {
    /// Registers every family. `pool` labels the pool gauges; `namespace` the pick counter;
    /// `plugins` holds the families plugins registered; at most `max_model_values` distinct
    /// model names get their own series (see [`BoundedLabel`]).
    pub fn new(
        store: Arc<EndpointStore>,
        pool: &str,
        namespace: &str,
        staleness: Duration,
        plugins: PluginMetrics,
        max_model_values: usize,
    ) -> Self {
        let mut registry = Registry::default();
        let request_total = Family::<ModelLabels, Counter>::default();
        let request_error_total = Family::<ErrorLabels, Counter>::default();
        let request_duration = HistogramFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        let request_sizes =
            HistogramFamily::new_with_constructor(request_size_histogram as fn() -> Histogram);
        let response_sizes =
            HistogramFamily::new_with_constructor(response_size_histogram as fn() -> Histogram);
        let input_tokens = HistogramFamily::new_with_constructor(input_token_histogram as fn() -> Histogram);
        let output_tokens =
            HistogramFamily::new_with_constructor(output_token_histogram as fn() -> Histogram);
        let running_requests = Family::<RunningLabels, Gauge>::default();
        let scheduler_e2e = scheduler_histogram();
        let plugin_duration = HistogramFamily::new_with_constructor(scheduler_histogram as fn() -> Histogram);
        let attempts = Family::<AttemptLabels, Counter>::default();
        let info = Family::<InfoLabels, Gauge>::default();
        let overflow = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        let models = BoundedLabel::new(
            max_model_values,
            overflow.get_or_create(&vec![("label", "model_name")]).clone(),
        );
        info.get_or_create(&InfoLabels {
            commit: option_env!("EPP_COMMIT").unwrap_or("unknown").to_owned(),
            build_ref: env!("CARGO_PKG_VERSION").to_owned(),
        })
        .set(1);

        let a = "[ALPHA] ";
        registry.register(
            "inference_objective_request",
            format!("{a}Counter of inference objective requests broken out for each model and target model"),
            request_total.clone(),
        );
        registry.register(
            "inference_objective_request_error",
            format!(
                "{a}Counter of inference objective requests errors broken out for each model and target model"
            ),
            request_error_total.clone(),
        );
        registry.register(
            "inference_objective_request_duration_seconds",
            format!("{a}Inference objective response latency distribution in seconds for each model and target model"),
            request_duration.clone(),
        );
        registry.register(
            "inference_objective_request_sizes",
            format!(
                "{a}Inference objective requests size distribution in bytes for each model and target model"
            ),
            request_sizes.clone(),
        );
        registry.register(
            "inference_objective_response_sizes",
            format!(
                "{a}Inference objective responses size distribution in bytes for each model and target model"
            ),
            response_sizes.clone(),
        );
        registry.register(
            "inference_objective_input_tokens",
            format!("{a}Inference objective input token count distribution for requests in each model"),
            input_tokens.clone(),
        );
        registry.register(
            "inference_objective_output_tokens",
            format!("{a}Inference objective output token count distribution for requests in each model"),
            output_tokens.clone(),
        );
        registry.register(
            "inference_objective_running_requests",
            format!("{a}Inference objective number of running requests in each model"),
            running_requests.clone(),
        );
        registry.register(
            "inference_extension_scheduler_e2e_duration_seconds",
            format!("{a}Scheduling cycle latency distribution in seconds"),
            scheduler_e2e.clone(),
        );
        registry.register(
            "inference_extension_plugin_duration_seconds",
            format!("{a}Plugin latency distribution in seconds for each extension point, plugin type and plugin name"),
            plugin_duration.clone(),
        );
        plugins.with(|families| {
            for (name, (help, histogram)) in &families.histograms {
                registry.register(name, help.clone(), histogram.clone());
            }
            for (name, (help, counter)) in &families.counters {
                registry.register(name, help.clone(), counter.clone());
            }
        });
        registry.register(
            "inference_extension_scheduler_attempts",
            format!("{a}Scheduling outcomes, with the chosen endpoint on success: where traffic goes"),
            attempts.clone(),
        );
        registry.register(
            "inference_extension_info",
            format!("{a}General information of the current build"),
            info,
        );
        registry.register(
            "inference_extension_metric_label_overflow",
            format!("{a}Requests whose client-chosen label value was reported as 'other' because the cap of distinct values (--max-model-label-values) was reached"),
            overflow.clone(),
        );
        registry.register_collector(Box::new(PoolCollector::new(
            store.clone(),
            pool,
            staleness,
            plugins,
        )));

        Self {
            registry,
            namespace: namespace.to_owned(),
            request_total,
            request_error_total,
            request_duration,
            request_sizes,
            response_sizes,
            input_tokens,
            output_tokens,
            running_requests,
            scheduler_e2e,
            plugin_duration,
            attempts,
            picked: ArcSwap::from_pointee(HashSet::new()),
            departed: Mutex::new(HashMap::new()),
            models,
            overflow,
            store,
        }
    }

    /// Where more families are registered before the metrics are shared.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The counter of requests whose `label` value was reported as [`OVERFLOW`], for another
    /// [`BoundedLabel`].
    pub fn label_overflow(&self, label: &'static str) -> Counter {
        self.overflow.get_or_create(&vec![("label", label)]).clone()
    }

    /// The exposition text (OpenMetrics). Pick-counter series of endpoints no longer in the
    /// pool are removed first.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        self.prune_departed();
        let mut out = String::with_capacity(16 << 10);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl EppMetrics {
    /// Labels for a request being routed: a new model name is admitted while the cap allows.
    fn model_labels(&self, r: &RequestRecord) -> ModelLabels {
        ModelLabels {
            model_name: self.models.value(&r.model),
            target_model_name: self.models.value(&r.target_model),
        }
    }

    /// Labels for a request that ended: names are not admitted here (a refused request must not
    /// take a slot); admitted ones stay admitted, so the gauge is decremented under the label it
    /// was incremented with.
    fn known_labels(&self, r: &RequestRecord) -> ModelLabels {
        ModelLabels {
            model_name: self.models.known(&r.model),
            target_model_name: self.models.known(&r.target_model),
        }
    }

    fn count_overflow(&self, labels: &ModelLabels) {
        if labels.model_name == OVERFLOW || labels.target_model_name == OVERFLOW {
            self.models.count_overflow();
        }
    }

    /// Counts a pick. The set of picked endpoints is read lock-free; the lock is taken only when
    /// an endpoint gets its first pick, which is also when departed endpoints are pruned (so a
    /// picker nobody scrapes stays bounded under churn).
    fn count_pick(&self, labels: AttemptLabels, endpoint: &crate::datalayer::Endpoint) {
        self.attempts.get_or_create(&labels).inc();
        let key = (endpoint.name.clone(), endpoint.address.port());
        if !self.picked.load().contains(&key) {
            let mut departed = self.departed.lock();
            departed.remove(&key);
            let mut next = HashSet::clone(&self.picked.load());
            next.insert(key);
            self.picked.store(Arc::new(next));
            self.prune_locked(&mut departed);
        }
    }

    /// Removes pick-counter series of endpoints (name and port) that left the pool.
    fn prune_departed(&self) {
        let mut departed = self.departed.lock();
        self.prune_locked(&mut departed);
    }

    fn prune_locked(&self, departed: &mut HashMap<(Arc<str>, u16), u8>) {
        let snapshot = self.store.load();
        let live: HashSet<(&str, u16)> = snapshot
            .endpoints()
            .iter()
            .map(|e| (&*e.endpoint.name, e.endpoint.address.port()))
            .collect();
        let picked = self.picked.load();
        if picked.iter().any(|(n, p)| !live.contains(&(&**n, *p))) {
            let mut next = HashSet::with_capacity(picked.len());
            for key in picked.iter() {
                if live.contains(&(&*key.0, key.1)) {
                    next.insert(key.clone());
                } else {
                    departed.insert(key.clone(), 3);
                }
            }
            self.picked.store(Arc::new(next));
        }
        if departed.is_empty() {
            return;
        }
        let mut models = self.models.values();
        models.push(OVERFLOW.to_owned());
        models.push(String::new());
        departed.retain(|(name, port), left| {
            for m in &models {
                self.attempts.remove(&AttemptLabels {
                    status: "success".into(),
                    target_model_name: m.clone(),
                    pod_name: name.to_string(),
                    namespace: self.namespace.clone(),
                    port: port.to_string(),
                });
            }
            *left -= 1;
            *left > 0
        });
    }
}

impl RequestObserver for EppMetrics {
    fn routed(&self, r: &RequestRecord) {
        let labels = self.model_labels(r);
        self.count_overflow(&labels);
        self.request_total.get_or_create(&labels).inc();
        self.request_sizes
            .get_or_create(&labels)
            .observe(r.request_bytes as f64);
        self.running_requests
            .get_or_create(&RunningLabels {
                model_name: labels.model_name.clone(),
            })
            .inc();
        if let Some(ep) = &r.primary {
            self.count_pick(
                AttemptLabels {
                    status: "success".into(),
                    target_model_name: labels.target_model_name.clone(),
                    pod_name: ep.name.to_string(),
                    namespace: self.namespace.clone(),
                    port: ep.address.port().to_string(),
                },
                ep,
            );
        }
    }

    fn finished(&self, r: &RequestRecord) {
        let labels = self.known_labels(r);
        if r.destinations.is_some() {
            self.running_requests
                .get_or_create(&RunningLabels {
                    model_name: labels.model_name.clone(),
                })
                .dec();
            if r.response_complete {
                self.request_duration
                    .get_or_create(&labels)
                    .observe(r.started.elapsed().as_secs_f64());
                // A gateway that sends no response body leaves the size unknown, not 0.
                if r.response_body_sent {
                    self.response_sizes
                        .get_or_create(&labels)
                        .observe(r.response_bytes as f64);
                }
            }
            if let Some(u) = r.usage {
                if let Some(t) = u.prompt_tokens.filter(|t| *t > 0) {
                    self.input_tokens.get_or_create(&labels).observe(t as f64);
                }
                if let Some(t) = u.completion_tokens.filter(|t| *t > 0) {
                    self.output_tokens.get_or_create(&labels).observe(t as f64);
                }
            }
        }
        if let Some((status, code)) = r.error {
            self.request_error_total
                .get_or_create(&ErrorLabels {
                    model_name: labels.model_name.clone(),
                    target_model_name: labels.target_model_name.clone(),
                    error_code: code.to_owned(),
                })
                .inc();
            if r.scheduling_failed && (status == 429 || status == 503) {
                self.attempts
                    .get_or_create(&AttemptLabels {
                        status: "failure".into(),
                        target_model_name: labels.target_model_name.clone(),
                        pod_name: String::new(),
                        namespace: self.namespace.clone(),
                        port: String::new(),
                    })
                    .inc();
            }
        }
    }
}

impl PluginObserver for EppMetrics {
    fn plugin_timer(
        &self,
        extension_point: &'static str,
        plugin_type: &str,
        plugin_name: &str,
    ) -> Option<Timer> {
        let h = self
            .plugin_duration
            .get_or_create(&PluginLabels {
                extension_point: extension_point.to_owned(),
                plugin_type: plugin_type.to_owned(),
                plugin_name: plugin_name.to_owned(),
            })
            .clone();
        Some(Arc::new(move |d: Duration| h.observe(d.as_secs_f64())))
    }

    fn cycle(&self, elapsed: Duration) {
        self.scheduler_e2e.observe(elapsed.as_secs_f64());
    }
}
