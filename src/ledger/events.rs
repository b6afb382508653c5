//! Events: what an account's owner is told of (`balance.low`, `grant.created`…),
//! decided by the transition that caused them.
//!
//! A store takes an account's events ([`Account::take_events`]) in the same step
//! as its ledger entries, under the same lock or in the same compare-and-set, and
//! writes them to its outbox in the same commit: an event exists exactly when its
//! transition does. The thresholds of `balance.low` are crossings of the account's
//! balance — `available + held`, what it would have if every open hold ended
//! uncharged — so a hold that is later released neither fires nor re-arms one;
//! only charges, expiries, grants and refills move it. A threshold fires once when
//! the balance falls to or below it and re-arms when the balance rises above it.
//! Because transitions of one account are serialized (a lock, or a compare-and-set
//! that recomputes on conflict), exactly one transition sees each crossing, however
//! many requests run at once and on however many replicas.
//!
//! `member_limit.reached` is decided the same way: once when what a member was
//! charged this cycle reaches its monthly limit, re-armed by the refill (or by a
//! limit raised above what it was charged).
//!
//! No IO, no clock: `now_ms` is an argument, and the event's id is derived from
//! the account, its event counter and the time.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::account::plus;
use super::{Account, Credits, EntryKind, Millis, HOLD_TTL_DETAIL};

/// Events an outbox keeps when the policy names no number (`max_pending`).
pub const DEFAULT_MAX_PENDING_EVENTS: usize = 100_000;

/// The kinds of event, as webhooks name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EventKind {
    BalanceLow,
    BalanceDepleted,
    GrantCreated,
    PlanChanged,
    HoldExpired,
    MemberLimitReached,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::BalanceLow,
        EventKind::BalanceDepleted,
        EventKind::GrantCreated,
        EventKind::PlanChanged,
        EventKind::HoldExpired,
        EventKind::MemberLimitReached,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::BalanceLow => "balance.low",
            EventKind::BalanceDepleted => "balance.depleted",
            EventKind::GrantCreated => "grant.created",
            EventKind::PlanChanged => "plan.changed",
            EventKind::HoldExpired => "hold.expired",
            EventKind::MemberLimitReached => "member_limit.reached",
        }
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// Which events the policy wants, and the `balance.low` thresholds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventRules {
    /// Kinds some webhook subscribes to; empty: no events at all.
    pub kinds: BTreeSet<EventKind>,
    /// `balance.low` thresholds, each above zero.
    pub low_balance: Vec<Credits>,
}

/// One event, as the outbox keeps it until delivered. `data` is the JSON text of
/// the event's `data` object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub kind: EventKind,
    pub account: String,
    pub at_ms: Millis,
    pub data: String,
}

/// The JSON text of a `data` object whose values are already JSON.
fn data(fields: &[(&str, serde_json::Value)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    serde_json::Value::Object(map).to_string()
}

fn text(s: Option<&str>) -> serde_json::Value {
    s.map_or(serde_json::Value::Null, |s| {
        serde_json::Value::String(s.to_string())
    })
}

impl Account {
    /// The members whose spending this cycle reached their monthly limit since
    /// the last call — `(member, limit, used)` — each marked so that it is not
    /// found again until its spending is below the limit (the refill, or a
    /// higher limit), which re-arms it.
    fn members_reaching_their_limit(&mut self) -> Vec<(String, Credits, Credits)> {
        let mut reached = Vec::new();
        for (name, m) in self.members.iter_mut() {
            match (m.limit_reached(), m.limit_reached_sent) {
                (true, false) => {
                    m.limit_reached_sent = true;
                    let limit = m.monthly_limit.unwrap_or(Credits::ZERO);
                    reached.push((name.clone(), limit, m.used));
                }
                (false, true) => m.limit_reached_sent = false,
                _ => {}
            }
        }
        reached
    }

    /// The balance the `balance.low` thresholds watch: available plus held.
    pub fn event_balance(&self) -> Credits {
        plus(self.available(), self.held())
    }

    /// The events of the transitions since the last call (its ledger entries not
    /// yet taken, and the balance's crossings since the last call): a store calls
    /// it after every call on the account, before [`Account::take_entries`], and
    /// commits what it returns with the account. An account that never had its
    /// balance watched (new, or from before events existed) starts watching now,
    /// without an event.
    pub fn take_events(&mut self, rules: &EventRules, now_ms: Millis) -> Vec<Event> {
        let balance = self.event_balance();
        let before = self.watched_balance.replace(balance);
        let reached = self.members_reaching_their_limit();
        if rules.kinds.is_empty() {
            self.events_seen_seq = self.next_seq.saturating_sub(1);
            return Vec::new();
        }
        let mut found: Vec<(EventKind, String)> = Vec::new();
        let seen = self.events_seen_seq;
        self.events_seen_seq = self.next_seq.saturating_sub(1);
        for entry in self.fresh.iter().filter(|e| e.seq > seen) {
            match entry.kind {
                EntryKind::Grant => found.push((
                    EventKind::GrantCreated,
                    data(&[
                        ("kind", text(entry.detail.as_deref())),
                        ("credits", entry.credits.to_json()),
                        ("reference", text(entry.request_id.as_deref())),
                    ]),
                )),
                EntryKind::Refill => found.push((
                    EventKind::GrantCreated,
                    data(&[
                        ("kind", text(Some("plan"))),
                        ("credits", entry.credits.to_json()),
                        ("refill", serde_json::Value::Bool(true)),
                    ]),
                )),
                EntryKind::PlanChange => {
                    // `plan.rs` writes "OLD -> NEW", or "OLD -> NEW at the next refill".
                    let detail = entry.detail.as_deref().unwrap_or_default();
                    let (change, effective) = match detail.strip_suffix(" at the next refill") {
                        Some(change) => (change, "period_end"),
                        None => (detail, "now"),
                    };
                    let (from, to) = change.split_once(" -> ").unwrap_or(("", change));
                    found.push((
                        EventKind::PlanChanged,
                        data(&[
                            ("from", text(Some(from))),
                            ("to", text(Some(to))),
                            ("effective", text(Some(effective))),
                            ("credits", entry.credits.to_json()),
                            ("reference", text(entry.request_id.as_deref())),
                        ]),
                    ));
                }
                EntryKind::Expire if entry.detail.as_deref() == Some(HOLD_TTL_DETAIL) => found
                    .push((
                        EventKind::HoldExpired,
                        data(&[
                            ("operation", text(entry.operation.as_deref())),
                            ("request_id", text(entry.request_id.as_deref())),
                            ("credits", entry.credits.to_json()),
                        ]),
                    )),
                _ => {}
            }
        }
        if let Some(before) = before {
            let balance_json = balance.to_json();
            let available = self.available().to_json();
            // Highest threshold first, so a fall through several reads in order.
            let mut thresholds = rules.low_balance.clone();
            thresholds.sort_unstable_by(|a, b| b.cmp(a));
            for threshold in thresholds {
                if before > threshold && balance <= threshold {
                    found.push((
                        EventKind::BalanceLow,
                        data(&[
                            ("threshold", threshold.to_json()),
                            ("balance", balance_json.clone()),
                            ("available", available.clone()),
                        ]),
                    ));
                }
            }
            if !before.is_zero() && balance.is_zero() {
                found.push((
                    EventKind::BalanceDepleted,
                    data(&[
                        ("balance", balance_json.clone()),
                        ("available", available.clone()),
                        ("debt", self.debt().to_json()),
                    ]),
                ));
            }
        }
        for (member, limit, used) in reached {
            found.push((
                EventKind::MemberLimitReached,
                data(&[
                    ("member", text(Some(&member))),
                    ("limit", limit.to_json()),
                    ("used", used.to_json()),
                ]),
            ));
        }
        found
            .into_iter()
            .filter(|(kind, _)| rules.kinds.contains(kind))
            .map(|(kind, data)| {
                let n = self.next_event;
                self.next_event += 1;
                let mut hash = Sha256::new();
                hash.update(self.id.as_bytes());
                hash.update([0]);
                hash.update(n.to_be_bytes());
                hash.update(now_ms.to_be_bytes());
                let digest = hash.finalize();
                Event {
                    id: format!(
                        "evt_{}",
                        hex::encode(digest.iter().take(12).copied().collect::<Vec<u8>>())
                    ),
                    kind,
                    account: self.id.clone(),
                    at_ms: now_ms,
                    data,
                }
            })
            .collect()
    }
}
