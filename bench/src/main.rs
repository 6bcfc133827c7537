//! `flashsale-bench`: the measurements behind docs/performance.md's
//! table that `fsctl` does not make, driven by `bench/run` (the load itself
//! comes from `fsctl storm`).
#![allow(clippy::disallowed_methods)]

use clap::{Parser, Subcommand};
use flashsale_engine::queue::rabbitmq as broker;
use flashsale_engine::{BackendUrls, postgres};
use futures_util::StreamExt;
use lapin::options::ConfirmSelectOptions;
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    backends: BackendUrls,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A trivial API that answers every buy "409 sold out" at once: what
    /// `fsctl storm` can push when the server costs nothing.
    Sink {
        #[arg(long, default_value = "127.0.0.1:3989")]
        addr: String,
    },
    /// Publishes `n` orders straight to the order queue, `window` confirms in flight.
    Fill {
        #[arg(short = 'n', long, default_value_t = 20_000)]
        orders: usize,
        /// The orders go to products first..first+products-1, round-robin.
        #[arg(long, default_value_t = 1)]
        first_product: i64,
        #[arg(long, default_value_t = 1)]
        products: i64,
        #[arg(long, default_value_t = 1000)]
        window: usize,
        /// The orders' idempotency keys: `uuid` (36 characters, what real
        /// clients send), `short` (`fill-<run>-<n>`, about 20), or `long`
        /// (128 characters, the contract's maximum).
        #[arg(long, value_enum, default_value_t = KeyStyle::Uuid)]
        keys: KeyStyle,
    },
    /// Waits until `units` units of products first..first+products-1 are
    /// sold (fresh products: the workers may start before this does); prints
    /// the rate. Every `fill` order is one unit of a product
    /// with ample stock, so units sold are orders booked, read from the
    /// products table: counting the orders table every few milliseconds
    /// would take a core from the drain it times.
    WaitSold {
        #[arg(long)]
        units: i64,
        #[arg(long, default_value_t = 1)]
        first_product: i64,
        #[arg(long, default_value_t = 1)]
        products: i64,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
}

/// How `fill` makes its orders' idempotency keys.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KeyStyle {
    Uuid,
    Short,
    Long,
}

impl KeyStyle {
    fn key(self, run: &str, i: usize) -> String {
        match self {
            Self::Uuid => uuid::Uuid::new_v4().to_string(),
            Self::Short => format!("fill-{run}-{i}"),
            Self::Long => {
                let random = uuid::Uuid::new_v4().simple().to_string();
                let head = format!("fill-{run}-{i}-{random}-");
                format!("{head}{}", "k".repeat(128 - head.len()))
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = match cli.command {
        Command::Sink { addr } => sink(&addr).await?,
        Command::Fill {
            orders,
            first_product,
            products,
            window,
            keys,
        } => {
            fill(
                &cli.backends,
                orders,
                first_product..first_product + products,
                window,
                keys,
            )
            .await?
        }
        Command::WaitSold {
            units,
            first_product,
            products,
            timeout_secs,
        } => {
            wait_sold(
                &cli.backends,
                units,
                first_product..first_product + products,
                timeout_secs,
            )
            .await?
        }
    };
    println!("{report}");
    Ok(())
}

async fn sink(addr: &str) -> anyhow::Result<serde_json::Value> {
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route(
            "/buy",
            post(|| async {
                (
                    axum::http::StatusCode::CONFLICT,
                    r#"{"orderId":"k","status":"rejected","reason":"sold_out"}"#,
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("sink listening on {addr}");
    axum::serve(listener, app)
        .with_graceful_shutdown(flashsale_engine::shutdown::signal())
        .await?;
    Ok(json!({"stopped": true}))
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
    )
}

async fn fill(
    backends: &BackendUrls,
    orders: usize,
    products: std::ops::Range<i64>,
    window: usize,
    keys: KeyStyle,
) -> anyhow::Result<serde_json::Value> {
    let spread = (products.end - products.start).max(1);
    let conn = broker::connect(&backends.amqp_url, "flashsale-bench").await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let ns = backends.namespace();
    broker::declare_queues(&channel, &ns).await?;
    let run = uuid_like();
    let now = chrono::Utc::now();
    let started = Instant::now();
    let results: Vec<Result<(), broker::PublishError>> = futures_util::stream::iter(0..orders)
        .map(|i| {
            let id = keys.key(&run, i);
            let product = products.start + (i as i64 % spread);
            let order = json!({
                "orderId": id, "userId": format!("buyer-{i}"),
                "productId": product, "quantity": 1, "acceptedAt": now,
            });
            let (channel, queue) = (&channel, ns.queue_for(product));
            async move {
                let payload = serde_json::to_vec(&order).map_err(|e| {
                    broker::PublishError::Channel(lapin::Error::from(std::io::Error::other(e)))
                })?;
                broker::publish_confirmed(channel, &queue, &id, &payload, None).await
            }
        })
        .buffer_unordered(window)
        .collect()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let failed = results.iter().filter(|r| r.is_err()).count();
    let _ = conn.close(200, "done".into()).await;
    Ok(json!({
        "published": orders - failed,
        "failed": failed,
        "seconds": seconds,
        "confirmedPublishesPerSecond": (orders - failed) as f64 / seconds,
        "window": window,
        "keys": format!("{keys:?}").to_lowercase(),
    }))
}

async fn wait_sold(
    backends: &BackendUrls,
    units: i64,
    products: std::ops::Range<i64>,
    timeout_secs: u64,
) -> anyhow::Result<serde_json::Value> {
    let pool = postgres::connect_and_migrate(&backends.database_url, 1).await?;
    let sold = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COALESCE(SUM(seeded_stock - stock), 0)::bigint FROM products
             WHERE id >= $1 AND id < $2",
        )
        .bind(products.start)
        .bind(products.end)
        .fetch_one(&pool)
        .await
    };
    let started = Instant::now();
    loop {
        let now = sold().await?;
        if now >= units {
            let seconds = started.elapsed().as_secs_f64();
            return Ok(json!({
                "orders": now,
                "seconds": seconds,
                "ordersPerSecond": now as f64 / seconds,
            }));
        }
        if started.elapsed() > Duration::from_secs(timeout_secs) {
            anyhow::bail!("only {now} of {units} units sold after {timeout_secs} s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
