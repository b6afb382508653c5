//! The ledger an account's owner sees: an append-only journal of what happened,
//! capped per account (oldest entries fall off), paginated newest first.

use std::collections::VecDeque;

use super::{Credits, Millis};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub at_ms: Millis,
    pub kind: EntryKind,
    pub credits: Credits,
    pub operation: Option<String>,
    pub request_id: Option<String>,
    /// Grant kind, plan change (`free -> pro`), or why (`hold_ttl`).
    pub detail: Option<String>,
}

#[derive(Clone, Debug)]
pub(super) struct Journal {
    entries: VecDeque<Entry>,
    cap: usize,
    next_seq: u64,
}

impl Journal {
    pub(super) fn new(cap: usize) -> Self {
        Journal {
            entries: VecDeque::new(),
            cap: cap.max(1),
            next_seq: 1,
        }
    }

    pub(super) fn set_cap(&mut self, cap: usize) {
        self.cap = cap.max(1);
        while self.entries.len() > self.cap {
            self.entries.pop_front();
        }
    }

    pub(super) fn push(
        &mut self,
        at_ms: Millis,
        kind: EntryKind,
        credits: Credits,
        operation: Option<&str>,
        request_id: Option<&str>,
        detail: Option<String>,
    ) {
        if self.entries.len() >= self.cap {
            self.entries.pop_front();
        }
        self.entries.push_back(Entry {
            seq: self.next_seq,
            at_ms,
            kind,
            credits,
            operation: operation.map(str::to_string),
            request_id: request_id.map(str::to_string),
            detail,
        });
        self.next_seq += 1;
    }

    /// Up to `limit` entries older than `before_seq` (all when `None`), newest first.
    pub(super) fn page(&self, limit: usize, before_seq: Option<u64>) -> Vec<Entry> {
        self.entries
            .iter()
            .rev()
            .filter(|e| before_seq.is_none_or(|b| e.seq < b))
            .take(limit)
            .cloned()
            .collect()
    }
}
