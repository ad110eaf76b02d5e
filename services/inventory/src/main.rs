use anyhow::Result;
use clap::Parser;

#[tokio::main]
async fn main() -> Result<()> {
    let args = flotilla_inventory::Args::parse();
    flotilla_kit::logging::init(args.log_format);
    let config = args.validate()?;
    flotilla_inventory::run(config, flotilla_kit::shutdown_on_signals()).await?;
    Ok(())
}
