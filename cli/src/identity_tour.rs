//! `fsctl demo --auth`: before the storm, one buyer walks through what a
//! deployment with `FLASHSALE_AUTH=jwt` answers: no token, someone else's
//! name in the body, their own order, and someone else's.

use crate::exit::Failure;
use crate::token::Tokens;
use serde_json::json;

/// One request of the tour and what it must answer.
struct Step {
    what: &'static str,
    expect: u16,
    got: u16,
}

/// Runs the tour against `api`; `Err` names the first step that answered
/// otherwise. The lines say what each step showed.
pub async fn run(api: &str, tokens: &Tokens, product: i64) -> Result<Vec<String>, Failure> {
    let client = reqwest::Client::new();
    let send = |request: reqwest::RequestBuilder| async move {
        let response = request.send().await.map_err(Failure::unreachable)?;
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        Ok::<_, Failure>((status, body))
    };
    let bearer = |buyer: &str| {
        tokens
            .bearer(buyer)
            .map(|t| t.to_string())
            .unwrap_or_default()
    };
    let buy = |token: Option<String>, body: serde_json::Value| {
        let mut post = client.post(format!("{api}/buy")).json(&body);
        if let Some(t) = token {
            post = post.header("authorization", t);
        }
        post
    };
    let order = json!({"productId": product, "quantity": 1});
    let mut steps = Vec::new();

    let (status, _) = send(buy(None, order.clone())).await?;
    steps.push(Step {
        what: "a buy without a token",
        expect: 401,
        got: status,
    });
    let impostor = json!({"userId": "demo-bob", "productId": product, "quantity": 1});
    let (status, _) = send(buy(Some(bearer("demo-alice")), impostor)).await?;
    steps.push(Step {
        what: "alice's token buying as bob",
        expect: 403,
        got: status,
    });
    let (status, body) = send(buy(Some(bearer("demo-alice")), order)).await?;
    steps.push(Step {
        what: "alice's token buying (userId left out)",
        expect: 202,
        got: status,
    });
    let id = body["orderId"].as_str().unwrap_or("none").to_owned();
    let read = |token: Option<String>| {
        let mut get = client.get(format!("{api}/orders/{id}"));
        if let Some(t) = token {
            get = get.header("authorization", t);
        }
        get
    };
    let (status, _) = send(read(Some(bearer("demo-alice")))).await?;
    steps.push(Step {
        what: "alice reading her order",
        expect: 200,
        got: status,
    });
    let (status, _) = send(read(Some(bearer("demo-bob")))).await?;
    steps.push(Step {
        what: "bob reading alice's order",
        expect: 404,
        got: status,
    });
    let (status, _) = send(read(None)).await?;
    steps.push(Step {
        what: "reading it without a token",
        expect: 401,
        got: status,
    });

    let lines = steps
        .iter()
        .map(|s| format!("  {:<40} {}", s.what, s.got))
        .collect();
    match steps.iter().find(|s| s.got != s.expect) {
        None => Ok(lines),
        Some(s) => Err(Failure {
            code: crate::exit::VIOLATION,
            message: format!("auth: {} answered {}, not {}", s.what, s.got, s.expect),
        }),
    }
}
