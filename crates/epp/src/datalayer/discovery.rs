//! Where endpoints come from. Every source writes the same thing, a full endpoint set, into
//! the [`EndpointStore`]; the scheduler and data sources never know which one it was. The
//! Kubernetes watcher is one more implementation of [`EndpointSource`].

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;
use tokio::time::Duration;
use tokio_util::sync::CancellationToken;

use super::{Endpoint, EndpointStore};

/// A boxed future returned by a discovery source.
pub type SourceFuture = Pin<Box<dyn Future<Output = Result<(), DiscoveryError>> + Send>>;

/// Feeds the store until cancelled.
pub trait EndpointSource: Send + 'static {
    /// Runs the source: writes endpoint sets into `store` until `cancel` fires.
    fn run(self: Box<Self>, store: Arc<EndpointStore>, cancel: CancellationToken) -> SourceFuture;
}

/// Why a source could not produce endpoints.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// An address that is not `ip:port`.
    #[error("invalid endpoint address '{0}': expected ip:port, e.g. 127.0.0.1:8000 or [fd00::1]:8000")]
    Address(String),
    /// The endpoints file could not be read.
    #[error("endpoints file {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The endpoints file is malformed.
    #[error("endpoints file {path}: {source}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_yaml::Error,
    },
    /// The same address twice.
    #[error("endpoint {0} is listed twice")]
    Duplicate(String),
    /// A watch or reconciler that should run forever stopped (Kubernetes discovery).
    #[error("{0}")]
    Ended(&'static str),
}

/// Parses `--static-endpoints` (`ip:port,ip:port`).
pub fn parse_static(list: &str) -> Result<Vec<Endpoint>, DiscoveryError> {
    let mut out: Vec<Endpoint> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let addr: SocketAddr = item
            .parse()
            .map_err(|_| DiscoveryError::Address(item.to_owned()))?;
        if out.iter().any(|e| e.address == addr) {
            return Err(DiscoveryError::Duplicate(item.to_owned()));
        }
        out.push(Endpoint::from_address(addr));
    }
    Ok(out)
}

/// A fixed list of endpoints.
#[derive(Debug)]
pub struct StaticSource(pub Vec<Endpoint>);

impl EndpointSource for StaticSource {
    fn run(self: Box<Self>, store: Arc<EndpointStore>, cancel: CancellationToken) -> SourceFuture {
        Box::pin(async move {
            store.set_endpoints(self.0);
            cancel.cancelled().await;
            Ok(())
        })
    }
}

/// One entry of an endpoints file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileEndpoint {
    address: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    metrics_port: Option<u16>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileDoc {
    Wrapped { endpoints: Vec<FileEndpoint> },
    List(Vec<FileEndpoint>),
}

/// Parses an endpoints file:
///
/// ```yaml
/// endpoints:
/// - address: 127.0.0.1:8001
///   name: sim-a            # optional, defaults to the address
///   metricsPort: 9001      # optional, defaults to the address's port
///   labels: {inference.networking.k8s.io/engine-type: vllm}   # optional
/// ```
///
/// A bare list of entries is accepted too.
pub fn parse_endpoints_file(path: &Path, text: &str) -> Result<Vec<Endpoint>, DiscoveryError> {
    let doc: FileDoc = if text.trim().is_empty() {
        FileDoc::List(Vec::new())
    } else {
        serde_yaml::from_str(text).map_err(|source| DiscoveryError::Parse {
            path: path.to_owned(),
            source,
        })?
    };
    let entries = match doc {
        FileDoc::Wrapped { endpoints } | FileDoc::List(endpoints) => endpoints,
    };
    let mut out: Vec<Endpoint> = Vec::with_capacity(entries.len());
    for e in entries {
        let addr: SocketAddr = e
            .address
            .trim()
            .parse()
            .map_err(|_| DiscoveryError::Address(e.address.clone()))?;
        if out.iter().any(|x| x.address == addr) {
            return Err(DiscoveryError::Duplicate(e.address));
        }
        let mut ep = match e.name {
            Some(name) => Endpoint::new(name, addr),
            None => Endpoint::from_address(addr),
        };
        ep.metrics_port = e.metrics_port;
        ep.labels = e.labels;
        out.push(ep);
    }
    Ok(out)
}

/// Endpoints from a YAML file, reloaded when the file changes. A reload that fails keeps the
/// previous set (and logs why); the first load must succeed.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    poll: Duration,
    initial: Vec<Endpoint>,
    stamp: Option<(SystemTime, u64)>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let md = std::fs::metadata(path).ok()?;
    Some((md.modified().ok()?, md.len()))
}

impl FileSource {
    /// Loads `path` now (so start-up fails on a bad file) and polls it every `poll`.
    pub fn load(path: PathBuf, poll: Duration) -> Result<Self, DiscoveryError> {
        let stamp = stamp(&path);
        let text = std::fs::read_to_string(&path).map_err(|source| DiscoveryError::Read {
            path: path.clone(),
            source,
        })?;
        let initial = parse_endpoints_file(&path, &text)?;
        Ok(Self {
            path,
            poll,
            initial,
            stamp,
        })
    }
}

impl EndpointSource for FileSource {
    fn run(self: Box<Self>, store: Arc<EndpointStore>, cancel: CancellationToken) -> SourceFuture {
        Box::pin(async move {
            let Self {
                path,
                poll,
                initial,
                mut stamp,
            } = *self;
            store.set_endpoints(initial);
            let mut ticker = tokio::time::interval(poll);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return Ok(()),
                    _ = ticker.tick() => {}
                }
                let now = stamp_async(&path).await;
                if now == stamp {
                    continue;
                }
                stamp = now;
                let loaded = match tokio::fs::read_to_string(&path).await {
                    Ok(text) => parse_endpoints_file(&path, &text),
                    Err(source) => Err(DiscoveryError::Read {
                        path: path.clone(),
                        source,
                    }),
                };
                match loaded {
                    Ok(endpoints) => {
                        tracing::info!(path = %path.display(), endpoints = endpoints.len(), "endpoints file reloaded");
                        store.set_endpoints(endpoints);
                    }
                    Err(error) => {
                        tracing::error!(%error, "endpoints file reload failed; keeping the previous endpoints");
                    }
                }
            }
        })
    }
}

async fn stamp_async(path: &Path) -> Option<(SystemTime, u64)> {
    let md = tokio::fs::metadata(path).await.ok()?;
    Some((md.modified().ok()?, md.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_list() {
        let eps = parse_static("127.0.0.1:8001, [::1]:8002").unwrap();
        assert_eq!(eps.len(), 2);
        assert_eq!(&*eps[1].hostport, "[::1]:8002");
        assert!(matches!(
            parse_static("localhost:80"),
            Err(DiscoveryError::Address(_))
        ));
        assert!(matches!(
            parse_static("1.2.3.4:1,1.2.3.4:1"),
            Err(DiscoveryError::Duplicate(_))
        ));
    }

    #[test]
    fn endpoints_file_forms() {
        let p = Path::new("pool.yaml");
        let eps = parse_endpoints_file(
            p,
            "endpoints:\n- address: 127.0.0.1:8001\n  name: a\n  metricsPort: 9001\n  labels: {k: v}\n- address: 127.0.0.1:8002\n",
        )
        .unwrap();
        assert_eq!(&*eps[0].name, "a");
        assert_eq!(eps[0].metrics_port, Some(9001));
        assert_eq!(eps[0].labels.get("k").map(String::as_str), Some("v"));
        assert_eq!(&*eps[1].name, "127.0.0.1:8002");
        assert_eq!(
            parse_endpoints_file(p, "- address: 10.0.0.1:80\n").unwrap().len(),
            1
        );
        assert!(parse_endpoints_file(p, "").unwrap().is_empty());
        let err = parse_endpoints_file(p, "endpoints:\n- adress: 1.2.3.4:5\n").unwrap_err();
        assert!(err.to_string().contains("pool.yaml"), "{err}");
    }

    #[tokio::test]
    async fn file_source_reloads_and_keeps_the_old_set_on_errors() {
        let dir = std::env::temp_dir().join(format!("epp-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pool.yaml");
        std::fs::write(&path, "- address: 127.0.0.1:8001\n").unwrap();
        let source = FileSource::load(path.clone(), Duration::from_millis(20)).unwrap();
        let store = Arc::new(EndpointStore::new());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(Box::new(source).run(store.clone(), cancel.clone()));
        let mut rx = store.subscribe();
        rx.wait_for(|g| *g >= 1).await.unwrap();
        assert_eq!(store.load().endpoints().len(), 1);

        std::fs::write(&path, "- address: 127.0.0.1:8001\n- address: 127.0.0.1:8002\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|g| *g >= 2))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(store.load().endpoints().len(), 2);

        std::fs::write(&path, "- address: nonsense and more nonsense\n").unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(store.load().endpoints().len(), 2);

        cancel.cancel();
        task.await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
