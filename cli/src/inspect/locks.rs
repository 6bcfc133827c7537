//! `fsctl inspect locks`.

use super::*;
use flashsale_engine::locks;

/// A held lock beside its product's last fence.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LockReport<'a> {
    product_id: i64,
    holder: &'a str,
    token: i64,
    ttl_ms: i64,
    last_fence: i64,
}

/// Held product locks beside each product's last fence.
pub async fn show(b: &BackendUrls, ns: &Namespace, as_json: bool) -> Result<(), Failure> {
    let redis = backends::redis(b).await?;
    let ledger = backends::ledger(b).await?;
    let locks = locks::held(&redis, ns).await?;
    let fences = ledger.fences().await?;
    let fence_of = |id: i64| {
        fences
            .iter()
            .find(|f| f.product_id == id)
            .map_or(0, |f| f.last_fence)
    };
    if as_json {
        let locks: Vec<LockReport> = locks
            .iter()
            .map(|l| LockReport {
                product_id: l.product_id,
                holder: &l.holder,
                token: l.token,
                ttl_ms: l.ttl_ms,
                last_fence: fence_of(l.product_id),
            })
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
