//! A fake model server for data-layer tests: serves a real vLLM `/metrics` page (captured from
//! vLLM 0.32) with the load figures replaced by whatever the test sets, or any page a test
//! gives, over HTTP or HTTPS (optionally requiring a client certificate), and can fail, hang
//! or answer slowly on demand.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parking_lot::Mutex;
use tokio::sync::oneshot;

const PAGE: &str = include_str!("../../../fixtures/vllm-0.32-cpu/metrics_idle.txt");

/// How `/metrics` answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Ok,
    Error,
    Hang,
    Delay(Duration),
}

#[derive(Debug)]
pub struct Load {
    /// Served instead of the vLLM page when set.
    pub page: Option<String>,
    pub waiting: u32,
    pub running: u32,
    pub kv: f64,
    pub mode: Mode,
    pub scrapes: u64,
}

pub struct ModelServer {
    pub addr: SocketAddr,
    pub load: Arc<Mutex<Load>>,
    _stop: oneshot::Sender<()>,
}

/// The captured vLLM page with the waiting, running and KV figures replaced.
pub fn vllm_page(waiting: u32, running: u32, kv: f64) -> String {
    PAGE.lines()
        .map(|l| {
            if l.starts_with("vllm:num_requests_waiting{") {
                format!("vllm:num_requests_waiting{{engine=\"0\",model_name=\"tiny\"}} {waiting}.0")
            } else if l.starts_with("vllm:num_requests_running{") {
                format!("vllm:num_requests_running{{engine=\"0\",model_name=\"tiny\"}} {running}.0")
            } else if l.starts_with("vllm:kv_cache_usage_perc{") {
                format!("vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"tiny\"}} {kv}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn page(load: &Load) -> String {
    vllm_page(load.waiting, load.running, load.kv)
}

async fn metrics(State(load): State<Arc<Mutex<Load>>>) -> Response {
    let mode = {
        let mut l = load.lock();
        l.scrapes += 1;
        l.mode
    };
    match mode {
        Mode::Ok => {}
        Mode::Error => return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response(),
        Mode::Hang => std::future::pending::<()>().await,
        Mode::Delay(d) => tokio::time::sleep(d).await,
    }
    let text = {
        let l = load.lock();
        l.page.clone().unwrap_or_else(|| page(&l))
    };
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

impl ModelServer {
    pub async fn start(waiting: u32, kv: f64) -> Self {
        Self::start_with(waiting, kv, Mode::Ok).await
    }

    pub async fn start_with(waiting: u32, kv: f64, mode: Mode) -> Self {
        Self::serve(Self::load(waiting, kv, mode), None).await
    }

    /// A server answering `/metrics` with `page` as it is.
    pub async fn start_page(page: &str) -> Self {
        let load = Self::load(0, 0.0, Mode::Ok);
        load.lock().page = Some(page.to_owned());
        Self::serve(load, None).await
    }

    /// A server of the vLLM page over HTTPS with `tls`.
    pub async fn start_tls(waiting: u32, kv: f64, tls: &TlsServer) -> Self {
        Self::serve(Self::load(waiting, kv, Mode::Ok), Some(tls.config())).await
    }

    fn load(waiting: u32, kv: f64, mode: Mode) -> Arc<Mutex<Load>> {
        Arc::new(Mutex::new(Load {
            page: None,
            waiting,
            running: 0,
            kv,
            mode,
            scrapes: 0,
        }))
    }

    async fn serve(load: Arc<Mutex<Load>>, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .with_state(load.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        match tls {
            None => {
                tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = rx.await;
                        })
                        .await
                        .unwrap();
                });
            }
            Some(config) => {
                tokio::spawn(serve_tls(listener, app, config, rx));
            }
        }
        Self {
            addr,
            load,
            _stop: tx,
        }
    }

    pub fn set(&self, waiting: u32, kv: f64) {
        let mut l = self.load.lock();
        l.waiting = waiting;
        l.kv = kv;
    }

    pub fn set_mode(&self, mode: Mode) {
        self.load.lock().mode = mode;
    }

    pub fn scrapes(&self) -> u64 {
        self.load.lock().scrapes
    }
}

/// Serves `app` over TLS until `stop` fires or drops; failed handshakes are dropped quietly.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    config: Arc<rustls::ServerConfig>,
    mut stop: oneshot::Receiver<()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut stop => return,
            conn = listener.accept() => match conn { Ok(c) => c, Err(_) => return },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

/// A certificate authority and a server certificate for 127.0.0.1 it signed, and optionally
/// the CA clients must present a certificate from (mutual TLS).
pub struct TlsServer {
    /// The CA certificate (PEM): what a client verifying the server trusts.
    pub ca_pem: String,
    /// The server's certificate (PEM).
    pub cert_pem: String,
    /// The server's key (PEM).
    pub key_pem: String,
    /// When set, clients must present a certificate signed by this CA (PEM).
    pub client_ca_pem: Option<String>,
}

/// A CA and a leaf certificate it signed.
pub struct Issued {
    /// The CA certificate (PEM).
    pub ca_pem: String,
    /// The leaf certificate (PEM).
    pub cert_pem: String,
    /// The leaf's key (PEM).
    pub key_pem: String,
}

/// A fresh CA and a leaf certificate for `names` (DNS names or IP addresses).
pub fn issue(names: &[&str]) -> Issued {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    Issued {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

impl TlsServer {
    /// A server certificate for 127.0.0.1 and `localhost`, from a fresh CA.
    pub fn new() -> Self {
        let issued = issue(&["127.0.0.1", "localhost"]);
        Self {
            ca_pem: issued.ca_pem,
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
            client_ca_pem: None,
        }
    }

    /// The same, requiring client certificates signed by `client_ca_pem`.
    pub fn requiring_clients(client_ca_pem: &str) -> Self {
        Self {
            client_ca_pem: Some(client_ca_pem.to_owned()),
            ..Self::new()
        }
    }

    fn config(&self) -> Arc<rustls::ServerConfig> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs: Vec<rustls::pki_types::CertificateDer<'static>> =
            rustls::pki_types::pem::PemObject::pem_slice_iter(self.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key: rustls::pki_types::PrivateKeyDer<'static> =
            rustls::pki_types::pem::PemObject::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder();
        let builder = match &self.client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes()) {
                    roots.add(c.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

impl Default for TlsServer {
    fn default() -> Self {
        Self::new()
    }
}

/// A server that answers 404 to everything: a serving port without `/metrics`.
pub async fn not_found_server() -> (SocketAddr, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, Router::new())
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (addr, tx)
}
