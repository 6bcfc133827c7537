//! Faults on the real services: a broker that goes away, a worker killed
//! mid-group, redelivery, poison messages, Redis losing its data, a lock
//! holder whose lease ran out.

use flashsale_testkit as common;

use chrono::Utc;
use flashsale_engine::domain::QueuedOrder;
use flashsale_engine::ledger::{Ledger, LedgerError, OrderOutcome, StockLedger};
use flashsale_engine::locks::{ProductLock, ProductLocks};
use flashsale_engine::{IdempotencyKey, ProductId, Quantity, UserId, redis_conn};
use flashsale_testkit::{Forwarder, amqp_target};
use flashsale_worker::{Worker, WorkerConfig};
use lapin::options::BasicGetOptions;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn order(key: &str, user: &str, product: i64) -> QueuedOrder {
    QueuedOrder {
        order_id: IdempotencyKey::parse(key).unwrap(),
        user_id: UserId::parse(user).unwrap(),
        product_id: ProductId::new(product).unwrap(),
        quantity: Quantity::new(1).unwrap(),
        accepted_at: Utc::now(),
    }
}

fn message(key: &str, product: i64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "orderId": key, "userId": "u", "productId": product, "quantity": 1,
        "acceptedAt": Utc::now(),
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_answers_503_while_the_broker_is_away_and_recovers_without_restart() {
    let mut env = common::env().await;
    env.seed(1, 100, None).await;
    let forwarder = Forwarder::start(amqp_target()).await;
    let mut backends = env.backends();
    backends.amqp_url = forwarder.amqp_url();
    let api = env.start_api_with(backends, true).await;
    let body = |i: usize| json!({"userId": format!("u{i}"), "productId": 1, "quantity": 1});
    let mut accepted = Vec::new();

    let first = env.buy(&api, None, body(0)).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    accepted.push(first.key);

    forwarder.cut();
    let mut saw_503 = false;
    for i in 0..100 {
        let started = std::time::Instant::now();
        let a = env.buy(&api, None, body(i)).await;
        assert!(started.elapsed() < Duration::from_secs(7), "an answer hung");
        match a.status {
            StatusCode::ACCEPTED => accepted.push(a.key),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(a.body["error"]["code"], "unavailable");
                assert!(a.retry_after.is_some(), "503 without Retry-After");
                saw_503 = true;
                break;
            }
            other => panic!("unexpected {other} while the broker is away"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_503, "never answered 503 with the broker cut off");
    // While it stays away, every answer is a prompt 503.
    for i in 0..5 {
        let a = env.buy(&api, None, body(i)).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let ready = env
        .http
        .get(format!("{api}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    forwarder.restore();
    let mut recovered = false;
    for i in 0..150 {
        let a = env.buy(&api, None, body(1000 + i)).await;
        if a.status == StatusCode::ACCEPTED {
            accepted.push(a.key);
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "no 202 after the broker came back");

    env.start_worker().await;
    env.wait_for_rows(&accepted).await;
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_cut_off_from_the_broker_applies_the_orders_after() {
    let mut env = common::env().await;
    env.seed(1, 100, None).await;
    let api = env.start_api().await;
    let forwarder = Forwarder::start(amqp_target()).await;
    let mut backends = env.backends();
    backends.amqp_url = forwarder.amqp_url();
    env.start_worker_with(backends).await;

    let before = env.storm(&api, 1, 10, 10, |i| format!("a{i}")).await;
    let mut keys: Vec<String> = before.iter().map(|a| a.key.clone()).collect();
    env.wait_for_rows(&keys).await;

    forwarder.cut();
    let during = env.storm(&api, 1, 10, 10, |i| format!("b{i}")).await;
    assert!(during.iter().all(|a| a.status == StatusCode::ACCEPTED));
    keys.extend(during.iter().map(|a| a.key.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    forwarder.restore();

    env.wait_for_rows(&keys).await;
    assert_eq!(env.stock(1).await, 80);
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_killed_before_its_ack_loses_and_doubles_nothing() {
    let mut env = common::env().await;
    env.seed(1, 10, None).await;
    let api = env.start_api().await;
    let answers = env.storm(&api, 1, 10, 10, |i| format!("k{i}")).await;
    let keys: Vec<String> = answers.iter().map(|a| a.key.clone()).collect();
    assert!(answers.iter().all(|a| a.status == StatusCode::ACCEPTED));

    // A worker takes a batch, commits it and dies before the ack.
    let victim = Worker::connect(WorkerConfig::new(env.backends()))
        .await
        .unwrap();
    let mut consumer = victim.open_consumer().await.unwrap();
    let batch = consumer.next_batch().await.unwrap().unwrap();
    let held = batch.len();
    let committed = victim
        .book
        .commit(consumer.as_mut(), batch, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(committed.len(), held);
    // Dies here: the commit is never acked.
    consumer.close().await;
    drop(victim);
    assert_eq!(
        env.count("SELECT count(*) FROM orders").await as usize,
        held
    );

    // Another dies holding a batch it never committed.
    let victim = Worker::connect(WorkerConfig::new(env.backends()))
        .await
        .unwrap();
    let mut consumer = victim.open_consumer().await.unwrap();
    let _held = consumer.next_batch().await.unwrap().unwrap();
    consumer.close().await;
    drop(victim);

    env.start_worker().await;
    env.wait_for_rows(&keys).await;
    for _ in 0..50 {
        if env.queue_depth(false).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.stop_workers().await;
    assert_eq!(
        env.queue_depth(false).await,
        0,
        "redelivered messages not acked"
    );
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 10);
    assert_eq!(
        env.count("SELECT count(*) FROM orders WHERE status = 'confirmed'")
            .await,
        10
    );
    assert_eq!(env.stock(1).await, 0);
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_message_published_twice_books_once() {
    let mut env = common::env().await;
    env.seed(1, 5, None).await;
    let payload = message("twice-1", 1);
    env.publish_raw("twice-1", &payload).await;
    env.publish_raw("twice-1", &payload).await;
    env.start_worker().await;
    env.wait_for_rows(&["twice-1".to_owned()]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.stop_workers().await;
    assert_eq!(env.queue_depth(false).await, 0);
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 1);
    assert_eq!(env.stock(1).await, 4);
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_land_in_the_dead_letter_queue_with_a_reason() {
    let mut env = common::env().await;
    env.seed(1, 5, None).await;
    env.publish_raw("poison-1", b"this is not an order").await;
    let zero = serde_json::to_vec(&json!({
        "orderId": "poison-2", "userId": "u", "productId": 1, "quantity": 0,
        "acceptedAt": Utc::now(),
    }))
    .unwrap();
    env.publish_raw("poison-2", &zero).await;
    env.publish_raw("fine-1", &message("fine-1", 1)).await;
    env.start_worker().await;
    env.wait_for_rows(&["fine-1".to_owned()]).await;
    for _ in 0..50 {
        if env.queue_depth(true).await == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.queue_depth(true).await, 2);
    assert_eq!(env.queue_depth(false).await, 0);

    let conn = flashsale_engine::queue::rabbitmq::connect(&env.backends().amqp_url, "test")
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let dlq = env.backends().namespace().dead_letter_queue();
    for _ in 0..2 {
        let got = channel
            .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("a dead letter");
        let headers = got.properties.headers().clone().expect("headers");
        let reason = headers
            .inner()
            .get(flashsale_engine::queue::rabbitmq::REASON_HEADER)
            .expect("x-flashsale-reason header");
        let lapin::types::AMQPValue::LongString(text) = reason else {
            panic!("reason is not a string: {reason:?}");
        };
        let text = String::from_utf8_lossy(text.as_bytes());
        assert!(text.contains("order"), "{text}");
    }
    let _ = conn.close(200, "done".into()).await;
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 1);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_losing_its_data_neither_double_books_nor_stops_booking() {
    let mut env = common::env().await;
    env.seed(1, 1000, None).await;
    let api = env.start_api().await;
    env.start_worker().await;
    env.start_worker().await;
    let first = env.storm(&api, 1, 100, 50, |i| format!("u{i}")).await;
    let keys: Vec<String> = first.iter().map(|a| a.key.clone()).collect();
    env.wait_for_rows(&keys).await;

    // Every key of the namespace gone: accept log, fence counters, locks.
    let mut redis = redis_conn::connect(&env.backends().redis_url)
        .await
        .unwrap();
    let all: Vec<String> = redis::cmd("KEYS")
        .arg(env.backends().namespace().key_pattern())
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!all.is_empty());
    redis::cmd("DEL")
        .arg(&all)
        .query_async::<()>(&mut redis)
        .await
        .unwrap();

    // The used keys, resent with their bodies (a storm's key ends in the
    // index its buyer is named by): 202 again or 200, never booked twice.
    for key in &keys {
        let i = key.rsplit('-').next().unwrap();
        let a = env
            .buy(
                &api,
                Some(key),
                json!({"userId": format!("u{i}"), "productId": 1, "quantity": 1}),
            )
            .await;
        assert!(matches!(a.status.as_u16(), 200 | 202), "{a:?}");
    }
    let fresh = env.storm(&api, 1, 50, 25, |i| format!("v{i}")).await;
    let fresh_keys: Vec<String> = fresh.iter().map(|a| a.key.clone()).collect();
    env.wait_for_rows(&fresh_keys).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.stop_workers().await;
    assert_eq!(env.queue_depth(false).await, 0);
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 150);
    assert_eq!(
        env.count("SELECT count(*) FROM orders WHERE status = 'confirmed'")
            .await,
        150
    );
    assert_eq!(env.stock(1).await, 850);
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_whose_token_was_superseded_cannot_change_stock() {
    let env = common::env().await;
    env.seed(1, 10, None).await;
    let ledger = StockLedger::new(env.pool.clone());
    let ns = env.backends().namespace();
    let redis = redis_conn::connect(&env.backends().redis_url)
        .await
        .unwrap();
    let product = ProductId::new(1).unwrap();

    let slow =
        ProductLock::new(redis.clone(), ns.clone(), "slow").with_lease(Duration::from_millis(200));
    let stale = slow.try_acquire(product).await.unwrap().expect("free lock");
    let fast = ProductLock::new(redis.clone(), ns.clone(), "fast");
    assert!(
        fast.try_acquire(product).await.unwrap().is_none(),
        "lock is exclusive"
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // the slow holder's lease ends
    let current = fast
        .try_acquire(product)
        .await
        .unwrap()
        .expect("lease expired");
    assert!(current.token > stale.token);

    let receipt = ledger
        .apply_group(product, current.token, &[order("new-holder", "u1", 1)])
        .await
        .unwrap();
    assert_eq!(receipt.outcomes, vec![OrderOutcome::Confirmed]);
    match ledger
        .apply_group(product, stale.token, &[order("old-holder", "u2", 1)])
        .await
    {
        Err(LedgerError::FencedOut { fence, .. }) => assert_eq!(fence, current.token.0),
        other => panic!("stale holder was not fenced out: {other:?}"),
    }
    assert!(
        !slow.release(&stale).await.unwrap(),
        "released another's lock"
    );
    assert!(fast.release(&current).await.unwrap());
    assert_eq!(env.stock(1).await, 9);
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 1);

    // Redis forgets the counter: the next token is fenced out, the counter
    // is raised past what PostgreSQL saw, and booking goes on.
    let mut conn = redis.clone();
    redis::cmd("DEL")
        .arg(ns.fence_key(1))
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let low = fast.try_acquire(product).await.unwrap().unwrap();
    let fence = match ledger
        .apply_group(product, low.token, &[order("after-loss", "u3", 1)])
        .await
    {
        Err(LedgerError::FencedOut { fence, .. }) => fence,
        other => panic!("a token below the fence wrote: {other:?}"),
    };
    fast.raise_fence(product, fence).await.unwrap();
    fast.release(&low).await.unwrap();
    let next = fast.try_acquire(product).await.unwrap().unwrap();
    assert!(next.token.0 > fence);
    ledger
        .apply_group(product, next.token, &[order("after-loss", "u3", 1)])
        .await
        .unwrap();
    assert_eq!(env.stock(1).await, 8);
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_starts_without_its_backends_and_answers_503() {
    let mut env = common::env().await;
    let mut backends = env.backends();
    backends.redis_url = "redis://127.0.0.1:1".into();
    backends.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    backends.database_url = "postgres://postgres@127.0.0.1:1/nothing".into();
    let api = env.start_api_with(backends, false).await;
    let live = env
        .http
        .get(format!("{api}/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), StatusCode::OK);
    let ready = env
        .http
        .get(format!("{api}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let text = ready.text().await.unwrap();
    for name in ["postgres", "redis", "rabbitmq"] {
        assert!(text.contains(name), "{text}");
    }
    let a = env
        .buy(
            &api,
            None,
            json!({"userId": "u", "productId": 1, "quantity": 1}),
        )
        .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sold_out_without_a_key_is_answered_while_redis_and_the_broker_are_away() {
    let mut env = common::env().await;
    env.seed(1, 0, None).await;
    let mut backends = env.backends();
    backends.redis_url = "redis://127.0.0.1:1".into();
    backends.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    let api = env.start_api_with(backends, false).await;
    let body = json!({"userId": "u", "productId": 1, "quantity": 1});
    // The catalog loads from PostgreSQL; until then the answer is 503.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let a = env.buy(&api, None, body.clone()).await;
        if a.status != StatusCode::SERVICE_UNAVAILABLE || std::time::Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(answer.status, StatusCode::CONFLICT, "{:?}", answer.body);
    assert_eq!(answer.body["reason"], "sold_out");
    // A key the client chose may have been accepted before: only Redis knows.
    let keyed = env.buy(&api, Some("sold-out-keyed"), body).await;
    assert_eq!(keyed.status, StatusCode::SERVICE_UNAVAILABLE);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_over_the_delivery_limit_is_dead_lettered_by_the_queue() {
    use lapin::options::BasicNackOptions;
    let env = common::env().await;
    env.publish_raw("limit-1", &message("limit-1", 1)).await;
    let conn = flashsale_engine::queue::rabbitmq::connect(&env.backends().amqp_url, "test")
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let queue = env.backends().namespace().orders_queue();
    let mut deliveries = 0;
    while let Some(got) = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
    {
        deliveries += 1;
        got.delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .unwrap();
        assert!(deliveries <= 30, "the delivery limit never applied");
    }
    let _ = conn.close(200, "done".into()).await;
    assert!(deliveries > flashsale_engine::queue::rabbitmq::DELIVERY_LIMIT as usize);
    let mut in_dlq = 0;
    for _ in 0..50 {
        in_dlq = env.queue_depth(true).await;
        if in_dlq == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(in_dlq, 1, "the message is gone instead of dead-lettered");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_keeps_its_deliveries_while_postgres_is_away() {
    let mut env = common::env().await;
    env.seed(1, 100, None).await;
    let api = env.start_api().await;
    let forwarder = Forwarder::start(common::postgres_target()).await;
    env.start_worker_through_postgres(&forwarder).await;

    forwarder.cut();
    let answers = env.storm(&api, 1, 20, 10, |i| format!("p{i}")).await;
    let keys: Vec<String> = answers.iter().map(|a| a.key.clone()).collect();
    assert!(answers.iter().all(|a| a.status == StatusCode::ACCEPTED));
    // The worker holds them (nothing ready in the queue, nothing dead-lettered).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.queue_depth(false).await,
        0,
        "deliveries were handed back"
    );
    assert_eq!(env.queue_depth(true).await, 0, "an order was dead-lettered");
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);

    forwarder.restore();
    env.wait_for_rows(&keys).await;
    assert_eq!(env.stock(1).await, 80);
    env.assert_invariants().await;
    env.finish().await;
}

fn message_as(key: &str, user: &str, product: i64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "orderId": key, "userId": user, "productId": product, "quantity": 1,
        "acceptedAt": Utc::now(),
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_postgres_refuses_is_dead_lettered_and_the_rest_of_its_batch_commits() {
    let mut env = common::env().await;
    // Three products: the batch is applied jointly first; the refusal sends
    // it down the one-by-one path, which finds the order at fault.
    for p in 1..=3 {
        env.seed(p, 100, None).await;
    }
    // PostgreSQL refuses one buyer's rows as data (SQLSTATE 23514), as it
    // would any row it cannot store: a permanent fault for that order alone.
    sqlx::query(
        "ALTER TABLE orders ADD CONSTRAINT test_refused_buyer CHECK (user_id <> 'refused-buyer')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let mut batch = Vec::new();
    let mut good = Vec::new();
    for i in 0..50 {
        if i == 25 {
            batch.push((
                "refused-1".to_owned(),
                message_as("refused-1", "refused-buyer", 2),
            ));
            // Decodable JSON, but a NUL in userId: refused when decoded.
            batch.push(("nul-1".to_owned(), message_as("nul-1", "a\u{0}b", 1)));
        }
        let key = format!("good-{i}");
        batch.push((key.clone(), message_as(&key, &format!("u{i}"), i % 3 + 1)));
        good.push(key);
    }
    env.publish_raw_all(&batch).await;
    // Started after: the whole lot arrives as one batch.
    env.start_worker().await;
    env.wait_for_rows(&good).await;
    assert_eq!(
        (env.stock(1).await, env.stock(2).await, env.stock(3).await),
        (83, 83, 84)
    );

    let mut dead = env.dead_letters(2).await;
    dead.sort();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].0, "nul-1");
    assert!(dead[0].1.contains("userId"), "{dead:?}");
    assert_eq!(dead[1].0, "refused-1");
    assert!(dead[1].1.contains("refused by PostgreSQL"), "{dead:?}");
    assert_eq!(env.queue_depth(false).await, 0);

    // The worker goes on consuming.
    let after: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            (
                format!("after-{i}"),
                message_as(&format!("after-{i}"), "v", 1),
            )
        })
        .collect();
    env.publish_raw_all(&after).await;
    let keys: Vec<String> = after.iter().map(|(k, _)| k.clone()).collect();
    env.wait_for_rows(&keys).await;
    assert_eq!(
        env.count("SELECT count(*) FROM orders WHERE idempotency_key IN ('refused-1', 'nul-1')")
            .await,
        0
    );
    // A second look at the DLQ finds the same two (a look neither loses nor hides).
    assert_eq!(env.dead_letters(2).await.len(), 2);
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_product_fenced_out_of_a_joint_commit_is_booked_alone_and_the_others_commit() {
    let mut env = common::env().await;
    for p in 1..=3 {
        env.seed(p, 100, None).await;
    }
    // PostgreSQL saw a token Redis has forgotten (Redis lost its data) for
    // product 2 only: its group is fenced out of the joint commit.
    sqlx::query("UPDATE products SET lock_fence = 1000 WHERE id = 2")
        .execute(&env.pool)
        .await
        .unwrap();
    let batch: Vec<(String, Vec<u8>)> = (0..60)
        .map(|i| {
            let key = format!("joint-{i}");
            let message = message_as(&key, &format!("u{i}"), i % 3 + 1);
            (key, message)
        })
        .collect();
    env.publish_raw_all(&batch).await;
    env.start_worker().await;
    let keys: Vec<String> = batch.iter().map(|(k, _)| k.clone()).collect();
    env.wait_for_rows(&keys).await;
    assert_eq!(
        (env.stock(1).await, env.stock(2).await, env.stock(3).await),
        (80, 80, 80)
    );
    let fence: i64 = sqlx::query_scalar("SELECT lock_fence FROM products WHERE id = 2")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(
        fence > 1000,
        "the fence was not raised past what PostgreSQL saw: {fence}"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM orders WHERE status = 'confirmed'")
            .await,
        60
    );
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_postgres_times_the_group_out_and_it_applies_once_the_peer_is_back() {
    let mut env = common::env().await;
    env.seed(1, 100, None).await;
    let api = env.start_api().await;
    let forwarder = Forwarder::start(common::postgres_target()).await;
    env.start_worker_through_postgres(&forwarder).await;
    let warm = env.storm(&api, 1, 5, 5, |i| format!("w{i}")).await;
    let mut keys: Vec<String> = warm.iter().map(|a| a.key.clone()).collect();
    env.wait_for_rows(&keys).await;

    // PostgreSQL goes silent: its connections stay open and answer nothing.
    forwarder.go_silent();
    let answers = env.storm(&api, 1, 10, 10, |i| format!("s{i}")).await;
    assert!(answers.iter().all(|a| a.status == StatusCode::ACCEPTED));
    keys.extend(answers.iter().map(|a| a.key.clone()));
    // Long enough for the group's deadline to pass at least once.
    tokio::time::sleep(flashsale_engine::ledger::TRANSACTION_DEADLINE + Duration::from_secs(2))
        .await;
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 5);
    assert_eq!(env.queue_depth(true).await, 0, "an order was dead-lettered");

    // New connections answer again; the silent ones stay silent for good.
    forwarder.restore();
    env.wait_for_rows(&keys).await;
    assert_eq!(env.stock(1).await, 85);
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_forced_while_workers_commit_keeps_the_books() {
    use flashsale_engine::ledger::NewProduct;
    let mut env = common::env().await;
    env.seed(1, 1_000_000, None).await;
    let api = env.start_api().await;
    env.start_worker().await;
    env.start_worker().await;
    let ledger = StockLedger::new(env.pool.clone());
    let product = NewProduct {
        id: 1,
        name: "product 1".into(),
        stock: 1_000_000,
        max_per_order: 10,
        per_user_limit: None,
        hold_seconds: None,
    };
    let buying = async {
        for round in 0..8 {
            env.storm(&api, 1, 300, 50, |i| format!("r{round}-{i}"))
                .await;
        }
    };
    let resetting = async {
        for _ in 0..40 {
            ledger.reset(std::slice::from_ref(&product)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    tokio::join!(buying, resetting);
    // Let the workers drain what is queued, then check the books.
    for _ in 0..100 {
        if env.queue_depth(false).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.assert_invariants().await;
    env.finish().await;
}

/// The message ids in `queue` (taken, not acked back); none if it is gone.
async fn drain_ids(conn: &lapin::Connection, queue: &str) -> std::collections::HashSet<String> {
    let mut ids = std::collections::HashSet::new();
    let Ok(channel) = conn.create_channel().await else {
        return ids;
    };
    let get = || {
        channel.basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
    };
    while let Ok(Some(message)) = get().await {
        if let Some(id) = message.delivery.properties.message_id() {
            ids.insert(id.as_str().to_owned());
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_returned_publish_is_never_a_202_and_the_other_answers_stay_true() {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, QueueDeleteOptions};
    let mut env = common::env().await;
    env.seed(1, 1_000_000, None).await;
    let api = env.start_api().await;
    // A consumer of our own records every message that reached the queue.
    let conn =
        flashsale_engine::queue::rabbitmq::connect(&env.backends().amqp_url, "test-recorder")
            .await
            .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let queue = env.backends().namespace().orders_queue();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "recorder".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let recorded = tokio::spawn(async move {
        let mut ids = std::collections::HashSet::new();
        while let Some(Ok(d)) = consumer.next().await {
            if let Some(id) = d.properties.message_id() {
                ids.insert(id.as_str().to_owned());
            }
        }
        ids
    });
    let started = std::time::Instant::now();
    // The queue goes once 1,000 buys are answered, mid-storm; the storm goes
    // on for 1.5 s after it (in milliseconds since the start; 0: not yet).
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let deleted_ms = std::sync::atomic::AtomicU64::new(0);
    let deleter = async {
        while answered.load(std::sync::atomic::Ordering::SeqCst) < 1000 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let admin = conn.create_channel().await.unwrap();
        admin
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        let at = started.elapsed();
        deleted_ms.store(at.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
        at
    };
    let going_on = |_: &usize| {
        let deleted = deleted_ms.load(std::sync::atomic::Ordering::SeqCst);
        let on = deleted == 0 || (started.elapsed().as_millis() as u64) < deleted + 1500;
        std::future::ready(on)
    };
    let buys = futures_util::stream::iter(0..1_000_000)
        .take_while(going_on)
        .map(|i| {
            let (env, api, answered) = (&env, &api, &answered);
            async move {
                let sent = started.elapsed();
                let body = json!({"userId": format!("u{i}"), "productId": 1, "quantity": 1});
                let answer = env.buy(api, Some(&format!("ret-{i}")), body).await;
                answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                (sent, answer)
            }
        })
        .buffer_unordered(200)
        .collect::<Vec<_>>();
    let (answers, deleted_at) = tokio::join!(buys, deleter);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The API declares the queue again when its connection comes back (the
    // contract: every service declares it), so buys after that are routed
    // again: what they were answered must be where they went.
    let requeued = drain_ids(&conn, &queue).await;
    let _ = conn.close(200, "done".into()).await;
    let reached = recorded.await.unwrap();
    let count = |status: StatusCode| answers.iter().filter(|(_, a)| a.status == status).count();
    let (accepted, refused) = (
        count(StatusCode::ACCEPTED),
        count(StatusCode::SERVICE_UNAVAILABLE),
    );
    assert!(
        accepted > 0 && refused > 0,
        "{accepted} accepted, {refused} refused"
    );
    assert_eq!(accepted + refused, answers.len(), "an unexpected status");
    // Sent well after the queue was gone: a 202 only if it is in the queue
    // declared again, never for a returned publish. (Around the deletion
    // RabbitMQ itself acks what it routed to the dying queue: those 202s are
    // the broker's, and are lost with it.)
    let well_after = deleted_at + Duration::from_millis(200);
    let checked = answers
        .iter()
        .filter(|(sent, _)| *sent > well_after)
        .count();
    assert!(checked > 0, "no buy was sent well after the deletion");
    for (sent, a) in &answers {
        if *sent > well_after && a.status == StatusCode::ACCEPTED {
            assert!(
                requeued.contains(&a.key),
                "{} sent after the queue was deleted, answered 202, is in no queue",
                a.key
            );
        }
        if requeued.contains(&a.key) {
            assert_eq!(a.status, StatusCode::ACCEPTED, "{} is queued", a.key);
        }
        // A message that reached the queue was answered 202: no confirm of
        // another publish turned it into a 503 (nor a return into a 202).
        if reached.contains(&a.key) {
            assert_eq!(
                a.status,
                StatusCode::ACCEPTED,
                "{} reached the queue but was answered {}",
                a.key,
                a.status
            );
        }
    }
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_postgres_does_not_use_up_the_apis_connections() {
    let mut env = common::env().await;
    env.seed(1, 10, None).await;
    let forwarder = Forwarder::start(common::postgres_target()).await;
    let mut backends = env.backends();
    backends.database_url = flashsale_engine::scratch::with_database(
        &format!("postgres://postgres@{}", forwarder.addr),
        &env.scratch.database,
    );
    let api = env.start_api_with(backends, true).await;

    // More reads than the API's pool holds (16), all against a silent server.
    forwarder.go_silent();
    let reads = futures_util::future::join_all((0..24).map(|i| {
        let url = format!("{api}/orders/silent-{i}");
        let http = env.http.clone();
        async move {
            let started = std::time::Instant::now();
            let status = http.get(url).send().await.unwrap().status();
            (status, started.elapsed())
        }
    }))
    .await;
    for (status, took) in &reads {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(*took < Duration::from_secs(6), "a read hung for {took:?}");
    }

    // Once the server answers again, so does the API: no read hung on, and
    // the pool still has connections to give.
    forwarder.restore();
    let mut answered = None;
    for _ in 0..50 {
        let r = env
            .http
            .get(format!("{api}/orders/never-accepted"))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::NOT_FOUND {
            answered = Some(r.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        answered,
        Some(StatusCode::NOT_FOUND),
        "the API never read PostgreSQL again"
    );
    env.finish().await;
}

/// Issue 25, item 7: order reads are bounded (`API_MAX_READS`): while the
/// reads in progress wait on a PostgreSQL that went silent, another read is
/// answered `503` within a moment instead of queueing for the pool that
/// pays and cancels need.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_reads_beyond_the_cap_are_shed_at_once() {
    let mut env = common::env().await;
    env.seed(1, 10, None).await;
    let forwarder = Forwarder::start(common::postgres_target()).await;
    let mut config = flashsale_api::ApiConfig::new(env.backends(), "127.0.0.1:0");
    config.backends.database_url = flashsale_engine::scratch::with_database(
        &format!("postgres://postgres@{}", forwarder.addr),
        &env.scratch.database,
    );
    config.limits.max_reads = 2;
    let api = env.start_api_config(config, true).await;
    forwarder.go_silent();
    // Two reads take the two slots and wait on the silent ledger.
    let slow: Vec<_> = (0..2)
        .map(|i| {
            let (http, api) = (env.http.clone(), api.clone());
            tokio::spawn(async move {
                http.get(format!("{api}/orders/slow-{i}"))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let shed = env
        .http
        .get(format!("{api}/orders/third"))
        .send()
        .await
        .unwrap();
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(shed.headers().contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the third read waited {:?}",
        started.elapsed()
    );
    for s in slow {
        // They time out on their own (503), never hang.
        assert_eq!(s.await.unwrap(), StatusCode::SERVICE_UNAVAILABLE);
    }
    forwarder.restore();
    env.finish().await;
}
