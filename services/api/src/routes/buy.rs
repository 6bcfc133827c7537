//! `POST /buy`: validate, de-duplicate, fast-path sold-out, publish with a
//! confirm, and only then answer `202`.

use crate::catalog::Lookup;
use crate::error::ApiError;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::Utc;
use flashsale_engine::accept_log::{AcceptRecord, AcceptState, Claim};
use flashsale_engine::broker::CONFIRM_TIMEOUT;
use flashsale_engine::domain::InvalidField;
use flashsale_engine::metrics::ORDER_REQUESTS;
use flashsale_engine::{IdempotencyKey, OrderMessage, OrderRequest, OrderView};
use serde_json::json;
use std::time::Duration;
use tokio::time::Instant;

/// Largest body `POST /buy` reads.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// How long a repeat waits for a concurrent first request with its key.
const SETTLE_WAIT: Duration = Duration::from_secs(CONFIRM_TIMEOUT.as_secs() + 2);

pub fn router() -> Router<AppState> {
    Router::new().route("/buy", post(buy))
}

/// What `POST /buy` answered, short of an error.
enum Answer {
    Accepted(IdempotencyKey),
    Repeat(OrderView),
    SoldOut(IdempotencyKey),
}

async fn buy(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let (label, response) = match accept(&state, &headers, body).await {
        Ok(Answer::Accepted(key)) => (
            "queued",
            (
                StatusCode::ACCEPTED,
                Json(json!({"orderId": key, "status": "queued", "statusUrl": format!("/orders/{key}")})),
            )
                .into_response(),
        ),
        Ok(Answer::Repeat(view)) => ("duplicate", (StatusCode::OK, Json(view)).into_response()),
        Ok(Answer::SoldOut(key)) => (
            "rejected_sold_out",
            (
                StatusCode::CONFLICT,
                Json(json!({"orderId": key, "status": "rejected", "reason": "sold_out"})),
            )
                .into_response(),
        ),
        Err(e) => (e.metric_label(), e.into_response()),
    };
    metrics::counter!(ORDER_REQUESTS, "status" => label).increment(1);
    response
}

async fn read_body(headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let too_large = ApiError::TooLarge {
        limit: MAX_BODY_BYTES,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large);
    }
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| too_large)
}

/// The request's key, or a fresh one (`false`: no earlier request can hold it).
fn idempotency_key(headers: &HeaderMap) -> Result<(IdempotencyKey, bool), ApiError> {
    match headers.get("idempotency-key") {
        None => Ok((IdempotencyKey::generate(), false)),
        Some(v) => {
            let raw = v.to_str().map_err(|_| InvalidField {
                field: "Idempotency-Key",
                message: "Idempotency-Key must be 1-128 characters from [A-Za-z0-9._~:-]".into(),
            })?;
            Ok((IdempotencyKey::parse(raw)?, true))
        }
    }
}

async fn accept(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Answer, ApiError> {
    let bytes = read_body(headers, body).await?;
    let (key, supplied) = idempotency_key(headers)?;
    let request = OrderRequest::parse(&bytes)?;
    let product = match state.catalog.lookup(request.product_id) {
        Lookup::Found(p) => p,
        Lookup::Unknown => return Err(ApiError::UnknownProduct(request.product_id.get())),
        Lookup::NotLoaded => {
            return Err(ApiError::unavailable(
                "PostgreSQL",
                "product catalog not loaded yet",
            ));
        }
    };
    if request.quantity.get() > product.max_per_order {
        return Err(InvalidField {
            field: "quantity",
            message: format!(
                "quantity must be at most {} for product {}",
                product.max_per_order, product.id
            ),
        }
        .into());
    }
    let record = AcceptRecord::pending(&request, Utc::now());
    let redis_down = |e: flashsale_engine::seams::BackendFailed| ApiError::unavailable("Redis", e);
    loop {
        let earlier = if product.stock == 0 {
            // Sold out: nothing is claimed or enqueued; only an earlier accept
            // counts, and a key made up here has none (Redis is not asked).
            if !supplied {
                return Ok(Answer::SoldOut(key));
            }
            match state
                .accept_log
                .get(key.as_str())
                .await
                .map_err(redis_down)?
            {
                Some(earlier) => earlier,
                None => return Ok(Answer::SoldOut(key)),
            }
        } else {
            match state
                .accept_log
                .claim(&key, &record)
                .await
                .map_err(redis_down)?
            {
                Claim::Claimed => return publish(state, key, request, record).await,
                Claim::Taken(earlier) => earlier,
            }
        };
        match settle(state, &key, earlier).await? {
            Some(accepted) if accepted.same_body(&request) => {
                return repeat(state, &key, &accepted).await;
            }
            Some(_) => return Err(ApiError::KeyReused),
            // The first request with this key failed and withdrew: start afresh.
            None => continue,
        }
    }
}

/// Waits while the key's first request is still publishing; `None` when it
/// withdrew its claim.
async fn settle(
    state: &AppState,
    key: &IdempotencyKey,
    mut record: AcceptRecord,
) -> Result<Option<AcceptRecord>, ApiError> {
    let deadline = Instant::now() + SETTLE_WAIT;
    while record.state == AcceptState::Pending {
        if Instant::now() > deadline {
            return Err(ApiError::unavailable(
                "RabbitMQ",
                "an earlier request with this key is still unconfirmed",
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        match state.accept_log.get(key.as_str()).await {
            Ok(Some(r)) => record = r,
            Ok(None) => return Ok(None),
            Err(e) => return Err(ApiError::unavailable("Redis", e)),
        }
    }
    Ok(Some(record))
}

/// Claimed: publish and wait for the confirm. Runs in its own task so a
/// client that hangs up cannot leave a published order unrecorded.
async fn publish(
    state: &AppState,
    key: IdempotencyKey,
    request: OrderRequest,
    record: AcceptRecord,
) -> Result<Answer, ApiError> {
    let state = state.clone();
    let task = tokio::spawn(async move {
        let message = OrderMessage::new(&key, &request, record.accepted_at);
        let payload = serde_json::to_vec(&message).unwrap_or_default();
        match state.queue.publish(key.as_str(), &payload).await {
            Ok(()) => {
                if let Err(e) = state.accept_log.mark_queued(&key, &record).await {
                    // The order is in the queue; a repeat after the claim
                    // expires is published again and booked once by the worker.
                    tracing::warn!(order = %key, error = %e, "accepted, but not recorded in Redis");
                }
                Ok(Answer::Accepted(key))
            }
            Err(e) => {
                if let Err(w) = state.accept_log.withdraw(&key, &record).await {
                    tracing::warn!(order = %key, error = %w, "cannot withdraw claim; it expires");
                }
                Err(ApiError::unavailable("RabbitMQ", e))
            }
        }
    });
    task.await
        .unwrap_or_else(|e| Err(ApiError::unavailable("API", e)))
}

/// A repeat of an accepted key: the order as `GET /orders/{id}` shows it.
async fn repeat(
    state: &AppState,
    key: &IdempotencyKey,
    accepted: &AcceptRecord,
) -> Result<Answer, ApiError> {
    let view = super::orders::lookup_row(state, key.as_str()).await?;
    Ok(Answer::Repeat(
        view.unwrap_or_else(|| accepted.queued_view(key.as_str())),
    ))
}
