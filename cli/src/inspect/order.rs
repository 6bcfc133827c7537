//! `fsctl inspect order`.

use super::*;
use flashsale_engine::OrderView;
use flashsale_engine::accept_log::AcceptLog;
use flashsale_engine::queue;
use serde::Serialize;

/// Where an order is (`--json`: `{"order": ...}`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OrderReport<'a> {
    order_id: &'a str,
    /// The row's status; `queued` (accepted, no row yet), `dead_lettered`,
    /// or `unknown`.
    location: &'static str,
    view: Option<Found>,
}

/// What is known of the order where it was found.
#[derive(Serialize)]
#[serde(untagged)]
enum Found {
    /// Its row, or the view `GET /orders` gives of a queued order.
    Order(OrderView),
    #[serde(rename_all = "camelCase")]
    DeadLetter {
        order_id: String,
        reason: Option<String>,
        body: String,
    },
}

/// One order and where it is.
pub async fn show(b: &BackendUrls, ns: &Namespace, as_json: bool, id: &str) -> Result<(), Failure> {
    let ledger = backends::ledger(b).await?;
    let redis = backends::redis(b).await?;
    let (location, view) = match ledger.order(id).await? {
        Some(view) => (view.status.as_str(), Some(Found::Order(view))),
        None => match RedisAcceptLog::new(redis, ns.clone()).get(id).await? {
            Some(r) if r.state == AcceptState::Queued => {
                ("queued", Some(Found::Order(r.queued_view(id))))
            }
            _ => {
                let dead = queue::peek_dead_letters(&b.amqp_url, ns, 10_000).await?;
                match dead
                    .into_iter()
                    .find(|d| d.message_id.as_deref() == Some(id))
                {
                    Some(d) => (
                        "dead_lettered",
                        Some(Found::DeadLetter {
                            order_id: id.to_owned(),
                            reason: d.reason,
                            body: d.body,
                        }),
                    ),
                    None => ("unknown", None),
                }
            }
        },
    };
    let report = OrderReport {
        order_id: id,
        location,
        view,
    };
    if as_json {
        output::json(&json!({ "order": report }));
    } else {
        println!("order {id}: {location}");
        if let serde_json::Value::Object(map) = serde_json::to_value(&report.view)? {
            println!("{}", fields_table(&map));
        }
    }
    Ok(())
}
