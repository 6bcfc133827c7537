//! The seams where a seed's faults go in: the order queue as the APIs and
//! the workers see it, with seeded delays around every call, so that a
//! killed worker or a client that hangs up can land between a call's effect
//! and the next step (where the bugs live); and the accept log, whose calls
//! fail before their effect or lose their reply after it.

use crate::rng::SimRng;
use crate::world::Events;
use flashsale_engine::accept_log::{AcceptLog, AcceptRecord, AcceptStore, Admit};
use flashsale_engine::admission::{Admission, AdmissionCounters};
use flashsale_engine::queue::{Delivered, OrderQueue, QueueConsumer};
use flashsale_engine::seams::{BackendFailed, Probe};
use flashsale_engine::{IdempotencyKey, ProductId};
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Seeded pauses: each call may wait up to `max` before and after its effect.
#[derive(Clone)]
pub struct Delays {
    rng: Arc<Mutex<SimRng>>,
    max_micros: u64,
}

impl Delays {
    pub fn new(seed: u64, max: Duration) -> Self {
        Self {
            rng: Arc::new(Mutex::new(SimRng::new(seed))),
            max_micros: max.as_micros() as u64,
        }
    }

    async fn pause(&self) {
        let micros = self
            .rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .between(0, self.max_micros);
        if micros > 0 {
            tokio::time::sleep(Duration::from_micros(micros)).await;
        }
    }
}

/// A crash at a chosen point: the victim worker's consumer springs it at
/// its first ack (the victim API's queue at its first publish), just
/// before or just after the call takes effect, and then never returns; the
/// world kills the worker (the API) there ("a worker killed mid-batch",
/// "an API killed between taking units and publishing").
#[derive(Default)]
pub struct Trap {
    armed: std::sync::atomic::AtomicBool,
    /// Spring after the ack's effect (else before it).
    after_effect: bool,
    pub sprung: tokio::sync::Notify,
}

impl Trap {
    pub fn armed(after_effect: bool) -> Arc<Self> {
        Arc::new(Self {
            armed: std::sync::atomic::AtomicBool::new(true),
            after_effect,
            sprung: tokio::sync::Notify::new(),
        })
    }

    /// Springs (once) and parks the caller for good.
    async fn spring(&self) {
        if self.armed.swap(false, std::sync::atomic::Ordering::AcqRel) {
            self.sprung.notify_one();
            std::future::pending::<()>().await;
        }
    }
}

/// The queue, with pauses around publishes and a consumer with pauses
/// around every call (and, for the victim worker, a trap at its first ack;
/// for the victim API, one at its first publish).
pub struct SlowQueue {
    pub inner: Arc<dyn OrderQueue>,
    pub delays: Delays,
    pub trap: Option<Arc<Trap>>,
    pub publish_trap: Option<Arc<Trap>>,
}

#[async_trait::async_trait]
impl OrderQueue for SlowQueue {
    async fn publish(
        &self,
        product: ProductId,
        message_id: &str,
        payload: &[u8],
    ) -> Result<(), BackendFailed> {
        self.delays.pause().await;
        if let Some(trap) = self.publish_trap.as_ref().filter(|t| !t.after_effect) {
            trap.spring().await;
        }
        let published = self.inner.publish(product, message_id, payload).await;
        if let Some(trap) = self.publish_trap.as_ref().filter(|t| t.after_effect) {
            trap.spring().await;
        }
        self.delays.pause().await;
        published
    }

    async fn consume(&self, prefetch: u16) -> Result<Box<dyn QueueConsumer>, BackendFailed> {
        Ok(Box::new(SlowConsumer {
            inner: self.inner.consume(prefetch).await?,
            delays: self.delays.clone(),
            trap: self.trap.clone(),
        }))
    }

    async fn dead_letters(&self) -> Result<Vec<(String, Option<String>)>, BackendFailed> {
        self.inner.dead_letters().await
    }

    async fn probe(&self) -> Probe {
        self.inner.probe().await
    }
}

struct SlowConsumer {
    inner: Box<dyn QueueConsumer>,
    delays: Delays,
    trap: Option<Arc<Trap>>,
}

#[async_trait::async_trait]
impl QueueConsumer for SlowConsumer {
    /// Pauses before the take only: a consumer's `next_batch` must stay
    /// cancel-safe (nothing taken until it returns).
    async fn next_batch(&mut self) -> Result<Option<Vec<Delivered>>, BackendFailed> {
        self.delays.pause().await;
        self.inner.next_batch().await
    }

    async fn ack_through(&mut self, tag: u64) -> Result<(), BackendFailed> {
        self.delays.pause().await;
        if let Some(trap) = self.trap.as_ref().filter(|t| !t.after_effect) {
            trap.spring().await;
        }
        let acked = self.inner.ack_through(tag).await;
        if let Some(trap) = self.trap.as_ref().filter(|t| t.after_effect) {
            trap.spring().await;
        }
        self.delays.pause().await;
        acked
    }

    async fn dead_letter(
        &mut self,
        delivery: &Delivered,
        reason: &str,
    ) -> Result<(), BackendFailed> {
        self.delays.pause().await;
        self.inner.dead_letter(delivery, reason).await
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await;
    }

    async fn close(self: Box<Self>) {
        self.inner.close().await;
    }
}

/// The accept log and admission counters (Redis, as the APIs and the
/// workers reach them) with, until the world heals, `percent` of the calls
/// failing: half before their effect, half after it with the reply lost
/// (a client's timeout after the script ran).
pub struct FlakyAcceptLog {
    inner: Arc<dyn AcceptStore>,
    rng: Mutex<SimRng>,
    percent: u64,
    healed: AtomicBool,
    events: Events,
    /// Keys whose claim, marking or withdrawal failed.
    faulted: Mutex<BTreeSet<String>>,
    /// Pauses before and after every call (a Redis round trip).
    delays: Delays,
}

impl FlakyAcceptLog {
    pub fn new(
        inner: Arc<dyn AcceptStore>,
        seed: u64,
        percent: u64,
        delays: Delays,
        events: Events,
    ) -> Self {
        Self {
            inner,
            rng: Mutex::new(SimRng::new(seed)),
            percent,
            healed: AtomicBool::new(false),
            events,
            faulted: Mutex::default(),
            delays,
        }
    }

    /// Keys whose claim, marking or withdrawal failed: admission could not
    /// know their fate.
    pub fn faulted_keys(&self) -> BTreeSet<String> {
        self.faulted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Remembers `key` when `result` failed.
    fn note<T>(&self, key: &IdempotencyKey, result: &Result<T, BackendFailed>) {
        if result.is_err() {
            self.faulted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.as_str().to_owned());
        }
    }

    /// Every call succeeds from now on.
    pub fn heal(&self) {
        self.healed.store(true, Ordering::Release);
    }

    /// Runs `call` (named by `what`), or fails it as the seed draws.
    async fn call<T>(
        &self,
        what: impl FnOnce() -> String,
        call: impl Future<Output = Result<T, BackendFailed>>,
    ) -> Result<T, BackendFailed> {
        // `Some(after its effect?)` when this call fails.
        let failure = (self.percent > 0 && !self.healed.load(Ordering::Acquire))
            .then(|| {
                let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
                rng.chance(self.percent as f64 / 100.0)
                    .then(|| rng.chance(0.5))
            })
            .flatten();
        let Some(after_effect) = failure else {
            self.delays.pause().await;
            let result = call.await;
            self.delays.pause().await;
            return result;
        };
        if after_effect {
            let _ = call.await;
            self.events
                .add(format!("fault: Redis lost the reply to {}", what()));
        } else {
            self.events.add(format!("fault: Redis failed {}", what()));
        }
        Err(BackendFailed::redis(redis::RedisError::from(
            std::io::Error::new(std::io::ErrorKind::TimedOut, "simulated: no reply in time"),
        )))
    }
}

#[async_trait::async_trait]
impl AcceptLog for FlakyAcceptLog {
    async fn admit(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<Admit, BackendFailed> {
        let admitted = self
            .call(|| format!("admit {key}"), self.inner.admit(key, record))
            .await;
        self.note(key, &admitted);
        admitted
    }

    async fn get(&self, key: &str) -> Result<Option<AcceptRecord>, BackendFailed> {
        self.call(|| format!("get {key}"), self.inner.get(key))
            .await
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<AcceptRecord>>, BackendFailed> {
        self.call(|| format!("get_many {keys:?}"), self.inner.get_many(keys))
            .await
    }

    async fn probe(&self) -> Probe {
        self.inner.probe().await
    }

    async fn mark_queued(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<bool, BackendFailed> {
        let marked = self
            .call(
                || format!("mark_queued {key}"),
                self.inner.mark_queued(key, record),
            )
            .await;
        self.note(key, &marked);
        marked
    }

    async fn pending_ages(&self, keys: &[String]) -> Result<Vec<Option<Duration>>, BackendFailed> {
        self.call(
            || format!("pending_ages {keys:?}"),
            self.inner.pending_ages(keys),
        )
        .await
    }

    async fn withdraw(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<(), BackendFailed> {
        let withdrawn = self
            .call(
                || format!("withdraw {key}"),
                self.inner.withdraw(key, record),
            )
            .await;
        self.note(key, &withdrawn);
        withdrawn
    }

    async fn claimants_alive(&self, instances: &[String]) -> Result<Vec<bool>, BackendFailed> {
        self.call(
            || format!("claimants_alive {instances:?}"),
            self.inner.claimants_alive(instances),
        )
        .await
    }
}

#[async_trait::async_trait]
impl AdmissionCounters for FlakyAcceptLog {
    async fn admission(&self, product: ProductId) -> Result<Admission, BackendFailed> {
        self.call(
            || format!("admission {product}"),
            self.inner.admission(product),
        )
        .await
    }

    async fn tokens(&self, products: &[ProductId]) -> Result<Vec<Option<i64>>, BackendFailed> {
        self.call(
            || format!("tokens {products:?}"),
            self.inner.tokens(products),
        )
        .await
    }

    async fn reconcile(
        &self,
        product: ProductId,
        version: i64,
        settled: &[String],
        tokens: i64,
        create: bool,
    ) -> Result<bool, BackendFailed> {
        self.call(
            || format!("reconcile {product} to {tokens}"),
            self.inner
                .reconcile(product, version, settled, tokens, create),
        )
        .await
    }

    async fn release_admitted(
        &self,
        product: ProductId,
        done: &[String],
        returned: &[String],
    ) -> Result<Option<i64>, BackendFailed> {
        self.call(
            || format!("release_admitted {product} {done:?} {returned:?}"),
            self.inner.release_admitted(product, done, returned),
        )
        .await
    }

    async fn drop_counter(&self, product: ProductId) -> Result<(), BackendFailed> {
        self.call(
            || format!("drop_counter {product}"),
            self.inner.drop_counter(product),
        )
        .await
    }

    async fn reset(&self, product: ProductId, tokens: i64) -> Result<(), BackendFailed> {
        self.call(
            || format!("reset {product} to {tokens}"),
            self.inner.reset(product, tokens),
        )
        .await
    }
}
