//! The product catalog cache: every product's stock and limits, reloaded
//! from PostgreSQL every [`REFRESH_EVERY`] so the API never runs more than a
//! second behind the ledger and never queries PostgreSQL on the accept path.
//! Between reloads, the workers' stock announcements (Redis pub/sub) update
//! the stock at once, so a sell-out is fast-pathed within milliseconds. Its
//! first job is to create the database and apply the migrations.

use flashsale_engine::ledger::Ledger;
use flashsale_engine::ledger::{ProductRecord, StockLedger};
use flashsale_engine::metrics::STOCK_LEVEL;
use flashsale_engine::{BackendUrls, ProductId, postgres, stock_feed};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often the catalog is reloaded.
pub const REFRESH_EVERY: Duration = Duration::from_millis(250);
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);

struct Entry {
    record: ProductRecord,
    /// Stock as last loaded or announced.
    stock: AtomicI32,
}

type Snapshot = Arc<HashMap<ProductId, Entry>>;
type Shared = Arc<RwLock<Option<Snapshot>>>;

/// What the catalog knows of a product.
pub enum Lookup {
    /// The catalog has not loaded yet (PostgreSQL not reached since start).
    NotLoaded,
    Unknown,
    Found(ProductRecord),
}

pub struct Catalog {
    snapshot: Shared,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Catalog {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn current(shared: &Shared) -> Option<Snapshot> {
    shared.read().unwrap_or_else(|p| p.into_inner()).clone()
}

impl Catalog {
    /// On PostgreSQL: creates the database and migrates first, then polls,
    /// and follows the workers' stock announcements in Redis.
    pub fn start(ledger: StockLedger, backends: &BackendUrls) -> Self {
        let snapshot: Shared = Arc::new(RwLock::new(None));
        let url = backends.database_url.clone();
        let source: Arc<dyn Ledger> = Arc::new(ledger.clone());
        let ns = backends.namespace();
        let setup = async move { prepare(&ledger, &url, &ns).await };
        let tasks = vec![
            tokio::spawn(refresh(source, setup, snapshot.clone(), REFRESH_EVERY)),
            tokio::spawn(follow_announcements(backends.clone(), snapshot.clone())),
        ];
        Self { snapshot, tasks }
    }

    /// On any ledger (the embedded one, in memory): polls only, `every`.
    pub fn start_on(ledger: Arc<dyn Ledger>, every: Duration) -> Self {
        let snapshot: Shared = Arc::new(RwLock::new(None));
        let tasks = vec![tokio::spawn(refresh(
            ledger,
            async {},
            snapshot.clone(),
            every,
        ))];
        Self { snapshot, tasks }
    }

    pub fn lookup(&self, id: ProductId) -> Lookup {
        match current(&self.snapshot) {
            None => Lookup::NotLoaded,
            Some(map) => match map.get(&id) {
                Some(e) => Lookup::Found(ProductRecord {
                    stock: e.stock.load(Ordering::Relaxed),
                    ..e.record.clone()
                }),
                None => Lookup::Unknown,
            },
        }
    }

    /// A stock this process changed itself (a cancel gave units back): seen
    /// at once here; the other processes see it at their next poll.
    pub fn set_stock(&self, id: ProductId, stock: i32) {
        if let Some(map) = current(&self.snapshot)
            && let Some(entry) = map.get(&id)
        {
            entry.stock.store(stock, Ordering::Relaxed);
        }
    }

    pub fn is_loaded(&self) -> bool {
        current(&self.snapshot).is_some()
    }
}

/// Creates the database and applies the migrations, retrying until done.
/// Creates the database and migrates, then checks the partitions: an API
/// whose `FLASHSALE_PARTITIONS` differs from the recorded one never loads
/// its catalog, so it publishes nothing (every buy is a `503`).
async fn prepare(ledger: &StockLedger, url: &str, ns: &flashsale_engine::Namespace) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let migrated = async {
            postgres::ensure_database(url).await?;
            postgres::migrate(ledger.pool(), url).await?;
            postgres::check_partitions(ledger.pool(), ns)
                .await
                .map_err(anyhow::Error::from)
        };
        match tokio::time::timeout(Duration::from_secs(10), migrated).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => tracing::warn!(error = %e, "catalog: database not ready; retrying"),
            Err(_) => tracing::warn!("catalog: database setup timed out; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn refresh(
    ledger: Arc<dyn Ledger>,
    setup: impl Future<Output = ()>,
    snapshot: Shared,
    every: Duration,
) {
    setup.await;
    let mut failing = false;
    loop {
        match tokio::time::timeout(QUERY_TIMEOUT, ledger.products()).await {
            Ok(Ok(products)) => {
                let map = products
                    .into_iter()
                    .map(|p| {
                        metrics::gauge!(STOCK_LEVEL, "product_id" => p.id.to_string())
                            .set(f64::from(p.stock));
                        let stock = AtomicI32::new(p.stock);
                        (p.id, Entry { record: p, stock })
                    })
                    .collect();
                *snapshot.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(map));
                if failing {
                    tracing::info!("catalog: PostgreSQL answers again");
                    failing = false;
                }
            }
            Ok(Err(e)) if !failing => {
                tracing::warn!(error = %e, "catalog: cannot refresh products");
                failing = true;
            }
            Err(_) if !failing => {
                tracing::warn!("catalog: product refresh timed out");
                failing = true;
            }
            _ => {}
        }
        tokio::time::sleep(every).await;
    }
}

/// Applies the workers' stock announcements; resubscribes when Redis drops.
async fn follow_announcements(backends: BackendUrls, snapshot: Shared) {
    let ns = backends.namespace();
    loop {
        let subscribed = tokio::time::timeout(
            QUERY_TIMEOUT * 3,
            stock_feed::subscribe(&backends.redis_url, &ns),
        );
        match subscribed.await {
            Ok(Ok(changes)) => {
                let mut changes = std::pin::pin!(changes);
                while let Some((product, stock)) = changes.next().await {
                    if let Some(map) = current(&snapshot)
                        && let Some(entry) = map.get(&product)
                    {
                        entry.stock.store(stock, Ordering::Relaxed);
                    }
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "catalog: stock feed unavailable"),
            Err(_) => tracing::debug!("catalog: stock feed subscription timed out"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
