//! The `flotilla` command line. Each subcommand is a module; they talk to
//! the fleet only through the bus, like every other client.

pub mod clusters;
pub mod table;
mod up;

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use flotilla_kit::logging::LogFormat;
use flotilla_kit::{Bus, BusArgs, Shutdown};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local fleet on this machine until Ctrl-C.
    Up(up::UpArgs),
    /// List things in the fleet.
    Get {
        #[command(subcommand)]
        what: GetWhat,
    },
    /// Cordon or uncordon a cluster.
    Cluster {
        #[command(subcommand)]
        action: clusters::ClusterAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum GetWhat {
    /// Clusters: health, GPUs, cost, cached models.
    Clusters {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

pub async fn run(cli: Cli, shutdown: Shutdown) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => up::run(&cli.bus, args, shutdown).await,
        Command::Get {
            what: GetWhat::Clusters { output },
        } => {
            let bus = connect(&cli.bus, &shutdown).await?;
            clusters::get(&bus, output, &mut std::io::stdout()).await
        }
        Command::Cluster { action } => {
            let bus = connect(&cli.bus, &shutdown).await?;
            clusters::cordon(&bus, action, &mut std::io::stdout()).await
        }
    }
}

/// A command-line client gives up quickly rather than retrying forever.
async fn connect(args: &BusArgs, shutdown: &Shutdown) -> anyhow::Result<Bus> {
    let config = args.validate()?;
    tokio::time::timeout(
        Duration::from_secs(5),
        Bus::connect(&config, "flotilla-cli", shutdown),
    )
    .await
    .with_context(|| {
        format!(
            "cannot reach NATS at {} (is the fleet up? try `flotilla up`)",
            config.nats_url
        )
    })?
    .map_err(Into::into)
}
