//! Buyers' tokens for a deployment with `FLASHSALE_AUTH=jwt`: `fsctl token`
//! prints one (for curl), and `fsctl storm` and `fsctl demo --auth` sign one
//! per simulated buyer with the same flags.

use crate::exit::{Failure, OK, Outcome};
use crate::verify::parse_duration;
use clap::Args;
use flashsale_engine::UserId;
use flashsale_engine::identity::{Secret, Signer};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How fsctl signs buyers' tokens.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Tokens (for an API with FLASHSALE_AUTH=jwt)")]
pub struct SigningArgs {
    /// Sign each buyer's token with this HS256 secret (the API's FLASHSALE_JWT_SECRET).
    #[arg(long, env = "FLASHSALE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,
    /// ...or with this PEM private key (RS256, ES256 or EdDSA, by the key's type).
    #[arg(long, value_name = "FILE", conflicts_with = "jwt_secret")]
    pub jwt_key: Option<PathBuf>,
    /// The tokens' `iss` (the API's FLASHSALE_JWT_ISSUER).
    #[arg(long, env = "FLASHSALE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The tokens' `aud` (the API's FLASHSALE_JWT_AUDIENCE).
    #[arg(long, env = "FLASHSALE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
}

impl SigningArgs {
    /// The signer these flags name, if any.
    pub fn signer(&self, ttl: Duration) -> Result<Option<Signer>, Failure> {
        let mut signer = match (&self.jwt_secret, &self.jwt_key) {
            (Some(secret), _) => Signer::hs256(secret),
            (None, Some(path)) => Signer::from_private_key(path).map_err(|e| {
                Failure::usage(flashsale_engine::telemetry::with_causes(e.as_ref()))
            })?,
            (None, None) => return Ok(None),
        };
        signer.issuer = self.jwt_issuer.clone();
        signer.audience = self.jwt_audience.clone();
        signer.ttl = ttl;
        Ok(Some(signer))
    }
}

/// One token per buyer, signed on first use and kept (an RS256 signature
/// costs about a millisecond; a storm reuses its buyers).
pub struct Tokens {
    signer: Signer,
    signed: Mutex<HashMap<String, Arc<str>>>,
}

/// Tokens kept before the cache starts afresh.
const KEPT: usize = 200_000;

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({:?})", self.signer.algorithm())
    }
}

impl Tokens {
    pub fn new(signer: Signer) -> Self {
        Self {
            signer,
            signed: Mutex::default(),
        }
    }

    /// `Bearer <token>` for `buyer`.
    pub fn bearer(&self, buyer: &str) -> Option<Arc<str>> {
        if let Some(t) = self.signed.lock().ok()?.get(buyer) {
            return Some(t.clone());
        }
        let token: Arc<str> = format!("Bearer {}", self.signer.sign(buyer).ok()?).into();
        let mut signed = self.signed.lock().ok()?;
        if signed.len() >= KEPT {
            signed.clear();
        }
        signed.insert(buyer.to_owned(), token.clone());
        Some(token)
    }
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  fsctl token --sub alice --jwt-secret \"$FLASHSALE_JWT_SECRET\"
  curl -H \"Authorization: Bearer $(fsctl token --sub alice)\" \\
       -H 'content-type: application/json' -d '{\"productId\":1,\"quantity\":1}' \\
       http://127.0.0.1:3000/buy
  fsctl token --sub bob --jwt-key buyer-signing-key.pem --ttl 10m --json

For testing: a real shop's identity provider issues its buyers' tokens.

Exit codes: 0 printed; 2 bad usage (no key, an unreadable key, a bad sub).")]
pub struct TokenArgs {
    /// The buyer the token names (its `sub`, the order's userId).
    #[arg(long)]
    pub sub: String,
    /// How long the token is valid: 30s, 10m, 1h.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub ttl: Duration,
    #[command(flatten)]
    pub signing: SigningArgs,
    /// One JSON document on stdout: token, sub, algorithm, expiresIn.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &TokenArgs) -> Outcome {
    UserId::parse(&args.sub).map_err(|e| Failure::usage(format!("--sub: {}", e.message)))?;
    let signer = args.signing.signer(args.ttl)?.ok_or_else(|| {
        Failure::usage("give --jwt-secret (or FLASHSALE_JWT_SECRET) or --jwt-key FILE")
    })?;
    let token = signer
        .sign(&args.sub)
        .map_err(|e| Failure::usage(e.to_string()))?;
    if args.json {
        crate::output::json(&serde_json::json!({
            "token": token,
            "sub": args.sub,
            "algorithm": format!("{:?}", signer.algorithm()),
            "expiresIn": args.ttl.as_secs(),
        }));
    } else {
        println!("{token}");
    }
    Ok(OK)
}
