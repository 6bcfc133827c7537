//! `fsctl inspect holds`.

use super::*;

/// Holds per product.
pub async fn show(b: &BackendUrls, as_json: bool) -> Result<(), Failure> {
    let rows = backends::ledger(b).await?.holds_report().await?;
    if as_json {
        output::json(&json!({"holds": rows}));
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
        for r in &rows {
            t.add_row(vec![
                Cell::new(r.product_id),
                Cell::new(r.held_orders),
                Cell::new(r.held_units),
                Cell::new(
                    r.next_expiry_seconds
                        .map_or("-".to_owned(), |s| format!("in {s:.1} s")),
                ),
                output::verdict(r.overdue == 0, "0", &r.overdue.to_string()),
                Cell::new(r.paid),
                Cell::new(r.cancelled),
                Cell::new(r.expired),
            ]);
        }
        println!("{t}");
        let overdue: i64 = rows.iter().map(|r| r.overdue).sum();
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
