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
    /// A negative adjustment larger than what is available plus the room left
    /// under the overdraft limit.
    InsufficientCredits {
        required: Credits,
        available: Credits,
        overdraft_room: Credits,
    },
    /// An idempotency key kept for another admin change.
    IdempotencyKeyReused,
    /// More metadata entries than an account keeps.
    MetadataLimit {
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
    /// Charged beyond what was granted (`over_hold = "overdraft"`), repaid first
    /// from the next grant or refill.
    pub debt: Credits,
}

/// One wallet: its grants and open holds. Serializable whole (the local stores
/// keep it so); a shared store keeps the open holds beside the rest
/// ([`Account::take_holds`]), which the aggregates `held`, `open_holds`,
/// `quota_held` and each grant's `drawn` let it decide on without them.
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
    /// The open holds this copy knows: all of them, except in a shared store, which
    /// loads only the ones a transition needs (see [`Account::partial`]).
    pub(super) holds: BTreeMap<u64, Hold>,
    /// Credits held by open holds: the sum of their amounts.
    #[serde(default)]
    pub(super) held: Credits,
    /// How many holds are open.
    #[serde(default)]
    pub(super) open_holds: usize,
    /// Quota units held by open holds, by quota.
    #[serde(default)]
    pub(super) quota_held: BTreeMap<String, u64>,
    pub(super) granted: Credits,
    pub(super) charged: Credits,
    pub(super) expired: Credits,
    /// Charged beyond what was granted, within the overdraft limit of the holds
    /// that charged it; the next grants repay it before anything is available.
    #[serde(default)]
    pub(super) debt: Credits,
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
    /// The holds placed and ended since the store last took them (kept only by a
    /// partial copy: a local store keeps every hold with the account).
    #[serde(skip)]
    pub(super) hold_changes: HoldChanges,
    /// True when `holds` may lack some open holds (a shared store's copy).
    #[serde(skip)]
    pub(super) partial: bool,
    pub(super) next_seq: u64,
    /// An admin's notes on the account (a payment provider's customer id…),
    /// at most `METADATA_MAX_ENTRIES`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// The balance the event rules last saw ([`Account::take_events`]); `None`
    /// until they first look.
    #[serde(default)]
    pub(super) watched_balance: Option<Credits>,
    /// The account's next event number (a part of the next event's id).
    #[serde(default)]
    pub(super) next_event: u64,
    /// The last ledger entry the event rules looked at: each entry causes its
    /// events once, even when the store takes the entries later.
    #[serde(skip)]
    pub(super) events_seen_seq: u64,
}

/// The most one account may ever be granted: a quarter of what a `u64` counts, in
/// millicredits. [`Account::grant`] refuses a grant past it. Every amount inside an
/// account — what is left of its grants, held, charged, expired — is a part of what
/// was granted plus its debt, and the debt is bounded by an overdraft limit the
/// policy keeps far below this, so a sum of a few of them stays far below `u64::MAX`.
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

/// Quota units each quota's holds use.
fn quota_counts<'a>(holds: impl Iterator<Item = &'a Hold>) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for hold in holds {
        if let Some(q) = &hold.quota {
            *counts.entry(q.clone()).or_default() += hold.quota_units;
        }
    }
    counts
}

/// The holds placed and ended since a store last took them ([`Account::take_hold_changes`]):
/// what a store that keeps holds beside the account writes. A hold placed and
/// ended between two takes appears in neither.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HoldChanges {
    /// Ids of holds placed (their records are in the account).
    pub placed: Vec<u64>,
    /// Ids of holds that ended.
    pub ended: Vec<u64>,
}

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
            held: Credits::ZERO,
            open_holds: 0,
            quota_held: BTreeMap::new(),
            granted: Credits::ZERO,
            charged: Credits::ZERO,
            expired: Credits::ZERO,
            debt: Credits::ZERO,
            next_grant_id: 1,
            next_hold_id: 1,
            ended: VecDeque::new(),
            grant_receipts: BTreeMap::new(),
            grant_keys_in_order: VecDeque::new(),
            idempotency: Idempotency::default(),
            fresh: VecDeque::new(),
            hold_changes: HoldChanges::default(),
            partial: false,
            next_seq: 1,
            metadata: BTreeMap::new(),
            watched_balance: None,
            next_event: 0,
            events_seen_seq: 0,
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
            uncollected: None,
            repaid: None,
            member: None,
            key_id: None,
            usage: None,
            balance_after: Some(self.available()),
            debit: false,
        });
        self.next_seq += 1;
    }

    /// Notes on the entry just recorded (a settle) what it could not charge.
    pub(super) fn note_uncollected(&mut self, uncollected: Credits) {
        if let Some(entry) = self.fresh.back_mut().filter(|_| !uncollected.is_zero()) {
            entry.uncollected = Some(uncollected);
        }
    }

    /// Notes on the entry just recorded (a grant, refill or plan change) how much
    /// of its grant repaid debt.
    pub(super) fn note_repaid(&mut self, repaid: Credits) {
        if let Some(entry) = self.fresh.back_mut().filter(|_| !repaid.is_zero()) {
            entry.repaid = Some(repaid);
        }
    }

    /// Notes on the entry just recorded (a hold or its end) whose key it was for.
    pub(super) fn note_caller(&mut self, member: Option<&str>, key_id: Option<&str>) {
        if let Some(entry) = self.fresh.back_mut() {
            entry.member = member.map(str::to_string);
            entry.key_id = key_id.map(str::to_string);
        }
    }

    /// Notes on the entry just recorded (an adjustment) that its credits left the account.
    pub(super) fn note_debit(&mut self, debit: bool) {
        if let Some(entry) = self.fresh.back_mut() {
            entry.debit = debit;
        }
    }

    /// Notes on the entry just recorded (a settle) the usage it was metered from.
    pub(super) fn note_usage(&mut self, usage: Option<&str>) {
        if let Some(entry) = self.fresh.back_mut() {
            entry.usage = usage
                .filter(|u| u.len() <= super::journal::USAGE_MAX_BYTES)
                .map(str::to_string);
        }
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

    /// The open holds this copy knows (all of them unless it is [`partial`](Account::partial)).
    pub fn holds(&self) -> impl Iterator<Item = &Hold> {
        self.holds.values()
    }

    /// How many holds are open.
    pub fn open_holds(&self) -> usize {
        self.open_holds
    }

    /// The open hold with this id, if this copy knows it.
    pub fn hold_record(&self, id: u64) -> Option<&Hold> {
        self.holds.get(&id)
    }

    /// Whether this copy may lack some open holds: a shared store's copy, which
    /// loads a hold only when a transition needs it.
    pub fn partial(&self) -> bool {
        self.partial
    }

    /// Takes the open holds out: a shared store writes the rest of the account
    /// without them (the aggregates still decide every transition) and keeps each
    /// hold on its own, so what a commit writes does not grow with the open holds.
    /// The copy is partial from then on.
    pub fn take_holds(&mut self) -> BTreeMap<u64, Hold> {
        self.partial = true;
        std::mem::take(&mut self.holds)
    }

    /// Makes open holds known again: taken out before, or loaded from the store.
    /// They are already counted in the aggregates.
    pub fn know_holds(&mut self, holds: impl IntoIterator<Item = Hold>) {
        for hold in holds {
            self.holds.insert(hold.id, hold);
        }
    }

    /// Forgets a hold this copy knew, which the store says has ended meanwhile.
    pub fn forget_hold(&mut self, id: u64) {
        self.holds.remove(&id);
    }

    /// The holds placed and ended since the last call.
    pub fn take_hold_changes(&mut self) -> HoldChanges {
        std::mem::take(&mut self.hold_changes)
    }

    /// Counts the open holds into the aggregates, for a state written before the
    /// aggregates existed (it kept every open hold with the account).
    pub fn rebuild_aggregates(&mut self) {
        self.held = sum(self.holds.values().map(|h| h.amount));
        self.open_holds = self.holds.len();
        self.quota_held = quota_counts(self.holds.values());
        for grant in &mut self.grants {
            grant.drawn = sum(self
                .holds
                .values()
                .flat_map(|h| h.draws.iter())
                .filter(|d| d.grant_id == grant.id)
                .map(|d| d.amount));
        }
    }

    pub fn totals(&self) -> Totals {
        Totals {
            granted: self.granted,
            available: self.available(),
            held: self.held(),
            charged: self.charged,
            expired: self.expired,
            debt: self.debt,
        }
    }

    /// What the account owes: charged beyond what was granted.
    pub fn debt(&self) -> Credits {
        self.debt
    }

    pub fn available(&self) -> Credits {
        sum(self.grants.iter().map(|g| g.left))
    }

    pub fn held(&self) -> Credits {
        self.held
    }

    /// The invariant: `granted + debt == available + held + charged + expired`
    /// (every amount unsigned, so none is negative), grants drawn no more than
    /// they were granted, and — when this copy knows every open hold — the
    /// aggregates equal what the holds add up to. That the debt stays within the
    /// overdraft limit is the settle's to keep (the limit is the plan's, which this
    /// state does not hold): see [`Account::check_debt`].
    pub fn check_invariant(&self) -> Result<(), String> {
        let t = self.totals();
        let rhs = [t.held, t.charged, t.expired]
            .into_iter()
            .try_fold(t.available, |acc, c| acc.checked_add(c))
            .ok_or("totals overflow")?;
        let lhs = t.granted.checked_add(t.debt).ok_or("totals overflow")?;
        if lhs != rhs {
            return Err(format!(
                "account {}: granted {} + debt {} != available {} + held {} + charged {} + expired {}",
                self.id, t.granted, t.debt, t.available, t.held, t.charged, t.expired
            ));
        }
        if self.grants.iter().any(|g| g.expired && !g.left.is_zero()) {
            return Err("an expired grant still has credits left".into());
        }
        if sum(self.grants.iter().map(|g| g.drawn)) != self.held {
            return Err(format!(
                "account {}: grants drawn {} != held {}",
                self.id,
                sum(self.grants.iter().map(|g| g.drawn)),
                self.held
            ));
        }
        for hold in self.holds.values() {
            if sum(hold.draws.iter().map(|d| d.amount)) != hold.amount {
                return Err(format!("hold {} draws do not add up", hold.id));
            }
        }
        if self.partial {
            return Ok(());
        }
        if self.open_holds != self.holds.len()
            || sum(self.holds.values().map(|h| h.amount)) != self.held
        {
            return Err(format!(
                "account {}: {} holds of {} known, aggregates say {} of {}",
                self.id,
                self.holds.len(),
                sum(self.holds.values().map(|h| h.amount)),
                self.open_holds,
                self.held
            ));
        }
        if self.quota_held != quota_counts(self.holds.values()) {
            return Err(format!(
                "account {}: quota held does not match its holds",
                self.id
            ));
        }
        for grant in &self.grants {
            let drawn = sum(self
                .holds
                .values()
                .flat_map(|h| h.draws.iter())
                .filter(|d| d.grant_id == grant.id)
                .map(|d| d.amount));
            if drawn != grant.drawn {
                return Err(format!(
                    "grant {} drawn {} != {} its holds draw",
                    grant.id, grant.drawn, drawn
                ));
            }
        }
        Ok(())
    }

    /// The debt is within the overdraft limit of the account's plan in `catalog`
    /// (0 when the plan has none). Holds whose settle may go into debt carry the
    /// limit they were placed under, so this holds while the catalog is unchanged.
    pub fn check_debt(&self, catalog: &super::Catalog) -> Result<(), String> {
        let limit = catalog
            .get(&self.plan)
            .map_or(Credits::ZERO, |terms| terms.overdraft_limit);
        if self.debt > limit {
            return Err(format!(
                "account {}: debt {} is above the overdraft limit {limit}",
                self.id, self.debt
            ));
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
