//! The ledger audit: the contract's invariants checked against PostgreSQL
//! (and, for accepted orders, against the dead-letter queue). `fsctl
//! verify`, `fsctl top` and the storm's closing check all read this.

use serde::Serialize;
use sqlx::PgPool;
use std::collections::HashSet;

/// One product's books.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductBooks {
    pub id: i64,
    pub seeded_stock: i64,
    pub stock: i64,
    /// Units sold for good: orders `confirmed` or `paid`.
    pub confirmed_units: i64,
    /// Units held for a buyer who has not paid yet.
    pub held_units: i64,
    pub rejected_orders: i64,
    pub ok: bool,
}

/// A broken invariant.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Violation {
    pub invariant: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_id: Option<i64>,
    pub detail: String,
}

/// What the audit found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditReport {
    pub ok: bool,
    pub drained: bool,
    pub products: Vec<ProductBooks>,
    pub violations: Vec<Violation>,
    /// Accepted orders with no row yet while the system is not drained.
    pub pending: usize,
    /// Accepted orders with no row and not in the DLQ once drained.
    pub lost: usize,
    /// Messages in the dead-letter queue.
    pub dlq: u64,
}

/// What the audit needs to know beyond PostgreSQL.
#[derive(Debug, Clone, Default)]
pub struct QueueFacts {
    pub drained: bool,
    pub dlq_count: u64,
    /// Message ids seen in the dead-letter queue.
    pub dlq_ids: HashSet<String>,
}

impl QueueFacts {
    /// A queue with nothing left in flight, and these dead letters.
    pub fn drained_with(dead_letters: HashSet<String>) -> Self {
        Self {
            drained: true,
            dlq_count: dead_letters.len() as u64,
            dlq_ids: dead_letters,
        }
    }
}

/// One product's totals, as any ledger can add them up.
#[derive(Debug, Clone)]
pub struct ProductTotals {
    pub id: i64,
    pub seeded_stock: i64,
    pub stock: i64,
    /// Units of orders `confirmed` or `paid`.
    pub confirmed_units: i64,
    /// Units of orders `held`.
    pub held_units: i64,
    pub rejected_orders: i64,
}

/// A hold left past its expiry by more than [`HOLD_GRACE`].
#[derive(Debug, Clone)]
pub struct OverdueHold {
    pub order_id: String,
    pub product_id: i64,
    /// How long past its `heldUntil`.
    pub overdue: std::time::Duration,
}

/// The workers return an expired hold's units within this long of its
/// `heldUntil` (invariant 7).
pub const HOLD_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A user holding more of a product than its per-user limit.
#[derive(Debug, Clone)]
pub struct OverLimit {
    pub product_id: i64,
    pub user_id: String,
    pub units: i64,
    pub limit: i64,
}

/// What a ledger holds, for [`judge`].
pub struct LedgerFacts<'a> {
    pub totals: Vec<ProductTotals>,
    /// Order ids with more than one row, and how many.
    pub doubled: Vec<(String, i64)>,
    pub over_limit: Vec<OverLimit>,
    /// Holds more than [`HOLD_GRACE`] past their expiry.
    pub overdue_holds: Vec<OverdueHold>,
    /// Whether an accepted order id has its row.
    pub booked: &'a dyn Fn(&str) -> bool,
}

/// Accepted orders lost past this many are summed up in one violation.
const LOST_LISTED: usize = 20;

/// The contract's invariants over what a ledger holds (PostgreSQL's, or
/// the embedded one): 1 and 2 per product, 3, 5, 7, and 4 for `accepted`.
pub fn judge(
    ledger: LedgerFacts<'_>,
    accepted: Option<&[String]>,
    facts: &QueueFacts,
) -> AuditReport {
    let mut violations = Vec::new();
    let mut products: Vec<ProductBooks> = ledger
        .totals
        .iter()
        .map(|t| product_books(t, &mut violations))
        .collect();
    for (key, n) in ledger.doubled {
        violations.push(Violation {
            invariant: 3,
            product_id: None,
            detail: format!("order {key} has {n} rows"),
        });
    }
    for o in ledger.over_limit {
        mark_product(&mut products, o.product_id);
        violations.push(Violation {
            invariant: 5,
            product_id: Some(o.product_id),
            detail: format!(
                "user {} holds {} units, limit {}",
                o.user_id, o.units, o.limit
            ),
        });
    }
    for h in ledger.overdue_holds {
        mark_product(&mut products, h.product_id);
        violations.push(Violation {
            invariant: 7,
            product_id: Some(h.product_id),
            detail: format!(
                "order {} is still held {:.1} s past its expiry (are the workers running?)",
                h.order_id,
                h.overdue.as_secs_f64()
            ),
        });
    }
    let (pending, lost) = accepted_fates(
        accepted.unwrap_or_default(),
        ledger.booked,
        facts,
        &mut violations,
    );
    AuditReport {
        ok: violations.is_empty(),
        drained: facts.drained,
        products,
        violations,
        pending,
        lost,
        dlq: facts.dlq_count,
    }
}

/// One product's books, and its violations of invariants 1 and 2.
fn product_books(t: &ProductTotals, violations: &mut Vec<Violation>) -> ProductBooks {
    let (id, seeded, stock, confirmed, held) = (
        t.id,
        t.seeded_stock,
        t.stock,
        t.confirmed_units,
        t.held_units,
    );
    let mut ok = true;
    if seeded != stock + confirmed + held {
        ok = false;
        let held_part = if held > 0 {
            format!(" + held {held}")
        } else {
            String::new()
        };
        violations.push(Violation {
            invariant: 1,
            product_id: Some(id),
            detail: format!(
                "seeded {seeded} != stock {stock} + confirmed {confirmed}{held_part} (off by {})",
                seeded - stock - confirmed - held
            ),
        });
    }
    if stock < 0 {
        ok = false;
        violations.push(Violation {
            invariant: 2,
            product_id: Some(id),
            detail: format!("stock is {stock}"),
        });
    }
    ProductBooks {
        id,
        seeded_stock: seeded,
        stock,
        confirmed_units: confirmed,
        held_units: held,
        rejected_orders: t.rejected_orders,
        ok,
    }
}

/// Invariant 4: each accepted order has its row or a dead letter; one
/// that has neither is pending while the queue is not drained, and lost
/// once it is. `(pending, lost)`.
fn accepted_fates(
    accepted: &[String],
    booked: &dyn Fn(&str) -> bool,
    facts: &QueueFacts,
    violations: &mut Vec<Violation>,
) -> (usize, usize) {
    let (mut pending, mut lost) = (0, 0);
    for key in accepted {
        if booked(key) || facts.dlq_ids.contains(key) {
            continue;
        }
        if !facts.drained {
            pending += 1;
            continue;
        }
        lost += 1;
        if lost <= LOST_LISTED {
            violations.push(Violation {
                invariant: 4,
                product_id: None,
                detail: format!("order {key} was accepted but has no row and is not in the DLQ"),
            });
        }
    }
    if lost > LOST_LISTED {
        violations.push(Violation {
            invariant: 4,
            product_id: None,
            detail: format!("{} more accepted orders lost", lost - LOST_LISTED),
        });
    }
    (pending, lost)
}

/// Checks invariants 1, 2, 3, 5 and 7 in PostgreSQL, and 4 for `accepted`.
/// (91 lines, most of them the five queries' SQL, one per invariant, each
/// read once into [`LedgerFacts`]; the judging is [`judge`].)
pub async fn audit(
    pool: &PgPool,
    accepted: Option<&[String]>,
    facts: &QueueFacts,
) -> Result<AuditReport, sqlx::Error> {
    let rows: Vec<(i64, i32, i32, i64, i64, i64)> = sqlx::query_as(
        "SELECT p.id, p.seeded_stock, p.stock,
                COALESCE(SUM(o.quantity) FILTER (WHERE o.status IN ('confirmed', 'paid')), 0)::bigint,
                COALESCE(SUM(o.quantity) FILTER (WHERE o.status = 'held'), 0)::bigint,
                COUNT(o.idempotency_key) FILTER (WHERE o.status = 'rejected')
         FROM products p LEFT JOIN orders o ON o.product_id = p.id
         GROUP BY p.id ORDER BY p.id",
    )
    .fetch_all(pool)
    .await?;
    let totals = rows
        .into_iter()
        .map(
            |(id, seeded, stock, confirmed, held, rejected)| ProductTotals {
                id,
                seeded_stock: i64::from(seeded),
                stock: i64::from(stock),
                confirmed_units: confirmed,
                held_units: held,
                rejected_orders: rejected,
            },
        )
        .collect();
    let doubled: Vec<(String, i64)> = sqlx::query_as(
        "SELECT idempotency_key, COUNT(*) FROM orders GROUP BY idempotency_key HAVING COUNT(*) > 1",
    )
    .fetch_all(pool)
    .await?;
    let over: Vec<(i64, String, i64, i32)> = sqlx::query_as(
        "SELECT o.product_id, o.user_id, SUM(o.quantity)::bigint, p.per_user_limit
         FROM orders o JOIN products p ON p.id = o.product_id
         WHERE o.status IN ('confirmed', 'held', 'paid') AND p.per_user_limit IS NOT NULL
         GROUP BY o.product_id, o.user_id, p.per_user_limit
         HAVING SUM(o.quantity) > p.per_user_limit",
    )
    .fetch_all(pool)
    .await?;
    let over_limit = over
        .into_iter()
        .map(|(product_id, user_id, units, limit)| OverLimit {
            product_id,
            user_id,
            units,
            limit: i64::from(limit),
        })
        .collect();
    let overdue: Vec<(String, i64, f64)> = sqlx::query_as(
        "SELECT idempotency_key, product_id,
                EXTRACT(EPOCH FROM now() - held_until)::float8
         FROM orders WHERE status = 'held' AND held_until < now() - make_interval(secs => $1)
         ORDER BY held_until LIMIT 20",
    )
    .bind(HOLD_GRACE.as_secs_f64())
    .fetch_all(pool)
    .await?;
    let overdue_holds = overdue
        .into_iter()
        .map(|(order_id, product_id, seconds)| OverdueHold {
            order_id,
            product_id,
            overdue: std::time::Duration::from_secs_f64(seconds.max(0.0)),
        })
        .collect();
    let mut found: HashSet<String> = HashSet::new();
    for chunk in accepted.unwrap_or_default().chunks(1000) {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT idempotency_key FROM orders WHERE idempotency_key = ANY($1)",
        )
        .bind(chunk)
        .fetch_all(pool)
        .await?;
        found.extend(rows);
    }
    let booked = |key: &str| found.contains(key);
    Ok(judge(
        LedgerFacts {
            totals,
            doubled,
            over_limit,
            overdue_holds,
            booked: &booked,
        },
        accepted,
        facts,
    ))
}

fn mark_product(products: &mut [ProductBooks], id: i64) {
    if let Some(p) = products.iter_mut().find(|p| p.id == id) {
        p.ok = false;
    }
}
