//! Money: grants in spend order, holds drawn from them, and how a hold ends
//! (settled, released or expired) — the only code that moves credits.

use serde::{Deserialize, Serialize};

use super::account::{plus, MAX_GRANTED};
use super::{
    Account, AccountRejected, Caller, Catalog, Credits, EntryKind, GrantOverflow, HoldPlaced,
    HoldRejected, IdempotencyRequest, Limits, Millis, HOLD_TTL_DETAIL,
};

/// How many ended holds an account remembers, so that a late second settle or
/// release is answered `AlreadyEnded` rather than `UnknownHold`.
pub(super) const ENDED_HOLDS_REMEMBERED: usize = 64;

/// An admin grant, made once per idempotency key.
#[derive(Clone, Debug)]
pub struct GrantRequest {
    pub idempotency_key: String,
    pub kind: String,
    pub credits: Credits,
    pub priority: u32,
    pub expires_at_ms: Option<Millis>,
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
    /// A negative adjustment: `credits` were debited, no grant was made
    /// (`grant_id` 0).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub debit: bool,
    /// Of a paid grant: what refunds of its payment have debited so far (never
    /// more than `credits`).
    #[serde(default, skip_serializing_if = "Credits::is_zero_ref")]
    pub refunded: Credits,
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
    /// What open holds have drawn from it and not yet given back or charged.
    #[serde(default)]
    pub drawn: Credits,
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
    /// Units of `quota` the hold uses (1 unless the operation counts them from
    /// the request).
    #[serde(default = "one_unit")]
    pub quota_units: u64,
    /// Set when the settle may charge above the hold (`over_hold = "overdraft"`):
    /// the plan's overdraft limit when the hold was placed, which bounds the
    /// account's debt at the settle — a request keeps the terms it was admitted on.
    #[serde(default)]
    pub overdraft_limit: Option<Credits>,
    /// Who placed it: the member and the key id (`None` for holds placed on no
    /// key's behalf). The member's limit counts the hold while it is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

fn one_unit() -> u64 {
    1
}

/// What the operation's rules say of a hold beyond its amount: how it may be
/// sized, how far its settle may go, how many quota units it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldTerms {
    /// `hold = "available"`: when the account cannot pay the whole amount, hold
    /// what is available if that is at least this much (`min_hold`). `None`: the
    /// whole amount or nothing.
    pub partial_min: Option<Credits>,
    /// `over_hold = "overdraft"`: the settle may charge above the hold — from
    /// what is available, then as debt up to the plan's `overdraft_limit`.
    pub overdraft: bool,
    /// Units of the request's quota the hold uses.
    pub quota_units: u64,
}

impl Default for HoldTerms {
    /// The whole amount or nothing, never a charge above it, one quota unit.
    fn default() -> Self {
        HoldTerms {
            partial_min: None,
            overdraft: false,
            quota_units: 1,
        }
    }
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
    /// Units of this plan quota are held too (`terms.quota_units` of them).
    pub quota: Option<String>,
    /// How the hold may be sized and how far its settle may go.
    pub terms: HoldTerms,
    /// The request's `Idempotency-Key`, if it sent one.
    pub idempotency: Option<IdempotencyRequest>,
    /// Whose key asks, and what the gateway decided it may do; re-checked against
    /// the account's state. `None` only for holds placed on no key's behalf (the
    /// ledger's and stores' own tests, the benches).
    pub caller: Option<Caller>,
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
    /// Everything charged: from the hold, and for an overdraft settle above it,
    /// from what was available and as debt.
    pub charged: Credits,
    /// Of `charged`, what became debt.
    pub debt: Credits,
    /// What an overdraft settle could not charge: past the overdraft limit.
    pub uncollected: Credits,
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

impl Account {
    /// An admin grant: a repeated `idempotency_key` returns the first grant's
    /// receipt and adds nothing. The account keeps the newest
    /// `grant_receipts_kept` receipts; a key older than those grants again.
    pub fn grant_once(
        &mut self,
        request: &GrantRequest,
        now_ms: Millis,
        limits: &Limits,
    ) -> Result<(GrantReceipt, bool), AccountRejected> {
        let key = request.idempotency_key.as_str();
        if let Some(receipt) = self.grant_receipts.get(key) {
            return Ok((receipt.clone(), false));
        }
        let grant_id = self
            .grant(
                &request.kind,
                request.credits,
                request.priority,
                request.expires_at_ms,
                now_ms,
            )
            .map_err(|_| AccountRejected::GrantOverflow)?;
        let receipt = GrantReceipt {
            grant_id,
            kind: request.kind.clone(),
            credits: request.credits,
            priority: request.priority,
            expires_at_ms: request.expires_at_ms,
            granted_at_ms: now_ms,
            debit: false,
            refunded: Credits::ZERO,
        };
        self.keep_receipt(key, receipt.clone(), limits);
        Ok((receipt, true))
    }

    /// Keeps the receipt of an idempotent admin change, among the newest
    /// `grant_receipts_kept`.
    pub(super) fn keep_receipt(&mut self, key: &str, receipt: GrantReceipt, limits: &Limits) {
        self.grant_keys_in_order.push_back(key.to_string());
        self.grant_receipts.insert(key.to_string(), receipt);
        while self.grant_keys_in_order.len() > limits.grant_receipts_kept {
            if let Some(oldest) = self.grant_keys_in_order.pop_front() {
                self.grant_receipts.remove(&oldest);
            }
        }
    }

    /// The receipt kept for an admin change's idempotency key, if any.
    pub(super) fn receipt(&self, key: &str) -> Option<&GrantReceipt> {
        self.grant_receipts.get(key)
    }

    /// Adds a grant, with a `grant` ledger entry. A grant already past its expiry
    /// is added and expires at once, so it shows as granted and expired. A grant
    /// to an account in debt repays the debt first (the entry says how much).
    pub fn grant(
        &mut self,
        kind: &str,
        amount: Credits,
        priority: u32,
        expires_at_ms: Option<Millis>,
        now_ms: Millis,
    ) -> Result<u64, GrantOverflow> {
        let (id, repaid) = self.add_grant(kind, amount, priority, expires_at_ms)?;
        self.record(
            now_ms,
            EntryKind::Grant,
            amount,
            None,
            None,
            Some(kind.to_string()),
        );
        self.note_repaid(repaid);
        self.tick(now_ms);
        Ok(id)
    }

    /// Adds a grant; returns its id and how much of it repaid debt. Debt is repaid
    /// first, from whatever grant comes next (a top-up, a bonus, the refill's plan
    /// grant): what the grant repays is never available.
    pub(super) fn add_grant(
        &mut self,
        kind: &str,
        amount: Credits,
        priority: u32,
        expires_at_ms: Option<Millis>,
    ) -> Result<(u64, Credits), GrantOverflow> {
        // Refusing here keeps every later sum of this account's amounts in range.
        let granted = self.granted.checked_add(amount).ok_or(GrantOverflow)?;
        if granted > MAX_GRANTED {
            return Err(GrantOverflow);
        }
        self.granted = granted;
        let repaid = self.debt.min(amount);
        self.debt = self.debt.saturating_sub(repaid);
        let id = self.next_grant_id;
        self.next_grant_id += 1;
        let grant = Grant {
            id,
            kind: kind.to_string(),
            priority,
            expires_at_ms,
            granted: amount,
            left: amount.saturating_sub(repaid),
            drawn: Credits::ZERO,
            expired: false,
        };
        let at = self
            .grants
            .partition_point(|g| g.spend_key() <= grant.spend_key());
        self.grants.insert(at, grant);
        self.debug_check();
        Ok((id, repaid))
    }

    /// Applies time: grants past expiry lose what is left, holds past their TTL
    /// are released as `Expired`. Returns the holds that expired.
    pub fn tick(&mut self, now_ms: Millis) -> Vec<(Hold, HoldEnded)> {
        self.idempotency.prune(now_ms);
        let mut expired = Vec::new();
        for grant in &mut self.grants {
            if !grant.expired && grant.expires_at_ms.is_some_and(|at| at <= now_ms) {
                grant.expired = true;
                self.expired = plus(self.expired, grant.left);
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
                self.note_caller(hold.member.as_deref(), hold.key_id.as_deref());
                ended.push((hold, outcome));
            }
        }
        self.prune_spent_grants();
        self.debug_check();
        ended
    }

    /// Places a hold, drawing from grants in spend order, and its units of its
    /// quota (within the plan's limit; a quota the plan does not name is
    /// unlimited). The amount held is what [`Account::admit`] says: the request's
    /// amount, or under `hold = "available"` what is available.
    pub fn hold(
        &mut self,
        request: &HoldRequest,
        now_ms: Millis,
        catalog: &Catalog,
    ) -> Result<HoldPlaced, HoldRejected> {
        self.tick(now_ms);
        let amount = self.admit(request, catalog)?;
        let draws = self.draw(amount);
        let hold_id = self.next_hold_id;
        self.next_hold_id += 1;
        self.held = plus(self.held, amount);
        self.open_holds += 1;
        if let Some(m) = request
            .caller
            .as_ref()
            .and_then(|c| self.members.get_mut(&c.member))
        {
            m.held = plus(m.held, amount);
        }
        let quota_units = request.terms.quota_units;
        if let Some(quota) = &request.quota {
            *self.quota_held.entry(quota.clone()).or_default() += quota_units;
        }
        if self.partial {
            self.hold_changes.placed.push(hold_id);
        }
        let overdraft_limit = request.terms.overdraft.then(|| {
            catalog
                .get(&self.plan)
                .map_or(Credits::ZERO, |terms| terms.overdraft_limit)
        });
        self.holds.insert(
            hold_id,
            Hold {
                id: hold_id,
                operation: request.operation.clone(),
                request_id: request.request_id.clone(),
                amount,
                draws,
                expires_at_ms: now_ms.saturating_add(request.ttl_ms),
                quota: request.quota.clone(),
                idempotency_key: request.idempotency.as_ref().map(|i| i.key.clone()),
                quota_units,
                overdraft_limit,
                member: request.caller.as_ref().map(|c| c.member.clone()),
                key_id: request.caller.as_ref().map(|c| c.key_id.clone()),
            },
        );
        if let Some(idem) = &request.idempotency {
            self.idempotency.start(idem, now_ms);
        }
        self.record(
            now_ms,
            EntryKind::Hold,
            amount,
            Some(&request.operation),
            Some(&request.request_id),
            None,
        );
        let caller = request.caller.as_ref();
        self.note_caller(
            caller.map(|c| c.member.as_str()),
            caller.map(|c| c.key_id.as_str()),
        );
        self.debug_check();
        Ok(HoldPlaced {
            hold_id,
            held: amount,
            available: self.available(),
        })
    }

    /// Draws `wanted` from what grants have left, in spend order, for a hold.
    /// The caller has checked that enough is available.
    fn draw(&mut self, mut wanted: Credits) -> Vec<Draw> {
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
            grant.drawn = plus(grant.drawn, take);
            wanted = wanted.saturating_sub(take);
            draws.push(Draw {
                grant_id: grant.id,
                amount: take,
            });
        }
        draws
    }

    /// Charges up to `wanted` straight from what grants have left, in spend order
    /// (an overdraft settle's part above its hold); returns what it took.
    pub(super) fn take_available(&mut self, wanted: Credits) -> Credits {
        let mut taken = Credits::ZERO;
        for grant in &mut self.grants {
            let take = grant.left.min(wanted.saturating_sub(taken));
            grant.left = grant.left.saturating_sub(take);
            taken = plus(taken, take);
        }
        self.charged = plus(self.charged, taken);
        taken
    }

    /// Ends a hold charging `min(charge, held)`; the rest returns to its grants.
    /// A hold placed with `overdraft` may charge more: what is above the hold is
    /// taken from what is available, then becomes debt up to the overdraft limit
    /// the hold carries; the rest is `uncollected` (in the outcome and the ledger
    /// entry), never charged. Its idempotency record, if any, is kept among the newest
    /// `idempotency_records_kept` settled ones.
    pub fn settle(
        &mut self,
        hold_id: u64,
        charge: Credits,
        now_ms: Millis,
        limits: &Limits,
    ) -> Result<HoldEnded, EndRejected> {
        self.settle_metered(hold_id, charge, None, now_ms, limits)
    }

    /// [`Account::settle`], noting on its ledger entry the `usage` the charge was
    /// metered from (JSON text; see [`Entry::usage`](super::Entry::usage)).
    pub fn settle_metered(
        &mut self,
        hold_id: u64,
        charge: Credits,
        usage: Option<&str>,
        now_ms: Millis,
        limits: &Limits,
    ) -> Result<HoldEnded, EndRejected> {
        let ended = self.finish(hold_id, charge, Ending::Settled, now_ms)?;
        self.note_usage(usage);
        self.idempotency
            .keep_settled(limits.idempotency_records_kept);
        Ok(ended)
    }

    /// Ends a hold charging nothing.
    pub fn release(&mut self, hold_id: u64, now_ms: Millis) -> Result<HoldEnded, EndRejected> {
        self.finish(hold_id, Credits::ZERO, Ending::Released, now_ms)
    }

    pub(super) fn finish(
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
        self.note_uncollected(outcome.uncollected);
        self.note_caller(hold.member.as_deref(), hold.key_id.as_deref());
        self.prune_spent_grants();
        self.debug_check();
        Ok(outcome)
    }

    /// Charges draws in spend order up to `charge` and returns the rest to the
    /// grants they came from; a settled overdraft hold charges what is above it
    /// too (see [`Account::settle`]). The hold has already been removed from `holds`.
    pub(super) fn end(&mut self, hold: &Hold, charge: Credits, ending: Ending) -> HoldEnded {
        let mut to_charge = charge.min(hold.amount);
        let charged = to_charge;
        let mut returned = Credits::ZERO;
        for draw in &hold.draws {
            let charged_here = draw.amount.min(to_charge);
            to_charge = to_charge.saturating_sub(charged_here);
            let back = draw.amount.saturating_sub(charged_here);
            returned = plus(returned, back);
            // A grant something is drawn from is never pruned, so it is found.
            match self.grants.iter_mut().find(|g| g.id == draw.grant_id) {
                Some(grant) => {
                    grant.drawn = grant.drawn.saturating_sub(draw.amount);
                    if grant.expired {
                        // The grant expired while its credits were held: they expire now.
                        self.expired = plus(self.expired, back);
                    } else {
                        grant.left = plus(grant.left, back);
                    }
                }
                None => self.expired = plus(self.expired, back),
            }
        }
        self.charged = plus(self.charged, charged);
        self.held = self.held.saturating_sub(hold.amount);
        let (mut charged, mut debt, mut uncollected) = (charged, Credits::ZERO, Credits::ZERO);
        if let (Ending::Settled, Some(limit)) = (ending, hold.overdraft_limit) {
            let above = charge.saturating_sub(hold.amount);
            let taken = self.take_available(above);
            let rest = above.saturating_sub(taken);
            // The debt stays within the limit; a lower limit since leaves it as it is.
            debt = rest.min(limit.saturating_sub(self.debt));
            self.debt = plus(self.debt, debt);
            self.charged = plus(self.charged, debt);
            charged = plus(plus(charged, taken), debt);
            uncollected = rest.saturating_sub(debt);
        }
        self.open_holds = self.open_holds.saturating_sub(1);
        // A member removed since has nothing left to count.
        if let Some(m) = hold.member.as_ref().and_then(|m| self.members.get_mut(m)) {
            m.held = m.held.saturating_sub(hold.amount);
            if ending == Ending::Settled {
                m.used = plus(m.used, charged);
            }
        }
        if let Some(quota) = &hold.quota {
            if let Some(n) = self.quota_held.get_mut(quota) {
                *n = n.saturating_sub(hold.quota_units);
                if *n == 0 {
                    self.quota_held.remove(quota);
                }
            }
            if ending == Ending::Settled {
                *self.quota_used.entry(quota.clone()).or_default() += hold.quota_units;
            }
        }
        if self.partial {
            // Placed and ended before the store took the changes: it never saw it.
            match self
                .hold_changes
                .placed
                .iter()
                .position(|&id| id == hold.id)
            {
                Some(at) => {
                    self.hold_changes.placed.swap_remove(at);
                }
                None => self.hold_changes.ended.push(hold.id),
            }
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
            debt,
            uncollected,
            returned,
            available: self.available(),
        }
    }

    /// Drops grants that can never matter again: nothing left, and nothing drawn
    /// by an open hold. Keeps the grant list bounded by what is live.
    pub(super) fn prune_spent_grants(&mut self) {
        self.grants
            .retain(|g| !g.left.is_zero() || !g.drawn.is_zero());
    }
}
