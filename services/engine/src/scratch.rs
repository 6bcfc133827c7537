//! Scratch deployments: a fresh database and namespace that leave nothing
//! behind once removed. Tests run each in its own; `fsctl doctor` measures
//! on one. Every scratch name starts with [`SCRATCH_PREFIX`], so the test
//! script can sweep what a crashed run left.

use crate::config::{BackendUrls, mask_url};
use crate::queue::rabbitmq as broker;
use crate::{postgres, redis_conn};
use lapin::options::QueueDeleteOptions;
use sqlx::{ConnectOptions, Connection};

/// Prefix of every scratch database, Redis key and queue.
pub const SCRATCH_PREFIX: &str = "fsx_";

/// A database and namespace of its own, on the given servers.
#[derive(Debug, Clone)]
pub struct Scratch {
    pub backends: BackendUrls,
    pub database: String,
}

/// `url` with its database name replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (main, query) = match url.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (url, None),
    };
    let base = match main.split_once("://") {
        Some((_, rest)) if rest.contains('/') => &main[..main.rfind('/').unwrap_or(main.len())],
        _ => main,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

impl Scratch {
    /// Names a fresh scratch deployment; nothing is created until used.
    pub fn new(servers: &BackendUrls) -> Self {
        let name = format!(
            "{SCRATCH_PREFIX}{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        Self {
            backends: BackendUrls {
                database_url: with_database(&servers.database_url, &name),
                namespace: name.clone(),
                ..servers.clone()
            },
            database: name,
        }
    }

    /// Removes the database, the queues and every Redis key of the namespace.
    pub async fn remove(&self) -> anyhow::Result<()> {
        let ns = self.backends.namespace();
        let conn = broker::connect(&self.backends.amqp_url, "flashsale-scratch").await?;
        let channel = conn.create_channel().await?;
        // Every partition a test may have used, whatever K it ended with
        // (deleting a queue that does not exist succeeds).
        let every = crate::Namespace::partitioned(ns.as_str(), crate::config::MAX_PARTITIONS);
        let mut queues = every.order_queues();
        queues.extend([ns.orders_queue(), ns.dead_letter_queue()]);
        for queue in queues {
            channel
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await?;
        }
        let _ = conn.close(200, "scratch removed".into()).await;

        let mut redis = redis_conn::connect(&self.backends.redis_url).await?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(ns.key_pattern())
            .query_async(&mut redis)
            .await?;
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(&keys)
                .query_async::<()>(&mut redis)
                .await?;
        }

        let url = &self.backends.database_url;
        let mut admin = postgres::connect_options(url)?
            .database("postgres")
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach PostgreSQL at {}: {e}", mask_url(url)))?;
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.database);
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await?;
        let _ = admin.close().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_name() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/flashsale", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:5432", "x"),
            "postgres://h:5432/x"
        );
    }
}
