//! The `creditgate` command: parse arguments, load, start — nothing else.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use creditgate::gateway::{run_server, Gateway};
use creditgate::policy::{format_duration, Policy, Price, StoreConfig};
use creditgate::store::memory::MemoryStore;

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
    /// Start the gateway, a mock generation backend and a demo account on the memory store.
    Demo,
    /// Serve only the built-in mock generation backend (for docker-compose and load tests).
    MockBackend {
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,pingora_core=warn,pingora_proxy=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Check { policy } => check(&policy),
        Command::Run { policy } => run(&policy),
        Command::Demo => demo(),
        Command::MockBackend { listen } => mock_backend(&listen),
    }
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
    println!("{}: ok", path.display());
    println!(
        "{} operations, {} plans, {} upstreams, {} seeded accounts; hold_ttl {}",
        policy.operations.len(),
        policy.plans.len(),
        policy.upstreams.len(),
        policy.accounts.len(),
        format_duration(policy.gateway.hold_ttl_ms)
    );
    for op in &policy.operations {
        let Price::Fixed(price) = op.price;
        let method = op.method.as_ref().map_or("*", |m| m.as_str());
        let requires = if op.requires.is_empty() {
            String::new()
        } else {
            format!("  requires {}", op.requires.join(", "))
        };
        let when: Vec<String> = op
            .when
            .iter()
            .map(|p| format!("{} in [{}]", p.source, p.any_of.join("|")))
            .collect();
        let when = if when.is_empty() {
            String::new()
        } else {
            format!("  when {}", when.join(", "))
        };
        println!(
            "  {:<24} {:<6} {:<36} {:>10} credits{requires}{when}",
            op.name,
            method,
            op.path,
            price.to_string()
        );
    }
    ExitCode::SUCCESS
}

fn run(path: &std::path::Path) -> ExitCode {
    let policy = match load(path) {
        Ok(policy) => policy,
        Err(code) => return code,
    };
    if policy.store != StoreConfig::Memory {
        eprintln!(
            "{}: the redis store is not available in this version; use kind = \"memory\"",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    let gateway = match Gateway::new(Arc::new(policy), Arc::new(MemoryStore::new())) {
        Ok(gateway) => gateway,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let seeded = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(gateway.seed_accounts())
                .map_err(|e| e.to_string())
        });
    if let Err(e) = seeded {
        eprintln!("cannot seed accounts: {e}");
        return ExitCode::FAILURE;
    }
    run_server(gateway)
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
        let backend =
            creditgate::demo::mock::MockBackend::start(listener).map_err(|e| e.to_string())?;
        println!("mock backend listening on http://{}", backend.addr);
        let _ = tokio::signal::ctrl_c().await;
        Ok(())
    })
}
