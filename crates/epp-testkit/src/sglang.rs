//! SGLang's router (PyPI `sglang-router`, run as `python -m sglang_router.launch_router`) as a
//! child process in front of a pool of model servers, so that a benchmark can compare its
//! `cache_aware` policy with the picker on the same `vllm-sim` pool.
//!
//! The interpreter comes from `scripts/ensure-sglang-router`. The router listens on a free
//! 127.0.0.1 port and exports its Prometheus metrics on another free 127.0.0.1 port (its default
//! would be 0.0.0.0:29000). Everything else keeps the router's defaults unless `extra` overrides
//! it (argparse keeps the last value of a repeated flag). See docs/simulator.md, "Running SGLang's
//! router in front of vllm-sim", for what it needs from the workers and what it forwards.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long the router may take to answer and report every worker healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Starts tried when the router exits during start-up (another process took a port we picked).
const START_ATTEMPTS: usize = 3;
/// Lines of the router's output kept for error messages.
const LOG_LINES: usize = 60;

/// A running SGLang router; killed (and waited for) on drop.
pub struct SglangRouter {
    /// `http://127.0.0.1:<port>`: send `/v1/chat/completions`, `/v1/completions` here.
    pub url: String,
    child: RouterProcess,
}

impl SglangRouter {
    /// Starts the router (policy `cache_aware`, default parameters unless `extra` overrides)
    /// in front of `workers` (`http://ip:port`), on a free 127.0.0.1 port, metrics on another
    /// free 127.0.0.1 port; waits until it answers and every worker is healthy. `python` is the
    /// interpreter from scripts/ensure-sglang-router.
    ///
    /// Panics, with the tail of the router's output, if it does not get there within a minute.
    pub async fn start(python: &Path, workers: &[SocketAddr], extra: &[&str]) -> Self {
        assert!(
            !workers.is_empty(),
            "SglangRouter::start needs at least one worker"
        );
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = match reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
        {
            Ok(c) => c,
            Err(e) => panic!("cannot build an HTTP client: {e}"),
        };
        let worker_urls: Vec<String> = workers.iter().map(|w| format!("http://{w}")).collect();
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            let (port, metrics_port) = free_ports();
            let mut child = RouterProcess::spawn(python, &worker_urls, port, metrics_port, extra);
            let url = format!("http://127.0.0.1:{port}");
            match wait_ready(&client, &url, &worker_urls, &mut child).await {
                Ok(()) => return Self { url, child },
                Err(Failure::Exited(why)) => {
                    child.wait_output_closed(Duration::from_secs(1)).await;
                    failures.push(format!("attempt {attempt}: {why}\n{}", child.log_tail()));
                }
                Err(Failure::NotReady(why)) => {
                    panic!(
                        "SGLang router at {url} not ready after {READY_TIMEOUT:?}: {why}\n{}",
                        child.log_tail()
                    );
                }
            }
        }
        panic!(
            "SGLang router ({} -m sglang_router.launch_router) did not start:\n{}",
            python.display(),
            failures.join("\n")
        );
    }
}

impl Drop for SglangRouter {
    /// Kills the router and waits for it (the process also dies if `start` panics half-way).
    fn drop(&mut self) {
        self.child.stop();
    }
}

enum Failure {
    /// The process ended during start-up.
    Exited(String),
    /// It runs but did not report every worker healthy in time.
    NotReady(String),
}

/// Polls `GET /workers` until every worker is listed as healthy.
async fn wait_ready(
    client: &reqwest::Client,
    url: &str,
    workers: &[String],
    child: &mut RouterProcess,
) -> Result<(), Failure> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        if let Some(status) = child.exited() {
            return Err(Failure::Exited(format!("the router exited with {status}")));
        }
        match client.get(format!("{url}/workers")).send().await {
            Ok(resp) if resp.status().is_success() => {
                let body =
                    resp.bytes().await.map_err(|e| e.to_string()).and_then(|b| {
                        serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string())
                    });
                match body.map(|b| unhealthy(&b, workers)) {
                    Ok(None) => return Ok(()),
                    Ok(Some(why)) => last = why,
                    Err(e) => last = format!("GET /workers: {e}"),
                }
            }
            Ok(resp) => last = format!("GET /workers: {}", resp.status()),
            Err(e) => last = format!("GET /workers: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Failure::NotReady(last))
}

/// Why the router's `/workers` answer does not show every worker healthy yet, if it does not.
fn unhealthy(body: &serde_json::Value, workers: &[String]) -> Option<String> {
    let listed = body.get("workers").and_then(|w| w.as_array());
    let healthy = |want: &str| {
        listed.into_iter().flatten().any(|w| {
            w.get("url").and_then(|u| u.as_str()) == Some(want)
                && w.get("is_healthy").and_then(|h| h.as_bool()) == Some(true)
        })
    };
    let missing: Vec<&str> = workers
        .iter()
        .map(String::as_str)
        .filter(|w| !healthy(w))
        .collect();
    (!missing.is_empty()).then(|| format!("not (yet) healthy: {}", missing.join(", ")))
}

/// Two distinct ports that were free on 127.0.0.1 a moment ago (see [`crate::free_ports_on`]).
fn free_ports() -> (u16, u16) {
    let ports = crate::free_ports_on(&[std::net::Ipv4Addr::LOCALHOST.into()], 2);
    (ports[0], ports[1])
}

/// The router's process, killed and waited for on drop; its output is kept in a ring buffer
/// (read by two threads, which end when the process does) for error messages.
struct RouterProcess {
    child: Child,
    log: Arc<Mutex<VecDeque<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl RouterProcess {
    fn spawn(python: &Path, workers: &[String], port: u16, metrics_port: u16, extra: &[&str]) -> Self {
        let mut cmd = Command::new(python);
        cmd.args(["-m", "sglang_router.launch_router", "--worker-urls"])
            .args(workers)
            .args(["--policy", "cache_aware", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .args(["--prometheus-host", "127.0.0.1", "--prometheus-port"])
            .arg(metrics_port.to_string())
            .args(["--log-level", "warn"])
            .args(extra)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Workers are on loopback: never send the router's requests through a proxy.
        for var in [
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
        ] {
            cmd.env_remove(var);
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("cannot run {}: {e}", python.display()),
        };
        let mut this = Self {
            child,
            log: Arc::new(Mutex::new(VecDeque::with_capacity(LOG_LINES))),
            readers: Vec::with_capacity(2),
        };
        if let Some(out) = this.child.stdout.take() {
            this.drain(out);
        }
        if let Some(err) = this.child.stderr.take() {
            this.drain(err);
        }
        this
    }

    fn drain(&mut self, pipe: impl Read + Send + 'static) {
        let log = self.log.clone();
        self.readers.push(std::thread::spawn(move || {
            for line in BufReader::new(pipe).split(b'\n') {
                let Ok(line) = line else { break };
                let mut log = log.lock();
                if log.len() == LOG_LINES {
                    log.pop_front();
                }
                log.push_back(without_ansi_escapes(&line));
            }
        }));
    }

    /// After the process ended: waits (bounded) until its last output has been read.
    async fn wait_output_closed(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline && !self.readers.iter().all(|r| r.is_finished()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The exit status if the process has ended.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL and reap; harmless when already done.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines the router printed.
    fn log_tail(&self) -> String {
        let log = self.log.lock();
        if log.is_empty() {
            return "(the router printed nothing)".to_owned();
        }
        log.iter().map(|l| format!("  | {l}\n")).collect()
    }
}

/// `line` as text without the colour codes the router writes even into a pipe.
fn without_ansi_escapes(line: &[u8]) -> String {
    let mut out = Vec::with_capacity(line.len());
    let mut bytes = line.iter().copied();
    while let Some(b) = bytes.next() {
        if b == 0x1b {
            // CSI: ESC '[' parameters, ended by a byte in 0x40..=0x7e.
            if bytes.next() == Some(b'[') {
                for c in bytes.by_ref() {
                    if (0x40..=0x7e).contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(b);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
