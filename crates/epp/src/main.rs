//! `epp`: the endpoint picker binary. Flags as the reference EPP; see `epp --help`.

use std::process::ExitCode;

use endpoint_picker::app;
use endpoint_picker::config::cli::parse_args;

/// mimalloc: the request path allocates and frees many small buffers (gRPC frames, protobuf
/// messages) across worker threads; glibc malloc spent about 15 % of the EPP's CPU there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints usage errors (exit 2) and --help/--version (exit 0).
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    app::init_logging(&cli);
    let running = match app::start(&cli).await {
        Ok(r) => r,
        Err(error) => {
            eprintln!("epp: {error}");
            tracing::error!(%error, "cannot start");
            return ExitCode::from(1);
        }
    };
    let stopped = running.stopped();
    let failed = tokio::select! {
        () = shutdown_signal() => false,
        // An essential task failed and stopped the EPP: exit instead of idling on.
        () = stopped.cancelled() => true,
    };
    tracing::info!("shutting down: draining open streams");
    running.shutdown();
    running.wait().await;
    tracing::info!("stopped");
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
