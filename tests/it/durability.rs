//! The sqlite store across restarts and crashes of `creditgate run`: what the
//! gateway acknowledged is in the file afterwards, whatever killed it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use creditgate::ledger::{Credits, Millis};
use creditgate::policy::Policy;
use creditgate::store::local::LocalStore;
use creditgate::store::{sqlite, GrantRequest, Store};
use rand::Rng;
use serde_json::{json, Value};

use crate::harness::{eventually, TempFile};
use crate::replicas::{
    assert_invariant, mock, start_gateway, start_gateway_in, Gateway, ADMIN_TOKEN,
};

/// One seeded account, "shared" (key "sk-shared", no credits); an operation
/// costing 3. The store is the default kind, on the file `store`.
fn policy(store: &Path, backend: &str, hold_ttl: &str) -> String {
    format!(
        r#"version = 1
[gateway]
listen = "127.0.0.1:{{PORT}}"
admin_listen = "127.0.0.1:{{ADMIN_PORT}}"
hold_ttl = "{hold_ttl}"
shutdown_grace = "1s"
[store]
path = "{store}"
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
keys = [ {{ member = "m", key_env = "SHARED_KEY" }} ]
"#,
        store = store.display()
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn admin(g: &Gateway, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    client()
        .request(method, format!("{}{path}", g.admin_url))
        .bearer_auth(ADMIN_TOKEN)
}

async fn top_up(
    g: &Gateway,
    account: &str,
    idempotency_key: &str,
    credits: u32,
) -> reqwest::Result<reqwest::Response> {
    admin(
        g,
        reqwest::Method::POST,
        &format!("/admin/accounts/{account}/grants"),
    )
    .json(&json!({"kind": "topup", "credits": credits, "idempotency_key": idempotency_key}))
    .send()
    .await
}

async fn balance(url: &str, key: &str) -> Value {
    client()
        .get(format!("{url}/credits/v1/balance"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// SIGTERM, then waits for the process to exit.
fn terminate(mut g: Gateway) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &g.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(g.child.wait().unwrap().success(), "a clean stop exits 0");
}

/// The issue as it was measured: a paid top-up, a restart, a charge, a restart.
/// Both are there, and the top-up's idempotency key is not granted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_and_a_charge_survive_restarts_of_creditgate_run() {
    let file = TempFile::new("credits.db");
    let backend = mock().await;
    let text = policy(file.path(), &format!("http://{}", backend.addr), "10m");

    let g = start_gateway(&text);
    let paid = top_up(&g, "shared", "payment-1", 50).await.unwrap();
    assert_eq!(paid.status(), 201);
    terminate(g);

    let g = start_gateway(&text);
    assert_eq!(balance(&g.url, "sk-shared").await["available"], json!(50));
    let charged = client()
        .post(format!("{}/v1/images", g.url))
        .bearer_auth("sk-shared")
        .send()
        .await
        .unwrap();
    assert_eq!(charged.status(), 200);
    let url = g.url.clone();
    eventually(|| {
        let url = url.clone();
        async move { balance(&url, "sk-shared").await["held"] == json!(0) }
    })
    .await;
    // A clean stop writes the settle, queued after the answer, before it exits.
    terminate(g);

    let g = start_gateway(&text);
    let again = top_up(&g, "shared", "payment-1", 50).await.unwrap();
    assert_eq!(again.status(), 200, "the same payment is not granted twice");
    assert_eq!(
        again.json::<Value>().await.unwrap()["created"],
        json!(false)
    );
    drop(g); // SIGKILL: the repeated grant changed nothing

    let g = start_gateway(&text);
    let b = balance(&g.url, "sk-shared").await;
    assert_eq!(
        (&b["available"], &b["held"]),
        (&json!(47), &json!(0)),
        "{b}"
    );
    let ledger: Value = admin(&g, reqwest::Method::GET, "/admin/accounts/shared/ledger")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let lines: Vec<(String, String)> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["type"].as_str().unwrap().into(), e["credits"].to_string()))
        .collect();
    for line in [("grant", "50"), ("hold", "3"), ("settle", "3")] {
        assert!(
            lines.contains(&(line.0.into(), line.1.into())),
            "{line:?} is not in {lines:?}"
        );
    }
    terminate(g);
}

/// A policy with no `[store]` gets the durable default: `creditgate.db` beside the
/// policy file. (On the memory store this top-up was gone after the restart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_section_a_top_up_survives_a_restart() {
    let folder = TempFile::new("policy.toml");
    let backend = mock().await;
    let text = policy(
        Path::new("unused"),
        &format!("http://{}", backend.addr),
        "10m",
    )
    .replace("[store]\npath = \"unused\"\n", "");
    assert!(!text.contains("[store]"));
    let dir = folder.path().parent().unwrap();
    let g = start_gateway_in(&text, dir);
    let paid = top_up(&g, "shared", "payment-1", 50).await.unwrap();
    assert_eq!(paid.status(), 201);
    terminate(g);
    assert!(dir.join("creditgate.db").exists());
    let g = start_gateway_in(&text, dir);
    assert_eq!(balance(&g.url, "sk-shared").await["available"], json!(50));
    terminate(g);
}

/// What the clients of one run were told.
#[derive(Default)]
struct Acknowledged {
    /// (account, idempotency key, credits): top-ups answered 201 or 200.
    grants: Vec<(String, String, u32)>,
    /// (account, request id): priced requests answered 2xx.
    served: Vec<(String, String)>,
}

/// A client of one account: top-ups through the admin API and priced requests,
/// until `stop`.
async fn load(
    g: Arc<(String, String)>,
    account: String,
    key: String,
    tag: String,
    stop: Arc<AtomicBool>,
) -> Acknowledged {
    let (url, admin_url) = (&g.0, &g.1);
    let client = client();
    let mut seen = Acknowledged::default();
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        if n % 4 == 1 {
            let idempotency_key = format!("{tag}-{n}");
            let answer = client
                .post(format!("{admin_url}/admin/accounts/{account}/grants"))
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({"kind": "topup", "credits": 9, "idempotency_key": idempotency_key}))
                .send()
                .await;
            match answer {
                Ok(a) if a.status() == 201 || a.status() == 200 => {
                    seen.grants.push((account.clone(), idempotency_key, 9))
                }
                Ok(a) => panic!("a top-up answered {}", a.status()),
                // Killed: the connection broke or was refused.
                Err(_) => {}
            }
        } else {
            let answer = client
                .post(format!("{url}/v1/images"))
                .bearer_auth(&key)
                .send()
                .await;
            if let Ok(a) = answer {
                if a.status().is_success() {
                    let id = a.headers()["x-request-id"].to_str().unwrap().to_string();
                    // The body too: a 2xx is what the client read whole.
                    if a.bytes().await.is_ok() {
                        seen.served.push((account.clone(), id));
                    }
                }
            }
        }
    }
    seen
}

/// Opens the file as the next gateway would, with the policy's plans.
fn reopen(file: &Path, text: &str) -> LocalStore {
    let text = text.replace("{PORT}", "1").replace("{ADMIN_PORT}", "2");
    let env = |name: &str| (name == "SHARED_KEY").then(|| "sk-shared".to_string());
    let policy = Policy::parse(&text, "crash.toml", &env).unwrap();
    sqlite::open(
        file,
        Duration::from_millis(2),
        policy.catalog(),
        policy.limits(),
    )
    .unwrap()
}

/// How many ledger entries of each type the file has for one request.
fn entries_of(file: &Path, account: &str, request_id: &str) -> BTreeMap<String, i64> {
    let db =
        rusqlite::Connection::open_with_flags(file, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut q = db
        .prepare(
            "SELECT type, count(*) FROM ledger WHERE account = ?1 AND request_id = ?2 GROUP BY type",
        )
        .unwrap();
    q.query_map([account, request_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

/// The sum of one type of ledger entries of an account, in the file.
fn ledger_sum(file: &Path, account: &str, kind: &str) -> Credits {
    let db =
        rusqlite::Connection::open_with_flags(file, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let sum: i64 = db
        .query_row(
            "SELECT coalesce(sum(credits), 0) FROM ledger WHERE account = ?1 AND type = ?2",
            [account, kind],
            |r| r.get(0),
        )
        .unwrap();
    Credits::from_millicredits(sum as u64)
}

fn now_ms() -> Millis {
    creditgate::clock::Clock::system().now_ms()
}

/// Checks, after a kill, everything the clients were told against the file;
/// returns how many served requests still had their hold open.
async fn check(
    file: &Path,
    text: &str,
    accounts: &[String],
    seen: &Acknowledged,
    at: Millis,
) -> usize {
    let store = reopen(file, text);
    store.check_invariants().unwrap();
    for (account, idempotency_key, credits) in &seen.grants {
        let request = GrantRequest {
            idempotency_key: idempotency_key.clone(),
            kind: "topup".into(),
            credits: Credits::from_whole((*credits).into()).unwrap(),
            priority: 30,
            expires_at_ms: None,
        };
        let (receipt, created) = store.grant(account, &request, at).await.unwrap().unwrap();
        assert!(
            !created,
            "the acknowledged top-up {idempotency_key} is missing"
        );
        assert_eq!(receipt.credits, request.credits);
    }
    let mut open = 0;
    for (account, request_id) in &seen.served {
        let holds = store.holds(Some(account), 10_000, at).await.unwrap();
        let held = holds.iter().any(|(_, h)| &h.request_id == request_id);
        let types = entries_of(file, account, request_id);
        let count = |t: &str| types.get(t).copied().unwrap_or(0);
        assert_eq!(count("hold"), 1, "request {request_id}: {types:?}");
        assert_eq!(count("release"), 0, "request {request_id}: {types:?}");
        // Settled exactly once, or (killed between the answer and the settle)
        // still held, or already expired by its TTL.
        let settled = count("settle") == 1 && count("expire") == 0 && !held;
        let pending = count("settle") == 0 && (held || count("expire") == 1);
        assert!(
            settled || pending,
            "request {request_id}: {types:?}, held {held}"
        );
        open += usize::from(held);
    }
    // The state and the ledger in the file agree, account by account.
    for account in accounts {
        let totals = store.totals(account, at).await.unwrap();
        assert_invariant(&totals);
        assert_eq!(
            totals.granted,
            ledger_sum(file, account, "grant"),
            "{account}"
        );
        assert_eq!(
            totals.charged,
            ledger_sum(file, account, "settle"),
            "{account}"
        );
    }
    open
}

/// A child `creditgate run` on a sqlite file, under load from several clients,
/// killed with SIGKILL at a random moment, again and again; after each kill the
/// file has everything any client was told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_with_sigkill_under_load_it_loses_nothing_it_acknowledged() {
    const ROUNDS: usize = 24;
    let file = TempFile::new("crash.db");
    let backend = mock().await;
    let text = policy(file.path(), &format!("http://{}", backend.addr), "1s");
    // Accounts and keys made through the admin API, so they too must survive.
    let mut clients = vec![("shared".to_string(), "sk-shared".to_string())];
    let g = start_gateway(&text);
    for id in ["c1", "c2", "c3"] {
        let created = admin(&g, reqwest::Method::POST, "/admin/accounts")
            .json(&json!({"id": id, "plan": "free"}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        let member = admin(
            &g,
            reqwest::Method::POST,
            &format!("/admin/accounts/{id}/members"),
        )
        .json(&json!({"member": "m"}))
        .send()
        .await
        .unwrap();
        assert_eq!(member.status(), 201);
        let key: Value = admin(
            &g,
            reqwest::Method::POST,
            &format!("/admin/accounts/{id}/keys"),
        )
        .json(&json!({"member": "m"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        clients.push((id.to_string(), key["key"].as_str().unwrap().to_string()));
    }
    drop(g);
    let accounts: Vec<String> = clients.iter().map(|(a, _)| a.clone()).collect();
    let mut all = Acknowledged::default();
    let mut open_after_kills = 0;
    let mut rng = rand::thread_rng();
    for round in 0..ROUNDS {
        let mut g = start_gateway(&text);
        let urls = Arc::new((g.url.clone(), g.admin_url.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, (account, key))| {
                tokio::spawn(load(
                    urls.clone(),
                    account.clone(),
                    key.clone(),
                    format!("r{round}-c{i}"),
                    stop.clone(),
                ))
            })
            .collect();
        // The kill point: a random moment of the load, not a synchronisation.
        let kill_after = Duration::from_millis(rng.gen_range(20..400));
        tokio::time::sleep(kill_after).await;
        g.child.kill().unwrap();
        g.child.wait().unwrap();
        stop.store(true, Ordering::SeqCst);
        for task in tasks {
            let seen = task.await.unwrap();
            all.grants.extend(seen.grants);
            all.served.extend(seen.served);
        }
        drop(g);
        open_after_kills += check(file.path(), &text, &accounts, &all, now_ms()).await;
    }
    assert!(
        all.served.len() >= ROUNDS && all.grants.len() >= ROUNDS,
        "the load did something: {} served, {} top-ups",
        all.served.len(),
        all.grants.len()
    );
    // A hold_ttl later every hold the kills left open has expired, charging nothing.
    let later = now_ms() + 1_001;
    let still_open = check(file.path(), &text, &accounts, &all, later).await;
    println!(
        "{ROUNDS} kills: {} requests answered 2xx, {} top-ups acknowledged, {open_after_kills} holds found open after a kill",
        all.served.len(),
        all.grants.len()
    );
    assert_eq!(still_open, 0, "every hold left open by a kill expired");
}

/// A file that can no longer be written (here: its ledger table is gone) fails
/// the commit: the waiting request and every later call answer 503, and the
/// gateway says it is not ready — nothing is answered from memory the file lacks.
#[tokio::test]
async fn a_failed_commit_answers_503_from_then_on_and_readyz_says_not_ready() {
    let file = TempFile::new("broken.db");
    let text = crate::harness::POLICY
        .replace("{CREDITS}", "30")
        .replace("{READ_TIMEOUT}", "2s");
    let g = crate::harness::start_policy_on_sqlite(|_| text, file.path()).await;
    let ok = g.post("/v1/images").send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let ready = g
        .client
        .get(format!("{}/readyz", g.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    let other = rusqlite::Connection::open(file.path()).unwrap();
    other.execute_batch("DROP TABLE ledger").unwrap();
    let failed = g.post("/v1/images").send().await.unwrap();
    assert_eq!(failed.status(), 503);
    let body: Value = failed.json().await.unwrap();
    assert_eq!(body["error"]["type"], "store_unavailable", "{body}");
    let balance = g.get("/credits/v1/balance").send().await.unwrap();
    assert_eq!(
        balance.status(),
        503,
        "reads too: memory may be ahead of the file"
    );
    let ready = g
        .client
        .get(format!("{}/readyz", g.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(
        g.backend.received().len(),
        1,
        "nothing forwarded after the failure"
    );
}

/// The resident memory of a process, in KiB (Linux).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// An export of 100,000 ledger entries from a spawned `creditgate run` is read
/// back whole, in time order, while the process's memory grows by a small part
/// of what it sent (it streams a page at a time); `since` resumes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_of_100000_entries_streams_in_bounded_memory_and_resumes_by_since() {
    const ENTRIES: usize = 100_000;
    let file = TempFile::new("export.db");
    let backend = mock().await;
    let text = policy(file.path(), &format!("http://{}", backend.addr), "10m");
    terminate(start_gateway(&text));
    {
        let mut db = rusqlite::Connection::open(file.path()).unwrap();
        let tx = db.transaction().unwrap();
        {
            let mut put = tx
                .prepare(
                    "INSERT INTO ledger (account, seq, at_ms, type, credits, operation, request_id, member, key_id, balance_after)
                     VALUES (?1, ?2, ?3, 'settle', 3000, 'image.generate', ?4, 'ann', 'key_0123456789abcdef', ?5)",
                )
                .unwrap();
            let t0: i64 = 1_767_225_600_000;
            for n in 0..ENTRIES {
                let account = format!("acct-{:03}", n % 100);
                put.execute(rusqlite::params![
                    account,
                    (n / 100 + 1) as i64,
                    t0 + (n as i64) * 7,
                    format!("{n:032x}"),
                    (ENTRIES - n) as i64 * 1000,
                ])
                .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let g = start_gateway(&text);
    let pid = g.child.id();
    // Warm up the admin API and the store once before measuring.
    let first = admin(
        &g,
        reqwest::Method::GET,
        "/admin/ledger/export?since=2099-01-01T00:00:00Z",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(first.status(), 200);
    let before = rss_kib(pid);
    // No client timeout: a debug build takes a while over 100,000 entries.
    let started = std::time::Instant::now();
    let mut resp = reqwest::Client::new()
        .get(format!("{}/admin/ledger/export?format=ndjson", g.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let (mut bytes, mut lines, mut peak) = (0usize, 0usize, before);
    let mut partial = Vec::new();
    // The RSS once a tenth is read: the first pages cost a fixed amount (the
    // store's caches, a checkpoint of the rows this test wrote), whatever follows.
    let mut settled_rss = None;
    let mut last_at = String::new();
    let mut middle_at = String::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        bytes += chunk.len();
        partial.extend_from_slice(&chunk);
        while let Some(end) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=end).collect();
            let entry: Value = serde_json::from_slice(&line).unwrap();
            let at = entry["at"].as_str().unwrap().to_string();
            assert!(at >= last_at, "time order");
            last_at = at;
            // The seeded account's own entry is in the export too.
            if entry["account"].as_str().unwrap().starts_with("acct-") {
                lines += 1;
            }
            if lines == ENTRIES / 2 {
                middle_at = last_at.clone();
            }
        }
        if lines >= ENTRIES / 10 && settled_rss.is_none() {
            settled_rss = Some(rss_kib(pid));
        }
        if lines % 10_000 < 100 {
            peak = peak.max(rss_kib(pid));
        }
    }
    peak = peak.max(rss_kib(pid));
    assert_eq!(lines, ENTRIES, "every entry, once");
    let settled = settled_rss.unwrap();
    let grown = peak.saturating_sub(settled);
    eprintln!(
        "export: {ENTRIES} entries, {} KiB sent in {:?}; RSS {before} KiB before, {settled} KiB after a tenth, peak {peak} KiB",
        bytes / 1024,
        started.elapsed()
    );
    // Nine tenths of the export (over 20 MiB) move through the process while
    // its memory stays near where the first pages put it: a process that kept
    // the export would grow by more than those nine tenths. (The margin is wide:
    // RSS on a shared machine moves by megabytes — allocator and SQLite caches —
    // and a tighter bound failed now and then under the full suite's load.)
    assert!(
        (grown as usize) < bytes / 1024 / 2,
        "memory grew by {grown} KiB over the last nine tenths of an export of {} KiB",
        bytes / 1024
    );
    // Resumed from the middle: the second half (entries at that second and later).
    let resumed = reqwest::Client::new()
        .get(format!(
            "{}/admin/ledger/export?format=csv&since={middle_at}",
            g.admin_url
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let rows = resumed.lines().count() - 1;
    assert!(
        (ENTRIES / 2..ENTRIES / 2 + 200).contains(&rows),
        "{rows} rows from {middle_at}"
    );
    terminate(g);
}
