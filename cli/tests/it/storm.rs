//! `fsctl storm` as a user runs it: first against a small scripted axum
//! server on port 0 (exact counts, duplicates, thresholds, Ctrl-C, the open
//! model, the API down), then against the real engine on the real services.

use super::{code, fsctl_async as fsctl_on, json as report, nowhere};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use flashsale_testkit::env;

/// `fsctl` with no reachable database: the drain asks the API instead.
fn fsctl(args: &[&str]) -> tokio::process::Command {
    fsctl_on(&nowhere(), args)
}
use serde_json::{Value, json};
use std::collections::HashMap;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the scripted server saw.
#[derive(Default)]
struct Seen {
    requests: u64,
    repeats: u64,
    /// Key -> the status its first request got.
    keys: HashMap<String, u16>,
}

#[derive(Clone)]
struct Script {
    seen: Arc<Mutex<Seen>>,
    /// Every request waits this long before its answer.
    delay: Duration,
}

/// Answers 202 to every 4th new key and 409 to the others; a repeated key
/// gets 200 when its first request got 202 (as the contract says).
async fn scripted_buy(State(s): State<Script>, headers: HeaderMap) -> (StatusCode, String) {
    tokio::time::sleep(s.delay).await;
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut seen = s.seen.lock().unwrap();
    seen.requests += 1;
    if let Some(first) = seen.keys.get(&key).copied() {
        seen.repeats += 1;
        return match first {
            202 => (StatusCode::OK, json!({"orderId": key}).to_string()),
            _ => (StatusCode::CONFLICT, "{}".into()),
        };
    }
    let status = if seen.keys.len() % 4 == 0 { 202 } else { 409 };
    seen.keys.insert(key.clone(), status);
    (
        StatusCode::from_u16(status).unwrap(),
        json!({"orderId": key, "status": "queued"}).to_string(),
    )
}

async fn scripted_order(Path(id): Path<String>) -> String {
    json!({"orderId": id, "status": "confirmed"}).to_string()
}

async fn scripted_api(delay: Duration) -> (String, Arc<Mutex<Seen>>) {
    let script = Script {
        seen: Arc::default(),
        delay,
    };
    let app = Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/buy", post(scripted_buy))
        .route("/orders/{id}", get(scripted_order))
        .with_state(script.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, script.seen)
}

async fn run(args: &[&str]) -> Output {
    fsctl(args).output().await.unwrap()
}

#[tokio::test]
async fn counts_add_up_exactly_and_the_drain_asks_the_api_without_a_database() {
    let (url, seen) = scripted_api(Duration::ZERO).await;
    let out = run(&[
        "storm",
        "--api-url",
        &url,
        "-n",
        "400",
        "-c",
        "20",
        "--json",
    ])
    .await;
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let r = report(&out);
    for key in [
        "requests",
        "durationSeconds",
        "answerRate",
        "acceptRate",
        "statusCounts",
        "errors",
        "latencySeconds",
        "drain",
        "verify",
        "thresholds",
    ] {
        assert!(r.get(key).is_some(), "storm --json lacks {key}");
    }
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(r["latencySeconds"][key].as_f64().unwrap() > 0.0, "{key}");
    }
    assert_eq!(r["requests"], 400);
    assert_eq!(r["statusCounts"]["202"], 100);
    assert_eq!(r["statusCounts"]["409"], 300);
    assert_eq!(seen.lock().unwrap().requests, 400);
    assert_eq!(r["drain"]["source"], "http");
    assert_eq!(r["drain"]["resolved"], 100);
    assert_eq!(r["drain"]["lost"], 0);
    assert_eq!(r["verify"]["invariantsChecked"], false);
    let per_second: u64 = r["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(per_second, 400);
}

#[tokio::test]
async fn duplicate_ratio_repeats_that_share_of_keys() {
    let (url, seen) = scripted_api(Duration::ZERO).await;
    let out = run(&[
        "storm",
        "--api-url",
        &url,
        "-n",
        "2000",
        "-c",
        "10",
        "--duplicate-ratio",
        "0.3",
        "--no-verify",
        "--json",
    ])
    .await;
    assert_eq!(code(&out), 0);
    let r = report(&out);
    let repeats = seen.lock().unwrap().repeats;
    assert_eq!(
        r["mix"]["duplicates"], repeats,
        "the report counts what was sent"
    );
    assert!((500..700).contains(&repeats), "{repeats} of 2000 repeated");
    assert_eq!(r["mix"]["unexpected"], 0);
    let replayed = r["mix"]["duplicatesReplayed"].as_u64().unwrap();
    assert_eq!(r["statusCounts"]["200"], replayed);
    assert!(replayed > 0);
}

#[tokio::test]
async fn thresholds_fail_with_99_and_bad_ones_are_refused_before_sending() {
    let (url, seen) = scripted_api(Duration::from_millis(2)).await;
    let out = run(&[
        "storm",
        "--api-url",
        &url,
        "-n",
        "50",
        "--no-verify",
        "--json",
        "--threshold",
        "p99<1us",
        "--threshold",
        "rate(409)>0.5",
    ])
    .await;
    assert_eq!(code(&out), 99);
    let r = report(&out);
    assert_eq!(r["thresholds"][0]["expr"], "p99<1us");
    assert_eq!(r["thresholds"][0]["ok"], false);
    assert_eq!(r["thresholds"][1]["ok"], true);
    let sent = seen.lock().unwrap().requests;
    assert_eq!(sent, 50);

    let passing = run(&[
        "storm",
        "--api-url",
        &url,
        "-n",
        "50",
        "--no-verify",
        "--threshold",
        "p99<10s",
    ])
    .await;
    assert_eq!(code(&passing), 0);
    assert!(String::from_utf8_lossy(&passing.stdout).contains('✓'));

    for bad in [
        &["--threshold", "p99<fast"][..],
        &["--threshold", "latency<1s"],
        &["--threshold", "lost==0", "--no-verify"],
        &["--duplicate-ratio", "1.5"],
        &["--skew", "pareto"],
    ] {
        let mut args = vec!["storm", "--api-url", &url, "-n", "10"];
        args.extend_from_slice(bad);
        let out = run(&args).await;
        assert_eq!(code(&out), 2, "{bad:?}");
        assert!(!out.stderr.is_empty(), "{bad:?} explains itself");
    }
    assert_eq!(
        seen.lock().unwrap().requests,
        100,
        "nothing sent for bad usage"
    );
}

#[tokio::test]
async fn ctrl_c_stops_the_storm_and_still_reports() {
    let (url, seen) = scripted_api(Duration::from_millis(20)).await;
    let child = fsctl(&[
        "storm",
        "--api-url",
        &url,
        "-z",
        "60s",
        "-c",
        "5",
        "--no-verify",
        "--json",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // Interrupt once the storm is well under way, however slow the start.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().requests < 40 {
        assert!(
            std::time::Instant::now() < deadline,
            "the storm never got going"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("stops within seconds of Ctrl-C")
        .unwrap();
    assert_eq!(code(&out), 0);
    let r = report(&out);
    assert_eq!(r["stoppedEarly"], true);
    let requests = r["requests"].as_u64().unwrap();
    assert!(requests > 20, "{requests}");
    assert_eq!(
        requests + r["interrupted"].as_u64().unwrap(),
        seen.lock().unwrap().requests.max(requests)
    );
}

#[tokio::test]
async fn open_model_sends_on_schedule_and_reports_both_latencies() {
    let (url, seen) = scripted_api(Duration::ZERO).await;
    let lines = std::env::temp_dir().join(format!("storm-{}.jsonl", uuid::Uuid::new_v4()));
    let out = run(&[
        "storm",
        "--api-url",
        &url,
        "-q",
        "200",
        "-z",
        "2s",
        "--no-verify",
        "--json",
        "--output",
        lines.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code(&out), 0);
    let r = report(&out);
    assert_eq!(r["requests"], 400, "200/s for 2 s");
    assert_eq!(seen.lock().unwrap().requests, 400);
    assert_eq!(r["targetRate"], 200.0);
    assert!(r["uncorrectedLatencySeconds"]["p99"].as_f64().is_some());
    let written = std::fs::read_to_string(&lines).unwrap();
    let _ = std::fs::remove_file(&lines);
    assert_eq!(written.lines().count(), 400);
    let first: Value = serde_json::from_str(written.lines().next().unwrap()).unwrap();
    for key in ["t", "status", "latency", "key"] {
        assert!(first.get(key).is_some(), "--output line lacks {key}");
    }
}

#[tokio::test]
async fn an_unreachable_api_is_exit_2_with_nothing_sent() {
    let out = run(&["storm", "--api-url", "http://127.0.0.1:1", "-n", "5"]).await;
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the API"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_item_storm_on_the_real_engine_books_exactly_the_stock() {
    let mut env = env().await;
    let api = env.start_api().await;
    env.start_worker().await;
    env.start_worker().await;
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios/hot-item.toml");
    let out = fsctl_on(
        &env.backends(),
        &[
            "storm",
            "--api-url",
            &api,
            "--scenario",
            scenario,
            "-c",
            "500",
            "-n",
            "5000",
            "--threshold",
            "lost==0",
            "--json",
        ],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let r = report(&out);
    assert_eq!(r["requests"], 5000);
    let answered = super::answered(&r);
    assert_eq!(answered, 5000, "{r}");
    let accepted = r["statusCounts"]["202"].as_i64().unwrap();
    // The scratch database holds this storm's orders only (UUID keys).
    let rows = env.count("SELECT COUNT(*) FROM orders").await;
    assert_eq!(rows, accepted, "one row per 202");
    assert_eq!(r["drain"]["lost"], 0);
    assert_eq!(r["drain"]["pending"], 0);
    assert_eq!(r["drain"]["source"], "postgresql");
    assert_eq!(r["verify"]["ok"], true);
    assert_eq!(r["verify"]["invariantsChecked"], true);
    let sold = env
        .count("SELECT COALESCE(SUM(quantity), 0)::bigint FROM orders WHERE status = 'confirmed'")
        .await;
    assert_eq!(sold, 100, "exactly the stock confirmed");
    assert_eq!(env.stock(1).await, 0);
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_real_api_answers_retries_and_bad_inputs_as_the_contract_says() {
    let mut env = env().await;
    env.seed(1, 300, Some(3)).await;
    env.seed(2, 300, None).await;
    let api = env.start_api().await;
    env.start_worker().await;
    let out = fsctl_on(
        &env.backends(),
        &[
            "storm",
            "--api-url",
            &api,
            "--products",
            "2",
            "--skew",
            "hot:0.7",
            "--users",
            "50",
            "--quantity",
            "1-3",
            "-c",
            "50",
            "-n",
            "2000",
            "--duplicate-ratio",
            "0.2",
            "--invalid-ratio",
            "0.2",
            "--json",
        ],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let r = report(&out);
    let mix = &r["mix"];
    assert_eq!(mix["unexpected"], 0, "{}", mix["unexpectedExamples"]);
    assert!(mix["duplicatesReplayed"].as_u64().unwrap() > 0);
    assert_eq!(mix["invalidRejected"], mix["invalid"]);
    assert_eq!(r["drain"]["lost"], 0);
    assert_eq!(r["verify"]["ok"], true);
    env.assert_invariants().await;
    env.finish().await;
}

#[tokio::test]
async fn several_apis_share_the_storm_round_robin() {
    let (a, seen_a) = scripted_api(Duration::ZERO).await;
    let (b, seen_b) = scripted_api(Duration::ZERO).await;
    let out = run(&[
        "storm",
        "--api-url",
        &a,
        "--api-url",
        &b,
        "-n",
        "400",
        "-c",
        "8",
        "--no-verify",
        "--json",
    ])
    .await;
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(report(&out)["requests"], 400);
    assert_eq!(seen_a.lock().unwrap().requests, 200);
    assert_eq!(seen_b.lock().unwrap().requests, 200);
}

/// The checkout scenario, shortened: held units, 60 % paid, the rest
/// expire and sell again to later buyers of the same storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkout_storm_pays_some_holds_and_sells_the_expired_units_again() {
    let mut env = env().await;
    sqlx::query(
        "INSERT INTO products (id, name, stock, seeded_stock, max_per_order, hold_seconds)
         VALUES (1, 'held', 50, 50, 1, 2)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let api = env.start_api().await;
    env.start_worker().await;
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios/checkout.toml");
    let out = fsctl_on(
        &env.backends(),
        &[
            "storm",
            "--api-url",
            &api,
            "--scenario",
            scenario,
            "-n",
            "1600",
            "-q",
            "200",
            "--pay-ratio",
            "0.6",
            "--pay-delay",
            "300ms",
            "--json",
        ],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let r = report(&out);
    let c = &r["checkout"];
    let accepted = r["statusCounts"]["202"].as_u64().unwrap();
    let n = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("{k}: {c}"));
    assert_eq!(n("paid") + n("expired") + n("held"), accepted, "{c}");
    assert_eq!(n("held"), 0, "holds left after the storm: {c}");
    assert!(n("paid") > 0 && n("expired") > 0, "{c}");
    assert_eq!(n("paysAccepted"), n("paid"), "{c}");
    assert!(n("unitsSoldAgain") > 0, "no expired unit sold again: {c}");
    assert_eq!(c["unitsReturned"].as_u64().unwrap(), n("expired"));
    assert_eq!(
        c["unitsBooked"].as_u64().unwrap(),
        50 + n("unitsSoldAgain"),
        "{c}"
    );
    assert_eq!(r["drain"]["lost"], 0);
    let paid = env
        .count("SELECT count(*) FROM orders WHERE status = 'paid'")
        .await;
    assert_eq!(paid as u64, n("paid"));
    env.assert_invariants().await;
    env.finish().await;
}
