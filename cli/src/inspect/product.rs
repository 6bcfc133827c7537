//! `fsctl inspect product`.

use super::*;
use ::redis;
use flashsale_engine::admission::AdmissionCounters;
use flashsale_engine::ledger::OrderCounts;

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
    let counts = ledger.order_counts(pid).await?;
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
        .admission(pid)
        .await?;
    let report = ProductReport {
        id: p.id,
        name: &p.name,
        stock: p.stock,
        seeded_stock: p.seeded_stock,
        admission_tokens: admission.tokens,
        admitted_unsettled: admission.admitted.len(),
        admitted_units: admission.admitted.iter().map(|(_, q)| q).sum(),
        max_per_order: p.max_per_order,
        per_user_limit: p.per_user_limit,
        sold_out: p.stock == 0,
        lock_fence: p.lock_fence,
        counts,
        lock_held_by: lock,
        fence_counter: fence_counter.unwrap_or(0),
    };
    if as_json {
        output::json(&json!({"product": report}));
    } else {
        let view = serde_json::to_value(&report)?;
        let empty = serde_json::Map::new();
        println!("{}", fields_table(view.as_object().unwrap_or(&empty)));
    }
    Ok(())
}

/// One product as PostgreSQL and Redis see it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ProductReport<'a> {
    id: ProductId,
    name: &'a str,
    stock: i32,
    seeded_stock: i32,
    admission_tokens: Option<i64>,
    admitted_unsettled: usize,
    admitted_units: i64,
    max_per_order: i32,
    per_user_limit: Option<i32>,
    sold_out: bool,
    lock_fence: i64,
    #[serde(flatten)]
    counts: OrderCounts,
    lock_held_by: Option<String>,
    fence_counter: i64,
}
