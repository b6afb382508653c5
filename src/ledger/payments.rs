//! Payments from a payment provider (Stripe): what a paid checkout or invoice does
//! to an account, decided here once for every store.
//!
//! A payment is idempotent: a grant on its key (the payment's own id, e.g. the
//! Stripe payment intent) through the admin grants' receipts, and a plan change
//! by being the plan already. Every ledger entry it writes carries its reference
//! (the provider's event id) as the entry's `request_id`.
//!
//! A refund takes back what its payment's grant granted, in proportion to the
//! amount refunded, through the adjustments' own path (so debt and the overdraft
//! limit are as for an admin's negative adjustment). The grant's receipt keeps what
//! refunds have debited, so a refund in parts debits only the difference and a
//! redelivered one debits nothing.

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
    /// A refund of the payment whose grant was made under `key`: of `amount`
    /// paid (in the currency's smallest unit), `amount_refunded` is refunded in
    /// all so far (a running total, as Stripe sends it).
    Refund {
        key: String,
        amount: u64,
        amount_refunded: u64,
    },
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
    /// A refund debited `credits` now (a negative adjustment); `refunded` is what
    /// the payment's refunds have debited in all, `granted` what its grant granted.
    Refunded {
        credits: Credits,
        refunded: Credits,
        granted: Credits,
    },
    /// The refund's total was debited already (a redelivery, or an older event
    /// arriving after a newer one): nothing changed.
    AlreadyRefunded { refunded: Credits, granted: Credits },
    /// No grant of this account was made under the refund's key (not a payment
    /// creditgate granted, or one older than the receipts kept): nothing changed.
    UnknownPayment,
}

/// The credits a refund of `amount_refunded` out of `amount` takes back from a
/// grant of `granted`: proportional, rounded down, so that refunds in parts never
/// take more than was granted; a full refund takes exactly what was granted.
pub fn refunded_credits(granted: Credits, amount: u64, amount_refunded: u64) -> Credits {
    if amount == 0 || amount_refunded >= amount {
        return granted;
    }
    let share =
        u128::from(granted.millicredits()) * u128::from(amount_refunded) / u128::from(amount);
    // `share` < `granted` because `amount_refunded` < `amount`.
    Credits::from_millicredits(u64::try_from(share).unwrap_or(granted.millicredits()))
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
            PaymentAction::Refund {
                key,
                amount,
                amount_refunded,
            } => {
                let Some(receipt) = self.receipt(key).filter(|r| !r.debit) else {
                    return Ok(Paid::UnknownPayment);
                };
                let granted = receipt.credits;
                let before = receipt.refunded;
                let total = refunded_credits(granted, *amount, *amount_refunded);
                let now = total.saturating_sub(before);
                if now.is_zero() {
                    return Ok(Paid::AlreadyRefunded {
                        refunded: before,
                        granted,
                    });
                }
                let written = self.fresh.len();
                let reason = format!("refund of {key}");
                self.apply_adjustment(now, true, &reason, now_ms, catalog)?;
                self.note_reference(written, &payment.reference);
                if let Some(receipt) = self.grant_receipts.get_mut(key) {
                    receipt.refunded = total;
                }
                Ok(Paid::Refunded {
                    credits: now,
                    refunded: total,
                    granted,
                })
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
