//! What `fsctl inspect` reads from PostgreSQL, each a report it prints as
//! a table or as JSON (field names as in the contract's `--json` output).

use super::{LedgerError, StockLedger};
use crate::domain::ProductId;
use serde::Serialize;

/// One held product's holds: now, the next expiry, those past it, and how
/// the others ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HoldsReport {
    pub product_id: i64,
    pub held_orders: i64,
    pub held_units: i64,
    /// Seconds until the next hold expires (negative: overdue).
    pub next_expiry_seconds: Option<f64>,
    /// Held more than 2 s past their expiry (invariant 7).
    pub overdue: i64,
    pub paid: i64,
    pub cancelled: i64,
    pub expired: i64,
}

/// One product's orders by outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCounts {
    pub confirmed_orders: i64,
    pub confirmed_units: i64,
    pub rejected_orders: i64,
}

/// A product written under a fence, and the last token PostgreSQL saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fence {
    pub product_id: i64,
    pub last_fence: i64,
}

impl StockLedger {
    /// Every product seeded with holds, by id.
    pub async fn holds_report(&self) -> Result<Vec<HoldsReport>, LedgerError> {
        type Row = (i64, i64, i64, Option<f64>, i64, i64, i64, i64);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT p.id,
                    count(o.*) FILTER (WHERE o.status = 'held'),
                    COALESCE(SUM(o.quantity) FILTER (WHERE o.status = 'held'), 0)::bigint,
                    EXTRACT(EPOCH FROM min(o.held_until) FILTER (WHERE o.status = 'held') - now())::float8,
                    count(o.*) FILTER (WHERE o.status = 'held'
                                         AND o.held_until < now() - interval '2 seconds'),
                    count(o.*) FILTER (WHERE o.status = 'paid'),
                    count(o.*) FILTER (WHERE o.status = 'cancelled'),
                    count(o.*) FILTER (WHERE o.status = 'expired')
             FROM products p LEFT JOIN orders o ON o.product_id = p.id
             WHERE p.hold_seconds IS NOT NULL GROUP BY p.id ORDER BY p.id",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(product_id, held_orders, held_units, next, overdue, paid, cancelled, expired)| {
                    HoldsReport {
                        product_id,
                        held_orders,
                        held_units,
                        next_expiry_seconds: next,
                        overdue,
                        paid,
                        cancelled,
                        expired,
                    }
                },
            )
            .collect())
    }

    /// The product's orders by outcome.
    pub async fn order_counts(&self, product: ProductId) -> Result<OrderCounts, LedgerError> {
        let (confirmed_orders, confirmed_units, rejected_orders): (i64, i64, i64) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE status = 'confirmed'),
                        COALESCE(SUM(quantity) FILTER (WHERE status = 'confirmed'), 0)::bigint,
                        COUNT(*) FILTER (WHERE status = 'rejected')
                 FROM orders WHERE product_id = $1",
        )
        .bind(product.get())
        .fetch_one(self.pool())
        .await?;
        Ok(OrderCounts {
            confirmed_orders,
            confirmed_units,
            rejected_orders,
        })
    }

    /// Every product written under a fence, by id.
    pub async fn fences(&self) -> Result<Vec<Fence>, LedgerError> {
        let rows: Vec<(i64, i64)> =
            sqlx::query_as("SELECT id, lock_fence FROM products WHERE lock_fence > 0 ORDER BY id")
                .fetch_all(self.pool())
                .await?;
        Ok(rows
            .into_iter()
            .map(|(product_id, last_fence)| Fence {
                product_id,
                last_fence,
            })
            .collect())
    }
}
