//! `fsctl storm` and `fsctl token` against an API with
//! `FLASHSALE_AUTH=jwt`, on the real services: the storm signs a token per
//! buyer, and the orders are booked under the tokens' subjects.

use super::{code, json, ok_json};
use flashsale_api::{Access, ApiConfig};
use flashsale_engine::identity::AuthConfig;
use flashsale_testkit::env;
use reqwest::StatusCode;

const SECRET: &str = "storm-test-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_with_the_secret_books_under_the_tokens_subjects() {
    let mut env = env().await;
    env.seed(1, 50, None).await;
    let mut config = ApiConfig::new(env.backends(), "127.0.0.1:0");
    config.access = Access {
        auth: AuthConfig::hs256(SECRET),
        ..Access::default()
    };
    let api = env.start_api_config(config, true).await;
    env.start_worker().await;
    let storm = |extra: &[&str]| {
        let mut args = vec![
            "storm",
            "--api-url",
            &api,
            "-n",
            "200",
            "-c",
            "20",
            "--product",
            "1",
            "--users",
            "20",
            "--json",
        ];
        args.extend_from_slice(extra);
        super::fsctl(&env.backends(), &args)
            .env_remove("FLASHSALE_JWT_SECRET")
            .output()
            .unwrap()
    };

    let anonymous = storm(&["--no-verify"]);
    let report = json(&anonymous);
    assert_eq!(report["statusCounts"]["401"], 200, "{report}");

    let signed = ok_json(&storm(&["--jwt-secret", SECRET]));
    assert!(signed["statusCounts"].get("401").is_none(), "{signed}");
    assert!(
        signed["statusCounts"]["202"].as_u64().unwrap() > 0,
        "{signed}"
    );
    assert_eq!(signed["drain"]["lost"], 0);
    let buyers = env
        .count(
            "SELECT count(DISTINCT user_id) FROM orders WHERE user_id !~ '^user-([0-9]|1[0-9])$'",
        )
        .await;
    assert_eq!(buyers, 0, "an order booked under a name no token carried");
    assert_eq!(
        env.count("SELECT COALESCE(SUM(quantity), 0) FROM orders WHERE status = 'confirmed'")
            .await,
        50
    );
    env.assert_invariants().await;

    // fsctl token: what curl would send.
    let out = super::fsctl(
        &env.backends(),
        &["token", "--sub", "alice", "--jwt-secret", SECRET],
    )
    .output()
    .unwrap();
    assert_eq!(code(&out), 0);
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let reply = env
        .http
        .post(format!("{api}/buy"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"productId": 1, "quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        reply.status(),
        StatusCode::CONFLICT,
        "sold out, but the token passed"
    );
    let refused = super::fsctl(&env.backends(), &["token", "--sub", "alice"])
        .env_remove("FLASHSALE_JWT_SECRET")
        .output()
        .unwrap();
    assert_eq!(code(&refused), 2, "no key is bad usage");
    env.finish().await;
}
