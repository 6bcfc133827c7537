//! What every handler shares: the catalog cache, and the seams to the
//! accept log, the order queue and the ledger — on Redis, RabbitMQ and
//! PostgreSQL, or embedded in memory for `fsctl demo`.

use crate::booked_keys::BookedKeys;
use crate::catalog::Catalog;
use crate::first_requests::FirstRequests;
use crate::gate::Gate;
use crate::watchers::Watchers;
use crate::{Access, HttpLimits};
use flashsale_engine::accept_log::AcceptStore;
use flashsale_engine::accept_log::RedisAcceptLog;
use flashsale_engine::admission::ApiHeartbeat;
use flashsale_engine::embedded::{EmbeddedBackends, Reach};
use flashsale_engine::ledger::Ledger;
use flashsale_engine::ledger::StockLedger;
use flashsale_engine::order_events::OrderEvents;
use flashsale_engine::queue::{OrderQueue, RabbitQueue};
use flashsale_engine::rate_limit::{MemoryRateLimiter, RedisRateLimiter};
use flashsale_engine::{BackendUrls, Namespace, metrics, postgres, redis_conn};
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub namespace: Namespace,
    pub catalog: Catalog,
    pub accept_log: Arc<dyn AcceptStore>,
    pub queue: Arc<dyn OrderQueue>,
    pub ledger: Arc<dyn Ledger>,
    pub metrics: PrometheusHandle,
    /// Repeats of a key whose first request is still publishing wait here.
    pub first_requests: Arc<FirstRequests>,
    /// Buys in progress, for load shedding above `API_MAX_INFLIGHT`.
    pub buys: BuysInFlight,
    pub limits: HttpLimits,
    /// Who the buyer is and whether they are within their rate limits.
    pub gate: Gate,
    /// This process's id in its claims and its heartbeat.
    pub instance: String,
    /// Where pays and cancels are announced to the event streams.
    pub events: OrderEvents,
    /// The event streams open in this process.
    pub watchers: Arc<Watchers>,
    /// Whether a key the accept log does not know has a row after all.
    pub booked: BookedKeys,
    /// Order reads running against the ledger (`API_MAX_READS`).
    pub reads: Arc<tokio::sync::Semaphore>,
    /// The tasks requests leave running (a buy past its first take, a pay
    /// or cancel): they end with the process.
    pub process: crate::process::Process,
    /// Follows the announcements for `watchers`; aborted with the state.
    _follower: AbortOnDrop,
    /// The heartbeat (none when embedded): it stops with the state.
    _beat: Option<ApiHeartbeat>,
}

/// A background task that ends with its owner.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts the buys in progress; entering fails above the limit.
#[derive(Default)]
pub struct BuysInFlight(Arc<AtomicUsize>);

/// One buy in progress; leaving happens on drop (also when the client hangs up).
pub struct BuyPass(Arc<AtomicUsize>);

impl BuysInFlight {
    pub fn enter(&self, limit: usize) -> Option<BuyPass> {
        let before = self.0.fetch_add(1, Ordering::AcqRel);
        let pass = BuyPass(Arc::clone(&self.0));
        (before < limit).then_some(pass)
    }
}

impl Drop for BuyPass {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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
    pub fn start(
        backends: &BackendUrls,
        limits: &HttpLimits,
        access: &Access,
    ) -> anyhow::Result<Self> {
        let namespace = backends.namespace();
        let ledger = StockLedger::new(postgres::connect_lazy(&backends.database_url, 16)?);
        let redis = redis_conn::connect_lazy(&backends.redis_url)?;
        let queue = Arc::new(RabbitQueue::start(&backends.amqp_url, &namespace));
        let instance = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let gate = Gate::new(
            &access.auth,
            access.rates.clone(),
            Arc::new(RedisRateLimiter::new(redis.clone())),
            namespace.clone(),
        )?;
        let beat = ApiHeartbeat::start(redis.clone(), namespace.clone(), instance.clone());
        let watchers = Arc::new(Watchers::default());
        let follower = AbortOnDrop(tokio::spawn(crate::watchers::follow_redis(
            backends.clone(),
            namespace.clone(),
            watchers.clone(),
        )));
        let events = OrderEvents::redis(redis.clone(), &namespace);
        let booked = BookedKeys::start(Arc::new(ledger.clone()));
        Ok(Self(Arc::new(Shared {
            catalog: Catalog::start(ledger.clone(), backends),
            accept_log: Arc::new(RedisAcceptLog::new(redis.clone(), namespace.clone())),
            queue: queue.clone(),
            ledger: Arc::new(ledger),
            namespace,
            metrics: metrics::install(),
            first_requests: Arc::default(),
            buys: BuysInFlight::default(),
            limits: *limits,
            gate,
            instance,
            events,
            watchers,
            booked,
            reads: Arc::new(tokio::sync::Semaphore::new(limits.max_reads.max(1))),
            process: crate::process::Process::default(),
            _follower: follower,
            _beat: Some(beat),
        })))
    }

    /// The same API on the embedded backends.
    pub fn embedded(
        backends: &EmbeddedBackends,
        limits: &HttpLimits,
        access: &Access,
    ) -> anyhow::Result<Self> {
        Self::embedded_on(backends, backends.reach(), limits, access)
    }

    /// The same, publishing and admitting through `reach` (wrappers that
    /// inject faults: the simulator's).
    pub fn embedded_on(
        backends: &EmbeddedBackends,
        reach: Reach,
        limits: &HttpLimits,
        access: &Access,
    ) -> anyhow::Result<Self> {
        let ledger: Arc<dyn Ledger> = backends.ledger.clone();
        let booked = BookedKeys::start(ledger.clone());
        let namespace = Namespace::new("embedded");
        let gate = Gate::new(
            &access.auth,
            access.rates.clone(),
            Arc::new(MemoryRateLimiter::default()),
            namespace.clone(),
        )?;
        let watchers = Arc::new(Watchers::default());
        let follower = AbortOnDrop(tokio::spawn(crate::watchers::follow_memory(
            backends.events.clone(),
            watchers.clone(),
        )));
        Ok(Self(Arc::new(Shared {
            // In memory a reload costs next to nothing: keep the cache close.
            catalog: Catalog::start_on(ledger.clone(), std::time::Duration::from_millis(5)),
            accept_log: reach.accept_log,
            queue: reach.queue,
            ledger,
            namespace,
            metrics: metrics::install(),
            first_requests: Arc::default(),
            buys: BuysInFlight::default(),
            limits: *limits,
            gate,
            instance: "embedded".into(),
            events: backends.events.clone(),
            watchers,
            booked,
            reads: Arc::new(tokio::sync::Semaphore::new(limits.max_reads.max(1))),
            process: crate::process::Process::default(),
            _follower: follower,
            _beat: None,
        })))
    }
}
