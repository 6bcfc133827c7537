//! The product catalog cache: every product's stock and limits, refreshed
//! from PostgreSQL every [`REFRESH_EVERY`] so the API never runs more than a
//! second behind the ledger, and never queries PostgreSQL on the accept path.
//! Its first job is to create the database and apply the migrations.

use flashsale_engine::ledger::{ProductRecord, StockLedger};
use flashsale_engine::metrics::STOCK_LEVEL;
use flashsale_engine::{ProductId, postgres};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often the catalog is reloaded.
pub const REFRESH_EVERY: Duration = Duration::from_millis(250);
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);

type Snapshot = Arc<HashMap<i64, ProductRecord>>;

/// What the catalog knows of a product.
pub enum Lookup {
    /// The catalog has not loaded yet (PostgreSQL not reached since start).
    NotLoaded,
    Unknown,
    Found(ProductRecord),
}

pub struct Catalog {
    snapshot: Arc<RwLock<Option<Snapshot>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Catalog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Catalog {
    pub fn start(ledger: StockLedger, database_url: String) -> Self {
        let snapshot = Arc::new(RwLock::new(None));
        let task = tokio::spawn(refresh(ledger, database_url, snapshot.clone()));
        Self { snapshot, task }
    }

    pub fn lookup(&self, id: ProductId) -> Lookup {
        let guard = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            None => Lookup::NotLoaded,
            Some(map) => match map.get(&id.get()) {
                Some(p) => Lookup::Found(p.clone()),
                None => Lookup::Unknown,
            },
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

async fn refresh(ledger: StockLedger, url: String, snapshot: Arc<RwLock<Option<Snapshot>>>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let migrated = async {
            postgres::ensure_database(&url).await?;
            postgres::migrate(ledger.pool(), &url).await
        };
        match tokio::time::timeout(Duration::from_secs(10), migrated).await {
            Ok(Ok(())) => break,
            Ok(Err(e)) => tracing::warn!(error = %e, "catalog: database not ready; retrying"),
            Err(_) => tracing::warn!("catalog: database setup timed out; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    let mut failing = false;
    loop {
        match tokio::time::timeout(QUERY_TIMEOUT, ledger.products()).await {
            Ok(Ok(products)) => {
                for p in &products {
                    metrics::gauge!(STOCK_LEVEL, "product_id" => p.id.to_string())
                        .set(f64::from(p.stock));
                }
                let map = products.into_iter().map(|p| (p.id, p)).collect();
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
        tokio::time::sleep(REFRESH_EVERY).await;
    }
}
