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
use creditgate::gateway::{run_server, Gateway, LiveGateway};
use creditgate::policy::{
    format_duration, normalize_path, split_query, Evaluation, Policy, RequestFacts, StoreConfig,
    Verdict,
};
use creditgate::store::local::LocalStore;
use creditgate::store::redis::RedisStore;

#[derive(Parser)]
#[command(
    name = "creditgate",
    version,
    about = "A credit-metering reverse proxy for AI generation APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway.
    Run {
        #[arg(long)]
        policy: PathBuf,
    },
    /// Validate a policy and print every operation with its price.
    Check {
        #[arg(long)]
        policy: PathBuf,
    },
    /// Price a request offline, as the gateway would (without an account:
    /// plan features and balance are not checked).
    Quote {
        #[arg(long)]
        policy: PathBuf,
        /// A request header, `name: value` (repeatable), for prices and `when`s on
        /// `header:` values.
        #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
        headers: Vec<String>,
        method: String,
        path: String,
        /// The request body, as JSON text.
        body: Option<String>,
    },
    /// Start the gateway, a mock generation backend and a demo account (sqlite store in a
    /// temporary file, deleted when the demo stops).
    Demo,
    /// Serve only the built-in mock generation backend (for docker-compose and load tests).
    MockBackend {
        #[arg(long, default_value = "127.0.0.1:9090")]
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
        Command::Check { policy } => check(&policy),
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

fn check(path: &std::path::Path) -> ExitCode {
    let policy = match load(path) {
        Ok(policy) => policy,
        Err(code) => return code,
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
            notes.push(format!("uses 1 of the plan quota {quota}"));
        }
        if let Some(settle) = &op.settle {
            notes.push(format!(
                "settles {} × {} credits",
                settle.usage, settle.credits_per_unit
            ));
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
        evaluation = policy.evaluate(route.as_ref(), &facts, None);
    }
    match evaluation {
        Evaluation::Decided(Ok(Verdict::Operation { index, price })) => {
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
    let policy = Arc::new(policy);
    // The store's connection lives on its own runtime, which outlives setup: Pingora
    // runs its services on runtimes of its own.
    let runtime: &'static tokio::runtime::Runtime =
        match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
        {
            Ok(rt) => Box::leak(Box::new(rt)),
            Err(e) => {
                eprintln!("cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
    let store: Arc<dyn creditgate::store::Store> = match &policy.store {
        StoreConfig::Sqlite {
            path: file,
            commit_interval_ms,
        } => match creditgate::store::sqlite::open(
            file,
            std::time::Duration::from_millis(*commit_interval_ms),
            policy.catalog(),
            policy.gateway.ledger_max_entries,
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
            Arc::new(LocalStore::new(
                policy.catalog(),
                policy.gateway.ledger_max_entries,
            ))
        }
        StoreConfig::Redis { url, cluster, .. } => {
            match runtime.block_on(RedisStore::connect(
                url,
                *cluster,
                policy.catalog(),
                policy.gateway.ledger_max_entries,
            )) {
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
    if let Err(e) = runtime.block_on(gateway.seed_accounts()) {
        eprintln!("cannot seed accounts: {e}");
        return ExitCode::FAILURE;
    }
    let live = LiveGateway::new(gateway);
    let admin = live.policy().gateway.admin_listen.clone().map(|listen| {
        let state = creditgate::admin::AdminState::new(
            live.clone(),
            Some(path.to_path_buf()),
            token.as_deref(),
        );
        pingora::services::background::background_service(
            "admin API",
            creditgate::admin::AdminService::new(listen, state),
        )
    });
    let services: Vec<Box<dyn pingora::services::ServiceWithDependents>> = admin
        .into_iter()
        .map(|s| Box::new(s) as Box<dyn pingora::services::ServiceWithDependents>)
        .collect();
    run_server(live, path.to_path_buf(), services)
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
