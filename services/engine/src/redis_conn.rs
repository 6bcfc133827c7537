//! Redis connections: one multiplexed, self-reconnecting connection per
//! process, with timeouts on every command. `REDIS_URL` with one URL is a
//! standalone server; several comma-separated URLs are the seed nodes of a
//! Redis Cluster, reached through the `redis` crate's cluster client (it
//! follows `MOVED`, finds the new master after a failover and splits
//! `MGET`/`DEL`/`KEYS` over the masters). Either way the rest of the engine
//! sees one [`Redis`] connection.

use crate::config::mask_url;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, Value};
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
    Cluster(ClusterConnection),
}

impl Redis {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl ConnectionLike for Redis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
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
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
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
            Ok(Redis::Cluster(client.get_async_connection().await?))
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
        return Ok(Redis::Cluster(
            client.get_pending_async_connection_with_config(config),
        ));
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
        Redis::Cluster(c) => {
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
            let value = timed(c.route_command(cmd, routing)).await?;
            Ok(redis::from_redis_value(value)?)
        }
        Redis::Standalone(_) => timed(cmd.query_async(&mut conn)).await,
    }
}

/// The masters serving data now, by address.
pub async fn masters(redis: &Redis) -> redis::RedisResult<Vec<Master>> {
    let mut conn = redis.clone();
    let Redis::Cluster(cluster) = &mut conn else {
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
        let keys = on_node(cluster, &address, redis::cmd("DBSIZE")).await.ok();
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
                (Some(address), Redis::Cluster(c)) => on_node(c, address, cmd).await?,
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
