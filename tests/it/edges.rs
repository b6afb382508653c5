//! Edges of the request steps, the errors and the client APIs: the order of the steps when a body is too large,
//! unmatched pass-through, quotes of quotas and pass-through, `too_many_holds`,
//! `on_unavailable = "allow"`, and the admin API's own errors and readiness.

use std::sync::Arc;

use creditgate::admin::AdminState;
use creditgate::clock::Clock;
use creditgate::demo::mock::MockBackend;
use creditgate::gateway::{serve_live, Gateway, LiveGateway};
use creditgate::policy::Policy;
use creditgate::store::redis::RedisStore;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::harness::*;
use crate::redis_server::RedisServer;

/// Body-priced operations behind a 1 KiB body limit; alice is on `free`.
const SMALL_BODIES: &str = r#"
version = 1
[gateway]
max_body_bytes = "1KiB"
[upstreams.main]
url = "${BACKEND_URL}"
[plans.free]
monthly_credits = 0
[plans.pro]
monthly_credits = 100
features = ["premium"]
[[operations]]
name = "video.premium"
method = "POST"
path = "/v1/videos/premium"
upstream = "main"
requires = ["premium"]
price = { credits = 2, per = { from = "body:/duration_seconds", min = 1, max = 60 } }
[[operations]]
name = "video.generate"
method = "POST"
path = "/v1/videos"
upstream = "main"
price = { credits = 2, per = { from = "body:/duration_seconds", min = 1, max = 60 } }
[[operations]]
name = "mode.patch"
method = "POST"
path = "/v1/modes"
when = { "body:/mode" = "patch" }
upstream = "main"
price = 1
[[accounts]]
id = "alice"
plan = "free"
grants = [ { kind = "topup", credits = 100 } ]
keys = [ { member = "alice", key_env = "ALICE_KEY" } ]
[[accounts]]
id = "prox"
plan = "pro"
keys = [ { member = "p", key_env = "PRO_KEY" } ]
"#;

/// A JSON body of about `bytes` bytes that prices to 5 seconds.
fn padded_body(bytes: usize) -> String {
    let pad = "x".repeat(bytes);
    json!({"duration_seconds": 5, "mode": "patch", "pad": pad}).to_string()
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    assert_eq!(header(&resp, "content-type"), "application/json");
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn a_404_or_403_that_needs_no_body_wins_over_413() {
    let gw = start_policy(|_| SMALL_BODIES.to_string(), |_| None).await;
    let big = padded_body(4096);
    let send = |method: Method, path: &str| {
        gw.call(method, path, ALICE_KEY)
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
    };
    // Entitlement comes before pricing: the plan lacks the feature, whatever the body.
    let (status, body) = error_of(send(Method::POST, "/v1/videos/premium").await.unwrap()).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (403, Some("plan_required")),
        "{body}"
    );
    assert_eq!(body["error"]["feature"], "premium");
    // No operation takes this path, or this method on a body-priced path.
    for (method, path) in [(Method::POST, "/v1/nope"), (Method::PUT, "/v1/videos")] {
        let (status, body) = error_of(send(method, path).await.unwrap()).await;
        assert_eq!(
            (status, body["error"]["type"].as_str()),
            (404, Some("unknown_operation")),
            "{path}: {body}"
        );
    }
    // Pricing reads the body: too large is a 413 there — and where matching itself
    // needs the body (a `when` on it), reading it first cannot be avoided.
    for path in ["/v1/videos", "/v1/modes"] {
        let (status, body) = error_of(send(Method::POST, path).await.unwrap()).await;
        assert_eq!(
            (status, body["error"]["type"].as_str()),
            (413, Some("request_too_large")),
            "{path}: {body}"
        );
    }
    // Within the limit, the same requests are priced from their bodies.
    let small = padded_body(10);
    let resp = gw
        .call(Method::POST, "/v1/videos/premium", PRO_KEY)
        .body(small.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-credits-held"), "10");
    let resp = gw
        .post("/v1/videos/premium")
        .body(small)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(
        gw.backend.received().len(),
        1,
        "only the pro request was forwarded"
    );
    let t = gw.settled("alice").await;
    assert_eq!((t.charged, t.available), (credits("0"), credits("100")));
}

/// Unmatched requests pass through free to `default_upstream`.
const PASS_THROUGH: &str = r#"
version = 1
[gateway]
unmatched = "allow"
default_upstream = "main"
[upstreams.main]
url = "${BACKEND_URL}"
[plans.free]
monthly_credits = 0
quotas = { basic_images = 2 }
[[operations]]
name = "image.generate"
method = "POST"
path = "/v1/images"
upstream = "main"
price = 3
[[operations]]
name = "image.basic"
method = "POST"
path = "/v1/images/basic"
upstream = "main"
quota = "basic_images"
price = 0
[[accounts]]
id = "alice"
plan = "free"
grants = [ { kind = "topup", credits = 5 } ]
keys = [ { member = "alice", key_env = "ALICE_KEY" } ]
"#;

async fn quote(gw: &TestGateway, request: Value) -> Value {
    let resp = gw
        .post("/credits/v1/quote")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn unmatched_allow_passes_through_free_with_the_credit_headers() {
    let gw = start_policy(|_| PASS_THROUGH.to_string(), |_| None).await;
    // An unknown path, and a known path with another method.
    for (method, path) in [
        (Method::GET, "/v1/other/thing?x=1"),
        (Method::GET, "/v1/images"),
    ] {
        let resp = gw
            .call(method.clone(), path, ALICE_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(
            resp.headers()
                .get("x-credits-operation")
                .map(|v| v.to_str().unwrap()),
            Some(""),
            "{path}: present, naming no operation"
        );
        assert_eq!(header(&resp, "x-credits-held"), "0");
        assert_eq!(header(&resp, "x-credits-remaining"), "5");
        let quoted = quote(&gw, json!({"method": method.as_str(), "path": path})).await;
        assert_eq!(
            quoted,
            json!({"allowed": true, "operation": null, "credits": 0, "available": 5, "pass_through": true})
        );
    }
    let received = gw.backend.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].path, "/v1/other/thing?x=1");
    assert_eq!(
        received[0].header("authorization"),
        None,
        "the key is not forwarded"
    );
    assert_eq!(received[0].header("x-creditgate-account"), Some("alice"));
    // Still authenticated.
    let resp = gw
        .client
        .get(format!("{}/v1/other/thing", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(gw.backend.received().len(), 2);
    // A matched operation is still priced, and names itself.
    let resp = gw.post("/v1/images").send().await.unwrap();
    assert_eq!(header(&resp, "x-credits-operation"), "image.generate");
    let t = gw.settled("alice").await;
    assert_eq!((t.charged, t.available), (credits("3"), credits("2")));
}

#[tokio::test]
async fn a_quote_says_quota_exhausted_once_the_quota_is_used_up() {
    let gw = start_policy(|_| PASS_THROUGH.to_string(), |_| None).await;
    let ask = json!({"method": "POST", "path": "/v1/images/basic"});
    for _ in 0..2 {
        assert_eq!(
            quote(&gw, ask.clone()).await,
            json!({"allowed": true, "operation": "image.basic", "credits": 0, "available": 5})
        );
        let resp = gw.post("/v1/images/basic").send().await.unwrap();
        assert_eq!(resp.status(), 200);
        gw.settled("alice").await;
    }
    let quoted = quote(&gw, ask).await;
    assert_eq!(quoted["allowed"], false, "{quoted}");
    assert_eq!(quoted["operation"], "image.basic");
    assert_eq!(quoted["error"]["type"], "quota_exhausted");
    assert_eq!(quoted["error"]["quota"], "basic_images");
    assert_eq!(quoted["error"]["limit"], 2);
    // The quote placed nothing, and says what the request then gets.
    assert!(gw.totals("alice").await.held.is_zero());
    let resp = gw.post("/v1/images/basic").send().await.unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["type"], quoted["error"]["type"]);
    assert_eq!(body["error"]["message"], quoted["error"]["message"]);
}

#[tokio::test]
async fn too_many_holds_is_a_429_and_nothing_is_forwarded() {
    let gw = start_policy(
        |_| {
            POLICY
                .replace("{CREDITS}", "100")
                .replace("{READ_TIMEOUT}", "30s")
                .replace("[gateway]\n", "[gateway]\nmax_holds_per_account = 1\n")
        },
        |_| None,
    )
    .await;
    // A stream the backend pauses keeps its hold open.
    let mut first = gw
        .post("/v1/stream/fixed")
        .header("x-mock-sse", "10")
        .header("x-mock-sse-pause-after", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(gw.totals("alice").await.held, credits("3"));
    let resp = gw.post("/v1/images").send().await.unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (429, Some("too_many_holds")),
        "{body}"
    );
    assert_eq!(body["error"]["limit"], 1);
    assert_eq!(
        gw.backend.received().len(),
        1,
        "the refused request was not forwarded"
    );
    gw.backend.open_gate();
    while first.chunk().await.unwrap().is_some() {}
    gw.settled("alice").await;
    // With the hold ended, the next request holds again.
    assert_eq!(gw.post("/v1/images").send().await.unwrap().status(), 200);
    let t = gw.settled("alice").await;
    assert_eq!((t.charged, t.available), (credits("6"), credits("94")));
}

#[tokio::test]
async fn a_wrong_method_on_an_admin_route_is_a_json_405() {
    let gw = start("1").await;
    for (method, path) in [
        (Method::DELETE, "/admin/accounts/alice"),
        (Method::PUT, "/admin/accounts"),
        (Method::POST, "/healthz"),
    ] {
        let resp = gw.admin(method, path).send().await.unwrap();
        let (status, body) = error_of(resp).await;
        assert_eq!(status, 405, "{path}");
        assert_eq!(
            body["error"]["type"], "method_not_allowed",
            "{path}: {body}"
        );
        assert!(body["error"]["message"].is_string());
    }
    // Without the token too: the method is refused before the token is checked.
    let resp = gw
        .client
        .delete(format!("{}/admin/accounts/alice", gw.admin_url))
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (405, Some("method_not_allowed"))
    );
    // Unknown routes stay a JSON 404.
    let (status, body) = error_of(gw.admin(Method::GET, "/admin/nope").send().await.unwrap()).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (404, Some("not_found"))
    );
}

#[tokio::test]
async fn readyz_needs_no_token_and_says_ready() {
    let gw = start("1").await;
    let resp = gw
        .client
        .get(format!("{}/readyz", gw.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"status": "ready"})
    );
}

/// `on_unavailable = "allow"` on a Redis the test starts and kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_unavailable_allow_forwards_unmetered_and_counts_it() {
    let mut redis = RedisServer::start();
    let backend = MockBackend::start(TcpListener::bind("127.0.0.1:0").await.unwrap()).unwrap();
    let text = format!(
        r#"version = 1
[store]
kind = "redis"
url = "{}"
on_unavailable = "allow"
[upstreams.main]
url = "http://{}"
[plans.free]
monthly_credits = 0
[[operations]]
name = "image.generate"
method = "POST"
path = "/v1/images"
upstream = "main"
price = 3
[[accounts]]
id = "shared"
plan = "free"
grants = [ {{ kind = "topup", credits = 10 }} ]
keys = [ {{ member = "m", key_env = "ALICE_KEY" }} ]
"#,
        redis.url(),
        backend.addr
    );
    let env = |name: &str| (name == "ALICE_KEY").then(|| ALICE_KEY.to_string());
    let policy = Arc::new(Policy::parse(&text, "redis.toml", &env).unwrap());
    let store: Arc<dyn creditgate::store::Store> = Arc::new(
        RedisStore::connect(&redis.url(), false, policy.catalog(), policy.limits())
            .await
            .unwrap(),
    );
    let gateway = Gateway::new(policy, store, Clock::system()).unwrap();
    gateway.seed_accounts().await.unwrap();
    let metrics = gateway.metrics().clone();
    let live = LiveGateway::new(gateway);
    let (_stop, shutdown) = watch::channel(false);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve_live(listener, live.clone(), shutdown.clone()));
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_url = format!("http://{}", admin_listener.local_addr().unwrap());
    let admin = AdminState::new(live, None, Some(ADMIN_TOKEN));
    tokio::spawn(creditgate::admin::serve(admin_listener, admin, shutdown));

    let client = reqwest::Client::new();
    let send = |key: &str| {
        client
            .post(format!("{url}/v1/images"))
            .bearer_auth(key)
            .send()
    };
    let unmetered = || {
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix("creditgate_unmetered_total "))
            .map(str::to_string)
    };
    let resp = send(ALICE_KEY).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-credits-held"), "3");
    assert_eq!(unmetered().as_deref(), Some("0"));
    let ready = client
        .get(format!("{admin_url}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    redis.kill();
    // The key was seen a moment ago; the hold cannot be placed: forwarded unmetered.
    let resp = send(ALICE_KEY).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-credits-held"), "0");
    assert_eq!(header(&resp, "x-credits-remaining"), "<missing>");
    assert_eq!(backend.received().len(), 2);
    assert_eq!(unmetered().as_deref(), Some("1"));
    // A key nobody has seen is still refused.
    let resp = send("sk-never-seen-123456").await.unwrap();
    assert_eq!(
        header(&resp, "retry-after"),
        "1",
        "a 503 says when to retry"
    );
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (503, Some("store_unavailable"))
    );
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert_eq!(backend.received().len(), 2);
    // Not ready while the store does not answer.
    let ready = client
        .get(format!("{admin_url}/readyz"))
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(ready).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (503, Some("store_unavailable"))
    );

    redis.restart();
    let url = admin_url.clone();
    eventually(move || {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .get(format!("{url}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    })
    .await;
}
