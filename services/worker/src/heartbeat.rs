//! The worker's visibility: its heartbeat hash in Redis each second
//! (`<ns>:worker:<id>`, TTL 5 s) and its `/metrics` + `/health/live` server.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::{DateTime, Utc};
use flashsale_engine::Namespace;
use flashsale_engine::metrics::INFLIGHT_ORDERS;
use flashsale_engine::redis_conn::timed;
use redis::aio::ConnectionManager;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
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
}

impl WorkerStats {
    pub fn new(id: String, metrics_addr: String) -> Self {
        Self {
            id,
            metrics_addr,
            started_at: Utc::now(),
            processed: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            product: AtomicI64::new(0),
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

    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// What a heartbeat would say now, for a dashboard in this process.
    pub fn view(&self, alive: bool) -> flashsale_engine::observe::WorkerView {
        let product = self.product.load(Ordering::Relaxed);
        flashsale_engine::observe::WorkerView {
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
            ("beatAt", Utc::now().timestamp_millis().to_string()),
        ]
    }
}

/// Writes the heartbeat every second until cancelled, then removes it.
pub async fn beat(
    redis: ConnectionManager,
    ns: Namespace,
    stats: Arc<WorkerStats>,
    stop: CancellationToken,
) {
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

/// Serves `/metrics` and `/health/live` until cancelled.
pub async fn serve_metrics(listener: TcpListener, stop: CancellationToken) {
    let handle = flashsale_engine::metrics::install();
    let app = Router::new()
        .route("/health/live", get(|| async { "live" }))
        .route(
            "/metrics",
            get(move || {
                let body = handle.render();
                async move {
                    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "metrics server failed");
    }
}
