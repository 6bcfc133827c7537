//! `fsctl inspect`: looks inside a running deployment without psql,
//! redis-cli or rabbitmqctl (and without RabbitMQ's management plugin).
//! One module per view; this one holds the command line and dispatches.

mod dlq;
mod holds;
mod locks;
mod order;
mod product;
mod queue;
mod redis;
mod workers;

use crate::backends;
use crate::exit::Failure;
use crate::exit::{OK, Outcome};
use crate::output;
use clap::{Args, Subcommand};
use comfy_table::Cell;
use flashsale_engine::Namespace;
use flashsale_engine::accept_log::{AcceptState, RedisAcceptLog};
use flashsale_engine::ledger::Ledger;
use flashsale_engine::redis_conn::{self, timed};
use flashsale_engine::{BackendUrls, ProductId, heartbeat};
use serde_json::json;

#[derive(Debug, Args)]
#[command(after_help = "Exit codes: 0 shown; 2 bad usage or a component could not be reached.")]
pub struct InspectArgs {
    #[command(subcommand)]
    pub subject: Subject,
    /// One JSON document on stdout.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Subject {
    /// Order queue and DLQ: ready messages and consumers (RabbitMQ passive
    /// declare), deliveries held by workers (sum of heartbeat `inflight`).
    Queue {
        /// Keep looking, one line per interval, with the rates since the last
        /// look (processed: sum of the workers' heartbeat counters); Ctrl-C ends.
        #[arg(long)]
        watch: bool,
        /// With --watch: how often (e.g. 1s, 500ms).
        #[arg(long, default_value = "1s", value_parser = crate::verify::parse_duration)]
        interval: std::time::Duration,
    },
    /// Held product locks (Redis `<ns>:lock:product:{<id>}`: holder, token, TTL
    /// left) beside each product's last fence in PostgreSQL.
    Locks,
    /// Redis masters: address, hash slots, replicas and keys of each master
    /// of a Redis Cluster (one row for a standalone server).
    Redis,
    /// Holds (products seeded with --hold-seconds): per product the orders
    /// and units held now, the next expiry, the holds past it by more than
    /// 2 s (invariant 7), and how holds ended so far (PostgreSQL).
    Holds,
    /// Workers from their Redis heartbeats: up since, processed, current
    /// product, last beat age; a beat older than 5 s is shown as gone.
    Workers,
    /// Dead letters: count and the first N with their reason, read without
    /// consuming them (taken unacked, handed back).
    Dlq {
        /// How many messages to show.
        #[arg(long, default_value_t = 10)]
        limit: usize,
    },
    /// One product: its row (PostgreSQL), order counts, lock and admission
    /// counter with the admitted orders not yet settled (Redis).
    Product { id: i64 },
    /// One order as the API would return it, and where it is: confirmed or
    /// rejected (PostgreSQL row), queued (Redis accept log), dead_lettered
    /// (DLQ), or unknown.
    Order { id: String },
}

/// A JSON object as a two-column table, one row per field (strings
/// without their quotes).
fn fields_table(map: &serde_json::Map<String, serde_json::Value>) -> comfy_table::Table {
    let mut t = output::table(&["field", "value"]);
    for (k, v) in map {
        t.add_row(vec![
            Cell::new(k),
            Cell::new(v.to_string().trim_matches('"')),
        ]);
    }
    t
}

pub async fn run(b: &BackendUrls, args: &InspectArgs) -> Outcome {
    let ns = b.namespace();
    let as_json = args.json;
    match &args.subject {
        Subject::Queue {
            watch: true,
            interval,
        } => return watch_queue(b, *interval, as_json).await,
        Subject::Queue { .. } => queue::show(b, &ns, as_json).await?,
        Subject::Locks => locks::show(b, &ns, as_json).await?,
        Subject::Redis => redis::show(b, as_json).await?,
        Subject::Holds => holds::show(b, as_json).await?,
        Subject::Workers => workers::show(b, &ns, as_json).await?,
        Subject::Dlq { limit } => dlq::show(b, &ns, as_json, *limit).await?,
        Subject::Product { id } => product::show(b, &ns, as_json, *id).await?,
        Subject::Order { id } => order::show(b, &ns, as_json, id).await?,
    }
    Ok(OK)
}

/// `inspect queue --watch`: a line (or a JSON document) per interval.
async fn watch_queue(b: &BackendUrls, interval: std::time::Duration, as_json: bool) -> Outcome {
    let ns = b.namespace();
    let redis = backends::redis(b).await?;
    let mut last: Option<(std::time::Instant, u64, u64)> = None;
    loop {
        let q = flashsale_engine::queue::queues(&b.amqp_url, &ns).await?;
        let workers = heartbeat::workers(&redis, &ns).await?;
        let inflight = flashsale_engine::queue::held_by_workers(&workers);
        let processed: u64 = workers.iter().map(|w| w.processed).sum();
        let now = std::time::Instant::now();
        let (ready_rate, processed_rate) = match last {
            Some((at, ready, done)) => {
                let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                (
                    (q.orders_ready as f64 - ready as f64) / secs,
                    processed.saturating_sub(done) as f64 / secs,
                )
            }
            None => (0.0, 0.0),
        };
        last = Some((now, q.orders_ready, processed));
        if as_json {
            println!(
                "{}",
                json!({"queue": {"ready": q.orders_ready, "inflight": inflight,
                    "consumers": q.orders_consumers, "dlq": q.dlq_ready,
                    "readyPerSecond": ready_rate, "processedPerSecond": processed_rate}})
            );
        } else {
            println!(
                "{}  ready {:>7}  in flight {:>5}  consumers {:>3}  dlq {:>4}  ready {:>+9.1}/s  processed {:>9.1}/s",
                chrono::Local::now().format("%H:%M:%S"),
                q.orders_ready,
                inflight,
                q.orders_consumers,
                q.dlq_ready,
                ready_rate,
                processed_rate
            );
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(OK),
            () = tokio::time::sleep(interval) => {}
        }
    }
}
