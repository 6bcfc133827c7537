//! What every handler shares: the catalog cache, the accept log, the
//! publisher and the ledger (read side).

use crate::catalog::Catalog;
use flashsale_engine::accept_log::AcceptLog;
use flashsale_engine::broker::OrderPublisher;
use flashsale_engine::ledger::StockLedger;
use flashsale_engine::{BackendUrls, Namespace, metrics, postgres, redis_conn};
use metrics_exporter_prometheus::PrometheusHandle;
use redis::aio::ConnectionManager;
use std::sync::Arc;

#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub namespace: Namespace,
    pub catalog: Catalog,
    pub accept_log: AcceptLog,
    pub publisher: OrderPublisher,
    pub ledger: StockLedger,
    pub redis: ConnectionManager,
    pub metrics: PrometheusHandle,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// Starts the lazy connections and background tasks; fails only on a
    /// malformed URL, never on an unreachable backend.
    pub fn start(backends: &BackendUrls) -> anyhow::Result<Self> {
        let namespace = backends.namespace();
        let ledger = StockLedger::new(postgres::connect_lazy(&backends.database_url, 16)?);
        let redis = redis_conn::connect_lazy(&backends.redis_url)?;
        Ok(Self(Arc::new(Shared {
            catalog: Catalog::start(ledger.clone(), backends),
            accept_log: AcceptLog::new(redis.clone(), namespace.clone()),
            publisher: OrderPublisher::start(&backends.amqp_url, &namespace),
            ledger,
            redis,
            namespace,
            metrics: metrics::install(),
        })))
    }
}
