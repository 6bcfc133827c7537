//! `GET /orders/{id}`: the order's row once the worker wrote it, else
//! `queued` from the accept log, else 404. With tokens, only to its buyer:
//! anyone else hears `404`, as if it did not exist.
//!
//! `GET /orders/{id}/events` streams it (Server-Sent Events) until final.
//!
//! `POST /orders/{id}/pay` and `/cancel` settle a held order, exactly once
//! (the ledger's row lock decides a race with the workers' expiry sweep);
//! a repeat answers the same `200`; an order not held is `409 not_held`
//! with its status.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::{Json, Router};
use flashsale_engine::accept_log::AcceptState;
use flashsale_engine::holds::units_back;
use flashsale_engine::ledger::{HoldAction, HoldSettlement};
use flashsale_engine::metrics::HOLD_OUTCOMES;
use flashsale_engine::{IdempotencyKey, OrderStatus, OrderView};
use futures_util::Stream;
use std::convert::Infallible;
use std::time::Duration;

const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/orders/{order_id}", get(order))
        .route("/orders/{order_id}/pay", post(pay))
        .route("/orders/{order_id}/cancel", post(cancel))
        .route("/orders/{order_id}/events", get(events))
}

/// A comment line every this long keeps the stream (and its proxies) open;
/// the order is also read afresh then, should an announcement have been lost.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// `GET /orders/{id}/events`: Server-Sent Events, an `event: status` with
/// the order now and at every change, until a final status. Woken by the
/// announcements (see [`crate::watchers`]), not by polling.
async fn events(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let buyer = state.gate.token_buyer(&headers)?;
    let key =
        IdempotencyKey::parse(&order_id).map_err(|_| ApiError::UnknownOrder(order_id.clone()))?;
    let Some(first) = current(&state, key.as_str()).await? else {
        return Err(ApiError::UnknownOrder(order_id));
    };
    if buyer.is_some_and(|b| b.as_str() != first.user_id) {
        return Err(ApiError::UnknownOrder(order_id));
    }
    let Some(watch) = state.watchers.watch(key.as_str(), state.limits.max_streams) else {
        return Err(ApiError::unavailable(
            "API",
            format!("{} order event streams are open", state.limits.max_streams),
        ));
    };
    struct Follow {
        state: AppState,
        watch: crate::watchers::Watch,
        first: Option<OrderView>,
        last: Option<OrderStatus>,
    }
    let follow = Follow {
        state,
        watch,
        first: Some(first),
        last: None,
    };
    let stream = futures_util::stream::unfold(follow, |mut f| async move {
        if f.last.is_some_and(OrderStatus::is_final) {
            return None;
        }
        let view = match f.first.take() {
            Some(view) => view,
            None => loop {
                // Armed before the read, so a change right after it wakes us.
                let woken = f.watch.notify.notified();
                let mut woken = std::pin::pin!(woken);
                woken.as_mut().enable();
                match current(&f.state, &f.watch.key).await {
                    Ok(Some(view)) if Some(view.status) != f.last => break view,
                    Ok(None) => return None,
                    _ => {}
                }
                let _ = tokio::time::timeout(HEARTBEAT, woken).await;
            },
        };
        f.last = Some(view.status);
        let event = Event::default()
            .event("status")
            .json_data(&view)
            .unwrap_or_else(|_| Event::default().event("status"));
        Some((Ok(event), f))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(HEARTBEAT).text("heartbeat")))
}

/// The order now: its row, else `queued` from the accept log.
async fn current(state: &AppState, key: &str) -> Result<Option<OrderView>, ApiError> {
    match lookup_row(state, key).await? {
        Some(view) => Ok(Some(view)),
        None => queued(state, key).await,
    }
}

async fn pay(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<OrderView>, ApiError> {
    settle(&state, order_id, &headers, HoldAction::Pay).await
}

async fn cancel(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<OrderView>, ApiError> {
    settle(&state, order_id, &headers, HoldAction::Cancel).await
}

/// Pays or cancels the held order. With tokens, only its buyer may: anyone
/// else hears `404`, and nothing changes.
async fn settle(
    state: &AppState,
    order_id: String,
    headers: &HeaderMap,
    action: HoldAction,
) -> Result<Json<OrderView>, ApiError> {
    let buyer = state.gate.token_buyer(headers)?;
    let key =
        IdempotencyKey::parse(&order_id).map_err(|_| ApiError::UnknownOrder(order_id.clone()))?;
    if let Some(buyer) = &buyer {
        let owner = match lookup_row(state, key.as_str()).await? {
            Some(row) => Some(row.user_id),
            None => queued(state, key.as_str()).await?.map(|v| v.user_id),
        };
        if owner.as_deref() != Some(buyer.as_str()) {
            return Err(ApiError::UnknownOrder(order_id));
        }
    }
    let settled = tokio::time::timeout(
        QUERY_TIMEOUT,
        state.ledger.settle_hold(key.as_str(), action),
    )
    .await
    .map_err(|_| ApiError::unavailable("PostgreSQL", "query timed out"))?
    .map_err(|e| ApiError::unavailable("PostgreSQL", e))?;
    match settled {
        HoldSettlement::Settled {
            order,
            changed,
            stock_after,
        } => {
            if changed {
                ended(state, &order, stock_after).await;
            }
            Ok(Json(order))
        }
        HoldSettlement::NotHeld(order) => Err(ApiError::NotHeld(order.status)),
        HoldSettlement::Expired { order, stock_after } => {
            ended(state, &order, stock_after).await;
            Err(ApiError::NotHeld(order.status))
        }
        // Accepted, not booked yet: not held (yet).
        HoldSettlement::Unknown => match queued(state, key.as_str()).await? {
            Some(_) => Err(ApiError::NotHeld(OrderStatus::Queued)),
            None => Err(ApiError::UnknownOrder(order_id)),
        },
    }
}

/// After this call ended a hold (paid, cancelled, or expired by a late
/// pay): its outcome counted, units given back to this API's catalog and to
/// the admission counter, its event streams woken.
async fn ended(state: &AppState, order: &OrderView, stock_after: Option<i32>) {
    metrics::counter!(HOLD_OUTCOMES, "outcome" => order.status.as_str()).increment(1);
    if let Some(stock) = stock_after {
        state.catalog.set_stock(order.product_id, stock);
        units_back(
            state.accept_log.as_ref(),
            state.ledger.as_ref(),
            order.product_id,
        )
        .await;
    }
    state.events.announce([order.order_id.as_str()]).await;
}

/// The order as `queued`, when the accept log has it so.
async fn queued(state: &AppState, key: &str) -> Result<Option<OrderView>, ApiError> {
    match state.accept_log.get(key).await {
        Ok(Some(r)) if r.state == AcceptState::Queued => Ok(Some(r.queued_view(key))),
        Ok(_) => Ok(None),
        Err(e) => Err(ApiError::unavailable("Redis", e)),
    }
}

async fn order(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<OrderView>, ApiError> {
    let buyer = state.gate.token_buyer(&headers)?;
    let key =
        IdempotencyKey::parse(&order_id).map_err(|_| ApiError::UnknownOrder(order_id.clone()))?;
    let view = match lookup_row(&state, key.as_str()).await? {
        Some(view) => view,
        None => match queued(&state, key.as_str()).await? {
            Some(view) => view,
            None => return Err(ApiError::UnknownOrder(order_id)),
        },
    };
    match buyer {
        Some(buyer) if buyer.as_str() != view.user_id => Err(ApiError::UnknownOrder(order_id)),
        _ => Ok(Json(view)),
    }
}

/// The order's row in PostgreSQL, if written.
pub(super) async fn lookup_row(
    state: &AppState,
    order_id: &str,
) -> Result<Option<OrderView>, ApiError> {
    match tokio::time::timeout(QUERY_TIMEOUT, state.ledger.order(order_id)).await {
        Ok(Ok(view)) => Ok(view),
        Ok(Err(e)) => Err(ApiError::unavailable("PostgreSQL", e)),
        Err(_) => Err(ApiError::unavailable("PostgreSQL", "query timed out")),
    }
}
