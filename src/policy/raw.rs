//! The policy file exactly as written: serde types that refuse unknown keys.
//!
//! Nothing here is validated beyond TOML's own types; `super::validate` turns this
//! into a `Policy` that cannot be invalid. Fields that a later error may point at
//! are `Spanned`, so every error can say `FILE:LINE:COL`.

use std::collections::BTreeMap;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
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
    pub grant_kinds: BTreeMap<String, Spanned<RawGrantKind>>,
    #[serde(default)]
    pub operations: Vec<Spanned<RawOperation>>,
    #[serde(default)]
    pub accounts: Vec<Spanned<RawAccount>>,
    pub events: Option<Spanned<RawEvents>>,
    #[serde(default)]
    pub payments: RawPayments,
}

/// `[events]`: the `balance.low` thresholds, the webhooks, and how deliveries retry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvents {
    #[serde(default)]
    pub low_balance: Vec<Spanned<Value>>,
    #[serde(default)]
    pub webhooks: Vec<Spanned<RawWebhook>>,
    pub retry_base: Option<Spanned<String>>,
    pub retry_for: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub max_pending: Option<Spanned<i64>>,
}

/// `[[events.webhooks]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: Spanned<String>,
    pub secret: Spanned<String>,
    pub events: Option<Vec<Spanned<String>>>,
}

/// `[payments]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPayments {
    pub stripe: Option<Spanned<RawStripe>>,
}

/// `[payments.stripe]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStripe {
    pub webhook_secret: Spanned<String>,
    #[serde(default)]
    pub prices: BTreeMap<String, Spanned<RawStripePrice>>,
}

/// What one Stripe price buys: `{ grant = KIND, credits = N }` or `{ plan = NAME }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStripePrice {
    pub grant: Option<Spanned<String>>,
    pub credits: Option<Spanned<Value>>,
    pub plan: Option<Spanned<String>>,
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
    pub ledger_max_entries: Option<Spanned<i64>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub idempotency_ttl: Option<Spanned<String>>,
    pub idempotency_replay_max_bytes: Option<Spanned<String>>,
    pub idempotency_records_kept: Option<Spanned<i64>>,
    pub grant_receipts_kept: Option<Spanned<i64>>,
    pub max_account_state_bytes: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<i64>>,
    pub header_read_timeout: Option<Spanned<String>>,
    pub body_read_timeout: Option<Spanned<String>>,
    pub keepalive_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGrantKind {
    pub priority: Spanned<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub kind: Option<Spanned<String>>,
    pub url: Option<Spanned<String>>,
    pub cluster: Option<bool>,
    pub on_unavailable: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub commit_interval: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: Spanned<String>,
    pub connect_timeout: Option<Spanned<String>>,
    pub read_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub set_headers: BTreeMap<String, Spanned<String>>,
    pub tls: Option<Spanned<RawUpstreamTls>>,
}

/// `tls = { ca_file, server_name, verify }` of an `https://` upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub ca_file: Option<Spanned<String>>,
    pub server_name: Option<Spanned<String>>,
    pub verify: Option<bool>,
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
    pub keep_unused_on_upgrade: Option<bool>,
    pub overdraft_limit: Option<Spanned<Value>>,
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
    pub quota: Option<Spanned<OrTable<RawQuota>>>,
    pub price: Spanned<OrTable<RawPriceTable>>,
    pub settle: Option<Spanned<RawSettle>>,
    pub charge: Option<RawCharge>,
}

/// A scalar (number, string, boolean) or a table of a given shape — e.g. `price = 3`
/// or `[operations.price] credits = ...`.
#[derive(Debug)]
pub enum OrTable<T> {
    Scalar(Value),
    Table(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OrTable<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarOrTable<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ScalarOrTable<T> {
            type Value = OrTable<T>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number, a string or a table")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(OrTable::Scalar(Value::Boolean(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(OrTable::Scalar(Value::Integer(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                i64::try_from(v)
                    .map(|v| OrTable::Scalar(Value::Integer(v)))
                    .map_err(|_| E::custom("number too large"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(OrTable::Scalar(Value::Float(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(OrTable::Scalar(Value::String(v.to_string())))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(OrTable::Table)
            }
        }

        deserializer.deserialize_any(ScalarOrTable(std::marker::PhantomData))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPriceTable {
    pub credits: Spanned<OrTable<RawLookupTable>>,
    pub per: Option<Spanned<RawPer>>,
    pub multiplier: Option<Spanned<OrTable<RawLookupTable>>>,
    #[serde(default)]
    pub addons: Vec<Spanned<RawAddon>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLookupTable {
    pub from: Spanned<String>,
    pub table: BTreeMap<Spanned<String>, Spanned<Value>>,
    /// When the request has no value.
    pub default: Option<Spanned<Value>>,
    /// When the request has a value that is not in the table.
    pub otherwise: Option<Spanned<Value>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPer {
    pub from: Spanned<String>,
    pub min: Option<Spanned<Value>>,
    pub max: Option<Spanned<Value>>,
    /// When the request has no quantity.
    pub default: Option<Spanned<Value>>,
}

/// `quota = { name = "images", per = "body:/n" }` (or `per` as a table with a
/// `default`, like a price's).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    pub name: Spanned<String>,
    pub per: Option<Spanned<OrTable<RawPer>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAddon {
    #[serde(default)]
    pub when: BTreeMap<String, Spanned<Value>>,
    pub credits: Spanned<Value>,
    pub per: Option<Spanned<RawPer>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSettle {
    /// One source, or a list of them.
    pub usage: Spanned<Value>,
    pub credits_per_unit: Option<Spanned<Value>>,
    pub units: Option<Spanned<BTreeMap<String, Spanned<Value>>>>,
    pub on_missing: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCharge {
    pub on: Option<Vec<Spanned<Value>>>,
    pub on_client_abort: Option<Spanned<String>>,
    pub on_upstream_cut: Option<Spanned<String>>,
    pub hold: Option<Spanned<String>>,
    pub min_hold: Option<Spanned<Value>>,
    pub over_hold: Option<Spanned<String>>,
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
