#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed assumption should fail loudly
//! Core benches: the work metering adds to each request, without IO.
//! `cargo bench --bench core`. The whole-proxy load bench comes with BENCHMARKS.md.

use std::sync::Arc;

use creditgate::ledger::{Account, Catalog, Credits, HoldRequest, Limits, PlanTerms};
use creditgate::policy::{normalize_path, Policy, RequestFacts};
use creditgate::store::local::LocalStore;
use creditgate::store::redis::RedisStore;
use creditgate::store::Store;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, Method};

#[path = "support.rs"]
mod support;

/// A policy with `n` operations on distinct paths, half of them parameterised.
fn policy_with(n: usize) -> Policy {
    let mut text = String::from("version = 1\n[upstreams.main]\nurl = \"http://127.0.0.1:9\"\n[plans.free]\nmonthly_credits = 10\n");
    for i in 0..n {
        let path = if i % 2 == 0 {
            format!("/v1/op{i}/generate")
        } else {
            format!("/v1/op{i}/{{id}}/edit")
        };
        text.push_str(&format!("[[operations]]\nname = \"op{i}\"\nmethod = \"POST\"\npath = \"{path}\"\nupstream = \"main\"\nprice = 1.5\n"));
    }
    Policy::parse(&text, "bench.toml", &|_| None).expect("bench policy is valid")
}

fn request() -> HoldRequest {
    HoldRequest {
        operation: "op".into(),
        request_id: "r".into(),
        amount: Credits::from_millicredits(1_500),
        ttl_ms: 600_000,
        max_holds: 1_024,
        quota: None,
        idempotency: None,
        caller: None,
        terms: creditgate::ledger::HoldTerms::default(),
    }
}

fn benches(c: &mut Criterion) {
    let policy = policy_with(200);
    let headers = HeaderMap::new();
    let path = normalize_path(b"/v1/op151/abc/edit").expect("a normal path");
    c.bench_function("match + price, 200-operation policy", |b| {
        b.iter(|| {
            let route = policy.route(std::hint::black_box(&path)).unwrap();
            let facts = RequestFacts {
                method: &Method::POST,
                headers: &headers,
                query: None,
                path_params: &route.path_params,
                body: None,
                body_bytes: None,
            };
            let index = policy.select(&route, &facts).unwrap();
            policy.operations[index].price.hold_amount(&facts).unwrap()
        })
    });

    let mut account = Account::new("a", "free");
    account
        .grant(
            "topup",
            Credits::from_whole(1_000_000_000).unwrap(),
            30,
            None,
            0,
        )
        .unwrap();
    let req = request();
    c.bench_function("ledger hold + settle", |b| {
        b.iter(|| {
            let placed = account.hold(&req, 1, &Catalog::new()).unwrap();
            let ended = account
                .settle(placed.hold_id, req.amount, 1, &Limits::default())
                .unwrap();
            // A store takes the ledger entries after every call.
            account.take_entries();
            ended
        })
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let plan = PlanTerms {
        monthly_credits: Credits::from_whole(1_000_000_000).unwrap(),
        seats: 1,
        ..PlanTerms::default()
    };
    let store = Arc::new(LocalStore::new(
        Arc::new(Catalog::from([("free".to_string(), plan)])),
        Limits::default(),
    ));
    let seed = creditgate::policy::SeedAccount {
        id: "a".into(),
        plan: "free".into(),
        billing_anchor_day: None,
        grants: vec![],
        keys: vec![],
    };
    runtime.block_on(store.seed(&seed, 0)).unwrap();
    c.bench_function("memory store hold + settle", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let placed = store.hold("a", &req, 1).await.unwrap().unwrap();
                store
                    .settle("a", placed.hold_id, req.amount, None, 1)
                    .await
                    .unwrap()
                    .unwrap()
            })
        })
    });
}

/// What the gateway does with a body it read to price: parse the JSON, match,
/// price from a field near the end.
fn body_pricing(c: &mut Criterion) {
    let text = r#"version = 1
[upstreams.main]
url = "http://127.0.0.1:9"
[plans.free]
monthly_credits = 10
[[operations]]
name = "video"
method = "POST"
path = "/v1/videos"
when = { "body:/kind" = "video" }
upstream = "main"
[operations.price]
credits = { from = "body:/model", table = { "veo" = 32, "ltx" = 15 }, default = 18 }
per = { from = "body:/duration_seconds", min = 1, max = 60 }
multiplier = { from = "body:/resolution", table = { "720p" = 1, "4k" = 4 }, default = 1 }
"#;
    let policy = Policy::parse(text, "bench.toml", &|_| None).expect("bench policy is valid");
    let headers = HeaderMap::new();
    let videos = normalize_path(b"/v1/videos").expect("a normal path");
    for (label, size) in [("1 KiB", 1usize << 10), ("1 MiB", 1 << 20)] {
        let body = format!(
            r#"{{"prompt":"{}","kind":"video","model":"veo","resolution":"4k","duration_seconds":8}}"#,
            "p".repeat(size.saturating_sub(96))
        );
        c.bench_function(&format!("JSON body pricing, {label}"), |b| {
            b.iter(|| {
                let json: Result<serde_json::Value, String> =
                    serde_json::from_slice(std::hint::black_box(body.as_bytes()))
                        .map_err(|e| e.to_string());
                let route = policy.route(&videos).unwrap();
                let facts = RequestFacts {
                    method: &Method::POST,
                    headers: &headers,
                    query: None,
                    path_params: &route.path_params,
                    body: Some(&json),
                    body_bytes: None,
                };
                let index = policy.select(&route, &facts).unwrap();
                policy.operations[index].price.hold_amount(&facts).unwrap()
            })
        });
    }
}

/// Hold + settle through Redis: two round trips to a `redis-server` the bench starts.
fn redis_store(c: &mut Criterion) {
    let redis = support::Redis::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let plan = PlanTerms {
        monthly_credits: Credits::from_whole(1_000_000_000).unwrap(),
        seats: 1,
        ..PlanTerms::default()
    };
    let store = runtime
        .block_on(RedisStore::connect(
            &redis.url(),
            false,
            Arc::new(Catalog::from([("free".to_string(), plan)])),
            Limits::default(),
        ))
        .expect("redis store");
    let seed = creditgate::policy::SeedAccount {
        id: "a".into(),
        plan: "free".into(),
        billing_anchor_day: None,
        grants: vec![],
        keys: vec![],
    };
    runtime.block_on(store.seed(&seed, 0)).unwrap();
    let req = request();
    c.bench_function("redis store hold + settle", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let placed = store.hold("a", &req, 1).await.unwrap().unwrap();
                store
                    .settle("a", placed.hold_id, req.amount, None, 1)
                    .await
                    .unwrap()
                    .unwrap()
            })
        })
    });
}

criterion_group!(core, benches, body_pricing, redis_store);
criterion_main!(core);
