//! Hot reload: the gateway in service can be swapped for one on a new policy.
//!
//! Each request takes the current [`Gateway`] when it starts and keeps it to the
//! end, so requests in flight finish under the policy — and the price — they were
//! held at, while new requests see the new policy at once. The store, the clock and
//! the metrics carry over; nothing is dropped or re-held.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, Result};

use super::{Gateway, RequestCtx};
use crate::policy::{Policy, PolicyErrors};

pub struct LiveGateway {
    current: RwLock<Arc<Gateway>>,
    /// False once the gateway stops accepting (a graceful stop began): `/readyz`
    /// then answers 503 so load balancers send nothing new.
    accepting: AtomicBool,
}

/// Why a reload was refused; the running policy stays.
#[derive(Debug)]
pub enum ReloadError {
    /// The file does not validate.
    Invalid(PolicyErrors),
    /// The file is valid but changes what only a restart can (addresses, store).
    NeedsRestart(String),
    /// Building the new gateway failed (an upstream does not resolve, seeding failed).
    Failed(String),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Invalid(errors) => write!(f, "{errors}"),
            ReloadError::NeedsRestart(what) | ReloadError::Failed(what) => f.write_str(what),
        }
    }
}

impl LiveGateway {
    pub fn new(gateway: Gateway) -> Arc<LiveGateway> {
        Arc::new(LiveGateway {
            current: RwLock::new(Arc::new(gateway)),
            accepting: AtomicBool::new(true),
        })
    }

    /// A graceful stop began: the listener accepts nothing more.
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
    }

    /// Whether the gateway's listener still accepts connections.
    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// The gateway new requests use.
    pub fn current(&self) -> Arc<Gateway> {
        // A poisoned lock only means a panic elsewhere; the value is a plain Arc.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.current().policy().clone()
    }

    /// Switches to `policy` for new requests: plans and limits go to the store,
    /// new seeded accounts are created. Returns the number of operations.
    pub async fn reload(&self, policy: Policy) -> std::result::Result<usize, ReloadError> {
        let result = self.switch(policy).await;
        self.count_reload(&result);
        result
    }

    /// Counts a reload by its result, for `creditgate_policy_reloads_total`.
    pub fn count_reload(&self, result: &std::result::Result<usize, ReloadError>) {
        let label = match result {
            Ok(_) => "ok",
            Err(ReloadError::Invalid(_)) => "invalid",
            Err(ReloadError::NeedsRestart(_)) => "refused",
            Err(ReloadError::Failed(_)) => "failed",
        };
        self.current().metrics().reload(label);
    }

    async fn switch(&self, policy: Policy) -> std::result::Result<usize, ReloadError> {
        let old = self.current();
        let (was, now) = (&old.policy().gateway, &policy.gateway);
        // What the listener and its accept loop were started with.
        if was.listen != now.listen
            || was.admin_listen != now.admin_listen
            || was.max_connections != now.max_connections
            || was.header_read_timeout_ms != now.header_read_timeout_ms
            || was.keepalive_timeout_ms != now.keepalive_timeout_ms
            || was.shutdown_grace_ms != now.shutdown_grace_ms
        {
            return Err(ReloadError::NeedsRestart(
                "listen, admin_listen, max_connections, header_read_timeout, keepalive_timeout \
                 and shutdown_grace change only with a restart"
                    .into(),
            ));
        }
        if old.policy().store != policy.store {
            return Err(ReloadError::NeedsRestart(
                "[store] changes only with a restart".into(),
            ));
        }
        let next = old
            .with_policy(Arc::new(policy))
            .map_err(ReloadError::Failed)?;
        next.store()
            .set_catalog(next.policy().catalog(), next.policy().limits());
        next.seed_accounts()
            .await
            .map_err(|e| ReloadError::Failed(format!("seeding accounts failed: {e}")))?;
        let operations = next.policy().operations.len();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        tracing::info!(operations, "policy reloaded");
        Ok(operations)
    }

    /// Reads `path` and reloads from it.
    pub async fn reload_file(
        &self,
        path: &std::path::Path,
    ) -> std::result::Result<usize, ReloadError> {
        let policy = match Policy::load(path) {
            Ok(policy) => policy,
            Err(errors) => {
                let result = Err(ReloadError::Invalid(errors));
                self.count_reload(&result);
                return result;
            }
        };
        for note in &policy.notes {
            tracing::warn!("{note}");
        }
        self.reload(policy).await
    }
}

/// The proxy Pingora runs: each request delegates to the gateway that was current
/// when it started.
pub struct LiveProxy(pub Arc<LiveGateway>);

pub struct LiveCtx {
    gateway: Arc<Gateway>,
    inner: RequestCtx,
}

#[async_trait]
impl ProxyHttp for LiveProxy {
    type CTX = LiveCtx;

    fn new_ctx(&self) -> LiveCtx {
        let gateway = self.0.current();
        let inner = gateway.new_ctx();
        LiveCtx { gateway, inner }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut LiveCtx) -> Result<bool> {
        ctx.gateway.request_filter(session, &mut ctx.inner).await
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut LiveCtx,
    ) -> Result<Box<HttpPeer>> {
        ctx.gateway.upstream_peer(session, &mut ctx.inner).await
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut LiveCtx,
    ) -> Result<()> {
        ctx.gateway
            .request_body_filter(session, body, end_of_stream, &mut ctx.inner)
            .await
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut LiveCtx,
    ) -> Result<()> {
        ctx.gateway
            .upstream_request_filter(session, upstream_request, &mut ctx.inner)
            .await
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut LiveCtx,
    ) -> Result<()> {
        ctx.gateway
            .response_filter(session, upstream_response, &mut ctx.inner)
            .await
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut LiveCtx,
    ) -> Result<Option<Duration>> {
        ctx.gateway
            .response_body_filter(session, body, end_of_stream, &mut ctx.inner)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut LiveCtx,
    ) -> FailToProxy {
        ctx.gateway.fail_to_proxy(session, e, &mut ctx.inner).await
    }

    fn suppress_error_log(&self, session: &Session, ctx: &LiveCtx, error: &Error) -> bool {
        ctx.gateway.suppress_error_log(session, &ctx.inner, error)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut LiveCtx) {
        ctx.gateway.logging(session, e, &mut ctx.inner).await
    }
}
