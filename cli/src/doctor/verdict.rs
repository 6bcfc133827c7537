//! The verdict: each engine figure beside the raw limit it runs into, the
//! bottleneck, and the printed report.

use super::*;

/// The engine figures beside the raw limits, and what holds each back.
pub(super) fn verdicts(r: &DoctorReport) -> Vec<Verdict> {
    let accept_limit = r.raw(&format!("persistent publishes, {PUBLISH_WINDOW}"));
    let accept_limit_is = "RabbitMQ confirmed publishes".to_owned();
    let consume = r.raw("consume + ack");
    let insert = r.raw(&format!("idempotent inserts, {ENGINE_BATCH} rows"));
    let (drain_limit, drain_limit_is) = if consume <= insert {
        (consume, "RabbitMQ consume + ack".to_owned())
    } else {
        (
            insert,
            format!("PostgreSQL inserts at {ENGINE_BATCH} rows a transaction"),
        )
    };
    let verdict = |path, engine: f64, limit: f64, limit_is: String, goal: f64, own: &str| {
        let ratio = if limit > 0.0 { engine / limit } else { 0.0 };
        let bottleneck = if ratio >= goal {
            format!("{limit_is}: the engine runs close to it")
        } else {
            own.to_owned()
        };
        Verdict {
            path,
            engine,
            limit,
            limit_is,
            ratio,
            goal,
            bottleneck,
        }
    };
    vec![
        verdict(
            "durable accepts/s",
            r.engine.accepts_per_second,
            accept_limit,
            accept_limit_is,
            0.7,
            &format!(
                "the API's CPU per request (HTTP, JSON, two Redis round trips, the publish), shared with the load generator on {} cores",
                r.cores
            ),
        ),
        verdict(
            "drain, one hot product, orders/s",
            r.engine.drain_per_second,
            drain_limit,
            drain_limit_is,
            0.5,
            "the worker's per-batch work beyond the insert (lock and fence in Redis, stock update, decode, ack)",
        ),
    ]
}

fn number(n: f64) -> String {
    output::thousands(n)
}

pub(super) fn print(r: &DoctorReport) {
    println!(
        "{} cores; PostgreSQL {} (synchronous_commit {}); Redis {}",
        r.cores, r.postgres_version, r.synchronous_commit, r.redis_version
    );
    let mut t = output::table(&["component", "raw capacity", "rate"]);
    for c in &r.raw {
        t.add_row(vec![
            Cell::new(c.component),
            Cell::new(&c.measure),
            Cell::new(format!("{} {}", number(c.per_second), c.unit)),
        ]);
    }
    println!("{t}");
    let e = &r.engine;
    println!(
        "engine: {} durable accepts/s at c={CONCURRENCY} (p50 {}, p99 {}); one worker drained their {} orders at {} orders/s",
        number(e.accepts_per_second),
        crate::storm::printer::format_seconds(e.accept_p50_seconds),
        crate::storm::printer::format_seconds(e.accept_p99_seconds),
        number(e.accepted as f64),
        number(e.drain_per_second)
    );
    let mut t = output::table(&["engine path", "achieved", "limit", "ratio"]);
    for v in &r.verdicts {
        t.add_row(vec![
            Cell::new(v.path),
            Cell::new(number(v.engine)),
            Cell::new(format!("{} ({})", number(v.limit), v.limit_is)),
            output::verdict(
                v.ratio >= v.goal,
                &format!("{:.0}%", v.ratio * 100.0),
                &format!("{:.0}% (goal {:.0}%)", v.ratio * 100.0, v.goal * 100.0),
            ),
        ]);
    }
    println!("{t}");
    for v in &r.verdicts {
        println!("bottleneck of {}: {}", v.path, v.bottleneck);
    }
}
