//! The workers' heartbeats: each worker writes the Redis hash
//! `<ns>:worker:<id>` every second with a TTL of [`HEARTBEAT_TTL`] (what it
//! holds, what it is applying, where its metrics are), and `fsctl` reads
//! them to see the workers and to tell whether the queue is drained.

use crate::config::Namespace;
use crate::metrics::INFLIGHT_ORDERS;
use crate::redis_conn::Redis;
use crate::redis_conn::timed;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a heartbeat outlives its worker.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(5);

/// What the heartbeat reports, updated by the order book.
pub struct WorkerStats {
    pub id: String,
    pub metrics_addr: String,
    pub started_at: DateTime<Utc>,
    pub processed: AtomicU64,
    inflight: AtomicU64,
    /// The product being applied now; 0 for none.
    product: AtomicI64,
    /// Set by the consumer while it waits with nothing buffered; while it
    /// is not set, deliveries may wait in its prefetch buffer.
    consumer_waiting: std::sync::Mutex<Option<Arc<AtomicBool>>>,
}

impl WorkerStats {
    pub fn new(id: String, metrics_addr: String) -> Self {
        Self {
            id,
            metrics_addr,
            started_at: crate::clock::now(),
            processed: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            product: AtomicI64::new(0),
            consumer_waiting: std::sync::Mutex::new(None),
        }
    }

    pub fn hold(&self, deliveries: usize) {
        self.inflight
            .fetch_add(deliveries as u64, Ordering::Relaxed);
        metrics::gauge!(INFLIGHT_ORDERS).increment(deliveries as f64);
    }

    pub fn release(&self, deliveries: usize) {
        self.inflight
            .fetch_sub(deliveries as u64, Ordering::Relaxed);
        metrics::gauge!(INFLIGHT_ORDERS).decrement(deliveries as f64);
    }

    /// Deliveries held: the batch in hand, and at least one more while the
    /// consumer's prefetch buffer may hold some (it is not waiting empty),
    /// so that nobody calls the queue drained while orders only wait here.
    pub fn inflight(&self) -> u64 {
        let in_hand = self.inflight.load(Ordering::Relaxed);
        let buffered = self
            .consumer_waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|waiting| !waiting.load(Ordering::Acquire));
        in_hand.max(u64::from(buffered))
    }

    /// The consumer now in use: its flag says when it waits with nothing
    /// buffered (`None`: a consumer with no buffer of its own).
    pub fn consuming(&self, waiting: Option<Arc<AtomicBool>>) {
        *self
            .consumer_waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = waiting;
    }

    /// What a heartbeat would say now, for a dashboard in this process.
    pub fn view(&self, alive: bool) -> WorkerView {
        let product = self.product.load(Ordering::Relaxed);
        WorkerView {
            id: self.id.clone(),
            started_at: self.started_at.to_rfc3339(),
            processed: self.processed.load(Ordering::Relaxed),
            inflight: self.inflight(),
            product: (product != 0).then_some(product),
            metrics_addr: self.metrics_addr.clone(),
            last_beat_seconds: 0.0,
            alive,
        }
    }

    pub fn applying(&self, product: Option<i64>) {
        self.product.store(product.unwrap_or(0), Ordering::Relaxed);
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        let product = self.product.load(Ordering::Relaxed);
        vec![
            ("id", self.id.clone()),
            ("startedAt", self.started_at.to_rfc3339()),
            (
                "processed",
                self.processed.load(Ordering::Relaxed).to_string(),
            ),
            ("inflight", self.inflight().to_string()),
            (
                "product",
                if product > 0 {
                    product.to_string()
                } else {
                    String::new()
                },
            ),
            ("metricsAddr", self.metrics_addr.clone()),
            ("beatAt", crate::clock::now().timestamp_millis().to_string()),
        ]
    }
}

/// Writes the heartbeat every second until cancelled, then removes it.
pub async fn beat(redis: Redis, ns: Namespace, stats: Arc<WorkerStats>, stop: CancellationToken) {
    let key = ns.worker_key(&stats.id);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let mut conn = redis.clone();
        let written = timed(
            redis::pipe()
                .atomic()
                .hset_multiple(&key, &stats.fields())
                .ignore()
                .expire(&key, HEARTBEAT_TTL.as_secs() as i64)
                .ignore()
                .query_async::<()>(&mut conn),
        )
        .await;
        if let Err(e) = written {
            tracing::debug!(error = %e, "heartbeat not written");
        }
    }
    let mut conn = redis.clone();
    let _ = timed(redis::cmd("DEL").arg(&key).query_async::<()>(&mut conn)).await;
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

/// Every worker with a heartbeat, oldest id first.
pub async fn workers(redis: &Redis, ns: &Namespace) -> redis::RedisResult<Vec<WorkerView>> {
    let mut conn = redis.clone();
    let now_ms = crate::clock::now().timestamp_millis();
    let mut out = Vec::new();
    for key in crate::redis_conn::scan(redis, &ns.worker_key("*")).await? {
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
            alive: age <= HEARTBEAT_TTL.as_secs_f64(),
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_not_waiting_empty_counts_as_holding_a_delivery() {
        let stats = WorkerStats::new("w".into(), String::new());
        assert_eq!(stats.inflight(), 0, "no consumer yet");
        let waiting = Arc::new(AtomicBool::new(false));
        stats.consuming(Some(waiting.clone()));
        // Deliveries may wait in the prefetch buffer: not drained.
        assert_eq!(stats.inflight(), 1);
        waiting.store(true, Ordering::Release);
        assert_eq!(stats.inflight(), 0);
        stats.hold(3);
        assert_eq!(stats.inflight(), 3);
        waiting.store(false, Ordering::Release);
        assert_eq!(stats.inflight(), 3, "the batch in hand, at least");
        stats.release(3);
        assert_eq!(stats.inflight(), 1);
    }
}
