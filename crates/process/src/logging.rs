//! Tracing set-up. `FLOTILLA_LOG` (or `RUST_LOG`) filters, `info` by
//! default; `--log-format json` writes one JSON object a line.

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// What services log by default.
pub const SERVICE_DEFAULT: &str = "info,async_nats=warn";

/// Installs the global subscriber; a second call (tests) is a no-op.
/// `default_filter` applies when neither variable is set.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = std::env::var("FLOTILLA_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
