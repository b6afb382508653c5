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
    for kind in ["unavailable", "contended", "corrupt"] {
        let series = format!("creditgate_store_errors_total{{kind=\"{kind}\"}}");
        assert_eq!(metric(&text, &series), 0.0);
    }
    assert!(metric(&text, "creditgate_store_latency_seconds_count") >= 10.0);
    let resp = gw
        .client
        .get(format!("{}/metrics", gw.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "metrics need the admin token");
}

const RELOAD_KEY: &str = "sk-reload-0123";

fn reload_policy(backend: &str, price: &str) -> String {
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        RELOAD_KEY.as_bytes(),
    ));
    format!(
        "version = 1\n[upstreams.main]\nurl = \"{backend}\"\n[plans.free]\nmonthly_credits = 0\n\
         [[operations]]\nname = \"image.generate\"\nmethod = \"POST\"\npath = \"/v1/images\"\nupstream = \"main\"\nprice = {price}\n\
         [[accounts]]\nid = \"r\"\nplan = \"free\"\ngrants = [ {{ kind = \"topup\", credits = 1000000 }} ]\n\
         keys = [ {{ member = \"m\", key_sha256 = \"{hash}\" }} ]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_changes_prices_at_once_and_drops_no_request() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = std::env::temp_dir().join(format!("creditgate-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.toml");
    let backend_url = Arc::new(std::sync::Mutex::new(String::new()));
    let (f, b) = (file.clone(), backend_url.clone());
    let gw = start_policy_with_file(
        move |backend| {
            *b.lock().unwrap() = backend.to_string();
            let text = reload_policy(backend, "3");
            std::fs::write(&f, &text).unwrap();
            text
        },
        |_| None,
        Some(file.clone()),
    )
    .await;
    let backend = backend_url.lock().unwrap().clone();
    // Requests of the load completed so far, by the price they were held at.
    let done_at = |price: &str| match price {
        "3" => 0,
        "5" => 1,
        other => panic!("a request held {other}"),
    };
    let done: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, url, stop, done) = (
            gw.client.clone(),
            format!("{}/v1/images", gw.url),
            stop.clone(),
            done.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let outcome = match client
                    .post(&url)
                    .bearer_auth(RELOAD_KEY)
                    .header("x-mock-delay-ms", "3")
                    .send()
                    .await
                {
                    Ok(resp) => (
                        resp.status().as_u16(),
                        header(&resp, "x-credits-held").to_string(),
                    ),
                    Err(e) => (0, e.to_string()),
                };
                if outcome.0 == 200 {
                    done[done_at(&outcome.1)].fetch_add(1, Ordering::SeqCst);
                }
                outcomes.push(outcome);
            }
            outcomes
        }));
    }
    // Waits until the load has completed `more` requests held at `price`.
    let completed = |price: &'static str, more: u64| {
        let done = done.clone();
        let target = done[done_at(price)].load(Ordering::SeqCst) + more;
        eventually(move || {
            let done = done.clone();
            async move { done[done_at(price)].load(Ordering::SeqCst) >= target }
        })
    };
    let held = || async {
        let resp = gw
            .client
            .post(format!("{}/v1/images", gw.url))
            .bearer_auth(RELOAD_KEY)
            .send()
            .await
            .unwrap();
        header(&resp, "x-credits-held").to_string()
    };
    completed("3", 8).await;
    assert_eq!(held().await, "3");
    // One request certainly in flight across the reload: its stream waits at the gate.
    let mut across = gw
        .client
        .post(format!("{}/v1/images", gw.url))
        .bearer_auth(RELOAD_KEY)
        .header("x-mock-sse", "10")
        .header("x-mock-sse-pause-after", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&across, "x-credits-held"), "3");

    std::fs::write(&file, reload_policy(&backend, "5")).unwrap();
    let resp = gw
        .admin(Method::POST, "/admin/policy/reload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    assert_eq!(held().await, "5", "new requests see the new price at once");
    completed("5", 8).await;

    std::fs::write(&file, reload_policy(&backend, "0.0001")).unwrap();
    let resp = gw
        .admin(Method::POST, "/admin/policy/reload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_policy");
    let first = body["error"]["errors"][0].as_str().unwrap();
    assert!(
        first.contains("policy.toml:") && first.contains("more than 3 decimal places"),
        "{first}"
    );
    assert_eq!(
        held().await,
        "5",
        "an invalid file leaves the running policy"
    );

    std::fs::write(
        &file,
        reload_policy(&backend, "5").replace(
            "version = 1\n",
            "version = 1\n[gateway]\nlisten = \"127.0.0.1:1\"\n",
        ),
    )
    .unwrap();
    let resp = gw
        .admin(Method::POST, "/admin/policy/reload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409, "addresses change only with a restart");
    completed("5", 8).await;
    std::fs::write(
        &file,
        reload_policy(&backend, "5").replace(
            "version = 1\n",
            "version = 1\n[gateway]\nmax_connections = 7\n",
        ),
    )
    .unwrap();
    let resp = gw
        .admin(Method::POST, "/admin/policy/reload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409, "so does the connection cap");

    // The request held before the reload ends under the price it was held at.
    gw.backend.open_gate();
    while across.chunk().await.unwrap().is_some() {}
    stop.store(true, Ordering::Relaxed);
    // The three `held()` probes at 3, 5, 5 and the request across the reload at 3.
    let mut expected = 3 + 5 + 5 + 3;
    let mut at = [0u64; 2];
    for task in load {
        for (status, held) in task.await.unwrap() {
            assert_eq!(status, 200, "a request failed during the reloads: {held}");
            at[done_at(&held)] += 1;
            expected += if held == "3" { 3 } else { 5 };
        }
    }
    assert!(
        at[0] >= 8 && at[1] >= 16,
        "the load ran before and after the reloads: {at:?}"
    );
    let t = gw.settled("r").await;
    assert_eq!(
        t.charged,
        credits(&expected.to_string()),
        "every request was charged the price it was held at"
    );
}

#[tokio::test]
async fn oversized_headers_and_invalid_bytes_are_refused_and_the_gateway_keeps_serving() {
    let gw = start("100").await;
    let huge = format!("POST /v1/images HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE_KEY}\r\nx-filler: {}\r\nconnection: close\r\n\r\n", "a".repeat(2 << 20));
    let answer = raw_exchange(&gw.url, huge.as_bytes(), b"", false).await;
    assert!(
        !answer.starts_with("HTTP/1.1 2"),
        "a 2 MiB header is not proxied: {}",
        &answer[..answer.len().min(80)]
    );
    let mut bad = b"POST /v1/images HTTP/1.1\r\nhost: x\r\nx-api-key: \xff\xfe\xfd\r\nconnection: close\r\n\r\n".to_vec();
    bad.extend_from_slice(b"");
    let answer = raw_exchange(&gw.url, &bad, b"", false).await;
    assert!(
        answer.starts_with("HTTP/1.1 401") || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    let resp = gw.post("/v1/images").send().await.unwrap();
    assert_eq!(resp.status(), 200, "the gateway keeps serving");
    let t = gw.settled("alice").await;
    assert_eq!(t.charged, credits("3"), "only the good request was charged");
}

async fn with_key(gw: &TestGateway, key: &str, path: &str) -> reqwest::RequestBuilder {
    gw.post(path).header("idempotency-key", key)
}

#[tokio::test]
async fn an_idempotency_key_replays_a_settled_request_and_charges_once() {
    let gw = start("100").await;
    let first = with_key(&gw, "order-1", "/v1/images")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let first_body = first.text().await.unwrap();
    gw.settled("alice").await;
    let again = with_key(&gw, "order-1", "/v1/images")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(header(&again, "idempotent-replayed"), "true");
    assert_eq!(header(&again, "x-credits-held"), "0");
    assert_eq!(
        again.text().await.unwrap(),
        first_body,
        "the recorded response, byte for byte"
    );
    assert_eq!(
        gw.backend.received().len(),
        1,
        "the repeat never reached the backend"
    );
    assert_eq!(
        gw.settled("alice").await.charged,
        credits("3"),
        "charged once"
    );

    // The same key on another request is refused.
    let (status, body) = {
        let r = with_key(&gw, "order-1", "/v1/sites/x/edits")
            .await
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.json::<serde_json::Value>().await.unwrap(),
        )
    };
    assert_eq!(
        (status, body["error"]["type"].as_str().unwrap()),
        (409, "idempotency_key_reused")
    );

    // After the key's TTL (24 h by default) it runs anew.
    gw.advance_days(2);
    let later = with_key(&gw, "order-1", "/v1/images")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(header(&later, "idempotent-replayed"), "<missing>");
    assert_eq!(gw.backend.received().len(), 2);
}

#[tokio::test]
async fn an_idempotency_key_in_flight_is_409_and_a_released_one_runs_anew() {
    let gw = start("100").await;
    // A stream the backend pauses keeps the first request in flight, its key open,
    // until the gate opens: the repeat is sent while it certainly is.
    let mut first = with_key(&gw, "k-slow", "/v1/images")
        .await
        .header("x-mock-sse", "10")
        .header("x-mock-sse-pause-after", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let second = with_key(&gw, "k-slow", "/v1/images")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 409);
    assert_eq!(
        second.json::<serde_json::Value>().await.unwrap()["error"]["type"],
        "idempotency_in_progress"
    );
    gw.backend.open_gate();
    while first.chunk().await.unwrap().is_some() {}
    assert_eq!(gw.settled("alice").await.charged, credits("3"));

    let failed = with_key(&gw, "k-fail", "/v1/images")
        .await
        .header("x-mock-status", "503")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 503);
    let retried = with_key(&gw, "k-fail", "/v1/images")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(
        retried.status(),
        200,
        "a released first attempt: the retry runs anew"
    );
    assert_eq!(header(&retried, "idempotent-replayed"), "<missing>");
    assert_eq!(
        gw.settled("alice").await.charged,
        credits("6"),
        "two successes, one charge each"
    );

    let bad = gw
        .post("/v1/images")
        .header("idempotency-key", "")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn an_idempotency_key_is_at_most_as_long_as_an_accounts_state_counts_it() {
    // The bound on one account's state counts each key at this length.
    let longest = creditgate::ledger::IDEMPOTENCY_KEY_MAX_BYTES;
    let gw = start("100").await;
    let fits = with_key(&gw, &"k".repeat(longest), "/v1/images")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(fits.status(), 200);
    let over = with_key(&gw, &"k".repeat(longest + 1), "/v1/images")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(over.status(), 400);
    assert_eq!(
        gw.backend.received().len(),
        1,
        "the long key never reached it"
    );
}

/// One keep-alive client connection, spoken to by hand so that the test decides
/// when it opens, sends and closes.
struct Connection(tokio::net::TcpStream);

impl Connection {
    async fn open(gw: &TestGateway) -> Connection {
        let addr = gw.url.trim_start_matches("http://");
        Connection(tokio::net::TcpStream::connect(addr).await.unwrap())
    }

    /// Sends `GET /v1/models` (a free operation) tagged `x-order: {tag}`.
    async fn send(&mut self, tag: &str) {
        use tokio::io::AsyncWriteExt;
        let request = format!(
            "GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE_KEY}\r\n\
             x-order: {tag}\r\n\r\n"
        );
        self.0.write_all(request.as_bytes()).await.unwrap();
    }

    /// Reads one response (its head, then a body of its content-length) and
    /// returns its status.
    async fn response(&mut self) -> u16 {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        let read = async {
            while !got.ends_with(b"\r\n\r\n") {
                assert_eq!(self.0.read(&mut byte).await.unwrap(), 1, "closed early");
                got.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |n| n.trim().parse().unwrap());
            let mut body = vec![0u8; length];
            self.0.read_exact(&mut body).await.unwrap();
            head[9..12].parse().unwrap()
        };
        // A guard against a hung test, not a measure: every answer comes at once.
        tokio::time::timeout(std::time::Duration::from_secs(30), read)
            .await
            .expect("an answer")
    }

    async fn request(&mut self, tag: &str) -> u16 {
        self.send(tag).await;
        self.response().await
    }
}

#[tokio::test]
async fn past_max_connections_a_connection_waits_until_one_closes() {
    let text = POLICY
        .replace("[gateway]\n", "[gateway]\nmax_connections = 2\n")
        .replace("{CREDITS}", "10")
        .replace("{READ_TIMEOUT}", "2s");
    let gw = start_policy(|_| text, |_| None).await;
    let mut a = Connection::open(&gw).await;
    let mut b = Connection::open(&gw).await;
    assert_eq!(a.request("a1").await, 200);
    assert_eq!(b.request("b1").await, 200);

    // A third client connects (the kernel queues it) and sends its request; the
    // first two go on being served on their connections meanwhile.
    let mut c = Connection::open(&gw).await;
    c.send("c1").await;
    for round in 2..=4 {
        assert_eq!(a.request(&format!("a{round}")).await, 200);
        assert_eq!(b.request(&format!("b{round}")).await, 200);
    }
    // One of the two closes: the third is served in its place.
    drop(a);
    assert_eq!(c.response().await, 200);
    assert_eq!(c.request("c2").await, 200);
    assert_eq!(b.request("b5").await, 200, "the other one still works");

    let order: Vec<String> = gw
        .backend
        .received()
        .iter()
        .filter_map(|r| r.header("x-order").map(str::to_string))
        .collect();
    assert_eq!(
        order,
        ["a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4", "c1", "c2", "b5"],
        "the third connection was served only after the first closed"
    );
}
