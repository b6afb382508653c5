//! `[[operations]]`: what a request is (path, method, `when`), where it goes, who
//! may do it, how its hold ends (`settle`, `charge`), and the routes compiled from
//! the paths. Prices are in `prices`.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;

use http::{HeaderName, Method};
use toml::{Spanned, Value};

use super::Validator;
use crate::policy::raw::{OrTable, RawCharge, RawOperation, RawQuota, RawSettle};
use crate::policy::{
    ChargeRule, HoldRule, OnClientAbort, OnMissing, OnUpstreamCut, Operation, OverHold, Per,
    Predicate, QuotaRule, Route, Scalar, SettleRule, Source, UnitRate, Upstream, UsageRate,
    UsageSource,
};
impl Validator<'_> {
    pub(super) fn operation(
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
        let quota = raw.quota.as_ref().and_then(|q| self.quota(q, quotas));
        let when = self.predicates(&raw.when);
        let price = self.price(&raw.price);
        let settle = raw.settle.as_ref().and_then(|s| self.settle(s));
        let charge = self.charge(raw.charge.as_ref(), raw.settle.is_some());
        if let (Some(rule), Some(written)) = (&settle, &raw.settle) {
            self.note_stream_trap(raw, &when, rule, written.span());
        }
        let price = price?;
        let needs_body = when
            .iter()
            .map(|p| &p.source)
            .chain(price.sources())
            .chain(quota.iter().flat_map(|q| q.per.as_ref().map(|p| &p.source)))
            .any(Source::needs_body);
        Some(Operation {
            name,
            method,
            path: raw.path.get_ref().clone(),
            when,
            upstream: upstream?,
            requires: raw.requires.iter().map(|f| f.get_ref().clone()).collect(),
            quota,
            price,
            settle,
            charge,
            needs_body,
        })
    }

    /// `quota = "name"` (one unit a request) or `quota = { name, per }` (the
    /// request says how many units, a whole number).
    fn quota(
        &mut self,
        raw: &Spanned<OrTable<RawQuota>>,
        quotas: &HashSet<&str>,
    ) -> Option<QuotaRule> {
        let (name, span, per) = match raw.get_ref() {
            OrTable::Scalar(Value::String(name)) => (name.clone(), raw.span(), None),
            OrTable::Scalar(_) => {
                self.error(
                    raw.span(),
                    "quota is a quota's name, or { name = \"…\", per = \"body:/n\" }",
                );
                return None;
            }
            OrTable::Table(t) => {
                let per = match &t.per {
                    None => None,
                    Some(per) => Some(match per.get_ref() {
                        OrTable::Table(p) => self.per(&Spanned::new(per.span(), p.clone()))?,
                        OrTable::Scalar(Value::String(from)) => {
                            let from = Spanned::new(per.span(), from.clone());
                            Per {
                                source: self.source_at(&from)?,
                                min: None,
                                max: None,
                                default: None,
                            }
                        }
                        OrTable::Scalar(_) => {
                            self.error(per.span(), "quota per is a value source, like \"body:/n\"");
                            return None;
                        }
                    }),
                };
                (t.name.get_ref().clone(), t.name.span(), per)
            }
        };
        if !quotas.contains(name.as_str()) {
            self.error(span, format!("unknown quota {name:?}: no plan has it"));
        }
        Some(QuotaRule { name, per })
    }

    /// `check`'s warning about the trap that charges a streamed answer its whole
    /// hold: an operation that may answer with an event stream (its `when` reads
    /// a `stream` field, or it has none on a chat-shaped path) reads its usage
    /// from `json:` sources only — a stream has no JSON body, so its usage is
    /// always missing.
    fn note_stream_trap(
        &mut self,
        raw: &RawOperation,
        when: &[Predicate],
        settle: &SettleRule,
        span: Range<usize>,
    ) {
        if !settle.usage.iter().all(UsageSource::is_json) {
            return;
        }
        let on_stream = |p: &&Predicate| matches!(&p.source, Source::Body(ptr) if ptr == "/stream");
        let streams = match when.iter().find(on_stream) {
            // `stream = false` alone rules streams out.
            Some(p) => p.any_of.iter().any(|v| *v != Scalar::Bool(false)),
            None => chat_shaped(raw.path.get_ref()),
        };
        if streams {
            self.note(
                span,
                format!(
                    "warning: {} may answer with an event stream, but its usage is read \
                     from json: only — a streamed answer has no JSON body, so it would be \
                     charged as on_missing says (the whole hold); list an sse: source \
                     too, e.g. usage = [\"json:/usage\", \"sse:/usage\"]",
                    raw.name.get_ref()
                ),
            );
        }
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

    pub(super) fn predicates(&mut self, raw: &BTreeMap<String, Spanned<Value>>) -> Vec<Predicate> {
        raw.iter()
            .filter_map(|(source, value)| self.predicate(source, value))
            .collect()
    }

    pub(super) fn source_at(&mut self, text: &Spanned<String>) -> Option<Source> {
        self.source_of(text.get_ref())
            .map_err(|e| self.error(text.span(), e))
            .ok()
    }

    fn settle(&mut self, raw: &Spanned<RawSettle>) -> Option<SettleRule> {
        let s = raw.get_ref();
        let written: Vec<(String, Range<usize>)> = match s.usage.get_ref() {
            Value::String(text) => vec![(text.clone(), s.usage.span())],
            Value::Array(items) if !items.is_empty() => items
                .iter()
                .map(|item| match item {
                    Value::String(text) => (text.clone(), s.usage.span()),
                    other => (other.to_string(), s.usage.span()),
                })
                .collect(),
            _ => {
                self.error(
                    s.usage.span(),
                    "usage is a source, or a list of sources: json:/pointer, header:name or sse:/pointer",
                );
                return None;
            }
        };
        let mut usage = Vec::new();
        for (text, span) in written {
            match usage_source(&text) {
                Some(source) => usage.push(source),
                None => self.error(span, format!("{text:?} is not a usage source: use json:/pointer, header:name or sse:/pointer")),
            }
        }
        let rate = match (&s.credits_per_unit, &s.units) {
            (Some(rate), None) => self
                .micros(rate, "credits_per_unit")
                .map(UsageRate::PerUnit),
            (None, Some(units)) => {
                if usage.iter().any(|u| matches!(u, UsageSource::Header(_))) {
                    self.error(
                        units.span(),
                        "units price a usage object; a header: usage is one number (use credits_per_unit)",
                    );
                }
                if units.get_ref().is_empty() {
                    self.error(units.span(), "units: name at least one usage field");
                }
                let mut rates = Vec::new();
                for (field, rate) in units.get_ref() {
                    let Some(credits) = self.micros(rate, &format!("units: {field}")) else {
                        continue;
                    };
                    let pointer = if field.starts_with('/') {
                        field.clone()
                    } else {
                        format!("/{}", field.replace('~', "~0").replace('/', "~1"))
                    };
                    rates.push(UnitRate {
                        field: field.clone(),
                        pointer,
                        credits,
                    });
                }
                Some(UsageRate::Units(rates))
            }
            (Some(_), Some(units)) => {
                self.error(
                    units.span(),
                    "give credits_per_unit (a usage that is one number) or units (a usage object), not both",
                );
                None
            }
            (None, None) => {
                self.error(
                    raw.span(),
                    "settle needs credits_per_unit (a usage that is one number) or units (a usage object)",
                );
                None
            }
        };
        let on_missing = s
            .on_missing
            .as_ref()
            .and_then(|o| {
                self.choice(
                    o,
                    "on_missing",
                    &[
                        ("charge_hold", OnMissing::ChargeHold),
                        ("release", OnMissing::Release),
                    ],
                )
            })
            .unwrap_or(OnMissing::ChargeHold);
        if usage.is_empty() {
            return None;
        }
        Some(SettleRule {
            usage,
            rate: rate?,
            on_missing,
        })
    }

    fn source_of(&self, text: &str) -> Result<Source, String> {
        let (kind, rest) = text
            .split_once(':')
            .ok_or_else(|| format!("{text:?} is not a value source: use body:/pointer, query:name, header:name, path:name or request:body_bytes"))?;
        match kind {
            "body" if rest.is_empty() || rest.starts_with('/') => Ok(Source::Body(rest.to_string())),
            "body" => Err(format!("{text:?}: a body source is a JSON pointer starting with /")),
            "query" if !rest.is_empty() => Ok(Source::Query(rest.to_string())),
            "header" => HeaderName::try_from(rest)
                .map(Source::Header)
                .map_err(|_| format!("{text:?}: {rest:?} is not a header name")),
            "path" if !rest.is_empty() => Ok(Source::Path(rest.to_string())),
            "request" if rest == "body_bytes" => Ok(Source::BodyBytes),
            _ => Err(format!("{text:?} is not a value source: use body:/pointer, query:name, header:name, path:name or request:body_bytes")),
        }
    }

    /// `charge`: which statuses settle, what endings mean, how much is held and
    /// how far a settle may go. `metered`: the operation settles from usage.
    fn charge(&mut self, raw: Option<&RawCharge>, metered: bool) -> ChargeRule {
        let mut rule = ChargeRule::default_rule();
        if metered {
            // A metered response the client left: what it used so far.
            rule.on_client_abort = OnClientAbort::UsageSoFar;
        }
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
            let options = [
                ("settle", OnClientAbort::Settle),
                ("release", OnClientAbort::Release),
                ("usage_so_far", OnClientAbort::UsageSoFar),
            ];
            if let Some(chosen) = self.choice(abort, "on_client_abort", &options) {
                rule.on_client_abort = chosen;
            }
        }
        if let Some(cut) = &raw.on_upstream_cut {
            let options = [
                ("release", OnUpstreamCut::Release),
                ("settle", OnUpstreamCut::Settle),
            ];
            if let Some(chosen) = self.choice(cut, "on_upstream_cut", &options) {
                rule.on_upstream_cut = chosen;
            }
        }
        // Both need a usage: a fixed price held in part, or charged above its
        // hold, would be charged what the account happened to have.
        let needs_usage = |v: &mut Self, span: Range<usize>, what: &str| {
            if !metered {
                v.error(
                    span,
                    format!("{what} needs [operations.settle]: only an operation charged its actual usage can hold or charge other than its price"),
                );
            }
        };
        let full = ("full", None);
        let available = ("available", Some(()));
        if let Some(hold) = &raw.hold {
            if let Some(Some(())) = self.choice(hold, "hold", &[full, available]) {
                needs_usage(self, hold.span(), "hold = \"available\"");
                match &raw.min_hold {
                    Some(min) => {
                        if let Some(min_hold) = self.amount(min, "min_hold") {
                            if min_hold.is_zero() {
                                self.error(min.span(), "min_hold must be more than 0");
                            }
                            rule.hold = HoldRule::Available { min_hold };
                        }
                    }
                    None => self.error(
                        hold.span(),
                        "hold = \"available\" needs min_hold: the least an account must have to be admitted",
                    ),
                }
            }
        }
        if let (Some(min), HoldRule::Full) = (&raw.min_hold, rule.hold) {
            if raw.hold.is_none() {
                self.error(
                    min.span(),
                    "min_hold applies only with hold = \"available\"",
                );
            }
        }
        if let Some(over) = &raw.over_hold {
            let options = [("cap", OverHold::Cap), ("overdraft", OverHold::Overdraft)];
            if let Some(chosen) = self.choice(over, "over_hold", &options) {
                if chosen == OverHold::Overdraft {
                    needs_usage(self, over.span(), "over_hold = \"overdraft\"");
                }
                rule.over_hold = chosen;
            }
        }
        rule
    }

    /// Compiles path patterns; operations sharing a pattern share a route, in file order.
    pub(super) fn routes(
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
            if let Err(e) = crate::policy::path::check_pattern(&pattern) {
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
}

/// A usage source as the policy writes it: `json:/pointer`, `sse:/pointer`,
/// `header:name`.
fn usage_source(text: &str) -> Option<UsageSource> {
    match text.split_once(':') {
        Some(("json", p)) if p.is_empty() || p.starts_with('/') => {
            Some(UsageSource::Json(p.to_string()))
        }
        Some(("sse", p)) if p.is_empty() || p.starts_with('/') => {
            Some(UsageSource::Sse(p.to_string()))
        }
        Some(("header", h)) => HeaderName::try_from(h).ok().map(UsageSource::Header),
        _ => None,
    }
}

/// A path an LLM chat API serves (`/v1/chat/completions`, `/v1/completions`,
/// `/v1/messages`, `/v1/responses`): such APIs stream when asked.
fn chat_shaped(path: &str) -> bool {
    path.split('/')
        .any(|segment| matches!(segment, "chat" | "completions" | "messages" | "responses"))
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
