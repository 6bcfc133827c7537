//! `fsctl demo` as a newcomer runs it: nothing installed (every backend URL
//! points at a dead port), the whole flow in one process, an exact ledger.

use super::{fsctl_async, nowhere, ok_json as report};
use serde_json::Value;
use std::process::Output;

/// `fsctl demo ARGS` with nothing installed.
async fn demo(args: &[&str]) -> Output {
    fsctl_async(&nowhere(), &[&["demo"], args].concat())
        .output()
        .await
        .unwrap()
}

/// Exactly the stock confirmed, every 202 resolved, nothing lost.
fn assert_exact(r: &Value, requests: u64, units: i64) {
    assert_eq!(r["requests"], requests);
    let answered = super::answered(r);
    assert_eq!(answered, requests, "{r}");
    let books = r["books"].as_array().unwrap();
    let sold: i64 = books
        .iter()
        .map(|b| b["confirmedUnits"].as_i64().unwrap())
        .sum();
    assert_eq!(sold, units, "exactly the stock confirmed: {books:?}");
    assert!(books.iter().all(|b| b["stock"] == 0 && b["ok"] == true));
    assert_eq!(r["drain"]["lost"], 0);
    assert_eq!(r["drain"]["pending"], 0);
    assert_eq!(r["drain"]["resolved"], r["statusCounts"]["202"]);
    assert_eq!(r["verify"]["ok"], true);
}

#[tokio::test]
async fn the_demo_sells_exactly_the_stock_with_nothing_installed() {
    let r = report(&demo(&["--json"]).await);
    assert_exact(&r, 5000, 100);
}

#[tokio::test]
async fn the_demo_with_chaos_kills_a_worker_and_the_ledger_still_holds() {
    let r = report(&demo(&["--json", "--chaos", "--products", "3", "--stock", "50"]).await);
    assert_exact(&r, 5000, 150);
    assert_eq!(r["chaos"]["killedWorker"], "demo-worker-1");
    assert!(
        r["chaos"]["heldDeliveries"].as_u64().unwrap() >= 1,
        "the victim died holding orders: {}",
        r["chaos"]
    );
}

#[tokio::test]
async fn the_demo_runs_a_scenario_and_answers_bad_inputs_as_the_contract_says() {
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios/bad-actors.toml");
    let r = report(&demo(&["--json", "--scenario", scenario]).await);
    assert_eq!(r["mix"]["unexpected"], 0, "{}", r["mix"]);
    assert!(r["mix"]["invalid"].as_u64().unwrap() > 0);
    assert_eq!(r["drain"]["lost"], 0);
    assert_eq!(r["verify"]["ok"], true);
}

#[tokio::test]
async fn the_demo_prints_its_closing_line() {
    let out = demo(&["-n", "1000", "-c", "100", "--stock", "20"]).await;
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("20 of 20 units sold") && text.contains("0 lost, ledger exact"),
        "{text}"
    );
}

#[tokio::test]
async fn demo_top_refuses_a_non_terminal() {
    let out = demo(&["--top"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--top needs a terminal"));
}

#[tokio::test]
async fn the_demo_with_auth_signs_every_buyers_token_and_shows_the_refusals() {
    let out = demo(&["--auth", "-n", "2000"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for step in [
        "a buy without a token",
        "alice's token buying as bob",
        "bob reading alice's order",
    ] {
        assert!(
            stderr.contains(step),
            "the tour does not show {step:?}: {stderr}"
        );
    }
    let r = report(&demo(&["--auth", "-n", "2000", "--json"]).await);
    assert!(r["statusCounts"].get("401").is_none(), "{r}");
    // The tour's one order and the storm's sell the stock exactly.
    let books = r["books"].as_array().unwrap();
    assert_eq!(books[0]["confirmedUnits"], 100);
    assert_eq!(r["drain"]["lost"], 0);
}
