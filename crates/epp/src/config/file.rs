//! The `EndpointPickerConfig` document as written by operators.
//!
//! Strict where the reference is strict: unknown or duplicate keys at the top level, in
//! plugin entries, in profiles and in the later typed sections are errors. Plugin
//! `parameters` stay raw YAML and are decoded leniently by each plugin.

use serde::Deserialize;

/// API versions accepted in `apiVersion`.
pub const API_VERSIONS: &[&str] = &["inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1"];
/// The only accepted `kind`.
pub const KIND: &str = "EndpointPickerConfig";
/// Feature gates of the reference up to v1.5; others are refused as v1.5 does.
pub const FEATURE_GATES: &[&str] = &[
    "dataLayer",
    "flowControl",
    "prepareDataPlugins",
    "enableLegacyMetrics",
];

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
    /// Feature gates (v1.2+).
    #[serde(default)]
    pub feature_gates: Vec<String>,
    /// Saturation detector settings (v1.2–v1.4 thresholds, or v1.5 `pluginRef`).
    #[serde(default)]
    pub saturation_detector: Option<SaturationDetectorSpec>,
    /// Data layer sources (v1.3–v1.4 key).
    #[serde(default)]
    pub data: Option<DataLayerSpec>,
    /// Data layer sources (v1.5 key).
    #[serde(default)]
    pub data_layer: Option<DataLayerSpec>,
    /// Flow control (v1.4+); accepted, not yet acted on.
    #[serde(default)]
    pub flow_control: Option<serde_yaml::Value>,
    /// Request parser (v1.5).
    #[serde(default)]
    pub parser: Option<PluginRefSpec>,
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

/// `saturationDetector`.
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
    /// The detector plugin (v1.5).
    #[serde(default)]
    pub plugin_ref: Option<String>,
}

/// `data` / `dataLayer`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataLayerSpec {
    /// Metric sources.
    #[serde(default)]
    pub sources: Vec<DataSourceSpec>,
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
