//! `[events]` (the `balance.low` thresholds, the webhooks and their retries) and
//! `[payments.stripe]` (the signing secret, and what each Stripe price buys).

use std::collections::{BTreeMap, BTreeSet};

use toml::Spanned;

use super::Validator;
use crate::ledger::{Catalog, Credits, EventKind, EventRules};
use crate::policy::raw::{RawEvents, RawStripe};
use crate::policy::{EventsConfig, StripeConfig, StripePrice, WebhookConfig};

/// Thresholds one policy may name: each is checked on every transition.
const MAX_THRESHOLDS: usize = 16;
/// Webhooks one policy may name: each event is posted to each.
const MAX_WEBHOOKS: usize = 16;
/// The longest wait before a first retry; the longest time an event is retried.
const MAX_RETRY_BASE_MS: u64 = 3_600_000;
const MAX_RETRY_FOR_MS: u64 = 7 * 24 * 3_600_000;

impl Validator<'_> {
    pub(super) fn events(&mut self, raw: Option<&Spanned<RawEvents>>) -> EventsConfig {
        let mut config = EventsConfig::default();
        let Some(raw) = raw else {
            return config;
        };
        let section = raw.span();
        let raw = raw.get_ref();
        let mut low_balance = Vec::new();
        for value in &raw.low_balance {
            let Some(threshold) = self.amount(value, "a low_balance threshold") else {
                continue;
            };
            if threshold.is_zero() {
                self.error(
                    value.span(),
                    "a low_balance threshold must be above 0 (balance.depleted is the event at 0)",
                );
            } else if low_balance.contains(&threshold) {
                self.error(value.span(), format!("low_balance lists {threshold} twice"));
            } else {
                low_balance.push(threshold);
            }
        }
        if low_balance.len() > MAX_THRESHOLDS {
            self.error(
                section.clone(),
                format!("low_balance may list at most {MAX_THRESHOLDS} thresholds"),
            );
        }
        if raw.webhooks.len() > MAX_WEBHOOKS {
            self.error(
                section.clone(),
                format!("[events] may list at most {MAX_WEBHOOKS} webhooks"),
            );
        }
        let mut kinds = BTreeSet::new();
        for hook in &raw.webhooks {
            let hook_span = hook.span();
            let hook = hook.get_ref();
            let (url, placeholder) = self.expand_with_placeholders(&hook.url);
            if !placeholder {
                match url.parse::<http::Uri>() {
                    Ok(uri)
                        if matches!(uri.scheme_str(), Some("http" | "https"))
                            && uri.host().is_some() => {}
                    _ => self.error(
                        hook.url.span(),
                        format!("webhook url {url:?} must be an http:// or https:// URL"),
                    ),
                }
            }
            let secret = self.expand(&hook.secret);
            if secret.is_empty() {
                self.error(hook.secret.span(), "a webhook secret must not be empty");
            }
            let events = match &hook.events {
                None => EventKind::ALL.into_iter().collect(),
                Some(names) => {
                    let mut events = BTreeSet::new();
                    for name in names {
                        match EventKind::parse(name.get_ref()) {
                            Some(kind) => {
                                events.insert(kind);
                            }
                            None => {
                                let known: Vec<&str> =
                                    EventKind::ALL.iter().map(|k| k.as_str()).collect();
                                self.error(
                                    name.span(),
                                    format!(
                                        "unknown event {:?}: the events are {}",
                                        name.get_ref(),
                                        known.join(", ")
                                    ),
                                );
                            }
                        }
                    }
                    if events.is_empty() && names.is_empty() {
                        self.error(hook_span, "a webhook with events = [] receives nothing");
                    }
                    events
                }
            };
            kinds.extend(events.iter().copied());
            config.webhooks.push(WebhookConfig {
                url,
                secret,
                events,
            });
        }
        if !low_balance.is_empty() && !kinds.contains(&EventKind::BalanceLow) {
            self.note(
                section.clone(),
                "low_balance is set but no webhook receives balance.low",
            );
        }
        config.rules = EventRules { kinds, low_balance };
        config.retry_base_ms =
            self.duration_ms(&raw.retry_base, config.retry_base_ms, "retry_base");
        config.retry_for_ms = self.duration_ms(&raw.retry_for, config.retry_for_ms, "retry_for");
        config.timeout_ms = self.duration_ms(&raw.timeout, config.timeout_ms, "timeout");
        for (value, max, what) in [
            (&raw.retry_base, MAX_RETRY_BASE_MS, "retry_base"),
            (&raw.retry_for, MAX_RETRY_FOR_MS, "retry_for"),
        ] {
            let ms = match what {
                "retry_base" => config.retry_base_ms,
                _ => config.retry_for_ms,
            };
            if let (Some(value), true) = (value, ms > max) {
                self.error(
                    value.span(),
                    format!(
                        "{what} must be at most {}",
                        crate::policy::format_duration(max)
                    ),
                );
            }
        }
        config.max_pending = self.count(
            &raw.max_pending,
            "max_pending",
            1..=10_000_000,
            config.max_pending,
        );
        config
    }

    pub(super) fn stripe(
        &mut self,
        raw: Option<&Spanned<RawStripe>>,
        plans: &Catalog,
        grant_kinds: &[(String, u32)],
    ) -> Option<StripeConfig> {
        let raw = raw?.get_ref();
        let webhook_secret = self.expand(&raw.webhook_secret);
        if webhook_secret.is_empty() {
            self.error(
                raw.webhook_secret.span(),
                "webhook_secret must not be empty",
            );
        }
        let mut prices = BTreeMap::new();
        for (id, price) in &raw.prices {
            let span = price.span();
            let price = price.get_ref();
            let bought = match (&price.grant, &price.credits, &price.plan) {
                (Some(kind), Some(credits), None) => {
                    let priority = grant_kinds
                        .iter()
                        .find(|(k, _)| k == kind.get_ref())
                        .map(|(_, p)| *p);
                    if priority.is_none() {
                        let known: Vec<&str> =
                            grant_kinds.iter().map(|(k, _)| k.as_str()).collect();
                        self.error(
                            kind.span(),
                            format!(
                                "price {id:?}: unknown grant kind {:?} (the kinds are {})",
                                kind.get_ref(),
                                known.join(", ")
                            ),
                        );
                    }
                    let credits = self.amount(credits, "credits");
                    if credits.is_some_and(Credits::is_zero) {
                        self.error(
                            span.clone(),
                            format!("price {id:?}: credits must be above 0"),
                        );
                    }
                    match (priority, credits) {
                        (Some(priority), Some(credits)) => Some(StripePrice::Grant {
                            kind: kind.get_ref().clone(),
                            credits,
                            priority,
                        }),
                        _ => None,
                    }
                }
                (None, None, Some(plan)) => {
                    if plans.contains_key(plan.get_ref()) {
                        Some(StripePrice::Plan(plan.get_ref().clone()))
                    } else {
                        self.error(
                            plan.span(),
                            format!("price {id:?}: unknown plan {:?}", plan.get_ref()),
                        );
                        None
                    }
                }
                _ => {
                    self.error(
                        span,
                        format!(
                            "price {id:?} must be {{ grant = KIND, credits = N }} or {{ plan = NAME }}"
                        ),
                    );
                    None
                }
            };
            if let Some(bought) = bought {
                prices.insert(id.clone(), bought);
            }
        }
        Some(StripeConfig {
            webhook_secret,
            prices,
        })
    }
}
