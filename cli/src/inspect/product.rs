//! `fsctl inspect product`.

use super::*;
use ::redis;
use flashsale_engine::admission::AdmissionCounters;

/// One product, in PostgreSQL and in Redis.
pub async fn show(b: &BackendUrls, ns: &Namespace, as_json: bool, id: i64) -> Result<(), Failure> {
    let ledger = backends::ledger(b).await?;
    let redis = backends::redis(b).await?;
    let pid = ProductId::new(id).map_err(|e| crate::exit::Failure::usage(e.to_string()))?;
    let Some(p) = ledger.product(pid).await? else {
        return Err(crate::exit::Failure::usage(format!(
            "product {id} does not exist"
        )));
    };
    let (confirmed_orders, confirmed_units, rejected): (i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*) FILTER (WHERE status = 'confirmed'),
                COALESCE(SUM(quantity) FILTER (WHERE status = 'confirmed'), 0)::bigint,
                COUNT(*) FILTER (WHERE status = 'rejected')
         FROM orders WHERE product_id = $1",
    )
    .bind(id)
    .fetch_one(ledger.pool())
    .await?;
    let mut conn = redis.clone();
    let (lock, fence_counter): (Option<String>, Option<i64>) = timed(
        redis::pipe()
            .cmd("GET")
            .arg(ns.lock_key(id))
            .cmd("GET")
            .arg(ns.fence_key(id))
            .query_async(&mut conn),
    )
    .await?;
    let admission = RedisAcceptLog::new(redis.clone(), ns.clone())
        .admission(id)
        .await?;
    let in_flight: i64 = admission.admitted.iter().map(|(_, q)| q).sum();
    let view = json!({
        "id": p.id, "name": p.name, "stock": p.stock, "seededStock": p.seeded_stock,
        "admissionTokens": admission.tokens, "admittedUnsettled": admission.admitted.len(),
        "admittedUnits": in_flight,
        "maxPerOrder": p.max_per_order, "perUserLimit": p.per_user_limit,
        "soldOut": p.stock == 0, "lockFence": p.lock_fence,
        "confirmedOrders": confirmed_orders, "confirmedUnits": confirmed_units,
        "rejectedOrders": rejected, "lockHeldBy": lock, "fenceCounter": fence_counter.unwrap_or(0),
    });
    if as_json {
        output::json(&json!({"product": view}));
    } else {
        let empty = serde_json::Map::new();
        println!("{}", fields_table(view.as_object().unwrap_or(&empty)));
    }
    Ok(())
}
