//! TLS on the ext_proc port: on by default with a certificate generated at start, as the
//! reference (gateways are configured to skip verification), or `tls.crt`/`tls.key` from
//! `--cert-path`. With `--enable-cert-reload` those files are watched and a changed pair is
//! used for the next handshake, without a restart: cert-manager and Secret volume updates
//! rotate certificates in place, and a picker that keeps serving an expired certificate
//! takes its gateway down with it.
//!
//! The server certificate sits in a [`CertStore`] (an `ArcSwap`) that rustls asks on every
//! handshake, so the accept loop here replaces tonic's built-in TLS acceptor. Handshakes run
//! beside the accept loop, each bounded in time, so one slow client does not hold up others.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// Why no TLS identity could be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not PEM.
    #[error("{path} is not a PEM file")]
    NotPem {
        /// File path.
        path: PathBuf,
    },
    /// The PEM holds no usable certificate or key.
    #[error("{path}: {problem}")]
    Invalid {
        /// File path.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Certificate generation failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration rejected: {0}")]
    Config(#[from] rustls::Error),
}

/// PEM text of a certificate chain and its private key.
#[derive(Clone, PartialEq, Eq)]
pub struct PemPair {
    /// `tls.crt`: the certificate chain, leaf first.
    pub cert: Vec<u8>,
    /// `tls.key`: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Vec<u8>,
}

impl std::fmt::Debug for PemPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("PemPair")
            .field("cert_bytes", &self.cert.len())
            .finish_non_exhaustive()
    }
}

fn read_pem(path: PathBuf) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(&path).map_err(|source| TlsError::Read {
        path: path.clone(),
        source,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem { path });
    }
    Ok(bytes)
}

/// `tls.crt` and `tls.key` from `dir`.
pub fn load_pair(dir: &Path) -> Result<PemPair, TlsError> {
    Ok(PemPair {
        cert: read_pem(dir.join("tls.crt"))?,
        key: read_pem(dir.join("tls.key"))?,
    })
}

/// A fresh self-signed certificate (ECDSA P-256, valid for the process's life and beyond).
pub fn self_signed() -> Result<PemPair, TlsError> {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "endpoint-picker".to_owned()])?;
    Ok(PemPair {
        cert: certified.cert.pem().into_bytes(),
        key: certified.signing_key.serialize_pem().into_bytes(),
    })
}

/// Parses a pair into what rustls serves; `dir` names the files in errors.
pub fn certified_key(pair: &PemPair, dir: &Path) -> Result<CertifiedKey, TlsError> {
    let invalid = |file: &str, problem: String| TlsError::Invalid {
        path: dir.join(file),
        problem,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pair.cert)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid("tls.crt", format!("bad certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(invalid("tls.crt", "no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&pair.key)
        .map_err(|e| invalid("tls.key", format!("no usable private key: {e}")))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| invalid("tls.key", format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    // A key that does not belong to the certificate would fail every handshake.
    certified
        .keys_match()
        .map_err(|e| invalid("tls.key", format!("does not match tls.crt: {e}")))?;
    Ok(certified)
}

/// The certificate the server presents, replaceable while serving.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
}

impl CertStore {
    /// A store presenting `key`.
    pub fn new(key: CertifiedKey) -> Self {
        Self {
            current: ArcSwap::from_pointee(key),
        }
    }

    /// Presents `key` from the next handshake on.
    pub fn replace(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }

    /// The leaf certificate presented now (DER).
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.current.load().cert.first().cloned()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The rustls server configuration: ring, TLS 1.2 and 1.3, ALPN `h2`, certificate from `store`.
pub fn acceptor(store: Arc<CertStore>) -> Result<TlsAcceptor, TlsError> {
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 256;

/// Accepted TLS connections (TCP_NODELAY set, see [`super::incoming`]). The accept loop is a
/// task that ends when the returned stream is dropped; failed or slow handshakes are logged
/// and dropped, never surfaced to the server as errors.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> impl futures_util::Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<std::io::Result<TlsStream<TcpStream>>>(64);
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let permit = tokio::select! {
                () = tx.closed() => return,
                p = permits.clone().acquire_owned() => p,
            };
            let Ok(permit) = permit else { return };
            let accepted = tokio::select! {
                () = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "ext_proc accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Watches `dir/tls.crt` and `dir/tls.key` every `every` and puts a changed, valid pair into
/// `store`. A pair that does not parse (for example the certificate written before its key) is
/// reported and skipped; the current certificate stays until a valid pair appears.
pub async fn watch(
    dir: PathBuf,
    store: Arc<CertStore>,
    mut last: PemPair,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let read = async {
            Ok::<_, std::io::Error>(PemPair {
                cert: tokio::fs::read(dir.join("tls.crt")).await?,
                key: tokio::fs::read(dir.join("tls.key")).await?,
            })
        };
        let outcome = match read.await {
            Err(error) => Err(format!(
                "cannot read the certificate files in {}: {error}",
                dir.display()
            )),
            Ok(pair) if pair == last => continue,
            Ok(pair) => certified_key(&pair, &dir)
                .map(|key| (key, pair))
                .map_err(|error| format!("new certificate files rejected: {error}")),
        };
        match outcome {
            Ok((key, pair)) => {
                store.replace(key);
                tracing::info!(dir = %dir.display(), "ext_proc certificate reloaded");
                last = pair;
                last_error = None;
            }
            // Each distinct problem is reported once, not every second.
            Err(message) if last_error.as_deref() != Some(&message) => {
                tracing::warn!("{message}; still serving the previous certificate");
                last_error = Some(message);
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("epp-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(dir: &Path, pair: &PemPair) {
        std::fs::write(dir.join("tls.crt"), &pair.cert).unwrap();
        std::fs::write(dir.join("tls.key"), &pair.key).unwrap();
    }

    #[test]
    fn generated_and_loaded() {
        let pair = self_signed().unwrap();
        assert!(pair.cert.starts_with(b"-----BEGIN CERTIFICATE-----"));
        certified_key(&pair, Path::new("generated")).unwrap();
        let dir = scratch("load");
        assert!(matches!(load_pair(&dir), Err(TlsError::Read { .. })));
        std::fs::write(dir.join("tls.crt"), "not pem").unwrap();
        std::fs::write(dir.join("tls.key"), "not pem").unwrap();
        assert!(matches!(load_pair(&dir), Err(TlsError::NotPem { .. })));
        write(&dir, &pair);
        assert_eq!(load_pair(&dir).unwrap(), pair);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_key_from_another_certificate_is_refused_by_name() {
        let (a, b) = (self_signed().unwrap(), self_signed().unwrap());
        let mixed = PemPair {
            cert: a.cert,
            key: b.key,
        };
        let err = certified_key(&mixed, Path::new("/certs"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/certs/tls.key") && err.contains("does not match"),
            "{err}"
        );
        let no_key = PemPair {
            cert: self_signed().unwrap().cert,
            key: b"-----BEGIN NOTHING-----\n-----END NOTHING-----\n".to_vec(),
        };
        let err = certified_key(&no_key, Path::new("/certs"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/certs/tls.key"), "{err}");
    }

    #[test]
    fn debug_output_has_no_key_material() {
        let pair = self_signed().unwrap();
        assert!(!format!("{pair:?}").contains("PRIVATE"));
    }

    #[tokio::test(start_paused = true)]
    async fn watch_swaps_in_a_valid_new_pair_and_keeps_the_old_on_a_bad_one() {
        let dir = scratch("watch");
        let first = self_signed().unwrap();
        write(&dir, &first);
        let store = Arc::new(CertStore::new(certified_key(&first, &dir).unwrap()));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(watch(
            dir.clone(),
            store.clone(),
            first.clone(),
            Duration::from_secs(1),
            cancel.clone(),
        ));
        let leaf_of = |p: &PemPair| certified_key(p, Path::new("x")).unwrap().cert[0].clone();
        // A few ticks; the paused clock does not advance while the file reads are in flight.
        let settle = || tokio::time::sleep(Duration::from_millis(2_500));

        // A half-written rotation (new certificate, old key) is not taken.
        let second = self_signed().unwrap();
        std::fs::write(dir.join("tls.crt"), &second.cert).unwrap();
        settle().await;
        assert_eq!(store.leaf(), Some(leaf_of(&first)));

        // The matching key arrives: the new pair is served.
        std::fs::write(dir.join("tls.key"), &second.key).unwrap();
        settle().await;
        assert_eq!(store.leaf(), Some(leaf_of(&second)));

        // Files removed: the current certificate stays.
        std::fs::remove_file(dir.join("tls.key")).unwrap();
        settle().await;
        assert_eq!(store.leaf(), Some(leaf_of(&second)));

        cancel.cancel();
        task.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
