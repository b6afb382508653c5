//! `HoldGuard`: a hold that ends exactly once.
//!
//! The gateway ends holds in `logging`, which Pingora runs once per request — but
//! not after a panic in a hook, nor for requests cut off at shutdown. The guard's
//! `Drop` is the backstop: a hold nobody ended is released in a background task
//! (and if even that cannot run, the store expires it after `hold_ttl`).

use std::sync::Arc;

use crate::ledger::{Credits, EndRejected};
use crate::store::{EndOutcome, Store, StoreError};

use crate::clock::Clock;
use crate::metrics::Metrics;

pub(super) struct HoldGuard {
    store: Arc<dyn Store>,
    clock: Clock,
    metrics: Arc<Metrics>,
    account: String,
    hold_id: u64,
    ended: bool,
}

impl HoldGuard {
    pub(super) fn new(
        store: Arc<dyn Store>,
        clock: Clock,
        metrics: Arc<Metrics>,
        account: String,
        hold_id: u64,
    ) -> Self {
        HoldGuard {
            store,
            clock,
            metrics,
            account,
            hold_id,
            ended: false,
        }
    }

    /// Charges `min(charge, held)`; the rest returns to the account.
    pub(super) async fn settle(mut self, charge: Credits, request_id: &str) {
        self.ended = true;
        let call = self
            .store
            .settle(&self.account, self.hold_id, charge, self.clock.now_ms());
        let outcome = self.metrics.store(call).await;
        self.report("settle", request_id, outcome);
    }

    /// Charges nothing; returns the available balance afterwards when known.
    pub(super) async fn release(mut self, request_id: &str) -> Option<Credits> {
        self.ended = true;
        let call = self
            .store
            .release(&self.account, self.hold_id, self.clock.now_ms());
        let outcome = self.metrics.store(call).await;
        // The balance comes with the outcome: no second store call for the header.
        let available = match &outcome {
            Ok(Ok(ended)) => Some(ended.available),
            _ => None,
        };
        self.report("release", request_id, outcome);
        available
    }

    fn report(&self, what: &str, request_id: &str, outcome: Result<EndOutcome, StoreError>) {
        // Ended here, by the sweep before, or given up on: this gateway holds it no more.
        match &outcome {
            Ok(Ok(ended)) => self.metrics.hold_ended(ended.charged, ended.returned),
            _ => self.metrics.hold_ended(Credits::ZERO, Credits::ZERO),
        }
        match outcome {
            Ok(Ok(ended)) => {
                tracing::debug!(%request_id, hold = self.hold_id, charged = %ended.charged, "{what}")
            }
            // The hold's TTL passed first: the store already released it.
            Ok(Err(EndRejected::AlreadyEnded(how))) => {
                tracing::warn!(%request_id, hold = self.hold_id, "{what}: hold had already ended ({how:?})")
            }
            Ok(Err(EndRejected::UnknownHold)) => {
                tracing::error!(%request_id, hold = self.hold_id, "{what}: unknown hold")
            }
            // Down or contended: the hold is still there, and its TTL ends it.
            Err(e @ (StoreError::Unavailable(_) | StoreError::Contended(_))) => {
                tracing::error!(%request_id, hold = self.hold_id, "{what} failed, the hold will expire after hold_ttl: {e}")
            }
            // Corrupt (or gone): nothing ends the hold until the account is repaired.
            Err(e @ (StoreError::Corrupt(_) | StoreError::UnknownAccount(_))) => {
                tracing::error!(%request_id, hold = self.hold_id, "{what} failed on an account the store cannot read: {e}")
            }
        }
    }
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let (store, account, hold_id) = (
            self.store.clone(),
            std::mem::take(&mut self.account),
            self.hold_id,
        );
        let (clock, metrics) = (self.clock.clone(), self.metrics.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let returned = match store.release(&account, hold_id, clock.now_ms()).await {
                        Ok(Ok(ended)) => ended.returned,
                        _ => Credits::ZERO,
                    };
                    metrics.hold_ended(Credits::ZERO, returned);
                });
            }
            Err(_) => tracing::error!(
                hold = hold_id,
                "hold dropped outside a runtime; it will expire after hold_ttl"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::HoldRequest;
    use crate::policy::{SeedAccount, SeedGrant};
    use crate::store::local::LocalStore;

    fn now_ms() -> u64 {
        Clock::system().now_ms()
    }

    async fn store_with_hold() -> (Arc<dyn Store>, u64) {
        let store: Arc<dyn Store> = Arc::new(LocalStore::default());
        let grant = SeedGrant {
            kind: "topup".into(),
            credits: Credits::from_whole(10).unwrap(),
            expires_at_ms: None,
            priority: 30,
        };
        let seed = SeedAccount {
            id: "a".into(),
            plan: "p".into(),
            billing_anchor_day: None,
            grants: vec![grant],
            keys: vec![],
        };
        store.seed(&seed, now_ms()).await.unwrap();
        let request = HoldRequest {
            operation: "op".into(),
            request_id: "r".into(),
            amount: Credits::from_whole(4).unwrap(),
            ttl_ms: 600_000,
            max_holds: 8,
            quota: None,
            idempotency: None,
            caller: None,
        };
        let placed = store.hold("a", &request, now_ms()).await.unwrap().unwrap();
        (store, placed.hold_id)
    }

    /// A request that ends where `logging` never runs (a panic in a hook, a
    /// shutdown cut-off) drops its context: the guard must release the hold.
    #[tokio::test]
    async fn a_dropped_guard_releases_its_hold() {
        let (store, hold_id) = store_with_hold().await;
        assert_eq!(
            store.totals("a", now_ms()).await.unwrap().held,
            Credits::from_whole(4).unwrap()
        );
        drop(HoldGuard::new(
            store.clone(),
            Clock::system(),
            Arc::default(),
            "a".into(),
            hold_id,
        ));
        for _ in 0..1_000 {
            if store.totals("a", now_ms()).await.unwrap().held.is_zero() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let totals = store.totals("a", now_ms()).await.unwrap();
        assert_eq!(
            (totals.held, totals.charged, totals.available),
            (
                Credits::ZERO,
                Credits::ZERO,
                Credits::from_whole(10).unwrap()
            )
        );
    }

    #[tokio::test]
    async fn an_ended_guard_does_not_release_again() {
        let (store, hold_id) = store_with_hold().await;
        HoldGuard::new(
            store.clone(),
            Clock::system(),
            Arc::default(),
            "a".into(),
            hold_id,
        )
        .settle(Credits::from_whole(4).unwrap(), "r")
        .await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let totals = store.totals("a", now_ms()).await.unwrap();
        assert_eq!(
            (totals.held, totals.charged),
            (Credits::ZERO, Credits::from_whole(4).unwrap())
        );
    }
}
