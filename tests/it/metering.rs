//! Prices from the request, bodies forwarded intact, charges from actual usage.

use serde_json::{json, Value};

use crate::harness::*;

/// A JSON body of about `size` bytes whose pricing field comes last.
fn big_video_body(size: usize, seconds: u32) -> Vec<u8> {
    let padding = "p".repeat(size);
    format!(r#"{{"prompt":"{padding}","resolution":"720p","duration_seconds":{seconds}}}"#)
        .into_bytes()
}

#[tokio::test]
async fn a_5_mib_body_is_priced_by_a_field_near_its_end_and_forwarded_byte_identical() {
    let gw = start("100").await;
    let body = big_video_body(5 << 20, 8);
    let resp = gw
        .post("/v1/videos")
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-credits-operation"), "video.generate");
    assert_eq!(header(&resp, "x-credits-held"), "16");
    let received = gw.backend.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body.len(), body.len());
    assert!(received[0].body == body, "the backend got different bytes");
    assert_eq!(
        received[0].header("content-length"),
        Some(body.len().to_string().as_str())
    );
    let t = gw.settled("alice").await;
    assert_eq!(t.charged, credits("16"));
}

#[tokio::test]
async fn chunked_and_expect_continue_bodies_are_forwarded_byte_identical() {
    let gw = start("1000").await;
    let addr = gw.url.clone();
    let body = big_video_body(300 << 10, 3);
    let head = format!(
        "POST /v1/videos HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE_KEY}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    let answer = raw_exchange(&addr, head.as_bytes(), &chunked(&body, 8191), false).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("x-credits-held: 6\r\n"),
        "{answer}"
    );

    let head = format!(
        "POST /v1/videos HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE_KEY}\r\ncontent-length: {}\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let answer = raw_exchange(&addr, head.as_bytes(), &body, true).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let head = format!(
        "POST /v1/videos HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE_KEY}\r\ntransfer-encoding: chunked\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n"
    );
    let answer = raw_exchange(&addr, head.as_bytes(), &chunked(&body, 1000), true).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let received = gw.backend.received();
    assert_eq!(received.len(), 3);
    for r in &received {
        assert!(r.body == body, "the backend got different bytes");
        assert_eq!(
            r.header("expect"),
            None,
            "the gateway answered Expect itself"
        );
    }
    let t = gw.settled("alice").await;
    assert_eq!(t.charged, credits("18"));
}

#[tokio::test]
async fn keep_alive_survives_a_body_priced_request() {
    let gw = start("100").await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    for seconds in [1, 2, 3] {
        let resp = client
            .post(format!("{}/v1/videos", gw.url))
            .bearer_auth(ALICE_KEY)
            .body(format!(r#"{{"duration_seconds":{seconds}}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
        let resp = client
            .get(format!("{}/v1/models", gw.url))
            .bearer_auth(ALICE_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let t = gw.settled("alice").await;
    assert_eq!(t.charged, credits("12"));
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413_and_nothing_is_forwarded() {
    let gw = start("100").await;
    let body = big_video_body(8 << 20, 1);
    let resp = gw
        .post("/v1/videos")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let json: Value = resp.json().await.unwrap();
    assert_eq!(json["error"]["type"], "request_too_large");
    assert_eq!(json["error"]["limit"], 8 << 20);
    // Chunked: the size is only known while reading.
    let head = format!("POST /v1/videos HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE_KEY}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n");
    let answer = raw_exchange(&gw.url, head.as_bytes(), &chunked(&body, 1 << 16), false).await;
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "{}",
        &answer[..answer.len().min(300)]
    );
    assert!(gw.backend.received().is_empty());
    let t = gw.settled("alice").await;
    assert_eq!((t.charged, t.available), (credits("0"), credits("100")));
}

#[tokio::test]
async fn bad_pricing_values_are_400s_naming_the_source_and_nothing_is_forwarded() {
    let gw = start("100").await;
    let cases = [
        ("not json", "body:/duration_seconds", "not JSON"),
        ("", "body:/duration_seconds", "no body"),
        ("{}", "body:/duration_seconds", "is required"),
        (
            r#"{"duration_seconds": "8 seconds"}"#,
            "body:/duration_seconds",
            "not a decimal number",
        ),
        (
            r#"{"duration_seconds": {"s": 8}}"#,
            "body:/duration_seconds",
            "must be a number",
        ),
        (
            r#"{"duration_seconds": 61}"#,
            "body:/duration_seconds",
            "outside the allowed range 1..60",
        ),
        (
            r#"{"duration_seconds": -1}"#,
            "body:/duration_seconds",
            "non-negative",
        ),
        (
            r#"{"duration_seconds": 1e400}"#,
            "body:/duration_seconds",
            "1e400 is outside the allowed range",
        ),
        (
            r#"{"duration_seconds": 99999999999999999999999}"#,
            "body:/duration_seconds",
            "",
        ),
        (
            r#"{"duration_seconds": 2, "resolution": ["4k"]}"#,
            "body:/resolution",
            "not an array",
        ),
    ];
    for (body, source, says) in cases {
        let resp = gw.post("/v1/videos").body(body).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        assert_eq!(header(&resp, "content-type"), "application/json");
        let json: Value = resp.json().await.unwrap();
        assert_eq!(json["error"]["type"], "invalid_request", "{body}");
        assert_eq!(json["error"]["source"], source, "{body}: {json}");
        assert!(
            json["error"]["message"].as_str().unwrap().contains(says),
            "{body}: {json}"
        );
    }
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let resp = gw.post("/v1/videos").body(deep).send().await.unwrap();
    assert_eq!(
        resp.status(),
        400,
        "deeply nested JSON is refused, not a crash"
    );
    assert!(gw.backend.received().is_empty());
    let t = gw.settled("alice").await;
    assert_eq!((t.charged, t.available), (credits("0"), credits("100")));
}

#[tokio::test]
async fn a_body_predicate_chooses_the_operation() {
    let gw = start("100").await;
    let resp = gw
        .post("/v1/modes")
        .body(r#"{"mode":"patch"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&resp, "x-credits-operation"), "mode.patch");
    assert_eq!(header(&resp, "x-credits-held"), "0.5");
    let resp = gw
        .post("/v1/modes")
        .body(r#"{"mode":"full"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&resp, "x-credits-operation"), "mode.full");
    let resp = gw.post("/v1/modes").body("not json").send().await.unwrap();
    assert_eq!(
        header(&resp, "x-credits-operation"),
        "mode.full",
        "an unreadable body makes predicates false"
    );
    let t = gw.settled("alice").await;
    assert_eq!(t.charged, credits("8.5"));
    let received = gw.backend.received();
    assert_eq!(received[0].body, br#"{"mode":"patch"}"#);
}

#[tokio::test]
async fn json_usage_settles_actual_usage_capped_at_the_hold() {
    let gw = start("100").await;
    // 1234 tokens × 0.002 = 2.468 of the 10 held.
    let resp = gw
        .post("/v1/chat/completions")
        .header("x-mock-usage", "1234")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&resp, "x-credits-held"), "10");
    assert!(resp.text().await.unwrap().contains("\"total_tokens\":1234"));
    assert_eq!(gw.settled("alice").await.charged, credits("2.468"));
    // 100000 tokens would be 200 credits: charged the 10 held, no more.
    gw.post("/v1/chat/completions")
        .header("x-mock-usage", "100000")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(gw.settled("alice").await.charged, credits("12.468"));
    // No usage in the response: on_missing = "charge_hold".
    gw.post("/v1/chat/completions")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(gw.settled("alice").await.charged, credits("22.468"));
    // A failed call charges nothing, usage or not.
    gw.post("/v1/chat/completions")
        .header("x-mock-usage", "5")
        .header("x-mock-status", "500")
        .send()
        .await
        .unwrap();
    let t = gw.settled("alice").await;
    assert_eq!(
        (t.charged, t.available),
        (credits("22.468"), credits("77.532"))
    );
}

#[tokio::test]
async fn header_usage_settles() {
    let gw = start("100").await;
    let resp = gw
        .post("/v1/embeddings")
        .header("x-mock-usage-header", "120")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    assert_eq!(gw.settled("alice").await.charged, credits("1.2"));
    // A usage that is not a number counts as missing: the default charges the hold.
    gw.post("/v1/embeddings")
        .header("x-mock-usage-header", "lots")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(gw.settled("alice").await.charged, credits("6.2"));
}

/// Reads SSE events from the response until `count` have arrived.
async fn read_events(resp: &mut reqwest::Response, seen: &mut String, count: usize) {
    while seen.matches("\n\n").count() < count {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), resp.chunk())
            .await
            .expect("events arrive while the stream is still open")
            .unwrap()
            .expect("the stream ended early");
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn an_sse_stream_is_passed_through_live_and_settled_from_its_last_usage_event() {
    let gw = start("100").await;
    let mut resp = gw
        .post("/v1/chat/stream")
        .header("x-mock-sse", "100")
        .header("x-mock-usage", "1234")
        .header("x-mock-chunk-bytes", "7")
        .header("x-mock-sse-pause-after", "50")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "text/event-stream");
    let mut seen = String::new();
    // The backend is paused after 50 events: they must already be here.
    read_events(&mut resp, &mut seen, 50).await;
    assert_eq!(
        gw.totals("alice").await.held,
        credits("10"),
        "still streaming: still held"
    );
    gw.backend.open_gate();
    read_events(&mut resp, &mut seen, 100).await;
    assert!(
        resp.chunk().await.unwrap().is_none(),
        "the stream ends after 100 events"
    );
    let events: Vec<&str> = seen.split_terminator("\n\n").collect();
    assert_eq!(events.len(), 100);
    for (i, event) in events.iter().enumerate() {
        let data: Value = serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data["i"], json!(i), "events arrive in order and intact");
    }
    let t = gw.settled("alice").await;
    assert_eq!(
        (t.charged, t.available),
        (credits("2.468"), credits("97.532"))
    );
}

#[tokio::test]
async fn a_stream_cut_by_the_backend_is_released() {
    let gw = start("100").await;
    let resp = gw
        .post("/v1/chat/stream")
        .header("x-mock-sse", "40")
        .header("x-mock-usage", "1234")
        .header("x-mock-fail", "reset-mid-body")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.bytes().await.is_err(),
        "a cut stream must not look complete"
    );
    let t = gw.settled("alice").await;
    assert_eq!((t.charged, t.available), (credits("0"), credits("100")));
    // A complete stream without a usage event: on_missing = "release".
    let resp = gw
        .post("/v1/chat/stream")
        .header("x-mock-sse", "5")
        .send()
        .await
        .unwrap();
    resp.bytes().await.unwrap();
    assert_eq!(gw.settled("alice").await.charged, credits("0"));
}

#[tokio::test]
async fn quote_and_balance_for_the_callers_own_account() {
    let gw = start("100").await;
    let quote = |body: Value| gw.post("/credits/v1/quote").json(&body).send();
    let resp = quote(json!({"method": "POST", "path": "/v1/videos", "body": {"duration_seconds": 8, "resolution": "4k"}})).await.unwrap();
    assert_eq!(resp.status(), 200);
    let q: Value = resp.json().await.unwrap();
    assert_eq!(
        q,
        json!({"allowed": true, "operation": "video.generate", "credits": 64, "available": 100})
    );

    let q: Value = quote(json!({"method": "POST", "path": "/v1/videos", "body": {"duration_seconds": 60, "resolution": "4k"}})).await.unwrap().json().await.unwrap();
    assert_eq!(q["allowed"], false);
    assert_eq!(q["credits"], 480);
    assert_eq!(q["error"]["type"], "insufficient_credits");
    assert_eq!(q["error"]["required"], 480);

    let q: Value = quote(json!({"method": "POST", "path": "/v1/videos", "body": {}}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(q["error"]["type"], "invalid_request");
    assert_eq!(q["error"]["source"], "body:/duration_seconds");
    let q: Value = quote(json!({"method": "POST", "path": "/v1/images/premium"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(q["error"]["type"], "plan_required");
    let q: Value = quote(json!({"method": "GET", "path": "/nope"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(q["error"]["type"], "unknown_operation");
    let resp = quote(json!({"path": "/v1/videos"})).await.unwrap();
    assert_eq!(
        resp.status(),
        400,
        "a malformed quote request is itself a 400"
    );
    assert!(gw.backend.received().is_empty(), "quotes forward nothing");

    gw.post("/v1/videos")
        .body(r#"{"duration_seconds": 8, "resolution": "4k"}"#)
        .send()
        .await
        .unwrap();
    gw.settled("alice").await;
    let balance: Value = gw
        .get("/credits/v1/balance")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(balance["account"], "alice");
    assert_eq!(balance["plan"], "free");
    assert_eq!(balance["available"], 36);
    assert_eq!(balance["held"], 0);
    assert_eq!(
        balance["grants"],
        json!([{"kind": "topup", "credits": 36, "expires_at": null}])
    );
    let resp = gw
        .client
        .get(format!("{}/credits/v1/balance", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "the client APIs need a key");
}

/// The client reads part of a 2xx stream and leaves; the backend goes on.
async fn leave_mid_stream(gw: &TestGateway, path: &str) {
    let mut resp = gw
        .post(path)
        .header("x-mock-sse", "200")
        .header("x-mock-sse-pause-after", "10")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut seen = String::new();
    read_events(&mut resp, &mut seen, 10).await;
    drop(resp);
    gw.backend.open_gate();
}

#[tokio::test]
async fn a_client_leaving_after_2xx_headers_is_settled_or_released_as_configured() {
    let gw = start("100").await;
    leave_mid_stream(&gw, "/v1/stream/fixed").await;
    let t = gw.settled("alice").await;
    assert_eq!(
        t.charged,
        credits("3"),
        "on_client_abort = \"settle\" (the default): the backend did the work"
    );
    leave_mid_stream(&gw, "/v1/stream/fair").await;
    let t = gw.settled("alice").await;
    assert_eq!(
        (t.charged, t.available),
        (credits("3"), credits("97")),
        "on_client_abort = \"release\""
    );
}
