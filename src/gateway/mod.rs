//! The gateway: Pingora's proxy hooks, reading as the request's story —
//! authenticate, match, entitle, price, hold, forward, then settle or release.
//!
//! This module (with `main.rs`) is the only one that knows Pingora. It turns HTTP
//! into the core's types and the core's outcomes back into HTTP; it never does
//! ledger arithmetic itself.
//!
//! # Layout
//! - this file: the [`Gateway`], what a request carries ([`RequestCtx`]), Pingora's
//!   phases in the order a request meets them (`request_filter` … `logging`), then
//!   the steps they run: `admit` (authenticate → match → entitle → price → hold) and
//!   `end_hold` (settle or release).
//! - [`decision`]: what an ending costs — the one settle-or-release function.
//! - [`errors`]: the JSON errors, and the one mapping of a refusal or a hold's
//!   rejection to its error.
//! - `request`: what is read of the request head (key, facts, path) and rewritten
//!   in the forwarded one.
//! - `responses`: the gateway's own answers, replays, and the credit headers.
//! - `idempotency`: `Idempotency-Key`s and the recorder of replayable responses.
//! - `client_api`: balance, ledger and quote (a dry-run hold) for the caller.
//! - `stripe`: `POST /webhooks/stripe`, Stripe's events verified and paid in.
//! - `webhooks`: the sender of the outbox's events, signed, retried with backoff.
//! - `body`: reading and re-arming request bodies; `usage`: metering responses.
//! - `hold_guard`: a hold that ends exactly once; `live`: hot reload; `server`: the
//!   Pingora services.

mod body;
mod client_api;
mod client_conn;
pub mod decision;
pub mod errors;
mod hold_guard;
mod idempotency;
mod live;
mod request;
mod responses;
mod server;
pub mod stripe;
mod usage;
pub mod webhooks;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};
use sha2::{Digest, Sha256};

use crate::clock::Clock;
use crate::ledger::{
    Credits, HoldRejected, HoldRequest, HoldTerms, IdempotencyRequest, Millis, Recorded,
};
use crate::metrics::{Metrics, Timing};
use crate::policy::{
    Caller, Evaluation, HoldRule, NormalizedPath, OnUnavailable, Operation, OverHold, Policy,
    Refused, StoreConfig, Verdict,
};
use crate::store::{Identity, Store, StoreError};
use body::BodyError;
use decision::{decide, released_whatever_follows, Decision, Ended};
use errors::ApiError;
use hold_guard::HoldGuard;
use idempotency::{idempotency_of, Recorder};
use request::{forward_path, is_stripped, parse_json, presented_key, request_facts, request_path};
use responses::{header_value, HEADER_OPERATION};
use usage::UsageMeter;

pub use body::{LINGER_IDLE_TIMEOUT, LINGER_MAX_BYTES, LINGER_TIME};
pub use live::{LiveGateway, LiveProxy, ReloadError};
pub use server::{
    bind, run_server, serve, serve_live, serve_proxy, spawn_sweeper, Drained, StopSignals, Stopped,
    SWEEP_INTERVAL,
};

/// The metering proxy. Cheap to share: everything is behind `Arc`.
pub struct Gateway {
    policy: Arc<Policy>,
    store: Arc<dyn Store>,
    clock: Clock,
    metrics: Arc<Metrics>,
    /// One ready-made peer per upstream, in the policy's order.
    peers: Vec<HttpPeer>,
    /// Each upstream's `Host`: its URL's host (and port, unless the scheme's default).
    host_headers: Vec<HeaderValue>,
    /// Each plan's `x-creditgate-features` value.
    plan_features: std::collections::BTreeMap<String, HeaderValue>,
}

impl Gateway {
    /// Resolves every upstream once, so the hot path never does DNS, and tells the
    /// store which events to keep.
    pub fn new(
        policy: Arc<Policy>,
        store: Arc<dyn Store>,
        clock: Clock,
    ) -> std::result::Result<Self, String> {
        let mut peers = Vec::with_capacity(policy.upstreams.len());
        let mut host_headers = Vec::with_capacity(policy.upstreams.len());
        for u in &policy.upstreams {
            let address = std::net::ToSocketAddrs::to_socket_addrs(&(u.host.as_str(), u.port))
                .map_err(|e| {
                    format!(
                        "upstream {}: cannot resolve {}:{}: {e}",
                        u.name, u.host, u.port
                    )
                })?
                .next()
                .ok_or_else(|| format!("upstream {}: {} has no address", u.name, u.host))?;
            let sni = u.tls.as_ref().map_or("", |t| t.server_name.as_str());
            let mut peer = HttpPeer::new(address, u.tls.is_some(), sni.to_string());
            peer.options.connection_timeout = Some(Duration::from_millis(u.connect_timeout_ms));
            peer.options.read_timeout = Some(Duration::from_millis(u.read_timeout_ms));
            peer.options.write_timeout = Some(Duration::from_millis(u.read_timeout_ms));
            if let Some(tls) = &u.tls {
                peer.options.verify_cert = tls.verify;
                peer.options.verify_hostname = tls.verify;
                if !tls.ca_der.is_empty() {
                    peer.options.ca = Some(trusted_cas(&tls.ca_der));
                }
            }
            peers.push(peer);
            host_headers.push(header_value(&host_header(u)));
        }
        let plan_features = policy
            .plans
            .iter()
            .map(|(name, p)| (name.clone(), header_value(&p.features.join(","))))
            .collect();
        // The store keeps the events this policy's webhooks want (at start and
        // on every reload), within its outbox bound.
        store.set_events(policy.events.rules.clone(), policy.events.max_pending);
        Ok(Gateway {
            policy,
            store,
            clock,
            metrics: Arc::default(),
            peers,
            host_headers,
            plan_features,
        })
    }

    /// The same gateway on a new policy: same store, clock and metrics.
    pub fn with_policy(&self, policy: Arc<Policy>) -> std::result::Result<Gateway, String> {
        let mut next = Gateway::new(policy, self.store.clone(), self.clock.clone())?;
        next.metrics = self.metrics.clone();
        Ok(next)
    }

    /// The ready-made peers, one per upstream in the policy's order, with the
    /// policy's timeouts (the load bench's bare passthrough proxies to the same).
    pub fn peers(&self) -> &[HttpPeer] {
        &self.peers
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn now_ms(&self) -> Millis {
        self.clock.now_ms()
    }

    /// The gateway's counters, for `/metrics`.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn fails_open(&self) -> bool {
        matches!(
            self.policy.store,
            StoreConfig::Redis {
                on_unavailable: OnUnavailable::Allow,
                ..
            }
        )
    }

    /// Creates the policy's seeded accounts that do not exist yet, with their
    /// members and keys; an existing one is left as it is (a deleted key stays deleted).
    pub async fn seed_accounts(&self) -> std::result::Result<(), StoreError> {
        for seed in &self.policy.accounts {
            self.store.seed(seed, self.now_ms()).await?;
        }
        Ok(())
    }
}

/// What one request carries between Pingora's phases.
pub struct RequestCtx {
    request_id: String,
    /// The same id, ready for the two headers that carry it.
    request_id_value: HeaderValue,
    identity: Option<Arc<Identity>>,
    /// The normalized path: what was matched and priced, and what the upstream
    /// request carries (`upstream_request_filter`). Set when the request is forwarded.
    path: Option<NormalizedPath>,
    /// Index of the matched operation; `None` for an unmatched pass-through.
    operation: Option<usize>,
    upstream: usize,
    held: Credits,
    remaining: Option<Credits>,
    /// Ends the hold exactly once; releases it on drop if nothing else did.
    hold: Option<HoldGuard>,
    /// The upstream's status as sent to the client.
    status: Option<u16>,
    /// True once the gateway answered by itself (401, 402, ...).
    answered: bool,
    /// How the request ended, for the metrics: an error type the gateway answered,
    /// `client_api`, or `settled` / `released` once the hold ended.
    outcome: Option<&'static str>,
    /// A body read to price the request, forwarded in place of Pingora's own read.
    body: Option<Bytes>,
    /// Reads actual usage from the response of a metered operation.
    usage: Option<UsageMeter>,
    /// The request's `Idempotency-Key`, checked and recorded with its hold.
    idempotency: Option<IdempotencyRequest>,
    /// Keeps the response of an idempotent request, to replay it.
    recorder: Option<Recorder>,
    /// When the request's head had been read.
    started: Instant,
    /// When the gateway first asked for its upstream (it connects next).
    upstream_started: Option<Instant>,
    /// What the hold placed, kept after it ends (for the access log).
    hold_amount: Credits,
    /// What settling the hold charged.
    charged: Credits,
}

/// What `admit` decided.
enum Admitted {
    /// Forward to the upstream.
    Forward,
    /// The gateway answered itself (the client APIs).
    Answered,
}

fn new_request_id() -> String {
    // By hand: `hex::encode` collects chars one by one (~1,200 instructions here).
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for byte in rand::random::<[u8; 16]>() {
        id.push(char::from(DIGITS[usize::from(byte >> 4)]));
        id.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    id
}

/// Pingora's hooks, served through [`LiveProxy`] (which picks the gateway in service
/// for each request). Plain methods rather than a second `ProxyHttp` impl: the live
/// proxy awaits them directly, with no boxed future per hook.
impl Gateway {
    pub(super) fn new_ctx(&self) -> RequestCtx {
        let request_id = new_request_id();
        RequestCtx {
            request_id_value: header_value(&request_id),
            request_id,
            identity: None,
            path: None,
            operation: None,
            upstream: 0,
            held: Credits::ZERO,
            remaining: None,
            hold: None,
            status: None,
            answered: false,
            outcome: None,
            body: None,
            usage: None,
            idempotency: None,
            recorder: None,
            started: Instant::now(),
            upstream_started: None,
            hold_amount: Credits::ZERO,
            charged: Credits::ZERO,
        }
    }

    pub(super) async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        // The head is read: the client deadlines of the head end here, and the
        // body's reads are bounded one by one.
        client_conn::admitted(session);
        session.set_read_timeout(Some(Duration::from_millis(
            self.policy.gateway.body_read_timeout_ms,
        )));
        match self.admit(session, ctx).await {
            Ok(Admitted::Forward) => Ok(false),
            Ok(Admitted::Answered) => Ok(true),
            Err(error) => {
                self.answer(session, ctx, error).await?;
                Ok(true)
            }
        }
    }

    pub(super) async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // A retry asks again: the upstream's time counts from the first attempt.
        ctx.upstream_started.get_or_insert_with(Instant::now);
        // `admit` set a valid index: the policy resolved every upstream reference.
        match self.peers.get(ctx.upstream) {
            Some(peer) => Ok(Box::new(peer.clone())),
            None => Error::e_explain(ErrorType::InternalError, "no upstream for this operation"),
        }
    }

    pub(super) async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(saved) = &ctx.body {
            body::swap_in(saved, body, end_of_stream);
        }
        Ok(())
    }

    pub(super) async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Look the few request headers over once rather than probing the map
        // for each name we strip.
        let present: Vec<http::HeaderName> = upstream_request
            .headers
            .keys()
            .filter(|name| is_stripped(name))
            .cloned()
            .collect();
        for name in &present {
            upstream_request.remove_header(name);
        }
        // Here rather than in `admit`: re-arming a read body re-parses the request head.
        if let Some(path) = &ctx.path {
            forward_path(upstream_request, path)?;
        }
        if let Some(body) = &ctx.body {
            // We answered `Expect` and forward the body whole, with its real length.
            upstream_request.remove_header(&http::header::EXPECT);
            upstream_request.remove_header(&http::header::TRANSFER_ENCODING);
            upstream_request.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        }
        // The upstream's own name, as a client of its URL would send it (TLS
        // backends route and check it); `set_headers` may still override it.
        if let Some(host) = self.host_headers.get(ctx.upstream) {
            upstream_request.insert_header(http::header::HOST, host.clone())?;
        }
        for (name, value) in &self.policy.upstreams[ctx.upstream].set_headers {
            upstream_request.insert_header(name.clone(), value.clone())?;
        }
        upstream_request.insert_header("x-request-id", ctx.request_id_value.clone())?;
        if let Some(identity) = &ctx.identity {
            let features = self
                .plan_features
                .get(&identity.plan)
                .cloned()
                .unwrap_or(HeaderValue::from_static(""));
            upstream_request
                .insert_header("x-creditgate-account", header_value(&identity.account))?;
            upstream_request.insert_header("x-creditgate-plan", header_value(&identity.plan))?;
            upstream_request.insert_header("x-creditgate-features", features)?;
        }
        Ok(())
    }

    pub(super) async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        ctx.status = Some(status);
        if let Some(recorder) = ctx.recorder.as_mut() {
            recorder.head(status, upstream_response);
        }
        if let Some(meter) = ctx.usage.as_mut() {
            meter.on_headers(upstream_response);
        }
        // When every way the request can still end releases (a status that does not
        // charge), release now: the credits return sooner and the headers report
        // the true balance.
        let released = ctx.operation.is_some_and(|op| {
            released_whatever_follows(&self.policy.operations[op], status, ctx.held)
        });
        if released && ctx.hold.is_some() {
            self.end_hold(ctx, Ended::Complete).await;
        }
        self.add_credit_headers(upstream_response, ctx)?;
        if ctx.operation.is_none() && ctx.identity.is_some() {
            // An unmatched pass-through (`unmatched = "allow"`) is no operation: it
            // still carries the header, with an empty name no operation can have.
            upstream_response.insert_header(HEADER_OPERATION, "")?;
        }
        Ok(())
    }

    pub(super) fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let (Some(meter), Some(chunk)) = (ctx.usage.as_mut(), body.as_ref()) {
            meter.on_body(chunk);
        }
        if let (Some(recorder), Some(chunk)) = (ctx.recorder.as_mut(), body.as_ref()) {
            recorder.body(chunk);
        }
        Ok(None)
    }

    pub(super) async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let error_code = match e.esource() {
            // Nothing reached the client yet: answer in JSON, after releasing so the
            // remaining balance we report is true.
            ErrorSource::Upstream if ctx.status.is_none() && !ctx.answered => {
                self.end_hold(ctx, Ended::UpstreamFailed).await;
                let error = if is_timeout(e) {
                    ApiError::UpstreamTimeout
                } else {
                    ApiError::UpstreamUnavailable
                };
                let code = error.status();
                if let Err(write_error) = self.answer(session, ctx, error).await {
                    tracing::debug!(request_id = %ctx.request_id, "could not write the error response: {write_error}");
                }
                code
            }
            _ => 0,
        };
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    /// Pingora's own line for a failed request has no request id; `logging` writes
    /// the same failure with it, so every line about a request carries its id.
    pub(super) fn suppress_error_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        _error: &Error,
    ) -> bool {
        true
    }

    pub(super) async fn logging(
        &self,
        session: &mut Session,
        e: Option<&Error>,
        ctx: &mut RequestCtx,
    ) {
        self.end_hold(ctx, ended_by(e)).await;
        let operation = ctx
            .operation
            .map_or("unmatched", |i| self.policy.operations[i].name.as_str());
        let outcome = ctx
            .outcome
            .unwrap_or(if e.is_some() { "failed" } else { "free" });
        self.metrics.request(operation, outcome);
        let now = Instant::now();
        let timing = Timing {
            total: now.saturating_duration_since(ctx.started),
            upstream: ctx
                .upstream_started
                .map(|t| now.saturating_duration_since(t)),
            upstream_status: ctx.status,
        };
        self.metrics.timed(operation, timing);
        access_log(session, ctx, operation, outcome, timing);
        client_conn::ended(session);
        if let Some(e) = e {
            tracing::warn!(request_id = %ctx.request_id, status = ?ctx.status, "request ended with an error: {e}");
        }
    }
}

/// The access log: one line per request at `info`, target `creditgate::access`
/// (a JSON object with `CREDITGATE_LOG_FORMAT=json`). Who asked (account, member,
/// key id — never the key), what (operation, method, normalized path), how it
/// ended (status written to the client, held, charged, outcome) and how long it
/// took (`upstream_ms` only when an upstream was asked). Fields the request never
/// got to (no key, no path that normalizes) are empty.
fn access_log(session: &Session, ctx: &RequestCtx, operation: &str, outcome: &str, timing: Timing) {
    if !tracing::enabled!(target: "creditgate::access", tracing::Level::INFO) {
        return;
    }
    let req = session.req_header();
    // The path as matched; a request refused before that is normalized here.
    let path = match &ctx.path {
        Some(path) => path.as_str().to_string(),
        None => request_path(req).map_or_else(|_| String::new(), |p| p.as_str().to_string()),
    };
    let identity = ctx.identity.as_deref();
    let status = session
        .response_written()
        .map_or(0, |resp| resp.status.as_u16());
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    tracing::info!(
        target: "creditgate::access",
        request_id = %ctx.request_id,
        account = identity.map_or("", |i| i.account.as_str()),
        member = identity.map_or("", |i| i.member.as_str()),
        key_id = identity.map_or("", |i| i.key_id.as_str()),
        operation,
        method = req.method.as_str(),
        path,
        status,
        held = %ctx.hold_amount,
        charged = %ctx.charged,
        outcome,
        upstream_ms = timing.upstream.map(millis),
        total_ms = millis(timing.total),
        "request"
    );
}

/// The steps `request_filter` runs: authenticate → match → entitle → price → hold;
/// then, when the request ends, settle or release.
impl Gateway {
    /// Authenticate → match → entitle → price → hold. The body is read only when a
    /// step needs it, so a 404 or 403 that needs no body is never a 413.
    /// `Err(answer)` stops the request.
    async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> std::result::Result<Admitted, ApiError> {
        // Stripe signs its events; it has no key of an account.
        if self.policy.stripe.is_some() && session.req_header().uri.path() == stripe::PATH {
            ctx.outcome = Some("stripe");
            return self
                .stripe_webhook(session, ctx)
                .await
                .map(|()| Admitted::Answered);
        }
        let identity = Arc::new(self.authenticate(session.req_header()).await?);
        ctx.identity = Some(identity.clone());
        let account = identity.account.as_str();

        // Everything after this reads the normalized path, the client APIs too: the
        // path that is priced is the path that is forwarded.
        let path = request_path(session.req_header())?;
        if path.as_str().starts_with(client_api::PREFIX) {
            ctx.outcome = Some("client_api");
            return self
                .client_api(session, ctx, path.as_str())
                .await
                .map(|()| Admitted::Answered);
        }
        let caller = Caller {
            plan: &identity.plan,
            premium_disabled: identity.premium_disabled,
            disabled_features: &identity.disabled_features,
        };
        let route = self.policy.route(&path);
        let path_params = route.as_ref().map_or(&[][..], |r| r.path_params.as_slice());
        let before_body = self.policy.evaluate(
            route.as_ref(),
            &request_facts(session.req_header(), path_params, None),
            Some(&caller),
        );
        let (verdict, body) = match before_body {
            Evaluation::Decided(verdict) => (verdict, None),
            Evaluation::NeedsBody => {
                let body = self.read_body(session).await?;
                let json = parse_json(&body)?;
                let facts =
                    request_facts(session.req_header(), path_params, Some((&json, body.len())));
                match self.policy.evaluate(route.as_ref(), &facts, Some(&caller)) {
                    Evaluation::Decided(verdict) => (verdict, Some(body)),
                    // Unreachable: with the body given, every step can decide.
                    Evaluation::NeedsBody => return Err(ApiError::Internal),
                }
            }
        };
        // A refusal that names its operation is counted and logged under it.
        if let Err(
            Refused::PlanRequired { operation, .. }
            | Refused::PremiumDisabled { operation }
            | Refused::FeatureDisabled { operation, .. },
        ) = &verdict
        {
            ctx.operation = Some(*operation);
        }
        let (index, price, quota_units) =
            match verdict.map_err(|r| ApiError::refused(&self.policy, r))? {
                Verdict::Operation {
                    index,
                    price,
                    quota_units,
                } => (index, price, quota_units),
                Verdict::PassThrough { upstream } => {
                    ctx.upstream = upstream;
                    ctx.remaining = self.available(account).await?;
                    ctx.path = Some(path);
                    return Ok(Admitted::Forward);
                }
            };
        let op = &self.policy.operations[index];
        ctx.operation = Some(index);
        ctx.upstream = op.upstream;
        if let Some(rule) = &op.settle {
            ctx.usage = Some(UsageMeter::new(rule, self.policy.gateway.max_body_bytes));
        }

        let req = session.req_header();
        ctx.idempotency = idempotency_of(
            req,
            &path,
            body.as_deref(),
            self.policy.gateway.idempotency_ttl_ms,
        )?;
        ctx.path = Some(path);
        if !places_hold(op, price) {
            ctx.remaining = self.available(account).await?;
        } else if let Held::Replayed(recorded) = self
            .hold(ctx, &identity, index, (price, quota_units))
            .await?
        {
            self.replay(session, ctx, &recorded)
                .await
                .map_err(|_| ApiError::Internal)?;
            return Ok(Admitted::Answered);
        }
        if let Some(body) = body {
            // The hold (if any) is in the context: if re-arming fails, its guard releases it.
            body::rearm(session).await.map_err(|e| {
                tracing::error!(request_id = %ctx.request_id, "could not re-arm the request body: {e}");
                ApiError::Internal
            })?;
            ctx.body = Some(body);
        }
        Ok(Admitted::Forward)
    }

    /// Who the request's key is, by its SHA-256.
    async fn authenticate(&self, req: &RequestHeader) -> std::result::Result<Identity, ApiError> {
        let key = presented_key(req).ok_or(ApiError::MissingApiKey)?;
        let key_sha256: [u8; 32] = Sha256::digest(key).into();
        match self
            .metrics
            .store(self.store.identify(&key_sha256, self.now_ms()))
            .await
        {
            Ok(Some(identity)) => Ok(identity),
            Ok(None) => Err(ApiError::InvalidApiKey),
            Err(e) => Err(ApiError::store(e)),
        }
    }

    /// Reads the whole request body, up to `max_body_bytes`, to match or price it.
    async fn read_body(&self, session: &mut Session) -> std::result::Result<Bytes, ApiError> {
        let limit = self.policy.gateway.max_body_bytes;
        body::read_all(session, limit).await.map_err(|e| match e {
            BodyError::TooLarge => ApiError::RequestTooLarge { limit },
            BodyError::NotHttp1 => ApiError::InvalidRequest {
                source: "body".into(),
                message: "can only be priced over HTTP/1.1".into(),
            },
            BodyError::Read(e) => ApiError::InvalidRequest {
                source: "body".into(),
                message: format!("could not be read: {e}"),
            },
        })
    }

    /// The hold a request for operation `index` at `price`, using `quota_units` of
    /// its quota, asks the store for. Built here only, for the request and for its
    /// quote alike, so the quote's dry run asks exactly what the hold will: the same
    /// caller, amount, quota, terms and limits.
    fn hold_request(
        &self,
        identity: &Identity,
        index: usize,
        (price, quota_units): (Credits, u64),
        request_id: &str,
        idempotency: Option<IdempotencyRequest>,
    ) -> HoldRequest {
        let op = &self.policy.operations[index];
        let terms = HoldTerms {
            partial_min: match op.charge.hold {
                HoldRule::Full => None,
                HoldRule::Available { min_hold } => Some(min_hold),
            },
            overdraft: op.charge.over_hold == OverHold::Overdraft,
            quota_units,
        };
        // What `Policy::evaluate` decided on this replica's view of the key and account —
        // possibly seconds old on Redis — is checked again by the hold, against
        // the state it commits on: a key revoked, a plan downgraded or premium
        // disabled through any replica is refused at once.
        let caller = crate::ledger::Caller {
            member: identity.member.clone(),
            key_id: identity.key_id.clone(),
            requires: op.requires.clone(),
        };
        HoldRequest {
            operation: op.name.clone(),
            request_id: request_id.to_string(),
            amount: price,
            ttl_ms: self.policy.gateway.hold_ttl_ms,
            max_holds: self.policy.gateway.max_holds_per_account,
            quota: op.quota.as_ref().map(|q| q.name.clone()),
            idempotency,
            caller: Some(caller),
            terms,
        }
    }

    async fn hold(
        &self,
        ctx: &mut RequestCtx,
        identity: &Identity,
        index: usize,
        price: (Credits, u64),
    ) -> std::result::Result<Held, ApiError> {
        let account = identity.account.as_str();
        let request = self.hold_request(
            identity,
            index,
            price,
            &ctx.request_id,
            ctx.idempotency.clone(),
        );
        match self
            .metrics
            .store(self.store.hold(account, &request, self.now_ms()))
            .await
        {
            Ok(Ok(placed)) => {
                ctx.held = placed.held;
                ctx.hold_amount = placed.held;
                ctx.remaining = Some(placed.available);
                self.metrics.held(placed.held);
                ctx.hold = Some(HoldGuard::new(
                    self.store.clone(),
                    self.clock.clone(),
                    self.metrics.clone(),
                    account.to_string(),
                    placed.hold_id,
                ));
                if let Some(idem) = &ctx.idempotency {
                    ctx.recorder = Some(Recorder::new(
                        idem.key.clone(),
                        self.policy.gateway.idempotency_replay_max_bytes,
                    ));
                }
                Ok(Held::Placed)
            }
            // A repeat of a settled request is answered from its record.
            Ok(Err(HoldRejected::Replay {
                response: Some(recorded),
                ..
            })) if recorded.body.is_some() => Ok(Held::Replayed(recorded)),
            Ok(Err(rejection)) => {
                if let HoldRejected::InsufficientCredits { available, .. } = &rejection {
                    ctx.remaining = Some(*available);
                }
                let mut error = ApiError::rejected(&self.policy, index, rejection, &identity.plan);
                if let ApiError::QuotaExhausted { refill_in_s, .. } = &mut error {
                    *refill_in_s = self.refill_in_s(account).await;
                }
                Err(error)
            }
            Err(e) => match unplaced(e, self.fails_open()) {
                Unplaced::ForwardUnmetered(e) => {
                    // on_unavailable = "allow": forward unmetered, and count it.
                    let forwarded = self.metrics.unmetered();
                    tracing::warn!(request_id = %ctx.request_id, unmetered = forwarded, "forwarding unmetered: {e}");
                    ctx.remaining = None;
                    Ok(Held::Placed)
                }
                Unplaced::Refuse(error) => Err(error),
            },
        }
    }

    /// Seconds until `account`'s next refill (which renews its quotas), rounded
    /// up; `None` if the store cannot say. Asked only when a quota is exhausted.
    async fn refill_in_s(&self, account: &str) -> Option<u64> {
        let now = self.now_ms();
        let view = self
            .metrics
            .store(self.store.account(account, now))
            .await
            .ok()?;
        let next = view.next_refill_ms;
        // An account whose plan never refills has no time to wait for.
        (next != Millis::MAX && next > now).then(|| (next - now).div_ceil(1_000))
    }

    async fn available(&self, account: &str) -> std::result::Result<Option<Credits>, ApiError> {
        match self
            .metrics
            .store(self.store.totals(account, self.now_ms()))
            .await
        {
            Ok(totals) => Ok(Some(totals.available)),
            // A free request needs the store only for this header: go on without it
            // through an outage. A contended or corrupt account is never forwarded.
            Err(StoreError::Unavailable(_)) => Ok(None),
            Err(e) => Err(ApiError::store(e)),
        }
    }

    /// Ends the request's hold, if any, as [`decide`] says. Runs at most once: the
    /// guard is taken out of the context.
    async fn end_hold(&self, ctx: &mut RequestCtx, ended: Ended) {
        let Some(guard) = ctx.hold.take() else { return };
        // Only matched operations hold, so an unmatched request has no guard.
        let Some(op) = ctx.operation.map(|i| &self.policy.operations[i]) else {
            return self.release(guard, ctx).await;
        };
        let usage = ctx.usage.as_ref().and_then(UsageMeter::usage);
        let decision = decide(op, ctx.status, ended, usage.as_ref(), ctx.held);
        tracing::debug!(request_id = %ctx.request_id, status = ?ctx.status, ?ended, ?usage, ?decision, "hold ends");
        let Decision::Settle(charge) = decision else {
            return self.release(guard, ctx).await;
        };
        ctx.outcome = Some("settled");
        ctx.charged = charge;
        let metered = match (&op.settle, &usage) {
            (Some(rule), Some(usage)) => rule.rate.describe(usage),
            _ => None,
        };
        guard
            .settle(charge, metered.as_deref(), &ctx.request_id)
            .await;
        self.record_response(ctx).await;
    }

    async fn release(&self, guard: HoldGuard, ctx: &mut RequestCtx) {
        ctx.held = Credits::ZERO;
        ctx.outcome = Some("released");
        if let Some(available) = guard.release(&ctx.request_id).await {
            ctx.remaining = Some(available);
        }
    }
}

/// What a hold the store failed to place becomes.
#[derive(Debug, PartialEq)]
enum Unplaced {
    /// `on_unavailable = "allow"` and the store is down: forward without a hold.
    ForwardUnmetered(StoreError),
    Refuse(ApiError),
}

/// Only an outage may be forwarded unmetered, and only when the policy allows it: a
/// contended or corrupt account is a 500 whatever `on_unavailable` says — the store
/// answered, so the account is there, and forwarding would let its requests run free.
fn unplaced(error: StoreError, fails_open: bool) -> Unplaced {
    match error {
        StoreError::Unavailable(_) if fails_open => Unplaced::ForwardUnmetered(error),
        error => Unplaced::Refuse(ApiError::store(error)),
    }
}

/// Whether a request for `op` at `price` places a hold (and so is admitted by the
/// store's check): a free operation holds nothing — unless it counts against a
/// quota. The request and its quote ask this alike.
fn places_hold(op: &Operation, price: Credits) -> bool {
    !price.is_zero() || op.quota.is_some()
}

/// How placing a hold went, when it did not need an error answer.
enum Held {
    Placed,
    /// An idempotent repeat of a settled request: answer it from its record.
    Replayed(Recorded),
}

/// The `Host` an upstream is sent: its URL's authority, the port left out when it
/// is the scheme's default, as a client of that URL would send it.
fn host_header(upstream: &crate::policy::Upstream) -> String {
    let host = if upstream.host.contains(':') {
        format!("[{}]", upstream.host)
    } else {
        upstream.host.clone()
    };
    let default_port = if upstream.tls.is_some() { 443 } else { 80 };
    if upstream.port == default_port {
        host
    } else {
        format!("{host}:{}", upstream.port)
    }
}

/// The CAs an upstream trusts, as Pingora's TLS takes them.
fn trusted_cas(ca_der: &[Vec<u8>]) -> Arc<pingora::protocols::tls::CaType> {
    use pingora::utils::tls::{parse_x509, WrappedX509};
    // `parse_x509` panics on a certificate that does not parse; the policy's
    // validation parsed each of these with the same parser (x509-parser 0.16,
    // `X509Certificate::from_der`) and refused the file otherwise.
    let cas: Vec<WrappedX509> = ca_der
        .iter()
        .map(|der| WrappedX509::new(der.clone(), parse_x509))
        .collect();
    Arc::from(cas.into_boxed_slice())
}

/// Which side a Pingora error came from, for the decision.
fn ended_by(error: Option<&Error>) -> Ended {
    match error.map(|e| e.esource()) {
        None => Ended::Complete,
        Some(ErrorSource::Upstream) => Ended::UpstreamFailed,
        Some(ErrorSource::Downstream) => Ended::ClientAborted,
        Some(ErrorSource::Internal) | Some(ErrorSource::Unset) => Ended::GatewayFailed,
    }
}

fn is_timeout(error: &Error) -> bool {
    matches!(
        error.etype(),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_outage_is_forwarded_unmetered_and_only_when_allowed() {
        let outage = || StoreError::Unavailable("connection refused".into());
        let contended = || StoreError::Contended("changed 64 times".into());
        let corrupt = || StoreError::Corrupt("does not decode".into());
        assert_eq!(
            unplaced(outage(), true),
            Unplaced::ForwardUnmetered(outage())
        );
        assert_eq!(
            unplaced(outage(), false),
            Unplaced::Refuse(ApiError::StoreUnavailable)
        );
        for fails_open in [true, false] {
            for failure in [contended(), corrupt()] {
                let Unplaced::Refuse(error) = unplaced(failure.clone(), fails_open) else {
                    panic!("{failure} was forwarded (fails_open = {fails_open})");
                };
                assert_eq!((error.status(), error.kind()), (500, "store_error"));
                let body = error.body("r1").to_string();
                assert!(!body.contains("decode") && !body.contains("64"), "{body}");
            }
            assert_eq!(
                unplaced(StoreError::UnknownAccount("gone".into()), fails_open),
                Unplaced::Refuse(ApiError::InvalidApiKey)
            );
        }
    }

    #[test]
    fn an_upstream_is_sent_its_urls_host_with_the_port_unless_the_schemes_default() {
        let upstream = |host: &str, port: u16, https: bool| crate::policy::Upstream {
            name: "u".into(),
            host: host.into(),
            port,
            tls: https.then(|| crate::policy::UpstreamTls {
                server_name: host.into(),
                ca_der: Vec::new(),
                verify: true,
            }),
            connect_timeout_ms: 1,
            read_timeout_ms: 1,
            set_headers: Vec::new(),
        };
        assert_eq!(
            host_header(&upstream("api.example.com", 443, true)),
            "api.example.com"
        );
        assert_eq!(
            host_header(&upstream("api.example.com", 8443, true)),
            "api.example.com:8443"
        );
        assert_eq!(host_header(&upstream("backend", 80, false)), "backend");
        assert_eq!(host_header(&upstream("backend", 443, false)), "backend:443");
        assert_eq!(host_header(&upstream("::1", 9000, false)), "[::1]:9000");
    }

    #[test]
    fn request_ids_are_32_lowercase_hex_digits_and_differ() {
        let (a, b) = (new_request_id(), new_request_id());
        for id in [&a, &b] {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
                "{id}"
            );
        }
        assert_ne!(a, b);
    }
}
