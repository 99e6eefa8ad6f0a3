//! The model servers under test: simulated (`vllm-sim`, in process, restarted per strategy)
//! or real (vLLM's CPU build serving the project's tiny model, started once per run, each
//! pinned to one core, their prefix caches reset between strategies). Both report the same
//! counters: the servers' prefix-cache hits and queries (tokens) and the requests each received.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use epp_testkit::e2e::Sim;

/// The servers' counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Prefix-cache hits, in tokens, summed over the servers.
    pub hits: u64,
    /// Prefix-cache queries, in tokens, summed over the servers.
    pub queries: u64,
    /// Requests each server has taken (simulators: received; vLLM: finished,
    /// `vllm:request_success_total`), in pool order.
    pub requests: Vec<u64>,
}

impl Counters {
    /// What happened between `before` and `self`: (hit rate, requests per server).
    pub fn since(&self, before: &Counters) -> (f64, Vec<usize>) {
        let queries = self.queries.saturating_sub(before.queries);
        let rate = if queries > 0 {
            self.hits.saturating_sub(before.hits) as f64 / queries as f64
        } else {
            0.0
        };
        let spread = self
            .requests
            .iter()
            .zip(before.requests.iter().chain(std::iter::repeat(&0)))
            .map(|(a, b)| a.saturating_sub(*b) as usize)
            .collect();
        (rate, spread)
    }
}

/// A real vLLM server (the tiny model, `scripts/ensure-vllm`), killed with its engine process on
/// drop.
pub struct VllmServer {
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

/// How a real server is run.
#[derive(Debug, Clone)]
pub struct VllmOptions {
    /// The `serve-tiny` script `scripts/ensure-vllm` prints.
    pub serve: PathBuf,
    /// `--num-gpu-blocks-override`: KV blocks of 32 tokens per server.
    pub kv_blocks: usize,
    /// `--max-num-seqs`.
    pub max_num_seqs: usize,
}

impl VllmServer {
    /// Starts the server on `addr`, pinned to `core`, with a dev-mode `/reset_prefix_cache`.
    fn spawn(opts: &VllmOptions, addr: SocketAddr, core: usize) -> Self {
        use std::os::unix::process::CommandExt;
        let log = std::env::temp_dir().join(format!("vllm-{}.log", addr.port()));
        let child = Command::new("taskset")
            .args(["-c", &core.to_string()])
            .arg(&opts.serve)
            .args([
                "--host",
                &addr.ip().to_string(),
                "--port",
                &addr.port().to_string(),
            ])
            .args(["--num-gpu-blocks-override", &opts.kv_blocks.to_string()])
            .args(["--max-num-seqs", &opts.max_num_seqs.to_string()])
            .env("VLLM_SERVER_DEV_MODE", "1")
            .env("VLLM_HOST_IP", addr.ip().to_string())
            // Its own process group, so that drop ends the engine process too.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(
                std::fs::File::options().append(true).open(&log).unwrap(),
            ))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e} (scripts/ensure-vllm installs it)",
                    opts.serve.display()
                )
            });
        Self { addr, child, log }
    }

    /// Waits for `/health`, up to `timeout`.
    async fn ready(&mut self, client: &reqwest::Client, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("vLLM on {} exited with {status}:\n{}", self.addr, tail(&self.log));
            }
            if let Ok(r) = client.get(format!("http://{}/health", self.addr)).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!(
            "vLLM on {} not healthy after {timeout:?}:\n{}",
            self.addr,
            tail(&self.log)
        );
    }

    /// Sums the counters of `/metrics` the benchmark reads: (hits, queries, requests).
    async fn counters(&self, client: &reqwest::Client) -> (u64, u64, u64) {
        let text = match client.get(format!("http://{}/metrics", self.addr)).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => panic!("vLLM on {}: /metrics: {e}", self.addr),
        };
        let sum = |family: &str| -> u64 {
            text.lines()
                .filter(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        };
        (
            sum("vllm:prefix_cache_hits_total"),
            sum("vllm:prefix_cache_queries_total"),
            sum("vllm:request_success_total"),
        )
    }
}

impl Drop for VllmServer {
    fn drop(&mut self) {
        // SIGTERM to the group (API server and engine core), then SIGKILL what is left.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The servers of one strategy's run.
pub enum Pool {
    Sims(Vec<Sim>),
    Vllm(Vec<VllmServer>),
}

impl Pool {
    /// `sim` or `vllm`, as results name the backend.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sims(_) => "sim",
            Self::Vllm(_) => "vllm",
        }
    }

    /// Starts `n` real servers on 127.0.0.(20+i), server `i` pinned to core `i % cores`, and
    /// waits until all are healthy (start-up takes about a minute).
    pub async fn start_vllm(opts: &VllmOptions, n: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let ips: Vec<std::net::IpAddr> = (0..n)
            .map(|i| format!("127.0.0.{}", 20 + i).parse().unwrap())
            .collect();
        let port = epp_testkit::free_ports_on(&ips, 1)[0];
        let mut servers: Vec<VllmServer> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| VllmServer::spawn(opts, SocketAddr::new(*ip, port), i % cores))
            .collect();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        for s in &mut servers {
            s.ready(&client, Duration::from_secs(600)).await;
        }
        Pool::Vllm(servers)
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Pool::Sims(sims) => sims.iter().map(|s| s.addr).collect(),
            Pool::Vllm(servers) => servers.iter().map(|s| s.addr).collect(),
        }
    }

    pub async fn counters(&self) -> Counters {
        match self {
            Pool::Sims(sims) => sims.iter().fold(Counters::default(), |mut c, s| {
                let st = s.sim.stats();
                c.hits += st.prefix_cache_hits;
                c.queries += st.prefix_cache_queries;
                c.requests.push(st.requests_received);
                c
            }),
            Pool::Vllm(servers) => {
                let client = reqwest::Client::builder().no_proxy().build().unwrap();
                let mut c = Counters::default();
                for s in servers {
                    let (h, q, r) = s.counters(&client).await;
                    c.hits += h;
                    c.queries += q;
                    c.requests.push(r);
                }
                c
            }
        }
    }

    /// The `/reset_prefix_cache` URLs (running requests preempted).
    pub fn reset_urls(&self) -> Vec<String> {
        self.addrs()
            .iter()
            .map(|a| format!("http://{a}/reset_prefix_cache?reset_running_requests=true"))
            .collect()
    }

    /// Empties every server's prefix cache, so that the next strategy starts cold as it does
    /// on fresh simulators (the previous strategy's requests have all been answered).
    pub async fn reset(&self) {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        for url in self.reset_urls() {
            match client.post(&url).send().await {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => panic!("{url}: {}", r.status()),
                Err(e) => panic!("{url}: {e}"),
            }
        }
    }
}
