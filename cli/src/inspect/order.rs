//! `fsctl inspect order`.

use super::*;
use flashsale_engine::accept_log::AcceptLog;
use flashsale_engine::queue;

/// One order and where it is.
pub async fn show(b: &BackendUrls, ns: &Namespace, as_json: bool, id: &str) -> Result<(), Failure> {
    let ledger = backends::ledger(b).await?;
    let redis = backends::redis(b).await?;
    let (order, location) = match ledger.order(id).await? {
        Some(view) => {
            let location = serde_json::to_value(view.status)?;
            (Some(serde_json::to_value(&view)?), location)
        }
        None => match RedisAcceptLog::new(redis, ns.clone()).get(id).await? {
            Some(r) if r.state == AcceptState::Queued => (
                Some(serde_json::to_value(r.queued_view(id))?),
                json!("queued"),
            ),
            _ => {
                let dead = queue::peek_dead_letters(&b.amqp_url, ns, 10_000).await?;
                match dead
                    .into_iter()
                    .find(|d| d.message_id.as_deref() == Some(id))
                {
                    Some(d) => (
                        Some(json!({"orderId": id, "reason": d.reason, "body": d.body})),
                        json!("dead_lettered"),
                    ),
                    None => (None, json!("unknown")),
                }
            }
        },
    };
    if as_json {
        output::json(&json!({"order": {"orderId": id, "location": location, "view": order}}));
    } else {
        println!("order {id}: {}", location.as_str().unwrap_or("unknown"));
        if let Some(map) = order.as_ref().and_then(|o| o.as_object()) {
            println!("{}", fields_table(map));
        }
    }
    Ok(())
}
