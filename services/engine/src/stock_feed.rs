//! Stock changes announced over Redis pub/sub (`<ns>:stock`, payload
//! `<product>:<stock>`), so every API's catalog sees a sell-out within
//! milliseconds instead of at its next poll. Pub/sub may drop messages (a
//! reconnect, a Redis restart): the catalog's poll of PostgreSQL stays the
//! guarantee, the feed only makes it sooner.

use crate::config::Namespace;
use crate::domain::ProductId;
use crate::redis_conn::Redis;
use crate::redis_conn::{self, timed};
use futures_util::{Stream, StreamExt};

#[derive(Clone)]
pub struct StockFeed {
    redis: Redis,
    channel: String,
}

impl StockFeed {
    pub fn new(redis: Redis, ns: &Namespace) -> Self {
        Self {
            redis,
            channel: ns.stock_channel(),
        }
    }

    /// Announces a product's stock after a commit; a failure only delays
    /// the catalogs until their next poll.
    pub async fn announce(&self, product: ProductId, stock: i32) {
        let mut conn = self.redis.clone();
        let sent = timed(
            redis::cmd("PUBLISH")
                .arg(&self.channel)
                .arg(format!("{product}:{stock}"))
                .query_async::<i64>(&mut conn),
        )
        .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "stock change not announced");
        }
    }
}

/// Subscribes to the namespace's stock changes: `(product, stock)` pairs.
pub async fn subscribe(
    url: &str,
    ns: &Namespace,
) -> redis::RedisResult<impl Stream<Item = (ProductId, i32)> + use<>> {
    let pubsub = redis_conn::subscribe(url, &ns.stock_channel()).await?;
    Ok(pubsub.into_on_message().filter_map(|msg| async move {
        let payload: String = msg.get_payload().ok()?;
        let (product, stock) = payload.split_once(':')?;
        Some((
            ProductId::new(product.parse().ok()?).ok()?,
            stock.parse().ok()?,
        ))
    }))
}
