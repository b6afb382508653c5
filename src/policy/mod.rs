//! The policy: what each request costs, who may do it, where it goes.
//!
//! Two layers, as in River and Pingora's own config: `raw` mirrors the TOML file
//! and refuses unknown keys; `validate` turns it into a [`Policy`] that cannot be
//! invalid — amounts in millicredits, patterns compiled, references resolved. The
//! CLI's `check` runs exactly this validation. Nothing here does IO except reading
//! the file in [`Policy::load`]; the environment is passed in as a function.

mod evaluate;
mod exact;
pub mod json;
mod path;
mod price;
mod raw;
mod units;
mod validate;

use std::collections::BTreeMap;
use std::fmt;

use http::{HeaderName, HeaderValue, Method};

use std::sync::Arc;

use crate::ledger::{Catalog, Credits, EventKind, EventRules, Limits, PlanTerms};

pub use crate::ledger::{SeedAccount, SeedGrant, SeedKey};
pub use evaluate::{Caller, Evaluation, Refused, Verdict};
pub use exact::Exact;
pub use path::{normalize_path, split_query, NormalizedPath, PathError, MAX_PATH_BYTES};
pub use price::{
    Addon, Found, Lookup, Micros, Per, Price, PriceError, PriceRule, RequestFacts, TableEntry,
    UnitRate, Usage, UsageRate,
};
pub use units::{format_duration, parse_duration_ms, parse_size_bytes};

/// One error in a policy file, located as `FILE:LINE:COL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Every error found in one policy file, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Something in a valid policy file worth a word: `FILE:LINE:COL: note: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyNote(pub PolicyError);

impl fmt::Display for PolicyNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let PolicyError {
            file,
            line,
            col,
            message,
        } = &self.0;
        write!(f, "{file}:{line}:{col}: note: {message}")
    }
}

/// A validated policy.
#[derive(Debug)]
pub struct Policy {
    pub gateway: GatewayConfig,
    pub store: StoreConfig,
    pub upstreams: Vec<Upstream>,
    /// Every plan by name, as the ledger reads it (shared with the stores).
    pub plans: Arc<Catalog>,
    pub operations: Vec<Operation>,
    pub accounts: Vec<SeedAccount>,
    /// Grant kinds and their spend priority: `bonus`, `plan`, `topup` and any the
    /// policy declares in `[grant_kinds.NAME]`.
    pub grant_kinds: Vec<(String, u32)>,
    routes: matchit::Router<Route>,
    /// `[events]`: thresholds and webhooks (none: no events are kept).
    pub events: EventsConfig,
    /// `[payments.stripe]`: `POST /webhooks/stripe` is served only when set.
    pub stripe: Option<StripeConfig>,
    /// What `check` prints and `run` logs about a valid file, in file order.
    pub notes: Vec<PolicyNote>,
}

/// `[events]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventsConfig {
    /// What the ledger decides: the kinds some webhook wants, the thresholds.
    pub rules: EventRules,
    pub webhooks: Vec<WebhookConfig>,
    /// The first retry waits about this long; each next one twice as long (with
    /// jitter), at most an hour.
    pub retry_base_ms: u64,
    /// How long an event is retried before it is dropped and counted failed.
    pub retry_for_ms: u64,
    /// One delivery attempt, connect to answer.
    pub timeout_ms: u64,
    /// Events waiting for delivery that the outbox keeps; past it the oldest are
    /// dropped (and counted failed).
    pub max_pending: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            rules: EventRules::default(),
            webhooks: Vec::new(),
            retry_base_ms: DEFAULT_RETRY_BASE_MS,
            retry_for_ms: DEFAULT_RETRY_FOR_MS,
            timeout_ms: DEFAULT_WEBHOOK_TIMEOUT_MS,
            max_pending: DEFAULT_MAX_PENDING_EVENTS,
        }
    }
}

pub const DEFAULT_RETRY_BASE_MS: u64 = 5_000;
pub const DEFAULT_RETRY_FOR_MS: u64 = 24 * 3_600_000;
pub const DEFAULT_WEBHOOK_TIMEOUT_MS: u64 = 10_000;
pub use crate::ledger::DEFAULT_MAX_PENDING_EVENTS;

/// One `[[events.webhooks]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookConfig {
    pub url: String,
    /// The HMAC key of `creditgate-signature`.
    pub secret: String,
    pub events: std::collections::BTreeSet<EventKind>,
}

/// `[payments.stripe]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripeConfig {
    /// The endpoint's signing secret (`whsec_…`), the HMAC key as written.
    pub webhook_secret: String,
    /// Stripe price id → what it buys.
    pub prices: BTreeMap<String, StripePrice>,
}

/// What one Stripe price buys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StripePrice {
    Grant {
        kind: String,
        credits: Credits,
        priority: u32,
    },
    Plan(String),
}

/// The operations sharing one path pattern, in file order.
#[derive(Clone, Debug)]
struct Route {
    operations: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unmatched {
    Deny,
    /// Forward unmatched requests, free, to this upstream (an index into `upstreams`).
    Allow {
        upstream: usize,
    },
}

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub listen: String,
    pub admin_listen: Option<String>,
    pub unmatched: Unmatched,
    pub max_body_bytes: usize,
    pub hold_ttl_ms: u64,
    pub upgrade_url: Option<String>,
    pub max_holds_per_account: usize,
    pub ledger_max_entries: usize,
    /// On SIGTERM, how long in-flight requests may run before the process stops.
    pub shutdown_grace_ms: u64,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl_ms: u64,
    /// Largest response body recorded for replay.
    pub idempotency_replay_max_bytes: usize,
    /// Settled idempotency records an account keeps.
    pub idempotency_records_kept: usize,
    /// Receipts of admin grants an account keeps (their keys are remembered).
    pub grant_receipts_kept: usize,
    /// The bound the worst case of one account's state was checked against.
    pub max_account_state_bytes: u64,
    /// Client connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// From a request's first byte until its head is read.
    pub header_read_timeout_ms: u64,
    /// Between two reads of a request body.
    pub body_read_timeout_ms: u64,
    /// How long a kept-alive connection may wait, idle, for its next request.
    pub keepalive_timeout_ms: u64,
}

impl GatewayConfig {
    /// The limits the ledger applies to an account's state, for the stores.
    pub fn limits(&self) -> Limits {
        Limits {
            ledger_max_entries: self.ledger_max_entries,
            idempotency_records_kept: self.idempotency_records_kept,
            idempotency_replay_max_bytes: self.idempotency_replay_max_bytes,
            grant_receipts_kept: self.grant_receipts_kept,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnUnavailable {
    Reject,
    Allow,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// The default: an embedded SQLite file, durable across restarts.
    Sqlite {
        /// Resolved against the policy file's folder (see [`Policy::parse`]).
        path: std::path::PathBuf,
        /// How long the writer keeps taking transitions into one commit.
        commit_interval_ms: u64,
    },
    /// In this process only: lost on restart. For tests, demos and benchmarks.
    Memory,
    Redis {
        url: String,
        cluster: bool,
        on_unavailable: OnUnavailable,
    },
}

#[derive(Clone, Debug)]
pub struct Upstream {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// `Some` for an `https://` upstream.
    pub tls: Option<UpstreamTls>,
    pub connect_timeout_ms: u64,
    pub read_timeout_ms: u64,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
}

/// How the gateway speaks TLS to an `https://` upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTls {
    /// The name sent as SNI and checked against the certificate: the URL's host
    /// unless `server_name` says otherwise.
    pub server_name: String,
    /// Certificates (DER) of the CAs trusted for this upstream, read from
    /// `ca_file`; empty: the system's trusted CAs.
    pub ca_der: Vec<Vec<u8>>,
    /// `false` accepts any certificate (a test backend only).
    pub verify: bool,
}

/// Where a request value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// An RFC 6901 JSON pointer into the request body.
    Body(String),
    Query(String),
    Header(HeaderName),
    Path(String),
    /// `request:body_bytes`: the request body's length in bytes — a quantity
    /// (an estimate of an input's size), read with the body.
    BodyBytes,
}

impl Source {
    /// Whether the value is only known once the request body is read.
    pub fn needs_body(&self) -> bool {
        matches!(self, Source::Body(_) | Source::BodyBytes)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Body(p) => write!(f, "body:{p}"),
            Source::Query(n) => write!(f, "query:{n}"),
            Source::Header(n) => write!(f, "header:{n}"),
            Source::Path(n) => write!(f, "path:{n}"),
            Source::BodyBytes => write!(f, "request:body_bytes"),
        }
    }
}

/// A value a predicate compares with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scalar {
    Text(String),
    Int(i64),
    Bool(bool),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Text(s) => f.write_str(s),
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// A `when` predicate: the value at `source` is one of `any_of`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Predicate {
    pub source: Source,
    pub any_of: Vec<Scalar>,
}

/// Where the actual usage of a metered operation is read from the response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsageSource {
    /// A JSON pointer into the (buffered copy of the) response body.
    Json(String),
    Header(HeaderName),
    /// A JSON pointer into the data of the last server-sent event that has it.
    Sse(String),
}

impl fmt::Display for UsageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsageSource::Json(p) => write!(f, "json:{p}"),
            UsageSource::Header(h) => write!(f, "header:{h}"),
            UsageSource::Sse(p) => write!(f, "sse:{p}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnMissing {
    ChargeHold,
    Release,
}

impl UsageSource {
    /// Whether the source reads a response body as one JSON document (which an
    /// event stream never is).
    pub fn is_json(&self) -> bool {
        matches!(self, UsageSource::Json(_))
    }
}

/// Charge actual usage instead of the held price (capped at the hold, unless
/// the operation may overdraw).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettleRule {
    /// Where the usage may be, in order: the first the response has is used.
    pub usage: Vec<UsageSource>,
    /// What a unit of usage costs.
    pub rate: UsageRate,
    pub on_missing: OnMissing,
}

/// What happens when the client leaves after the backend answered with a
/// charging status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnClientAbort {
    /// The backend did the work: charged in full — the price, or for an
    /// operation settled from usage, the hold (the usage the end of the response
    /// would report was not seen).
    Settle,
    Release,
    /// Settle from the last usage seen before the client left, or as
    /// `on_missing` says (the default for operations settled from usage).
    UsageSoFar,
}

/// How much a request may hold (`charge.hold`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldRule {
    /// The whole price, or 402.
    Full,
    /// What is available when the whole price is not, if at least `min_hold`.
    Available { min_hold: Credits },
}

/// How far a settle may go above the hold (`charge.over_hold`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverHold {
    /// Never above the hold.
    Cap,
    /// Above the hold, from what is available, then as debt up to the plan's
    /// `overdraft_limit`.
    Overdraft,
}

/// What happens when the backend cuts a response it started with a charging status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnUpstreamCut {
    Release,
    /// Settle (with the usage seen so far when the operation is metered).
    Settle,
}

/// Which upstream statuses settle the hold; everything else releases it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeRule {
    /// Bit `n` set = status `n` settles. Statuses are 100..=599.
    statuses: [u64; 10],
    pub on_client_abort: OnClientAbort,
    pub on_upstream_cut: OnUpstreamCut,
    pub hold: HoldRule,
    pub over_hold: OverHold,
}

impl ChargeRule {
    /// The default: every 2xx settles; the client leaving still settles, since the
    /// backend did the work; the whole price is held, and never exceeded.
    pub fn default_rule() -> Self {
        let mut rule = ChargeRule {
            statuses: [0; 10],
            on_client_abort: OnClientAbort::Settle,
            on_upstream_cut: OnUpstreamCut::Release,
            hold: HoldRule::Full,
            over_hold: OverHold::Cap,
        };
        rule.add_range(200, 299);
        rule
    }

    fn add_range(&mut self, from: u16, to: u16) {
        for s in from..=to {
            self.statuses[s as usize / 64] |= 1 << (s % 64);
        }
    }

    pub fn charges(&self, status: u16) -> bool {
        (100..=599).contains(&status)
            && self.statuses[status as usize / 64] & (1 << (status % 64)) != 0
    }
}

#[derive(Clone, Debug)]
pub struct Operation {
    pub name: String,
    pub method: Option<Method>,
    pub path: String,
    pub when: Vec<Predicate>,
    pub upstream: usize,
    pub requires: Vec<String>,
    pub quota: Option<QuotaRule>,
    pub price: Price,
    pub settle: Option<SettleRule>,
    pub charge: ChargeRule,
    /// `when`, the price or the quota reads the request body.
    pub needs_body: bool,
}

/// The plan quota an operation counts, and how many units a request uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaRule {
    pub name: String,
    /// A whole number of units read from the request (`quota = { name, per }`);
    /// `None`: one unit per request.
    pub per: Option<Per>,
}

impl Operation {
    /// Whether the price a request is told (the hold) is an estimate: the
    /// operation settles from the response's actual usage, so what is charged may
    /// be less — or, with `over_hold = "overdraft"`, more.
    pub fn price_is_estimate(&self) -> bool {
        self.settle.is_some()
    }
}

/// The operations a path can be, before method, `when` and body are looked at.
#[derive(Debug)]
pub struct RouteMatch<'p> {
    operations: &'p [usize],
    pub path_params: Vec<(String, String)>,
}

impl Policy {
    /// Reads and validates a policy file; `${VAR}` references are read from the
    /// process environment.
    pub fn load(path: &std::path::Path) -> Result<Policy, PolicyErrors> {
        let file = path.display().to_string();
        let source = std::fs::read_to_string(path).map_err(|e| {
            PolicyErrors(vec![PolicyError {
                file: file.clone(),
                line: 1,
                col: 1,
                message: format!("cannot read the policy file: {e}"),
            }])
        })?;
        Policy::parse(&source, &file, &|name| std::env::var(name).ok())
    }

    /// Validates policy text. `env` answers `${VAR}` and `key_env` look-ups.
    /// `file` names the policy in errors, and its folder is where a relative
    /// `[store] path` points; a name without a folder (a policy that is not a file,
    /// as in tests) leaves such a path relative to the current directory.
    pub fn parse(
        source: &str,
        file: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Policy, PolicyErrors> {
        validate::validate(source, file, env, false)
    }

    /// Validates a policy file without its environment (`check --no-env`): every
    /// `${VAR}` and `key_env` reads as a placeholder, and checks of a value's form
    /// that only the real value could pass (an address, a URL) are skipped.
    pub fn load_without_env(path: &std::path::Path) -> Result<Policy, PolicyErrors> {
        let file = path.display().to_string();
        let source = std::fs::read_to_string(path).map_err(|e| {
            PolicyErrors(vec![PolicyError {
                file: file.clone(),
                line: 1,
                col: 1,
                message: format!("cannot read the policy file: {e}"),
            }])
        })?;
        validate::validate(&source, &file, &|_| None, true)
    }

    /// What each plan gives an account, for the stores.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.plans.clone()
    }

    /// The limits on an account's state, for the stores (with the catalog).
    pub fn limits(&self) -> Limits {
        self.gateway.limits()
    }

    /// The spend priority of a grant kind, if the kind exists.
    pub fn grant_priority(&self, kind: &str) -> Option<u32> {
        self.grant_kinds
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, p)| *p)
    }

    pub fn plan(&self, name: &str) -> Option<&PlanTerms> {
        self.plans.get(name)
    }

    /// Plans that have a feature, for `plan_required` errors.
    pub fn plans_with_feature(&self, feature: &str) -> Vec<&str> {
        self.plans
            .iter()
            .filter(|(_, p)| p.features.iter().any(|f| f == feature))
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// The most specific path pattern matching `path`, if any. Only a normalized path
    /// can be matched, and it is matched with its escapes decoded, so path parameters
    /// are decoded text (`o1%3Apro` is `o1:pro`, as a backend reads it).
    pub fn route(&self, path: &NormalizedPath) -> Option<RouteMatch<'_>> {
        let found = self.routes.at(path.decoded()).ok()?;
        Some(RouteMatch {
            operations: &found.value.operations,
            path_params: found
                .params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    /// The first operation of the route, in file order, whose method and `when` match.
    pub fn select(&self, route: &RouteMatch<'_>, facts: &RequestFacts<'_>) -> Option<usize> {
        route.operations.iter().copied().find(|&i| {
            let op = &self.operations[i];
            op.method.as_ref().is_none_or(|m| m == facts.method) && facts.all_hold(&op.when)
        })
    }
}

#[cfg(test)]
mod tests;
