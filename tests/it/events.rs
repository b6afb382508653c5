//! Events out (webhooks) and payments in (Stripe), end to end: a local receiver
//! in the test records what the gateway posts; Stripe events are built here and
//! signed as Stripe documents it (checked with Stripe's own Python library when
//! it can be installed).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use reqwest::Method;
use serde_json::{json, Value};

use creditgate::gateway::stripe::{signature, verify};

use crate::harness::*;

const SECRET: &str = "whsec_test_secret";

/// One delivery the receiver saw: its signature header and body.
#[derive(Clone, Debug)]
struct Delivery {
    signature: String,
    body: String,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// A webhook receiver: records every delivery, answers 500 to the first
/// `refuse` of them, 200 after.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Delivery>>>,
    refuse: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start(refuse: usize) -> Receiver {
        let got = Arc::new(Mutex::new(Vec::new()));
        let refuse = Arc::new(AtomicUsize::new(refuse));
        let (g, r) = (got.clone(), refuse.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let (got, refuse) = (g.clone(), r.clone());
                async move {
                    let signature = headers
                        .get("creditgate-signature")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    got.lock().unwrap().push(Delivery { signature, body });
                    let refused = refuse
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if refused {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, got, refuse }
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize) -> Vec<Delivery> {
        let got = self.got.clone();
        eventually(move || {
            let got = got.clone();
            async move { got.lock().unwrap().len() >= n }
        })
        .await;
        self.deliveries()
    }
}

/// One account, "acme" (Alice's key), with `credits`; an operation costing 1;
/// events to `receiver` as `events` says; Stripe prices.
fn policy(backend: &str, credits: u32, receiver: &str, events: &str) -> String {
    format!(
        r#"version = 1
[gateway]
max_holds_per_account = 1000
[upstreams.main]
url = "{backend}"
[plans.free]
monthly_credits = 0
[plans.creator]
monthly_credits = 1000
[[operations]]
name = "op"
method = "POST"
path = "/v1/op"
upstream = "main"
price = 1
[[accounts]]
id = "acme"
plan = "free"
grants = [ {{ kind = "topup", credits = {credits} }} ]
keys = [ {{ member = "alice", key_env = "ALICE_KEY" }} ]
[events]
low_balance = [150, 50]
retry_base = "20ms"
[[events.webhooks]]
url = "{receiver}"
secret = "{SECRET}"
events = {events}
[payments.stripe]
webhook_secret = "{SECRET}"
[payments.stripe.prices]
price_topup_500 = {{ grant = "topup", credits = 500 }}
price_creator = {{ plan = "creator" }}
"#
    )
}

async fn metric(gw: &TestGateway, name: &str) -> u64 {
    let text = gw
        .admin(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in the metrics"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_requests_crossing_a_threshold_send_one_balance_low() {
    let receiver = Receiver::start(0).await;
    let url = receiver.url.clone();
    let gw = start_policy(
        |backend| policy(backend, 300, &url, r#"["balance.low", "balance.depleted"]"#),
        |_| None,
    )
    .await;
    let mut requests = Vec::new();
    for _ in 0..200 {
        let request = gw.post("/v1/op").json(&json!({})).send();
        requests.push(tokio::spawn(request));
    }
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
    // 300 → 100: through 150 once, not through 50, not depleted.
    assert_eq!(gw.settled("acme").await.available, credits("100"));
    let store = gw.store.clone();
    eventually(move || {
        let store = store.clone();
        async move {
            use creditgate::store::Store;
            store.pending_events(10).await.unwrap().1 == 0
        }
    })
    .await;
    let got = receiver.deliveries();
    assert_eq!(got.len(), 1, "{got:?}");
    let event = got[0].json();
    assert_eq!(event["type"], "balance.low");
    assert_eq!(event["account"], "acme");
    assert_eq!(event["data"]["threshold"], json!(150));
    assert_eq!(metric(&gw, "creditgate_events_delivered_total").await, 1);
    assert_eq!(metric(&gw, "creditgate_events_pending").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_is_retried_with_the_same_id_and_a_valid_signature() {
    let receiver = Receiver::start(3).await;
    let url = receiver.url.clone();
    let gw = start_policy(
        |backend| policy(backend, 300, &url, r#"["grant.created"]"#),
        |_| None,
    )
    .await;
    let granted = gw
        .admin(Method::POST, "/admin/accounts/acme/grants")
        .json(&json!({"kind": "bonus", "credits": 7, "idempotency_key": "g1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(granted.status(), 201);
    let got = receiver.wait_for(4).await;
    let first = got[0].json();
    assert_eq!(first["type"], "grant.created");
    assert_eq!(first["data"]["credits"], json!(7));
    assert_eq!(first["data"]["kind"], "bonus");
    for delivery in &got {
        assert_eq!(
            delivery.json()["id"],
            first["id"],
            "the same id on every retry"
        );
        assert_eq!(delivery.body, got[0].body, "the same body on every retry");
        let t: u64 = delivery.signature[2..delivery.signature.find(',').unwrap()]
            .parse()
            .unwrap();
        assert_eq!(
            verify(
                SECRET,
                Some(&delivery.signature),
                delivery.body.as_bytes(),
                t
            ),
            Ok(())
        );
    }
    let gw_ref = &gw;
    eventually(
        move || async move { metric(gw_ref, "creditgate_events_delivered_total").await == 1 },
    )
    .await;
    assert_eq!(
        metric(&gw, "creditgate_event_attempts_failed_total").await,
        3
    );
    assert_eq!(receiver.refuse.load(Ordering::SeqCst), 0);
    // Delivered: not sent again.
    assert_eq!(receiver.deliveries().len(), 4);
}

/// A Stripe event's `Stripe-Signature` at `t`.
fn stripe_header(t: u64, payload: &str) -> String {
    format!(
        "t={t},v1={}",
        hex::encode(signature(SECRET.as_bytes(), t, payload.as_bytes()))
    )
}

fn checkout(id: &str, payment_intent: &str) -> String {
    json!({
        "id": id,
        "object": "event",
        "type": "checkout.session.completed",
        "data": {"object": {
            "id": format!("cs_{id}"),
            "object": "checkout.session",
            "payment_status": "paid",
            "payment_intent": payment_intent,
            "metadata": {"creditgate_account": "acme", "creditgate_price": "price_topup_500"}
        }}
    })
    .to_string()
}

async fn to_stripe_endpoint(gw: &TestGateway, payload: &str, header: &str) -> reqwest::Response {
    gw.client
        .post(format!("{}/webhooks/stripe", gw.url))
        .header("stripe-signature", header)
        .header("content-type", "application/json")
        .body(payload.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_checkouts_grant_once_bad_signatures_change_nothing_invoices_move_the_plan() {
    let receiver = Receiver::start(0).await;
    let url = receiver.url.clone();
    let gw = start_policy(
        |backend| policy(backend, 0, &url, r#"["grant.created", "plan.changed"]"#),
        |_| None,
    )
    .await;
    let t = gw.now_ms() / 1_000;
    let paid = checkout("evt_checkout_1", "pi_1");
    let header = stripe_header(t, &paid);

    // Unverifiable: each a 400 that changes nothing.
    let tampered = paid.replace("500", "5000");
    let old = stripe_header(t - 301, &paid);
    let other_secret = format!(
        "t={t},v1={}",
        hex::encode(signature(b"whsec_other", t, paid.as_bytes()))
    );
    for (payload, header) in [
        (paid.as_str(), other_secret.as_str()),
        (paid.as_str(), old.as_str()),
        (tampered.as_str(), header.as_str()),
        (paid.as_str(), "t=1,v1="),
    ] {
        let resp = to_stripe_endpoint(&gw, payload, header).await;
        assert_eq!(resp.status(), 400, "{header}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request");
    }
    assert_eq!(gw.totals("acme").await.granted, credits("0"));

    // Delivered three times (Stripe retries): granted once.
    for _ in 0..3 {
        let resp = to_stripe_endpoint(&gw, &paid, &header).await;
        assert_eq!(resp.status(), 200);
    }
    // Another event for the same payment intent: still once.
    let again = checkout("evt_checkout_2", "pi_1");
    let resp = to_stripe_endpoint(&gw, &again, &stripe_header(t, &again)).await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["effect"], "already_granted");
    assert_eq!(gw.totals("acme").await.available, credits("500"));
    let ledger: Value = gw
        .admin(Method::GET, "/admin/accounts/acme/ledger")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stripe_entries: Vec<&Value> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["request_id"] == "evt_checkout_1")
        .collect();
    assert_eq!(stripe_entries.len(), 1, "{ledger}");
    assert_eq!(stripe_entries[0]["credits"], json!(500));

    // An unknown type: 200, ignored.
    let unknown =
        json!({"id": "evt_x", "type": "customer.created", "data": {"object": {}}}).to_string();
    let resp = to_stripe_endpoint(&gw, &unknown, &stripe_header(t, &unknown)).await;
    assert_eq!(resp.status(), 200);

    // invoice.paid with the subscription's metadata and a plan's price: the plan, now.
    let invoice = json!({
        "id": "evt_invoice_1",
        "type": "invoice.paid",
        "data": {"object": {
            "object": "invoice",
            "subscription_details": {"metadata": {"creditgate_account": "acme"}},
            "lines": {"data": [{"price": {"id": "price_creator"}}]}
        }}
    })
    .to_string();
    let resp = to_stripe_endpoint(&gw, &invoice, &stripe_header(t, &invoice)).await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["effect"], "plan_changed");
    let resp = to_stripe_endpoint(&gw, &invoice, &stripe_header(t, &invoice)).await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["effect"], "plan_kept",
        "a renewal keeps the plan as it is"
    );
    let account: Value = gw
        .admin(Method::GET, "/admin/accounts/acme")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(account["plan"], "creator", "{account}");
    assert_eq!(gw.totals("acme").await.available, credits("1500"));

    // The events of both: one grant.created, one plan.changed, with the Stripe ids
    // (the sender delivers concurrently: in either order).
    let mut got = receiver.wait_for(2).await;
    got.sort_by_key(|d| d.json()["type"].as_str().unwrap_or_default().to_string());
    let kinds: Vec<Value> = got.iter().map(|d| d.json()["type"].clone()).collect();
    assert_eq!(kinds, vec![json!("grant.created"), json!("plan.changed")]);
    assert_eq!(got[0].json()["data"]["reference"], "evt_checkout_1");
    assert_eq!(got[1].json()["data"]["reference"], "evt_invoice_1");

    // Stripe's own library agrees with the signatures the gateway accepted and
    // refused, and with creditgate's own webhook signature.
    if let Some(python) = python_with_stripe() {
        let cases = [
            (paid.clone(), header.clone(), "ok"),
            (tampered.clone(), header.clone(), "refused"),
            (paid.clone(), old.clone(), "refused"),
            (paid.clone(), other_secret.clone(), "refused"),
        ];
        let mut input = String::new();
        for (payload, header, _) in &cases {
            input.push_str(
                &json!({"secret": SECRET, "header": header, "payload": payload}).to_string(),
            );
            input.push('\n');
        }
        // Stripe's tolerance is against the real clock: the test's is the real one too.
        let own = &got[0];
        input.push_str(
            &json!({"secret": SECRET, "header": own.signature, "payload": own.body}).to_string(),
        );
        input.push('\n');
        let verdicts = run_python(&python, &input);
        let expected: Vec<&str> = cases.iter().map(|c| c.2).chain(["ok"]).collect();
        assert_eq!(verdicts.len(), expected.len(), "{verdicts:?}");
        for (verdict, expected) in verdicts.iter().zip(expected) {
            assert!(
                verdict.starts_with(expected),
                "{verdict} (expected {expected})"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_reaching_its_monthly_limit_sends_one_member_limit_reached() {
    let receiver = Receiver::start(0).await;
    let url = receiver.url.clone();
    let gw = start_policy(
        |backend| policy(backend, 300, &url, r#"["member_limit.reached"]"#),
        |_| None,
    )
    .await;
    let limited = gw
        .admin(Method::PATCH, "/admin/accounts/acme/members/alice")
        .json(&json!({"monthly_limit": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), 200, "{}", limited.text().await.unwrap());
    // Three requests of 1 reach the limit; the fourth is refused.
    for _ in 0..3 {
        let resp = gw.post("/v1/op").json(&json!({})).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let refused = gw.post("/v1/op").json(&json!({})).send().await.unwrap();
    assert_eq!(refused.status(), 402);
    let got = receiver.wait_for(1).await;
    let event = got[0].json();
    assert_eq!(event["type"], "member_limit.reached");
    assert_eq!(event["account"], "acme");
    assert_eq!(
        event["data"],
        json!({"member": "alice", "limit": 3, "used": 3})
    );
    let store = gw.store.clone();
    eventually(move || {
        let store = store.clone();
        async move {
            use creditgate::store::Store;
            store.pending_events(10).await.unwrap().1 == 0
        }
    })
    .await;
    assert_eq!(receiver.deliveries().len(), 1, "once");
}

/// Stripe's `charge.refunded` for a charge of `amount` of which `amount_refunded`
/// is refunded so far, its payment intent's metadata naming the account.
fn charge_refunded(id: &str, payment_intent: &str, amount: u64, amount_refunded: u64) -> String {
    json!({
        "id": id,
        "object": "event",
        "type": "charge.refunded",
        "data": {"object": {
            "id": format!("ch_{payment_intent}"),
            "object": "charge",
            "payment_intent": payment_intent,
            "amount": amount,
            "amount_refunded": amount_refunded,
            "refunded": amount_refunded == amount,
            "metadata": {"creditgate_account": "acme"}
        }}
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_refunds_debit_the_paid_grant_in_proportion_once_per_amount() {
    let receiver = Receiver::start(0).await;
    let url = receiver.url.clone();
    let gw = start_policy(
        |backend| policy(backend, 0, &url, r#"["grant.created"]"#),
        |_| None,
    )
    .await;
    let t = gw.now_ms() / 1_000;
    let send = |payload: String| {
        let gw = &gw;
        async move {
            let resp = to_stripe_endpoint(gw, &payload, &stripe_header(t, &payload)).await;
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }
    };
    // Two paid top-ups of 500 credits (20.00 each).
    send(checkout("evt_checkout_1", "pi_1")).await;
    send(checkout("evt_checkout_2", "pi_2")).await;
    assert_eq!(gw.totals("acme").await.available, credits("1000"));

    // pi_1 refunded in full: its 500 credits, once however often it is delivered.
    let full = charge_refunded("evt_refund_1", "pi_1", 2000, 2000);
    let body = send(full.clone()).await;
    assert_eq!(body["effect"], "refunded", "{body}");
    assert_eq!(body["credits"], json!(500));
    for _ in 0..2 {
        assert_eq!(send(full.clone()).await["effect"], "already_refunded");
    }
    assert_eq!(gw.totals("acme").await.available, credits("500"));

    // pi_2 refunded 5.00 of 20.00, then the rest: 125, then 375.
    let body = send(charge_refunded("evt_refund_2", "pi_2", 2000, 500)).await;
    assert_eq!(body["credits"], json!(125), "{body}");
    assert_eq!(gw.totals("acme").await.available, credits("375"));
    let body = send(charge_refunded("evt_refund_3", "pi_2", 2000, 2000)).await;
    assert_eq!(body["credits"], json!(375), "{body}");
    // The partial one delivered late changes nothing.
    let body = send(charge_refunded("evt_refund_2", "pi_2", 2000, 500)).await;
    assert_eq!(body["effect"], "already_refunded");
    let totals = gw.totals("acme").await;
    assert_eq!(totals.available, credits("0"));
    assert_eq!(totals.granted, credits("1000"));
    assert_eq!(totals.charged, credits("1000"));

    // A payment creditgate did not grant, an account it does not have, a charge
    // without creditgate's metadata: 200, ignored, nothing changed.
    let unknown = charge_refunded("evt_refund_4", "pi_unknown", 2000, 2000);
    let body = send(unknown.clone()).await;
    assert!(body["ignored"].is_string(), "{body}");
    let elsewhere = unknown.replace("\"acme\"", "\"nobody\"");
    assert!(send(elsewhere).await["ignored"].is_string());
    let bare = unknown.replace("creditgate_account", "other");
    assert!(send(bare).await["ignored"].is_string());
    assert_eq!(gw.totals("acme").await.charged, credits("1000"));

    // Each debit is an adjust entry with its Stripe event id.
    let ledger: Value = gw
        .admin(Method::GET, "/admin/accounts/acme/ledger")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let refunds: Vec<(Value, Value)> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "adjust")
        .map(|e| (e["request_id"].clone(), e["credits"].clone()))
        .collect();
    assert_eq!(
        refunds,
        vec![
            (json!("evt_refund_3"), json!(-375)),
            (json!("evt_refund_2"), json!(-125)),
            (json!("evt_refund_1"), json!(-500)),
        ],
        "{ledger}"
    );
}

fn run_python(python: &Path, input: &str) -> Vec<String> {
    use std::io::Write;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stripe/verify.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A Python with Stripe's library: a venv under the build's temporary folder,
/// made and filled (`pip install stripe`) on first use; `None`, said on stderr,
/// when that cannot be done here (no Python, no network).
fn python_with_stripe() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("stripe-venv");
    let python = venv.join("bin").join("python3");
    let has_stripe = |python: &Path| {
        Command::new(python)
            .args(["-c", "import stripe"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has_stripe(&python) {
        return Some(python);
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .is_ok_and(|o| o.status.success());
    let installed = made
        && Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "stripe",
            ])
            .output()
            .is_ok_and(|o| o.status.success());
    if installed && has_stripe(&python) {
        Some(python)
    } else {
        eprintln!("stripe's Python library could not be installed: its cross-check is skipped");
        None
    }
}

/// `creditgate run` on the sqlite store in `dir`, its events to `receiver`.
fn run_policy(dir: &Path, receiver: &str) -> String {
    format!(
        r#"version = 1
[gateway]
listen = "127.0.0.1:{{PORT}}"
admin_listen = "127.0.0.1:{{ADMIN_PORT}}"
shutdown_grace = "1s"
[store]
path = "{store}"
[upstreams.main]
url = "http://127.0.0.1:9"
[plans.free]
monthly_credits = 0
[[operations]]
name = "op"
path = "/v1/op"
upstream = "main"
price = 1
[[accounts]]
id = "shared"
plan = "free"
keys = [ {{ member = "m", key_env = "SHARED_KEY" }} ]
[events]
retry_base = "20ms"
[[events.webhooks]]
url = "{receiver}"
secret = "{SECRET}"
"#,
        store = dir.join("events.db").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_pending_when_the_gateway_stops_is_delivered_after_the_restart() {
    use crate::replicas::{start_gateway_in, ADMIN_TOKEN};
    let receiver = Receiver::start(usize::MAX).await;
    let dir = std::env::temp_dir().join(format!("creditgate-events-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = run_policy(&dir, &receiver.url);
    let g = start_gateway_in(&text, &dir);
    let granted = reqwest::Client::new()
        .post(format!("{}/admin/accounts/shared/grants", g.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"kind": "topup", "credits": 5, "idempotency_key": "p1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(granted.status(), 201);
    // Refused at least once: it is pending when the gateway stops.
    let refused = receiver.wait_for(1).await[0].json();
    let stopped = Command::new("kill")
        .args(["-TERM", &g.child.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let mut g = g;
    assert!(g.child.wait().unwrap().success());
    drop(g);

    receiver.refuse.store(0, Ordering::SeqCst);
    let before = receiver.deliveries().len();
    let _g = start_gateway_in(&text, &dir);
    let got = receiver.wait_for(before + 1).await;
    let delivered = got.last().unwrap().json();
    assert_eq!(delivered["id"], refused["id"]);
    assert_eq!(delivered["type"], "grant.created");
    assert_eq!(delivered["data"]["credits"], json!(5));
    let _ = std::fs::remove_dir_all(&dir);
}
