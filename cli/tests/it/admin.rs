//! `fsctl migrate`, `seed`, `verify` and `inspect` as an operator runs them,
//! against the real services with the API and workers running.

use super::{code, json};
use flashsale_engine::ProductId;
use flashsale_engine::locks::{ProductLock, ProductLocks};
use flashsale_engine::redis_conn;
use flashsale_testkit::{TestEnv, env};
use reqwest::StatusCode;
use std::process::Output;
use std::time::Duration;

/// `fsctl ARGS` against the test environment.
fn fsctl(env: &TestEnv, args: &[&str]) -> Output {
    super::fsctl(&env.backends(), args).output().unwrap()
}

fn accepted_file(keys: &[String]) -> tempfile_path::Path {
    tempfile_path::Path::with(keys.join("\n"))
}

mod tempfile_path {
    /// A file removed when dropped.
    pub struct Path(pub std::path::PathBuf);
    impl Path {
        pub fn with(content: String) -> Self {
            let p = std::env::temp_dir().join(format!("fsctl-{}.txt", uuid::Uuid::new_v4()));
            std::fs::write(&p, content).unwrap();
            Self(p)
        }
        pub fn arg(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed_storm_verify_holds_and_counts_what_the_database_holds() {
    let mut env = env().await;
    let out = fsctl(&env, &["migrate", "--json"]);
    assert_eq!(code(&out), 0);
    assert_eq!(json(&out)["ok"], true);
    let out = fsctl(
        &env,
        &["seed", "--products", "2", "--stock", "50", "--json"],
    );
    assert_eq!(code(&out), 0, "{out:?}");
    assert_eq!(json(&out)["created"], 2);
    let again = fsctl(
        &env,
        &["seed", "--products", "3", "--stock", "50", "--json"],
    );
    assert_eq!(json(&again)["created"], 1);
    assert_eq!(json(&again)["leftAlone"], 2);
    assert_eq!(code(&fsctl(&env, &["verify"])), 0);

    let api = env.start_api().await;
    env.start_worker().await;
    env.start_worker().await;
    let answers = env.storm(&api, 1, 300, 50, |i| format!("b{i}")).await;
    let keys: Vec<String> = answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .map(|a| a.key.clone())
        .collect();
    let file = accepted_file(&keys);
    let out = fsctl(
        &env,
        &[
            "verify",
            "--accepted",
            file.arg(),
            "--wait-drain",
            "30s",
            "--json",
        ],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));
    let report = json(&out);
    for key in [
        "ok",
        "drained",
        "products",
        "violations",
        "pending",
        "lost",
        "dlq",
    ] {
        assert!(report.get(key).is_some(), "verify --json lacks {key}");
    }
    assert_eq!(report["ok"], true);
    assert_eq!(report["lost"], 0);
    let confirmed = env
        .count("SELECT COALESCE(SUM(quantity), 0)::bigint FROM orders WHERE status = 'confirmed' AND product_id = 1")
        .await;
    assert_eq!(report["products"][0]["confirmedUnits"], confirmed);
    assert_eq!(confirmed, 50);
    for key in [
        "id",
        "seededStock",
        "stock",
        "confirmedUnits",
        "rejectedOrders",
        "ok",
    ] {
        assert!(
            report["products"][0].get(key).is_some(),
            "product lacks {key}"
        );
    }
    let table = fsctl(&env, &["verify"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("ledger exact"), "{text}");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_names_a_corrupted_product_and_a_lost_order() {
    let env = env().await;
    assert_eq!(
        code(&fsctl(&env, &["seed", "--products", "2", "--stock", "10"])),
        0
    );
    sqlx::query("UPDATE products SET stock = stock - 1 WHERE id = 2")
        .execute(&env.pool)
        .await
        .unwrap();
    let out = fsctl(&env, &["verify", "--json"]);
    assert_eq!(code(&out), 1);
    let v = &json(&out)["violations"][0];
    assert_eq!(v["invariant"], 1);
    assert_eq!(v["productId"], 2);
    let text = String::from_utf8_lossy(&fsctl(&env, &["verify"]).stdout).into_owned();
    assert!(text.contains("VIOLATED invariant 1 on product 2"), "{text}");

    sqlx::query("UPDATE products SET stock = stock + 1 WHERE id = 2")
        .execute(&env.pool)
        .await
        .unwrap();
    let file = accepted_file(&["ghost-order-1".to_owned()]);
    let out = fsctl(&env, &["verify", "--accepted", file.arg(), "--json"]);
    assert_eq!(code(&out), 1);
    let report = json(&out);
    assert_eq!(report["lost"], 1);
    assert_eq!(report["violations"][0]["invariant"], 4);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reset_restock_and_the_refusal_while_not_drained() {
    let mut env = env().await;
    assert_eq!(
        code(&fsctl(&env, &["seed", "--products", "1", "--stock", "10"])),
        0
    );
    let api = env.start_api().await;
    env.start_worker().await;
    let answers = env.storm(&api, 1, 20, 10, |i| format!("r{i}")).await;
    let keys: Vec<String> = answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .map(|a| a.key.clone())
        .collect();
    assert_eq!(keys.len(), 10, "admitted as many as there are units");
    env.wait_for_rows(&keys).await;

    let out = fsctl(
        &env,
        &[
            "seed",
            "--products",
            "1",
            "--stock",
            "10",
            "--reset",
            "--json",
        ],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&out)["ordersDeleted"], 10);
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);
    assert_eq!(env.stock(1).await, 10);
    assert_eq!(code(&fsctl(&env, &["verify"])), 0);
    // The reset key is answered afresh, not as a repeat.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let again = env
        .buy(
            &api,
            Some(&keys[0]),
            serde_json::json!({"userId": "r0", "productId": 1, "quantity": 1}),
        )
        .await;
    assert_eq!(again.status, StatusCode::ACCEPTED);

    // Restock while a storm runs: invariant 1 holds throughout.
    let storm = env.storm(&api, 1, 200, 20, |i| format!("s{i}"));
    let restocks = async {
        for _ in 0..5 {
            let out = fsctl(
                &env,
                &["seed", "--products", "1", "--stock", "5", "--restock"],
            );
            assert_eq!(code(&out), 0);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (answers, ()) = tokio::join!(storm, restocks);
    let keys: Vec<String> = answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .map(|a| a.key.clone())
        .collect();
    env.wait_for_rows(&keys).await;
    let out = fsctl(&env, &["verify", "--wait-drain", "20s"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));
    let seeded: i32 = sqlx::query_scalar("SELECT seeded_stock FROM products WHERE id = 1")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(seeded, 35);

    // Not drained: a message nobody consumes.
    env.stop_workers().await;
    env.publish_raw("waiting-1", br#"{"orderId":"waiting-1","userId":"u","productId":1,"quantity":1,"acceptedAt":"2026-01-01T00:00:00Z"}"#)
        .await;
    let out = fsctl(
        &env,
        &["seed", "--products", "1", "--stock", "10", "--reset"],
    );
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing"));
    let out = fsctl(
        &env,
        &[
            "seed",
            "--products",
            "1",
            "--stock",
            "10",
            "--reset",
            "--force",
        ],
    );
    assert_eq!(code(&out), 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inspect_shows_workers_locks_and_dead_letters() {
    let mut env = env().await;
    assert_eq!(
        code(&fsctl(&env, &["seed", "--products", "1", "--stock", "10"])),
        0
    );
    env.publish_raw("poison-1", b"not an order").await;
    env.start_worker().await;
    // The worker dead-letters the poison message (and beats) on its own time.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let out = fsctl(&env, &["inspect", "queue", "--json"]);
        if json(&out)["queue"]["dlq"] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the poison message never reached the DLQ"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let out = fsctl(&env, &["inspect", "workers", "--json"]);
    assert_eq!(code(&out), 0);
    let workers = json(&out)["workers"].as_array().unwrap().clone();
    assert_eq!(workers.len(), 1);
    for key in [
        "id",
        "startedAt",
        "processed",
        "inflight",
        "product",
        "lastBeatSeconds",
        "alive",
    ] {
        assert!(workers[0].get(key).is_some(), "worker lacks {key}");
    }
    assert_eq!(workers[0]["id"], "test-worker-0");
    assert_eq!(workers[0]["alive"], true);

    for _ in 0..5 {
        let out = fsctl(&env, &["inspect", "dlq", "--json"]);
        assert_eq!(code(&out), 0);
        let dlq = json(&out)["dlq"].clone();
        assert_eq!(dlq["count"], 1, "peeking consumed the dead letter: {dlq}");
        assert_eq!(dlq["messages"][0]["messageId"], "poison-1");
        assert!(
            dlq["messages"][0]["reason"]
                .as_str()
                .unwrap()
                .contains("undecodable")
        );
    }
    let out = fsctl(&env, &["inspect", "order", "poison-1", "--json"]);
    assert_eq!(json(&out)["order"]["location"], "dead_lettered");

    let redis = redis_conn::connect(&env.backends().redis_url)
        .await
        .unwrap();
    let lock = ProductLock::new(redis, env.backends().namespace(), "the-test");
    let held = lock
        .try_acquire(ProductId::new(1).unwrap())
        .await
        .unwrap()
        .unwrap();
    let out = fsctl(&env, &["inspect", "locks", "--json"]);
    let locks = json(&out)["locks"].clone();
    assert_eq!(locks[0]["productId"], 1);
    assert_eq!(locks[0]["holder"], "the-test");
    assert_eq!(locks[0]["token"], held.token.0);
    lock.release(&held).await.unwrap();

    let out = fsctl(&env, &["inspect", "queue", "--json"]);
    let q = json(&out)["queue"].clone();
    assert_eq!(q["consumers"], 1);
    assert_eq!(q["dlq"], 1);
    let out = fsctl(&env, &["inspect", "product", "1", "--json"]);
    assert_eq!(json(&out)["product"]["stock"], 10);
    // No product with holds yet; then one held order of product 9.
    let out = fsctl(&env, &["inspect", "holds", "--json"]);
    assert_eq!(code(&out), 0);
    assert_eq!(json(&out)["holds"], serde_json::json!([]));
    sqlx::raw_sql(
        "INSERT INTO products (id, name, stock, seeded_stock, hold_seconds) VALUES (9, 'held', 4, 5, 60);
         INSERT INTO orders (idempotency_key, user_id, product_id, quantity, status,
                             accepted_at, processed_at, held_until)
         VALUES ('held-1', 'u', 9, 1, 'held', now(), now(), now() + interval '60 seconds')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let out = fsctl(&env, &["inspect", "holds", "--json"]);
    let holds = json(&out)["holds"].clone();
    assert_eq!(holds[0]["productId"], 9, "{holds}");
    assert_eq!(
        (holds[0]["heldUnits"].clone(), holds[0]["overdue"].clone()),
        (serde_json::json!(1), serde_json::json!(0))
    );
    assert!(
        holds[0]["nextExpirySeconds"].as_f64().unwrap() > 50.0,
        "{holds}"
    );
    // One standalone Redis: one master with every slot.
    let out = fsctl(&env, &["inspect", "redis", "--json"]);
    let view = json(&out);
    assert_eq!(view["cluster"], false);
    assert_eq!(view["masters"].as_array().unwrap().len(), 1, "{view}");
    assert_eq!(view["masters"][0]["slots"], 16384);
    assert!(view["masters"][0]["keys"].as_i64().unwrap() > 0, "{view}");

    // A killed worker's heartbeat outlives it by its TTL, then it is gone.
    env.kill_workers().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let out = fsctl(&env, &["inspect", "workers", "--json"]);
    assert!(json(&out)["workers"].as_array().unwrap().is_empty());
    // With no worker sweeping, a hold left 10 s past its expiry: verify
    // says so (invariant 7) and exits 1.
    sqlx::query(
        "UPDATE orders SET held_until = now() - interval '10 seconds' WHERE idempotency_key = 'held-1'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let out = fsctl(&env, &["verify", "--json"]);
    assert_eq!(code(&out), 1, "{}", String::from_utf8_lossy(&out.stdout));
    let violations = json(&out)["violations"].clone();
    assert!(
        violations
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["invariant"] == 7 && v["productId"] == 9),
        "{violations}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_components_and_bad_values_exit_2_with_one_line() {
    let env = env().await;
    let cases: [(&str, &[&str], &str); 3] = [
        (
            "PostgreSQL",
            &[
                "--database-url",
                "postgres://postgres@127.0.0.1:1/x",
                "verify",
            ],
            "127.0.0.1:1",
        ),
        (
            "Redis",
            &["--redis-url", "redis://127.0.0.1:1", "inspect", "workers"],
            "127.0.0.1:1",
        ),
        (
            "RabbitMQ",
            &[
                "--amqp-url",
                "amqp://guest:secret@127.0.0.1:1/%2f",
                "inspect",
                "queue",
            ],
            "127.0.0.1:1",
        ),
    ];
    for (component, args, url) in cases {
        let out = fsctl(&env, args);
        assert_eq!(code(&out), 2, "{component}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(component) && stderr.contains(url),
            "{stderr}"
        );
        assert!(!stderr.contains("secret"));
    }
    for bad in [
        &["seed", "--products", "0", "--stock", "5"][..],
        &["seed", "--products", "2", "--stock", "-1"],
        &[
            "seed",
            "--products",
            "2",
            "--stock",
            "5",
            "--max-per-order",
            "0",
        ],
    ] {
        let out = fsctl(&env, bad);
        assert_eq!(code(&out), 2, "{bad:?}");
    }
    assert_eq!(
        env.count("SELECT count(*) FROM products").await,
        0,
        "bad seed wrote"
    );
    let out = fsctl(&env, &["completions", "bash"]);
    assert_eq!(code(&out), 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("fsctl"));
    env.finish().await;
}

/// The product's admission counter as `fsctl inspect product` shows it.
fn counter(env: &TestEnv, id: &str) -> serde_json::Value {
    let out = fsctl(env, &["inspect", "product", id, "--json"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    json(&out)["product"]["admissionTokens"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restock_reopens_at_once_reset_restores_and_verify_warns_of_a_wrong_counter() {
    let mut env = env().await;
    assert_eq!(
        code(&fsctl(&env, &["seed", "--products", "1", "--stock", "3"])),
        0
    );
    assert_eq!(counter(&env, "1"), 3, "seeding sets the counter");
    let api = env.start_api().await;
    env.start_worker().await;
    let answers = env.storm(&api, 1, 20, 10, |i| format!("a{i}")).await;
    let accepted: Vec<String> = answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .map(|a| a.key.clone())
        .collect();
    assert_eq!(accepted.len(), 3, "three units, three buyers admitted");
    env.wait_for_rows(&accepted).await;
    assert_eq!(counter(&env, "1"), 0);

    // A counter gone wrong is a warning (exit 0), and the workers'
    // reconciliation sets it right.
    let b = env.backends();
    let redis = redis_conn::connect(&b.redis_url).await.unwrap();
    let mut conn = redis.clone();
    redis::cmd("SET")
        .arg(b.namespace().tokens_key(1))
        .arg(50)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let out = fsctl(&env, &["verify", "--json"]);
    assert_eq!(code(&out), 0, "a warning changes no exit code");
    let report = json(&out);
    assert_eq!(report["warnings"][0]["productId"], 1, "{report}");
    assert_eq!(report["warnings"][0]["tokens"], 50, "{report}");
    let started = std::time::Instant::now();
    while counter(&env, "1") != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "never reconciled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = fsctl(&env, &["verify", "--json"]);
    assert_eq!(json(&out)["warnings"], serde_json::json!([]));

    // --restock reopens the sold-out product within a second.
    let out = fsctl(
        &env,
        &["seed", "--products", "1", "--stock", "2", "--restock"],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let restocked = std::time::Instant::now();
    let body = serde_json::json!({"userId": "back", "productId": 1, "quantity": 1});
    loop {
        let a = env.buy(&api, None, body.clone()).await;
        if a.status == StatusCode::ACCEPTED {
            break;
        }
        assert!(
            restocked.elapsed() < Duration::from_secs(1),
            "still {} a second after the restock: {}",
            a.status,
            a.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let more = env.storm(&api, 1, 10, 5, |i| format!("b{i}")).await;
    let admitted = more
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .count();
    assert_eq!(admitted, 1, "two units restocked, two buyers in all");

    // --reset restores it.
    let keys: Vec<String> = more
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .map(|a| a.key.clone())
        .collect();
    env.wait_for_rows(&keys).await;
    let out = fsctl(
        &env,
        &["seed", "--products", "1", "--stock", "4", "--reset"],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(counter(&env, "1"), 4);
    assert_eq!(code(&fsctl(&env, &["verify"])), 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_changes_the_partitions_only_when_drained() {
    let mut env = env().await;
    let out = fsctl(&env, &["migrate", "--json"]);
    assert_eq!(json(&out)["partitions"], 1, "recorded on first use");
    env.seed(1, 10, None).await;
    env.publish_raw(
        "waiting-1",
        br#"{"orderId":"waiting-1","userId":"u","productId":1,"quantity":1,"acceptedAt":"2026-01-01T00:00:00Z"}"#,
    )
    .await;
    let out = fsctl(&env, &["migrate", "--partitions", "3"]);
    assert_eq!(code(&out), 3, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not changing the partitions from 1 to 3")
    );
    assert_eq!(json(&fsctl(&env, &["migrate", "--json"]))["partitions"], 1);

    env.start_worker().await;
    env.wait_for_rows(&["waiting-1".to_owned()]).await;
    env.stop_workers().await;
    let out = fsctl(&env, &["migrate", "--partitions", "3", "--json"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&out)["partitions"], 3);
    // Without --partitions, fsctl reads the recorded count: every partition shows.
    let out = fsctl(&env, &["inspect", "queue", "--json"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let partitions = json(&out)["queue"]["partitions"].clone();
    assert_eq!(partitions.as_array().unwrap().len(), 3, "{partitions}");
    assert_eq!(
        partitions[2]["queue"],
        format!("{}.orders.2", env.backends().namespace)
    );
    env.finish().await;
}
