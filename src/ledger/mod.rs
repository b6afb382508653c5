//! The ledger core: grants, spend order, holds, settle, release, expire.
//!
//! Plain synchronous Rust. It takes `now_ms` (Unix milliseconds) as an argument and
//! knows nothing of tokio, Pingora, Redis or the clock — which is what lets the
//! property test below drive it through random histories. Stores apply it; the
//! gateway calls stores.
//!
//! Invariant, checked after every transition in debug and test builds:
//! `granted == available + held + charged + expired`, and nothing is negative
//! (amounts are unsigned, and every subtraction is checked).
//!
//! Besides money an account carries what decides who may spend it: its plan and
//! billing cycle, its members, its per-cycle quotas, and its journal (the ledger
//! its owner reads). Stores call [`Account::refill_if_due`] before every
//! transition, which is how refills happen lazily and exactly once per cycle.

mod calendar;
mod credits;
mod ended;
mod idempotency;
mod journal;

pub use calendar::{cycle_bounds, day_of_month};
pub use credits::{Credits, ParseCreditsError};
use idempotency::{Check, Idempotency};
pub use idempotency::{IdempotencyRequest, Recorded};
pub use journal::{Entry, EntryKind, Journal};

/// The `detail` of the ledger entry written when a hold expires.
pub const HOLD_TTL_DETAIL: &str = "hold_ttl";

/// Entries an account buffers until its store takes them (stores take them after
/// every call; the bound only protects a caller that never does).
const FRESH_ENTRIES_KEPT: usize = 4_096;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

/// Unix time in milliseconds, always passed in by the caller.
pub type Millis = u64;

/// Spend priority of a grant kind when the policy does not name one.
pub fn default_priority(kind: &str) -> u32 {
    match kind {
        "bonus" => 10,
        "plan" => 20,
        "topup" => 30,
        _ => 25,
    }
}

/// How many ended holds an account remembers, so that a late second settle or
/// release is answered `Already*` rather than `UnknownHold`.
const ENDED_HOLDS_REMEMBERED: usize = 64;

/// How many admin-grant idempotency keys an account remembers (oldest forgotten first).
pub const GRANT_KEYS_REMEMBERED: usize = 10_000;

/// Active keys one member may have. The account's state, key ids included, is
/// written on every hold, so it must stay small.
pub const KEYS_PER_MEMBER: usize = 100;

/// What a plan gives an account, as the policy says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanTerms {
    pub monthly_credits: Credits,
    /// Count allowances per cycle; a quota the plan does not name is unlimited.
    pub quotas: BTreeMap<String, u64>,
    pub seats: u32,
    pub signup_credits: Option<Credits>,
    /// An upgrade to this plan keeps the old plan grant's rest until the refill.
    pub keep_unused_on_upgrade: bool,
    /// The features operations can require (`plan_required` when one is missing).
    pub features: Vec<String>,
}

/// Every plan by name.
pub type Catalog = BTreeMap<String, PlanTerms>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub premium_disabled: bool,
    /// The ids of the member's active keys. A hold on behalf of a key not listed
    /// here is refused, in the same atomic step as the hold: that is what makes a
    /// revocation bind every replica at once, whatever they cached.
    ///
    /// `None` means "not recorded": a state written by an earlier version, which
    /// kept keys only in the store's key records. The key check is then skipped
    /// for this member (its keys still stop authenticating once their record is
    /// gone), and it stays unrecorded: listing only the keys added from now on
    /// would refuse the member's older keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<BTreeSet<String>>,
}

impl Member {
    /// A new member, with no keys yet (recorded: keys added later are listed).
    pub fn new(premium_disabled: bool) -> Self {
        Member {
            premium_disabled,
            keys: Some(BTreeSet::new()),
        }
    }
}

/// What an idempotent admin grant returns, the first time and every time after.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantReceipt {
    pub grant_id: u64,
    pub kind: String,
    pub credits: Credits,
    pub priority: u32,
    pub expires_at_ms: Option<Millis>,
    pub granted_at_ms: Millis,
}

/// When a plan change takes effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effective {
    /// Now: the plan grant is set to the new allowance (an upgrade).
    Now,
    /// At the next refill (a downgrade).
    PeriodEnd,
}

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

/// A lot of credits added to an account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: u64,
    pub kind: String,
    pub priority: u32,
    pub expires_at_ms: Option<Millis>,
    /// The amount originally granted.
    pub granted: Credits,
    /// What is left to spend; zero once the grant has expired.
    pub left: Credits,
    pub expired: bool,
}

impl Grant {
    /// Spend order: lower priority first, then earliest expiry (none = last), then oldest.
    fn spend_key(&self) -> (u32, Millis, u64) {
        (
            self.priority,
            self.expires_at_ms.unwrap_or(Millis::MAX),
            self.id,
        )
    }
}

/// The part of a hold taken from one grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draw {
    pub grant_id: u64,
    pub amount: Credits,
}

/// Credits reserved for one in-flight request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub id: u64,
    pub operation: String,
    pub request_id: String,
    pub amount: Credits,
    pub draws: Vec<Draw>,
    pub expires_at_ms: Millis,
    /// The plan quota this hold uses one unit of.
    pub quota: Option<String>,
    /// The idempotency key whose record this hold ends.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// What a hold asks for.
#[derive(Clone, Debug)]
pub struct HoldRequest {
    pub operation: String,
    pub request_id: String,
    pub amount: Credits,
    pub ttl_ms: u64,
    /// Open holds allowed per account before `TooManyHolds`.
    pub max_holds: usize,
    /// One unit of this plan quota is held too.
    pub quota: Option<String>,
    /// The request's `Idempotency-Key`, if it sent one.
    pub idempotency: Option<IdempotencyRequest>,
    /// Whose key asks, and what the gateway decided it may do; re-checked against
    /// the account's state. `None` only for holds placed on no key's behalf (the
    /// ledger's and stores' own tests, the benches).
    pub caller: Option<Caller>,
}

/// What the gateway decided a request may do, from its view of the key and the
/// account — which on a shared store may be a few seconds old. [`Account::hold`]
/// checks it again against the account's state in the same atomic step as the
/// hold, so a revoked key, a downgrade or a member's premium switch made through
/// any replica binds every priced request at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub member: String,
    /// The id of the key the request presented (`key_…`), not the key.
    pub key_id: String,
    /// The plan features the operation requires.
    pub requires: Vec<String>,
    /// The operation is premium: a member with premium disabled may not use it.
    pub premium: bool,
}

/// A hold that was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldPlaced {
    pub hold_id: u64,
    /// Available credits after the hold.
    pub available: Credits,
}

/// Why a hold was not placed. Outcomes, not failures: the gateway answers them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldRejected {
    InsufficientCredits {
        required: Credits,
        available: Credits,
        held: Credits,
    },
    TooManyHolds {
        limit: usize,
    },
    QuotaExhausted {
        quota: String,
        limit: u64,
    },
    /// The first request with this idempotency key is still in flight.
    IdempotencyInProgress,
    /// Another request was sent under this idempotency key.
    IdempotencyKeyReused,
    /// This request was settled before: answer it again, charge nothing. `None`
    /// while its response is being recorded, or when it was too large to keep.
    Replay {
        response: Option<Recorded>,
        recording: bool,
    },
    /// The caller's key is no longer active (revoked), or its member is gone.
    KeyNotActive,
    /// The account's plan lacks a feature the operation requires.
    PlanRequired {
        feature: String,
    },
    /// The operation is premium and the member has premium disabled.
    PremiumDisabled,
}

/// How a hold ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ending {
    Settled,
    Released,
    Expired,
}

/// A hold that ended now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldEnded {
    pub ending: Ending,
    pub charged: Credits,
    /// Credits given back to grants (or to `expired`, if their grant expired meanwhile).
    pub returned: Credits,
    /// The account's available credits once the hold ended.
    pub available: Credits,
}

/// Why a hold could not be ended: it already was, or never existed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndRejected {
    AlreadyEnded(Ending),
    UnknownHold,
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
    quota_used: BTreeMap<String, u64>,
    /// Kept sorted in spend order.
    grants: Vec<Grant>,
    holds: BTreeMap<u64, Hold>,
    granted: Credits,
    charged: Credits,
    expired: Credits,
    next_grant_id: u64,
    next_hold_id: u64,
    #[serde(with = "ended")]
    ended: VecDeque<(u64, Ending)>,
    grant_receipts: BTreeMap<String, GrantReceipt>,
    grant_keys_in_order: VecDeque<String>,
    #[serde(default)]
    idempotency: Idempotency,
    /// Ledger entries not yet taken by the store.
    #[serde(skip)]
    fresh: VecDeque<Entry>,
    next_seq: u64,
}

/// Amounts are bounded by `Credits::MAX`-sized sums the checked arithmetic
/// refuses up front (`grant`), so the sums inside cannot overflow afterwards.
fn sum(amounts: impl Iterator<Item = Credits>) -> Credits {
    amounts.fold(Credits::ZERO, |acc, c| {
        acc.checked_add(c)
            .unwrap_or(Credits::from_millicredits(u64::MAX))
    })
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
    fn record(
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

    /// Attaches the recorded response to a settled idempotency record.
    pub fn record_response(&mut self, key: &str, response: Recorded) -> bool {
        self.idempotency.record(key, response)
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

    /// A new account on `plan`: the plan grant for the current cycle (expiring at
    /// the next refill) and, once, the plan's signup credits as a bonus.
    pub fn open(
        id: &str,
        plan: &str,
        billing_anchor_day: Option<u8>,
        terms: &PlanTerms,
        now_ms: Millis,
    ) -> Account {
        let mut account = Account::new(id, plan);
        account.billing_anchor_day = billing_anchor_day.unwrap_or_else(|| day_of_month(now_ms));
        let (start, next) = cycle_bounds(account.billing_anchor_day, now_ms);
        account.cycle_start_ms = start;
        account.next_refill_ms = next;
        // Policy validation bounds amounts far below the overflow limit.
        let _ = account.grant(
            "plan",
            terms.monthly_credits,
            default_priority("plan"),
            Some(next),
            now_ms,
        );
        if let Some(signup) = terms.signup_credits.filter(|c| !c.is_zero()) {
            let _ = account.grant("bonus", signup, default_priority("bonus"), None, now_ms);
        }
        account
    }

    /// Quota units used this cycle (settled and held), by quota.
    pub fn quota_use(&self) -> BTreeMap<String, u64> {
        let mut used = self.quota_used.clone();
        for q in self.holds.values().filter_map(|h| h.quota.as_ref()) {
            *used.entry(q.clone()).or_default() += 1;
        }
        used
    }

    /// Applies the monthly refill if a new cycle has begun: once, however many
    /// cycles passed (an account idle for three months gets one refill). A pending
    /// downgrade takes effect first; the old plan grant expires (nothing rolls
    /// over) and a new one of the plan's allowance is granted until the next refill.
    pub fn refill_if_due(&mut self, now_ms: Millis, catalog: &Catalog) {
        if now_ms < self.next_refill_ms {
            return;
        }
        if let Some(new_plan) = self.pending_plan.take() {
            let detail = format!("{} -> {}", self.plan, new_plan);
            self.plan = new_plan;
            self.record(
                now_ms,
                EntryKind::PlanChange,
                Credits::ZERO,
                None,
                None,
                Some(detail),
            );
        }
        let (start, next) = cycle_bounds(self.billing_anchor_day, now_ms);
        self.cycle_start_ms = start;
        self.next_refill_ms = next;
        self.quota_used.clear();
        // The old plan grant expired at the old boundary, which has passed.
        self.tick(now_ms);
        let allowance = catalog
            .get(&self.plan)
            .map_or(Credits::ZERO, |t| t.monthly_credits);
        if self
            .add_grant("plan", allowance, default_priority("plan"), Some(next))
            .is_ok()
        {
            self.record(
                now_ms,
                EntryKind::Refill,
                allowance,
                None,
                None,
                Some(self.plan.clone()),
            );
        }
        self.debug_check();
    }

    /// Switches plan. `Now` expires what is left of the plan grant and grants the
    /// new allowance for the rest of the cycle; `PeriodEnd` waits for the refill.
    pub fn change_plan(
        &mut self,
        new_plan: &str,
        effective: Effective,
        now_ms: Millis,
        catalog: &Catalog,
    ) -> Result<(), AccountRejected> {
        let terms = catalog.get(new_plan).ok_or(AccountRejected::UnknownPlan)?;
        self.refill_if_due(now_ms, catalog);
        let detail = format!("{} -> {new_plan}", self.plan);
        match effective {
            Effective::PeriodEnd => {
                self.pending_plan = Some(new_plan.to_string());
                self.record(
                    now_ms,
                    EntryKind::PlanChange,
                    Credits::ZERO,
                    None,
                    None,
                    Some(format!("{detail} at the next refill")),
                );
            }
            Effective::Now => {
                self.pending_plan = None;
                self.plan = new_plan.to_string();
                let mut expired = Vec::new();
                // Unless the new plan keeps it, the rest of the old allowance expires.
                let keep = terms.keep_unused_on_upgrade;
                for grant in self
                    .grants
                    .iter_mut()
                    .filter(|g| g.kind == "plan" && !g.expired && !keep)
                {
                    grant.expired = true;
                    self.expired = self.expired.checked_add(grant.left).unwrap_or(self.expired);
                    expired.push(grant.left);
                    grant.left = Credits::ZERO;
                }
                for left in expired {
                    self.record(
                        now_ms,
                        EntryKind::Expire,
                        left,
                        None,
                        None,
                        Some("plan".into()),
                    );
                }
                self.add_grant(
                    "plan",
                    terms.monthly_credits,
                    default_priority("plan"),
                    Some(self.next_refill_ms),
                )
                .map_err(|_| AccountRejected::GrantOverflow)?;
                self.record(
                    now_ms,
                    EntryKind::PlanChange,
                    terms.monthly_credits,
                    None,
                    None,
                    Some(detail),
                );
                self.prune_spent_grants();
            }
        }
        self.debug_check();
        Ok(())
    }

    /// Adds a member, within the plan's seats.
    pub fn add_member(
        &mut self,
        member: &str,
        premium_disabled: bool,
        catalog: &Catalog,
    ) -> Result<(), AccountRejected> {
        if self.members.contains_key(member) {
            return Err(AccountRejected::MemberExists);
        }
        let seats = catalog.get(&self.plan).map_or(1, |t| t.seats);
        if self.members.len() >= seats as usize {
            return Err(AccountRejected::SeatLimit { seats });
        }
        self.members
            .insert(member.to_string(), Member::new(premium_disabled));
        Ok(())
    }

    /// Lists a new active key of a member (the store keeps the key's lookup
    /// record beside). A member whose keys were never recorded stays unrecorded
    /// (see [`Member::keys`]).
    pub fn add_key(&mut self, member: &str, key_id: &str) -> Result<(), AccountRejected> {
        let m = self
            .members
            .get_mut(member)
            .ok_or(AccountRejected::UnknownMember)?;
        if let Some(keys) = &mut m.keys {
            if keys.len() >= KEYS_PER_MEMBER && !keys.contains(key_id) {
                return Err(AccountRejected::KeyLimit {
                    limit: KEYS_PER_MEMBER,
                });
            }
            keys.insert(key_id.to_string());
        }
        Ok(())
    }

    /// Takes a key off its member's active keys: no hold is placed on its behalf
    /// from now on. Returns whether it was listed.
    pub fn revoke_key(&mut self, member: &str, key_id: &str) -> bool {
        self.members
            .get_mut(member)
            .and_then(|m| m.keys.as_mut())
            .is_some_and(|keys| keys.remove(key_id))
    }

    /// Checks what the gateway decided against this state: the key is still
    /// active for a member that still exists, the plan has every feature the
    /// operation requires, and a premium operation is not disabled for the member.
    fn check_caller(&self, caller: &Caller, catalog: &Catalog) -> Result<(), HoldRejected> {
        let member = self
            .members
            .get(&caller.member)
            .ok_or(HoldRejected::KeyNotActive)?;
        // `None`: keys not recorded (an earlier version's state); the store's key
        // record alone decides, as it did then.
        if member
            .keys
            .as_ref()
            .is_some_and(|keys| !keys.contains(&caller.key_id))
        {
            return Err(HoldRejected::KeyNotActive);
        }
        let features = catalog
            .get(&self.plan)
            .map_or(&[][..], |t| t.features.as_slice());
        if let Some(missing) = caller.requires.iter().find(|f| !features.contains(f)) {
            return Err(HoldRejected::PlanRequired {
                feature: missing.clone(),
            });
        }
        if caller.premium && member.premium_disabled {
            return Err(HoldRejected::PremiumDisabled);
        }
        Ok(())
    }

    pub fn update_member(
        &mut self,
        member: &str,
        premium_disabled: bool,
    ) -> Result<(), AccountRejected> {
        let m = self
            .members
            .get_mut(member)
            .ok_or(AccountRejected::UnknownMember)?;
        m.premium_disabled = premium_disabled;
        Ok(())
    }

    /// An admin grant: a repeated `idempotency_key` returns the first grant's
    /// receipt and adds nothing.
    pub fn grant_once(
        &mut self,
        idempotency_key: &str,
        kind: &str,
        amount: Credits,
        priority: u32,
        expires_at_ms: Option<Millis>,
        now_ms: Millis,
    ) -> Result<(GrantReceipt, bool), AccountRejected> {
        if let Some(receipt) = self.grant_receipts.get(idempotency_key) {
            return Ok((receipt.clone(), false));
        }
        let grant_id = self
            .grant(kind, amount, priority, expires_at_ms, now_ms)
            .map_err(|_| AccountRejected::GrantOverflow)?;
        let receipt = GrantReceipt {
            grant_id,
            kind: kind.to_string(),
            credits: amount,
            priority,
            expires_at_ms,
            granted_at_ms: now_ms,
        };
        if self.grant_keys_in_order.len() >= GRANT_KEYS_REMEMBERED {
            if let Some(oldest) = self.grant_keys_in_order.pop_front() {
                self.grant_receipts.remove(&oldest);
            }
        }
        self.grant_keys_in_order
            .push_back(idempotency_key.to_string());
        self.grant_receipts
            .insert(idempotency_key.to_string(), receipt.clone());
        Ok((receipt, true))
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

    /// Adds a grant, with a `grant` ledger entry. A grant already past its expiry
    /// is added and expires at once, so it shows as granted and expired.
    pub fn grant(
        &mut self,
        kind: &str,
        amount: Credits,
        priority: u32,
        expires_at_ms: Option<Millis>,
        now_ms: Millis,
    ) -> Result<u64, GrantOverflow> {
        let id = self.add_grant(kind, amount, priority, expires_at_ms)?;
        self.record(
            now_ms,
            EntryKind::Grant,
            amount,
            None,
            None,
            Some(kind.to_string()),
        );
        self.tick(now_ms);
        Ok(id)
    }

    fn add_grant(
        &mut self,
        kind: &str,
        amount: Credits,
        priority: u32,
        expires_at_ms: Option<Millis>,
    ) -> Result<u64, GrantOverflow> {
        // Refusing here keeps every later sum of this account's amounts in range.
        let granted = self.granted.checked_add(amount).ok_or(GrantOverflow)?;
        if granted.millicredits() > u64::MAX / 4 {
            return Err(GrantOverflow);
        }
        self.granted = granted;
        let id = self.next_grant_id;
        self.next_grant_id += 1;
        let grant = Grant {
            id,
            kind: kind.to_string(),
            priority,
            expires_at_ms,
            granted: amount,
            left: amount,
            expired: false,
        };
        let at = self
            .grants
            .partition_point(|g| g.spend_key() <= grant.spend_key());
        self.grants.insert(at, grant);
        self.debug_check();
        Ok(id)
    }

    /// Applies time: grants past expiry lose what is left, holds past their TTL
    /// are released as `Expired`. Returns the holds that expired.
    pub fn tick(&mut self, now_ms: Millis) -> Vec<(Hold, HoldEnded)> {
        self.idempotency.prune(now_ms);
        let mut expired = Vec::new();
        for grant in &mut self.grants {
            if !grant.expired && grant.expires_at_ms.is_some_and(|at| at <= now_ms) {
                grant.expired = true;
                self.expired = self.expired.checked_add(grant.left).unwrap_or(self.expired);
                expired.push((
                    grant.expires_at_ms.unwrap_or(now_ms),
                    grant.left,
                    grant.kind.clone(),
                ));
                grant.left = Credits::ZERO;
            }
        }
        for (at, left, kind) in expired {
            self.record(at, EntryKind::Expire, left, None, None, Some(kind));
        }
        let due: Vec<u64> = self
            .holds
            .values()
            .filter(|h| h.expires_at_ms <= now_ms)
            .map(|h| h.id)
            .collect();
        let mut ended = Vec::with_capacity(due.len());
        for id in due {
            if let Some(hold) = self.holds.remove(&id) {
                let outcome = self.end(&hold, Credits::ZERO, Ending::Expired);
                self.record(
                    hold.expires_at_ms,
                    EntryKind::Expire,
                    outcome.returned,
                    Some(&hold.operation),
                    Some(&hold.request_id),
                    Some(HOLD_TTL_DETAIL.into()),
                );
                ended.push((hold, outcome));
            }
        }
        self.prune_spent_grants();
        self.debug_check();
        ended
    }

    /// Places a hold, drawing from grants in spend order, and one unit of its
    /// quota (within the plan's limit; a quota the plan does not name is unlimited).
    pub fn hold(
        &mut self,
        request: &HoldRequest,
        now_ms: Millis,
        catalog: &Catalog,
    ) -> Result<HoldPlaced, HoldRejected> {
        self.tick(now_ms);
        // Who asks comes first: a revoked key gets nothing, not even a replay.
        if let Some(caller) = &request.caller {
            self.check_caller(caller, catalog)?;
        }
        if let Some(idem) = &request.idempotency {
            match self.idempotency.check(idem) {
                Check::Proceed => {}
                Check::InProgress => return Err(HoldRejected::IdempotencyInProgress),
                Check::Reused => return Err(HoldRejected::IdempotencyKeyReused),
                Check::Replay(response) => {
                    let recording = response.is_none();
                    return Err(HoldRejected::Replay {
                        response,
                        recording,
                    });
                }
            }
        }
        if let Some(quota) = &request.quota {
            let limit = catalog
                .get(&self.plan)
                .and_then(|t| t.quotas.get(quota))
                .copied();
            if let Some(limit) = limit {
                if self.quota_use().get(quota).copied().unwrap_or(0) >= limit {
                    return Err(HoldRejected::QuotaExhausted {
                        quota: quota.clone(),
                        limit,
                    });
                }
            }
        }
        let available = self.available();
        if available < request.amount {
            return Err(HoldRejected::InsufficientCredits {
                required: request.amount,
                available,
                held: self.held(),
            });
        }
        if self.holds.len() >= request.max_holds {
            return Err(HoldRejected::TooManyHolds {
                limit: request.max_holds,
            });
        }
        let mut wanted = request.amount;
        let mut draws = Vec::new();
        for grant in &mut self.grants {
            if wanted.is_zero() {
                break;
            }
            let take = grant.left.min(wanted);
            if take.is_zero() {
                continue;
            }
            // `take <= grant.left` and `take <= wanted` by construction.
            grant.left = grant.left.saturating_sub(take);
            wanted = wanted.saturating_sub(take);
            draws.push(Draw {
                grant_id: grant.id,
                amount: take,
            });
        }
        let hold_id = self.next_hold_id;
        self.next_hold_id += 1;
        self.holds.insert(
            hold_id,
            Hold {
                id: hold_id,
                operation: request.operation.clone(),
                request_id: request.request_id.clone(),
                amount: request.amount,
                draws,
                expires_at_ms: now_ms.saturating_add(request.ttl_ms),
                quota: request.quota.clone(),
                idempotency_key: request.idempotency.as_ref().map(|i| i.key.clone()),
            },
        );
        if let Some(idem) = &request.idempotency {
            self.idempotency.start(idem, now_ms);
        }
        self.record(
            now_ms,
            EntryKind::Hold,
            request.amount,
            Some(&request.operation),
            Some(&request.request_id),
            None,
        );
        self.debug_check();
        Ok(HoldPlaced {
            hold_id,
            available: self.available(),
        })
    }

    /// Ends a hold charging `min(charge, held)`; the rest returns to its grants.
    pub fn settle(
        &mut self,
        hold_id: u64,
        charge: Credits,
        now_ms: Millis,
    ) -> Result<HoldEnded, EndRejected> {
        self.finish(hold_id, charge, Ending::Settled, now_ms)
    }

    /// Ends a hold charging nothing.
    pub fn release(&mut self, hold_id: u64, now_ms: Millis) -> Result<HoldEnded, EndRejected> {
        self.finish(hold_id, Credits::ZERO, Ending::Released, now_ms)
    }

    fn finish(
        &mut self,
        hold_id: u64,
        charge: Credits,
        ending: Ending,
        now_ms: Millis,
    ) -> Result<HoldEnded, EndRejected> {
        // Time first, so a hold past its TTL is `Expired` — never settled late.
        self.tick(now_ms);
        let Some(hold) = self.holds.remove(&hold_id) else {
            return Err(self
                .ended
                .iter()
                .find(|(id, _)| *id == hold_id)
                .map(|(_, e)| EndRejected::AlreadyEnded(*e))
                .unwrap_or(EndRejected::UnknownHold));
        };
        let outcome = self.end(&hold, charge, ending);
        let (kind, credits) = match ending {
            Ending::Settled => (EntryKind::Settle, outcome.charged),
            _ => (EntryKind::Release, outcome.returned),
        };
        self.record(
            now_ms,
            kind,
            credits,
            Some(&hold.operation),
            Some(&hold.request_id),
            None,
        );
        self.prune_spent_grants();
        self.debug_check();
        Ok(outcome)
    }

    /// Charges draws in spend order up to `charge` and returns the rest to the
    /// grants they came from. The hold has already been removed from `holds`.
    fn end(&mut self, hold: &Hold, charge: Credits, ending: Ending) -> HoldEnded {
        let mut to_charge = charge.min(hold.amount);
        let charged = to_charge;
        let mut returned = Credits::ZERO;
        for draw in &hold.draws {
            let charged_here = draw.amount.min(to_charge);
            to_charge = to_charge.saturating_sub(charged_here);
            let back = draw.amount.saturating_sub(charged_here);
            if back.is_zero() {
                continue;
            }
            returned = returned.checked_add(back).unwrap_or(returned);
            match self.grants.iter_mut().find(|g| g.id == draw.grant_id) {
                Some(grant) if !grant.expired => {
                    grant.left = grant.left.checked_add(back).unwrap_or(grant.left);
                }
                // The grant expired while its credits were held: they expire now.
                _ => self.expired = self.expired.checked_add(back).unwrap_or(self.expired),
            }
        }
        self.charged = self.charged.checked_add(charged).unwrap_or(self.charged);
        if let (Ending::Settled, Some(quota)) = (ending, &hold.quota) {
            *self.quota_used.entry(quota.clone()).or_default() += 1;
        }
        if let Some(key) = &hold.idempotency_key {
            match ending {
                Ending::Settled => self.idempotency.settled(key),
                // Released or expired: a retry runs anew.
                Ending::Released | Ending::Expired => self.idempotency.forget(key),
            }
        }
        if self.ended.len() == ENDED_HOLDS_REMEMBERED {
            self.ended.pop_front();
        }
        self.ended.push_back((hold.id, ending));
        HoldEnded {
            ending,
            charged,
            returned,
            available: self.available(),
        }
    }

    /// Drops grants that can never matter again: nothing left, and no open hold
    /// draws from them. Keeps the grant list bounded by what is live.
    fn prune_spent_grants(&mut self) {
        let holds = &self.holds;
        self.grants.retain(|g| {
            !g.left.is_zero()
                || holds
                    .values()
                    .any(|h| h.draws.iter().any(|d| d.grant_id == g.id))
        });
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

    fn debug_check(&self) {
        #[cfg(debug_assertions)]
        if let Err(broken) = self.check_invariant() {
            panic!("ledger invariant broken: {broken}");
        }
    }
}

#[cfg(test)]
mod tests;
