//! Logs through `tracing`, shaped by the reference's flags: `--zap-encoder json|console` picks
//! the format, `--v` the verbosity (2 = info, 3–4 = debug, 5+ = trace), and
//! `--zap-log-level` or `RUST_LOG` override it.

use tracing_subscriber::EnvFilter;

/// The filter for a `--v` level.
pub fn level_for(verbosity: u8) -> &'static str {
    match verbosity {
        0..=2 => "info",
        3 | 4 => "debug",
        _ => "trace",
    }
}

/// Installs the global subscriber. Safe to call once; later calls are ignored.
pub fn init(verbosity: u8, json: bool, level_override: Option<&str>) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::new(v),
        _ => {
            let level = match level_override {
                Some("debug") => "debug",
                Some("error") => "error",
                Some("warn") => "warn",
                Some("info") => "info",
                Some(other) if other.parse::<i32>().is_ok_and(|n| n <= -3) => "debug",
                _ => level_for(verbosity),
            };
            // Dependencies stay at warn unless asked for: their debug output is not ours.
            EnvFilter::new(format!(
                "warn,endpoint_picker={level},epp={level},vllm_sim={level}"
            ))
        }
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.try_init()
    };
}
