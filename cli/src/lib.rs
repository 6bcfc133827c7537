//! `fsctl`: the operator's tool. `migrate`, `seed`, `storm`, `verify`,
//! `inspect`, `top`, `demo`, `up`, `doctor` and `completions`.

pub mod backends;
pub mod demo;
pub mod doctor;
pub mod exit;
pub mod inspect;
pub mod output;
pub mod scenario;
pub mod seed;
pub mod storm;
pub mod top;
pub mod up;
pub mod verify;

use clap::{CommandFactory, Parser, Subcommand};
use exit::{OK, Outcome};
use flashsale_engine::{BackendUrls, postgres};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "fsctl",
    version,
    about = "Operate a Flash Sale Engine deployment",
    after_help = "Exit codes: 0 success; 1 an invariant is violated or an accepted order was lost;
2 bad usage, or a component could not be reached; 3 not drained in time;
99 a storm threshold failed.
Every setting is also an environment variable (shown in brackets)."
)]
pub struct Cli {
    #[command(flatten)]
    pub backends: BackendUrls,
    /// The API's base URL; storm spreads over several (repeat, or comma-separate).
    #[arg(
        long,
        global = true,
        help_heading = "Backends",
        env = "FSCTL_API_URL",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:3000"
    )]
    pub api_url: Vec<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the database if missing and apply migrations/.
    #[command(
        after_help = "Example: fsctl migrate --json\nExit codes: 0 applied; 2 PostgreSQL unreachable."
    )]
    Migrate {
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Put products in: create missing ones, --reset or --restock them.
    Seed(seed::SeedArgs),
    /// Fire a buy storm at the API and report latency, outcomes and the books.
    Storm(Box<storm::StormArgs>),
    /// Prove the books: invariants 1-5, the DLQ, and accepted orders.
    Verify(verify::VerifyArgs),
    /// Look inside: queue, locks, workers, dlq, product ID, order ID.
    Inspect(inspect::InspectArgs),
    /// The whole engine in this process on embedded backends: seed, storm, drain, verify.
    Demo(Box<demo::DemoArgs>),
    /// Live dashboard of the running sale (a terminal UI).
    Top(top::TopArgs),
    /// Run the API and N workers as child processes against the configured services.
    Up(up::UpArgs),
    /// Raw capacity of PostgreSQL, Redis and RabbitMQ here, beside what the engine achieves.
    Doctor(doctor::DoctorArgs),
    /// Print shell completions: fsctl completions bash > /etc/bash_completion.d/fsctl
    Completions { shell: clap_complete::Shell },
}

pub async fn run(cli: Cli) -> ExitCode {
    let b = &cli.backends;
    exit::finish(match &cli.command {
        Command::Migrate { json } => migrate(b, *json).await,
        Command::Seed(args) => seed::run(b, args).await,
        Command::Storm(args) => storm::run(b, &cli.api_url, args).await,
        Command::Verify(args) => verify::run(b, args).await,
        Command::Inspect(args) => inspect::run(b, args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Top(args) => top::run(b, &cli.api_url, args).await,
        Command::Up(args) => up::run(b, args).await,
        Command::Doctor(args) => doctor::run(b, args).await,
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "fsctl", &mut std::io::stdout());
            Ok(OK)
        }
    })
}

async fn migrate(b: &BackendUrls, json: bool) -> Outcome {
    let url = &b.database_url;
    let pool = postgres::connect_and_migrate(url, 1).await?;
    let applied: Vec<(i64, String)> = sqlx::query_as(
        "SELECT version, description FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(&pool)
    .await?;
    if json {
        let list: Vec<_> = applied
            .iter()
            .map(|(v, d)| serde_json::json!({"version": v, "description": d}))
            .collect();
        output::json(&serde_json::json!({"ok": true, "applied": list}));
    } else {
        for (v, d) in &applied {
            println!("applied {v} {d}");
        }
        println!(
            "database {} is at migration {}",
            flashsale_engine::config::mask_url(url),
            applied.last().map(|(v, _)| *v).unwrap_or(0),
        );
    }
    Ok(OK)
}
