//! The accept log in Redis: `<ns>:order:<key>` holds the JSON record, with
//! a short TTL while pending and a day once queued.

use super::{AcceptRecord, AcceptState, AcceptStore, Claim, PENDING_TTL, QUEUED_TTL};
use crate::config::Namespace;
use crate::domain::IdempotencyKey;
use crate::redis_conn::timed;
use crate::seams::BackendFailed;
use redis::aio::ConnectionManager;

const WITHDRAW: &str = r"
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['claim'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

#[derive(Clone)]
pub struct AcceptLog {
    redis: ConnectionManager,
    ns: Namespace,
}

fn encode(record: &AcceptRecord) -> Result<String, BackendFailed> {
    serde_json::to_string(record)
        .map_err(|e| BackendFailed::Misuse(format!("cannot encode an accept record: {e}")))
}

fn decode(raw: Option<String>) -> Option<AcceptRecord> {
    raw.and_then(|s| serde_json::from_str(&s).ok())
}

impl AcceptLog {
    pub fn new(redis: ConnectionManager, ns: Namespace) -> Self {
        Self { redis, ns }
    }
}

#[async_trait::async_trait]
impl AcceptStore for AcceptLog {
    /// Claims `key` for `record` unless it is taken (`SET NX GET`, one round trip).
    async fn claim(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<Claim, BackendFailed> {
        let mut conn = self.redis.clone();
        let previous: Option<String> = timed(
            redis::cmd("SET")
                .arg(self.ns.accept_key(key.as_str()))
                .arg(encode(record)?)
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(PENDING_TTL.as_millis() as u64)
                .query_async(&mut conn),
        )
        .await
        .map_err(BackendFailed::redis)?;
        Ok(match decode(previous) {
            Some(existing) => Claim::Taken(existing),
            None => Claim::Claimed,
        })
    }

    async fn probe(&self) -> crate::seams::Probe {
        let mut conn = self.redis.clone();
        crate::seams::Probe {
            component: "redis",
            outcome: timed(redis::cmd("PING").query_async::<()>(&mut conn))
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// What the log holds for `key`.
    async fn get(&self, key: &str) -> Result<Option<AcceptRecord>, BackendFailed> {
        let mut conn = self.redis.clone();
        let raw: Option<String> = timed(
            redis::cmd("GET")
                .arg(self.ns.accept_key(key))
                .query_async(&mut conn),
        )
        .await
        .map_err(BackendFailed::redis)?;
        Ok(decode(raw))
    }

    /// Marks a claimed key as accepted (RabbitMQ confirmed its message).
    async fn mark_queued(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<(), BackendFailed> {
        let queued = AcceptRecord {
            state: AcceptState::Queued,
            ..record.clone()
        };
        let mut conn = self.redis.clone();
        timed(
            redis::cmd("SET")
                .arg(self.ns.accept_key(key.as_str()))
                .arg(encode(&queued)?)
                .arg("PX")
                .arg(QUEUED_TTL.as_millis() as u64)
                .query_async(&mut conn),
        )
        .await
        .map_err(BackendFailed::redis)
    }

    /// Withdraws this request's claim (the publish failed): a retry starts afresh.
    async fn withdraw(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<(), BackendFailed> {
        let mut conn = self.redis.clone();
        timed(
            redis::Script::new(WITHDRAW)
                .key(self.ns.accept_key(key.as_str()))
                .arg(&record.claim)
                .invoke_async::<i64>(&mut conn),
        )
        .await
        .map(drop)
        .map_err(BackendFailed::redis)
    }
}
