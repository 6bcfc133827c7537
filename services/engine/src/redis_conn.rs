//! Redis connections: one multiplexed, self-reconnecting connection per
//! process, with timeouts on every command.

use crate::config::mask_url;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
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

/// The client for `url`, with Nagle's algorithm off (small pipelined commands).
pub fn client(url: &str) -> redis::RedisResult<redis::Client> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    redis::Client::open(info)
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(REDIS_TIMEOUT))
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500))
}

/// Connects now: fails when Redis does not answer.
pub async fn connect(url: &str) -> Result<ConnectionManager, RedisUnreachable> {
    let fail = |source| RedisUnreachable {
        url: mask_url(url),
        source,
    };
    let client = client(url).map_err(fail)?;
    let mut conn = tokio::time::timeout(
        REDIS_TIMEOUT * 3,
        ConnectionManager::new_with_config(client, manager_config()),
    )
    .await
    .map_err(|_| fail(timeout_error()))?
    .map_err(fail)?;
    redis::cmd("PING")
        .query_async::<()>(&mut conn)
        .await
        .map_err(fail)?;
    Ok(conn)
}

/// Connects on first use: for the API, which starts without its backends.
pub fn connect_lazy(url: &str) -> Result<ConnectionManager, RedisUnreachable> {
    let fail = |source| RedisUnreachable {
        url: mask_url(url),
        source,
    };
    let client = client(url).map_err(fail)?;
    ConnectionManager::new_lazy_with_config(client, manager_config()).map_err(fail)
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

/// Keys matching `pattern`, by SCAN.
pub async fn scan(redis: &ConnectionManager, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let mut conn = redis.clone();
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = timed(
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn),
        )
        .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}
