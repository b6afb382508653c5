//! The metering proxy end to end: gateway + mock backend + memory store.

use serde_json::Value;

use crate::harness::*;

#[tokio::test]
async fn a_2xx_charges_exactly_the_price() {
    let gw = start("10").await;
    let resp = gw.post("/v1/images").body("{}").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-credits-operation"), "image.generate");
    assert_eq!(header(&resp, "x-credits-held"), "3");
    assert_eq!(header(&resp, "x-credits-remaining"), "7");
    assert!(resp.text().await.unwrap().contains("succeeded"));
    let t = gw.settled("alice").await;
    assert_eq!((t.charged, t.available), (credits("3"), credits("7")));

    let resp = gw.post("/v1/sites/home/edits").send().await.unwrap();
    assert_eq!(header(&resp, "x-credits-held"), "0.5");
    assert_eq!(header(&resp, "x-credits-remaining"), "6.5");
    let t = gw.settled("alice").await;
    assert_eq!((t.charged, t.available), (credits("3.5"), credits("6.5")));
}

#[tokio::test]
async fn every_sampled_status_charges_only_when_2xx() {
    let gw = start("100").await;
    let mut expected_charge = credits("0");
    for status in [
        200u16, 201, 202, 204, 299, 301, 304, 400, 401, 404, 409, 422, 429, 500, 502, 503, 504, 599,
    ] {
        let resp = gw
            .post("/v1/images")
            .header("x-mock-status", status.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status);
        assert_eq!(header(&resp, "x-credits-operation"), "image.generate");
        if (200..300).contains(&status) {
            expected_charge = expected_charge.checked_add(credits("3")).unwrap();
            assert_eq!(header(&resp, "x-credits-held"), "3", "{status}");
        } else {
            // Released as soon as the status is known: the headers say so.
            assert_eq!(header(&resp, "x-credits-held"), "0", "{status}");
        }
        let t = gw.settled("alice").await;
        assert_eq!(t.charged, expected_charge, "after status {status}");
    }
}

#[tokio::test]
async fn server_errors_charge_nothing() {
    let gw = start("10").await;
    for status in ["500", "503"] {
        let resp = gw
            .post("/v1/images")
            .header("x-mock-status", status)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_str(), status);
        assert_eq!(header(&resp, "x-credits-remaining"), "10");
    }
    let t = gw.settled("alice").await;
    assert_eq!((t.charged, t.available), (credits("0"), credits("10")));
}

#[tokio::test]
async fn a_configured_4xx_settles() {
    let gw = start("10").await;
    let resp = gw
        .post("/v1/lenient")
        .header("x-mock-status", "404")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = gw
        .post("/v1/lenient")
        .header("x-mock-status", "400")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let t = gw.settled("alice").await;
    assert_eq!(t.charged, credits("1"));
}

async fn assert_gateway_error(resp: reqwest::Response, status: u16, kind: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(header(&resp, "content-type"), "application/json");
    let request_id = header(&resp, "x-request-id").to_string();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert_eq!(body["error"]["request_id"], request_id.as_str());
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    body
}

#[tokio::test]
async fn connection_refused_is_a_502_and_charges_nothing() {
    let gw = start("10").await;
    let resp = gw.post("/v1/refused").send().await.unwrap();
    assert_eq!(header(&resp, "x-credits-remaining"), "10");
    assert_eq!(header(&resp, "x-credits-held"), "0");
    assert_gateway_error(resp, 502, "upstream_unavailable").await;
    let t = gw.settled("alice").await;
    assert_eq!((t.charged, t.available), (credits("0"), credits("10")));
}

#[tokio::test]
async fn connect_timeout_is_a_504_and_charges_nothing() {
    let gw = start("10").await;
    let resp = gw.post("/v1/full").send().await.unwrap();
    let body = assert_gateway_error(resp, 504, "upstream_timeout").await;
    assert!(
        !body.to_string().contains("127.0.0.1"),
        "no internal address in errors: {body}"
    );
    let t = gw.settled("alice").await;
    assert_eq!((t.charged, t.available), (credits("0"), credits("10")));
}

#[tokio::test]
async fn read_timeout_is_a_504_and_charges_nothing() {
    let gw = start_with("10", "300ms").await;
    let resp = gw
        .post("/v1/images")
        .header("x-mock-delay-ms", "3000")
        .send()
        .await
        .unwrap();
    assert_gateway_error(resp, 504, "upstream_timeout").await;
    let t = gw.settled("alice").await;
    assert_eq!((t.charged, t.available), (credits("0"), credits("10")));
}

#[tokio::test]
async fn reset_before_the_response_charges_nothing() {
    let gw = start("10").await;
    let resp = gw
        .post("/v1/images")
        .header("x-mock-fail", "reset-before")
        .send()
        .await
        .unwrap();
    assert_gateway_error(resp, 502, "upstream_unavailable").await;
    let t = gw.settled("alice").await;
    assert_eq!((t.charged, t.available), (credits("0"), credits("10")));
}

#[tokio::test]
async fn reset_during_the_body_charges_nothing() {
    let gw = start("10").await;
    let resp = gw
        .post("/v1/images")
        .header("x-mock-fail", "reset-mid-body")
        .send()
        .await
        .unwrap();
    // The 200 headers were already on their way; the body cannot complete.
    assert_eq!(resp.status(), 200);
    assert!(
        resp.bytes().await.is_err(),
        "a cut body must not look complete"
    );
    let t = gw.settled("alice").await;
    assert_eq!((t.charged, t.available), (credits("0"), credits("10")));
}

#[tokio::test]
async fn insufficient_credits_is_a_402_with_every_field_and_nothing_is_forwarded() {
    let gw = start("2.5").await;
    let resp = gw.post("/v1/images").body("{}").send().await.unwrap();
    assert_eq!(header(&resp, "x-credits-operation"), "image.generate");
    assert_eq!(header(&resp, "x-credits-remaining"), "2.5");
    let body = assert_gateway_error(resp, 402, "insufficient_credits").await;
    let e = &body["error"];
    assert_eq!(e["operation"], "image.generate");
    assert_eq!(e["required"], 3);
    assert_eq!(e["available"], 2.5);
    assert_eq!(e["held"], 0);
    assert_eq!(e["plan"], "free");
    assert_eq!(e["upgrade_url"], "https://example.com/billing");
    assert_eq!(
        e["message"],
        "image.generate needs 3 credits; 2.5 are available."
    );
    assert!(
        gw.backend.received().is_empty(),
        "nothing may be forwarded on a 402"
    );
    let t = gw.settled("alice").await;
    assert_eq!((t.charged, t.available), (credits("0"), credits("2.5")));
}

#[tokio::test]
async fn a_free_operation_never_holds() {
    let gw = start("0").await;
    let resp = gw.get("/v1/models").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-credits-operation"), "models.list");
    assert_eq!(header(&resp, "x-credits-held"), "0");
    assert_eq!(header(&resp, "x-credits-remaining"), "0");
    assert_eq!(gw.backend.received().len(), 1);
}

#[tokio::test]
async fn a_locked_operation_is_a_403_naming_the_feature_and_plans() {
    let gw = start("100").await;
    let resp = gw.post("/v1/images/premium").send().await.unwrap();
    let body = assert_gateway_error(resp, 403, "plan_required").await;
    assert_eq!(body["error"]["feature"], "premium");
    assert_eq!(body["error"]["plans"], serde_json::json!(["pro"]));
    assert!(gw.backend.received().is_empty());
    // The pro account has the feature.
    let resp = gw
        .client
        .post(format!("{}/v1/images/premium", gw.url))
        .bearer_auth(PRO_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-credits-remaining"), "80");
}

#[tokio::test]
async fn an_unknown_route_is_a_404() {
    let gw = start("10").await;
    let resp = gw.post("/v1/nothing-here").send().await.unwrap();
    assert_gateway_error(resp, 404, "unknown_operation").await;
    // A known path with the wrong method does not match either.
    let resp = gw.get("/v1/images").send().await.unwrap();
    assert_gateway_error(resp, 404, "unknown_operation").await;
    assert!(gw.backend.received().is_empty());
}

#[tokio::test]
async fn missing_and_invalid_keys_are_401() {
    let gw = start("10").await;
    let resp = gw
        .client
        .post(format!("{}/v1/images", gw.url))
        .send()
        .await
        .unwrap();
    assert_gateway_error(resp, 401, "missing_api_key").await;
    let resp = gw
        .client
        .post(format!("{}/v1/images", gw.url))
        .bearer_auth("sk-wrong")
        .send()
        .await
        .unwrap();
    let body = assert_gateway_error(resp, 401, "invalid_api_key").await;
    assert!(
        !body.to_string().contains("sk-wrong"),
        "errors never echo a key"
    );
    let resp = gw
        .client
        .post(format!("{}/v1/images", gw.url))
        .header("x-api-key", ALICE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "x-api-key works as well as Bearer");
    assert!(gw.backend.received().len() == 1);
}

#[tokio::test]
async fn the_client_key_never_reaches_the_backend() {
    let gw = start("10").await;
    gw.post("/v1/images")
        .header("x-creditgate-account", "someone-else")
        .header("x-creditgate-features", "premium")
        .send()
        .await
        .unwrap();
    gw.client
        .post(format!("{}/v1/images", gw.url))
        .header("x-api-key", ALICE_KEY)
        .send()
        .await
        .unwrap();
    let received = gw.backend.received();
    assert_eq!(received.len(), 2);
    for r in &received {
        assert_eq!(r.header("authorization"), Some(BACKEND_SECRET));
        assert_eq!(r.header("x-api-key"), None);
        assert_eq!(r.header("x-creditgate-account"), Some("alice"));
        assert_eq!(r.header("x-creditgate-plan"), Some("free"));
        assert_eq!(r.header("x-creditgate-features"), Some(""));
        assert_eq!(r.header("x-request-id").map(str::len), Some(32));
        let all = format!("{:?}", r.headers);
        assert!(
            !all.contains(ALICE_KEY),
            "the client's key reached the backend: {all}"
        );
    }
}

#[tokio::test]
async fn concurrent_requests_never_overspend() {
    // 150 credits pay for exactly 50 images at 3 credits.
    let gw = start("150").await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let request = gw.post("/v1/images").header("x-mock-delay-ms", "20");
        tasks.push(tokio::spawn(async move {
            request.send().await.map(|r| r.status().as_u16())
        }));
    }
    let mut ok = 0;
    let mut payment_required = 0;
    for task in tasks {
        match task.await.unwrap().unwrap() {
            200 => ok += 1,
            402 => payment_required += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((ok, payment_required), (50, 150));
    assert_eq!(
        gw.backend.received().len(),
        50,
        "exactly the paid requests were forwarded"
    );
    let t = gw.settled("alice").await;
    assert_eq!(t.available, credits("0"));
    assert_eq!(t.charged, credits("150"));
}
