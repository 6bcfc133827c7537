//! Holds on the real services (contract v3, "Holds"): a product with
//! `hold_seconds` books its orders `held`; then exactly one of paid,
//! cancelled (units back at once) or expired (units back within 2 s of
//! `heldUntil`, by the workers' sweep).

use flashsale_engine::audit::{self, QueueFacts};
use flashsale_testkit::{self as common, TestEnv};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

async fn seed_held(env: &TestEnv, id: i64, stock: i32, hold_seconds: i32) {
    sqlx::query(
        "INSERT INTO products (id, name, stock, seeded_stock, max_per_order, hold_seconds)
         VALUES ($1, $2, $3, $3, 10, $4)",
    )
    .bind(id)
    .bind(format!("held {id}"))
    .bind(stock)
    .bind(hold_seconds)
    .execute(&env.pool)
    .await
    .unwrap();
}

/// `POST /orders/{key}/{action}`: status and body. Pays or cancels `key` as `buyer` (the body names the buyer, contract v4).
async fn pay_or_cancel(
    env: &TestEnv,
    api: &str,
    key: &str,
    action: &str,
    buyer: &str,
) -> (StatusCode, Value) {
    let r = env
        .http
        .post(format!("{api}/orders/{key}/{action}"))
        .json(&json!({ "userId": buyer }))
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

async fn status_of(env: &TestEnv, key: &str) -> String {
    sqlx::query_scalar("SELECT status FROM orders WHERE idempotency_key = $1")
        .bind(key)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// Buys one unit of `product` as `user`; the order's key once it is held.
async fn buy_held(env: &TestEnv, api: &str, product: i64, user: &str) -> String {
    let a = env
        .buy(
            api,
            None,
            json!({"userId": user, "productId": product, "quantity": 1}),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    env.wait_for_rows(std::slice::from_ref(&a.key)).await;
    assert_eq!(status_of(env, &a.key).await, "held");
    a.key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_order_is_paid_once_or_cancelled_with_its_units_back() {
    let mut env = common::env().await;
    seed_held(&env, 1, 10, 300).await;
    env.seed(2, 10, None).await;
    let api = env.start_api().await;
    env.start_worker().await;

    let paid = buy_held(&env, &api, 1, "alice").await;
    let view = env.get_json(&format!("{api}/orders/{paid}")).await;
    assert_eq!(view["status"], "held");
    assert!(view["heldUntil"].is_string(), "{view}");
    assert_eq!(env.stock(1).await, 9, "a held unit is off the stock");
    for _ in 0..2 {
        let (status, body) = pay_or_cancel(&env, &api, &paid, "pay", "alice").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "paid");
        assert!(body["settledAt"].is_string(), "{body}");
    }
    let (status, body) = pay_or_cancel(&env, &api, &paid, "cancel", "alice").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "not_held");
    assert_eq!(body["status"], "paid");
    assert_eq!(env.stock(1).await, 9, "a paid unit stays sold");

    let cancelled = buy_held(&env, &api, 1, "bob").await;
    assert_eq!(env.stock(1).await, 8);
    for _ in 0..2 {
        let (status, body) = pay_or_cancel(&env, &api, &cancelled, "cancel", "bob").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "cancelled");
        assert_eq!(env.stock(1).await, 9, "the units came back once, at once");
    }
    let (status, body) = pay_or_cancel(&env, &api, &cancelled, "pay", "bob").await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::CONFLICT, &json!("cancelled"))
    );

    // A cancelled unit sells again at once: the last unit of product 3 is
    // held, the next buyer hears 409, the hold is cancelled, and the buyer
    // after that is accepted straight away (this API's catalog and the
    // admission counter have it back).
    seed_held(&env, 3, 1, 300).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // the catalog's reload
    let last = buy_held(&env, &api, 3, "erin").await;
    let refused = env
        .buy(
            &api,
            None,
            json!({"userId": "fay", "productId": 3, "quantity": 1}),
        )
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
    let (status, _) = pay_or_cancel(&env, &api, &last, "cancel", "erin").await;
    assert_eq!(status, StatusCode::OK);
    let again = env
        .buy(
            &api,
            None,
            json!({"userId": "gus", "productId": 3, "quantity": 1}),
        )
        .await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{}", again.body);
    env.wait_for_rows(std::slice::from_ref(&again.key)).await;

    // Not held: a final order, an order still queued, no order at all.
    let a = env
        .buy(
            &api,
            None,
            json!({"userId": "carol", "productId": 2, "quantity": 1}),
        )
        .await;
    env.wait_for_rows(std::slice::from_ref(&a.key)).await;
    let (status, body) = pay_or_cancel(&env, &api, &a.key, "pay", "carol").await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::CONFLICT, &json!("confirmed"))
    );
    env.stop_workers().await;
    let queued = env
        .buy(
            &api,
            None,
            json!({"userId": "dave", "productId": 1, "quantity": 1}),
        )
        .await;
    let (status, body) = pay_or_cancel(&env, &api, &queued.key, "cancel", "dave").await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::CONFLICT, &json!("queued"))
    );
    let (status, body) = pay_or_cancel(&env, &api, "no-such-order", "pay", "dave").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    env.start_worker().await;
    env.wait_for_rows(&[queued.key]).await;
    env.assert_invariants().await;
    env.finish().await;
}

/// Contract v4, "Pay and cancel name the buyer": without tokens the body
/// names the buyer; another buyer's order is `404` and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_orders_buyer_pays_or_cancels_it() {
    let mut env = common::env().await;
    seed_held(&env, 1, 10, 300).await;
    let api = env.start_api().await;
    env.start_worker().await;
    let held = buy_held(&env, &api, 1, "carol").await;
    assert_eq!(env.stock(1).await, 9);
    for action in ["cancel", "pay"] {
        let (status, body) = pay_or_cancel(&env, &api, &held, action, "mallory").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{action}: {body}");
        assert_eq!(body["error"]["code"], "unknown_order");
    }
    for body in ["", "{}", r#"{"userId": 7}"#, r#"{"userId": ""}"#] {
        let r = env
            .http
            .post(format!("{api}/orders/{held}/cancel"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "body {body:?}");
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_request", "{err}");
    }
    assert_eq!(status_of(&env, &held).await, "held", "nothing changed");
    assert_eq!(env.stock(1).await, 9, "no unit came back");
    let (status, body) = pay_or_cancel(&env, &api, &held, "cancel", "carol").await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::OK, &json!("cancelled"))
    );
    assert_eq!(env.stock(1).await, 10);
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unpaid_hold_expires_within_two_seconds_and_its_units_sell_again() {
    let mut env = common::env().await;
    seed_held(&env, 1, 5, 1).await;
    let api = env.start_api().await;
    env.start_worker().await;

    let mut held = Vec::new();
    for i in 0..5 {
        held.push(buy_held(&env, &api, 1, &format!("u{i}")).await);
    }
    let sold_out = env
        .buy(
            &api,
            None,
            json!({"userId": "late", "productId": 1, "quantity": 1}),
        )
        .await;
    assert_eq!(sold_out.status, StatusCode::CONFLICT, "{}", sold_out.body);

    // Each is expired within 2 s of its heldUntil, and its unit is back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let expired: i64 = env
            .count("SELECT count(*) FROM orders WHERE status = 'expired'")
            .await;
        if expired == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "only {expired} of 5 expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let late: f64 = sqlx::query_scalar(
        "SELECT max(EXTRACT(EPOCH FROM settled_at - held_until))::float8 FROM orders",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(
        (0.0..2.0).contains(&late),
        "expired {late} s after heldUntil"
    );
    assert_eq!(env.stock(1).await, 5);
    let (status, body) = pay_or_cancel(&env, &api, &held[0], "pay", "u0").await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::CONFLICT, &json!("expired"))
    );

    // The units sell again to later buyers (once the API's catalog and the
    // admission counter have them back: within a few seconds).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = 0;
    let mut n = 0;
    while again < 5 {
        assert!(Instant::now() < deadline, "{again} of 5 units sold again");
        n += 1;
        let a = env
            .buy(
                &api,
                None,
                json!({"userId": format!("again{n}"), "productId": 1, "quantity": 1}),
            )
            .await;
        if a.status == StatusCode::ACCEPTED {
            again += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let keys: Vec<String> = sqlx::query_scalar("SELECT idempotency_key FROM orders")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    env.wait_for_rows(&keys).await;
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pays_racing_the_expiry_end_as_their_answers_said() {
    let mut env = common::env().await;
    seed_held(&env, 1, 200, 2).await;
    let api = env.start_api().await;
    env.start_worker().await;
    env.start_worker().await;
    let answers = env.storm(&api, 1, 200, 50, |i| format!("u{i}")).await;
    let keys: Vec<String> = answers.iter().map(|a| a.key.clone()).collect();
    assert!(answers.iter().all(|a| a.status == StatusCode::ACCEPTED));
    env.wait_for_rows(&keys).await;
    // Each pay is sent around its order's own expiry: from 300 ms before to
    // 300 ms after, spread over the orders.
    let until: Vec<(String, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT idempotency_key, user_id, held_until FROM orders WHERE status = 'held'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(until.len(), 200);
    let pays: Vec<(String, StatusCode, Value)> =
        futures_util::stream::iter(until.into_iter().enumerate())
            .map(|(i, (key, buyer, held_until))| {
                let (env, api) = (&env, &api);
                async move {
                    let offset = chrono::Duration::milliseconds(i as i64 * 3 - 300);
                    let wait = (held_until + offset - chrono::Utc::now())
                        .to_std()
                        .unwrap_or_default();
                    tokio::time::sleep(wait).await;
                    let (status, body) = pay_or_cancel(env, api, &key, "pay", &buyer).await;
                    (key, status, body)
                }
            })
            .buffer_unordered(200)
            .collect()
            .await;
    // Every order leaves the hold, and ends as its pay's answer said.
    let deadline = Instant::now() + Duration::from_secs(10);
    while env
        .count("SELECT count(*) FROM orders WHERE status = 'held'")
        .await
        > 0
    {
        assert!(Instant::now() < deadline, "holds left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut paid, mut expired) = (0, 0);
    for (key, status, body) in &pays {
        let now = status_of(&env, key).await;
        match *status {
            StatusCode::OK => {
                assert_eq!(now, "paid", "{key}: answered {body}");
                paid += 1;
            }
            StatusCode::CONFLICT => {
                assert_eq!(now, "expired", "{key}: answered {body}");
                assert_eq!(body["status"], "expired", "{key}");
                expired += 1;
            }
            other => panic!("{key}: pay answered {other} {body}"),
        }
    }
    assert_eq!(paid + expired, 200);
    assert!(
        paid > 0 && expired > 0,
        "the race was not run: {paid} paid, {expired} expired"
    );
    assert_eq!(
        env.stock(1).await,
        200 - paid,
        "expired units back, paid ones sold"
    );
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_catches_a_hold_left_past_its_expiry() {
    let env = common::env().await;
    seed_held(&env, 1, 5, 60).await;
    // An order held with nobody sweeping: 10 s past its expiry.
    sqlx::query(
        "INSERT INTO orders (idempotency_key, user_id, product_id, quantity, status,
                             accepted_at, processed_at, held_until)
         VALUES ('stale', 'u', 1, 1, 'held', now(), now(), now() - interval '10 seconds')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE products SET stock = 4 WHERE id = 1")
        .execute(&env.pool)
        .await
        .unwrap();
    let report = audit::audit(&env.pool, None, &QueueFacts::default())
        .await
        .unwrap();
    assert!(!report.ok);
    let v: Vec<_> = report
        .violations
        .iter()
        .map(|v| (v.invariant, v.detail.clone()))
        .collect();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].0, 7);
    assert!(v[0].1.contains("stale"), "{v:?}");
    assert_eq!(report.products[0].held_units, 1);
    env.finish().await;
}

/// Reads Server-Sent Events from `response` until the stream ends (or
/// `limit` passes): the `status` of each `event: status`, in order.
async fn statuses_streamed(mut response: reqwest::Response, limit: Duration) -> Vec<String> {
    let mut text = String::new();
    let mut statuses = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, response.chunk())
        .await
        .map(Result::unwrap)
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            if event.lines().any(|l| l == "event: status")
                && let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: "))
            {
                let view: Value = serde_json::from_str(data).unwrap();
                statuses.push(view["status"].as_str().unwrap().to_owned());
            }
        }
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_streams_queued_held_paid_to_a_second_api_and_ends() {
    let mut env = common::env().await;
    seed_held(&env, 1, 10, 60).await;
    let api = env.start_api().await;
    let mut config = flashsale_api::ApiConfig::new(env.backends(), "127.0.0.1:0");
    config.limits.max_streams = 1;
    let other = env.start_api_config(config, true).await;

    let a = env
        .buy(
            &api,
            None,
            json!({"userId": "u", "productId": 1, "quantity": 1}),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    // Watched on the second API; booked by a worker and paid on the first.
    let stream = env
        .http
        .get(format!("{other}/orders/{}/events", a.key))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    assert!(
        stream.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let reading = tokio::spawn(statuses_streamed(stream, Duration::from_secs(20)));
    // Over the second API's one stream: 503.
    let refused = env
        .http
        .get(format!("{other}/orders/{}/events", a.key))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.start_worker().await;
    env.wait_for_rows(std::slice::from_ref(&a.key)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = pay_or_cancel(&env, &api, &a.key, "pay", "u").await;
    assert_eq!(status, StatusCode::OK);
    let started = Instant::now();
    let statuses = reading.await.unwrap();
    assert_eq!(statuses, ["queued", "held", "paid"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the stream did not end after the final status"
    );
    let unknown = env
        .http
        .get(format!("{api}/orders/never-accepted/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    env.finish().await;
}

/// Workers killed (no goodbye) while 1,500 holds come due: a sweep is one
/// statement, so a killed one changed nothing; the next worker expires
/// each hold once and gives each unit back once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_killed_while_holds_expire_lose_and_double_nothing() {
    let mut env = common::env().await;
    seed_held(&env, 1, 1_500, 2).await;
    let api = env.start_api().await;
    env.start_worker().await;
    env.start_worker().await;
    let answers = env.storm(&api, 1, 1_500, 100, |i| format!("u{i}")).await;
    let keys: Vec<String> = answers.iter().map(|a| a.key.clone()).collect();
    env.wait_for_rows(&keys).await;
    // Kill both as the first holds come due, while they sweep.
    let first: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT min(held_until) FROM orders")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    let wait = (first - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    env.kill_workers().await;
    env.start_worker().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while env
        .count("SELECT count(*) FROM orders WHERE status = 'held'")
        .await
        > 0
    {
        assert!(Instant::now() < deadline, "holds left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        env.count("SELECT count(*) FROM orders WHERE status = 'expired'")
            .await,
        1_500
    );
    assert_eq!(env.stock(1).await, 1_500, "each unit back once");
    env.assert_invariants().await;
    env.finish().await;
}

/// Contract v4, "Order streams live until their final status": a stream
/// outlives the idle timeout (here 1 s against a 4 s hold) and receives the
/// final event; one buyer holds at most `API_STREAMS_PER_BUYER` streams,
/// refused before any backend is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_outlives_the_idle_timeout_and_one_buyer_holds_few() {
    let mut env = common::env().await;
    seed_held(&env, 1, 10, 4).await;
    let mut config = flashsale_api::ApiConfig::new(env.backends(), "127.0.0.1:0");
    config.limits.idle_timeout = Duration::from_secs(1);
    config.limits.streams_per_buyer = 2;
    let api = env.start_api_config(config, true).await;
    env.start_worker().await;
    let key = buy_held(&env, &api, 1, "ivy").await;
    let open = |key: String| {
        let (http, api) = (env.http.clone(), api.clone());
        async move {
            http.get(format!("{api}/orders/{key}/events"))
                .send()
                .await
                .unwrap()
        }
    };
    let first = open(key.clone()).await;
    assert_eq!(first.status(), StatusCode::OK);
    let reading = tokio::spawn(statuses_streamed(first, Duration::from_secs(15)));
    let second = open(key.clone()).await;
    assert_eq!(second.status(), StatusCode::OK);
    // The third from the same address: refused, even for an order that
    // does not exist (no backend was asked).
    for k in [key.clone(), "never-accepted".to_owned()] {
        let third = open(k).await;
        assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(third.headers().contains_key("retry-after"));
    }
    drop(second);
    let started = Instant::now();
    let statuses = reading.await.unwrap();
    assert_eq!(
        statuses,
        ["held", "expired"],
        "after {:?}",
        started.elapsed()
    );
    // The stream's end freed its share: the buyer may watch again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = open(key.clone()).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(
        statuses_streamed(again, Duration::from_secs(5)).await,
        ["expired"]
    );
    env.assert_invariants().await;
    env.finish().await;
}

/// Issue 25, item 10: product rows are locked in one order everywhere, so
/// the holds sweep (expiring holds over many products) and joint commits
/// (booking over many products) never deadlock: PostgreSQL's deadlock
/// count for the database stays where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkout_over_many_products_never_deadlocks() {
    let mut env = common::env().await;
    for id in 1..=20 {
        seed_held(&env, id, 200, 1).await;
    }
    const DEADLOCKS: &str =
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()";
    let before = env.count(DEADLOCKS).await;
    let api = env.start_api().await;
    env.start_worker().await;
    env.start_worker().await;
    // Rounds of buys over all twenty products, a second apart: each
    // round's holds expire while the next round commits.
    for round in 0..5 {
        let answers: Vec<_> = futures_util::stream::iter(0..400)
            .map(|i| {
                let (env, api) = (&env, &api);
                async move {
                    let body = json!({"userId": format!("r{round}u{i}"), "productId": i % 20 + 1, "quantity": 1});
                    env.buy(api, Some(&format!("r{round}-{i}")), body).await
                }
            })
            .buffer_unordered(100)
            .collect()
            .await;
        assert!(answers.iter().all(|a| a.status == StatusCode::ACCEPTED));
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while env
        .count("SELECT count(*) FROM orders WHERE status = 'held'")
        .await
        > 0
        || env.count("SELECT count(*) FROM orders").await < 2000
    {
        assert!(Instant::now() < deadline, "holds still open after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A backend reports its deadlocks when it goes idle for long or
    // exits: the workers go, and their connections with them.
    env.stop_workers().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        env.count(DEADLOCKS).await - before,
        0,
        "PostgreSQL saw deadlocks"
    );
    env.assert_invariants().await;
    env.finish().await;
}

/// Issue 25, item 9: a cancel that waits 2.5 s for a row lock (under the
/// ledger's 3 s lock timeout) is answered with its outcome, not `503`, and
/// its units are back for the next buyer at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_cancel_is_answered_with_its_outcome_and_its_units_sell_again() {
    let mut env = common::env().await;
    seed_held(&env, 1, 1, 300).await;
    let api = env.start_api().await;
    env.start_worker().await;
    let held = buy_held(&env, &api, 1, "carol").await;
    let mut blocker = env.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM products WHERE id = 1 FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let release = async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        blocker.commit().await.unwrap();
    };
    let started = Instant::now();
    let ((status, body), ()) =
        tokio::join!(pay_or_cancel(&env, &api, &held, "cancel", "carol"), release);
    assert!(
        started.elapsed() >= Duration::from_millis(2400),
        "the cancel did not wait for the lock"
    );
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::OK, &json!("cancelled")),
        "{body}"
    );
    assert_eq!(status_of(&env, &held).await, "cancelled");
    let next = env
        .buy(
            &api,
            None,
            json!({"userId": "dave", "productId": 1, "quantity": 1}),
        )
        .await;
    assert_eq!(next.status, StatusCode::ACCEPTED, "{}", next.body);
    env.wait_for_rows(std::slice::from_ref(&next.key)).await;
    env.assert_invariants().await;
    env.finish().await;
}
