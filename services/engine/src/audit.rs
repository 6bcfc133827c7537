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
    pub confirmed_units: i64,
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

/// Checks invariants 1, 2, 3 and 5, and 4 for `accepted` when given.
pub async fn audit(
    pool: &PgPool,
    accepted: Option<&[String]>,
    facts: &QueueFacts,
) -> Result<AuditReport, sqlx::Error> {
    let rows: Vec<(i64, i32, i32, i64, i64)> = sqlx::query_as(
        "SELECT p.id, p.seeded_stock, p.stock,
                COALESCE(SUM(o.quantity) FILTER (WHERE o.status = 'confirmed'), 0)::bigint,
                COUNT(o.idempotency_key) FILTER (WHERE o.status = 'rejected')
         FROM products p LEFT JOIN orders o ON o.product_id = p.id
         GROUP BY p.id ORDER BY p.id",
    )
    .fetch_all(pool)
    .await?;
    let mut violations = Vec::new();
    let mut products = Vec::with_capacity(rows.len());
    for (id, seeded, stock, confirmed, rejected) in rows {
        let (seeded, stock) = (i64::from(seeded), i64::from(stock));
        let mut ok = true;
        if seeded != stock + confirmed {
            ok = false;
            violations.push(Violation {
                invariant: 1,
                product_id: Some(id),
                detail: format!(
                    "seeded {seeded} != stock {stock} + confirmed {confirmed} (off by {})",
                    seeded - stock - confirmed
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
        products.push(ProductBooks {
            id,
            seeded_stock: seeded,
            stock,
            confirmed_units: confirmed,
            rejected_orders: rejected,
            ok,
        });
    }

    let twice: Vec<(String, i64)> = sqlx::query_as(
        "SELECT idempotency_key, COUNT(*) FROM orders GROUP BY idempotency_key HAVING COUNT(*) > 1",
    )
    .fetch_all(pool)
    .await?;
    for (key, n) in twice {
        violations.push(Violation {
            invariant: 3,
            product_id: None,
            detail: format!("order {key} has {n} rows"),
        });
    }

    let over: Vec<(i64, String, i64, i32)> = sqlx::query_as(
        "SELECT o.product_id, o.user_id, SUM(o.quantity)::bigint, p.per_user_limit
         FROM orders o JOIN products p ON p.id = o.product_id
         WHERE o.status = 'confirmed' AND p.per_user_limit IS NOT NULL
         GROUP BY o.product_id, o.user_id, p.per_user_limit
         HAVING SUM(o.quantity) > p.per_user_limit",
    )
    .fetch_all(pool)
    .await?;
    for (product, user, units, limit) in over {
        mark_product(&mut products, product);
        violations.push(Violation {
            invariant: 5,
            product_id: Some(product),
            detail: format!("user {user} holds {units} units, limit {limit}"),
        });
    }

    let (mut pending, mut lost) = (0, 0);
    if let Some(keys) = accepted {
        let mut found: HashSet<String> = HashSet::new();
        for chunk in keys.chunks(1000) {
            let rows: Vec<String> = sqlx::query_scalar(
                "SELECT idempotency_key FROM orders WHERE idempotency_key = ANY($1)",
            )
            .bind(chunk)
            .fetch_all(pool)
            .await?;
            found.extend(rows);
        }
        for key in keys {
            if found.contains(key) || facts.dlq_ids.contains(key) {
                continue;
            }
            if facts.drained {
                lost += 1;
                if lost <= 20 {
                    violations.push(Violation {
                        invariant: 4,
                        product_id: None,
                        detail: format!(
                            "order {key} was accepted but has no row and is not in the DLQ"
                        ),
                    });
                }
            } else {
                pending += 1;
            }
        }
        if lost > 20 {
            violations.push(Violation {
                invariant: 4,
                product_id: None,
                detail: format!("{} more accepted orders lost", lost - 20),
            });
        }
    }
    Ok(AuditReport {
        ok: violations.is_empty(),
        drained: facts.drained,
        products,
        violations,
        pending,
        lost,
        dlq: facts.dlq_count,
    })
}

fn mark_product(products: &mut [ProductBooks], id: i64) {
    if let Some(p) = products.iter_mut().find(|p| p.id == id) {
        p.ok = false;
    }
}
