//! `fsctl verify`: proves the books. Checks the contract's invariants 1–5 in
//! PostgreSQL, reports the dead-letter queue (6), and with `--accepted`
//! accounts for every order answered `202`.

use crate::backends;
use crate::exit::{Failure, OK, Outcome, PENDING, VIOLATION};
use crate::output;
use clap::Args;
use comfy_table::Cell;
use flashsale_engine::accept_log::RedisAcceptLog;
use flashsale_engine::admission::AdmissionCounters;
use flashsale_engine::audit::{AuditReport, ProductBooks, QueueFacts};
use flashsale_engine::ledger::Ledger;
use flashsale_engine::{BackendUrls, ProductId, heartbeat, queue};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Most dead letters read to match `--accepted` ids against.
const DLQ_SCAN_LIMIT: usize = 10_000;

#[derive(Debug, Args)]
#[command(
    after_help = "Checks, from PostgreSQL: 1 seeded = stock + confirmed units, per product;
2 stock >= 0; 3 one row per order id; 5 nobody over the per-user limit.
With --accepted FILE (order ids answered 202, one a line): 4 each has exactly
one row or sits in the DLQ; while orders are still in flight (ready messages
in RabbitMQ, or deliveries held per the workers' heartbeats) a missing one
is pending, once drained it is lost. 6: the DLQ's size is reported.
A product's admission counter further from its stock than the units in
flight explain is reported as a warning (it changes no exit code).

Examples:
  fsctl verify
  fsctl verify --accepted accepted.txt --wait-drain 60s --json

Exit codes: 0 all hold; 1 a violation or a lost order; 2 a component could
not be reached; 3 orders still pending when the wait ran out."
)]
pub struct VerifyArgs {
    /// Order ids answered 202, one a line: each must end as a row or in the DLQ.
    #[arg(long)]
    pub accepted: Option<PathBuf>,
    /// First wait up to this long for the drain (e.g. 60s, 500ms, 2m).
    #[arg(long, value_parser = parse_duration)]
    pub wait_drain: Option<Duration>,
    /// One JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

pub use flashsale_engine::config::parse_duration;

/// Queue facts for the audit: drained or not, and the DLQ's contents.
pub async fn queue_facts(b: &BackendUrls) -> Result<QueueFacts, Failure> {
    let ns = b.namespace();
    let redis = backends::redis(b).await?;
    let queues = queue::queues(&b.amqp_url, &ns).await?;
    let workers = heartbeat::workers(&redis, &ns).await?;
    let dlq_ids = if queues.dlq_ready > 0 {
        queue::peek_dead_letters(&b.amqp_url, &ns, DLQ_SCAN_LIMIT)
            .await?
            .into_iter()
            .filter_map(|d| d.message_id)
            .collect()
    } else {
        Default::default()
    };
    Ok(QueueFacts {
        drained: queue::is_drained(&queues, &workers),
        dlq_count: queues.dlq_ready,
        dlq_ids,
    })
}

pub async fn run(b: &BackendUrls, args: &VerifyArgs) -> Outcome {
    let accepted = match &args.accepted {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        ),
        None => None,
    };
    let ledger = backends::ledger(b).await?;
    let mut facts = queue_facts(b).await?;
    if let Some(wait) = args.wait_drain {
        let spinner = output::spinner(!args.json);
        let started = Instant::now();
        // Drained at two looks DRAIN_CONFIRM apart: a delivery sent to a
        // worker just after its last heartbeat shows in its next one.
        let mut confirmed = false;
        while !confirmed && started.elapsed() < wait {
            spinner.set_message(format!(
                "waiting for the drain ({:.0}s)",
                started.elapsed().as_secs_f64()
            ));
            let pause = if facts.drained {
                flashsale_engine::queue::DRAIN_CONFIRM
            } else {
                Duration::from_millis(250)
            };
            let was_drained = facts.drained;
            tokio::time::sleep(pause).await;
            facts = queue_facts(b).await?;
            confirmed = was_drained && facts.drained;
        }
        spinner.finish_and_clear();
    }
    let report = ledger.audit(accepted.as_deref(), &facts).await?;
    let warnings = counter_warnings(b, &report.products).await?;
    if args.json {
        let mut doc = serde_json::to_value(&report)?;
        doc["warnings"] = json!(warnings);
        output::json(&doc);
    } else {
        print_report(&report);
        for w in &warnings {
            println!("warning: product {}: {}", w.product_id, w.detail);
        }
    }
    Ok(exit_code(&report))
}

/// An admission counter further from the stock than the units in flight
/// explain: buyers are told "sold out" too early (or admitted beyond the
/// stock, to be rejected later). Not an invariant: PostgreSQL stays exact;
/// the workers' reconciliation sets it right once the orders settle.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CounterWarning {
    pub product_id: i64,
    pub tokens: i64,
    pub stock: i64,
    pub in_flight: i64,
    pub detail: String,
}

async fn counter_warnings(
    b: &BackendUrls,
    products: &[ProductBooks],
) -> Result<Vec<CounterWarning>, Failure> {
    let log = RedisAcceptLog::new(backends::redis(b).await?, b.namespace());
    // A row whose id is not a product id has no counter.
    let products: Vec<(ProductId, &ProductBooks)> = products
        .iter()
        .filter_map(|p| Some((ProductId::new(p.id).ok()?, p)))
        .collect();
    let ids: Vec<ProductId> = products.iter().map(|(id, _)| *id).collect();
    let counters = log.tokens(&ids).await?;
    let mut warnings = Vec::new();
    for ((id, p), counter) in products.iter().zip(counters) {
        let Some(tokens) = counter.filter(|t| *t != p.stock) else {
            continue;
        };
        let admission = log.admission(*id).await?;
        let in_flight: i64 = admission.admitted.iter().map(|(_, q)| q).sum();
        if (tokens - p.stock).abs() > in_flight {
            warnings.push(CounterWarning {
                product_id: p.id,
                tokens,
                stock: p.stock,
                in_flight,
                detail: format!(
                    "admission counter {tokens} is off the stock {} by more than the {in_flight} units in flight",
                    p.stock
                ),
            });
        }
    }
    Ok(warnings)
}

pub fn exit_code(report: &AuditReport) -> u8 {
    if !report.violations.is_empty() || report.lost > 0 {
        VIOLATION
    } else if report.pending > 0 {
        PENDING
    } else {
        OK
    }
}

pub fn print_report(report: &AuditReport) {
    // Held units get a column when any product has some.
    let holds = report.products.iter().any(|p| p.held_units > 0);
    let mut header = vec!["product", "seeded", "stock", "confirmed units"];
    if holds {
        header.push("held units");
    }
    header.extend(["rejected orders", "books"]);
    let mut t = output::table(&header);
    for p in &report.products {
        let mut row = vec![
            Cell::new(p.id),
            Cell::new(p.seeded_stock),
            Cell::new(p.stock),
            Cell::new(p.confirmed_units),
        ];
        if holds {
            row.push(Cell::new(p.held_units));
        }
        row.extend([
            Cell::new(p.rejected_orders),
            output::verdict(p.ok, "OK", "VIOLATED"),
        ]);
        t.add_row(row);
    }
    println!("{t}");
    for v in &report.violations {
        match v.product_id {
            Some(id) => println!(
                "VIOLATED invariant {} on product {id}: {}",
                v.invariant, v.detail
            ),
            None => println!("VIOLATED invariant {}: {}", v.invariant, v.detail),
        }
    }
    println!(
        "{}; {} pending, {} lost, {} in the dead-letter queue; {}",
        if report.ok {
            "ledger exact"
        } else {
            "ledger VIOLATED"
        },
        report.pending,
        report.lost,
        report.dlq,
        if report.drained {
            "drained"
        } else {
            "orders still in flight"
        },
    );
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
