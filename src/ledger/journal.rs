//! The ledger an account's owner sees: an append-only journal of what happened,
//! capped per account (oldest entries fall off), paginated newest first.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{Credits, Millis};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Grant,
    Hold,
    Settle,
    Release,
    Expire,
    Refill,
    PlanChange,
    Adjust,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Grant => "grant",
            EntryKind::Hold => "hold",
            EntryKind::Settle => "settle",
            EntryKind::Release => "release",
            EntryKind::Expire => "expire",
            EntryKind::Refill => "refill",
            EntryKind::PlanChange => "plan_change",
            EntryKind::Adjust => "adjust",
        }
    }
}

/// One line of the ledger. `credits` is what moved: granted, held, charged,
/// returned or expired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub at_ms: Millis,
    pub kind: EntryKind,
    pub credits: Credits,
    pub operation: Option<String>,
    pub request_id: Option<String>,
    /// Grant kind, plan change (`free -> pro`), or why (`hold_ttl`).
    pub detail: Option<String>,
    /// A settle above its hold: what was past the overdraft limit, not charged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncollected: Option<Credits>,
    /// A grant, refill or plan change to an account in debt: how much of it
    /// repaid the debt (and so never became available).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repaid: Option<Credits>,
    /// Who spent: the member and the id of the key (`key_…`) a hold was placed
    /// for, on the hold's entry and on the entry that ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// A settle metered from a response's usage: the usage as the rate read it,
    /// as JSON text (`1234`, or `{"prompt_tokens":10,"completion_tokens":20}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<String>,
    /// The account's available credits once the entry was written (`None` only
    /// on entries written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance_after: Option<Credits>,
    /// The credits left the account (a negative adjustment): `credits` is then
    /// what was debited.
    #[serde(default, skip_serializing_if = "is_false")]
    pub debit: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Longest usage text an entry keeps; a longer usage (a number of thousands of
/// digits) is not recorded on the entry, though it was charged.
pub const USAGE_MAX_BYTES: usize = 512;

/// The entries a store keeps for one account, oldest dropped first past `cap`.
#[derive(Clone, Debug, Default)]
pub struct Journal {
    entries: VecDeque<Entry>,
    cap: usize,
}

impl Journal {
    pub fn new(cap: usize) -> Self {
        Journal {
            entries: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap.max(1);
        while self.entries.len() > self.cap {
            self.entries.pop_front();
        }
    }

    pub fn append(&mut self, entries: impl IntoIterator<Item = Entry>) {
        for entry in entries {
            if self.entries.len() >= self.cap {
                self.entries.pop_front();
            }
            self.entries.push_back(entry);
        }
    }

    /// The entries kept, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// Up to `limit` entries older than `before_seq` (all when `None`), newest first.
    pub fn page(&self, limit: usize, before_seq: Option<u64>) -> Vec<Entry> {
        self.entries
            .iter()
            .rev()
            .filter(|e| before_seq.is_none_or(|b| e.seq < b))
            .take(limit)
            .cloned()
            .collect()
    }
}
