//! `fsctl inspect queue`.

use super::*;
use flashsale_engine::queue;
use serde::Serialize;

/// The order queue and the DLQ (`--json`: `{"queue": ...}`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct QueueReport<'a> {
    /// The order queue's name (its partitions' prefix).
    queue: String,
    ready: u64,
    consumers: u64,
    /// Deliveries the workers hold (the sum of their heartbeats' `inflight`).
    inflight: u64,
    dlq: u64,
    dlq_consumers: u64,
    drained: bool,
    partitions: &'a [queue::PartitionView],
}

/// Each order queue, the DLQ and the deliveries workers hold.
pub async fn show(b: &BackendUrls, ns: &Namespace, as_json: bool) -> Result<(), Failure> {
    let redis = backends::redis(b).await?;
    let q = queue::queues(&b.amqp_url, ns).await?;
    let workers = heartbeat::workers(&redis, ns).await?;
    let inflight = queue::held_by_workers(&workers);
    let drained = queue::is_drained(&q, &workers);
    if as_json {
        let report = QueueReport {
            queue: ns.orders_queue(),
            ready: q.orders_ready,
            consumers: q.orders_consumers,
            inflight,
            dlq: q.dlq_ready,
            dlq_consumers: q.dlq_consumers,
            drained,
            partitions: &q.partitions,
        };
        output::json(&json!({ "queue": report }));
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
    Ok(())
}
