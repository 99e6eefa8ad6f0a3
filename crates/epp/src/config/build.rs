//! From the document to running plugins: instantiation, producer bindings, the reference's
//! defaulting rules, and validation. Everything here runs before any port is bound.
//!
//! Defaulting follows the reference (GIE v1.0 baseline, v1.3+ where it fixed bugs, llm-d-router
//! v0.10 where they disagree), made deterministic where the reference depends on Go map order:
//! 1. a plugin without `name` is named after its `type`;
//! 2. consumers are bound to producers (see [`crate::plugins::consumes`]); a missing producer
//!    a consumer needs is added under its type name, with the parameters an older consumer
//!    carried for it;
//! 3. no profiles → one profile `default` with every filter, scorer and picker, in the order
//!    of `plugins`;
//! 4. one profile and no profile handler → `single-profile-handler` is added;
//! 5. the default picker is the first picker in `plugins`, else a new `max-score-picker`;
//! 6. in each profile a scorer without weight gets 1 (also after the picker), and a profile
//!    without picker gets the default picker;
//! 7. the saturation detector, parsers and data layer follow (see [`super::datalayer`]).
//!
//! A plugin that ends up with no part to play (not in a profile, not referenced, not a
//! producer) is refused: it would be accepted and then ignored.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::datalayer::{self, DataPlan};
use super::flowcontrol;
use super::gates::FeatureGates;
use super::{ConfigError, ConfigErrorKind, EndpointPickerConfig};
use crate::datalayer::StoreHook;
use crate::datalayer::collector::Sources;
use crate::flowcontrol::config::FlowControlConfig;
use crate::framework::plugin::{Background, DataKind, Named, PluginMetrics, PluginRoles};
use crate::framework::requestcontrol::{EndpointsChanged, SaturationDetector};
use crate::framework::scheduling::{Filter, Picker, ProfileHandler};
use crate::plugins::{self, BuildContext, Defaults, PluginError};
use crate::requestcontrol::RequestControl;
use crate::scheduling::{Profile, Scheduler, WeightedScorer};

/// A profile as written: name and `(pluginRef, weight)` entries.
type ProfileEntries = (String, Vec<(String, Option<f64>)>);

/// Everything the configuration builds.
pub struct PluginSet {
    /// The scheduler (profiles and handler).
    pub scheduler: Scheduler,
    /// The director's plugins.
    pub control: RequestControl,
    /// Plugins told about endpoint-set changes.
    pub endpoints_changed: Vec<Named<dyn EndpointsChanged>>,
    /// Data sources and their extractors.
    pub sources: Sources,
    /// Plugins keeping per-endpoint state in the snapshot.
    pub store_hooks: Vec<Arc<dyn StoreHook>>,
    /// Plugins' own tasks, run from start-up until shutdown.
    pub background: Vec<Arc<dyn Background>>,
    /// Plugin-owned metric families.
    pub metrics: PluginMetrics,
    /// The feature gates.
    pub gates: FeatureGates,
    /// Flow control, with the `flowControl` gate on.
    pub flow_control: Option<FlowControlConfig>,
    /// Every instance, `(name, type)`, in configuration order then added ones.
    pub instances: Vec<(Arc<str>, Arc<str>)>,
}

impl std::fmt::Debug for PluginSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginSet")
            .field("scheduler", &self.scheduler)
            .field("control", &self.control)
            .field("instances", &self.instances)
            .finish_non_exhaustive()
    }
}

/// One plugin entry before instantiation.
#[derive(Debug, Clone)]
pub(super) struct Spec {
    pub name: String,
    pub type_name: String,
    pub params: serde_yaml::Value,
    /// Added by the defaulting rules rather than written.
    pub implicit: bool,
    pub bindings: BTreeMap<DataKind, String>,
}

/// One instantiated plugin.
pub(super) struct Instance {
    pub name: Arc<str>,
    pub type_name: Arc<str>,
    pub roles: PluginRoles,
    pub implicit: bool,
    /// Whether something uses it (set while wiring).
    pub used: bool,
}

impl Instance {
    pub fn named<T: ?Sized>(&self, plugin: &Arc<T>) -> Named<T> {
        Named::new(self.name.clone(), self.type_name.clone(), plugin.clone())
    }
}

impl EndpointPickerConfig {
    pub(super) fn error(&self, kind: ConfigErrorKind) -> ConfigError {
        ConfigError {
            origin: self.origin.clone(),
            kind,
        }
    }

    fn plugin_error(&self, name: &str, type_name: &str, source: PluginError) -> ConfigError {
        self.error(ConfigErrorKind::Plugin {
            name: name.to_owned(),
            type_name: type_name.to_owned(),
            source,
        })
    }

    /// Builds every plugin with `defaults`; `seed` fixes tie-breaks (tests).
    pub fn build(&self, defaults: &Defaults, seed: Option<u64>) -> Result<PluginSet, ConfigError> {
        let gates = FeatureGates::parse(&self.file.feature_gates)
            .map_err(|e| self.error(ConfigErrorKind::Gate(e)))?;
        let mut defaults = defaults.clone();
        defaults.extractor.legacy_freshness |= gates.legacy_metrics;
        self.check_unsupported()?;
        let mut specs = self.specs()?;
        self.bind(&mut specs)?;
        let read: Vec<String> = specs.iter().flat_map(|s| s.bindings.values().cloned()).collect();
        if let Some(unread) = specs
            .iter()
            .find(|s| !plugins::produces(&s.type_name).is_empty() && !read.contains(&s.name))
        {
            return Err(self.error(ConfigErrorKind::Unread {
                name: unread.name.clone(),
                type_name: unread.type_name.clone(),
            }));
        }
        let metrics = PluginMetrics::default();
        let mut instances = Vec::with_capacity(specs.len() + 4);
        for spec in &specs {
            instances.push(self.instantiate(spec, &defaults, &metrics)?);
        }
        let scheduler = self.scheduling(&mut instances, &defaults, &metrics, seed)?;
        let saturation = self.saturation_detector(&mut instances, &defaults, &metrics)?;
        let flow_control = flowcontrol::plan(self, &gates, &mut instances, &defaults, &metrics)?;
        self.parsers(&mut instances, &defaults, &metrics)?;
        let DataPlan { sources } = datalayer::plan(self, &mut instances, &defaults, &metrics)?;

        let mut control = RequestControl {
            saturation,
            producers: Vec::new(),
            pre_request: Vec::new(),
        };
        let mut endpoints_changed = Vec::new();
        let mut store_hooks: Vec<Arc<dyn StoreHook>> = Vec::new();
        let mut background: Vec<Arc<dyn Background>> = Vec::new();
        for inst in &mut instances {
            let r = &inst.roles;
            if let Some(p) = &r.producer {
                control.producers.push(inst.named(p));
                inst.used |= !r.serves_scorer;
            }
            if let Some(p) = &r.pre_request {
                control.pre_request.push(inst.named(p));
                inst.used |= !r.serves_scorer;
            }
            if let Some(p) = &r.endpoints_changed {
                endpoints_changed.push(inst.named(p));
            }
            if let Some(h) = &r.store_hook {
                store_hooks.push(h.clone());
            }
            if let Some(b) = &r.background {
                background.push(b.clone());
            }
        }
        // Producers run in the order of what they produce: tokens, then prefix matches (read
        // by in-flight accounting), then the rest, each group in configuration order.
        let rank = |name: &str| {
            let produced = instances
                .iter()
                .find(|i| &*i.name == name)
                .map_or(&[][..], |i| i.roles.produces.as_slice());
            if produced.contains(&DataKind::TokenizedPrompt) {
                0
            } else if produced.contains(&DataKind::PrefixMatch) {
                1
            } else {
                2
            }
        };
        control.producers.sort_by_key(|p| rank(&p.name));
        let profiles: Vec<&str> = scheduler.profiles().iter().map(|p| &*p.name).collect();
        for inst in &instances {
            if let Some((param, p)) = inst
                .roles
                .profile_refs
                .iter()
                .find(|(_, p)| !profiles.contains(&p.as_str()))
            {
                return Err(self.error(ConfigErrorKind::Unsupported {
                    field: format!("plugins[{}].parameters.{param}", inst.name),
                    why: format!(
                        "names profile '{p}', which is not among schedulingProfiles ({})",
                        profiles.join(", ")
                    ),
                }));
            }
        }
        if let Some(idle) = instances.iter().find(|i| !i.used) {
            return Err(self.error(ConfigErrorKind::Unused {
                name: idle.name.to_string(),
                type_name: idle.type_name.to_string(),
                roles: idle.roles.role_names().join(", "),
            }));
        }
        Ok(PluginSet {
            scheduler,
            control,
            endpoints_changed,
            sources,
            store_hooks,
            background,
            metrics,
            gates,
            flow_control,
            instances: instances
                .iter()
                .map(|i| (i.name.clone(), i.type_name.clone()))
                .collect(),
        })
    }

    /// The scheduler alone, with flag defaults for everything else (tests and benches).
    pub fn build_scheduler(&self, seed: Option<u64>) -> Result<Scheduler, ConfigError> {
        Ok(self.build(&Defaults::builtin(), seed)?.scheduler)
    }

    /// Sections this EPP reads but cannot act on yet are refused by name.
    fn check_unsupported(&self) -> Result<(), ConfigError> {
        let f = &self.file;
        let refuse = |field: String, why: &str| {
            Err(self.error(ConfigErrorKind::Unsupported {
                field,
                why: why.to_owned(),
            }))
        };
        if let Some(sd) = f
            .flow_control
            .as_ref()
            .and_then(|fc| fc.saturation_detector.as_ref())
            && sd.has_thresholds()
        {
            return refuse(
                "flowControl.saturationDetector".into(),
                "only pluginRef is allowed here; set thresholds as the detector plugin's parameters",
            );
        }
        let has = |t: &str| f.plugins.iter().any(|p| p.type_name == t);
        if has("precise-prefix-cache-scorer") && has("precise-prefix-cache-producer") {
            return refuse(
                "plugins".into(),
                "precise-prefix-cache-scorer (deprecated) beside a precise-prefix-cache-producer would keep two indexes; use a prefix-cache-scorer with prefixMatchInfoProducerName naming the producer",
            );
        }
        if f.data.is_some() && f.data_layer.is_some() {
            return refuse(
                "data".into(),
                "both data (GIE v1.3–v1.4) and dataLayer (v1.5+) are set; keep dataLayer",
            );
        }
        if let Some(dl) = f.data_layer.as_ref().or(f.data.as_ref()) {
            if dl.discovery.is_some() {
                return refuse(
                    "dataLayer.discovery".into(),
                    "endpoint discovery plugins are not supported; use --static-endpoints, --endpoints-file or Kubernetes discovery",
                );
            }
            if dl.cross_replica_syncer_plugin_ref.is_some() || dl.cross_replica_sync_interval.is_some() {
                return refuse(
                    "dataLayer.crossReplicaSyncerPluginRef".into(),
                    "cross-replica state sync is not supported: each replica keeps its own state",
                );
            }
        }
        if f.parser.is_some() && f.request_handler.as_ref().is_some_and(|r| !r.parsers.is_empty()) {
            tracing::info!(
                "both parser (deprecated) and requestHandler.parsers are set; requestHandler.parsers is used, as llm-d-router v0.10 does"
            );
        }
        Ok(())
    }

    /// Named, checked entries of `plugins`.
    fn specs(&self) -> Result<Vec<Spec>, ConfigError> {
        let mut specs: Vec<Spec> = Vec::with_capacity(self.file.plugins.len());
        for (index, spec) in self.file.plugins.iter().enumerate() {
            let name = spec.name.clone().filter(|n| !n.is_empty());
            if spec.type_name.is_empty() {
                return Err(self.error(ConfigErrorKind::MissingType {
                    index,
                    name: name.unwrap_or_default(),
                }));
            }
            let name = name.unwrap_or_else(|| spec.type_name.clone());
            if specs.iter().any(|s| s.name == name) {
                return Err(self.error(ConfigErrorKind::DuplicatePlugin(name)));
            }
            if !plugins::KNOWN_TYPES.contains(&spec.type_name.as_str()) {
                return Err(self.plugin_error(
                    &name,
                    &spec.type_name,
                    PluginError::UnknownType(spec.type_name.clone()),
                ));
            }
            specs.push(Spec {
                name,
                type_name: spec.type_name.clone(),
                params: spec.parameters.clone(),
                implicit: false,
                bindings: BTreeMap::new(),
            });
        }
        Ok(specs)
    }

    pub(super) fn instantiate(
        &self,
        spec: &Spec,
        defaults: &Defaults,
        metrics: &PluginMetrics,
    ) -> Result<Instance, ConfigError> {
        let ctx = BuildContext {
            name: &spec.name,
            defaults,
            metrics,
            bindings: &spec.bindings,
        };
        let roles = plugins::build(&spec.type_name, &spec.params, &ctx)
            .map_err(|source| self.plugin_error(&spec.name, &spec.type_name, source))?;
        Ok(Instance {
            name: spec.name.as_str().into(),
            type_name: spec.type_name.as_str().into(),
            roles,
            implicit: spec.implicit,
            used: false,
        })
    }

    /// A plugin the defaulting rules add, named after its type.
    pub(super) fn implicit(
        &self,
        type_name: &str,
        defaults: &Defaults,
        metrics: &PluginMetrics,
    ) -> Result<Instance, ConfigError> {
        self.instantiate(
            &Spec {
                name: type_name.to_owned(),
                type_name: type_name.to_owned(),
                params: serde_yaml::Value::Null,
                implicit: true,
                bindings: BTreeMap::new(),
            },
            defaults,
            metrics,
        )
    }

    fn scheduling(
        &self,
        instances: &mut Vec<Instance>,
        defaults: &Defaults,
        metrics: &PluginMetrics,
        seed: Option<u64>,
    ) -> Result<Scheduler, ConfigError> {
        let file = &self.file;
        let mut profile_specs: Vec<ProfileEntries> = file
            .scheduling_profiles
            .iter()
            .map(|p| {
                let refs = p
                    .plugins
                    .iter()
                    .map(|r| (r.plugin_ref.clone(), r.weight))
                    .collect();
                (p.name.clone(), refs)
            })
            .collect();
        if profile_specs.is_empty() {
            let refs = instances
                .iter()
                .filter(|i| !i.implicit && i.roles.is_profile_member())
                .map(|i| (i.name.to_string(), None))
                .collect();
            profile_specs.push(("default".to_owned(), refs));
        }
        for (index, (name, _)) in profile_specs.iter().enumerate() {
            if name.is_empty() {
                return Err(self.error(ConfigErrorKind::EmptyProfileName(index)));
            }
            if profile_specs[..index].iter().any(|(n, _)| n == name) {
                return Err(self.error(ConfigErrorKind::DuplicateProfile(name.clone())));
            }
        }
        let handler = self.profile_handler(instances, profile_specs.len(), defaults, metrics)?;
        let default_picker = match instances.iter().position(|i| i.roles.picker.is_some()) {
            Some(i) => i,
            None => {
                let inst = self.implicit(plugins::DEFAULT_PICKER, defaults, metrics)?;
                instances.push(inst);
                instances.len() - 1
            }
        };
        let mut profiles: Vec<Profile> = Vec::with_capacity(profile_specs.len());
        for (name, refs) in &profile_specs {
            profiles.push(self.profile(name, refs, instances, default_picker)?);
        }
        Ok(Scheduler::new(profiles, handler, seed))
    }

    /// The one profile handler, adding `single-profile-handler` for a single profile.
    fn profile_handler(
        &self,
        instances: &mut Vec<Instance>,
        profiles: usize,
        defaults: &Defaults,
        metrics: &PluginMetrics,
    ) -> Result<Named<dyn ProfileHandler>, ConfigError> {
        let handlers: Vec<usize> = (0..instances.len())
            .filter(|i| instances[*i].roles.profile_handler.is_some())
            .collect();
        let index = match handlers.as_slice() {
            [] if profiles == 1 => {
                instances.push(self.implicit(plugins::DEFAULT_PROFILE_HANDLER, defaults, metrics)?);
                instances.len() - 1
            }
            [] => {
                return Err(self.error(ConfigErrorKind::ProfileHandler(format!(
                    "no profile handler was specified for {profiles} profiles"
                ))));
            }
            [one] => *one,
            many => {
                let names: Vec<&str> = many.iter().map(|i| &*instances[*i].name).collect();
                return Err(self.error(ConfigErrorKind::ProfileHandler(format!(
                    "only one profile handler is allowed, found: {}",
                    names.join(", ")
                ))));
            }
        };
        let inst = &mut instances[index];
        inst.used = true;
        if &*inst.type_name == plugins::DEFAULT_PROFILE_HANDLER && profiles > 1 {
            return Err(self.error(ConfigErrorKind::ProfileHandler(format!(
                "profile handler '{}' (single-profile-handler) cannot run {profiles} profiles",
                inst.name
            ))));
        }
        let Some(h) = &inst.roles.profile_handler else {
            return Err(self.error(ConfigErrorKind::ProfileHandler("handler without the role".into())));
        };
        Ok(inst.named(h))
    }

    fn profile(
        &self,
        name: &str,
        refs: &[(String, Option<f64>)],
        instances: &mut [Instance],
        default_picker: usize,
    ) -> Result<Profile, ConfigError> {
        let by_name: HashMap<&str, usize> =
            instances.iter().enumerate().map(|(i, x)| (&*x.name, i)).collect();
        let mut filters: Vec<Named<dyn Filter>> = Vec::new();
        let mut scorers: Vec<WeightedScorer> = Vec::new();
        let mut picker: Option<Named<dyn Picker>> = None;
        let mut used = Vec::new();
        for (index, (plugin_ref, weight)) in refs.iter().enumerate() {
            if plugin_ref.is_empty() {
                return Err(self.error(ConfigErrorKind::EmptyRef {
                    profile: name.to_owned(),
                    index,
                }));
            }
            let Some(&at) = by_name.get(plugin_ref.as_str()) else {
                return Err(self.error(ConfigErrorKind::UndefinedRef {
                    context: format!("profile '{name}'"),
                    plugin_ref: plugin_ref.clone(),
                }));
            };
            let inst = &instances[at];
            used.push(at);
            if let Some(f) = &inst.roles.filter {
                filters.push(inst.named(f));
            }
            if let Some(s) = &inst.roles.scorer {
                let weight = weight.unwrap_or(1.0);
                if !weight.is_finite() {
                    return Err(self.error(ConfigErrorKind::BadWeight {
                        profile: name.to_owned(),
                        plugin: plugin_ref.clone(),
                    }));
                }
                scorers.push(WeightedScorer {
                    scorer: inst.named(s),
                    weight,
                });
            }
            if let Some(p) = &inst.roles.picker {
                if let Some(first) = &picker {
                    return Err(self.error(ConfigErrorKind::TwoPickers {
                        profile: name.to_owned(),
                        first: first.name.to_string(),
                        second: inst.name.to_string(),
                    }));
                }
                picker = Some(inst.named(p));
            }
            if !inst.roles.is_profile_member() {
                return Err(self.error(ConfigErrorKind::WrongRole {
                    context: format!("profile '{name}'"),
                    plugin: inst.name.to_string(),
                    wanted: "filter, scorer or picker (a profile runs nothing else; reference it from the section that uses it)",
                }));
            }
            if weight.is_some() && inst.roles.scorer.is_none() {
                return Err(self.error(ConfigErrorKind::Unsupported {
                    field: format!("schedulingProfiles[{name}].plugins[{plugin_ref}].weight"),
                    why: "only a scorer's weight acts; remove it".into(),
                }));
            }
        }
        let picker = match picker {
            Some(p) => p,
            None => {
                used.push(default_picker);
                let inst = &instances[default_picker];
                let Some(p) = &inst.roles.picker else {
                    return Err(self.error(ConfigErrorKind::ProfileHandler("picker without the role".into())));
                };
                inst.named(p)
            }
        };
        for at in used {
            let inst = &mut instances[at];
            if inst.roles.is_profile_member() {
                inst.used = true;
            }
        }
        Ok(Profile {
            name: name.into(),
            filters,
            scorers,
            picker,
        })
    }

    /// The admission detector: `flowControl.saturationDetector` (v0.10), else the top-level
    /// `saturationDetector` (deprecated in v0.10), else a plugin named `utilization-detector`,
    /// else one added with the flag and environment defaults.
    fn saturation_detector(
        &self,
        instances: &mut Vec<Instance>,
        defaults: &Defaults,
        metrics: &PluginMetrics,
    ) -> Result<Named<dyn SaturationDetector>, ConfigError> {
        let f = &self.file;
        let nested = f
            .flow_control
            .as_ref()
            .and_then(|fc| fc.saturation_detector.as_ref());
        let (context, reference) = match (
            nested.and_then(|s| s.plugin_ref.as_deref()),
            &f.saturation_detector,
        ) {
            (Some(r), _) => ("flowControl.saturationDetector", Some(r)),
            (None, Some(top)) => {
                if top.plugin_ref.is_some() && top.has_thresholds() {
                    return Err(self.error(ConfigErrorKind::Unsupported {
                        field: "saturationDetector".into(),
                        why: "set either pluginRef (v1.5+) or the v1.2–v1.4 thresholds, not both; thresholds go into the plugin's parameters".into(),
                    }));
                }
                ("saturationDetector", top.plugin_ref.as_deref())
            }
            (None, None) => ("saturationDetector", None),
        };
        let inline = f.saturation_detector.as_ref().is_some_and(|s| s.has_thresholds());
        let declared = instances
            .iter()
            .any(|i| &*i.type_name == plugins::DEFAULT_SATURATION_DETECTOR && !i.implicit);
        if inline && (reference.is_some_and(|r| !r.is_empty()) || declared) {
            return Err(self.error(ConfigErrorKind::Unsupported {
                field: "saturationDetector".into(),
                why: "the v1.2–v1.4 thresholds configure the detector added when none is declared; with detector plugins, set them as the plugin's parameters".into(),
            }));
        }
        let index = match reference.filter(|r| !r.is_empty()) {
            // v0.10 adds the default detector a reference names when it is not declared.
            Some(r)
                if r == plugins::DEFAULT_SATURATION_DETECTOR && !instances.iter().any(|i| &*i.name == r) =>
            {
                instances.push(self.implicit(plugins::DEFAULT_SATURATION_DETECTOR, defaults, metrics)?);
                instances.len() - 1
            }
            Some(r) => instances.iter().position(|i| &*i.name == r).ok_or_else(|| {
                self.error(ConfigErrorKind::UndefinedRef {
                    context: context.to_owned(),
                    plugin_ref: r.to_owned(),
                })
            })?,
            None => match instances
                .iter()
                .position(|i| &*i.name == plugins::DEFAULT_SATURATION_DETECTOR)
            {
                Some(i) => i,
                None => {
                    instances.push(self.implicit(plugins::DEFAULT_SATURATION_DETECTOR, defaults, metrics)?);
                    instances.len() - 1
                }
            },
        };
        let inst = &mut instances[index];
        let Some(d) = &inst.roles.saturation else {
            return Err(self.error(ConfigErrorKind::WrongRole {
                context: context.to_owned(),
                plugin: inst.name.to_string(),
                wanted: "saturation detector",
            }));
        };
        inst.used = true;
        Ok(inst.named(d))
    }

    /// The request parsers: `requestHandler.parsers` (v0.10), else `parser` (v1.5), else
    /// `openai-parser`. Each must be a parser this EPP has.
    fn parsers(
        &self,
        instances: &mut Vec<Instance>,
        defaults: &Defaults,
        metrics: &PluginMetrics,
    ) -> Result<(), ConfigError> {
        let f = &self.file;
        let mut refs: Vec<(&'static str, &str)> = f
            .request_handler
            .iter()
            .flat_map(|r| &r.parsers)
            .map(|p| ("requestHandler.parsers", p.plugin_ref.as_str()))
            .collect();
        if refs.is_empty()
            && let Some(p) = &f.parser
        {
            refs.push(("parser", p.plugin_ref.as_str()));
        }
        if refs.is_empty() {
            if !instances.iter().any(|i| &*i.name == plugins::DEFAULT_PARSER) {
                instances.push(self.implicit(plugins::DEFAULT_PARSER, defaults, metrics)?);
            }
            refs.push(("parser", plugins::DEFAULT_PARSER));
        }
        let listed = refs.len();
        for (context, r) in refs {
            // v0.10 (and GIE v1.5 for `parser`) adds a parser a reference names by its type.
            if !instances.iter().any(|i| &*i.name == r) && r == plugins::DEFAULT_PARSER {
                instances.push(self.implicit(r, defaults, metrics)?);
            }
            let Some(inst) = instances.iter_mut().find(|i| &*i.name == r) else {
                return Err(self.error(ConfigErrorKind::UndefinedRef {
                    context: context.to_owned(),
                    plugin_ref: r.to_owned(),
                }));
            };
            if !inst.roles.parser {
                return Err(self.error(ConfigErrorKind::WrongRole {
                    context: context.to_owned(),
                    plugin: inst.name.to_string(),
                    wanted: "parser",
                }));
            }
            inst.used = true;
        }
        if listed > 1 {
            return Err(self.error(ConfigErrorKind::Unsupported {
                field: "requestHandler.parsers".into(),
                why: format!(
                    "{} parsers are listed, but one parser type ({}) parses every API this EPP serves, so only the first would run; list one",
                    listed,
                    plugins::DEFAULT_PARSER
                ),
            }));
        }
        Ok(())
    }
}
