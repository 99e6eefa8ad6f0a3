//! Feature gates: `featureGates` entries written `name`, `name=true` or `name=false` (the
//! llm-d-router v0.10 syntax; GIE wrote bare names). A gate this EPP knows either acts or is
//! refused; an unknown gate is refused, as both references refuse it.
//!
//! | gate | default | here |
//! |---|---|---|
//! | `dataLayer` (GIE v1.2–v1.4) | on | the pluggable data layer is always on; `=false` asks for the v1.0 poller's freshness rule, as `enableLegacyMetrics` |
//! | `prepareDataPlugins` (GIE v1.3–v1.4) | on | data producers always run; `=false` is refused |
//! | `enableLegacyMetrics` (GIE v1.5) | off | any successful scrape refreshes an endpoint's figures (the v1.0 rule) |
//! | `flowControl` | off | requests wait in the picker's priority and fairness queues (the `flowControl` section acts only with it) |
//! | `haPopulateNonLeaderDatastore` (v0.10) | on | followers always keep the pool current; `=false` is refused |

/// The gates' effective values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FeatureGates {
    /// Any successful scrape refreshes an endpoint's figures.
    pub legacy_metrics: bool,
    /// Flow control: requests wait in the picker's queues under saturation.
    pub flow_control: bool,
}

/// Why a gate entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    /// Not a gate of either reference.
    #[error("unknown feature gate '{0}' (known: {known})", known = KNOWN.join(", "))]
    Unknown(String),
    /// A value that is not a Go boolean.
    #[error("'{value}' is not a valid value for the feature gate {gate} (use true or false)")]
    Value {
        /// The gate.
        gate: String,
        /// The value.
        value: String,
    },
    /// A gate value this EPP cannot honour.
    #[error("feature gate {gate}={value} is not supported: {why}")]
    Unsupported {
        /// The gate.
        gate: &'static str,
        /// The value asked for.
        value: bool,
        /// Why.
        why: &'static str,
    },
}

/// Every gate name accepted.
pub const KNOWN: &[&str] = &[
    "dataLayer",
    "prepareDataPlugins",
    "enableLegacyMetrics",
    "flowControl",
    "haPopulateNonLeaderDatastore",
];

/// Go's `strconv.ParseBool`, case-insensitive as v0.10 lowercases the value.
fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "t" | "true" => Some(true),
        "0" | "f" | "false" => Some(false),
        _ => None,
    }
}

impl FeatureGates {
    /// Resolves the entries of `featureGates`. An entry for a gate already listed replaces
    /// the earlier one (v0.10 folds the list into a map the same way).
    pub fn parse(entries: &[String]) -> Result<Self, GateError> {
        let mut values: Vec<(&str, bool)> = Vec::new();
        for entry in entries {
            let (name, value) = match entry.split_once('=') {
                Some((n, v)) => (
                    n.trim(),
                    parse_bool(v).ok_or_else(|| GateError::Value {
                        gate: n.trim().to_owned(),
                        value: v.to_owned(),
                    })?,
                ),
                None => (entry.trim(), true),
            };
            if !KNOWN.contains(&name) {
                return Err(GateError::Unknown(name.to_owned()));
            }
            values.retain(|(n, _)| *n != name);
            values.push((name, value));
        }
        let mut gates = Self::default();
        for (name, value) in values {
            match (name, value) {
                ("dataLayer", false) | ("enableLegacyMetrics", true) => gates.legacy_metrics = true,
                ("prepareDataPlugins", false) => {
                    return Err(GateError::Unsupported {
                        gate: "prepareDataPlugins",
                        value: false,
                        why: "data producers (the prefix index, in-flight load) always run",
                    });
                }
                ("flowControl", on) => gates.flow_control = on,
                ("haPopulateNonLeaderDatastore", false) => {
                    return Err(GateError::Unsupported {
                        gate: "haPopulateNonLeaderDatastore",
                        value: false,
                        why: "followers always keep the pool current (they serve ext_proc too)",
                    });
                }
                _ => {}
            }
        }
        Ok(gates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(entries: &[&str]) -> Result<FeatureGates, GateError> {
        FeatureGates::parse(&entries.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn both_syntaxes() {
        assert_eq!(
            parse(&["dataLayer", "prepareDataPlugins=true"]).unwrap(),
            FeatureGates::default()
        );
        assert!(parse(&["enableLegacyMetrics"]).unwrap().legacy_metrics);
        assert!(parse(&["dataLayer=false"]).unwrap().legacy_metrics);
        assert!(
            !parse(&["enableLegacyMetrics=False", "flowControl=false"])
                .unwrap()
                .legacy_metrics
        );
    }

    #[test]
    fn refusals_name_the_gate() {
        assert!(matches!(parse(&["warpDrive"]), Err(GateError::Unknown(g)) if g == "warpDrive"));
        assert!(parse(&["flowControl"]).unwrap().flow_control);
        let e = parse(&["flowControl=maybe"]).unwrap_err().to_string();
        assert!(e.contains("'maybe'") && e.contains("flowControl"), "{e}");
        assert!(parse(&["haPopulateNonLeaderDatastore=false"]).is_err());
        assert!(parse(&["haPopulateNonLeaderDatastore"]).is_ok());
    }

    #[test]
    fn the_last_entry_for_a_gate_wins() {
        assert!(parse(&["flowControl=true", "flowControl=false"]).is_ok());
        assert!(parse(&["flowControl=false", "flowControl"]).unwrap().flow_control);
        assert!(!parse(&["flowControl", "flowControl=false"]).unwrap().flow_control);
        assert!(
            !parse(&["enableLegacyMetrics", "enableLegacyMetrics=false"])
                .unwrap()
                .legacy_metrics
        );
        assert!(
            parse(&["enableLegacyMetrics=false", "enableLegacyMetrics"])
                .unwrap()
                .legacy_metrics
        );
    }
}
