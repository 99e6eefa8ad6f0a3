//! The plugins' defaults from the EPP's flags and environment: what a plugin without
//! parameters does. A plugin's own parameters override them.

use super::Defaults;
use super::datasource::{ExtractorDefaults, MetricsDefaults};
use super::saturation::{Utilization, UtilizationParams};
use crate::config::cli::Cli;
use crate::config::file::SaturationDetectorSpec;

/// Why the flag or environment defaults are unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DefaultsError {
    /// The top-level `saturationDetector` thresholds are invalid.
    #[error("saturationDetector: {0}")]
    Saturation(#[from] super::saturation::DetectorParamError),
}

impl Defaults {
    /// The defaults of an EPP started without flags (tests and benches).
    pub fn builtin() -> Self {
        Self {
            metrics_source: MetricsDefaults::default(),
            extractor: ExtractorDefaults {
                engine: "vllm".into(),
                ..ExtractorDefaults::default()
            },
            utilization: Utilization::default(),
            namespace: "default".into(),
        }
    }

    /// The defaults `cli`, the environment (`env`) and the top-level `saturationDetector`
    /// thresholds (GIE v1.2–v1.4, `inline`) give.
    ///
    /// The reference's `SD_QUEUE_DEPTH_THRESHOLD`, `SD_KV_CACHE_UTIL_THRESHOLD` and
    /// `SD_METRICS_STALENESS_THRESHOLD` (v1.0–v1.4) are read as the reference read them: an
    /// invalid value keeps the default. The inline thresholds win over them and are checked.
    pub fn resolve(
        cli: &Cli,
        env: &dyn Fn(&str) -> Option<String>,
        inline: Option<&SaturationDetectorSpec>,
    ) -> Result<Self, DefaultsError> {
        let metric_flags: Vec<(&'static str, String)> = [
            ("total-queued-requests-metric", &cli.total_queued_requests_metric),
            (
                "total-running-requests-metric",
                &cli.total_running_requests_metric,
            ),
            (
                "kv-cache-usage-percentage-metric",
                &cli.kv_cache_usage_percentage_metric,
            ),
            ("lora-info-metric", &cli.lora_info_metric),
            ("cache-info-metric", &cli.cache_info_metric),
        ]
        .into_iter()
        .filter_map(|(flag, v)| v.clone().map(|v| (flag, v)))
        .collect();
        let mut u = Utilization::default();
        if let Some(v) = env("SD_QUEUE_DEPTH_THRESHOLD").and_then(|v| v.trim().parse::<u32>().ok()) {
            u.queue_depth = f64::from(v.max(1));
        }
        if let Some(v) = env("SD_KV_CACHE_UTIL_THRESHOLD")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| *v > 0.0 && *v < 1.0)
        {
            u.kv_cache_util = v;
        }
        if let Some(v) = env("SD_METRICS_STALENESS_THRESHOLD")
            .and_then(|v| crate::config::cli::go_duration(&v).ok())
            .filter(|d| !d.is_zero())
        {
            u.staleness = v;
        }
        if let Some(sd) = inline {
            u = Utilization::new(
                u,
                &UtilizationParams {
                    queue_depth_threshold: sd.queue_depth_threshold,
                    kv_cache_util_threshold: sd.kv_cache_util_threshold,
                    metrics_staleness_threshold: sd.metrics_staleness_threshold.clone(),
                    headroom: None,
                },
            )?;
        }
        Ok(Self {
            namespace: crate::config::resolve::namespace(cli, env),
            metrics_source: MetricsDefaults {
                scheme: cli.model_server_metrics_scheme.clone(),
                path: cli.model_server_metrics_path.clone(),
                port: (cli.model_server_metrics_port != 0).then_some(cli.model_server_metrics_port),
                insecure_skip_verify: cli.model_server_metrics_https_insecure_skip_verify,
                timeout: cli.model_server_metrics_timeout,
                name_filter: cli.model_server_metrics_name_filter,
            },
            extractor: ExtractorDefaults {
                engine: cli.engine.clone(),
                metric_flags,
                legacy_freshness: false,
            },
            utilization: u,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::cli::parse_args;

    fn cli(args: &[&str]) -> Cli {
        parse_args(std::iter::once("epp").chain(args.iter().copied()).map(Into::into)).unwrap()
    }

    #[test]
    fn flags_environment_and_inline_thresholds() {
        let env = |k: &str| match k {
            "SD_QUEUE_DEPTH_THRESHOLD" => Some("3".to_owned()),
            "SD_KV_CACHE_UTIL_THRESHOLD" => Some("0.5".to_owned()),
            "SD_METRICS_STALENESS_THRESHOLD" => Some("bogus".to_owned()),
            _ => None,
        };
        let inline = SaturationDetectorSpec {
            queue_depth_threshold: Some(7),
            metrics_staleness_threshold: Some("1s".into()),
            ..SaturationDetectorSpec::default()
        };
        let d = Defaults::resolve(
            &cli(&[
                "--model-server-metrics-port",
                "9400",
                "--model-server-metrics-scheme",
                "https",
            ]),
            &env,
            Some(&inline),
        )
        .unwrap();
        assert_eq!(d.utilization.queue_depth, 7.0);
        assert_eq!(d.utilization.kv_cache_util, 0.5);
        assert_eq!(d.utilization.staleness, Duration::from_secs(1));
        assert_eq!(
            (d.metrics_source.port, d.metrics_source.scheme.as_str()),
            (Some(9400), "https")
        );
        let bad = SaturationDetectorSpec {
            kv_cache_util_threshold: Some(2.0),
            ..SaturationDetectorSpec::default()
        };
        assert!(Defaults::resolve(&cli(&[]), &|_| None, Some(&bad)).is_err());
    }
}
