//! Metric names shared by every part and the Grafana dashboard, and the
//! Prometheus recorder (installed once per process).

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

pub const ORDER_REQUESTS: &str = "flashsale_order_requests_total";
pub const REQUEST_DURATION: &str = "flashsale_request_duration_seconds";
pub const ORDERS_PROCESSED: &str = "flashsale_orders_processed_total";
pub const ORDER_LATENCY: &str = "flashsale_order_latency_seconds";
pub const BATCH_SIZE: &str = "flashsale_batch_size";
pub const LOCK_WAIT: &str = "flashsale_lock_wait_seconds";
pub const STOCK_LEVEL: &str = "flashsale_stock_level";
pub const QUEUE_DEPTH: &str = "flashsale_queue_depth";
pub const QUEUE_CONSUMERS: &str = "flashsale_queue_consumers";
pub const INFLIGHT_ORDERS: &str = "flashsale_inflight_orders";
pub const ADMISSION_TOKENS: &str = "flashsale_admission_tokens";
/// Units held for buyers who have not paid yet, per product (the workers').
pub const HOLDS: &str = "flashsale_holds";
/// Holds more than 2 s past their expiry, per product (invariant 7; the
/// workers').
pub const HOLDS_OVERDUE: &str = "flashsale_holds_overdue";
/// How holds ended: `outcome` paid, cancelled or expired.
pub const HOLD_OUTCOMES: &str = "flashsale_hold_outcomes_total";
/// Rate limit checks that failed (Redis down) and let the request through.
pub const RATE_LIMITER_FAILURES: &str = "flashsale_rate_limiter_failures_total";

const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder; installs it (and its upkeep task) on first call.
/// Must be called inside a Tokio runtime.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(SECONDS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH));
            let handle = match builder.map(PrometheusBuilder::install_recorder) {
                Ok(Ok(handle)) => handle,
                // A recorder of someone else's is installed: render our own, unregistered one.
                _ => PrometheusBuilder::new().build_recorder().handle(),
            };
            let upkeep = handle.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    upkeep.run_upkeep();
                }
            });
            handle
        })
        .clone()
}
