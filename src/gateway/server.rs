//! Starting the gateway: under Pingora's `Server` (`creditgate run`), or on a
//! listener the caller already bound (tests and the demo bind `127.0.0.1:0`).
//! Both serve client connections with one accept loop, which holds at most
//! `max_connections` of them at once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use pingora::proxy::ProxyHttp;
use pingora::server::configuration::ServerConf;
use pingora::server::{ListenFds, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::ServiceWithDependents;
use std::os::fd::AsRawFd;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

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
/// Each connection runs the same Pingora HTTP proxy app as `run_server`, within
/// the policy's `max_connections`.
pub async fn serve(listener: TcpListener, gateway: Gateway, shutdown: watch::Receiver<bool>) {
    serve_live(listener, LiveGateway::new(gateway), shutdown).await
}

/// `serve` for a gateway whose policy can be reloaded.
pub async fn serve_live(
    listener: TcpListener,
    live: Arc<LiveGateway>,
    shutdown: watch::Receiver<bool>,
) {
    let gateway = live.current();
    let max_connections = gateway.policy().gateway.max_connections;
    let sweeper = spawn_sweeper(&gateway, shutdown.clone());
    drop(gateway);
    serve_proxy(listener, LiveProxy(live), max_connections, shutdown).await;
    sweeper.abort();
}

/// Serves any Pingora proxy on a bound listener until `shutdown` turns true, at
/// most `max_connections` client connections at once: the accept loop `serve`
/// uses, shared with the benches' bare passthrough so both are measured the
/// same way.
pub async fn serve_proxy<SV>(
    listener: TcpListener,
    proxy: SV,
    max_connections: usize,
    shutdown: watch::Receiver<bool>,
) where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    let app = Arc::new(pingora::proxy::http_proxy(
        &Arc::new(ServerConf::default()),
        proxy,
    ));
    accept_within(listener, app, max_connections, shutdown).await;
}

/// Accepts connections on `listener` until `shutdown` turns true and runs `app`
/// on each, at most `max_connections` at once. A permit is taken *before* each
/// accept and held until the connection closes, so a connection past the cap is
/// not accepted at all: it waits in the kernel's listen backlog, and nothing in
/// the process (no descriptor, task or buffer) is held for it. (The kernel bounds
/// that backlog; past it, new connections are refused or time out.) Waiting
/// rather than closing at once: a burst past the cap is served late instead of
/// failed, and a client that gives up while it waits costs nothing.
async fn accept_within<A>(
    listener: TcpListener,
    app: Arc<A>,
    max_connections: usize,
    shutdown: watch::Receiver<bool>,
) where
    A: ServerApp + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut stop = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            accepted = accept_one(&listener, &slots) => accepted,
            changed = stop.changed() => {
                // Pingora may announce `false` first; only `true` (or no sender left) stops.
                if changed.is_err() || *stop.borrow() {
                    break;
                }
                continue;
            }
        };
        let (tcp, slot) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Most often out of descriptors: give closing connections a moment
                // instead of spinning on an accept that fails at once.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(ACCEPT_RETRY_PAUSE).await;
                continue;
            }
        };
        let app = app.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut stream = client_stream(tcp);
            while let Some(reused) = app.process_new(stream, &shutdown).await {
                stream = reused;
            }
            drop(slot);
        });
    }
    app.cleanup().await;
}

/// How long the accept loop waits after a failed accept.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Takes a free slot, then accepts one connection into it.
async fn accept_one(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> std::io::Result<(tokio::net::TcpStream, OwnedSemaphorePermit)> {
    // The semaphore is never closed, so this waits for a slot and never fails.
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .map_err(std::io::Error::other)?;
    let (tcp, _) = listener.accept().await?;
    Ok((tcp, slot))
}

/// A client connection as Pingora's own listener hands it over: no Nagle delay,
/// and the socket's addresses in its digest.
fn client_stream(tcp: tokio::net::TcpStream) -> pingora::protocols::Stream {
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr().ok();
    let mut stream = pingora::protocols::l4::stream::Stream::from(tcp);
    let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
    let _ = digest.peer_addr.set(peer.map(Into::into));
    stream.set_socket_digest(digest);
    Box::new(stream)
}

/// The proxy as a service of Pingora's `Server`. Pingora's own listening service
/// accepts every connection it can (it has no cap), so this one binds the
/// `listen` address itself, as Pingora would (address reuse, a long backlog),
/// and serves it with the same capped accept loop as `serve`.
struct CappedProxy<A> {
    listen: String,
    max_connections: usize,
    app: Option<A>,
}

/// The listen backlog, as Pingora sets it; the kernel caps it at `somaxconn`.
const LISTEN_BACKLOG: u32 = 65_535;

fn bind(listen: &str) -> std::io::Result<TcpListener> {
    let address: std::net::SocketAddr = listen
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let socket = match address {
        std::net::SocketAddr::V4(_) => TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

#[async_trait]
impl<A> pingora::services::Service for CappedProxy<A>
where
    A: ServerApp + Send + Sync + 'static,
{
    async fn start_service(
        &mut self,
        #[cfg(unix)] _fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let Some(app) = self.app.take() else {
            return;
        };
        let listener = match bind(&self.listen) {
            Ok(listener) => listener,
            Err(e) => {
                // Nothing can be served: stop, as a failed start should.
                tracing::error!(listen = %self.listen, "cannot listen: {e}");
                std::process::exit(1);
            }
        };
        tracing::info!(listen = %self.listen, max_connections = self.max_connections, "creditgate is listening");
        accept_within(listener, Arc::new(app), self.max_connections, shutdown).await;
    }

    fn name(&self) -> &str {
        "creditgate proxy"
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
    server.add_service(CappedProxy {
        listen,
        max_connections: gateway.policy().gateway.max_connections,
        app: Some(pingora::proxy::http_proxy(
            &server.configuration,
            LiveProxy(live.clone()),
        )),
    });
    server.add_service(background_service("hold sweeper", sweeper));
    server.add_service(background_service(
        "policy reload on SIGHUP",
        ReloadOnHangup { live, policy_file },
    ));
    server.add_services(services);
    server.run_forever()
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
