//! `flotilla`: the command line of a Flotilla fleet.

use anyhow::Result;

#[tokio::main]
async fn main() -> Result<()> {
    let cli = flotilla_cli::Cli::parse_line();
    // A command prints its answer; logs are for `up`, which runs services.
    let default_filter = match cli.command {
        flotilla_cli::Command::Up(_) | flotilla_cli::Command::Executor { .. } => {
            flotilla_kit::logging::SERVICE_DEFAULT
        }
        _ => "warn",
    };
    flotilla_kit::logging::init(cli.log_format, default_filter);
    flotilla_cli::run(cli, flotilla_kit::shutdown_on_signals()).await
}
