//! `[[operations]]`: what a request is (path, method, `when`), where it goes, who
//! may do it, how its hold ends (`settle`, `charge`), and the routes compiled from
//! the paths. Prices are in `prices`.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;

use http::{HeaderName, Method};
use toml::{Spanned, Value};

use super::Validator;
use crate::policy::raw::{RawCharge, RawOperation, RawSettle};
use crate::policy::{
    ChargeRule, OnClientAbort, OnMissing, OnUpstreamCut, Operation, Predicate, Route, Scalar,
    SettleRule, Source, Upstream, UsageSource,
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
            let options = [
                ("settle", OnClientAbort::Settle),
                ("release", OnClientAbort::Release),
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

/// `"2xx"` → 200..=299, `"404"` or `404` → 404..=404.
fn status_range(text: &str) -> Option<(u16, u16)> {
    if let Some(class) = text.strip_suffix("xx") {
        let digit: u16 = class.parse().ok().filter(|d| (1..=5).contains(d))?;
        return Some((digit * 100, digit * 100 + 99));
    }
    let code: u16 = text.parse().ok().filter(|c| (100..=599).contains(c))?;
    Some((code, code))
}
