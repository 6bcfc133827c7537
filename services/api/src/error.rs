//! One error type for every handler: each variant maps to the contract's
//! status code and `{"error":{"code","message"}}` body; internals are logged
//! here, once, and never leak into the body.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flashsale_engine::domain::InvalidField;
use flashsale_engine::identity::Unauthorized;
use serde_json::json;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(#[from] InvalidField),
    #[error("body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the body was not received within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("product {0} does not exist")]
    UnknownProduct(i64),
    #[error("order {0} was never accepted")]
    UnknownOrder(String),
    /// Pay or cancel of an order that is not held: its status now.
    #[error("the order is {}, not held", .0.as_str())]
    NotHeld(flashsale_engine::OrderStatus),
    #[error("Idempotency-Key was already used with a different body")]
    KeyReused,
    #[error("{0}")]
    Unauthorized(Unauthorized),
    #[error("userId is not the buyer the token names; leave it out or send the token's sub")]
    Forbidden,
    #[error("too many requests; retry after {} s", retry_after_seconds(*.0))]
    RateLimited(Duration),
    /// A backend is unreachable or did not confirm: retry later, same key.
    /// The cause is logged, never sent.
    #[error("{component} is unavailable; retry later")]
    Unavailable {
        component: &'static str,
        #[source]
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The API is at a limit of its own (buys in flight, open streams,
    /// reads in progress): retry later.
    #[error("{0}; retry later")]
    Busy(String),
}

impl ApiError {
    /// `component` failed with `cause`: logged here, once, and answered `503`.
    pub fn unavailable(
        component: &'static str,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        let cause = cause.into();
        tracing::warn!(component, error = %cause, "answering 503");
        Self::Unavailable { component, cause }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            Self::UnknownProduct(_) => (StatusCode::NOT_FOUND, "unknown_product"),
            Self::UnknownOrder(_) => (StatusCode::NOT_FOUND, "unknown_order"),
            Self::NotHeld(_) => (StatusCode::CONFLICT, "not_held"),
            Self::KeyReused => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            Self::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::Unavailable { .. } | Self::Busy(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
        }
    }

    /// The `flashsale_order_requests_total` status label of this error.
    pub fn metric_label(&self) -> &'static str {
        match self {
            // The contract's labels have no timeout: a body that never came is bad input.
            Self::Invalid(_) | Self::BodyTimeout(_) => "invalid",
            Self::TooLarge { .. } => "too_large",
            Self::UnknownProduct(_) => "unknown_product",
            Self::UnknownOrder(_) => "unknown_order",
            Self::NotHeld(_) => "not_held",
            Self::KeyReused => "idempotency_conflict",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::RateLimited(_) => "rate_limited",
            Self::Unavailable { .. } | Self::Busy(_) => "unavailable",
        }
    }
}

/// Seconds a client should wait before retrying a `503`.
pub const RETRY_AFTER_SECONDS: &str = "1";

/// Whole seconds to wait, rounded up, at least one (`Retry-After`).
fn retry_after_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let mut body = json!({"error": {"code": code, "message": self.to_string()}});
        if let Self::NotHeld(now) = &self {
            body["status"] = json!(now);
        }
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            Self::Unavailable { .. } | Self::Busy(_) => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECONDS),
                );
            }
            Self::RateLimited(wait) => {
                headers.insert(header::RETRY_AFTER, retry_after_seconds(wait).into());
            }
            // RFC 6750: a token that was sent and refused is `invalid_token`.
            Self::Unauthorized(Unauthorized::Missing) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer error="invalid_token""#),
                );
            }
            _ => {}
        }
        response
    }
}
