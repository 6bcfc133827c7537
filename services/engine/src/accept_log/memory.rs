//! The accept log in memory, for `fsctl demo`.

use super::AcceptStore;
use crate::seams::BackendFailed;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use tokio::time::Instant;

/// The accept log in memory, with the same time limits as in Redis.
#[derive(Debug, Default)]
pub struct MemoryAcceptLog {
    records: Mutex<HashMap<String, (crate::accept_log::AcceptRecord, Instant)>>,
}

impl MemoryAcceptLog {
    pub fn new() -> Self {
        Self::default()
    }

    fn records(
        &self,
    ) -> MutexGuard<'_, HashMap<String, (crate::accept_log::AcceptRecord, Instant)>> {
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        r.retain(|_, (_, until)| *until > now);
        r
    }
}

#[async_trait::async_trait]
impl AcceptStore for MemoryAcceptLog {
    async fn probe(&self) -> crate::seams::Probe {
        crate::seams::Probe::ok("embedded")
    }
    async fn claim(
        &self,
        key: &crate::IdempotencyKey,
        record: &crate::accept_log::AcceptRecord,
    ) -> Result<crate::accept_log::Claim, BackendFailed> {
        let mut r = self.records();
        if let Some((existing, _)) = r.get(key.as_str()) {
            return Ok(crate::accept_log::Claim::Taken(existing.clone()));
        }
        let until = Instant::now() + crate::accept_log::PENDING_TTL;
        r.insert(key.as_str().to_owned(), (record.clone(), until));
        Ok(crate::accept_log::Claim::Claimed)
    }

    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<crate::accept_log::AcceptRecord>, BackendFailed> {
        Ok(self.records().get(key).map(|(r, _)| r.clone()))
    }

    async fn mark_queued(
        &self,
        key: &crate::IdempotencyKey,
        record: &crate::accept_log::AcceptRecord,
    ) -> Result<(), BackendFailed> {
        let queued = crate::accept_log::AcceptRecord {
            state: crate::accept_log::AcceptState::Queued,
            ..record.clone()
        };
        let until = Instant::now() + crate::accept_log::QUEUED_TTL;
        self.records()
            .insert(key.as_str().to_owned(), (queued, until));
        Ok(())
    }

    async fn withdraw(
        &self,
        key: &crate::IdempotencyKey,
        record: &crate::accept_log::AcceptRecord,
    ) -> Result<(), BackendFailed> {
        let mut r = self.records();
        if r.get(key.as_str())
            .is_some_and(|(held, _)| held.claim == record.claim)
        {
            r.remove(key.as_str());
        }
        Ok(())
    }
}
