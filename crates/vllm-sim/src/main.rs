//! `vllm-sim`: a simulated vLLM server for end-to-end tests of the endpoint picker. It speaks
//! vLLM's OpenAI routes and `/metrics`, models queueing, KV-cache pressure, prefix caching and
//! LoRA, and needs no GPU or model. See `docs/simulator.md`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use vllm_sim::cli::Cli;
use vllm_sim::{Simulator, serve};

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

    let mut config = cli.sim_config();
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
    let events = match cli.kv_events() {
        Ok(e) => e,
        Err(e) => Cli::command().error(ErrorKind::ValueValidation, e).exit(),
    };
    let prompts = match &cli.tokenizer {
        Some(dir) => {
            match vllm_sim::vllm_prompt::Model::load(dir, vllm_sim::vllm_prompt::DEFAULT_CACHE_BYTES) {
                Ok(m) => Some(std::sync::Arc::new(m)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot load the tokenizer");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };
    let publisher = match events.map(vllm_sim::kvevents::Publisher::start).transpose() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot publish KV events");
            return ExitCode::FAILURE;
        }
    };
    if let Some(p) = &publisher {
        tracing::info!(endpoint = %p.endpoint, replay = ?p.replay_endpoint, "publishing KV events");
    }
    let sim = Simulator::with_parts(config, prompts, publisher);
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
