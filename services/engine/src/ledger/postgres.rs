//! The stock ledger in PostgreSQL: applies a group of queued orders for one
//! product in one fenced transaction, and answers what the ledger holds.
//!
//! The transaction, in order: the fence update (which also locks the product
//! row), the lookup of keys already booked, the per-user sums, the decisions
//! in arrival order, the idempotent insert (`ON CONFLICT DO NOTHING
//! RETURNING`), one relative stock update (the `CHECK` is the last line), commit.
//!
//! Several groups can share one transaction (`apply_groups`): the same
//! steps, each one statement for every group at once, so twenty products
//! cost about what one does.

use super::{
    Decisions, ExpiredHolds, FencedGroup, GroupReceipt, HeldUnits, HoldAction, HoldSettlement,
    JointOutcome, Ledger, LedgerError, NewProduct, OrderOutcome, ProductRecord, Refusal, decide,
};
use crate::audit::{AuditReport, QueueFacts};
use crate::domain::{OrderStatus, OrderView, ProductId, QueuedOrder};
use crate::locks::FencingToken;
use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgPool, Postgres, Row, Transaction};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// The columns [`order_from_row`] reads.
macro_rules! order_columns {
    () => {
        "idempotency_key, user_id, product_id, quantity, status, reason, accepted_at, \
         processed_at, held_until, settled_at"
    };
}

impl From<sqlx::Error> for LedgerError {
    fn from(e: sqlx::Error) -> Self {
        if is_refusal(&e) {
            Self::Refused(Box::new(e))
        } else {
            Self::Database(Box::new(e))
        }
    }
}

/// Whether PostgreSQL refused the data itself (classes 22 "data exception"
/// and 23 "integrity constraint violation"), as opposed to a passing fault
/// (connection loss, timeouts, serialization and lock failures, shutdown:
/// classes 08, 40, 53, 55, 57, 58, and client-side I/O). The idempotency
/// key's unique violation is a duplicate, never a refusal.
pub fn is_refusal(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    let code = db.code();
    let code = code.as_deref().unwrap_or("");
    let key_conflict = code == "23505" && db.constraint() == Some("orders_pkey");
    (code.starts_with("22") || code.starts_with("23")) && !key_conflict
}

/// A PostgreSQL error that is never the data's fault.
fn passing(e: sqlx::Error) -> LedgerError {
    LedgerError::Database(Box::new(e))
}

/// A group's transaction, or a refusal probe, that has not finished by then
/// is abandoned and its connection closed: a PostgreSQL that stops
/// answering without closing the connection is a passing fault, never a
/// hang. Below the product lock's lease.
pub const TRANSACTION_DEADLINE: Duration = Duration::from_secs(6);

/// The outcome of work run on `conn` under [`TRANSACTION_DEADLINE`]. On
/// time-out the connection is closed, not returned to the pool: returning it
/// would ping the silent server first, and that ping would hold a pool slot
/// for as long as the silence lasts.
fn close_if_late<T>(
    conn: &mut PoolConnection<Postgres>,
    outcome: Result<Result<T, LedgerError>, tokio::time::error::Elapsed>,
) -> Result<T, LedgerError> {
    close_if_later_than(TRANSACTION_DEADLINE, conn, outcome)
}

/// [`close_if_late`] for work under another deadline.
fn close_if_later_than<T>(
    deadline: Duration,
    conn: &mut PoolConnection<Postgres>,
    outcome: Result<Result<T, LedgerError>, tokio::time::error::Elapsed>,
) -> Result<T, LedgerError> {
    outcome.unwrap_or_else(|_| {
        conn.close_on_drop();
        Err(LedgerError::TimedOut(deadline))
    })
}

/// A read (a product, the catalog, an order) that has not answered by then
/// is abandoned and its connection closed, as a group's transaction is.
/// Below the API's own time limits on these calls (1 s and more), so the
/// ledger's deadline is the one that fires and the connection is closed.
pub const READ_DEADLINE: Duration = Duration::from_millis(800);

/// Rows per statement. Published sqlx 0.9.0 sets no TCP_NODELAY, and there
/// a statement whose parameters outgrow its write buffer met Nagle's
/// algorithm and the server's delayed ACK (40 ms a statement, measured: 500
/// rows 45 ms, 200 rows 6 ms). The vendored sqlx-core sets it
/// (`services/third_party/sqlx-core/PATCH.md`); chunks of this size stay
/// clear of that even without it.
const ROWS_PER_STATEMENT: usize = 128;

/// The keys of a group that already have a row (a redelivery, a repeat).
/// Its plan matters: see [`crate::postgres::connect_for_lookups`].
pub const BOOKED_KEYS: &str = "SELECT idempotency_key FROM orders WHERE idempotency_key = ANY($1)";

/// How many times a group is retried when a key was booked concurrently by
/// another product's transaction (a reused key); then the error is returned.
const CONFLICT_RETRIES: usize = 5;

/// The orders and products tables.
#[derive(Clone, Debug)]
pub struct StockLedger {
    pool: PgPool,
}

impl StockLedger {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The rows of one read, on a connection of its own under
    /// [`READ_DEADLINE`]; a connection that did not answer is closed.
    async fn read(
        &self,
        query: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<sqlx::postgres::PgRow>, LedgerError> {
        let mut conn = self.pool.acquire().await.map_err(passing)?;
        let rows = tokio::time::timeout(READ_DEADLINE, query.fetch_all(&mut *conn))
            .await
            .map(|r| r.map_err(passing));
        close_if_later_than(READ_DEADLINE, &mut conn, rows)
    }

    /// Adds `units` to each product's stock and seeded stock, relatively, so
    /// invariant 1 holds while workers run; returns the products changed.
    pub async fn restock(&self, ids: &[i64], units: i32) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE products SET stock = stock + $2, seeded_stock = seeded_stock + $2
             WHERE id = ANY($1)",
        )
        .bind(ids)
        .bind(units)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Puts the products back to a fresh state (their orders deleted, stock
    /// and limits as given; the fence is kept, never lowered). Returns the
    /// keys of the orders deleted.
    ///
    /// The product rows are locked first, in id order, as a worker's group
    /// transaction locks its row first (the fence update): a commit cannot
    /// slip in between the delete and the stock update, so invariant 1 holds
    /// even when a reset is forced while workers run.
    pub async fn reset(&self, products: &[NewProduct]) -> Result<Vec<String>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let ids: Vec<i64> = products.iter().map(|p| p.id).collect();
        sqlx::query("SELECT id FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
        let deleted: Vec<String> = sqlx::query_scalar(
            "DELETE FROM orders WHERE product_id = ANY($1) RETURNING idempotency_key",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        for p in products {
            sqlx::query(
                "UPDATE products SET stock = $2, seeded_stock = $2, max_per_order = $3,
                        per_user_limit = $4
                 WHERE id = $1",
            )
            .bind(p.id)
            .bind(p.stock)
            .bind(p.max_per_order)
            .bind(p.per_user_limit)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    /// Orders with a row: (booked: confirmed, or held and then paid,
    /// cancelled or expired; rejected).
    pub async fn totals(&self) -> Result<(u64, u64), sqlx::Error> {
        let (booked, rejected): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE status <> 'rejected'),
                    COUNT(*) FILTER (WHERE status = 'rejected')
             FROM orders",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((booked as u64, rejected as u64))
    }

    /// Holds expired so far (`fsctl top`'s expiries per second).
    pub async fn expired(&self) -> Result<u64, sqlx::Error> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'expired'")
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }
}

#[async_trait::async_trait]
impl Ledger for StockLedger {
    /// Inserts the products that do not exist yet; returns the ids created.
    async fn create_missing(&self, products: &[NewProduct]) -> Result<Vec<i64>, LedgerError> {
        let mut created = Vec::new();
        for chunk in products.chunks(ROWS_PER_STATEMENT) {
            let ids: Vec<i64> = chunk.iter().map(|p| p.id).collect();
            let names: Vec<&str> = chunk.iter().map(|p| p.name.as_str()).collect();
            let stock: Vec<i32> = chunk.iter().map(|p| p.stock).collect();
            let max: Vec<i32> = chunk.iter().map(|p| p.max_per_order).collect();
            let limit: Vec<Option<i32>> = chunk.iter().map(|p| p.per_user_limit).collect();
            let hold: Vec<Option<i32>> = chunk.iter().map(|p| p.hold_seconds).collect();
            let rows: Vec<i64> = sqlx::query_scalar(
                "INSERT INTO products (id, name, stock, seeded_stock, max_per_order, per_user_limit,
                                       hold_seconds)
                 SELECT i, n, s, s, m, l, h
                 FROM unnest($1::bigint[], $2::text[], $3::int[], $4::int[], $5::int[], $6::int[])
                      AS t(i, n, s, m, l, h)
                 ON CONFLICT (id) DO NOTHING RETURNING id",
            )
            .bind(&ids)
            .bind(&names)
            .bind(&stock)
            .bind(&max)
            .bind(&limit)
            .bind(&hold)
            .fetch_all(&self.pool)
            .await?;
            created.extend(rows);
        }
        created.sort_unstable();
        Ok(created)
    }
    /// Applies `orders` (all for `product`, in arrival order) under `token`.
    async fn apply_group(
        &self,
        product: ProductId,
        token: FencingToken,
        orders: &[QueuedOrder],
    ) -> Result<GroupReceipt, LedgerError> {
        let mut conn = self.pool.acquire().await.map_err(passing)?;
        let attempts = tokio::time::timeout(TRANSACTION_DEADLINE, async {
            for _ in 0..CONFLICT_RETRIES {
                let mut tx = conn.begin().await?;
                match apply_in(&mut tx, product, token, orders).await? {
                    Some(receipt) => {
                        tx.commit().await?;
                        return Ok(receipt);
                    }
                    None => tx.rollback().await?,
                }
            }
            Err(LedgerError::Contended(product))
        })
        .await;
        close_if_late(&mut conn, attempts)
    }
    async fn apply_groups(
        &self,
        groups: &[FencedGroup<'_>],
    ) -> Result<Vec<JointOutcome>, LedgerError> {
        let mut conn = self.pool.acquire().await.map_err(passing)?;
        let attempts = tokio::time::timeout(TRANSACTION_DEADLINE, async {
            for _ in 0..CONFLICT_RETRIES {
                let mut tx = conn.begin().await?;
                match apply_jointly(&mut tx, groups).await? {
                    Some(outcomes) => {
                        tx.commit().await?;
                        return Ok(outcomes);
                    }
                    None => tx.rollback().await?,
                }
            }
            Err(LedgerError::Contended(groups[0].product))
        })
        .await;
        close_if_late(&mut conn, attempts)
    }
    /// The orders of a group that PostgreSQL refuses as data, with its
    /// reason: each row is tried alone, under a savepoint, in a transaction
    /// that is rolled back (nothing is written). Called only after a group
    /// failed with [`LedgerError::Refused`].
    async fn refused(&self, orders: &[QueuedOrder]) -> Result<Vec<Refusal>, LedgerError> {
        let mut conn = self.pool.acquire().await.map_err(passing)?;
        let probe = tokio::time::timeout(TRANSACTION_DEADLINE, async {
            let mut tx = conn.begin().await.map_err(passing)?;
            let mut refused = Vec::new();
            for (index, order) in orders.iter().enumerate() {
                sqlx::query("SAVEPOINT probe")
                    .execute(&mut *tx)
                    .await
                    .map_err(passing)?;
                let row = [(order, OrderOutcome::Confirmed)];
                match insert_orders(&mut tx, &row).await {
                    Ok(_) => {}
                    Err(e) if is_refusal(&e) => refused.push(Refusal {
                        index,
                        reason: format!("refused by PostgreSQL: {e}"),
                    }),
                    Err(e) => return Err(passing(e)),
                }
                sqlx::query("ROLLBACK TO SAVEPOINT probe")
                    .execute(&mut *tx)
                    .await
                    .map_err(passing)?;
            }
            tx.rollback().await.map_err(passing)?;
            Ok(refused)
        })
        .await;
        close_if_late(&mut conn, probe)
    }
    /// One product's record.
    async fn product(&self, id: ProductId) -> Result<Option<ProductRecord>, LedgerError> {
        let rows = self
            .read(
                sqlx::query(
                    "SELECT id, name, stock, seeded_stock, max_per_order, per_user_limit, hold_seconds, lock_fence
                     FROM products WHERE id = $1",
                )
                .bind(id.get()),
            )
            .await?;
        rows.first()
            .map(product_from_row)
            .transpose()
            .map_err(LedgerError::from)
    }
    async fn stock_and_booked(
        &self,
        product: ProductId,
        keys: &[String],
    ) -> Result<Option<(i32, HashSet<String>)>, LedgerError> {
        let rows = self
            .read(
                sqlx::query(
                    "SELECT p.stock, ARRAY(SELECT o.idempotency_key FROM orders o
                                           WHERE o.idempotency_key = ANY($2)) AS booked
                     FROM products p WHERE p.id = $1",
                )
                .bind(product.get())
                .bind(keys),
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let stock: i32 = row.try_get("stock")?;
        let booked: Vec<String> = row.try_get("booked")?;
        Ok(Some((stock, booked.into_iter().collect())))
    }
    /// Every product, for the API's catalog cache. A row whose id is not
    /// a product id (below 1: only a hand-made row can be) is no product.
    async fn products(&self) -> Result<Vec<ProductRecord>, LedgerError> {
        self.read(sqlx::query(
            "SELECT id, name, stock, seeded_stock, max_per_order, per_user_limit, hold_seconds, lock_fence
             FROM products WHERE id >= 1 ORDER BY id",
        ))
        .await?
        .iter()
        .map(|r| product_from_row(r).map_err(LedgerError::from))
        .collect()
    }
    async fn orders(&self, keys: &[String]) -> Result<Vec<OrderView>, LedgerError> {
        let rows = self
            .read(
                sqlx::query(concat!(
                    "SELECT ",
                    order_columns!(),
                    " FROM orders WHERE idempotency_key = ANY($1)"
                ))
                .bind(keys),
            )
            .await?;
        rows.iter()
            .map(|r| order_from_row(r).map_err(LedgerError::from))
            .collect()
    }

    async fn orders_of(&self, products: &[ProductId]) -> Result<Vec<OrderView>, LedgerError> {
        let ids: Vec<i64> = products.iter().map(|p| p.get()).collect();
        sqlx::query(concat!(
            "SELECT ",
            order_columns!(),
            " FROM orders WHERE product_id = ANY($1)"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| order_from_row(r).map_err(LedgerError::from))
        .collect()
    }

    /// The order row for a key, if the worker has written one.
    async fn order(&self, order_id: &str) -> Result<Option<OrderView>, LedgerError> {
        let rows = self
            .read(
                sqlx::query(concat!(
                    "SELECT ",
                    order_columns!(),
                    " FROM orders WHERE idempotency_key = $1"
                ))
                .bind(order_id),
            )
            .await?;
        rows.first()
            .map(order_from_row)
            .transpose()
            .map_err(LedgerError::from)
    }

    async fn probe(&self) -> crate::seams::Probe {
        let answered = tokio::time::timeout(
            crate::seams::PROBE_TIMEOUT,
            sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&self.pool),
        )
        .await;
        crate::seams::Probe {
            component: "postgres",
            outcome: match answered {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".into()),
            },
        }
    }
    async fn settle_hold(
        &self,
        order_id: &str,
        action: HoldAction,
    ) -> Result<HoldSettlement, LedgerError> {
        let mut conn = self.pool.acquire().await.map_err(passing)?;
        let settled = tokio::time::timeout(READ_DEADLINE * 4, async {
            let mut tx = conn.begin().await?;
            // The row lock decides a race with the sweep (which skips locked
            // rows) and with another pay or cancel: one of them changes the
            // `held` row, the others find it changed.
            let row = sqlx::query(concat!(
                "SELECT ",
                order_columns!(),
                ", held_until <= now() AS due FROM orders WHERE idempotency_key = $1 FOR UPDATE"
            ))
            .bind(order_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                return Ok(HoldSettlement::Unknown);
            };
            let order = order_from_row(&row)?;
            let due: Option<bool> = row.try_get("due")?;
            if order.status != OrderStatus::Held {
                return Ok(if order.status == action.status() {
                    HoldSettlement::Settled {
                        order,
                        changed: false,
                        stock_after: None,
                    }
                } else {
                    HoldSettlement::NotHeld(order)
                });
            }
            // A pay after `heldUntil` finds the hold expired: it expires it
            // here, as the sweep would have.
            let (status, units_back) = match action {
                HoldAction::Pay if due == Some(true) => (OrderStatus::Expired, true),
                HoldAction::Pay => (OrderStatus::Paid, false),
                HoldAction::Cancel => (OrderStatus::Cancelled, true),
            };
            let row = sqlx::query(concat!(
                "UPDATE orders SET status = $2, settled_at = now() WHERE idempotency_key = $1
                 RETURNING ",
                order_columns!()
            ))
            .bind(order_id)
            .bind(status.as_str())
            .fetch_one(&mut *tx)
            .await?;
            let order = order_from_row(&row)?;
            let stock_after = if units_back {
                Some(
                    sqlx::query_scalar::<_, i32>(
                        "UPDATE products SET stock = stock + $2 WHERE id = $1 RETURNING stock",
                    )
                    .bind(order.product_id)
                    .bind(order.quantity as i32)
                    .fetch_one(&mut *tx)
                    .await?,
                )
            } else {
                None
            };
            tx.commit().await?;
            Ok::<_, LedgerError>(if status == OrderStatus::Expired {
                HoldSettlement::Expired { order, stock_after }
            } else {
                HoldSettlement::Settled {
                    order,
                    changed: true,
                    stock_after,
                }
            })
        })
        .await;
        close_if_later_than(READ_DEADLINE * 4, &mut conn, settled)
    }

    async fn expire_holds(&self, limit: usize) -> Result<Vec<ExpiredHolds>, LedgerError> {
        let mut conn = self.pool.acquire().await.map_err(passing)?;
        let swept = tokio::time::timeout(
            TRANSACTION_DEADLINE,
            // One statement: the due holds (skipping rows a pay or another
            // sweep has locked), their expiry, and their units back on each
            // product's stock, relatively.
            sqlx::query_as::<_, (i64, Vec<String>, i64, i32)>(
                "WITH due AS (
                     SELECT idempotency_key FROM orders
                     WHERE status = 'held' AND held_until <= now()
                     ORDER BY held_until LIMIT $1
                     FOR UPDATE SKIP LOCKED),
                 expired AS (
                     UPDATE orders o SET status = 'expired', settled_at = now()
                     FROM due WHERE o.idempotency_key = due.idempotency_key
                     RETURNING o.product_id, o.idempotency_key, o.quantity),
                 back AS (
                     SELECT product_id, array_agg(idempotency_key) AS keys,
                            SUM(quantity)::bigint AS units
                     FROM expired GROUP BY product_id),
                 -- Product rows are locked in id order, as everywhere.
                 locked AS MATERIALIZED (
                     SELECT id FROM products WHERE id IN (SELECT product_id FROM back)
                     ORDER BY id FOR UPDATE)
                 UPDATE products p SET stock = p.stock + back.units
                 FROM back JOIN locked ON locked.id = back.product_id
                 WHERE p.id = back.product_id
                 RETURNING p.id, back.keys, back.units, p.stock",
            )
            .bind(limit as i64)
            .fetch_all(&mut *conn),
        )
        .await
        .map(|r| r.map_err(LedgerError::from));
        let rows = close_if_late(&mut conn, swept)?;
        rows.into_iter()
            .map(|(product, orders, units, stock_after)| {
                Ok(ExpiredHolds {
                    product_id: ProductId::new(product)
                        .map_err(|e| LedgerError::Database(Box::new(e)))?,
                    orders,
                    units,
                    stock_after,
                })
            })
            .collect()
    }

    async fn held_units(&self) -> Result<Vec<HeldUnits>, LedgerError> {
        self.read(
            sqlx::query(
                "SELECT product_id, SUM(quantity)::bigint AS units,
                        COUNT(*) FILTER (WHERE held_until < now() - make_interval(secs => $1))
                            AS overdue
                 FROM orders WHERE status = 'held' GROUP BY product_id ORDER BY product_id",
            )
            .bind(crate::audit::HOLD_GRACE.as_secs_f64()),
        )
        .await?
        .iter()
        .map(|r| {
            Ok(HeldUnits {
                product_id: r.try_get("product_id")?,
                units: r.try_get("units")?,
                overdue: r.try_get("overdue")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(LedgerError::from)
    }

    /// Counted in PostgreSQL: a drain asks this of every accepted key
    /// several times a second.
    async fn outcomes(&self, keys: &[String]) -> Result<(usize, usize), LedgerError> {
        let (mut confirmed, mut rejected) = (0, 0);
        for chunk in keys.chunks(10_000) {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT status, COUNT(*) FROM orders WHERE idempotency_key = ANY($1) GROUP BY status",
            )
            .bind(chunk)
            .fetch_all(&self.pool)
            .await?;
            for (status, n) in rows {
                match status.as_str() {
                    "rejected" => rejected += n as usize,
                    _ => confirmed += n as usize,
                }
            }
        }
        Ok((confirmed, rejected))
    }

    async fn audit(
        &self,
        accepted: Option<&[String]>,
        queue: &QueueFacts,
    ) -> Result<AuditReport, LedgerError> {
        Ok(crate::audit::audit(&self.pool, accepted, queue).await?)
    }

    async fn held_by(&self, product: ProductId, user: &str) -> Result<i64, LedgerError> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(SUM(quantity), 0)::bigint FROM orders
             WHERE product_id = $1 AND user_id = $2 AND status IN ('confirmed', 'held', 'paid')",
        )
        .bind(product.get())
        .bind(user)
        .fetch_one(self.pool())
        .await?)
    }
}

fn order_from_row(r: &sqlx::postgres::PgRow) -> Result<OrderView, sqlx::Error> {
    let status: String = r.try_get("status")?;
    Ok(OrderView {
        order_id: r.try_get("idempotency_key")?,
        user_id: r.try_get("user_id")?,
        product_id: r.try_get("product_id")?,
        quantity: i64::from(r.try_get::<i32, _>("quantity")?),
        status: OrderStatus::from_row(&status).ok_or_else(|| sqlx::Error::ColumnDecode {
            index: "status".into(),
            source: format!("unknown order status {status:?}").into(),
        })?,
        reason: r.try_get("reason")?,
        accepted_at: r.try_get("accepted_at")?,
        processed_at: Some(r.try_get("processed_at")?),
        held_until: r.try_get("held_until")?,
        settled_at: r.try_get("settled_at")?,
    })
}

fn product_from_row(r: &sqlx::postgres::PgRow) -> Result<ProductRecord, sqlx::Error> {
    let id: i64 = r.try_get("id")?;
    Ok(ProductRecord {
        id: ProductId::new(id).map_err(|e| sqlx::Error::ColumnDecode {
            index: "id".into(),
            source: Box::new(e),
        })?,
        name: r.try_get("name")?,
        stock: r.try_get("stock")?,
        seeded_stock: r.try_get("seeded_stock")?,
        max_per_order: r.try_get("max_per_order")?,
        per_user_limit: r.try_get("per_user_limit")?,
        hold_seconds: r.try_get("hold_seconds")?,
        lock_fence: r.try_get("lock_fence")?,
    })
}

/// The group's transaction; `None` when a key was booked concurrently
/// (roll back and try again: the next attempt sees that row). The same
/// steps as [`apply_jointly`] for one product, in plainer SQL: the joint
/// statements cost about 10 % of the one-product drain (measured; see
/// docs/performance.md, "a single product's group keeps its own
/// statements"), so both stay.
async fn apply_in(
    tx: &mut Transaction<'_, Postgres>,
    product: ProductId,
    token: FencingToken,
    orders: &[QueuedOrder],
) -> Result<Option<GroupReceipt>, LedgerError> {
    let fenced: Option<(i32, Option<i32>)> = sqlx::query_as(
        "UPDATE products SET lock_fence = $2 WHERE id = $1 AND lock_fence < $2
         RETURNING stock, per_user_limit",
    )
    .bind(product.get())
    .bind(token.0)
    .fetch_optional(&mut **tx)
    .await?;
    let (stock, per_user_limit) = match fenced {
        Some(row) => (Some(row.0), row.1),
        None => {
            let fence: Option<i64> =
                sqlx::query_scalar("SELECT lock_fence FROM products WHERE id = $1")
                    .bind(product.get())
                    .fetch_optional(&mut **tx)
                    .await?;
            match fence {
                Some(fence) => return Err(LedgerError::FencedOut { product, fence }),
                None => (None, None),
            }
        }
    };

    let keys: Vec<&str> = orders.iter().map(|o| o.order_id.as_str()).collect();
    let booked = booked_keys(tx, &keys).await?;

    let mut held: HashMap<String, i64> = HashMap::new();
    if per_user_limit.is_some() {
        let users: Vec<&str> = orders.iter().map(|o| o.user_id.as_str()).collect();
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT user_id, SUM(quantity)::bigint FROM orders
             WHERE product_id = $1 AND status IN ('confirmed', 'held', 'paid') AND user_id = ANY($2)
             GROUP BY user_id",
        )
        .bind(product.get())
        .bind(&users)
        .fetch_all(&mut **tx)
        .await?;
        held.extend(rows);
    }

    let Decisions {
        outcomes,
        taken,
        stock_left: stock,
    } = decide(orders, &booked, &mut held, stock, per_user_limit);

    let new: Vec<(&QueuedOrder, OrderOutcome)> = orders
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| **o != OrderOutcome::Duplicate)
        .map(|(q, o)| (q, *o))
        .collect();
    let mut inserted = 0;
    for chunk in new.chunks(ROWS_PER_STATEMENT) {
        inserted += insert_orders(tx, chunk).await?;
    }
    if inserted != new.len() {
        return Ok(None);
    }

    let stock_after = match stock {
        Some(_) if taken > 0 => Some(
            sqlx::query_scalar::<_, i32>(
                "UPDATE products SET stock = stock - $2 WHERE id = $1 RETURNING stock",
            )
            .bind(product.get())
            .bind(taken)
            .fetch_one(&mut **tx)
            .await?,
        ),
        other => other,
    };
    Ok(Some(GroupReceipt {
        outcomes,
        stock_after,
    }))
}

/// Several groups' transaction, each step one statement for all of them
/// (147 lines: the steps read in order, each needs the one before):
/// the fence updates first (locking the rows), then the booked keys, the
/// per-user sums, the decisions group by group, the inserts, the stock
/// updates. A group fenced out is left out of every later step. `None`
/// when a key was booked concurrently (roll back and try again).
async fn apply_jointly(
    tx: &mut Transaction<'_, Postgres>,
    groups: &[FencedGroup<'_>],
) -> Result<Option<Vec<JointOutcome>>, LedgerError> {
    let ids: Vec<i64> = groups.iter().map(|g| g.product.get()).collect();
    let tokens: Vec<i64> = groups.iter().map(|g| g.token.0).collect();
    let fenced: Vec<(i64, i32, Option<i32>)> = sqlx::query_as(
        // Product rows are locked in id order, as everywhere: two commits
        // (or a commit and the holds sweep) never wait on each other in a cycle.
        "WITH locked AS MATERIALIZED (
             SELECT id FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE)
         UPDATE products p SET lock_fence = g.token
         FROM unnest($1::bigint[], $2::bigint[]) AS g(id, token)
         JOIN locked ON locked.id = g.id
         WHERE p.id = g.id AND p.lock_fence < g.token
         RETURNING p.id, p.stock, p.per_user_limit",
    )
    .bind(&ids)
    .bind(&tokens)
    .fetch_all(&mut **tx)
    .await?;
    let passed: HashMap<i64, (i32, Option<i32>)> =
        fenced.into_iter().map(|(id, s, l)| (id, (s, l))).collect();
    let others: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| !passed.contains_key(id))
        .collect();
    // Not fenced in: fenced out (the row's fence) or an unknown product.
    let fences: HashMap<i64, i64> = if others.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as("SELECT id, lock_fence FROM products WHERE id = ANY($1)")
            .bind(&others)
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .collect()
    };
    let written: Vec<&FencedGroup<'_>> = groups
        .iter()
        .filter(|g| !fences.contains_key(&g.product.get()))
        .collect();

    let keys: Vec<&str> = written
        .iter()
        .flat_map(|g| g.orders.iter().map(|o| o.order_id.as_str()))
        .collect();
    let booked = booked_keys(tx, &keys).await?;
    let limited: Vec<(i64, &str)> = written
        .iter()
        .filter(|g| {
            passed
                .get(&g.product.get())
                .is_some_and(|(_, l)| l.is_some())
        })
        .flat_map(|g| {
            g.orders
                .iter()
                .map(|o| (o.product_id.get(), o.user_id.as_str()))
        })
        .collect();
    let mut held: HashMap<i64, HashMap<String, i64>> = HashMap::new();
    if !limited.is_empty() {
        let (products, users): (Vec<i64>, Vec<&str>) = limited.into_iter().unzip();
        let rows: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT o.product_id, o.user_id, SUM(o.quantity)::bigint FROM orders o
             WHERE o.status IN ('confirmed', 'held', 'paid')
               AND (o.product_id, o.user_id) IN
                   (SELECT DISTINCT * FROM unnest($1::bigint[], $2::text[]))
             GROUP BY o.product_id, o.user_id",
        )
        .bind(&products)
        .bind(&users)
        .fetch_all(&mut **tx)
        .await?;
        for (product, user, units) in rows {
            held.entry(product).or_default().insert(user, units);
        }
    }

    let mut decided: HashMap<i64, Decisions> = HashMap::with_capacity(written.len());
    let mut new: Vec<(&QueuedOrder, OrderOutcome)> = Vec::new();
    for g in &written {
        let (stock, limit) = passed
            .get(&g.product.get())
            .map_or((None, None), |(s, l)| (Some(*s), *l));
        let mut held = held.remove(&g.product.get()).unwrap_or_default();
        let d = decide(g.orders, &booked, &mut held, stock, limit);
        new.extend(
            g.orders
                .iter()
                .zip(&d.outcomes)
                .filter(|(_, o)| **o != OrderOutcome::Duplicate)
                .map(|(q, o)| (q, *o)),
        );
        decided.insert(g.product.get(), d);
    }
    let mut inserted = 0;
    for chunk in new.chunks(ROWS_PER_STATEMENT) {
        inserted += insert_orders(tx, chunk).await?;
    }
    if inserted != new.len() {
        return Ok(None);
    }

    let (sold, taken): (Vec<i64>, Vec<i32>) = decided
        .iter()
        .filter(|(_, d)| d.stock_left.is_some() && d.taken > 0)
        .map(|(id, d)| (*id, d.taken))
        .unzip();
    let stock_after: HashMap<i64, i32> = if sold.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as(
            "UPDATE products p SET stock = p.stock - g.taken
             FROM unnest($1::bigint[], $2::int[]) AS g(id, taken)
             WHERE p.id = g.id RETURNING p.id, p.stock",
        )
        .bind(&sold)
        .bind(&taken)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect()
    };
    Ok(Some(
        groups
            .iter()
            .map(|g| {
                let id = g.product.get();
                if let Some(&fence) = fences.get(&id) {
                    return JointOutcome::FencedOut { fence };
                }
                let d = decided.remove(&id).unwrap_or_else(|| Decisions {
                    outcomes: Vec::new(),
                    taken: 0,
                    stock_left: None,
                });
                JointOutcome::Committed(GroupReceipt {
                    stock_after: stock_after.get(&id).copied().or(d.stock_left),
                    outcomes: d.outcomes,
                })
            })
            .collect(),
    ))
}

/// Which of `keys` already have an order row (of any product).
async fn booked_keys(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[&str],
) -> Result<HashSet<String>, sqlx::Error> {
    Ok(sqlx::query_scalar(BOOKED_KEYS)
        .bind(keys)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect())
}

/// Inserts the rows in one statement; returns how many were actually new.
async fn insert_orders(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[(&QueuedOrder, OrderOutcome)],
) -> Result<usize, sqlx::Error> {
    let mut keys = Vec::with_capacity(rows.len());
    let mut users = Vec::with_capacity(rows.len());
    let mut products = Vec::with_capacity(rows.len());
    let mut quantities = Vec::with_capacity(rows.len());
    let mut statuses = Vec::with_capacity(rows.len());
    let mut reasons: Vec<Option<&str>> = Vec::with_capacity(rows.len());
    let mut accepted: Vec<DateTime<Utc>> = Vec::with_capacity(rows.len());
    for (order, outcome) in rows {
        keys.push(order.order_id.as_str());
        users.push(order.user_id.as_str());
        products.push(order.product_id.get());
        quantities.push(order.quantity.get());
        let (status, reason) = match outcome {
            OrderOutcome::Rejected(r) => ("rejected", Some(r.as_str())),
            _ => ("confirmed", None),
        };
        statuses.push(status);
        reasons.push(reason);
        accepted.push(order.accepted_at);
    }
    let inserted: Vec<String> = sqlx::query_scalar(
        // A booked order of a product with a hold is `held` until now +
        // hold_seconds (the product row is locked: the fence update).
        "INSERT INTO orders (idempotency_key, user_id, product_id, quantity, status, reason,
                             accepted_at, processed_at, held_until)
         SELECT k, u, t.p, q,
                CASE WHEN s = 'confirmed' AND pr.hold_seconds IS NOT NULL THEN 'held' ELSE s END,
                r, a, now(),
                CASE WHEN s = 'confirmed' AND pr.hold_seconds IS NOT NULL
                     THEN now() + make_interval(secs => pr.hold_seconds) END
         FROM unnest($1::text[], $2::text[], $3::bigint[], $4::int[], $5::text[], $6::text[],
                     $7::timestamptz[]) AS t(k, u, p, q, s, r, a)
              LEFT JOIN products pr ON pr.id = t.p
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING idempotency_key",
    )
    .bind(&keys)
    .bind(&users)
    .bind(&products)
    .bind(&quantities)
    .bind(&statuses)
    .bind(&reasons)
    .bind(&accepted)
    .fetch_all(&mut **tx)
    .await?;
    Ok(inserted.len())
}
