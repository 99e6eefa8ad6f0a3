//! The `EndpointPickerConfig` document as written by operators.
//!
//! Strict where the reference is strict: unknown or duplicate keys at the top level, in
//! plugin entries, in profiles and in the later typed sections are errors. Plugin
//! `parameters` stay raw YAML and are decoded leniently by each plugin.

use serde::Deserialize;

/// API versions accepted in `apiVersion`: GIE's group and llm-d-router v0.10's.
pub const API_VERSIONS: &[&str] = &["inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1"];
/// The only accepted `kind`.
pub const KIND: &str = "EndpointPickerConfig";

/// The whole document.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigFile {
    /// `inference.networking.x-k8s.io/v1alpha1` or `llm-d.ai/v1alpha1`.
    pub api_version: String,
    /// `EndpointPickerConfig`.
    pub kind: String,
    /// Plugin instances.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    /// Scheduling profiles.
    #[serde(default)]
    pub scheduling_profiles: Vec<ProfileSpec>,
    /// Feature gates (v1.2+): `name`, `name=true` or `name=false` (v0.10).
    #[serde(default)]
    pub feature_gates: Vec<String>,
    /// Saturation detector settings: v1.2–v1.4 thresholds, or the v1.5 `pluginRef`
    /// (deprecated in v0.10 for `flowControl.saturationDetector`).
    #[serde(default)]
    pub saturation_detector: Option<SaturationDetectorSpec>,
    /// Data layer sources (the v1.3–v1.4 key).
    #[serde(default)]
    pub data: Option<DataLayerSpec>,
    /// Data layer (v1.5+).
    #[serde(default)]
    pub data_layer: Option<DataLayerSpec>,
    /// Flow control (v1.4+).
    #[serde(default)]
    pub flow_control: Option<FlowControlSpec>,
    /// Request parser (v1.5; deprecated in v0.10 for `requestHandler.parsers`).
    #[serde(default)]
    pub parser: Option<PluginRefSpec>,
    /// Request handling (v0.10).
    #[serde(default)]
    pub request_handler: Option<RequestHandlerSpec>,
}

/// One plugin instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// Instance name; defaults to the type.
    #[serde(default)]
    pub name: Option<String>,
    /// Registered type.
    #[serde(rename = "type", default)]
    pub type_name: String,
    /// Plugin-specific parameters.
    #[serde(default)]
    pub parameters: serde_yaml::Value,
}

/// One scheduling profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    /// Profile name, unique.
    #[serde(default)]
    pub name: String,
    /// Plugins of the profile, in order.
    #[serde(default)]
    pub plugins: Vec<ProfilePluginSpec>,
}

/// A plugin reference inside a profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProfilePluginSpec {
    /// Name of an entry in `plugins`.
    #[serde(default)]
    pub plugin_ref: String,
    /// Scorer weight (integer before v1.4, float after); default 1.
    #[serde(default)]
    pub weight: Option<f64>,
}

/// `saturationDetector` (top level, or under `flowControl` where only `pluginRef` is allowed).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SaturationDetectorSpec {
    /// Queue depth above which an endpoint is full (v1.2–v1.4).
    #[serde(default)]
    pub queue_depth_threshold: Option<i64>,
    /// KV utilisation above which an endpoint is full (v1.2–v1.4).
    #[serde(default)]
    pub kv_cache_util_threshold: Option<f64>,
    /// Metrics older than this count as missing (v1.2–v1.4), e.g. `200ms`.
    #[serde(default)]
    pub metrics_staleness_threshold: Option<String>,
    /// The detector plugin (v1.5+).
    #[serde(default)]
    pub plugin_ref: Option<String>,
}

impl SaturationDetectorSpec {
    /// Whether any v1.2–v1.4 threshold is set.
    pub fn has_thresholds(&self) -> bool {
        self.queue_depth_threshold.is_some()
            || self.kv_cache_util_threshold.is_some()
            || self.metrics_staleness_threshold.is_some()
    }
}

/// `data` / `dataLayer`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataLayerSpec {
    /// Add the default metrics source and extractor (v0.10; default true).
    #[serde(default)]
    pub inject_defaults: Option<bool>,
    /// Data sources.
    #[serde(default)]
    pub sources: Vec<DataSourceSpec>,
    /// Endpoint discovery plugin (v0.10).
    #[serde(default)]
    pub discovery: Option<PluginRefSpec>,
    /// Cross-replica state syncer (v0.10).
    #[serde(default)]
    pub cross_replica_syncer_plugin_ref: Option<String>,
    /// Cross-replica sync interval (v0.10).
    #[serde(default)]
    pub cross_replica_sync_interval: Option<String>,
}

/// One data source and its extractors.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataSourceSpec {
    /// The source plugin.
    pub plugin_ref: String,
    /// Extractor plugins.
    #[serde(default)]
    pub extractors: Vec<PluginRefSpec>,
}

/// `{pluginRef: name}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PluginRefSpec {
    /// Name of an entry in `plugins`.
    pub plugin_ref: String,
}

/// `requestHandler` (v0.10).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestHandlerSpec {
    /// Request parsers.
    #[serde(default)]
    pub parsers: Vec<PluginRefSpec>,
}

/// `flowControl` (GIE v1.4–v1.5, llm-d-router v0.10).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FlowControlSpec {
    /// Global byte limit.
    #[serde(default)]
    pub max_bytes: Option<serde_yaml::Value>,
    /// Global request limit.
    #[serde(default)]
    pub max_requests: Option<serde_yaml::Value>,
    /// Queue time limit.
    #[serde(default, rename = "defaultRequestTTL")]
    pub default_request_ttl: Option<String>,
    /// Template for unconfigured priorities.
    #[serde(default)]
    pub default_priority_band: Option<PriorityBandSpec>,
    /// Template for negative priorities (v0.10).
    #[serde(default)]
    pub default_negative_priority_band: Option<PriorityBandSpec>,
    /// Per-priority bands.
    #[serde(default)]
    pub priority_bands: Vec<PriorityBandSpec>,
    /// Usage limit policy.
    #[serde(default)]
    pub usage_limit_policy_plugin_ref: Option<String>,
    /// The saturation detector for admission and flow control (v0.10).
    #[serde(default)]
    pub saturation_detector: Option<SaturationDetectorSpec>,
    /// In-flight eviction (v0.10).
    #[serde(default)]
    pub enable_eviction: bool,
}

/// One priority band (or a band template) of `flowControl`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PriorityBandSpec {
    /// The priority it serves (listed bands only).
    #[serde(default)]
    pub priority: Option<i32>,
    /// Byte limit (a quantity); 0 or unset is the default.
    #[serde(default)]
    pub max_bytes: Option<serde_yaml::Value>,
    /// Request limit (a quantity); 0 or unset is the default.
    #[serde(default)]
    pub max_requests: Option<serde_yaml::Value>,
    /// Fairness policy plugin name.
    #[serde(default)]
    pub fairness_policy_ref: Option<String>,
    /// Ordering policy plugin name.
    #[serde(default)]
    pub ordering_policy_ref: Option<String>,
}

impl FlowControlSpec {
    /// The settings given besides the saturation detector, by their field names.
    pub fn settings(&self) -> Vec<&'static str> {
        let mut set = Vec::new();
        for (on, name) in [
            (self.max_bytes.is_some(), "maxBytes"),
            (self.max_requests.is_some(), "maxRequests"),
            (self.default_request_ttl.is_some(), "defaultRequestTTL"),
            (self.default_priority_band.is_some(), "defaultPriorityBand"),
            (
                self.default_negative_priority_band.is_some(),
                "defaultNegativePriorityBand",
            ),
            (!self.priority_bands.is_empty(), "priorityBands"),
            (
                self.usage_limit_policy_plugin_ref.is_some(),
                "usageLimitPolicyPluginRef",
            ),
            (self.enable_eviction, "enableEviction"),
        ] {
            if on {
                set.push(name);
            }
        }
        set
    }
}
