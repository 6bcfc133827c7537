//! `flashsale-worker`: consumes `<ns>.orders`, groups the deliveries it holds
//! by product, applies each group in one fenced PostgreSQL transaction under
//! the product's Redis lock, and acks only what a committed transaction holds.

pub mod batch;
pub mod metrics_server;

use anyhow::Context;
use batch::OrderBook;
use flashsale_engine::accept_log::{AcceptStore, RedisAcceptLog};
use flashsale_engine::admission;
use flashsale_engine::embedded::{EmbeddedBackends, Reach};
use flashsale_engine::heartbeat::{self, WorkerStats};
use flashsale_engine::ledger::{Ledger, StockLedger};
use flashsale_engine::locks::ProductLock;
use flashsale_engine::order_events::OrderEvents;
use flashsale_engine::queue::rabbitmq as broker;
use flashsale_engine::queue::{OrderQueue, QueueConsumer, RabbitQueue};
use flashsale_engine::seams::BackendFailed;
use flashsale_engine::stock_feed::StockFeed;
use flashsale_engine::{BackendUrls, postgres, redis_conn};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Deliveries a worker may hold unacknowledged: three batches of
/// [`MAX_BATCH`](flashsale_engine::queue::MAX_BATCH), so two arrive while one
/// commits.
pub const DEFAULT_PREFETCH: u16 = 1500;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flashsale-worker",
    version,
    about = "Flash Sale Engine order worker"
)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub backends: BackendUrls,
    /// Where `/metrics` and `/health/live` are served; `0` picks a free port.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:3001")]
    pub metrics_addr: String,
    /// This worker's id in heartbeats and lock values (default: host name + pid).
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,
    /// Deliveries held at once (RabbitMQ prefetch).
    #[arg(long, env = "WORKER_PREFETCH", default_value_t = DEFAULT_PREFETCH)]
    pub prefetch: u16,
    /// The order queue partitions to consume, e.g. `0,2` (default: all).
    #[arg(long, env = "WORKER_PARTITIONS", value_delimiter = ',')]
    pub worker_partitions: Vec<u16>,
}

impl WorkerConfig {
    pub fn new(backends: BackendUrls) -> Self {
        Self {
            backends,
            metrics_addr: "127.0.0.1:0".into(),
            worker_id: None,
            prefetch: DEFAULT_PREFETCH,
            worker_partitions: Vec::new(),
        }
    }
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// A worker connected to its backends, ready to run.
pub struct Worker {
    pub book: OrderBook,
    /// The admission counters and the ledger they are reconciled with.
    reconciler: (Arc<dyn AcceptStore>, Arc<dyn Ledger>),
    /// Where the holds sweep announces returned units; none when embedded.
    feed: Option<StockFeed>,
    /// Where it announces the orders it expired.
    events: OrderEvents,
    queue: Arc<dyn OrderQueue>,
    prefetch: u16,
    stats: Arc<WorkerStats>,
    /// Where `/metrics` is served and heartbeats go; none when embedded.
    networked: Option<Networked>,
}

struct Networked {
    redis_url: String,
    ns: flashsale_engine::Namespace,
    /// Taken by `run` for the metrics server.
    metrics_listener: Option<TcpListener>,
    queue: Arc<RabbitQueue>,
}

impl Worker {
    /// Connects to every backend; an unreachable one is an error naming it.
    pub async fn connect(config: WorkerConfig) -> anyhow::Result<Self> {
        flashsale_engine::metrics::install();
        let id = config.worker_id.clone().unwrap_or_else(default_worker_id);
        let ns = config.backends.namespace();
        let pool = postgres::connect_for_lookups(&config.backends.database_url, 8).await?;
        postgres::check_partitions(&pool, &ns).await?;
        let consumed = match config.worker_partitions.as_slice() {
            [] => (0..ns.partitions()).collect(),
            some => {
                if let Some(p) = some.iter().find(|p| **p >= ns.partitions()) {
                    anyhow::bail!(
                        "WORKER_PARTITIONS names partition {p}, but there are {} (0 to {})",
                        ns.partitions(),
                        ns.partitions() - 1
                    );
                }
                some.to_vec()
            }
        };
        let redis = redis_conn::connect(&config.backends.redis_url).await?;
        // Fail now, not in the reconnect loop, when RabbitMQ is unreachable.
        let probe = broker::connect(&config.backends.amqp_url, "flashsale-worker").await?;
        let _ = probe.close(200, "probe".into()).await;
        let addr = match config.metrics_addr.as_str() {
            "0" => "0.0.0.0:0",
            other => other,
        };
        let metrics_listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on METRICS_ADDR {addr}"))?;
        let stats = Arc::new(WorkerStats::new(
            id.clone(),
            metrics_listener.local_addr()?.to_string(),
        ));
        let lock = ProductLock::new(redis.clone(), ns.clone(), id);
        let admission: Arc<dyn AcceptStore> =
            Arc::new(RedisAcceptLog::new(redis.clone(), ns.clone()));
        let events = OrderEvents::redis(redis.clone(), &ns);
        let feed = StockFeed::new(redis, &ns);
        let queue = Arc::new(
            RabbitQueue::consumer_only(&config.backends.amqp_url, &ns).consuming(consumed),
        );
        let ledger: Arc<dyn Ledger> = Arc::new(StockLedger::new(pool));
        Ok(Self {
            book: OrderBook::new(
                ledger.clone(),
                Arc::new(lock),
                admission.clone(),
                Some(feed.clone()),
                events.clone(),
                stats.clone(),
            ),
            reconciler: (admission, ledger),
            feed: Some(feed),
            events,
            queue: queue.clone(),
            prefetch: config.prefetch,
            stats,
            networked: Some(Networked {
                redis_url: config.backends.redis_url.clone(),
                ns,
                metrics_listener: Some(metrics_listener),
                queue,
            }),
        })
    }

    /// A worker on the embedded backends (`fsctl demo`): the same order
    /// book, with its own holder name on the shared lock table.
    pub fn embedded(id: &str, backends: &EmbeddedBackends, prefetch: u16) -> Self {
        Self::embedded_on(id, backends, backends.reach(), prefetch)
    }

    /// The same, consuming and admitting through `reach` (wrappers that
    /// inject faults).
    pub fn embedded_on(id: &str, backends: &EmbeddedBackends, reach: Reach, prefetch: u16) -> Self {
        let stats = Arc::new(WorkerStats::new(id.to_owned(), String::new()));
        let Reach {
            queue,
            accept_log: admission,
        } = reach;
        let ledger: Arc<dyn Ledger> = backends.ledger.clone();
        Self {
            book: OrderBook::new(
                ledger.clone(),
                Arc::new(backends.locks.holder(id)),
                admission.clone(),
                None,
                backends.events.clone(),
                stats.clone(),
            ),
            reconciler: (admission, ledger),
            feed: None,
            events: backends.events.clone(),
            queue,
            prefetch,
            stats,
            networked: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.stats.id
    }

    /// Deliveries held and orders processed, as the heartbeat reports them.
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// Opens a consumer on the order queue with this worker's prefetch.
    pub async fn open_consumer(&self) -> Result<Box<dyn QueueConsumer>, BackendFailed> {
        match &self.networked {
            Some(n) => n.queue.consume_as(self.prefetch, self.id()).await,
            None => self.queue.consume(self.prefetch).await,
        }
    }

    /// Consumes until `shutdown` is cancelled, then finishes and acks what it
    /// holds and returns. Reconnects to the queue with backoff when it fails.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let background = CancellationToken::new();
        let (admission, ledger) = self.reconciler.clone();
        let mut tasks = vec![
            OwnedTask(tokio::spawn(admission::reconcile_forever(
                admission.clone(),
                ledger.clone(),
                background.clone(),
            ))),
            OwnedTask(tokio::spawn(flashsale_engine::holds::sweep_forever(
                ledger,
                admission,
                self.feed.clone(),
                self.events.clone(),
                background.clone(),
            ))),
        ];
        if let Some(n) = &mut self.networked {
            let redis = redis_conn::connect_lazy(&n.redis_url)?;
            tasks.push(OwnedTask(tokio::spawn(heartbeat::beat(
                redis,
                n.ns.clone(),
                self.stats.clone(),
                background.clone(),
            ))));
            if let Some(listener) = n.metrics_listener.take() {
                tasks.push(OwnedTask(tokio::spawn(metrics_server::serve_metrics(
                    listener,
                    background.clone(),
                ))));
            }
        }
        tracing::info!(worker = %self.stats.id, metrics = %self.stats.metrics_addr, "flashsale-worker started");
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let consumer = tokio::select! {
                () = shutdown.cancelled() => break,
                c = self.open_consumer() => c,
            };
            match consumer {
                Ok(mut consumer) => {
                    backoff = Duration::from_millis(100);
                    self.stats.consuming(consumer.waiting());
                    if let Err(e) = self.book.consume(consumer.as_mut(), &shutdown).await {
                        tracing::warn!(
                            error = &e as &dyn std::error::Error,
                            "order consumer failed; reconnecting"
                        );
                    }
                    consumer.close().await;
                }
                Err(e) => tracing::warn!(error = %e, "cannot open order consumer; retrying"),
            }
            if !shutdown.is_cancelled() {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        background.cancel();
        for t in &mut tasks {
            let _ = (&mut t.0).await;
        }
        tracing::info!(worker = %self.stats.id, "flashsale-worker stopped");
        Ok(())
    }
}

/// A background task that dies with its owner: a worker whose `run` is
/// dropped (killed) stops beating, as a killed process would.
struct OwnedTask(tokio::task::JoinHandle<()>);

impl Drop for OwnedTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A worker running on a task of this process (`fsctl demo`, `fsctl
/// doctor`, the tests).
pub struct RunningWorker {
    pub id: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningWorker {
    /// Runs `worker` on a task until stopped; `start` gates when it begins
    /// consuming (a demo holds some workers back).
    pub fn spawn(worker: Worker, start: Option<CancellationToken>) -> Self {
        let id = worker.id().to_owned();
        let stop = CancellationToken::new();
        let until = stop.clone();
        let task = tokio::spawn(async move {
            if let Some(go) = start {
                go.cancelled().await;
            }
            worker.run(until).await
        });
        Self { id, stop, task }
    }

    /// Stops gracefully: the worker books and acks what it holds, then returns.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("worker task failed: {e}")))
    }

    /// Kills it abruptly, as `kill -9` would: no ack, no heartbeat removal.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}
