//! `raw::RawPolicy` → `Policy`: every check that makes a policy safe to run.
//!
//! Collects every error it can find (not just the first), each located in the file.
//!
//! # Layout
//! One file per section of the policy file, each an `impl Validator` block:
//! - this file: the [`Validator`] (errors and notes located by span), `${VAR}`
//!   expansion, numbers, durations, the one parser of a string naming one of a
//!   fixed set of choices ([`Validator::choice`]), and the order sections are read in;
//! - [`gateway`] reads `[gateway]` — addresses, limits, and the bound on what one
//!   account's state may hold under them;
//! - [`store`] reads `[store]`;
//! - [`upstreams`] reads `[upstreams.NAME]`;
//! - [`plans`] reads `[plans.NAME]`;
//! - [`operations`] reads `[[operations]]` — matching, `when`, `settle`, `charge`, routes;
//! - [`prices`] reads an operation's `price`;
//! - [`accounts`] reads `[grant_kinds.NAME]` and `[[accounts]]`.

mod accounts;
mod events;
mod gateway;
mod operations;
mod plans;
mod prices;
mod store;
mod upstreams;

use std::collections::HashSet;
use std::ops::{Range, RangeInclusive};
use std::sync::Arc;

use toml::{Spanned, Value};

use super::raw::RawPolicy;
use super::units::parse_duration_ms;
use super::{Micros, Policy, PolicyError, PolicyErrors, PolicyNote, StoreConfig};
use crate::ledger::Credits;

struct Validator<'a> {
    source: &'a str,
    file: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// `check --no-env`: a variable the environment does not answer reads as
    /// [`PLACEHOLDER`], and checks a placeholder cannot pass are skipped.
    placeholders: bool,
    errors: Vec<PolicyError>,
    notes: Vec<PolicyNote>,
}

/// What `${VAR}` (and a `key_env` key) reads as under `check --no-env`.
pub(super) const PLACEHOLDER: &str = "placeholder";

pub(super) fn validate(
    source: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
    placeholders: bool,
) -> Result<Policy, PolicyErrors> {
    let mut v = Validator {
        source,
        file,
        env,
        placeholders,
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
        self.expand_with_placeholders(text).0
    }

    /// [`Validator::expand`], and whether a placeholder stands for a missing
    /// variable (`check --no-env`): the caller then skips checks of the value's
    /// form, which only the real value can pass.
    fn expand_with_placeholders(&mut self, text: &Spanned<String>) -> (String, bool) {
        let mut placeholder = false;
        let raw = text.get_ref();
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw.as_str();
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                self.error(text.span(), "unclosed ${ in string");
                return (out, placeholder);
            };
            let name = &after[..end];
            match (self.env)(name) {
                Some(value) => out.push_str(&value),
                None if self.placeholders => {
                    placeholder = true;
                    out.push_str(PLACEHOLDER);
                }
                None => self.error(
                    text.span(),
                    format!("environment variable {name} is not set"),
                ),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        (out, placeholder)
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

    /// A string naming one of a fixed set of choices (`unmatched`, `kind`,
    /// `on_missing`…): the matching option's value, or an error that lists the
    /// allowed values, at the string, and `None`.
    fn choice<T: Copy>(
        &mut self,
        value: &Spanned<String>,
        what: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        let written = value.get_ref().as_str();
        if let Some((_, chosen)) = options.iter().find(|(name, _)| *name == written) {
            return Some(*chosen);
        }
        self.error(
            value.span(),
            format!("{what} must be {}, not {written:?}", one_of(options)),
        );
        None
    }

    /// A whole number in `range`, or `default` when not written.
    fn count(
        &mut self,
        value: &Option<Spanned<i64>>,
        what: &str,
        range: RangeInclusive<i64>,
        default: usize,
    ) -> usize {
        let Some(value) = value else {
            return default;
        };
        match usize::try_from(*value.get_ref()) {
            Ok(n) if range.contains(value.get_ref()) => n,
            _ => {
                self.error(
                    value.span(),
                    format!(
                        "{what} must be between {} and {}",
                        range.start(),
                        range.end()
                    ),
                );
                default
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
        self.account_state(
            &raw.gateway,
            &gateway,
            &plans,
            &operations,
            &grant_kinds,
            &accounts,
        );
        let events = self.events(raw.events.as_ref());
        if let (Some(section), StoreConfig::Redis { .. }) = (&raw.events, &store) {
            if !events.webhooks.is_empty() {
                self.note(
                    section.span(),
                    "the redis store keeps no events outbox yet: no webhook is sent",
                );
            }
        }
        let stripe = self.stripe(raw.payments.stripe.as_ref(), &plans, &grant_kinds);
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
            events,
            stripe,
            notes: Vec::new(),
        })
    }
}

/// `"a"`, `"a" or "b"`, `"a", "b" or "c"`: the names of `options`, quoted.
fn one_of<T>(options: &[(&str, T)]) -> String {
    let quoted: Vec<String> = options
        .iter()
        .map(|(name, _)| format!("{name:?}"))
        .collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validator<'a>(source: &'a str, env: &'a dyn Fn(&str) -> Option<String>) -> Validator<'a> {
        Validator {
            source,
            file: "p.toml",
            env,
            placeholders: false,
            errors: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// The value of `key = "..."` in `source`, spanned as the TOML parser spans it.
    fn spanned(source: &str, key: &str) -> Spanned<String> {
        let table: toml::Table = toml::from_str(source).unwrap();
        let text = table[key].as_str().unwrap().to_string();
        let quoted = format!("{text:?}");
        let start = source.find(&format!("{key} = {quoted}")).unwrap() + key.len() + 3;
        Spanned::new(start..start + quoted.len(), text)
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Fruit {
        Apple,
        Pear,
        Plum,
    }

    const FRUITS: [(&str, Fruit); 3] = [
        ("apple", Fruit::Apple),
        ("pear", Fruit::Pear),
        ("plum", Fruit::Plum),
    ];

    #[test]
    fn a_choice_is_the_named_options_value() {
        let env = |_: &str| None;
        for (name, fruit) in FRUITS {
            let source = format!("fruit = \"{name}\"\n");
            let mut v = validator(&source, &env);
            let value = spanned(&source, "fruit");
            assert_eq!(v.choice(&value, "fruit", &FRUITS), Some(fruit));
            assert!(v.errors.is_empty());
        }
    }

    #[test]
    fn another_choice_is_an_error_at_the_value_listing_the_options() {
        let env = |_: &str| None;
        let source = "version = 1\nfruit = \"Apple\"\n";
        let mut v = validator(source, &env);
        let value = spanned(source, "fruit");
        assert_eq!(v.choice(&value, "fruit", &FRUITS), None);
        assert_eq!(
            v.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [r#"p.toml:2:9: fruit must be "apple", "pear" or "plum", not "Apple""#],
            "matched exactly (no case folding), located at the string"
        );
    }

    #[test]
    fn options_are_listed_as_a_sentence() {
        assert_eq!(one_of(&FRUITS[..1]), r#""apple""#);
        assert_eq!(one_of(&FRUITS[..2]), r#""apple" or "pear""#);
        assert_eq!(one_of(&FRUITS), r#""apple", "pear" or "plum""#);
    }

    #[test]
    fn a_count_is_in_its_range_or_an_error_and_the_default() {
        let env = |_: &str| None;
        let mut v = validator("n = 5", &env);
        assert_eq!(v.count(&None, "n", 1..=9, 3), 3);
        assert_eq!(v.count(&Some(Spanned::new(4..5, 9)), "n", 1..=9, 3), 9);
        assert!(v.errors.is_empty());
        for out_of_range in [0, 10, -1] {
            assert_eq!(
                v.count(&Some(Spanned::new(4..5, out_of_range)), "n", 1..=9, 3),
                3
            );
        }
        assert_eq!(v.errors.len(), 3);
        assert!(v
            .errors
            .iter()
            .all(|e| e.message == "n must be between 1 and 9"));
    }
}
