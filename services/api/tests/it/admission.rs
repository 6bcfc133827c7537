//! Admission by stock tokens on the real services: a buyer who will not get
//! the item hears `409` at once, every unit still sells, and the counter
//! survives rejections, lost Redis state and a killed API.

use flashsale_testkit as common;
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// One buy whose answer may be a dropped connection (`None`), for storms
/// against an API that gets killed.
async fn try_buy(
    env: &common::TestEnv,
    base: &str,
    key: &str,
    body: &Value,
) -> Option<(u16, Value)> {
    let response = env
        .http
        .post(format!("{base}/buy"))
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.unwrap_or(Value::Null)))
}

/// One buy of a storm: its key, its body, and its answer (status, body),
/// `None` when the connection dropped.
type Sent = (String, Value, Option<(u16, Value)>);

/// `n` buys over `apis` (round robin) at `concurrency`: key, body, answer.
async fn storm(
    env: &common::TestEnv,
    apis: &[String],
    n: usize,
    concurrency: usize,
    body: impl Fn(usize) -> Value,
) -> Vec<Sent> {
    storm_counted(env, apis, n, concurrency, body, &AtomicUsize::new(0)).await
}

/// The same, counting the answers in `answered` as they come.
async fn storm_counted(
    env: &common::TestEnv,
    apis: &[String],
    n: usize,
    concurrency: usize,
    body: impl Fn(usize) -> Value,
    answered: &AtomicUsize,
) -> Vec<Sent> {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let key = format!("adm-{}-{i}", &tag[..8]);
            let body = body(i);
            let base = &apis[i % apis.len()];
            async move {
                let answer = try_buy(env, base, &key, &body).await;
                answered.fetch_add(1, Ordering::Relaxed);
                (key, body, answer)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

fn tally(answers: &[Sent]) -> HashMap<u16, usize> {
    let mut by_status = HashMap::new();
    for (_, _, a) in answers {
        *by_status
            .entry(a.as_ref().map_or(0, |(s, _)| *s))
            .or_default() += 1;
    }
    by_status
}

fn accepted(answers: &[Sent]) -> Vec<String> {
    answers
        .iter()
        .filter(|(_, _, a)| a.as_ref().is_some_and(|(s, _)| *s == 202))
        .map(|(k, _, _)| k.clone())
        .collect()
}

fn one_unit(i: usize) -> Value {
    json!({"userId": format!("buyer-{i}"), "productId": 1, "quantity": 1})
}

/// Buys one unit at a time (fresh buyers) until the product is sold out in
/// PostgreSQL, within `limit`; fails if it never is.
async fn sell_the_rest(env: &common::TestEnv, api: &str, limit: Duration) {
    let started = Instant::now();
    let mut i = 0;
    while env.stock(1).await > 0 {
        assert!(
            started.elapsed() < limit,
            "{} units never sold (counter: {:?})",
            env.stock(1).await,
            env.get_json(&format!("{api}/products/1")).await
        );
        let answer = env
            .buy(
                api,
                None,
                json!({"userId": format!("late-{i}"), "productId": 1, "quantity": 1}),
            )
            .await;
        i += 1;
        if answer.status != StatusCode::ACCEPTED {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_item_admits_no_more_buyers_than_units_over_two_apis() {
    let mut env = common::env().await;
    env.seed(1, 100, None).await;
    let apis = vec![env.start_api().await, env.start_api().await];
    for _ in 0..3 {
        env.start_worker().await;
    }
    let answers = storm(&env, &apis, 5000, 500, one_unit).await;
    let by_status = tally(&answers);
    let accepted = accepted(&answers);
    assert!(
        (100..=102).contains(&accepted.len()),
        "5,000 buyers of 100 units: {by_status:?}"
    );
    assert_eq!(
        by_status.get(&409).copied().unwrap_or(0),
        5000 - accepted.len(),
        "every other buyer is told sold out at once: {by_status:?}"
    );
    for (_, _, a) in &answers {
        if let Some((409, body)) = a {
            assert_eq!(body["reason"], "sold_out", "{body}");
        }
    }
    env.wait_for_rows(&accepted).await;
    assert_eq!(env.stock(1).await, 0, "every unit sells");
    env.assert_invariants().await;
    let metrics = env.get_text(&format!("{}/metrics", apis[0])).await;
    assert!(
        metrics.contains("flashsale_admission_tokens{product_id=\"1\"}"),
        "the counter is exported"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quantities_of_one_to_three_are_never_admitted_beyond_stock() {
    let mut env = common::env().await;
    env.seed(1, 100, None).await;
    let api = env.start_api().await;
    env.start_worker().await;
    env.start_worker().await;
    let units = |i: usize| (i % 3 + 1) as i64;
    let answers = storm(
        &env,
        std::slice::from_ref(&api),
        2000,
        200,
        |i| json!({"userId": format!("buyer-{i}"), "productId": 1, "quantity": units(i)}),
    )
    .await;
    let mut admitted_units = 0;
    for (_, body, answer) in &answers {
        let (status, answer) = answer.as_ref().expect("the API answers");
        let quantity = body["quantity"].as_i64().unwrap();
        match (*status, answer["reason"].as_str()) {
            (202, _) => admitted_units += quantity,
            (409, Some("sold_out")) => {}
            (409, Some("insufficient_stock")) => {
                let available = answer["available"].as_i64().unwrap();
                assert!((1..quantity).contains(&available), "{answer}");
            }
            other => panic!("unexpected answer {other:?}: {answer}"),
        }
    }
    assert!(
        admitted_units <= 103,
        "{admitted_units} units admitted of 100"
    );
    env.wait_for_rows(&accepted(&answers)).await;
    sell_the_rest(&env, &api, Duration::from_secs(20)).await;
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_rejection_gives_its_units_to_the_next_buyer() {
    let mut env = common::env().await;
    env.seed(1, 2, Some(1)).await;
    let api = env.start_api().await;
    env.start_worker().await;
    let mut keys = Vec::new();
    for _ in 0..2 {
        let a = env
            .buy(
                &api,
                None,
                json!({"userId": "greedy", "productId": 1, "quantity": 1}),
            )
            .await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
        keys.push(a.key);
    }
    // Both units are taken: the next buyer hears sold out at once.
    let next = json!({"userId": "next", "productId": 1, "quantity": 1});
    env.wait_for_rows(&keys).await;
    let rejected = env
        .count("SELECT count(*) FROM orders WHERE reason = 'per_user_limit'")
        .await;
    assert_eq!(rejected, 1);
    // The rejected order's unit went back on sale.
    let started = Instant::now();
    let got = loop {
        let a = env.buy(&api, None, next.clone()).await;
        if a.status == StatusCode::ACCEPTED || started.elapsed() > Duration::from_secs(5) {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(got.status, StatusCode::ACCEPTED, "{}", got.body);
    env.wait_for_rows(std::slice::from_ref(&got.key)).await;
    assert_eq!(env.stock(1).await, 0);
    env.assert_invariants().await;
    env.finish().await;
}

/// Returns once `answered` reaches `n`.
async fn after_answers(answered: &AtomicUsize, n: usize) {
    while answered.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Deletes every Redis key of the test's namespace: what the engine sees
/// when Redis loses its data.
async fn wipe_redis(env: &common::TestEnv) -> usize {
    let b = env.backends();
    let redis = flashsale_engine::redis_conn::connect(&b.redis_url)
        .await
        .unwrap();
    let keys = flashsale_engine::redis_conn::scan(&redis, &b.namespace().key_pattern())
        .await
        .unwrap();
    let mut conn = redis.clone();
    for chunk in keys.chunks(500) {
        redis::cmd("DEL")
            .arg(chunk)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    keys.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_state_lost_mid_sale_never_oversells_and_every_unit_sells() {
    let mut env = common::env().await;
    env.seed(1, 300, None).await;
    let api = env.start_api().await;
    for _ in 0..2 {
        env.start_worker().await;
    }
    let apis = vec![api.clone()];
    let answered = AtomicUsize::new(0);
    let storm = storm_counted(&env, &apis, 3000, 100, one_unit, &answered);
    let (answers, wiped) = tokio::join!(storm, async {
        after_answers(&answered, 200).await;
        wipe_redis(&env).await
    });
    assert!(wiped > 0, "nothing was wiped");
    let by_status = tally(&answers);
    for status in by_status.keys() {
        assert!([202, 409, 503].contains(status), "{by_status:?}");
    }
    env.wait_for_rows(&accepted(&answers)).await;
    sell_the_rest(&env, &api, Duration::from_secs(20)).await;
    env.assert_invariants().await;
    let rows = env.count("SELECT count(*) FROM orders").await;
    assert!(rows as usize >= accepted(&answers).len());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn units_taken_by_a_killed_api_come_back() {
    let mut env = common::env().await;
    env.seed(1, 200, None).await;
    let b = env.backends();
    let (mut child, doomed) = super::api_process(&env).await;
    env.start_worker().await;
    env.start_worker().await;

    let apis = vec![doomed];
    let answered = AtomicUsize::new(0);
    let storm = storm_counted(&env, &apis, 4000, 300, one_unit, &answered);
    let (answers, ()) = tokio::join!(storm, async {
        after_answers(&answered, 100).await;
        child.0.kill().unwrap();
    });
    let _ = child.0.wait();
    let accepted = accepted(&answers);
    let dropped = tally(&answers).get(&0).copied().unwrap_or(0);
    assert!(
        dropped > 0,
        "the API was killed mid-storm: {:?}",
        tally(&answers)
    );
    env.wait_for_rows(&accepted).await;

    // Drained: within 5 s the counter is back at the stock (the killed
    // process's claims are dead once its heartbeat expires).
    let drained = Instant::now();
    let redis = flashsale_engine::redis_conn::connect(&b.redis_url)
        .await
        .unwrap();
    loop {
        let mut conn = redis.clone();
        let tokens: Option<i64> = redis::cmd("GET")
            .arg(b.namespace().tokens_key(1))
            .query_async(&mut conn)
            .await
            .unwrap();
        let stock = i64::from(env.stock(1).await);
        if tokens == Some(stock) {
            break;
        }
        assert!(
            drained.elapsed() < Duration::from_secs(5),
            "counter {tokens:?}, stock {stock}, 5 s after the drain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every unit still sells through another API: what the killed process
    // had taken and never published comes back by reconciliation.
    let api = env.start_api().await;
    sell_the_rest(&env, &api, Duration::from_secs(30)).await;
    env.assert_invariants().await;
    env.finish().await;
}

/// A Redis server of the test's own on a free port, without persistence:
/// a restart loses everything, as the project's Redis does.
struct OwnRedis {
    port: u16,
    child: std::process::Child,
}

impl OwnRedis {
    fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test installs it)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, child }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_mid_sale_never_oversells_and_every_unit_sells() {
    let mut env = common::env().await;
    env.seed(1, 300, None).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let redis = OwnRedis::start(port);
    let mut backends = env.backends();
    backends.redis_url = redis.url();
    let api = env.start_api_with(backends.clone(), true).await;
    env.start_worker_with(backends.clone()).await;
    env.start_worker_with(backends).await;

    let apis = vec![api.clone()];
    let answered = AtomicUsize::new(0);
    let storm = storm_counted(&env, &apis, 3000, 100, one_unit, &answered);
    let counted = &answered;
    let restart = async move {
        after_answers(counted, 200).await;
        drop(redis);
        tokio::time::sleep(Duration::from_millis(300)).await;
        OwnRedis::start(port)
    };
    let (answers, _redis) = tokio::join!(storm, restart);
    let by_status = tally(&answers);
    for status in by_status.keys() {
        assert!([202, 409, 503].contains(status), "{by_status:?}");
    }
    assert!(
        by_status.contains_key(&503),
        "the restart came mid-storm: {by_status:?}"
    );
    env.wait_for_rows(&accepted(&answers)).await;
    sell_the_rest(&env, &api, Duration::from_secs(20)).await;
    env.assert_invariants().await;
    env.finish().await;
}

/// Issue 25, item 3: clients that send a buy and close their socket at
/// once (0.2–2 ms later) leak no units. Every buy that took units runs to
/// its end (published, or its units given back), so the honest buyers right
/// after get every unit the hang-ups did not buy, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_hang_up_mid_buy_leak_no_units() {
    let mut env = common::env().await;
    env.seed(1, 400, None).await;
    let api = env.start_api().await;
    env.start_worker().await;
    let addr = api.trim_start_matches("http://").to_owned();
    let hang_ups: Vec<_> = (0..300)
        .map(|i| {
            let addr = addr.clone();
            tokio::spawn(async move {
                let body = format!(r#"{{"userId":"gone{i}","productId":1,"quantity":1}}"#);
                let request = format!(
                    "POST /buy HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                     Idempotency-Key: gone-{i}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
                tokio::io::AsyncWriteExt::write_all(&mut tcp, request.as_bytes())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_micros(200 + (i % 10) * 200)).await;
                drop(tcp);
            })
        })
        .collect();
    for h in hang_ups {
        h.await.unwrap();
    }
    // Within a second of the hang-ups, honest buyers get every unit left.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let honest = storm(
        &env,
        std::slice::from_ref(&api),
        400,
        50,
        |i| json!({"userId": format!("honest{i}"), "productId": 1, "quantity": 1}),
    )
    .await;
    let accepted: Vec<String> = honest
        .iter()
        .filter(|(_, _, a)| a.as_ref().is_some_and(|(s, _)| *s == 202))
        .map(|(k, _, _)| k.clone())
        .collect();
    env.wait_for_rows(&accepted).await;
    // The hang-ups that were accepted are booked too; wait for the drain.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let booked = env
            .count("SELECT count(*) FROM orders WHERE status = 'confirmed'")
            .await;
        let gone = env
            .count("SELECT count(*) FROM orders WHERE user_id LIKE 'gone%'")
            .await;
        if booked as usize == accepted.len() + gone as usize && env.stock(1).await == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} honest buyers and {gone} hang-ups booked, {} units left: units withheld",
            accepted.len(),
            env.stock(1).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.assert_invariants().await;
    env.finish().await;
}

/// Issue 25, item 5 (contract v4, "A key is the truth"): once Redis has
/// forgotten a key, a buy reusing it with another body is not answered
/// `202` (its order would be thrown away); with the same body it is a
/// repeat. Neither takes units for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_booked_before_redis_forgot_it_is_never_accepted_for_another_body() {
    let mut env = common::env().await;
    env.seed(2, 10, None).await;
    env.seed(4, 10, None).await;
    let api = env.start_api().await;
    env.start_worker().await;
    let carol = json!({"userId": "carol", "productId": 2, "quantity": 1});
    let first = try_buy(&env, &api, "shared-key", &carol).await.unwrap();
    assert_eq!(first.0, 202, "{}", first.1);
    env.wait_for_rows(&["shared-key".to_owned()]).await;
    assert!(wipe_redis(&env).await > 0);
    let dave = json!({"userId": "dave", "productId": 4, "quantity": 1});
    let reused = try_buy(&env, &api, "shared-key", &dave).await.unwrap();
    assert_eq!(reused.0, 422, "{}", reused.1);
    assert_eq!(reused.1["error"]["code"], "idempotency_key_reused");
    let again = try_buy(&env, &api, "shared-key", &carol).await.unwrap();
    assert_eq!(again.0, 200, "{}", again.1);
    assert_eq!(again.1["userId"], "carol");
    assert_eq!(again.1["status"], "confirmed");
    // No unit of product 4 was kept: all ten still sell.
    let rest = storm(
        &env,
        std::slice::from_ref(&api),
        10,
        5,
        |i| json!({"userId": format!("b{i}"), "productId": 4, "quantity": 1}),
    )
    .await;
    assert!(
        rest.iter()
            .all(|(_, _, a)| a.as_ref().is_some_and(|(s, _)| *s == 202))
    );
    let view = env.get_json(&format!("{api}/orders/shared-key")).await;
    assert_eq!(
        (view["userId"].as_str(), view["productId"].as_i64()),
        (Some("carol"), Some(2))
    );
    env.assert_invariants().await;
    env.finish().await;
}
