//! The `flotilla` command line. Each subcommand is a module; they talk to
//! the fleet only through the bus, like every other client.

mod up;

use clap::{Parser, Subcommand};
use flotilla_kit::logging::LogFormat;
use flotilla_kit::{BusArgs, Shutdown};

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Place, roll out and serve LLM inference across GPU clusters"
)]
pub struct Cli {
    #[command(flatten)]
    pub bus: BusArgs,

    /// Log format.
    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local fleet on this machine: nats-server with JetStream and
    /// the bus topology, until Ctrl-C.
    Up(up::UpArgs),
}

pub async fn run(cli: Cli, shutdown: Shutdown) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => up::run(&cli.bus, args, shutdown).await,
    }
}
