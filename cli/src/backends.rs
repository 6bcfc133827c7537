//! Connections for commands, each failure a one-line error naming the
//! component and its URL (exit 2).

use crate::exit::Failure;
use flashsale_engine::ledger::StockLedger;
use flashsale_engine::redis_conn::Redis;
use flashsale_engine::{BackendUrls, postgres, redis_conn};

pub async fn ledger(b: &BackendUrls) -> Result<StockLedger, Failure> {
    Ok(StockLedger::new(
        postgres::connect_and_migrate(&b.database_url, 2).await?,
    ))
}

pub async fn redis(b: &BackendUrls) -> Result<Redis, Failure> {
    Ok(redis_conn::connect(&b.redis_url).await?)
}
