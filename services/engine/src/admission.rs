//! Admission by stock tokens: a buy is admitted only by taking its units
//! from the product's counter in Redis (in the same script that claims its
//! key, see [`crate::accept_log`]), so a buyer who will not get the item
//! hears `409` at once instead of `202` and a rejection later.
//!
//! PostgreSQL stays the only truth. The counter is derived from it, never
//! trusted blindly: `tokens = stock − units in flight`, where the units in
//! flight are those of the admitted orders (kept per product beside the
//! counter) that have no order row yet and are still alive in the accept
//! log: queued, or pending for less than [`PENDING_ALIVE`] (measured on
//! the store's clock, never the API's against the worker's) in an API
//! process whose heartbeat (`<ns>:api:<instance>`, [`API_BEAT_TTL`]) has not
//! expired. It is derived
//! when missing (first use, Redis lost its data) and reconciled by the
//! workers every [`RECONCILE_EVERY`] for each product whose counter differs
//! from its stock, so units lost by a crash between taking and publishing
//! come back once their claim is dead. A reconciliation applies only if no
//! take or give-back happened since it read the admitted orders (a version
//! compare-and-set), so it never overwrites a change it did not see.

use crate::accept_log::{AcceptState, AcceptStore};
use crate::domain::ProductId;
use crate::ledger::{Ledger, LedgerError};
use crate::metrics::ADMISSION_TOKENS;
use crate::queue::rabbitmq::PUBLISH_BUDGET;
use crate::redis_conn::REDIS_TIMEOUT;
use crate::seams::BackendFailed;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A product's admission state, read at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// Units a buy may still take; `None` when the counter does not exist.
    pub tokens: Option<i64>,
    /// Orders that took units and are not settled: key and quantity.
    pub admitted: Vec<(String, i64)>,
    /// Changes with every take and give-back (not with a reconciliation).
    pub version: i64,
}

/// The admission counters: how many units of each product buys may still
/// take, and the orders that took units and are not settled yet. Kept in
/// the accept log's store ([`crate::accept_log::AcceptStore`]): a claim and
/// its units are taken together.
#[async_trait::async_trait]
pub trait AdmissionCounters: Send + Sync {
    /// The product's counter, admitted orders and version, at one instant.
    async fn admission(&self, product: ProductId) -> Result<Admission, BackendFailed>;
    /// The counters of `products`, in order (`None`: no counter).
    async fn tokens(&self, products: &[ProductId]) -> Result<Vec<Option<i64>>, BackendFailed>;
    /// Sets the counter to `tokens` and forgets the admitted orders in
    /// `settled`, only if nothing changed since `version` was read (and,
    /// unless `create`, only if the counter exists). Whether it did.
    async fn reconcile(
        &self,
        product: ProductId,
        version: i64,
        settled: &[String],
        tokens: i64,
        create: bool,
    ) -> Result<bool, BackendFailed>;
    /// After a worker's commit: forgets the admitted orders `done` and gives
    /// back the units of `returned` (each only if still admitted). The
    /// counter after it, if it exists.
    async fn release_admitted(
        &self,
        product: ProductId,
        done: &[String],
        returned: &[String],
    ) -> Result<Option<i64>, BackendFailed>;
    /// Drops the counter, to be derived again (after `seed --restock`:
    /// adding to it could count units a reconciliation already saw).
    async fn drop_counter(&self, product: ProductId) -> Result<(), BackendFailed>;
    /// A fresh counter of `tokens`, nothing admitted (`seed --reset`, a new
    /// product).
    async fn reset(&self, product: ProductId, tokens: i64) -> Result<(), BackendFailed>;
}

/// An API process's heartbeat lives this long; it beats every second.
pub const API_BEAT_TTL: Duration = Duration::from_secs(4);

/// An API process's heartbeat, beating until dropped (then removed).
pub struct ApiHeartbeat(CancellationToken);

impl ApiHeartbeat {
    pub fn start(redis: crate::redis_conn::Redis, ns: crate::Namespace, instance: String) -> Self {
        let stop = CancellationToken::new();
        tokio::spawn(api_heartbeat(redis, ns, instance, stop.clone()));
        Self(stop)
    }
}

impl Drop for ApiHeartbeat {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Keeps an API process's heartbeat, `<ns>:api:<instance>`, until `stop`
/// (then removes it), so that its pending claims count as in flight only
/// while it lives.
async fn api_heartbeat(
    redis: crate::redis_conn::Redis,
    ns: crate::Namespace,
    instance: String,
    stop: CancellationToken,
) {
    let key = ns.api_key(&instance);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let mut conn = redis.clone();
        let mut set = redis::cmd("SET");
        set.arg(&key)
            .arg(1)
            .arg("PX")
            .arg(API_BEAT_TTL.as_millis() as u64);
        if let Err(e) = crate::redis_conn::timed(set.query_async::<()>(&mut conn)).await {
            tracing::debug!(error = %e, "API heartbeat not written");
        }
    }
    let mut conn = redis.clone();
    let _ =
        crate::redis_conn::timed(redis::cmd("DEL").arg(&key).query_async::<()>(&mut conn)).await;
}

/// How often a worker reconciles the counters.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// A product with more unsettled orders than this is mid-sale: its counter
/// is reconciled once they settle (the workers settle them as they commit).
pub const RECONCILE_MAX_ADMITTED: usize = 2000;
/// A claim still pending after this long is dead: its API answered `503`
/// (its whole publish ends within [`PUBLISH_BUDGET`], and the marking
/// after it within a Redis call) or died. The margin covers the Redis calls
/// around the publish and a process paused for a moment.
pub const PENDING_ALIVE: Duration =
    Duration::from_secs(PUBLISH_BUDGET.as_secs() + REDIS_TIMEOUT.as_secs() * 2 + 1);

#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error(transparent)]
    Store(#[from] BackendFailed),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// What a derivation came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Derived {
    /// The counter is now `tokens`; `in_flight` units were still on the way.
    Set { tokens: i64, in_flight: i64 },
    /// A take or give-back happened meanwhile: nothing set (try again).
    Raced,
    /// Nothing done: an unknown product, or (unless asked to create one)
    /// no counter or too many orders unsettled.
    Skipped,
}

/// Derives the product's counter from the ledger and sets it (creating it
/// only if `create`).
pub async fn derive(
    store: &dyn AcceptStore,
    ledger: &dyn Ledger,
    product: ProductId,
    create: bool,
) -> Result<Derived, AdmissionError> {
    let snapshot = store.admission(product).await?;
    if !create && (snapshot.tokens.is_none() || snapshot.admitted.len() > RECONCILE_MAX_ADMITTED) {
        return Ok(Derived::Skipped);
    }
    let keys: Vec<String> = snapshot.admitted.iter().map(|(k, _)| k.clone()).collect();
    let Some((stock, booked)) = ledger.stock_and_booked(product, &keys).await? else {
        return Ok(Derived::Skipped);
    };
    let (unbooked, mut settled): (Vec<_>, Vec<_>) = snapshot
        .admitted
        .into_iter()
        .partition(|(k, _)| !booked.contains(k));
    let unbooked_keys: Vec<String> = unbooked.iter().map(|(k, _)| k.clone()).collect();
    // Ages first: a claim marked queued in between then reads as queued.
    let ages = store.pending_ages(&unbooked_keys).await?;
    let records = store.get_many(&unbooked_keys).await?;
    // The API processes holding pending claims, and which of them still beat.
    let mut claimants: Vec<String> = records
        .iter()
        .flatten()
        .filter(|r| r.state == AcceptState::Pending)
        .filter_map(|r| r.claimant().map(str::to_owned))
        .collect();
    claimants.sort();
    claimants.dedup();
    let beating = store.claimants_alive(&claimants).await?;
    let dead = |instance: &str| {
        claimants
            .binary_search_by(|c| c.as_str().cmp(instance))
            .is_ok_and(|i| !beating[i])
    };
    let mut in_flight = 0;
    for (((key, units), record), age) in unbooked.into_iter().zip(records).zip(ages) {
        let alive = record.is_some_and(|r| {
            r.state == AcceptState::Queued
                || (age.is_some_and(|age| age < PENDING_ALIVE) && !r.claimant().is_some_and(dead))
        });
        if alive {
            in_flight += units;
        } else {
            settled.push((key, units));
        }
    }
    let settled: Vec<String> = settled.into_iter().map(|(k, _)| k).collect();
    let tokens = (i64::from(stock) - in_flight).max(0);
    let set = store
        .reconcile(product, snapshot.version, &settled, tokens, create)
        .await?;
    Ok(if set {
        Derived::Set { tokens, in_flight }
    } else {
        Derived::Raced
    })
}

/// Every this many rounds of [`reconcile_forever`], every product with a
/// counter is derived, also one whose counter equals its stock. A dead
/// claim can be left among a product's admitted orders with its counter
/// already at its stock: its units were handed out again after a `503`
/// whose publish got through (the order booked without a `202`), and only
/// a derivation forgets it (found by the simulator, seed 111846).
pub const SWEEP_EVERY_ROUNDS: u32 = 30;

/// Reconciles every product whose counter exists and differs from its
/// stock (every product with a counter when `every_product`); returns how
/// many were set. Updates `flashsale_admission_tokens`.
pub async fn reconcile_all(
    store: &dyn AcceptStore,
    ledger: &dyn Ledger,
    every_product: bool,
) -> Result<usize, AdmissionError> {
    // A row whose id is not a product id has no counter either.
    let products = ledger.products().await?;
    let ids: Vec<ProductId> = products.iter().map(|p| p.id).collect();
    let counters = store.tokens(&ids).await?;
    let mut set = 0;
    for (product, counter) in products.iter().zip(counters) {
        let Some(mut tokens) = counter else { continue };
        if (every_product || tokens != i64::from(product.stock))
            && let Derived::Set { tokens: now, .. } =
                derive(store, ledger, product.id, false).await?
        {
            if now != tokens {
                tracing::info!(
                    product = product.id.get(),
                    was = tokens,
                    now,
                    "admission counter reconciled"
                );
            }
            tokens = now;
            set += 1;
        }
        metrics::gauge!(ADMISSION_TOKENS, "product_id" => product.id.to_string())
            .set(tokens as f64);
    }
    Ok(set)
}

/// Reconciles every [`RECONCILE_EVERY`] until `stop`.
pub async fn reconcile_forever(
    store: std::sync::Arc<dyn AcceptStore>,
    ledger: std::sync::Arc<dyn Ledger>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for round in 1u32.. {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let every_product = round.is_multiple_of(SWEEP_EVERY_ROUNDS);
        if let Err(e) = reconcile_all(store.as_ref(), ledger.as_ref(), every_product).await {
            tracing::debug!(error = %e, "admission counters not reconciled this round");
        }
    }
}
