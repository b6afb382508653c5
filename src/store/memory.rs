//! The memory store: accounts in a `DashMap`, one process, lost on restart.
//!
//! Every call locks one account's entry, applies time (a due refill, expiries),
//! applies the ledger core and unlocks — no guard is ever held across an `.await`
//! (the methods never await). Expired holds are released lazily on every access
//! and by [`Store::sweep`], which the gateway runs in the background.

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use dashmap::DashMap;

use super::{
    AccountView, AdminOutcome, EndOutcome, GrantRequest, HoldOutcome, Identity, QuotaView, Quoted,
    Store, StoreError,
};
use crate::ledger::{
    Account, AccountRejected, Catalog, Credits, Effective, Entry, Hold, HoldRequest, Journal,
    Limits, Millis, Recorded, Totals,
};

#[derive(Clone, Debug)]
struct KeyEntry {
    account: String,
    member: String,
    key_id: String,
}

/// The plans and the limits on an account's state, as the policy last set them.
#[derive(Clone)]
struct Rules {
    catalog: Arc<Catalog>,
    limits: Limits,
}

/// An account and the ledger entries kept for it.
struct Stored {
    account: Account,
    journal: Journal,
}

impl Stored {
    fn new(mut account: Account, ledger_max_entries: usize) -> Self {
        let mut journal = Journal::new(ledger_max_entries);
        journal.append(account.take_entries());
        Stored { account, journal }
    }

    /// Files the account's new ledger entries in the journal.
    fn file_entries(&mut self) {
        let fresh = self.account.take_entries();
        self.journal.append(fresh);
    }

    /// Applies time; returns how many holds expired.
    fn apply_time(&mut self, now_ms: Millis, catalog: &Catalog) -> usize {
        let expired = self.account.apply_time(now_ms, catalog).len();
        self.file_entries();
        expired
    }
}

pub struct MemoryStore {
    accounts: DashMap<String, Stored>,
    keys: DashMap<[u8; 32], KeyEntry>,
    key_ids: DashMap<String, [u8; 32]>,
    rules: RwLock<Rules>,
}

impl MemoryStore {
    pub fn new(catalog: Arc<Catalog>, limits: Limits) -> Self {
        MemoryStore {
            accounts: DashMap::new(),
            keys: DashMap::new(),
            key_ids: DashMap::new(),
            rules: RwLock::new(Rules { catalog, limits }),
        }
    }

    /// Checks the §1 invariant of every account; for tests and debugging.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.accounts
            .iter()
            .try_for_each(|s| s.account.check_invariant())
    }

    fn rules(&self) -> Rules {
        // A poisoned lock only means a panic elsewhere; the data is a plain Arc swap.
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs `apply` on one account after applying time (refill, expiries).
    fn with_account<T>(
        &self,
        account: &str,
        now_ms: Millis,
        apply: impl FnOnce(&mut Account, &Rules) -> T,
    ) -> Result<T, StoreError> {
        self.with_stored(account, now_ms, |stored, rules| {
            apply(&mut stored.account, rules)
        })
    }

    /// Runs `apply` on one account and its journal, then files the account's new
    /// ledger entries in the journal.
    fn with_stored<T>(
        &self,
        account: &str,
        now_ms: Millis,
        apply: impl FnOnce(&mut Stored, &Rules) -> T,
    ) -> Result<T, StoreError> {
        let rules = self.rules();
        let mut entry = self
            .accounts
            .get_mut(account)
            .ok_or_else(|| StoreError::UnknownAccount(account.to_string()))?;
        let stored = entry.value_mut();
        stored.account.apply_time(now_ms, &rules.catalog);
        let out = apply(stored, &rules);
        stored.file_entries();
        Ok(out)
    }
}

/// The account as its owner or an admin sees it; shared with the Redis store.
pub(super) fn view(a: &Account, catalog: &Catalog) -> AccountView {
    let limits = catalog
        .get(&a.plan)
        .map(|t| t.quotas.clone())
        .unwrap_or_default();
    let used = a.quota_use();
    let mut names: Vec<&String> = limits.keys().chain(used.keys()).collect();
    names.sort();
    names.dedup();
    AccountView {
        id: a.id.clone(),
        plan: a.plan.clone(),
        pending_plan: a.pending_plan.clone(),
        billing_anchor_day: a.billing_anchor_day,
        next_refill_ms: a.next_refill_ms,
        members: a.members.clone(),
        grants: a
            .grants()
            .iter()
            .filter(|g| !g.left.is_zero())
            .cloned()
            .collect(),
        totals: a.totals(),
        quotas: names
            .into_iter()
            .map(|n| QuotaView {
                name: n.clone(),
                used: used.get(n).copied().unwrap_or(0),
                limit: limits.get(n).copied(),
            })
            .collect(),
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn identify(
        &self,
        key_sha256: &[u8; 32],
        now_ms: Millis,
    ) -> Result<Option<Identity>, StoreError> {
        let Some(key) = self.keys.get(key_sha256).map(|k| k.value().clone()) else {
            return Ok(None);
        };
        // Who a key is changes nothing: read in place, the plan as it is in force now.
        let stored = self
            .accounts
            .get(&key.account)
            .ok_or_else(|| StoreError::UnknownAccount(key.account.clone()))?;
        let a = &stored.account;
        Ok(Some(Identity {
            premium_disabled: a
                .members
                .get(&key.member)
                .is_some_and(|m| m.premium_disabled),
            plan: a.plan_at(now_ms).to_string(),
            account: key.account,
            member: key.member,
            key_id: key.key_id,
        }))
    }

    async fn hold(
        &self,
        account: &str,
        request: &HoldRequest,
        now_ms: Millis,
    ) -> Result<HoldOutcome, StoreError> {
        self.with_account(account, now_ms, |a, rules| {
            a.hold(request, now_ms, &rules.catalog)
        })
    }

    async fn quote(
        &self,
        account: &str,
        request: &HoldRequest,
        now_ms: Millis,
    ) -> Result<Quoted, StoreError> {
        self.with_account(account, now_ms, |a, catalog| {
            Quoted::of(a, request, &catalog.catalog)
        })
    }

    async fn settle(
        &self,
        account: &str,
        hold_id: u64,
        charge: Credits,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError> {
        self.with_account(account, now_ms, |a, rules| {
            a.settle(hold_id, charge, now_ms, &rules.limits)
        })
    }

    async fn release(
        &self,
        account: &str,
        hold_id: u64,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError> {
        self.with_account(account, now_ms, |a, _| a.release(hold_id, now_ms))
    }

    async fn totals(&self, account: &str, now_ms: Millis) -> Result<Totals, StoreError> {
        self.with_account(account, now_ms, |a, _| a.totals())
    }

    async fn account(&self, account: &str, now_ms: Millis) -> Result<AccountView, StoreError> {
        self.with_account(account, now_ms, |a, rules| view(a, &rules.catalog))
    }

    async fn seed(
        &self,
        seed: &crate::ledger::SeedAccount,
        now_ms: Millis,
    ) -> Result<bool, StoreError> {
        let rules = self.rules();
        let mut created = false;
        self.accounts.entry(seed.id.clone()).or_insert_with(|| {
            created = true;
            let account = Account::seeded(seed, &rules.catalog, now_ms);
            Stored::new(account, rules.limits.ledger_max_entries)
        });
        // An existing account is left as it is: a seeded key revoked since stays
        // revoked, and no member is added past the plan's seats.
        if created {
            for key in &seed.keys {
                self.register(
                    &seed.id,
                    &key.member,
                    &crate::ledger::seed_key_id(&key.key_sha256),
                    &key.key_sha256,
                );
            }
        }
        Ok(created)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn sweep(&self, now_ms: Millis) -> Result<usize, StoreError> {
        let rules = self.rules();
        let mut ended = 0;
        for mut stored in self.accounts.iter_mut() {
            ended += stored.apply_time(now_ms, &rules.catalog);
        }
        Ok(ended)
    }

    async fn create_account(
        &self,
        id: &str,
        plan: &str,
        billing_anchor_day: Option<u8>,
        now_ms: Millis,
    ) -> Result<AdminOutcome<AccountView>, StoreError> {
        let Rules { catalog, limits } = self.rules();
        let Some(terms) = catalog.get(plan) else {
            return Ok(Err(AccountRejected::UnknownPlan));
        };
        let mut outcome = Err(AccountRejected::AccountExists);
        self.accounts.entry(id.to_string()).or_insert_with(|| {
            let account = Account::open(id, plan, billing_anchor_day, terms, now_ms);
            outcome = Ok(view(&account, &catalog));
            Stored::new(account, limits.ledger_max_entries)
        });
        Ok(outcome)
    }

    async fn add_member(
        &self,
        account: &str,
        member: &str,
        premium_disabled: bool,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        self.with_account(account, now_ms, |a, rules| {
            a.add_member(member, premium_disabled, &rules.catalog)
        })
    }

    async fn update_member(
        &self,
        account: &str,
        member: &str,
        premium_disabled: bool,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        self.with_account(account, now_ms, |a, _| {
            a.update_member(member, premium_disabled)
        })
    }

    async fn add_key(
        &self,
        account: &str,
        member: &str,
        key_id: &str,
        key_sha256: &[u8; 32],
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        let listed = self.with_account(account, now_ms, |a, _| a.add_key(member, key_id))?;
        if listed.is_ok() {
            self.register(account, member, key_id, key_sha256);
        }
        Ok(listed)
    }

    async fn revoke_key(
        &self,
        key_id: &str,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        let Some(hash) = self.key_ids.get(key_id).map(|h| *h) else {
            return Ok(Err(AccountRejected::UnknownKey));
        };
        // Off the member's active keys first, then the lookup records.
        if let Some(key) = self.keys.get(&hash).map(|k| k.value().clone()) {
            match self.with_account(&key.account, now_ms, |a, _| {
                a.revoke_key(&key.member, key_id)
            }) {
                // An account that is gone has no key to take off.
                Ok(_) | Err(StoreError::UnknownAccount(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.keys.remove(&hash);
        self.key_ids.remove(key_id);
        Ok(Ok(()))
    }

    async fn grant(
        &self,
        account: &str,
        grant: &GrantRequest,
        now_ms: Millis,
    ) -> Result<AdminOutcome<(crate::ledger::GrantReceipt, bool)>, StoreError> {
        self.with_account(account, now_ms, |a, rules| {
            a.grant_once(grant, now_ms, &rules.limits)
        })
    }

    async fn change_plan(
        &self,
        account: &str,
        plan: &str,
        effective: Effective,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        self.with_account(account, now_ms, |a, rules| {
            a.change_plan(plan, effective, now_ms, &rules.catalog)
        })
    }

    async fn ledger(
        &self,
        account: &str,
        limit: usize,
        before_seq: Option<u64>,
        now_ms: Millis,
    ) -> Result<Vec<Entry>, StoreError> {
        self.with_stored(account, now_ms, |stored, _| {
            stored.journal.page(limit, before_seq)
        })
    }

    async fn holds(
        &self,
        account: Option<&str>,
        limit: usize,
        now_ms: Millis,
    ) -> Result<Vec<(String, Hold)>, StoreError> {
        let collect = |a: &Account| {
            a.holds()
                .map(|h| (a.id.clone(), h.clone()))
                .collect::<Vec<_>>()
        };
        match account {
            Some(id) => self
                .with_account(id, now_ms, |a, _| collect(a))
                .map(|mut h| {
                    h.truncate(limit);
                    h
                }),
            None => {
                let rules = self.rules();
                let mut all = Vec::new();
                for mut stored in self.accounts.iter_mut() {
                    stored.apply_time(now_ms, &rules.catalog);
                    all.extend(collect(&stored.account));
                    if all.len() >= limit {
                        all.truncate(limit);
                        break;
                    }
                }
                Ok(all)
            }
        }
    }

    async fn record_response(
        &self,
        account: &str,
        key: &str,
        response: &Recorded,
        now_ms: Millis,
    ) -> Result<bool, StoreError> {
        self.with_account(account, now_ms, |a, rules| {
            a.record_response(key, response.clone(), &rules.limits)
        })
    }

    fn set_catalog(&self, catalog: Arc<Catalog>, limits: Limits) {
        let mut rules = self.rules.write().unwrap_or_else(|e| e.into_inner());
        *rules = Rules { catalog, limits };
        drop(rules);
        for mut stored in self.accounts.iter_mut() {
            stored.journal.set_cap(limits.ledger_max_entries);
        }
    }
}

impl MemoryStore {
    /// The key's lookup records (the account lists it as active separately).
    fn register(&self, account: &str, member: &str, key_id: &str, key_sha256: &[u8; 32]) {
        self.key_ids.insert(key_id.to_string(), *key_sha256);
        self.keys.insert(
            *key_sha256,
            KeyEntry {
                account: account.to_string(),
                member: member.to_string(),
                key_id: key_id.to_string(),
            },
        );
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(Arc::default(), Limits::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::PlanTerms;
    use crate::ledger::{SeedAccount, SeedGrant};

    fn store() -> MemoryStore {
        let terms = PlanTerms {
            monthly_credits: Credits::from_whole(5).unwrap(),
            quotas: Default::default(),
            seats: 1,
            signup_credits: Some(Credits::from_whole(2).unwrap()),
            keep_unused_on_upgrade: false,
            features: vec![],
            ..Default::default()
        };
        let limits = Limits {
            ledger_max_entries: 100,
            ..Limits::default()
        };
        MemoryStore::new(
            Arc::new(Catalog::from([("free".to_string(), terms)])),
            limits,
        )
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
        let store = store();
        assert!(store.seed(&seed(), 0).await.unwrap());
        assert!(
            !store.seed(&seed(), 0).await.unwrap(),
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
        let store = store();
        store.seed(&seed(), 0).await.unwrap();
        let request = HoldRequest {
            operation: "op".into(),
            request_id: "r".into(),
            amount: Credits::from_whole(4).unwrap(),
            ttl_ms: 1_000,
            max_holds: 8,
            quota: None,
            idempotency: None,
            caller: None,
            terms: crate::ledger::HoldTerms::default(),
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

    #[tokio::test]
    async fn keys_identify_members_until_revoked() {
        let store = store();
        store
            .create_account("t", "free", None, 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store
                .add_key("t", "ghost", "k1", &[1; 32], 0)
                .await
                .unwrap(),
            Err(AccountRejected::UnknownMember)
        );
        store
            .add_member("t", "ann", true, 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store.add_member("t", "bob", false, 0).await.unwrap(),
            Err(AccountRejected::SeatLimit { seats: 1 })
        );
        store
            .add_key("t", "ann", "k1", &[1; 32], 0)
            .await
            .unwrap()
            .unwrap();
        let who = store.identify(&[1; 32], 0).await.unwrap().unwrap();
        assert_eq!(
            (
                who.account.as_str(),
                who.member.as_str(),
                who.premium_disabled
            ),
            ("t", "ann", true)
        );
        store.revoke_key("k1", 0).await.unwrap().unwrap();
        assert_eq!(store.identify(&[1; 32], 0).await.unwrap(), None);
        assert_eq!(
            store.revoke_key("k1", 0).await.unwrap(),
            Err(AccountRejected::UnknownKey)
        );
    }
}
