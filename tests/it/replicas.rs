//! Many gateway replicas, one Redis: no overspend, outages, dead replicas.

use std::process::{Child, Command};
use std::time::Duration;

use creditgate::demo::mock::MockBackend;
use creditgate::ledger::{Account, Totals};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::harness::{eventually, header};
use crate::redis_server::RedisServer;

/// A `creditgate run` child process; killed (SIGKILL) when dropped.
pub(crate) struct Gateway {
    pub(crate) child: Child,
    pub(crate) url: String,
    /// The admin API, when the policy has `admin_listen = "127.0.0.1:{ADMIN_PORT}"`.
    pub(crate) admin_url: String,
    /// The policy file it runs (and `POST /admin/policy/reload` reads).
    file: std::path::PathBuf,
}

pub(crate) const ADMIN_TOKEN: &str = "replica-admin-token";

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A policy for replicas sharing `redis_url`: one account, "shared", that holds
/// `credits`; an operation costing 3.
pub(crate) fn policy(
    redis_url: &str,
    backend: &str,
    credits: u32,
    hold_ttl: &str,
    on_unavailable: &str,
) -> String {
    format!(
        r#"version = 1
[gateway]
listen = "127.0.0.1:{{PORT}}"
hold_ttl = "{hold_ttl}"
[store]
kind = "redis"
url = "{redis_url}"
on_unavailable = "{on_unavailable}"
[upstreams.main]
url = "{backend}"
read_timeout = "30s"
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
grants = [ {{ kind = "topup", credits = {credits} }} ]
keys = [ {{ member = "m", key_env = "SHARED_KEY" }} ]
"#
    )
}

/// Starts `creditgate run` on a free port with `policy` (its `{PORT}` and
/// `{ADMIN_PORT}` filled in). Its key for `key_env = "SHARED_KEY"` is "sk-shared".
pub(crate) fn start_gateway(policy: &str) -> Gateway {
    let dir = std::env::temp_dir().join(format!(
        "creditgate-replica-{}-{}",
        std::process::id(),
        free_port()
    ));
    start_gateway_in(policy, &dir)
}

/// `start_gateway` with the policy file (`policy.toml`) in `dir`, where a store
/// path relative to it points.
pub(crate) fn start_gateway_in(policy: &str, dir: &std::path::Path) -> Gateway {
    let (port, admin_port) = (free_port(), free_port());
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("policy.toml");
    let with_admin = policy.contains("{ADMIN_PORT}");
    let text = policy
        .replace("{PORT}", &port.to_string())
        .replace("{ADMIN_PORT}", &admin_port.to_string());
    std::fs::write(&file, text).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["run", "--policy"])
        .arg(&file)
        .env("SHARED_KEY", "sk-shared")
        .env("CREDITGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let gateway = Gateway {
        child,
        url: format!("http://127.0.0.1:{port}"),
        admin_url: format!("http://127.0.0.1:{admin_port}"),
        file,
    };
    let listening = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    for _ in 0..600 {
        if listening(port) && (!with_admin || listening(admin_port)) {
            return gateway;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("creditgate run did not listen on {port}");
}

/// The account as Redis has it, read raw — without the lazy expiry a store read applies.
pub(crate) async fn raw_account(redis_url: &str, id: &str) -> Account {
    let client = redis::Client::open(redis_url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let state: Vec<u8> = redis::cmd("HGET")
        .arg(format!("cg:{{acct:{id}}}"))
        .arg("s")
        .query_async(&mut conn)
        .await
        .unwrap();
    creditgate::store::redis::decode_state(&state).unwrap()
}

pub(crate) fn assert_invariant(t: &Totals) {
    let sum = [t.available, t.held, t.charged, t.expired]
        .into_iter()
        .try_fold(creditgate::ledger::Credits::ZERO, |a, b| a.checked_add(b))
        .unwrap();
    assert_eq!(t.granted, sum, "{t:?}");
}

pub(crate) async fn mock() -> MockBackend {
    MockBackend::start(TcpListener::bind("127.0.0.1:0").await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_redis_charge_exactly_what_the_account_can_pay() {
    let redis = RedisServer::start();
    let backend = mock().await;
    let text = policy(
        &redis.url(),
        &format!("http://{}", backend.addr),
        300,
        "10m",
        "reject",
    );
    let (a, b) = (start_gateway(&text), start_gateway(&text));
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..400 {
        let url = format!("{}/v1/images", if i % 2 == 0 { &a.url } else { &b.url });
        let request = client
            .post(url)
            .bearer_auth("sk-shared")
            .header("x-mock-delay-ms", "20");
        // A 503 (a call that timed out under this burst, on a busy machine, fails
        // the store fast for a moment) is retried, as its Retry-After asks.
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                let status = request.try_clone().unwrap().send().await?.status().as_u16();
                if status != 503 {
                    return Ok(status);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok::<u16, reqwest::Error>(503)
        }));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for task in tasks {
        *statuses.entry(task.await.unwrap().unwrap()).or_insert(0) += 1;
    }
    assert_eq!(
        statuses,
        std::collections::BTreeMap::from([(200, 100), (402, 300)])
    );
    assert_eq!(
        backend.received().len(),
        100,
        "exactly the paid requests were forwarded"
    );
    let url = redis.url();
    eventually(|| {
        let url = url.clone();
        async move { raw_account(&url, "shared").await.holds().count() == 0 }
    })
    .await;
    let t = raw_account(&redis.url(), "shared").await.totals();
    assert_eq!(
        (t.available.to_string(), t.charged.to_string()),
        ("0".into(), "300".into())
    );
    assert_invariant(&t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_answers_503_and_the_gateway_recovers_without_a_restart() {
    let mut redis = RedisServer::start();
    let backend = mock().await;
    let text = policy(
        &redis.url(),
        &format!("http://{}", backend.addr),
        1000,
        "2s",
        "reject",
    );
    let gw = start_gateway(&text);
    let client = reqwest::Client::new();
    let send = || {
        client
            .post(format!("{}/v1/images", gw.url))
            .bearer_auth("sk-shared")
            .header("x-mock-delay-ms", "5")
            .send()
    };
    for _ in 0..20 {
        assert_eq!(send().await.unwrap().status(), 200);
    }
    // Load continues while Redis dies.
    let load = {
        let client = client.clone();
        let url = format!("{}/v1/images", gw.url);
        tokio::spawn(async move {
            let mut seen = Vec::new();
            // Until the outage has answered a few times.
            while seen.iter().filter(|s| **s == 503).count() < 5 && seen.len() < 200 {
                let status = client
                    .post(&url)
                    .bearer_auth("sk-shared")
                    .header("x-mock-delay-ms", "20")
                    .send()
                    .await
                    .map(|r| r.status().as_u16());
                seen.push(status.unwrap_or(0));
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    let resp = send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, "content-type"), "application/json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "store_unavailable");
    let seen = load.await.unwrap();
    assert!(
        seen.iter().all(|s| [200, 503].contains(s)),
        "only 200 and 503 during the outage, no crash: {seen:?}"
    );
    assert!(seen.contains(&503));

    redis.restart();
    let recovered = async {
        loop {
            if send().await.map(|r| r.status().as_u16()).ok() == Some(200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), recovered)
        .await
        .expect("the gateway recovers by itself once Redis is back");
    // Holds whose settle failed during the outage expire after hold_ttl (2 s): none leaks.
    let url = redis.url();
    eventually(|| {
        let url = url.clone();
        async move { raw_account(&url, "shared").await.holds().count() == 0 }
    })
    .await;
    let t = raw_account(&redis.url(), "shared").await.totals();
    assert_invariant(&t);
    let charged_requests = t.charged.millicredits() / 3_000;
    let served = backend.received().len() as u64;
    assert!(charged_requests <= served, "never more charged than served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_request_has_its_hold_released_by_the_other_replica() {
    let redis = RedisServer::start();
    let backend = mock().await;
    let text = policy(
        &redis.url(),
        &format!("http://{}", backend.addr),
        30,
        "2s",
        "reject",
    );
    let mut doomed = start_gateway(&text);
    let survivor = start_gateway(&text);
    let client = reqwest::Client::new();
    let slow = client
        .post(format!("{}/v1/images", doomed.url))
        .bearer_auth("sk-shared")
        .header("x-mock-delay-ms", "20000")
        .send();
    let in_flight = tokio::spawn(slow);
    let url = redis.url();
    eventually(|| {
        let url = url.clone();
        async move { raw_account(&url, "shared").await.holds().count() == 1 }
    })
    .await;
    doomed.child.kill().unwrap(); // SIGKILL: no logging phase, no drop guard
    doomed.child.wait().unwrap();
    assert!(
        in_flight.await.unwrap().is_err(),
        "the client saw its gateway die"
    );
    // Nobody touches the account: only the survivor's sweep can release the hold.
    eventually(|| {
        let url = url.clone();
        async move { raw_account(&url, "shared").await.holds().count() == 0 }
    })
    .await;
    let t = raw_account(&redis.url(), "shared").await.totals();
    assert_eq!(
        (t.available.to_string(), t.charged.to_string()),
        ("30".into(), "0".into())
    );
    assert_invariant(&t);
    let resp = client
        .post(format!("{}/v1/images", survivor.url))
        .bearer_auth("sk-shared")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&resp, "x-credits-remaining"), "27");
}

fn signal(gateway: &Gateway, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &gateway.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_policy_file() {
    let redis = RedisServer::start();
    let backend = mock().await;
    let text = policy(
        &redis.url(),
        &format!("http://{}", backend.addr),
        1000,
        "10m",
        "reject",
    );
    let gw = start_gateway(&text);
    let client = reqwest::Client::new();
    let held = || async {
        let resp = client
            .post(format!("{}/v1/images", gw.url))
            .bearer_auth("sk-shared")
            .send()
            .await
            .unwrap();
        header(&resp, "x-credits-held").to_string()
    };
    assert_eq!(held().await, "3");
    let file = gw.file.clone();
    let current = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, current.replace("price = 3", "price = 7")).unwrap();
    signal(&gw, "HUP");
    let mut seen = String::new();
    for _ in 0..100 {
        seen = held().await;
        if seen == "7" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, "7", "SIGHUP reloaded the file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_and_leaves_no_hold_open() {
    let redis = RedisServer::start();
    let backend = mock().await;
    let text = policy(
        &redis.url(),
        &format!("http://{}", backend.addr),
        30,
        "10m",
        "reject",
    )
    .replace(
        "hold_ttl = \"10m\"",
        "hold_ttl = \"10m\"\nshutdown_grace = \"3s\"",
    );
    let mut gw = start_gateway(&text);
    let client = reqwest::Client::new();
    let slow = client
        .post(format!("{}/v1/images", gw.url))
        .bearer_auth("sk-shared")
        .header("x-mock-delay-ms", "1000")
        .send();
    let in_flight = tokio::spawn(slow);
    let url = redis.url();
    eventually(|| {
        let url = url.clone();
        async move { raw_account(&url, "shared").await.holds().count() == 1 }
    })
    .await;
    signal(&gw, "TERM");
    let resp = in_flight
        .await
        .unwrap()
        .expect("the in-flight request finishes");
    assert_eq!(resp.status(), 200);
    let exited = tokio::task::spawn_blocking(move || {
        for _ in 0..200 {
            if let Ok(Some(status)) = gw.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    })
    .await
    .unwrap();
    assert!(exited.is_some(), "the gateway exits after its grace period");
    let account = raw_account(&redis.url(), "shared").await;
    assert_eq!(
        account.holds().count(),
        0,
        "no hold is left open after SIGTERM"
    );
    let t = account.totals();
    assert_eq!(
        (t.charged.to_string(), t.available.to_string()),
        ("3".into(), "27".into())
    );
    assert_invariant(&t);
}

/// Replicas with an admin API, no seeded account: `pro` has the `premium` feature
/// (two seats), `free` has none (but credits enough); `image.generate` costs 3,
/// `image.premium` 5.
fn standing_policy(redis_url: &str, backend: &str) -> String {
    format!(
        r#"version = 1
[gateway]
listen = "127.0.0.1:{{PORT}}"
admin_listen = "127.0.0.1:{{ADMIN_PORT}}"
[store]
kind = "redis"
url = "{redis_url}"
[upstreams.main]
url = "{backend}"
read_timeout = "30s"
[plans.free]
monthly_credits = 50
[plans.pro]
monthly_credits = 100
features = ["premium"]
seats = 2
[plans.none]
monthly_credits = 0
[[operations]]
name = "image.generate"
method = "POST"
path = "/v1/images"
upstream = "main"
price = 3
[[operations]]
name = "image.premium"
method = "POST"
path = "/v1/premium"
upstream = "main"
requires = ["premium"]
price = 5
"#
    )
}

/// An admin call: its status and JSON body.
async fn admin(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", gw.admin_url))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let resp = request.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Creates `account` on `plan` with `member` through `gw`'s admin API: `(key, key_id)`.
async fn open_account(gw: &Gateway, account: &str, plan: &str, member: &str) -> (String, String) {
    use reqwest::Method;
    let (status, _) = admin(
        gw,
        Method::POST,
        "/admin/accounts",
        Some(serde_json::json!({"id": account, "plan": plan})),
    )
    .await;
    assert_eq!(status, 201);
    let path = format!("/admin/accounts/{account}/members");
    let (status, _) = admin(
        gw,
        Method::POST,
        &path,
        Some(serde_json::json!({"member": member})),
    )
    .await;
    assert_eq!(status, 201);
    let path = format!("/admin/accounts/{account}/keys");
    let (status, key) = admin(
        gw,
        Method::POST,
        &path,
        Some(serde_json::json!({"member": member})),
    )
    .await;
    assert_eq!(status, 201);
    (
        key["key"].as_str().unwrap().to_string(),
        key["key_id"].as_str().unwrap().to_string(),
    )
}

/// A proxied POST with `key`: its status and JSON body (`Null` when not JSON).
async fn call(gw: &Gateway, path: &str, key: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", gw.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Waits until `account` has no open hold in Redis; returns its totals then.
async fn settled(redis_url: &str, account: &str) -> Totals {
    eventually(|| async { raw_account(redis_url, account).await.holds().count() == 0 }).await;
    raw_account(redis_url, account).await.totals()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_through_one_replica_is_refused_at_once_by_another_that_cached_it() {
    let redis = RedisServer::start();
    let backend = mock().await;
    let text = standing_policy(&redis.url(), &format!("http://{}", backend.addr));
    let (a, b) = (start_gateway(&text), start_gateway(&text));
    let (key, key_id) = open_account(&a, "acct", "pro", "m").await;
    // B serves the key once: it has the key's owner and the account cached now.
    assert_eq!(call(&b, "/v1/images", &key).await.0, 200);
    let before = settled(&redis.url(), "acct").await;
    assert_eq!(before.charged.to_string(), "3");

    let path = format!("/admin/keys/{key_id}");
    assert_eq!(admin(&a, reqwest::Method::DELETE, &path, None).await.0, 200);
    let (status, body) = call(&b, "/v1/images", &key).await;
    assert_eq!(
        (status, body["error"]["type"].clone()),
        (401, Value::from("invalid_api_key")),
        "{body}"
    );
    let account = raw_account(&redis.url(), "acct").await;
    assert_eq!(account.holds().count(), 0, "nothing held");
    assert_eq!(account.totals(), before, "nothing charged");
    assert_eq!(backend.received().len(), 1, "nothing forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_or_premium_switched_off_through_one_replica_binds_another_at_once() {
    use reqwest::Method;
    let redis = RedisServer::start();
    let backend = mock().await;
    let text = standing_policy(&redis.url(), &format!("http://{}", backend.addr));
    let (a, b) = (start_gateway(&text), start_gateway(&text));
    let (downgraded, _) = open_account(&a, "down", "pro", "m").await;
    let (switched, _) = open_account(&a, "team", "pro", "ann").await;
    // B serves both keys a premium operation: it has their standing cached now.
    assert_eq!(call(&b, "/v1/premium", &downgraded).await.0, 200);
    assert_eq!(call(&b, "/v1/premium", &switched).await.0, 200);
    settled(&redis.url(), "down").await;
    settled(&redis.url(), "team").await;

    let change = serde_json::json!({"plan": "free", "effective": "now"});
    let path = "/admin/accounts/down/plan";
    assert_eq!(admin(&a, Method::POST, path, Some(change)).await.0, 200);
    let before = raw_account(&redis.url(), "down").await.totals();
    let (status, body) = call(&b, "/v1/premium", &downgraded).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        (
            body["error"]["type"].clone(),
            body["error"]["feature"].clone(),
            body["error"]["plans"].clone()
        ),
        (
            Value::from("plan_required"),
            Value::from("premium"),
            serde_json::json!(["pro"])
        )
    );
    assert_eq!(
        raw_account(&redis.url(), "down").await.totals(),
        before,
        "nothing held or charged"
    );

    let switch = serde_json::json!({"premium_disabled": true});
    let path = "/admin/accounts/team/members/ann";
    assert_eq!(admin(&a, Method::PATCH, path, Some(switch)).await.0, 200);
    let before = raw_account(&redis.url(), "team").await.totals();
    let (status, body) = call(&b, "/v1/premium", &switched).await;
    assert_eq!(
        (status, body["error"]["type"].clone()),
        (403, Value::from("premium_disabled")),
        "{body}"
    );
    assert_eq!(
        raw_account(&redis.url(), "team").await.totals(),
        before,
        "nothing held or charged"
    );
    assert_eq!(
        backend.received().len(),
        2,
        "the refused requests were not forwarded"
    );
    assert_eq!(
        call(&b, "/v1/images", &switched).await.0,
        200,
        "what is not premium still passes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_through_one_replica_is_spendable_at_once_on_another_that_refused() {
    let redis = RedisServer::start();
    let backend = mock().await;
    let text = standing_policy(&redis.url(), &format!("http://{}", backend.addr));
    let (a, b) = (start_gateway(&text), start_gateway(&text));
    let (key, _) = open_account(&a, "poor", "none", "m").await;
    // B refuses the empty account: it has the account cached, with nothing to spend.
    let (status, body) = call(&b, "/v1/images", &key).await;
    assert_eq!(status, 402, "{body}");

    let grant = serde_json::json!({"kind": "topup", "credits": 10, "idempotency_key": "t1"});
    let path = "/admin/accounts/poor/grants";
    assert_eq!(
        admin(&a, reqwest::Method::POST, path, Some(grant)).await.0,
        201
    );
    // A refusal writes nothing, so no version check would catch B's stale copy:
    // B must look at Redis before it answers 402 again.
    let (status, body) = call(&b, "/v1/images", &key).await;
    assert_eq!(status, 200, "{body}");
    let totals = settled(&redis.url(), "poor").await;
    assert_eq!(
        (totals.charged.to_string(), totals.available.to_string()),
        ("3".to_string(), "7".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_key_deleted_stays_revoked_after_a_reload_and_a_restart() {
    use reqwest::Method;
    let redis = RedisServer::start();
    let backend = mock().await;
    let bob: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(b"sk-bob").into();
    let text = standing_policy(&redis.url(), &format!("http://{}", backend.addr))
        + "[[accounts]]\nid = \"acme\"\nplan = \"pro\"\n\
           keys = [ { member = \"m\", key_env = \"SHARED_KEY\" } ]\n";
    let a = start_gateway(&text);
    assert_eq!(call(&a, "/v1/images", "sk-shared").await.0, 200);
    // The account's second seat goes to a member added through the admin API.
    let carol = Some(serde_json::json!({"member": "carol"}));
    let path = "/admin/accounts/acme/members";
    assert_eq!(admin(&a, Method::POST, path, carol).await.0, 201);
    let shared: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(b"sk-shared").into();
    let path = format!("/admin/keys/{}", creditgate::ledger::seed_key_id(&shared));
    assert_eq!(admin(&a, Method::DELETE, &path, None).await.0, 200);
    assert_eq!(call(&a, "/v1/images", "sk-shared").await.0, 401);

    // The file now seeds bob as well: a third member, past the plan's two seats.
    let grow = |policy: &str| {
        let grown = policy.replace(
            "key_env = \"SHARED_KEY\" }",
            &format!(
                "key_env = \"SHARED_KEY\" }}, {{ member = \"bob\", key_sha256 = \"{}\" }}",
                hex::encode(bob)
            ),
        );
        assert_ne!(grown, policy);
        grown
    };
    let current = std::fs::read_to_string(&a.file).unwrap();
    std::fs::write(&a.file, grow(&current)).unwrap();
    let (status, body) = admin(&a, Method::POST, "/admin/policy/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let members = |view: Value| {
        let names: Vec<String> = view["members"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        names
    };
    // And a replica started afresh on the grown file seeds nothing either.
    let restarted = start_gateway(&grow(&text));
    for gw in [&a, &restarted] {
        let (status, body) = call(gw, "/v1/images", "sk-shared").await;
        assert_eq!(
            (status, body["error"]["type"].clone()),
            (401, Value::from("invalid_api_key")),
            "the deleted seeded key stays revoked"
        );
        assert_eq!(call(gw, "/v1/images", "sk-bob").await.0, 401);
        // Not even for what holds nothing: the key's record is gone for good.
        let balance = reqwest::Client::new()
            .get(format!("{}/credits/v1/balance", gw.url))
            .bearer_auth("sk-shared")
            .send()
            .await
            .unwrap();
        assert_eq!(balance.status(), 401);
        let (_, view) = admin(gw, Method::GET, "/admin/accounts/acme", None).await;
        assert_eq!(
            members(view),
            ["carol", "m"],
            "the account is left as it is"
        );
    }
}

/// What B's `POST /credits/v1/quote` says a POST to `path` with `key` gets: the
/// error type it names, or `allowed`. A quote answered `401` itself (the key no
/// longer authenticates on B at all) says the same as a quote naming the 401.
async fn quoted(gw: &Gateway, path: &str, key: &str) -> String {
    let resp = reqwest::Client::new()
        .post(format!("{}/credits/v1/quote", gw.url))
        .bearer_auth(key)
        .json(&serde_json::json!({"method": "POST", "path": path}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    match (status, body["allowed"].as_bool()) {
        (200, Some(true)) => "allowed".into(),
        (200, Some(false)) => body["error"]["type"].as_str().unwrap().into(),
        (401, None) => body["error"]["type"].as_str().unwrap().into(),
        _ => panic!("{status} {body}"),
    }
}

/// The quote once checked who asks on the replica's cached view of the key and
/// the account (up to 5 s old) while the hold checks Redis's state: after a key
/// revoked, a plan downgraded or premium switched off through replica A, replica
/// B quoted `allowed` for requests its hold refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quote_on_a_replica_that_cached_the_key_says_what_its_hold_says() {
    use reqwest::Method;
    let redis = RedisServer::start();
    let backend = mock().await;
    let text = standing_policy(&redis.url(), &format!("http://{}", backend.addr));
    let (a, b) = (start_gateway(&text), start_gateway(&text));
    let (revoked, key_id) = open_account(&a, "gone", "pro", "m").await;
    let (downgraded, _) = open_account(&a, "down", "pro", "m").await;
    let (switched, _) = open_account(&a, "team", "pro", "ann").await;
    // B serves each key: it has who they are, and their account's standing, cached.
    for key in [&revoked, &downgraded, &switched] {
        assert_eq!(quoted(&b, "/v1/premium", key).await, "allowed");
        assert_eq!(call(&b, "/v1/premium", key).await.0, 200);
    }

    let path = format!("/admin/keys/{key_id}");
    assert_eq!(admin(&a, Method::DELETE, &path, None).await.0, 200);
    let change = serde_json::json!({"plan": "free", "effective": "now"});
    let path = "/admin/accounts/down/plan";
    assert_eq!(admin(&a, Method::POST, path, Some(change)).await.0, 200);
    let switch = serde_json::json!({"premium_disabled": true});
    let path = "/admin/accounts/team/members/ann";
    assert_eq!(admin(&a, Method::PATCH, path, Some(switch)).await.0, 200);

    for (key, refusal) in [
        (&revoked, "invalid_api_key"),
        (&downgraded, "plan_required"),
        (&switched, "premium_disabled"),
    ] {
        assert_eq!(quoted(&b, "/v1/premium", key).await, refusal);
        let (_, body) = call(&b, "/v1/premium", key).await;
        assert_eq!(body["error"]["type"], refusal, "{body}");
    }
    assert_eq!(
        backend.received().len(),
        3,
        "the refused requests were not forwarded"
    );
}

/// §13 on Redis, across two replicas: an account onboarded in one call through
/// A serves its keys on B at once; 200 concurrent requests by a member whose
/// limit pays for 20, spread over both replicas, are served exactly 20 while a
/// teammate still can; a refund adjustment is in the ledger; a member removed
/// through A is refused on both replicas, though B cached its key; the export
/// lists the account's entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_onboarded_in_one_call_spends_within_member_limits_across_replicas() {
    use reqwest::Method;
    let redis = RedisServer::start();
    let backend = mock().await;
    let text = standing_policy(&redis.url(), &format!("http://{}", backend.addr));
    let (a, b) = (start_gateway(&text), start_gateway(&text));
    let (status, body) = admin(
        &a,
        Method::POST,
        "/admin/accounts",
        Some(serde_json::json!({
            "id": "crew",
            "plan": "pro",
            "members": [{"member": "ann", "monthly_limit": 60}, {"member": "bob"}],
            "keys": [{"member": "ann"}, {"member": "bob"}],
            "grants": [{"kind": "topup", "credits": 1000, "idempotency_key": "o-1"}]
        })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let key = |m: &str| {
        body["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["member"] == m)
            .unwrap()["key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (ann, bob) = (key("ann"), key("bob"));
    assert_eq!(
        call(&b, "/v1/images", &bob).await.0,
        200,
        "keys work at once"
    );

    let client = reqwest::Client::new();
    let calls = (0..200).map(|i| {
        let gw = if i % 2 == 0 { &a } else { &b };
        let request = client
            .post(format!("{}/v1/images", gw.url))
            .bearer_auth(&ann);
        // A 503 (a call that timed out under this burst, on a busy machine, fails
        // the store fast for a moment) is retried, as its Retry-After asks.
        async move {
            for _ in 0..100 {
                let status = request.try_clone().unwrap().send().await.unwrap().status();
                if status.as_u16() != 503 {
                    return status.as_u16();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            503
        }
    });
    let statuses = futures_util::future::join_all(calls).await;
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(served, 20, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 402));
    assert_eq!(
        call(&a, "/v1/images", &bob).await.0,
        200,
        "a teammate still can"
    );
    let totals = settled(&redis.url(), "crew").await;
    assert_eq!(totals.charged.to_string(), "66");
    assert_invariant(&totals);

    let refund = serde_json::json!({"credits": 6, "reason": "refund", "idempotency_key": "rf-1"});
    let path = "/admin/accounts/crew/adjustments";
    assert_eq!(
        admin(&b, Method::POST, path, Some(refund.clone())).await.0,
        201
    );
    assert_eq!(admin(&a, Method::POST, path, Some(refund)).await.0, 200);
    let (_, ledger) = admin(&a, Method::GET, "/admin/accounts/crew/ledger?limit=1", None).await;
    assert_eq!(ledger["entries"][0]["type"], "adjust");
    assert_eq!(ledger["entries"][0]["credits"], serde_json::json!(6));

    // B has bob's key cached; removing bob through A binds B at once.
    let path = "/admin/accounts/crew/members/bob";
    assert_eq!(admin(&a, Method::DELETE, path, None).await.0, 200);
    for gw in [&a, &b] {
        let (status, body) = call(gw, "/v1/images", &bob).await;
        assert_eq!(status, 401, "{body}");
    }
    let (_, keys) = admin(&b, Method::GET, "/admin/accounts/crew/keys", None).await;
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
    let (_, list) = admin(&b, Method::GET, "/admin/accounts", None).await;
    assert_eq!(list["accounts"][0]["account"], "crew");
    let export = client
        .get(format!("{}/admin/ledger/export", a.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let settles = export
        .lines()
        .filter(|l| l.contains("\"type\":\"settle\"") && l.contains("\"member\":\"ann\""))
        .count();
    assert_eq!(settles, 20);
}
