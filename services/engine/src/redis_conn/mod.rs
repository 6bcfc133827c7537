//! Redis connections: one multiplexed, self-reconnecting connection per
//! process, with timeouts on every command. `REDIS_URL` with one URL is a
//! standalone server; several comma-separated URLs are the seed nodes of a
//! Redis Cluster, reached through the `redis` crate's cluster client (it
//! follows `MOVED`, finds the new master after a failover and splits
//! `MGET`/`DEL`/`KEYS` over the masters). Either way the rest of the engine
//! sees one [`Redis`] connection.
//!
//! Under load the crate's cluster client was seen to recover from a master
//! failover as one state machine: every call timed out for seconds, also
//! those to the surviving masters, and at times it stayed broken for
//! minutes while a fresh client from the seeds worked at once. So on a
//! cluster:
//! - the order path's commands (one slot each) go on our own connection
//!   to the master of their slot ([`slots`]): a failed master stalls only
//!   the calls whose keys hash to it;
//! - the crate's client runs the rest, and when its calls have kept
//!   failing for [`REBUILD_AFTER`], a new one is built from the seeds in
//!   the background and replaces it ([`ClusterHandle`]).

pub mod slots;

use crate::config::mask_url;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, Value};
use slots::{Routed, SlotRouter};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Every Redis command gives up after this long.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
#[error("cannot reach Redis at {url}: {source}")]
pub struct RedisUnreachable {
    pub url: String,
    #[source]
    pub source: redis::RedisError,
}

/// A connection to a standalone Redis or to a Redis Cluster. Cheap to
/// clone: clones share one connection (per node, on a cluster).
#[derive(Clone)]
pub enum Redis {
    Standalone(ConnectionManager),
    Cluster(ClusterHandle),
}

impl Redis {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

/// A cluster connection with calls failing this long (and at least
/// [`REBUILD_MIN_FAILURES`] calls since the last success) is replaced by a
/// fresh one from the seeds; at most one rebuild runs at a time, and the
/// next no sooner than this after it.
pub const REBUILD_AFTER: Duration = Duration::from_secs(2);
const REBUILD_MIN_FAILURES: u64 = 10;

/// The cluster client in use, and how its calls fare.
#[derive(Clone)]
pub struct ClusterHandle(std::sync::Arc<ClusterShared>);

struct ClusterShared {
    router: std::sync::Arc<SlotRouter>,
    seeds: Vec<String>,
    current: std::sync::RwLock<ClusterConnection>,
    born: std::time::Instant,
    /// Milliseconds since `born` of the last call that got an answer (or
    /// of the last rebuild).
    last_answer_ms: AtomicU64,
    /// Calls started since then.
    calls_since_answer: AtomicU64,
    rebuilding: AtomicBool,
}

impl ClusterHandle {
    fn new(seeds: &[&str], connection: ClusterConnection) -> redis::RedisResult<Self> {
        Ok(Self(std::sync::Arc::new(ClusterShared {
            router: std::sync::Arc::new(SlotRouter::new(seeds)?),
            seeds: seeds.iter().map(|s| (*s).to_owned()).collect(),
            current: std::sync::RwLock::new(connection),
            born: std::time::Instant::now(),
            last_answer_ms: AtomicU64::new(0),
            calls_since_answer: AtomicU64::new(0),
            rebuilding: AtomicBool::new(false),
        })))
    }

    fn now_ms(&self) -> u64 {
        self.0.born.elapsed().as_millis() as u64
    }

    /// The client in use now.
    pub fn connection(&self) -> ClusterConnection {
        self.0
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A call starts: if calls have kept failing, rebuild in the background.
    fn starting(&self) {
        let calls = self.0.calls_since_answer.fetch_add(1, Ordering::AcqRel) + 1;
        let silent = self
            .now_ms()
            .saturating_sub(self.0.last_answer_ms.load(Ordering::Acquire));
        if calls >= REBUILD_MIN_FAILURES
            && silent >= REBUILD_AFTER.as_millis() as u64
            && !self.0.rebuilding.swap(true, Ordering::AcqRel)
        {
            tokio::spawn(self.clone().rebuild());
        }
    }

    /// A call got an answer from Redis (a value, or an error Redis sent).
    fn answered(&self) {
        self.0
            .last_answer_ms
            .store(self.now_ms(), Ordering::Release);
        self.0.calls_since_answer.store(0, Ordering::Release);
    }

    async fn rebuild(self) {
        let seeds: Vec<&str> = self.0.seeds.iter().map(String::as_str).collect();
        let fresh = async {
            let client = cluster_client(&seeds)?;
            client.get_async_connection().await
        };
        match tokio::time::timeout(REDIS_TIMEOUT * 3, fresh).await {
            Ok(Ok(connection)) => {
                *self.0.current.write().unwrap_or_else(|p| p.into_inner()) = connection;
                tracing::warn!(
                    "Redis Cluster calls kept failing: the cluster client was rebuilt from the seeds"
                );
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "Redis Cluster client not rebuilt"),
            Err(_) => tracing::warn!("Redis Cluster client not rebuilt: no answer in time"),
        }
        // Give the new client (or the next attempt) a fair window.
        self.answered();
        self.0.rebuilding.store(false, Ordering::Release);
    }
}

/// Whether `result` came back from Redis itself (a value or a server
/// error), rather than from a broken or silent connection.
fn from_redis<T>(result: &redis::RedisResult<T>) -> bool {
    match result {
        Ok(_) => true,
        Err(e) => {
            !(e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.kind() == redis::ErrorKind::ClusterConnectionNotFound)
        }
    }
}

impl ConnectionLike for Redis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone(c) => c.req_packed_command(cmd),
            Self::Cluster(handle) => {
                let handle = handle.clone();
                Box::pin(async move {
                    if let Routed::Answer(result) = handle.0.router.command(cmd).await {
                        return result;
                    }
                    handle.starting();
                    let result = handle.connection().req_packed_command(cmd).await;
                    if from_redis(&result) {
                        handle.answered();
                    }
                    result
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Standalone(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(handle) => {
                let handle = handle.clone();
                Box::pin(async move {
                    let routed = handle.0.router.pipeline(cmd, offset, count).await;
                    if let Routed::Answer(result) = routed {
                        return result;
                    }
                    handle.starting();
                    let result = handle
                        .connection()
                        .req_packed_commands(cmd, offset, count)
                        .await;
                    if from_redis(&result) {
                        handle.answered();
                    }
                    result
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(c) => c.get_db(),
            Self::Cluster(_) => 0,
        }
    }
}

/// The URLs `REDIS_URL` lists: one for a standalone server, several for a
/// cluster's seed nodes.
pub fn seeds(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// The client for one node, with Nagle's algorithm off (small pipelined
/// commands).
pub fn client(url: &str) -> redis::RedisResult<redis::Client> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    redis::Client::open(info)
}

fn cluster_client(seeds: &[&str]) -> redis::RedisResult<redis::cluster::ClusterClient> {
    redis::cluster::ClusterClient::builder(seeds.iter().copied())
        .connection_timeout(REDIS_TIMEOUT)
        .response_timeout(REDIS_TIMEOUT)
        // A failover takes a few seconds: keep each call within its budget
        // and let the caller retry, as with a standalone server.
        .overall_response_timeout(Some(REDIS_TIMEOUT))
        .retries(2)
        .min_retry_wait(20)
        .max_retry_wait(200)
        .tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
        .build()
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(REDIS_TIMEOUT))
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500))
}

/// Connects now: fails when Redis does not answer.
pub async fn connect(url: &str) -> Result<Redis, RedisUnreachable> {
    let fail = |source| RedisUnreachable {
        url: mask_url(url),
        source,
    };
    let nodes = seeds(url);
    let connecting = async {
        if nodes.len() > 1 {
            let client = cluster_client(&nodes)?;
            let connection = client.get_async_connection().await?;
            Ok(Redis::Cluster(ClusterHandle::new(&nodes, connection)?))
        } else {
            let client = client(url)?;
            Ok(Redis::Standalone(
                ConnectionManager::new_with_config(client, manager_config()).await?,
            ))
        }
    };
    let mut conn = tokio::time::timeout(REDIS_TIMEOUT * 3, connecting)
        .await
        .map_err(|_| fail(timeout_error()))?
        .map_err(fail)?;
    timed(redis::cmd("PING").query_async::<()>(&mut conn))
        .await
        .map_err(fail)?;
    Ok(conn)
}

/// Connects on first use: for the API, which starts without its backends.
pub fn connect_lazy(url: &str) -> Result<Redis, RedisUnreachable> {
    let fail = |source| RedisUnreachable {
        url: mask_url(url),
        source,
    };
    let nodes = seeds(url);
    if nodes.len() > 1 {
        let client = cluster_client(&nodes).map_err(fail)?;
        let config = redis::cluster::ClusterConfig::new()
            .set_connection_timeout(REDIS_TIMEOUT)
            .set_response_timeout(REDIS_TIMEOUT);
        let connection = client.get_pending_async_connection_with_config(config);
        return ClusterHandle::new(&nodes, connection)
            .map(Redis::Cluster)
            .map_err(fail);
    }
    let client = client(url).map_err(fail)?;
    ConnectionManager::new_lazy_with_config(client, manager_config())
        .map(Redis::Standalone)
        .map_err(fail)
}

/// A pub/sub connection subscribed to `channel`, on the first seed that
/// answers (on a cluster a `PUBLISH` reaches every node: any one will do).
pub async fn subscribe(url: &str, channel: &str) -> redis::RedisResult<redis::aio::PubSub> {
    let mut last = None;
    for seed in seeds(url) {
        let attempt = async {
            let mut pubsub = timed(client(seed)?.get_async_pubsub()).await?;
            timed(pubsub.subscribe(channel)).await?;
            redis::RedisResult::Ok(pubsub)
        };
        match attempt.await {
            Ok(pubsub) => return Ok(pubsub),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(timeout_error))
}

pub(crate) fn timeout_error() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "Redis did not answer in time",
    ))
}

/// Runs one Redis call under [`REDIS_TIMEOUT`].
pub async fn timed<T>(call: impl Future<Output = redis::RedisResult<T>>) -> redis::RedisResult<T> {
    tokio::time::timeout(REDIS_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(timeout_error()))
}

/// One master of the deployment: the standalone server, or a cluster
/// master with the hash slots it serves.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Master {
    /// `host:port`.
    pub address: String,
    /// Hash slots served (16384 on a standalone server).
    pub slots: u32,
    /// Replicas following it.
    pub replicas: u32,
    /// Keys it holds (`DBSIZE`); `None` when it did not answer.
    pub keys: Option<i64>,
}

/// A cluster master's `host:port` and slot count, from one `CLUSTER NODES` line.
fn master_of(line: &str) -> Option<(String, String, u32)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let flags = fields.get(2)?;
    if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
        return None;
    }
    let address = fields.get(1)?.split(['@', ',']).next()?.to_owned();
    let slots = fields
        .iter()
        .skip(8)
        .filter(|r| !r.starts_with('['))
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<u32>().unwrap_or(0) + 1 - a.parse::<u32>().unwrap_or(0),
            None => 1,
        })
        .sum();
    Some((fields[0].to_owned(), address, slots))
}

fn by_address(address: &str) -> RoutingInfo {
    let (host, port) = address.rsplit_once(':').unwrap_or((address, "6379"));
    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
        host: host.to_owned(),
        port: port.parse().unwrap_or(6379),
    })
}

/// Runs `cmd` on one cluster node.
async fn on_node<T: redis::FromRedisValue>(
    conn: &mut ClusterConnection,
    address: &str,
    cmd: Cmd,
) -> redis::RedisResult<T> {
    let value = timed(conn.route_command(cmd, by_address(address))).await?;
    Ok(redis::from_redis_value(value)?)
}

/// Runs a keyless command on one node: the server, or any cluster node
/// (where the client would otherwise send it to every master).
pub async fn on_any_node<T: redis::FromRedisValue>(
    redis: &Redis,
    cmd: Cmd,
) -> redis::RedisResult<T> {
    let mut conn = redis.clone();
    match &mut conn {
        Redis::Cluster(handle) => {
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
            let value = timed(handle.connection().route_command(cmd, routing)).await?;
            Ok(redis::from_redis_value(value)?)
        }
        Redis::Standalone(_) => timed(cmd.query_async(&mut conn)).await,
    }
}

/// The masters serving data now, by address.
pub async fn masters(redis: &Redis) -> redis::RedisResult<Vec<Master>> {
    let mut conn = redis.clone();
    let Redis::Cluster(handle) = &mut conn else {
        let keys = timed(redis::cmd("DBSIZE").query_async(&mut conn))
            .await
            .ok();
        return Ok(vec![Master {
            address: "standalone".into(),
            slots: 16384,
            replicas: 0,
            keys,
        }]);
    };
    let nodes: String = on_any_node(redis, redis::cmd("CLUSTER").arg("NODES").clone()).await?;
    let lines: Vec<&str> = nodes.lines().collect();
    let mut out = Vec::new();
    for (id, address, slots) in lines.iter().filter_map(|l| master_of(l)) {
        let replicas = lines
            .iter()
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(3) == Some(&id.as_str()) && !f.get(2).is_some_and(|fl| fl.contains("fail"))
            })
            .count() as u32;
        let keys = on_node(&mut handle.connection(), &address, redis::cmd("DBSIZE"))
            .await
            .ok();
        out.push(Master {
            address,
            slots,
            replicas,
            keys,
        });
    }
    out.sort_by(|a, b| a.address.cmp(&b.address));
    Ok(out)
}

/// Keys matching `pattern`, by SCAN (on every master of a cluster).
pub async fn scan(redis: &Redis, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let mut conn = redis.clone();
    let mut keys = Vec::new();
    let nodes: Vec<Option<String>> = if redis.is_cluster() {
        masters(redis)
            .await?
            .into_iter()
            .map(|m| Some(m.address))
            .collect()
    } else {
        vec![None]
    };
    for node in nodes {
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, batch): (u64, Vec<String>) = match (&node, &mut conn) {
                (Some(address), Redis::Cluster(handle)) => {
                    on_node(&mut handle.connection(), address, cmd).await?
                }
                _ => timed(cmd.query_async(&mut conn)).await?,
            };
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_is_standalone_several_are_a_cluster() {
        assert_eq!(
            seeds("redis://127.0.0.1:6379"),
            vec!["redis://127.0.0.1:6379"]
        );
        assert_eq!(
            seeds("redis://a:7001, redis://b:7002,"),
            vec!["redis://a:7001", "redis://b:7002"]
        );
    }

    #[test]
    fn masters_are_read_from_cluster_nodes() {
        let line = "07c3 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460 [93->-e2]";
        assert_eq!(
            master_of(line),
            Some(("07c3".into(), "127.0.0.1:7001".into(), 5461))
        );
        let split = "a1 10.0.0.2:7002@17002,host2 master - 0 0 2 connected 5461 5462-5463";
        assert_eq!(
            master_of(split).map(|m| (m.1, m.2)),
            Some(("10.0.0.2:7002".into(), 3))
        );
        assert_eq!(
            master_of("b2 127.0.0.1:7004@17004 slave 07c3 0 0 1 connected"),
            None
        );
        assert_eq!(
            master_of("c3 127.0.0.1:7003@17003 master,fail - 0 0 3 connected"),
            None
        );
    }
}
