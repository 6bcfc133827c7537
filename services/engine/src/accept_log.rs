//! The accept log in Redis: which idempotency keys were answered `202`, with
//! the body they came with, so a repeat is answered as a repeat and a reused
//! key with another body is refused. `<ns>:order:<key>` holds a JSON record,
//! first `pending` (claimed, publish under way) and then `queued` (confirmed by
//! RabbitMQ). Keys answered 4xx, 409 or 503 are never left behind.

use crate::config::Namespace;
use crate::domain::{IdempotencyKey, OrderRequest, OrderStatus, OrderView};
use crate::redis_conn::timed;
use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A claim not turned into `queued` within this long is forgotten, so a
/// process that died mid-publish does not block the key for good.
pub const PENDING_TTL: Duration = Duration::from_secs(15);
/// How long an accepted key is remembered.
pub const QUEUED_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AcceptState {
    Pending,
    Queued,
}

/// What the accept log remembers of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcceptRecord {
    pub user_id: String,
    pub product_id: i64,
    pub quantity: i64,
    pub accepted_at: DateTime<Utc>,
    pub state: AcceptState,
    /// Which request claimed the key (so only it can withdraw the claim).
    pub claim: String,
}

impl AcceptRecord {
    pub fn pending(request: &OrderRequest, at: DateTime<Utc>) -> Self {
        Self {
            user_id: request.user_id.as_str().to_owned(),
            product_id: request.product_id.get(),
            quantity: i64::from(request.quantity.get()),
            accepted_at: at,
            state: AcceptState::Pending,
            claim: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// Same buyer, product and quantity as `request`.
    pub fn same_body(&self, request: &OrderRequest) -> bool {
        self.user_id == request.user_id.as_str()
            && self.product_id == request.product_id.get()
            && self.quantity == i64::from(request.quantity.get())
    }

    /// The order as `GET /orders` shows it before the worker wrote its row.
    pub fn queued_view(&self, key: &str) -> OrderView {
        OrderView {
            order_id: key.to_owned(),
            user_id: self.user_id.clone(),
            product_id: self.product_id,
            quantity: self.quantity,
            status: OrderStatus::Queued,
            reason: None,
            accepted_at: self.accepted_at,
            processed_at: None,
        }
    }
}

/// The outcome of trying to claim a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This request owns the key now and must publish, then mark it queued.
    Claimed,
    /// The key was claimed or accepted before.
    Taken(AcceptRecord),
}

const WITHDRAW: &str = r"
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['claim'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

#[derive(Clone)]
pub struct AcceptLog {
    redis: ConnectionManager,
    ns: Namespace,
}

fn encode(record: &AcceptRecord) -> String {
    serde_json::to_string(record).unwrap_or_default()
}

fn decode(raw: Option<String>) -> Option<AcceptRecord> {
    raw.and_then(|s| serde_json::from_str(&s).ok())
}

impl AcceptLog {
    pub fn new(redis: ConnectionManager, ns: Namespace) -> Self {
        Self { redis, ns }
    }

    /// Claims `key` for `record` unless it is taken (`SET NX GET`, one round trip).
    pub async fn claim(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> redis::RedisResult<Claim> {
        let mut conn = self.redis.clone();
        let previous: Option<String> = timed(
            redis::cmd("SET")
                .arg(self.ns.accept_key(key.as_str()))
                .arg(encode(record))
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(PENDING_TTL.as_millis() as u64)
                .query_async(&mut conn),
        )
        .await?;
        Ok(match decode(previous) {
            Some(existing) => Claim::Taken(existing),
            None => Claim::Claimed,
        })
    }

    /// Marks a claimed key as accepted (RabbitMQ confirmed its message).
    pub async fn mark_queued(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> redis::RedisResult<()> {
        let queued = AcceptRecord {
            state: AcceptState::Queued,
            ..record.clone()
        };
        let mut conn = self.redis.clone();
        timed(
            redis::cmd("SET")
                .arg(self.ns.accept_key(key.as_str()))
                .arg(encode(&queued))
                .arg("PX")
                .arg(QUEUED_TTL.as_millis() as u64)
                .query_async(&mut conn),
        )
        .await
    }

    /// Withdraws this request's claim (the publish failed): a retry starts afresh.
    pub async fn withdraw(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> redis::RedisResult<()> {
        let mut conn = self.redis.clone();
        timed(
            redis::Script::new(WITHDRAW)
                .key(self.ns.accept_key(key.as_str()))
                .arg(&record.claim)
                .invoke_async::<i64>(&mut conn),
        )
        .await
        .map(drop)
    }

    /// What the log holds for `key`.
    pub async fn get(&self, key: &str) -> redis::RedisResult<Option<AcceptRecord>> {
        let mut conn = self.redis.clone();
        let raw: Option<String> = timed(
            redis::cmd("GET")
                .arg(self.ns.accept_key(key))
                .query_async(&mut conn),
        )
        .await?;
        Ok(decode(raw))
    }
}
