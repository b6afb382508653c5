#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed assumption should fail loudly
//! The whole proxy under load, in one run: a bare Pingora passthrough (the ceiling),
//! the gateway on the memory store, on Redis and on SQLite (the default, fsync on
//! every commit) — same backend, same accept loop, same load — then one table with
//! each gateway's ratio to the passthrough, and an exact check that credits were
//! conserved.
//!
//! `cargo bench --bench proxy` runs it fully (release). Run without `--bench` (as
//! `cargo test --benches` does) it is a smoke run of a few seconds: the same code,
//! tiny numbers, no timing judged — only the conservation check.
//!
//! Also measured: the latency a hold adds when 64 clients contend for one account,
//! memory per account in the memory store, the SQLite file's size per account and
//! per ledger entry and the time to reopen a large one, and the time to validate a
//! 1,000-operation policy. See BENCHMARKS.md.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use creditgate::clock::Clock;
use creditgate::demo::mock::MockBackend;
use creditgate::gateway::{serve, serve_proxy, Gateway};
use creditgate::ledger::{Credits, HoldRequest, Totals};
use creditgate::policy::Policy;
use creditgate::store::local::LocalStore;
use creditgate::store::redis::RedisStore;
use creditgate::store::{sqlite, Store};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[path = "support.rs"]
mod support;
use support::Redis;

/// The allocator the `creditgate` binary uses, for every variant alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PRICE: &str = "0.001";

/// Accounts in the bench policy: each load connection is a different user.
const ACCOUNTS: usize = 64;

fn key(i: usize) -> String {
    format!("sk-bench-{i:04}")
}

/// Load shape for one variant.
#[derive(Clone, Copy)]
struct Load {
    connections: usize,
    warmup: Duration,
    duration: Duration,
}

/// CPU time, in nanoseconds, used by each part of the system on the bench's two
/// cores: the proxy under test, the mock backend, the load generator, and the
/// store's own process or thread (`redis-server`, or the SQLite writer thread).
#[derive(Clone, Copy, Default)]
struct Cpu {
    proxy: u64,
    backend: u64,
    loader: u64,
    store: u64,
}

/// Thread-name prefixes of the bench's runtimes (Linux keeps 15 bytes of a name).
const PROXY_THREADS: &str = "cg-proxy";
const BACKEND_THREADS: &str = "cg-backend";
const LOADER_THREADS: &str = "cg-loader";
/// The sqlite store's writer thread (named by the store itself).
const WRITER_THREAD: &str = "sqlite-writer";

/// Nanoseconds on a CPU of the threads of process `pid` whose names start with
/// `prefix` (all threads when `None`), from the scheduler's own accounting
/// (`/proc/PID/task/TID/schedstat`, nanosecond resolution).
fn threads_cpu_ns(pid: u32, prefix: Option<&str>) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut total = 0;
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if prefix.is_some_and(|p| !name.starts_with(p)) {
            continue;
        }
        let schedstat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
        total += schedstat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

impl Cpu {
    fn now(redis_pid: Option<u32>) -> Cpu {
        let me = std::process::id();
        Cpu {
            proxy: threads_cpu_ns(me, Some(PROXY_THREADS)),
            backend: threads_cpu_ns(me, Some(BACKEND_THREADS)),
            loader: threads_cpu_ns(me, Some(LOADER_THREADS)),
            store: redis_pid.map_or(0, |pid| threads_cpu_ns(pid, None))
                + threads_cpu_ns(me, Some(WRITER_THREAD)),
        }
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            proxy: self.proxy.saturating_sub(before.proxy),
            backend: self.backend.saturating_sub(before.backend),
            loader: self.loader.saturating_sub(before.loader),
            store: self.store.saturating_sub(before.store),
        }
    }

    /// Microseconds per request of each part.
    fn per_request(self, requests: usize) -> [f64; 4] {
        let per = |ns: u64| ns as f64 / 1e3 / requests.max(1) as f64;
        [
            per(self.proxy),
            per(self.backend),
            per(self.loader),
            per(self.store),
        ]
    }
}

/// What one variant did under load.
struct Measured {
    name: &'static str,
    /// CPU microseconds per measured request: proxy, backend, loader, store.
    cpu_us: [f64; 4],
    /// Every 2xx answered, warm-up included: what must have been charged.
    ok: u64,
    other: u64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index] as f64
}

/// Drives `addr` with `load.connections` keep-alive connections, each sending the
/// next request as soon as the previous answer is read.
/// Connection `i` goes to `addrs[i % addrs.len()]` (two replicas take turns) as
/// the user of account `i % accounts` (1: every connection on one hot account).
async fn drive(
    name: &'static str,
    addrs: &[SocketAddr],
    accounts: usize,
    load: Load,
    redis_pid: Option<u32>,
) -> Measured {
    let recording = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for connection in 0..load.connections {
        let (recording, stop) = (recording.clone(), stop.clone());
        let authorization = format!("Bearer {}", key(connection % accounts.clamp(1, ACCOUNTS)));
        let addr = addrs[connection % addrs.len()];
        workers.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let (mut ok, mut other, mut latencies) = (0u64, 0u64, Vec::with_capacity(1 << 16));
            while !stop.load(Ordering::Relaxed) {
                let request = hyper::Request::post("/v1/generate")
                    .header("host", "bench")
                    .header("authorization", authorization.as_str())
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let started = Instant::now();
                let Ok(response) = sender.send_request(request).await else {
                    break;
                };
                let status = response.status();
                if response.into_body().collect().await.is_err() {
                    break;
                }
                if status.is_success() {
                    ok += 1;
                } else {
                    other += 1;
                }
                if recording.load(Ordering::Relaxed) {
                    latencies.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
            }
            (ok, other, latencies)
        }));
    }
    tokio::time::sleep(load.warmup).await;
    recording.store(true, Ordering::Relaxed);
    let cpu_before = Cpu::now(redis_pid);
    let started = Instant::now();
    tokio::time::sleep(load.duration).await;
    recording.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = Cpu::now(redis_pid).since(cpu_before);
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut other, mut all) = (0, 0, Vec::new());
    for worker in workers {
        let (o, x, l) = worker.await.expect("worker");
        ok += o;
        other += x;
        all.extend(l);
    }
    all.sort_unstable();
    Measured {
        name,
        cpu_us: cpu.per_request(all.len()),
        ok,
        other,
        rps: all.len() as f64 / elapsed,
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
        p999_us: percentile(&all, 0.999),
    }
}

/// A bare Pingora proxy: no key, no policy, no store — the ceiling.
struct Passthrough(HttpPeer);

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(self.0.clone()))
    }
}

fn policy(backend: SocketAddr, store: &str) -> Policy {
    let text = format!(
        r#"version = 1
[store]
{store}
[upstreams.main]
url = "http://{backend}"
[plans.bench]
monthly_credits = 0
[[operations]]
name = "generate"
method = "POST"
path = "/v1/generate"
upstream = "main"
price = {PRICE}
"#
    );
    let mut text = text;
    for i in 0..ACCOUNTS {
        text.push_str(&format!(
            "[[accounts]]\nid = \"bench-{i}\"\nplan = \"bench\"\ngrants = [ {{ kind = \"topup\", credits = 1000000000 }} ]\nkeys = [ {{ member = \"m\", key_env = \"BENCH_KEY_{i}\" }} ]\n"
        ));
    }
    let env = |name: &str| {
        name.strip_prefix("BENCH_KEY_")
            .and_then(|i| i.parse().ok())
            .map(key)
    };
    Policy::parse(&text, "bench.toml", &env).expect("bench policy")
}

/// A server running on the server runtime, on a port of its own.
struct Running {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Binds a port on the server runtime and starts `server` on it there.
fn start_variant<F, Fut>(servers: &tokio::runtime::Runtime, server: F) -> Running
where
    F: FnOnce(TcpListener, watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = servers
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, shutdown) = watch::channel(false);
    let task = servers.spawn(server(listener, shutdown));
    Running { addr, stop, task }
}

impl Running {
    fn stop(self, servers: &tokio::runtime::Runtime) {
        let _ = self.stop.send(true);
        let _ = servers.block_on(self.task);
    }
}

/// Rounds of one variant, merged: medians of the rounds' rates and percentiles.
fn merge(rounds: Vec<Measured>) -> Measured {
    let median = |f: fn(&Measured) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let cpu = |part: usize| {
        let mut v: Vec<f64> = rounds.iter().map(|m| m.cpu_us[part]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Measured {
        name: rounds[0].name,
        cpu_us: [cpu(0), cpu(1), cpu(2), cpu(3)],
        ok: rounds.iter().map(|m| m.ok).sum(),
        other: rounds.iter().map(|m| m.other).sum(),
        rps: median(|m| m.rps),
        p50_us: median(|m| m.p50_us),
        p99_us: median(|m| m.p99_us),
        p999_us: median(|m| m.p999_us),
    }
}

/// The totals of every bench account, added up.
async fn all_totals(store: &dyn Store) -> Totals {
    let mut sum = Totals::default();
    for i in 0..ACCOUNTS {
        let t = store
            .totals(&format!("bench-{i}"), 1)
            .await
            .expect("totals");
        let add = |a: Credits, b: Credits| a.checked_add(b).expect("sum");
        sum = Totals {
            granted: add(sum.granted, t.granted),
            available: add(sum.available, t.available),
            held: add(sum.held, t.held),
            debt: add(sum.debt, t.debt),
            charged: add(sum.charged, t.charged),
            expired: add(sum.expired, t.expired),
        };
    }
    sum
}

/// Every 2xx was charged the price exactly once; nothing is left held.
async fn check_conservation(name: &str, store: &dyn Store, before: Totals, served_ok: u64) {
    let mut totals = all_totals(store).await;
    for _ in 0..500 {
        if totals.held.is_zero() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        totals = all_totals(store).await;
    }
    let price: Credits = PRICE.parse().expect("price");
    let charged = totals
        .charged
        .checked_sub(before.charged)
        .expect("charged only grows");
    let sum = [
        totals.available,
        totals.held,
        totals.charged,
        totals.expired,
    ]
    .into_iter()
    .try_fold(Credits::ZERO, |a, b| a.checked_add(b))
    .expect("sum");
    let expected = Credits::from_millicredits(price.millicredits() * served_ok);
    println!(
        "conservation {name}: {served_ok} answers 2xx x {price} = {expected} expected, {charged} charged, {} held, invariant {}",
        totals.held,
        if totals.granted == sum { "intact" } else { "BROKEN" }
    );
    assert_eq!(
        charged, expected,
        "{name}: every 2xx charged once, nothing else"
    );
    assert!(
        totals.held.is_zero() && totals.granted == sum,
        "{name}: holds left or invariant broken"
    );
}

/// The latency of a hold on one account, alone and with 64 clients at once on it.
async fn contended_hold(store: Arc<dyn Store>, rounds: usize) -> (f64, f64, f64, f64) {
    let request = HoldRequest {
        operation: "generate".into(),
        request_id: "r".into(),
        amount: PRICE.parse().expect("price"),
        ttl_ms: 600_000,
        max_holds: 1_024,
        quota: None,
        idempotency: None,
        caller: None,
        terms: creditgate::ledger::HoldTerms::default(),
    };
    let one = |store: Arc<dyn Store>, request: HoldRequest| async move {
        let mut lat = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let started = Instant::now();
            let placed = store
                .hold("bench-0", &request, 1)
                .await
                .expect("hold")
                .expect("placed");
            lat.push(started.elapsed().as_micros() as u32);
            store
                .settle("bench-0", placed.hold_id, request.amount, None, 1)
                .await
                .expect("settle")
                .expect("settled");
        }
        lat
    };
    let mut alone = one(store.clone(), request.clone()).await;
    let mut crowd = Vec::new();
    let tasks: Vec<_> = (0..64)
        .map(|_| tokio::spawn(one(store.clone(), request.clone())))
        .collect();
    for t in tasks {
        crowd.extend(t.await.expect("task"));
    }
    alone.sort_unstable();
    crowd.sort_unstable();
    (
        percentile(&alone, 0.5),
        percentile(&alone, 0.99),
        percentile(&crowd, 0.5),
        percentile(&crowd, 0.99),
    )
}

/// `redis-cli` against the bench's Redis.
fn redis_cli(redis: &Redis, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (redis-tools) is needed by the bench");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Redis's own accounting since the last `CONFIG RESETSTAT`: calls and CPU
/// microseconds of every command, and bytes received from clients.
fn redis_counters(redis: &Redis) -> (u64, u64, u64) {
    let (mut calls, mut usec) = (0, 0);
    for line in redis_cli(redis, &["INFO", "commandstats"]).lines() {
        let Some((name, fields)) = line.split_once(':') else {
            continue;
        };
        if !name.starts_with("cmdstat_") || name == "cmdstat_info" || name == "cmdstat_config" {
            continue;
        }
        for field in fields.split(',') {
            match field.split_once('=') {
                Some(("calls", n)) => calls += n.trim().parse::<u64>().unwrap_or(0),
                Some(("usec", n)) => usec += n.trim().parse::<u64>().unwrap_or(0),
                _ => {}
            }
        }
    }
    let input = redis_cli(redis, &["INFO", "stats"])
        .lines()
        .find_map(|l| l.strip_prefix("total_net_input_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    (calls, usec, input)
}

/// The cost to Redis of one hold + settle on an account that has `in_flight`
/// other holds open: Redis CPU (its own `INFO commandstats`) and bytes sent to it
/// (the state and entries each commit writes), per hold + settle, one at a time.
async fn commit_cost(store: Arc<dyn Store>, redis: &Redis, in_flight: usize, rounds: usize) {
    let account = "bench-1";
    let request = |id: String| HoldRequest {
        operation: "generate".into(),
        request_id: id,
        amount: PRICE.parse().expect("price"),
        ttl_ms: 600_000,
        max_holds: 4_096,
        quota: None,
        idempotency: None,
        caller: None,
        terms: creditgate::ledger::HoldTerms::default(),
    };
    let mut open = Vec::with_capacity(in_flight);
    for i in 0..in_flight {
        match store.hold(account, &request(format!("open-{i}")), 1).await {
            Ok(Ok(placed)) => open.push(placed.hold_id),
            other => {
                println!("commit cost at {in_flight} holds in flight: hold {i} was refused ({:?}); not measured", other.map(|o| o.err()));
                break;
            }
        }
    }
    if open.len() == in_flight {
        redis_cli(redis, &["CONFIG", "RESETSTAT"]);
        let started = Instant::now();
        for i in 0..rounds {
            let placed = store
                .hold(account, &request(format!("r-{i}")), 1)
                .await
                .expect("hold")
                .expect("placed");
            store
                .settle(account, placed.hold_id, placed_amount(), None, 1)
                .await
                .expect("settle")
                .expect("settled");
        }
        let took = started.elapsed();
        let (calls, usec, input) = redis_counters(redis);
        let per = |n: u64| n as f64 / rounds as f64;
        println!(
            "redis commit cost, {in_flight:>4} holds in flight: {:.1} Redis CPU us, {:.0} bytes in, {:.1} calls per hold+settle ({:.3} ms each, one client)",
            per(usec),
            per(input),
            per(calls),
            took.as_secs_f64() * 1e3 / rounds as f64
        );
    }
    for hold_id in open {
        store
            .release(account, hold_id, 1)
            .await
            .expect("release")
            .expect("released");
    }
}

fn placed_amount() -> Credits {
    PRICE.parse().expect("price")
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn memory_per_account(accounts: usize) -> f64 {
    let policy = policy("127.0.0.1:9".parse().expect("addr"), "kind = \"memory\"");
    let store = LocalStore::new(policy.catalog(), policy.limits());
    let mut seed = policy.accounts[0].clone();
    seed.keys.clear();
    let before = rss_bytes();
    for i in 0..accounts {
        seed.id = format!("acct-{i:07}");
        store.seed(&seed, 0).await.expect("seed");
    }
    let after = rss_bytes();
    drop(store);
    (after.saturating_sub(before)) as f64 / accounts as f64
}

fn policy_load_time(operations: usize) -> Duration {
    let mut text = String::from("version = 1\n[upstreams.main]\nurl = \"http://127.0.0.1:9\"\n[plans.free]\nmonthly_credits = 10\nfeatures = [\"premium\"]\n");
    for i in 0..operations {
        let path = match i % 3 {
            0 => format!("/v1/op{i}/generate"),
            1 => format!("/v1/op{i}/{{id}}/edit"),
            _ => format!("/v1/op{i}"),
        };
        text.push_str(&format!("[[operations]]\nname = \"op{i}\"\nmethod = \"POST\"\npath = \"{path}\"\nupstream = \"main\"\nrequires = [\"premium\"]\n"));
        if i % 2 == 0 {
            text.push_str("price = 1.5\n");
        } else {
            text.push_str("[operations.price]\ncredits = { from = \"body:/model\", table = { \"a\" = 1, \"b\" = 2 }, default = 3 }\nper = { from = \"body:/seconds\", min = 1, max = 60 }\n");
        }
    }
    let started = Instant::now();
    let policy = Policy::parse(&text, "big.toml", &|_| None).expect("the big policy is valid");
    let took = started.elapsed();
    assert_eq!(policy.operations.len(), operations);
    took
}

/// The gateway on the memory store, its accounts seeded.
fn memory_gateway(
    servers: &tokio::runtime::Runtime,
    backend: SocketAddr,
) -> (Gateway, Arc<dyn Store>) {
    let policy = Arc::new(policy(backend, "kind = \"memory\""));
    let store: Arc<dyn Store> = Arc::new(LocalStore::new(policy.catalog(), policy.limits()));
    let gateway = Gateway::new(policy, store.clone(), Clock::system()).expect("gateway");
    servers.block_on(gateway.seed_accounts()).expect("seed");
    (gateway, store)
}

/// The gateway on `redis`, its accounts seeded.
fn redis_gateway(
    servers: &tokio::runtime::Runtime,
    backend: SocketAddr,
    redis: &Redis,
) -> (Gateway, Arc<dyn Store>) {
    let policy = Arc::new(policy(
        backend,
        &format!("kind = \"redis\"\nurl = \"{}\"", redis.url()),
    ));
    let store: Arc<dyn Store> = Arc::new(
        servers
            .block_on(RedisStore::connect(
                &redis.url(),
                false,
                policy.catalog(),
                policy.limits(),
            ))
            .expect("redis store"),
    );
    let gateway = Gateway::new(policy, store.clone(), Clock::system()).expect("gateway");
    servers.block_on(gateway.seed_accounts()).expect("seed");
    (gateway, store)
}

/// The gateway on the sqlite store in `file` (fsync on every commit), its
/// accounts seeded.
fn sqlite_gateway(
    servers: &tokio::runtime::Runtime,
    backend: SocketAddr,
    file: &std::path::Path,
) -> (Gateway, Arc<dyn Store>) {
    let policy = Arc::new(policy(
        backend,
        &format!("kind = \"sqlite\"\npath = \"{}\"", file.display()),
    ));
    let store: Arc<dyn Store> = Arc::new(
        sqlite::open(
            file,
            Duration::from_millis(2),
            policy.catalog(),
            policy.limits(),
        )
        .expect("sqlite store"),
    );
    let gateway = Gateway::new(policy, store.clone(), Clock::system()).expect("gateway");
    servers.block_on(gateway.seed_accounts()).expect("seed");
    (gateway, store)
}

/// A file path in a fresh folder of the temp dir (a real disk here: ext4), and the
/// folder, to remove afterwards.
fn scratch_file(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("creditgate-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    (dir.join(name), dir)
}

/// The runtimes, the same for every variant, each with named threads so the bench
/// can tell whose CPU time is whose: the proxy under test (two workers), the load
/// generator (two) and the mock backend (one), which starts on its own.
fn runtimes() -> (
    tokio::runtime::Runtime,
    tokio::runtime::Runtime,
    tokio::runtime::Runtime,
    MockBackend,
) {
    let runtime = |threads: usize, name: &'static str| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("runtime")
    };
    let servers = runtime(2, PROXY_THREADS);
    let loader = runtime(2, LOADER_THREADS);
    let backend_runtime = runtime(1, BACKEND_THREADS);
    let backend = backend_runtime.block_on(async {
        MockBackend::start_without_recording(TcpListener::bind("127.0.0.1:0").await.expect("bind"))
            .expect("backend")
    });
    (servers, loader, backend_runtime, backend)
}

/// Where the bench's threads may run. `Shared`: anywhere on both cores, as a
/// deployment on a small machine. `Pinned` (`taskset`): the proxies under test on
/// core 0, everything else — load generator, mock backend, `redis-server`, the
/// sqlite writer — on core 1, so the proxy's own cost decides its throughput.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Shared,
    Pinned,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Pinned => "pinned",
        }
    }
}

/// Moves every thread of this process (and `redis-server`'s) to the cores `mode`
/// gives it, with `taskset`.
fn pin(mode: Mode, redis_pid: u32) {
    let (proxy, rest) = match mode {
        Mode::Shared => ("0,1", "0,1"),
        Mode::Pinned => ("0", "1"),
    };
    let taskset = |args: &[&str]| {
        let status = std::process::Command::new("taskset")
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("taskset (util-linux) is needed by the bench");
        assert!(status.success(), "taskset {args:?} failed");
    };
    let me = std::process::id();
    for task in std::fs::read_dir(format!("/proc/{me}/task"))
        .expect("tasks")
        .flatten()
    {
        let tid = task.file_name().to_string_lossy().into_owned();
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let cores = if name.starts_with(PROXY_THREADS) {
            proxy
        } else {
            rest
        };
        taskset(&["-p", "-c", cores, &tid]);
    }
    taskset(&["-a", "-p", "-c", rest, &redis_pid.to_string()]);
}

/// One line of the load table: a server (or two replicas) and how many accounts
/// its connections use.
struct Variant {
    name: &'static str,
    addrs: Vec<SocketAddr>,
    accounts: usize,
    /// Which store's conservation check counts its 2xx answers.
    store: usize,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    // For profiling one variant: CREDITGATE_BENCH_ONLY=memory (or passthrough, redis, sqlite).
    if let Ok(only) = std::env::var("CREDITGATE_BENCH_ONLY") {
        return profile_one(&only);
    }
    let load = if full {
        Load {
            connections: 32,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(3),
        }
    } else {
        Load {
            connections: 4,
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(300),
        }
    };
    let (servers, loader, _backend_runtime, backend) = runtimes();
    let backend_addr = backend.addr;
    let redis = Redis::start();
    let redis_pid = Some(redis.pid());

    // Every server stays up; the load visits the variants in turn, round after
    // round and mode after mode, so a slow minute on a shared machine hits all alike.
    let (gateway, mem_store) = memory_gateway(&servers, backend_addr);
    // The passthrough proxies to the gateway's own peer: same backend, same timeouts.
    let peer = gateway.peers()[0].clone();
    let cap = gateway.policy().gateway.max_connections;
    let passthrough_server = start_variant(&servers, |l, stop| {
        serve_proxy(l, Passthrough(peer), cap, stop)
    });
    let memory_server = start_variant(&servers, |l, stop| serve(l, gateway, stop));

    let (gateway, redis_store) = redis_gateway(&servers, backend_addr, &redis);
    let redis_server = start_variant(&servers, |l, stop| serve(l, gateway, stop));
    // A second replica: its own store (cache, connections, queues) on the same Redis.
    let (gateway, _replica_store) = redis_gateway(&servers, backend_addr, &redis);
    let replica_server = start_variant(&servers, |l, stop| serve(l, gateway, stop));

    let (sqlite_file, sqlite_dir) = scratch_file("load.db");
    let (gateway, sqlite_store) = sqlite_gateway(&servers, backend_addr, &sqlite_file);
    let sqlite_server = start_variant(&servers, |l, stop| serve(l, gateway, stop));

    let stores: [(&str, &Arc<dyn Store>); 3] = [
        ("gateway/memory", &mem_store),
        ("gateway/redis", &redis_store),
        ("gateway/sqlite", &sqlite_store),
    ];
    let before: Vec<Totals> = stores
        .iter()
        .map(|(_, store)| servers.block_on(all_totals(store.as_ref())))
        .collect();
    let one = |name, addr: SocketAddr, accounts, store| Variant {
        name,
        addrs: vec![addr],
        accounts,
        store,
    };
    let variants = [
        one("passthrough", passthrough_server.addr, ACCOUNTS, usize::MAX),
        one("memory/64", memory_server.addr, ACCOUNTS, 0),
        one("memory/hot", memory_server.addr, 1, 0),
        one("redis/64", redis_server.addr, ACCOUNTS, 1),
        one("redis/hot", redis_server.addr, 1, 1),
        Variant {
            name: "redis x2/hot",
            addrs: vec![redis_server.addr, replica_server.addr],
            accounts: 1,
            store: 1,
        },
        one("sqlite/64", sqlite_server.addr, ACCOUNTS, 2),
        one("sqlite/hot", sqlite_server.addr, 1, 2),
    ];
    let modes = [Mode::Shared, Mode::Pinned];
    // runs[mode][variant]: one Measured per round.
    let mut runs: Vec<Vec<Vec<Measured>>> = modes
        .iter()
        .map(|_| variants.iter().map(|_| Vec::new()).collect())
        .collect();
    let rounds = if full { 3 } else { 1 };
    for _ in 0..rounds {
        for (m, mode) in modes.iter().enumerate() {
            pin(*mode, redis.pid());
            for (v, variant) in variants.iter().enumerate() {
                runs[m][v].push(loader.block_on(drive(
                    variant.name,
                    &variant.addrs,
                    variant.accounts,
                    load,
                    redis_pid,
                )));
            }
        }
    }
    pin(Mode::Shared, redis.pid());
    let results: Vec<Vec<Measured>> = runs
        .into_iter()
        .map(|per_variant| per_variant.into_iter().map(merge).collect())
        .collect();
    for running in [
        passthrough_server,
        memory_server,
        redis_server,
        replica_server,
        sqlite_server,
    ] {
        running.stop(&servers);
    }
    for (s, (name, store)) in stores.iter().enumerate() {
        let served_ok = results
            .iter()
            .flat_map(|per_variant| per_variant.iter().zip(&variants))
            .filter(|(_, variant)| variant.store == s)
            .map(|(measured, _)| measured.ok)
            .sum();
        servers.block_on(check_conservation(
            name,
            store.as_ref(),
            before[s],
            served_ok,
        ));
    }

    for (mode, measured) in modes.iter().zip(&results) {
        let passthrough = &measured[0];
        println!();
        println!(
            "{:<16} {:>10} {:>9} {:>9} {:>9} {:>12} {:>10}   [{} mode]",
            "variant",
            "req/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "vs passthru",
            "added p99",
            mode.name()
        );
        for m in measured {
            println!(
                "{:<16} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>11.3}x {:>8.3}ms",
                m.name,
                m.rps,
                m.p50_us / 1000.0,
                m.p99_us / 1000.0,
                m.p999_us / 1000.0,
                m.rps / passthrough.rps,
                (m.p99_us - passthrough.p99_us) / 1000.0
            );
            assert_eq!(m.other, 0, "{}: {} answers were not 2xx", m.name, m.other);
        }
        let by_name = |name: &str| {
            measured
                .iter()
                .find(|m| m.name == name)
                .expect("a variant of the table")
        };
        println!(
            "sqlite vs memory (64 accounts): {:.3}x the throughput, p99 {:+.3} ms (targets: >= 0.9x, <= +1 ms; fsync on every commit)",
            by_name("sqlite/64").rps / by_name("memory/64").rps,
            (by_name("sqlite/64").p99_us - by_name("memory/64").p99_us) / 1000.0
        );
        println!(
            "two Redis replicas vs one, hot account: {:.3}x (target >= 1.3x unpinned)",
            by_name("redis x2/hot").rps / by_name("redis/hot").rps
        );
        println!();
        println!(
            "{:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>14}",
            "CPU us/request", "proxy", "backend", "loader", "store", "total", "proxy+store"
        );
        for m in measured {
            let [proxy, backend, loader, store] = m.cpu_us;
            println!(
                "{:<16} {proxy:>9.1} {backend:>9.1} {loader:>9.1} {store:>9.1} {:>9.1} {:>8.1} ({:+.1})",
                m.name,
                proxy + backend + loader + store,
                proxy + store,
                proxy + store - passthrough.cpu_us[0],
            );
        }
    }
    println!();
    println!(
        "load: {} connections, {:?} warm-up + {:?} measured per variant per round, {rounds} interleaved rounds per mode, medians shown",
        load.connections, load.warmup, load.duration
    );
    println!("store: redis-server's threads, or the sqlite store's writer thread; 64: each connection its own account; hot: every connection on one account; x2: two gateway replicas on one Redis, connections alternating");

    // What one commit costs Redis as the account's open holds grow.
    for in_flight in [0, 100, 1_000] {
        let rounds = if full { 500 } else { 20 };
        servers.block_on(commit_cost(redis_store.clone(), &redis, in_flight, rounds));
    }

    // Per client: 64 clients on one Redis account queue behind one another.
    let rounds = if full { 200 } else { 20 };
    for (name, store) in [
        ("memory", mem_store.clone()),
        ("redis", redis_store.clone()),
        ("sqlite", sqlite_store.clone()),
    ] {
        let (p50, p99, c50, c99) = servers.block_on(contended_hold(store, rounds));
        println!("hold latency on {name:<6}: alone p50 {:.3} ms p99 {:.3} ms; 64 clients on one account p50 {:.3} ms p99 {:.3} ms (+{:.3} ms at p99)", p50 / 1e3, p99 / 1e3, c50 / 1e3, c99 / 1e3, (c99 - p99) / 1e3);
    }
    let accounts = if full { 1_000_000 } else { 10_000 };
    let per_account = servers.block_on(memory_per_account(accounts));
    println!(
        "memory store: {per_account:.0} bytes per account at {accounts} accounts (RSS growth)"
    );
    drop(sqlite_store);
    let _ = std::fs::remove_dir_all(sqlite_dir);
    let (accounts, entries) = if full {
        (100_000, 1_000_000)
    } else {
        (1_000, 10_000)
    };
    sqlite_file_figures(accounts, entries);
    println!(
        "policy with 1000 operations: loaded and validated in {:.1} ms",
        policy_load_time(1_000).as_secs_f64() * 1e3
    );
    drop(backend);
}

/// The size of the sqlite store's file per account and per ledger entry, and the
/// time to reopen it (open, check the format, load every account and key: ready
/// to serve). The file is written directly with SQL, as the writer writes it:
/// each account a copy of a typical one (a few grants, members, ended holds).
fn sqlite_file_figures(accounts: usize, entries: usize) {
    use creditgate::ledger::{Account, Caller};
    let (file, dir) = scratch_file("reopen.db");
    let policy = policy("127.0.0.1:9".parse().expect("addr"), "kind = \"memory\"");
    let catalog = policy.catalog();
    // The schema, by the store itself.
    drop(
        sqlite::open(
            &file,
            Duration::from_millis(2),
            catalog.clone(),
            policy.limits(),
        )
        .expect("create"),
    );
    let mut typical = Account::seeded(&policy.accounts[0], &catalog, 1);
    typical.add_key("m", "key_0123456789abcdef").expect("key");
    for i in 0..8 {
        let request = HoldRequest {
            operation: "generate".into(),
            request_id: format!("req-{i:032x}"),
            amount: "1.5".parse().expect("amount"),
            ttl_ms: 600_000,
            max_holds: 64,
            quota: None,
            idempotency: None,
            caller: Some(Caller {
                member: "m".into(),
                key_id: "key_0123456789abcdef".into(),
                requires: vec![],
            }),
            terms: creditgate::ledger::HoldTerms::default(),
        };
        let placed = typical.hold(&request, 2, &catalog).expect("hold");
        typical
            .settle(
                placed.hold_id,
                "1".parse().expect("charge"),
                3,
                &policy.limits(),
            )
            .expect("settle");
    }
    let fresh = typical.take_entries();
    let db = rusqlite::Connection::open(&file).expect("open");
    db.pragma_update(None, "synchronous", "OFF")
        .expect("pragma");
    let size = |db: &rusqlite::Connection| {
        db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoint");
        std::fs::metadata(&file).expect("size").len() as f64
    };
    let empty = size(&db);
    db.execute_batch("BEGIN").expect("begin");
    {
        let mut put = db
            .prepare("INSERT INTO accounts (id, state, updated_at_ms) VALUES (?1, ?2, 1)")
            .expect("prepare");
        for i in 0..accounts {
            typical.id = format!("acct-{i:07}");
            let state = rmp_serde::to_vec_named(&typical).expect("encode");
            put.execute(rusqlite::params![typical.id, state])
                .expect("insert");
        }
    }
    db.execute_batch("COMMIT").expect("commit");
    let with_accounts = size(&db);
    db.execute_batch("BEGIN").expect("begin");
    {
        let mut put = db
            .prepare("INSERT INTO ledger (account, seq, at_ms, type, credits, operation, request_id, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")
            .expect("prepare");
        for n in 0..entries {
            let e = &fresh[n % fresh.len()];
            put.execute(rusqlite::params![
                format!("acct-{:07}", n % accounts),
                (n / accounts + 1) as i64,
                1_767_225_600_000i64 + n as i64,
                e.kind.as_str(),
                e.credits.millicredits() as i64,
                e.operation,
                e.request_id,
                e.detail,
            ])
            .expect("insert");
        }
    }
    db.execute_batch("COMMIT").expect("commit");
    let with_entries = size(&db);
    drop(db);
    let started = Instant::now();
    let store =
        sqlite::open(&file, Duration::from_millis(2), catalog, policy.limits()).expect("reopen");
    let ready = started.elapsed();
    drop(store);
    println!(
        "sqlite file: {:.0} bytes per account, {:.0} bytes per ledger entry; {accounts} accounts + {entries} entries ({:.1} MB) reopened and ready in {:.0} ms (target <= 2000 ms)",
        (with_accounts - empty) / accounts as f64,
        (with_entries - with_accounts) / entries as f64,
        with_entries / 1e6,
        ready.as_secs_f64() * 1e3
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs one variant for 20 s at full load, and nothing else: for `perf record`.
fn profile_one(only: &str) {
    let load = Load {
        connections: 32,
        warmup: Duration::from_secs(1),
        duration: Duration::from_secs(
            std::env::var("CREDITGATE_BENCH_SECONDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(20),
        ),
    };
    let (servers, loader, _backend_runtime, backend) = runtimes();
    let backend_addr = backend.addr;
    let redis = (only == "redis").then(Redis::start);
    let server = match only {
        "passthrough" => {
            let gateway = memory_gateway(&servers, backend_addr).0;
            let (peer, cap) = (
                gateway.peers()[0].clone(),
                gateway.policy().gateway.max_connections,
            );
            start_variant(&servers, |l, stop| {
                serve_proxy(l, Passthrough(peer), cap, stop)
            })
        }
        "memory" => {
            let gateway = memory_gateway(&servers, backend_addr).0;
            start_variant(&servers, |l, stop| serve(l, gateway, stop))
        }
        "redis" => {
            let redis = redis.as_ref().expect("redis started");
            let gateway = redis_gateway(&servers, backend_addr, redis).0;
            start_variant(&servers, |l, stop| serve(l, gateway, stop))
        }
        "sqlite" => {
            let (file, _) = scratch_file("profile.db");
            let gateway = sqlite_gateway(&servers, backend_addr, &file).0;
            start_variant(&servers, |l, stop| serve(l, gateway, stop))
        }
        other => panic!("CREDITGATE_BENCH_ONLY={other}: use passthrough, memory, redis or sqlite"),
    };
    let name = match only {
        "memory" => "gateway/memory",
        "redis" => "gateway/redis",
        "sqlite" => "gateway/sqlite",
        _ => "passthrough",
    };
    let redis_pid = redis.as_ref().map(Redis::pid);
    let measured = loader.block_on(drive(name, &[server.addr], ACCOUNTS, load, redis_pid));
    server.stop(&servers);
    let [proxy, backend, loader, store] = measured.cpu_us;
    println!(
        "{}: {} answered, {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms; CPU us/request: proxy {proxy:.1}, backend {backend:.1}, loader {loader:.1}, store {store:.1}",
        measured.name,
        measured.ok + measured.other,
        measured.rps,
        measured.p50_us / 1e3,
        measured.p99_us / 1e3
    );
}
