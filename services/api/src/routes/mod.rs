//! The HTTP routes and the request-duration middleware.

mod buy;
mod health;
mod orders;
mod products;

use crate::error::ApiError;
use crate::state::AppState;
use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use flashsale_engine::metrics::REQUEST_DURATION;
use std::time::{Duration, Instant};

/// Largest body a route reads.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(buy::router())
        .merge(orders::router())
        .merge(products::router())
        .merge(health::router())
        .layer(middleware::from_fn(track_duration))
        .with_state(state)
}

async fn track_duration(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::histogram!(REQUEST_DURATION, "route" => route).record(started.elapsed().as_secs_f64());
    response
}

/// The whole body, at most [`MAX_BODY_BYTES`], within `within`.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    within: Duration,
) -> Result<axum::body::Bytes, ApiError> {
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
    match tokio::time::timeout(within, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(too_large),
        Err(_) => Err(ApiError::BodyTimeout(within)),
    }
}
