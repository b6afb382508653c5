//! Refusals that keep the meter honest: a JSON body the gateway and the backend
//! could read differently (duplicate keys), an early answer a client still sending
//! its body must be able to read, and store failures answered by their kind (an
//! outage may forward unmetered under `on_unavailable = "allow"`; a corrupt or
//! contended account never is).

use std::sync::Arc;
use std::time::Duration;

use creditgate::admin::AdminState;
use creditgate::clock::Clock;
use creditgate::demo::mock::MockBackend;
use creditgate::gateway::{serve_live, Gateway, LiveGateway};
use creditgate::ledger::{Credits, HoldRequest};
use creditgate::policy::Policy;
use creditgate::store::redis::RedisStore;
use creditgate::store::{GrantRequest, Store, StoreError};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::harness::*;
use crate::redis_server::RedisServer;

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

/// Sends `head`, then `body_bytes` bytes of body in 64 KiB writes, all before reading
/// anything (as Python's http.client and many SDKs do), then reads the answer to its
/// end. `Err` says what broke: a write or a read.
async fn send_all_then_read(url: &str, head: &str, body_bytes: usize) -> Result<String, String> {
    let addr = url.trim_start_matches("http://").parse().unwrap();
    // A small send buffer, as on a real network, where far less than the body is
    // in flight: the kernel cannot take the whole body for the gateway.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(64 * 1024).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| format!("writing the head: {e}"))?;
    let piece = vec![b' '; 64 * 1024];
    let mut sent = 0;
    while sent < body_bytes {
        let n = piece.len().min(body_bytes - sent);
        stream
            .write_all(&piece[..n])
            .await
            .map_err(|e| format!("writing the body after {sent} bytes: {e}"))?;
        sent += n;
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .map_err(|_| "no answer within 30 s".to_string())?
        .map_err(|e| format!("reading the answer: {e}"))?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn head(path: &str, key: Option<&str>, content_length: usize) -> String {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {content_length}\r\n\r\n"
    )
}

/// The status and JSON body of one raw HTTP/1.1 answer.
fn parse_answer(answer: &str) -> (u16, Value) {
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let (_, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no body in {answer:?}"));
    (status, serde_json::from_str(body).unwrap())
}

#[tokio::test]
async fn an_early_answer_is_readable_by_a_client_that_sends_its_whole_body_first() {
    let gw = start_policy(|_| BODY_PRICED.to_string(), |_| None).await;
    let two_mib = 2 * 1024 * 1024;
    let cases = [
        // Past max_body_bytes: refused from its Content-Length, before reading it.
        ("/v1/count", Some(ALICE_KEY), 413, "request_too_large"),
        // No key: refused before anything else.
        ("/v1/count", None, 401, "missing_api_key"),
        // No operation on this path.
        ("/v1/nothing", Some(ALICE_KEY), 404, "unknown_operation"),
    ];
    for (path, key, status, kind) in cases {
        let answer = send_all_then_read(&gw.url, &head(path, key, two_mib), two_mib)
            .await
            .unwrap_or_else(|e| panic!("{path} ({status}): {e}"));
        let (got, body) = parse_answer(&answer);
        assert_eq!((got, body["error"]["type"].as_str()), (status, Some(kind)));
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    assert!(gw.backend.received().is_empty());
    let t = gw.settled("alice").await;
    assert_eq!((t.held, t.charged), (credits("0"), credits("0")));
}

#[tokio::test]
async fn the_drain_after_an_early_answer_is_bounded_in_bytes() {
    let gw = start_policy(|_| BODY_PRICED.to_string(), |_| None).await;
    // A client that would send a gigabyte is cut off once the drain's cap is read:
    // its writes fail soon after, instead of the gateway reading all of it.
    let declared = 1 << 30;
    let limit = creditgate::gateway::LINGER_MAX_BYTES + 64 * 1024 * 1024;
    let outcome = send_all_then_read(
        &gw.url,
        &head("/v1/count", Some(ALICE_KEY), declared),
        limit,
    )
    .await;
    let error = outcome.expect_err("the gateway must stop reading at the drain's cap");
    assert!(error.starts_with("writing the body"), "{error}");
    // The gateway still serves.
    let resp = gw
        .post("/v1/count")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// A gateway on a Redis store with `on_unavailable = "allow"`, and its admin API.
struct RedisGateway {
    url: String,
    admin_url: String,
    backend: MockBackend,
    metrics: Arc<creditgate::metrics::Metrics>,
    /// How seeding the policy's account went.
    seeded: Result<(), StoreError>,
    _stop: watch::Sender<bool>,
}

fn allow_policy(redis_url: &str, backend: &str) -> String {
    format!(
        r#"version = 1
[store]
kind = "redis"
url = "{redis_url}"
on_unavailable = "allow"
[upstreams.main]
url = "http://{backend}"
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
"#
    )
}

async fn redis_gateway(redis: &RedisServer) -> RedisGateway {
    let backend = MockBackend::start(TcpListener::bind("127.0.0.1:0").await.unwrap()).unwrap();
    let text = allow_policy(&redis.url(), &backend.addr.to_string());
    let env = |name: &str| (name == "ALICE_KEY").then(|| ALICE_KEY.to_string());
    let policy = Arc::new(Policy::parse(&text, "redis.toml", &env).unwrap());
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(&redis.url(), false, policy.catalog(), policy.limits())
            .await
            .unwrap(),
    );
    let gateway = Gateway::new(policy, store, Clock::system()).unwrap();
    let seeded = gateway.seed_accounts().await;
    let metrics = gateway.metrics().clone();
    let live = LiveGateway::new(gateway);
    let (stop, shutdown) = watch::channel(false);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve_live(listener, live.clone(), shutdown.clone()));
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_url = format!("http://{}", admin_listener.local_addr().unwrap());
    let admin = AdminState::new(live, None, Some(ADMIN_TOKEN));
    tokio::spawn(creditgate::admin::serve(admin_listener, admin, shutdown));
    RedisGateway {
        url,
        admin_url,
        backend,
        metrics,
        seeded,
        _stop: stop,
    }
}

fn series(metrics: &creditgate::metrics::Metrics, name: &str) -> Option<String> {
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_account_is_a_500_and_never_forwarded_even_when_outages_are_allowed() {
    let redis = RedisServer::start();
    let gw = redis_gateway(&redis).await;
    assert_eq!(gw.seeded, Ok(()));
    let client = reqwest::Client::new();
    let send = || {
        client
            .post(format!("{}/v1/images", gw.url))
            .bearer_auth(ALICE_KEY)
            .send()
    };
    let resp = send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(gw.backend.received().len(), 1);

    // Garbage in place of the account's state, at a newer version than the
    // gateway's copy: the next hold finds it when its compare-and-set fails.
    let raw = redis::Client::open(redis.url()).unwrap();
    let mut conn = raw.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("HSET")
        .arg("cg:{acct:shared}")
        .arg("v")
        .arg("1000")
        .arg("s")
        .arg(&b"\xc1not an account"[..])
        .query_async::<()>(&mut conn)
        .await
        .unwrap();

    let resp = send().await.unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (500, Some("store_error")),
        "{body}"
    );
    assert_eq!(gw.backend.received().len(), 1, "nothing more was forwarded");
    assert_eq!(
        series(&gw.metrics, "creditgate_unmetered_total").as_deref(),
        Some("0")
    );
    // At least this request's failure (the background sweep may have met the
    // account too), and counted as corrupt, never as an outage.
    let corrupt = series(
        &gw.metrics,
        r#"creditgate_store_errors_total{kind="corrupt"}"#,
    );
    assert!(
        corrupt.as_deref().and_then(|n| n.parse::<u64>().ok()) >= Some(1),
        "{corrupt:?}"
    );
    assert_eq!(
        series(
            &gw.metrics,
            r#"creditgate_store_errors_total{kind="unavailable"}"#
        )
        .as_deref()
        .unwrap_or("0"),
        "0"
    );
    // Reading it is the same error, on the client API and the admin API.
    let resp = client
        .get(format!("{}/credits/v1/balance", gw.url))
        .bearer_auth(ALICE_KEY)
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (500, Some("store_error"))
    );
    let resp = client
        .get(format!("{}/admin/accounts/shared", gw.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (500, Some("store_error"))
    );

    // A replica that never saw the account finds it corrupt when it identifies the key.
    let other = redis_gateway(&redis).await;
    // Seeding finds it corrupt too, and leaves it as it is.
    assert!(
        matches!(other.seeded, Err(StoreError::Corrupt(_))),
        "{:?}",
        other.seeded
    );
    let resp = client
        .post(format!("{}/v1/images", other.url))
        .bearer_auth(ALICE_KEY)
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(resp).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (500, Some("store_error"))
    );
    assert!(other.backend.received().is_empty());
    assert_eq!(
        series(&other.metrics, "creditgate_unmetered_total").as_deref(),
        Some("0")
    );
}

fn hold_request(request_id: &str) -> HoldRequest {
    HoldRequest {
        operation: "image.generate".into(),
        request_id: request_id.into(),
        amount: Credits::from_whole(1).unwrap(),
        ttl_ms: 600_000,
        max_holds: 100,
        quota: None,
        idempotency: None,
        caller: None,
        terms: creditgate::ledger::HoldTerms::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_that_loses_every_compare_and_set_is_contended() {
    let redis = RedisServer::start();
    let env = |name: &str| (name == "ALICE_KEY").then(|| ALICE_KEY.to_string());
    let policy = Policy::parse(
        &allow_policy(&redis.url(), "127.0.0.1:9"),
        "redis.toml",
        &env,
    )
    .unwrap();
    // One attempt only, so one concurrent change exhausts the retries.
    let mine = RedisStore::connect(&redis.url(), false, policy.catalog(), policy.limits())
        .await
        .unwrap()
        .with_max_attempts(1);
    let theirs = RedisStore::connect(&redis.url(), false, policy.catalog(), policy.limits())
        .await
        .unwrap();
    let now = Clock::system().now_ms();
    for seed in &policy.accounts {
        mine.seed(seed, now).await.unwrap();
    }
    // My copy of the account is now current; another replica changes it after.
    mine.hold("shared", &hold_request("r1"), now)
        .await
        .unwrap()
        .unwrap();
    let grant = GrantRequest {
        idempotency_key: "g1".into(),
        kind: "topup".into(),
        credits: Credits::from_whole(5).unwrap(),
        priority: 30,
        expires_at_ms: None,
    };
    theirs.grant("shared", &grant, now).await.unwrap().unwrap();
    // My hold is computed on my stale copy, loses the compare-and-set, and may not retry.
    match mine.hold("shared", &hold_request("r2"), now).await {
        Err(StoreError::Contended(_)) => {}
        other => panic!("expected Contended, got {other:?}"),
    }
    // With its retries, the same transition succeeds.
    let patient = RedisStore::connect(&redis.url(), false, policy.catalog(), policy.limits())
        .await
        .unwrap();
    patient
        .hold("shared", &hold_request("r3"), now)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_that_loses_every_compare_and_set_is_written_later_not_dropped() {
    let redis = RedisServer::start();
    let env = |name: &str| (name == "ALICE_KEY").then(|| ALICE_KEY.to_string());
    let policy = Policy::parse(
        &allow_policy(&redis.url(), "127.0.0.1:9"),
        "redis.toml",
        &env,
    )
    .unwrap();
    let mine = RedisStore::connect(&redis.url(), false, policy.catalog(), policy.limits())
        .await
        .unwrap()
        .with_max_attempts(1);
    let theirs = RedisStore::connect(&redis.url(), false, policy.catalog(), policy.limits())
        .await
        .unwrap();
    let now = Clock::system().now_ms();
    for seed in &policy.accounts {
        mine.seed(seed, now).await.unwrap();
    }
    let placed = mine
        .hold("shared", &hold_request("r1"), now)
        .await
        .unwrap()
        .unwrap();
    let before = theirs.totals("shared", now).await.unwrap();
    // Another replica changes the account: my settle, on my stale copy, loses.
    let grant = GrantRequest {
        idempotency_key: "g1".into(),
        kind: "topup".into(),
        credits: Credits::from_whole(5).unwrap(),
        priority: 30,
        expires_at_ms: None,
    };
    theirs.grant("shared", &grant, now).await.unwrap().unwrap();
    let charge = Credits::from_whole(1).unwrap();
    match mine
        .settle("shared", placed.hold_id, charge, None, now)
        .await
    {
        Err(StoreError::Contended(_)) => {}
        other => panic!("expected Contended, got {other:?}"),
    }
    // Kept and written by the store itself, once: the delivered answer is charged.
    let mut totals = theirs.totals("shared", now).await.unwrap();
    for _ in 0..250 {
        if totals.held.is_zero() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        totals = theirs.totals("shared", now).await.unwrap();
    }
    assert!(totals.held.is_zero(), "the settle was dropped: {totals:?}");
    assert_eq!(
        totals.charged,
        before.charged.checked_add(charge).unwrap(),
        "charged exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_state_of_the_wrong_shape_is_corrupt_and_no_answer_is_unavailable() {
    let mut redis = RedisServer::start();
    let env = |name: &str| (name == "ALICE_KEY").then(|| ALICE_KEY.to_string());
    let policy = Policy::parse(
        &allow_policy(&redis.url(), "127.0.0.1:9"),
        "redis.toml",
        &env,
    )
    .unwrap();
    let store = RedisStore::connect(&redis.url(), false, policy.catalog(), policy.limits())
        .await
        .unwrap();
    let raw = redis::Client::open(redis.url()).unwrap();
    let conn = raw.get_multiplexed_async_connection().await.unwrap();
    let write = |command: redis::Cmd| {
        let mut conn = conn.clone();
        async move { command.query_async::<()>(&mut conn).await.unwrap() }
    };
    // A key of another type where the account's hash belongs.
    write(redis::cmd("SET").arg("cg:{acct:a}").arg("x").to_owned()).await;
    // A version that is not a number.
    write(
        redis::cmd("HSET")
            .arg("cg:{acct:b}")
            .arg("v")
            .arg("seven")
            .arg("s")
            .arg("{}")
            .to_owned(),
    )
    .await;
    // A version that is not even text.
    write(
        redis::cmd("HSET")
            .arg("cg:{acct:c}")
            .arg("v")
            .arg(&b"\xff\xfe"[..])
            .arg("s")
            .arg("{}")
            .to_owned(),
    )
    .await;
    // A state that does not decode.
    write(
        redis::cmd("HSET")
            .arg("cg:{acct:d}")
            .arg("v")
            .arg("3")
            .arg("s")
            .arg(&b"\xc1\xc1"[..])
            .to_owned(),
    )
    .await;
    let now = Clock::system().now_ms();
    for id in ["a", "b", "c", "d"] {
        match store.totals(id, now).await {
            Err(StoreError::Corrupt(_)) => {}
            other => panic!("account {id}: expected Corrupt, got {other:?}"),
        }
    }
    match store.totals("missing", now).await {
        Err(StoreError::UnknownAccount(_)) => {}
        other => panic!("expected UnknownAccount, got {other:?}"),
    }
    redis.kill();
    match store.totals("d", now).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("with redis down: expected Unavailable, got {other:?}"),
    }
}
