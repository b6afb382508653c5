//! The memory store: accounts in a `DashMap`, one process, lost on restart.
//!
//! Every transition locks one account's shard entry, applies the ledger core and
//! unlocks — no guard is ever held across an `.await` (the methods never await).
//! Expired holds are released lazily on every access (the core applies time
//! first) and by [`Store::sweep`], which the gateway runs in the background.

use async_trait::async_trait;
use dashmap::DashMap;

use super::{Balance, EndOutcome, HoldOutcome, Identity, Store, StoreError};
use crate::ledger::{default_priority, Account, Credits, HoldRequest, Millis, Totals};
use crate::policy::{Plan, SeedAccount};

#[derive(Clone, Debug)]
struct KeyEntry {
    account: String,
    member: String,
}

#[derive(Default)]
pub struct MemoryStore {
    accounts: DashMap<String, Account>,
    keys: DashMap<[u8; 32], KeyEntry>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the §1 invariant of every account; for tests and debugging.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.accounts.iter().try_for_each(|a| a.check_invariant())
    }

    fn with_account<T>(
        &self,
        account: &str,
        apply: impl FnOnce(&mut Account) -> T,
    ) -> Result<T, StoreError> {
        let mut entry = self
            .accounts
            .get_mut(account)
            .ok_or_else(|| StoreError::UnknownAccount(account.to_string()))?;
        Ok(apply(entry.value_mut()))
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn identify(&self, key_sha256: &[u8; 32]) -> Result<Option<Identity>, StoreError> {
        let Some(key) = self.keys.get(key_sha256).map(|k| k.value().clone()) else {
            return Ok(None);
        };
        let plan = self.with_account(&key.account, |a| a.plan.clone())?;
        Ok(Some(Identity {
            account: key.account,
            member: key.member,
            plan,
        }))
    }

    async fn hold(
        &self,
        account: &str,
        request: &HoldRequest,
        now_ms: Millis,
    ) -> Result<HoldOutcome, StoreError> {
        self.with_account(account, |a| a.hold(request, now_ms))
    }

    async fn settle(
        &self,
        account: &str,
        hold_id: u64,
        charge: Credits,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError> {
        self.with_account(account, |a| a.settle(hold_id, charge, now_ms))
    }

    async fn release(
        &self,
        account: &str,
        hold_id: u64,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError> {
        self.with_account(account, |a| a.release(hold_id, now_ms))
    }

    async fn totals(&self, account: &str, now_ms: Millis) -> Result<Totals, StoreError> {
        self.with_account(account, |a| {
            a.tick(now_ms);
            a.totals()
        })
    }

    async fn balance(&self, account: &str, now_ms: Millis) -> Result<Balance, StoreError> {
        self.with_account(account, |a| {
            a.tick(now_ms);
            Balance {
                plan: a.plan.clone(),
                grants: a
                    .grants()
                    .iter()
                    .filter(|g| !g.left.is_zero())
                    .cloned()
                    .collect(),
                totals: a.totals(),
            }
        })
    }

    async fn seed(
        &self,
        seed: &SeedAccount,
        plan: &Plan,
        now_ms: Millis,
    ) -> Result<bool, StoreError> {
        let mut created = false;
        self.accounts.entry(seed.id.clone()).or_insert_with(|| {
            created = true;
            seeded_account(seed, plan, now_ms)
        });
        for key in &seed.keys {
            self.keys.insert(
                key.key_sha256,
                KeyEntry {
                    account: seed.id.clone(),
                    member: key.member.clone(),
                },
            );
        }
        Ok(created)
    }

    async fn sweep(&self, now_ms: Millis) -> Result<usize, StoreError> {
        let mut ended = 0;
        for mut account in self.accounts.iter_mut() {
            ended += account.tick(now_ms).len();
        }
        Ok(ended)
    }
}

/// A new account as the policy seeds it: plan allowance, signup bonus, listed grants.
/// Grants that would overflow are skipped; validation bounds amounts far below that.
pub fn seeded_account(seed: &SeedAccount, plan: &Plan, now_ms: Millis) -> Account {
    let mut account = Account::new(seed.id.clone(), seed.plan.clone());
    if !plan.monthly_credits.is_zero() {
        let _ = account.grant(
            "plan",
            plan.monthly_credits,
            default_priority("plan"),
            None,
            now_ms,
        );
    }
    if let Some(signup) = plan.signup_credits {
        let _ = account.grant("bonus", signup, default_priority("bonus"), None, now_ms);
    }
    for g in &seed.grants {
        let _ = account.grant(&g.kind, g.credits, g.priority, g.expires_at_ms, now_ms);
    }
    account
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::SeedGrant;

    fn plan() -> Plan {
        Plan {
            name: "free".into(),
            monthly_credits: Credits::from_whole(5).unwrap(),
            features: vec![],
            quotas: vec![],
            seats: 1,
            signup_credits: Some(Credits::from_whole(2).unwrap()),
        }
    }

    fn seed() -> SeedAccount {
        let grant = SeedGrant {
            kind: "topup".into(),
            credits: Credits::from_whole(3).unwrap(),
            expires_at_ms: None,
            priority: 30,
        };
        SeedAccount {
            id: "a".into(),
            plan: "free".into(),
            billing_anchor_day: None,
            grants: vec![grant],
            keys: vec![],
        }
    }

    #[tokio::test]
    async fn seeding_creates_once_with_plan_signup_and_listed_grants() {
        let store = MemoryStore::new();
        assert!(store.seed(&seed(), &plan(), 0).await.unwrap());
        assert!(
            !store.seed(&seed(), &plan(), 0).await.unwrap(),
            "an existing account is left as it is"
        );
        assert_eq!(
            store.totals("a", 0).await.unwrap().available,
            Credits::from_whole(10).unwrap()
        );
        assert_eq!(
            store.totals("nobody", 0).await,
            Err(StoreError::UnknownAccount("nobody".into()))
        );
    }

    #[tokio::test]
    async fn the_sweep_releases_holds_past_their_ttl() {
        let store = MemoryStore::new();
        store.seed(&seed(), &plan(), 0).await.unwrap();
        let request = HoldRequest {
            operation: "op".into(),
            request_id: "r".into(),
            amount: Credits::from_whole(4).unwrap(),
            ttl_ms: 1_000,
            max_holds: 8,
        };
        let placed = store.hold("a", &request, 0).await.unwrap().unwrap();
        assert_eq!(store.sweep(999).await.unwrap(), 0);
        assert_eq!(store.sweep(1_000).await.unwrap(), 1);
        let totals = store.totals("a", 1_000).await.unwrap();
        assert_eq!(
            (totals.held, totals.available),
            (Credits::ZERO, Credits::from_whole(10).unwrap())
        );
        assert!(
            store
                .settle("a", placed.hold_id, request.amount, 1_001)
                .await
                .unwrap()
                .is_err(),
            "an expired hold cannot be settled"
        );
        store.check_invariants().unwrap();
    }
}
