//! The admin API on `admin_listen`: accounts, members, keys, grants, plans, the
//! ledger and open holds. Routed by axum; every route but `/healthz` and `/readyz`
//! needs `Authorization: Bearer $CREDITGATE_ADMIN_TOKEN`, compared in constant
//! time. It never does ledger arithmetic: it validates input and calls the store.
//!
//! Errors use the gateway's JSON shape: `{"error": {"type", "message"}}`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::gateway::{LiveGateway, ReloadError};
use crate::ledger::{AccountRejected, Credits, Effective, ParseCreditsError};
use crate::policy::{Exact, Policy};
use crate::store::{GrantRequest, Store, StoreError};
use crate::views;

/// The environment variable holding the admin token.
pub const TOKEN_ENV: &str = "CREDITGATE_ADMIN_TOKEN";

/// Most open holds `GET /admin/holds` lists.
const MAX_HOLDS_LISTED: usize = 1_000;

/// Longest account id, member name or idempotency key accepted: the length the
/// worst case of an account's state is computed with.
const MAX_NAME_BYTES: usize = crate::ledger::NAME_MAX_BYTES;

#[derive(Clone)]
pub struct AdminState {
    live: Arc<LiveGateway>,
    /// Where `POST /admin/policy/reload` reads the policy from.
    policy_file: Option<PathBuf>,
    /// SHA-256 of the token; `None` = no token (allowed on loopback only).
    token_sha256: Option<[u8; 32]>,
}

impl AdminState {
    pub fn new(live: Arc<LiveGateway>, policy_file: Option<PathBuf>, token: Option<&str>) -> Self {
        let token_sha256 = token
            .filter(|t| !t.is_empty())
            .map(|t| Sha256::digest(t.as_bytes()).into());
        AdminState {
            live,
            policy_file,
            token_sha256,
        }
    }

    fn policy(&self) -> Arc<Policy> {
        self.live.policy()
    }

    fn store(&self) -> Arc<dyn Store> {
        self.live.current().store().clone()
    }

    fn now_ms(&self) -> crate::ledger::Millis {
        self.live.current().clock().now_ms()
    }
}

/// Refuses to expose the admin API beyond loopback without a token.
pub fn check_exposure(addr: &str, token: Option<&str>) -> Result<(), String> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("admin_listen {addr:?} is not an IP:PORT address"))?;
    if !addr.ip().is_loopback() && token.is_none_or(str::is_empty) {
        return Err(format!("admin_listen {addr} is not a loopback address: set {TOKEN_ENV} to protect the admin API"));
    }
    Ok(())
}

/// An error the admin API answers with.
struct Refusal {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            kind,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Refusal::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"type": self.kind, "code": self.kind, "message": self.message}})),
        )
            .into_response()
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UnknownAccount(id) => Refusal::new(
                StatusCode::NOT_FOUND,
                "unknown_account",
                format!("account {id:?} does not exist"),
            ),
            StoreError::Unavailable(_) => Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the credit store is unavailable",
            ),
            StoreError::Contended(detail) => {
                tracing::error!("admin call failed: {detail}");
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store_error",
                    "the account changed too often while this was being applied; retry",
                )
            }
            StoreError::Corrupt(detail) => {
                tracing::error!("admin call failed: {detail}");
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store_error",
                    "the account's stored state does not decode",
                )
            }
        }
    }
}

impl From<AccountRejected> for Refusal {
    fn from(r: AccountRejected) -> Self {
        match r {
            AccountRejected::SeatLimit { seats } => Refusal::new(
                StatusCode::CONFLICT,
                "seat_limit",
                format!("the plan has {seats} seats, all taken"),
            ),
            AccountRejected::MemberExists => Refusal::new(
                StatusCode::CONFLICT,
                "member_exists",
                "this member already exists",
            ),
            AccountRejected::AccountExists => Refusal::new(
                StatusCode::CONFLICT,
                "account_exists",
                "this account already exists",
            ),
            AccountRejected::UnknownMember => Refusal::new(
                StatusCode::NOT_FOUND,
                "unknown_member",
                "no such member in this account",
            ),
            AccountRejected::UnknownKey => {
                Refusal::new(StatusCode::NOT_FOUND, "unknown_key", "no such key")
            }
            AccountRejected::UnknownPlan => Refusal::invalid("no such plan in the policy"),
            AccountRejected::GrantOverflow => {
                Refusal::invalid("the grant would overflow the account's total")
            }
            AccountRejected::KeyLimit { limit } => Refusal::new(
                StatusCode::CONFLICT,
                "key_limit",
                format!("the member has {limit} active keys, the most it may have"),
            ),
        }
    }
}

type Answer = Result<(StatusCode, Json<Value>), Refusal>;

/// A JSON body, with our error shape when it does not parse.
fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, Refusal> {
    serde_json::from_slice(bytes)
        .map_err(|e| Refusal::invalid(format!("the body is not what this endpoint takes: {e}")))
}

fn name(what: &str, value: &str) -> Result<(), Refusal> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_BYTES
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Refusal::invalid(format!(
            "{what} must be 1 to {MAX_NAME_BYTES} letters, digits, '-', '_', '.' or '@'"
        )))
    }
}

/// A JSON amount of credits: a number (read exactly, exponent or not) or a
/// decimal string, at most 3 decimals.
fn credits(value: &Value) -> Result<Credits, Refusal> {
    let amount = match value {
        Value::Number(n) => match Exact::from_json_number(&n.to_string()) {
            None => Err(ParseCreditsError::NotDecimal),
            Some(a) if a.is_negative() => Err(ParseCreditsError::Negative),
            Some(a) if a.decimals() > 3 => Err(ParseCreditsError::TooPrecise),
            Some(a) => a
                .scaled_ceil(&[], 3)
                .map(Credits::from_millicredits)
                .ok_or(ParseCreditsError::TooLarge),
        },
        Value::String(s) => s.parse(),
        _ => return Err(Refusal::invalid("credits must be a number")),
    };
    amount.map_err(|e| Refusal::invalid(format!("credits: {e}")))
}

async fn require_token(
    State(state): State<AdminState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = state.token_sha256 else {
        return next.run(request).await;
    };
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| -> [u8; 32] { Sha256::digest(t.trim().as_bytes()).into() });
    // Hashes have equal length, so the comparison leaks nothing about the token.
    match presented {
        Some(hash) if bool::from(hash.ct_eq(&expected)) => next.run(request).await,
        _ => Refusal::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("send Authorization: Bearer ${TOKEN_ENV}"),
        )
        .into_response(),
    }
}

pub fn router(state: AdminState) -> Router {
    let protected = Router::new()
        .route("/admin/accounts", post(create_account))
        .route("/admin/accounts/{id}", get(get_account))
        .route("/admin/accounts/{id}/members", post(add_member))
        .route(
            "/admin/accounts/{id}/members/{member}",
            patch(update_member),
        )
        .route("/admin/accounts/{id}/keys", post(create_key))
        .route("/admin/keys/{key_id}", delete(revoke_key))
        .route("/admin/accounts/{id}/grants", post(grant))
        .route("/admin/accounts/{id}/plan", post(change_plan))
        .route("/admin/accounts/{id}/ledger", get(ledger))
        .route("/admin/holds", get(holds))
        .route("/metrics", get(metrics))
        .route("/admin/policy/reload", post(reload))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .merge(protected)
        // axum's own 404 and 405 have empty bodies; every error here is JSON.
        .method_not_allowed_fallback(|| async {
            Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this admin endpoint does not take this method",
            )
        })
        .fallback(|| async {
            Refusal::new(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint")
        })
        .with_state(state)
}

/// Serves the admin API on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

async fn readyz(State(state): State<AdminState>) -> Response {
    // Ready while the gateway's listener accepts (a graceful stop ends that
    // first) and the store answers. This listener answers, so it serves too.
    if !state.live.is_accepting() {
        return Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the gateway is stopping: it accepts nothing new",
        )
        .into_response();
    }
    match state.store().ping().await {
        Ok(_) => Json(json!({"status": "ready"})).into_response(),
        // Why, for whoever watches readiness: down, or lost its data.
        Err(StoreError::Unavailable(why)) => Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("the credit store is unavailable: {why}"),
        )
        .into_response(),
        Err(e) => Refusal::from(e).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    id: String,
    plan: String,
    billing_anchor_day: Option<u8>,
}

async fn create_account(State(state): State<AdminState>, raw: Bytes) -> Answer {
    let req: NewAccount = body(&raw)?;
    name("id", &req.id)?;
    if req
        .billing_anchor_day
        .is_some_and(|d| !(1..=31).contains(&d))
    {
        return Err(Refusal::invalid(
            "billing_anchor_day must be between 1 and 31",
        ));
    }
    if state.policy().plan(&req.plan).is_none() {
        return Err(Refusal::invalid(format!("unknown plan {:?}", req.plan)));
    }
    let view = state
        .store()
        .create_account(&req.id, &req.plan, req.billing_anchor_day, state.now_ms())
        .await??;
    Ok((StatusCode::CREATED, Json(views::account(&view))))
}

async fn get_account(State(state): State<AdminState>, Path(id): Path<String>) -> Answer {
    let view = state.store().account(&id, state.now_ms()).await?;
    Ok((StatusCode::OK, Json(views::account(&view))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewMember {
    member: String,
    #[serde(default)]
    premium_disabled: bool,
}

async fn add_member(State(state): State<AdminState>, Path(id): Path<String>, raw: Bytes) -> Answer {
    let req: NewMember = body(&raw)?;
    name("member", &req.member)?;
    state
        .store()
        .add_member(&id, &req.member, req.premium_disabled, state.now_ms())
        .await??;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"account": id, "member": req.member, "premium_disabled": req.premium_disabled}),
        ),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberChange {
    premium_disabled: bool,
}

async fn update_member(
    State(state): State<AdminState>,
    Path((id, member)): Path<(String, String)>,
    raw: Bytes,
) -> Answer {
    let req: MemberChange = body(&raw)?;
    state
        .store()
        .update_member(&id, &member, req.premium_disabled, state.now_ms())
        .await??;
    Ok((
        StatusCode::OK,
        Json(json!({"account": id, "member": member, "premium_disabled": req.premium_disabled})),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    member: String,
}

/// Creates a key for a member. The key is in this answer only: the store keeps
/// its SHA-256.
async fn create_key(State(state): State<AdminState>, Path(id): Path<String>, raw: Bytes) -> Answer {
    let req: NewKey = body(&raw)?;
    let key = format!("cg_{}", hex::encode(rand::random::<[u8; 24]>()));
    let key_id = format!("key_{}", hex::encode(rand::random::<[u8; 8]>()));
    let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    state
        .store()
        .add_key(&id, &req.member, &key_id, &hash, state.now_ms())
        .await??;
    Ok((
        StatusCode::CREATED,
        Json(json!({"key_id": key_id, "key": key, "account": id, "member": req.member})),
    ))
}

async fn revoke_key(State(state): State<AdminState>, Path(key_id): Path<String>) -> Answer {
    state.store().revoke_key(&key_id, state.now_ms()).await??;
    Ok((
        StatusCode::OK,
        Json(json!({"key_id": key_id, "revoked": true})),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGrant {
    kind: String,
    credits: Value,
    expires_at: Option<String>,
    priority: Option<u32>,
    idempotency_key: String,
}

async fn grant(State(state): State<AdminState>, Path(id): Path<String>, raw: Bytes) -> Answer {
    let req: NewGrant = body(&raw)?;
    name("idempotency_key", &req.idempotency_key)?;
    if req.kind == "plan" {
        return Err(Refusal::invalid("plan credits come from the plan and its refills; grant bonus, topup or a declared kind"));
    }
    let policy = state.policy();
    let kind_priority = policy.grant_priority(&req.kind).ok_or_else(|| {
        let known: Vec<&str> = policy
            .grant_kinds
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| *k != "plan")
            .collect();
        Refusal::invalid(format!(
            "unknown grant kind {:?}: use one of {}",
            req.kind,
            known.join(", ")
        ))
    })?;
    let amount = credits(&req.credits)?;
    let expires_at_ms = match &req.expires_at {
        None => None,
        Some(text) => Some(
            chrono::DateTime::parse_from_rfc3339(text)
                .ok()
                .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
                .ok_or_else(|| {
                    Refusal::invalid(
                        "expires_at must be an RFC 3339 time like 2026-12-31T00:00:00Z",
                    )
                })?,
        ),
    };
    let priority = req.priority.unwrap_or(kind_priority);
    if priority > 1_000 {
        return Err(Refusal::invalid("priority must be between 0 and 1000"));
    }
    let request = GrantRequest {
        idempotency_key: req.idempotency_key,
        kind: req.kind,
        credits: amount,
        priority,
        expires_at_ms,
    };
    let (receipt, created) = state.store().grant(&id, &request, state.now_ms()).await??;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut answer = views::grant(&receipt);
    answer["created"] = json!(created);
    Ok((status, Json(answer)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanChange {
    plan: String,
    effective: String,
}

async fn change_plan(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    raw: Bytes,
) -> Answer {
    let req: PlanChange = body(&raw)?;
    let effective = match req.effective.as_str() {
        "now" => Effective::Now,
        "period_end" => Effective::PeriodEnd,
        other => {
            return Err(Refusal::invalid(format!(
                "effective must be \"now\" or \"period_end\", not {other:?}"
            )))
        }
    };
    if state.policy().plan(&req.plan).is_none() {
        return Err(Refusal::invalid(format!("unknown plan {:?}", req.plan)));
    }
    state
        .store()
        .change_plan(&id, &req.plan, effective, state.now_ms())
        .await??;
    let view = state.store().account(&id, state.now_ms()).await?;
    Ok((StatusCode::OK, Json(views::account(&view))))
}

#[derive(Deserialize)]
struct PageQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

async fn ledger(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Answer {
    let mut query = Vec::new();
    if let Some(l) = &q.limit {
        query.push(format!("limit={l}"));
    }
    if let Some(c) = &q.cursor {
        query.push(format!("cursor={c}"));
    }
    let (limit, cursor) = views::page_params(Some(&query.join("&"))).map_err(Refusal::invalid)?;
    let entries = state
        .store()
        .ledger(&id, limit, cursor, state.now_ms())
        .await?;
    Ok((StatusCode::OK, Json(views::ledger(&entries, limit))))
}

#[derive(Deserialize)]
struct HoldsQuery {
    account: Option<String>,
}

async fn holds(State(state): State<AdminState>, Query(q): Query<HoldsQuery>) -> Answer {
    let holds = state
        .store()
        .holds(q.account.as_deref(), MAX_HOLDS_LISTED, state.now_ms())
        .await?;
    let list: Vec<Value> = holds
        .iter()
        .map(|(account, h)| views::hold(account, h))
        .collect();
    Ok((StatusCode::OK, Json(json!({"holds": list}))))
}

/// Prometheus text format.
async fn metrics(State(state): State<AdminState>) -> Response {
    let headers = [(
        axum::http::header::CONTENT_TYPE,
        "text/plain; version=0.0.4",
    )];
    let mut text = state.live.current().metrics().render();
    crate::metrics::render_pending_ends(&mut text, state.store().pending_ends());
    (headers, text).into_response()
}

/// Re-reads the policy file: new requests use it at once; an invalid file is
/// refused with its errors and the running policy stays.
async fn reload(State(state): State<AdminState>) -> Answer {
    let Some(path) = &state.policy_file else {
        state
            .live
            .count_reload(&Err(ReloadError::NeedsRestart("no policy file".into())));
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "no_policy_file",
            "this gateway was not started from a policy file",
        ));
    };
    match state.live.reload_file(path).await {
        Ok(operations) => Ok((
            StatusCode::OK,
            Json(json!({"reloaded": true, "operations": operations})),
        )),
        Err(ReloadError::Invalid(errors)) => {
            let list: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
            let body = json!({"error": {"type": "invalid_policy", "code": "invalid_policy", "message": "the policy file is invalid; the running policy stays", "errors": list}});
            Ok((StatusCode::BAD_REQUEST, Json(body)))
        }
        Err(other) => Err(Refusal::new(
            StatusCode::CONFLICT,
            "reload_refused",
            format!("{other}; the running policy stays"),
        )),
    }
}
