//! The order path on the real services: no oversell, no double booking,
//! nothing accepted lost, every bad input refused without a trace.

use flashsale_testkit as common;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_item_sells_exactly_its_stock() {
    let mut env = common::env().await;
    env.seed(1, 100, None).await;
    let api = env.start_api().await;
    for _ in 0..3 {
        env.start_worker().await;
    }

    let answers = env
        .storm(&api, 1, 2000, 200, |i| format!("buyer-{i}"))
        .await;
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for a in &answers {
        *by_status.entry(a.status.as_u16()).or_default() += 1;
    }
    let accepted: Vec<String> = answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .map(|a| a.key.clone())
        .collect();
    assert_eq!(
        by_status.get(&202).copied().unwrap_or(0) + by_status.get(&409).copied().unwrap_or(0),
        2000,
        "only 202 and 409 expected: {by_status:?}"
    );
    assert!(
        accepted.len() >= 100,
        "fewer accepts than stock: {by_status:?}"
    );

    env.wait_for_rows(&accepted).await;
    assert_eq!(env.stock(1).await, 0);
    let confirmed = env
        .count("SELECT count(*) FROM orders WHERE status = 'confirmed'")
        .await;
    assert_eq!(confirmed, 100);
    let rows = env.count("SELECT count(*) FROM orders").await;
    assert_eq!(rows as usize, accepted.len(), "one row per 202, no more");
    let rejected = env
        .count("SELECT count(*) FROM orders WHERE status = 'rejected' AND reason = 'sold_out'")
        .await;
    assert_eq!(rejected as usize, accepted.len() - 100);
    env.assert_invariants().await;

    // The buyer is told the truth: every 202 reads confirmed or rejected.
    for key in accepted.iter().take(20) {
        let view = env.get_json(&format!("{api}/orders/{key}")).await;
        assert!(
            view["status"] == "confirmed" || view["status"] == "rejected",
            "{view}"
        );
    }
    // Once the sell-out is in the catalog, buys are answered 409 fast.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let late = env
        .buy(
            &api,
            None,
            json!({"userId": "late", "productId": 1, "quantity": 1}),
        )
        .await;
    assert_eq!(late.status, StatusCode::CONFLICT);
    assert_eq!(late.body["reason"], "sold_out");

    // The contract's metrics are exported.
    let metrics = env.get_text(&format!("{api}/metrics")).await;
    for name in [
        "flashsale_order_requests_total{status=\"queued\"}",
        "flashsale_order_requests_total{status=\"rejected_sold_out\"}",
        "flashsale_request_duration_seconds_bucket{route=\"/buy\"",
        "flashsale_orders_processed_total{status=\"confirmed\",reason=\"\"}",
        "flashsale_order_latency_seconds_bucket",
        "flashsale_batch_size_bucket",
        "flashsale_lock_wait_seconds_bucket",
        "flashsale_stock_level{product_id=\"1\"}",
        "flashsale_inflight_orders",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_sent_fifty_times_books_once() {
    let mut env = common::env().await;
    env.seed(1, 10, None).await;
    let api = env.start_api().await;
    let body = json!({"userId": "u1", "productId": 1, "quantity": 2});
    let answers = futures_util::future::join_all(
        (0..50).map(|_| env.buy(&api, Some("same-key-1"), body.clone())),
    )
    .await;
    let accepted = answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .count();
    let repeats = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .count();
    assert_eq!(accepted, 1, "{answers:?}");
    assert_eq!(repeats, 49);
    for a in answers.iter().filter(|a| a.status == StatusCode::OK) {
        assert_eq!(a.body["orderId"], "same-key-1");
        assert_eq!(a.body["status"], "queued");
    }

    env.start_worker().await;
    env.wait_for_rows(&["same-key-1".to_owned()]).await;
    let later = env.buy(&api, Some("same-key-1"), body.clone()).await;
    assert_eq!(later.status, StatusCode::OK);
    assert_eq!(later.body["status"], "confirmed");
    assert_eq!(later.body["quantity"], 2);

    let other = env
        .buy(
            &api,
            Some("same-key-1"),
            json!({"userId": "u1", "productId": 1, "quantity": 3}),
        )
        .await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.body["error"]["code"], "idempotency_key_reused");

    assert_eq!(env.count("SELECT count(*) FROM orders").await, 1);
    assert_eq!(env.stock(1).await, 8);
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_and_changes_nothing() {
    let mut env = common::env().await;
    env.seed(1, 10, None).await;
    let api = env.start_api().await;
    let long_user = "u".repeat(65);
    let long_key = "k".repeat(129);
    let cases: Vec<(&str, Option<&str>, String, u16, &str)> = vec![
        (
            "quantity -5",
            None,
            r#"{"userId":"u","productId":1,"quantity":-5}"#.into(),
            400,
            "quantity",
        ),
        (
            "quantity 0",
            None,
            r#"{"userId":"u","productId":1,"quantity":0}"#.into(),
            400,
            "quantity",
        ),
        (
            "quantity 1.5",
            None,
            r#"{"userId":"u","productId":1,"quantity":1.5}"#.into(),
            400,
            "quantity",
        ),
        (
            "quantity abc",
            None,
            r#"{"userId":"u","productId":1,"quantity":"abc"}"#.into(),
            400,
            "quantity",
        ),
        (
            "quantity 10^10",
            None,
            r#"{"userId":"u","productId":1,"quantity":10000000000}"#.into(),
            400,
            "quantity",
        ),
        (
            "quantity over max_per_order",
            None,
            r#"{"userId":"u","productId":1,"quantity":11}"#.into(),
            400,
            "quantity",
        ),
        (
            "missing quantity",
            None,
            r#"{"userId":"u","productId":1}"#.into(),
            400,
            "quantity",
        ),
        (
            "productId 0",
            None,
            r#"{"userId":"u","productId":0,"quantity":1}"#.into(),
            400,
            "productId",
        ),
        (
            "productId string",
            None,
            r#"{"userId":"u","productId":"1","quantity":1}"#.into(),
            400,
            "productId",
        ),
        (
            "unknown product 999",
            None,
            r#"{"userId":"u","productId":999,"quantity":1}"#.into(),
            404,
            "unknown_product",
        ),
        (
            "empty userId",
            None,
            r#"{"userId":"","productId":1,"quantity":1}"#.into(),
            400,
            "userId",
        ),
        (
            "65-char userId",
            None,
            format!(r#"{{"userId":"{long_user}","productId":1,"quantity":1}}"#),
            400,
            "userId",
        ),
        (
            "NUL in userId",
            None,
            r#"{"userId":"a\u0000b","productId":1,"quantity":1}"#.into(),
            400,
            "userId",
        ),
        (
            "BEL in userId",
            None,
            r#"{"userId":"bell\u0007","productId":1,"quantity":1}"#.into(),
            400,
            "userId",
        ),
        (
            "DEL in userId",
            None,
            r#"{"userId":"x\u007f","productId":1,"quantity":1}"#.into(),
            400,
            "userId",
        ),
        (
            "C1 control (NEL) in userId",
            None,
            r#"{"userId":"x\u0085y","productId":1,"quantity":1}"#.into(),
            400,
            "userId",
        ),
        (
            "userId number",
            None,
            r#"{"userId":7,"productId":1,"quantity":1}"#.into(),
            400,
            "userId",
        ),
        ("not JSON", None, "this is not json".into(), 400, "JSON"),
        ("empty body", None, String::new(), 400, "JSON"),
        ("JSON array", None, "[1,2,3]".into(), 400, "object"),
        (
            "malformed key",
            Some("bad key!"),
            r#"{"userId":"u","productId":1,"quantity":1}"#.into(),
            400,
            "Idempotency-Key",
        ),
        (
            "key too long",
            Some(long_key.as_str()),
            r#"{"userId":"u","productId":1,"quantity":1}"#.into(),
            400,
            "Idempotency-Key",
        ),
        (
            "body over 16 KiB",
            None,
            format!(
                r#"{{"userId":"u","productId":1,"quantity":1,"pad":"{}"}}"#,
                "x".repeat(17 * 1024)
            ),
            413,
            "payload_too_large",
        ),
    ];
    for (name, key, body, status, mention) in &cases {
        let mut request = env
            .http
            .post(format!("{api}/buy"))
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(k) = key {
            request = request.header("Idempotency-Key", *k);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), *status, "{name}");
        let json: serde_json::Value = response.json().await.unwrap();
        let code = json["error"]["code"].as_str().unwrap_or_default();
        let message = json["error"]["message"].as_str().unwrap_or_default();
        assert!(!code.is_empty() && !message.is_empty(), "{name}: {json}");
        if *status == 400 {
            assert_eq!(code, "invalid_request", "{name}");
        }
        assert!(
            code.contains(mention) || message.contains(mention),
            "{name}: {json} should mention {mention}"
        );
    }

    // 10 MB: refused from its Content-Length, before it is read.
    let mut raw = tokio::net::TcpStream::connect(api.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /buy HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        10 * 1024 * 1024
    );
    raw.write_all(head.as_bytes()).await.unwrap();
    let _ = raw.write_all(&vec![b' '; 64 * 1024]).await;
    let mut reply = vec![0u8; 4096];
    let n = raw.read(&mut reply).await.unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("payload_too_large"), "{reply}");

    // Nothing was recorded or enqueued.
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);
    assert_eq!(env.stock(1).await, 10);
    assert_eq!(env.queue_depth(false).await, 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_user_limit_holds_under_concurrent_buys() {
    let mut env = common::env().await;
    env.seed(1, 1000, Some(2)).await;
    let api = env.start_api().await;
    env.start_worker().await;
    env.start_worker().await;
    // 20 users, each buying 10 times at once.
    let answers = env
        .storm(&api, 1, 200, 100, |i| format!("user-{}", i % 20))
        .await;
    let accepted: Vec<String> = answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .map(|a| a.key.clone())
        .collect();
    assert_eq!(accepted.len(), 200);
    env.wait_for_rows(&accepted).await;
    let per_user: Vec<(String, i64)> = sqlx::query_as(
        "SELECT user_id, SUM(quantity)::bigint FROM orders WHERE status = 'confirmed' GROUP BY user_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(per_user.len(), 20);
    assert!(
        per_user.iter().all(|(_, units)| *units == 2),
        "{per_user:?}"
    );
    let limited = env
        .count("SELECT count(*) FROM orders WHERE reason = 'per_user_limit'")
        .await;
    assert_eq!(limited, 160);
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restock_and_new_products_are_served_within_a_second() {
    let mut env = common::env().await;
    env.seed(1, 0, None).await;
    let api = env.start_api().await;
    let body = json!({"userId": "u", "productId": 1, "quantity": 1});
    assert_eq!(
        env.buy(&api, None, body.clone()).await.status,
        StatusCode::CONFLICT
    );
    let unknown = json!({"userId": "u", "productId": 2, "quantity": 1});
    assert_eq!(
        env.buy(&api, None, unknown.clone()).await.status,
        StatusCode::NOT_FOUND
    );

    sqlx::query(
        "UPDATE products SET stock = stock + 5, seeded_stock = seeded_stock + 5 WHERE id = 1",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    env.seed(2, 5, None).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(env.buy(&api, None, body).await.status, StatusCode::ACCEPTED);
    assert_eq!(
        env.buy(&api, None, unknown).await.status,
        StatusCode::ACCEPTED
    );

    let product = env.get_json(&format!("{api}/products/1")).await;
    assert_eq!(product["seededStock"], 5);
    let missing = env
        .http
        .get(format!("{api}/orders/never-seen"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_products_at_once_each_sell_exactly_their_stock() {
    let mut env = common::env().await;
    for p in 1..=20 {
        env.seed(p, 10, None).await;
    }
    let api = env.start_api().await;
    env.start_worker().await;
    env.start_worker().await;
    let storms = (1..=20).map(|p| env.storm(&api, p, 25, 5, move |i| format!("p{p}-u{i}")));
    let answers: Vec<_> = futures_util::future::join_all(storms)
        .await
        .into_iter()
        .flatten()
        .collect();
    let accepted: Vec<String> = answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .map(|a| a.key.clone())
        .collect();
    env.wait_for_rows(&accepted).await;
    let sold: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT product_id, SUM(quantity)::bigint FROM orders WHERE status = 'confirmed'
         GROUP BY product_id ORDER BY product_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(sold.len(), 20);
    assert!(sold.iter().all(|(_, units)| *units == 10), "{sold:?}");
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_repeats_of_one_key_book_once() {
    let mut env = common::env().await;
    env.seed(1, 10, None).await;
    let api = env.start_api().await;
    let body = json!({"userId": "u1", "productId": 1, "quantity": 1});
    let answers: Vec<common::Answer> = futures_util::stream::iter(0..1000)
        .map(|_| env.buy(&api, Some("one-key"), body.clone()))
        .buffer_unordered(1000)
        .collect()
        .await;
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for a in &answers {
        *by_status.entry(a.status.as_u16()).or_default() += 1;
    }
    assert_eq!(by_status.get(&202), Some(&1), "{by_status:?}");
    assert_eq!(by_status.get(&200), Some(&999), "{by_status:?}");
    env.start_worker().await;
    env.wait_for_rows(&["one-key".to_owned()]).await;
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 1);
    assert_eq!(env.stock(1).await, 9);
    env.finish().await;
}

/// Latency of `n` sequential buys, sorted.
async fn buy_latencies(env: &common::TestEnv, api: &str, n: usize, tag: &str) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let started = std::time::Instant::now();
        let a = env
            .buy(
                api,
                Some(&format!("{tag}-{i}")),
                json!({"userId": "u", "productId": 1, "quantity": 1}),
            )
            .await;
        assert_eq!(a.status, StatusCode::ACCEPTED);
        out.push(started.elapsed());
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_loris_heads_neither_slow_buyers_nor_stay_open() {
    let mut env = common::env().await;
    env.seed(1, 1_000_000, None).await;
    let mut config = flashsale_api::ApiConfig::new(env.backends(), "127.0.0.1:0");
    config.limits.header_timeout = Duration::from_secs(3);
    let api = env.start_api_config(config, true).await;
    let addr = api.trim_start_matches("http://").to_owned();
    let p99 = |l: &[Duration]| l[l.len() * 99 / 100];
    let quiet = buy_latencies(&env, &api, 200, "quiet").await;

    // 1,500 connections that send half a head and then nothing.
    let opening = std::time::Instant::now();
    let mut loris = Vec::new();
    for _ in 0..1500 {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(b"POST /buy HTTP/1.1\r\nHost: x\r\nContent-Type: appli")
            .await
            .unwrap();
        loris.push(tcp);
    }
    let sent = std::time::Instant::now();
    let busy = buy_latencies(&env, &api, 200, "busy").await;
    assert!(
        p99(&busy) <= p99(&quiet) * 3 + Duration::from_millis(50),
        "buyers' p99 went from {:?} to {:?} with 1,500 slow heads",
        p99(&quiet),
        p99(&busy)
    );

    // Every one is closed by the server once the header timeout passes.
    let closed = futures_util::stream::iter(loris)
        .map(|mut tcp| async move {
            let mut buf = [0u8; 256];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return std::time::Instant::now(),
                    Ok(_) => {}
                }
            }
        })
        .buffer_unordered(1500)
        .collect::<Vec<_>>();
    let closed = tokio::time::timeout(Duration::from_secs(15), closed)
        .await
        .expect("slow heads still open 15 s later");
    let first = closed.iter().min().unwrap().duration_since(opening);
    let last = closed.iter().max().unwrap().duration_since(sent);
    assert!(
        first >= Duration::from_millis(2900),
        "a slow head was closed after {first:?}, before the 3 s timeout"
    );
    assert!(
        last <= Duration::from_secs(5),
        "the last slow head was closed {last:?} after it was sent"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_never_arrives_is_answered_408() {
    let mut env = common::env().await;
    env.seed(1, 10, None).await;
    let mut config = flashsale_api::ApiConfig::new(env.backends(), "127.0.0.1:0");
    config.limits.body_timeout = Duration::from_millis(500);
    let api = env.start_api_config(config, true).await;
    let mut raw = tokio::net::TcpStream::connect(api.trim_start_matches("http://"))
        .await
        .unwrap();
    raw.write_all(
        b"POST /buy HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n{\"userId\":",
    )
    .await
    .unwrap();
    let mut reply = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut reply))
        .await
        .expect("no answer to a body that never arrived")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("request_timeout"), "{reply}");
    assert_eq!(env.queue_depth(false).await, 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn buys_beyond_the_inflight_limit_are_shed_at_once() {
    let mut env = common::env().await;
    env.seed(1, 100, None).await;
    // A broker that goes silent keeps the first buys waiting for their confirm.
    let forwarder = common::Forwarder::start(common::amqp_target()).await;
    let mut config = flashsale_api::ApiConfig::new(env.backends(), "127.0.0.1:0");
    config.backends.amqp_url = forwarder.amqp_url();
    config.limits.max_inflight = 5;
    let api = env.start_api_config(config, true).await;
    forwarder.go_silent();
    let body = |i: usize| json!({"userId": format!("u{i}"), "productId": 1, "quantity": 1});
    let answers: Vec<(Duration, common::Answer)> = futures_util::stream::iter(0..25)
        .map(|i| {
            let env = &env;
            let api = &api;
            async move {
                let started = std::time::Instant::now();
                let a = env.buy(api, Some(&format!("shed-{i}")), body(i)).await;
                (started.elapsed(), a)
            }
        })
        .buffer_unordered(25)
        .collect()
        .await;
    let shed = answers
        .iter()
        .filter(|(took, a)| {
            a.status == StatusCode::SERVICE_UNAVAILABLE && *took < Duration::from_secs(1)
        })
        .count();
    assert!(shed >= 20, "only {shed} of 25 were shed at once");
    for (_, a) in &answers {
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.body["error"]["code"], "unavailable");
        assert!(a.retry_after.is_some(), "503 without Retry-After");
    }
    let metrics = env.get_text(&format!("{api}/metrics")).await;
    let unavailable: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("flashsale_order_requests_total") && l.contains("status=\"unavailable\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(unavailable >= 25.0, "shed buys not counted: {unavailable}");
    env.finish().await;
}
