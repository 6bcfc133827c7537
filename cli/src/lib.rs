//! `fsctl`: the operator's tool. This release has `migrate`; the other
//! commands of the contract (seed, storm, verify, inspect, top, demo, up,
//! doctor) come with their own issues.

use clap::{Parser, Subcommand};
use flashsale_engine::{BackendUrls, postgres};
use std::process::ExitCode;

/// Exit code: a component could not be reached, or bad usage.
pub const EXIT_UNREACHABLE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "fsctl",
    version,
    about = "Operate a Flash Sale Engine deployment"
)]
pub struct Cli {
    #[command(flatten)]
    pub backends: BackendUrls,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the database if missing and apply migrations/.
    Migrate {
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Migrate { json } => migrate(&cli.backends, json).await,
    }
}

async fn migrate(backends: &BackendUrls, json: bool) -> ExitCode {
    let url = &backends.database_url;
    match postgres::connect_and_migrate(url, 1).await {
        Ok(pool) => {
            let applied: Vec<(i64, String)> = sqlx::query_as(
                "SELECT version, description FROM _sqlx_migrations WHERE success ORDER BY version",
            )
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
            if json {
                let list: Vec<_> = applied
                    .iter()
                    .map(|(v, d)| serde_json::json!({"version": v, "description": d}))
                    .collect();
                println!("{}", serde_json::json!({"ok": true, "applied": list}));
            } else {
                println!(
                    "database {} is at migration {} ({} applied)",
                    flashsale_engine::config::mask_url(url),
                    applied.last().map(|(v, _)| *v).unwrap_or(0),
                    applied.len()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fsctl: {e}");
            ExitCode::from(EXIT_UNREACHABLE)
        }
    }
}
