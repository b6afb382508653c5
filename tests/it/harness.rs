//! Starts a real gateway (the same Pingora app `creditgate run` serves) and a
//! real mock backend, both on `127.0.0.1:0`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use creditgate::admin::AdminState;
use creditgate::clock::Clock;
use creditgate::demo::mock::MockBackend;
use creditgate::gateway::{serve_live, Gateway, LiveGateway};
use creditgate::ledger::{Credits, Totals};
use creditgate::policy::Policy;
use creditgate::store::local::LocalStore;
use creditgate::store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub const ALICE_KEY: &str = "sk-alice-0123456789";
pub const PRO_KEY: &str = "sk-pro-0123456789";
pub const BACKEND_SECRET: &str = "Bearer backend-secret";
pub const ADMIN_TOKEN: &str = "admin-token-for-tests";
pub const DAY_MS: u64 = 86_400_000;

/// The test policy; `{CREDITS}` is alice's top-up, `{READ_TIMEOUT}` the main upstream's.
pub const POLICY: &str = r#"
version = 1

[gateway]
upgrade_url = "https://example.com/billing"
hold_ttl = "10m"

[upstreams.main]
url = "${BACKEND_URL}"
connect_timeout = "1s"
read_timeout = "{READ_TIMEOUT}"
set_headers = { authorization = "Bearer backend-secret" }

[upstreams.refused]
url = "${REFUSED_URL}"
connect_timeout = "1s"

[upstreams.full]
url = "${FULL_URL}"
connect_timeout = "300ms"

[plans.free]
monthly_credits = 0
features = []

[plans.pro]
monthly_credits = 100
features = ["premium"]

[[operations]]
name = "image.generate"
method = "POST"
path = "/v1/images"
upstream = "main"
price = 3

[[operations]]
name = "chat.edit"
method = "POST"
path = "/v1/sites/{site}/edits"
upstream = "main"
price = 0.5

[[operations]]
name = "models.list"
method = "GET"
path = "/v1/models"
upstream = "main"
price = 0

[[operations]]
name = "image.premium"
method = "POST"
path = "/v1/images/premium"
upstream = "main"
requires = ["premium"]
price = 20

[[operations]]
name = "refused.op"
path = "/v1/refused"
upstream = "refused"
price = 1

[[operations]]
name = "full.op"
path = "/v1/full"
upstream = "full"
price = 1

[[operations]]
name = "lenient.op"
path = "/v1/lenient"
upstream = "main"
price = 1
charge = { on = ["2xx", 404] }

[[operations]]
name = "video.generate"
method = "POST"
path = "/v1/videos"
upstream = "main"
[operations.price]
credits = 2
per = { from = "body:/duration_seconds", min = 1, max = 60 }
multiplier = { from = "body:/resolution", table = { "720p" = 1, "4k" = 4 }, default = 1 }

[[operations]]
name = "mode.patch"
method = "POST"
path = "/v1/modes"
when = { "body:/mode" = "patch" }
upstream = "main"
price = 0.5

[[operations]]
name = "mode.full"
method = "POST"
path = "/v1/modes"
upstream = "main"
price = 4

[[operations]]
name = "chat.json"
method = "POST"
path = "/v1/chat/completions"
upstream = "main"
price = 10
[operations.settle]
usage = "json:/usage/total_tokens"
credits_per_unit = 0.002
on_missing = "charge_hold"

[[operations]]
name = "chat.stream"
method = "POST"
path = "/v1/chat/stream"
upstream = "main"
price = 10
[operations.settle]
usage = "sse:/usage/total_tokens"
credits_per_unit = 0.002
on_missing = "release"

[[operations]]
name = "embeddings"
method = "POST"
path = "/v1/embeddings"
upstream = "main"
price = 5
[operations.settle]
usage = "header:x-usage"
credits_per_unit = 0.01

[[operations]]
name = "stream.fixed"
method = "POST"
path = "/v1/stream/fixed"
upstream = "main"
price = 3

[[operations]]
name = "stream.fair"
method = "POST"
path = "/v1/stream/fair"
upstream = "main"
price = 3
charge = { on_client_abort = "release" }

[[accounts]]
id = "alice"
plan = "free"
grants = [ { kind = "topup", credits = "{CREDITS}" } ]
keys = [ { member = "alice", key_env = "ALICE_KEY" } ]

[[accounts]]
id = "prox"
plan = "pro"
keys = [ { member = "p", key_env = "PRO_KEY" } ]
"#;

pub struct TestGateway {
    pub url: String,
    /// The admin API, protected by `ADMIN_TOKEN`.
    pub admin_url: String,
    /// The gateway's clock: tests move it with [`TestGateway::advance_days`].
    pub now: Arc<AtomicU64>,
    pub backend: MockBackend,
    pub store: Arc<LocalStore>,
    pub client: reqwest::Client,
    stop: watch::Sender<bool>,
    /// Keeps the "full" upstream's listener and its queued connections alive.
    _full: (tokio::net::TcpListener, Vec<tokio::net::TcpStream>),
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A port nobody listens on: bound, then closed.
async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A listener whose accept queue is full, so new connections time out: the
/// kernel drops SYNs to a listener with a full backlog.
async fn full_listener() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    for _ in 0..4 {
        match tokio::time::timeout(
            Duration::from_millis(100),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(stream)) => queued.push(stream),
            _ => break,
        }
    }
    (listener, queued)
}

pub async fn start(credits: &str) -> TestGateway {
    start_with(credits, "2s").await
}

pub async fn start_with(credits: &str, read_timeout: &str) -> TestGateway {
    let text = POLICY
        .replace("{CREDITS}", credits)
        .replace("{READ_TIMEOUT}", read_timeout);
    start_policy(|_| text, |_| None).await
}

/// Starts a gateway on the policy `text(backend_url)`; `extra_env` answers the
/// policy's own `${VAR}` and `key_env` names beyond the harness's.
pub async fn start_policy(
    text: impl FnOnce(&str) -> String,
    extra_env: impl Fn(&str) -> Option<String> + 'static,
) -> TestGateway {
    start_policy_with_file(text, extra_env, None).await
}

/// `start_policy`, with the file `POST /admin/policy/reload` reads.
pub async fn start_policy_with_file(
    text: impl FnOnce(&str) -> String,
    extra_env: impl Fn(&str) -> Option<String> + 'static,
    policy_file: Option<std::path::PathBuf>,
) -> TestGateway {
    start_on(text, extra_env, policy_file, None).await
}

/// `start_policy` on the sqlite store in `store_file`, whatever the policy says.
pub async fn start_policy_on_sqlite(
    text: impl FnOnce(&str) -> String,
    store_file: &std::path::Path,
) -> TestGateway {
    start_on(text, |_| None, None, Some(store_file)).await
}

/// Starts a gateway; its store is the memory store (the tests' policies name
/// none, and the harness builds the store itself), or sqlite on `store_file`.
async fn start_on(
    text: impl FnOnce(&str) -> String,
    extra_env: impl Fn(&str) -> Option<String> + 'static,
    policy_file: Option<std::path::PathBuf>,
    store_file: Option<&std::path::Path>,
) -> TestGateway {
    let backend = MockBackend::start(TcpListener::bind("127.0.0.1:0").await.unwrap()).unwrap();
    let full = full_listener().await;
    let backend_url = format!("http://{}", backend.addr);
    let text = text(&backend_url);
    let refused_url = format!("http://{}", refused_addr().await);
    let full_url = format!("http://{}", full.0.local_addr().unwrap());
    let env = move |name: &str| match name {
        "BACKEND_URL" => Some(backend_url.clone()),
        "REFUSED_URL" => Some(refused_url.clone()),
        "FULL_URL" => Some(full_url.clone()),
        "ALICE_KEY" => Some(ALICE_KEY.to_string()),
        "PRO_KEY" => Some(PRO_KEY.to_string()),
        other => extra_env(other),
    };
    // Named as the file a reload reads, so the reload finds the same `[store]`.
    let name = policy_file
        .as_ref()
        .map_or("test.toml".to_string(), |f| f.display().to_string());
    let policy = Arc::new(Policy::parse(&text, &name, &env).unwrap_or_else(|e| panic!("{e}")));
    let store = Arc::new(match store_file {
        None => LocalStore::new(policy.catalog(), policy.limits()),
        Some(file) => creditgate::store::sqlite::open(
            file,
            Duration::from_millis(2),
            policy.catalog(),
            policy.limits(),
        )
        .unwrap(),
    });
    let now = Arc::new(AtomicU64::new(Clock::system().now_ms()));
    let clock = Clock::manual(now.clone());
    let gateway = Gateway::new(policy.clone(), store.clone(), clock.clone()).unwrap();
    gateway.seed_accounts().await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, shutdown) = watch::channel(false);
    let live = LiveGateway::new(gateway);
    tokio::spawn(serve_live(listener, live.clone(), shutdown.clone()));
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_url = format!("http://{}", admin_listener.local_addr().unwrap());
    let admin = AdminState::new(live.clone(), policy_file, Some(ADMIN_TOKEN));
    tokio::spawn(creditgate::admin::serve(admin_listener, admin, shutdown));
    TestGateway {
        url,
        admin_url,
        now,
        backend,
        store,
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap(),
        stop,
        _full: full,
    }
}

impl TestGateway {
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.url))
            .bearer_auth(ALICE_KEY)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}{path}", self.url))
            .bearer_auth(ALICE_KEY)
    }

    pub fn now_ms(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    pub fn advance_days(&self, days: u64) {
        self.now.fetch_add(days * DAY_MS, Ordering::SeqCst);
    }

    /// A request to the admin API with the admin token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.admin_url))
            .bearer_auth(ADMIN_TOKEN)
    }

    pub async fn totals(&self, account: &str) -> Totals {
        self.store.totals(account, self.now_ms()).await.unwrap()
    }

    /// Waits until no hold of `account` is open (holds end in `logging`, after
    /// the client has its response), then checks the invariant of every account.
    pub async fn settled(&self, account: &str) -> Totals {
        let store = self.store.clone();
        let id = account.to_string();
        let now = self.now_ms();
        eventually(move || {
            let store = store.clone();
            let id = id.clone();
            async move { store.totals(&id, now).await.unwrap().held.is_zero() }
        })
        .await;
        self.store.check_invariants().unwrap();
        self.totals(account).await
    }
}

/// Polls `condition` until it holds; fails the test after 10 s.
pub async fn eventually<F, Fut>(mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn credits(text: &str) -> Credits {
    text.parse().unwrap()
}

pub fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("<missing>")
}

/// Sends raw bytes on a new connection and returns everything the gateway
/// answers until it closes (send `Connection: close`). With `expect_continue`,
/// sends `head` first, requires `100 Continue`, then sends `body`.
pub async fn raw_exchange(url: &str, head: &[u8], body: &[u8], expect_continue: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head).await.unwrap();
    if expect_continue {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("the gateway must answer Expect: 100-continue")
                .unwrap();
            assert!(n > 0, "connection closed before 100 Continue");
            got.extend_from_slice(&buf[..n]);
        }
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 100"), "{got}");
    }
    stream.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("the gateway answered within 30 s")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// `body` in chunked framing, cut into pieces of `piece` bytes.
pub fn chunked(body: &[u8], piece: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for part in body.chunks(piece) {
        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Starts a gateway on a shipped policy file, with every upstream at the mock.
/// `edit` may change the text first (e.g. to shrink a quota).
pub async fn start_seed(file: &str, edit: impl FnOnce(String) -> String) -> TestGateway {
    let path = format!("{}/policies/{file}", env!("CARGO_MANIFEST_DIR"));
    let original = std::fs::read_to_string(&path).unwrap();
    start_policy(
        move |backend| {
            let text = original
                .lines()
                .map(|l| {
                    if l.starts_with("url = ") {
                        format!("url = \"{backend}\"")
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            edit(text)
        },
        |_| None,
    )
    .await
}

impl TestGateway {
    /// Creates an account with members through the admin API; returns one key per member.
    pub async fn open_account(&self, id: &str, plan: &str, members: &[&str]) -> Vec<String> {
        let resp = self
            .admin(reqwest::Method::POST, "/admin/accounts")
            .json(&serde_json::json!({"id": id, "plan": plan}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
        let mut keys = Vec::new();
        for member in members {
            let resp = self
                .admin(
                    reqwest::Method::POST,
                    &format!("/admin/accounts/{id}/members"),
                )
                .json(&serde_json::json!({"member": member}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
            let key: serde_json::Value = self
                .admin(reqwest::Method::POST, &format!("/admin/accounts/{id}/keys"))
                .json(&serde_json::json!({"member": member}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            keys.push(key["key"].as_str().unwrap().to_string());
        }
        keys
    }

    /// A proxied request with `key`.
    pub fn call(&self, method: reqwest::Method, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(key)
    }

    pub async fn balance(&self, key: &str) -> serde_json::Value {
        self.call(reqwest::Method::GET, "/credits/v1/balance", key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// A file path in a folder of its own under the temp dir, removed with the folder
/// (an SQLite file's `-wal` and `-shm` beside it too) when dropped.
pub struct TempFile {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
}

impl TempFile {
    pub fn new(name: &str) -> TempFile {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "creditgate-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempFile {
            path: dir.join(name),
            dir,
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
