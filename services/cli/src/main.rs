//! `flotilla`: the command line of a Flotilla fleet.

use anyhow::Result;
use clap::Parser;

#[tokio::main]
async fn main() -> Result<()> {
    let cli = flotilla_cli::Cli::parse();
    flotilla_kit::logging::init(cli.log_format);
    flotilla_cli::run(cli, flotilla_kit::shutdown_on_signals()).await
}
