//! `GET /orders/{id}`: the order's row once the worker wrote it, else
//! `queued` from the accept log, else 404. With tokens, only to its buyer:
//! anyone else hears `404`, as if it did not exist.
//!
//! `GET /orders/{id}/events` streams it (Server-Sent Events) until final.
//!
//! `POST /orders/{id}/pay` and `/cancel` end a held order of the buyer
//! they name, exactly once (the ledger's row lock decides a race with the
//! workers' expiry sweep); a repeat answers the same `200`; an order not
//! held is `409 not_held` with its status.

use super::read_body;
use crate::error::ApiError;
use crate::state::AppState;
use crate::watchers::Refused;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::{Json, Router};
use flashsale_engine::accept_log::AcceptState;
use flashsale_engine::domain::{InvalidField, buyer_named};
use flashsale_engine::holds::units_back;
use flashsale_engine::ledger::{HoldAction, HoldSettlement};
use flashsale_engine::metrics::HOLD_OUTCOMES;
use flashsale_engine::{IdempotencyKey, OrderStatus, OrderView, ProductId, UserId};
use futures_util::{Stream, StreamExt};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

/// A client's read of an order gives up after this long.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client's read waits for a free read slot before `503`.
const READ_WAIT: Duration = Duration::from_millis(200);
/// What a buyer over `API_STREAMS_PER_BUYER` is told to wait.
const STREAM_RETRY: Duration = Duration::from_secs(5);

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
/// the order now and at every change, until a final status or
/// `API_STREAM_MAX`. Woken by the announcements (see [`crate::watchers`]),
/// not by polling. The stream caps are checked before any backend is read.
/// (81 lines: the caps, the first read and the stream's loop read in the
/// order a request meets them.)
async fn events(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
    request: Request,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let (parts, _) = request.into_parts();
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>();
    let buyer = state.gate.token_buyer(&parts.headers)?;
    let key =
        IdempotencyKey::parse(&order_id).map_err(|_| ApiError::UnknownOrder(order_id.clone()))?;
    let holder = state
        .gate
        .stream_holder(&parts.headers, peer, buyer.as_ref());
    let limits = &state.limits;
    let watch = match state.watchers.watch(
        key.as_str(),
        &holder,
        limits.max_streams,
        limits.streams_per_buyer,
    ) {
        Ok(watch) => watch,
        Err(Refused::HolderFull) => return Err(ApiError::RateLimited(STREAM_RETRY)),
        Err(Refused::Full) => {
            return Err(ApiError::Busy(format!(
                "{} order event streams are open",
                limits.max_streams
            )));
        }
    };
    state
        .gate
        .within_limits(&parts.headers, peer, buyer.as_ref())
        .await?;
    let Some(first) = current(&state, key.as_str()).await? else {
        return Err(ApiError::UnknownOrder(order_id));
    };
    if buyer.is_some_and(|b| b.as_str() != first.user_id) {
        return Err(ApiError::UnknownOrder(order_id));
    }
    let stream_max = limits.stream_max;
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
    })
    .take_until(tokio::time::sleep(stream_max));
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(HEARTBEAT).text("heartbeat")))
}

/// The order now: its row, else `queued` from the accept log. A read for a
/// client, within `API_MAX_READS`.
async fn current(state: &AppState, key: &str) -> Result<Option<OrderView>, ApiError> {
    let Ok(Ok(_read)) = tokio::time::timeout(READ_WAIT, state.reads.acquire()).await else {
        return Err(ApiError::Busy("too many order reads in progress".into()));
    };
    match lookup_row(state, key).await? {
        Some(view) => Ok(Some(view)),
        None => queued(state, key).await,
    }
}

async fn pay(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
    request: Request,
) -> Result<Json<OrderView>, ApiError> {
    end_hold(state, order_id, request, HoldAction::Pay).await
}

async fn cancel(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
    request: Request,
) -> Result<Json<OrderView>, ApiError> {
    end_hold(state, order_id, request, HoldAction::Cancel).await
}

/// Who pays or cancels: the token's buyer, else the body's `userId`
/// (contract v4, "Pay and cancel name the buyer").
async fn hold_buyer(state: &AppState, parts: &Parts, body: Body) -> Result<UserId, ApiError> {
    let token = state.gate.token_buyer(&parts.headers)?;
    let bytes = read_body(&parts.headers, body, state.limits.body_timeout).await?;
    match (token, buyer_named(&bytes)?) {
        (Some(token), Some(named)) if named != token => Err(ApiError::Forbidden),
        (Some(buyer), _) | (None, Some(buyer)) => Ok(buyer),
        (None, None) => Err(InvalidField {
            field: "userId",
            message: "userId is missing: name the order's buyer".into(),
        }
        .into()),
    }
}

/// Pays or cancels the held order of its own buyer; another buyer's order
/// is `404`, as an unknown one, and nothing changes. Once the ledger is
/// asked, the call runs to its end (units back, streams woken) whatever
/// the client does.
async fn end_hold(
    state: AppState,
    order_id: String,
    request: Request,
    action: HoldAction,
) -> Result<Json<OrderView>, ApiError> {
    let (parts, body) = request.into_parts();
    let buyer = hold_buyer(&state, &parts, body).await?;
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>();
    state
        .gate
        .within_limits(&parts.headers, peer, Some(&buyer))
        .await?;
    let key =
        IdempotencyKey::parse(&order_id).map_err(|_| ApiError::UnknownOrder(order_id.clone()))?;
    let owner = match lookup_row(&state, key.as_str()).await? {
        Some(row) => Some(row.user_id),
        None => queued(&state, key.as_str()).await?.map(|v| v.user_id),
    };
    if owner.as_deref() != Some(buyer.as_str()) {
        return Err(ApiError::UnknownOrder(order_id));
    }
    let process = state.process.clone();
    let ending = process.spawn(async move { settle_hold(&state, key, action).await });
    ending
        .await
        .map_err(|e| ApiError::unavailable("API", e))?
        .map(Json)
}

/// Asks the ledger to end the hold (it bounds the call itself: its
/// statements' deadline, after which it rolls back) and follows through.
async fn settle_hold(
    state: &AppState,
    key: IdempotencyKey,
    action: HoldAction,
) -> Result<OrderView, ApiError> {
    let settled = state
        .ledger
        .settle_hold(key.as_str(), action)
        .await
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
            Ok(order)
        }
        HoldSettlement::NotHeld(order) => Err(ApiError::NotHeld(order.status)),
        HoldSettlement::Expired { order, stock_after } => {
            ended(state, &order, stock_after).await;
            Err(ApiError::NotHeld(order.status))
        }
        // Accepted, not booked yet: not held (yet).
        HoldSettlement::Unknown => match queued(state, key.as_str()).await? {
            Some(_) => Err(ApiError::NotHeld(OrderStatus::Queued)),
            None => Err(ApiError::UnknownOrder(key.to_string())),
        },
    }
}

/// After this call ended a hold (paid, cancelled, or expired by a late
/// pay): its outcome counted, units given back to this API's catalog and to
/// the admission counter, its event streams woken.
async fn ended(state: &AppState, order: &OrderView, stock_after: Option<i32>) {
    metrics::counter!(HOLD_OUTCOMES, "outcome" => order.status.as_str()).increment(1);
    if let (Some(stock), Ok(product)) = (stock_after, ProductId::new(order.product_id)) {
        state.catalog.set_stock(product, stock);
        units_back(state.accept_log.as_ref(), state.ledger.as_ref(), product).await;
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
    request: Request,
) -> Result<Json<OrderView>, ApiError> {
    let (parts, _) = request.into_parts();
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>();
    let buyer = state.gate.token_buyer(&parts.headers)?;
    state
        .gate
        .within_limits(&parts.headers, peer, buyer.as_ref())
        .await?;
    let key =
        IdempotencyKey::parse(&order_id).map_err(|_| ApiError::UnknownOrder(order_id.clone()))?;
    let Some(view) = current(&state, key.as_str()).await? else {
        return Err(ApiError::UnknownOrder(order_id));
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
