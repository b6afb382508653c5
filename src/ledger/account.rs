//! The account: one wallet's state, its totals and ledger entries, and the invariant.
//!
//! Its fields are the ledger's own (`pub(super)`): only the ledger's transitions
//! change them, each checking the invariant afterwards in debug and test builds.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::ended;
use super::idempotency::Idempotency;
use super::{
    Credits, Ending, Entry, EntryKind, Grant, GrantReceipt, Hold, Limits, Member, Millis, Recorded,
    HOLD_TTL_DETAIL,
};

/// Entries an account buffers until its store takes them (stores take them after
/// every call; the bound only protects a caller that never does).
const FRESH_ENTRIES_KEPT: usize = 4_096;

/// Why an account-management request was refused. Outcomes, not failures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccountRejected {
    SeatLimit {
        seats: u32,
    },
    MemberExists,
    UnknownMember,
    UnknownPlan,
    GrantOverflow,
    AccountExists,
    UnknownKey,
    /// The member already has `KEYS_PER_MEMBER` active keys.
    KeyLimit {
        limit: usize,
    },
}

/// Totals of an account, as shown to its owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub granted: Credits,
    pub available: Credits,
    pub held: Credits,
    pub charged: Credits,
    pub expired: Credits,
}

/// One wallet: its grants and open holds. Serializable, so a shared store can
/// keep it whole and compare-and-set it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: String,
    pub plan: String,
    /// Takes effect at the next refill.
    pub pending_plan: Option<String>,
    pub billing_anchor_day: u8,
    pub cycle_start_ms: Millis,
    pub next_refill_ms: Millis,
    pub members: BTreeMap<String, Member>,
    /// Quota units settled this cycle.
    pub(super) quota_used: BTreeMap<String, u64>,
    /// Kept sorted in spend order.
    pub(super) grants: Vec<Grant>,
    pub(super) holds: BTreeMap<u64, Hold>,
    pub(super) granted: Credits,
    pub(super) charged: Credits,
    pub(super) expired: Credits,
    pub(super) next_grant_id: u64,
    pub(super) next_hold_id: u64,
    #[serde(with = "ended")]
    pub(super) ended: VecDeque<(u64, Ending)>,
    pub(super) grant_receipts: BTreeMap<String, GrantReceipt>,
    pub(super) grant_keys_in_order: VecDeque<String>,
    #[serde(default)]
    pub(super) idempotency: Idempotency,
    /// Ledger entries not yet taken by the store.
    #[serde(skip)]
    pub(super) fresh: VecDeque<Entry>,
    pub(super) next_seq: u64,
}

/// The most one account may ever be granted: a quarter of what a `u64` counts, in
/// millicredits. [`Account::grant`] refuses a grant past it. Every amount inside an
/// account — what is left of its grants, held, charged, expired — is a part of what
/// was granted, so a sum of a few of them stays far below `u64::MAX`.
pub const MAX_GRANTED: Credits = Credits::from_millicredits(u64::MAX / 4);

/// `a + b` for amounts of one account. By [`MAX_GRANTED`] this cannot overflow; if
/// it ever did, the account's state would be corrupt, and the addition panics
/// (overflow checks are on in release builds too) rather than losing money silently.
pub(super) fn plus(a: Credits, b: Credits) -> Credits {
    Credits::from_millicredits(a.millicredits() + b.millicredits())
}

/// The sum of amounts of one account (see [`plus`]).
pub(super) fn sum(amounts: impl Iterator<Item = Credits>) -> Credits {
    amounts.fold(Credits::ZERO, plus)
}

/// A grant that would overflow the account's totals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("grant would overflow the account's total")]
pub struct GrantOverflow;

/// The default journal cap when the policy names none.
pub const DEFAULT_LEDGER_MAX_ENTRIES: usize = 1_000;

impl Account {
    /// A bare account with no grants, its cycle anchored on the 1st; for tests.
    pub fn new(id: impl Into<String>, plan: impl Into<String>) -> Self {
        Account {
            id: id.into(),
            plan: plan.into(),
            pending_plan: None,
            billing_anchor_day: 1,
            cycle_start_ms: 0,
            next_refill_ms: Millis::MAX,
            members: BTreeMap::new(),
            quota_used: BTreeMap::new(),
            grants: Vec::new(),
            holds: BTreeMap::new(),
            granted: Credits::ZERO,
            charged: Credits::ZERO,
            expired: Credits::ZERO,
            next_grant_id: 1,
            next_hold_id: 1,
            ended: VecDeque::new(),
            grant_receipts: BTreeMap::new(),
            grant_keys_in_order: VecDeque::new(),
            idempotency: Idempotency::default(),
            fresh: VecDeque::new(),
            next_seq: 1,
        }
    }

    /// Appends a ledger entry for the store to take.
    pub(super) fn record(
        &mut self,
        at_ms: Millis,
        kind: EntryKind,
        credits: Credits,
        operation: Option<&str>,
        request_id: Option<&str>,
        detail: Option<String>,
    ) {
        if self.fresh.len() >= FRESH_ENTRIES_KEPT {
            self.fresh.pop_front();
        }
        self.fresh.push_back(Entry {
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

    /// Attaches the recorded response to a settled idempotency record (within
    /// `limits`: see [`Idempotency::record`]).
    pub fn record_response(&mut self, key: &str, response: Recorded, limits: &Limits) -> bool {
        self.idempotency.record(key, response, limits)
    }

    /// How many holds expired (past their TTL) since the entries were last taken.
    pub fn holds_expired_since_taken(&self) -> usize {
        self.fresh
            .iter()
            .filter(|e| e.kind == EntryKind::Expire && e.detail.as_deref() == Some(HOLD_TTL_DETAIL))
            .count()
    }

    /// The ledger entries written since the last call, oldest first.
    pub fn take_entries(&mut self) -> Vec<Entry> {
        self.fresh.drain(..).collect()
    }

    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// The sequence number the account's next ledger entry gets (entries are numbered
    /// 1, 2, 3… without gaps).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn holds(&self) -> impl Iterator<Item = &Hold> {
        self.holds.values()
    }

    pub fn totals(&self) -> Totals {
        Totals {
            granted: self.granted,
            available: self.available(),
            held: self.held(),
            charged: self.charged,
            expired: self.expired,
        }
    }

    pub fn available(&self) -> Credits {
        sum(self.grants.iter().map(|g| g.left))
    }

    pub fn held(&self) -> Credits {
        sum(self.holds.values().map(|h| h.amount))
    }

    /// The §1 invariant and the internal consistency of holds.
    pub fn check_invariant(&self) -> Result<(), String> {
        let t = self.totals();
        let rhs = [t.held, t.charged, t.expired]
            .into_iter()
            .try_fold(t.available, |acc, c| acc.checked_add(c))
            .ok_or("totals overflow")?;
        if t.granted != rhs {
            return Err(format!(
                "account {}: granted {} != available {} + held {} + charged {} + expired {}",
                self.id, t.granted, t.available, t.held, t.charged, t.expired
            ));
        }
        for hold in self.holds.values() {
            if sum(hold.draws.iter().map(|d| d.amount)) != hold.amount {
                return Err(format!("hold {} draws do not add up", hold.id));
            }
        }
        if self.grants.iter().any(|g| g.expired && !g.left.is_zero()) {
            return Err("an expired grant still has credits left".into());
        }
        Ok(())
    }

    pub(super) fn debug_check(&self) {
        #[cfg(debug_assertions)]
        if let Err(broken) = self.check_invariant() {
            // Debug and test builds only: the test that broke the invariant must stop.
            #[allow(clippy::panic)]
            {
                panic!("ledger invariant broken: {broken}");
            }
        }
    }
}
