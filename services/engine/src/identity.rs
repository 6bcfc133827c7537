//! Who the buyer is (`FLASHSALE_AUTH=jwt`): a bearer token, verified here,
//! names the buyer in its `sub`. The API verifies with the public half
//! (or the shared HS256 secret); `fsctl token` and `fsctl storm` sign with
//! the private half. Secrets and keys never reach a log: [`Secret`] prints
//! as `***`, and no error carries a token.

use crate::domain::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Seconds of clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 5;

/// How `/buy` and `/orders/*` learn the buyer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// The body's `userId` is the buyer (demo, tests, a trusted gateway).
    #[default]
    None,
    /// Every call needs `Authorization: Bearer <JWT>`; the buyer is `sub`.
    Jwt,
}

/// A string that never prints: an HS256 secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("the secret is empty".into());
        }
        Ok(Self(s.to_owned()))
    }
}

/// The API's identity settings (contract v3, "Identity and abuse").
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Identity")]
pub struct AuthConfig {
    /// `none`: the body's `userId` is the buyer. `jwt`: every `/buy` and
    /// `/orders/*` call needs `Authorization: Bearer <JWT>`; the buyer is its `sub`.
    #[arg(
        long = "auth",
        env = "FLASHSALE_AUTH",
        value_enum,
        default_value = "none"
    )]
    pub mode: AuthMode,
    /// HS256 secret (the bytes of the string).
    #[arg(long, env = "FLASHSALE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,
    /// PEM public key file: RS256 (RSA), ES256 (P-256) or EdDSA (Ed25519).
    #[arg(long, env = "FLASHSALE_JWT_PUBLIC_KEY", conflicts_with = "jwt_secret")]
    pub jwt_public_key: Option<PathBuf>,
    /// Required `iss` claim, when set.
    #[arg(long, env = "FLASHSALE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, when set.
    #[arg(long, env = "FLASHSALE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
}

impl AuthConfig {
    /// HS256 tokens from `secret` (tests, `fsctl demo --auth`).
    pub fn hs256(secret: &str) -> Self {
        Self {
            mode: AuthMode::Jwt,
            jwt_secret: Some(Secret::new(secret)),
            ..Self::default()
        }
    }
}

/// Why a request has no buyer: each is `401 unauthorized`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unauthorized {
    #[error("an Authorization: Bearer token is required")]
    Missing,
    #[error("the Authorization header is not a Bearer token")]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid")]
    Invalid,
    #[error("the token's sub is not a valid buyer id (1-64 characters, no control characters)")]
    BadSubject,
}

/// The claims the API reads (`exp` is checked by the library first).
#[derive(Deserialize)]
struct Subject {
    sub: String,
    exp: u64,
}

/// Verifies bearer tokens with one key and one algorithm: a token naming
/// any other algorithm (`none`, HS256 signed with an RSA public key) fails.
/// A buyer sends the same token with every request: a token verified once
/// is remembered (the exact string, with its buyer and `exp`) until it
/// expires, so the signature is checked once per token, not per request.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    verified: std::sync::Mutex<Remembered>,
}

/// Verified tokens in two generations: a full current generation becomes
/// the previous one (the older is dropped), so remembering costs O(1) and
/// the tokens in use stay remembered.
#[derive(Default)]
struct Remembered {
    current: std::collections::HashMap<String, (UserId, u64)>,
    previous: std::collections::HashMap<String, (UserId, u64)>,
}

impl Remembered {
    fn get(&self, token: &str) -> Option<&(UserId, u64)> {
        self.current.get(token).or_else(|| self.previous.get(token))
    }

    fn insert(&mut self, token: &str, buyer: UserId, exp: u64) {
        if self.current.len() >= REMEMBERED_TOKENS {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(token.to_owned(), (buyer, exp));
    }
}

/// Verified tokens in one generation of the memory.
const REMEMBERED_TOKENS: usize = 50_000;

fn unix_now() -> u64 {
    crate::clock::unix_seconds()
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// The verifier `config` asks for; `None` with `FLASHSALE_AUTH=none`.
    pub fn from_config(config: &AuthConfig) -> anyhow::Result<Option<Self>> {
        if config.mode == AuthMode::None {
            return Ok(None);
        }
        let (key, algorithm) = match (&config.jwt_secret, &config.jwt_public_key) {
            (Some(secret), None) => (DecodingKey::from_secret(secret.expose()), Algorithm::HS256),
            (None, Some(path)) => public_key(path)?,
            _ => anyhow::bail!(
                "FLASHSALE_AUTH=jwt needs exactly one of FLASHSALE_JWT_SECRET and FLASHSALE_JWT_PUBLIC_KEY"
            ),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECONDS;
        // A token not valid yet is refused (and so never remembered early).
        validation.validate_nbf = true;
        // A configured claim must be present too, not only right when present.
        let mut required = vec!["exp", "sub"];
        match &config.jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &config.jwt_issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Some(Self {
            key,
            validation,
            verified: Default::default(),
        }))
    }

    /// The buyer an `Authorization` header value names.
    pub fn buyer(&self, authorization: Option<&[u8]>) -> Result<UserId, Unauthorized> {
        let header = authorization.ok_or(Unauthorized::Missing)?;
        let token = std::str::from_utf8(header)
            .ok()
            .and_then(bearer_token)
            .ok_or(Unauthorized::Malformed)?;
        let now = unix_now();
        if let Ok(verified) = self.verified.lock()
            && let Some((buyer, exp)) = verified.get(token)
        {
            return if now > exp.saturating_add(LEEWAY_SECONDS) {
                Err(Unauthorized::Expired)
            } else {
                Ok(buyer.clone())
            };
        }
        let data = jsonwebtoken::decode::<Subject>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => Unauthorized::Expired,
                _ => Unauthorized::Invalid,
            },
        )?;
        let buyer = UserId::parse(&data.claims.sub).map_err(|_| Unauthorized::BadSubject)?;
        if let Ok(mut verified) = self.verified.lock() {
            verified.insert(token, buyer.clone(), data.claims.exp);
        }
        Ok(buyer)
    }
}

/// The token of `Bearer <token>` (the scheme is case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn read_pem(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read key file {}: {e}", path.display()))
}

/// A PEM key of RSA, P-256 or Ed25519, read with the constructor of its
/// type, and the one algorithm that type means: RS256, ES256, EdDSA.
fn pem_key<K, E>(
    path: &Path,
    what: &str,
    rsa: impl Fn(&[u8]) -> Result<K, E>,
    ec: impl Fn(&[u8]) -> Result<K, E>,
    ed: impl Fn(&[u8]) -> Result<K, E>,
) -> anyhow::Result<(K, Algorithm)> {
    let pem = read_pem(path)?;
    if let Ok(key) = rsa(&pem) {
        return Ok((key, Algorithm::RS256));
    }
    if let Ok(key) = ec(&pem) {
        return Ok((key, Algorithm::ES256));
    }
    if let Ok(key) = ed(&pem) {
        return Ok((key, Algorithm::EdDSA));
    }
    anyhow::bail!(
        "{} is not a {what} of RSA, P-256 or Ed25519",
        path.display()
    )
}

fn public_key(path: &Path) -> anyhow::Result<(DecodingKey, Algorithm)> {
    pem_key(
        path,
        "PEM public key",
        DecodingKey::from_rsa_pem,
        DecodingKey::from_ec_pem,
        DecodingKey::from_ed_pem,
    )
}

fn private_key(path: &Path) -> anyhow::Result<(EncodingKey, Algorithm)> {
    pem_key(
        path,
        "PEM private key (PKCS#8 or RSA)",
        EncodingKey::from_rsa_pem,
        EncodingKey::from_ec_pem,
        EncodingKey::from_ed_pem,
    )
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Signs tokens for buyers (`fsctl token`, `fsctl storm --jwt-secret`).
pub struct Signer {
    key: EncodingKey,
    header: Header,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub ttl: Duration,
}

impl Signer {
    /// Default lifetime of a signed token.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

    pub fn hs256(secret: &Secret) -> Self {
        Self::with(EncodingKey::from_secret(secret.expose()), Algorithm::HS256)
    }

    /// From a PEM private key file (RS256, ES256 or EdDSA, by the key's type).
    pub fn from_private_key(path: &Path) -> anyhow::Result<Self> {
        let (key, algorithm) = private_key(path)?;
        Ok(Self::with(key, algorithm))
    }

    fn with(key: EncodingKey, algorithm: Algorithm) -> Self {
        Self {
            key,
            header: Header::new(algorithm),
            issuer: None,
            audience: None,
            ttl: Self::DEFAULT_TTL,
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.header.alg
    }

    /// A token for `sub`, valid from now for the signer's lifetime.
    pub fn sign(&self, sub: &str) -> anyhow::Result<String> {
        let now = unix_now();
        let claims = Claims {
            sub,
            iat: now,
            exp: now + self.ttl.as_secs(),
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key)
            .map_err(|e| anyhow::anyhow!("cannot sign a token: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(config: &AuthConfig) -> Verifier {
        Verifier::from_config(config)
            .expect("config")
            .expect("jwt mode")
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let v = verifier(&AuthConfig::hs256("s3cret"));
        let mut signer = Signer::hs256(&Secret::new("s3cret"));
        signer.ttl = Duration::from_secs(60);
        let token = signer.sign("alice").expect("sign");
        assert!(v.buyer(Some(&bearer(&token))).is_ok());
        // The same token, remembered with an exp already past.
        let remembered = v.verified.lock().expect("lock").get(&token).cloned();
        let (buyer, _) = remembered.expect("remembered after its first check");
        v.verified
            .lock()
            .expect("lock")
            .insert(&token, buyer, unix_now() - LEEWAY_SECONDS - 1);
        assert_eq!(v.buyer(Some(&bearer(&token))), Err(Unauthorized::Expired));
        // A forged token is never remembered as valid.
        let forged = Signer::hs256(&Secret::new("other"))
            .sign("alice")
            .expect("sign");
        assert_eq!(v.buyer(Some(&bearer(&forged))), Err(Unauthorized::Invalid));
        assert_eq!(v.buyer(Some(&bearer(&forged))), Err(Unauthorized::Invalid));
    }

    fn bearer(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    #[test]
    fn a_token_signed_with_the_secret_names_its_subject() {
        let v = verifier(&AuthConfig::hs256("s3cret"));
        let token = Signer::hs256(&Secret::new("s3cret"))
            .sign("alice")
            .expect("sign");
        assert_eq!(
            v.buyer(Some(&bearer(&token))).expect("valid").as_str(),
            "alice"
        );
        let lower = format!("bearer {token}").into_bytes();
        assert!(v.buyer(Some(&lower)).is_ok());
    }

    #[test]
    fn missing_malformed_foreign_and_expired_tokens_are_refused() {
        let v = verifier(&AuthConfig::hs256("s3cret"));
        assert_eq!(v.buyer(None), Err(Unauthorized::Missing));
        assert_eq!(
            v.buyer(Some(b"Basic YWxpY2U6eA==")),
            Err(Unauthorized::Malformed)
        );
        assert_eq!(v.buyer(Some(b"Bearer ")), Err(Unauthorized::Malformed));
        assert_eq!(
            v.buyer(Some(b"Bearer not.a.jwt")),
            Err(Unauthorized::Invalid)
        );
        let foreign = Signer::hs256(&Secret::new("other"))
            .sign("alice")
            .expect("sign");
        assert_eq!(v.buyer(Some(&bearer(&foreign))), Err(Unauthorized::Invalid));
        let mut old = Signer::hs256(&Secret::new("s3cret"));
        old.ttl = Duration::ZERO;
        let now = unix_now();
        let claims = Claims {
            sub: "alice",
            iat: now - 600,
            exp: now - 60,
            iss: None,
            aud: None,
        };
        let expired = jsonwebtoken::encode(&old.header, &claims, &old.key).expect("sign");
        assert_eq!(v.buyer(Some(&bearer(&expired))), Err(Unauthorized::Expired));
    }

    #[test]
    fn a_token_not_valid_yet_is_refused_and_a_far_exp_does_not_overflow() {
        let v = verifier(&AuthConfig::hs256("s3cret"));
        let signer = Signer::hs256(&Secret::new("s3cret"));
        let now = unix_now();
        let early = serde_json::json!({"sub": "alice", "exp": now + 600, "nbf": now + 300});
        let early = jsonwebtoken::encode(&signer.header, &early, &signer.key).expect("sign");
        assert_eq!(v.buyer(Some(&bearer(&early))), Err(Unauthorized::Invalid));
        assert!(v.verified.lock().expect("lock").get(&early).is_none());
        let far = serde_json::json!({"sub": "bob", "exp": u64::MAX});
        let far = jsonwebtoken::encode(&signer.header, &far, &signer.key).expect("sign");
        for _ in 0..2 {
            // The first check verifies, the second reads the memory.
            assert_eq!(v.buyer(Some(&bearer(&far))).expect("valid").as_str(), "bob");
        }
    }

    #[test]
    fn the_memory_keeps_two_generations() {
        let mut memory = Remembered::default();
        let buyer = UserId::parse("alice").expect("user");
        for i in 0..=REMEMBERED_TOKENS {
            memory.insert(&format!("t{i}"), buyer.clone(), 1);
        }
        // The first generation moved to the previous one, still readable.
        assert_eq!(memory.current.len(), 1);
        assert!(
            memory.get("t0").is_some() && memory.get(&format!("t{REMEMBERED_TOKENS}")).is_some()
        );
        for i in 0..REMEMBERED_TOKENS {
            memory.insert(&format!("u{i}"), buyer.clone(), 1);
        }
        assert!(
            memory.get("t0").is_none(),
            "the oldest generation is dropped"
        );
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let mut config = AuthConfig::hs256("s3cret");
        config.jwt_issuer = Some("shop".into());
        config.jwt_audience = Some("flashsale".into());
        let v = verifier(&config);
        let mut signer = Signer::hs256(&Secret::new("s3cret"));
        assert_eq!(
            v.buyer(Some(&bearer(&signer.sign("a").expect("sign")))),
            Err(Unauthorized::Invalid)
        );
        signer.issuer = Some("shop".into());
        signer.audience = Some("flashsale".into());
        assert!(
            v.buyer(Some(&bearer(&signer.sign("a").expect("sign"))))
                .is_ok()
        );
        signer.audience = Some("elsewhere".into());
        assert_eq!(
            v.buyer(Some(&bearer(&signer.sign("a").expect("sign")))),
            Err(Unauthorized::Invalid)
        );
    }

    #[test]
    fn a_subject_that_is_not_a_buyer_id_is_refused() {
        let v = verifier(&AuthConfig::hs256("s3cret"));
        let token = Signer::hs256(&Secret::new("s3cret"))
            .sign("bad\0id")
            .expect("sign");
        assert_eq!(
            v.buyer(Some(&bearer(&token))),
            Err(Unauthorized::BadSubject)
        );
    }

    #[test]
    fn the_secret_never_prints() {
        let config = AuthConfig::hs256("hunter2");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn jwt_without_a_key_does_not_start() {
        let config = AuthConfig {
            mode: AuthMode::Jwt,
            ..AuthConfig::default()
        };
        let e = Verifier::from_config(&config).expect_err("no key");
        assert!(e.to_string().contains("FLASHSALE_JWT_SECRET"), "{e}");
    }
}
