//! The `flotilla` command line. Each subcommand is a module; they talk to
//! the fleet only through the bus, like every other client.

pub mod answer;
pub mod clusters;
pub mod deployments;
pub mod models;
pub mod nats_config;
pub mod replicas;
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
    /// Create or change deployments from a YAML file (several documents
    /// allowed; `-` reads standard input).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
    },
    /// Delete a deployment; its replicas are released.
    Delete {
        #[command(subcommand)]
        what: DeleteWhat,
    },
    /// Show one thing in detail.
    Describe {
        #[command(subcommand)]
        what: DescribeWhat,
    },
    /// Models: push your own.
    Model {
        #[command(subcommand)]
        action: ModelAction,
    },
    /// Cordon or uncordon a cluster.
    Cluster {
        #[command(subcommand)]
        action: clusters::ClusterAction,
    },
    /// Write a nats-server configuration with one user per service and per
    /// cluster's executor, each allowed only its own subjects.
    NatsConfig(nats_config::NatsConfigArgs),
}

#[derive(Debug, Subcommand)]
pub enum ModelAction {
    /// Upload a GGUF file or a safetensors folder; a deployment then refers
    /// to it by name and digest (`spec.model.artifact`).
    Push {
        path: std::path::PathBuf,
        #[arg(long)]
        name: String,
        /// `gguf` or `safetensors`; by default from the path.
        #[arg(long)]
        format: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeleteWhat {
    Deployment { name: String },
}

#[derive(Debug, Subcommand)]
pub enum DescribeWhat {
    /// Spec, placement, why each cluster was left out, recent events.
    Deployment { name: String },
}

#[derive(Debug, Subcommand)]
pub enum GetWhat {
    /// Models: phase, size, digest, which clusters cache them.
    Models {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Replicas: where each runs, its phase and endpoint.
    Replicas {
        /// Only this deployment's.
        #[arg(long)]
        deployment: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Deployments: replicas placed, outcome, clusters.
    Deployments {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
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
        Command::Get {
            what: GetWhat::Deployments { output },
        } => {
            let bus = connect(&cli.bus, &shutdown).await?;
            deployments::get(&bus, output, &mut std::io::stdout()).await
        }
        Command::Get {
            what: GetWhat::Replicas { deployment, output },
        } => {
            let bus = connect(&cli.bus, &shutdown).await?;
            replicas::get(&bus, deployment.as_deref(), output, &mut std::io::stdout()).await
        }
        Command::Get {
            what: GetWhat::Models { output },
        } => {
            let bus = connect(&cli.bus, &shutdown).await?;
            models::get(&bus, output, &mut std::io::stdout()).await
        }
        Command::Model {
            action: ModelAction::Push { path, name, format },
        } => {
            let bus = connect(&cli.bus, &shutdown).await?;
            models::push(
                &bus,
                &path,
                &name,
                format.as_deref(),
                &mut std::io::stdout(),
                &mut std::io::stderr(),
            )
            .await
            .map(|_| ())
        }
        Command::Apply { file } => {
            let docs = deployments::read_documents(&file)?;
            let bus = connect(&cli.bus, &shutdown).await?;
            deployments::apply(&bus, docs, &mut std::io::stdout()).await
        }
        Command::Delete {
            what: DeleteWhat::Deployment { name },
        } => {
            let bus = connect(&cli.bus, &shutdown).await?;
            deployments::delete(&bus, &name, &mut std::io::stdout()).await
        }
        Command::Describe {
            what: DescribeWhat::Deployment { name },
        } => {
            let bus = connect(&cli.bus, &shutdown).await?;
            deployments::describe(&bus, &name, &mut std::io::stdout()).await
        }
        Command::NatsConfig(args) => nats_config::run(&cli.bus, &args)
            .map(|conf| println!("wrote {} and users/", conf.display())),
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
