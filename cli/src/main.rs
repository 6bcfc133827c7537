use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    // Commands print their own errors; logs only when RUST_LOG asks.
    flashsale_engine::telemetry::init_with_default("error,lapin=off");
    fsctl::run(fsctl::Cli::parse()).await
}
