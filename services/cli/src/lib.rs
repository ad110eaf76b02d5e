//! The `flotilla` command line. Each subcommand is a module; they talk to
//! the fleet only through the bus, like every other client.

pub mod answer;
pub mod chat;
pub mod clusters;
pub mod deployments;
pub mod fleet;
pub mod isolated;
pub mod models;
pub mod nats_config;
pub mod replicas;
pub mod rollouts;
pub mod table;
mod up;
pub mod watch;

use std::time::Duration;

use anyhow::{Context, bail};
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
    /// Follow a rollout, approve its next stage, or undo it.
    Rollout {
        #[command(subcommand)]
        action: RolloutAction,
    },
    /// The fleet's events as they happen (or from `--since`).
    Watch(watch::WatchArgs),
    /// Ask a model through the gateway; the answer is streamed.
    Chat(chat::ChatArgs),
    /// Write a nats-server configuration with one user per service and per
    /// cluster's executor, each allowed only its own subjects.
    NatsConfig(nats_config::NatsConfigArgs),
    /// Run one cluster's executor (what `flotilla up` starts per simulated
    /// cluster); its flags follow `--`, as `flotilla-executor --help` lists.
    #[command(hide = true)]
    Executor {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// Phase, stages, failures and replicas of a deployment's rollout.
    Status {
        name: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Follow it, a line per change, until it completes or halts.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Open the gate after the current stage (or, with --stage, a later
    /// one ahead of time).
    Approve {
        name: String,
        #[arg(long)]
        stage: Option<String>,
    },
    /// Return to the spec the current rollout replaced.
    Undo { name: String },
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
        Command::Rollout { action } => {
            let bus = connect(&cli.bus, &shutdown).await?;
            let out = &mut std::io::stdout();
            match action {
                RolloutAction::Status {
                    name, watch: true, ..
                } => {
                    let phase = rollouts::follow(&bus, &name, out, shutdown.clone()).await?;
                    if phase == flotilla_proto::v1::RolloutPhase::Halted {
                        bail!(
                            "the rollout of {name} halted; `flotilla rollout undo {name}` returns to the previous version"
                        );
                    }
                    Ok(())
                }
                RolloutAction::Status { name, output, .. } => {
                    rollouts::status(&bus, &name, output, out).await
                }
                RolloutAction::Approve { name, stage } => {
                    rollouts::approve(&bus, &name, stage.as_deref(), out).await
                }
                RolloutAction::Undo { name } => rollouts::undo(&bus, &name, out).await,
            }
        }
        Command::Watch(args) => {
            let bus = connect(&cli.bus, &shutdown).await?;
            watch::watch(&bus, &args, &mut std::io::stdout(), shutdown.clone())
                .await
                .map(|_| ())
        }
        Command::Executor { args } => {
            let config = fleet::executor_args(args)?.validate()?;
            flotilla_executor::run(config, shutdown)
                .await
                .map_err(|e| anyhow::anyhow!("executor: {e}"))
        }
        Command::Chat(args) => chat::chat(&args, &mut std::io::stdout()).await.map(|_| ()),
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
