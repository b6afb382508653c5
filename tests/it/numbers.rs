//! Exact values end to end: usages of any size or precision, table keys and
//! quantities as JSON numbers or decimal strings, `default` and `otherwise`, and
//! amounts written exactly in every JSON answer.

use creditgate::ledger::Credits;
use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::*;

/// The harness policy (alice holds `credits`) and `extra` operations after it.
async fn start_with_operations(credits: &str, extra: &str) -> TestGateway {
    let text = POLICY
        .replace("{CREDITS}", credits)
        .replace("{READ_TIMEOUT}", "2s");
    let extra = extra.to_string();
    start_policy(move |_| format!("{text}\n{extra}"), |_| None).await
}

/// A JSON-metered operation that releases the hold when the usage is missing, so
/// a usage taken for missing charges nothing.
const METERED: &str = r#"
[[operations]]
name = "chat.exact"
method = "POST"
path = "/v1/chat/exact"
upstream = "main"
price = 10
[operations.settle]
usage = "json:/usage/total_tokens"
credits_per_unit = 0.002
on_missing = "release"
"#;

/// What alice was charged for one call whose response body is `body`.
async fn charged_for(gw: &TestGateway, path: &str, body: &str) -> Credits {
    let before = gw.settled("alice").await.charged;
    let resp = gw
        .post(path)
        .header("x-mock-body", body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{body}");
    assert_eq!(resp.text().await.unwrap(), body, "passed through as it is");
    let after = gw.settled("alice").await.charged;
    after.checked_sub(before).unwrap()
}

#[tokio::test]
async fn a_usage_of_any_size_or_precision_is_charged_exactly_capped_at_the_hold() {
    let gw = start_with_operations("1000", METERED).await;
    // (usage as the response writes it, credits charged at 0.002 a unit, 10 held)
    let cases = [
        ("1234", "2.468"),
        ("1e15", "10"),
        ("1e18", "10"),
        ("18446744073709551615", "10"),
        ("18446744073709551616", "10"),
        ("1e400", "10"),
        ("2.5E+3", "5"),
        ("25e-1", "0.005"),
        // 0.0022469134 credits, rounded up to a whole millicredit.
        ("1.1234567", "0.003"),
        ("0.000000000000000000001", "0.001"),
        ("-0", "0"),
        ("0", "0"),
        // A decimal string is a usage (OpenAI's video API writes numbers as strings).
        ("\"500\"", "1"),
        ("\"0.5\"", "0.001"),
        // Not a usage: missing, so on_missing = "release" charges nothing.
        ("-1", "0"),
        ("-0.5", "0"),
        ("\"NaN\"", "0"),
        ("\"lots\"", "0"),
        ("\"1e3\"", "0"),
        ("true", "0"),
        ("null", "0"),
        ("[5]", "0"),
    ];
    for (usage, charge) in cases {
        let body = format!(r#"{{"id":"x","usage":{{"total_tokens":{usage}}}}}"#);
        assert_eq!(
            charged_for(&gw, "/v1/chat/exact", &body).await,
            credits(charge),
            "usage {usage}"
        );
    }
}

#[tokio::test]
async fn an_sse_usage_beyond_every_integer_type_is_a_usage_not_missing() {
    let gw = start("100").await;
    // chat.stream releases when the usage is missing; u64::MAX tokens is a usage,
    // charged at the 10 held.
    let resp = gw
        .post("/v1/chat/stream")
        .header("x-mock-sse", "3")
        .header("x-mock-usage", "18446744073709551615")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    assert_eq!(gw.settled("alice").await.charged, credits("10"));
}

/// A table and a quantity read as numbers, with `default` and `otherwise`.
const TABLES: &str = r#"
[[operations]]
name = "batch"
method = "POST"
path = "/v1/batch"
upstream = "main"
[operations.price]
credits = 1
multiplier = { from = "body:/n", table = { 1 = 1, 2 = 2, "0.5" = 0.5 }, default = 1 }

[[operations]]
name = "batch.lenient"
method = "POST"
path = "/v1/batch/lenient"
upstream = "main"
[operations.price]
credits = 1
multiplier = { from = "body:/n", table = { 1 = 1, 2 = 2 }, default = 1, otherwise = 3 }
"#;

/// The status and, on success, the credits held for `body` on `path`.
async fn hold_for(gw: &TestGateway, path: &str, body: &str) -> (u16, String, Value) {
    let resp = gw.post(path).body(body.to_string()).send().await.unwrap();
    let status = resp.status().as_u16();
    let held = header(&resp, "x-credits-held").to_string();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, held, json)
}

#[tokio::test]
async fn default_prices_an_absent_value_and_otherwise_an_unlisted_one_else_400() {
    let gw = start_with_operations("1000", TABLES).await;
    for (body, held) in [
        (r#"{}"#, "1"),
        (r#"{"n": null}"#, "1"),
        (r#"{"n": 2}"#, "2"),
        (r#"{"n": "2"}"#, "2"),
        (r#"{"n": 2.0}"#, "2"),
        (r#"{"n": 2e0}"#, "2"),
        (r#"{"n": 0.20e1}"#, "2"),
        (r#"{"n": "2.00"}"#, "2"),
        (r#"{"n": 0.5}"#, "0.5"),
        (r#"{"n": 5e-1}"#, "0.5"),
        (r#"{"n": "0.50"}"#, "0.5"),
    ] {
        let (status, got, json) = hold_for(&gw, "/v1/batch", body).await;
        assert_eq!((status, got.as_str()), (200, held), "{body}: {json}");
    }
    // Present but not in the table, with no `otherwise`: a 400 naming the value,
    // never the default.
    for body in [
        r#"{"n": 10}"#,
        r#"{"n": "10"}"#,
        r#"{"n": 2.5}"#,
        r#"{"n": "two"}"#,
        r#"{"n": -2}"#,
    ] {
        let (status, _, json) = hold_for(&gw, "/v1/batch", body).await;
        assert_eq!(status, 400, "{body}: {json}");
        assert_eq!(json["error"]["type"], "invalid_request", "{body}");
        assert_eq!(json["error"]["source"], "body:/n", "{body}");
    }
    // The harness's resolution table has a default and no otherwise.
    let (status, _, json) = hold_for(
        &gw,
        "/v1/videos",
        r#"{"duration_seconds": 8, "resolution": "8k"}"#,
    )
    .await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["error"]["source"], "body:/resolution");
    // `otherwise` prices what is present and not listed; `default` what is absent.
    for (body, held) in [
        (r#"{}"#, "1"),
        (r#"{"n": 2}"#, "2"),
        (r#"{"n": 10}"#, "3"),
        (r#"{"n": "ten"}"#, "3"),
    ] {
        let (status, got, json) = hold_for(&gw, "/v1/batch/lenient", body).await;
        assert_eq!((status, got.as_str()), (200, held), "{body}: {json}");
    }
    let t = gw.settled("alice").await;
    assert_eq!(t.charged, credits("24.5"), "what was held was charged");
    let forwarded = gw.backend.received().len();
    assert_eq!(forwarded, 15, "no refused request was forwarded");
}

#[tokio::test]
async fn a_quantity_may_be_a_decimal_string_and_is_exact_whatever_its_form() {
    let gw = start("1000").await;
    // video.generate: 2 credits a second × the resolution (720p = 1, 4k = 4).
    for (body, held) in [
        (r#"{"duration_seconds": "8"}"#, "16"),
        (r#"{"duration_seconds": "8", "resolution": "4k"}"#, "64"),
        (r#"{"duration_seconds": 8e0}"#, "16"),
        (r#"{"duration_seconds": 0.8e1}"#, "16"),
        (r#"{"duration_seconds": "2.5"}"#, "5"),
        // More decimals than a millicredit: rounded up in the product, never dropped.
        (r#"{"duration_seconds": 1.0000001}"#, "2.001"),
        (
            r#"{"duration_seconds": "1.0000000000000000000001"}"#,
            "2.001",
        ),
    ] {
        let (status, got, json) = hold_for(&gw, "/v1/videos", body).await;
        assert_eq!((status, got.as_str()), (200, held), "{body}: {json}");
    }
    for (body, says) in [
        (r#"{"duration_seconds": "-8"}"#, "non-negative"),
        (r#"{"duration_seconds": "8s"}"#, "not a decimal"),
        (r#"{"duration_seconds": "1e1"}"#, "not a decimal"),
        (
            r#"{"duration_seconds": -0}"#,
            "outside the allowed range 1..60",
        ),
        (
            r#"{"duration_seconds": 1e400}"#,
            "outside the allowed range 1..60",
        ),
        (
            r#"{"duration_seconds": 60.0000001}"#,
            "outside the allowed range",
        ),
    ] {
        let (status, _, json) = hold_for(&gw, "/v1/videos", body).await;
        assert_eq!(status, 400, "{body}: {json}");
        assert_eq!(json["error"]["source"], "body:/duration_seconds", "{body}");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
}

#[tokio::test]
async fn per_takes_a_default_for_an_absent_quantity() {
    let extra = r#"
[[operations]]
name = "tokens"
method = "POST"
path = "/v1/tokens"
upstream = "main"
[operations.price]
credits = 0.0015
per = { from = "body:/max_tokens", default = 4096, min = 1, max = 128000 }
"#;
    let gw = start_with_operations("1000", extra).await;
    // 4096 × 0.0015 = 6.144; 1000 × 0.0015 = 1.5.
    for (body, held) in [
        (r#"{}"#, "6.144"),
        (r#"{"max_tokens": 1000}"#, "1.5"),
        (r#"{"max_tokens": "1000"}"#, "1.5"),
    ] {
        let (status, got, json) = hold_for(&gw, "/v1/tokens", body).await;
        assert_eq!((status, got.as_str()), (200, held), "{body}: {json}");
    }
    let (status, _, json) = hold_for(&gw, "/v1/tokens", r#"{"max_tokens": 0}"#).await;
    assert_eq!(status, 400, "the range applies to a given value: {json}");
}

/// An amount with 16 significant digits, beyond what an f64 carries exactly.
const BIG: &str = "9999999999999.999";

#[tokio::test]
async fn amounts_are_written_exactly_by_the_admin_balance_quote_and_error_answers() {
    let extra = r#"
[[operations]]
name = "everything"
method = "POST"
path = "/v1/everything"
upstream = "main"
price = "18446744073709551.615"
"#;
    let gw = start_with_operations("100", extra).await;
    // The grant's amount is read exactly as well: a JSON number, not a string.
    let resp = gw
        .admin(Method::POST, "/admin/accounts/alice/grants")
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"kind": "topup", "credits": {BIG}, "idempotency_key": "big"}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let text = resp.text().await.unwrap();
    assert!(text.contains(&format!(r#""credits":{BIG}"#)), "{text}");
    let total = "10000000000099.999";
    assert_eq!(
        gw.totals("alice").await.available,
        credits(total),
        "granted exactly"
    );

    let text = gw
        .admin(Method::GET, "/admin/accounts/alice")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains(&format!(r#""available":{total}"#)), "{text}");
    assert!(text.contains(&format!(r#""credits":{BIG}"#)), "{text}");

    let text = gw
        .get("/credits/v1/balance")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains(&format!(r#""available":{total}"#)), "{text}");

    let text = gw
        .post("/credits/v1/quote")
        .json(&json!({"method": "POST", "path": "/v1/everything"}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(r#""credits":18446744073709551.615"#),
        "{text}"
    );
    assert!(text.contains(&format!(r#""available":{total}"#)), "{text}");

    let resp = gw.post("/v1/everything").send().await.unwrap();
    assert_eq!(resp.status(), 402);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains(r#""required":18446744073709551.615"#),
        "{text}"
    );
    assert!(text.contains(&format!(r#""available":{total}"#)), "{text}");
}
