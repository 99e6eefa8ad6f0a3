//! Configuration: flags, environment and the EndpointPickerConfig, resolved once at start-up
//! into one typed value ([`resolve::EppConfig`]) before any port is bound or task spawned.
//!
//! The document is loaded in two steps. [`EndpointPickerConfig::from_text`] decodes it
//! strictly and checks what needs no plugin knowledge (apiVersion, kind).
//! [`EndpointPickerConfig::build`] instantiates the plugins, binds producers and consumers and
//! applies the reference's defaulting (names, default profile, profile handler, picker,
//! weights, saturation detector, parsers, data layer) before validating everything. Every
//! error names the origin (file path or `--config-text`) and the field, profile or plugin at
//! fault, so the EPP can refuse to start with a message an operator can act on.

mod binding;
mod build;
pub mod cli;
mod datalayer;
pub mod file;
mod flowcontrol;
pub mod gates;
pub mod resolve;

use std::path::Path;

pub use build::PluginSet;
pub use file::ConfigFile;
pub use resolve::EppConfig;

/// The built-in default, used when no configuration is given: llm-d-router v0.10's
/// "optimized baseline" (the v1.4+ weights, queue 2, KV 2, prefix 3, plus
/// `no-hit-lru-scorer` at 2). The routing-quality benchmark chose it (docs/benchmarks.md,
/// "The built-in default"): without the no-hit LRU scorer, prompt groups that no server holds
/// yet can land two to one, and on real vLLM the groups then split between servers.
pub const DEFAULT_CONFIG: &str = "\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: no-hit-lru-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: no-hit-lru-scorer
    weight: 2
";

/// What went wrong, without the origin (see [`ConfigError`]).
#[derive(Debug, thiserror::Error)]
pub enum ConfigErrorKind {
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Io(#[source] std::io::Error),
    /// YAML syntax, an unknown or duplicate field, or a wrongly typed value.
    #[error("{0}")]
    Decode(#[source] serde_yaml::Error),
    /// Unsupported `apiVersion`.
    #[error("apiVersion '{0}' is not supported (use one of: {versions})", versions = file::API_VERSIONS.join(", "))]
    ApiVersion(String),
    /// Wrong `kind`.
    #[error("kind '{0}' is not supported (use {k})", k = file::KIND)]
    Kind(String),
    /// A feature gate entry that is unknown, malformed or not supported.
    #[error("featureGates: {0}")]
    Gate(#[source] gates::GateError),
    /// A section or field this EPP reads but cannot act on.
    #[error("{field}: {why}")]
    Unsupported {
        /// The field, as a path (`flowControl.maxRequests`).
        field: String,
        /// Why, and what to do.
        why: String,
    },
    /// A plugin that plays no part once the configuration is wired.
    #[error(
        "plugin '{name}' (type '{type_name}', {roles}) is declared but takes no part: reference it from a scheduling profile or the section that uses it, or remove it"
    )]
    Unused {
        /// Plugin name.
        name: String,
        /// Plugin type.
        type_name: String,
        /// Its roles.
        roles: String,
    },
    /// A producer no plugin reads from.
    #[error(
        "plugin '{name}' (type '{type_name}') produces data no plugin reads: add a plugin that uses it (e.g. a scorer naming it), or remove it"
    )]
    Unread {
        /// Plugin name.
        name: String,
        /// Plugin type.
        type_name: String,
    },
    /// A consumer whose producer cannot be settled.
    #[error("plugin '{consumer}' reads {kind}, but {detail}")]
    Producer {
        /// The consumer.
        consumer: String,
        /// What it reads.
        kind: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A reference to a plugin without the role the reference needs.
    #[error("{context}: plugin '{plugin}' is not a {wanted}")]
    WrongRole {
        /// Where the reference is.
        context: String,
        /// The plugin referenced.
        plugin: String,
        /// The role needed.
        wanted: &'static str,
    },
    /// Two writers of one endpoint attribute.
    #[error(
        "endpoint attribute {key} would have two writers, '{first}' and '{second}': a data source must not overwrite another's data"
    )]
    TwoWriters {
        /// The attribute.
        key: String,
        /// First writer.
        first: String,
        /// Second writer.
        second: String,
    },
    /// A plugin without `type`.
    #[error("plugins[{index}]: plugin definition for '{name}' is missing a type")]
    MissingType {
        /// Position in `plugins`.
        index: usize,
        /// The name, if any.
        name: String,
    },
    /// Two plugins with one name.
    #[error("plugins: duplicate plugin name '{0}'")]
    DuplicatePlugin(String),
    /// The plugin factory refused the entry.
    #[error("plugin '{name}' (type '{type_name}'): {source}")]
    Plugin {
        /// Plugin name.
        name: String,
        /// Plugin type.
        type_name: String,
        /// Why.
        #[source]
        source: crate::plugins::PluginError,
    },
    /// A profile without a name.
    #[error("schedulingProfiles[{0}]: profile name must not be empty")]
    EmptyProfileName(usize),
    /// Two profiles with one name.
    #[error("schedulingProfiles: duplicate profile name '{0}'")]
    DuplicateProfile(String),
    /// A profile entry without `pluginRef`.
    #[error("profile '{profile}': plugins[{index}] has an empty pluginRef")]
    EmptyRef {
        /// Profile name.
        profile: String,
        /// Position in the profile.
        index: usize,
    },
    /// A `pluginRef` naming no plugin.
    #[error("{context}: '{plugin_ref}' is a reference to an undefined plugin")]
    UndefinedRef {
        /// Where the reference is (profile, data layer, ...).
        context: String,
        /// The name referenced.
        plugin_ref: String,
    },
    /// More than one picker in a profile.
    #[error("profile '{profile}' has two pickers, '{first}' and '{second}'; a profile takes exactly one")]
    TwoPickers {
        /// Profile name.
        profile: String,
        /// First picker.
        first: String,
        /// Second picker.
        second: String,
    },
    /// A weight that is not a finite number.
    #[error("profile '{profile}': weight of '{plugin}' must be a finite number")]
    BadWeight {
        /// Profile name.
        profile: String,
        /// Plugin name.
        plugin: String,
    },
    /// No or several profile handlers.
    #[error("{0}")]
    ProfileHandler(String),
}

/// A configuration error together with where the configuration came from.
#[derive(Debug, thiserror::Error)]
#[error("config {origin}: {kind}")]
pub struct ConfigError {
    /// File path, or `--config-text`.
    pub origin: String,
    /// What is wrong.
    #[source]
    pub kind: ConfigErrorKind,
}

/// A decoded configuration and where it came from.
#[derive(Debug, Clone)]
pub struct EndpointPickerConfig {
    /// File path, `--config-text`, or `built-in default`.
    pub origin: String,
    /// The document.
    pub file: ConfigFile,
}

impl EndpointPickerConfig {
    /// Decodes and checks a document; `origin` names it in errors.
    pub fn from_text(text: &str, origin: impl Into<String>) -> Result<Self, ConfigError> {
        let origin = origin.into();
        let err = |kind| ConfigError {
            origin: origin.clone(),
            kind,
        };
        let file: ConfigFile = serde_yaml::from_str(text).map_err(|e| err(ConfigErrorKind::Decode(e)))?;
        if !file::API_VERSIONS.contains(&file.api_version.as_str()) {
            return Err(err(ConfigErrorKind::ApiVersion(file.api_version)));
        }
        if file.kind != file::KIND {
            return Err(err(ConfigErrorKind::Kind(file.kind)));
        }
        Ok(Self { origin, file })
    }

    /// Reads and decodes a file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: origin.clone(),
            kind: ConfigErrorKind::Io(e),
        })?;
        Self::from_text(&text, origin)
    }

    /// The built-in default ([`DEFAULT_CONFIG`]: queue 2, KV 2, prefix 3, no-hit LRU 2).
    pub fn builtin_default() -> Result<Self, ConfigError> {
        Self::from_text(DEFAULT_CONFIG, "built-in default")
    }
}

#[cfg(test)]
mod tests;
