//! `metrics-data-source`: polls each endpoint's Prometheus `/metrics` page (GIE v1.5 /
//! llm-d-router v0.10).
//!
//! Parameters (unknown ones are refused), with the EPP's flags as their defaults:
//! * `scheme` (`--model-server-metrics-scheme`, `http`): `http` or `https`;
//! * `path` (`--model-server-metrics-path`, `/metrics`);
//! * `port` (`--model-server-metrics-port`, the endpoint's own port): for servers whose
//!   metrics live on another port than the one they serve on; the endpoints file's
//!   `metricsPort` still wins for its endpoint;
//! * `insecureSkipVerify` (`--model-server-metrics-https-insecure-skip-verify`, true): for
//!   `https` (the reference's chart writes it for `http` too, where it has nothing to do);
//! * `caCertPath`: a PEM bundle the server's certificate must chain to (verification on; an
//!   explicit `insecureSkipVerify: true` beside it is refused. llm-d-router v0.10 ignores the
//!   bundle unless `insecureSkipVerify: false` is written too);
//! * `clientCertPath` and `clientKeyPath`: a client certificate for mutual TLS (both or
//!   neither);
//! * `interval` (`--refresh-metrics-interval`): time between scrapes of one endpoint.
//!
//! Plain HTTP goes over one kept-alive HTTP/1.1 connection per endpoint (see [`super::fetch`]);
//! HTTPS through a `reqwest` client with the source's TLS settings. The page asked for is
//! narrowed with `?name[]=` to the series the extractors want (`--model-server-metrics-name-filter`);
//! a server that ignores it sends the whole page.
//!
//! vLLM ignores the filter at `/metrics` and honours it at `/metrics/`: its `/metrics` route is
//! prometheus-fastapi-instrumentator's handler, which renders every family, and the
//! `prometheus_client` ASGI app mounted beside it answers the path with a trailing slash and
//! collects only the families asked for. Rendering the whole page costs vLLM's API server, the
//! process that also streams tokens, about 12 ms of CPU per scrape against 1 ms narrowed
//! (vLLM 0.32, measured in `docs/benchmarks.md`, "Real vLLM"). So when the first page of an endpoint holds
//! series that were not asked for, the poller asks the same path with a trailing slash once;
//! if that page holds every asked-for series the first one had and nothing else, it scrapes
//! there from then on and logs the switch. Otherwise (another page, an error, or no answer
//! within half the scrape timeout of the first poll's start) it keeps the configured path;
//! the first page is used either way.

use std::any::TypeId;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

use super::fetch::Fetcher;
use super::prom::sample_names;
use crate::datalayer::Endpoint;
use crate::framework::datalayer::{PollFuture, Poller, PollingSource, SourceError};

/// The source's settings before the plugin's parameters apply (from the flags).
#[derive(Debug, Clone)]
pub struct MetricsDefaults {
    /// `http` or `https`.
    pub scheme: String,
    /// Path of the page.
    pub path: String,
    /// Port for every endpoint (`None`: the endpoint's own).
    pub port: Option<u16>,
    /// Skip certificate verification for `https`.
    pub insecure_skip_verify: bool,
    /// Limit on one scrape.
    pub timeout: Duration,
    /// Ask for only the needed series.
    pub name_filter: bool,
}

impl Default for MetricsDefaults {
    fn default() -> Self {
        Self {
            scheme: "http".into(),
            path: "/metrics".into(),
            port: None,
            insecure_skip_verify: true,
            timeout: Duration::from_secs(1),
            name_filter: true,
        }
    }
}

/// Parameters as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsSourceParams {
    /// `http` or `https`.
    pub scheme: Option<String>,
    /// Path of the page.
    pub path: Option<String>,
    /// Port of the page.
    pub port: Option<i64>,
    /// Skip certificate verification.
    pub insecure_skip_verify: Option<bool>,
    /// CA bundle for verification.
    pub ca_cert_path: Option<PathBuf>,
    /// Client certificate (mutual TLS).
    pub client_cert_path: Option<PathBuf>,
    /// Client key (mutual TLS).
    pub client_key_path: Option<PathBuf>,
    /// Time between scrapes, e.g. `1s`.
    pub interval: Option<String>,
}

/// Why the parameters are unusable.
#[derive(Debug, thiserror::Error)]
pub enum MetricsSourceError {
    /// Not `http` or `https`.
    #[error("scheme '{0}' is not http or https")]
    Scheme(String),
    /// A path without the leading slash.
    #[error("path '{0}' must start with '/'")]
    Path(String),
    /// A port out of range.
    #[error("invalid port {0}: must be between 1 and 65535")]
    Port(i64),
    /// One of the client pair without the other.
    #[error("clientCertPath and clientKeyPath must be set together")]
    ClientPair,
    /// TLS files set for plain HTTP.
    #[error("{0} is set but scheme is http")]
    TlsOnHttp(&'static str),
    /// A CA bundle to verify with, and verification turned off.
    #[error(
        "caCertPath and insecureSkipVerify: true contradict each other (llm-d-router v0.10 ignores the CA then); keep one"
    )]
    CaWithoutVerify,
    /// An interval that does not parse or is zero.
    #[error("interval: {0}")]
    Interval(String),
    /// TLS material that cannot be read or used.
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// See the module docs.
#[derive(Debug)]
pub struct MetricsSource {
    scheme: String,
    path: String,
    port: Option<u16>,
    interval: Option<Duration>,
    timeout: Duration,
    name_filter: bool,
    client: reqwest::Client,
}

fn read(path: &Path) -> Result<Vec<u8>, SourceError> {
    std::fs::read(path).map_err(|source| SourceError::File {
        path: path.to_owned(),
        source,
    })
}

impl MetricsSource {
    /// A source from `defaults` overridden by `params`.
    pub fn new(defaults: &MetricsDefaults, params: &MetricsSourceParams) -> Result<Self, MetricsSourceError> {
        let scheme = params.scheme.clone().unwrap_or_else(|| defaults.scheme.clone());
        if scheme != "http" && scheme != "https" {
            return Err(MetricsSourceError::Scheme(scheme));
        }
        let path = params.path.clone().unwrap_or_else(|| defaults.path.clone());
        if !path.starts_with('/') {
            return Err(MetricsSourceError::Path(path));
        }
        let port = match params.port {
            Some(p) => Some(
                u16::try_from(p)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or(MetricsSourceError::Port(p))?,
            ),
            None => defaults.port,
        };
        let interval = match &params.interval {
            Some(s) => {
                let d = crate::config::cli::go_duration(s).map_err(MetricsSourceError::Interval)?;
                if d.is_zero() {
                    return Err(MetricsSourceError::Interval(format!("'{s}' must be positive")));
                }
                Some(d)
            }
            None => None,
        };
        if params.client_cert_path.is_some() != params.client_key_path.is_some() {
            return Err(MetricsSourceError::ClientPair);
        }
        if scheme == "http" {
            for (set, name) in [
                (params.ca_cert_path.is_some(), "caCertPath"),
                (params.client_cert_path.is_some(), "clientCertPath"),
            ] {
                if set {
                    return Err(MetricsSourceError::TlsOnHttp(name));
                }
            }
        }
        if params.ca_cert_path.is_some() && params.insecure_skip_verify == Some(true) {
            return Err(MetricsSourceError::CaWithoutVerify);
        }
        // reqwest is built without a bundled crypto provider; install ring (a no-op if done).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(defaults.timeout)
            .pool_max_idle_per_host(1)
            .tcp_nodelay(true)
            .no_proxy();
        if let Some(ca) = &params.ca_cert_path {
            let certs = reqwest::Certificate::from_pem_bundle(&read(ca)?).map_err(SourceError::Client)?;
            builder = builder.tls_certs_only(certs);
        } else {
            let skip = params
                .insecure_skip_verify
                .unwrap_or(defaults.insecure_skip_verify);
            builder = builder.danger_accept_invalid_certs(skip);
        }
        if let (Some(cert), Some(key)) = (&params.client_cert_path, &params.client_key_path) {
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend(read(key)?);
            builder = builder.identity(reqwest::Identity::from_pem(&pem).map_err(SourceError::Client)?);
        }
        let client = builder.build().map_err(SourceError::Client)?;
        Ok(Self {
            scheme,
            path,
            port,
            interval,
            timeout: defaults.timeout,
            name_filter: defaults.name_filter,
            client,
        })
    }

    /// The page's URL for `endpoint`, narrowed to `names` when name filtering is on.
    pub fn url(&self, endpoint: &Endpoint, names: &[String]) -> Result<reqwest::Url, SourceError> {
        let port = endpoint
            .metrics_port
            .or(self.port)
            .unwrap_or(endpoint.address.port());
        let host = match endpoint.address.ip() {
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        };
        let text = format!("{}://{host}:{port}{}", self.scheme, self.path);
        let mut url = reqwest::Url::parse(&text).map_err(|source| SourceError::Url { url: text, source })?;
        if self.name_filter && !names.is_empty() {
            let mut query = url.query_pairs_mut();
            for name in names {
                query.append_pair("name[]", name);
            }
        }
        Ok(url)
    }
}

struct MetricsPoller {
    fetcher: Fetcher,
    url: reqwest::Url,
    /// What the narrowed-page check needs until it has run (see the module docs).
    check: Option<NarrowCheck>,
}

/// The one-time check for a server that honours `name[]` only at the path with a trailing slash.
struct NarrowCheck {
    names: Vec<String>,
    addr: SocketAddr,
    client: reqwest::Client,
    /// How long after the first poll starts the check may still wait: half the poll's time
    /// limit, so the first page is never lost to a slow check.
    limit: Duration,
}

fn asked(names: &[String], sample: &[u8]) -> bool {
    names.iter().any(|n| n.as_bytes() == sample)
}

impl NarrowCheck {
    /// The narrowed page's URL, when `page` (from `url`) holds series that were not asked for.
    fn alternative(&self, url: &reqwest::Url, page: &[u8]) -> Option<reqwest::Url> {
        if url.path().ends_with('/') || sample_names(page).all(|n| asked(&self.names, n)) {
            return None;
        }
        let mut alt = url.clone();
        alt.set_path(&format!("{}/", url.path()));
        Some(alt)
    }

    /// Whether `narrowed` holds every asked-for series `full` has, and nothing else.
    fn narrows(&self, full: &[u8], narrowed: &[u8]) -> bool {
        let got: std::collections::HashSet<&[u8]> = sample_names(narrowed).collect();
        !got.is_empty()
            && got.iter().all(|n| asked(&self.names, n))
            && sample_names(full)
                .filter(|n| asked(&self.names, n))
                .all(|n| got.contains(n))
    }

    /// Moves `poller` to the narrowed page if the server offers one (see the module docs).
    async fn run(self, poller: &mut MetricsPoller, page: &[u8], deadline: tokio::time::Instant) {
        let Some(alt) = self.alternative(&poller.url, page) else {
            return;
        };
        let Ok(mut fetcher) = Fetcher::new(&alt, self.addr, &self.client) else {
            return;
        };
        match tokio::time::timeout_at(deadline, fetcher.fetch()).await {
            Ok(Ok(narrowed)) if self.narrows(page, &narrowed) => {
                tracing::info!(
                    from = %poller.url,
                    to = %alt,
                    full_bytes = page.len(),
                    narrowed_bytes = narrowed.len(),
                    "the server ignores name[] at the configured path but honours it with a trailing slash (vLLM); scraping there"
                );
                poller.fetcher = fetcher;
                poller.url = alt;
            }
            _ => {
                tracing::debug!(url = %poller.url, "the server sends unasked-for series; no narrowed page found")
            }
        }
    }
}

impl Poller for MetricsPoller {
    fn poll(&mut self) -> PollFuture<'_> {
        Box::pin(async move {
            let started = tokio::time::Instant::now();
            let page: Bytes = self.fetcher.fetch().await?;
            if let Some(check) = self.check.take() {
                let deadline = started + check.limit;
                check.run(self, &page, deadline).await;
            }
            Ok(Box::new(page) as crate::framework::datalayer::Payload)
        })
    }

    fn target(&self) -> String {
        self.url.to_string()
    }
}

impl PollingSource for MetricsSource {
    fn output(&self) -> TypeId {
        TypeId::of::<Bytes>()
    }

    fn interval(&self) -> Option<Duration> {
        self.interval
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn poller(&self, endpoint: &Endpoint, hints: &[String]) -> Result<Box<dyn Poller>, SourceError> {
        let url = self.url(endpoint, hints)?;
        let port = url.port_or_known_default().unwrap_or(endpoint.address.port());
        let addr = SocketAddr::new(endpoint.address.ip(), port);
        let fetcher = Fetcher::new(&url, addr, &self.client)?;
        let check = (self.name_filter && !hints.is_empty()).then(|| NarrowCheck {
            names: hints.to_vec(),
            addr,
            client: self.client.clone(),
            limit: self.timeout / 2,
        });
        Ok(Box::new(MetricsPoller { fetcher, url, check }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(yaml: &str) -> Result<MetricsSource, MetricsSourceError> {
        let params: MetricsSourceParams = serde_yaml::from_str(yaml).unwrap();
        MetricsSource::new(&MetricsDefaults::default(), &params)
    }

    #[test]
    fn parameters_shape_the_url() {
        let ep = Endpoint::from_address("10.0.0.1:8000".parse().unwrap());
        let s = source("{scheme: https, path: /stats, port: 9400}").unwrap();
        assert_eq!(s.url(&ep, &[]).unwrap().as_str(), "https://10.0.0.1:9400/stats");
        let s = source("{}").unwrap();
        let url = s.url(&ep, &["vllm:x".into()]).unwrap();
        assert_eq!(url.as_str(), "http://10.0.0.1:8000/metrics?name%5B%5D=vllm%3Ax");
        let mut own = ep.clone();
        own.metrics_port = Some(9001);
        assert_eq!(
            source("{port: 9400}").unwrap().url(&own, &[]).unwrap().port(),
            Some(9001)
        );
        let v6 = Endpoint::from_address("[fd00::1]:8000".parse().unwrap());
        assert_eq!(s.url(&v6, &[]).unwrap().as_str(), "http://[fd00::1]:8000/metrics");
    }

    #[test]
    fn bad_parameters_are_named() {
        for (yaml, want) in [
            ("{scheme: ftp}", "scheme 'ftp'"),
            ("{path: metrics}", "must start with '/'"),
            ("{port: 70000}", "invalid port 70000"),
            ("{port: 0}", "invalid port 0"),
            ("{scheme: https, clientCertPath: /c}", "set together"),
            ("{caCertPath: /ca.pem}", "caCertPath is set but scheme is http"),
            ("{interval: 0s}", "interval"),
            (
                "{scheme: https, caCertPath: /nonexistent/ca.pem}",
                "/nonexistent/ca.pem",
            ),
        ] {
            let e = source(yaml).unwrap_err().to_string();
            assert!(e.contains(want), "{yaml}: {e}");
        }
        assert!(serde_yaml::from_str::<MetricsSourceParams>("{portNumber: 1}").is_err());
    }

    const FULL: &str = "# HELP vllm:num_requests_waiting w\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\"} 2.0\nvllm:num_requests_running{model_name=\"m\"} 1.0\nvllm:iteration_tokens_total_bucket{le=\"1.0\"} 0.0\n";
    const NARROW: &str = "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\"} 2.0\nvllm:num_requests_running{model_name=\"m\"} 1.0\n";

    /// A page the test server never answers.
    const HANG: &str = "(no answer)";

    /// A keep-alive HTTP/1.1 server on loopback answering by path (query left out) with
    /// `pages`, 404 elsewhere; returns its address and the paths asked for, in order.
    async fn server(
        pages: &'static [(&'static str, &'static str)],
    ) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                        buf.drain(..head_end);
                        let target = head.split(' ').nth(1).unwrap_or("").to_owned();
                        let path = target.split('?').next().unwrap_or("").to_owned();
                        log.lock().unwrap().push(path.clone());
                        if pages.iter().any(|(p, b)| *p == path && *b == HANG) {
                            std::future::pending::<()>().await;
                        }
                        let (status, body) = match pages.iter().find(|(p, _)| *p == path) {
                            Some((_, b)) => ("200 OK", *b),
                            None => ("404 Not Found", ""),
                        };
                        let resp = format!(
                            "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    async fn polls(
        pages: &'static [(&'static str, &'static str)],
        n: usize,
    ) -> (Vec<String>, Vec<String>, String) {
        let (addr, seen) = server(pages).await;
        let ep = Endpoint::from_address(addr);
        let names: Vec<String> = ["vllm:num_requests_waiting", "vllm:num_requests_running"]
            .map(String::from)
            .to_vec();
        let mut poller = source("{}").unwrap().poller(&ep, &names).unwrap();
        let mut bodies = Vec::new();
        for _ in 0..n {
            let page = poller.poll().await.unwrap();
            let page = page.downcast_ref::<Bytes>().unwrap();
            bodies.push(String::from_utf8(page.to_vec()).unwrap());
        }
        let paths = seen.lock().unwrap().clone();
        (paths, bodies, poller.target())
    }

    #[tokio::test]
    async fn a_server_that_narrows_only_with_a_trailing_slash_is_scraped_there() {
        // vLLM's shape: the instrumentator's /metrics ignores name[], the mounted app narrows.
        let (paths, bodies, target) = polls(&[("/metrics", FULL), ("/metrics/", NARROW)], 3).await;
        assert_eq!(paths, ["/metrics", "/metrics/", "/metrics/", "/metrics/"]);
        assert_eq!(bodies, [FULL, NARROW, NARROW], "the first page is still used");
        assert!(target.contains("/metrics/?name%5B%5D="), "{target}");
    }

    #[tokio::test]
    async fn the_configured_path_is_kept_unless_the_other_page_narrows() {
        // Narrowed already: nothing else is asked for.
        let (paths, _, _) = polls(&[("/metrics", NARROW)], 3).await;
        assert_eq!(paths, ["/metrics"; 3]);
        // No page with a trailing slash: one probe, then the configured path.
        let (paths, bodies, _) = polls(&[("/metrics", FULL)], 3).await;
        assert_eq!(paths, ["/metrics", "/metrics/", "/metrics", "/metrics"]);
        assert_eq!(bodies, [FULL; 3]);
        // The same whole page there, or one missing an asked-for series: kept.
        let (paths, _, _) = polls(&[("/metrics", FULL), ("/metrics/", FULL)], 2).await;
        assert_eq!(paths, ["/metrics", "/metrics/", "/metrics"]);
        const LESS: &str = "vllm:num_requests_waiting 2.0\n";
        let (paths, _, _) = polls(&[("/metrics", FULL), ("/metrics/", LESS)], 2).await;
        assert_eq!(paths, ["/metrics", "/metrics/", "/metrics"]);
        // No answer there: the first page is still used, within the poll's time limit.
        let started = std::time::Instant::now();
        let (paths, bodies, _) = polls(&[("/metrics", FULL), ("/metrics/", HANG)], 2).await;
        assert_eq!(paths, ["/metrics", "/metrics/", "/metrics"]);
        assert_eq!(bodies, [FULL; 2]);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
