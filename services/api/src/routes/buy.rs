//! `POST /buy`: shed load, validate, de-duplicate, fast-path sold-out,
//! publish with a confirm, and only then answer `202`.

use super::read_body;
use crate::catalog::Lookup;
use crate::error::ApiError;
use crate::first_requests::Unresolved;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::SubsecRound;
use flashsale_engine::accept_log::{AcceptRecord, AcceptState, Admit};
use flashsale_engine::admission::{self, Derived, PENDING_ALIVE};
use flashsale_engine::clock;
use flashsale_engine::domain::InvalidField;
use flashsale_engine::metrics::ORDER_REQUESTS;
use flashsale_engine::mutants::{self, Mutant};
use flashsale_engine::seams::BackendFailed;
use flashsale_engine::{
    IdempotencyKey, OrderBody, OrderMessage, OrderRequest, OrderView, ProductId,
};
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;

/// Derivations of a missing admission counter one buy may try before `503`
/// (each is lost only to a concurrent take or give-back).
const DERIVE_ATTEMPTS: u32 = 5;
/// How long a repeat waits for a concurrent first request with its key:
/// as long as that request's claim may live.
const FIRST_REQUEST_WAIT: Duration = PENDING_ALIVE;

pub fn router() -> Router<AppState> {
    Router::new().route("/buy", post(buy))
}

/// What `POST /buy` answered, short of an error.
enum Answer {
    Accepted(IdempotencyKey),
    Repeat(OrderView),
    SoldOut(IdempotencyKey),
    /// Fewer units left than asked: `available` remain.
    Insufficient(IdempotencyKey, i64),
}

impl Answer {
    fn label(&self) -> &'static str {
        match self {
            Self::Accepted(_) => "queued",
            Self::Repeat(_) => "duplicate",
            Self::SoldOut(_) | Self::Insufficient(..) => "rejected_sold_out",
        }
    }
}

/// A valid buy of a known product, ready to be admitted.
struct Buy {
    key: IdempotencyKey,
    /// The client sent the key (a key made up here cannot have been used).
    supplied: bool,
    request: OrderRequest,
    /// The catalog has the product sold out.
    sold_out: bool,
}

fn count(answer: &Result<Answer, ApiError>) {
    let label = match answer {
        Ok(a) => a.label(),
        Err(e) => e.metric_label(),
    };
    metrics::counter!(ORDER_REQUESTS, "status" => label).increment(1);
}

async fn buy(State(state): State<AppState>, request: Request) -> Response {
    let Some(pass) = state.buys.enter(state.limits.max_inflight) else {
        metrics::counter!(ORDER_REQUESTS, "status" => "unavailable").increment(1);
        return ApiError::Busy("the API is at capacity".into()).into_response();
    };
    let (parts, body) = request.into_parts();
    let answer = match validate(&state, &parts, body).await {
        // From the first take of units on, the buy runs to its end (published
        // and marked, or its units given back) in a task of its own: a client
        // that hangs up drops only the wait for the answer.
        Ok(buy) if mutants::active(Mutant::HangUpLeak) => {
            let answer = admit(&state, buy).await;
            count(&answer);
            answer
        }
        Ok(buy) => {
            let process = state.process.clone();
            let state = state.clone();
            let admitting = process.spawn(async move {
                let _pass = pass;
                let answer = admit(&state, buy).await;
                count(&answer);
                answer
            });
            admitting.await.unwrap_or_else(|e| {
                let answer = Err(ApiError::unavailable("API", e));
                count(&answer);
                answer
            })
        }
        Err(e) => {
            let answer = Err(e);
            count(&answer);
            answer
        }
    };
    match answer {
        Ok(Answer::Accepted(key)) => (
            StatusCode::ACCEPTED,
            Json(
                json!({"orderId": key, "status": "queued", "statusUrl": format!("/orders/{key}")}),
            ),
        )
            .into_response(),
        Ok(Answer::Repeat(view)) => (StatusCode::OK, Json(view)).into_response(),
        Ok(Answer::SoldOut(key)) => (
            StatusCode::CONFLICT,
            Json(json!({"orderId": key, "status": "rejected", "reason": "sold_out"})),
        )
            .into_response(),
        Ok(Answer::Insufficient(key, available)) => (
            StatusCode::CONFLICT,
            Json(json!({
                "orderId": key,
                "status": "rejected",
                "reason": "insufficient_stock",
                "available": available,
            })),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
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

/// Everything that needs no backend but the catalog: the gate, the body,
/// the key, the product and its order size.
async fn validate(state: &AppState, parts: &Parts, body: Body) -> Result<Buy, ApiError> {
    let headers = &parts.headers;
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>();
    // With tokens the buyer is known before the body is read: a flood is
    // turned away before it costs a body read.
    let token_buyer = state.gate.token_buyer(headers)?;
    if let Some(buyer) = &token_buyer {
        state.gate.within_limits(headers, peer, Some(buyer)).await?;
    }
    let bytes = read_body(headers, body, state.limits.body_timeout).await?;
    let (key, supplied) = idempotency_key(headers)?;
    let body = OrderBody::parse(&bytes)?;
    let request = match (token_buyer, body.user_id.clone()) {
        (Some(buyer), Some(named)) if named != buyer => return Err(ApiError::Forbidden),
        (Some(buyer), _) => body.for_buyer(buyer),
        (None, Some(named)) => {
            state
                .gate
                .within_limits(headers, peer, Some(&named))
                .await?;
            body.for_buyer(named)
        }
        (None, None) => {
            return Err(InvalidField {
                field: "userId",
                message: "userId is missing".into(),
            }
            .into());
        }
    };
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
    Ok(Buy {
        key,
        supplied,
        request,
        sold_out: product.stock == 0,
    })
}

/// Admits the buy: takes its units and claims its key (or finds the key's
/// earlier accept), then publishes.
async fn admit(state: &AppState, buy: Buy) -> Result<Answer, ApiError> {
    let Buy {
        key,
        supplied,
        request,
        sold_out,
    } = buy;
    // Microseconds, as PostgreSQL keeps it: the row of this very publish
    // carries the same time (see `publish_and_record`).
    let record =
        AcceptRecord::pending(&request, clock::now().trunc_subsecs(6)).claimed_by(&state.instance);
    let redis_down = |e: BackendFailed| ApiError::unavailable("Redis", e);
    let mut derivations = 0;
    loop {
        let earlier = if sold_out {
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
                .admit(&key, &record)
                .await
                .map_err(redis_down)?
            {
                // The counter's gauge is the workers' (a per-accept gauge
                // update cost ~10 % of the accept rate).
                Admit::Claimed { .. } => {
                    return publish_and_record(state, key, supplied, &request, &record).await;
                }
                Admit::Taken(earlier) => earlier,
                Admit::Short { available: 0 } => return Ok(Answer::SoldOut(key)),
                Admit::Short { available } => return Ok(Answer::Insufficient(key, available)),
                Admit::NoCounter => {
                    derivations += 1;
                    derive_counter(state, request.product_id, derivations).await?;
                    continue;
                }
            }
        };
        match await_first_request(state, &key, earlier).await? {
            Some(accepted) if accepted.same_body(&request) => {
                return repeat(state, &key, &accepted).await;
            }
            // The log says another body; the key's row, if it has one, is
            // the truth (two bodies may have been accepted under one key
            // after Redis forgot the first: the worker booked one of them).
            Some(_) => {
                return match state.booked.row(key.as_str()).await {
                    Ok(Some(row)) if row.is_of(&request) => Ok(Answer::Repeat(row)),
                    Ok(_) => Err(ApiError::KeyReused),
                    Err(e) => Err(ApiError::unavailable("PostgreSQL", e)),
                };
            }
            // The first request with this key failed and withdrew: start afresh.
            None => continue,
        }
    }
}

/// Withdraws this request's claim, its units back; repeats waiting on it
/// start afresh.
async fn withdraw(state: &AppState, key: &IdempotencyKey, record: &AcceptRecord) {
    if let Err(w) = state.accept_log.withdraw(key, record).await {
        tracing::warn!(order = %key, error = %w, "cannot withdraw claim; it expires");
    }
    state.first_requests.resolve(key.as_str(), Ok(None));
}

/// The product has no admission counter (first buy, or Redis lost its
/// data): derive it from PostgreSQL, then admit again.
async fn derive_counter(
    state: &AppState,
    product: ProductId,
    attempt: u32,
) -> Result<(), ApiError> {
    if attempt > DERIVE_ATTEMPTS {
        return Err(ApiError::unavailable(
            "Redis",
            format!("the admission counter of product {product} kept changing while derived"),
        ));
    }
    match admission::derive(
        state.accept_log.as_ref(),
        state.ledger.as_ref(),
        product,
        true,
    )
    .await
    {
        Ok(Derived::Set { tokens, in_flight }) => {
            tracing::info!(%product, tokens, in_flight, "admission counter derived from the ledger");
            Ok(())
        }
        Ok(Derived::Raced) => Ok(()),
        Ok(Derived::Skipped) => Err(ApiError::UnknownProduct(product.get())),
        Err(e) => Err(ApiError::unavailable("Redis or PostgreSQL", e)),
    }
}

/// Waits while the key's first request is still publishing (one shared
/// wait per key); `None` when it withdrew its claim.
async fn await_first_request(
    state: &AppState,
    key: &IdempotencyKey,
    record: AcceptRecord,
) -> Result<Option<AcceptRecord>, ApiError> {
    if record.state != AcceptState::Pending {
        return Ok(Some(record));
    }
    state
        .first_requests
        .wait(state.accept_log.clone(), key.as_str(), FIRST_REQUEST_WAIT)
        .await
        .map_err(|e| ApiError::unavailable("Redis", e))
}

/// What the ledger says of a claimed key the client sent.
enum Ledgered {
    /// No row: the key is free (or the API made it up: nobody asked).
    Free,
    /// The key was booked before the accept log forgot it.
    Booked(OrderView),
    /// The ledger did not answer.
    Unknown(ApiError),
}

/// Claimed: publish, wait for the confirm, and mark the key queued; or
/// withdraw the claim when the publish failed.
///
/// A key the client sent and the accept log did not know may still have a
/// row in PostgreSQL (its record expired, or Redis lost its data), so the
/// ledger is asked too (contract v4, "A key is the truth"), at the same
/// time as the publish so that it adds no wait. If the key was booked, a
/// copy just published is a duplicate: the worker acks it when its body is
/// the row's, and dead-letters it (`idempotency_key_reused`) when not; the
/// answer is the row (`200`) or `422` for another body, and the claim's
/// units go back. If the ledger did not answer, the answer is `503`: the claim is
/// left to expire (the reconciliation then counts the order by its row).
async fn publish_and_record(
    state: &AppState,
    key: IdempotencyKey,
    supplied: bool,
    request: &OrderRequest,
    record: &AcceptRecord,
) -> Result<Answer, ApiError> {
    let message = OrderMessage::new(&key, request, record.accepted_at);
    let publishing = async {
        match serde_json::to_vec(&message) {
            Ok(payload) => state
                .queue
                .publish(request.product_id, key.as_str(), &payload)
                .await
                .map_err(|e| ApiError::unavailable("RabbitMQ", e)),
            Err(e) => Err(ApiError::unavailable(
                "API",
                format!("cannot encode the order: {e}"),
            )),
        }
    };
    let ledgered = async {
        if !supplied {
            return Ledgered::Free;
        }
        match state.booked.row(key.as_str()).await {
            Ok(None) => Ledgered::Free,
            // This very publish, booked already by a quick worker.
            Ok(Some(row)) if row.is_of(request) && row.accepted_at == message.accepted_at => {
                Ledgered::Free
            }
            Ok(Some(row)) => Ledgered::Booked(row),
            Err(e) => Ledgered::Unknown(ApiError::unavailable("PostgreSQL", e)),
        }
    };
    let (published, ledgered) = tokio::join!(publishing, ledgered);
    match (published, ledgered) {
        (_, Ledgered::Booked(row)) => {
            withdraw(state, &key, record).await;
            if row.is_of(request) {
                Ok(Answer::Repeat(row))
            } else {
                Err(ApiError::KeyReused)
            }
        }
        (Err(e), _) => {
            withdraw(state, &key, record).await;
            Err(e)
        }
        (Ok(()), Ledgered::Unknown(e)) => {
            state
                .first_requests
                .resolve(key.as_str(), Err(Unresolved::LedgerSilent));
            Err(e)
        }
        (Ok(()), Ledgered::Free) => {
            let queued = AcceptRecord {
                state: AcceptState::Queued,
                ..record.clone()
            };
            match state.accept_log.mark_queued(&key, record).await {
                Ok(true) => {}
                // The order is in the queue all the same: the worker books it once.
                Ok(false) => tracing::warn!(order = %key, "accepted after its claim expired"),
                // A repeat after the claim expires is published again and booked once.
                Err(e) => {
                    tracing::warn!(order = %key, error = %e, "accepted, but not recorded in Redis");
                }
            }
            state.first_requests.resolve(key.as_str(), Ok(Some(queued)));
            Ok(Answer::Accepted(key))
        }
    }
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
