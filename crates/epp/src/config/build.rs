//! Plugin instantiation, the reference's defaulting rules, and profile validation.
//!
//! Defaulting follows the reference (v1.0 baseline, v1.3+ where it fixed bugs), made
//! deterministic where the reference depends on Go map order:
//! 1. a plugin without `name` is named after its `type`;
//! 2. no profiles → one profile `default` with every filter, scorer and picker, in the order
//!    of `plugins`;
//! 3. one profile and no profile handler → `single-profile-handler` is added;
//! 4. the default picker is the first picker in `plugins`, else a new `max-score-picker`;
//! 5. in each profile a scorer without weight gets 1 (also after the picker), and a profile
//!    without picker gets the default picker.

use std::collections::HashMap;
use std::sync::Arc;

use super::{ConfigError, ConfigErrorKind, EndpointPickerConfig};
use crate::scheduling::plugins::{self, PluginError};
use crate::scheduling::{
    EndpointsChanged, Filter, Named, Picker, PluginHandle, PreRequest, Profile, ProfileHandler, Scheduler,
    WeightedScorer,
};

/// A profile as written: name and `(pluginRef, weight)` entries.
type ProfileEntries = (String, Vec<(String, Option<f64>)>);

struct Instance {
    name: Arc<str>,
    type_name: Arc<str>,
    handle: PluginHandle,
}

fn named<T: ?Sized>(inst: &Instance, plugin: &Arc<T>) -> Named<T> {
    Named::new(inst.name.clone(), inst.type_name.clone(), plugin.clone())
}

impl EndpointPickerConfig {
    /// Instantiates the plugins and builds the scheduler. `seed` fixes tie-breaks (tests).
    pub fn build_scheduler(&self, seed: Option<u64>) -> Result<Scheduler, ConfigError> {
        let file = &self.file;
        // In v1.5 configs the prefix parameters sit on the producer; the scorer takes them.
        let producer_params = file
            .plugins
            .iter()
            .find(|p| p.type_name == "approx-prefix-cache-producer")
            .map(|p| &p.parameters);

        let mut instances: Vec<Instance> = Vec::with_capacity(file.plugins.len() + 2);
        for (index, spec) in file.plugins.iter().enumerate() {
            let name = spec.name.clone().filter(|n| !n.is_empty());
            if spec.type_name.is_empty() {
                return Err(self.error(ConfigErrorKind::MissingType {
                    index,
                    name: name.unwrap_or_default(),
                }));
            }
            let name = name.unwrap_or_else(|| spec.type_name.clone());
            if instances.iter().any(|i| *i.name == *name) {
                return Err(self.error(ConfigErrorKind::DuplicatePlugin(name)));
            }
            let params = match (spec.type_name.as_str(), producer_params) {
                ("prefix-cache-scorer", Some(p)) if spec.parameters.is_null() => p,
                _ => &spec.parameters,
            };
            let handle = plugins::build(&spec.type_name, params)
                .map_err(|source| self.plugin_error(&name, &spec.type_name, source))?;
            instances.push(Instance {
                name: name.into(),
                type_name: spec.type_name.as_str().into(),
                handle,
            });
        }
        self.check_section_refs(&instances)?;

        // Profiles as written, or the default one.
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
                .filter(|i| i.handle.is_profile_member())
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
        let handler = self.profile_handler(&mut instances, profile_specs.len())?;

        let default_picker = match instances
            .iter()
            .find_map(|i| i.handle.picker.as_ref().map(|p| named(i, p)))
        {
            Some(p) => p,
            None => {
                let inst = self.implicit("max-score-picker")?;
                let Some(picker) = inst.handle.picker.as_ref().map(|p| named(&inst, p)) else {
                    return Err(self.error(ConfigErrorKind::ProfileHandler(
                        "max-score-picker has no picker role".into(),
                    )));
                };
                instances.push(inst);
                picker
            }
        };

        let by_name: HashMap<&str, &Instance> = instances.iter().map(|i| (&*i.name, i)).collect();
        let mut profiles: Vec<Profile> = Vec::with_capacity(profile_specs.len());
        for (name, refs) in &profile_specs {
            profiles.push(self.profile(name, refs, &by_name, &default_picker)?);
        }

        let pre_request: Vec<Named<dyn PreRequest>> = instances
            .iter()
            .filter_map(|i| i.handle.pre_request.as_ref().map(|p| named(i, p)))
            .collect();
        let endpoints_changed: Vec<Arc<dyn EndpointsChanged>> = instances
            .iter()
            .filter_map(|i| i.handle.endpoints_changed.clone())
            .collect();
        let prefix_indexes = instances
            .iter()
            .filter_map(|i| i.handle.prefix_index.clone())
            .collect();
        Ok(Scheduler::new(
            profiles,
            handler,
            pre_request,
            endpoints_changed,
            prefix_indexes,
            seed,
        ))
    }

    fn plugin_error(&self, name: &str, type_name: &str, source: PluginError) -> ConfigError {
        self.error(ConfigErrorKind::Plugin {
            name: name.to_owned(),
            type_name: type_name.to_owned(),
            source,
        })
    }

    /// A plugin the defaulting rules add, named after its type.
    fn implicit(&self, type_name: &str) -> Result<Instance, ConfigError> {
        let handle = plugins::build(type_name, &serde_yaml::Value::Null)
            .map_err(|source| self.plugin_error(type_name, type_name, source))?;
        Ok(Instance {
            name: type_name.into(),
            type_name: type_name.into(),
            handle,
        })
    }

    /// The one profile handler, adding `single-profile-handler` for a single profile.
    fn profile_handler(
        &self,
        instances: &mut Vec<Instance>,
        profiles: usize,
    ) -> Result<Named<dyn ProfileHandler>, ConfigError> {
        let mut handlers: Vec<Named<dyn ProfileHandler>> = instances
            .iter()
            .filter_map(|i| i.handle.profile_handler.as_ref().map(|h| named(i, h)))
            .collect();
        let handler = match handlers.len() {
            0 if profiles == 1 => {
                let inst = self.implicit("single-profile-handler")?;
                let Some(h) = inst.handle.profile_handler.as_ref().map(|h| named(&inst, h)) else {
                    return Err(self.error(ConfigErrorKind::ProfileHandler(
                        "single-profile-handler has no handler role".into(),
                    )));
                };
                instances.push(inst);
                h
            }
            0 => {
                return Err(self.error(ConfigErrorKind::ProfileHandler(format!(
                    "no profile handler was specified for {profiles} profiles"
                ))));
            }
            1 => handlers.remove(0),
            _ => {
                let names: Vec<&str> = handlers.iter().map(|h| &*h.name).collect();
                return Err(self.error(ConfigErrorKind::ProfileHandler(format!(
                    "only one profile handler is allowed, found: {}",
                    names.join(", ")
                ))));
            }
        };
        if &*handler.type_name == "single-profile-handler" && profiles > 1 {
            return Err(self.error(ConfigErrorKind::ProfileHandler(format!(
                "profile handler '{}' (single-profile-handler) cannot run {profiles} profiles",
                handler.name
            ))));
        }
        Ok(handler)
    }

    fn profile(
        &self,
        name: &str,
        refs: &[(String, Option<f64>)],
        by_name: &HashMap<&str, &Instance>,
        default_picker: &Named<dyn Picker>,
    ) -> Result<Profile, ConfigError> {
        let mut filters: Vec<Named<dyn Filter>> = Vec::new();
        let mut scorers: Vec<WeightedScorer> = Vec::new();
        let mut picker: Option<Named<dyn Picker>> = None;
        for (index, (plugin_ref, weight)) in refs.iter().enumerate() {
            if plugin_ref.is_empty() {
                return Err(self.error(ConfigErrorKind::EmptyRef {
                    profile: name.to_owned(),
                    index,
                }));
            }
            let Some(inst) = by_name.get(plugin_ref.as_str()) else {
                return Err(self.error(ConfigErrorKind::UndefinedRef {
                    context: format!("profile '{name}'"),
                    plugin_ref: plugin_ref.clone(),
                }));
            };
            if let Some(f) = &inst.handle.filter {
                filters.push(named(inst, f));
            }
            if let Some(s) = &inst.handle.scorer {
                let weight = weight.unwrap_or(1.0);
                if !weight.is_finite() {
                    return Err(self.error(ConfigErrorKind::BadWeight {
                        profile: name.to_owned(),
                        plugin: plugin_ref.clone(),
                    }));
                }
                scorers.push(WeightedScorer {
                    scorer: named(inst, s),
                    weight,
                });
            }
            if let Some(p) = &inst.handle.picker {
                if let Some(first) = &picker {
                    return Err(self.error(ConfigErrorKind::TwoPickers {
                        profile: name.to_owned(),
                        first: first.name.to_string(),
                        second: inst.name.to_string(),
                    }));
                }
                picker = Some(named(inst, p));
            }
            if !inst.handle.is_profile_member() {
                tracing::warn!(profile = name, plugin = %inst.name, type_name = %inst.type_name,
                    "plugin has no filter, scorer or picker role; its profile reference has no effect");
            }
        }
        Ok(Profile {
            name: name.into(),
            filters,
            scorers,
            picker: picker.unwrap_or_else(|| default_picker.clone()),
        })
    }

    /// `pluginRef`s outside profiles (data layer, parser, saturation detector) must exist.
    fn check_section_refs(&self, instances: &[Instance]) -> Result<(), ConfigError> {
        let file = &self.file;
        let mut refs: Vec<(&str, &str)> = Vec::new();
        for (section, layer) in [("data", &file.data), ("dataLayer", &file.data_layer)] {
            for source in layer.iter().flat_map(|l| &l.sources) {
                refs.push((section, &source.plugin_ref));
                refs.extend(source.extractors.iter().map(|e| (section, e.plugin_ref.as_str())));
            }
        }
        if let Some(p) = &file.parser {
            refs.push(("parser", &p.plugin_ref));
        }
        if let Some(r) = file
            .saturation_detector
            .as_ref()
            .and_then(|s| s.plugin_ref.as_deref())
        {
            refs.push(("saturationDetector", r));
        }
        for (section, r) in refs {
            if !instances.iter().any(|i| &*i.name == r) {
                return Err(self.error(ConfigErrorKind::UndefinedRef {
                    context: section.to_owned(),
                    plugin_ref: r.to_owned(),
                }));
            }
        }
        Ok(())
    }
}
