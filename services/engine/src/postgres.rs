//! PostgreSQL connections: creating the database when it is missing, applying
//! the migrations (safe when several processes start at once), and session
//! settings that keep every transaction shorter than the product lock's lease.

use crate::config::{Namespace, mask_url};
use crate::locks::LOCK_LEASE;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use std::str::FromStr;
use std::time::Duration;

/// The schema in `migrations/`, embedded at compile time (no database needed).
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// How long a statement may wait for a row lock; below the lock's lease.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(3);
/// A transaction left idle this long is ended by the server; below the lease.
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("cannot reach PostgreSQL at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot apply migrations to {url}: {source}")]
    Migrate {
        url: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
}

/// This process's `FLASHSALE_PARTITIONS` differs from what the deployment
/// recorded: it must not publish or consume by another partitioning.
#[derive(Debug, thiserror::Error)]
#[error(
    "FLASHSALE_PARTITIONS is {asked}, but namespace {namespace} has {recorded} order queue partition(s) recorded in PostgreSQL; start with FLASHSALE_PARTITIONS={recorded}, or change it with `fsctl migrate --partitions {asked}` once drained"
)]
pub struct PartitionMismatch {
    pub namespace: String,
    pub asked: u16,
    pub recorded: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum PartitionsError {
    #[error(transparent)]
    Mismatch(#[from] PartitionMismatch),
    #[error("cannot read the recorded partitions: {0}")]
    Database(#[from] sqlx::Error),
}

/// The partitions recorded for `ns` (recording `ns`'s own on first use).
pub async fn recorded_partitions(pool: &PgPool, ns: &Namespace) -> Result<u16, sqlx::Error> {
    sqlx::query(
        "INSERT INTO queue_partitions (namespace, partitions) VALUES ($1, $2)
         ON CONFLICT (namespace) DO NOTHING",
    )
    .bind(ns.as_str())
    .bind(i32::from(ns.partitions()))
    .execute(pool)
    .await?;
    let k: i32 = sqlx::query_scalar("SELECT partitions FROM queue_partitions WHERE namespace = $1")
        .bind(ns.as_str())
        .fetch_one(pool)
        .await?;
    Ok(u16::try_from(k).unwrap_or(1))
}

/// Refuses a process whose partitions differ from the recorded ones.
pub async fn check_partitions(pool: &PgPool, ns: &Namespace) -> Result<(), PartitionsError> {
    let recorded = recorded_partitions(pool, ns).await?;
    if recorded != ns.partitions() {
        return Err(PartitionMismatch {
            namespace: ns.as_str().to_owned(),
            asked: ns.partitions(),
            recorded,
        }
        .into());
    }
    Ok(())
}

/// Records `ns`'s partitions (`fsctl migrate --partitions K`, once drained).
pub async fn set_partitions(pool: &PgPool, ns: &Namespace) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO queue_partitions (namespace, partitions) VALUES ($1, $2)
         ON CONFLICT (namespace) DO UPDATE SET partitions = EXCLUDED.partitions",
    )
    .bind(ns.as_str())
    .bind(i32::from(ns.partitions()))
    .execute(pool)
    .await
    .map(drop)
}

fn unreachable(url: &str) -> impl FnOnce(sqlx::Error) -> DatabaseError + '_ {
    move |source| DatabaseError::Unreachable {
        url: mask_url(url),
        source,
    }
}

/// Connection options with the engine's session settings.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, DatabaseError> {
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    Ok(PgConnectOptions::from_str(url)
        .map_err(unreachable(url))?
        .options([
            ("lock_timeout", ms(LOCK_TIMEOUT)),
            (
                "idle_in_transaction_session_timeout",
                ms(IDLE_IN_TRANSACTION_TIMEOUT),
            ),
            ("statement_timeout", ms(LOCK_LEASE)),
        ])
        .application_name("flashsale"))
}

fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(3))
}

/// Creates the database named in `url` when it does not exist yet.
pub async fn ensure_database(url: &str) -> Result<(), DatabaseError> {
    let options = connect_options(url)?;
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let mut admin = options
        .database("postgres")
        .connect()
        .await
        .map_err(unreachable(url))?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut admin)
        .await
        .map_err(unreachable(url))?;
    if exists.is_none() {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another process created it between our check and our CREATE.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => {}
            Err(e) => return Err(unreachable(url)(e)),
        }
    }
    let _ = admin.close().await;
    Ok(())
}

/// Creates the database if needed, connects and applies the migrations.
pub async fn connect_and_migrate(url: &str, max_connections: u32) -> Result<PgPool, DatabaseError> {
    connect_with_migrations(url, max_connections, connect_options(url)?).await
}

/// Like [`connect_and_migrate`], for a pool whose statements all look rows
/// up by key or id (the worker's): sequential scans are off. Without
/// statistics (a fresh orders table, before autovacuum analyzes it)
/// PostgreSQL plans a scan of the whole table for a batch's
/// `idempotency_key = ANY($1)`, and each batch scans a bigger table: the
/// first 40,000 orders on a new database drained at 2,600 orders/s (83
/// scans reading 1.6 million rows) instead of 25,000.
pub async fn connect_for_lookups(url: &str, max_connections: u32) -> Result<PgPool, DatabaseError> {
    let options = connect_options(url)?.options([("enable_seqscan", "off")]);
    connect_with_migrations(url, max_connections, options).await
}

async fn connect_with_migrations(
    url: &str,
    max_connections: u32,
    options: PgConnectOptions,
) -> Result<PgPool, DatabaseError> {
    ensure_database(url).await?;
    let pool = pool_options(max_connections)
        .connect_with(options)
        .await
        .map_err(unreachable(url))?;
    migrate(&pool, url).await?;
    Ok(pool)
}

/// Applies the migrations; sqlx holds an advisory lock while it does.
pub async fn migrate(pool: &PgPool, url: &str) -> Result<(), DatabaseError> {
    let failed = |source| DatabaseError::Migrate {
        url: mask_url(url),
        source,
    };
    accept_reworded_comment(pool)
        .await
        .map_err(|e| failed(sqlx::migrate::MigrateError::Execute(e)))?;
    MIGRATOR.run(pool).await.map_err(failed)
}

/// The first migration's checksum before its header comment was reworded
/// (it named a file outside the repository; the SQL is unchanged).
const INIT_CHECKSUM_BEFORE_REWORDING: &str = "a5a71d18362edd68f2cc132e7960ee431c2d8c9c5d66c7d6f4be495e8bfa1dd40b65b7feaceea77bf67de4dc178e8a42";

/// A database migrated before the rewording records the old checksum, and
/// sqlx would refuse it as modified: record the new one. Only a checksum
/// that is exactly the old text's is touched.
async fn accept_reworded_comment(pool: &PgPool) -> Result<(), sqlx::Error> {
    let Some(init) = MIGRATOR.iter().find(|m| m.version == 20261125000001) else {
        return Ok(());
    };
    let old: Vec<u8> = (0..INIT_CHECKSUM_BEFORE_REWORDING.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&INIT_CHECKSUM_BEFORE_REWORDING[i..i + 2], 16).ok())
        .collect();
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(pool)
        .await?;
    if table.is_some() {
        sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = $1 WHERE version = $2 AND checksum = $3",
        )
        .bind(init.checksum.as_ref())
        .bind(init.version)
        .bind(&old)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// A pool that connects on first use: for the API, which starts without its backends.
pub fn connect_lazy(url: &str, max_connections: u32) -> Result<PgPool, DatabaseError> {
    Ok(pool_options(max_connections).connect_lazy_with(connect_options(url)?))
}
