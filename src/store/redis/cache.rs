//! This replica's copies: of accounts (with what `identify` reads of them) and of
//! key owners. A copy is only ever a starting point: every write is checked against
//! Redis's version, so a stale copy costs a retry, never a wrong outcome.

use std::time::Instant;

use crate::ledger::{Account, Millis};

/// This replica's copy of one account.
pub(super) struct Cached {
    pub(super) version: String,
    /// `None` while a transition of this replica has the account out (it works on
    /// it in place instead of on a copy, and puts it back), or after one failed.
    pub(super) account: Option<Account>,
    /// What `identify` reads, kept beside the account so it can be read while a
    /// transition has the account out.
    pub(super) standing: Standing,
    pub(super) fetched: Instant,
}

/// An account's plan (and the one waiting for its next refill) and the members
/// with premium switched off.
pub(super) struct Standing {
    pub(super) plan: String,
    pub(super) pending_plan: Option<String>,
    pub(super) next_refill_ms: Millis,
    pub(super) premium_disabled: Vec<String>,
    /// Members with other features disabled, and those features.
    pub(super) features_disabled: Vec<(String, Vec<String>)>,
}

impl Standing {
    pub(super) fn of(account: &Account) -> Self {
        Standing {
            plan: account.plan.clone(),
            pending_plan: account.pending_plan.clone(),
            next_refill_ms: account.next_refill_ms,
            premium_disabled: Self::disabled(account).cloned().collect(),
            features_disabled: Self::locked(account).collect(),
        }
    }

    fn locked(account: &Account) -> impl Iterator<Item = (String, Vec<String>)> + '_ {
        account
            .members
            .iter()
            .filter(|(_, m)| !m.disabled_features.is_empty())
            .map(|(name, m)| (name.clone(), m.disabled_features.clone()))
    }

    pub(super) fn features_disabled(&self, member: &str) -> Vec<String> {
        self.features_disabled
            .iter()
            .find(|(m, _)| m == member)
            .map(|(_, f)| f.clone())
            .unwrap_or_default()
    }

    /// The plan in force at `now_ms` (the ledger's rule, as the memory store reads it).
    pub(super) fn plan_at(&self, now_ms: Millis) -> &str {
        crate::ledger::plan_in_force(
            &self.plan,
            self.pending_plan.as_deref(),
            self.next_refill_ms,
            now_ms,
        )
    }

    pub(super) fn disabled(account: &Account) -> impl Iterator<Item = &String> {
        account
            .members
            .iter()
            .filter(|(_, m)| m.premium_disabled)
            .map(|(name, _)| name)
    }

    /// Brought up to date with `account`, allocating only for what changed.
    pub(super) fn update(&mut self, account: &Account) {
        if self.plan != account.plan {
            self.plan.clone_from(&account.plan);
        }
        if self.pending_plan != account.pending_plan {
            self.pending_plan.clone_from(&account.pending_plan);
        }
        self.next_refill_ms = account.next_refill_ms;
        if !Self::disabled(account).eq(self.premium_disabled.iter()) {
            self.premium_disabled = Self::disabled(account).cloned().collect();
        }
        if !Self::locked(account).eq(self.features_disabled.iter().cloned()) {
            self.features_disabled = Self::locked(account).collect();
        }
    }

    pub(super) fn premium_disabled(&self, member: &str) -> bool {
        self.premium_disabled.iter().any(|m| m == member)
    }
}

#[derive(Clone)]
pub(super) struct KeyOwner {
    pub(super) account: String,
    pub(super) member: String,
    pub(super) key_id: String,
    pub(super) fetched: Instant,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Catalog, PlanTerms};

    #[test]
    pub(super) fn the_standing_identify_reads_follows_the_account() {
        let mut account = Account::new("team", "free");
        let catalog = Catalog::from([(
            "free".to_string(),
            PlanTerms {
                seats: 5,
                ..PlanTerms::default()
            },
        )]);
        account.add_member("ann", false, &catalog).unwrap();
        account.add_member("bob", false, &catalog).unwrap();
        let mut standing = Standing::of(&account);
        assert_eq!(standing.plan, "free");
        assert!(!standing.premium_disabled("bob"));

        account.update_member("bob", true).unwrap();
        account.plan = "pro".into();
        standing.update(&account);
        assert_eq!(standing.plan, "pro");
        assert!(standing.premium_disabled("bob"));
        assert!(!standing.premium_disabled("ann"));

        account.update_member("bob", false).unwrap();
        standing.update(&account);
        assert!(!standing.premium_disabled("bob"));
    }
}
