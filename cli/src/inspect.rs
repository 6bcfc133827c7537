//! `fsctl inspect`: looks inside a running deployment without psql,
//! redis-cli or rabbitmqctl (and without RabbitMQ's management plugin).

use crate::backends;
use crate::exit::{OK, Outcome};
use crate::output;
use clap::{Args, Subcommand};
use comfy_table::Cell;
use flashsale_engine::accept_log::{AcceptLog, AcceptState, AcceptStore};
use flashsale_engine::ledger::Ledger;
use flashsale_engine::redis_conn::{self, timed};
use flashsale_engine::{BackendUrls, ProductId, heartbeat, locks, queue};
use serde_json::json;

#[derive(Debug, Args)]
#[command(after_help = "Exit codes: 0 shown; 2 bad usage or a component could not be reached.")]
pub struct InspectArgs {
    #[command(subcommand)]
    pub view: View,
    /// One JSON document on stdout.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum View {
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

/// A product's holds: id, held orders, held units, seconds to the next
/// expiry, overdue holds, and orders paid, cancelled, expired.
type HoldsRow = (i64, i64, i64, Option<f64>, i64, i64, i64, i64);

pub async fn run(b: &BackendUrls, args: &InspectArgs) -> Outcome {
    let ns = b.namespace();
    match &args.view {
        View::Queue {
            watch: true,
            interval,
        } => return watch_queue(b, *interval, args.json).await,
        View::Queue { .. } => {
            let redis = backends::redis(b).await?;
            let q = queue::queues(&b.amqp_url, &ns).await?;
            let workers = heartbeat::workers(&redis, &ns).await?;
            let inflight = queue::held_by_workers(&workers);
            let drained = queue::is_drained(&q, &workers);
            if args.json {
                output::json(&json!({"queue": {
                    "queue": ns.orders_queue(), "ready": q.orders_ready, "consumers": q.orders_consumers,
                    "inflight": inflight, "dlq": q.dlq_ready, "dlqConsumers": q.dlq_consumers,
                    "drained": drained, "partitions": q.partitions,
                }}));
            } else {
                let mut t = output::table(&["queue", "ready", "in flight", "consumers"]);
                if q.partitions.len() > 1 {
                    for p in &q.partitions {
                        t.add_row(vec![
                            Cell::new(&p.queue),
                            Cell::new(p.ready),
                            Cell::new("-"),
                            Cell::new(p.consumers),
                        ]);
                    }
                }
                let all = if q.partitions.len() > 1 {
                    format!("{} ({} partitions)", ns.orders_queue(), q.partitions.len())
                } else {
                    ns.orders_queue()
                };
                t.add_row(vec![
                    Cell::new(all),
                    Cell::new(q.orders_ready),
                    Cell::new(inflight),
                    Cell::new(q.orders_consumers),
                ]);
                t.add_row(vec![
                    Cell::new(ns.dead_letter_queue()),
                    output::verdict(
                        q.dlq_ready == 0,
                        &q.dlq_ready.to_string(),
                        &q.dlq_ready.to_string(),
                    ),
                    Cell::new("-"),
                    Cell::new(q.dlq_consumers),
                ]);
                println!("{t}");
                println!(
                    "{}",
                    if drained {
                        "drained"
                    } else {
                        "orders in flight"
                    }
                );
            }
        }
        View::Locks => {
            let redis = backends::redis(b).await?;
            let ledger = backends::ledger(b).await?;
            let locks = locks::held(&redis, &ns).await?;
            let fences: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT id, lock_fence FROM products WHERE lock_fence > 0 ORDER BY id",
            )
            .fetch_all(ledger.pool())
            .await?;
            let fence_of = |id: i64| fences.iter().find(|f| f.0 == id).map(|f| f.1).unwrap_or(0);
            if args.json {
                let locks: Vec<_> = locks
                    .iter()
                    .map(|l| {
                        json!({"productId": l.product_id, "holder": l.holder, "token": l.token,
                                    "ttlMs": l.ttl_ms, "lastFence": fence_of(l.product_id)})
                    })
                    .collect();
                let fences: Vec<_> = fences
                    .iter()
                    .map(|(id, f)| json!({"productId": id, "lastFence": f}))
                    .collect();
                output::json(&json!({"locks": locks, "fences": fences}));
            } else {
                let mut t = output::table(&[
                    "product",
                    "holder",
                    "token",
                    "TTL left",
                    "last fence (PostgreSQL)",
                ]);
                for l in &locks {
                    t.add_row(vec![
                        Cell::new(l.product_id),
                        Cell::new(&l.holder),
                        Cell::new(l.token),
                        Cell::new(format!("{} ms", l.ttl_ms)),
                        Cell::new(fence_of(l.product_id)),
                    ]);
                }
                println!("{t}");
                println!(
                    "{} locks held; {} products written under a fence",
                    locks.len(),
                    fences.len()
                );
            }
        }
        View::Redis => {
            let redis = backends::redis(b).await?;
            let masters = redis_conn::masters(&redis).await?;
            if args.json {
                output::json(&json!({"cluster": redis.is_cluster(), "masters": masters}));
            } else {
                let mut t = output::table(&["master", "hash slots", "replicas", "keys"]);
                for m in &masters {
                    t.add_row(vec![
                        Cell::new(&m.address),
                        Cell::new(m.slots),
                        Cell::new(m.replicas),
                        m.keys
                            .map_or_else(|| output::verdict(false, "", "no answer"), Cell::new),
                    ]);
                }
                println!("{t}");
                let slots: u32 = masters.iter().map(|m| m.slots).sum();
                if redis.is_cluster() {
                    println!(
                        "Redis Cluster: {} masters serving {slots} of 16384 slots",
                        masters.len()
                    );
                } else {
                    println!("standalone Redis");
                }
            }
        }
        View::Holds => {
            let ledger = backends::ledger(b).await?;
            let rows: Vec<HoldsRow> = sqlx::query_as(
                "SELECT p.id,
                        count(o.*) FILTER (WHERE o.status = 'held'),
                        COALESCE(SUM(o.quantity) FILTER (WHERE o.status = 'held'), 0)::bigint,
                        EXTRACT(EPOCH FROM min(o.held_until) FILTER (WHERE o.status = 'held') - now())::float8,
                        count(o.*) FILTER (WHERE o.status = 'held'
                                             AND o.held_until < now() - interval '2 seconds'),
                        count(o.*) FILTER (WHERE o.status = 'paid'),
                        count(o.*) FILTER (WHERE o.status = 'cancelled'),
                        count(o.*) FILTER (WHERE o.status = 'expired')
                 FROM products p LEFT JOIN orders o ON o.product_id = p.id
                 WHERE p.hold_seconds IS NOT NULL GROUP BY p.id ORDER BY p.id",
            )
            .fetch_all(ledger.pool())
            .await?;
            if args.json {
                let products: Vec<_> = rows
                    .iter()
                    .map(
                        |(id, orders, units, next, overdue, paid, cancelled, expired)| {
                            json!({"productId": id, "heldOrders": orders, "heldUnits": units,
                               "nextExpirySeconds": next, "overdue": overdue,
                               "paid": paid, "cancelled": cancelled, "expired": expired})
                        },
                    )
                    .collect();
                output::json(&json!({"holds": products}));
            } else {
                let mut t = output::table(&[
                    "product",
                    "held orders",
                    "held units",
                    "next expiry",
                    "overdue",
                    "paid",
                    "cancelled",
                    "expired",
                ]);
                for (id, orders, units, next, overdue, paid, cancelled, expired) in &rows {
                    t.add_row(vec![
                        Cell::new(id),
                        Cell::new(orders),
                        Cell::new(units),
                        Cell::new(next.map_or("-".to_owned(), |s| format!("in {s:.1} s"))),
                        output::verdict(*overdue == 0, "0", &overdue.to_string()),
                        Cell::new(paid),
                        Cell::new(cancelled),
                        Cell::new(expired),
                    ]);
                }
                println!("{t}");
                let overdue: i64 = rows.iter().map(|r| r.4).sum();
                println!(
                    "{} products with holds; {}",
                    rows.len(),
                    if overdue == 0 {
                        "none past its expiry".to_owned()
                    } else {
                        format!("{overdue} held past their expiry (are the workers running?)")
                    }
                );
            }
        }
        View::Workers => {
            let redis = backends::redis(b).await?;
            let workers = heartbeat::workers(&redis, &ns).await?;
            if args.json {
                output::json(&json!({"workers": workers}));
            } else {
                let mut t = output::table(&[
                    "worker",
                    "state",
                    "up since",
                    "processed",
                    "in flight",
                    "product",
                    "last beat",
                    "metrics",
                ]);
                for w in &workers {
                    t.add_row(vec![
                        Cell::new(&w.id),
                        output::verdict(w.alive, "alive", "gone"),
                        Cell::new(&w.started_at),
                        Cell::new(w.processed),
                        Cell::new(w.inflight),
                        Cell::new(
                            w.product
                                .map(|p| p.to_string())
                                .unwrap_or_else(|| "-".into()),
                        ),
                        Cell::new(format!("{:.1} s ago", w.last_beat_seconds)),
                        Cell::new(&w.metrics_addr),
                    ]);
                }
                println!("{t}");
                println!(
                    "{} workers alive",
                    workers.iter().filter(|w| w.alive).count()
                );
            }
        }
        View::Dlq { limit } => {
            let q = queue::queues(&b.amqp_url, &ns).await?;
            let messages = queue::peek_dead_letters(&b.amqp_url, &ns, *limit).await?;
            if args.json {
                output::json(&json!({"dlq": {"count": q.dlq_ready, "messages": messages}}));
            } else {
                let mut t = output::table(&["message id", "reason", "body"]);
                for m in &messages {
                    let body: String = m.body.chars().take(80).collect();
                    t.add_row(vec![
                        Cell::new(m.message_id.as_deref().unwrap_or("-")),
                        Cell::new(m.reason.as_deref().unwrap_or("-")),
                        Cell::new(body),
                    ]);
                }
                println!("{t}");
                println!(
                    "{} messages in {} (showing {})",
                    q.dlq_ready,
                    ns.dead_letter_queue(),
                    messages.len()
                );
            }
        }
        View::Product { id } => {
            let ledger = backends::ledger(b).await?;
            let redis = backends::redis(b).await?;
            let pid =
                ProductId::new(*id).map_err(|e| crate::exit::Failure::usage(e.to_string()))?;
            let Some(p) = ledger.product(pid).await? else {
                return Err(crate::exit::Failure::usage(format!(
                    "product {id} does not exist"
                )));
            };
            let (confirmed_orders, confirmed_units, rejected): (i64, i64, i64) = sqlx::query_as(
                "SELECT COUNT(*) FILTER (WHERE status = 'confirmed'),
                        COALESCE(SUM(quantity) FILTER (WHERE status = 'confirmed'), 0)::bigint,
                        COUNT(*) FILTER (WHERE status = 'rejected')
                 FROM orders WHERE product_id = $1",
            )
            .bind(id)
            .fetch_one(ledger.pool())
            .await?;
            let mut conn = redis.clone();
            let (lock, fence_counter): (Option<String>, Option<i64>) = timed(
                redis::pipe()
                    .cmd("GET")
                    .arg(ns.lock_key(*id))
                    .cmd("GET")
                    .arg(ns.fence_key(*id))
                    .query_async(&mut conn),
            )
            .await?;
            let admission = AcceptLog::new(redis.clone(), ns.clone())
                .admission(*id)
                .await?;
            let in_flight: i64 = admission.admitted.iter().map(|(_, q)| q).sum();
            let view = json!({
                "id": p.id, "name": p.name, "stock": p.stock, "seededStock": p.seeded_stock,
                "admissionTokens": admission.tokens, "admittedUnsettled": admission.admitted.len(),
                "admittedUnits": in_flight,
                "maxPerOrder": p.max_per_order, "perUserLimit": p.per_user_limit,
                "soldOut": p.stock == 0, "lockFence": p.lock_fence,
                "confirmedOrders": confirmed_orders, "confirmedUnits": confirmed_units,
                "rejectedOrders": rejected, "lockHeldBy": lock, "fenceCounter": fence_counter.unwrap_or(0),
            });
            if args.json {
                output::json(&json!({"product": view}));
            } else {
                let mut t = output::table(&["field", "value"]);
                if let Some(map) = view.as_object() {
                    for (k, v) in map {
                        t.add_row(vec![
                            Cell::new(k),
                            Cell::new(v.to_string().trim_matches('"')),
                        ]);
                    }
                }
                println!("{t}");
            }
        }
        View::Order { id } => {
            let ledger = backends::ledger(b).await?;
            let redis = backends::redis(b).await?;
            let (order, location) = match ledger.order(id).await? {
                Some(view) => {
                    let location = serde_json::to_value(view.status)?;
                    (Some(serde_json::to_value(&view)?), location)
                }
                None => match AcceptLog::new(redis, ns.clone()).get(id).await? {
                    Some(r) if r.state == AcceptState::Queued => (
                        Some(serde_json::to_value(r.queued_view(id))?),
                        json!("queued"),
                    ),
                    _ => {
                        let dead = queue::peek_dead_letters(&b.amqp_url, &ns, 10_000).await?;
                        match dead
                            .into_iter()
                            .find(|d| d.message_id.as_deref() == Some(id.as_str()))
                        {
                            Some(d) => (
                                Some(json!({"orderId": id, "reason": d.reason, "body": d.body})),
                                json!("dead_lettered"),
                            ),
                            None => (None, json!("unknown")),
                        }
                    }
                },
            };
            if args.json {
                output::json(
                    &json!({"order": {"orderId": id, "location": location, "view": order}}),
                );
            } else {
                println!("order {id}: {}", location.as_str().unwrap_or("unknown"));
                if let Some(map) = order.as_ref().and_then(|o| o.as_object()) {
                    let mut t = output::table(&["field", "value"]);
                    for (k, v) in map {
                        t.add_row(vec![
                            Cell::new(k),
                            Cell::new(v.to_string().trim_matches('"')),
                        ]);
                    }
                    println!("{t}");
                }
            }
        }
    }
    Ok(OK)
}

/// `inspect queue --watch`: a line (or a JSON document) per interval.
async fn watch_queue(b: &BackendUrls, interval: std::time::Duration, as_json: bool) -> Outcome {
    let ns = b.namespace();
    let redis = backends::redis(b).await?;
    let mut last: Option<(std::time::Instant, u64, u64)> = None;
    loop {
        let q = queue::queues(&b.amqp_url, &ns).await?;
        let workers = heartbeat::workers(&redis, &ns).await?;
        let inflight = queue::held_by_workers(&workers);
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
