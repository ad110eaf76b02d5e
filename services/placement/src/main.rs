use anyhow::Result;
use clap::Parser;

// One thread: placement decisions are short and the service is mostly
// waiting on the bus.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = flotilla_placement::Args::parse();
    flotilla_kit::logging::init(args.log_format, flotilla_kit::logging::SERVICE_DEFAULT);
    let config = args.validate()?;
    flotilla_placement::run(config, flotilla_kit::shutdown_on_signals()).await?;
    Ok(())
}
