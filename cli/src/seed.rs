//! `fsctl seed`: puts products in. Creates the missing ones and leaves the
//! others alone, or `--reset`s them to a fresh state, or `--restock`s them.

use crate::backends;
use crate::exit::{Failure, OK, Outcome};
use crate::output;
use crate::scenario::{self, Scenario};
use clap::Args;
use flashsale_engine::accept_log::RedisAcceptLog;
use flashsale_engine::admission;
use flashsale_engine::admission::AdmissionCounters;
use flashsale_engine::ledger::{Ledger, NewProduct};
use flashsale_engine::redis_conn::timed;
use flashsale_engine::stock_feed::StockFeed;
use flashsale_engine::{BackendUrls, ProductId, heartbeat, queue};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::PathBuf;

/// Seed products 1..N, or those of a scenario.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  fsctl seed --products 1 --stock 100 --per-user-limit 2
  fsctl seed --products 1 --stock 1000 --hold-seconds 300   # won units held 5 min for payment
  fsctl seed --products 20 --stock 50 --restock       # add 50 units to each of 1..20
  fsctl seed --scenario scenarios/hot-item.toml --reset

Exit codes: 0 done; 2 bad values (nothing written) or a component unreachable.")]
pub struct SeedArgs {
    /// Products 1..N.
    #[arg(long, required_unless_present = "scenario", value_parser = clap::value_parser!(i64).range(1..))]
    pub products: Option<i64>,
    /// Units of stock each (with --restock: units added).
    #[arg(long, required_unless_present = "scenario", value_parser = clap::value_parser!(i32).range(0..))]
    pub stock: Option<i32>,
    /// Most units one order may ask for.
    #[arg(long, default_value_t = scenario::DEFAULT_MAX_PER_ORDER, value_parser = clap::value_parser!(i32).range(1..))]
    pub max_per_order: i32,
    /// Most units one user may hold of a product (default: no limit).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub per_user_limit: Option<i32>,
    /// Hold each booked order this many seconds for payment: it is `held`
    /// until paid (`POST /orders/{id}/pay`), cancelled, or expired, when its
    /// units go back on sale (default: booked orders are final at once).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub hold_seconds: Option<i32>,
    /// Product names are "<prefix> <id>".
    #[arg(long, default_value = "product")]
    pub name_prefix: String,
    /// Seed what a scenario TOML describes instead (see scenarios/README.md).
    #[arg(long, conflicts_with_all = ["products", "stock"])]
    pub scenario: Option<PathBuf>,
    /// Back to a fresh state: orders deleted, Redis state cleared, stock reset
    /// (fence counters are never lowered). Refused while not drained.
    #[arg(long, conflicts_with = "restock")]
    pub reset: bool,
    /// With --reset: go ahead even while orders are in flight.
    #[arg(long, requires = "reset")]
    pub force: bool,
    /// Add the stock to existing products (one relative update each).
    #[arg(long)]
    pub restock: bool,
    /// One JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

impl SeedArgs {
    fn catalog(&self) -> Result<Vec<NewProduct>, Failure> {
        if let Some(path) = &self.scenario {
            return Scenario::load(path)?.catalog();
        }
        let (Some(n), Some(stock)) = (self.products, self.stock) else {
            return Err(Failure::usage(
                "give --products N --stock S, or --scenario FILE",
            ));
        };
        (1..=n)
            .map(|id| {
                scenario::validated(NewProduct {
                    id,
                    name: format!("{} {id}", self.name_prefix),
                    stock,
                    max_per_order: self.max_per_order,
                    per_user_limit: self.per_user_limit,
                    hold_seconds: self.hold_seconds,
                })
            })
            .collect()
    }
}

pub async fn run(b: &BackendUrls, args: &SeedArgs) -> Outcome {
    let catalog = args.catalog()?;
    let ledger = backends::ledger(b).await?;
    let ids: Vec<i64> = catalog.iter().map(|p| p.id).collect();
    let ns = b.namespace();

    if args.restock {
        let units = args.stock.unwrap_or(0);
        let changed = ledger.restock(&ids, units).await?;
        // Tell the APIs now rather than at their next catalog poll, and
        // derive the admission counters afresh (so the units sell at once).
        let redis = backends::redis(b).await?;
        let counters = RedisAcceptLog::new(redis.clone(), ns.clone());
        let feed = StockFeed::new(redis, &ns);
        for p in ledger
            .products()
            .await?
            .iter()
            .filter(|p| ids.contains(&p.id.get()))
        {
            counters.drop_counter(p.id).await?;
            admission::derive(&counters, &ledger, p.id, true).await?;
            feed.announce(p.id, p.stock).await;
        }
        let missing = ids.len() as u64 - changed;
        if args.json {
            output::json(&json!({"restocked": changed, "units": units, "missing": missing}));
        } else {
            println!("restocked {changed} products by {units} units each");
            if missing > 0 {
                println!("{missing} of the products do not exist (seed them first)");
            }
        }
        return Ok(OK);
    }

    let bar = (catalog.len() > 300 && !args.json).then(|| {
        let bar = ProgressBar::new(catalog.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} products")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message("seeding");
        bar
    });
    let mut created = Vec::new();
    for chunk in catalog.chunks(1000) {
        created.extend(ledger.create_missing(chunk).await?);
        if let Some(bar) = &bar {
            bar.inc(chunk.len() as u64);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    // A new product's admission counter starts at its stock (a counter left
    // in Redis by an earlier database of the same namespace would be wrong).
    if !created.is_empty() {
        let counters = RedisAcceptLog::new(backends::redis(b).await?, ns.clone());
        for p in catalog
            .iter()
            .filter(|p| created.binary_search(&p.id).is_ok())
        {
            counters
                .reset(product_id(p.id)?, i64::from(p.stock))
                .await?;
        }
    }

    let mut reset = 0;
    let mut deleted_orders = 0;
    if args.reset {
        let existing: Vec<NewProduct> = catalog
            .iter()
            .filter(|p| created.binary_search(&p.id).is_err())
            .cloned()
            .collect();
        if !existing.is_empty() {
            let redis = backends::redis(b).await?;
            if !args.force {
                let queues = queue::queues(&b.amqp_url, &ns).await?;
                let workers = heartbeat::workers(&redis, &ns).await?;
                if !queue::is_drained(&queues, &workers) {
                    return Err(Failure::usage(format!(
                        "refusing to reset while orders are in flight ({} ready, {} held by workers); wait or add --force",
                        queues.orders_ready,
                        queue::held_by_workers(&workers)
                    )));
                }
            }
            let deleted = ledger.reset(&existing).await?;
            deleted_orders = deleted.len();
            reset = existing.len();
            // Their Redis state: accept-log entries and stale locks. Fence
            // counters stay (never lowered).
            let mut keys: Vec<String> = deleted.iter().map(|k| ns.accept_key(k)).collect();
            keys.extend(existing.iter().map(|p| ns.lock_key(p.id)));
            let mut conn = redis.clone();
            for chunk in keys.chunks(1000) {
                timed(redis::cmd("DEL").arg(chunk).query_async::<()>(&mut conn)).await?;
            }
            let counters = RedisAcceptLog::new(redis.clone(), ns.clone());
            let feed = StockFeed::new(redis, &ns);
            for p in &existing {
                let id = product_id(p.id)?;
                counters.reset(id, i64::from(p.stock)).await?;
                feed.announce(id, p.stock).await;
            }
        }
    }
    let left_alone = catalog.len() - created.len() - reset;
    if args.json {
        output::json(&json!({
            "created": created.len(),
            "reset": reset,
            "ordersDeleted": deleted_orders,
            "leftAlone": left_alone,
        }));
    } else {
        println!("created {} products", created.len());
        if reset > 0 {
            println!("reset {reset} products ({deleted_orders} orders deleted)");
        }
        if left_alone > 0 {
            println!(
                "{left_alone} products already existed and were left as they are (--reset or --restock to change them)"
            );
        }
    }
    Ok(OK)
}

/// A product id as the ledger holds it (the table's check keeps it
/// positive; a row that is not is reported, not skipped).
fn product_id(id: i64) -> Result<ProductId, Failure> {
    ProductId::new(id).map_err(|e| Failure::usage(format!("product {id} in the ledger: {e}")))
}
