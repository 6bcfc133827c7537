//! `fsctl doctor --quick` against the real services: every figure measured,
//! and nothing left behind.

use flashsale_engine::queue::rabbitmq as broker;
use flashsale_engine::{redis_conn, scratch};
use flashsale_testkit::servers;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_measures_every_component_and_leaves_nothing_behind() {
    let s = servers();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fsctl"))
        .args(["doctor", "--quick", "--json"])
        .env("DATABASE_URL", &s.database_url)
        .env("REDIS_URL", &s.redis_url)
        .env("AMQP_URL", &s.amqp_url)
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let raw = r["raw"].as_array().unwrap();
    for (component, measures) in [("RabbitMQ", 3), ("PostgreSQL", 6), ("Redis", 3)] {
        let found: Vec<&Value> = raw.iter().filter(|c| c["component"] == component).collect();
        assert_eq!(found.len(), measures, "{component}: {found:?}");
        for c in found {
            assert!(c["perSecond"].as_f64().unwrap() > 0.0, "{c}");
        }
    }
    let engine = &r["engine"];
    assert!(engine["acceptsPerSecond"].as_f64().unwrap() > 0.0);
    assert!(engine["accepted"].as_u64().unwrap() > 0);
    assert!(engine["drainPerSecond"].as_f64().unwrap() > 0.0);
    let verdicts = r["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 2);
    for v in verdicts {
        assert!(v["ratio"].as_f64().unwrap() > 0.0, "{v}");
        assert!(!v["bottleneck"].as_str().unwrap().is_empty());
    }

    // Nothing left: no database, no key, no queue of the scratch deployment.
    let name = r["scratch"].as_str().unwrap();
    assert!(name.starts_with(scratch::SCRATCH_PREFIX));
    let admin = sqlx::PgPool::connect(&scratch::with_database(&s.database_url, "postgres"))
        .await
        .unwrap();
    let databases: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(databases, 0, "scratch database {name} left behind");
    let mut redis = redis_conn::connect(&s.redis_url).await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{name}:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(keys.is_empty(), "keys left behind: {keys:?}");
    let conn = broker::connect(&s.amqp_url, "doctor-test").await.unwrap();
    for queue in [format!("{name}.orders"), format!("{name}.orders.dlq")] {
        let channel = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await;
        assert!(declared.is_err(), "queue {queue} left behind");
    }
    let _ = conn.close(200, "done".into()).await;
}
