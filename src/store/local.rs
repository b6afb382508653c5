//! The local store: accounts in a `DashMap` in this process, with an optional
//! durable log. It is two stores, built from one piece of code:
//!
//! - **memory** ([`LocalStore::new`]): no log. One process, lost on restart; each
//!   account keeps its newest ledger entries in a [`Journal`].
//! - **sqlite** ([`super::sqlite::open`]): the same state in memory, where the
//!   ledger core computes on it, plus a [`SqliteLog`] that writes every change to
//!   an SQLite file before the change is acknowledged, and from which the state is
//!   loaded at start. Each account keeps the entries not yet written, for the log.
//!
//! Every call locks one account's entry, applies time (a due refill, expiries),
//! applies the ledger core and unlocks — no guard is ever held across an `.await`.
//! A call that may change an account (a hold, a grant, any admin change) queues the
//! account for the log while it still holds the lock, and then waits, unlocked, for
//! the commit that wrote it: nothing is answered before it is on disk. It waits
//! whatever the outcome, because even a refusal may rest on a change another call
//! made a moment before and that is not on disk yet (a repeated grant answered
//! "already granted"). The end of a hold (settle, release) is queued but not waited
//! for: it is on disk before the account's next hold answers ([`LocalStore::end`]).
//! Reads (identify, totals, the account view,
//! open holds) never wait for the log; what time alone changed on the way (an
//! expiry, a refill) is queued without waiting, since it is recomputed from the
//! file after a crash. Expired holds are released lazily on every access and by
//! [`Store::sweep`], which the gateway runs in the background.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use dashmap::DashMap;

use super::sqlite::{Change, Pending, SqliteLog};
use super::{
    AccountView, AdminOutcome, EndOutcome, GrantRequest, HoldOutcome, Identity, QuotaView, Quoted,
    Store, StoreError,
};
use crate::ledger::{
    Account, AccountRejected, Catalog, Credits, Effective, Entry, Event, EventRules, Hold,
    HoldRequest, Journal, Limits, Millis, Onboarding, Paid, Payment, Recorded, Totals,
};

#[derive(Clone, Debug)]
pub(super) struct KeyEntry {
    pub(super) account: String,
    pub(super) member: String,
    pub(super) key_id: String,
}

/// The plans and the limits on an account's state, as the policy last set them.
#[derive(Clone)]
struct Rules {
    catalog: Arc<Catalog>,
    limits: Limits,
    /// Which events the ledger keeps (`Store::set_events`).
    events: Arc<EventRules>,
}

/// Where an account's new ledger entries go.
pub(super) enum Kept {
    /// The memory store's ledger: the newest `ledger_max_entries` entries.
    Journal(Journal),
    /// The sqlite store's entries not yet written. The log's writer takes them
    /// together with the account's state, so the file has both or neither.
    Unwritten(Unwritten),
}

/// An account's ledger entries on their way to the file.
#[derive(Default)]
pub(super) struct Unwritten {
    /// Not taken by the writer yet.
    pub(super) fresh: Vec<Entry>,
    /// Events not taken by the writer yet: written to the outbox table in the
    /// same transaction as the account, and handed to the sender after it.
    pub(super) events: Vec<Event>,
    /// The entries the writer took for the commit it is writing: kept until that
    /// commit is done, so a ledger read that copies these and then reads the file
    /// misses none of them.
    pub(super) taken: Arc<Vec<Entry>>,
}

/// An account and the ledger entries kept for it.
pub(super) struct Stored {
    pub(super) account: Account,
    pub(super) ledger: Kept,
}

impl Stored {
    /// An account as it is opened or loaded: what opening it wrote is filed, and
    /// the event rules start watching its balance from here (opening it is not
    /// announced).
    pub(super) fn new(account: Account, ledger: Kept) -> Self {
        let mut stored = Stored { account, ledger };
        stored.file_entries(&EventRules::default(), 0);
        stored
    }

    /// Files the account's new ledger entries and the events they caused (taken
    /// first, from the same transitions); returns whether there were entries, and
    /// the events for the memory store's outbox (the sqlite store's go to the
    /// file with the account first).
    fn file_entries(&mut self, rules: &EventRules, now_ms: Millis) -> (bool, Vec<Event>) {
        let mut events = self.account.take_events(rules, now_ms);
        let fresh = self.account.take_entries();
        let any = !fresh.is_empty() || !events.is_empty();
        match &mut self.ledger {
            Kept::Journal(journal) => journal.append(fresh),
            Kept::Unwritten(unwritten) => {
                unwritten.fresh.extend(fresh);
                unwritten.events.append(&mut events);
            }
        }
        (any, events)
    }

    /// Applies time; returns how many holds expired, whether any ledger entry
    /// was written, and the events for the memory store's outbox.
    fn apply_time(
        &mut self,
        now_ms: Millis,
        catalog: &Catalog,
        rules: &EventRules,
    ) -> (usize, bool, Vec<Event>) {
        let expired = self.account.apply_time(now_ms, catalog).len();
        let (filed, events) = self.file_entries(rules, now_ms);
        (expired, filed, events)
    }
}

/// Events waiting for delivery, oldest first, at most `max` (past it the oldest
/// are dropped and counted). The memory store's only copy; the sqlite store's
/// copy of its outbox table's committed rows.
pub(super) struct Outbox {
    events: BTreeMap<u64, Event>,
    by_id: HashMap<String, u64>,
    next: u64,
    pub(super) max: usize,
    pub(super) dropped: u64,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            events: BTreeMap::new(),
            by_id: HashMap::new(),
            next: 0,
            max: crate::ledger::DEFAULT_MAX_PENDING_EVENTS,
            dropped: 0,
        }
    }
}

impl Outbox {
    /// Adds events; returns the ids of those dropped to stay within `max`.
    pub(super) fn push(&mut self, events: impl IntoIterator<Item = Event>) -> Vec<String> {
        for event in events {
            if self.by_id.contains_key(&event.id) {
                continue;
            }
            self.by_id.insert(event.id.clone(), self.next);
            self.events.insert(self.next, event);
            self.next += 1;
        }
        let mut dropped = Vec::new();
        while self.events.len() > self.max.max(1) {
            if let Some((_, event)) = self.events.pop_first() {
                self.by_id.remove(&event.id);
                dropped.push(event.id);
            }
        }
        self.dropped += dropped.len() as u64;
        dropped
    }

    fn remove(&mut self, id: &str) -> bool {
        match self.by_id.remove(id) {
            Some(at) => self.events.remove(&at).is_some(),
            None => false,
        }
    }

    fn head(&self, limit: usize) -> Vec<Event> {
        self.events.values().take(limit).cloned().collect()
    }
}

/// Every account and key of a local store; the sqlite log's writer reads them too.
#[derive(Default)]
pub(super) struct Tables {
    pub(super) accounts: DashMap<String, Stored>,
    pub(super) keys: DashMap<[u8; 32], KeyEntry>,
    pub(super) key_ids: DashMap<String, [u8; 32]>,
    /// Events waiting for delivery (the sqlite store's: once committed).
    pub(super) outbox: Mutex<Outbox>,
}

impl Tables {
    /// The outbox; a panic elsewhere while holding it leaves it usable.
    pub(super) fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Tables {
    /// The key's lookup records (the account lists it as active separately).
    pub(super) fn register(
        &self,
        account: &str,
        member: &str,
        key_id: &str,
        key_sha256: &[u8; 32],
    ) {
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

/// Whether a call waits for the log to write the account it touched.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// A call that may change the account: answered only once the change is on disk.
    Wait,
    /// The end of a hold: queued at once, not waited for (see [`LocalStore::end`]).
    Queue,
    /// A read: what time changed on the way is queued, not waited for.
    IfTimeMoved,
}

pub struct LocalStore {
    tables: Arc<Tables>,
    rules: RwLock<Rules>,
    /// `None`: the memory store.
    log: Option<SqliteLog>,
}

impl LocalStore {
    /// The memory store: one process, lost on restart.
    pub fn new(catalog: Arc<Catalog>, limits: Limits) -> Self {
        LocalStore::with_log(Arc::default(), None, catalog, limits)
    }

    /// A store on `tables` (loaded by the log from its file), writing through `log`.
    pub(super) fn with_log(
        tables: Arc<Tables>,
        log: Option<SqliteLog>,
        catalog: Arc<Catalog>,
        limits: Limits,
    ) -> Self {
        LocalStore {
            tables,
            rules: RwLock::new(Rules {
                catalog,
                limits,
                events: Arc::default(),
            }),
            log,
        }
    }

    /// Checks the §1 invariant of every account; for tests and debugging.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.tables
            .accounts
            .iter()
            .try_for_each(|s| s.account.check_invariant())
    }

    fn rules(&self) -> Rules {
        // A poisoned lock only means a panic elsewhere; the data is a plain Arc swap.
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How a new account keeps its ledger entries in this store.
    fn kept(&self, ledger_max_entries: usize) -> Kept {
        match self.log {
            Some(_) => Kept::Unwritten(Unwritten::default()),
            None => Kept::Journal(Journal::new(ledger_max_entries)),
        }
    }

    /// Refuses every call once the log has failed to write: memory may then be
    /// ahead of the file, and nothing may be answered from it until a restart
    /// rebuilds memory from the file.
    fn usable(&self) -> Result<(), StoreError> {
        self.log.as_ref().map_or(Ok(()), SqliteLog::usable)
    }

    /// Queues `change` for the log (a no-op on the memory store); with `wait`,
    /// what to await before answering.
    fn persist(&self, change: impl FnOnce() -> Change, wait: bool) -> Result<Pending, StoreError> {
        match &self.log {
            Some(log) => log.queue(change(), wait),
            None => Ok(Pending::default()),
        }
    }

    /// Runs `apply` on one account after applying time (refill, expiries), files
    /// the account's new ledger entries and queues the account for the log.
    fn locked<T>(
        &self,
        account: &str,
        now_ms: Millis,
        commit: Commit,
        apply: impl FnOnce(&mut Stored, &Rules) -> T,
    ) -> Result<(T, Pending), StoreError> {
        self.usable()?;
        let rules = self.rules();
        let mut entry = self
            .tables
            .accounts
            .get_mut(account)
            .ok_or_else(|| StoreError::UnknownAccount(account.to_string()))?;
        let stored = entry.value_mut();
        stored.account.apply_time(now_ms, &rules.catalog);
        let out = apply(stored, &rules);
        let (filed, events) = stored.file_entries(&rules.events, now_ms);
        self.memory_events(events);
        // Queued under the account's lock: the log's snapshot of the account,
        // taken after it dequeues this, has this call's change.
        let wait = commit == Commit::Wait;
        let pending = if commit != Commit::IfTimeMoved || filed {
            self.persist(|| Change::account(account), wait)?
        } else {
            Pending::default()
        };
        Ok((out, pending))
    }

    /// A read of one account: never waits for the log.
    fn read<T>(
        &self,
        account: &str,
        now_ms: Millis,
        apply: impl FnOnce(&mut Stored, &Rules) -> T,
    ) -> Result<T, StoreError> {
        self.locked(account, now_ms, Commit::IfTimeMoved, apply)
            .map(|(out, _)| out)
    }

    fn read_account<T>(
        &self,
        account: &str,
        now_ms: Millis,
        apply: impl FnOnce(&mut Account, &Rules) -> T,
    ) -> Result<T, StoreError> {
        self.read(account, now_ms, |stored, rules| {
            apply(&mut stored.account, rules)
        })
    }

    /// A call that may change one account: answered once the change is on disk.
    async fn write<T>(
        &self,
        account: &str,
        now_ms: Millis,
        apply: impl FnOnce(&mut Account, &Rules) -> T,
    ) -> Result<T, StoreError> {
        let (out, pending) = self.locked(account, now_ms, Commit::Wait, |stored, rules| {
            apply(&mut stored.account, rules)
        })?;
        pending.written().await?;
        Ok(out)
    }

    /// Ends a hold (a settle or a release): applied and queued for the log, and
    /// answered without waiting for the commit. Its answer goes only to the
    /// gateway, which ends a hold after the client has its answer (a release on a
    /// non-charging status: with it, and a later expiry returns the same credits).
    /// It is on disk before the account's next hold is answered, since that hold
    /// waits for a commit that snapshots the account after it. If the process dies
    /// before, the hold is still open in the file and expires by its TTL: such a
    /// request is not charged, never charged twice.
    fn end<T>(
        &self,
        account: &str,
        now_ms: Millis,
        apply: impl FnOnce(&mut Account, &Rules) -> T,
    ) -> Result<T, StoreError> {
        self.locked(account, now_ms, Commit::Queue, |stored, rules| {
            apply(&mut stored.account, rules)
        })
        .map(|(out, _)| out)
    }

    /// Events the memory store's accounts caused: straight to its outbox (the
    /// sqlite store's are empty here: they reach the outbox once committed).
    fn memory_events(&self, events: Vec<Event>) {
        if !events.is_empty() {
            self.tables.outbox().push(events);
        }
    }

    /// Applies time to one account in a walk over all of them, queueing it for
    /// the log when time wrote to its ledger; returns how many holds expired.
    fn tick_in_walk(
        &self,
        id: &str,
        stored: &mut Stored,
        now_ms: Millis,
        rules: &Rules,
    ) -> Result<usize, StoreError> {
        let (expired, filed, events) = stored.apply_time(now_ms, &rules.catalog, &rules.events);
        self.memory_events(events);
        if filed {
            self.persist(|| Change::account(id), false)?;
        }
        Ok(expired)
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
        metadata: a.metadata.clone(),
    }
}

#[async_trait]
impl Store for LocalStore {
    async fn identify(
        &self,
        key_sha256: &[u8; 32],
        now_ms: Millis,
    ) -> Result<Option<Identity>, StoreError> {
        self.usable()?;
        let Some(key) = self.tables.keys.get(key_sha256).map(|k| k.value().clone()) else {
            return Ok(None);
        };
        // Who a key is changes nothing: read in place, the plan as it is in force now.
        let stored = self
            .tables
            .accounts
            .get(&key.account)
            .ok_or_else(|| StoreError::UnknownAccount(key.account.clone()))?;
        let a = &stored.account;
        let member = a.members.get(&key.member);
        Ok(Some(Identity {
            premium_disabled: member.is_some_and(|m| m.premium_disabled),
            disabled_features: member
                .map(|m| m.disabled_features.clone())
                .unwrap_or_default(),
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
        self.write(account, now_ms, |a, rules| {
            a.hold(request, now_ms, &rules.catalog)
        })
        .await
    }

    async fn quote(
        &self,
        account: &str,
        request: &HoldRequest,
        now_ms: Millis,
    ) -> Result<Quoted, StoreError> {
        self.read_account(account, now_ms, |a, rules| {
            Quoted::of(a, request, &rules.catalog)
        })
    }

    async fn settle(
        &self,
        account: &str,
        hold_id: u64,
        charge: Credits,
        usage: Option<&str>,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError> {
        self.end(account, now_ms, |a, rules| {
            a.settle_metered(hold_id, charge, usage, now_ms, &rules.limits)
        })
    }

    async fn release(
        &self,
        account: &str,
        hold_id: u64,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError> {
        self.end(account, now_ms, |a, _| a.release(hold_id, now_ms))
    }

    async fn totals(&self, account: &str, now_ms: Millis) -> Result<Totals, StoreError> {
        self.read_account(account, now_ms, |a, _| a.totals())
    }

    async fn account(&self, account: &str, now_ms: Millis) -> Result<AccountView, StoreError> {
        self.read_account(account, now_ms, |a, rules| view(a, &rules.catalog))
    }

    async fn seed(
        &self,
        seed: &crate::ledger::SeedAccount,
        now_ms: Millis,
    ) -> Result<bool, StoreError> {
        self.usable()?;
        let rules = self.rules();
        let mut created = false;
        self.tables
            .accounts
            .entry(seed.id.clone())
            .or_insert_with(|| {
                created = true;
                Stored::new(
                    Account::seeded(seed, &rules.catalog, now_ms),
                    self.kept(rules.limits.ledger_max_entries),
                )
            });
        // An existing account is left as it is: a seeded key revoked since stays
        // revoked, and no member is added past the plan's seats.
        let mut keys = Vec::new();
        if created {
            for key in &seed.keys {
                let key_id = crate::ledger::seed_key_id(&key.key_sha256);
                self.tables
                    .register(&seed.id, &key.member, &key_id, &key.key_sha256);
                keys.push(key.key_sha256);
            }
        }
        // Waited for even when it existed: it may have been created a moment ago.
        self.persist(|| Change::account(&seed.id).with_keys(keys), true)?
            .written()
            .await?;
        Ok(created)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.usable()
    }

    async fn sweep(&self, now_ms: Millis) -> Result<usize, StoreError> {
        self.usable()?;
        let rules = self.rules();
        let mut ended = 0;
        for mut stored in self.tables.accounts.iter_mut() {
            let (id, stored) = stored.pair_mut();
            ended += self.tick_in_walk(id, stored, now_ms, &rules)?;
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
        self.onboard(id, plan, billing_anchor_day, &Onboarding::default(), now_ms)
            .await
    }

    async fn onboard(
        &self,
        id: &str,
        plan: &str,
        billing_anchor_day: Option<u8>,
        onboarding: &Onboarding,
        now_ms: Millis,
    ) -> Result<AdminOutcome<AccountView>, StoreError> {
        self.usable()?;
        let Rules {
            catalog, limits, ..
        } = self.rules();
        let Some(terms) = catalog.get(plan) else {
            return Ok(Err(AccountRejected::UnknownPlan));
        };
        let mut account = Account::open(id, plan, billing_anchor_day, terms, now_ms);
        if let Err(refused) = account.onboard(onboarding, now_ms, &catalog, &limits) {
            return Ok(Err(refused));
        }
        let mut outcome = Err(AccountRejected::AccountExists);
        self.tables
            .accounts
            .entry(id.to_string())
            .or_insert_with(|| {
                outcome = Ok(view(&account, &catalog));
                Stored::new(account, self.kept(limits.ledger_max_entries))
            });
        let mut hashes = Vec::new();
        if outcome.is_ok() {
            for key in &onboarding.keys {
                self.tables
                    .register(id, &key.member, &key.key_id, &key.key_sha256);
                hashes.push(key.key_sha256);
            }
        }
        // Waited for even when it existed: it may have been created a moment ago.
        self.persist(|| Change::account(id).with_keys(hashes), true)?
            .written()
            .await?;
        Ok(outcome)
    }

    async fn update_metadata(
        &self,
        account: &str,
        changes: &std::collections::BTreeMap<String, Option<String>>,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        self.write(account, now_ms, |a, _| a.update_metadata(changes))
            .await
    }

    async fn list_accounts(
        &self,
        after: Option<&str>,
        limit: usize,
        now_ms: Millis,
    ) -> Result<Vec<AccountView>, StoreError> {
        self.usable()?;
        // The next `limit` ids, kept in a bounded set while walking the map.
        let mut ids = std::collections::BTreeSet::new();
        for stored in self.tables.accounts.iter() {
            let id = stored.key();
            if after.is_some_and(|a| id.as_str() <= a) {
                continue;
            }
            if ids.len() < limit {
                ids.insert(id.clone());
            } else if ids.last().is_some_and(|last| id < last) {
                ids.pop_last();
                ids.insert(id.clone());
            }
        }
        let mut views = Vec::with_capacity(ids.len());
        for id in ids {
            match self.read_account(&id, now_ms, |a, rules| view(a, &rules.catalog)) {
                Ok(v) => views.push(v),
                Err(StoreError::UnknownAccount(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(views)
    }

    async fn remove_member(
        &self,
        account: &str,
        member: &str,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        let removed = self.read_account(account, now_ms, |a, _| a.remove_member(member))?;
        let mut hashes = Vec::new();
        if let Ok(key_ids) = &removed {
            for key_id in key_ids {
                if let Some((_, hash)) = self.tables.key_ids.remove(key_id) {
                    self.tables.keys.remove(&hash);
                    hashes.push(hash);
                }
            }
        }
        // The member's keys may predate recorded key lists: drop any record of it.
        let orphans: Vec<[u8; 32]> = self
            .tables
            .keys
            .iter()
            .filter(|k| k.account == account && k.member == member)
            .map(|k| *k.key())
            .collect();
        for hash in orphans {
            if let Some((_, k)) = self.tables.keys.remove(&hash) {
                self.tables.key_ids.remove(&k.key_id);
                hashes.push(hash);
            }
        }
        self.persist(|| Change::account(account).with_keys(hashes), true)?
            .written()
            .await?;
        Ok(removed.map(|_| ()))
    }

    async fn add_member(
        &self,
        account: &str,
        member: &str,
        terms: &crate::ledger::MemberTerms,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        self.write(account, now_ms, |a, rules| {
            a.add_member_with(member, terms, &rules.catalog)
        })
        .await
    }

    async fn update_member(
        &self,
        account: &str,
        member: &str,
        terms: &crate::ledger::MemberTerms,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        self.write(account, now_ms, |a, _| a.set_member_terms(member, terms))
            .await
    }

    async fn add_key(
        &self,
        account: &str,
        member: &str,
        key_id: &str,
        key_sha256: &[u8; 32],
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        let listed = self.read_account(account, now_ms, |a, _| a.add_key(member, key_id))?;
        if listed.is_ok() {
            self.tables.register(account, member, key_id, key_sha256);
        }
        // Queued after both changes, so the log writes the listing and the record
        // in one commit.
        self.persist(
            || Change::account(account).with_keys(vec![*key_sha256]),
            true,
        )?
        .written()
        .await?;
        Ok(listed)
    }

    async fn revoke_key(
        &self,
        key_id: &str,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        self.usable()?;
        let Some(hash) = self.tables.key_ids.get(key_id).map(|h| *h) else {
            return Ok(Err(AccountRejected::UnknownKey));
        };
        // Off the member's active keys first, then the lookup records.
        let key = self.tables.keys.get(&hash).map(|k| k.value().clone());
        if let Some(key) = &key {
            match self.read_account(&key.account, now_ms, |a, _| {
                a.revoke_key(&key.member, key_id)
            }) {
                // An account that is gone has no key to take off.
                Ok(_) | Err(StoreError::UnknownAccount(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.tables.keys.remove(&hash);
        self.tables.key_ids.remove(key_id);
        let change = || Change {
            account: key.map(|k| k.account),
            keys: vec![hash],
            delivered: Vec::new(),
        };
        self.persist(change, true)?.written().await?;
        Ok(Ok(()))
    }

    async fn grant(
        &self,
        account: &str,
        grant: &GrantRequest,
        now_ms: Millis,
    ) -> Result<AdminOutcome<(crate::ledger::GrantReceipt, bool)>, StoreError> {
        self.write(account, now_ms, |a, rules| {
            a.grant_once(grant, now_ms, &rules.limits)
        })
        .await
    }

    async fn adjust(
        &self,
        account: &str,
        adjustment: &crate::ledger::AdjustRequest,
        now_ms: Millis,
    ) -> Result<AdminOutcome<(crate::ledger::GrantReceipt, bool)>, StoreError> {
        self.write(account, now_ms, |a, rules| {
            a.adjust(adjustment, now_ms, &rules.catalog, &rules.limits)
        })
        .await
    }

    async fn change_plan(
        &self,
        account: &str,
        plan: &str,
        effective: Effective,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        self.write(account, now_ms, |a, rules| {
            a.change_plan(plan, effective, now_ms, &rules.catalog)
        })
        .await
    }

    async fn ledger(
        &self,
        account: &str,
        limit: usize,
        before_seq: Option<u64>,
        now_ms: Millis,
    ) -> Result<Vec<Entry>, StoreError> {
        let ledger_max_entries = self.rules().limits.ledger_max_entries;
        let found = self.read(account, now_ms, |stored, _| match &stored.ledger {
            Kept::Journal(journal) => Ok(journal.page(limit, before_seq)),
            // The entries that may not be on disk yet, with the next entry's number.
            Kept::Unwritten(unwritten) => {
                let mut copied = unwritten.taken.to_vec();
                copied.extend(unwritten.fresh.iter().cloned());
                Err((copied, stored.account.next_seq()))
            }
        })?;
        match (found, &self.log) {
            (Ok(page), _) => Ok(page),
            (Err((unwritten, next_seq)), Some(log)) => {
                let shown = next_seq.saturating_sub(ledger_max_entries as u64)..next_seq;
                log.ledger(account, limit, before_seq, shown, unwritten)
                    .await
            }
            // Unreachable: only a store with a log keeps entries unwritten.
            (Err(_), None) => Err(StoreError::Corrupt(
                "entries kept for a log this store does not have".into(),
            )),
        }
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
                .read_account(id, now_ms, |a, _| collect(a))
                .map(|mut h| {
                    h.truncate(limit);
                    h
                }),
            None => {
                self.usable()?;
                let rules = self.rules();
                let mut all = Vec::new();
                for mut stored in self.tables.accounts.iter_mut() {
                    let (id, stored) = stored.pair_mut();
                    self.tick_in_walk(id, stored, now_ms, &rules)?;
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
        self.write(account, now_ms, |a, rules| {
            a.record_response(key, response.clone(), &rules.limits)
        })
        .await
    }

    async fn export(
        &self,
        since_ms: Millis,
        after: Option<&super::ExportPosition>,
        limit: usize,
    ) -> Result<Vec<(String, Entry)>, StoreError> {
        self.usable()?;
        if let Some(log) = &self.log {
            // Everything acknowledged is in the file, which answers in order.
            self.flush().await?;
            return log.export(since_ms, after, limit).await;
        }
        let mut page = super::ExportPage::new(since_ms, after, limit);
        for stored in self.tables.accounts.iter() {
            if let Kept::Journal(journal) = &stored.ledger {
                for entry in journal.iter() {
                    page.offer(stored.key(), entry);
                }
            }
        }
        Ok(page.into_entries())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.usable()?;
        // An empty change: its commit comes after everything queued before it.
        let marker = || Change::delivered(Vec::new());
        self.persist(marker, true)?.written().await
    }

    async fn pay(
        &self,
        account: &str,
        payment: &Payment,
        now_ms: Millis,
    ) -> Result<AdminOutcome<Paid>, StoreError> {
        self.write(account, now_ms, |a, rules| {
            a.pay(payment, now_ms, &rules.catalog, &rules.limits)
        })
        .await
    }

    async fn pending_events(&self, limit: usize) -> Result<(Vec<Event>, usize), StoreError> {
        self.usable()?;
        let outbox = self.tables.outbox();
        Ok((outbox.head(limit), outbox.events.len()))
    }

    async fn events_done(&self, ids: &[String]) -> Result<(), StoreError> {
        self.usable()?;
        let removed: Vec<String> = {
            let mut outbox = self.tables.outbox();
            ids.iter().filter(|id| outbox.remove(id)).cloned().collect()
        };
        // Not waited for: a removal lost in a crash only delivers an event again.
        if !removed.is_empty() {
            self.persist(|| Change::delivered(removed), false)?;
        }
        Ok(())
    }

    fn set_events(&self, rules: EventRules, max_pending: usize) {
        self.rules.write().unwrap_or_else(|e| e.into_inner()).events = Arc::new(rules);
        let dropped = {
            let mut outbox = self.tables.outbox();
            outbox.max = max_pending;
            outbox.push([])
        };
        if !dropped.is_empty() {
            let _ = self.persist(|| Change::delivered(dropped), false);
        }
    }

    fn events_dropped(&self) -> u64 {
        self.tables.outbox().dropped
    }

    fn set_catalog(&self, catalog: Arc<Catalog>, limits: Limits) {
        let mut rules = self.rules.write().unwrap_or_else(|e| e.into_inner());
        let events = rules.events.clone();
        *rules = Rules {
            catalog,
            limits,
            events,
        };
        drop(rules);
        for mut stored in self.tables.accounts.iter_mut() {
            if let Kept::Journal(journal) = &mut stored.ledger {
                journal.set_cap(limits.ledger_max_entries);
            }
        }
    }
}

impl Default for LocalStore {
    fn default() -> Self {
        LocalStore::new(Arc::default(), Limits::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::PlanTerms;
    use crate::ledger::{SeedAccount, SeedGrant};

    fn store() -> LocalStore {
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
        LocalStore::new(
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
                .settle("a", placed.hold_id, request.amount, None, 1_001)
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
            .add_member("t", "ann", &crate::ledger::MemberTerms::premium(true), 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store
                .add_member("t", "bob", &crate::ledger::MemberTerms::premium(false), 0)
                .await
                .unwrap(),
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
