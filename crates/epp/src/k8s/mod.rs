//! Kubernetes: the InferencePool, its pods and InferenceObjectives ([`discovery`]), leader
//! election on a Lease ([`leader`]) and metrics-port auth through the API server ([`auth`]).
//! The CRD types the EPP reads are in [`crd`]; `manifests/crds/` holds the CRDs generated from
//! them.

pub mod auth;
pub mod crd;
pub mod discovery;
pub mod leader;

use std::path::Path;

/// Why the Kubernetes client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No in-cluster or default configuration.
    #[error("no Kubernetes configuration (in-cluster, $KUBECONFIG or ~/.kube/config): {0}")]
    Infer(#[source] kube::config::InferConfigError),
    /// The client could not be built.
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A client from `--kubeconfig`, else in-cluster, else `$KUBECONFIG`/`~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, K8sError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| K8sError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None => kube::Config::infer().await.map_err(K8sError::Infer)?,
    };
    kube::Client::try_from(config).map_err(K8sError::Client)
}

/// This replica's identity for leader election: `$POD_NAME` (or the host name) and a random
/// suffix, as controller-runtime.
pub fn identity() -> String {
    let host = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "epp".to_owned());
    format!("{host}_{}", uuid::Uuid::new_v4())
}

#[cfg(test)]
mod crd_files {
    /// The checked-in CRDs are what the types generate (`UPDATE_CRDS=1 cargo test` rewrites).
    #[test]
    fn manifests_crds_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/crds");
        for (file, yaml) in super::crd::crd_yaml() {
            let path = dir.join(&file);
            if std::env::var_os("UPDATE_CRDS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &yaml).unwrap();
            }
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert_eq!(
                on_disk, yaml,
                "{file} is stale: run UPDATE_CRDS=1 cargo test --lib crd_files"
            );
        }
    }
}
