//! The in-tree plugins and the one factory that builds them from a config entry.
//!
//! The factory is a plain `match` on the type name: adding a plugin means adding an arm, and
//! there is no global registry to fill at start-up.

mod load;
mod lora;
mod pickers;
mod prefix;
mod profile_handler;
mod test_filter;

use std::sync::Arc;

use serde::Deserialize;
use serde::de::DeserializeOwned;

pub use load::{KvCacheScorer, QueueScorer, RunningRequestsScorer};
pub use lora::LoraAffinityScorer;
pub use pickers::{MaxScorePicker, RandomPicker, WeightedRandomPicker};
pub use prefix::{PrefixCacheScorer, PrefixParams};
pub use profile_handler::SingleProfileHandler;
pub use test_filter::HeaderBasedTestingFilter;

use super::PluginHandle;

/// Type names of plugins that newer configurations declare for parts of the EPP configured
/// elsewhere (data layer, parser, saturation). They load without a scheduling role so that
/// such files work unchanged.
pub const PASSIVE_TYPES: &[&str] = &[
    "metrics-data-source",
    "core-metrics-extractor",
    "openai-parser",
    "approx-prefix-cache-producer",
    "utilization-detector",
];

/// Every type the factory knows.
pub const KNOWN_TYPES: &[&str] = &[
    "queue-scorer",
    "kv-cache-utilization-scorer",
    "running-requests-size-scorer",
    "lora-affinity-scorer",
    "prefix-cache-scorer",
    "max-score-picker",
    "random-picker",
    "weighted-random-picker",
    "single-profile-handler",
    "header-based-testing-filter",
    "metrics-data-source",
    "core-metrics-extractor",
    "openai-parser",
    "approx-prefix-cache-producer",
    "utilization-detector",
];

/// Why a plugin could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// No such type.
    #[error("plugin type '{0}' is not found in registry (known types: {known})", known = KNOWN_TYPES.join(", "))]
    UnknownType(String),
    /// The parameters do not fit the plugin (wrong types; unknown keys are ignored).
    #[error("invalid parameters: {0}")]
    Parameters(#[source] serde_yaml::Error),
}

fn params<T: DeserializeOwned + Default>(value: &serde_yaml::Value) -> Result<T, PluginError> {
    if value.is_null() {
        return Ok(T::default());
    }
    serde_yaml::from_value(value.clone()).map_err(PluginError::Parameters)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
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

/// Builds the plugin of type `type_name` with `parameters` (YAML `null` when absent).
pub fn build(type_name: &str, parameters: &serde_yaml::Value) -> Result<PluginHandle, PluginError> {
    let mut h = PluginHandle::default();
    match type_name {
        "queue-scorer" => h.scorer = Some(Arc::new(QueueScorer)),
        "kv-cache-utilization-scorer" => h.scorer = Some(Arc::new(KvCacheScorer)),
        "running-requests-size-scorer" => h.scorer = Some(Arc::new(RunningRequestsScorer)),
        "lora-affinity-scorer" => h.scorer = Some(Arc::new(LoraAffinityScorer)),
        "prefix-cache-scorer" => {
            let p = Arc::new(PrefixCacheScorer::new(&params::<PrefixParams>(parameters)?));
            h.scorer = Some(p.clone());
            h.pre_request = Some(p.clone());
            h.prefix_index = Some(p.index().clone());
            h.endpoints_changed = Some(p);
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
        "single-profile-handler" => h.profile_handler = Some(Arc::new(SingleProfileHandler)),
        "header-based-testing-filter" => h.filter = Some(Arc::new(HeaderBasedTestingFilter)),
        t if PASSIVE_TYPES.contains(&t) => {}
        other => return Err(PluginError::UnknownType(other.to_owned())),
    }
    Ok(h)
}

/// Fixtures shared by the plugin tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use crate::datalayer::{Endpoint, EndpointState, Metrics};
    use crate::request::RequestHeaders;
    use crate::scheduling::SchedulingRequest;

    /// Endpoints 10.0.0.1.. with the given (waiting queue, KV usage).
    pub fn states(load: &[(u32, f64)]) -> Vec<EndpointState> {
        load.iter()
            .enumerate()
            .map(|(i, (q, kv))| {
                EndpointState::new(
                    Arc::new(Endpoint::from_address(
                        format!("10.0.0.{}:8000", i + 1).parse().unwrap(),
                    )),
                    Arc::new(Metrics {
                        waiting_queue: *q,
                        kv_cache_usage: *kv,
                        ..Metrics::default()
                    }),
                )
            })
            .collect()
    }

    /// Idle endpoints at the given addresses.
    pub fn states_at(addrs: &[&str]) -> Vec<EndpointState> {
        addrs
            .iter()
            .map(|a| {
                EndpointState::new(
                    Arc::new(Endpoint::from_address(a.parse().unwrap())),
                    Arc::new(Metrics::default()),
                )
            })
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factory_knows_every_listed_type() {
        for t in KNOWN_TYPES {
            assert!(build(t, &serde_yaml::Value::Null).is_ok(), "{t}");
        }
        let err = build("least-kv-filter", &serde_yaml::Value::Null).unwrap_err();
        assert!(err.to_string().contains("'least-kv-filter' is not found"));
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
