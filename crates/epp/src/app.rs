//! Wiring: from a validated command line to running servers, and back down on shutdown.
//!
//! Everything that can be checked without the network (flags, the EndpointPickerConfig, the
//! endpoints file, TLS files) is checked before the first port is bound, so a bad start
//! fails fast with a message. Every task runs on one [`TaskTracker`] under one
//! [`CancellationToken`]: shutdown stops discovery and scrapers, lets the servers drain open
//! streams, and waits for all of it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Admission, ObjectiveTable, SaturationConfig};
use crate::config::cli::{Cli, CliError, LogEncoder};
use crate::config::{ConfigError, EndpointPickerConfig};
use crate::datalayer::EndpointStore;
use crate::datalayer::scrape::{ScrapeConfig, ScrapeError, spawn_scrapers};
use crate::datalayer::source::{EndpointSource, FileSource, SourceError, StaticSource, parse_static};
use crate::k8s::discovery::{KubeSource, LEGACY_GROUP, POOL_GROUP, PoolRef, parse_ports, parse_selector};
use crate::k8s::leader::{LeaderElector, LeaseTimings, lease_name};
use crate::k8s::{self, auth::KubeAuth};
use crate::observability::admin::{self, AdminState, MetricsAuth};
use crate::observability::health::{HealthService, HealthState};
use crate::observability::logging;
use crate::observability::metrics::EppMetrics;
use crate::protocol::ExtProcService;
use crate::protocol::tls::{self, TlsError};
use crate::request::{Director, DirectorConfig};
use crate::scheduling::Scheduler;

/// How often `--enable-cert-reload` looks at the certificate files.
const CERT_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Why the EPP could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Flags.
    #[error(transparent)]
    Cli(#[from] CliError),
    /// EndpointPickerConfig.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Endpoint discovery.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// TLS material.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// Scraping.
    #[error(transparent)]
    Scrape(#[from] ScrapeError),
    /// A port could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which server.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Kubernetes client set-up.
    #[error(transparent)]
    Kubernetes(#[from] crate::k8s::K8sError),
    /// Saturation thresholds.
    #[error(transparent)]
    Saturation(#[from] crate::admission::SaturationConfigError),
    /// A requested feature this build does not provide.
    #[error("{0}")]
    Unsupported(String),
}

/// Installs logging as the flags ask.
pub fn init_logging(cli: &Cli) {
    logging::init(
        cli.v,
        cli.zap_encoder == LogEncoder::Json,
        cli.zap_log_level.as_deref(),
    );
}

/// The scheduler configuration the flags name (or the built-in default).
pub fn load_config(cli: &Cli) -> Result<EndpointPickerConfig, ConfigError> {
    match (&cli.config_file, &cli.config_text) {
        (Some(path), _) => EndpointPickerConfig::from_file(path),
        (None, Some(text)) => EndpointPickerConfig::from_text(text, "--config-text"),
        (None, None) => EndpointPickerConfig::builtin_default(),
    }
}

/// Where endpoints come from, and what else Kubernetes provides.
struct Discovery {
    source: Box<dyn EndpointSource>,
    client: Option<kube::Client>,
    objectives: Arc<ObjectiveTable>,
}

async fn discovery(cli: &Cli) -> Result<Discovery, AppError> {
    let objectives = Arc::new(ObjectiveTable::default());
    if let Some(list) = &cli.static_endpoints {
        return Ok(Discovery {
            source: Box::new(StaticSource(parse_static(list)?)),
            client: None,
            objectives,
        });
    }
    if let Some(path) = &cli.endpoints_file {
        return Ok(Discovery {
            source: Box::new(FileSource::load(
                path.clone(),
                tokio::time::Duration::from_secs(1),
            )?),
            client: None,
            objectives,
        });
    }
    let pool = match (&cli.endpoint_selector, &cli.endpoint_target_ports) {
        (Some(selector), Some(ports)) => PoolRef::Selector {
            labels: parse_selector(selector).map_err(|e| CliError(format!("--endpoint-selector: {e}")))?,
            ports: parse_ports(ports).map_err(|e| CliError(format!("--endpoint-target-ports: {e}")))?,
        },
        _ => PoolRef::Pool {
            name: cli.pool_name.clone(),
            group: cli.pool_group.clone(),
        },
    };
    let client = k8s::client(cli.kubeconfig.as_deref()).await?;
    Ok(Discovery {
        source: Box::new(KubeSource::new(
            client.clone(),
            cli.namespace(),
            pool,
            objectives.clone(),
        )),
        client: Some(client),
        objectives,
    })
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { what, addr, source })
}

/// A running EPP.
pub struct Running {
    /// ext_proc address.
    pub grpc_addr: SocketAddr,
    /// gRPC health address.
    pub health_addr: SocketAddr,
    /// Metrics address.
    pub metrics_addr: SocketAddr,
    /// The endpoint store.
    pub store: Arc<EndpointStore>,
    /// The scheduler.
    pub scheduler: Arc<Scheduler>,
    /// Health state.
    pub health: watch::Receiver<HealthState>,
    /// The generated certificate (PEM), when TLS uses one.
    pub self_signed_cert: Option<String>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("grpc_addr", &self.grpc_addr)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Starts a graceful shutdown.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Waits until every server and task has stopped (after [`Running::shutdown`]).
    pub async fn wait(self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Validates, binds and starts everything.
pub async fn start(cli: &Cli) -> Result<Running, AppError> {
    cli.validate()?;
    let config = load_config(cli)?;
    let scheduler = config.build_scheduler(None)?;
    let saturation = SaturationConfig::resolve(|k| std::env::var(k).ok(), &config.file)?;
    if !matches!(cli.pool_group.as_str(), POOL_GROUP | LEGACY_GROUP) {
        return Err(CliError(format!(
            "--pool-group: '{}' is not {POOL_GROUP} or {LEGACY_GROUP}",
            cli.pool_group
        ))
        .into());
    }
    let Discovery {
        source,
        client,
        objectives,
    } = discovery(cli).await?;
    let engine = cli.engine_metrics()?;
    // TLS: the certificate from --cert-path (watched with --enable-cert-reload) or generated.
    let tls = if !cli.secure_serving {
        None
    } else {
        let pair = match &cli.cert_path {
            Some(dir) => tls::load_pair(dir)?,
            None => tls::self_signed()?,
        };
        let origin = cli
            .cert_path
            .as_deref()
            .unwrap_or(std::path::Path::new("generated"));
        let store = Arc::new(tls::CertStore::new(tls::certified_key(&pair, origin)?));
        Some((store, pair))
    };
    if cli.enable_cert_reload && (tls.is_none() || cli.cert_path.is_none()) {
        tracing::warn!("--enable-cert-reload has no effect without --cert-path and TLS");
    }

    let grpc = bind("ext_proc", SocketAddr::new(cli.bind_address, cli.grpc_port)).await?;
    let health_listener = bind(
        "grpc health",
        SocketAddr::new(cli.bind_address, cli.grpc_health_port),
    )
    .await?;
    let metrics_listener = bind("metrics", SocketAddr::new(cli.bind_address, cli.metrics_port)).await?;
    let addr = |l: &TcpListener| {
        l.local_addr().map_err(|source| AppError::Bind {
            what: "local address",
            addr: SocketAddr::new(cli.bind_address, 0),
            source,
        })
    };
    let (grpc_addr, health_addr, metrics_addr) =
        (addr(&grpc)?, addr(&health_listener)?, addr(&metrics_listener)?);

    let store = Arc::new(EndpointStore::new());
    let pool = if cli.pool_name.is_empty() {
        "static".to_owned()
    } else {
        cli.pool_name.clone()
    };
    let metrics = Arc::new(EppMetrics::new(
        store.clone(),
        &pool,
        &cli.namespace(),
        cli.metrics_staleness_threshold,
        scheduler.prefix_indexes().to_vec(),
    ));
    let scheduler = Arc::new(scheduler.with_observer(metrics.clone()));
    let director = Arc::new(
        Director::new(
            store.clone(),
            scheduler.clone(),
            DirectorConfig {
                max_body_bytes: cli.max_body_bytes,
                max_destinations: cli.destination_limit,
                ignore_subset_hint: cli.disable_endpoint_subset_filter,
                staleness: Some(cli.metrics_staleness_threshold),
            },
        )
        .with_admission(Admission::new(objectives, saturation)),
    );

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();

    spawn_essential(
        &tracker,
        &cancel,
        "endpoint discovery",
        source.run(store.clone(), cancel.clone()),
    );
    // Scrapers.
    let mut scrape = ScrapeConfig::new(engine);
    scrape.scheme.clone_from(&cli.model_server_metrics_scheme);
    scrape.path.clone_from(&cli.model_server_metrics_path);
    scrape.port = (cli.model_server_metrics_port != 0).then_some(cli.model_server_metrics_port);
    scrape.interval = cli.refresh_metrics_interval;
    scrape.timeout = cli.model_server_metrics_timeout;
    scrape.insecure_skip_verify = cli.model_server_metrics_https_insecure_skip_verify;
    scrape.name_filter = cli.model_server_metrics_name_filter;
    scrape.dedicated_thread = true;
    let scraped = spawn_scrapers(store.clone(), scrape, &tracker, cancel.clone())?;

    // Health follows discovery and the first scrape round; stateful plugins follow the set.
    let (health_tx, health_rx) = watch::channel(HealthState {
        leader_election: cli.ha_enable_leader_election,
        ..HealthState::default()
    });
    let (leader_tx, leader_rx) = watch::channel(false);
    if cli.ha_enable_leader_election {
        let Some(client) = client.clone() else {
            return Err(CliError(
                "--ha-enable-leader-election needs Kubernetes discovery (--pool-name or --endpoint-selector)"
                    .into(),
            )
            .into());
        };
        let pool_id = if cli.pool_name.is_empty() {
            standalone_id()
        } else {
            cli.pool_name.clone()
        };
        let elector = LeaderElector::new(
            kube::Api::namespaced(client, &cli.namespace()),
            lease_name(&cli.namespace(), &pool_id),
            k8s::identity(),
            LeaseTimings {
                lease_duration: cli.ha_lease_duration,
                renew_deadline: cli.ha_renew_deadline,
                retry_period: cli.ha_retry_period,
            },
        );
        tracker.spawn(elector.run(leader_tx, cancel.clone()));
    }
    tracker.spawn(follow_pool(
        store.clone(),
        scheduler.clone(),
        scraped,
        leader_rx,
        health_tx,
        cancel.clone(),
    ));

    // Servers.
    let ext_proc = ExtProcService::new(director, metrics.clone());
    let health_service = HealthService::new(health_rx.clone());
    let mut router = tonic::transport::Server::builder().add_service(ext_proc.into_server());
    if cli.health_checking {
        router = router.add_service(health_service.clone().into_server());
    }
    let mut self_signed_cert = None;
    let shutdown = cancel.clone().cancelled_owned();
    match tls {
        Some((store, pair)) => {
            let acceptor = tls::acceptor(store.clone())?;
            match &cli.cert_path {
                None => self_signed_cert = String::from_utf8(pair.cert).ok(),
                Some(dir) if cli.enable_cert_reload => {
                    let watch = tls::watch(dir.clone(), store, pair, CERT_RELOAD_INTERVAL, cancel.clone());
                    tracker.spawn(watch);
                }
                Some(_) => {}
            }
            spawn_essential(
                &tracker,
                &cancel,
                "ext_proc server",
                router.serve_with_incoming_shutdown(tls::incoming(grpc, acceptor), shutdown),
            );
        }
        None => spawn_essential(
            &tracker,
            &cancel,
            "ext_proc server",
            router.serve_with_incoming_shutdown(crate::protocol::incoming(grpc), shutdown),
        ),
    }
    spawn_essential(
        &tracker,
        &cancel,
        "health server",
        tonic::transport::Server::builder()
            .add_service(health_service.into_server())
            .serve_with_incoming_shutdown(
                crate::protocol::incoming(health_listener),
                cancel.clone().cancelled_owned(),
            ),
    );
    {
        let cancel = cancel.clone();
        let auth: Option<Arc<dyn MetricsAuth>> = match (&client, cli.metrics_endpoint_auth) {
            (Some(client), true) => Some(Arc::new(KubeAuth::new(client.clone()))),
            (None, true) => {
                tracing::info!("metrics endpoint auth is off for a static pool (there is no cluster to ask)");
                None
            }
            (_, false) => None,
        };
        let router = admin::router(AdminState {
            metrics,
            health: health_rx.clone(),
            auth,
        });
        spawn_essential(
            &tracker,
            &cancel,
            "metrics server",
            admin::serve(metrics_listener, router, cancel.clone().cancelled_owned()),
        );
    }
    tracing::info!(%grpc_addr, %health_addr, %metrics_addr, tls = cli.secure_serving, config = %config.origin, "endpoint picker started");
    Ok(Running {
        grpc_addr,
        health_addr,
        metrics_addr,
        store,
        scheduler,
        health: health_rx,
        self_signed_cert,
        cancel,
        tracker,
    })
}

/// Runs `task` on `tracker`; if it fails, the whole EPP shuts down (a half-running picker,
/// e.g. serving ext_proc without discovery, would be worse than a restart).
fn spawn_essential<E: std::fmt::Display>(
    tracker: &TaskTracker,
    cancel: &CancellationToken,
    what: &'static str,
    task: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
) {
    let cancel = cancel.clone();
    tracker.spawn(async move {
        if let Err(error) = task.await {
            tracing::error!(%error, what, "failed; shutting down");
            cancel.cancel();
        }
    });
}

/// Keeps health and stateful plugins in step with the pool.
async fn follow_pool(
    store: Arc<EndpointStore>,
    scheduler: Arc<Scheduler>,
    mut scraped: watch::Receiver<bool>,
    mut leader: watch::Receiver<bool>,
    health: watch::Sender<HealthState>,
    cancel: CancellationToken,
) {
    let mut changes = store.subscribe();
    let mut leader_live = true;
    loop {
        let snapshot = store.load();
        changes.mark_unchanged();
        scheduler.endpoints_changed(&snapshot);
        let done = *scraped.borrow_and_update();
        let leading = *leader.borrow_and_update();
        health.send_if_modified(|h| {
            let next = HealthState {
                synced: snapshot.is_synced(),
                scraped: done,
                leader: leading,
                ..*h
            };
            let changed = next != *h;
            if changed {
                tracing::info!(
                    synced = next.synced,
                    scraped = next.scraped,
                    leader = next.leader,
                    ready = next.ready(),
                    "health changed"
                );
            }
            *h = next;
            changed
        });
        tokio::select! {
            () = cancel.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            r = scraped.changed() => if r.is_err() { return },
            // Without leader election nobody holds the sender: stop watching it.
            r = leader.changed(), if leader_live => if r.is_err() { leader_live = false },
        }
    }
}

/// A lease id for standalone mode: the Deployment part of `$POD_NAME` (`name-<rs>-<pod>`), as
/// the reference derives it, else `standalone`.
fn standalone_id() -> String {
    let pod = std::env::var("POD_NAME").unwrap_or_default();
    let parts: Vec<&str> = pod.rsplitn(3, '-').collect();
    match parts.as_slice() {
        [_, _, deployment] if !deployment.is_empty() => (*deployment).to_owned(),
        _ => "standalone".to_owned(),
    }
}
