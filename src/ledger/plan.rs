//! Plans and billing cycles: opening an account, the monthly refill, plan changes.

use std::collections::BTreeMap;

use super::account::plus;
use super::{
    cycle_bounds, day_of_month, default_priority, Account, AccountRejected, Credits, EntryKind,
    Hold, HoldEnded, Millis,
};

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
    /// How far below zero a settle of an `over_hold = "overdraft"` operation may
    /// take the account, as debt (0: not at all).
    pub overdraft_limit: Credits,
}

/// Every plan by name.
pub type Catalog = BTreeMap<String, PlanTerms>;

/// When a plan change takes effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effective {
    /// Now: the plan grant is set to the new allowance (an upgrade).
    Now,
    /// At the next refill (a downgrade).
    PeriodEnd,
}

/// The plan an account is on at `now_ms`, from its plan, the plan waiting for the
/// next refill and when that refill is due: the waiting plan once the refill is
/// due, even before a transition applies it. Readers that change nothing (who a
/// key is) ask this, so that every store names the same plan at the same moment.
pub fn plan_in_force<'a>(
    plan: &'a str,
    pending_plan: Option<&'a str>,
    next_refill_ms: Millis,
    now_ms: Millis,
) -> &'a str {
    match pending_plan {
        Some(pending) if now_ms >= next_refill_ms => pending,
        _ => plan,
    }
}

impl Account {
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
        for (quota, held) in &self.quota_held {
            *used.entry(quota.clone()).or_default() += held;
        }
        used
    }

    /// Applies time, as every store does before every transition and read: a due
    /// refill (and the plan change waiting for it), then expired grants and holds
    /// past their TTL. Returns the holds that expired.
    pub fn apply_time(&mut self, now_ms: Millis, catalog: &Catalog) -> Vec<(Hold, HoldEnded)> {
        self.refill_if_due(now_ms, catalog);
        self.tick(now_ms)
    }

    /// The plan in force at `now_ms`, for a reader that does not apply time: see
    /// [`plan_in_force`].
    pub fn plan_at(&self, now_ms: Millis) -> &str {
        plan_in_force(
            &self.plan,
            self.pending_plan.as_deref(),
            self.next_refill_ms,
            now_ms,
        )
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
        self.reset_member_use();
        // The old plan grant expired at the old boundary, which has passed.
        self.tick(now_ms);
        let allowance = catalog
            .get(&self.plan)
            .map_or(Credits::ZERO, |t| t.monthly_credits);
        if let Ok((_, repaid)) =
            self.add_grant("plan", allowance, default_priority("plan"), Some(next))
        {
            self.record(
                now_ms,
                EntryKind::Refill,
                allowance,
                None,
                None,
                Some(self.plan.clone()),
            );
            self.note_repaid(repaid);
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
                    self.expired = plus(self.expired, grant.left);
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
                let (_, repaid) = self
                    .add_grant(
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
                self.note_repaid(repaid);
                self.prune_spent_grants();
            }
        }
        self.debug_check();
        Ok(())
    }
}
