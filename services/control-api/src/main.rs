use anyhow::Result;
use clap::Parser;

#[tokio::main]
async fn main() -> Result<()> {
    let args = flotilla_control_api::Args::parse();
    flotilla_kit::logging::init(args.log_format, flotilla_kit::logging::SERVICE_DEFAULT);
    let config = args.validate()?;
    flotilla_control_api::run(config, flotilla_kit::shutdown_on_signals(), None).await?;
    Ok(())
}
