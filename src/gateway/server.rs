//! Starting the gateway: under Pingora's `Server` (`creditgate run`), or on a
//! listener the caller already bound (tests and the demo bind `127.0.0.1:0`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::proxy::ProxyHttp;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::ServiceWithDependents;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{Gateway, LiveGateway, LiveProxy};
use std::path::PathBuf;

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::policy::GatewayConfig;
use crate::store::Store;

/// How often expired holds are swept. Holds are also expired lazily on access.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

async fn sweep_until(
    store: Arc<dyn Store>,
    clock: Clock,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match store.sweep(clock.now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => {
                        metrics.expired_holds(n);
                        tracing::info!(expired = n, "released holds past their TTL")
                    }
                    Err(e) => tracing::warn!("hold sweep failed: {e}"),
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Runs the expired-hold sweep in the background until `shutdown` turns true.
pub fn spawn_sweeper(
    gateway: &Gateway,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(sweep_until(
        gateway.store().clone(),
        gateway.clock().clone(),
        gateway.metrics().clone(),
        shutdown,
    ))
}

struct Sweeper(Arc<dyn Store>, Clock, Arc<Metrics>);

#[async_trait]
impl BackgroundService for Sweeper {
    async fn start(&self, shutdown: ShutdownWatch) {
        sweep_until(self.0.clone(), self.1.clone(), self.2.clone(), shutdown).await
    }
}

fn server_conf(gateway: &GatewayConfig) -> ServerConf {
    ServerConf {
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        // On SIGTERM: stop accepting, let in-flight requests finish (and end their
        // holds) for the grace period, then give the runtimes this long to stop.
        grace_period_seconds: Some(gateway.shutdown_grace_ms.div_ceil(1_000)),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    }
}

/// Serves the gateway on an already-bound listener until `shutdown` turns true.
/// Each connection runs the same Pingora HTTP proxy app as `run_server`.
pub async fn serve(listener: TcpListener, gateway: Gateway, shutdown: watch::Receiver<bool>) {
    serve_live(listener, LiveGateway::new(gateway), shutdown).await
}

/// `serve` for a gateway whose policy can be reloaded.
pub async fn serve_live(
    listener: TcpListener,
    live: Arc<LiveGateway>,
    shutdown: watch::Receiver<bool>,
) {
    let sweeper = spawn_sweeper(&live.current(), shutdown.clone());
    serve_proxy(listener, LiveProxy(live), shutdown).await;
    sweeper.abort();
}

/// Serves any Pingora proxy on a bound listener until `shutdown` turns true: the
/// accept loop `serve` uses, shared with the benches' bare passthrough so both are
/// measured the same way.
pub async fn serve_proxy<SV>(listener: TcpListener, proxy: SV, shutdown: watch::Receiver<bool>)
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    let app = Arc::new(pingora::proxy::http_proxy(
        &Arc::new(ServerConf::default()),
        proxy,
    ));
    let mut stop = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut stream: pingora::protocols::Stream =
                Box::new(pingora::protocols::l4::stream::Stream::from(tcp));
            while let Some(reused) = app.process_new(stream, &shutdown).await {
                stream = reused;
            }
        });
    }
}

/// Runs the gateway under Pingora's server (signals, graceful shutdown) on the
/// policy's `listen` address, with the caller's other `services` (the admin API)
/// beside it. Never returns.
pub fn run_server(
    live: Arc<LiveGateway>,
    policy_file: PathBuf,
    services: Vec<Box<dyn ServiceWithDependents>>,
) -> ! {
    let gateway = live.current();
    let listen = gateway.policy().gateway.listen.clone();
    let sweeper = Sweeper(
        gateway.store().clone(),
        gateway.clock().clone(),
        gateway.metrics().clone(),
    );
    let mut server = Server::new_with_opt_and_conf(None, server_conf(&gateway.policy().gateway));
    server.bootstrap();
    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, LiveProxy(live.clone()));
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.add_service(background_service("hold sweeper", sweeper));
    server.add_service(background_service(
        "policy reload on SIGHUP",
        ReloadOnHangup { live, policy_file },
    ));
    server.add_services(services);
    tracing::info!(%listen, "creditgate is listening");
    let store = gateway.store().clone();
    server.run(pingora::server::RunArgs::default());
    // Stopped: what the store still has queued (the ends of the last holds, on the
    // sqlite store) goes to disk before the process exits.
    let flushed = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|runtime| runtime.block_on(store.flush()).map_err(|e| e.to_string()));
    if let Err(e) = flushed {
        tracing::error!("the store could not write what it had queued: {e}");
        std::process::exit(1);
    }
    std::process::exit(0)
}

/// `kill -HUP` reloads the policy file; an invalid file is logged and ignored.
struct ReloadOnHangup {
    live: Arc<LiveGateway>,
    policy_file: PathBuf,
}

#[async_trait]
impl BackgroundService for ReloadOnHangup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::error!("cannot listen for SIGHUP; reload with POST /admin/policy/reload");
            return;
        };
        loop {
            tokio::select! {
                _ = hangups.recv() => match self.live.reload_file(&self.policy_file).await {
                    Ok(operations) => tracing::info!(operations, "SIGHUP: policy reloaded"),
                    Err(e) => tracing::error!("SIGHUP: policy not reloaded, the running one stays: {e}"),
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}
