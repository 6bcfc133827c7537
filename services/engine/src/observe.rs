//! What a running deployment looks like from outside: queue depths (passive
//! declares: no management plugin), workers (their heartbeats), product
//! locks, and the dead-letter queue (peeked, never consumed). `fsctl
//! inspect`, `verify` and `top` read through here.

use crate::broker::{self, BrokerError, REASON_HEADER};
use crate::config::Namespace;
use crate::redis_conn::timed;
use chrono::Utc;
use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use redis::aio::ConnectionManager;
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

/// Heartbeats older than this are from a worker that is gone.
pub const HEARTBEAT_TTL_SECONDS: f64 = 5.0;

/// How long a peek waits for the broker to count its dead letters ready again
/// (someone else may have consumed them meanwhile, so it cannot wait forever).
const PEEK_RETURN_WAIT: Duration = Duration::from_secs(2);

/// Ready messages and consumers of the order queue and the DLQ.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueView {
    pub orders_ready: u64,
    pub orders_consumers: u64,
    pub dlq_ready: u64,
    pub dlq_consumers: u64,
}

/// One worker, from its heartbeat.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerView {
    pub id: String,
    pub started_at: String,
    pub processed: u64,
    pub inflight: u64,
    pub product: Option<i64>,
    pub metrics_addr: String,
    pub last_beat_seconds: f64,
    pub alive: bool,
}

/// A product lock held now.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LockView {
    pub product_id: i64,
    pub holder: String,
    pub token: i64,
    pub ttl_ms: i64,
}

/// A message in the dead-letter queue.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub message_id: Option<String>,
    pub reason: Option<String>,
    pub body: String,
}

/// Counts of both queues, by passive declare on a connection of its own.
pub async fn queues(amqp_url: &str, ns: &Namespace) -> Result<QueueView, BrokerError> {
    let conn = broker::connect(amqp_url, "fsctl").await?;
    let result = async {
        let channel = conn.create_channel().await?;
        broker::declare_queues(&channel, ns).await?;
        let (orders_ready, orders_consumers) =
            broker::queue_stats(&channel, &ns.orders_queue()).await?;
        let (dlq_ready, dlq_consumers) =
            broker::queue_stats(&channel, &ns.dead_letter_queue()).await?;
        Ok::<_, lapin::Error>(QueueView {
            orders_ready: orders_ready.into(),
            orders_consumers: orders_consumers.into(),
            dlq_ready: dlq_ready.into(),
            dlq_consumers: dlq_consumers.into(),
        })
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    Ok(result?)
}

/// Keys matching `pattern`, by SCAN.
async fn scan(redis: &ConnectionManager, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let mut conn = redis.clone();
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = timed(
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn),
        )
        .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// Every worker with a heartbeat, oldest id first.
pub async fn workers(
    redis: &ConnectionManager,
    ns: &Namespace,
) -> redis::RedisResult<Vec<WorkerView>> {
    let mut conn = redis.clone();
    let now_ms = Utc::now().timestamp_millis();
    let mut out = Vec::new();
    for key in scan(redis, &ns.worker_key("*")).await? {
        let beat: HashMap<String, String> =
            timed(redis::cmd("HGETALL").arg(&key).query_async(&mut conn)).await?;
        if beat.is_empty() {
            continue;
        }
        let field = |k: &str| beat.get(k).cloned().unwrap_or_default();
        let beat_at: i64 = field("beatAt").parse().unwrap_or(0);
        let age = (now_ms - beat_at).max(0) as f64 / 1000.0;
        out.push(WorkerView {
            id: field("id"),
            started_at: field("startedAt"),
            processed: field("processed").parse().unwrap_or(0),
            inflight: field("inflight").parse().unwrap_or(0),
            product: field("product").parse().ok(),
            metrics_addr: field("metricsAddr"),
            last_beat_seconds: age,
            alive: age <= HEARTBEAT_TTL_SECONDS,
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Every product lock held now, by product.
pub async fn locks(redis: &ConnectionManager, ns: &Namespace) -> redis::RedisResult<Vec<LockView>> {
    let mut conn = redis.clone();
    let prefix = ns.lock_key(0);
    let prefix = prefix.trim_end_matches('0');
    let mut out = Vec::new();
    for key in scan(redis, &format!("{prefix}*")).await? {
        let (value, ttl): (Option<String>, i64) = timed(
            redis::pipe()
                .cmd("GET")
                .arg(&key)
                .cmd("PTTL")
                .arg(&key)
                .query_async(&mut conn),
        )
        .await?;
        let Some(value) = value else { continue };
        let (holder, token) = value.rsplit_once(':').unwrap_or((&value, "0"));
        out.push(LockView {
            product_id: key[prefix.len()..].parse().unwrap_or(0),
            holder: holder.to_owned(),
            token: token.parse().unwrap_or(0),
            ttl_ms: ttl,
        });
    }
    out.sort_by_key(|l| l.product_id);
    Ok(out)
}

/// The first `limit` dead letters, read without consuming them: they are
/// taken unacked, handed back with one requeueing nack, and the peek returns
/// only once the broker counts them ready again (a quorum queue requeues
/// asynchronously; without the wait, a peek right after this one could find
/// the queue empty).
pub async fn peek_dead_letters(
    amqp_url: &str,
    ns: &Namespace,
    limit: usize,
) -> Result<Vec<DeadLetter>, BrokerError> {
    let conn = broker::connect(amqp_url, "fsctl").await?;
    let result = async {
        let channel = conn.create_channel().await?;
        broker::declare_queues(&channel, ns).await?;
        let dlq = ns.dead_letter_queue();
        let (ready_before, _) = broker::queue_stats(&channel, &dlq).await?;
        let mut out = Vec::new();
        let mut last_tag = None;
        while out.len() < limit {
            let got = channel
                .basic_get(
                    ns.dead_letter_queue().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await?;
            let Some(got) = got else { break };
            let d = got.delivery;
            last_tag = Some(d.delivery_tag);
            // Our own reason, or RabbitMQ's (`delivery_limit`) for the queue's own.
            let reason = d.properties.headers().as_ref().and_then(|h| {
                let h = h.inner();
                h.get(REASON_HEADER)
                    .or_else(|| h.get("x-first-death-reason"))
                    .and_then(text)
            });
            out.push(DeadLetter {
                message_id: d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_owned()),
                reason,
                body: String::from_utf8_lossy(&d.data).into_owned(),
            });
        }
        if let Some(tag) = last_tag {
            let all_back = BasicNackOptions {
                multiple: true,
                requeue: true,
            };
            channel.basic_nack(tag, all_back).await?;
            let deadline = tokio::time::Instant::now() + PEEK_RETURN_WAIT;
            while broker::queue_stats(&channel, &dlq).await?.0 < ready_before
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok::<_, lapin::Error>(out)
    }
    .await;
    let _ = conn.close(200, "peeked".into()).await;
    Ok(result?)
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Drained: no ready order messages and no live worker holding a delivery.
pub fn is_drained(queues: &QueueView, workers: &[WorkerView]) -> bool {
    queues.orders_ready == 0 && workers.iter().filter(|w| w.alive).all(|w| w.inflight == 0)
}
