//! `fsctl inspect holds`.

use super::*;

/// Holds per product.
pub async fn show(b: &BackendUrls, as_json: bool) -> Result<(), Failure> {
    let ledger = backends::ledger(b).await?;
    let rows: Vec<HoldsRow> = sqlx::query_as(
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
    .fetch_all(ledger.pool())
    .await?;
    if as_json {
        let products: Vec<_> = rows
            .iter()
            .map(
                |(id, orders, units, next, overdue, paid, cancelled, expired)| {
                    json!({"productId": id, "heldOrders": orders, "heldUnits": units,
                       "nextExpirySeconds": next, "overdue": overdue,
                       "paid": paid, "cancelled": cancelled, "expired": expired})
                },
            )
            .collect();
        output::json(&json!({"holds": products}));
    } else {
        let mut t = output::table(&[
            "product",
            "held orders",
            "held units",
            "next expiry",
            "overdue",
            "paid",
            "cancelled",
            "expired",
        ]);
        for (id, orders, units, next, overdue, paid, cancelled, expired) in &rows {
            t.add_row(vec![
                Cell::new(id),
                Cell::new(orders),
                Cell::new(units),
                Cell::new(next.map_or("-".to_owned(), |s| format!("in {s:.1} s"))),
                output::verdict(*overdue == 0, "0", &overdue.to_string()),
                Cell::new(paid),
                Cell::new(cancelled),
                Cell::new(expired),
            ]);
        }
        println!("{t}");
        let overdue: i64 = rows.iter().map(|r| r.4).sum();
        println!(
            "{} products with holds; {}",
            rows.len(),
            if overdue == 0 {
                "none past its expiry".to_owned()
            } else {
                format!("{overdue} held past their expiry (are the workers running?)")
            }
        );
    }
    Ok(())
}
