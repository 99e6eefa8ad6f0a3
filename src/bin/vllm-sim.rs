//! `vllm-sim`: a simulated vLLM server for end-to-end tests of the endpoint picker. It speaks
//! vLLM's OpenAI routes and `/metrics`, models queueing, KV-cache pressure, prefix caching and
//! LoRA, and needs no GPU or model. See `docs/simulator.md`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use endpoint_picker::sim::{SimConfig, Simulator, serve};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

fn non_negative(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("must be a finite number >= 0, got {s}"))
    }
}

/// A simulated vLLM server (OpenAI API, /metrics, prefix cache, queueing, LoRA).
#[derive(Debug, Parser)]
#[command(name = "vllm-sim", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Served model name.
    #[arg(long, default_value = "tiny")]
    model: String,
    /// Instance id for the x-vllm-sim-id header (default: HOST:PORT).
    #[arg(long)]
    id: Option<String>,
    /// Running slots.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    max_num_seqs: u32,
    /// KV-cache blocks.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    kv_blocks: u32,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    block_size: u32,
    /// Prompt bytes counted as one token.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    bytes_per_token: u32,
    /// Prefill milliseconds per prompt token not found in the prefix cache.
    #[arg(long, default_value_t = 0.1, value_parser = non_negative)]
    prefill_ms_per_token: f64,
    /// Decode milliseconds per output token after the first.
    #[arg(long, default_value_t = 10.0, value_parser = non_negative)]
    decode_ms_per_token: f64,
    /// Output tokens when a request sets no max_tokens.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    output_tokens: u32,
    /// Multiplies every simulated delay (0.01 runs 100 times faster).
    #[arg(long, default_value_t = 1.0, value_parser = non_negative)]
    time_scale: f64,
    /// LoRA adapters that may run at once; 0 disables LoRA.
    #[arg(long, default_value_t = 0)]
    max_loras: u32,
    /// Comma-separated LoRA adapter names (needs --max-loras > 0).
    #[arg(long, value_delimiter = ',')]
    lora_adapters: Vec<String>,
    /// Largest accepted request body in bytes.
    #[arg(long, default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    max_body_bytes: u64,
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down; waiting for in-flight requests");
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();

    let mut config = SimConfig {
        model: cli.model.clone(),
        served_by: String::new(),
        max_num_seqs: cli.max_num_seqs,
        kv_blocks: cli.kv_blocks,
        block_size: cli.block_size,
        bytes_per_token: cli.bytes_per_token,
        prefill_seconds_per_token: cli.prefill_ms_per_token / 1000.0,
        decode_seconds_per_token: cli.decode_ms_per_token / 1000.0,
        default_output_tokens: cli.output_tokens,
        time_scale: cli.time_scale,
        max_loras: cli.max_loras,
        lora_adapters: cli.lora_adapters.clone(),
        max_body_bytes: usize::try_from(cli.max_body_bytes).unwrap_or(usize::MAX),
    };
    if let Err(e) = config.validate() {
        Cli::command().error(ErrorKind::ValueValidation, e).exit();
    }

    let listener = match TcpListener::bind((cli.host.as_str(), cli.port)).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(host = %cli.host, port = cli.port, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let port = listener.local_addr().map_or(cli.port, |a| a.port());
    config.served_by = cli.id.clone().unwrap_or_else(|| format!("{}:{port}", cli.host));
    let addr = listener
        .local_addr()
        .map_or_else(|_| format!("{}:{port}", cli.host), |a| a.to_string());
    tracing::info!(
        %addr,
        id = %config.served_by,
        model = %config.model,
        max_num_seqs = config.max_num_seqs,
        kv_blocks = config.kv_blocks,
        block_size = config.block_size,
        time_scale = config.time_scale,
        "vllm-sim listening on {addr}"
    );
    let sim = Simulator::new(config);
    match serve(listener, sim, shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}
