//! Endpoint discovery from Kubernetes: the InferencePool (or a standalone label selector), the
//! namespace's pods, and the pool's InferenceObjectives.
//!
//! Level-triggered: each watcher (kube-runtime: list, watch, relist after a 410 Gone, backoff
//! on errors) keeps a reflector store and only pokes a [`Notify`]. One reconcile step then
//! recomputes the whole endpoint set from the stores and hands it to the
//! [`EndpointStore`], which keeps unchanged endpoints (and their metrics) and publishes a new
//! snapshot only when something changed. A removed, unready or relabelled pod leaves the
//! snapshot on the next reconcile; its scraper stops and the prefix index forgets it through
//! the store's change notification. A deleted pool empties the store and marks it unsynced,
//! so readiness drops.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::crd::{v1, v1alpha2};
use crate::datalayer::discovery::{DiscoveryError, EndpointSource, SourceFuture};
use crate::datalayer::{Endpoint, EndpointStore};
use crate::requestcontrol::ObjectiveTable;

/// Pod annotation restricting which of the pool's target ports are active (v1.4+).
pub const ACTIVE_PORTS_ANNOTATION: &str = "inference.networking.k8s.io/active-ports";
/// The legacy pool API group (`--pool-group`).
pub const LEGACY_GROUP: &str = "inference.networking.x-k8s.io";
/// The GA pool API group.
pub const POOL_GROUP: &str = "inference.networking.k8s.io";

/// What selects the pool's pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolRef {
    /// An InferencePool by name, in `group` (`inference.networking.k8s.io` or the legacy
    /// `inference.networking.x-k8s.io`).
    Pool {
        /// Pool name.
        name: String,
        /// API group.
        group: String,
    },
    /// Standalone: a label selector and target ports from flags.
    Selector {
        /// `matchLabels`.
        labels: BTreeMap<String, String>,
        /// Target ports.
        ports: Vec<u16>,
    },
}

/// A pool as the reconciler needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    /// `matchLabels`.
    pub labels: BTreeMap<String, String>,
    /// Target ports, in order (rank = position).
    pub ports: Vec<u16>,
}

impl From<&v1::InferencePool> for PoolView {
    fn from(p: &v1::InferencePool) -> Self {
        Self {
            labels: p.spec.selector.match_labels.clone(),
            ports: p
                .spec
                .target_ports
                .iter()
                .filter_map(|t| u16::try_from(t.number).ok())
                .collect(),
        }
    }
}

impl From<&v1alpha2::InferencePool> for PoolView {
    fn from(p: &v1alpha2::InferencePool) -> Self {
        Self {
            labels: p.spec.selector.clone(),
            ports: u16::try_from(p.spec.target_port_number)
                .ok()
                .into_iter()
                .collect(),
        }
    }
}

/// Parses `k=v,k2=v2`.
pub fn parse_selector(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("selector term '{pair}' is not key=value"))?;
        out.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    if out.is_empty() {
        return Err("the selector is empty".into());
    }
    Ok(out)
}

/// Parses `8000,8001` (1 to 8 ports).
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    let ports = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .map_err(|_| format!("'{p}' is not a port"))
                .and_then(|n| if n == 0 { Err("port 0".into()) } else { Ok(n) })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ports.is_empty() || ports.len() > 8 {
        return Err(format!("expected 1 to 8 target ports, got {}", ports.len()));
    }
    Ok(ports)
}

fn is_ready(pod: &Pod) -> bool {
    pod.meta().deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(pod: &Pod) -> Option<IpAddr> {
    pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}

/// The endpoints of `pool` among `pods`: ready pods with an IP whose labels match, one per
/// (pod, active target port), named `<pod>` for one port and `<pod>-rank-<i>` for several.
pub fn endpoints_for(pool: &PoolView, pods: &[Arc<Pod>]) -> Vec<Endpoint> {
    let mut out = Vec::new();
    let mut pods: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| {
            let labels = p.labels();
            pool.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .filter(|p| is_ready(p))
        .collect();
    pods.sort_by_key(|p| p.name_any());
    for pod in pods {
        let Some(ip) = pod_ip(pod) else { continue };
        let active: Option<Vec<u16>> = pod
            .annotations()
            .get(ACTIVE_PORTS_ANNOTATION)
            .map(|a| a.split(',').filter_map(|p| p.trim().parse().ok()).collect());
        let name = pod.name_any();
        for (rank, port) in pool.ports.iter().enumerate() {
            if active.as_ref().is_some_and(|a| !a.contains(port)) {
                continue;
            }
            let ep_name = if pool.ports.len() == 1 {
                name.clone()
            } else {
                format!("{name}-rank-{rank}")
            };
            let mut ep = Endpoint::new(ep_name, SocketAddr::new(ip, *port));
            ep.labels = pod.labels().clone();
            out.push(ep);
        }
    }
    out
}

/// Discovery from the Kubernetes API.
pub struct KubeSource {
    client: Client,
    namespace: String,
    pool: PoolRef,
    objectives: Arc<ObjectiveTable>,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("namespace", &self.namespace)
            .field("pool", &self.pool)
            .finish()
    }
}

impl KubeSource {
    /// Watches `pool` in `namespace`, publishing objective priorities into `objectives`.
    pub fn new(client: Client, namespace: String, pool: PoolRef, objectives: Arc<ObjectiveTable>) -> Self {
        Self {
            client,
            namespace,
            pool,
            objectives,
        }
    }
}

/// Drives a watcher into a reflector, poking `notify` on every event; logs errors once per
/// failure streak (the watcher backs off and resumes by itself).
async fn drive<K>(
    stream: impl futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    what: &str,
    notify: &Notify,
) where
    K: Clone,
{
    let mut failing = false;
    futures_util::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(_) => {
                if failing {
                    tracing::info!(what, "watch recovered");
                    failing = false;
                }
                notify.notify_one();
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(what, %error, "watch failing; retrying with backoff");
                    failing = true;
                }
            }
        }
    }
}

/// Backoff for watch errors: 50 ms doubling to 30 s, reset by the next good event. The first
/// retry is quick because the usual "error" is a 410 Gone after which the watcher only needs
/// to relist; a real outage still backs off to one attempt per 30 s.
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = (current * 2).min(BACKOFF_MAX);
        Some(current)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

fn slim_pod(pod: &mut Pod) {
    // Only metadata (labels, annotations, deletion) and status (IP, conditions) are used.
    pod.managed_fields_mut().clear();
    pod.spec = None;
}

impl EndpointSource for KubeSource {
    fn run(self: Box<Self>, store: Arc<EndpointStore>, cancel: CancellationToken) -> SourceFuture {
        Box::pin(async move {
            let notify = Arc::new(Notify::new());
            let ns = self.namespace.clone();
            let mut pod_config = watcher::Config::default();
            if let PoolRef::Selector { labels, .. } = &self.pool {
                let sel: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                pod_config = pod_config.labels(&sel.join(","));
            }
            let (pods, pods_writer) = reflector::store::<Pod>();
            let pods_watch = watcher(Api::<Pod>::namespaced(self.client.clone(), &ns), pod_config)
                .modify(slim_pod)
                .backoff(WatchBackoff::default())
                .reflect(pods_writer);

            let (pools_v1, v1_writer) = reflector::store::<v1::InferencePool>();
            let (pools_legacy, legacy_writer) = reflector::store::<v1alpha2::InferencePool>();
            let (objectives, obj_writer) = reflector::store::<v1alpha2::InferenceObjective>();
            let pool_name = match &self.pool {
                PoolRef::Pool { name, .. } => Some(name.clone()),
                PoolRef::Selector { .. } => None,
            };
            let legacy = matches!(&self.pool, PoolRef::Pool { group, .. } if group == LEGACY_GROUP);
            let by_name = watcher::Config::default().fields(&format!(
                "metadata.name={}",
                pool_name.clone().unwrap_or_default()
            ));

            let pool_watch = async {
                match (&pool_name, legacy) {
                    (None, _) => std::future::pending::<()>().await,
                    (Some(_), false) => {
                        let s = watcher(
                            Api::<v1::InferencePool>::namespaced(self.client.clone(), &ns),
                            by_name.clone(),
                        )
                        .backoff(WatchBackoff::default())
                        .reflect(v1_writer);
                        drive(s, "InferencePool", &notify).await;
                    }
                    (Some(_), true) => {
                        let s = watcher(
                            Api::<v1alpha2::InferencePool>::namespaced(self.client.clone(), &ns),
                            by_name.clone(),
                        )
                        .backoff(WatchBackoff::default())
                        .reflect(legacy_writer);
                        drive(s, "InferencePool (v1alpha2)", &notify).await;
                    }
                }
            };
            let objectives_watch = async {
                if pool_name.is_none() {
                    return std::future::pending::<()>().await;
                }
                let s = watcher(
                    Api::<v1alpha2::InferenceObjective>::namespaced(self.client.clone(), &ns),
                    watcher::Config::default(),
                )
                .modify(|o| o.managed_fields_mut().clear())
                .backoff(WatchBackoff::default())
                .reflect(obj_writer);
                drive(s, "InferenceObjective", &notify).await;
            };

            let reconcile = async {
                if pods.wait_until_ready().await.is_err() {
                    return;
                }
                if pool_name.is_some() {
                    let ready = if legacy {
                        pools_legacy.wait_until_ready().await
                    } else {
                        pools_v1.wait_until_ready().await
                    };
                    if ready.is_err() {
                        return;
                    }
                }
                loop {
                    self.reconcile(
                        &store,
                        &pods,
                        &pools_v1,
                        &pools_legacy,
                        &objectives,
                        pool_name.as_deref(),
                        legacy,
                    );
                    notify.notified().await;
                }
            };

            tokio::select! {
                () = cancel.cancelled() => Ok(()),
                () = drive(pods_watch, "Pod", &notify) => Err(DiscoveryError::Ended("pod watch ended")),
                () = pool_watch => Err(DiscoveryError::Ended("InferencePool watch ended")),
                () = objectives_watch => Err(DiscoveryError::Ended("InferenceObjective watch ended")),
                () = reconcile => Err(DiscoveryError::Ended("reconciler stopped: a watch store was dropped")),
            }
        })
    }
}

impl KubeSource {
    #[allow(clippy::too_many_arguments)]
    fn reconcile(
        &self,
        store: &EndpointStore,
        pods: &Store<Pod>,
        pools_v1: &Store<v1::InferencePool>,
        pools_legacy: &Store<v1alpha2::InferencePool>,
        objectives: &Store<v1alpha2::InferenceObjective>,
        pool_name: Option<&str>,
        legacy: bool,
    ) {
        let view = match (&self.pool, pool_name) {
            (PoolRef::Selector { labels, ports }, _) => Some(PoolView {
                labels: labels.clone(),
                ports: ports.clone(),
            }),
            (PoolRef::Pool { .. }, Some(name)) => {
                // A pool being deleted counts as gone, as the reference.
                if legacy {
                    pools_legacy
                        .state()
                        .iter()
                        .find(|p| p.name_any() == name && p.meta().deletion_timestamp.is_none())
                        .map(|p| PoolView::from(&**p))
                } else {
                    pools_v1
                        .state()
                        .iter()
                        .find(|p| p.name_any() == name && p.meta().deletion_timestamp.is_none())
                        .map(|p| PoolView::from(&**p))
                }
            }
            (PoolRef::Pool { .. }, None) => None,
        };
        let Some(view) = view else {
            if store.load().is_synced() {
                tracing::warn!(pool = ?pool_name, "InferencePool not found or being deleted: no endpoints until it is back");
            }
            store.clear();
            self.objectives.replace(HashMap::new());
            return;
        };
        if view.ports.is_empty() {
            tracing::warn!(pool = ?pool_name, "InferencePool has no valid target port");
        }
        let endpoints = endpoints_for(&view, &pods.state());
        store.set_endpoints(endpoints);

        if let (Some(name), PoolRef::Pool { group, .. }) = (pool_name, &self.pool) {
            let table: HashMap<String, i32> = objectives
                .state()
                .iter()
                .filter(|o| {
                    o.spec.pool_ref.name == name
                        && o.spec
                            .pool_ref
                            .group
                            .as_deref()
                            .is_none_or(|g| g.is_empty() || g == group)
                })
                .map(|o| (o.name_any(), o.spec.priority.unwrap_or(0)))
                .collect();
            self.objectives.replace(table);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: Option<&str>, ready: bool, labels: &[(&str, &str)]) -> Arc<Pod> {
        let mut v = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        });
        if let Some(ip) = ip {
            v["status"]["podIP"] = ip.into();
        }
        Arc::new(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn ready_matching_pods_with_ips_become_endpoints() {
        let pool = PoolView {
            labels: [("app".to_owned(), "vllm".to_owned())].into(),
            ports: vec![8000],
        };
        let pods = vec![
            pod("b", Some("10.0.0.2"), true, &[("app", "vllm")]),
            pod("a", Some("10.0.0.1"), true, &[("app", "vllm"), ("x", "y")]),
            pod("c", Some("10.0.0.3"), false, &[("app", "vllm")]),
            pod("d", None, true, &[("app", "vllm")]),
            pod("e", Some("10.0.0.5"), true, &[("app", "other")]),
        ];
        let eps = endpoints_for(&pool, &pods);
        let names: Vec<(&str, String)> = eps.iter().map(|e| (&*e.name, e.address.to_string())).collect();
        assert_eq!(
            names,
            vec![
                ("a", "10.0.0.1:8000".to_owned()),
                ("b", "10.0.0.2:8000".to_owned())
            ]
        );
        assert_eq!(eps[0].labels.get("x").map(String::as_str), Some("y"));
    }

    #[test]
    fn several_ports_are_ranks_and_the_active_ports_annotation_filters() {
        let pool = PoolView {
            labels: BTreeMap::new(),
            ports: vec![8000, 8001, 8002],
        };
        let mut p = (*pod("p", Some("fd00::1"), true, &[])).clone();
        let eps = endpoints_for(&pool, &[Arc::new(p.clone())]);
        let names: Vec<String> = eps.iter().map(|e| format!("{} {}", e.name, e.hostport)).collect();
        assert_eq!(
            names,
            vec![
                "p-rank-0 [fd00::1]:8000",
                "p-rank-1 [fd00::1]:8001",
                "p-rank-2 [fd00::1]:8002"
            ]
        );
        p.annotations_mut()
            .insert(ACTIVE_PORTS_ANNOTATION.into(), "8001".into());
        let eps = endpoints_for(&pool, &[Arc::new(p)]);
        assert_eq!(eps.len(), 1);
        assert_eq!(&*eps[0].name, "p-rank-1");
    }

    #[test]
    fn selector_and_port_flags() {
        assert_eq!(parse_selector("app=vllm, tier=gpu").unwrap().len(), 2);
        assert!(parse_selector("app").is_err());
        assert!(parse_selector("").is_err());
        assert_eq!(parse_ports("8000,8001").unwrap(), vec![8000, 8001]);
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("1,2,3,4,5,6,7,8,9").is_err());
        assert!(parse_ports("http").is_err());
    }
}
