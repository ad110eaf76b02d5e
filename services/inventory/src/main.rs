use anyhow::Result;
use clap::Parser;

// One thread: the work is I/O-bound and small per message; a
// multi-threaded runtime spends more on waking threads than on the work.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = flotilla_inventory::Args::parse();
    flotilla_kit::logging::init(args.log_format, flotilla_kit::logging::SERVICE_DEFAULT);
    let config = args.validate()?;
    flotilla_inventory::run(config, flotilla_kit::shutdown_on_signals()).await?;
    Ok(())
}
