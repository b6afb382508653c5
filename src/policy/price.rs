//! Prices from the request: `credits × per × multiplier + addons`, and charges
//! from actual usage. Exact: the policy's rates and multipliers are decimals with
//! at most 6 places ([`Micros`]); the request's quantities and the response's
//! usages are [`Exact`] numbers of any size and precision; every product is
//! computed exactly and rounded *up* to a whole millicredit. A price that does not
//! fit is refused, never wrapped; a usage charge that does not fit is the hold.
//!
//! A value the price needs that is missing (with no `default`), of the wrong type,
//! not in its table (with no `otherwise`) or out of range is a [`PriceError`]
//! naming its source: never a clamp, never free.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderMap, Method};
use serde_json::Value;

use super::exact::{sum_scaled_ceil, Exact};
use super::{Predicate, Scalar, Source};
use crate::ledger::Credits;

/// A non-negative decimal with at most 6 fractional digits, as integer millionths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Micros(u64);

impl Micros {
    pub const ONE: Micros = Micros(1_000_000);

    pub const fn from_micros(micros: u64) -> Self {
        Micros(micros)
    }

    pub const fn micros(self) -> u64 {
        self.0
    }

    /// Parses `8`, `8.5`, `0.000125`; refuses signs, exponents, > 6 decimals.
    pub fn parse(text: &str) -> Result<Micros, String> {
        let text = text.trim();
        if text.starts_with('-') {
            return Err(format!("{text} is negative"));
        }
        let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !(frac.is_empty() || digits(frac)) {
            return Err(format!("{text:?} is not a decimal number"));
        }
        let frac = frac.trim_end_matches('0');
        if frac.len() > 6 {
            return Err(format!("{text} has more than 6 decimal places"));
        }
        let whole: u64 = whole.parse().map_err(|_| format!("{text} is too large"))?;
        let frac: u64 = format!("{frac:0<6}")
            .parse()
            .map_err(|_| format!("{text:?} is not a decimal number"))?;
        whole
            .checked_mul(1_000_000)
            .and_then(|w| w.checked_add(frac))
            .map(Micros)
            .ok_or_else(|| format!("{text} is too large"))
    }
}

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 1_000_000, self.0 % 1_000_000);
        if frac == 0 {
            return write!(f, "{whole}");
        }
        write!(f, "{whole}.{}", format!("{frac:06}").trim_end_matches('0'))
    }
}

/// A value chosen by a request value through a table, or fixed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Fixed(Micros),
    Table {
        source: Source,
        table: Vec<TableEntry>,
        /// The value when the request has none at `source`.
        default: Option<Micros>,
        /// The value when the request has one that is not in the table.
        otherwise: Option<Micros>,
    },
}

/// One row of a table: its key as the policy writes it, and as a number when
/// the key is a decimal (`8`, `0.5`). A numeric key matches a request value by
/// number — a JSON number or a string holding a decimal, in any form that equals
/// it (`8`, `"8"`, `8.0`, `8e0`); any other key matches the text exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableEntry {
    pub key: String,
    pub number: Option<Exact>,
    pub value: Micros,
}

impl TableEntry {
    pub fn new(key: String, value: Micros) -> TableEntry {
        TableEntry {
            number: Exact::from_decimal(&key),
            key,
            value,
        }
    }
}

/// Multiply by a quantity read from the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Per {
    pub source: Source,
    pub min: Option<Micros>,
    pub max: Option<Micros>,
    /// The quantity when the request has none; validation keeps it in `min..max`.
    pub default: Option<Micros>,
}

/// Added to the price when every `when` holds: an amount, or with `per` a
/// per-unit rate times a quantity (`request:body_bytes` for an input estimate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addon {
    pub when: Vec<Predicate>,
    /// An amount (3 decimals) without `per`; a per-unit rate (6 decimals) with it.
    pub credits: Micros,
    pub per: Option<Per>,
}

/// A price table: `credits × per × multiplier + addons`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceRule {
    /// An amount (3 decimals) without `per`; a per-unit rate (6 decimals) with it.
    pub credits: Lookup,
    pub per: Option<Per>,
    pub multiplier: Option<Lookup>,
    pub addons: Vec<Addon>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Price {
    Fixed(Credits),
    /// Boxed: a rule is far larger than an amount, and most operations are fixed.
    Rule(Box<PriceRule>),
}

/// Why a request cannot be priced: a `400 invalid_request` naming `source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceError {
    pub source: String,
    pub message: String,
}

impl PriceError {
    fn new(source: &Source, message: impl Into<String>) -> Self {
        PriceError {
            source: source.to_string(),
            message: message.into(),
        }
    }
}

/// Everything about a request that prices and predicates may read.
pub struct RequestFacts<'a> {
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    pub path_params: &'a [(String, String)],
    /// The parsed JSON body: `None` when not read, `Some(Err)` when not JSON.
    pub body: Option<&'a Result<Value, String>>,
    /// The body's length in bytes, once read (`request:body_bytes`).
    pub body_bytes: Option<usize>,
}

/// A value found in the request.
pub enum Found<'a> {
    Text(Cow<'a, str>),
    Json(&'a Value),
}

impl RequestFacts<'_> {
    /// The value at `source`; `Ok(None)` when absent.
    pub fn find(&self, source: &Source) -> Result<Option<Found<'_>>, PriceError> {
        Ok(match source {
            Source::Header(name) => self
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| Found::Text(Cow::Borrowed(v))),
            Source::Query(name) => self.query.and_then(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| Found::Text(v))
            }),
            Source::Path(name) => self
                .path_params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| Found::Text(Cow::Borrowed(v.as_str()))),
            Source::Body(pointer) => match self.body {
                None => None,
                Some(Err(e)) => {
                    return Err(PriceError::new(
                        source,
                        format!("the request body is not JSON: {e}"),
                    ))
                }
                Some(Ok(json)) => json
                    .pointer(pointer)
                    .filter(|v| !v.is_null())
                    .map(Found::Json),
            },
            Source::BodyBytes => self
                .body_bytes
                .map(|n| Found::Text(Cow::Owned(n.to_string()))),
        })
    }

    /// Whether every predicate holds. A value that is absent, or a body that is
    /// not JSON, makes a predicate false.
    pub fn all_hold(&self, predicates: &[Predicate]) -> bool {
        predicates.iter().all(|p| self.holds(p))
    }

    /// Whether one predicate holds (absent or not JSON: false).
    pub fn holds(&self, predicate: &Predicate) -> bool {
        match self.find(&predicate.source) {
            Ok(Some(found)) => predicate.any_of.iter().any(|want| want.matches(&found)),
            _ => false,
        }
    }
}

impl Scalar {
    /// Text from a query, header or path compares as text; a JSON value compares
    /// by type (a JSON string never equals an integer predicate).
    pub fn matches(&self, found: &Found<'_>) -> bool {
        match (self, found) {
            (_, Found::Text(text)) => self.to_string() == *text,
            (Scalar::Text(want), Found::Json(Value::String(s))) => want == s,
            (Scalar::Int(want), Found::Json(Value::Number(n))) => {
                n.as_i64() == Some(*want) || (*want >= 0 && n.as_u64() == Some(*want as u64))
            }
            (Scalar::Bool(want), Found::Json(Value::Bool(b))) => want == b,
            _ => false,
        }
    }
}

/// What a table looks a request value up by: its text (strings as they are,
/// numbers and booleans as written) and, when it is a number or a decimal
/// string, its exact value.
fn table_key<'a>(
    found: &'a Found<'a>,
    source: &Source,
) -> Result<(Cow<'a, str>, Option<Exact>), PriceError> {
    let text = match found {
        Found::Text(text) => Cow::Borrowed(text.as_ref()),
        Found::Json(Value::String(s)) => Cow::Borrowed(s.as_str()),
        Found::Json(Value::Number(n)) => {
            let text = n.to_string();
            let number = Exact::from_json_number(&text);
            return Ok((Cow::Owned(text), number));
        }
        Found::Json(Value::Bool(b)) => return Ok((Cow::Owned(b.to_string()), None)),
        Found::Json(other) => {
            return Err(PriceError::new(
                source,
                format!(
                    "must be a string, number or boolean, not {}",
                    json_type(other)
                ),
            ))
        }
    };
    let number = Exact::from_decimal(&text);
    Ok((text, number))
}

/// Request text in an error message, cut short: a value may be megabytes long.
fn shown(text: &str) -> String {
    const MAX_CHARS: usize = 64;
    match text.char_indices().nth(MAX_CHARS) {
        None => format!("{text:?}"),
        Some((end, _)) => format!("{:?}…", &text[..end]),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A quantity: a JSON number, or a string (or query, header or path text)
/// holding a plain decimal. Exact, of any precision; never negative (`-0` is 0).
fn quantity(found: &Found<'_>, source: &Source) -> Result<Exact, PriceError> {
    let (parsed, text) = match found {
        Found::Text(text) => (Exact::from_decimal(text), Cow::Borrowed(text.as_ref())),
        Found::Json(Value::String(s)) => (Exact::from_decimal(s), Cow::Borrowed(s.as_str())),
        Found::Json(Value::Number(n)) => {
            let text = n.to_string();
            (Exact::from_json_number(&text), Cow::Owned(text))
        }
        Found::Json(other) => {
            return Err(PriceError::new(
                source,
                format!(
                    "must be a number, or a string holding a decimal, not {}",
                    json_type(other)
                ),
            ))
        }
    };
    match parsed {
        None => Err(PriceError::new(
            source,
            format!("{} is not a decimal number", shown(&text)),
        )),
        Some(q) if q.is_negative() => Err(PriceError::new(
            source,
            format!("must be a non-negative number: {q} is negative"),
        )),
        Some(q) => Ok(q),
    }
}

impl Lookup {
    fn value(&self, facts: &RequestFacts<'_>) -> Result<Micros, PriceError> {
        let (source, table, default, otherwise) = match self {
            Lookup::Fixed(value) => return Ok(*value),
            Lookup::Table {
                source,
                table,
                default,
                otherwise,
            } => (source, table, default, otherwise),
        };
        let Some(found) = facts.find(source)? else {
            return default
                .ok_or_else(|| PriceError::new(source, "is required to price this request"));
        };
        let (text, number) = table_key(&found, source)?;
        let listed = table.iter().find(|entry| match &number {
            Some(n) => entry.number.as_ref() == Some(n),
            None => entry.number.is_none() && entry.key == text,
        });
        listed
            .map(|entry| entry.value)
            .or(*otherwise)
            .ok_or_else(|| {
                let known: Vec<&str> = table.iter().map(|entry| entry.key.as_str()).collect();
                PriceError::new(
                    source,
                    format!("{} is not one of: {}", shown(&text), known.join(", ")),
                )
            })
    }
}

impl Per {
    /// The quantity to multiply by: the request's, or the default when it has none.
    fn quantity(&self, facts: &RequestFacts<'_>) -> Result<Exact, PriceError> {
        let q = match facts.find(&self.source)? {
            Some(found) => quantity(&found, &self.source)?,
            // Validation keeps a default within min..max.
            None => {
                return self.default.map(Exact::from).ok_or_else(|| {
                    PriceError::new(&self.source, "is required to price this request")
                })
            }
        };
        let below = self.min.is_some_and(|min| q < Exact::from(min));
        let above = self.max.is_some_and(|max| q > Exact::from(max));
        if below || above {
            let bound = |b: Option<Micros>| b.map_or(String::new(), |b| b.to_string());
            return Err(PriceError::new(
                &self.source,
                format!(
                    "{q} is outside the allowed range {}..{}",
                    bound(self.min),
                    bound(self.max)
                ),
            ));
        }
        Ok(q)
    }
}

impl Price {
    /// The amount to hold for this request.
    pub fn hold_amount(&self, facts: &RequestFacts<'_>) -> Result<Credits, PriceError> {
        let rule = match self {
            Price::Fixed(credits) => return Ok(*credits),
            Price::Rule(rule) => rule,
        };
        let credits = rule.credits.value(facts)?;
        let (quantity, blame) = match &rule.per {
            None => (Exact::one(), "price".to_string()),
            Some(per) => (per.quantity(facts)?, per.source.to_string()),
        };
        let multiplier = match &rule.multiplier {
            None => Micros::ONE,
            Some(m) => m.value(facts)?,
        };
        // quantity × credits (millionths) × multiplier (millionths) is in 1e-12
        // credits, so 1e-9 millicredits.
        let millicredits = quantity
            .scaled_ceil(&[credits.micros(), multiplier.micros()], -9)
            .ok_or_else(|| PriceError {
                source: blame.clone(),
                message: "makes the price too large".into(),
            })?;
        let mut total = Credits::from_millicredits(millicredits);
        for addon in &rule.addons {
            if !facts.all_hold(&addon.when) {
                continue;
            }
            let (amount, blame) = match &addon.per {
                // An amount has at most 3 decimals: whole millicredits.
                None => (
                    Some(Credits::from_millicredits(addon.credits.micros() / 1_000)),
                    blame.clone(),
                ),
                Some(per) => {
                    // quantity × millionths of a credit = 1e-3 millicredits.
                    let quantity = per.quantity(facts)?;
                    let amount = quantity
                        .scaled_ceil(&[addon.credits.micros()], -3)
                        .map(Credits::from_millicredits);
                    (amount, per.source.to_string())
                }
            };
            total = amount
                .and_then(|a| total.checked_add(a))
                .ok_or_else(|| PriceError {
                    source: blame,
                    message: "makes the price too large".into(),
                })?;
        }
        Ok(total)
    }

    /// The sources this price reads, for `check` and for deciding whether the body
    /// must be read before the hold.
    pub fn sources(&self) -> Vec<&Source> {
        let Price::Rule(rule) = self else {
            return Vec::new();
        };
        let mut sources = Vec::new();
        for lookup in [Some(&rule.credits), rule.multiplier.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Lookup::Table { source, .. } = lookup {
                sources.push(source);
            }
        }
        if let Some(per) = &rule.per {
            sources.push(&per.source);
        }
        for addon in &rule.addons {
            sources.extend(addon.when.iter().map(|p| &p.source));
            sources.extend(addon.per.as_ref().map(|p| &p.source));
        }
        sources
    }
}

impl super::QuotaRule {
    /// How many units of the quota a request uses: one, or the whole number its
    /// `per` reads (a fraction is refused, like any value out of range).
    pub fn units(&self, facts: &RequestFacts<'_>) -> Result<u64, PriceError> {
        let Some(per) = &self.per else { return Ok(1) };
        let quantity = per.quantity(facts)?;
        let whole = quantity
            .scaled_ceil(&[1], 0)
            .filter(|_| quantity.decimals() == 0);
        whole.ok_or_else(|| {
            PriceError::new(
                &per.source,
                format!("{quantity} is not a whole number of quota units"),
            )
        })
    }
}

/// What a unit of usage costs: one rate for a usage that is one number, or a
/// rate per field of a usage that is an object (`units`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsageRate {
    /// `credits_per_unit`: the usage is one number.
    PerUnit(Micros),
    /// `units`: the usage is an object; each field it names costs its rate.
    Units(Vec<UnitRate>),
}

/// One field of a usage object and its rate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitRate {
    /// The field as the policy names it (`prompt_tokens`, or a pointer
    /// `/completion_tokens_details/reasoning_tokens`).
    pub field: String,
    /// The JSON pointer inside the usage object.
    pub pointer: String,
    pub credits: Micros,
}

/// A usage read from a response: one exact quantity for each rate of its
/// [`UsageRate`], in the same order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage(Vec<Exact>);

impl Usage {
    /// A usage that is one number.
    pub fn one(quantity: Exact) -> Usage {
        Usage(vec![quantity])
    }

    pub fn quantities(&self) -> &[Exact] {
        &self.0
    }
}

/// A usage number: a non-negative JSON number, or a string holding a plain
/// decimal. Anything else is no usage.
fn usage_number(value: &Value) -> Option<Exact> {
    Exact::from_json(value).filter(|q| !q.is_negative())
}

impl UsageRate {
    /// The usage in `value`, as this rate reads it; `None` when it is not one.
    /// One rate: `value` is a usage number. Rates per field: `value` is an object;
    /// a field it lacks (or holds `null`) counts 0, but a field that is present
    /// and not a usage number, or an object with none of the fields, is no usage.
    pub fn read(&self, value: &Value) -> Option<Usage> {
        match self {
            UsageRate::PerUnit(_) => usage_number(value).map(Usage::one),
            UsageRate::Units(rates) => {
                if !value.is_object() {
                    return None;
                }
                let mut found = false;
                let mut quantities = Vec::with_capacity(rates.len());
                for rate in rates {
                    match value.pointer(&rate.pointer).filter(|v| !v.is_null()) {
                        None => quantities.push(Exact::ZERO),
                        Some(field) => {
                            quantities.push(usage_number(field)?);
                            found = true;
                        }
                    }
                }
                found.then_some(Usage(quantities))
            }
        }
    }

    /// `usage` as JSON text for the ledger: the number (`1234`) for one rate, an
    /// object of the fields the policy names (`{"prompt_tokens":10}`) for
    /// several. `None` when a quantity has no short exact text (thousands of
    /// digits): the charge stands, the entry just does not repeat it.
    pub fn describe(&self, usage: &Usage) -> Option<String> {
        let number = |q: &Exact| {
            let text = q.to_string();
            text.parse::<serde_json::Number>().ok().map(|_| text)
        };
        match self {
            UsageRate::PerUnit(_) => usage.0.first().and_then(number),
            UsageRate::Units(rates) => {
                let mut fields = serde_json::Map::new();
                for (rate, q) in rates.iter().zip(&usage.0) {
                    let n: serde_json::Number = number(q)?.parse().ok()?;
                    fields.insert(rate.field.clone(), Value::Number(n));
                }
                serde_json::to_string(&fields).ok()
            }
        }
    }

    /// The usage in a text (a response header): one plain decimal, for one rate.
    pub fn read_text(&self, text: &str) -> Option<Usage> {
        match self {
            UsageRate::PerUnit(_) => Exact::from_decimal(text.trim())
                .filter(|q| !q.is_negative())
                .map(Usage::one),
            UsageRate::Units(_) => None,
        }
    }

    /// What `usage` costs: `Σ quantity × rate`, the exact sum rounded up once to a
    /// whole millicredit; `None` when that does not fit any amount.
    pub fn charge(&self, usage: &Usage) -> Option<Credits> {
        let rates: Vec<u64> = match self {
            UsageRate::PerUnit(rate) => vec![rate.micros()],
            UsageRate::Units(rates) => rates.iter().map(|r| r.credits.micros()).collect(),
        };
        let terms: Vec<(&Exact, u64)> = usage.0.iter().zip(rates).collect();
        // quantity × millionths of a credit = 1e-3 millicredits.
        sum_scaled_ceil(&terms, -3).map(Credits::from_millicredits)
    }
}

impl fmt::Display for UsageRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsageRate::PerUnit(rate) => write!(f, "{rate} per unit"),
            UsageRate::Units(rates) => {
                let each: Vec<String> = rates
                    .iter()
                    .map(|r| format!("{} {}", r.credits, r.field))
                    .collect();
                write!(f, "{}", each.join(" + "))
            }
        }
    }
}

impl fmt::Display for Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lookup::Fixed(v) => write!(f, "{v}"),
            Lookup::Table {
                source,
                table,
                default,
                otherwise,
            } => {
                let entries: Vec<String> = table
                    .iter()
                    .map(|entry| format!("{}: {}", entry.key, entry.value))
                    .collect();
                write!(f, "{source}{{{}", entries.join(", "))?;
                if let Some(d) = default {
                    write!(f, "; default {d}")?;
                }
                if let Some(o) = otherwise {
                    write!(f, "; otherwise {o}")?;
                }
                write!(f, "}}")
            }
        }
    }
}

/// How `check` shows a price:
/// `32 × body:/seconds[1..60; default 8] × body:/res{2k: 2; default 1; otherwise 1} + 1 if …`.
impl fmt::Display for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rule = match self {
            Price::Fixed(credits) => return write!(f, "{credits}"),
            Price::Rule(rule) => rule,
        };
        write!(f, "{}", rule.credits)?;
        if let Some(per) = &rule.per {
            let bound = |b: Option<Micros>| b.map_or(String::new(), |b| b.to_string());
            write!(
                f,
                " × {}[{}..{}",
                per.source,
                bound(per.min),
                bound(per.max)
            )?;
            if let Some(d) = per.default {
                write!(f, "; default {d}")?;
            }
            write!(f, "]")?;
        }
        if let Some(m) = &rule.multiplier {
            write!(f, " × {m}")?;
        }
        for addon in &rule.addons {
            write!(f, " + {}", addon.credits)?;
            if let Some(per) = &addon.per {
                write!(f, " × {}", per.source)?;
            }
            if !addon.when.is_empty() {
                let when: Vec<String> = addon.when.iter().map(|p| p.to_string()).collect();
                write!(f, " if {}", when.join(" and "))?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values: Vec<String> = self.any_of.iter().map(|v| v.to_string()).collect();
        write!(f, "{} = {}", self.source, values.join("|"))
    }
}
