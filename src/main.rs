//! The `creditgate` command: parse arguments, load, start — nothing else.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

/// mimalloc: the load bench serves ~17% more requests per second than on glibc's
/// allocator (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use creditgate::gateway::errors::ApiError;
use creditgate::gateway::{bind, run_server, Gateway, LiveGateway, StopSignals, Stopped};
use creditgate::policy::{
    format_duration, normalize_path, split_query, Evaluation, Policy, RequestFacts, StoreConfig,
    Verdict,
};
use creditgate::store::local::LocalStore;
use creditgate::store::redis::RedisStore;

/// What `--help` says after the commands: the environment every command reads.
const ENVIRONMENT: &str = "\
Environment:
  CREDITGATE_ADMIN_TOKEN  bearer token of the admin API (admin_listen); required
                          when admin_listen is not a loopback address
  RUST_LOG                log filter, e.g. info (the default), debug,
                          creditgate::access=off to silence the access log
  CREDITGATE_LOG_FORMAT   json: one JSON object per log line (default: text)
  ${VAR}                  any ${VAR} in the policy file (and each key_env) is read
                          from the environment; `check --no-env` validates without";

#[derive(Parser)]
#[command(
    name = "creditgate",
    version,
    about = "A credit-metering reverse proxy for AI generation APIs",
    long_about = "A credit-metering reverse proxy for AI generation APIs: it recognises each \
                  request as a priced operation of a TOML policy, holds the caller's credits \
                  before forwarding, settles or releases them afterwards, and answers \
                  structured JSON errors.",
    after_help = ENVIRONMENT
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway (and the admin API on admin_listen).
    #[command(after_help = "\
Binds listen and admin_listen first: an address it cannot have stops it at once with
exit status 1 and one line naming the address.
Signals: SIGTERM or SIGINT stop it gracefully — /readyz turns 503, nothing new is
accepted, requests in flight finish (at most shutdown_grace), then it exits: 0 when
every request finished (at once when none was in flight), 1 when the grace ran out.
SIGHUP reloads the policy file (an invalid file is logged and the running one stays).

Environment: CREDITGATE_ADMIN_TOKEN, RUST_LOG, CREDITGATE_LOG_FORMAT, and the policy's ${VAR}s.")]
    Run {
        /// The policy file (TOML).
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
    },
    /// Validate a policy and print every operation with its price; exit 1 with
    /// FILE:LINE:COL: message on any error.
    #[command(
        after_help = "Environment: the policy's ${VAR}s and key_env variables (unless --no-env)."
    )]
    Check {
        /// The policy file (TOML).
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// Validate without the environment: every ${VAR} and key_env reads as a
        /// placeholder, and checks only the real value could pass (an address, a
        /// URL's form, a CA file named by a variable) are skipped — for CI, where
        /// production secrets are absent.
        #[arg(long)]
        no_env: bool,
    },
    /// Price a request offline, as the gateway would (without an account:
    /// plan features and balance are not checked). Prints JSON; exit 1 when the
    /// gateway would refuse the request.
    #[command(
        after_help = "Example: creditgate quote --policy policies/demo.toml POST /v1/images/generations '{\"n\": 2}'\n\nEnvironment: the policy's ${VAR}s and key_env variables."
    )]
    Quote {
        /// The policy file (TOML).
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// A request header, `name: value` (repeatable), for prices and `when`s on
        /// `header:` values.
        #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// The request's method, e.g. POST.
        #[arg(value_name = "METHOD")]
        method: String,
        /// The request's path and query, e.g. /v1/images?size=large.
        #[arg(value_name = "PATH")]
        path: String,
        /// The request body, as JSON text.
        #[arg(value_name = "BODY_JSON")]
        body: Option<String>,
    },
    /// Start the gateway, a mock generation backend and a demo account (sqlite store
    /// in a temporary file, deleted when the demo stops); prints curl lines to try.
    Demo,
    /// Serve only the built-in mock generation backend (for docker-compose and load tests).
    MockBackend {
        /// The address to listen on.
        #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:9090")]
        listen: String,
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,pingora_core=warn,pingora_proxy=warn")
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // CREDITGATE_LOG_FORMAT=json: one JSON object per line, for log pipelines.
    if std::env::var("CREDITGATE_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.init();
    }
    match Cli::parse().command {
        Command::Check { policy, no_env } => check(&policy, no_env),
        Command::Run { policy } => run(&policy),
        Command::Quote {
            policy,
            headers,
            method,
            path,
            body,
        } => quote(&policy, &method, &path, &headers, body.as_deref()),
        Command::Demo => demo(),
        Command::MockBackend { listen } => mock_backend(&listen),
    }
}

/// Writes to stdout, ignoring a closed pipe (`creditgate check ... | head`).
fn emit(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn load(path: &std::path::Path) -> Result<Policy, ExitCode> {
    Policy::load(path).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::FAILURE
    })
}

fn check(path: &std::path::Path, no_env: bool) -> ExitCode {
    let loaded = if no_env {
        Policy::load_without_env(path)
    } else {
        Policy::load(path)
    };
    let policy = match loaded {
        Ok(policy) => policy,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    // Notes go beside errors, on stderr: the file is valid, and stdout stays the summary.
    for note in &policy.notes {
        eprintln!("{note}");
    }
    let mut out = String::new();
    let _ = writeln!(out, "{}: ok", path.display());
    let _ = writeln!(
        out,
        "{} operations, {} plans, {} upstreams, {} seeded accounts; hold_ttl {}",
        policy.operations.len(),
        policy.plans.len(),
        policy.upstreams.len(),
        policy.accounts.len(),
        format_duration(policy.gateway.hold_ttl_ms)
    );
    for op in &policy.operations {
        let method = op.method.as_ref().map_or("*", |m| m.as_str());
        let mut notes = Vec::new();
        if !op.when.is_empty() {
            let when: Vec<String> = op.when.iter().map(|p| p.to_string()).collect();
            notes.push(format!("when {}", when.join(" and ")));
        }
        if !op.requires.is_empty() {
            notes.push(format!("requires {}", op.requires.join(", ")));
        }
        if let Some(quota) = &op.quota {
            match &quota.per {
                None => notes.push(format!("uses 1 of the plan quota {}", quota.name)),
                Some(per) => notes.push(format!(
                    "uses {} of the plan quota {}",
                    per.source, quota.name
                )),
            }
        }
        if let Some(settle) = &op.settle {
            let sources: Vec<String> = settle.usage.iter().map(|u| u.to_string()).collect();
            notes.push(format!(
                "settles the usage from {} at {} credits",
                sources.join(" or "),
                settle.rate
            ));
        }
        if let creditgate::policy::HoldRule::Available { min_hold } = op.charge.hold {
            notes.push(format!(
                "holds what is available when less, at least {min_hold}"
            ));
        }
        if op.charge.over_hold == creditgate::policy::OverHold::Overdraft {
            notes.push("may charge above the hold, into the plan's overdraft".into());
        }
        let _ = writeln!(
            out,
            "  {:<28} {:<6} {:<32} {} credits",
            op.name, method, op.path, op.price
        );
        for note in notes {
            let _ = writeln!(out, "  {:<28} {note}", "");
        }
    }
    emit(&out);
    ExitCode::SUCCESS
}

/// Prices a request as the gateway would (`Policy::evaluate`, the one the gateway
/// and `POST /credits/v1/quote` use), without an account: plan features and the
/// balance are not checked; the features the operation requires are printed.
fn quote(
    path: &std::path::Path,
    method: &str,
    target: &str,
    header_lines: &[String],
    body: Option<&str>,
) -> ExitCode {
    let policy = match load(path) {
        Ok(policy) => policy,
        Err(code) => return code,
    };
    let answer = |json: serde_json::Value, code: ExitCode| {
        emit(&format!("{json}\n"));
        code
    };
    let refuse = |error: ApiError| {
        answer(
            serde_json::json!({ "error": error.fields() }),
            ExitCode::FAILURE,
        )
    };
    let invalid = |source: &str, message: String| {
        refuse(ApiError::InvalidRequest {
            source: source.into(),
            message,
        })
    };
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
        return invalid("request", format!("{method:?} is not an HTTP method"));
    };
    // Normalized as the gateway normalizes it, so the quote prices the same path.
    let (path, query) = split_query(target);
    let path = match normalize_path(path.as_bytes()) {
        Ok(path) => path,
        Err(e) => return refuse(e.into()),
    };
    let mut headers = http::HeaderMap::new();
    for line in header_lines {
        let parsed = line.split_once(':').and_then(|(name, value)| {
            let name = http::HeaderName::try_from(name.trim()).ok()?;
            let value = http::HeaderValue::try_from(value.trim()).ok()?;
            Some((name, value))
        });
        let Some((name, value)) = parsed else {
            return invalid("--header", format!("{line:?} is not `name: value`"));
        };
        headers.append(name, value);
    }
    let route = policy.route(&path);
    let mut facts = RequestFacts {
        method: &method,
        headers: &headers,
        query,
        path_params: route.as_ref().map_or(&[][..], |r| r.path_params.as_slice()),
        body: None,
        body_bytes: None,
    };
    // As the gateway does: the body is read only when a step needs it, and one
    // whose objects repeat a key is refused.
    let mut evaluation = policy.evaluate(route.as_ref(), &facts, None);
    let json;
    if let Evaluation::NeedsBody = evaluation {
        json = match creditgate::policy::json::parse_body(body.unwrap_or("").as_bytes()) {
            Ok(json) => json,
            Err(duplicate) => return refuse(ApiError::duplicate_key(&duplicate)),
        };
        facts.body = Some(&json);
        facts.body_bytes = Some(body.map_or(0, str::len));
        evaluation = policy.evaluate(route.as_ref(), &facts, None);
    }
    match evaluation {
        Evaluation::Decided(Ok(Verdict::Operation { index, price, .. })) => {
            let op = &policy.operations[index];
            answer(
                serde_json::json!({"operation": op.name, "credits": price.to_json(), "requires": op.requires}),
                ExitCode::SUCCESS,
            )
        }
        Evaluation::Decided(Ok(Verdict::PassThrough { .. })) => answer(
            serde_json::json!({"operation": null, "credits": 0, "requires": [], "pass_through": true}),
            ExitCode::SUCCESS,
        ),
        Evaluation::Decided(Err(refused)) => refuse(ApiError::refused(&policy, refused)),
        // Unreachable: the body (or its absence) is given, so every step can decide.
        Evaluation::NeedsBody => refuse(ApiError::Internal),
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let policy = match load(path) {
        Ok(policy) => policy,
        Err(code) => return code,
    };
    for note in &policy.notes {
        tracing::warn!("{note}");
    }
    let token = std::env::var(creditgate::admin::TOKEN_ENV)
        .ok()
        .filter(|t| !t.is_empty());
    if let Some(listen) = &policy.gateway.admin_listen {
        if let Err(e) = creditgate::admin::check_exposure(listen, token.as_deref()) {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(serve_policy(path, policy, token));
    // Connections cut at the end of the grace period are dropped, not awaited.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// `creditgate run` once the policy is valid: bind every listener (an address it
/// cannot have stops it at once), reach the store, seed, serve until a signal.
async fn serve_policy(path: &std::path::Path, policy: Policy, token: Option<String>) -> ExitCode {
    let cannot_listen = |what: &str, address: &str, e: std::io::Error| {
        eprintln!("{}: cannot listen on {what} {address}: {e}", path.display());
        ExitCode::FAILURE
    };
    // Watched first: a SIGTERM while starting stops it gracefully once it serves.
    let signals = match StopSignals::watch() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("cannot watch for SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listen = policy.gateway.listen.clone();
    let listener = match bind(&listen) {
        Ok(listener) => listener,
        Err(e) => return cannot_listen("listen", &listen, e),
    };
    let admin_listener = match &policy.gateway.admin_listen {
        Some(address) => match bind(address) {
            Ok(listener) => Some(listener),
            Err(e) => return cannot_listen("admin_listen", address, e),
        },
        None => None,
    };
    let policy = Arc::new(policy);
    let store: Arc<dyn creditgate::store::Store> = match &policy.store {
        StoreConfig::Sqlite {
            path: file,
            commit_interval_ms,
        } => match creditgate::store::sqlite::open(
            file,
            std::time::Duration::from_millis(*commit_interval_ms),
            policy.catalog(),
            policy.limits(),
        ) {
            Ok(store) => {
                tracing::info!(file = %file.display(), "sqlite store open");
                Arc::new(store)
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
        StoreConfig::Memory => {
            tracing::warn!("memory store: every balance and ledger entry is lost on restart");
            Arc::new(LocalStore::new(policy.catalog(), policy.limits()))
        }
        StoreConfig::Redis { url, cluster, .. } => {
            match RedisStore::connect(url, *cluster, policy.catalog(), policy.limits()).await {
                Ok(store) => Arc::new(store),
                Err(e) => {
                    eprintln!("{}: cannot reach redis at {url}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let gateway = match Gateway::new(policy, store, creditgate::clock::Clock::system()) {
        Ok(gateway) => gateway,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = gateway.seed_accounts().await {
        eprintln!("cannot seed accounts: {e}");
        return ExitCode::FAILURE;
    }
    let live = LiveGateway::new(gateway);
    // The admin API serves until the gateway has stopped, so `/readyz` says 503
    // while requests in flight finish.
    let (stop_admin, admin_stops) = tokio::sync::watch::channel(false);
    let admin = admin_listener.map(|listener| {
        let state = creditgate::admin::AdminState::new(
            live.clone(),
            Some(path.to_path_buf()),
            token.as_deref(),
        );
        tokio::spawn(creditgate::admin::serve(listener, state, admin_stops))
    });
    let stopped = run_server(live, path.to_path_buf(), listener, signals).await;
    let _ = stop_admin.send(true);
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    match stopped {
        Stopped::Clean => ExitCode::SUCCESS,
        Stopped::GraceExpired { connections } => {
            eprintln!(
                "stopped after shutdown_grace with {connections} connections still serving; \
                 their holds are released after hold_ttl"
            );
            ExitCode::FAILURE
        }
        Stopped::Unflushed(e) => {
            eprintln!("stopped, but the store could not write what it had queued: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `task` on a multi-threaded runtime; prints its error and fails if it fails.
fn block_on(what: &str, task: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let outcome = tokio::runtime::Runtime::new()
        .map_err(|e| format!("cannot start the runtime: {e}"))
        .and_then(|runtime| runtime.block_on(task));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{what}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> ExitCode {
    block_on("demo", creditgate::demo::run())
}

fn mock_backend(listen: &str) -> ExitCode {
    block_on("mock-backend", async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot bind {listen}: {e}"))?;
        let backend = creditgate::demo::mock::MockBackend::start_without_recording(listener)
            .map_err(|e| e.to_string())?;
        println!("mock backend listening on http://{}", backend.addr);
        let _ = tokio::signal::ctrl_c().await;
        Ok(())
    })
}
