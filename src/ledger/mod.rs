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

mod credits;

pub use credits::{Credits, ParseCreditsError};

use std::collections::{BTreeMap, VecDeque};

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
const ENDED_HOLDS_REMEMBERED: usize = 256;

/// A lot of credits added to an account.
#[derive(Clone, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draw {
    pub grant_id: u64,
    pub amount: Credits,
}

/// Credits reserved for one in-flight request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub id: u64,
    pub operation: String,
    pub request_id: String,
    pub amount: Credits,
    pub draws: Vec<Draw>,
    pub expires_at_ms: Millis,
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
}

/// A hold that was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldPlaced {
    pub hold_id: u64,
    /// Available credits after the hold.
    pub available: Credits,
}

/// Why a hold was not placed. Outcomes, not failures: the gateway answers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldRejected {
    InsufficientCredits {
        required: Credits,
        available: Credits,
        held: Credits,
    },
    TooManyHolds {
        limit: usize,
    },
}

/// How a hold ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// One wallet: its grants and open holds.
#[derive(Clone, Debug)]
pub struct Account {
    pub id: String,
    pub plan: String,
    /// Kept sorted in spend order.
    grants: Vec<Grant>,
    holds: BTreeMap<u64, Hold>,
    granted: Credits,
    charged: Credits,
    expired: Credits,
    next_grant_id: u64,
    next_hold_id: u64,
    ended: VecDeque<(u64, Ending)>,
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

impl Account {
    pub fn new(id: impl Into<String>, plan: impl Into<String>) -> Self {
        Account {
            id: id.into(),
            plan: plan.into(),
            grants: Vec::new(),
            holds: BTreeMap::new(),
            granted: Credits::ZERO,
            charged: Credits::ZERO,
            expired: Credits::ZERO,
            next_grant_id: 1,
            next_hold_id: 1,
            ended: VecDeque::new(),
        }
    }

    pub fn grants(&self) -> &[Grant] {
        &self.grants
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

    /// Adds a grant. A grant already past its expiry is added and expires at once,
    /// so it shows in the totals as granted and expired.
    pub fn grant(
        &mut self,
        kind: &str,
        amount: Credits,
        priority: u32,
        expires_at_ms: Option<Millis>,
        now_ms: Millis,
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
        self.tick(now_ms);
        self.debug_check();
        Ok(id)
    }

    /// Applies time: grants past expiry lose what is left, holds past their TTL
    /// are released as `Expired`. Returns the holds that expired.
    pub fn tick(&mut self, now_ms: Millis) -> Vec<(Hold, HoldEnded)> {
        for grant in &mut self.grants {
            if !grant.expired && grant.expires_at_ms.is_some_and(|at| at <= now_ms) {
                grant.expired = true;
                self.expired = self.expired.checked_add(grant.left).unwrap_or(self.expired);
                grant.left = Credits::ZERO;
            }
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
                ended.push((hold, outcome));
            }
        }
        self.prune_spent_grants();
        self.debug_check();
        ended
    }

    /// Places a hold, drawing from grants in spend order.
    pub fn hold(
        &mut self,
        request: &HoldRequest,
        now_ms: Millis,
    ) -> Result<HoldPlaced, HoldRejected> {
        self.tick(now_ms);
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
            },
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
        if self.ended.len() == ENDED_HOLDS_REMEMBERED {
            self.ended.pop_front();
        }
        self.ended.push_back((hold.id, ending));
        HoldEnded {
            ending,
            charged,
            returned,
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
