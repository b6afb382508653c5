//! Payments from a payment provider (Stripe): what a paid checkout or invoice does
//! to an account, decided here once for every store.
//!
//! A payment is idempotent: a grant on its key (the payment's own id, e.g. the
//! Stripe payment intent) through the admin grants' receipts, and a plan change
//! by being the plan already. Every ledger entry it writes carries its reference
//! (the provider's event id) as the entry's `request_id`.

use super::{Account, AccountRejected, Catalog, Credits, Effective, GrantReceipt, GrantRequest};
use super::{Limits, Millis};

/// What a payment buys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PaymentAction {
    /// A grant, made once per `key`.
    Grant {
        key: String,
        kind: String,
        credits: Credits,
        priority: u32,
    },
    /// The plan, effective now unless the account is on it already.
    Plan { plan: String },
}

/// One payment applied to one account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    /// Written on the ledger entries it causes (a provider's event id).
    pub reference: String,
    pub action: PaymentAction,
}

/// What a payment did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Paid {
    /// The grant (`created`: false when its key had been paid before).
    Granted {
        receipt: GrantReceipt,
        created: bool,
    },
    /// The account moved to the plan now.
    PlanChanged,
    /// The account was on the plan already: nothing changed.
    PlanKept,
}

impl Account {
    pub fn pay(
        &mut self,
        payment: &Payment,
        now_ms: Millis,
        catalog: &Catalog,
        limits: &Limits,
    ) -> Result<Paid, AccountRejected> {
        match &payment.action {
            PaymentAction::Grant {
                key,
                kind,
                credits,
                priority,
            } => {
                let request = GrantRequest {
                    idempotency_key: key.clone(),
                    kind: kind.clone(),
                    credits: *credits,
                    priority: *priority,
                    expires_at_ms: None,
                };
                let written = self.fresh.len();
                let (receipt, created) = self.grant_once(&request, now_ms, limits)?;
                self.note_reference(written, &payment.reference);
                Ok(Paid::Granted { receipt, created })
            }
            PaymentAction::Plan { plan } => {
                self.refill_if_due(now_ms, catalog);
                if self.plan == *plan && self.pending_plan.is_none() {
                    return Ok(Paid::PlanKept);
                }
                let written = self.fresh.len();
                self.change_plan(plan, Effective::Now, now_ms, catalog)?;
                self.note_reference(written, &payment.reference);
                Ok(Paid::PlanChanged)
            }
        }
    }

    /// Writes `reference` on the entries recorded since there were `written`.
    fn note_reference(&mut self, written: usize, reference: &str) {
        for entry in self.fresh.iter_mut().skip(written) {
            if entry.request_id.is_none() {
                entry.request_id = Some(reference.to_string());
            }
        }
    }
}
