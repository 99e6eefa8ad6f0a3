//! Wiring: from a resolved [`EppConfig`] to running servers, and back down on shutdown.
//!
//! Everything that can be checked without the network (flags, the EndpointPickerConfig and its
//! plugins, the endpoints file, TLS files) was checked by [`EppConfig::resolve`]. Here the
//! Kubernetes client is made and every port bound before the first task is spawned, so a
//! failed start leaves nothing running. Every task runs on one [`TaskTracker`] under one
//! [`CancellationToken`]: shutdown stops discovery and data sources, lets the servers drain
//! open streams, and waits for all of it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::EppConfig;
use crate::config::cli::{Cli, LogEncoder};
use crate::config::resolve::{DiscoveryPlan, ResolveError};
use crate::datalayer::EndpointStore;
use crate::datalayer::collector::{self, CollectorError};
use crate::datalayer::discovery::{DiscoveryError, EndpointSource, StaticSource};
use crate::flowcontrol::{self, FlowController, metrics::FlowMetrics};
use crate::framework::plugin::Named;
use crate::framework::requestcontrol::{Dispatcher, EndpointsChanged};
use crate::k8s::discovery::KubeSource;
use crate::k8s::leader::{LeaderElector, lease_name};
use crate::k8s::{self, auth::KubeAuth};
use crate::observability::admin::{self, AdminState, MetricsAuth};
use crate::observability::health::{HealthService, HealthState};
use crate::observability::labels::BoundedLabel;
use crate::observability::logging;
use crate::observability::metrics::EppMetrics;
use crate::protocol::tls::{self, TlsError};
use crate::protocol::{ExtProcService, RequestObserver, RequestRecord};
use crate::requestcontrol::{Director, ObjectiveTable};

/// How often `--enable-cert-reload` looks at the certificate files.
const CERT_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Why the EPP could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The configuration.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// Endpoint discovery.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// TLS set-up.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The data-layer collector.
    #[error(transparent)]
    Collector(#[from] CollectorError),
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
}

/// Installs logging as the flags ask.
pub fn init_logging(cli: &Cli) {
    logging::init(
        cli.v,
        cli.log_encoder() == LogEncoder::Json,
        cli.zap_log_level.as_deref(),
    );
}

/// What an embedder (the test kit) may add to the production wiring. The default adds
/// nothing.
#[derive(Default, Clone)]
pub struct Hooks {
    /// Also receives every request report.
    pub observer: Option<Arc<dyn RequestObserver>>,
    /// Decides when admitted requests are scheduled (nothing waits without one).
    pub dispatcher: Option<Arc<dyn Dispatcher>>,
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
    /// InferenceObjective priorities (filled by Kubernetes discovery).
    pub objectives: Arc<ObjectiveTable>,
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

/// Dropping a running EPP stops it: its tasks (among them the data layer's own thread) must
/// not outlive their owner.
impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
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

    /// A token that fires when the EPP stops (shutdown, or an essential task failed).
    pub fn stopped(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { what, addr, source })
}

fn local(l: &TcpListener, what: &'static str, ip: std::net::IpAddr) -> Result<SocketAddr, AppError> {
    l.local_addr().map_err(|source| AppError::Bind {
        what,
        addr: SocketAddr::new(ip, 0),
        source,
    })
}

/// Resolves `cli` with the process environment and starts the EPP.
pub async fn start(cli: &Cli) -> Result<Running, AppError> {
    let config = EppConfig::resolve(cli.clone(), &|k| std::env::var(k).ok(), None)?;
    start_config(config, Hooks::default()).await
}

/// Reports to two observers.
struct Both(Arc<dyn RequestObserver>, Arc<dyn RequestObserver>);

impl RequestObserver for Both {
    fn routed(&self, r: &RequestRecord) {
        self.0.routed(r);
        self.1.routed(r);
    }
    fn finished(&self, r: &RequestRecord) {
        self.0.finished(r);
        self.1.finished(r);
    }
}

/// Binds and starts everything `config` describes.
pub async fn start_config(config: EppConfig, hooks: Hooks) -> Result<Running, AppError> {
    let EppConfig {
        cli,
        config_origin,
        plugins,
        discovery,
        director: director_config,
        collector: collector_config,
        tls,
        leader,
        pool_label,
        namespace,
        gauge_staleness,
    } = config;

    // Fallible set-up first: nothing is spawned until every port is bound.
    let objectives = Arc::new(ObjectiveTable::default());
    let (source, client): (Option<Box<dyn EndpointSource>>, Option<kube::Client>) = match discovery {
        DiscoveryPlan::Static(endpoints) => (Some(Box::new(StaticSource(endpoints))), None),
        DiscoveryPlan::File(file) => (Some(Box::new(file)), None),
        DiscoveryPlan::Kubernetes { pool, kubeconfig } => {
            let client = k8s::client(kubeconfig.as_deref()).await?;
            let source = KubeSource::new(client.clone(), namespace.clone(), pool, objectives.clone());
            (Some(Box::new(source)), Some(client))
        }
        DiscoveryPlan::Manual => (None, None),
    };
    let acceptor = match &tls {
        Some(t) => Some(tls::acceptor(t.store.clone())?),
        None => None,
    };
    let ip = cli.bind_address;
    let grpc = bind("ext_proc", SocketAddr::new(ip, cli.grpc_port)).await?;
    let health_listener = bind("grpc health", SocketAddr::new(ip, cli.grpc_health_port)).await?;
    let metrics_listener = bind("metrics", SocketAddr::new(ip, cli.metrics_port)).await?;
    let grpc_addr = local(&grpc, "ext_proc", ip)?;
    let health_addr = local(&health_listener, "grpc health", ip)?;
    let metrics_addr = local(&metrics_listener, "metrics", ip)?;

    let store = Arc::new(EndpointStore::with_hooks(plugins.store_hooks.clone()));
    let mut metrics = EppMetrics::new(
        store.clone(),
        &pool_label,
        &namespace,
        gauge_staleness,
        plugins.metrics.clone(),
        cli.max_model_label_values,
    );
    let flow_control = plugins.flow_control.map(|cfg| {
        let d = &plugins.control.saturation;
        let fairness = BoundedLabel::new(
            flowcontrol::metrics::MAX_FAIRNESS_LABEL_VALUES,
            metrics.label_overflow("fairness_id"),
        );
        let models = BoundedLabel::new(cli.max_model_label_values, metrics.label_overflow("model_name"));
        let families = FlowMetrics::register(metrics.registry_mut(), &pool_label);
        FlowController::new(
            cfg,
            Named::new(d.name.clone(), d.type_name.clone(), d.plugin.clone()),
            store.clone(),
            families,
            fairness,
            models,
        )
    });
    let metrics = Arc::new(metrics);
    let scheduler = Arc::new(plugins.scheduler.with_observer(metrics.clone()));
    let mut director = Director::new(
        store.clone(),
        scheduler,
        director_config,
        plugins.control,
        objectives.clone(),
    )
    .with_observer(&*metrics);
    let mut observer: Arc<dyn RequestObserver> = match hooks.observer {
        Some(extra) => Arc::new(Both(metrics.clone(), extra)),
        None => metrics.clone(),
    };
    match (&flow_control, hooks.dispatcher) {
        (Some(fc), _) => {
            director = director.with_dispatcher(Arc::new(fc.clone()));
            observer = Arc::new(Both(observer, Arc::new(fc.clone())));
        }
        (None, Some(d)) => director = director.with_dispatcher(d),
        (None, None) => {}
    }

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    if let Some(source) = source {
        spawn_essential(
            &tracker,
            &cancel,
            "endpoint discovery",
            source.run(store.clone(), cancel.clone()),
        );
    }
    let collected = match collector::spawn(
        store.clone(),
        plugins.sources,
        collector_config,
        &tracker,
        cancel.clone(),
    ) {
        Ok(rx) => rx,
        Err(e) => {
            cancel.cancel();
            return Err(e.into());
        }
    };

    // Health follows discovery and the first collection round; stateful plugins follow the set.
    let (health_tx, health_rx) = watch::channel(HealthState {
        leader_election: leader.is_some(),
        ..HealthState::default()
    });
    let (leader_tx, leader_rx) = watch::channel(false);
    if let (Some(plan), Some(client)) = (&leader, &client) {
        let elector = LeaderElector::new(
            kube::Api::namespaced(client.clone(), &namespace),
            lease_name(&namespace, &plan.pool_id),
            k8s::identity(),
            plan.timings,
        );
        tracker.spawn(elector.run(leader_tx, cancel.clone()));
    }
    if let Some(fc) = flow_control {
        tracker.spawn(fc.run(cancel.clone()));
    }
    for task in &plugins.background {
        tracker.spawn(task.clone().run(cancel.clone()));
    }
    tracker.spawn(follow_pool(
        store.clone(),
        plugins.endpoints_changed,
        collected,
        leader_rx,
        health_tx,
        cancel.clone(),
    ));

    // Servers.
    let ext_proc = ExtProcService::new(Arc::new(director), observer).with_shutdown(cancel.clone());
    let health_service = HealthService::new(health_rx.clone());
    let mut router = tonic::transport::Server::builder().add_service(ext_proc.into_server());
    if cli.health_checking {
        router = router.add_service(health_service.clone().into_server());
    }
    let mut self_signed_cert = None;
    let shutdown = cancel.clone().cancelled_owned();
    match (tls, acceptor) {
        (Some(t), Some(acceptor)) => {
            if t.generated {
                self_signed_cert = String::from_utf8(t.pair.cert.clone()).ok();
            }
            if let Some(dir) = t.reload {
                tracker.spawn(tls::watch(
                    dir,
                    t.store.clone(),
                    t.pair,
                    CERT_RELOAD_INTERVAL,
                    cancel.clone(),
                ));
            }
            spawn_essential(
                &tracker,
                &cancel,
                "ext_proc server",
                router.serve_with_incoming_shutdown(tls::incoming(grpc, acceptor), shutdown),
            );
        }
        _ => spawn_essential(
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
    let plugin_list: Vec<String> = plugins
        .instances
        .iter()
        .map(|(name, ty)| {
            if name == ty {
                name.to_string()
            } else {
                format!("{name} ({ty})")
            }
        })
        .collect();
    tracing::info!(%grpc_addr, %health_addr, %metrics_addr, tls = cli.secure_serving, config = %config_origin,
        plugins = %plugin_list.join(", "), "endpoint picker started");
    Ok(Running {
        grpc_addr,
        health_addr,
        metrics_addr,
        store,
        objectives,
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
    hooks: Vec<Named<dyn EndpointsChanged>>,
    mut collected: watch::Receiver<bool>,
    mut leader: watch::Receiver<bool>,
    health: watch::Sender<HealthState>,
    cancel: CancellationToken,
) {
    let mut changes = store.subscribe();
    let mut leader_live = true;
    let mut collected_live = true;
    let mut generation = None;
    loop {
        // Seen before loading: a change landing after the load wakes the select below.
        changes.mark_unchanged();
        let snapshot = store.load();
        if generation != Some(snapshot.generation()) {
            generation = Some(snapshot.generation());
            for hook in &hooks {
                hook.plugin.endpoints_changed(snapshot.endpoints());
            }
        }
        let done = *collected.borrow_and_update();
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
            // The collector lets go of readiness once it is reached.
            r = collected.changed(), if collected_live => if r.is_err() { collected_live = false },
            // Without leader election nobody holds the sender: stop watching it.
            r = leader.changed(), if leader_live => if r.is_err() { leader_live = false },
        }
    }
}
