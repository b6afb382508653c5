//! `creditgate demo`: the gateway in front of the built-in mock backend, with one
//! seeded account, and curl lines to try. Its store is the default one, sqlite, in
//! a temporary file that the demo prints (to read its ledger with `sqlite3`) and
//! deletes when it stops: the demo's key is new on every run, so a file kept from
//! an earlier run would only hold an account no key of this run can reach.

pub mod mock;

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::gateway::{serve, Gateway};
use crate::policy::Policy;

/// The demo's policy, shipped in `policies/demo.toml`.
pub const DEMO_POLICY: &str = include_str!("../../policies/demo.toml");

/// Binds the preferred address, or any free port on loopback when it is taken.
async fn bind(preferred: &str) -> std::io::Result<TcpListener> {
    match TcpListener::bind(preferred).await {
        Ok(listener) => Ok(listener),
        Err(_) => TcpListener::bind("127.0.0.1:0").await,
    }
}

pub async fn run() -> Result<(), String> {
    let backend_listener = bind("127.0.0.1:9090")
        .await
        .map_err(|e| format!("cannot bind the mock backend: {e}"))?;
    let backend =
        mock::MockBackend::start_without_recording(backend_listener).map_err(|e| e.to_string())?;
    let key = format!("cg_demo_{:032x}", rand::random::<u128>());
    let backend_url = format!("http://{}", backend.addr);
    let env = |name: &str| match name {
        "DEMO_BACKEND_URL" => Some(backend_url.clone()),
        "DEMO_KEY" => Some(key.clone()),
        _ => None,
    };
    let policy =
        Policy::parse(DEMO_POLICY, "policies/demo.toml", &env).map_err(|e| e.to_string())?;
    let file = std::env::temp_dir().join(format!("creditgate-demo-{}.db", std::process::id()));
    let store = crate::store::sqlite::open(
        &file,
        std::time::Duration::from_millis(2),
        policy.catalog(),
        policy.limits(),
    )
    .map_err(|e| e.to_string())?;
    let store = Arc::new(store);
    let gateway = Gateway::new(Arc::new(policy), store, crate::clock::Clock::system())?;
    gateway.seed_accounts().await.map_err(|e| e.to_string())?;
    let listener = bind("127.0.0.1:8080")
        .await
        .map_err(|e| format!("cannot bind the gateway: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(serve(listener, gateway, shutdown));

    let g = format!("http://{addr}");
    println!(
        r#"creditgate demo: gateway on {g}, mock backend on {backend_url}, sqlite store.
Store file (deleted when the demo stops): {file}
Account "demo" (plan free) has 10 credits. Its API key:

  export KEY={key}

Try these (each response carries x-credits-held and x-credits-remaining):

# 1. Success: an image costs 3 credits -> 200, x-credits-remaining: 7
curl -si -X POST {g}/v1/images/generations -H "Authorization: Bearer $KEY" -d '{{"prompt":"a cat"}}'

# 2. Backend failure: the mock answers 500 -> the hold is released, x-credits-remaining stays 7
curl -si -X POST {g}/v1/images/generations -H "Authorization: Bearer $KEY" -H 'x-mock-status: 500'

# 3. Not enough credits: a video costs 256 -> 402 insufficient_credits, nothing forwarded
curl -si -X POST {g}/v1/videos -H "Authorization: Bearer $KEY" -d '{{"prompt":"a cat, moving"}}'

# 4. A 0.5-credit chat edit -> 200, x-credits-remaining: 6.5
curl -si -X POST {g}/v1/sites/home/edits -H "Authorization: Bearer $KEY" -d '{{"patch":"make it blue"}}'

# 5. Free operation -> 200, x-credits-held: 0
curl -si {g}/v1/models -H "Authorization: Bearer $KEY"

# 6. A premium feature on the free plan -> 403 plan_required
curl -si -X POST {g}/v1/images/premium -H "Authorization: Bearer $KEY"

# 7. The backend hangs up mid-response -> nothing charged
curl -si -X POST {g}/v1/images/generations -H "Authorization: Bearer $KEY" -H 'x-mock-fail: reset-mid-body'

# The ledger, as operators read it
sqlite3 {file} 'select * from ledger_readable'

Press Ctrl-C to stop."#,
        file = file.display()
    );
    let _ = tokio::signal::ctrl_c().await;
    let _ = stop.send(true);
    let _ = server.await;
    drop(backend);
    for suffix in ["", "-wal", "-shm"] {
        let mut name = file.clone().into_os_string();
        name.push(suffix);
        let _ = std::fs::remove_file(name);
    }
    Ok(())
}
