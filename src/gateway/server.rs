//! Serving the gateway: `creditgate run` ([`run_server`]: signals, readiness, a
//! graceful stop that waits only for requests in flight), or on a listener the
//! caller already bound (tests and the demo bind `127.0.0.1:0`). Both serve client
//! connections with one accept loop, which holds at most `max_connections` of
//! them at once, each within the client deadlines (`client_conn`).
//!
//! Pingora's own `Server` is not used: its stop waits out the whole grace period
//! even when nothing is in flight, and it exits 0 whatever happened. Nothing else
//! of it is needed — the listener is bound here, and Pingora's HTTP proxy app runs
//! on any tokio runtime.

use std::sync::Arc;
use std::time::Duration;

use pingora::apps::ServerApp;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use pingora::proxy::ProxyHttp;
use pingora::server::configuration::ServerConf;
use std::os::fd::AsRawFd;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::client_conn::{ClientConn, Deadlines};
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

/// What the accept loop bounds on the client side, from the policy.
#[derive(Clone, Copy, Debug)]
struct ClientLimits {
    max_connections: usize,
    /// `None` for a proxy that is not the gateway (the benches' passthrough): its
    /// hooks do not mark requests admitted, so the head deadlines cannot apply.
    deadlines: Option<Deadlines>,
    /// After the loop stops: how long open connections may take to finish.
    grace: Duration,
}

impl ClientLimits {
    fn of(config: &GatewayConfig) -> Self {
        ClientLimits {
            max_connections: config.max_connections,
            deadlines: Some(Deadlines {
                header_read: Duration::from_millis(config.header_read_timeout_ms),
                keepalive: Duration::from_millis(config.keepalive_timeout_ms),
            }),
            grace: Duration::from_millis(config.shutdown_grace_ms),
        }
    }
}

/// Serves the gateway on an already-bound listener until `shutdown` turns true.
/// Each connection runs the same Pingora HTTP proxy app as `run_server`, within
/// the policy's `max_connections` and client timeouts.
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
    let limits = ClientLimits::of(&gateway.policy().gateway);
    let sweeper = spawn_sweeper(&gateway, shutdown.clone());
    drop(gateway);
    let sender = super::webhooks::spawn_sender(live.clone(), shutdown.clone());
    let app = Arc::new(pingora::proxy::http_proxy(
        &Arc::new(ServerConf::default()),
        LiveProxy(live),
    ));
    accept_within(listener, app, limits, shutdown).await;
    sweeper.abort();
    sender.abort();
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
    let limits = ClientLimits {
        max_connections,
        deadlines: None,
        grace: Duration::ZERO,
    };
    accept_within(listener, app, limits, shutdown).await;
}

/// How the accept loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every connection finished (or none was open).
    Clean,
    /// The grace period ended with this many connections still serving.
    Cut(usize),
}

/// Accepts connections on `listener` until `shutdown` turns true and runs `app`
/// on each, at most `max_connections` at once. A permit is taken *before* each
/// accept and held until the connection closes, so a connection past the cap is
/// not accepted at all: it waits in the kernel's listen backlog, and nothing in
/// the process (no descriptor, task or buffer) is held for it. (The kernel bounds
/// that backlog; past it, new connections are refused or time out.) Waiting
/// rather than closing at once: a burst past the cap is served late instead of
/// failed, and a client that gives up while it waits costs nothing.
///
/// Once `shutdown` turns true: no more accepts; idle kept-alive connections and
/// heads not yet read are closed (`cleanup`); requests in flight finish, each
/// connection closing after its response; this returns when every connection
/// is closed, or after `grace`.
async fn accept_within<A>(
    listener: TcpListener,
    app: Arc<A>,
    limits: ClientLimits,
    shutdown: watch::Receiver<bool>,
) -> Drained
where
    A: ServerApp + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut stop = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            accepted = accept_one(&listener, &slots) => accepted,
            changed = stop.changed() => {
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
            let mut stream = client_stream(tcp, limits.deadlines);
            while let Some(reused) = app.process_new(stream, &shutdown).await {
                stream = reused;
            }
            drop(slot);
        });
    }
    drop(listener);
    app.cleanup().await;
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(limits.grace, slots.acquire_many(all))
        .await
        .is_ok();
    if drained {
        Drained::Clean
    } else {
        Drained::Cut(limits.max_connections - slots.available_permits())
    }
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

/// A client connection as Pingora's own listener hands it over (no Nagle delay,
/// the socket's addresses in its digest), within the client deadlines if given.
fn client_stream(
    tcp: tokio::net::TcpStream,
    deadlines: Option<Deadlines>,
) -> pingora::protocols::Stream {
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr().ok();
    let mut stream = pingora::protocols::l4::stream::Stream::from(tcp);
    let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
    let _ = digest.peer_addr.set(peer.map(Into::into));
    stream.set_socket_digest(digest);
    match deadlines {
        Some(deadlines) => Box::new(ClientConn::new(stream, deadlines)),
        None => Box::new(stream),
    }
}

/// The listen backlog, as Pingora sets it; the kernel caps it at `somaxconn`.
const LISTEN_BACKLOG: u32 = 65_535;

/// Binds `listen` as Pingora would (address reuse, a long backlog). `creditgate
/// run` binds every listener before it serves anything, so an address it cannot
/// have stops it at once.
pub fn bind(listen: &str) -> std::io::Result<TcpListener> {
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

/// SIGTERM and SIGINT, watched from the moment this is made: a signal that
/// arrives while the gateway is still starting waits here instead of killing the
/// process, and stops it gracefully as soon as it serves.
pub struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn watch() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

/// How `run_server` stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// On SIGTERM or SIGINT, every request finished.
    Clean,
    /// On SIGTERM or SIGINT, `shutdown_grace` ended with connections still
    /// serving; their holds expire after `hold_ttl`.
    GraceExpired { connections: usize },
    /// The store could not write what it had queued (the sqlite store's last
    /// ends of holds): those holds are open on disk and expire after `hold_ttl`.
    Unflushed(String),
}

/// Serves the gateway on `listener` (bound by the caller, see [`bind`]) until
/// SIGTERM or SIGINT: then `/readyz` turns 503, nothing new is accepted, idle
/// connections close, and it returns once the requests in flight finished — at
/// once when there are none — or after `shutdown_grace`. SIGHUP reloads the
/// policy file. Expired holds are swept meanwhile.
pub async fn run_server(
    live: Arc<LiveGateway>,
    policy_file: PathBuf,
    listener: TcpListener,
    signals: StopSignals,
) -> Stopped {
    let StopSignals {
        mut terminate,
        mut interrupt,
    } = signals;
    let gateway = live.current();
    let config = gateway.policy().gateway.clone();
    let (drain, draining) = watch::channel(false);
    let (stop, stopping) = watch::channel(false);
    let sweeper = spawn_sweeper(&gateway, stopping.clone());
    drop(gateway);
    let sender = super::webhooks::spawn_sender(live.clone(), stopping.clone());
    let reloads = tokio::spawn(reload_on_hangup(live.clone(), policy_file, stopping));
    let app = Arc::new(pingora::proxy::http_proxy(
        &Arc::new(ServerConf::default()),
        LiveProxy(live.clone()),
    ));
    let serving = tokio::spawn(accept_within(
        listener,
        app,
        ClientLimits::of(&config),
        draining,
    ));
    tracing::info!(listen = %config.listen, admin_listen = config.admin_listen.as_deref().unwrap_or(""), max_connections = config.max_connections, "creditgate is listening");
    let signal = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    tracing::info!(
        grace_ms = config.shutdown_grace_ms,
        "{signal}: not ready, accepting nothing new, waiting for requests in flight"
    );
    live.stop_accepting();
    let _ = drain.send(true);
    let drained = serving.await.unwrap_or(Drained::Cut(0));
    let _ = stop.send(true);
    let _ = reloads.await;
    let _ = sweeper.await;
    let _ = sender.await;
    // What the store still has queued (the ends of the last holds, on the sqlite
    // store) goes to disk before the process exits.
    if let Err(e) = live.current().store().flush().await {
        return Stopped::Unflushed(e.to_string());
    }
    match drained {
        Drained::Clean => {
            tracing::info!("stopped: every request finished");
            Stopped::Clean
        }
        Drained::Cut(connections) => Stopped::GraceExpired { connections },
    }
}

/// `kill -HUP` reloads the policy file; an invalid file is logged and ignored.
async fn reload_on_hangup(
    live: Arc<LiveGateway>,
    policy_file: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::error!("cannot listen for SIGHUP; reload with POST /admin/policy/reload");
        return;
    };
    loop {
        tokio::select! {
            _ = hangups.recv() => match live.reload_file(&policy_file).await {
                Ok(operations) => tracing::info!(operations, "SIGHUP: policy reloaded"),
                Err(e) => tracing::error!("SIGHUP: policy not reloaded, the running one stays: {e}"),
            },
            _ = shutdown.changed() => return,
        }
    }
}
