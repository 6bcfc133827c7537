//! `fsctl inspect locks`.

use super::*;
use flashsale_engine::locks;

/// Held product locks beside each product's last fence.
pub async fn show(b: &BackendUrls, ns: &Namespace, as_json: bool) -> Result<(), Failure> {
    let redis = backends::redis(b).await?;
    let ledger = backends::ledger(b).await?;
    let locks = locks::held(&redis, ns).await?;
    let fences: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, lock_fence FROM products WHERE lock_fence > 0 ORDER BY id")
            .fetch_all(ledger.pool())
            .await?;
    let fence_of = |id: i64| fences.iter().find(|f| f.0 == id).map(|f| f.1).unwrap_or(0);
    if as_json {
        let locks: Vec<_> = locks
            .iter()
            .map(|l| {
                json!({"productId": l.product_id, "holder": l.holder, "token": l.token,
                            "ttlMs": l.ttl_ms, "lastFence": fence_of(l.product_id)})
            })
            .collect();
        let fences: Vec<_> = fences
            .iter()
            .map(|(id, f)| json!({"productId": id, "lastFence": f}))
            .collect();
        output::json(&json!({"locks": locks, "fences": fences}));
    } else {
        let mut t = output::table(&[
            "product",
            "holder",
            "token",
            "TTL left",
            "last fence (PostgreSQL)",
        ]);
        for l in &locks {
            t.add_row(vec![
                Cell::new(l.product_id),
                Cell::new(&l.holder),
                Cell::new(l.token),
                Cell::new(format!("{} ms", l.ttl_ms)),
                Cell::new(fence_of(l.product_id)),
            ]);
        }
        println!("{t}");
        println!(
            "{} locks held; {} products written under a fence",
            locks.len(),
            fences.len()
        );
    }
    Ok(())
}
