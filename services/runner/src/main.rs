use anyhow::Result;
use clap::Parser;

#[tokio::main]
async fn main() -> Result<()> {
    let args = flotilla_runner::Args::parse();
    flotilla_process::logging::init(args.log_format, flotilla_process::logging::SERVICE_DEFAULT);
    flotilla_runner::run(args, flotilla_process::shutdown_on_signals(), None).await?;
    Ok(())
}
