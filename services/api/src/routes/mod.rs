//! The HTTP routes and the request-duration middleware.

mod buy;
mod health;
mod orders;
mod products;

use crate::state::AppState;
use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use flashsale_engine::metrics::REQUEST_DURATION;
use std::time::Instant;

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
