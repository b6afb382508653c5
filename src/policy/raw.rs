//! The policy file exactly as written: serde types that refuse unknown keys.
//!
//! Nothing here is validated beyond TOML's own types; `super::validate` turns this
//! into a `Policy` that cannot be invalid. Fields that a later error may point at
//! are `Spanned`, so every error can say `FILE:LINE:COL`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::{Spanned, Value};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub version: Spanned<i64>,
    #[serde(default)]
    pub gateway: RawGateway,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default)]
    pub plans: BTreeMap<String, Spanned<RawPlan>>,
    #[serde(default)]
    pub operations: Vec<Spanned<RawOperation>>,
    #[serde(default)]
    pub accounts: Vec<Spanned<RawAccount>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub listen: Option<Spanned<String>>,
    pub admin_listen: Option<Spanned<String>>,
    pub unmatched: Option<Spanned<String>>,
    pub default_upstream: Option<Spanned<String>>,
    pub max_body_bytes: Option<Spanned<String>>,
    pub hold_ttl: Option<Spanned<String>>,
    pub upgrade_url: Option<Spanned<String>>,
    pub max_holds_per_account: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub kind: Option<Spanned<String>>,
    pub url: Option<Spanned<String>>,
    pub cluster: Option<bool>,
    pub on_unavailable: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: Spanned<String>,
    pub connect_timeout: Option<Spanned<String>>,
    pub read_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub set_headers: BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlan {
    pub monthly_credits: Spanned<Value>,
    #[serde(default)]
    pub features: Vec<Spanned<String>>,
    #[serde(default)]
    pub quotas: BTreeMap<String, Spanned<i64>>,
    pub seats: Option<Spanned<i64>>,
    pub signup_credits: Option<Spanned<Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOperation {
    pub name: Spanned<String>,
    pub method: Option<Spanned<String>>,
    pub path: Spanned<String>,
    #[serde(default)]
    pub when: BTreeMap<String, Spanned<Value>>,
    pub upstream: Option<Spanned<String>>,
    #[serde(default)]
    pub requires: Vec<Spanned<String>>,
    pub quota: Option<Spanned<String>>,
    pub price: Spanned<Value>,
    pub settle: Option<Spanned<Value>>,
    pub charge: Option<RawCharge>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCharge {
    pub on: Option<Vec<Spanned<Value>>>,
    pub on_client_abort: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccount {
    pub id: Spanned<String>,
    pub plan: Spanned<String>,
    pub billing_anchor_day: Option<Spanned<i64>>,
    #[serde(default)]
    pub grants: Vec<Spanned<RawGrant>>,
    #[serde(default)]
    pub keys: Vec<Spanned<RawKey>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGrant {
    pub kind: Spanned<String>,
    pub credits: Spanned<Value>,
    pub expires_at: Option<Spanned<String>>,
    pub priority: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub member: Spanned<String>,
    pub key_env: Option<Spanned<String>>,
    pub key_sha256: Option<Spanned<String>>,
}
