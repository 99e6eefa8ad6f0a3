//! Producer bindings: which producer each consumer reads, settled before anything is built
//! (see [`crate::plugins::consumes`]). A consumer reads the producer its parameter names;
//! else the only one; else, among several, the one named after the producer type (v0.10 reads
//! that key); else, when it cannot name one (no parameter, or added by the defaulting rules),
//! its own added producer or none for an optional input; else the configuration is refused.
//! Parameters an older consumer carried for its producer (a GIE v1.0–v1.4
//! `prefix-cache-scorer`) go to the producer added for it.

use std::collections::BTreeMap;

use super::build::Spec;
use super::{ConfigError, ConfigErrorKind, EndpointPickerConfig};
use crate::plugins::{self, Need};

impl EndpointPickerConfig {
    /// Binds every consumer to its producers, adding producers consumers need. Needs that add
    /// producers are settled first, so that an optional need sees every producer.
    pub(super) fn bind(&self, specs: &mut Vec<Spec>) -> Result<(), ConfigError> {
        for optional in [false, true] {
            let mut i = 0;
            while i < specs.len() {
                for need in plugins::consumes(&specs[i].type_name) {
                    if (need.need == Need::IfPresent) == optional {
                        self.bind_one(specs, i, need)?;
                    }
                }
                i += 1;
            }
        }
        Ok(())
    }

    fn bind_one(&self, specs: &mut Vec<Spec>, i: usize, need: &plugins::Consumes) -> Result<(), ConfigError> {
        let consumer = specs[i].name.clone();
        let err = |detail: String| {
            self.error(ConfigErrorKind::Producer {
                consumer: consumer.clone(),
                kind: need.kind.name(),
                detail,
            })
        };
        let named = need
            .param
            .and_then(|p| specs[i].params.get(p))
            .and_then(serde_yaml::Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let handed = plugins::handed_to_producer(&specs[i].type_name)
            .filter(|(kind, _)| *kind == need.kind)
            .map(|(_, keys)| pick(&specs[i].params, keys))
            .filter(|p| !p.is_empty());
        let handed_names = || {
            handed
                .iter()
                .flat_map(|m| m.keys())
                .filter_map(serde_yaml::Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let producers: Vec<&Spec> = specs
            .iter()
            .filter(|s| plugins::produces(&s.type_name).contains(&need.kind))
            .collect();
        enum Bind {
            To(String),
            Add,
            Nothing,
        }
        let bind = match (named, producers.as_slice()) {
            (Some(n), _) if !producers.iter().any(|p| p.name == n) => {
                return Err(err(format!("'{n}' is not a plugin producing it")));
            }
            (Some(n), _) if handed.is_some() => {
                return Err(err(format!(
                    "its parameters {} configure the producer: set them on '{n}'",
                    handed_names()
                )));
            }
            (Some(n), _) => Bind::To(n),
            (None, ps) if let Some(h) = &handed => {
                let explicit: Vec<&str> = ps
                    .iter()
                    .filter(|p| !p.implicit)
                    .map(|p| p.name.as_str())
                    .collect();
                match ps.iter().find(|p| p.implicit && p.params.as_mapping() == Some(h)) {
                    Some(same) => Bind::To(same.name.clone()),
                    None if explicit.is_empty() => Bind::Add,
                    None => {
                        return Err(err(format!(
                            "its parameters {} configure the producer: set them on '{}'",
                            handed_names(),
                            explicit.join("' or '")
                        )));
                    }
                }
            }
            (None, []) => match need.need {
                Need::Auto { .. } => Bind::Add,
                Need::IfPresent => Bind::Nothing,
            },
            (None, [one]) => Bind::To(one.name.clone()),
            (None, many)
                if many
                    .iter()
                    .any(|p| p.name == plugins::default_producer(need.kind)) =>
            {
                Bind::To(plugins::default_producer(need.kind).to_owned())
            }
            // A consumer the configuration cannot name its producer for (no parameter, or one
            // the defaulting rules added) gets its own, or none when the need is optional.
            (None, _) if need.param.is_none() || specs[i].implicit => match need.need {
                Need::Auto { .. } => Bind::Add,
                Need::IfPresent => Bind::Nothing,
            },
            (None, many) => {
                let names: Vec<&str> = many.iter().map(|p| p.name.as_str()).collect();
                let param = need.param.unwrap_or("a producer name");
                return Err(err(format!(
                    "several plugins produce it ({}); set {param}",
                    names.join(", ")
                )));
            }
        };
        let bound = match bind {
            Bind::To(n) => Some(n),
            Bind::Nothing => None,
            Bind::Add => {
                let Need::Auto { default } = need.need else {
                    return Ok(());
                };
                let name = if specs.iter().any(|s| s.name == default) {
                    format!("{consumer}/{default}")
                } else {
                    default.to_owned()
                };
                specs.push(Spec {
                    name: name.clone(),
                    type_name: default.to_owned(),
                    params: handed
                        .clone()
                        .map_or(serde_yaml::Value::Null, serde_yaml::Value::Mapping),
                    implicit: true,
                    bindings: BTreeMap::new(),
                });
                Some(name)
            }
        };
        if let Some(b) = bound {
            specs[i].bindings.insert(need.kind, b);
        }
        Ok(())
    }
}

/// The entries of `params` (a mapping) whose keys are in `keys`.
fn pick(params: &serde_yaml::Value, keys: &[&str]) -> serde_yaml::Mapping {
    params
        .as_mapping()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.as_str().is_some_and(|k| keys.contains(&k)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}
