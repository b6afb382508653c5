//! The admin API on `admin_listen`: accounts, members, keys, grants, plans, the
//! ledger and open holds. Routed by axum; every route but `/healthz` and `/readyz`
//! needs `Authorization: Bearer $CREDITGATE_ADMIN_TOKEN`, compared in constant
//! time. It never does ledger arithmetic: it validates input and calls the store.
//!
//! Errors use the gateway's JSON shape: `{"error": {"type", "message"}}`.

use std::collections::BTreeMap;
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
use crate::ledger::{
    AccountRejected, AdjustRequest, Credits, Effective, MemberTerms, OnboardKey, Onboarding,
    ParseCreditsError, DISABLED_FEATURES_MAX, METADATA_KEY_MAX_BYTES, METADATA_MAX_ENTRIES,
    METADATA_VALUE_MAX_BYTES, PREMIUM_FEATURE, REASON_MAX_BYTES,
};
use crate::policy::{Exact, Policy};
use crate::store::{ExportPosition, GrantRequest, Store, StoreError};
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
            AccountRejected::InsufficientCredits {
                required,
                available,
                overdraft_room,
            } => Refusal::new(
                StatusCode::CONFLICT,
                "insufficient_credits",
                format!(
                    "the adjustment takes {required} credits; {available} are available and {overdraft_room} more may go into debt"
                ),
            ),
            AccountRejected::MetadataLimit { limit } => {
                Refusal::invalid(format!("an account keeps at most {limit} metadata entries"))
            }
            AccountRejected::IdempotencyKeyReused => Refusal::new(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                "this idempotency_key was used for another change of this account",
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
        .route("/admin/accounts", post(create_account).get(list_accounts))
        .route(
            "/admin/accounts/{id}",
            get(get_account).patch(update_account),
        )
        .route("/admin/accounts/{id}/members", post(add_member))
        .route(
            "/admin/accounts/{id}/members/{member}",
            patch(update_member).delete(remove_member),
        )
        .route("/admin/accounts/{id}/keys", post(create_key).get(list_keys))
        .route("/admin/keys/{key_id}", delete(revoke_key))
        .route("/admin/accounts/{id}/grants", post(grant))
        .route("/admin/accounts/{id}/adjustments", post(adjust))
        .route("/admin/accounts/{id}/plan", post(change_plan))
        .route("/admin/accounts/{id}/ledger", get(ledger))
        .route("/admin/holds", get(holds))
        .route("/admin/ledger/export", get(export))
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
    #[serde(default)]
    members: Vec<NewMember>,
    #[serde(default)]
    keys: Vec<NewKey>,
    #[serde(default)]
    grants: Vec<NewGrant>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// Most members, keys or grants one onboarding call lists.
const ONBOARDING_MAX_ITEMS: usize = 100;

/// Checks metadata keys and values (the ledger bounds their number).
fn metadata_entry(key: &str, value: Option<&str>) -> Result<(), Refusal> {
    if key.is_empty() || key.len() > METADATA_KEY_MAX_BYTES || key.chars().any(char::is_control) {
        return Err(Refusal::invalid(format!(
            "metadata keys must be 1 to {METADATA_KEY_MAX_BYTES} bytes of text"
        )));
    }
    if value.is_some_and(|v| v.len() > METADATA_VALUE_MAX_BYTES) {
        return Err(Refusal::invalid(format!(
            "metadata values must be at most {METADATA_VALUE_MAX_BYTES} bytes"
        )));
    }
    Ok(())
}

/// A new key: the key itself (shown once), its id, its hash.
fn new_key() -> (String, String, [u8; 32]) {
    let key = format!("cg_{}", hex::encode(rand::random::<[u8; 24]>()));
    let key_id = format!("key_{}", hex::encode(rand::random::<[u8; 8]>()));
    let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    (key, key_id, hash)
}

/// Creates an account — with, in the same call, its members, their keys (in
/// this answer only), grants and metadata: all of it or nothing.
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
    let policy = state.policy();
    if policy.plan(&req.plan).is_none() {
        return Err(Refusal::invalid(format!("unknown plan {:?}", req.plan)));
    }
    if [req.members.len(), req.keys.len(), req.grants.len()]
        .iter()
        .any(|n| *n > ONBOARDING_MAX_ITEMS)
    {
        return Err(Refusal::invalid(format!(
            "members, keys and grants list at most {ONBOARDING_MAX_ITEMS} each"
        )));
    }
    if req.metadata.len() > METADATA_MAX_ENTRIES {
        return Err(Refusal::invalid(format!(
            "metadata has at most {METADATA_MAX_ENTRIES} entries"
        )));
    }
    for (k, v) in &req.metadata {
        metadata_entry(k, Some(v))?;
    }
    let mut onboarding = Onboarding {
        metadata: req.metadata.clone(),
        ..Onboarding::default()
    };
    for m in &req.members {
        name("member", &m.member)?;
        onboarding
            .members
            .push((m.member.clone(), m.terms(&policy)?));
    }
    let mut shown_keys = Vec::new();
    for k in &req.keys {
        name("member", &k.member)?;
        let (key, key_id, key_sha256) = new_key();
        shown_keys.push(json!({"key_id": key_id, "key": key, "member": k.member}));
        onboarding.keys.push(OnboardKey {
            member: k.member.clone(),
            key_id,
            key_sha256,
        });
    }
    for g in req.grants {
        onboarding.grants.push(grant_request(&policy, g)?);
    }
    let view = state
        .store()
        .onboard(
            &req.id,
            &req.plan,
            req.billing_anchor_day,
            &onboarding,
            state.now_ms(),
        )
        .await??;
    let mut answer = views::account(&view);
    answer["keys"] = json!(shown_keys);
    Ok((StatusCode::CREATED, Json(answer)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountChange {
    metadata: BTreeMap<String, Option<String>>,
}

/// Sets metadata entries (a `null` value removes one); the rest stays.
async fn update_account(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    raw: Bytes,
) -> Answer {
    let req: AccountChange = body(&raw)?;
    if req.metadata.len() > METADATA_MAX_ENTRIES {
        return Err(Refusal::invalid(format!(
            "metadata has at most {METADATA_MAX_ENTRIES} entries"
        )));
    }
    for (k, v) in &req.metadata {
        metadata_entry(k, v.as_deref())?;
    }
    state
        .store()
        .update_metadata(&id, &req.metadata, state.now_ms())
        .await??;
    let view = state.store().account(&id, state.now_ms()).await?;
    Ok((StatusCode::OK, Json(views::account(&view))))
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

/// Accounts in the order of their ids, a page at a time.
async fn list_accounts(State(state): State<AdminState>, Query(q): Query<ListQuery>) -> Answer {
    let limit = match &q.limit {
        None => 50,
        Some(l) => l
            .parse()
            .ok()
            .filter(|l| (1..=200).contains(l))
            .ok_or_else(|| Refusal::invalid("limit must be between 1 and 200"))?,
    };
    let views = state
        .store()
        .list_accounts(q.cursor.as_deref(), limit, state.now_ms())
        .await?;
    let next_cursor = match views.len() == limit {
        true => views.last().map(|v| v.id.clone()),
        false => None,
    };
    let accounts: Vec<Value> = views.iter().map(views::account).collect();
    Ok((
        StatusCode::OK,
        Json(json!({"accounts": accounts, "next_cursor": next_cursor})),
    ))
}

/// The account's active key ids and their members — never the keys.
async fn list_keys(State(state): State<AdminState>, Path(id): Path<String>) -> Answer {
    let view = state.store().account(&id, state.now_ms()).await?;
    let keys: Vec<Value> = view
        .members
        .iter()
        .flat_map(|(member, m)| {
            m.keys
                .iter()
                .flatten()
                .map(move |key_id| json!({"key_id": key_id, "member": member}))
        })
        .collect();
    Ok((StatusCode::OK, Json(json!({"account": id, "keys": keys}))))
}

/// Removes a member and revokes its keys at once.
async fn remove_member(
    State(state): State<AdminState>,
    Path((id, member)): Path<(String, String)>,
) -> Answer {
    state
        .store()
        .remove_member(&id, &member, state.now_ms())
        .await??;
    Ok((
        StatusCode::OK,
        Json(json!({"account": id, "member": member, "removed": true})),
    ))
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
    #[serde(default)]
    monthly_limit: Option<Value>,
    #[serde(default)]
    disabled_features: Option<Vec<String>>,
}

impl NewMember {
    /// The member's restrictions, checked: `premium_disabled = true` is
    /// `disabled_features` with `premium`.
    fn terms(&self, policy: &Policy) -> Result<MemberTerms, Refusal> {
        member_terms(
            policy,
            Some(self.premium_disabled),
            self.monthly_limit.as_ref(),
            self.disabled_features.as_deref(),
            &MemberTerms::default(),
        )
    }
}

/// Restrictions from an admin's request, over `current` for what it leaves
/// out. `monthly_limit: null` removes the limit.
fn member_terms(
    policy: &Policy,
    premium_disabled: Option<bool>,
    monthly_limit: Option<&Value>,
    disabled_features: Option<&[String]>,
    current: &MemberTerms,
) -> Result<MemberTerms, Refusal> {
    let mut terms = current.clone();
    match monthly_limit {
        None => {}
        Some(Value::Null) => terms.monthly_limit = None,
        Some(v) => terms.monthly_limit = Some(credits(v)?),
    }
    if let Some(features) = disabled_features {
        if features.len() > DISABLED_FEATURES_MAX {
            return Err(Refusal::invalid(format!(
                "disabled_features lists at most {DISABLED_FEATURES_MAX} features"
            )));
        }
        for f in features {
            if !policy.plans.values().any(|p| p.features.contains(f)) {
                return Err(Refusal::invalid(format!(
                    "disabled_features: no plan has the feature {f:?}"
                )));
            }
        }
        terms.disabled_features = features.iter().cloned().collect();
    }
    match premium_disabled {
        Some(true) => {
            terms.disabled_features.insert(PREMIUM_FEATURE.to_string());
        }
        Some(false) if disabled_features.is_none() => {
            terms.disabled_features.remove(PREMIUM_FEATURE);
        }
        _ => {}
    }
    Ok(terms)
}

/// A member as the admin API shows it.
fn member_json(account: &str, member: &str, m: &crate::ledger::Member) -> Value {
    let mut shown = views::member(m);
    shown["account"] = json!(account);
    shown["member"] = json!(member);
    shown
}

async fn add_member(State(state): State<AdminState>, Path(id): Path<String>, raw: Bytes) -> Answer {
    let req: NewMember = body(&raw)?;
    name("member", &req.member)?;
    let terms = req.terms(&state.policy())?;
    state
        .store()
        .add_member(&id, &req.member, &terms, state.now_ms())
        .await??;
    let view = state.store().account(&id, state.now_ms()).await?;
    let member = view
        .members
        .get(&req.member)
        .ok_or_else(|| Refusal::from(AccountRejected::UnknownMember))?;
    Ok((
        StatusCode::CREATED,
        Json(member_json(&id, &req.member, member)),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberChange {
    premium_disabled: Option<bool>,
    #[serde(default)]
    monthly_limit: Option<Value>,
    disabled_features: Option<Vec<String>>,
}

/// Changes what is sent of a member's restrictions; the rest stays.
async fn update_member(
    State(state): State<AdminState>,
    Path((id, member)): Path<(String, String)>,
    raw: Bytes,
) -> Answer {
    let req: MemberChange = body(&raw)?;
    // `"monthly_limit": null` removes the limit; leaving it out keeps it.
    let sent: Value = body(&raw)?;
    let limit = sent
        .get("monthly_limit")
        .map(|_| req.monthly_limit.clone().unwrap_or(Value::Null));
    let store = state.store();
    let view = store.account(&id, state.now_ms()).await?;
    let current = view
        .members
        .get(&member)
        .ok_or_else(|| Refusal::from(AccountRejected::UnknownMember))?
        .terms();
    let terms = member_terms(
        &state.policy(),
        req.premium_disabled,
        limit.as_ref(),
        req.disabled_features.as_deref(),
        &current,
    )?;
    store
        .update_member(&id, &member, &terms, state.now_ms())
        .await??;
    let view = store.account(&id, state.now_ms()).await?;
    let shown = view
        .members
        .get(&member)
        .ok_or_else(|| Refusal::from(AccountRejected::UnknownMember))?;
    Ok((StatusCode::OK, Json(member_json(&id, &member, shown))))
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
    let (key, key_id, hash) = new_key();
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

/// An admin grant, checked against the policy's grant kinds.
fn grant_request(policy: &Policy, req: NewGrant) -> Result<GrantRequest, Refusal> {
    name("idempotency_key", &req.idempotency_key)?;
    if req.kind == "plan" {
        return Err(Refusal::invalid("plan credits come from the plan and its refills; grant bonus, topup or a declared kind"));
    }
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
    Ok(GrantRequest {
        idempotency_key: req.idempotency_key,
        kind: req.kind,
        credits: amount,
        priority,
        expires_at_ms,
    })
}

async fn grant(State(state): State<AdminState>, Path(id): Path<String>, raw: Bytes) -> Answer {
    let req: NewGrant = body(&raw)?;
    let request = grant_request(&state.policy(), req)?;
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
struct NewAdjustment {
    credits: Value,
    reason: String,
    idempotency_key: String,
}

/// Signed credits: a number or a decimal string, `-` for a debit.
fn signed_credits(value: &Value) -> Result<(Credits, bool), Refusal> {
    let text = match value {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => return Err(Refusal::invalid("credits must be a number")),
    };
    let (debit, magnitude) = match text.strip_prefix('-') {
        Some(rest) => (true, rest.to_string()),
        None => (false, text),
    };
    let amount = match value {
        Value::Number(_) => credits(&Value::Number(
            magnitude
                .parse()
                .map_err(|_| Refusal::invalid("credits must be a number"))?,
        ))?,
        _ => credits(&Value::String(magnitude))?,
    };
    if amount.is_zero() {
        return Err(Refusal::invalid("credits must not be 0"));
    }
    Ok((amount, debit))
}

/// A signed adjustment: positive adds an `adjust` grant, negative debits what
/// is available, then debt up to the plan's overdraft limit (409 beyond it).
async fn adjust(State(state): State<AdminState>, Path(id): Path<String>, raw: Bytes) -> Answer {
    let req: NewAdjustment = body(&raw)?;
    name("idempotency_key", &req.idempotency_key)?;
    let (amount, debit) = signed_credits(&req.credits)?;
    let reason = req.reason.trim();
    if reason.is_empty() || reason.len() > REASON_MAX_BYTES || reason.chars().any(char::is_control)
    {
        return Err(Refusal::invalid(format!(
            "reason must be 1 to {REASON_MAX_BYTES} bytes of text"
        )));
    }
    let request = AdjustRequest {
        idempotency_key: req.idempotency_key,
        credits: amount,
        debit,
        reason: reason.to_string(),
    };
    let (receipt, created) = state
        .store()
        .adjust(&id, &request, state.now_ms())
        .await??;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let totals = state.store().totals(&id, state.now_ms()).await?;
    let signed = match receipt.debit {
        true => format!("-{}", receipt.credits),
        false => receipt.credits.to_string(),
    };
    Ok((
        status,
        Json(json!({
            "account": id,
            "credits": signed.parse::<serde_json::Number>().map_or(Value::Null, Value::Number),
            "reason": request.reason,
            "adjusted_at": views::time(receipt.granted_at_ms),
            "created": created,
            "available": totals.available.to_json(),
            "debt": totals.debt.to_json(),
        })),
    ))
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
struct ExportQuery {
    since: Option<String>,
    format: Option<String>,
}

/// Entries one page of the export reads from the store.
const EXPORT_PAGE: usize = 1_000;

/// Streams every account's ledger entries from `since` on, in time order, as
/// NDJSON or CSV: a page at a time, read only when the client has taken the
/// one before (bounded memory). A store failure midway ends the body without
/// its last chunk, so a client never takes a cut export for a whole one.
async fn export(State(state): State<AdminState>, Query(q): Query<ExportQuery>) -> Response {
    let since_ms = match q.since.as_deref() {
        None => 0,
        Some(text) => match chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
        {
            Some(ms) => ms,
            None => {
                return Refusal::invalid("since must be an RFC 3339 time like 2026-01-01T00:00:00Z")
                    .into_response()
            }
        },
    };
    let csv = match q.format.as_deref() {
        None | Some("ndjson") => false,
        Some("csv") => true,
        Some(other) => {
            return Refusal::invalid(format!("format must be ndjson or csv, not {other:?}"))
                .into_response()
        }
    };
    let store = state.store();
    // The first page is read before answering, so a store down answers 503.
    let first = match store.export(since_ms, None, EXPORT_PAGE).await {
        Ok(page) => page,
        Err(e) => return Refusal::from(e).into_response(),
    };
    struct Cursor {
        store: Arc<dyn Store>,
        page: Option<Vec<(String, crate::ledger::Entry)>>,
        after: Option<ExportPosition>,
        header: bool,
    }
    let start = Cursor {
        store,
        page: Some(first),
        after: None,
        header: csv,
    };
    let chunks = futures_util::stream::unfold(start, move |mut cursor| async move {
        let page = match cursor.page.take() {
            Some(page) => page,
            None => match &cursor.after {
                // The last page was short: nothing more.
                None => return None,
                Some(after) => match cursor
                    .store
                    .export(since_ms, Some(after), EXPORT_PAGE)
                    .await
                {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::error!("the ledger export stopped: {e}");
                        let failed = std::io::Error::other(e.to_string());
                        cursor.after = None;
                        return Some((Err(failed), cursor));
                    }
                },
            },
        };
        if page.is_empty() && !cursor.header {
            return None;
        }
        let mut out = String::new();
        if std::mem::take(&mut cursor.header) {
            out.push_str(views::EXPORT_CSV_HEADER);
        }
        for (account, entry) in &page {
            match csv {
                true => views::export_csv(account, entry, &mut out),
                false => views::export_ndjson(account, entry, &mut out),
            }
        }
        cursor.after = match page.len() == EXPORT_PAGE {
            true => page.last().map(|(a, e)| ExportPosition::of(a, e)),
            false => None,
        };
        if cursor.after.is_none() {
            // Ends after this chunk: an empty page next means done.
            cursor.page = None;
        }
        Some((Ok::<_, std::io::Error>(Bytes::from(out)), cursor))
    });
    let content_type = match csv {
        true => "text/csv; charset=utf-8",
        false => "application/x-ndjson",
    };
    (
        [(axum::http::header::CONTENT_TYPE, content_type)],
        axum::body::Body::from_stream(chunks),
    )
        .into_response()
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
