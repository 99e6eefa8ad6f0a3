//! `--client inference-perf`: the load comes from the field's load generator (PyPI
//! `inference-perf`) instead of the bench's own client, so the figures read as published ones
//! do: its `shared_prefix` data (groups of random-token system prompts of the workload's
//! lengths, tokenised with the fixtures' tokenizer), Poisson or concurrent load, streaming
//! completions (its `shared_prefix` data has no chat form), and its
//! `summary_lifecycle_metrics.json` report (TTFT, inter-token latency and request latency
//! percentiles). The bench still reads the servers' own prefix-cache hit rate
//! and the requests each took. inference-perf 0.3.0 draws its prompts unseeded, so `--seed`
//! does not fix them (each strategy gets other random prompts of the same shape), and
//! `--reset-every` is refused with it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::workload::Workload;

/// The report's latency figures, in seconds.
#[derive(Debug)]
pub struct Report {
    /// Requests sent.
    pub requests: usize,
    /// Requests answered.
    pub ok: usize,
    /// TTFT p50/p90/p99.
    pub ttft: [f64; 3],
    /// Inter-token latency p50/p90.
    pub itl: [f64; 2],
    /// Request latency p50/p90.
    pub e2e: [f64; 2],
    /// Output tokens per second.
    pub output_tokens_per_s: f64,
}

/// The `inference-perf` executable: `$INFERENCE_PERF_BIN` or `.venv-inference-perf`
/// (`scripts/ensure-inference-perf`).
fn binary() -> PathBuf {
    std::env::var_os("INFERENCE_PERF_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../.venv-inference-perf/bin/inference-perf"
            ))
        })
}

fn tokenizer() -> &'static str {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/vllm-0.32-cpu/tokenization"
    )
}

/// The configuration for one run against `base_url`: `rate` requests/s for `duration` s
/// (Poisson), or `concurrency` in flight for `count` requests.
pub fn config(
    workload: &Workload,
    base_url: &str,
    rate: Option<f64>,
    concurrency: Option<usize>,
    duration: f64,
    count: usize,
    dir: &Path,
) -> Value {
    let Workload::SharedPrefix {
        groups,
        prompts_per_group,
        system_prompt_len,
        question_len,
        output_len,
    } = workload
    else {
        panic!("--client inference-perf runs the shared_prefix workload only");
    };
    let mut load = match (rate, concurrency) {
        (Some(rate), _) => serde_json::json!({
            "type": "poisson",
            "stages": [{"rate": rate, "duration": duration.ceil() as u64}],
        }),
        (None, Some(n)) => serde_json::json!({
            "type": "concurrent",
            "stages": [{"num_requests": count, "concurrency_level": n}],
        }),
        (None, None) => unreachable!("a load is a rate or a concurrency"),
    };
    // One worker process: the machine's cores serve the routers and servers under test.
    load["num_workers"] = 1.into();
    load["worker_max_concurrency"] = 512.into();
    load["request_timeout"] = 180.into();
    serde_json::json!({
        "api": {"type": "completion", "streaming": true},
        "data": {
            "type": "shared_prefix",
            "shared_prefix": {
                "num_groups": groups,
                "num_prompts_per_group": prompts_per_group,
                "system_prompt_len": system_prompt_len,
                "question_len": question_len,
                "output_len": output_len,
            },
        },
        "load": load,
        "server": {"type": "vllm", "model_name": "tiny", "base_url": base_url, "ignore_eos": true},
        "tokenizer": {"pretrained_model_name_or_path": tokenizer()},
        "report": {
            "request_lifecycle": {"summary": true, "per_stage": false, "per_request": false},
            "prometheus": null,
        },
        "storage": {"local_storage": {"path": dir.to_string_lossy()}},
    })
}

/// Runs `inference-perf` with `config` (written to `dir`) and reads its summary.
pub fn run(config: &Value, dir: &Path) -> Report {
    std::fs::create_dir_all(dir).unwrap();
    // inference-perf writes no summary when it recorded nothing: never read an older one.
    let summary = dir.join("summary_lifecycle_metrics.json");
    let _ = std::fs::remove_file(&summary);
    let file = dir.join("config.yml");
    std::fs::write(&file, serde_yaml::to_string(config).unwrap()).unwrap();
    let out = Command::new(binary())
        .arg("-c")
        .arg(&file)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); run scripts/ensure-inference-perf",
                binary().display()
            )
        });
    std::fs::write(
        dir.join("inference-perf.log"),
        [&out.stdout[..], &out.stderr[..]].concat(),
    )
    .unwrap();
    assert!(
        out.status.success(),
        "inference-perf failed ({}): see {}",
        out.status,
        dir.join("inference-perf.log").display()
    );
    let text = std::fs::read_to_string(&summary)
        .unwrap_or_else(|e| panic!("no inference-perf summary in {}: {e}", dir.display()));
    parse(&serde_json::from_str(&text).unwrap())
}

/// The figures of a `summary_lifecycle_metrics.json`.
pub fn parse(summary: &Value) -> Report {
    let latency = &summary["successes"]["latency"];
    let pct = |metric: &str, p: &str| latency[metric][p].as_f64().unwrap_or(f64::NAN);
    let ok = summary["successes"]["count"].as_u64().unwrap_or(0) as usize;
    let failed = summary["failures"]["count"].as_u64().unwrap_or(0) as usize;
    Report {
        requests: ok + failed,
        ok,
        ttft: ["median", "p90", "p99"].map(|p| pct("time_to_first_token", p)),
        itl: ["median", "p90"].map(|p| pct("inter_token_latency", p)),
        e2e: ["median", "p90"].map(|p| pct("request_latency", p)),
        output_tokens_per_s: summary["successes"]["throughput"]["output_tokens_per_sec"]
            .as_f64()
            .unwrap_or(0.0),
    }
}

/// One load through `front` with `inference-perf` as the client; its report goes to `dir`.
pub async fn measure(
    front: &crate::Front,
    pool: &crate::Pool,
    workload: &Workload,
    load: crate::Load,
    duration: f64,
    count: usize,
    dir: &Path,
) -> crate::RateResult {
    let base_url = front.url("", 0);
    let (rate, concurrency) = match load {
        crate::Load::Rate(r) => (Some(r), None),
        crate::Load::Concurrency(n) => (None, Some(n)),
    };
    let config = config(workload, &base_url, rate, concurrency, duration, count, dir);
    let before = pool.counters().await;
    let dir = dir.to_owned();
    let report = tokio::task::spawn_blocking(move || run(&config, &dir))
        .await
        .unwrap();
    let (hit_rate, spread) = pool.counters().await.since(&before);
    crate::RateResult {
        workload: workload.name().to_owned(),
        strategy: String::new(),
        backend: pool.backend(),
        client: "inference-perf",
        rate: rate.unwrap_or(0.0),
        concurrency: concurrency.unwrap_or(0),
        requests: report.requests,
        ok: report.ok,
        ttft_p50: report.ttft[0],
        ttft_p90: report.ttft[1],
        ttft_p99: report.ttft[2],
        itl_p50: report.itl[0],
        itl_p90: report.itl[1],
        e2e_p50: report.e2e[0],
        e2e_p90: report.e2e[1],
        output_tokens_per_s: report.output_tokens_per_s,
        hit_rate,
        spread,
        moved: None,
    }
}
