//! Redis outages under load: a paused Redis answers every request within twice the
//! store's deadline and leaves no delivered answer uncharged; a Redis restarted
//! empty is an outage, never a new deployment.

use std::time::{Duration, Instant};

use crate::harness::eventually;
use crate::redis_server::RedisServer;
use crate::replicas::{assert_invariant, mock, policy, raw_account, start_gateway};

/// The Redis store's deadline for one call (`CALL_TIMEOUT`).
const STORE_TIMEOUT: Duration = Duration::from_millis(250);

/// Clients sending to the one hot account at once.
const CLIENTS: usize = 50;

/// One answered request: its status (0: no answer) and how long it took.
struct Answer {
    status: u16,
    took: Duration,
    at: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_answers_every_request_of_a_hot_account_within_twice_the_store_timeout() {
    let redis = RedisServer::start_unsynced();
    let backend = mock().await;
    // Holds outlive the pause (8 s > 3 s): what ends them is their settle, retried.
    let text = policy(
        &redis.url(),
        &format!("http://{}", backend.addr),
        1_000_000,
        "8s",
        "reject",
    );
    let gw = start_gateway(&text);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();
    let url = format!("{}/v1/images", gw.url);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let started = Instant::now();
                    let status = client
                        .post(&url)
                        .bearer_auth("sk-shared")
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    answers.push(Answer {
                        at: started,
                        status,
                        took: started.elapsed(),
                    });
                    // Paced, so that 50 clients do not starve a 2-core machine.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let paused = Instant::now();
    redis.pause();
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.resume();
    let resumed = Instant::now();
    // Until the gateway serves again after the pause.
    let served_again = async {
        loop {
            let ok = client
                .post(&url)
                .bearer_auth("sk-shared")
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), served_again)
        .await
        .expect("the gateway serves again once Redis goes on");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answers = Vec::new();
    for task in load {
        answers.extend(task.await.unwrap());
    }
    let unavailable = answers.iter().filter(|a| a.status == 503).count();
    let served = answers.iter().filter(|a| a.status == 200).count() as u64 + 1;
    assert!(
        unavailable >= CLIENTS,
        "the pause is answered 503: {unavailable} 503s"
    );
    assert!(
        answers.iter().all(|a| [200, 503].contains(&a.status)),
        "only 200 and 503: {:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    // A correctness bound (the contract's), not a benchmark: nothing waits out
    // its account's queue of deadlines.
    // Every request sent while Redis is paused is answered within twice the store
    // timeout: none waits out its account's queue of deadlines. Those sent in its
    // last 2 × timeout are left out: they may be served after it, at the hot
    // account's throughput on this busy machine (benches/ measure that), as may
    // those sent just before it.
    let last = resumed - 2 * STORE_TIMEOUT;
    let during: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.at >= paused && a.at <= last)
        .collect();
    assert!(
        during.len() >= CLIENTS,
        "{} requests met the pause",
        during.len()
    );
    let slowest = during.iter().map(|a| a.took).max().unwrap();
    assert!(
        slowest < 2 * STORE_TIMEOUT,
        "every request answered within twice the store timeout; the slowest took {slowest:?}"
    );

    // Every delivered 200 is charged, exactly once: the settles the pause held up
    // were written from the retry queue, not left to expire free.
    let url = redis.url();
    eventually(|| {
        let url = url.clone();
        async move { raw_account(&url, "shared").await.holds().count() == 0 }
    })
    .await;
    let t = raw_account(&redis.url(), "shared").await.totals();
    assert_invariant(&t);
    assert_eq!(backend.received().len() as u64, served, "200s = forwarded");
    assert_eq!(
        t.charged.millicredits(),
        served * 3_000,
        "every delivered 200 charged its 3 credits: {t:?}"
    );
}

/// The gateway's `/readyz` status.
async fn readyz(admin_url: &str) -> u16 {
    reqwest::get(format!("{admin_url}/readyz"))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// What the gateway's `/readyz` says when it is not ready.
async fn readyz_says(admin_url: &str) -> String {
    let Ok(resp) = reqwest::get(format!("{admin_url}/readyz")).await else {
        return String::new();
    };
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    assert_ne!(body["error"]["type"], "shutting_down");
    body["error"]["message"].as_str().unwrap_or("").to_string()
}

/// Whether Redis has any key of account `id`.
fn account_exists(redis: &RedisServer, id: &str) -> bool {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "exists"])
        .arg(format!("cg:{{acct:{id}}}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() != "0"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_is_an_outage_and_no_account_is_created_on_it() {
    let mut redis = RedisServer::start();
    let backend = mock().await;
    let text = policy(
        &redis.url(),
        &format!("http://{}", backend.addr),
        1_000,
        "60s",
        "allow",
    )
    .replace(
        "[gateway]\n",
        "[gateway]\nadmin_listen = \"127.0.0.1:{ADMIN_PORT}\"\n",
    );
    let gw = start_gateway(&text);
    let client = reqwest::Client::new();
    let send = || {
        client
            .post(format!("{}/v1/images", gw.url))
            .bearer_auth("sk-shared")
            .send()
    };
    assert_eq!(send().await.unwrap().status(), 200);
    // (A call slower than the deadline on a busy machine fails the store fast
    // for a moment: ready again at the next probe.)
    eventually(|| async { readyz(&gw.admin_url).await == 200 }).await;
    assert!(account_exists(&redis, "shared"));

    redis.restart_empty();
    // Down first (the connection broke), then lost once it answers without the marker.
    eventually(|| async { readyz_says(&gw.admin_url).await.contains("lost its data") }).await;
    // The account's requests: answered as an outage (forwarded unmetered under
    // on_unavailable = "allow"), never as an unknown key, and nothing written.
    for _ in 0..5 {
        let resp = send().await.unwrap();
        assert_eq!(resp.status(), 200, "forwarded unmetered");
    }
    // A reload seeds nothing on it either.
    let reload = reqwest::Client::new()
        .post(format!("{}/admin/policy/reload", gw.admin_url))
        .bearer_auth(crate::replicas::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_ne!(
        reload.status(),
        200,
        "a reload cannot seed a Redis that lost its data"
    );
    assert!(!account_exists(&redis, "shared"), "no account re-created");
    assert_eq!(readyz(&gw.admin_url).await, 503);

    // A process started on it now takes it for a new deployment (it says so
    // loudly) and marks it; the one that saw the data go stays an outage.
    let fresh = start_gateway(&text);
    eventually(|| async { readyz(&fresh.admin_url).await == 200 }).await;
    assert!(account_exists(&redis, "shared"));
    assert_eq!(readyz(&gw.admin_url).await, 503);
}
