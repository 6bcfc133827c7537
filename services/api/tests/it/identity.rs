//! Identity and abuse (contract v3) on the real services: a token names
//! the buyer, an order is shown to its buyer only, and rate limits hold
//! per buyer and per address, across API processes.

use flashsale_api::{Access, ApiConfig};
use flashsale_engine::identity::{AuthConfig, Secret, Signer};
use flashsale_engine::rate_limit::RateConfig;
use flashsale_testkit::{self as common, TestEnv};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const SECRET: &str = "identity-test-secret";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn token(sub: &str) -> String {
    Signer::hs256(&Secret::new(SECRET)).sign(sub).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn api_with(env: &mut TestEnv, auth: AuthConfig, rates: RateConfig) -> String {
    let mut config = ApiConfig::new(env.backends(), "127.0.0.1:0");
    config.access = Access { auth, rates };
    env.start_api_config(config, true).await
}

/// What one request got: status, headers we check, body.
struct Reply {
    status: StatusCode,
    www_authenticate: Option<String>,
    retry_after: Option<String>,
    body: Value,
}

async fn send(request: reqwest::RequestBuilder, authorization: Option<&str>) -> Reply {
    let request = match authorization {
        Some(a) => request.header("authorization", a),
        None => request,
    };
    let response = request.send().await.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    Reply {
        status: response.status(),
        www_authenticate: header("www-authenticate"),
        retry_after: header("retry-after"),
        body: response.json().await.unwrap_or(Value::Null),
    }
}

async fn buy(env: &TestEnv, api: &str, authorization: Option<&str>, body: Value) -> Reply {
    let request = env.http.post(format!("{api}/buy")).json(&body);
    send(request, authorization).await
}

async fn read(env: &TestEnv, api: &str, order: &str, authorization: Option<&str>) -> Reply {
    send(env.http.get(format!("{api}/orders/{order}")), authorization).await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// An unsigned token (`alg: none`) with the claims of a valid one.
fn unsigned(valid: &str) -> String {
    let claims = valid.split('.').nth(1).unwrap();
    // {"alg":"none","typ":"JWT"}
    format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_missing_or_bad_token_is_401_and_changes_nothing() {
    let mut env = common::env().await;
    env.seed(1, 100, None).await;
    let api = api_with(&mut env, AuthConfig::hs256(SECRET), RateConfig::default()).await;
    let order = json!({"userId": "alice", "productId": 1, "quantity": 1});
    let expired = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "alice", "exp": now() - 60}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let no_exp = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "alice"}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let foreign = Signer::hs256(&Secret::new("another secret"))
        .sign("alice")
        .unwrap();
    let cases = [
        ("no Authorization header", None),
        (
            "Basic credentials",
            Some("Basic YWxpY2U6cGFzc3dvcmQ=".to_owned()),
        ),
        ("Bearer with nothing", Some("Bearer ".to_owned())),
        ("not a JWT", Some(bearer("not-a-jwt"))),
        ("signed with another secret", Some(bearer(&foreign))),
        ("expired", Some(bearer(&expired))),
        ("no exp", Some(bearer(&no_exp))),
        ("alg none", Some(bearer(&unsigned(&token("alice"))))),
        ("a NUL in sub", Some(bearer(&token("ali\0ce")))),
    ];
    for (case, authorization) in &cases {
        let reply = buy(&env, &api, authorization.as_deref(), order.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "{case}: {}",
            reply.body
        );
        assert_eq!(reply.body["error"]["code"], "unauthorized", "{case}");
        let challenge = reply.www_authenticate.unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer"),
            "{case}: WWW-Authenticate {challenge:?}"
        );
        if let Some(a) = authorization
            && a.len() > 12
        {
            let secret_part = &a[a.len() - 12..];
            assert!(
                !reply.body.to_string().contains(secret_part),
                "{case}: the answer echoes the token"
            );
        }
    }
    let metrics = env.get_text(&format!("{api}/metrics")).await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("flashsale_order_requests_total") && l.contains("unauthorized"))
        .unwrap_or_else(|| panic!("no unauthorized count in {metrics}"));
    assert!(line.ends_with(&format!(" {}", cases.len())), "{line}");
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);
    assert_eq!(env.stock(1).await, 100);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_key_tokens_verify_and_algorithm_confusion_is_refused() {
    let mut env = common::env().await;
    env.seed(1, 100, None).await;
    let public = fixture("test-rsa-public.pem");
    let rs256 = AuthConfig {
        jwt_public_key: Some(public.clone()),
        ..AuthConfig::hs256("unused")
    };
    let rs256 = AuthConfig {
        jwt_secret: None,
        ..rs256
    };
    let api = api_with(&mut env, rs256, RateConfig::default()).await;
    let signer = Signer::from_private_key(&fixture("test-rsa-private.pem")).unwrap();
    let valid = signer.sign("alice").unwrap();
    let order = json!({"productId": 1, "quantity": 1});
    let reply = buy(&env, &api, Some(&bearer(&valid)), order.clone()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);

    // The classic confusion: HS256 "signed" with the RSA public key as its secret.
    let public_pem = std::fs::read(&public).unwrap();
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "mallory", "exp": now() + 600}),
        &EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    for (case, t) in [
        ("HS256 with the public key", confused),
        ("alg none", unsigned(&valid)),
    ] {
        let reply = buy(&env, &api, Some(&bearer(&t)), order.clone()).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{case}");
    }

    // Ed25519 and P-256 keys work the same way.
    for (public, private) in [
        ("test-ed25519-public.pem", "test-ed25519-private.pem"),
        ("test-p256-public.pem", "test-p256-private.pem"),
    ] {
        let auth = AuthConfig {
            jwt_secret: None,
            jwt_public_key: Some(fixture(public)),
            ..AuthConfig::hs256("unused")
        };
        let other = api_with(&mut env, auth, RateConfig::default()).await;
        let t = Signer::from_private_key(&fixture(private))
            .unwrap()
            .sign("bob")
            .unwrap();
        let reply = buy(&env, &other, Some(&bearer(&t)), order.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "{public}: {}",
            reply.body
        );
        let reply = buy(&env, &other, Some(&bearer(&valid)), order.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "{public}: an RS256 token"
        );
    }
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buyer_is_the_tokens_subject_and_sees_only_their_orders() {
    let mut env = common::env().await;
    env.seed(1, 100, None).await;
    let api = api_with(&mut env, AuthConfig::hs256(SECRET), RateConfig::default()).await;
    let alice = bearer(&token("alice"));
    let bob = bearer(&token("bob"));

    let reply = buy(
        &env,
        &api,
        Some(&alice),
        json!({"userId": "bob", "productId": 1, "quantity": 1}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], "forbidden");

    let left_out = buy(
        &env,
        &api,
        Some(&alice),
        json!({"productId": 1, "quantity": 1}),
    )
    .await;
    assert_eq!(left_out.status, StatusCode::ACCEPTED, "{}", left_out.body);
    let named = buy(
        &env,
        &api,
        Some(&alice),
        json!({"userId": "alice", "productId": 1, "quantity": 1}),
    )
    .await;
    assert_eq!(named.status, StatusCode::ACCEPTED, "{}", named.body);
    let ids: Vec<String> = [&left_out, &named]
        .iter()
        .map(|r| r.body["orderId"].as_str().unwrap().to_owned())
        .collect();

    // Queued (from the accept log), then confirmed (from its row): the
    // same answers either way.
    for phase in ["queued", "confirmed"] {
        if phase == "confirmed" {
            env.start_worker().await;
            env.wait_for_rows(&ids).await;
        }
        for id in &ids {
            let own = read(&env, &api, id, Some(&alice)).await;
            assert_eq!(own.status, StatusCode::OK, "{phase}: {}", own.body);
            assert_eq!(own.body["userId"], "alice");
            assert_eq!(own.body["status"], phase);
            let other = read(&env, &api, id, Some(&bob)).await;
            assert_eq!(
                other.status,
                StatusCode::NOT_FOUND,
                "{phase}: bob read alice's order"
            );
            assert_eq!(other.body["error"]["code"], "unknown_order");
            let anonymous = read(&env, &api, id, None).await;
            assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED, "{phase}");
        }
    }
    assert_eq!(
        env.count("SELECT count(*) FROM orders WHERE user_id = 'alice' AND status = 'confirmed'")
            .await,
        2
    );
    assert_eq!(
        env.count("SELECT count(*) FROM orders WHERE user_id <> 'alice'")
            .await,
        0
    );
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_rotating_user_ids_is_held_to_its_per_user_limit() {
    let mut env = common::env().await;
    env.seed(1, 100, Some(2)).await;
    let api = api_with(&mut env, AuthConfig::hs256(SECRET), RateConfig::default()).await;
    env.start_worker().await;
    let bot = bearer(&token("bot"));
    let mut accepted = Vec::new();
    for i in 0..10 {
        let rotated = json!({"userId": format!("bot-{i}"), "productId": 1, "quantity": 1});
        let reply = buy(&env, &api, Some(&bot), rotated).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "a made-up name got through"
        );
        let plain = buy(
            &env,
            &api,
            Some(&bot),
            json!({"productId": 1, "quantity": 1}),
        )
        .await;
        if plain.status == StatusCode::ACCEPTED {
            accepted.push(plain.body["orderId"].as_str().unwrap().to_owned());
        }
    }
    env.wait_for_rows(&accepted).await;
    assert_eq!(
        env.count("SELECT COALESCE(SUM(quantity), 0) FROM orders WHERE status = 'confirmed'")
            .await,
        2,
        "the bot got more than its per-user limit"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM orders WHERE user_id <> 'bot'")
            .await,
        0
    );
    env.assert_invariants().await;
    env.finish().await;
}

fn rates(user: Option<&str>, ip: Option<&str>, trust_proxy: bool) -> RateConfig {
    RateConfig {
        user_rate: user.map(|r| r.parse().unwrap()),
        ip_rate: ip.map(|r| r.parse().unwrap()),
        trust_proxy,
    }
}

/// At `5/s` with a burst of 10, how many of a burst that took `elapsed`
/// may pass: the burst, and what refilled meanwhile (a loaded machine
/// spreads the burst out).
fn allowed(elapsed: Duration) -> std::ops::RangeInclusive<usize> {
    10..=10 + (elapsed.as_secs_f64() * 5.0).ceil() as usize
}

/// `n` buys of `who` at once; the replies.
async fn burst(env: &TestEnv, apis: &[String], who: &str, n: usize) -> Vec<Reply> {
    let authorization = bearer(&token(who));
    let sends = (0..n).map(|i| {
        let api = &apis[i % apis.len()];
        buy(
            env,
            api,
            Some(&authorization),
            json!({"productId": 1, "quantity": 1}),
        )
    });
    futures_util::future::join_all(sends).await
}

fn count(replies: &[Reply], status: StatusCode) -> usize {
    replies.iter().filter(|r| r.status == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_buyers_burst_is_limited_while_another_buyer_buys() {
    let mut env = common::env().await;
    env.seed(1, 1000, None).await;
    let api = api_with(
        &mut env,
        AuthConfig::hs256(SECRET),
        rates(Some("5/s"), None, false),
    )
    .await;
    let started = Instant::now();
    let replies = burst(&env, std::slice::from_ref(&api), "alice", 40).await;
    let (ok, limited) = (
        count(&replies, StatusCode::ACCEPTED),
        count(&replies, StatusCode::TOO_MANY_REQUESTS),
    );
    assert_eq!(ok + limited, 40, "only 202s and 429s expected");
    assert!(
        allowed(started.elapsed()).contains(&ok),
        "{ok} of a burst of 40 at 5/s (burst 10) got through in {:?}",
        started.elapsed()
    );
    for r in replies
        .iter()
        .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
    {
        assert_eq!(r.body["error"]["code"], "rate_limited");
        let wait: u64 = r.retry_after.as_deref().unwrap().parse().unwrap();
        assert!((1..=2).contains(&wait), "Retry-After {wait}");
    }
    let bob = burst(&env, std::slice::from_ref(&api), "bob", 3).await;
    assert_eq!(
        count(&bob, StatusCode::ACCEPTED),
        3,
        "bob paid for alice's burst"
    );
    // A 429 is decided before anything is claimed or queued.
    assert_eq!(env.queue_depth(false).await as usize, ok + 3);
    let metrics = env.get_text(&format!("{api}/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("status=\"rate_limited\"") && l.ends_with(&format!(" {limited}"))),
        "rate_limited not counted {limited} times"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_limit_counts_the_socket_unless_the_proxy_is_trusted() {
    let mut env = common::env().await;
    env.seed(1, 1000, None).await;
    let api = api_with(
        &mut env,
        AuthConfig::default(),
        rates(None, Some("5/s"), false),
    )
    .await;
    let trusting = api_with(
        &mut env,
        AuthConfig::default(),
        rates(None, Some("5/s"), true),
    )
    .await;
    let from = |api: &str, i: usize, forwarded: &str| {
        env.http
            .post(format!("{api}/buy"))
            .header("x-forwarded-for", forwarded.to_owned())
            .json(&json!({"userId": format!("u{i}"), "productId": 1, "quantity": 1}))
    };
    // Untrusted: a made-up X-Forwarded-For per request changes nothing.
    let started = Instant::now();
    let sends = (0..30).map(|i| send(from(&api, i, &format!("10.0.0.{i}")), None));
    let replies = futures_util::future::join_all(sends).await;
    assert!(
        allowed(started.elapsed()).contains(&count(&replies, StatusCode::ACCEPTED)),
        "spoofed addresses got around the limit"
    );
    // Trusted: the last entry is the client (the one our proxy appended).
    let started = Instant::now();
    let sends = (0..30).map(|i| {
        send(
            from(&trusting, i, &format!("spoofed, 10.1.{}.1", i % 3)),
            None,
        )
    });
    let replies = futures_util::future::join_all(sends).await;
    assert_eq!(
        count(&replies, StatusCode::ACCEPTED),
        30,
        "three addresses, ten each, all within their bursts"
    );
    // One of the three, past its burst: limited again.
    let sends = (0..20).map(|i| send(from(&trusting, 100 + i, "10.1.0.1"), None));
    let more = futures_util::future::join_all(sends).await;
    let refilled = count(&more, StatusCode::ACCEPTED);
    assert!(
        refilled <= (started.elapsed().as_secs_f64() * 5.0).ceil() as usize
            && count(&more, StatusCode::TOO_MANY_REQUESTS) > 0,
        "{refilled} of 20 more from a spent address got through"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buyers_limit_holds_across_two_api_processes() {
    let env = common::env().await;
    env.seed(1, 1000, None).await;
    let settings = [
        ("FLASHSALE_AUTH", "jwt"),
        ("FLASHSALE_JWT_SECRET", SECRET),
        ("FLASHSALE_USER_RATE", "5/s"),
    ];
    let (_a, api_a) = super::api_process_with(&env, &settings).await;
    let (_b, api_b) = super::api_process_with(&env, &settings).await;
    let started = Instant::now();
    let replies = burst(&env, &[api_a, api_b], "alice", 40).await;
    let ok = count(&replies, StatusCode::ACCEPTED);
    assert_eq!(ok + count(&replies, StatusCode::TOO_MANY_REQUESTS), 40);
    assert!(
        allowed(started.elapsed()).contains(&ok),
        "{ok} got through two APIs in {:?}: each kept its own bucket",
        started.elapsed()
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_limiter_lets_token_holders_through_and_says_so() {
    let mut env = common::env().await;
    env.seed(1, 100, None).await;
    let mut backends = env.backends();
    backends.redis_url = "redis://127.0.0.1:1".into();
    let mut config = ApiConfig::new(backends, "127.0.0.1:0");
    config.access = Access {
        auth: AuthConfig::hs256(SECRET),
        rates: rates(Some("5/s"), Some("5/s"), false),
    };
    let api = env.start_api_config(config, false).await;
    let alice = bearer(&token("alice"));
    // More than the burst of 10: a limiter that failed closed would 429.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let reply = buy(
            &env,
            &api,
            Some(&alice),
            json!({"productId": 1, "quantity": 1}),
        )
        .await;
        statuses.push(reply.status);
    }
    // Past the limiter (fail open), the accept log needs Redis too: 503,
    // never 429 or 500.
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "{statuses:?}"
    );
    let metrics = env.get_text(&format!("{api}/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("flashsale_rate_limiter_failures_total") && !l.ends_with(" 0")),
        "the limiter's failures are not counted: {metrics}"
    );
    assert_eq!(
        buy(&env, &api, None, json!({"productId": 1, "quantity": 1}))
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "a request without a token got past a limiter that is down"
    );
    env.finish().await;
}
