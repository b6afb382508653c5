//! Running it in production: metrics, hostile input.

use reqwest::Method;

use crate::harness::*;

/// The value of one metric line, e.g. `creditgate_credits_settled_total`.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[tokio::test]
async fn metrics_count_real_traffic() {
    let gw = start("7").await;
    gw.post("/v1/images").send().await.unwrap(); // settled, 3
    gw.post("/v1/images")
        .header("x-mock-status", "500")
        .send()
        .await
        .unwrap(); // released
    gw.post("/v1/sites/home/edits").send().await.unwrap(); // settled, 0.5
    gw.post("/v1/images").send().await.unwrap(); // settled, 3: 0.5 left
    gw.post("/v1/images").send().await.unwrap(); // 402
    gw.get("/v1/models").send().await.unwrap(); // free
    gw.post("/v1/nothing").send().await.unwrap(); // 404
    gw.settled("alice").await;
    let resp = gw.admin(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(super::harness::header(&resp, "content-type").starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    assert_eq!(
        metric(
            &text,
            r#"creditgate_requests_total{operation="image.generate",outcome="settled"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            r#"creditgate_requests_total{operation="image.generate",outcome="released"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"creditgate_requests_total{operation="image.generate",outcome="insufficient_credits"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"creditgate_requests_total{operation="chat.edit",outcome="settled"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"creditgate_requests_total{operation="models.list",outcome="free"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"creditgate_requests_total{operation="unmatched",outcome="unknown_operation"}"#
        ),
        1.0
    );
    assert_eq!(metric(&text, "creditgate_credits_held_total"), 9.5);
    assert_eq!(metric(&text, "creditgate_credits_settled_total"), 6.5);
    assert_eq!(metric(&text, "creditgate_credits_released_total"), 3.0);
    assert_eq!(metric(&text, "creditgate_holds_in_flight"), 0.0);
    assert_eq!(metric(&text, "creditgate_store_errors_total"), 0.0);
    assert!(metric(&text, "creditgate_store_latency_seconds_count") >= 10.0);
    let resp = gw
        .client
        .get(format!("{}/metrics", gw.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "metrics need the admin token");
}
