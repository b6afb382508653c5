//! `[plans.NAME]`: what each plan gives an account, as the ledger reads it.

use std::collections::BTreeMap;

use toml::Spanned;

use super::Validator;
use crate::ledger::{Catalog, Credits, PlanTerms, MAX_GRANTED};
use crate::policy::raw::RawPlan;
impl Validator<'_> {
    pub(super) fn plans(&mut self, raw: &BTreeMap<String, Spanned<RawPlan>>) -> Catalog {
        let mut out = Catalog::new();
        for (name, plan) in raw {
            let plan = plan.get_ref();
            let monthly_credits = self
                .amount(&plan.monthly_credits, "monthly_credits")
                .unwrap_or_default();
            let signup_credits = plan
                .signup_credits
                .as_ref()
                .and_then(|s| self.amount(s, "signup_credits"));
            let mut quotas = BTreeMap::new();
            for (quota, count) in &plan.quotas {
                match u64::try_from(*count.get_ref()) {
                    Ok(n) => {
                        quotas.insert(quota.clone(), n);
                    }
                    Err(_) => {
                        self.error(count.span(), format!("quota {quota} must not be negative"))
                    }
                }
            }
            let seats = match &plan.seats {
                None => 1,
                Some(s) => u32::try_from(*s.get_ref())
                    .ok()
                    .filter(|n| *n >= 1)
                    .unwrap_or_else(|| {
                        self.error(s.span(), "seats must be at least 1");
                        1
                    }),
            };
            let terms = PlanTerms {
                monthly_credits,
                features: plan.features.iter().map(|f| f.get_ref().clone()).collect(),
                quotas,
                seats,
                signup_credits,
                keep_unused_on_upgrade: plan.keep_unused_on_upgrade.unwrap_or(false),
                overdraft_limit: self.overdraft_limit(plan),
            };
            out.insert(name.clone(), terms);
        }
        out
    }

    /// How far into debt an account on the plan may go: an amount, kept far below
    /// what an account's sums can count (every sum of its amounts must fit).
    fn overdraft_limit(&mut self, plan: &RawPlan) -> Credits {
        let Some(written) = &plan.overdraft_limit else {
            return Credits::ZERO;
        };
        let limit = self.amount(written, "overdraft_limit").unwrap_or_default();
        if limit > MAX_GRANTED {
            self.error(
                written.span(),
                format!("overdraft_limit must be at most {MAX_GRANTED}"),
            );
            return Credits::ZERO;
        }
        limit
    }
}
