//! Operating the gateway as a platform team does: `creditgate run` as a process
//! (binding, signals, readiness, the access log), HTTPS upstreams with a private
//! CA, client-side timeouts, error fields SDKs read, metrics that `promtool`
//! accepts, `check --no-env`, and the deployment files.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::harness::{
    credits, eventually, header, start, start_policy, TestGateway, ALICE_KEY, POLICY,
};
use creditgate::demo::mock::MockBackend;

fn creditgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_creditgate"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "creditgate-ops-{name}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// How long a process may take to do what must happen "at once": far below the
/// 30 s a grace period or Pingora's start-up timers would take, far above a
/// loaded machine's scheduling noise.
const AT_ONCE: Duration = Duration::from_secs(10);

/// `creditgate run` as a child process, its stderr in a file; killed on drop.
struct Running {
    child: std::process::Child,
    log: PathBuf,
    port: u16,
    admin_port: u16,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Starts `creditgate run` on `policy` with `{PORT}` and `{ADMIN_PORT}` filled in.
    fn spawn(name: &str, policy: &str, port: u16, admin_port: u16, env: &[(&str, &str)]) -> Self {
        let dir = temp_dir(name);
        let file = dir.join("policy.toml");
        std::fs::write(
            &file,
            policy
                .replace("{PORT}", &port.to_string())
                .replace("{ADMIN_PORT}", &admin_port.to_string()),
        )
        .unwrap();
        let log = dir.join("stderr.log");
        let mut command = creditgate();
        command
            .args(["run", "--policy"])
            .arg(&file)
            .env_remove("RUST_LOG")
            .env("CREDITGATE_ADMIN_TOKEN", "ops-admin-token")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            command.env(k, v);
        }
        Running {
            child: command.spawn().unwrap(),
            log,
            port,
            admin_port,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let up = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        while !(up(self.port) && up(self.admin_port)) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("creditgate run exited with {status}: {}", self.logs());
            }
            assert!(Instant::now() < deadline, "not listening: {}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status, if the process exits within `within`.
    fn exit_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A gateway on the memory store in front of `backend`, with an admin listener;
/// alice (key `ALICE_KEY`) has 10 credits; `image.generate` costs 3, `image.huge` 50.
fn run_policy(backend: &str, gateway_extra: &str) -> String {
    format!(
        r#"version = 1
[gateway]
listen = "127.0.0.1:{{PORT}}"
admin_listen = "127.0.0.1:{{ADMIN_PORT}}"
{gateway_extra}
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
[[operations]]
name = "image.huge"
method = "POST"
path = "/v1/images/huge"
upstream = "main"
price = 50
[[accounts]]
id = "alice"
plan = "free"
grants = [ {{ kind = "topup", credits = 10 }} ]
keys = [ {{ member = "alice", key_env = "OPS_ALICE_KEY" }} ]
"#
    )
}

const OPS_KEY: &str = "sk-ops-alice-0123456789";

async fn mock() -> MockBackend {
    MockBackend::start(TcpListener::bind("127.0.0.1:0").await.unwrap()).unwrap()
}

#[test]
fn run_exits_1_at_once_naming_the_address_a_listener_cannot_bind() {
    for taken_side in ["listen", "admin_listen"] {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let (port, admin_port) = match taken_side {
            "listen" => (taken_port, free_port()),
            _ => (free_port(), taken_port),
        };
        let mut gw = Running::spawn(
            "taken",
            &run_policy("http://127.0.0.1:9", ""),
            port,
            admin_port,
            &[("OPS_ALICE_KEY", OPS_KEY)],
        );
        let status = gw.exit_within(AT_ONCE);
        let logs = gw.logs();
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(1),
            "{taken_side} taken: {logs}"
        );
        assert!(
            logs.contains(&format!("127.0.0.1:{taken_port}")),
            "{taken_side} taken: the error names the address: {logs}"
        );
        assert!(
            !logs.contains("is listening"),
            "{taken_side} taken: nothing claims to listen: {logs}"
        );
        drop(taken);
    }
}

#[test]
fn sigterm_on_an_idle_gateway_exits_0_at_once() {
    // The default shutdown_grace (30 s) applies: an idle gateway must not wait it out.
    let mut gw = Running::spawn(
        "idle-term",
        &run_policy("http://127.0.0.1:9", ""),
        free_port(),
        free_port(),
        &[("OPS_ALICE_KEY", OPS_KEY)],
    );
    gw.wait_listening();
    gw.signal("TERM");
    let status = gw.exit_within(AT_ONCE);
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(0)),
        "exits 0 at once: {}",
        gw.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_request_in_flight_is_not_ready_waits_for_it_and_exits_0() {
    let backend = mock().await;
    let mut gw = Running::spawn(
        "busy-term",
        &run_policy(
            &format!("http://{}", backend.addr),
            "shutdown_grace = \"20s\"",
        ),
        free_port(),
        free_port(),
        &[("OPS_ALICE_KEY", OPS_KEY)],
    );
    gw.wait_listening();
    let client = reqwest::Client::new();
    let ready = client
        .get(format!("{}/readyz", gw.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let slow = client
        .post(format!("{}/v1/images", gw.url()))
        .bearer_auth(OPS_KEY)
        .header("x-mock-delay-ms", "2000")
        .send();
    let in_flight = tokio::spawn(slow);
    eventually(|| async { !backend.received().is_empty() }).await;
    gw.signal("TERM");
    // Draining: the admin listener still answers, and says not ready.
    let admin = gw.admin_url();
    let mut last = None;
    for _ in 0..200 {
        let status = client
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .map(|r| r.status().as_u16());
        if let Ok(503) = status {
            last = Some(503);
            break;
        }
        last = status.ok();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(last, Some(503), "/readyz says 503 while draining");
    let resp = in_flight
        .await
        .unwrap()
        .expect("the in-flight request finishes");
    assert_eq!(resp.status(), 200);
    let status = tokio::task::spawn_blocking(move || {
        let status = gw.exit_within(AT_ONCE);
        (status, gw.logs())
    })
    .await
    .unwrap();
    assert_eq!(status.0.map(|s| s.code()), Some(Some(0)), "{}", status.1);
}

/// The access log line of a request, by its `x-request-id`: the `fields` of the
/// JSON line the gateway wrote for it at `info`.
fn access_line(logs: &str, request_id: &str) -> Value {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["request_id"] == request_id && l["fields"]["message"] == "request")
        .map(|l| {
            assert_eq!(l["level"], "INFO", "{l}");
            l["fields"].clone()
        })
        .unwrap_or_else(|| panic!("no access line for {request_id}: {logs}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_one_line_per_request_with_its_fields_and_no_key() {
    let backend = mock().await;
    let mut gw = Running::spawn(
        "access",
        &run_policy(&format!("http://{}", backend.addr), ""),
        free_port(),
        free_port(),
        &[
            ("OPS_ALICE_KEY", OPS_KEY),
            ("CREDITGATE_LOG_FORMAT", "json"),
        ],
    );
    gw.wait_listening();
    let client = reqwest::Client::new();
    let send = |path: &str, status: &str| {
        client
            .post(format!("{}{path}", gw.url()))
            .bearer_auth(OPS_KEY)
            .header("x-mock-status", status)
            .send()
    };
    let id = |resp: &reqwest::Response| header(resp, "x-request-id").to_string();
    let settled = send("/v1/images", "200").await.unwrap();
    assert_eq!(settled.status(), 200);
    let released = send("/v1/images", "500").await.unwrap();
    assert_eq!(released.status(), 500);
    let refused = send("/v1/images/huge", "200").await.unwrap();
    assert_eq!(refused.status(), 402);
    let (settled, released, refused) = (id(&settled), id(&released), id(&refused));
    let (log, last) = (gw.log.clone(), refused.clone());
    eventually(move || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let last = last.clone();
        async move { text.contains(&last) }
    })
    .await;
    let logs = gw.logs();
    let (settled, released, refused) = (
        access_line(&logs, &settled),
        access_line(&logs, &released),
        access_line(&logs, &refused),
    );
    for line in [&settled, &released, &refused] {
        for field in [
            "request_id",
            "account",
            "member",
            "key_id",
            "operation",
            "method",
            "path",
            "status",
            "held",
            "charged",
            "outcome",
            "total_ms",
        ] {
            assert!(line.get(field).is_some(), "{field} missing: {line}");
        }
        assert_eq!(line["account"], "alice", "{line}");
        assert_eq!(line["member"], "alice", "{line}");
        assert_eq!(line["method"], "POST", "{line}");
    }
    assert_eq!(settled["operation"], "image.generate");
    assert_eq!(settled["path"], "/v1/images");
    assert_eq!(
        (
            &settled["status"],
            &settled["outcome"],
            &settled["held"],
            &settled["charged"]
        ),
        (
            &Value::from(200),
            &Value::from("settled"),
            &Value::from("3"),
            &Value::from("3")
        )
    );
    assert_eq!(
        (
            &released["status"],
            &released["outcome"],
            &released["charged"]
        ),
        (
            &Value::from(500),
            &Value::from("released"),
            &Value::from("0")
        )
    );
    assert_eq!(
        (&refused["status"], &refused["outcome"], &refused["charged"]),
        (
            &Value::from(402),
            &Value::from("insufficient_credits"),
            &Value::from("0")
        )
    );
    assert_eq!(refused["operation"], "image.huge");
    // Only what reached an upstream has an upstream time.
    assert!(settled["upstream_ms"].is_u64() && released["upstream_ms"].is_u64());
    assert!(refused.get("upstream_ms").is_none(), "{refused}");
    assert!(!logs.contains(OPS_KEY), "a key reached the log");
}

// --- HTTPS upstreams -------------------------------------------------------

/// Makes a CA and a server certificate for `localhost` signed by it with the
/// `openssl` command; returns (CA file, certificate file, key file).
fn make_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let path = |f: &str| dir.join(format!("{name}-{f}"));
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command is needed by this test: apt-get install openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (ca_key, ca, key, csr, cert, ext) = (
        path("ca.key"),
        path("ca.pem"),
        path("server.key"),
        path("server.csr"),
        path("server.pem"),
        path("ext.cnf"),
    );
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN=creditgate test CA {name}"),
        "-keyout",
        &s(&ca_key),
        "-out",
        &s(&ca),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &s(&key),
        "-out",
        &s(&csr),
    ]);
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca),
        "-CAkey",
        &s(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &s(&ext),
        "-out",
        &s(&cert),
    ]);
    (ca, cert, key)
}

/// A TLS front for `backend`: accepts TLS with `cert`/`key` on 127.0.0.1:0 and
/// relays the plaintext to the mock. Returns its port.
async fn tls_front(backend: std::net::SocketAddr, cert: &Path, key: &Path) -> u16 {
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).unwrap(),
    ))
    .collect::<Result<_, _>>()
    .unwrap();
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).unwrap(),
    ))
    .unwrap()
    .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

fn https_policy(port: u16, tls: &str) -> String {
    POLICY
        .replace("{CREDITS}", "10")
        .replace("{READ_TIMEOUT}", "5s")
        .replace(
            "url = \"${BACKEND_URL}\"",
            &format!("url = \"https://127.0.0.1:{port}\"\ntls = {tls}"),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_with_a_private_ca_is_served_and_a_wrong_ca_is_a_502_that_releases() {
    let dir = temp_dir("tls");
    let (ca, cert, key) = make_ca(&dir, "right");
    let (other_ca, _, _) = make_ca(&dir, "wrong");
    let tls = |ca: &Path| {
        format!(
            "{{ ca_file = \"{}\", server_name = \"localhost\" }}",
            ca.display()
        )
    };

    // The backend sits behind TLS; the gateway trusts its CA.
    let backend = mock().await;
    let port = tls_front(backend.addr, &cert, &key).await;
    let text = https_policy(port, &tls(&ca));
    let gw = start_policy(move |_| text, |_| None).await;
    let resp = gw.post("/v1/images").send().await.unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    let t = gw.settled("alice").await;
    assert_eq!(t.charged, credits("3"));
    let got = backend.received();
    let last = got
        .last()
        .expect("the request reached the backend over TLS");
    assert_eq!(last.path, "/v1/images");
    assert_eq!(
        last.header("host"),
        Some(format!("127.0.0.1:{port}").as_str()),
        "Host is the URL's"
    );
    assert_eq!(last.header("authorization"), Some("Bearer backend-secret"));

    // Signed by another CA: 502, nothing charged, the hold released.
    let text = https_policy(port, &tls(&other_ca));
    let gw = start_policy(move |_| text, |_| None).await;
    let before = backend.received().len();
    let resp = gw.post("/v1/images").send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "upstream_unavailable");
    let t = gw.settled("alice").await;
    assert_eq!(
        (t.charged, t.held, t.available),
        (credits("0"), credits("0"), credits("10"))
    );
    assert_eq!(
        backend.received().len(),
        before,
        "nothing reached the backend"
    );

    // verify = false trusts any certificate (for a test backend only).
    let text = https_policy(
        port,
        &format!(
            "{{ ca_file = \"{}\", server_name = \"localhost\", verify = false }}",
            other_ca.display()
        ),
    );
    let gw = start_policy(move |_| text, |_| None).await;
    let resp = gw.post("/v1/images").send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[test]
fn check_refuses_a_tls_table_on_an_http_upstream_and_a_missing_ca_file() {
    let dir = temp_dir("tls-check");
    for (upstream, expected) in [
        (
            "url = \"http://127.0.0.1:1\"\ntls = { verify = false }",
            "tls applies only to an https:// url",
        ),
        (
            "url = \"https://127.0.0.1:1\"\ntls = { ca_file = \"/nonexistent/ca.pem\" }",
            "/nonexistent/ca.pem",
        ),
    ] {
        let file = dir.join("tls.toml");
        std::fs::write(
            &file,
            format!(
                "version = 1\n[upstreams.main]\n{upstream}\n[plans.free]\nmonthly_credits = 0\n"
            ),
        )
        .unwrap();
        let out = creditgate()
            .args(["check", "--policy"])
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(expected), "{err}");
    }
}

// --- Client-side timeouts ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_its_head_a_byte_a_second_is_cut_off_while_others_are_served() {
    let text = POLICY
        .replace("{CREDITS}", "10")
        .replace("{READ_TIMEOUT}", "5s")
        .replace(
            "[gateway]",
            "[gateway]\nheader_read_timeout = \"1s\"\nmax_connections = 4",
        );
    let gw = start_policy(move |_| text, |_| None).await;
    let addr = gw.url.trim_start_matches("http://").to_string();
    let slow = tokio::spawn(async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("POST /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE_KEY}\r\nX-Padding: {}\r\n\r\n", "p".repeat(64));
        let started = Instant::now();
        for byte in head.bytes() {
            if stream.write_all(&[byte]).await.is_err() {
                break;
            }
            // Cut off: the gateway answered or closed. A read that returns at once says so.
            let mut buf = [0u8; 512];
            if let Ok(read) =
                tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await
            {
                return (
                    started.elapsed(),
                    String::from_utf8_lossy(&buf[..read.unwrap_or(0)]).into_owned(),
                );
            }
        }
        (started.elapsed(), "sent the whole head".to_string())
    });
    // Meanwhile, others are served.
    for _ in 0..3 {
        let resp = gw.post("/v1/images").send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let (took, answer) = slow.await.unwrap();
    assert_ne!(
        answer, "sent the whole head",
        "the slow client was never cut off"
    );
    assert!(took < Duration::from_secs(60), "cut off after {took:?}");
    if !answer.is_empty() {
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    }
    let t = gw.settled("alice").await;
    assert_eq!(
        t.charged,
        credits("9"),
        "only the three served requests were charged"
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_keepalive_timeout() {
    let text = POLICY
        .replace("{CREDITS}", "10")
        .replace("{READ_TIMEOUT}", "5s")
        .replace(
            "[gateway]",
            "[gateway]\nkeepalive_timeout = \"1s\"\nmax_connections = 1",
        );
    let gw = start_policy(move |_| text, |_| None).await;
    let addr = gw.url.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head =
        format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE_KEY}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    // The connection stays open, idle, holding the one slot; the gateway closes it.
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle connection was never closed");
    // Its slot is free again: another client is served.
    let resp = gw.get("/v1/models").send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_bad_request_head_is_answered_in_json() {
    let gw = start("10").await;
    let answer = crate::harness::raw_exchange(
        &gw.url,
        b"POST /v1/images HTTP/1.1\r\nHost x\r\nBad Header Line\r\n\r\n",
        b"",
        false,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{answer}"
    );
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    let json: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert_eq!(json["error"]["type"], "invalid_request");
    assert_eq!(json["error"]["code"], "invalid_request");
}

// --- Errors SDKs read --------------------------------------------------------

const QUOTA_POLICY: &str = r#"
version = 1
[upstreams.main]
url = "${BACKEND_URL}"
[plans.free]
monthly_credits = 0
features = []
quotas = { basic_images = 1 }
[plans.pro]
monthly_credits = 0
features = ["premium"]
[[operations]]
name = "image.basic"
method = "POST"
path = "/v1/images/basic"
upstream = "main"
quota = "basic_images"
price = 0
[[operations]]
name = "image.generate"
method = "POST"
path = "/v1/images"
upstream = "main"
price = 3
[[operations]]
name = "image.premium"
method = "POST"
path = "/v1/images/premium"
upstream = "main"
requires = ["premium"]
price = 1
[[accounts]]
id = "alice"
plan = "free"
grants = [ { kind = "topup", credits = 1 } ]
keys = [ { member = "alice", key_env = "ALICE_KEY" } ]
"#;

#[tokio::test]
async fn every_error_carries_code_and_an_exhausted_quota_says_when_it_refills() {
    let gw = start_policy(|_| QUOTA_POLICY.to_string(), |_| None).await;
    let resp = gw.post("/v1/images/basic").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    gw.settled("alice").await;
    let resp = gw.post("/v1/images/basic").send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let retry_after: u64 = header(&resp, "retry-after")
        .parse()
        .expect("Retry-After in seconds");
    let view = creditgate::store::Store::account(gw.store.as_ref(), "alice", gw.now_ms())
        .await
        .unwrap();
    assert_eq!(
        retry_after,
        (view.next_refill_ms - gw.now_ms()).div_ceil(1000)
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "quota_exhausted");
    assert_eq!(body["error"]["code"], "quota_exhausted");

    for (method, path, key, status, kind) in [
        (
            Method::POST,
            "/v1/images",
            ALICE_KEY,
            402,
            "insufficient_credits",
        ),
        (
            Method::POST,
            "/v1/images/premium",
            ALICE_KEY,
            403,
            "plan_required",
        ),
        (
            Method::POST,
            "/v1/nothing",
            ALICE_KEY,
            404,
            "unknown_operation",
        ),
        (
            Method::POST,
            "/v1/images",
            "sk-nobody-0123456789",
            401,
            "invalid_api_key",
        ),
        (Method::POST, "/v1/a%2Fb", ALICE_KEY, 400, "invalid_request"),
    ] {
        let resp = gw.call(method, path, key).send().await.unwrap();
        assert_eq!(resp.status(), status, "{path}");
        assert!(resp.headers().get("retry-after").is_none(), "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["type"], kind, "{body}");
        assert_eq!(body["error"]["code"], kind, "{body}");
    }
}

// --- Metrics -----------------------------------------------------------------

fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.parse().unwrap())
}

/// Some traffic of every kind, then the gateway's `/metrics`.
async fn scrape_after_traffic(gw: &TestGateway) -> String {
    assert_eq!(gw.post("/v1/images").send().await.unwrap().status(), 200);
    let released = gw
        .post("/v1/images")
        .header("x-mock-status", "503")
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 503);
    assert_eq!(
        gw.post("/v1/images/premium").send().await.unwrap().status(),
        403
    );
    assert_eq!(gw.post("/v1/refused").send().await.unwrap().status(), 502);
    assert_eq!(gw.post("/v1/nothing").send().await.unwrap().status(), 404);
    let reload = gw
        .admin(Method::POST, "/admin/policy/reload")
        .send()
        .await
        .unwrap();
    assert_eq!(
        reload.status(),
        409,
        "no policy file: the reload is refused"
    );
    gw.settled("alice").await;
    let resp = gw.admin(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

#[tokio::test]
async fn metrics_count_a_403_under_its_operation_and_time_each_operation() {
    let gw = start("10").await;
    let scrape = scrape_after_traffic(&gw).await;
    let series = |s: &str| sample(&scrape, s);
    assert_eq!(
        series("creditgate_requests_total{operation=\"image.premium\",outcome=\"plan_required\"}"),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(
        series("creditgate_requests_total{operation=\"unmatched\",outcome=\"unknown_operation\"}"),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(
        series("creditgate_request_duration_seconds_count{operation=\"image.generate\"}"),
        Some(2.0),
        "{scrape}"
    );
    assert_eq!(
        series("creditgate_upstream_duration_seconds_count{operation=\"image.generate\"}"),
        Some(2.0),
        "{scrape}"
    );
    assert_eq!(
        series(
            "creditgate_request_duration_seconds_bucket{operation=\"image.generate\",le=\"+Inf\"}"
        ),
        Some(2.0),
        "{scrape}"
    );
    for (class, n) in [("2xx", 1.0), ("5xx", 1.0)] {
        assert_eq!(
            series(&format!(
                "creditgate_upstream_responses_total{{operation=\"image.generate\",class=\"{class}\"}}"
            )),
            Some(n),
            "{scrape}"
        );
    }
    assert_eq!(
        series("creditgate_upstream_responses_total{operation=\"refused.op\",class=\"error\"}"),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(
        series(&format!(
            "creditgate_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(
        series("creditgate_policy_reloads_total{result=\"refused\"}"),
        Some(1.0),
        "{scrape}"
    );
    promtool(&["check", "metrics"], Some(&scrape));
}

/// Runs `promtool` (Debian's `prometheus` package; `scripts/test` installs it),
/// failing the test with its output when it finds a problem.
fn promtool(args: &[&str], stdin: Option<&str>) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is needed by this test: apt-get install prometheus");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "promtool {args:?}: {out}");
    // `check metrics` reports lint problems on its output with a zero status in
    // some versions: any line it prints is a problem.
    if args == ["check", "metrics"] {
        assert!(out.trim().is_empty(), "promtool check metrics: {out}");
    }
}

#[tokio::test]
async fn a_reload_that_changes_the_listeners_deadlines_is_refused_and_counted() {
    let dir = temp_dir("reload");
    let file = dir.join("policy.toml");
    let policy = |backend: &str, gateway: &str| {
        format!(
            "version = 1\n[gateway]\n{gateway}\n[upstreams.main]\nurl = \"{backend}\"\n\
             [plans.free]\nmonthly_credits = 0\n[[operations]]\nname = \"a\"\npath = \"/a\"\n\
             upstream = \"main\"\nprice = 1\n"
        )
    };
    let (written, backend_seen) = (file.clone(), Arc::new(std::sync::Mutex::new(String::new())));
    let seen = backend_seen.clone();
    let gw = crate::harness::start_policy_with_file(
        move |backend| {
            *seen.lock().unwrap() = backend.to_string();
            let text = policy(backend, "");
            std::fs::write(&written, &text).unwrap();
            text
        },
        |_| None,
        Some(file.clone()),
    )
    .await;
    let backend = backend_seen.lock().unwrap().clone();
    let reload = || gw.admin(Method::POST, "/admin/policy/reload").send();
    assert_eq!(
        reload().await.unwrap().status(),
        200,
        "the same file reloads"
    );
    for change in [
        "header_read_timeout = \"3s\"",
        "keepalive_timeout = \"3s\"",
        "shutdown_grace = \"3s\"",
    ] {
        std::fs::write(&file, policy(&backend, change)).unwrap();
        assert_eq!(reload().await.unwrap().status(), 409, "{change}");
    }
    std::fs::write(&file, policy(&backend, "body_read_timeout = \"3s\"")).unwrap();
    assert_eq!(
        reload().await.unwrap().status(),
        200,
        "body_read_timeout applies at once"
    );
    let scrape = gw
        .admin(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        sample(
            &scrape,
            "creditgate_policy_reloads_total{result=\"refused\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(&scrape, "creditgate_policy_reloads_total{result=\"ok\"}"),
        Some(2.0)
    );
}

// --- check --no-env ----------------------------------------------------------

#[test]
fn check_no_env_validates_a_policy_without_its_secrets() {
    let dir = temp_dir("no-env");
    let file = dir.join("secrets.toml");
    let text = r#"version = 1
[gateway]
listen = "${LISTEN_ADDR}"
upgrade_url = "${UPGRADE_URL}"
[upstreams.main]
url = "${BACKEND_URL}"
set_headers = { authorization = "Bearer ${BACKEND_TOKEN}" }
[upstreams.hosted]
url = "https://${HOSTED_HOST}:${HOSTED_PORT}"
[plans.free]
monthly_credits = 0
seats = 2
[[operations]]
name = "image.generate"
path = "/v1/images"
upstream = "main"
price = 3
[[accounts]]
id = "a"
plan = "free"
keys = [ { member = "m", key_env = "A_KEY" }, { member = "n", key_env = "B_KEY" } ]
"#;
    std::fs::write(&file, text).unwrap();
    let check = |extra: &[&str]| {
        creditgate()
            .args(["check", "--policy"])
            .arg(&file)
            .args(extra)
            .env_clear()
            .output()
            .unwrap()
    };
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("BACKEND_URL is not set"));
    let out = check(&["--no-env"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("image.generate"));
    // A real mistake is still one.
    std::fs::write(&file, text.replace("price = 3", "price = 0.0001")).unwrap();
    let out = check(&["--no-env"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("more than 3 decimal places"));
    // Every shipped policy passes without its environment.
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    for entry in std::fs::read_dir(policies).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = creditgate()
                .args(["check", "--no-env", "--policy"])
                .arg(&path)
                .env_clear()
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn help_describes_every_command_its_arguments_and_the_environment() {
    let help = |args: &[&str]| {
        let out = creditgate().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let top = help(&["--help"]);
    for word in [
        "run",
        "check",
        "quote",
        "demo",
        "CREDITGATE_ADMIN_TOKEN",
        "RUST_LOG",
        "CREDITGATE_LOG_FORMAT",
        "${VAR}",
    ] {
        assert!(top.contains(word), "creditgate --help lacks {word}: {top}");
    }
    let run = help(&["run", "--help"]);
    for word in ["--policy", "SIGTERM", "SIGHUP", "exit"] {
        assert!(run.contains(word), "run --help lacks {word}: {run}");
    }
    let check = help(&["check", "--help"]);
    assert!(check.contains("--no-env"), "{check}");
    let quote = help(&["quote", "--help"]);
    for word in ["METHOD", "PATH", "BODY", "--header"] {
        assert!(quote.contains(word), "quote --help lacks {word}: {quote}");
    }
}

// --- Deployment files --------------------------------------------------------

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn yaml_docs(path: &Path) -> Vec<yaml_rust2::Yaml> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    yaml_rust2::YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `creditgate_*` metric name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("creditgate_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

#[tokio::test]
async fn the_deployment_files_parse_and_reference_only_what_exists() {
    let gw = start("10").await;
    let scrape = scrape_after_traffic(&gw).await;
    let exists = |name: &str| {
        scrape
            .lines()
            .any(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
    };

    // Grafana: valid JSON whose queries name only metrics a real scrape has.
    let dashboard = std::fs::read_to_string(repo("deploy/grafana/creditgate.json")).unwrap();
    let json: Value = serde_json::from_str(&dashboard).unwrap();
    assert!(
        json["panels"].as_array().is_some_and(|p| p.len() >= 6),
        "a dashboard with panels"
    );
    let names = metric_names(&dashboard);
    assert!(names.len() >= 8, "{names:?}");
    for name in &names {
        assert!(
            exists(name),
            "the dashboard queries {name}, which /metrics does not have"
        );
    }

    // Prometheus alert rules: promtool accepts them; they name only real metrics.
    let alerts_path = repo("deploy/prometheus/alerts.yml");
    promtool(&["check", "rules", alerts_path.to_str().unwrap()], None);
    let alerts = std::fs::read_to_string(&alerts_path).unwrap();
    for name in metric_names(&alerts) {
        assert!(
            exists(&name),
            "an alert uses {name}, which /metrics does not have"
        );
    }
    for must in [
        "creditgate_store_errors_total",
        "creditgate_unmetered_total",
        "creditgate_holds_expired_total",
        "creditgate_request_duration_seconds_bucket",
        "creditgate_requests_total",
    ] {
        assert!(alerts.contains(must), "no alert on {must}");
    }

    // Kubernetes: a Deployment with probes and a termination period longer than
    // its preStop pause plus the policy's shutdown_grace; a Service, a PDB, and the
    // policy in a ConfigMap that `creditgate check` accepts.
    let mut kinds = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(repo("deploy/kubernetes")).unwrap() {
        let path = entry.unwrap().path();
        for doc in yaml_docs(&path) {
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no kind", path.display()))
                .to_string();
            kinds.insert(kind, doc);
        }
    }
    for kind in ["Deployment", "Service", "PodDisruptionBudget", "ConfigMap"] {
        assert!(kinds.contains_key(kind), "deploy/kubernetes has no {kind}");
    }
    let policy_text = kinds["ConfigMap"]["data"]["policy.toml"]
        .as_str()
        .expect("the policy in the ConfigMap")
        .to_string();
    let dir = temp_dir("k8s");
    let policy_file = dir.join("policy.toml");
    std::fs::write(&policy_file, &policy_text).unwrap();
    let out = creditgate()
        .args(["check", "--no-env", "--policy"])
        .arg(&policy_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grace_ms = creditgate::policy::Policy::load_without_env(&policy_file)
        .unwrap()
        .gateway
        .shutdown_grace_ms;
    let admin_port = policy_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("admin_listen = \"0.0.0.0:"))
        .and_then(|p| p.trim_end_matches('"').parse::<i64>().ok())
        .expect("the ConfigMap's policy has an admin listener on 0.0.0.0");
    let spec = &kinds["Deployment"]["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(
            container[probe]["httpGet"]["path"].as_str(),
            Some(path),
            "{probe}"
        );
        assert_eq!(
            container[probe]["httpGet"]["port"].as_i64(),
            Some(admin_port),
            "{probe}"
        );
    }
    let pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        .as_vec()
        .expect("a preStop pause, so endpoints drop the pod before it stops accepting");
    let pause_s: i64 = pre_stop
        .iter()
        .filter_map(|c| c.as_str())
        .find_map(|c| c.parse().ok())
        .expect("the preStop pause in seconds");
    let period = spec["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        period * 1000 > pause_s * 1000 + grace_ms as i64,
        "terminationGracePeriodSeconds {period} must exceed the preStop pause {pause_s} s + shutdown_grace {grace_ms} ms"
    );
    let volumes = format!("{:?}", spec["volumes"]);
    assert!(volumes.contains(kinds["ConfigMap"]["metadata"]["name"].as_str().unwrap()));
    assert_eq!(
        kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    );

    // docker-compose: healthchecks; the gateway waits for a healthy backend (and, with
    // the Redis override, a healthy Redis); an admin listener; the store's volume.
    let compose = &yaml_docs(&repo("docker-compose.yml"))[0];
    for service in ["gateway", "backend"] {
        assert!(
            !compose["services"][service]["healthcheck"].is_badvalue(),
            "{service} has no healthcheck"
        );
    }
    assert_eq!(
        compose["services"]["gateway"]["depends_on"]["backend"]["condition"].as_str(),
        Some("service_healthy")
    );
    assert!(format!("{:?}", compose["services"]["gateway"]["volumes"]).contains("creditgate-data"));
    let with_redis = &yaml_docs(&repo("docker-compose.redis.yml"))[0];
    assert!(
        !with_redis["services"]["redis"]["healthcheck"].is_badvalue(),
        "redis has no healthcheck"
    );
    assert_eq!(
        with_redis["services"]["gateway"]["depends_on"]["redis"]["condition"].as_str(),
        Some("service_healthy")
    );
    for (file, store) in [
        ("policies/compose.toml", "sqlite"),
        ("policies/compose-redis.toml", "redis"),
    ] {
        let compose_policy = std::fs::read_to_string(repo(file)).unwrap();
        assert!(
            compose_policy.contains("admin_listen"),
            "{file}: compose runs an admin listener"
        );
        assert!(
            compose_policy.contains(&format!("kind = \"{store}\"")),
            "{file}: the {store} store"
        );
        let policy = creditgate::policy::Policy::parse(
            &compose_policy,
            &repo(file).display().to_string(),
            &|_| None,
        )
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(policy.gateway.admin_listen.is_some(), "{file}");
    }
}
