//! The path that was priced is the path that is served: the gateway normalizes the
//! path, prices the normalized path and forwards it, in front of a backend that
//! decodes `%2F` and resolves `..` the way nginx does (the mock's
//! `x-mock-resolve: nginx`, which reports the path it served).
//!
//! Requests go out as raw bytes: an HTTP client library would resolve the dot
//! segments itself before sending.

use creditgate::demo::mock::nginx_path;
use creditgate::policy::normalize_path;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Value};

use crate::harness::*;

/// Free model reads beside priced image reads and a priced `/v1/fast`: the paths of
/// the attacks. `model.run` prices from a path parameter.
const POLICY: &str = r#"
version = 1

[gateway]
unmatched = "{UNMATCHED}"
default_upstream = "main"

[upstreams.main]
url = "${BACKEND_URL}"

[plans.free]
monthly_credits = 0

[[operations]]
name = "models.get"
method = "GET"
path = "/v1/models/{id}"
upstream = "main"
price = 0

[[operations]]
name = "images.get"
method = "GET"
path = "/v1/images/{id}"
upstream = "main"
price = 2

[[operations]]
name = "fast"
path = "/v1/fast"
upstream = "main"
price = 3

[[operations]]
name = "model.run"
method = "GET"
path = "/v1/run/{model}"
upstream = "main"
[operations.price]
credits = { from = "path:model", table = { "o1:pro" = 50 }, otherwise = 1 }

[[accounts]]
id = "alice"
plan = "free"
grants = [ { kind = "topup", credits = 100000 } ]
keys = [ { member = "alice", key_env = "ALICE_KEY" } ]
"#;

async fn start_paths(unmatched: &str) -> TestGateway {
    let text = POLICY.replace("{UNMATCHED}", unmatched);
    start_policy(|_| text, |_| None).await
}

/// The operation and price a backend route table gives a path it serves, written
/// out by hand rather than asked of the gateway's own router.
fn served_operation(served: &str) -> Option<(&'static str, &'static str)> {
    let segments: Vec<&str> = served.split('/').skip(1).collect();
    match segments.as_slice() {
        ["v1", "models", id] if !id.is_empty() => Some(("models.get", "0")),
        ["v1", "images", id] if !id.is_empty() => Some(("images.get", "2")),
        ["v1", "fast"] => Some(("fast", "3")),
        ["v1", "run", "o1:pro"] => Some(("model.run", "50")),
        ["v1", "run", model] if !model.is_empty() => Some(("model.run", "1")),
        _ => None,
    }
}

/// One response, read off the wire.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// Where the mock says it served the request.
    fn served_path(&self) -> String {
        self.json()["served_path"]
            .as_str()
            .unwrap_or_else(|| panic!("no served_path: {}", self.body))
            .to_string()
    }

    /// A 400 `invalid_request` about the path.
    fn is_path_refusal(&self) -> bool {
        self.status == 400
            && self.json()["error"]["type"] == "invalid_request"
            && self.json()["error"]["source"] == "path"
    }
}

/// Sends `GET target` as written, with alice's key and `extra` header lines.
async fn send(gw: &TestGateway, target: &str, extra: &str) -> Answer {
    let head = format!(
        "GET {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALICE_KEY}\r\n\
         x-mock-resolve: nginx\r\n{extra}Connection: close\r\n\r\n"
    );
    let text = raw_exchange(&gw.url, head.as_bytes(), b"", false).await;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {text:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    assert!(
        !headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")),
        "{text}"
    );
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// The operation the gateway priced and the credits it held, from the headers.
fn priced(answer: &Answer) -> (Option<&str>, Option<&str>) {
    (
        answer.header("x-credits-operation"),
        answer.header("x-credits-held"),
    )
}

#[tokio::test]
async fn an_encoded_slash_or_a_dot_segment_cannot_reach_a_priced_path() {
    let gw = start_paths("deny").await;
    // The issue's attack: matched as a free model read, served as a priced image.
    for refused in [
        "/v1/models/..%2fimages%2fx",
        "/v1/models/..%2Fimages%2Fx",
        "/v1/models/..%5cimages%5cx",
        "/v1/models/..\\images\\x",
        "/v1/models/%G1",
        "/v1/models/%00",
        "/v1/../..",
        "/v1/models/x//../../images/x",
    ] {
        let answer = send(&gw, refused, "").await;
        assert!(
            answer.is_path_refusal(),
            "{refused}: {} {}",
            answer.status,
            answer.body
        );
    }
    assert!(gw.backend.received().is_empty(), "nothing was forwarded");

    // Dot segments that stay under the root are resolved before matching: priced as
    // what they are, and the backend gets the resolved path.
    for (target, forwarded, operation, held) in [
        ("/v1/models/../images/x", "/v1/images/x", "images.get", "2"),
        (
            "/v1/models/%2e%2E/images/x",
            "/v1/images/x",
            "images.get",
            "2",
        ),
        (
            "/v1/models/x/./../../images/x",
            "/v1/images/x",
            "images.get",
            "2",
        ),
        (
            "/v1/im%61ges/x?q=%2F..",
            "/v1/images/x?q=%2F..",
            "images.get",
            "2",
        ),
        // Path parameters are decoded: `%3A` is the `:` a backend serves.
        ("/v1/run/o1%3apro", "/v1/run/o1%3Apro", "model.run", "50"),
        ("/v1/run/o1:pro", "/v1/run/o1:pro", "model.run", "50"),
        ("/v1/run/o1", "/v1/run/o1", "model.run", "1"),
    ] {
        let before = gw.backend.received().len();
        let answer = send(&gw, target, "").await;
        assert_eq!(answer.status, 200, "{target}: {}", answer.body);
        assert_eq!(priced(&answer), (Some(operation), Some(held)), "{target}");
        let received = gw.backend.received();
        assert_eq!(received.len(), before + 1, "{target}");
        assert_eq!(received[before].path, forwarded, "{target}");
        let served = answer.served_path();
        assert_eq!(
            served_operation(&served).map(|(op, _)| op),
            Some(operation),
            "{target}"
        );
    }
    // Each was charged what was priced: 2 × 4 + 50 + 50 + 1.
    let totals = gw.settled("alice").await;
    assert_eq!(totals.available, credits("99891"));
}

#[tokio::test]
async fn in_allow_mode_a_disguised_priced_path_is_priced_not_passed_through() {
    let gw = start_paths("allow").await;
    for target in [
        "/v1/f%61st",
        "/v1/images/../fast",
        "/v1//fast",
        "/v1/%66ast",
    ] {
        let before = gw.backend.received().len();
        let answer = send(&gw, target, "").await;
        assert_eq!(answer.status, 200, "{target}: {}", answer.body);
        assert_eq!(priced(&answer), (Some("fast"), Some("3")), "{target}");
        assert_eq!(gw.backend.received()[before].path, "/v1/fast", "{target}");
        assert_eq!(answer.served_path(), "/v1/fast", "{target}");
    }
    // A pass-through is forwarded normalized too, with its query untouched.
    let answer = send(&gw, "/v1/other/..//nothing/?a=%2e%2e&b=//", "").await;
    assert_eq!(priced(&answer), (Some(""), Some("0")));
    let received = gw.backend.received();
    assert_eq!(received.last().unwrap().path, "/v1/nothing/?a=%2e%2e&b=//");
    // Refusals are the same as in deny mode: nothing reaches the backend.
    let before = received.len();
    let answer = send(&gw, "/v1/models/..%2fimages%2fx", "").await;
    assert!(answer.is_path_refusal(), "{}", answer.body);
    assert_eq!(gw.backend.received().len(), before);
    let totals = gw.settled("alice").await;
    assert_eq!(totals.available, credits("99988"));
}

#[tokio::test]
async fn an_absolute_form_target_is_normalized_and_names_the_upstream() {
    let gw = start_paths("deny").await;
    let answer = send(&gw, "http://gw/v1/f%61st?x=1", "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(priced(&answer), (Some("fast"), Some("3")));
    // The upstream is sent its own URL's host, and Pingora keeps an absolute-form
    // target's authority equal to it.
    let received = gw.backend.received();
    let last = received.last().unwrap();
    let upstream = format!("{}", gw.backend.addr);
    assert_eq!(last.path, format!("http://{upstream}/v1/fast?x=1"));
    assert_eq!(last.header("host"), Some(upstream.as_str()));
    let answer = send(&gw, "*", "").await;
    assert!(answer.is_path_refusal(), "{}", answer.body);
}

/// The client API prefix is checked on the normalized path too.
#[tokio::test]
async fn the_client_apis_are_found_after_normalization() {
    let gw = start_paths("deny").await;
    let answer = send(&gw, "/v1/..//credits/v1/bal%61nce", "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["account"], "alice");
    // And a priced path cannot hide behind the prefix.
    let answer = send(&gw, "/credits/v1/../../v1/fast", "").await;
    assert_eq!(priced(&answer), (Some("fast"), Some("3")));
}

/// The idempotency fingerprint is the normalized request's: two spellings of one
/// path are one request, charged once.
#[tokio::test]
async fn two_spellings_of_one_path_are_one_idempotent_request() {
    let gw = start_paths("deny").await;
    let key = "Idempotency-Key: spell-1\r\n";
    let first = send(&gw, "/v1/f%61st?n=1", key).await;
    assert_eq!(priced(&first), (Some("fast"), Some("3")), "{}", first.body);
    gw.settled("alice").await;
    let second = send(&gw, "/v1/./fast?n=1", key).await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(second.body, first.body);
    let third = send(&gw, "/v1/fast?n=2", key).await;
    assert_eq!(third.status, 409, "{}", third.body);
    assert_eq!(third.json()["error"]["type"], "idempotency_key_reused");
    assert_eq!(gw.settled("alice").await.available, credits("99997"));
}

#[tokio::test]
async fn the_quote_api_normalizes_the_path_as_the_gateway_does() {
    let gw = start_paths("deny").await;
    let quote = |path: &str| {
        let request = gw
            .post("/credits/v1/quote")
            .json(&json!({"method": "GET", "path": path}));
        async move {
            let resp = request.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }
    };
    let answer = quote("/v1/models/..%2fimages%2fx").await;
    assert_eq!(answer["allowed"], false, "{answer}");
    assert_eq!(answer["error"]["type"], "invalid_request", "{answer}");
    assert_eq!(answer["error"]["source"], "path", "{answer}");
    let answer = quote("/v1/images/../fast").await;
    assert_eq!(answer["operation"], "fast", "{answer}");
    assert_eq!(answer["credits"], 3, "{answer}");
    let answer = quote("/v1/run/o1%3Apro?x=1").await;
    assert_eq!(answer["operation"], "model.run", "{answer}");
    assert_eq!(answer["credits"], 50, "{answer}");
}

/// A random path in the disguises of the attacks: a path an operation (or none)
/// serves, its characters percent-encoded in mixed case, detours through other
/// segments and `..`, `.` segments plain and encoded, repeated slashes, and now and
/// then a piece the gateway refuses.
fn random_path(rng: &mut StdRng) -> String {
    const MEANT: &[&[&str]] = &[
        &["v1", "models", "x"],
        &["v1", "images", "x"],
        &["v1", "images", "é"],
        &["v1", "fast"],
        &["v1", "run", "o1:pro"],
        &["v1", "run", "o1"],
        &["v1", "other"],
        &["v1", "images"],
    ];
    const DETOURS: &[&str] = &[
        "models/..",
        "x/%2e%2E",
        "images/.%2e",
        ".",
        "%2E",
        "%2e/x/..",
    ];
    const REFUSED: &[&str] = &[
        "%2F", "..%2f", "%5C", "\\", "%", "%G1", "%00", "..", "x//..",
    ];
    let mut path = String::new();
    for segment in MEANT[rng.gen_range(0..MEANT.len())] {
        path.push_str(if rng.gen_bool(0.1) { "//" } else { "/" });
        if rng.gen_bool(0.25) {
            path.push_str(DETOURS[rng.gen_range(0..DETOURS.len())]);
            path.push('/');
        }
        if rng.gen_bool(0.1) {
            path.push_str(REFUSED[rng.gen_range(0..REFUSED.len())]);
            path.push('/');
        }
        for c in segment.chars() {
            if c.is_ascii() && rng.gen_bool(0.2) {
                let escape = format!("%{:02X}", c as u8);
                path.push_str(&if rng.gen_bool(0.5) {
                    escape.to_lowercase()
                } else {
                    escape
                });
            } else {
                path.push(c);
            }
        }
    }
    if rng.gen_bool(0.1) {
        path.push_str("?q=%2F..%2F");
    }
    path
}

/// For random paths, in deny and allow mode: refused, or the backend receives the
/// normalized path, serves what the raw path means, and that is what was priced
/// and charged.
#[tokio::test]
async fn random_paths_are_served_as_they_were_priced() {
    let mut rng = StdRng::seed_from_u64(0x0009_a7e5);
    for unmatched in ["deny", "allow"] {
        let gw = start_paths(unmatched).await;
        let (mut charged, mut forwarded, mut refused) = (0u64, 0, 0);
        for _ in 0..48 {
            let target = random_path(&mut rng);
            let before = gw.backend.received().len();
            let answer = send(&gw, &target, "").await;
            let received = gw.backend.received();
            let (raw_path, query) = target.split_once('?').unwrap_or((&target, ""));
            let Ok(path) = normalize_path(raw_path.as_bytes()) else {
                assert!(
                    answer.is_path_refusal(),
                    "{target}: {} {}",
                    answer.status,
                    answer.body
                );
                assert_eq!(received.len(), before, "{target}");
                refused += 1;
                continue;
            };
            // What a backend given the raw path would have served: the gateway priced it.
            let meant = nginx_path(raw_path).map(|p| String::from_utf8(p).unwrap());
            assert_eq!(meant.as_deref(), Some(path.decoded()), "{target}");
            let expected = served_operation(path.decoded());
            if expected.is_none() && unmatched == "deny" {
                assert_eq!(answer.status, 404, "{target}: {}", answer.body);
                assert_eq!(received.len(), before, "{target}");
                continue;
            }
            assert_eq!(answer.status, 200, "{target}: {}", answer.body);
            assert_eq!(received.len(), before + 1, "{target}");
            let forwarded_target = match query {
                "" => path.as_str().to_string(),
                query => format!("{path}?{query}"),
            };
            assert_eq!(received[before].path, forwarded_target, "{target}");
            assert_eq!(answer.served_path(), path.decoded(), "{target}");
            let (operation, held) = expected.unwrap_or(("", "0"));
            assert_eq!(priced(&answer), (Some(operation), Some(held)), "{target}");
            charged += held.parse::<u64>().unwrap();
            forwarded += 1;
        }
        assert!(
            forwarded >= 10 && refused >= 3,
            "{forwarded} forwarded, {refused} refused"
        );
        let totals = gw.settled("alice").await;
        assert_eq!(
            totals.available,
            credits(&(100_000 - charged).to_string()),
            "{unmatched}"
        );
    }
}

/// A body read to price the request re-parses the request head (`body::rearm`): the
/// path is rewritten after that, so the backend still gets the normalized path, and
/// the body intact.
#[tokio::test]
async fn a_body_priced_request_is_forwarded_on_its_normalized_path() {
    let gw = start("100").await;
    let body = br#"{"duration_seconds": 4, "resolution": "4k"}"#;
    let head = format!(
        "POST /v1/images/../vid%65os?x=1 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE_KEY}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let answer = raw_exchange(&gw.url, head.as_bytes(), body, false).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("x-credits-operation: video.generate\r\n"),
        "{answer}"
    );
    let received = gw.backend.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].path, "/v1/videos?x=1");
    assert_eq!(received[0].body, body);
    assert_eq!(gw.settled("alice").await.charged, credits("32"));
}
