//! The data layer section: which sources run, with which extractors.
//!
//! `dataLayer.sources` (GIE v1.5+; `data` in v1.3–v1.4) pairs each source plugin with its
//! extractors. Unless `dataLayer.injectDefaults` is `false` (llm-d-router v0.10), a
//! `metrics-data-source` with a `core-metrics-extractor` is added when no source of that type
//! is listed; a declared but unlisted instance of either type is used for it (the reference's
//! charts declare them without a `dataLayer` section). GIE v1.5 read an explicit empty
//! `sources: []` as "collect nothing"; v0.10 adds the defaults anyway and offers
//! `injectDefaults: false` for that, which this EPP follows.
//!
//! Every attribute has one writer: two extractors or sources writing one key are refused.

use std::collections::BTreeMap;

use super::build::Instance;
use super::{ConfigError, ConfigErrorKind, EndpointPickerConfig};
use crate::datalayer::collector::{PollingPlan, Sources};
use crate::framework::data::KeyId;
use crate::framework::plugin::PluginMetrics;
use crate::plugins::{self, Defaults};

/// What the section resolves to.
pub(super) struct DataPlan {
    pub sources: Sources,
}

fn find(instances: &[Instance], name: &str) -> Option<usize> {
    instances.iter().position(|i| &*i.name == name)
}

/// Resolves the data layer of `cfg` over `instances`, adding default plugins.
pub(super) fn plan(
    cfg: &EndpointPickerConfig,
    instances: &mut Vec<Instance>,
    defaults: &Defaults,
    metrics: &PluginMetrics,
) -> Result<DataPlan, ConfigError> {
    let f = &cfg.file;
    let (section, layer) = match (&f.data_layer, &f.data) {
        (Some(l), _) => ("dataLayer", Some(l)),
        (None, Some(l)) => ("data", Some(l)),
        (None, None) => ("dataLayer", None),
    };
    let mut sources = Sources::default();
    // (source index, extractor indices) as listed.
    let mut listed: Vec<(usize, Vec<usize>)> = Vec::new();
    for source in layer.iter().flat_map(|l| &l.sources) {
        let undefined = |r: &str| {
            cfg.error(ConfigErrorKind::UndefinedRef {
                context: format!("{section}.sources"),
                plugin_ref: r.to_owned(),
            })
        };
        let at = find(instances, &source.plugin_ref).ok_or_else(|| undefined(&source.plugin_ref))?;
        let mut extractors = Vec::new();
        for x in &source.extractors {
            extractors.push(find(instances, &x.plugin_ref).ok_or_else(|| undefined(&x.plugin_ref))?);
        }
        listed.push((at, extractors));
    }
    let inject = layer.and_then(|l| l.inject_defaults).unwrap_or(true);
    let has_default = listed
        .iter()
        .any(|(s, _)| &*instances[*s].type_name == plugins::DEFAULT_DATA_SOURCE);
    if inject && !has_default {
        let referenced: Vec<usize> = listed
            .iter()
            .flat_map(|(s, xs)| std::iter::once(*s).chain(xs.iter().copied()))
            .collect();
        let mut unlisted = |type_name: &str| -> Result<usize, ConfigError> {
            let declared: Vec<usize> = (0..instances.len())
                .filter(|i| &*instances[*i].type_name == type_name && !referenced.contains(i))
                .collect();
            match declared.as_slice() {
                [] => {
                    instances.push(cfg.implicit(type_name, defaults, metrics)?);
                    Ok(instances.len() - 1)
                }
                [one] => Ok(*one),
                many => Err(cfg.error(ConfigErrorKind::Unsupported {
                    field: format!("{section}.sources"),
                    why: format!(
                        "{} plugins of type {type_name} are declared but not listed ({}); list the one to use",
                        many.len(),
                        many.iter().map(|i| &*instances[*i].name).collect::<Vec<_>>().join(", ")
                    ),
                })),
            }
        };
        let source = unlisted(plugins::DEFAULT_DATA_SOURCE)?;
        let extractor = unlisted(plugins::DEFAULT_EXTRACTOR)?;
        listed.push((source, vec![extractor]));
    }

    let mut writers: BTreeMap<KeyId, String> = BTreeMap::new();
    let mut claim = |keys: Vec<KeyId>, writer: &str| -> Result<(), ConfigError> {
        for key in keys {
            if let Some(first) = writers.insert(key, writer.to_owned()) {
                return Err(cfg.error(ConfigErrorKind::TwoWriters {
                    key: key.to_string(),
                    first,
                    second: writer.to_owned(),
                }));
            }
        }
        Ok(())
    };
    let listed_sources: Vec<usize> = listed.iter().map(|(s, _)| *s).collect();
    for (s, xs) in listed {
        instances[s].used = true;
        let source = &instances[s];
        if source.roles.endpoint_source {
            // Endpoint notifications: each extractor follows the pool itself from now on.
            if xs.is_empty() {
                return Err(cfg.error(ConfigErrorKind::Unsupported {
                    field: format!("{section}.sources[{}].extractors", source.name),
                    why: "an endpoint-notification-source without extractors notifies nobody; list the plugin that follows endpoints (a precise-prefix-cache-producer)".into(),
                }));
            }
            let source_name = source.name.to_string();
            for x in xs {
                let inst = &instances[x];
                let Some(extractor) = &inst.roles.endpoint_extractor else {
                    return Err(cfg.error(ConfigErrorKind::WrongRole {
                        context: format!("{section}.sources[{source_name}].extractors"),
                        plugin: inst.name.to_string(),
                        wanted: "endpoint extractor (a precise-prefix-cache-producer)",
                    }));
                };
                extractor.attach().map_err(|why| {
                    cfg.error(ConfigErrorKind::Unsupported {
                        field: format!("{section}.sources[{source_name}].extractors[{}]", inst.name),
                        why,
                    })
                })?;
            }
            continue;
        }
        if let Some(sub) = &source.roles.subscribing_source {
            if let Some(x) = xs.first() {
                return Err(cfg.error(ConfigErrorKind::WrongRole {
                    context: format!("{section}.sources[{}].extractors", source.name),
                    plugin: instances[*x].name.to_string(),
                    wanted: "nothing: a subscribing source writes its own attributes",
                }));
            }
            claim(sub.writes(), &source.name)?;
            sources.subscribing.push(source.named(sub));
            continue;
        }
        let Some(poll) = &source.roles.polling_source else {
            return Err(cfg.error(ConfigErrorKind::WrongRole {
                context: format!("{section}.sources"),
                plugin: source.name.to_string(),
                wanted: "data source",
            }));
        };
        if xs.is_empty() {
            return Err(cfg.error(ConfigErrorKind::Unsupported {
                field: format!("{section}.sources[{}].extractors", source.name),
                why: "a polling source without extractors collects nothing; list at least one (e.g. a core-metrics-extractor)".into(),
            }));
        }
        let mut plan = PollingPlan {
            source: source.named(poll),
            extractors: Vec::new(),
        };
        for x in xs {
            let inst = &instances[x];
            let Some(extractor) = &inst.roles.extractor else {
                return Err(cfg.error(ConfigErrorKind::WrongRole {
                    context: format!("{section}.sources[{}].extractors", plan.source.name),
                    plugin: inst.name.to_string(),
                    wanted: "extractor",
                }));
            };
            if extractor.input() != poll.output() {
                return Err(cfg.error(ConfigErrorKind::WrongRole {
                    context: format!("{section}.sources[{}].extractors", plan.source.name),
                    plugin: inst.name.to_string(),
                    wanted: "extractor of what this source produces",
                }));
            }
            claim(extractor.writes(), &inst.name)?;
            plan.extractors.push(inst.named(extractor));
        }
        for x in &plan.extractors {
            if let Some(i) = find(instances, &x.name) {
                instances[i].used = true;
            }
        }
        sources.polling.push(plan);
    }
    // Producers that keep their own subscription (the precise prefix producer's KV events)
    // run it whether or not a source lists them.
    for (i, inst) in instances.iter().enumerate() {
        if let (Some(sub), Some(_)) = (&inst.roles.subscribing_source, &inst.roles.producer)
            && !listed_sources.contains(&i)
        {
            sources.subscribing.push(inst.named(sub));
        }
        if let Some(why) = inst.roles.endpoint_extractor.as_ref().and_then(|x| x.idle()) {
            return Err(cfg.error(ConfigErrorKind::Plugin {
                name: inst.name.to_string(),
                type_name: inst.type_name.to_string(),
                source: plugins::PluginError::Invalid(why),
            }));
        }
    }
    if sources.is_empty() {
        tracing::info!("no data sources configured: endpoint figures are not collected");
    }
    Ok(DataPlan { sources })
}
