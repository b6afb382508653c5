//! An operation's `price`: fixed, or a rule — credits (fixed or a table on a
//! request value), `per` a quantity, a `multiplier`, `addons`.

use std::ops::Range;

use toml::{Spanned, Value};

use super::Validator;
use crate::policy::raw::{OrTable, RawLookupTable, RawPer, RawPriceTable};
use crate::policy::{Addon, Lookup, Micros, Per, Price, PriceRule, TableEntry};
impl Validator<'_> {
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

    /// A quantity read from the request: `from`, with optional `min`, `max` and
    /// a `default` for a request without one (kept within `min..max`).
    pub(super) fn per(&mut self, per: &Spanned<RawPer>) -> Option<Per> {
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
    }

    pub(super) fn price(&mut self, raw: &Spanned<OrTable<RawPriceTable>>) -> Option<Price> {
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
        let per = table.per.as_ref().and_then(|per| self.per(per));
        let multiplier = table
            .multiplier
            .as_ref()
            .and_then(|m| self.lookup(m, 6, "multiplier"));
        let mut addons = Vec::new();
        for addon in &table.addons {
            let a = addon.get_ref();
            let when = self.predicates(&a.when);
            if a.when.is_empty() && a.per.is_none() {
                self.error(
                    addon.span(),
                    "an addon needs `when` or `per`: otherwise add its credits to the price",
                );
            }
            // With `per`, an addon's credits are a per-unit rate (6 decimals).
            let credits = match &a.per {
                None => self
                    .amount(&a.credits, "addon credits")
                    .map(|c| Micros::from_micros(c.millicredits() * 1_000)),
                Some(_) => self.micros(&a.credits, "addon credits"),
            };
            let per = a.per.as_ref().map(|p| self.per(p));
            if let (Some(credits), None | Some(Some(_))) = (credits, &per) {
                addons.push(Addon {
                    when,
                    credits,
                    per: per.flatten(),
                });
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
}
