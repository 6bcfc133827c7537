//! What a running deployment looks like from outside: queue depths (passive
//! declares: no management plugin), workers (their heartbeats), product
//! locks, and the dead-letter queue (peeked: nothing is lost or hidden).
//! `fsctl inspect`, `verify` and `top` read through here.

use crate::config::Namespace;
use crate::queue::rabbitmq::{self as broker, BrokerError, REASON_HEADER};
use crate::redis_conn::timed;
use chrono::Utc;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use redis::aio::ConnectionManager;
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

/// Heartbeats older than this are from a worker that is gone.
pub const HEARTBEAT_TTL_SECONDS: f64 = 5.0;

/// How long a peek waits for another peek of the same DLQ to finish.
const PEEK_TURN_WAIT: Duration = Duration::from_secs(30);

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

/// The first `limit` dead letters, read without losing or hiding any.
///
/// A requeue cannot serve: RabbitMQ 4.x counts a requeue of a quorum queue
/// message toward its delivery limit (20 by default, and the DLQ has no
/// dead-letter target of its own), so repeated peeks would end up dropping
/// dead letters. Instead each one is taken unacked, a copy (same body and
/// properties, the reason kept in `x-flashsale-reason`) is published back
/// to the DLQ and confirmed, and only then is the original acked: at any
/// instant the message is in the queue, so a peek that dies midway loses
/// nothing (at worst the dead letter is there twice). The copy starts
/// with no delivery count. Peeks take turns: each holds the exclusive
/// queue `<ns>.orders.dlq.peek` while it reads, so two at once cannot
/// hide messages from each other.
pub async fn peek_dead_letters(
    amqp_url: &str,
    ns: &Namespace,
    limit: usize,
) -> Result<Vec<DeadLetter>, BrokerError> {
    let conn = broker::connect(amqp_url, "fsctl").await?;
    let result = async {
        let channel = take_peek_turn(&conn, ns).await?;
        broker::declare_queues(&channel, ns).await?;
        let dlq = ns.dead_letter_queue();
        let (ready, _) = broker::queue_stats(&channel, &dlq).await?;
        let mut out = Vec::new();
        while out.len() < limit.min(ready as usize) {
            let got = channel
                .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
                .await?;
            let Some(got) = got else { break };
            let d = got.delivery;
            // Our own reason, or RabbitMQ's (`delivery_limit`) for the queue's own.
            let reason = d.properties.headers().as_ref().and_then(|h| {
                let h = h.inner();
                h.get(REASON_HEADER)
                    .or_else(|| h.get("x-first-death-reason"))
                    .and_then(text)
            });
            let mut headers = d.properties.headers().clone().unwrap_or_default();
            if let Some(r) = &reason {
                headers.insert(
                    REASON_HEADER.into(),
                    AMQPValue::LongString(r.as_str().into()),
                );
            }
            let copy = d.properties.clone().with_headers(headers);
            if let Err(e) = broker::publish_with(&channel, &dlq, &d.data, copy).await {
                // The original stays: hand it back and report the failure.
                let back = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                let _ = d.acker.nack(back).await;
                return Err(lapin::Error::from(std::io::Error::other(format!(
                    "cannot put a copy of a dead letter back: {e}"
                ))));
            }
            d.acker.ack(BasicAckOptions::default()).await?;
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
        Ok::<_, lapin::Error>(out)
    }
    .await;
    let _ = conn.close(200, "peeked".into()).await;
    Ok(result?)
}

/// A confirm-mode channel holding the DLQ's peek turn (an exclusive queue);
/// waits while another peek holds it.
async fn take_peek_turn(
    conn: &lapin::Connection,
    ns: &Namespace,
) -> Result<lapin::Channel, lapin::Error> {
    let turn = format!("{}.peek", ns.dead_letter_queue());
    let deadline = tokio::time::Instant::now() + PEEK_TURN_WAIT;
    loop {
        let channel = conn.create_channel().await?;
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        match channel
            .queue_declare(turn.as_str().into(), exclusive, FieldTable::default())
            .await
        {
            Ok(_) => {
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                return Ok(channel);
            }
            // RESOURCE_LOCKED: another peek holds the turn (the channel is closed).
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "another peek of the DLQ is running; waiting");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
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
