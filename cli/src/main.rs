use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    flashsale_engine::telemetry::init();
    fsctl::run(fsctl::Cli::parse()).await
}
