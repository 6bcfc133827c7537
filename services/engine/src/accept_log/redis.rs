//! The accept log and admission counters in Redis. `<ns>:order:<key>` holds
//! the JSON record, with a short TTL while pending and a day once queued.
//! Per product: the counter `<ns>:tokens:product:{<id>}`, the admitted
//! orders not yet settled (a hash, key to quantity) and a version bumped by
//! every take and give-back, so a reconciliation never overwrites a change
//! it did not see. Each change is one Lua script: one round trip, atomic.
//!
//! On a Redis Cluster the order's record and the product's keys live in
//! different hash slots, which no script may span: there a take is two
//! scripts, the claim of the key ([`CLAIM`]) and then the take of the
//! units ([`TAKE`]), and a claim that finds too few units is dropped again
//! ([`DROP_CLAIM`]). Both orders are safe when the process dies between the
//! two: a claim without units expires with its pending TTL, and units
//! without a live claim are given back by the reconciliation.

use super::{AcceptLog, AcceptRecord, AcceptState, Admit, PENDING_TTL, QUEUED_TTL};
use crate::admission::{Admission, AdmissionCounters};
use crate::config::Namespace;
use crate::domain::{IdempotencyKey, ProductId};
use crate::redis_conn::Redis;
use crate::redis_conn::timed;
use crate::seams::BackendFailed;
use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

/// KEYS: record, counter, admitted, version. ARGV: record JSON, pending TTL
/// (ms), order id, quantity, claim. `{0, left}` claimed, `{1, record}`
/// taken, `{2, ''}` no counter, `{3, available}` short. Every script here
/// is safe to run twice (a client that re-sends after a lost reply): a
/// claim that finds its own record was claimed by its first run.
static ADMIT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local prev = redis.call('GET', KEYS[1])
if prev then
  if string.find(prev, ARGV[5], 1, true) then return {0, redis.call('GET', KEYS[2]) or '0'} end
  return {1, prev}
end
local left = redis.call('GET', KEYS[2])
if not left then return {2, ''} end
local q = tonumber(ARGV[4])
if tonumber(left) < q then return {3, left} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[3], ARGV[3], q)
redis.call('INCR', KEYS[4])
return {0, tostring(redis.call('DECRBY', KEYS[2], q))}",
    )
});

/// KEYS: record, counter, admitted, version. ARGV: claim, order id.
static WITHDRAW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if not (v and cjson.decode(v)['claim'] == ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
local q = redis.call('HGET', KEYS[3], ARGV[2])
if q then
  redis.call('HDEL', KEYS[3], ARGV[2])
  redis.call('INCR', KEYS[4])
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('INCRBY', KEYS[2], q) end
end
return 1",
    )
});

/// KEYS: counter, admitted, version. ARGV: count of done keys, done keys,
/// returned keys. The counter after it, or false.
static RELEASE_ADMITTED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local n = tonumber(ARGV[1])
for i = 2, n + 1 do redis.call('HDEL', KEYS[2], ARGV[i]) end
local back = 0
for i = n + 2, #ARGV do
  local q = redis.call('HGET', KEYS[2], ARGV[i])
  if q then
    redis.call('HDEL', KEYS[2], ARGV[i])
    back = back + tonumber(q)
  end
end
if back > 0 then
  redis.call('INCR', KEYS[3])
  if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBY', KEYS[1], back) end
end
return redis.call('GET', KEYS[1])",
    )
});

/// KEYS: counter, admitted, version. ARGV: version read, tokens, create
/// (0/1), settled keys. 1 if set.
static RECONCILE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if tonumber(redis.call('GET', KEYS[3]) or '0') ~= tonumber(ARGV[1]) then return 0 end
if ARGV[3] == '0' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 4, #ARGV do redis.call('HDEL', KEYS[2], ARGV[i]) end
redis.call('SET', KEYS[1], ARGV[2])
return 1",
    )
});

/// KEYS: counter, admitted, version. ARGV: tokens, or nothing to drop the
/// counter (it is derived again).
static RESET: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
redis.call('INCR', KEYS[3])
if ARGV[1] then
  redis.call('DEL', KEYS[2])
  return redis.call('SET', KEYS[1], ARGV[1])
end
return redis.call('DEL', KEYS[1])",
    )
});

/// Cluster: KEYS: record. ARGV: record JSON, pending TTL (ms), claim.
/// `{0, ''}` claimed, `{1, record}` taken.
static CLAIM: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local prev = redis.call('GET', KEYS[1])
if prev then
  if string.find(prev, ARGV[3], 1, true) then return {0, ''} end
  return {1, prev}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {0, ''}",
    )
});

/// Cluster: KEYS: counter, admitted, version. ARGV: order id, quantity.
/// `{0, left}` taken, `{2, ''}` no counter, `{3, available}` short. An
/// order already admitted is not taken from twice.
static TAKE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local left = redis.call('GET', KEYS[1])
if not left then return {2, ''} end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {0, left} end
local q = tonumber(ARGV[2])
if tonumber(left) < q then return {3, left} end
redis.call('HSET', KEYS[2], ARGV[1], q)
redis.call('INCR', KEYS[3])
return {0, tostring(redis.call('DECRBY', KEYS[1], q))}",
    )
});

/// KEYS: record. ARGV: claim, queued record JSON, TTL (ms). 1 if the
/// record was still this claim's and is now queued.
static MARK_QUEUED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if not (v and string.find(v, ARGV[1], 1, true)) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1",
    )
});

/// Cluster: KEYS: record. ARGV: claim. 1 if this claim's record was deleted.
static DROP_CLAIM: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if not (v and cjson.decode(v)['claim'] == ARGV[1]) then return 0 end
return redis.call('DEL', KEYS[1])",
    )
});

/// Cluster: KEYS: counter, admitted, version. ARGV: order id. Gives the
/// order's admitted units back.
static GIVE_BACK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local q = redis.call('HGET', KEYS[2], ARGV[1])
if q then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('INCR', KEYS[3])
  if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBY', KEYS[1], q) end
end
return 1",
    )
});

#[derive(Clone)]
pub struct RedisAcceptLog {
    redis: Redis,
    ns: Namespace,
}

fn encode(record: &AcceptRecord) -> Result<String, BackendFailed> {
    serde_json::to_string(record)
        .map_err(|e| BackendFailed::Misuse(format!("cannot encode an accept record: {e}")))
}

fn decode(raw: Option<String>) -> Option<AcceptRecord> {
    raw.and_then(|s| serde_json::from_str(&s).ok())
}

impl RedisAcceptLog {
    pub fn new(redis: Redis, ns: Namespace) -> Self {
        Self { redis, ns }
    }

    /// The script with a product's counter, admitted orders and version as keys.
    fn on_product<'s>(
        &self,
        script: &'s redis::Script,
        product: i64,
    ) -> redis::ScriptInvocation<'s> {
        let mut call = script.prepare_invoke();
        call.key(self.ns.tokens_key(product))
            .key(self.ns.admitted_key(product))
            .key(self.ns.tokens_version_key(product));
        call
    }
}

/// What an admission script's `{code, value}` answer means.
fn admitted(key: &IdempotencyKey, code: i64, value: String) -> Result<Admit, BackendFailed> {
    Ok(match code {
        0 => Admit::Claimed {
            left: number(&value)?,
        },
        1 => match decode(Some(value)) {
            Some(existing) => Admit::Taken(existing),
            None => {
                return Err(BackendFailed::Misuse(format!(
                    "an unreadable accept record for {key}"
                )));
            }
        },
        2 => Admit::NoCounter,
        _ => Admit::Short {
            available: number(&value)?.max(0),
        },
    })
}

impl RedisAcceptLog {
    /// [`AcceptStore::admit`] on a cluster: claim the key, then take the
    /// units; a claim that gets no units is dropped before answering.
    async fn admit_in_two(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<Admit, BackendFailed> {
        let mut conn = self.redis.clone();
        let (code, value): (i64, String) = timed(
            CLAIM
                .key(self.ns.accept_key(key.as_str()))
                .arg(encode(record)?)
                .arg(PENDING_TTL.as_millis() as u64)
                .arg(&record.claim)
                .invoke_async(&mut conn),
        )
        .await
        .map_err(BackendFailed::redis)?;
        if code != 0 {
            return admitted(key, code, value);
        }
        let mut take = self.on_product(&TAKE, record.product_id);
        take.arg(key.as_str()).arg(record.quantity);
        let taken = timed(take.invoke_async::<(i64, String)>(&mut conn))
            .await
            .map_err(BackendFailed::redis)
            .and_then(|(code, value)| admitted(key, code, value));
        if !matches!(taken, Ok(Admit::Claimed { .. })) {
            // No units (or no answer): the claim goes, so a retry starts
            // afresh. Units the take may have got without answering come
            // back with the reconciliation, as the claim is gone.
            self.drop_claim(key, record).await?;
        }
        taken
    }

    /// Deletes this request's record if it still holds its claim.
    async fn drop_claim(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<bool, BackendFailed> {
        let mut conn = self.redis.clone();
        timed(
            DROP_CLAIM
                .key(self.ns.accept_key(key.as_str()))
                .arg(&record.claim)
                .invoke_async::<i64>(&mut conn),
        )
        .await
        .map(|deleted| deleted == 1)
        .map_err(BackendFailed::redis)
    }

    /// [`AcceptStore::withdraw`] on a cluster: the claim first, then its
    /// units (units without a claim are given back by the reconciliation
    /// should the process die in between).
    async fn withdraw_in_two(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<(), BackendFailed> {
        if !self.drop_claim(key, record).await? {
            return Ok(());
        }
        let mut conn = self.redis.clone();
        let mut give = self.on_product(&GIVE_BACK, record.product_id);
        give.arg(key.as_str());
        timed(give.invoke_async::<i64>(&mut conn))
            .await
            .map(drop)
            .map_err(BackendFailed::redis)
    }
}

fn number(raw: &str) -> Result<i64, BackendFailed> {
    raw.parse()
        .map_err(|_| BackendFailed::Misuse(format!("not a number in Redis: {raw:?}")))
}

#[async_trait::async_trait]
impl AcceptLog for RedisAcceptLog {
    async fn admit(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<Admit, BackendFailed> {
        if self.redis.is_cluster() {
            return self.admit_in_two(key, record).await;
        }
        let mut conn = self.redis.clone();
        let p = record.product_id;
        let (code, value): (i64, String) = timed(
            ADMIT
                .key(self.ns.accept_key(key.as_str()))
                .key(self.ns.tokens_key(p))
                .key(self.ns.admitted_key(p))
                .key(self.ns.tokens_version_key(p))
                .arg(encode(record)?)
                .arg(PENDING_TTL.as_millis() as u64)
                .arg(key.as_str())
                .arg(record.quantity)
                .arg(&record.claim)
                .invoke_async(&mut conn),
        )
        .await
        .map_err(BackendFailed::redis)?;
        admitted(key, code, value)
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

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<AcceptRecord>>, BackendFailed> {
        let mut records = Vec::with_capacity(keys.len());
        let mut conn = self.redis.clone();
        for chunk in keys.chunks(500) {
            let names: Vec<String> = chunk.iter().map(|k| self.ns.accept_key(k)).collect();
            let raw: Vec<Option<String>> =
                timed(redis::cmd("MGET").arg(&names).query_async(&mut conn))
                    .await
                    .map_err(BackendFailed::redis)?;
            records.extend(raw.into_iter().map(decode));
        }
        Ok(records)
    }

    /// Marks a claimed key as accepted (RabbitMQ confirmed its message),
    /// if the record is still this claim's.
    async fn mark_queued(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<bool, BackendFailed> {
        let queued = AcceptRecord {
            state: AcceptState::Queued,
            ..record.clone()
        };
        let mut conn = self.redis.clone();
        timed(
            MARK_QUEUED
                .key(self.ns.accept_key(key.as_str()))
                .arg(&record.claim)
                .arg(encode(&queued)?)
                .arg(QUEUED_TTL.as_millis() as u64)
                .invoke_async::<i64>(&mut conn),
        )
        .await
        .map(|marked| marked == 1)
        .map_err(BackendFailed::redis)
    }

    async fn pending_ages(&self, keys: &[String]) -> Result<Vec<Option<Duration>>, BackendFailed> {
        let mut left: Vec<i64> = Vec::with_capacity(keys.len());
        if self.redis.is_cluster() {
            // A pipeline must stay within one hash slot on a cluster (the
            // keys of a product's admitted orders are spread over all of
            // them): one PTTL each, 64 in flight.
            use futures_util::{StreamExt, TryStreamExt};
            let names: Vec<String> = keys.iter().map(|k| self.ns.accept_key(k)).collect();
            let redis = self.redis.clone();
            left = futures_util::stream::iter(names)
                .map(move |name| {
                    let mut conn = redis.clone();
                    async move {
                        timed(redis::cmd("PTTL").arg(name).query_async::<i64>(&mut conn)).await
                    }
                })
                .buffered(64)
                .try_collect()
                .await
                .map_err(BackendFailed::redis)?;
        } else {
            let mut conn = self.redis.clone();
            for chunk in keys.chunks(500) {
                let mut pipe = redis::pipe();
                for key in chunk {
                    pipe.cmd("PTTL").arg(self.ns.accept_key(key));
                }
                let chunk_left: Vec<i64> = timed(pipe.query_async(&mut conn))
                    .await
                    .map_err(BackendFailed::redis)?;
                left.extend(chunk_left);
            }
        }
        // A queued record's TTL is a day: longer than any pending one.
        let pending = PENDING_TTL.as_millis() as i64;
        Ok(left
            .into_iter()
            .map(|ms| {
                (0..=pending)
                    .contains(&ms)
                    .then(|| Duration::from_millis((pending - ms) as u64))
            })
            .collect())
    }

    /// Withdraws this request's claim (the publish failed) and gives its
    /// units back: a retry starts afresh.
    async fn withdraw(
        &self,
        key: &IdempotencyKey,
        record: &AcceptRecord,
    ) -> Result<(), BackendFailed> {
        if self.redis.is_cluster() {
            return self.withdraw_in_two(key, record).await;
        }
        let mut conn = self.redis.clone();
        let p = record.product_id;
        timed(
            WITHDRAW
                .key(self.ns.accept_key(key.as_str()))
                .key(self.ns.tokens_key(p))
                .key(self.ns.admitted_key(p))
                .key(self.ns.tokens_version_key(p))
                .arg(&record.claim)
                .arg(key.as_str())
                .invoke_async::<i64>(&mut conn),
        )
        .await
        .map(drop)
        .map_err(BackendFailed::redis)
    }

    async fn claimants_alive(&self, instances: &[String]) -> Result<Vec<bool>, BackendFailed> {
        if instances.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = instances.iter().map(|i| self.ns.api_key(i)).collect();
        let mut conn = self.redis.clone();
        let beats: Vec<Option<String>> =
            timed(redis::cmd("MGET").arg(&names).query_async(&mut conn))
                .await
                .map_err(BackendFailed::redis)?;
        Ok(beats.iter().map(Option::is_some).collect())
    }
}

#[async_trait::async_trait]
impl AdmissionCounters for RedisAcceptLog {
    async fn admission(&self, product: ProductId) -> Result<Admission, BackendFailed> {
        let product = product.get();
        let mut conn = self.redis.clone();
        let (tokens, admitted, version): (Option<i64>, HashMap<String, i64>, Option<i64>) = timed(
            redis::pipe()
                .atomic()
                .get(self.ns.tokens_key(product))
                .hgetall(self.ns.admitted_key(product))
                .get(self.ns.tokens_version_key(product))
                .query_async(&mut conn),
        )
        .await
        .map_err(BackendFailed::redis)?;
        Ok(Admission {
            tokens,
            admitted: admitted.into_iter().collect(),
            version: version.unwrap_or(0),
        })
    }

    async fn tokens(&self, products: &[ProductId]) -> Result<Vec<Option<i64>>, BackendFailed> {
        let mut counters = Vec::with_capacity(products.len());
        let mut conn = self.redis.clone();
        for chunk in products.chunks(500) {
            let names: Vec<String> = chunk.iter().map(|p| self.ns.tokens_key(p.get())).collect();
            let raw: Vec<Option<i64>> =
                timed(redis::cmd("MGET").arg(&names).query_async(&mut conn))
                    .await
                    .map_err(BackendFailed::redis)?;
            counters.extend(raw);
        }
        Ok(counters)
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
        let mut conn = self.redis.clone();
        let mut call = self.on_product(&RECONCILE, product);
        call.arg(version).arg(tokens).arg(u8::from(create));
        for key in settled {
            call.arg(key);
        }
        timed(call.invoke_async::<i64>(&mut conn))
            .await
            .map(|set| set == 1)
            .map_err(BackendFailed::redis)
    }

    async fn release_admitted(
        &self,
        product: ProductId,
        done: &[String],
        returned: &[String],
    ) -> Result<Option<i64>, BackendFailed> {
        let product = product.get();
        let mut conn = self.redis.clone();
        let mut call = self.on_product(&RELEASE_ADMITTED, product);
        call.arg(done.len());
        for key in done.iter().chain(returned) {
            call.arg(key);
        }
        timed(call.invoke_async::<Option<i64>>(&mut conn))
            .await
            .map_err(BackendFailed::redis)
    }

    async fn drop_counter(&self, product: ProductId) -> Result<(), BackendFailed> {
        let product = product.get();
        let mut conn = self.redis.clone();
        timed(
            self.on_product(&RESET, product)
                .invoke_async::<()>(&mut conn),
        )
        .await
        .map_err(BackendFailed::redis)
    }

    async fn reset(&self, product: ProductId, tokens: i64) -> Result<(), BackendFailed> {
        let product = product.get();
        let mut conn = self.redis.clone();
        let mut call = self.on_product(&RESET, product);
        call.arg(tokens);
        timed(call.invoke_async::<()>(&mut conn))
            .await
            .map_err(BackendFailed::redis)
    }
}
