//! `raw::RawPolicy` → `Policy`: every check that makes a policy safe to run.
//!
//! Collects every error it can find (not just the first), each located in the file.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;

use http::{HeaderName, HeaderValue, Method};
use sha2::{Digest, Sha256};
use toml::{Spanned, Value};

use super::raw::*;
use super::units::{parse_duration_ms, parse_size_bytes};
use super::*;
use crate::ledger::{default_priority, Catalog, Credits, PlanTerms};
use std::sync::Arc;

const DEFAULT_MAX_HOLDS_PER_ACCOUNT: usize = 1_024;
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
const DEFAULT_READ_TIMEOUT_MS: u64 = 300_000;

struct Validator<'a> {
    source: &'a str,
    file: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<PolicyError>,
    notes: Vec<PolicyNote>,
}

pub(super) fn validate(
    source: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Policy, PolicyErrors> {
    let mut v = Validator {
        source,
        file,
        env,
        errors: Vec::new(),
        notes: Vec::new(),
    };
    let raw: RawPolicy = match toml::from_str(source) {
        Ok(raw) => raw,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            v.error(span, e.message().to_string());
            return Err(PolicyErrors(v.errors));
        }
    };
    let policy = v.policy(raw);
    if v.errors.is_empty() {
        if let Some(mut policy) = policy {
            v.notes.sort_by_key(|n| (n.0.line, n.0.col));
            policy.notes = v.notes;
            return Ok(policy);
        }
    }
    v.errors.sort_by_key(|e| (e.line, e.col));
    Err(PolicyErrors(v.errors))
}

impl Validator<'_> {
    fn located(&self, span: Range<usize>, message: impl Into<String>) -> PolicyError {
        let at = span.start.min(self.source.len());
        let before = &self.source[..at];
        let line = before.matches('\n').count() + 1;
        let col = before.rfind('\n').map_or(at, |nl| at - nl - 1) + 1;
        PolicyError {
            file: self.file.to_string(),
            line,
            col,
            message: message.into(),
        }
    }

    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let error = self.located(span, message);
        self.errors.push(error);
    }

    /// Something valid that may not mean what it meant before: `check` prints it
    /// and `run` logs it, and neither refuses the policy.
    fn note(&mut self, span: Range<usize>, message: impl Into<String>) {
        let note = PolicyNote(self.located(span, message));
        self.notes.push(note);
    }

    /// Expands `${VAR}` from the environment; a missing variable is an error.
    fn expand(&mut self, text: &Spanned<String>) -> String {
        let raw = text.get_ref();
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw.as_str();
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                self.error(text.span(), "unclosed ${ in string");
                return out;
            };
            let name = &after[..end];
            match (self.env)(name) {
                Some(value) => out.push_str(&value),
                None => self.error(
                    text.span(),
                    format!("environment variable {name} is not set"),
                ),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }

    /// The decimal text of a number as written: integers as they are, floats as
    /// their source text (so `0.1` is exactly 0.1), strings as they are.
    fn number_text(&mut self, span: Range<usize>, value: &Value, what: &str) -> Option<String> {
        match value {
            Value::Integer(i) => Some(i.to_string()),
            Value::Float(_) => Some(self.source[span].trim().replace('_', "")),
            Value::String(s) => Some(s.clone()),
            other => {
                self.error(
                    span,
                    format!("{what} must be a number, not a {}", other.type_str()),
                );
                None
            }
        }
    }

    /// An amount of credits: integer, decimal or string, at most 3 decimals.
    fn amount(&mut self, value: &Spanned<Value>, what: &str) -> Option<Credits> {
        self.amount_at(value.span(), value.get_ref(), what)
    }

    fn amount_at(&mut self, span: Range<usize>, value: &Value, what: &str) -> Option<Credits> {
        let text = self.number_text(span.clone(), value, what)?;
        text.parse::<Credits>()
            .map_err(|e| self.error(span, format!("{what}: {e}")))
            .ok()
    }

    /// A rate, quantity or multiplier: at most 6 decimals.
    fn micros_at(&mut self, span: Range<usize>, value: &Value, what: &str) -> Option<Micros> {
        let text = self.number_text(span.clone(), value, what)?;
        Micros::parse(&text)
            .map_err(|e| self.error(span, format!("{what}: {e}")))
            .ok()
    }

    fn micros(&mut self, value: &Spanned<Value>, what: &str) -> Option<Micros> {
        self.micros_at(value.span(), value.get_ref(), what)
    }

    fn duration_ms(&mut self, value: &Option<Spanned<String>>, default_ms: u64, what: &str) -> u64 {
        let Some(value) = value else {
            return default_ms;
        };
        match parse_duration_ms(value.get_ref()) {
            Ok(0) => {
                self.error(value.span(), format!("{what} must be longer than 0"));
                default_ms
            }
            Ok(ms) => ms,
            Err(e) => {
                self.error(value.span(), format!("{what}: {e}"));
                default_ms
            }
        }
    }

    fn policy(&mut self, raw: RawPolicy) -> Option<Policy> {
        if *raw.version.get_ref() != 1 {
            self.error(
                raw.version.span(),
                "unsupported policy version: only `version = 1` exists",
            );
        }
        let upstreams = self.upstreams(&raw.upstreams);
        let plans = self.plans(&raw.plans);
        let gateway = self.gateway(&raw.gateway, &upstreams);
        let store = self.store(&raw.store);
        let features: HashSet<&str> = plans
            .values()
            .flat_map(|p| p.features.iter().map(String::as_str))
            .collect();
        let quotas: HashSet<&str> = plans
            .values()
            .flat_map(|p| p.quotas.keys().map(String::as_str))
            .collect();
        let default_upstream = raw
            .gateway
            .default_upstream
            .as_ref()
            .and_then(|n| upstreams.iter().position(|u| u.name == *n.get_ref()));
        let mut operations = Vec::new();
        let mut names = HashSet::new();
        for op in &raw.operations {
            if !names.insert(op.get_ref().name.get_ref().clone()) {
                self.error(
                    op.get_ref().name.span(),
                    format!("duplicate operation name {:?}", op.get_ref().name.get_ref()),
                );
            }
            if let Some(op) = self.operation(
                op.get_ref(),
                &upstreams,
                default_upstream,
                &features,
                &quotas,
            ) {
                operations.push(op);
            }
        }
        let routes = self.routes(&raw.operations, &operations);
        let grant_kinds = self.grant_kinds(&raw.grant_kinds);
        let accounts = self.accounts(&raw.accounts, &plans, &grant_kinds);
        if !self.errors.is_empty() || operations.len() != raw.operations.len() {
            return None;
        }
        Some(Policy {
            gateway,
            store,
            upstreams,
            plans: Arc::new(plans),
            operations,
            accounts,
            grant_kinds,
            routes,
            notes: Vec::new(),
        })
    }

    fn gateway(&mut self, raw: &RawGateway, upstreams: &[Upstream]) -> GatewayConfig {
        let listen = raw
            .listen
            .as_ref()
            .map_or_else(|| "127.0.0.1:8080".to_string(), |l| self.address(l));
        let admin_listen = raw.admin_listen.as_ref().map(|l| self.address(l));
        let upstream_index = |name: &Spanned<String>, v: &mut Self| {
            let found = upstreams.iter().position(|u| u.name == *name.get_ref());
            if found.is_none() {
                v.error(
                    name.span(),
                    format!("unknown upstream {:?}", name.get_ref()),
                );
            }
            found
        };
        let default_upstream = raw
            .default_upstream
            .as_ref()
            .and_then(|n| upstream_index(n, self));
        let unmatched = match raw
            .unmatched
            .as_ref()
            .map(|u| (u.get_ref().as_str(), u.span()))
        {
            None | Some(("deny", _)) => Unmatched::Deny,
            Some(("allow", span)) => match default_upstream {
                Some(upstream) => Unmatched::Allow { upstream },
                None => {
                    self.error(span, "unmatched = \"allow\" needs default_upstream");
                    Unmatched::Deny
                }
            },
            Some((other, span)) => {
                self.error(
                    span,
                    format!("unmatched must be \"deny\" or \"allow\", not {other:?}"),
                );
                Unmatched::Deny
            }
        };
        let max_body_bytes = match &raw.max_body_bytes {
            None => 8 << 20,
            Some(size) => parse_size_bytes(size.get_ref()).unwrap_or_else(|e| {
                self.error(size.span(), format!("max_body_bytes: {e}"));
                0
            }),
        };
        let ledger_max_entries = match &raw.ledger_max_entries {
            None => crate::ledger::DEFAULT_LEDGER_MAX_ENTRIES,
            Some(n) if (1..=1_000_000).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                self.error(n.span(), "ledger_max_entries must be between 1 and 1000000");
                crate::ledger::DEFAULT_LEDGER_MAX_ENTRIES
            }
        };
        let max_holds_per_account = match &raw.max_holds_per_account {
            None => DEFAULT_MAX_HOLDS_PER_ACCOUNT,
            Some(n) if (1..=1_000_000).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                self.error(
                    n.span(),
                    "max_holds_per_account must be between 1 and 1000000",
                );
                DEFAULT_MAX_HOLDS_PER_ACCOUNT
            }
        };
        GatewayConfig {
            listen,
            admin_listen,
            unmatched,
            max_body_bytes,
            hold_ttl_ms: self.duration_ms(&raw.hold_ttl, 600_000, "hold_ttl"),
            upgrade_url: raw.upgrade_url.as_ref().map(|u| self.expand(u)),
            max_holds_per_account,
            ledger_max_entries,
            shutdown_grace_ms: self.duration_ms(&raw.shutdown_grace, 30_000, "shutdown_grace"),
            idempotency_ttl_ms: self.duration_ms(
                &raw.idempotency_ttl,
                86_400_000,
                "idempotency_ttl",
            ),
            idempotency_replay_max_bytes: match &raw.idempotency_replay_max_bytes {
                None => 64 << 10,
                Some(size) => parse_size_bytes(size.get_ref()).unwrap_or_else(|e| {
                    self.error(size.span(), format!("idempotency_replay_max_bytes: {e}"));
                    0
                }),
            },
        }
    }

    fn address(&mut self, raw: &Spanned<String>) -> String {
        let address = self.expand(raw);
        if address.parse::<std::net::SocketAddr>().is_err() {
            self.error(raw.span(), format!("{address:?} is not an IP:PORT address"));
        }
        address
    }

    fn store(&mut self, raw: &RawStore) -> StoreConfig {
        let kind = raw.kind.as_ref().map(|k| (k.get_ref().as_str(), k.span()));
        let redis = matches!(kind, Some(("redis", _)));
        let sqlite = matches!(kind, None | Some(("sqlite", _)));
        if !redis {
            for (name, given) in [
                ("url", raw.url.as_ref().map(|v| v.span())),
                (
                    "on_unavailable",
                    raw.on_unavailable.as_ref().map(|v| v.span()),
                ),
            ] {
                if let Some(span) = given {
                    self.error(span, format!("{name} applies only to kind = \"redis\""));
                }
            }
        }
        if !sqlite {
            for (name, given) in [
                ("path", raw.path.as_ref().map(|v| v.span())),
                (
                    "commit_interval",
                    raw.commit_interval.as_ref().map(|v| v.span()),
                ),
            ] {
                if let Some(span) = given {
                    self.error(span, format!("{name} applies only to kind = \"sqlite\""));
                }
            }
        }
        match kind {
            None | Some(("sqlite", _)) => self.sqlite_store(raw),
            Some(("memory", _)) => StoreConfig::Memory,
            Some(("redis", span)) => {
                let url = match &raw.url {
                    Some(url) => self.expand(url),
                    None => {
                        self.error(span, "kind = \"redis\" needs url");
                        String::new()
                    }
                };
                let on_unavailable = match raw
                    .on_unavailable
                    .as_ref()
                    .map(|o| (o.get_ref().as_str(), o.span()))
                {
                    None | Some(("reject", _)) => OnUnavailable::Reject,
                    Some(("allow", _)) => OnUnavailable::Allow,
                    Some((other, span)) => {
                        self.error(
                            span,
                            format!(
                                "on_unavailable must be \"reject\" or \"allow\", not {other:?}"
                            ),
                        );
                        OnUnavailable::Reject
                    }
                };
                StoreConfig::Redis {
                    url,
                    cluster: raw.cluster.unwrap_or(false),
                    on_unavailable,
                }
            }
            Some((other, span)) => {
                self.error(
                    span,
                    format!(
                        "store kind must be \"sqlite\", \"memory\" or \"redis\", not {other:?}"
                    ),
                );
                StoreConfig::Memory
            }
        }
    }

    /// The SQLite file (relative to the policy file's folder) and the writer's
    /// commit interval (bounded: a longer one only delays every answer).
    fn sqlite_store(&mut self, raw: &RawStore) -> StoreConfig {
        const MAX_COMMIT_INTERVAL_MS: u64 = 1_000;
        let path = match &raw.path {
            Some(path) => {
                let text = self.expand(path);
                if text.trim().is_empty() {
                    self.error(path.span(), "path must name a file");
                }
                text
            }
            None => "creditgate.db".to_string(),
        };
        let folder = std::path::Path::new(self.file)
            .parent()
            .unwrap_or(std::path::Path::new(""));
        let commit_interval_ms = self.duration_ms(&raw.commit_interval, 2, "commit_interval");
        if commit_interval_ms > MAX_COMMIT_INTERVAL_MS {
            if let Some(span) = raw.commit_interval.as_ref().map(|v| v.span()) {
                self.error(
                    span,
                    format!("commit_interval must be at most {MAX_COMMIT_INTERVAL_MS}ms"),
                );
            }
        }
        StoreConfig::Sqlite {
            path: folder.join(path),
            commit_interval_ms: commit_interval_ms.min(MAX_COMMIT_INTERVAL_MS),
        }
    }

    fn upstreams(&mut self, raw: &BTreeMap<String, Spanned<RawUpstream>>) -> Vec<Upstream> {
        let mut out = Vec::new();
        for (name, upstream) in raw {
            let upstream = upstream.get_ref();
            let url = self.expand(&upstream.url);
            let Some((host, port, tls)) = parse_upstream_url(&url)
                .map_err(|e| self.error(upstream.url.span(), e))
                .ok()
            else {
                continue;
            };
            let mut set_headers = Vec::new();
            for (header, value) in &upstream.set_headers {
                let value_text = self.expand(value);
                match (
                    HeaderName::try_from(header.as_str()),
                    HeaderValue::try_from(value_text),
                ) {
                    (Ok(h), Ok(v)) => set_headers.push((h, v)),
                    (Err(_), _) => self.error(
                        value.span(),
                        format!("{header:?} is not a valid header name"),
                    ),
                    (_, Err(_)) => self.error(
                        value.span(),
                        format!("the value of {header} is not a valid header value"),
                    ),
                }
            }
            out.push(Upstream {
                name: name.clone(),
                host,
                port,
                tls,
                connect_timeout_ms: self.duration_ms(
                    &upstream.connect_timeout,
                    DEFAULT_CONNECT_TIMEOUT_MS,
                    "connect_timeout",
                ),
                read_timeout_ms: self.duration_ms(
                    &upstream.read_timeout,
                    DEFAULT_READ_TIMEOUT_MS,
                    "read_timeout",
                ),
                set_headers,
            });
        }
        out
    }

    fn plans(&mut self, raw: &BTreeMap<String, Spanned<RawPlan>>) -> Catalog {
        let mut out = Catalog::new();
        for (name, plan) in raw {
            let plan = plan.get_ref();
            let monthly_credits = self
                .amount(&plan.monthly_credits, "monthly_credits")
                .unwrap_or_default();
            let signup_credits = plan
                .signup_credits
                .as_ref()
                .and_then(|s| self.amount(s, "signup_credits"));
            let mut quotas = BTreeMap::new();
            for (quota, count) in &plan.quotas {
                match u64::try_from(*count.get_ref()) {
                    Ok(n) => {
                        quotas.insert(quota.clone(), n);
                    }
                    Err(_) => {
                        self.error(count.span(), format!("quota {quota} must not be negative"))
                    }
                }
            }
            let seats = match &plan.seats {
                None => 1,
                Some(s) => u32::try_from(*s.get_ref())
                    .ok()
                    .filter(|n| *n >= 1)
                    .unwrap_or_else(|| {
                        self.error(s.span(), "seats must be at least 1");
                        1
                    }),
            };
            let terms = PlanTerms {
                monthly_credits,
                features: plan.features.iter().map(|f| f.get_ref().clone()).collect(),
                quotas,
                seats,
                signup_credits,
                keep_unused_on_upgrade: plan.keep_unused_on_upgrade.unwrap_or(false),
            };
            out.insert(name.clone(), terms);
        }
        out
    }

    fn operation(
        &mut self,
        raw: &RawOperation,
        upstreams: &[Upstream],
        default_upstream: Option<usize>,
        features: &HashSet<&str>,
        quotas: &HashSet<&str>,
    ) -> Option<Operation> {
        let name = raw.name.get_ref().clone();
        if name.is_empty() || name.contains(char::is_whitespace) {
            self.error(
                raw.name.span(),
                "operation names must be non-empty and have no spaces",
            );
        }
        let method = match &raw.method {
            None => None,
            Some(m) => match Method::from_bytes(m.get_ref().as_bytes()) {
                Ok(method) if m.get_ref().chars().all(|c| c.is_ascii_uppercase()) => Some(method),
                _ => {
                    self.error(
                        m.span(),
                        format!(
                            "{:?} is not an HTTP method (write it in capitals, like \"POST\")",
                            m.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let upstream = match &raw.upstream {
            Some(u) => {
                let found = upstreams.iter().position(|x| x.name == *u.get_ref());
                if found.is_none() {
                    self.error(u.span(), format!("unknown upstream {:?}", u.get_ref()));
                }
                found
            }
            None => {
                if default_upstream.is_none() {
                    self.error(
                        raw.name.span(),
                        format!(
                            "operation {name} has no upstream and there is no default_upstream"
                        ),
                    );
                }
                default_upstream
            }
        };
        for feature in &raw.requires {
            if !features.contains(feature.get_ref().as_str()) {
                self.error(
                    feature.span(),
                    format!("unknown feature {:?}: no plan has it", feature.get_ref()),
                );
            }
        }
        if let Some(quota) = &raw.quota {
            if !quotas.contains(quota.get_ref().as_str()) {
                self.error(
                    quota.span(),
                    format!("unknown quota {:?}: no plan has it", quota.get_ref()),
                );
            }
        }
        let when = self.predicates(&raw.when);
        let price = self.price(&raw.price);
        let settle = raw.settle.as_ref().and_then(|s| self.settle(s));
        let charge = self.charge(raw.charge.as_ref());
        let price = price?;
        let needs_body = when
            .iter()
            .map(|p| &p.source)
            .chain(price.sources())
            .any(|s| matches!(s, Source::Body(_)));
        Some(Operation {
            name,
            method,
            path: raw.path.get_ref().clone(),
            when,
            upstream: upstream?,
            requires: raw.requires.iter().map(|f| f.get_ref().clone()).collect(),
            quota: raw.quota.as_ref().map(|q| q.get_ref().clone()),
            price,
            settle,
            charge,
            needs_body,
        })
    }

    fn predicate(&mut self, source: &str, value: &Spanned<Value>) -> Option<Predicate> {
        let source = match self.source_of(source) {
            Ok(s) => s,
            Err(e) => {
                self.error(value.span(), e);
                return None;
            }
        };
        let values: Vec<&Value> = match value.get_ref() {
            Value::Array(items) => items.iter().collect(),
            single => vec![single],
        };
        let mut any_of = Vec::new();
        for v in values {
            match v {
                Value::String(s) => any_of.push(Scalar::Text(s.clone())),
                Value::Integer(i) => any_of.push(Scalar::Int(*i)),
                Value::Boolean(b) => any_of.push(Scalar::Bool(*b)),
                other => {
                    self.error(
                        value.span(),
                        format!(
                            "`when` values must be strings, integers or booleans, not a {}",
                            other.type_str()
                        ),
                    );
                    return None;
                }
            }
        }
        if any_of.is_empty() {
            self.error(value.span(), "`when` needs at least one value");
            return None;
        }
        Some(Predicate { source, any_of })
    }

    fn predicates(&mut self, raw: &BTreeMap<String, Spanned<Value>>) -> Vec<Predicate> {
        raw.iter()
            .filter_map(|(source, value)| self.predicate(source, value))
            .collect()
    }

    fn source_at(&mut self, text: &Spanned<String>) -> Option<Source> {
        self.source_of(text.get_ref())
            .map_err(|e| self.error(text.span(), e))
            .ok()
    }

    /// A `credits` or `multiplier` value: fixed, or a table on a request value.
    fn lookup(
        &mut self,
        raw: &Spanned<OrTable<RawLookupTable>>,
        decimals: usize,
        what: &str,
    ) -> Option<Lookup> {
        let value = |v: &mut Self, span: Range<usize>, value: &Value| -> Option<Micros> {
            if decimals == 3 {
                v.amount_at(span, value, what)
                    .map(|c| Micros::from_micros(c.millicredits() * 1_000))
            } else {
                v.micros_at(span, value, what)
            }
        };
        match raw.get_ref() {
            OrTable::Scalar(v) => value(self, raw.span(), v).map(Lookup::Fixed),
            OrTable::Table(t) => {
                let source = self.source_at(&t.from);
                let mut table: Vec<TableEntry> = Vec::new();
                for (key, v) in &t.table {
                    let Some(v) = value(self, v.span(), v.get_ref()) else {
                        continue;
                    };
                    let entry = TableEntry::new(key.get_ref().clone(), v);
                    // `1` and `1.0` would both match the value 1: which price is meant?
                    let same = entry
                        .number
                        .as_ref()
                        .and_then(|n| table.iter().find(|e| e.number.as_ref() == Some(n)));
                    if let Some(same) = same {
                        let message = format!(
                            "{what}: the keys {:?} and {:?} are the same number",
                            same.key, entry.key
                        );
                        self.error(key.span(), message);
                        continue;
                    }
                    table.push(entry);
                }
                let default = t
                    .default
                    .as_ref()
                    .and_then(|d| value(self, d.span(), d.get_ref()));
                let otherwise = t
                    .otherwise
                    .as_ref()
                    .and_then(|o| value(self, o.span(), o.get_ref()));
                if t.table.is_empty() {
                    self.error(t.from.span(), format!("{what}: the table is empty"));
                }
                // Earlier versions priced a value not in the table with `default`.
                if let (Some(written), Some(default), None, Some(source)) =
                    (&t.default, default, &t.otherwise, &source)
                {
                    self.note(
                        written.span(),
                        format!(
                            "default now applies only when {source} is absent; a value not in \
                             the table is refused with 400 — add otherwise = {default} to keep \
                             pricing it as before"
                        ),
                    );
                }
                Some(Lookup::Table {
                    source: source?,
                    table,
                    default,
                    otherwise,
                })
            }
        }
    }

    fn price(&mut self, raw: &Spanned<OrTable<RawPriceTable>>) -> Option<Price> {
        let table = match raw.get_ref() {
            OrTable::Scalar(value) => {
                return self.amount_at(raw.span(), value, "price").map(Price::Fixed)
            }
            OrTable::Table(table) => table,
        };
        // With `per`, `credits` is a per-unit rate (6 decimals); without, an amount (3).
        let credits = self.lookup(
            &table.credits,
            if table.per.is_some() { 6 } else { 3 },
            "credits",
        );
        let per = table.per.as_ref().and_then(|per| {
            let p = per.get_ref();
            let source = self.source_at(&p.from)?;
            let min = p.min.as_ref().and_then(|m| self.micros(m, "min"));
            let max = p.max.as_ref().and_then(|m| self.micros(m, "max"));
            let default = p
                .default
                .as_ref()
                .and_then(|d| self.micros(d, "per: default"));
            if let (Some(lo), Some(hi)) = (min, max) {
                if lo > hi {
                    self.error(per.span(), "per: min is larger than max");
                }
            }
            // A default outside the range would price what a request cannot ask for.
            if let (Some(d), Some(written)) = (default, &p.default) {
                if min.is_some_and(|lo| d < lo) || max.is_some_and(|hi| d > hi) {
                    let bound = |b: Option<Micros>| b.map_or(String::new(), |b| b.to_string());
                    self.error(
                        written.span(),
                        format!(
                            "per: default {d} is outside min..max {}..{}",
                            bound(min),
                            bound(max)
                        ),
                    );
                }
            }
            Some(Per {
                source,
                min,
                max,
                default,
            })
        });
        let multiplier = table
            .multiplier
            .as_ref()
            .and_then(|m| self.lookup(m, 6, "multiplier"));
        let mut addons = Vec::new();
        for addon in &table.addons {
            let a = addon.get_ref();
            let when = self.predicates(&a.when);
            if a.when.is_empty() {
                self.error(
                    addon.span(),
                    "an addon needs `when`: otherwise add its credits to the price",
                );
            }
            if let Some(credits) = self.amount(&a.credits, "addon credits") {
                addons.push(Addon { when, credits });
            }
        }
        if table.per.is_some() && per.is_none()
            || table.multiplier.is_some() && multiplier.is_none()
        {
            return None;
        }
        Some(Price::Rule(Box::new(PriceRule {
            credits: credits?,
            per,
            multiplier,
            addons,
        })))
    }

    fn settle(&mut self, raw: &Spanned<RawSettle>) -> Option<SettleRule> {
        let s = raw.get_ref();
        let text = s.usage.get_ref();
        let usage = match text.split_once(':') {
            Some(("json", p)) if p.is_empty() || p.starts_with('/') => {
                Some(UsageSource::Json(p.to_string()))
            }
            Some(("sse", p)) if p.is_empty() || p.starts_with('/') => {
                Some(UsageSource::Sse(p.to_string()))
            }
            Some(("header", h)) => HeaderName::try_from(h).ok().map(UsageSource::Header),
            _ => None,
        };
        if usage.is_none() {
            self.error(s.usage.span(), format!("{text:?} is not a usage source: use json:/pointer, header:name or sse:/pointer"));
        }
        let credits_per_unit = self.micros(&s.credits_per_unit, "credits_per_unit");
        let on_missing = match s
            .on_missing
            .as_ref()
            .map(|o| (o.get_ref().as_str(), o.span()))
        {
            None | Some(("charge_hold", _)) => OnMissing::ChargeHold,
            Some(("release", _)) => OnMissing::Release,
            Some((other, span)) => {
                self.error(
                    span,
                    format!("on_missing must be \"charge_hold\" or \"release\", not {other:?}"),
                );
                OnMissing::ChargeHold
            }
        };
        Some(SettleRule {
            usage: usage?,
            credits_per_unit: credits_per_unit?,
            on_missing,
        })
    }

    fn source_of(&self, text: &str) -> Result<Source, String> {
        let (kind, rest) = text
            .split_once(':')
            .ok_or_else(|| format!("{text:?} is not a value source: use body:/pointer, query:name, header:name or path:name"))?;
        match kind {
            "body" if rest.is_empty() || rest.starts_with('/') => Ok(Source::Body(rest.to_string())),
            "body" => Err(format!("{text:?}: a body source is a JSON pointer starting with /")),
            "query" if !rest.is_empty() => Ok(Source::Query(rest.to_string())),
            "header" => HeaderName::try_from(rest)
                .map(Source::Header)
                .map_err(|_| format!("{text:?}: {rest:?} is not a header name")),
            "path" if !rest.is_empty() => Ok(Source::Path(rest.to_string())),
            _ => Err(format!("{text:?} is not a value source: use body:/pointer, query:name, header:name or path:name")),
        }
    }

    fn charge(&mut self, raw: Option<&RawCharge>) -> ChargeRule {
        let mut rule = ChargeRule::default_rule();
        let Some(raw) = raw else { return rule };
        if let Some(on) = &raw.on {
            rule.statuses = [0; 10];
            for item in on {
                let text = match item.get_ref() {
                    Value::String(s) => s.clone(),
                    Value::Integer(i) => i.to_string(),
                    _ => String::new(),
                };
                match status_range(&text) {
                    Some((from, to)) => rule.add_range(from, to),
                    None => self.error(
                        item.span(),
                        format!("{text:?} is not a status class (\"2xx\") or code (100..599)"),
                    ),
                }
            }
        }
        if let Some(abort) = &raw.on_client_abort {
            rule.on_client_abort = match abort.get_ref().as_str() {
                "settle" => OnClientAbort::Settle,
                "release" => OnClientAbort::Release,
                other => {
                    self.error(
                        abort.span(),
                        format!("on_client_abort must be \"settle\" or \"release\", not {other:?}"),
                    );
                    OnClientAbort::Settle
                }
            };
        }
        if let Some(cut) = &raw.on_upstream_cut {
            rule.on_upstream_cut = match cut.get_ref().as_str() {
                "release" => OnUpstreamCut::Release,
                "settle" => OnUpstreamCut::Settle,
                other => {
                    self.error(
                        cut.span(),
                        format!("on_upstream_cut must be \"release\" or \"settle\", not {other:?}"),
                    );
                    OnUpstreamCut::Release
                }
            };
        }
        rule
    }

    /// Compiles path patterns; operations sharing a pattern share a route, in file order.
    fn routes(
        &mut self,
        raw: &[Spanned<RawOperation>],
        ops: &[Operation],
    ) -> matchit::Router<Route> {
        let mut by_pattern: Vec<(String, Range<usize>, Vec<usize>)> = Vec::new();
        // `ops` lines up with `raw` only when every operation validated.
        if ops.len() != raw.len() {
            return matchit::Router::new();
        }
        for (i, op) in raw.iter().enumerate() {
            let path = op.get_ref().path.get_ref();
            match by_pattern.iter_mut().find(|(p, _, _)| p == path) {
                Some((_, _, indexes)) => indexes.push(i),
                None => by_pattern.push((path.clone(), op.get_ref().path.span(), vec![i])),
            }
        }
        let mut router = matchit::Router::new();
        for (pattern, span, indexes) in by_pattern {
            if !pattern.starts_with('/') {
                self.error(span, format!("path {pattern:?} must start with /"));
                continue;
            }
            // Requests are matched normalized: a pattern in another form never matches.
            if let Err(e) = super::path::check_pattern(&pattern) {
                self.error(span, format!("path {pattern:?}: {e}"));
                continue;
            }
            if let Err(e) = router.insert(
                pattern.clone(),
                Route {
                    operations: indexes,
                },
            ) {
                self.error(span, format!("invalid path pattern {pattern:?}: {e}"));
            }
        }
        router
    }

    fn grant_kinds(&mut self, raw: &BTreeMap<String, Spanned<RawGrantKind>>) -> Vec<(String, u32)> {
        let mut kinds: Vec<(String, u32)> = ["bonus", "plan", "topup"]
            .iter()
            .map(|k| (k.to_string(), default_priority(k)))
            .collect();
        for (name, kind) in raw {
            let priority = kind.get_ref().priority.get_ref();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                self.error(
                    kind.span(),
                    format!("grant kind {name:?}: use letters, digits and _"),
                );
            }
            match u32::try_from(*priority).ok().filter(|p| *p <= 1_000) {
                Some(p) => match kinds.iter_mut().find(|(k, _)| k == name) {
                    Some(existing) => existing.1 = p,
                    None => kinds.push((name.clone(), p)),
                },
                None => self.error(
                    kind.get_ref().priority.span(),
                    "priority must be between 0 and 1000",
                ),
            }
        }
        kinds
    }

    fn accounts(
        &mut self,
        raw: &[Spanned<RawAccount>],
        plans: &Catalog,
        grant_kinds: &[(String, u32)],
    ) -> Vec<SeedAccount> {
        let mut out = Vec::new();
        let mut ids = HashSet::new();
        let mut key_hashes = HashSet::new();
        for account in raw {
            let account = account.get_ref();
            let id = account.id.get_ref().clone();
            if id.is_empty()
                || id.len() > 128
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                self.error(
                    account.id.span(),
                    "account ids are 1 to 128 letters, digits, '-', '_' or '.'",
                );
            }
            if !ids.insert(id.clone()) {
                self.error(account.id.span(), format!("duplicate account {id:?}"));
            }
            if !plans.contains_key(account.plan.get_ref()) {
                self.error(
                    account.plan.span(),
                    format!("unknown plan {:?}", account.plan.get_ref()),
                );
            }
            let billing_anchor_day = account.billing_anchor_day.as_ref().and_then(|d| {
                let day = u8::try_from(*d.get_ref())
                    .ok()
                    .filter(|d| (1..=31).contains(d));
                if day.is_none() {
                    self.error(d.span(), "billing_anchor_day must be between 1 and 31");
                }
                day
            });
            let mut grants = Vec::new();
            for grant in &account.grants {
                let g = grant.get_ref();
                let kind = g.kind.get_ref().clone();
                let kind_priority = grant_kinds
                    .iter()
                    .find(|(k, _)| *k == kind)
                    .map(|(_, p)| *p);
                if kind_priority.is_none() {
                    let known: Vec<&str> = grant_kinds.iter().map(|(k, _)| k.as_str()).collect();
                    self.error(g.kind.span(), format!("unknown grant kind {kind:?}: use one of {} or declare it in [grant_kinds]", known.join(", ")));
                }
                let credits = self.amount(&g.credits, "credits").unwrap_or_default();
                let expires_at_ms =
                    g.expires_at.as_ref().and_then(
                        |at| match chrono::DateTime::parse_from_rfc3339(at.get_ref()) {
                            Ok(t) if t.timestamp_millis() >= 0 => Some(t.timestamp_millis() as u64),
                            _ => {
                                self.error(
                                    at.span(),
                                    format!(
                                        "{:?} is not an RFC 3339 time like 2026-12-31T00:00:00Z",
                                        at.get_ref()
                                    ),
                                );
                                None
                            }
                        },
                    );
                let priority = match &g.priority {
                    None => kind_priority.unwrap_or_else(|| default_priority(&kind)),
                    Some(p) => u32::try_from(*p.get_ref())
                        .ok()
                        .filter(|p| *p <= 1_000)
                        .unwrap_or_else(|| {
                            self.error(p.span(), "priority must be between 0 and 1000");
                            0
                        }),
                };
                grants.push(SeedGrant {
                    kind,
                    credits,
                    expires_at_ms,
                    priority,
                });
            }
            let mut keys = Vec::new();
            for key in &account.keys {
                let k = key.get_ref();
                let hash = match (&k.key_env, &k.key_sha256) {
                    (Some(var), None) => match (self.env)(var.get_ref()) {
                        Some(key) if !key.is_empty() => Some(Sha256::digest(key.as_bytes()).into()),
                        _ => {
                            self.error(
                                var.span(),
                                format!("environment variable {} is not set", var.get_ref()),
                            );
                            None
                        }
                    },
                    (None, Some(hex_hash)) => {
                        let mut hash = [0u8; 32];
                        match hex::decode_to_slice(hex_hash.get_ref(), &mut hash) {
                            Ok(()) => Some(hash),
                            Err(_) => {
                                self.error(
                                    hex_hash.span(),
                                    "key_sha256 must be 64 hex digits (the SHA-256 of the key)",
                                );
                                None
                            }
                        }
                    }
                    _ => {
                        self.error(
                            key.span(),
                            "a key needs exactly one of key_env or key_sha256",
                        );
                        None
                    }
                };
                if let Some(hash) = hash {
                    if !key_hashes.insert(hash) {
                        self.error(key.span(), "this key is already used by another member");
                    }
                    keys.push(SeedKey {
                        member: k.member.get_ref().clone(),
                        key_sha256: hash,
                    });
                }
            }
            let mut members: Vec<&str> = keys.iter().map(|k| k.member.as_str()).collect();
            members.sort();
            members.dedup();
            if let Some(plan) = plans.get(account.plan.get_ref()) {
                if members.len() > plan.seats as usize {
                    self.error(
                        account.id.span(),
                        format!(
                            "{} members but plan {} has {} seats",
                            members.len(),
                            account.plan.get_ref(),
                            plan.seats
                        ),
                    );
                }
            }
            out.push(SeedAccount {
                id,
                plan: account.plan.get_ref().clone(),
                billing_anchor_day,
                grants,
                keys,
            });
        }
        out
    }
}

/// `"2xx"` → 200..=299, `"404"` or `404` → 404..=404.
fn status_range(text: &str) -> Option<(u16, u16)> {
    if let Some(class) = text.strip_suffix("xx") {
        let digit: u16 = class.parse().ok().filter(|d| (1..=5).contains(d))?;
        return Some((digit * 100, digit * 100 + 99));
    }
    let code: u16 = text.parse().ok().filter(|c| (100..=599).contains(c))?;
    Some((code, code))
}

/// `http://host:port` → (host, port, tls). Paths are not allowed: the request's
/// own path is forwarded as it came.
fn parse_upstream_url(url: &str) -> Result<(String, u16, bool), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => {
            return Err(format!("{url:?}: https upstreams are not supported yet (this build has no TLS); put a TLS-terminating sidecar in front, or use http"))
        }
        _ => return Err(format!("{url:?} must start with http://")),
    };
    let host = uri.host().ok_or_else(|| format!("{url:?} has no host"))?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!(
            "{url:?}: an upstream URL has no path; requests keep their own"
        ));
    }
    let port = uri.port_u16().unwrap_or(80);
    Ok((
        host.trim_matches(|c| c == '[' || c == ']').to_string(),
        port,
        tls,
    ))
}
