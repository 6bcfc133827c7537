//! Where the storm's requests go: `POST /buy` on one or more APIs, spread
//! round-robin over keep-alive connections.

use super::mix::BuyRequest;
use crate::exit::Failure;
use crate::token::Tokens;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// How a request that got no HTTP answer failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// The connection could not be made.
    Connect,
    /// No answer within `--timeout`.
    Timeout,
    /// The connection was closed or reset mid-request.
    Reset,
    Other,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Other => "other",
        }
    }

    fn of(e: &reqwest::Error) -> Self {
        if e.is_timeout() {
            return ErrorKind::Timeout;
        }
        if e.is_connect() {
            return ErrorKind::Connect;
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = source {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind as Io;
                if matches!(
                    io.kind(),
                    Io::ConnectionReset
                        | Io::ConnectionAborted
                        | Io::BrokenPipe
                        | Io::UnexpectedEof
                ) {
                    return ErrorKind::Reset;
                }
            }
            let text = err.to_string();
            if text.contains("connection closed") || text.contains("reset") {
                return ErrorKind::Reset;
            }
            source = err.source();
        }
        ErrorKind::Other
    }
}

/// What came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    Error(ErrorKind),
}

/// The answer to one buy.
#[derive(Debug, Clone)]
pub struct BuyAnswer {
    pub outcome: Outcome,
    /// From a 202's (or a repeat's 200) body.
    pub order_id: Option<String>,
}

/// The APIs under test.
#[derive(Debug, Clone)]
pub struct BuyTarget {
    client: reqwest::Client,
    buy_urls: Vec<String>,
    /// The first API, for checkouts.
    api: String,
    /// Each buyer's token, when the API wants them.
    tokens: Option<Arc<Tokens>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Accepted {
    order_id: Option<String>,
}

impl BuyTarget {
    /// `connections`: keep-alive connections kept per API.
    pub fn new(
        api_urls: &[String],
        connections: usize,
        timeout: Duration,
        tokens: Option<Arc<Tokens>>,
    ) -> Result<Self, Failure> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| Failure::usage(format!("HTTP client: {e}")))?;
        let buy_urls = api_urls
            .iter()
            .map(|u| format!("{}/buy", u.trim_end_matches('/')))
            .collect();
        Ok(Self {
            client,
            buy_urls,
            api: api_urls
                .first()
                .map(|u| u.trim_end_matches('/').to_owned())
                .unwrap_or_default(),
            tokens,
        })
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The order's status, as its buyer reads it (`None`: no answer, or 404).
    pub async fn order_status(&self, key: &str, buyer: &str) -> Option<String> {
        #[derive(Deserialize)]
        struct OrderStatus {
            status: String,
        }
        let mut get = self.client.get(format!("{}/orders/{key}", self.api));
        if let Some(bearer) = self.tokens.as_ref().and_then(|t| t.bearer(buyer)) {
            get = get.header("authorization", &*bearer);
        }
        let response = get.send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json::<OrderStatus>().await.ok().map(|v| v.status)
    }

    /// Pays the held order as its buyer: the answer's status.
    pub async fn pay(&self, key: &str, buyer: &str) -> Option<u16> {
        let mut post = self
            .client
            .post(format!("{}/orders/{key}/pay", self.api))
            .json(&serde_json::json!({ "userId": buyer }));
        if let Some(bearer) = self.tokens.as_ref().and_then(|t| t.bearer(buyer)) {
            post = post.header("authorization", &*bearer);
        }
        post.send().await.ok().map(|r| r.status().as_u16())
    }

    /// Sends request `i` to the API whose turn it is.
    pub async fn buy(&self, i: u64, request: &BuyRequest) -> BuyAnswer {
        let url = &self.buy_urls[(i % self.buy_urls.len() as u64) as usize];
        let mut post = self
            .client
            .post(url)
            .header("Idempotency-Key", &request.key)
            .header("content-type", "application/json");
        if let Some(bearer) = self.tokens.as_ref().and_then(|t| t.bearer(&request.buyer)) {
            post = post.header("authorization", &*bearer);
        }
        let sent = post.body(request.body.clone()).send().await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => return failed(&e),
        };
        let status = response.status().as_u16();
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) => return failed(&e),
        };
        let order_id = matches!(status, 200 | 202)
            .then(|| serde_json::from_slice::<Accepted>(&body).ok())
            .flatten()
            .and_then(|a| a.order_id);
        BuyAnswer {
            outcome: Outcome::Status(status),
            order_id,
        }
    }
}

fn failed(e: &reqwest::Error) -> BuyAnswer {
    BuyAnswer {
        outcome: Outcome::Error(ErrorKind::of(e)),
        order_id: None,
    }
}
