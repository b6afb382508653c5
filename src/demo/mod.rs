//! `creditgate demo`: the gateway on the memory store in front of the built-in
//! mock backend, with one seeded account, and curl lines to try.

pub mod mock;

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::gateway::{serve, Gateway};
use crate::policy::Policy;
use crate::store::memory::MemoryStore;

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
    let store = Arc::new(MemoryStore::new(policy.catalog(), policy.limits()));
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
        r#"creditgate demo: gateway on {g}, mock backend on {backend_url}, memory store.
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

Press Ctrl-C to stop."#
    );
    let _ = tokio::signal::ctrl_c().await;
    let _ = stop.send(true);
    let _ = server.await;
    drop(backend);
    Ok(())
}
