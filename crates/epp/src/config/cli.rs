//! The command line, compatible with the reference EPP's flags.
//!
//! Go's `flag` package accepts `-name` as well as `--name`, and boolean flags as bare `--x`
//! or `--x=false`; durations are Go durations (`50ms`, `2s`, `1m30s`). [`parse_args`] accepts
//! all of that, so the reference's manifests start this binary unchanged. Every check that
//! needs no network runs in [`Cli::validate`], before any port is bound.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};

use crate::plugins::datasource::prom::ENGINES;

/// Log format of `--zap-encoder`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogEncoder {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Console,
}

/// Go's `strconv.ParseBool`.
fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("invalid boolean value '{s}' (use true or false)")),
    }
}

/// Go's `time.ParseDuration` for non-negative durations.
pub fn go_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("invalid duration '{s}' (examples: 50ms, 2s, 1m30s)");
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_end == 0 {
            return Err(err());
        }
        let value: f64 = rest[..num_end].parse().map_err(|_| err())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| err())
}

fn metrics_scheme(s: &str) -> Result<String, String> {
    match s {
        "http" | "https" => Ok(s.to_owned()),
        _ => Err(format!("unsupported scheme '{s}' (use http or https)")),
    }
}

fn engine_name(s: &str) -> Result<String, String> {
    if ENGINES.contains(&s) {
        Ok(s.to_owned())
    } else {
        Err(format!("unknown engine '{s}' (known: {})", ENGINES.join(", ")))
    }
}

/// The EPP's flags. Reference flags keep the reference's names and defaults.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "epp",
    version,
    about = "Endpoint picker for the Gateway API Inference Extension"
)]
pub struct Cli {
    /// ext_proc gRPC port.
    #[arg(long, default_value_t = 9002)]
    pub grpc_port: u16,
    /// gRPC health port.
    #[arg(long, default_value_t = 9003)]
    pub grpc_health_port: u16,
    /// Prometheus metrics port.
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Address all servers bind (all interfaces by default, as the reference).
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: IpAddr,

    /// InferencePool name (Kubernetes discovery).
    #[arg(long, default_value = "")]
    pub pool_name: String,
    /// InferencePool namespace (default: $NAMESPACE, else `default`).
    #[arg(long, default_value = "")]
    pub pool_namespace: String,
    /// InferencePool API group.
    #[arg(long, default_value = "inference.networking.k8s.io")]
    pub pool_group: String,
    /// Standalone discovery: pod label selector `k=v,k2=v2`.
    #[arg(long)]
    pub endpoint_selector: Option<String>,
    /// Standalone discovery: target ports `8000,8001`.
    #[arg(long)]
    pub endpoint_target_ports: Option<String>,
    /// Static pool: `ip:port,ip:port` (no Kubernetes).
    #[arg(long)]
    pub static_endpoints: Option<String>,
    /// Static pool from a YAML file, reloaded on change (no Kubernetes).
    #[arg(long)]
    pub endpoints_file: Option<PathBuf>,
    /// kubeconfig path (default: in-cluster, then $KUBECONFIG).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,

    /// EndpointPickerConfig file.
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// EndpointPickerConfig as text.
    #[arg(long)]
    pub config_text: Option<String>,

    /// Scrape interval per model server.
    #[arg(long, default_value = "50ms", value_parser = go_duration)]
    pub refresh_metrics_interval: Duration,
    /// Accepted for compatibility (pool gauges are computed when scraped).
    #[arg(long, default_value = "5s", value_parser = go_duration)]
    pub refresh_prometheus_metrics_interval: Duration,
    /// Metrics older than this are left out of the pool gauges.
    #[arg(long, default_value = "2s", value_parser = go_duration)]
    pub metrics_staleness_threshold: Duration,
    /// Limit on one scrape.
    #[arg(long, default_value = "1s", value_parser = go_duration)]
    pub model_server_metrics_timeout: Duration,
    /// Waiting-requests metric spec (overrides the engine's).
    #[arg(long)]
    pub total_queued_requests_metric: Option<String>,
    /// Running-requests metric spec.
    #[arg(long)]
    pub total_running_requests_metric: Option<String>,
    /// KV-cache utilisation metric spec.
    #[arg(long)]
    pub kv_cache_usage_percentage_metric: Option<String>,
    /// LoRA info metric spec (`""` disables).
    #[arg(long)]
    pub lora_info_metric: Option<String>,
    /// Cache config info metric spec (`""` disables).
    #[arg(long)]
    pub cache_info_metric: Option<String>,
    /// Model-server engine when a pod has no engine-type label.
    #[arg(long, default_value = "vllm", value_parser = engine_name)]
    pub engine: String,
    /// Metrics port on the model servers (0: the endpoint's port).
    #[arg(long, default_value_t = 0)]
    pub model_server_metrics_port: u16,
    /// Metrics path on the model servers.
    #[arg(long, default_value = "/metrics")]
    pub model_server_metrics_path: String,
    /// `http` or `https`.
    #[arg(long, default_value = "http", value_parser = metrics_scheme)]
    pub model_server_metrics_scheme: String,
    /// Skip certificate checks when scraping over https.
    #[arg(long, default_value = "true", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool)]
    pub model_server_metrics_https_insecure_skip_verify: bool,

    /// Ask model servers for only the needed series (`?name[]=`).
    #[arg(long, default_value = "true", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool)]
    pub model_server_metrics_name_filter: bool,

    /// Serve ext_proc over TLS (self-signed unless --cert-path).
    #[arg(long, default_value = "true", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool)]
    pub secure_serving: bool,
    /// Directory with `tls.crt` and `tls.key`.
    #[arg(long)]
    pub cert_path: Option<PathBuf>,
    /// Watch `--cert-path` and serve a changed certificate without a restart.
    #[arg(long, default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool)]
    pub enable_cert_reload: bool,
    /// Also serve gRPC health on the ext_proc port.
    #[arg(long, default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool)]
    pub health_checking: bool,
    /// Leader election (readiness only on the leader).
    #[arg(long, default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool)]
    pub ha_enable_leader_election: bool,
    /// Lease duration for leader election.
    #[arg(long, default_value = "15s", value_parser = go_duration)]
    pub ha_lease_duration: Duration,
    /// A leader that cannot renew for this long steps down.
    #[arg(long, default_value = "10s", value_parser = go_duration)]
    pub ha_renew_deadline: Duration,
    /// Time between leader-election attempts.
    #[arg(long, default_value = "2s", value_parser = go_duration)]
    pub ha_retry_period: Duration,
    /// Require a Kubernetes bearer token on the metrics port.
    #[arg(long, default_value = "true", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool)]
    pub metrics_endpoint_auth: bool,
    /// Ignore the gateway's subset hint.
    #[arg(long, default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool)]
    pub disable_endpoint_subset_filter: bool,
    /// Go's pprof endpoints: this EPP has none, so `=true` is refused and `=false` accepted
    /// (the reference defaults to true; left out, nothing is served).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool)]
    pub enable_pprof: Option<bool>,
    /// OpenTelemetry export: not built yet, so `=true` is refused and `=false` accepted (the
    /// reference's chart always writes one of them).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool)]
    pub tracing: Option<bool>,

    /// Request bodies larger than this get 413.
    #[arg(long, default_value_t = crate::requestcontrol::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// An endpoint answering this many 5xx in a row is passed over for a while (passive
    /// health, as Envoy's outlier detection); 0 turns it off.
    #[arg(long, default_value_t = 5)]
    pub endpoint_failure_threshold: u32,
    /// How long the first ejection lasts; each repeat lasts longer, up to 10 times as long.
    #[arg(long, default_value = "30s", value_parser = go_duration)]
    pub endpoint_ejection_time: Duration,
    /// Request-body bytes buffered across all streams at once; a stream that would exceed it
    /// is answered 503 while admitted ones go on. At least `--max-body-bytes`.
    #[arg(long, default_value_t = crate::protocol::budget::DEFAULT_BODY_BUDGET_BYTES)]
    pub max_buffered_body_bytes: usize,
    /// At most this many distinct model names (body `model` and rewrite targets) get their own
    /// metric series; later ones are reported as `other`.
    #[arg(long, default_value_t = 100)]
    pub max_model_label_values: usize,
    /// At most this many endpoints in `x-gateway-destination-endpoint` (1 for ORIGINAL_DST
    /// clusters, which reject lists).
    #[arg(long)]
    pub destination_limit: Option<usize>,

    /// Log verbosity (2 = info, 4 = debug, 5 = trace).
    #[arg(long, default_value_t = 2)]
    pub v: u8,
    /// Log format; without it, console, or JSON with `--zap-devel=false` (controller-runtime's
    /// development and production defaults).
    #[arg(long, value_enum)]
    pub zap_encoder: Option<LogEncoder>,
    /// Log level (overrides --v): debug, info, warn, error, or a negative number.
    #[arg(long)]
    pub zap_log_level: Option<String>,
    /// zap's development mode (the reference's default): the default log format is console;
    /// `=false` makes it JSON, as controller-runtime's production mode.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set, value_parser = go_bool)]
    pub zap_devel: Option<bool>,
    /// Refused when set: these logs carry no stack traces.
    #[arg(long)]
    pub zap_stacktrace_level: Option<String>,
    /// Refused when set: timestamps are RFC 3339 in UTC with microseconds.
    #[arg(long)]
    pub zap_time_encoding: Option<String>,
}

/// Rewrites Go-style `-flag` into `--flag` (single-character flags are left alone).
fn normalize(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            if i == 0 {
                return a;
            }
            match a.to_str() {
                Some(s) if s.len() > 2 && s.starts_with('-') && !s.starts_with("--") => {
                    let second = s.as_bytes()[1];
                    if second.is_ascii_alphabetic() {
                        OsString::from(format!("-{s}"))
                    } else {
                        a
                    }
                }
                _ => a,
            }
        })
        .collect()
}

/// Parses a command line (including the program name).
pub fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(normalize(args))
}

/// A flag combination or value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

impl Cli {
    /// The log format: `--zap-encoder`, else JSON in zap's production mode, else console.
    pub fn log_encoder(&self) -> LogEncoder {
        match (self.zap_encoder, self.zap_devel) {
            (Some(e), _) => e,
            (None, Some(false)) => LogEncoder::Json,
            (None, _) => LogEncoder::Console,
        }
    }

    /// Checks what clap cannot: exclusive flags, required combinations, metric specs.
    pub fn validate(&self) -> Result<(), CliError> {
        if self.config_file.is_some() && self.config_text.is_some() {
            return Err(CliError(
                "--config-file and --config-text are mutually exclusive".into(),
            ));
        }
        let sources = [
            !self.pool_name.is_empty(),
            self.endpoint_selector.is_some(),
            self.static_endpoints.is_some(),
            self.endpoints_file.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            0 => {
                return Err(CliError(
                    "required flag not set: one of --pool-name, --endpoint-selector, --static-endpoints or \
                     --endpoints-file"
                        .into(),
                ));
            }
            1 => {}
            _ => {
                return Err(CliError(
                    "--pool-name, --endpoint-selector, --static-endpoints and --endpoints-file are mutually exclusive"
                        .into(),
                ));
            }
        }
        if self.endpoint_selector.is_some() && self.endpoint_target_ports.is_none() {
            return Err(CliError(
                "--endpoint-selector needs --endpoint-target-ports".into(),
            ));
        }
        if self.refresh_metrics_interval.is_zero() {
            return Err(CliError("--refresh-metrics-interval must be positive".into()));
        }
        if self.endpoint_ejection_time.is_zero()
            || self.endpoint_ejection_time > Duration::from_secs(24 * 3600)
        {
            return Err(CliError(
                "--endpoint-ejection-time must be between 1ms and 24h (turn ejection off with --endpoint-failure-threshold=0)".into(),
            ));
        }
        if self.max_buffered_body_bytes < self.max_body_bytes {
            return Err(CliError(format!(
                "--max-buffered-body-bytes ({}) is smaller than --max-body-bytes ({}): no body of the largest allowed size could ever be buffered",
                self.max_buffered_body_bytes, self.max_body_bytes
            )));
        }
        if self.destination_limit == Some(0) {
            return Err(CliError("--destination-limit must be at least 1".into()));
        }
        if !self.model_server_metrics_path.starts_with('/') {
            return Err(CliError("--model-server-metrics-path must start with '/'".into()));
        }
        let refused = [
            (
                self.enable_pprof == Some(true),
                "--enable-pprof=true: this EPP serves no profiling endpoints; pass --enable-pprof=false or leave it out",
            ),
            (
                self.tracing == Some(true),
                "--tracing=true: OpenTelemetry export is not built yet; pass --tracing=false or leave it out",
            ),
            (
                self.zap_stacktrace_level.is_some(),
                "--zap-stacktrace-level: these logs carry no stack traces; remove it",
            ),
            (
                self.zap_time_encoding.is_some(),
                "--zap-time-encoding: log timestamps are RFC 3339 in UTC with microseconds; remove it",
            ),
            (
                self.enable_cert_reload && (!self.secure_serving || self.cert_path.is_none()),
                "--enable-cert-reload needs --cert-path and TLS (--secure-serving): there is no certificate file to reload",
            ),
        ];
        if let Some((_, why)) = refused.iter().find(|(r, _)| *r) {
            return Err(CliError((*why).to_owned()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        parse_args(
            std::iter::once("epp")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
    }

    #[test]
    fn seed_manifest_args_parse() {
        let cli = parse(&[
            "--pool-name",
            "mistral",
            "--pool-namespace",
            "default",
            "--v",
            "4",
            "--zap-encoder",
            "json",
            "--grpc-port",
            "9002",
            "--grpc-health-port",
            "9003",
            "--config-file",
            "/config/default-plugins.yaml",
        ])
        .unwrap();
        assert_eq!(cli.pool_name, "mistral");
        assert_eq!(cli.v, 4);
        assert_eq!(cli.zap_encoder, Some(LogEncoder::Json));
        assert!(cli.secure_serving);
        cli.validate().unwrap();
    }

    #[test]
    fn flags_that_cannot_act_are_refused_and_their_off_values_accepted() {
        let check = |args: &[&str]| parse(&[&["--pool-name=p"], args].concat()).unwrap().validate();
        for (args, want) in [
            (&["--enable-pprof=true"][..], "--enable-pprof=true"),
            (&["--enable-pprof"], "--enable-pprof=true"),
            (&["--tracing=true"], "--tracing=true"),
            (&["--zap-stacktrace-level", "error"], "--zap-stacktrace-level"),
            (&["--zap-time-encoding", "epoch"], "--zap-time-encoding"),
            (
                &["--enable-cert-reload"],
                "--enable-cert-reload needs --cert-path",
            ),
        ] {
            let e = check(args).unwrap_err().0;
            assert!(e.starts_with(want), "{args:?}: {e}");
        }
        check(&["--enable-pprof=false", "--tracing=false", "--zap-devel=true"]).unwrap();
        // zap's production mode logs JSON unless told otherwise.
        let cli = parse(&["--pool-name=p", "--zap-devel=false"]).unwrap();
        assert_eq!(cli.log_encoder(), LogEncoder::Json);
        let cli = parse(&["--pool-name=p", "--zap-devel=false", "--zap-encoder", "console"]).unwrap();
        assert_eq!(cli.log_encoder(), LogEncoder::Console);
        assert_eq!(
            parse(&["--pool-name=p"]).unwrap().log_encoder(),
            LogEncoder::Console
        );
    }

    #[test]
    fn go_style_flags() {
        let cli = parse(&[
            "-pool-name=p",
            "--secure-serving=false",
            "--health-checking",
            "-refresh-metrics-interval",
            "100ms",
            "--metrics-staleness-threshold=1m30s",
        ])
        .unwrap();
        assert_eq!(cli.pool_name, "p");
        assert!(!cli.secure_serving);
        assert!(cli.health_checking);
        assert_eq!(cli.refresh_metrics_interval, Duration::from_millis(100));
        assert_eq!(cli.metrics_staleness_threshold, Duration::from_secs(90));
    }

    #[test]
    fn bad_flags_name_themselves() {
        let e = parse(&["--pool-name", "p", "--no-such-flag"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--no-such-flag"), "{e}");
        let e = parse(&["--pool-name", "p", "--grpc-port", "nine"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--grpc-port"), "{e}");
        let e = parse(&["--secure-serving=maybe"]).unwrap_err().to_string();
        assert!(e.contains("maybe"), "{e}");
        let e = parse(&["--refresh-metrics-interval", "fast"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("fast"), "{e}");
        let e = parse(&["--model-server-metrics-scheme", "ftp"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ftp"), "{e}");
    }

    #[test]
    fn combinations() {
        assert!(
            parse(&[])
                .unwrap()
                .validate()
                .unwrap_err()
                .0
                .contains("--pool-name")
        );
        let e = parse(&["--static-endpoints", "127.0.0.1:1", "--pool-name", "p"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.0.contains("mutually exclusive"), "{e}");
        let e = parse(&["--pool-name", "p", "--config-file", "a", "--config-text", "b"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.0.contains("--config-text"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(go_duration("50ms").unwrap(), Duration::from_millis(50));
        assert_eq!(go_duration("1h2m3.5s").unwrap(), Duration::from_secs_f64(3723.5));
        assert_eq!(go_duration("0").unwrap(), Duration::ZERO);
        assert!(go_duration("5").is_err());
        assert!(go_duration("-1s").is_err());
        assert!(go_duration("").is_err());
    }
}
