//! The gate in front of `/buy` and `/orders/*` (contract v3, "Identity and
//! abuse"): who the buyer is, from a verified bearer token when
//! `FLASHSALE_AUTH=jwt`, and whether the buyer and the client address are
//! within their rate limits. Both are off by default.

use crate::error::ApiError;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, header};
use flashsale_engine::identity::{AuthConfig, Verifier};
use flashsale_engine::metrics::RATE_LIMITER_FAILURES;
use flashsale_engine::rate_limit::{Bucket, RateConfig, RateLimiter, Verdict, bucket_key};
use flashsale_engine::{Namespace, UserId};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub struct Gate {
    verifier: Option<Verifier>,
    limiter: Arc<dyn RateLimiter>,
    rates: RateConfig,
    namespace: Namespace,
}

impl Gate {
    /// Fails on a key that cannot be read or a `jwt` mode without one.
    pub fn new(
        auth: &AuthConfig,
        rates: RateConfig,
        limiter: Arc<dyn RateLimiter>,
        namespace: Namespace,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            verifier: Verifier::from_config(auth)?,
            limiter,
            rates,
            namespace,
        })
    }

    /// Whether a token names the buyer (`FLASHSALE_AUTH=jwt`).
    pub fn tokens(&self) -> bool {
        self.verifier.is_some()
    }

    /// The buyer the request's token names; `None` without `jwt`.
    pub fn token_buyer(&self, headers: &HeaderMap) -> Result<Option<UserId>, ApiError> {
        let Some(verifier) = &self.verifier else {
            return Ok(None);
        };
        let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
        verifier
            .buyer(authorization)
            .map(Some)
            .map_err(ApiError::Unauthorized)
    }

    /// Charges the request to the buyer's and the client address's
    /// buckets: `429` when either is full. When Redis fails the request
    /// goes on (it already passed the token check) and the failure is
    /// counted, never answered `500`.
    /// With no buyer known (a read without a token), only the address is charged.
    pub async fn within_limits(
        &self,
        headers: &HeaderMap,
        peer: Option<&ConnectInfo<SocketAddr>>,
        buyer: Option<&UserId>,
    ) -> Result<(), ApiError> {
        let mut buckets = Vec::with_capacity(2);
        if let (Some(rate), Some(buyer)) = (self.rates.user_rate, buyer) {
            buckets.push(Bucket {
                key: bucket_key(&self.namespace, "user", buyer.as_str()),
                rate,
            });
        }
        if let (Some(rate), Some(ip)) = (self.rates.ip_rate, self.client_ip(headers, peer)) {
            buckets.push(Bucket {
                key: bucket_key(&self.namespace, "ip", &ip.to_string()),
                rate,
            });
        }
        if buckets.is_empty() {
            return Ok(());
        }
        match self.limiter.check(&buckets).await {
            Ok(Verdict::Allowed) => Ok(()),
            Ok(Verdict::Limited { retry_after }) => Err(ApiError::RateLimited(retry_after)),
            Err(e) => {
                metrics::counter!(RATE_LIMITER_FAILURES).increment(1);
                tracing::debug!(error = %e, "rate limiter unavailable; letting the request through");
                Ok(())
            }
        }
    }

    /// Who holds a stream: the token's buyer, else the client's address.
    pub fn stream_holder(
        &self,
        headers: &HeaderMap,
        peer: Option<&ConnectInfo<SocketAddr>>,
        buyer: Option<&UserId>,
    ) -> String {
        match (buyer, self.client_ip(headers, peer)) {
            (Some(buyer), _) => format!("buyer:{}", buyer.as_str()),
            (None, Some(ip)) => format!("ip:{ip}"),
            (None, None) => "unknown".to_owned(),
        }
    }

    /// The client's address: the socket's, or with `FLASHSALE_TRUST_PROXY`
    /// the last `X-Forwarded-For` entry (the one our proxy appended).
    fn client_ip(
        &self,
        headers: &HeaderMap,
        peer: Option<&ConnectInfo<SocketAddr>>,
    ) -> Option<IpAddr> {
        let forwarded = || {
            let last = headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .next_back()?;
            last.trim().parse::<IpAddr>().ok()
        };
        if self.rates.trust_proxy
            && let Some(ip) = forwarded()
        {
            return Some(ip);
        }
        peer.map(|ConnectInfo(addr)| addr.ip())
    }
}
