use anyhow::Result;
use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = flotilla_rollout::Args::parse();
    flotilla_kit::logging::init(args.log_format, flotilla_kit::logging::SERVICE_DEFAULT);
    let config = args.validate()?;
    flotilla_rollout::run(config, flotilla_kit::shutdown_on_signals()).await?;
    Ok(())
}
