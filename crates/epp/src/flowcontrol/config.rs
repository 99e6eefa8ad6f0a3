//! The resolved `flowControl` section: limits with llm-d-router v0.10's defaults and the
//! policies each band uses (resolved from plugin names by [`crate::config`]).
//!
//! v0.10 defaults (`pkg/epp/flowcontrol/registry/config.go`, `controller/config.go`): a request
//! waits at most 60 s (`defaultRequestTTL`; `0s` disables the limit), a band holds at most
//! 5,000 requests and 1 GB of bodies, the global limits are off (0), bands use
//! `global-strict-fairness-policy` and `fcfs-ordering-policy`. GIE v1.5 had no TTL and no
//! per-band request limit by default; this EPP follows v0.10.

use std::sync::Arc;
use std::time::Duration;

use crate::framework::flowcontrol::{FairnessPolicy, OrderingPolicy, UsageLimitPolicy};

/// v0.10's queue time limit when `defaultRequestTTL` is unset.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// v0.10's per-band request limit when a band's `maxRequests` is unset or 0.
pub const DEFAULT_BAND_MAX_REQUESTS: u64 = 5_000;
/// v0.10's per-band byte limit when a band's `maxBytes` is unset or 0 (1 GB, decimal).
pub const DEFAULT_BAND_MAX_BYTES: u64 = 1_000_000_000;

/// A policy with the plugin name it was configured under (for logs and errors).
pub struct Policy<T: ?Sized> {
    /// Plugin name.
    pub name: Arc<str>,
    /// The policy.
    pub plugin: Arc<T>,
}

impl<T: ?Sized> Clone for Policy<T> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            plugin: self.plugin.clone(),
        }
    }
}

impl<T: ?Sized> std::fmt::Debug for Policy<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// One priority band's limits and policies (also the templates bands are made from).
#[derive(Debug, Clone)]
pub struct BandConfig {
    /// Bytes of request bodies it holds at most.
    pub max_bytes: u64,
    /// Requests it holds at most.
    pub max_requests: u64,
    /// Which flow (fairness id) is served next.
    pub fairness: Policy<dyn FairnessPolicy>,
    /// Order within a flow.
    pub ordering: Policy<dyn OrderingPolicy>,
}

/// The whole section, resolved.
#[derive(Debug, Clone)]
pub struct FlowControlConfig {
    /// Bytes queued across bands at most; 0 is no limit.
    pub max_bytes: u64,
    /// Requests queued across bands at most; 0 is no limit.
    pub max_requests: u64,
    /// How long a request may wait; `None` waits until the client goes away.
    pub ttl: Option<Duration>,
    /// Bands listed in `priorityBands`, plus priority 0, as `(priority, band)`.
    pub bands: Vec<(i32, BandConfig)>,
    /// The template for other priorities (`defaultPriorityBand`).
    pub default_band: BandConfig,
    /// The template for other negative priorities (`defaultNegativePriorityBand`); the
    /// default band's without one.
    pub negative_band: Option<BandConfig>,
    /// The ceiling on saturation per band.
    pub usage_limit: Policy<dyn UsageLimitPolicy>,
}

impl FlowControlConfig {
    /// The band for `priority`: a listed one, else made from the template.
    pub fn band(&self, priority: i32) -> &BandConfig {
        if let Some((_, b)) = self.bands.iter().find(|(p, _)| *p == priority) {
            return b;
        }
        match (&self.negative_band, priority < 0) {
            (Some(b), true) => b,
            _ => &self.default_band,
        }
    }
}

/// A Kubernetes quantity (`resource.Quantity`) as a whole number: a YAML integer, or a string
/// such as `"100"`, `"1k"`, `"500M"`, `"1Gi"`, `"1e9"`; fractions round up, as the reference's
/// `Quantity.Value()` does. Negative values are refused.
pub fn quantity(value: &serde_yaml::Value) -> Result<u64, String> {
    let text = match value {
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::String(s) => s.trim().to_owned(),
        other => {
            return Err(format!(
                "expected a quantity, got {}",
                serde_yaml::to_string(other).unwrap_or_default().trim()
            ));
        }
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let bad = || format!("'{text}' is not a quantity (e.g. 100, 1k, 500M, 1Gi)");
    let base: f64 = number.parse().map_err(|_| bad())?;
    let factor = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "m" => 1e-3,
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().map_err(|_| bad())?;
            10f64.powi(exp)
        }
        _ => return Err(bad()),
    };
    let v = base * factor;
    if !v.is_finite() {
        return Err(bad());
    }
    if v < 0.0 {
        return Err(format!("must be non-negative, got {text}"));
    }
    Ok(v.ceil().min(u64::MAX as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Result<u64, String> {
        quantity(&serde_yaml::from_str(s).unwrap())
    }

    #[test]
    fn quantities() {
        assert_eq!(q("100"), Ok(100));
        assert_eq!(q("'100'"), Ok(100));
        assert_eq!(q("1k"), Ok(1000));
        assert_eq!(q("500M"), Ok(500_000_000));
        assert_eq!(q("1Gi"), Ok(1 << 30));
        assert_eq!(q("2Ki"), Ok(2048));
        assert_eq!(q("1e9"), Ok(1_000_000_000));
        assert_eq!(q("1.5k"), Ok(1500));
        assert_eq!(q("1500m"), Ok(2));
        assert_eq!(q("0"), Ok(0));
        assert!(q("-1").unwrap_err().contains("non-negative"));
        assert!(q("lots").is_err());
        assert!(q("1Q").is_err());
        assert!(q("[1]").is_err());
    }
}
