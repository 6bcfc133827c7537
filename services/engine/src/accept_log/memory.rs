//! The accept log and admission counters in memory, for `fsctl demo`: the
//! same rules as in Redis, each change under one mutex.

use super::{AcceptLog, AcceptRecord, AcceptState, Admit, PENDING_TTL, QUEUED_TTL};
use crate::admission::{Admission, AdmissionCounters};
use crate::domain::{IdempotencyKey, ProductId};
use crate::seams::BackendFailed;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// One product's admission state.
#[derive(Debug, Default)]
struct Tokens {
    counter: Option<i64>,
    /// Ordered, so that a reading lists them the same way every time (the
    /// simulator's traces name them).
    admitted: BTreeMap<String, i64>,
    version: i64,
}

#[derive(Debug, Default)]
struct State {
    records: HashMap<String, (AcceptRecord, Instant)>,
    tokens: HashMap<i64, Tokens>,
}

/// The accept log in memory, with the same time limits as in Redis.
#[derive(Debug, Default)]
pub struct MemoryAcceptLog {
    state: Mutex<State>,
}

impl MemoryAcceptLog {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        s.records.retain(|_, (_, until)| *until > now);
        s
    }
}

impl MemoryAcceptLog {
    /// Forgets every record, counter and admitted order: what Redis losing
    /// its data looks like (the simulator's fault).
    pub fn forget_everything(&self) {
        let mut s = self.state();
        s.records.clear();
        s.tokens.clear();
    }

    /// The keys whose claim is still pending (not marked queued).
    pub fn pending(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .state()
            .records
            .iter()
            .filter(|(_, (r, _))| r.state == AcceptState::Pending)
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        keys
    }

    /// Makes the key's pending claim `by` older (its expiry that much
    /// nearer): for tests of dead claims.
    pub fn age_claim(&self, key: &str, by: Duration) {
        if let Some((_, until)) = self.state().records.get_mut(key) {
            *until -= by;
        }
    }
}

impl Tokens {
    /// Forgets an admitted order; its quantity if it was admitted.
    fn forget(&mut self, key: &str) -> Option<i64> {
        self.admitted.remove(key)
    }

    fn give_back(&mut self, units: i64) {
        self.version += 1;
        if let Some(c) = &mut self.counter {
            *c += units;
        }
    }
}

#[async_trait::async_trait]
impl AcceptLog for MemoryAcceptLog {
    async fn probe(&self) -> crate::seams::Probe {
        crate::seams::Probe::ok("embedded")
    }

    async fn admit(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<Admit, BackendFailed> {
        let mut s = self.state();
        if let Some((existing, _)) = s.records.get(key.as_str()) {
            if existing.claim == record.claim {
                let left = s.tokens.get(&record.product_id).and_then(|t| t.counter);
                return Ok(Admit::Claimed {
                    left: left.unwrap_or(0),
                });
            }
            return Ok(Admit::Taken(existing.clone()));
        }
        let tokens = s.tokens.entry(record.product_id).or_default();
        let Some(left) = tokens.counter else {
            return Ok(Admit::NoCounter);
        };
        if left < record.quantity {
            return Ok(Admit::Short {
                available: left.max(0),
            });
        }
        let left = left - record.quantity;
        tokens.counter = Some(left);
        tokens.version += 1;
        tokens
            .admitted
            .insert(key.as_str().to_owned(), record.quantity);
        let until = Instant::now() + PENDING_TTL;
        s.records
            .insert(key.as_str().to_owned(), (record.clone(), until));
        Ok(Admit::Claimed { left })
    }

    async fn get(&self, key: &str) -> Result<Option<AcceptRecord>, BackendFailed> {
        Ok(self.state().records.get(key).map(|(r, _)| r.clone()))
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<AcceptRecord>>, BackendFailed> {
        let s = self.state();
        Ok(keys
            .iter()
            .map(|k| s.records.get(k).map(|(r, _)| r.clone()))
            .collect())
    }

    async fn mark_queued(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<bool, BackendFailed> {
        let mut s = self.state();
        let Some(held) = s.records.get_mut(key.as_str()) else {
            return Ok(false);
        };
        if held.0.claim != record.claim {
            return Ok(false);
        }
        held.0.state = AcceptState::Queued;
        held.1 = Instant::now() + QUEUED_TTL;
        Ok(true)
    }

    async fn pending_ages(&self, keys: &[String]) -> Result<Vec<Option<Duration>>, BackendFailed> {
        let s = self.state();
        let now = Instant::now();
        Ok(keys
            .iter()
            .map(|k| {
                let (record, until) = s.records.get(k)?;
                (record.state == AcceptState::Pending)
                    .then(|| PENDING_TTL.saturating_sub(until.saturating_duration_since(now)))
            })
            .collect())
    }

    async fn withdraw(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<(), BackendFailed> {
        let mut s = self.state();
        let own = |held: &AcceptRecord| held.claim == record.claim;
        if s.records
            .get(key.as_str())
            .is_none_or(|(held, _)| !own(held))
        {
            return Ok(());
        }
        s.records.remove(key.as_str());
        let tokens = s.tokens.entry(record.product_id).or_default();
        if let Some(units) = tokens.forget(key.as_str()) {
            tokens.give_back(units);
        }
        Ok(())
    }

    /// The embedded API lives as long as this process.
    async fn claimants_alive(&self, instances: &[String]) -> Result<Vec<bool>, BackendFailed> {
        Ok(vec![true; instances.len()])
    }
}

#[async_trait::async_trait]
impl AdmissionCounters for MemoryAcceptLog {
    async fn admission(&self, product: ProductId) -> Result<Admission, BackendFailed> {
        let product = product.get();
        let s = self.state();
        Ok(s.tokens
            .get(&product)
            .map(|t| Admission {
                tokens: t.counter,
                admitted: t.admitted.iter().map(|(k, q)| (k.clone(), *q)).collect(),
                version: t.version,
            })
            .unwrap_or_default())
    }

    async fn tokens(&self, products: &[ProductId]) -> Result<Vec<Option<i64>>, BackendFailed> {
        let s = self.state();
        Ok(products
            .iter()
            .map(|p| s.tokens.get(&p.get()).and_then(|t| t.counter))
            .collect())
    }

    async fn reconcile(
        &self,
        product: ProductId,
        version: i64,
        settled: &[String],
        tokens: i64,
        create: bool,
    ) -> Result<bool, BackendFailed> {
        let product = product.get();
        let mut s = self.state();
        let t = s.tokens.entry(product).or_default();
        if t.version != version || (!create && t.counter.is_none()) {
            return Ok(false);
        }
        for key in settled {
            t.forget(key);
        }
        t.counter = Some(tokens);
        Ok(true)
    }

    async fn release_admitted(
        &self,
        product: ProductId,
        done: &[String],
        returned: &[String],
    ) -> Result<Option<i64>, BackendFailed> {
        let product = product.get();
        let mut s = self.state();
        let t = s.tokens.entry(product).or_default();
        for key in done {
            t.forget(key);
        }
        let back: i64 = returned.iter().filter_map(|k| t.forget(k)).sum();
        if back > 0 {
            t.give_back(back);
        }
        Ok(t.counter)
    }

    async fn drop_counter(&self, product: ProductId) -> Result<(), BackendFailed> {
        let product = product.get();
        let mut s = self.state();
        let t = s.tokens.entry(product).or_default();
        t.version += 1;
        t.counter = None;
        Ok(())
    }

    async fn reset(&self, product: ProductId, tokens: i64) -> Result<(), BackendFailed> {
        let product = product.get();
        let mut s = self.state();
        let t = s.tokens.entry(product).or_default();
        t.version += 1;
        t.admitted.clear();
        t.counter = Some(tokens);
        Ok(())
    }
}
