//! Raw capacity of each component: RabbitMQ publishes and consumes,
//! PostgreSQL hot-row updates and batched inserts, Redis round trips and the lock.

use super::*;

/// Runs `f` for about `budget`; returns operations per second.
async fn rate<F, Fut, E>(budget: Duration, mut f: F) -> Result<f64, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, E>>,
{
    let started = Instant::now();
    let mut done = 0;
    while started.elapsed() < budget {
        done += f().await?;
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

fn capacity(
    component: &'static str,
    measure: impl Into<String>,
    per_second: f64,
    unit: &'static str,
) -> Capacity {
    Capacity {
        component,
        measure: measure.into(),
        per_second,
        unit,
    }
}

fn order_payload(id: &str, i: u64, product: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "orderId": id, "userId": format!("doctor-{i}"), "productId": product,
        "quantity": 1, "acceptedAt": chrono::Utc::now(),
    }))
    .unwrap_or_default()
}

pub(super) async fn rabbitmq(
    b: &BackendUrls,
    budget: Duration,
    out: &mut Vec<Capacity>,
) -> Result<(), Failure> {
    let ns = b.namespace();
    let conn = broker::connect(&b.amqp_url, "fsctl-doctor").await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    broker::declare_queues(&channel, &ns).await?;
    let queue = ns.partition_queue(0);

    let started = Instant::now();
    let published: Vec<Result<(), broker::PublishError>> = stream::iter(0u64..)
        .take_while(|_| std::future::ready(started.elapsed() < budget))
        .map(|i| {
            let (channel, queue) = (&channel, &queue);
            async move {
                let id = format!("doctor-w-{i}");
                broker::publish_confirmed(channel, queue, &id, &order_payload(&id, i, 1), None)
                    .await
            }
        })
        .buffer_unordered(PUBLISH_WINDOW)
        .collect()
        .await;
    let confirmed = published.iter().filter(|r| r.is_ok()).count() as f64;
    out.push(capacity(
        "RabbitMQ",
        format!("persistent publishes, {PUBLISH_WINDOW} confirms in flight"),
        confirmed / started.elapsed().as_secs_f64(),
        "msg/s",
    ));

    let mut i = 0u64;
    let one_by_one = rate(budget / 2, || {
        i += 1;
        let (channel, queue, id) = (&channel, &queue, format!("doctor-s-{i}"));
        async move {
            broker::publish_confirmed(channel, queue, &id, &order_payload(&id, i, 1), None)
                .await
                .map(|()| 1)
        }
    })
    .await?;
    out.push(capacity(
        "RabbitMQ",
        "persistent publishes, one confirm awaited each",
        one_by_one,
        "msg/s",
    ));
    let _ = conn.close(200, "doctor".into()).await;

    // Consume + ack what was published, as the worker does: batches up to
    // the prefetch, one `multiple` ack per batch.
    let all: Vec<u16> = (0..ns.partitions()).collect();
    let consumer =
        OrderConsumer::open(&b.amqp_url, &ns, DEFAULT_PREFETCH, "fsctl-doctor", &all).await?;
    let started = Instant::now();
    let mut taken = 0u64;
    while started.elapsed() < budget * 2 {
        let batch = tokio::time::timeout(Duration::from_millis(500), consumer.next_batch()).await;
        let Ok(Ok(Some(deliveries))) = batch else {
            break;
        };
        taken += deliveries.len() as u64;
        if let Some(last) = deliveries.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    consumer.close().await;
    out.push(capacity(
        "RabbitMQ",
        format!("consume + ack, prefetch {DEFAULT_PREFETCH}"),
        taken as f64 / seconds,
        "msg/s",
    ));
    Ok(())
}

pub(super) async fn postgresql(
    ledger: &StockLedger,
    budget: Duration,
    out: &mut Vec<Capacity>,
) -> Result<(), Failure> {
    let pool = ledger.pool();
    sqlx::query(
        "INSERT INTO products (id, name, stock, seeded_stock) VALUES (900000001, 'doctor hot row', 1000000000, 1000000000)",
    )
    .execute(pool)
    .await?;
    let hot = rate(budget, || async {
        sqlx::query("UPDATE products SET stock = stock - 1 WHERE id = 900000001 AND stock >= 1")
            .execute(pool)
            .await
            .map(|_| 1)
    })
    .await?;
    out.push(capacity(
        "PostgreSQL",
        "conditional UPDATE of one hot row",
        hot,
        "tx/s",
    ));

    let mut next = 0u64;
    for batch in INSERT_BATCHES {
        let rows_per_second = rate(budget / 3, || {
            let keys: Vec<String> = (next..next + batch as u64).map(|i| format!("doctor-{i}")).collect();
            next += batch as u64;
            async move {
                sqlx::query(
                    "INSERT INTO orders (idempotency_key, user_id, product_id, quantity, status, accepted_at, processed_at)
                     SELECT k, k, 900000002, 1, 'confirmed', now(), now() FROM unnest($1::text[]) AS t(k)
                     ON CONFLICT (idempotency_key) DO NOTHING",
                )
                .bind(&keys)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
            }
        })
        .await?;
        let note = if batch == ENGINE_BATCH {
            " (the worker's statement size)"
        } else {
            ""
        };
        let rows = if batch == 1 { "row" } else { "rows" };
        out.push(capacity(
            "PostgreSQL",
            format!("idempotent inserts, {batch} {rows} a transaction{note}"),
            rows_per_second,
            "rows/s",
        ));
    }
    Ok(())
}

pub(super) async fn redis(
    b: &BackendUrls,
    budget: Duration,
    out: &mut Vec<Capacity>,
) -> Result<(), Failure> {
    let conn = redis_conn::connect(&b.redis_url).await?;
    let unpipelined = rate(budget, || {
        let mut c = conn.clone();
        async move {
            redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .map(|_| 1)
        }
    })
    .await?;
    out.push(capacity(
        "Redis",
        "round trips, one command each",
        unpipelined,
        "cmd/s",
    ));
    let pipelined = rate(budget, || {
        let mut c = conn.clone();
        async move {
            let mut pipe = redis::pipe();
            for _ in 0..PIPELINE {
                pipe.cmd("PING");
            }
            pipe.query_async::<Vec<String>>(&mut c)
                .await
                .map(|v| v.len() as u64)
        }
    })
    .await?;
    out.push(capacity(
        "Redis",
        format!("pipelined, {PIPELINE} commands a trip"),
        pipelined,
        "cmd/s",
    ));
    let lock = ProductLock::new(conn.clone(), b.namespace(), "fsctl-doctor");
    let product = ProductId::new(1).map_err(|e| Failure::usage(e.message))?;
    let cycles = rate(budget, || {
        let lock = lock.clone();
        async move {
            if let Some(held) = lock.try_acquire(product).await? {
                lock.release(&held).await?;
            }
            Ok::<_, flashsale_engine::seams::BackendFailed>(1)
        }
    })
    .await?;
    out.push(capacity(
        "Redis",
        "product lock acquire + release",
        cycles,
        "cycles/s",
    ));
    Ok(())
}
