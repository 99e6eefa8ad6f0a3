//! The `flowControl` section (GIE v1.4–v1.5, llm-d-router v0.10): limits, the TTL, priority
//! bands and the policies they name, resolved once at start-up.
//!
//! With the `flowControl` gate off the reference ignores every setting of the section but the
//! saturation detector (with a warning); this EPP refuses them instead, naming the field, so
//! that an operator does not believe in limits nothing enforces. With the gate on:
//! * policies are found by plugin *name*; a band without `fairnessPolicyRef` /
//!   `orderingPolicyRef` uses `global-strict-fairness-policy` / `fcfs-ordering-policy`, and
//!   without `usageLimitPolicyPluginRef` the section uses `static-usage-limit-policy`; a
//!   referenced default name that is not declared is added with default parameters (as v0.10's
//!   `ensureFlowControlLayer` does);
//! * `priorityBands` entries need a `priority`, each at most once; priority 0 always has a
//!   band (from `defaultPriorityBand` when not listed); the templates take no `priority`;
//! * quantities are Kubernetes quantities; `defaultRequestTTL: 0s` disables the TTL;
//! * `enableEviction: true` (v0.10 alpha: evicting sheddable requests already running) is
//!   refused: it is not built.

use std::sync::Arc;

use super::build::Instance;
use super::cli::go_duration;
use super::file::PriorityBandSpec;
use super::gates::FeatureGates;
use super::{ConfigError, ConfigErrorKind, EndpointPickerConfig};
use crate::flowcontrol::config::{
    BandConfig, DEFAULT_BAND_MAX_BYTES, DEFAULT_BAND_MAX_REQUESTS, DEFAULT_TTL, FlowControlConfig, Policy,
    quantity,
};
use crate::framework::plugin::{PluginMetrics, PluginRoles};
use crate::plugins::{self, Defaults};

struct Resolver<'a> {
    cfg: &'a EndpointPickerConfig,
    instances: &'a mut Vec<Instance>,
    defaults: &'a Defaults,
    metrics: &'a PluginMetrics,
}

impl Resolver<'_> {
    fn unsupported(&self, field: impl Into<String>, why: impl Into<String>) -> ConfigError {
        self.cfg.error(ConfigErrorKind::Unsupported {
            field: field.into(),
            why: why.into(),
        })
    }

    /// The plugin named `name` (or `default` when unset) in the role `role` picks out.
    fn policy<T: ?Sized>(
        &mut self,
        context: &str,
        name: Option<&str>,
        default: &str,
        wanted: &'static str,
        role: impl Fn(&PluginRoles) -> Option<Arc<T>>,
    ) -> Result<Policy<T>, ConfigError> {
        let name = name.filter(|n| !n.is_empty()).unwrap_or(default);
        if name == default && !self.instances.iter().any(|i| &*i.name == name) {
            let inst = self.cfg.implicit(default, self.defaults, self.metrics)?;
            self.instances.push(inst);
        }
        let Some(inst) = self.instances.iter_mut().find(|i| &*i.name == name) else {
            return Err(self.cfg.error(ConfigErrorKind::UndefinedRef {
                context: context.to_owned(),
                plugin_ref: name.to_owned(),
            }));
        };
        let Some(plugin) = role(&inst.roles) else {
            return Err(self.cfg.error(ConfigErrorKind::WrongRole {
                context: context.to_owned(),
                plugin: inst.name.to_string(),
                wanted,
            }));
        };
        inst.used = true;
        Ok(Policy {
            name: inst.name.clone(),
            plugin,
        })
    }

    fn limit(
        &self,
        field: &str,
        value: Option<&serde_yaml::Value>,
        default: u64,
    ) -> Result<u64, ConfigError> {
        match value.map(quantity).transpose() {
            Ok(Some(0) | None) => Ok(default),
            Ok(Some(v)) => Ok(v),
            Err(why) => Err(self.unsupported(field, why)),
        }
    }

    fn band(&mut self, field: &str, spec: &PriorityBandSpec) -> Result<BandConfig, ConfigError> {
        Ok(BandConfig {
            max_bytes: self.limit(
                &format!("{field}.maxBytes"),
                spec.max_bytes.as_ref(),
                DEFAULT_BAND_MAX_BYTES,
            )?,
            max_requests: self.limit(
                &format!("{field}.maxRequests"),
                spec.max_requests.as_ref(),
                DEFAULT_BAND_MAX_REQUESTS,
            )?,
            fairness: self.policy(
                &format!("{field}.fairnessPolicyRef"),
                spec.fairness_policy_ref.as_deref(),
                plugins::DEFAULT_FAIRNESS_POLICY,
                "fairness policy",
                |r| r.fairness.clone(),
            )?,
            ordering: self.policy(
                &format!("{field}.orderingPolicyRef"),
                spec.ordering_policy_ref.as_deref(),
                plugins::DEFAULT_ORDERING_POLICY,
                "ordering policy",
                |r| r.ordering.clone(),
            )?,
        })
    }

    fn template(&mut self, field: &str, spec: &PriorityBandSpec) -> Result<BandConfig, ConfigError> {
        if spec.priority.is_some() {
            return Err(self.unsupported(
                format!("{field}.priority"),
                "a template applies to every priority without a listed band; list a band with this priority under priorityBands instead",
            ));
        }
        self.band(field, spec)
    }
}

/// The section of `cfg` resolved over `instances` (adding default policies), or `None` with
/// the gate off.
pub(super) fn plan(
    cfg: &EndpointPickerConfig,
    gates: &FeatureGates,
    instances: &mut Vec<Instance>,
    defaults: &Defaults,
    metrics: &PluginMetrics,
) -> Result<Option<FlowControlConfig>, ConfigError> {
    let spec = cfg.file.flow_control.clone().unwrap_or_default();
    let mut r = Resolver {
        cfg,
        instances,
        defaults,
        metrics,
    };
    if !gates.flow_control {
        if let Some(field) = spec.settings().first() {
            return Err(r.unsupported(
                format!("flowControl.{field}"),
                "set while the flowControl feature gate is off, so nothing would enforce it (the reference ignores it then); add flowControl to featureGates, or remove the setting (flowControl.saturationDetector acts without the gate)",
            ));
        }
        return Ok(None);
    }
    if spec.enable_eviction {
        return Err(r.unsupported(
            "flowControl.enableEviction",
            "evicting sheddable requests already sent to a model server (v0.10 alpha) is not built; remove it",
        ));
    }
    let max_bytes = r.limit("flowControl.maxBytes", spec.max_bytes.as_ref(), 0)?;
    let max_requests = r.limit("flowControl.maxRequests", spec.max_requests.as_ref(), 0)?;
    let ttl = match spec.default_request_ttl.as_deref() {
        None => Some(DEFAULT_TTL),
        Some(text) => match go_duration(text) {
            Ok(d) if d.is_zero() => None,
            Ok(d) => Some(d),
            Err(why) => return Err(r.unsupported("flowControl.defaultRequestTTL", why)),
        },
    };
    let default_band = r.template(
        "flowControl.defaultPriorityBand",
        &spec.default_priority_band.clone().unwrap_or_default(),
    )?;
    let negative_band = match &spec.default_negative_priority_band {
        Some(b) => Some(r.template("flowControl.defaultNegativePriorityBand", b)?),
        None => None,
    };
    let mut bands: Vec<(i32, BandConfig)> = Vec::with_capacity(spec.priority_bands.len() + 1);
    for (i, b) in spec.priority_bands.iter().enumerate() {
        let field = format!("flowControl.priorityBands[{i}]");
        let Some(priority) = b.priority else {
            return Err(r.unsupported(format!("{field}.priority"), "a listed band needs its priority"));
        };
        if bands.iter().any(|(p, _)| *p == priority) {
            return Err(r.unsupported(field, format!("duplicate priority level {priority}")));
        }
        bands.push((priority, r.band(&field, b)?));
    }
    if !bands.iter().any(|(p, _)| *p == 0) {
        bands.push((0, default_band.clone()));
    }
    bands.sort_by_key(|(p, _)| std::cmp::Reverse(*p));
    let usage_limit = r.policy(
        "flowControl.usageLimitPolicyPluginRef",
        spec.usage_limit_policy_plugin_ref.as_deref(),
        plugins::DEFAULT_USAGE_LIMIT_POLICY,
        "usage limit policy",
        |roles| roles.usage_limit.clone(),
    )?;
    Ok(Some(FlowControlConfig {
        max_bytes,
        max_requests,
        ttl,
        bands,
        default_band,
        negative_band,
        usage_limit,
    }))
}
