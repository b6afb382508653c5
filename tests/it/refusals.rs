//! Refusals that keep the meter honest: a JSON body the gateway and the backend
//! could read differently (duplicate keys), an early answer a client still sending
//! its body must be able to read, and store failures answered by their kind (an
//! outage may forward unmetered under `on_unavailable = "allow"`; a corrupt or
//! contended account never is).

use serde_json::{json, Value};

use crate::harness::*;

/// Operations priced and matched from the body, behind a 64 KiB body limit.
const BODY_PRICED: &str = r#"
version = 1
[gateway]
max_body_bytes = "64KiB"
[upstreams.main]
url = "${BACKEND_URL}"
[plans.free]
monthly_credits = 0
[[operations]]
name = "count"
method = "POST"
path = "/v1/count"
upstream = "main"
price = { credits = 1, per = { from = "body:/n", min = 1, max = 1000 } }
[[operations]]
name = "mode.patch"
method = "POST"
path = "/v1/modes"
when = { "body:/mode" = "patch" }
upstream = "main"
price = 1
[[operations]]
name = "mode.full"
method = "POST"
path = "/v1/modes"
upstream = "main"
price = 4
[[accounts]]
id = "alice"
plan = "free"
grants = [ { kind = "topup", credits = 500 } ]
keys = [ { member = "alice", key_env = "ALICE_KEY" } ]
"#;

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    assert_eq!(header(&resp, "content-type"), "application/json");
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn a_body_with_a_duplicate_key_is_a_400_and_nothing_is_held_or_forwarded() {
    let gw = start_policy(|_| BODY_PRICED.to_string(), |_| None).await;
    // serde_json keeps the last value (1); a backend whose parser keeps the first
    // would do 100 units of work for a price of 1.
    let ambiguous = [
        ("/v1/count", r#"{"n":100,"n":1}"#),
        ("/v1/count", r#"{"n":2,"opts":{"size":1,"size":2}}"#),
        (
            "/v1/count",
            r#"{"n":2,"list":[{"a":1},{"b":[{"c":1,"c":1}]}]}"#,
        ),
        // The same key spelt with an escape is the same key.
        ("/v1/count", r#"{"n":100,"\u006e":1}"#),
        // Matching reads the body too: which operation it is must not be ambiguous.
        ("/v1/modes", r#"{"mode":"patch","mode":"full"}"#),
    ];
    for (path, body) in ambiguous {
        let resp = gw
            .post(path)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, error) = error_of(resp).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request", "{body}: {error}");
        assert_eq!(error["error"]["source"], "body", "{body}: {error}");
    }
    assert!(gw.backend.received().is_empty(), "nothing was forwarded");
    let t = gw.settled("alice").await;
    assert_eq!(
        (t.held, t.charged, t.available),
        (credits("0"), credits("0"), credits("500"))
    );

    // The same key in sibling objects is no duplicate.
    let resp = gw
        .post("/v1/count")
        .body(r#"{"a":{"x":1},"b":{"x":2},"n":2,"c":[{"n":5},{"n":6}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-credits-held"), "2");
    let t = gw.settled("alice").await;
    assert_eq!(t.charged, credits("2"));
}

#[tokio::test]
async fn a_quote_of_a_body_with_a_duplicate_key_says_what_the_request_gets() {
    let gw = start_policy(|_| BODY_PRICED.to_string(), |_| None).await;
    let quote = |text: &'static str| {
        gw.post("/credits/v1/quote")
            .header("content-type", "application/json")
            .body(text)
            .send()
    };
    let resp = quote(r#"{"method":"POST","path":"/v1/count","body":{"n":100,"n":1}}"#)
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let quoted: Value = resp.json().await.unwrap();
    assert_eq!(quoted["allowed"], false, "{quoted}");
    assert_eq!(quoted["error"]["type"], "invalid_request", "{quoted}");
    assert_eq!(quoted["error"]["source"], "body", "{quoted}");
    // The request itself gets that very error.
    let resp = gw
        .post("/v1/count")
        .body(r#"{"n":100,"n":1}"#)
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(resp).await;
    assert_eq!(status, 400);
    assert_eq!(error["error"]["message"], quoted["error"]["message"]);
    // A duplicate in the quote request itself (not in the body it quotes) is the
    // quote's own error.
    let resp =
        quote(r#"{"method":"POST","path":"/v1/count","headers":{"a":"1","a":"2"},"body":{"n":1}}"#)
            .await
            .unwrap();
    let (status, error) = error_of(resp).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["source"], "quote", "{error}");
    // Without a duplicate the quote prices it.
    let resp = quote(r#"{"method":"POST","path":"/v1/count","body":{"n":7,"m":{"n":1}}}"#)
        .await
        .unwrap();
    let quoted: Value = resp.json().await.unwrap();
    assert_eq!(
        quoted,
        json!({"allowed": true, "operation": "count", "credits": 7, "available": 500})
    );
}
