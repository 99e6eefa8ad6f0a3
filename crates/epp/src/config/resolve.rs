//! One typed configuration: the command line, the environment and the EndpointPickerConfig
//! resolved and validated into one [`EppConfig`], before any port is bound or task spawned
//! (linkerd2-proxy's `env.rs` is the model). On any error nothing has been started, and the
//! message names the flag, variable, file or field at fault.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::build::PluginSet;
use super::cli::{Cli, CliError};
use super::{ConfigError, EndpointPickerConfig};
use crate::datalayer::Endpoint;
use crate::datalayer::collector::CollectorConfig;
use crate::datalayer::discovery::{DiscoveryError, FileSource, parse_static};
use crate::datalayer::health::EjectionPolicy;
use crate::k8s::discovery::{LEGACY_GROUP, POOL_GROUP, PoolRef, parse_ports, parse_selector};
use crate::k8s::leader::LeaseTimings;
use crate::plugins::{Defaults, DefaultsError};
use crate::protocol::tls::{self, CertStore, PemPair, TlsError};
use crate::requestcontrol::DirectorConfig;

/// Where endpoints come from.
#[derive(Debug)]
pub enum DiscoveryPlan {
    /// `--static-endpoints`.
    Static(Vec<Endpoint>),
    /// `--endpoints-file`, loaded once already.
    File(FileSource),
    /// The InferencePool (or a label selector) through the Kubernetes API.
    Kubernetes {
        /// Pool or selector.
        pool: PoolRef,
        /// `--kubeconfig`.
        kubeconfig: Option<PathBuf>,
    },
    /// Whoever holds the store sets the endpoints (the test kit's in-process picker).
    Manual,
}

/// TLS on the ext_proc port.
#[derive(Debug)]
pub struct TlsPlan {
    /// The certificate and key, as loaded or generated.
    pub pair: PemPair,
    /// What the acceptor serves from (swapped by the reload watcher).
    pub store: Arc<CertStore>,
    /// `--cert-path` when `--enable-cert-reload` watches it.
    pub reload: Option<PathBuf>,
    /// Whether the certificate was generated at start-up.
    pub generated: bool,
}

/// Leader election settings.
#[derive(Debug, Clone)]
pub struct LeaderPlan {
    /// The pool (or Deployment, standalone) the lease is named after.
    pub pool_id: String,
    /// Lease timings.
    pub timings: LeaseTimings,
}

/// Everything the EPP runs with.
pub struct EppConfig {
    /// The command line.
    pub cli: Cli,
    /// Where the EndpointPickerConfig came from (path, `--config-text`, built-in default).
    pub config_origin: String,
    /// The plugins.
    pub plugins: PluginSet,
    /// Endpoint discovery.
    pub discovery: DiscoveryPlan,
    /// The director's settings.
    pub director: DirectorConfig,
    /// The data-layer collector's settings.
    pub collector: CollectorConfig,
    /// TLS on the ext_proc port, when `--secure-serving`.
    pub tls: Option<TlsPlan>,
    /// Leader election, when `--ha-enable-leader-election`.
    pub leader: Option<LeaderPlan>,
    /// The pool name the pool gauges are labelled with.
    pub pool_label: String,
    /// The pool namespace.
    pub namespace: String,
    /// Staleness threshold of the pool gauges.
    pub gauge_staleness: Duration,
}

impl std::fmt::Debug for EppConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EppConfig")
            .field("config_origin", &self.config_origin)
            .field("plugins", &self.plugins)
            .field("discovery", &self.discovery)
            .field("director", &self.director)
            .finish_non_exhaustive()
    }
}

/// Why the configuration cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Flags.
    #[error(transparent)]
    Cli(#[from] CliError),
    /// The EndpointPickerConfig.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Plugin defaults from flags and environment.
    #[error("config {origin}: {source}")]
    Defaults {
        /// Config origin.
        origin: String,
        /// Cause.
        #[source]
        source: DefaultsError,
    },
    /// Static endpoints or the endpoints file.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// TLS material.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

/// The EndpointPickerConfig the flags name (or the built-in default).
pub fn load_document(cli: &Cli) -> Result<EndpointPickerConfig, ConfigError> {
    match (&cli.config_file, &cli.config_text) {
        (Some(path), _) => EndpointPickerConfig::from_file(path),
        (None, Some(text)) => EndpointPickerConfig::from_text(text, "--config-text"),
        (None, None) => EndpointPickerConfig::builtin_default(),
    }
}

/// The pool namespace: the flag, else `$NAMESPACE`, else `default`.
pub fn namespace(cli: &Cli, env: &dyn Fn(&str) -> Option<String>) -> String {
    if !cli.pool_namespace.is_empty() {
        return cli.pool_namespace.clone();
    }
    env("NAMESPACE")
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// A lease id for standalone mode: the Deployment part of `$POD_NAME` (`name-<rs>-<pod>`), as
/// the reference derives it, else `standalone`.
fn standalone_id(env: &dyn Fn(&str) -> Option<String>) -> String {
    let pod = env("POD_NAME").unwrap_or_default();
    let parts: Vec<&str> = pod.rsplitn(3, '-').collect();
    match parts.as_slice() {
        [_, _, deployment] if !deployment.is_empty() => (*deployment).to_owned(),
        _ => "standalone".to_owned(),
    }
}

impl EppConfig {
    /// Resolves `cli` with the environment `env`. `seed` fixes tie-breaks (tests).
    pub fn resolve(
        cli: Cli,
        env: &dyn Fn(&str) -> Option<String>,
        seed: Option<u64>,
    ) -> Result<Self, ResolveError> {
        cli.validate()?;
        if !matches!(cli.pool_group.as_str(), POOL_GROUP | LEGACY_GROUP) {
            return Err(CliError(format!(
                "--pool-group: '{}' is not {POOL_GROUP} or {LEGACY_GROUP}",
                cli.pool_group
            ))
            .into());
        }
        let document = load_document(&cli)?;
        let defaults =
            Defaults::resolve(&cli, env, document.file.saturation_detector.as_ref()).map_err(|source| {
                ResolveError::Defaults {
                    origin: document.origin.clone(),
                    source,
                }
            })?;
        let plugins = document.build(&defaults, seed)?;

        let discovery = if let Some(list) = &cli.static_endpoints {
            DiscoveryPlan::Static(parse_static(list)?)
        } else if let Some(path) = &cli.endpoints_file {
            DiscoveryPlan::File(FileSource::load(path.clone(), Duration::from_secs(1))?)
        } else {
            let pool = match (&cli.endpoint_selector, &cli.endpoint_target_ports) {
                (Some(selector), Some(ports)) => PoolRef::Selector {
                    labels: parse_selector(selector)
                        .map_err(|e| CliError(format!("--endpoint-selector: {e}")))?,
                    ports: parse_ports(ports)
                        .map_err(|e| CliError(format!("--endpoint-target-ports: {e}")))?,
                },
                _ => PoolRef::Pool {
                    name: cli.pool_name.clone(),
                    group: cli.pool_group.clone(),
                },
            };
            DiscoveryPlan::Kubernetes {
                pool,
                kubeconfig: cli.kubeconfig.clone(),
            }
        };
        let kubernetes = matches!(discovery, DiscoveryPlan::Kubernetes { .. });
        let leader = if cli.ha_enable_leader_election {
            if !kubernetes {
                return Err(CliError(
                    "--ha-enable-leader-election needs Kubernetes discovery (--pool-name or --endpoint-selector)".into(),
                )
                .into());
            }
            Some(LeaderPlan {
                pool_id: if cli.pool_name.is_empty() {
                    standalone_id(env)
                } else {
                    cli.pool_name.clone()
                },
                timings: LeaseTimings {
                    lease_duration: cli.ha_lease_duration,
                    renew_deadline: cli.ha_renew_deadline,
                    retry_period: cli.ha_retry_period,
                },
            })
        } else {
            None
        };

        // TLS: the certificate from --cert-path (watched with --enable-cert-reload) or generated.
        let tls = if cli.secure_serving {
            let (pair, generated) = match &cli.cert_path {
                Some(dir) => (tls::load_pair(dir)?, false),
                None => (tls::self_signed()?, true),
            };
            let origin = cli
                .cert_path
                .as_deref()
                .unwrap_or(std::path::Path::new("generated"));
            let store = Arc::new(CertStore::new(tls::certified_key(&pair, origin)?));
            let reload = cli.cert_path.clone().filter(|_| cli.enable_cert_reload);
            Some(TlsPlan {
                pair,
                store,
                reload,
                generated,
            })
        } else {
            None
        };

        let namespace = namespace(&cli, env);
        let director = DirectorConfig {
            max_body_bytes: cli.max_body_bytes,
            body_budget_bytes: cli.max_buffered_body_bytes,
            max_destinations: cli.destination_limit,
            ignore_subset_hint: cli.disable_endpoint_subset_filter,
            staleness: Some(cli.metrics_staleness_threshold),
            ejection: EjectionPolicy {
                consecutive_failures: cli.endpoint_failure_threshold,
                base: cli.endpoint_ejection_time,
            },
        };
        let collector = CollectorConfig {
            default_interval: cli.refresh_metrics_interval,
            dedicated_thread: true,
        };
        Ok(Self {
            pool_label: if cli.pool_name.is_empty() {
                "static".to_owned()
            } else {
                cli.pool_name.clone()
            },
            gauge_staleness: cli.metrics_staleness_threshold,
            config_origin: document.origin,
            plugins,
            discovery,
            director,
            collector,
            tls,
            leader,
            namespace,
            cli,
        })
    }
}
