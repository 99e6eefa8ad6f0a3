//! The in-tree plugins and the one factory that builds them from a config entry.
//!
//! The factory is a plain `match` on the type name: adding a plugin means adding an arm here
//! and a row to `docs/plugins.md`, and there is no global registry to fill at start-up.
//! Parameters are decoded strictly, as llm-d-router v0.10 does: a key a plugin does not read
//! is refused at start-up with its name and the plugin's, instead of being ignored.
//!
//! Plugins share data through [`DataKey`]s named after their producer. Which producer a
//! consumer reads is settled before plugins are built ([`consumes`], [`produces`]): the one
//! its `...ProducerName` parameter names, else the one producer of that data in the
//! configuration, else (where the consumer needs it) a producer added with default
//! parameters, as v0.10 adds default producers.

pub mod datasource;
mod defaults;
pub mod flowcontrol;
pub mod inflight;
pub mod kvevents;
pub mod prefix;
pub mod saturation;
pub mod scheduling;
pub mod tokens;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::framework::attributes::{InFlightLoad, PrefixMatch, TokenizedPrompt};
use crate::framework::data::DataKey;
use crate::framework::plugin::{DataKind, PluginMetrics, PluginRoles};

use self::datasource::{CoreMetricsExtractor, ExtractorDefaults, MetricsDefaults, MetricsSource};
pub use self::defaults::DefaultsError;
use self::inflight::InFlightProducer;
use self::prefix::{PrefixCacheScorer, PrefixProducer};
use self::saturation::{Concurrency, Utilization};
use self::scheduling::active_request::ActiveRequestScorer;
use self::scheduling::load::{KvCacheScorer, QueueScorer, RunningRequestsScorer};
use self::scheduling::lora::LoraAffinityScorer;
use self::scheduling::no_hit_lru::NoHitLruScorer;
use self::scheduling::pickers::{MaxScorePicker, RandomPicker, WeightedRandomPicker};
use self::scheduling::profile_handler::SingleProfileHandler;
use self::scheduling::session_affinity::SessionAffinityScorer;
use self::scheduling::test_filter::HeaderBasedTestingFilter;
use self::scheduling::token_load::{TokenLoadParams, TokenLoadScorer};

/// The profile handler added when a configuration with one profile names none.
pub const DEFAULT_PROFILE_HANDLER: &str = "single-profile-handler";
/// The picker added to profiles without one.
pub const DEFAULT_PICKER: &str = "max-score-picker";
/// The saturation detector added when none is referenced.
pub const DEFAULT_SATURATION_DETECTOR: &str = "utilization-detector";
/// The data source added unless `dataLayer.injectDefaults: false`.
pub const DEFAULT_DATA_SOURCE: &str = "metrics-data-source";
/// The extractor paired with [`DEFAULT_DATA_SOURCE`].
pub const DEFAULT_EXTRACTOR: &str = "core-metrics-extractor";
/// The request parser (the body parsing the EPP does); the only parser type it has.
pub const DEFAULT_PARSER: &str = "openai-parser";

/// Every type the factory knows.
pub const KNOWN_TYPES: &[&str] = &[
    "queue-scorer",
    "kv-cache-utilization-scorer",
    "running-requests-size-scorer",
    "token-load-scorer",
    "active-request-scorer",
    "no-hit-lru-scorer",
    "session-affinity-scorer",
    "lora-affinity-scorer",
    "prefix-cache-scorer",
    "approx-prefix-cache-producer",
    "inflight-load-producer",
    "max-score-picker",
    "random-picker",
    "weighted-random-picker",
    "single-profile-handler",
    "header-based-testing-filter",
    "utilization-detector",
    "concurrency-detector",
    "metrics-data-source",
    "core-metrics-extractor",
    "openai-parser",
    "token-producer",
    "precise-prefix-cache-producer",
    "precise-prefix-cache-scorer",
    "endpoint-notification-source",
    "fcfs-ordering-policy",
    "edf-ordering-policy",
    "slo-deadline-ordering-policy",
    "global-strict-fairness-policy",
    "round-robin-fairness-policy",
    "static-usage-limit-policy",
    "priority-holdback-policy",
];

/// The ordering policy of a band that names none (v0.10 `DefaultOrderingPolicyRef`).
pub const DEFAULT_ORDERING_POLICY: &str = "fcfs-ordering-policy";
/// The fairness policy of a band that names none (v0.10 `DefaultFairnessPolicyRef`).
pub const DEFAULT_FAIRNESS_POLICY: &str = "global-strict-fairness-policy";
/// The usage limit policy when `flowControl.usageLimitPolicyPluginRef` is unset.
pub const DEFAULT_USAGE_LIMIT_POLICY: &str = "static-usage-limit-policy";

/// Why a plugin could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// No such type.
    #[error("plugin type '{0}' is not found in registry (known types: {known})", known = KNOWN_TYPES.join(", "))]
    UnknownType(String),
    /// The parameters do not fit the plugin: an unknown key, a wrong type.
    #[error("invalid parameters: {0}")]
    Parameters(#[source] serde_yaml::Error),
    /// Parameters given to a plugin that takes none.
    #[error("takes no parameters, got: {0}")]
    NoParameters(String),
    /// A parameter value the plugin refuses.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(e: impl std::fmt::Display) -> PluginError {
    PluginError::Invalid(e.to_string())
}

/// Decodes `value` into `T` strictly (`T` denies unknown fields); `null` gives the default.
pub fn params<T: DeserializeOwned + Default>(value: &serde_yaml::Value) -> Result<T, PluginError> {
    if value.is_null() {
        return Ok(T::default());
    }
    serde_yaml::from_value(value.clone()).map_err(PluginError::Parameters)
}

fn no_params(value: &serde_yaml::Value) -> Result<(), PluginError> {
    match value {
        serde_yaml::Value::Null => Ok(()),
        serde_yaml::Value::Mapping(m) if m.is_empty() => Ok(()),
        other => Err(PluginError::NoParameters(
            serde_yaml::to_string(other).unwrap_or_default().trim().to_owned(),
        )),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PickerParams {
    max_num_of_endpoints: Option<i64>,
}

impl PickerParams {
    fn count(&self) -> usize {
        self.max_num_of_endpoints
            .filter(|n| *n > 0)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(1)
    }
}

/// What the plugins take from the EPP's flags and environment, resolved with the
/// configuration.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    /// `metrics-data-source` defaults (the `--model-server-metrics-*` flags).
    pub metrics_source: MetricsDefaults,
    /// `core-metrics-extractor` defaults (`--engine`, the metric-name flags, the legacy gate).
    pub extractor: ExtractorDefaults,
    /// Thresholds of a `utilization-detector` without parameters (the `SD_*` environment and
    /// the top-level `saturationDetector` thresholds).
    pub utilization: Utilization,
    /// The pool's namespace (`--pool-namespace`, else `$NAMESPACE`, else `default`): the
    /// namespace part of an endpoint's identity in session tokens.
    pub namespace: String,
}

/// What a consumer needs from a producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Add a producer of type `default` when the configuration has none.
    Auto {
        /// Producer type to add.
        default: &'static str,
    },
    /// Read it when the configuration has one; never add one.
    IfPresent,
}

/// One kind of data a plugin type reads from another plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consumes {
    /// What it reads.
    pub kind: DataKind,
    /// The parameter naming the producer, if the type has one.
    pub param: Option<&'static str>,
    /// What happens without a producer.
    pub need: Need,
}

/// The data `type_name` reads from other plugins.
pub fn consumes(type_name: &str) -> &'static [Consumes] {
    const PREFIX_SCORER: &[Consumes] = &[Consumes {
        kind: DataKind::PrefixMatch,
        param: Some("prefixMatchInfoProducerName"),
        need: Need::Auto {
            default: "approx-prefix-cache-producer",
        },
    }];
    const KV_SCORER: &[Consumes] = &[Consumes {
        kind: DataKind::InFlightLoad,
        param: None,
        need: Need::Auto {
            default: "inflight-load-producer",
        },
    }];
    const CONCURRENCY: &[Consumes] = &[Consumes {
        kind: DataKind::InFlightLoad,
        param: Some("inFlightLoadProducerName"),
        need: Need::Auto {
            default: "inflight-load-producer",
        },
    }];
    const TOKEN_LOAD: &[Consumes] = &[
        Consumes {
            kind: DataKind::InFlightLoad,
            param: Some("inFlightLoadProducerName"),
            need: Need::Auto {
                default: "inflight-load-producer",
            },
        },
        Consumes {
            kind: DataKind::PrefixMatch,
            param: None,
            need: Need::IfPresent,
        },
    ];
    const PRECISE: &[Consumes] = &[Consumes {
        kind: DataKind::TokenizedPrompt,
        param: None,
        need: Need::Auto {
            default: "token-producer",
        },
    }];
    const INFLIGHT: &[Consumes] = &[Consumes {
        kind: DataKind::PrefixMatch,
        param: Some("prefixMatchInfoProducerName"),
        need: Need::IfPresent,
    }];
    match type_name {
        "prefix-cache-scorer" => PREFIX_SCORER,
        "kv-cache-utilization-scorer" => KV_SCORER,
        "concurrency-detector" => CONCURRENCY,
        "token-load-scorer" => TOKEN_LOAD,
        "active-request-scorer" => CONCURRENCY,
        "no-hit-lru-scorer" => PREFIX_SCORER,
        "inflight-load-producer" => INFLIGHT,
        "precise-prefix-cache-producer" | "precise-prefix-cache-scorer" => PRECISE,
        _ => &[],
    }
}

/// The producer type of `kind` a consumer falls back to among several producers without a
/// name: the one named after this type (v0.10 reads the data key of the default producer).
pub fn default_producer(kind: DataKind) -> &'static str {
    match kind {
        DataKind::PrefixMatch => "approx-prefix-cache-producer",
        DataKind::InFlightLoad => "inflight-load-producer",
        DataKind::TokenizedPrompt => "token-producer",
    }
}

/// The data `type_name` produces for others.
pub fn produces(type_name: &str) -> &'static [DataKind] {
    match type_name {
        "approx-prefix-cache-producer" => &[DataKind::PrefixMatch],
        "inflight-load-producer" => &[DataKind::InFlightLoad],
        "precise-prefix-cache-producer" => &[DataKind::PrefixMatch],
        "token-producer" => &[DataKind::TokenizedPrompt],
        _ => &[],
    }
}

/// Parameters a consumer written for an older reference carries for its producer: a GIE
/// v1.0–v1.4 `prefix-cache-scorer` configured the index itself. They are handed to the
/// producer added for it.
pub fn handed_to_producer(type_name: &str) -> Option<(DataKind, &'static [&'static str])> {
    match type_name {
        "prefix-cache-scorer" => Some((DataKind::PrefixMatch, prefix::PRODUCER_PARAMS)),
        _ => None,
    }
}

/// What the factory is given besides the type and parameters.
#[derive(Debug)]
pub struct BuildContext<'a> {
    /// The instance name.
    pub name: &'a str,
    /// Flag and environment defaults.
    pub defaults: &'a Defaults,
    /// Where plugin metric families are registered.
    pub metrics: &'a PluginMetrics,
    /// The producer this plugin reads, per data kind (settled by the configuration builder).
    pub bindings: &'a BTreeMap<DataKind, String>,
}

impl BuildContext<'_> {
    fn producer(&self, kind: DataKind) -> Option<&str> {
        self.bindings.get(&kind).map(String::as_str)
    }
}

/// `params` without the keys in `skip` (the builder hands those to another plugin).
fn without(value: &serde_yaml::Value, skip: &[&str]) -> serde_yaml::Value {
    filter_keys(value, skip, false)
}

/// `value` (a mapping) with only the keys in `keys` (`keep`), or only the others.
fn filter_keys(value: &serde_yaml::Value, keys: &[&str], keep: bool) -> serde_yaml::Value {
    match value {
        serde_yaml::Value::Mapping(m) => serde_yaml::Value::Mapping(
            m.iter()
                .filter(|(k, _)| k.as_str().is_some_and(|k| keys.contains(&k)) == keep)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Builds the plugin of type `type_name` with `parameters` (YAML `null` when absent).
pub fn build(
    type_name: &str,
    parameters: &serde_yaml::Value,
    ctx: &BuildContext<'_>,
) -> Result<PluginRoles, PluginError> {
    let mut h = PluginRoles::default();
    match type_name {
        "queue-scorer" => {
            no_params(parameters)?;
            h.scorer = Some(Arc::new(QueueScorer));
        }
        "running-requests-size-scorer" => {
            no_params(parameters)?;
            h.scorer = Some(Arc::new(RunningRequestsScorer));
        }
        "kv-cache-utilization-scorer" => {
            no_params(parameters)?;
            let in_flight = ctx
                .producer(DataKind::InFlightLoad)
                .map(DataKey::<InFlightLoad>::named);
            h.scorer = Some(Arc::new(KvCacheScorer { in_flight }));
        }
        "token-load-scorer" => {
            let p: TokenLoadParams = params(parameters)?;
            let load = ctx
                .producer(DataKind::InFlightLoad)
                .ok_or_else(|| invalid("no inflight-load-producer to read"))?;
            let prefix = ctx
                .producer(DataKind::PrefixMatch)
                .map(DataKey::<PrefixMatch>::named);
            h.scorer = Some(Arc::new(TokenLoadScorer::new(load, prefix, &p)));
        }
        "active-request-scorer" => {
            let load = ctx
                .producer(DataKind::InFlightLoad)
                .ok_or_else(|| invalid("no inflight-load-producer to read"))?;
            let s = ActiveRequestScorer::new(load, &params(parameters)?).map_err(invalid)?;
            h.scorer = Some(Arc::new(s));
        }
        "no-hit-lru-scorer" => {
            let prefix = ctx
                .producer(DataKind::PrefixMatch)
                .map(DataKey::<PrefixMatch>::named);
            let s = Arc::new(NoHitLruScorer::new(ctx.name, prefix, &params(parameters)?).map_err(invalid)?);
            h.scorer = Some(s.clone());
            h.pre_request = Some(s.clone());
            h.store_hook = Some(s);
            h.serves_scorer = true;
        }
        "session-affinity-scorer" => {
            let s = SessionAffinityScorer::new(ctx.name, &ctx.defaults.namespace, &params(parameters)?)
                .map_err(invalid)?;
            let s = Arc::new(s);
            if let Some(b) = s.bindings() {
                h.background = Some(b);
            }
            if s.produces_state() {
                h.producer = Some(s.clone());
            }
            if let Some(p) = s.profile() {
                h.profile_refs.push(("profileName", p.to_owned()));
            }
            h.serves_scorer = true;
            h.pre_request = Some(s.clone());
            h.scorer = Some(s);
        }
        "lora-affinity-scorer" => {
            no_params(parameters)?;
            h.scorer = Some(Arc::new(LoraAffinityScorer));
        }
        "prefix-cache-scorer" => {
            let handed = filter_keys(parameters, prefix::PRODUCER_PARAMS, true);
            params::<prefix::ProducerParams>(&handed)?
                .validate()
                .map_err(invalid)?;
            let own = without(parameters, prefix::PRODUCER_PARAMS);
            let p: prefix::ScorerParams = params(&own)?;
            let producer = ctx
                .producer(DataKind::PrefixMatch)
                .ok_or_else(|| invalid("no approx-prefix-cache-producer to read"))?;
            let scorer =
                PrefixCacheScorer::new(DataKey::<PrefixMatch>::named(producer), &p).map_err(invalid)?;
            h.scorer = Some(Arc::new(scorer));
        }
        "approx-prefix-cache-producer" => {
            let p: prefix::ProducerParams = params(parameters)?;
            p.validate().map_err(invalid)?;
            let p = Arc::new(PrefixProducer::new(ctx.name, &p, ctx.metrics));
            h.producer = Some(p.clone());
            h.pre_request = Some(p.clone());
            h.endpoints_changed = Some(p);
            h.produces = vec![DataKind::PrefixMatch];
        }
        "inflight-load-producer" => {
            let prefix = ctx
                .producer(DataKind::PrefixMatch)
                .map(DataKey::<PrefixMatch>::named);
            let p = Arc::new(InFlightProducer::new(ctx.name, prefix, &params(parameters)?).map_err(invalid)?);
            if p.estimates_output() {
                h.producer = Some(p.clone());
            }
            h.store_hook = Some(p.clone());
            h.pre_request = Some(p);
            h.produces = vec![DataKind::InFlightLoad];
        }
        "max-score-picker" => {
            let n = params::<PickerParams>(parameters)?.count();
            h.picker = Some(Arc::new(MaxScorePicker { max_endpoints: n }));
        }
        "random-picker" => {
            let n = params::<PickerParams>(parameters)?.count();
            h.picker = Some(Arc::new(RandomPicker { max_endpoints: n }));
        }
        "weighted-random-picker" => {
            let n = params::<PickerParams>(parameters)?.count();
            h.picker = Some(Arc::new(WeightedRandomPicker { max_endpoints: n }));
        }
        "single-profile-handler" => {
            no_params(parameters)?;
            h.profile_handler = Some(Arc::new(SingleProfileHandler));
        }
        "header-based-testing-filter" => {
            no_params(parameters)?;
            h.filter = Some(Arc::new(HeaderBasedTestingFilter));
        }
        "utilization-detector" => {
            let d =
                Arc::new(Utilization::new(ctx.defaults.utilization, &params(parameters)?).map_err(invalid)?);
            h.saturation = Some(d.clone());
            h.filter = Some(d);
        }
        "concurrency-detector" => {
            let p: saturation::ConcurrencyParams = params(parameters)?;
            let load = ctx
                .producer(DataKind::InFlightLoad)
                .ok_or_else(|| invalid("no inflight-load-producer to read"))?;
            let d = Arc::new(Concurrency::new(DataKey::named(load), &p).map_err(invalid)?);
            h.saturation = Some(d.clone());
            h.filter = Some(d);
        }
        "metrics-data-source" => {
            let s =
                MetricsSource::new(&ctx.defaults.metrics_source, &params(parameters)?).map_err(invalid)?;
            h.polling_source = Some(Arc::new(s));
        }
        "core-metrics-extractor" => {
            let x = CoreMetricsExtractor::new(&ctx.defaults.extractor, &params(parameters)?, ctx.metrics)
                .map_err(invalid)?;
            h.extractor = Some(Arc::new(x));
        }
        "openai-parser" => {
            no_params(parameters)?;
            h.parser = true;
        }
        "token-producer" => {
            let p = Arc::new(tokens::TokenProducer::new(ctx.name, &params(parameters)?).map_err(invalid)?);
            h.producer = Some(p);
            h.produces = vec![DataKind::TokenizedPrompt];
        }
        "precise-prefix-cache-producer" => {
            let p = precise(parameters, ctx)?;
            h.producer = Some(p.clone());
            h.pre_request = Some(p.clone());
            h.subscribing_source = Some(p.clone());
            h.endpoint_extractor = Some(p);
            h.produces = vec![DataKind::PrefixMatch];
        }
        "precise-prefix-cache-scorer" => {
            tracing::warn!(
                plugin = ctx.name,
                "precise-prefix-cache-scorer is deprecated (llm-d-router v0.10): use a precise-prefix-cache-producer and a prefix-cache-scorer with prefixMatchInfoProducerName"
            );
            let p = precise(parameters, ctx)?;
            let scorer =
                PrefixCacheScorer::new(p.match_key(), &prefix::ScorerParams::default()).map_err(invalid)?;
            h.scorer = Some(Arc::new(scorer));
            h.producer = Some(p.clone());
            h.pre_request = Some(p.clone());
            h.subscribing_source = Some(p.clone());
            h.endpoint_extractor = Some(p);
        }
        "endpoint-notification-source" => {
            no_params(parameters)?;
            h.endpoint_source = true;
        }
        "fcfs-ordering-policy" => {
            no_params(parameters)?;
            h.ordering = Some(Arc::new(flowcontrol::Fcfs));
        }
        "edf-ordering-policy" => {
            no_params(parameters)?;
            h.ordering = Some(Arc::new(flowcontrol::Edf));
        }
        "slo-deadline-ordering-policy" => {
            no_params(parameters)?;
            h.ordering = Some(Arc::new(flowcontrol::SloDeadline));
        }
        "global-strict-fairness-policy" => {
            no_params(parameters)?;
            h.fairness = Some(Arc::new(flowcontrol::GlobalStrict));
        }
        "round-robin-fairness-policy" => {
            no_params(parameters)?;
            h.fairness = Some(Arc::new(flowcontrol::RoundRobin));
        }
        "static-usage-limit-policy" => {
            let p = flowcontrol::StaticUsageLimit::new(&params(parameters)?).map_err(invalid)?;
            h.usage_limit = Some(Arc::new(p));
        }
        "priority-holdback-policy" => {
            let p = flowcontrol::PriorityHoldback::new(&params(parameters)?).map_err(invalid)?;
            h.usage_limit = Some(Arc::new(p));
        }
        other => return Err(PluginError::UnknownType(other.to_owned())),
    }
    Ok(h)
}

/// A precise prefix producer from `parameters`, reading the token producer bound to it.
fn precise(
    parameters: &serde_yaml::Value,
    ctx: &BuildContext<'_>,
) -> Result<Arc<kvevents::producer::PreciseProducer>, PluginError> {
    let p: kvevents::params::PreciseParams = params(parameters)?;
    let resolved = p.resolve().map_err(invalid)?;
    let tokens = ctx
        .producer(DataKind::TokenizedPrompt)
        .ok_or_else(|| invalid("no token-producer to read"))?;
    Ok(Arc::new(kvevents::producer::PreciseProducer::new(
        ctx.name,
        DataKey::<TokenizedPrompt>::named(tokens),
        resolved,
        ctx.metrics,
    )))
}

/// Fixtures shared by the plugin tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use crate::datalayer::{Endpoint, EndpointState, Metrics};
    use crate::framework::data::CycleState;
    use crate::framework::scheduling::{SchedulingRequest, Scorer, candidates};
    use crate::request::RequestHeaders;

    /// Endpoints 10.0.0.1.. with the given (waiting queue, KV usage), freshly scraped.
    pub fn states(load: &[(u32, f64)]) -> Vec<EndpointState> {
        load.iter()
            .enumerate()
            .map(|(i, (q, kv))| {
                EndpointState::with_metrics(
                    Arc::new(Endpoint::from_address(
                        format!("10.0.0.{}:8000", i + 1).parse().unwrap(),
                    )),
                    Metrics {
                        waiting_queue: *q,
                        kv_cache_usage: *kv,
                        updated_at: Some(tokio::time::Instant::now()),
                        ..Metrics::default()
                    },
                )
            })
            .collect()
    }

    /// Unscraped endpoints at the given addresses.
    pub fn states_at(addrs: &[&str]) -> Vec<EndpointState> {
        addrs
            .iter()
            .map(|a| EndpointState::new(Arc::new(Endpoint::from_address(a.parse().unwrap()))))
            .collect()
    }

    /// A request for `model` with `prompt` as prefix input.
    pub fn request<'a>(
        headers: &'a RequestHeaders,
        model: &'a str,
        prompt: &'a [u8],
    ) -> SchedulingRequest<'a> {
        SchedulingRequest::new("req-1", model, prompt, None, headers)
    }

    /// `scorer`'s scores for `s` with an empty cycle state.
    pub fn score(scorer: &dyn Scorer, req: &SchedulingRequest<'_>, s: &[EndpointState]) -> Vec<f64> {
        let mut out = vec![0.0; s.len()];
        scorer.score(req, &CycleState::default(), &candidates(s), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(
        defaults: &'a Defaults,
        metrics: &'a PluginMetrics,
        bindings: &'a BTreeMap<DataKind, String>,
    ) -> BuildContext<'a> {
        BuildContext {
            name: "p",
            defaults,
            metrics,
            bindings,
        }
    }

    #[test]
    fn factory_knows_every_listed_type() {
        let defaults = Defaults {
            extractor: ExtractorDefaults {
                engine: "vllm".into(),
                ..ExtractorDefaults::default()
            },
            ..Defaults::default()
        };
        let metrics = PluginMetrics::default();
        let bindings: BTreeMap<DataKind, String> = [
            (DataKind::PrefixMatch, "approx-prefix-cache-producer".to_owned()),
            (DataKind::InFlightLoad, "inflight-load-producer".to_owned()),
            (DataKind::TokenizedPrompt, "token-producer".to_owned()),
        ]
        .into();
        for t in KNOWN_TYPES {
            // A token producer needs a backend and the holdback policy its `minCeiling`; every
            // other type builds without parameters.
            let params = if *t == "priority-holdback-policy" {
                serde_yaml::from_str("minCeiling: 0.5").unwrap()
            } else if *t == "token-producer" {
                serde_yaml::from_str(concat!(
                    "local: {path: ",
                    env!("CARGO_MANIFEST_DIR"),
                    "/../../fixtures/vllm-0.32-cpu/tokenization}"
                ))
                .unwrap()
            } else {
                serde_yaml::Value::Null
            };
            let roles = build(t, &params, &ctx(&defaults, &metrics, &bindings));
            assert!(roles.is_ok(), "{t}: {roles:?}");
            assert_eq!(roles.unwrap().produces, produces(t), "{t}");
        }
        let err = build(
            "least-kv-filter",
            &serde_yaml::Value::Null,
            &ctx(&defaults, &metrics, &bindings),
        )
        .unwrap_err();
        assert!(err.to_string().contains("'least-kv-filter' is not found"));
    }

    #[test]
    fn parameters_are_strict() {
        let defaults = Defaults::default();
        let metrics = PluginMetrics::default();
        let bindings = BTreeMap::new();
        let c = ctx(&defaults, &metrics, &bindings);
        let v = |y: &str| serde_yaml::from_str::<serde_yaml::Value>(y).unwrap();
        let e = build("queue-scorer", &v("{threshold: 3}"), &c)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("takes no parameters") && e.contains("threshold"),
            "{e}"
        );
        let e = build("max-score-picker", &v("{maxNumOfEndpoint: 3}"), &c)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `maxNumOfEndpoint`"), "{e}");
        assert!(build("queue-scorer", &v("{}"), &c).is_ok());
    }

    #[test]
    fn picker_count_defaults_to_one() {
        let v: serde_yaml::Value = serde_yaml::from_str("maxNumOfEndpoints: 0").unwrap();
        assert_eq!(params::<PickerParams>(&v).unwrap().count(), 1);
        let v: serde_yaml::Value = serde_yaml::from_str("maxNumOfEndpoints: 3").unwrap();
        assert_eq!(params::<PickerParams>(&v).unwrap().count(), 3);
        let v: serde_yaml::Value = serde_yaml::from_str("maxNumOfEndpoints: three").unwrap();
        assert!(params::<PickerParams>(&v).is_err());
    }
}
