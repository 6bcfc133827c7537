//! Our own routing of single-slot commands on a Redis Cluster: a slot
//! table read with `CLUSTER SLOTS` and one self-reconnecting connection per
//! master. A failed master then stalls only the calls whose keys hash to
//! it: the calls to the surviving masters go on their own connections,
//! whatever state the `redis` crate's cluster client is in (under load it
//! was seen to slow every master while it recovered from a failover).
//!
//! Only commands whose keys are known here and hash to one slot are routed
//! this way (the order path: the admission scripts, the lock scripts,
//! single-key reads and writes, and pipelines of those); anything else
//! (keys over several slots, keyless commands) goes to the crate's client.
//! The table is read again when a routed call fails, when a node answers
//! `MOVED`/`ASK`, and every [`REFRESH_EVERY`] in any case.

use super::{REDIS_TIMEOUT, manager_config};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Arg, Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// The table is read again at least this often.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// After a failed routed call, the table is read again, at most this often.
const REFRESH_AFTER_FAILURE: Duration = Duration::from_millis(250);
/// How long one node may take to answer `CLUSTER SLOTS`.
const ASK_NODE_TIMEOUT: Duration = Duration::from_millis(400);
const SLOTS: usize = 16384;

/// The slot table and the connections to the masters.
pub struct SlotRouter {
    /// The first seed's connection settings (password, database): every
    /// node is reached with them, at its own address.
    template: redis::ConnectionInfo,
    seeds: Vec<String>,
    table: RwLock<Option<Arc<Table>>>,
    nodes: Mutex<HashMap<String, ConnectionManager>>,
    born: std::time::Instant,
    /// Milliseconds since `born` of the last read of the table (attempted).
    read_at_ms: AtomicU64,
    reading: AtomicBool,
}

/// Which master serves each slot.
struct Table {
    masters: Vec<String>,
    /// Index into `masters` per slot; `u16::MAX` when no master serves it.
    owner: Vec<u16>,
}

impl Table {
    fn master(&self, slot: u16) -> Option<&str> {
        let i = *self.owner.get(slot as usize)?;
        self.masters.get(i as usize).map(String::as_str)
    }
}

/// A routed call's outcome: an answer, or "use the crate's client".
pub enum Routed<T> {
    Answer(redis::RedisResult<T>),
    NotRouted,
}

impl SlotRouter {
    pub fn new(seeds: &[&str]) -> redis::RedisResult<Self> {
        let first = seeds.first().copied().unwrap_or("redis://127.0.0.1:6379");
        Ok(Self {
            template: first.into_connection_info()?,
            seeds: seeds.iter().map(|s| host_port(s)).collect(),
            table: RwLock::new(None),
            nodes: Mutex::new(HashMap::new()),
            born: std::time::Instant::now(),
            read_at_ms: AtomicU64::new(0),
            reading: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn table(&self) -> Option<Arc<Table>> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The connection to the master serving `slot`, if the table knows it.
    fn connection_for(&self, slot: u16) -> Option<ConnectionManager> {
        let table = self.table()?;
        let address = table.master(slot)?;
        self.node(address)
    }

    fn node(&self, address: &str) -> Option<ConnectionManager> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(conn) = nodes.get(address) {
            return Some(conn.clone());
        }
        let (host, port) = address.rsplit_once(':')?;
        let info = self
            .template
            .clone()
            .set_addr(ConnectionAddr::Tcp(host.to_owned(), port.parse().ok()?))
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client = redis::Client::open(info).ok()?;
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config()).ok()?;
        nodes.insert(address.to_owned(), conn.clone());
        Some(conn)
    }

    /// Reads the table again in the background when it is older than
    /// `age` and no read is under way.
    fn refresh_if_older(self: &Arc<Self>, age: Duration) {
        let since = self
            .now_ms()
            .saturating_sub(self.read_at_ms.load(Ordering::Acquire));
        let never = self.table().is_none();
        if (never || since >= age.as_millis() as u64) && !self.reading.swap(true, Ordering::AcqRel)
        {
            self.read_at_ms.store(self.now_ms(), Ordering::Release);
            let router = self.clone();
            tokio::spawn(async move {
                router.read_table().await;
                router.read_at_ms.store(router.now_ms(), Ordering::Release);
                router.reading.store(false, Ordering::Release);
            });
        }
    }

    /// Asks the known masters, then the seeds, for the slot table; the
    /// first full answer wins.
    async fn read_table(&self) {
        let mut candidates: Vec<String> =
            self.table().map(|t| t.masters.clone()).unwrap_or_default();
        candidates.extend(self.seeds.iter().cloned());
        candidates.dedup();
        for address in candidates {
            let Some(mut conn) = self.node(&address) else {
                continue;
            };
            let asked = tokio::time::timeout(
                ASK_NODE_TIMEOUT,
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async::<Value>(&mut conn),
            )
            .await;
            let Ok(Ok(value)) = asked else { continue };
            let host = address.rsplit_once(':').map_or("", |(h, _)| h);
            if let Some(table) = parse_slots(&value, host) {
                *self.table.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(table));
                return;
            }
        }
        tracing::debug!("Redis Cluster slot table not read: no node answered in full");
    }

    /// Runs `cmd` on the master of its slot, when it has one.
    pub async fn command(self: &Arc<Self>, cmd: &Cmd) -> Routed<Value> {
        self.refresh_if_older(REFRESH_EVERY);
        let Some(slot) = slot_of(cmd) else {
            return Routed::NotRouted;
        };
        let Some(mut conn) = self.connection_for(slot) else {
            return Routed::NotRouted;
        };
        let result = tokio::time::timeout(REDIS_TIMEOUT, conn.req_packed_command(cmd))
            .await
            .unwrap_or_else(|_| Err(super::timeout_error()));
        self.judge(result)
    }

    /// Runs a pipeline on the master of its slot, when all its commands
    /// share one.
    pub async fn pipeline(
        self: &Arc<Self>,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> Routed<Vec<Value>> {
        self.refresh_if_older(REFRESH_EVERY);
        let mut slots = pipeline.cmd_iter().map(slot_of);
        let Some(Some(slot)) = slots.next() else {
            return Routed::NotRouted;
        };
        if !slots.all(|s| s == Some(slot)) {
            return Routed::NotRouted;
        }
        let Some(mut conn) = self.connection_for(slot) else {
            return Routed::NotRouted;
        };
        let result = tokio::time::timeout(
            REDIS_TIMEOUT,
            conn.req_packed_commands(pipeline, offset, count),
        )
        .await
        .unwrap_or_else(|_| Err(super::timeout_error()));
        self.judge(result)
    }

    /// A redirection means the table is stale: read it again, and let the
    /// crate's client (which follows redirections) run this call. A broken
    /// connection also has the table read again (a failover may have
    /// moved the slot); the call fails as it would on a standalone server.
    fn judge<T>(self: &Arc<Self>, result: redis::RedisResult<T>) -> Routed<T> {
        match &result {
            Err(e) if e.redirect_node().is_some() => {
                self.refresh_if_older(Duration::ZERO);
                Routed::NotRouted
            }
            Err(e) if !super::from_redis(&result) || e.is_cluster_error() => {
                self.refresh_if_older(REFRESH_AFTER_FAILURE);
                Routed::Answer(result)
            }
            _ => Routed::Answer(result),
        }
    }
}

/// `host:port` of a `redis://…` URL (or of a bare `host:port`).
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}

/// The slot table from a `CLUSTER SLOTS` answer: `[start, end, [host, port,
/// …], replicas…]` per range. An empty host is the node asked.
fn parse_slots(value: &Value, asked_host: &str) -> Option<Table> {
    let Value::Array(ranges) = value else {
        return None;
    };
    let mut masters: Vec<String> = Vec::new();
    let mut owner = vec![u16::MAX; SLOTS];
    for range in ranges {
        let Value::Array(fields) = range else {
            return None;
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            return None;
        };
        let host = match master.first()? {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::SimpleString(s) => s.clone(),
            _ => return None,
        };
        let host = if host.is_empty() || host == "?" {
            asked_host.to_owned()
        } else {
            host
        };
        let Value::Int(port) = master.get(1)? else {
            return None;
        };
        let address = format!("{host}:{port}");
        let index = match masters.iter().position(|m| *m == address) {
            Some(i) => i,
            None => {
                masters.push(address);
                masters.len() - 1
            }
        };
        let (start, end) = (usize::try_from(*start).ok()?, usize::try_from(*end).ok()?);
        for slot in owner.get_mut(start..=end)? {
            *slot = index as u16;
        }
    }
    Some(Table { masters, owner })
}

/// The one hash slot every key of `cmd` lives in, for the commands routed
/// here; `None` for any other command, or keys over several slots.
pub fn slot_of(cmd: &Cmd) -> Option<u16> {
    let mut args = cmd.args_iter().map(|a| match a {
        Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let name = args.next()??;
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    let rest: Vec<&[u8]> = args.collect::<Option<_>>()?;
    let keys: &[&[u8]] = if is("EVALSHA") || is("EVAL") {
        let n: usize = std::str::from_utf8(rest.get(1)?).ok()?.parse().ok()?;
        rest.get(2..2 + n)?
    } else if ONE_KEY.iter().any(|c| is(c)) {
        rest.get(..1)?
    } else if EVERY_ARG_A_KEY.iter().any(|c| is(c)) {
        &rest
    } else {
        return None;
    };
    let first = key_slot(keys.first()?);
    keys[1..]
        .iter()
        .all(|k| key_slot(k) == first)
        .then_some(first)
}

/// Commands whose only key is their first argument.
const ONE_KEY: &[&str] = &[
    "GET", "SET", "GETDEL", "INCR", "INCRBY", "DECRBY", "EXPIRE", "PEXPIRE", "TTL", "PTTL", "HGET",
    "HSET", "HDEL", "HGETALL", "HMGET", "HINCRBY", "HLEN",
];
/// Commands whose arguments are all keys.
const EVERY_ARG_A_KEY: &[&str] = &["DEL", "UNLINK", "EXISTS", "MGET"];

/// A key's hash slot: CRC16 (XMODEM) of the key, or of its `{hash tag}`,
/// modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = key[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &key[open + 1..open + 1 + close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS as u16
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_cluster_slots() {
        // The CRC16/XMODEM check value, and slots Redis itself reports.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    #[test]
    fn only_single_slot_commands_are_routed() {
        let script = redis::Script::new("return 1");
        let mut eval = redis::cmd("EVALSHA");
        eval.arg(script.get_hash())
            .arg(2)
            .arg("fs:tokens:{7}")
            .arg("fs:admitted:{7}")
            .arg("x");
        assert_eq!(slot_of(&eval), Some(key_slot(b"7")));
        let mut split = redis::cmd("EVALSHA");
        split.arg("h").arg(2).arg("a").arg("b");
        assert_eq!(slot_of(&split), None);
        assert_eq!(slot_of(redis::cmd("GET").arg("foo")), Some(12182));
        assert_eq!(slot_of(redis::cmd("MGET").arg("a").arg("b")), None);
        assert_eq!(slot_of(&redis::cmd("PING")), None);
        assert_eq!(slot_of(redis::cmd("SCRIPT").arg("LOAD").arg("x")), None);
    }

    #[test]
    fn the_table_is_read_from_cluster_slots() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let answer = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7001),
                node("127.0.0.1", 7004),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node("", 7002)]),
        ]);
        let table = parse_slots(&answer, "10.0.0.9").expect("a full table");
        assert_eq!(table.master(0), Some("127.0.0.1:7001"));
        assert_eq!(table.master(5460), Some("127.0.0.1:7001"));
        assert_eq!(table.master(5461), Some("10.0.0.9:7002"));
        assert_eq!(table.master(16383), Some("10.0.0.9:7002"));
        assert_eq!(host_port("redis://:pw@127.0.0.1:7003/0"), "127.0.0.1:7003");
    }
}
