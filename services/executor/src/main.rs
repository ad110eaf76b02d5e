use anyhow::Result;
use clap::{Parser, Subcommand};
use flotilla_executor::gpu::{DeviceReader, NvmlReader, RecordedDevices, RecordedFrame};

mod fetch_model;

#[derive(Debug, Parser)]
#[command(
    name = "flotilla-executor",
    version,
    about = "Flotilla executor: one per cluster",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = flotilla_kit::logging::LogFormat::Text, global = true)]
    log_format: flotilla_kit::logging::LogFormat,

    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    args: flotilla_executor::ExecutorArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print this machine's GPUs as NVML reports them, as JSON that tests
    /// can replay (`frames` of readings, taken one second apart).
    RecordGpus {
        #[arg(long, default_value_t = 3)]
        frames: usize,
    },
    /// Fetch a model from the hub's object store into a model cache folder,
    /// checking it is of the digest given (the init container of
    /// Kubernetes replica pods under `--model-delivery node-cache`).
    FetchModel(Box<fetch_model::FetchModelArgs>),
    /// Run many simulated member clusters in this one process, for
    /// measuring the control plane at fleet scale: each with its own
    /// heartbeats, command consumer, KV records and events, and replicas
    /// that are "ready" after a delay without starting anything.
    Simulate(Box<SimulateArgs>),
}

#[derive(Debug, clap::Args)]
struct SimulateArgs {
    #[command(flatten)]
    bus: flotilla_kit::BusArgs,
    /// How many clusters, named `<name-prefix>-0000` on.
    #[arg(long, default_value_t = 100)]
    clusters: usize,
    #[arg(long, default_value = "sim")]
    name_prefix: String,
    /// GPUs of each cluster, as `--gpus` of an executor.
    #[arg(long, default_value = "8xH100-80GB")]
    gpus: String,
    /// How long after its start a replica is ready.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    ready_after: std::time::Duration,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    heartbeat_interval: std::time::Duration,
    /// NATS connections the clusters share.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Commands each cluster handles at once.
    #[arg(long, default_value_t = flotilla_executor::replicas::DEFAULT_MAX_CONCURRENT_STARTS)]
    max_concurrent_starts: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    flotilla_kit::logging::init(cli.log_format, flotilla_kit::logging::SERVICE_DEFAULT);
    match (cli.command, cli.args) {
        (Some(Command::RecordGpus { frames }), _) => {
            let mut reader = NvmlReader::open()?;
            let mut recorded = RecordedDevices::default();
            for i in 0..frames {
                if i > 0 {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                recorded.frames.push(RecordedFrame {
                    devices: reader.read_devices()?,
                    xid_events: reader.drain_xid_events(),
                });
            }
            println!("{}", serde_json::to_string_pretty(&recorded)?);
            Ok(())
        }
        (Some(Command::FetchModel(args)), _) => {
            let cancel = flotilla_kit::shutdown_on_signals();
            fetch_model::run(&args, &cancel, &mut std::io::stdout()).await?;
            Ok(())
        }
        (Some(Command::Simulate(args)), _) => {
            let gpus = flotilla_executor::declared::DeclaredGpus::parse(&args.gpus)
                .map_err(|e| anyhow::anyhow!("--gpus: {e}"))?;
            // Nothing is fetched into it; heartbeats read it as empty.
            let cache_dir =
                std::env::temp_dir().join(format!("flotilla-simulate-{}", std::process::id()));
            let config = flotilla_executor::simulate::SimulateConfig {
                bus: args.bus.validate()?,
                clusters: args.clusters,
                name_prefix: args.name_prefix,
                gpus,
                ready_after: args.ready_after,
                heartbeat_interval: args.heartbeat_interval,
                connections: args.connections,
                max_concurrent_starts: args.max_concurrent_starts,
                cache_dir,
            };
            let shutdown = flotilla_kit::shutdown_on_signals();
            let fleet =
                flotilla_executor::simulate::SimulatedFleet::start(config, shutdown).await?;
            fleet.wait().await;
            Ok(())
        }
        (None, args) => {
            let config = args.validate()?;
            flotilla_executor::run(config, flotilla_kit::shutdown_on_signals()).await?;
            Ok(())
        }
    }
}
