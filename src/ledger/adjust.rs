//! Adjustments: an admin's signed correction of an account — a refund adds
//! credits, a chargeback takes them away — made once per idempotency key.

use super::{
    default_priority, Account, AccountRejected, Catalog, Credits, EntryKind, GrantReceipt, Limits,
    Millis,
};

/// The grant kind (and ledger type) of an adjustment.
pub const ADJUST_KIND: &str = "adjust";

/// Longest reason an adjustment keeps on its ledger entry.
pub const REASON_MAX_BYTES: usize = 256;

/// A signed adjustment, made once per `idempotency_key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdjustRequest {
    pub idempotency_key: String,
    /// How much, and which way.
    pub credits: Credits,
    /// `true`: take `credits` away (a negative adjustment); `false`: add them.
    pub debit: bool,
    /// Why, kept on the ledger entry (`detail`).
    pub reason: String,
}

impl Account {
    /// Applies an adjustment once: a repeated `idempotency_key` returns the
    /// first receipt and changes nothing (another request under a kept key is
    /// `IdempotencyKeyReused`).
    ///
    /// Adding credits makes an `adjust` grant (which repays debt first, as every
    /// grant does). Taking them away debits what is available, in spend order,
    /// then goes into debt up to the plan's overdraft limit; an adjustment that
    /// would pass the limit is refused whole (`InsufficientCredits`) and changes
    /// nothing. What is debited counts as charged, so the invariant
    /// `granted + debt == available + held + charged + expired` holds. Credits
    /// held by open holds are never taken.
    pub fn adjust(
        &mut self,
        request: &AdjustRequest,
        now_ms: Millis,
        catalog: &Catalog,
        limits: &Limits,
    ) -> Result<(GrantReceipt, bool), AccountRejected> {
        if let Some(receipt) = self.receipt(&request.idempotency_key) {
            let same = receipt.kind == ADJUST_KIND
                && receipt.credits == request.credits
                && receipt.debit == request.debit;
            return match same {
                true => Ok((receipt.clone(), false)),
                false => Err(AccountRejected::IdempotencyKeyReused),
            };
        }
        let grant_id = self.apply_adjustment(
            request.credits,
            request.debit,
            &request.reason,
            now_ms,
            catalog,
        )?;
        let receipt = GrantReceipt {
            grant_id,
            kind: ADJUST_KIND.to_string(),
            credits: request.credits,
            priority: default_priority(ADJUST_KIND),
            expires_at_ms: None,
            granted_at_ms: now_ms,
            debit: request.debit,
            refunded: Credits::ZERO,
        };
        self.keep_receipt(&request.idempotency_key, receipt.clone(), limits);
        Ok((receipt, true))
    }

    /// The one way an adjustment changes an account, whoever asks (an admin's
    /// [`Account::adjust`], a payment's refund): adds an `adjust` grant or debits
    /// (available, then debt within the overdraft limit, or nothing at all), with
    /// its `adjust` ledger entry. Returns the grant's id (0 for a debit).
    pub(super) fn apply_adjustment(
        &mut self,
        credits: Credits,
        debit: bool,
        reason: &str,
        now_ms: Millis,
        catalog: &Catalog,
    ) -> Result<u64, AccountRejected> {
        let (grant_id, repaid) = if debit {
            self.debit(credits, catalog)?;
            (0, Credits::ZERO)
        } else {
            self.add_grant(ADJUST_KIND, credits, default_priority(ADJUST_KIND), None)
                .map_err(|_| AccountRejected::GrantOverflow)?
        };
        self.record(
            now_ms,
            EntryKind::Adjust,
            credits,
            None,
            None,
            Some(reason.to_string()),
        );
        self.note_repaid(repaid);
        self.note_debit(debit);
        self.prune_spent_grants();
        self.debug_check();
        Ok(grant_id)
    }

    /// Takes `credits` away: from what is available, then as debt within the
    /// plan's overdraft limit — or, past it, nothing at all.
    fn debit(&mut self, credits: Credits, catalog: &Catalog) -> Result<(), AccountRejected> {
        let available = self.available();
        let limit = catalog
            .get(&self.plan)
            .map_or(Credits::ZERO, |t| t.overdraft_limit);
        let room = limit.saturating_sub(self.debt);
        let into_debt = credits.saturating_sub(available);
        if into_debt > room {
            return Err(AccountRejected::InsufficientCredits {
                required: credits,
                available,
                overdraft_room: room,
            });
        }
        let taken = self.take_available(credits.min(available));
        let debt = credits.saturating_sub(taken);
        self.debt = super::account::plus(self.debt, debt);
        self.charged = super::account::plus(self.charged, debt);
        Ok(())
    }
}
