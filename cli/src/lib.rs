//! `fsctl`: the operator's tool. `migrate`, `seed`, `storm`, `verify`,
//! `inspect`, `top`, `demo`, `up`, `doctor` and `completions`.
#![allow(clippy::disallowed_methods)]

pub mod backends;
pub mod demo;
pub mod doctor;
pub mod exit;
mod identity_tour;
pub mod inspect;
pub mod output;
pub mod scenario;
pub mod seed;
pub mod storm;
pub mod token;
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
    /// Create the database if missing, apply migrations/, and record (or,
    /// once drained, change) the order queue's partitions.
    #[command(after_help = "Examples:
  fsctl migrate --json
  fsctl migrate --partitions 3     # split the order queue in 3, once drained

With --partitions K (or FLASHSALE_PARTITIONS), a deployment without a
recorded K records it; one with another K changes to K only when every
partition is drained (no ready message, no delivery held by a worker). Start
every API and worker again with FLASHSALE_PARTITIONS=K afterwards: a
process with another K refuses to start.

Exit codes: 0 applied; 2 PostgreSQL or RabbitMQ unreachable; 3 not drained,
the partitions left as they were.")]
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
    /// Print a buyer's token for an API with FLASHSALE_AUTH=jwt (for curl).
    Token(token::TokenArgs),
    /// Print shell completions: fsctl completions bash > /etc/bash_completion.d/fsctl
    Completions { shell: clap_complete::Shell },
}

pub async fn run(cli: Cli) -> ExitCode {
    let resolved;
    let b = match &cli.command {
        Command::Seed(_)
        | Command::Storm(_)
        | Command::Verify(_)
        | Command::Inspect(_)
        | Command::Top(_)
        | Command::Up(_) => {
            resolved = with_recorded_partitions(&cli.backends).await;
            &resolved
        }
        _ => &cli.backends,
    };
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
        Command::Token(args) => token::run(args),
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "fsctl", &mut std::io::stdout());
            Ok(OK)
        }
    })
}

async fn migrate(b: &BackendUrls, json: bool) -> Outcome {
    let url = &b.database_url;
    let pool = postgres::connect_and_migrate(url, 1).await?;
    let partitions = repartition(b, &pool).await?;
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
        output::json(&serde_json::json!({"ok": true, "applied": list, "partitions": partitions}));
    } else {
        for (v, d) in &applied {
            println!("applied {v} {d}");
        }
        println!(
            "database {} is at migration {}",
            flashsale_engine::config::mask_url(url),
            applied.last().map(|(v, _)| *v).unwrap_or(0),
        );
        println!("order queue partitions: {partitions}");
    }
    Ok(OK)
}

/// The backends with the deployment's recorded partitions, unless
/// `--partitions`/`FLASHSALE_PARTITIONS` names some (or PostgreSQL does not
/// answer: the command then meets it and says so).
async fn with_recorded_partitions(b: &BackendUrls) -> BackendUrls {
    let mut b = b.clone();
    if b.partitions.is_none() {
        let read = async {
            let pool = postgres::connect_and_migrate(&b.database_url, 1)
                .await
                .ok()?;
            let k = postgres::recorded_partitions(&pool, &b.namespace())
                .await
                .ok();
            pool.close().await;
            k
        };
        b.partitions = tokio::time::timeout(std::time::Duration::from_secs(3), read)
            .await
            .ok()
            .flatten();
    }
    b
}

/// Records the partitions asked for (`--partitions`, `FLASHSALE_PARTITIONS`)
/// or, when another K is recorded, changes it once every partition of the
/// recorded K is drained. Returns the partitions now in force.
async fn repartition(b: &BackendUrls, pool: &sqlx::PgPool) -> Result<u16, exit::Failure> {
    let asked = b.namespace();
    let recorded = postgres::recorded_partitions(pool, &asked).await?;
    if b.partitions.is_none() || recorded == asked.partitions() {
        return Ok(recorded);
    }
    let current = flashsale_engine::Namespace::partitioned(asked.as_str(), recorded);
    let redis = backends::redis(b).await?;
    let queues = flashsale_engine::queue::queues(&b.amqp_url, &current).await?;
    let workers = flashsale_engine::heartbeat::workers(&redis, &current).await?;
    if !flashsale_engine::queue::is_drained(&queues, &workers) {
        return Err(exit::Failure {
            code: exit::PENDING,
            message: format!(
                "not changing the partitions from {recorded} to {}: {} orders ready and {} held by workers; wait for the drain",
                asked.partitions(),
                queues.orders_ready,
                flashsale_engine::queue::held_by_workers(&workers)
            ),
        });
    }
    postgres::set_partitions(pool, &asked).await?;
    Ok(asked.partitions())
}
