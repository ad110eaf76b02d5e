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
        (None, args) => {
            let config = args.validate()?;
            flotilla_executor::run(config, flotilla_kit::shutdown_on_signals()).await?;
            Ok(())
        }
    }
}
