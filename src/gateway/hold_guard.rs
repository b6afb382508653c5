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

    /// Charges `charge` as the ledger settles it: at most the hold, unless the
    /// hold was placed to overdraw; the rest returns to the account.
    /// `usage` (JSON text) is what the charge was metered from, for the ledger.
    pub(super) async fn settle(mut self, charge: Credits, usage: Option<&str>, request_id: &str) {
        self.ended = true;
        let call = self.store.settle(
            &self.account,
            self.hold_id,
            charge,
            usage,
            self.clock.now_ms(),
        );
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
            // Down: a store that keeps ends to retry (Redis) writes it when it is
            // back; else, or if its queue is full, the hold's TTL ends it.
            Err(e @ StoreError::Unavailable(_)) => {
                tracing::error!(%request_id, hold = self.hold_id, "{what} failed, retried when the store is back (else the hold expires after hold_ttl): {e}")
            }
            // Contended: nothing was written; a store that keeps ends to retry
            // (Redis) tries again shortly; else the hold's TTL ends it.
            Err(e @ StoreError::Contended(_)) => {
                tracing::error!(%request_id, hold = self.hold_id, "{what} failed, retried shortly (else the hold expires after hold_ttl): {e}")
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

    /// Account "a" with 10 credits (seeded on first use), and a hold of 4 on it.
    async fn hold_on(store: &dyn Store) -> u64 {
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
            terms: crate::ledger::HoldTerms::default(),
        };
        store
            .hold("a", &request, now_ms())
            .await
            .unwrap()
            .unwrap()
            .hold_id
    }

    async fn store_with_hold() -> (Arc<dyn Store>, u64) {
        let store: Arc<dyn Store> = Arc::new(LocalStore::default());
        let hold_id = hold_on(&*store).await;
        (store, hold_id)
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

    /// The memory store, counting the releases asked of each hold.
    #[derive(Default)]
    struct CountingStore {
        inner: LocalStore,
        releases: std::sync::Mutex<Vec<u64>>,
    }

    impl CountingStore {
        fn releases_of(&self, hold_id: u64) -> usize {
            let releases = self.releases.lock().unwrap();
            releases.iter().filter(|&&id| id == hold_id).count()
        }
    }

    /// Every call but `release` goes straight to the memory store.
    #[async_trait::async_trait]
    impl Store for CountingStore {
        async fn identify(
            &self,
            key_sha256: &[u8; 32],
            now_ms: u64,
        ) -> Result<Option<crate::store::Identity>, StoreError> {
            self.inner.identify(key_sha256, now_ms).await
        }
        async fn hold(
            &self,
            account: &str,
            request: &HoldRequest,
            now_ms: u64,
        ) -> Result<crate::store::HoldOutcome, StoreError> {
            self.inner.hold(account, request, now_ms).await
        }
        async fn quote(
            &self,
            account: &str,
            request: &HoldRequest,
            now_ms: u64,
        ) -> Result<crate::store::Quoted, StoreError> {
            self.inner.quote(account, request, now_ms).await
        }
        async fn settle(
            &self,
            account: &str,
            hold_id: u64,
            charge: Credits,
            usage: Option<&str>,
            now_ms: u64,
        ) -> Result<EndOutcome, StoreError> {
            self.inner
                .settle(account, hold_id, charge, usage, now_ms)
                .await
        }
        async fn release(
            &self,
            account: &str,
            hold_id: u64,
            now_ms: u64,
        ) -> Result<EndOutcome, StoreError> {
            self.releases.lock().unwrap().push(hold_id);
            self.inner.release(account, hold_id, now_ms).await
        }
        async fn totals(
            &self,
            account: &str,
            now_ms: u64,
        ) -> Result<crate::ledger::Totals, StoreError> {
            self.inner.totals(account, now_ms).await
        }
        async fn account(
            &self,
            account: &str,
            now_ms: u64,
        ) -> Result<crate::store::AccountView, StoreError> {
            self.inner.account(account, now_ms).await
        }
        async fn seed(&self, seed: &SeedAccount, now_ms: u64) -> Result<bool, StoreError> {
            self.inner.seed(seed, now_ms).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
        async fn sweep(&self, now_ms: u64) -> Result<usize, StoreError> {
            self.inner.sweep(now_ms).await
        }
        async fn create_account(
            &self,
            id: &str,
            plan: &str,
            billing_anchor_day: Option<u8>,
            now_ms: u64,
        ) -> Result<crate::store::AdminOutcome<crate::store::AccountView>, StoreError> {
            self.inner
                .create_account(id, plan, billing_anchor_day, now_ms)
                .await
        }
        async fn add_member(
            &self,
            account: &str,
            member: &str,
            terms: &crate::ledger::MemberTerms,
            now_ms: u64,
        ) -> Result<crate::store::AdminOutcome<()>, StoreError> {
            self.inner.add_member(account, member, terms, now_ms).await
        }
        async fn update_member(
            &self,
            account: &str,
            member: &str,
            terms: &crate::ledger::MemberTerms,
            now_ms: u64,
        ) -> Result<crate::store::AdminOutcome<()>, StoreError> {
            self.inner
                .update_member(account, member, terms, now_ms)
                .await
        }
        async fn add_key(
            &self,
            account: &str,
            member: &str,
            key_id: &str,
            key_sha256: &[u8; 32],
            now_ms: u64,
        ) -> Result<crate::store::AdminOutcome<()>, StoreError> {
            self.inner
                .add_key(account, member, key_id, key_sha256, now_ms)
                .await
        }
        async fn revoke_key(
            &self,
            key_id: &str,
            now_ms: u64,
        ) -> Result<crate::store::AdminOutcome<()>, StoreError> {
            self.inner.revoke_key(key_id, now_ms).await
        }
        async fn grant(
            &self,
            account: &str,
            grant: &crate::store::GrantRequest,
            now_ms: u64,
        ) -> Result<crate::store::AdminOutcome<(crate::ledger::GrantReceipt, bool)>, StoreError>
        {
            self.inner.grant(account, grant, now_ms).await
        }
        async fn onboard(
            &self,
            id: &str,
            plan: &str,
            billing_anchor_day: Option<u8>,
            onboarding: &crate::ledger::Onboarding,
            now_ms: u64,
        ) -> Result<crate::store::AdminOutcome<crate::store::AccountView>, StoreError> {
            self.inner
                .onboard(id, plan, billing_anchor_day, onboarding, now_ms)
                .await
        }
        async fn update_metadata(
            &self,
            account: &str,
            changes: &std::collections::BTreeMap<String, Option<String>>,
            now_ms: u64,
        ) -> Result<crate::store::AdminOutcome<()>, StoreError> {
            self.inner.update_metadata(account, changes, now_ms).await
        }
        async fn list_accounts(
            &self,
            after: Option<&str>,
            limit: usize,
            now_ms: u64,
        ) -> Result<Vec<crate::store::AccountView>, StoreError> {
            self.inner.list_accounts(after, limit, now_ms).await
        }
        async fn remove_member(
            &self,
            account: &str,
            member: &str,
            now_ms: u64,
        ) -> Result<crate::store::AdminOutcome<()>, StoreError> {
            self.inner.remove_member(account, member, now_ms).await
        }
        async fn export(
            &self,
            since_ms: u64,
            after: Option<&crate::store::ExportPosition>,
            limit: usize,
        ) -> Result<Vec<(String, crate::ledger::Entry)>, StoreError> {
            self.inner.export(since_ms, after, limit).await
        }
        async fn adjust(
            &self,
            account: &str,
            adjustment: &crate::ledger::AdjustRequest,
            now_ms: u64,
        ) -> Result<crate::store::AdminOutcome<(crate::ledger::GrantReceipt, bool)>, StoreError>
        {
            self.inner.adjust(account, adjustment, now_ms).await
        }
        async fn change_plan(
            &self,
            account: &str,
            plan: &str,
            effective: crate::ledger::Effective,
            now_ms: u64,
        ) -> Result<crate::store::AdminOutcome<()>, StoreError> {
            self.inner
                .change_plan(account, plan, effective, now_ms)
                .await
        }
        async fn ledger(
            &self,
            account: &str,
            limit: usize,
            before_seq: Option<u64>,
            now_ms: u64,
        ) -> Result<Vec<crate::ledger::Entry>, StoreError> {
            self.inner.ledger(account, limit, before_seq, now_ms).await
        }
        async fn holds(
            &self,
            account: Option<&str>,
            limit: usize,
            now_ms: u64,
        ) -> Result<Vec<(String, crate::ledger::Hold)>, StoreError> {
            self.inner.holds(account, limit, now_ms).await
        }
        async fn record_response(
            &self,
            account: &str,
            key: &str,
            response: &crate::ledger::Recorded,
            now_ms: u64,
        ) -> Result<bool, StoreError> {
            self.inner
                .record_response(account, key, response, now_ms)
                .await
        }
        async fn pay(
            &self,
            account: &str,
            payment: &crate::ledger::Payment,
            now_ms: u64,
        ) -> Result<crate::store::AdminOutcome<crate::ledger::Paid>, StoreError> {
            self.inner.pay(account, payment, now_ms).await
        }
        fn set_catalog(&self, catalog: Arc<crate::ledger::Catalog>, limits: crate::ledger::Limits) {
            self.inner.set_catalog(catalog, limits)
        }
    }

    fn guard(store: &Arc<CountingStore>, hold_id: u64) -> HoldGuard {
        HoldGuard::new(
            store.clone(),
            Clock::system(),
            Arc::default(),
            "a".into(),
            hold_id,
        )
    }

    /// A settled guard asks no release when it drops. (A second release of a settled
    /// hold would change nothing in the ledger — `AlreadyEnded` — so the test counts
    /// the calls instead.)
    #[tokio::test]
    async fn an_ended_guard_does_not_release_again() {
        let store = Arc::new(CountingStore::default());
        let settled = hold_on(&*store).await;
        let dropped = hold_on(&*store).await;
        guard(&store, settled)
            .settle(Credits::from_whole(4).unwrap(), None, "r")
            .await;
        // A guard dropped after it: once its release has run, a release the settled
        // guard's drop had spawned (earlier, on this one-thread runtime) has run too.
        drop(guard(&store, dropped));
        for _ in 0..1_000 {
            if store.releases_of(dropped) > 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(store.releases_of(dropped), 1, "the dropped guard released");
        assert_eq!(
            store.releases_of(settled),
            0,
            "the settled guard released again"
        );
        let totals = store.totals("a", now_ms()).await.unwrap();
        assert_eq!(
            (totals.held, totals.charged),
            (Credits::ZERO, Credits::from_whole(4).unwrap())
        );
    }
}
