//! The `creditgate` binary as a user runs it.

use std::process::Command;

fn creditgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_creditgate"))
}

#[test]
fn check_passes_on_every_shipped_policy() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = creditgate()
                .args(["check", "--policy"])
                .arg(&path)
                .env("DEMO_BACKEND_URL", "http://127.0.0.1:9")
                .env("DEMO_KEY", "k")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[test]
fn check_prints_operations_and_prices() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/policies/demo.toml");
    let out = creditgate()
        .args(["check", "--policy", path])
        .env("DEMO_BACKEND_URL", "http://127.0.0.1:9")
        .env("DEMO_KEY", "k")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("chat.edit"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("chat.edit") && l.contains("0.5 credits")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("models.list") && l.contains(" 0 credits")),
        "{text}"
    );
}

#[test]
fn check_refuses_a_bad_policy_with_file_line_col() {
    let dir = std::env::temp_dir().join(format!("creditgate-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "version = 1\n[upstreams.main]\nurl = \"http://127.0.0.1:1\"\n[[operations]]\nname = \"a\"\npath = \"/a\"\nupstream = \"nope\"\nprice = 0.0001\n",
    )
    .unwrap();
    let out = creditgate()
        .args(["check", "--policy"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    assert!(
        err.contains(&format!("{file}:7:12: unknown upstream \"nope\"")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{file}:8:9: price: more than 3 decimal places")),
        "{err}"
    );
    let out = creditgate()
        .args(["check", "--policy", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the policy file"));
}

/// Kills the child when the test ends, pass or fail.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_port(addr: &str) {
    for _ in 0..600 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("nothing listens on {addr} after 30 s");
}

/// A port free right now. `creditgate run` binds the policy's address itself, so
/// this one test cannot hand it a bound listener.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is needed by this test: apt-get install curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn run_serves_the_policy_on_its_listen_address() {
    let backend_port = free_port();
    let gateway_port = free_port();
    let mut backend = Child(
        creditgate()
            .args([
                "mock-backend",
                "--listen",
                &format!("127.0.0.1:{backend_port}"),
            ])
            .spawn()
            .unwrap(),
    );
    let dir = std::env::temp_dir().join(format!("creditgate-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("run.toml");
    std::fs::write(
        &policy,
        format!(
            "version = 1\n[gateway]\nlisten = \"127.0.0.1:{gateway_port}\"\n[upstreams.main]\nurl = \"http://127.0.0.1:{backend_port}\"\n\
             [plans.free]\nmonthly_credits = 5\n[[operations]]\nname = \"image.generate\"\nmethod = \"POST\"\npath = \"/v1/images\"\nupstream = \"main\"\nprice = 2\n\
             [[operations]]\nname = \"tiered\"\npath = \"/v1/tiered\"\nupstream = \"main\"\n\
             price = {{ credits = {{ from = \"query:tier\", table = {{ a = 1 }}, default = 1 }} }}\n\
             [[accounts]]\nid = \"acme\"\nplan = \"free\"\nkeys = [ {{ member = \"a\", key_env = \"RUN_TEST_KEY\" }} ]\n"
        ),
    )
    .unwrap();
    let mut gateway = Child(
        creditgate()
            .args(["run", "--policy"])
            .arg(&policy)
            .env("RUN_TEST_KEY", "sk-run")
            .env("RUST_LOG", "debug")
            .env("CREDITGATE_LOG_FORMAT", "json")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for_port(&format!("127.0.0.1:{backend_port}"));
    wait_for_port(&format!("127.0.0.1:{gateway_port}"));
    let url = format!("http://127.0.0.1:{gateway_port}/v1/images");
    let first = curl(&["-X", "POST", &url, "-H", "Authorization: Bearer sk-run"]);
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(
        first
            .to_ascii_lowercase()
            .contains("x-credits-remaining: 3"),
        "{first}"
    );
    curl(&["-X", "POST", &url, "-H", "Authorization: Bearer sk-run"]);
    let third = curl(&["-X", "POST", &url, "-H", "Authorization: Bearer sk-run"]);
    assert!(third.starts_with("HTTP/1.1 402"), "{third}");
    assert!(third.contains("\"available\":1"), "{third}");
    let wrong = curl(&[
        "-X",
        "POST",
        &url,
        "-H",
        "Authorization: Bearer sk-wrong-key-9876",
    ]);
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    backend.0.kill().unwrap();
    // No log line, at any level, carries key material.
    gateway.0.kill().unwrap();
    let mut logs = String::new();
    std::io::Read::read_to_string(gateway.0.stderr.as_mut().unwrap(), &mut logs).unwrap();
    assert!(
        logs.contains("DEBUG") || logs.contains("INFO"),
        "the gateway logged: {logs}"
    );
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
        assert!(
            parsed.is_ok(),
            "CREDITGATE_LOG_FORMAT=json writes JSON lines: {line}"
        );
    }
    assert!(
        logs.contains("\"request_id\""),
        "request logs carry the request id: {logs}"
    );
    assert!(
        logs.contains("run.toml:18:73: note: default now applies only when query:tier is absent"),
        "run logs what check notes: {logs}"
    );
    for secret in ["sk-run", "sk-wrong-key-9876"] {
        assert!(!logs.contains(secret), "a key reached the logs: {secret}");
    }
}

/// The demo as a newcomer meets it: start it, paste its curl lines, see what
/// each line's comment promised.
#[test]
fn the_demo_curl_lines_behave_as_printed() {
    use std::io::{BufRead, BufReader};
    let mut demo = Child(
        creditgate()
            .arg("demo")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = demo.0.stdout.take().unwrap();
    let mut printed = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let done = line.starts_with("Press Ctrl-C");
        printed.push(line);
        if done {
            break;
        }
    }
    let key = printed
        .iter()
        .find_map(|l| l.trim().strip_prefix("export KEY="))
        .expect("the demo prints a key")
        .to_string();
    let mut tried = 0;
    for pair in printed.windows(2) {
        let (comment, command) = (&pair[0], &pair[1]);
        let Some(command) = command.strip_prefix("curl ") else {
            continue;
        };
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("curl --max-time 10 {command}"))
            .env("KEY", &key)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        // "-> 200, x-credits-remaining: 7": the status, then any header the line names.
        let promise = comment
            .split("-> ")
            .nth(1)
            .unwrap_or("")
            .to_ascii_lowercase();
        if let Some(status) = promise
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .filter(|s| s.len() == 3)
        {
            assert!(
                out.starts_with(&format!("http/1.1 {status}")),
                "{comment}\n{out}"
            );
        }
        for header in ["x-credits-remaining", "x-credits-held"] {
            if let Some(value) = promise.split(&format!("{header}: ")).nth(1) {
                let value = value.split([' ', ',']).next().unwrap();
                assert!(
                    out.contains(&format!("{header}: {value}\r\n")),
                    "{comment}\n{out}"
                );
            }
        }
        if comment.contains("stays") {
            let value = comment.rsplit(' ').next().unwrap();
            assert!(
                out.contains(&format!("x-credits-remaining: {value}\r\n")),
                "{comment}\n{out}"
            );
        }
        tried += 1;
    }
    assert_eq!(tried, 7, "{printed:#?}");
    // The last line cut the response mid-body; it must have charged nothing:
    // 10 - 3 (image) - 0.5 (edit) = 6.5 remain.
    let g = printed
        .iter()
        .find_map(|l| l.split("gateway on ").nth(1))
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string();
    let out = curl(&[
        &format!("{g}/v1/models"),
        "-H",
        &format!("Authorization: Bearer {key}"),
    ]);
    assert!(
        out.to_ascii_lowercase()
            .contains("x-credits-remaining: 6.5\r\n"),
        "{out}"
    );
    // Its store is the printed sqlite file, where the ledger reads as printed.
    let file = printed
        .iter()
        .find_map(|l| l.strip_prefix("Store file (deleted when the demo stops): "))
        .expect("the demo prints its store file")
        .to_string();
    // Settles are written after the answer: poll for them (10 s at most).
    let settles = || -> Vec<String> {
        let db = rusqlite::Connection::open_with_flags(
            &file,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut q = db
            .prepare("SELECT credits FROM ledger_readable WHERE account = 'demo' AND type = 'settle' ORDER BY seq")
            .unwrap();
        q.query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    };
    let mut charged = settles();
    for _ in 0..500 {
        if charged.len() >= 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        charged = settles();
    }
    assert_eq!(
        charged,
        ["3.000", "0.500"],
        "the demo's settles, in the file"
    );
    assert!(printed
        .iter()
        .any(|l| l.starts_with(&format!("sqlite3 {file} "))));
    drop(demo);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{file}{suffix}"));
    }
}

#[test]
fn run_refuses_a_non_loopback_admin_listener_without_a_token() {
    let dir = std::env::temp_dir().join(format!("creditgate-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("open.toml");
    std::fs::write(
        &policy,
        "version = 1\n[gateway]\nlisten = \"127.0.0.1:1\"\nadmin_listen = \"0.0.0.0:18081\"\n",
    )
    .unwrap();
    let out = creditgate()
        .args(["run", "--policy"])
        .arg(&policy)
        .env_remove("CREDITGATE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address: set CREDITGATE_ADMIN_TOKEN"),
        "{err}"
    );
}

/// `docker-compose.yml` (and its Redis override) parse, and have the services,
/// ports and volumes the README names; each gateway's policy passes `check`.
#[test]
fn docker_compose_has_what_the_readme_promises() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let services = |file: &str| {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let docs = yaml_rust2::YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}"));
        docs[0]["services"].clone()
    };
    let (compose, with_redis) = (
        services("docker-compose.yml"),
        services("docker-compose.redis.yml"),
    );
    for (services, service, port) in [
        (&compose, "gateway", "8080"),
        (&compose, "backend", "9000"),
        (&with_redis, "redis", "6379"),
    ] {
        let s = &services[service];
        assert!(!s.is_badvalue(), "service {service} is missing");
        let ports: Vec<String> = ["ports", "expose"]
            .iter()
            .flat_map(|k| s[*k].as_vec().cloned().unwrap_or_default())
            .filter_map(|p| p.as_str().map(str::to_string))
            .collect();
        assert!(
            ports.iter().any(|p| p.split(':').next_back() == Some(port)),
            "{service} does not expose {port}: {ports:?}"
        );
        assert!(
            readme.contains(service) && readme.contains(port),
            "the README names {service} and {port}"
        );
    }
    assert!(
        with_redis["redis"]["command"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|a| a.as_str() == Some("--appendonly")),
        "Redis runs with AOF"
    );
    let policy_of = |services: &yaml_rust2::Yaml| {
        services["gateway"]["command"]
            .as_vec()
            .unwrap()
            .last()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(policy_of(&compose).ends_with("policies/compose.toml"));
    assert!(policy_of(&with_redis).ends_with("policies/compose-redis.toml"));
    // The sqlite file is on the named volume the gateway mounts.
    let mounts: Vec<String> = compose["gateway"]["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    assert_eq!(mounts, ["creditgate-data:/var/lib/creditgate"]);
    let policy = std::fs::read_to_string(format!("{root}/policies/compose.toml")).unwrap();
    assert!(policy.contains("path = \"/var/lib/creditgate/creditgate.db\""));
    assert!(readme.contains("creditgate-data"));
    for file in ["compose.toml", "compose-redis.toml"] {
        let out = creditgate()
            .args(["check", "--policy", &format!("{root}/policies/{file}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `creditgate quote` prices as the gateway does: fixed, from the body, from a
/// header (`--header`), unmatched pass-through; bad input is a JSON error and exit 1.
#[test]
fn quote_prices_fixed_body_and_header_requests_and_refuses_bad_input() {
    let dir = std::env::temp_dir().join(format!("creditgate-quote-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("quote.toml");
    std::fs::write(
        &policy,
        r#"version = 1
[gateway]
unmatched = "allow"
default_upstream = "main"
[upstreams.main]
url = "http://127.0.0.1:9"
[plans.pro]
monthly_credits = 0
features = ["premium"]
[[operations]]
name = "image.generate"
method = "POST"
path = "/v1/images"
price = 3
[[operations]]
name = "video.generate"
method = "POST"
path = "/v1/videos"
requires = ["premium"]
price = { credits = 2, per = { from = "body:/duration_seconds", min = 1, max = 60 } }
[[operations]]
name = "chat.tiered"
method = "POST"
path = "/v1/chat"
price = { credits = { from = "header:x-tier", table = { fast = 1, best = 4.5 } } }
"#,
    )
    .unwrap();
    let quote = |args: &[&str]| {
        let out = creditgate()
            .args(["quote", "--policy"])
            .arg(&policy)
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let json: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout}"));
        (out.status.code(), json)
    };
    let ok = |json: serde_json::Value| (Some(0), json);
    use serde_json::json;
    assert_eq!(
        quote(&["POST", "/v1/images"]),
        ok(json!({"operation": "image.generate", "credits": 3, "requires": []}))
    );
    assert_eq!(
        quote(&["POST", "/v1/videos", r#"{"duration_seconds": 8}"#]),
        ok(json!({"operation": "video.generate", "credits": 16, "requires": ["premium"]}))
    );
    assert_eq!(
        quote(&["--header", "x-tier: best", "POST", "/v1/chat"]),
        ok(json!({"operation": "chat.tiered", "credits": 4.5, "requires": []}))
    );
    assert_eq!(
        quote(&["POST", "/v1/chat", "-H", "X-Tier:fast", "-H", "x-other: 1"]),
        ok(json!({"operation": "chat.tiered", "credits": 1, "requires": []}))
    );
    // unmatched = "allow": what the gateway does, a free pass-through.
    assert_eq!(
        quote(&["GET", "/v1/images"]),
        ok(json!({"operation": null, "credits": 0, "requires": [], "pass_through": true}))
    );
    // Bad input: the error a request would get, or what is wrong with the command line.
    let (code, json) = quote(&["POST", "/v1/chat"]);
    assert_eq!(code, Some(1), "{json}");
    assert_eq!(json["error"]["type"], "invalid_request");
    assert_eq!(json["error"]["source"], "header:x-tier");
    let (code, json) = quote(&["POST", "/v1/videos", "{not json"]);
    assert_eq!(code, Some(1), "{json}");
    assert_eq!(json["error"]["source"], "body:/duration_seconds");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not JSON"),
        "{json}"
    );
    // A body that repeats a key is refused, as the gateway refuses it.
    let (code, json) = quote(&[
        "POST",
        "/v1/videos",
        r#"{"duration_seconds": 60, "duration_seconds": 1}"#,
    ]);
    assert_eq!(code, Some(1), "{json}");
    assert_eq!(json["error"]["type"], "invalid_request");
    assert_eq!(json["error"]["source"], "body");
    let (code, json) = quote(&["--header", "x-tier best", "POST", "/v1/chat"]);
    assert_eq!(code, Some(1), "{json}");
    assert_eq!(json["error"]["type"], "invalid_request");
    assert_eq!(json["error"]["source"], "--header");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is not `name: value`"),
        "{json}"
    );
    assert!(json["error"].get("request_id").is_none(), "{json}");
}

/// `creditgate quote` prices the normalized path, and refuses a path the gateway
/// refuses, with the same error.
#[test]
fn quote_normalizes_the_path_as_the_gateway_does() {
    let dir = std::env::temp_dir().join(format!("creditgate-quote-path-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("quote.toml");
    std::fs::write(
        &policy,
        r#"version = 1
[gateway]
unmatched = "allow"
default_upstream = "main"
[upstreams.main]
url = "http://127.0.0.1:9"
[plans.free]
monthly_credits = 0
[[operations]]
name = "models.get"
path = "/v1/models/{id}"
price = 0
[[operations]]
name = "fast"
path = "/v1/fast"
price = 3
"#,
    )
    .unwrap();
    let quote = |path: &str| {
        let out = creditgate()
            .args(["quote", "--policy"])
            .arg(&policy)
            .args(["GET", path])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let json: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {stdout}"));
        (out.status.code(), json)
    };
    use serde_json::json;
    for path in ["/v1/f%61st", "/v1/images/../fast", "/v1//fast?x=%2F"] {
        assert_eq!(
            quote(path),
            (
                Some(0),
                json!({"operation": "fast", "credits": 3, "requires": []})
            ),
            "{path}"
        );
    }
    for path in [
        "/v1/models/..%2fimages%2fx",
        "/v1/models/..\\x",
        "/..",
        "/v1/%G1",
        "v1/fast",
    ] {
        let (code, json) = quote(path);
        assert_eq!(code, Some(1), "{path}: {json}");
        assert_eq!(json["error"]["type"], "invalid_request", "{path}: {json}");
        assert_eq!(json["error"]["source"], "path", "{path}: {json}");
    }
}

/// A table with `default` and no `otherwise` once priced an unlisted value with the
/// default; it now refuses it. `check` says so (a note: it still passes) and shows
/// `otherwise` where a table has one.
#[test]
fn check_notes_a_table_whose_default_no_longer_prices_unlisted_values() {
    let dir = std::env::temp_dir().join(format!("creditgate-note-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tables.toml");
    std::fs::write(
        &path,
        r#"version = 1
[upstreams.main]
url = "http://127.0.0.1:1"
[[operations]]
name = "batch"
path = "/v1/batch"
upstream = "main"
[operations.price]
credits = 1
multiplier = { from = "body:/n", table = { 1 = 1, 2 = 2 }, default = 1 }
[[operations]]
name = "batch.lenient"
path = "/v1/batch/lenient"
upstream = "main"
[operations.price]
credits = 0.5
per = { from = "body:/seconds", default = 8, min = 1, max = 60 }
multiplier = { from = "body:/n", table = { 1 = 1, 2 = 2 }, default = 1, otherwise = 3 }
"#,
    )
    .unwrap();
    let out = creditgate()
        .args(["check", "--policy"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let file = path.display().to_string();
    assert!(
        err.contains(&format!(
            "{file}:10:70: note: default now applies only when body:/n is absent; \
             a value not in the table is refused with 400 — add otherwise = 1 to keep \
             pricing it as before"
        )),
        "{err}"
    );
    assert_eq!(
        err.matches("note:").count(),
        1,
        "only the table without otherwise: {err}"
    );
    assert!(
        text.lines().any(|l| l.contains("batch.lenient")
            && l.contains("body:/seconds[1..60; default 8]")
            && l.contains("body:/n{1: 1, 2: 2; default 1; otherwise 3}")),
        "{text}"
    );
}

/// `quote` writes the amount exactly, however large: never through a float.
#[test]
fn quote_writes_a_huge_price_exactly() {
    let dir = std::env::temp_dir().join(format!("creditgate-huge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("huge.toml");
    std::fs::write(
        &policy,
        r#"version = 1
[upstreams.main]
url = "http://127.0.0.1:9"
[[operations]]
name = "everything"
path = "/v1/everything"
upstream = "main"
price = "18446744073709551.615"
[[operations]]
name = "almost"
path = "/v1/almost"
upstream = "main"
price = 9999999999999.999
"#,
    )
    .unwrap();
    for (path, credits) in [
        ("/v1/everything", "18446744073709551.615"),
        ("/v1/almost", "9999999999999.999"),
    ] {
        let out = creditgate()
            .args(["quote", "--policy"])
            .arg(&policy)
            .args(["POST", path])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{stdout}");
        assert!(
            stdout.contains(&format!(r#""credits":{credits}"#)),
            "{stdout}"
        );
    }
}
