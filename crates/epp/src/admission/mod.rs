//! Admission: shed sheddable requests when the pool is saturated.
//!
//! A request's priority comes from the InferenceObjective named by
//! `x-gateway-inference-objective` (looked up by name, as the reference; none or unknown is
//! 0). Priority < 0 is sheddable: such a request is refused with 429 when the pool is
//! saturated. Saturated means no candidate endpoint has room, where room is fresh metrics
//! (no older than the staleness threshold), a waiting queue no deeper than the queue
//! threshold and KV-cache use no higher than the KV threshold (the reference's rule, over the
//! request's candidates as from v1.2). Priority ≥ 0 is never shed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::config::ConfigFile;
use crate::datalayer::EndpointState;

/// Priorities by objective name.
pub trait PriorityLookup: Send + Sync {
    /// The priority of `objective`, if it is known.
    fn priority(&self, objective: &str) -> Option<i32>;
}

/// Objective priorities published as one immutable map (replaced by discovery).
#[derive(Debug, Default)]
pub struct ObjectiveTable {
    map: ArcSwap<HashMap<String, i32>>,
}

impl ObjectiveTable {
    /// Replaces all entries.
    pub fn replace(&self, map: HashMap<String, i32>) {
        if **self.map.load() != map {
            self.map.store(Arc::new(map));
        }
    }

    /// Number of objectives.
    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PriorityLookup for ObjectiveTable {
    fn priority(&self, objective: &str) -> Option<i32> {
        self.map.load().get(objective).copied()
    }
}

/// Saturation thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SaturationConfig {
    /// An endpoint with more waiting requests than this has no room.
    pub queue_depth: u32,
    /// An endpoint with more KV-cache use than this has no room.
    pub kv_cache_util: f64,
    /// An endpoint whose metrics are older than this has no room.
    pub staleness: Duration,
}

impl Default for SaturationConfig {
    fn default() -> Self {
        Self {
            queue_depth: 5,
            kv_cache_util: 0.8,
            staleness: Duration::from_millis(200),
        }
    }
}

/// Why a saturation setting is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("saturation detector: {0}")]
pub struct SaturationConfigError(String);

impl SaturationConfig {
    /// The defaults, overridden by the reference's environment variables
    /// (`SD_QUEUE_DEPTH_THRESHOLD`, `SD_KV_CACHE_UTIL_THRESHOLD`,
    /// `SD_METRICS_STALENESS_THRESHOLD`), then by the config file's `saturationDetector`
    /// thresholds. An invalid environment value keeps the default (as the reference); an
    /// invalid config value is an error.
    pub fn resolve(
        env: impl Fn(&str) -> Option<String>,
        file: &ConfigFile,
    ) -> Result<Self, SaturationConfigError> {
        let mut c = Self::default();
        if let Some(v) = env("SD_QUEUE_DEPTH_THRESHOLD").and_then(|v| v.trim().parse::<u32>().ok()) {
            c.queue_depth = v;
        }
        if let Some(v) = env("SD_KV_CACHE_UTIL_THRESHOLD")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| *v > 0.0 && *v < 1.0)
        {
            c.kv_cache_util = v;
        }
        if let Some(v) =
            env("SD_METRICS_STALENESS_THRESHOLD").and_then(|v| crate::config::cli::go_duration(&v).ok())
        {
            c.staleness = v;
        }
        if let Some(sd) = &file.saturation_detector {
            if let Some(q) = sd.queue_depth_threshold {
                c.queue_depth = u32::try_from(q)
                    .map_err(|_| SaturationConfigError(format!("queueDepthThreshold {q} must be ≥ 0")))?;
            }
            if let Some(kv) = sd.kv_cache_util_threshold {
                if !(kv > 0.0 && kv <= 1.0) {
                    return Err(SaturationConfigError(format!(
                        "kvCacheUtilThreshold {kv} must be in (0, 1]"
                    )));
                }
                c.kv_cache_util = kv;
            }
            if let Some(s) = &sd.metrics_staleness_threshold {
                c.staleness = crate::config::cli::go_duration(s)
                    .map_err(|e| SaturationConfigError(format!("metricsStalenessThreshold: {e}")))?;
            }
        }
        Ok(c)
    }

    /// Whether `endpoint` can take more work.
    pub fn has_room(&self, endpoint: &EndpointState, now: Instant) -> bool {
        let m = &endpoint.metrics;
        m.is_fresh(now, self.staleness)
            && m.waiting_queue <= self.queue_depth
            && m.kv_cache_usage <= self.kv_cache_util
    }

    /// Whether no candidate has room.
    pub fn saturated(&self, candidates: &[&EndpointState], now: Instant) -> bool {
        !candidates.iter().any(|e| self.has_room(e, now))
    }
}

/// The admission decision for one request.
#[derive(Debug, Clone)]
pub struct Admission {
    priorities: Arc<dyn PriorityLookup>,
    saturation: SaturationConfig,
}

impl std::fmt::Debug for dyn PriorityLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PriorityLookup")
    }
}

impl Admission {
    /// Admission with `priorities` and `saturation` thresholds.
    pub fn new(priorities: Arc<dyn PriorityLookup>, saturation: SaturationConfig) -> Self {
        Self {
            priorities,
            saturation,
        }
    }

    /// The request's priority (0 without or with an unknown objective).
    pub fn priority(&self, objective: Option<&str>) -> i32 {
        objective.and_then(|o| self.priorities.priority(o)).unwrap_or(0)
    }

    /// `Ok(priority)` if the request may proceed, `Err(priority)` if it is shed.
    pub fn admit(&self, objective: Option<&str>, candidates: &[&EndpointState]) -> Result<i32, i32> {
        let priority = self.priority(objective);
        if priority < 0 && self.saturation.saturated(candidates, Instant::now()) {
            Err(priority)
        } else {
            Ok(priority)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datalayer::{Endpoint, Metrics};

    fn state(q: u32, kv: f64, fresh: bool) -> EndpointState {
        EndpointState::new(
            Arc::new(Endpoint::from_address("10.0.0.1:8000".parse().unwrap())),
            Arc::new(Metrics {
                waiting_queue: q,
                kv_cache_usage: kv,
                updated_at: fresh.then(Instant::now),
                ..Metrics::default()
            }),
        )
    }

    fn admission(table: &[(&str, i32)]) -> Admission {
        let t = ObjectiveTable::default();
        t.replace(table.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect());
        Admission::new(Arc::new(t), SaturationConfig::default())
    }

    #[test]
    fn sheddable_requests_are_shed_only_when_saturated() {
        let a = admission(&[("batch", -1), ("chat", 10)]);
        let busy = [state(9, 0.5, true), state(2, 0.95, true), state(0, 0.0, false)];
        let busy: Vec<&EndpointState> = busy.iter().collect();
        assert_eq!(a.admit(Some("batch"), &busy), Err(-1));
        assert_eq!(a.admit(Some("chat"), &busy), Ok(10));
        assert_eq!(a.admit(Some("unknown"), &busy), Ok(0));
        assert_eq!(a.admit(None, &busy), Ok(0));
        let room = [state(9, 0.5, true), state(5, 0.8, true)];
        let room: Vec<&EndpointState> = room.iter().collect();
        assert_eq!(a.admit(Some("batch"), &room), Ok(-1));
    }

    #[test]
    fn thresholds_from_env_and_config() {
        let file = crate::config::EndpointPickerConfig::from_text(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nsaturationDetector: {queueDepthThreshold: 7, metricsStalenessThreshold: 1s}\n",
            "t",
        )
        .unwrap()
        .file;
        let env = |k: &str| match k {
            "SD_QUEUE_DEPTH_THRESHOLD" => Some("3".to_owned()),
            "SD_KV_CACHE_UTIL_THRESHOLD" => Some("0.5".to_owned()),
            "SD_METRICS_STALENESS_THRESHOLD" => Some("bogus".to_owned()),
            _ => None,
        };
        let c = SaturationConfig::resolve(env, &file).unwrap();
        assert_eq!(c.queue_depth, 7);
        assert_eq!(c.kv_cache_util, 0.5);
        assert_eq!(c.staleness, Duration::from_secs(1));
        let bad = crate::config::EndpointPickerConfig::from_text(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nsaturationDetector: {kvCacheUtilThreshold: 2}\n",
            "t",
        )
        .unwrap()
        .file;
        assert!(SaturationConfig::resolve(|_| None, &bad).is_err());
    }
}
