//! One transition of one account: computed by the ledger core on this replica's
//! copy, committed by one Lua script that compares the version (see the module
//! docs of `store::redis`), computed again on a conflict.

use std::time::{Duration, Instant};

use super::cache::{Cached, Standing};
use super::codec::{checked_version, decode_state, encode};
use super::conn::{corrupt, Conn};
use super::keys::{account_key, ledger_key, ACCOUNTS_INDEX, HOLDS_INDEX};
use super::{earliest_hold, RedisStore, Rules, Start, LOCK_STRIPES, MAX_CACHED_ACCOUNTS};
use crate::ledger::{Account, Entry, Millis};
use crate::store::StoreError;

/// How long a transition waits at most for its account's turn (the transitions of
/// one account on one replica run one at a time) while Redis answers: a backstop.
/// Redis going down ends every wait at once (`Health::unless_gone`), so during an
/// outage a request meets at most one call that times out.
pub(super) const TURN_WAIT: Duration = Duration::from_secs(5);

/// The same for a settle or release: past it, queued to retry.
pub(super) const END_TURN_WAIT: Duration = TURN_WAIT;

impl RedisStore {
    pub(super) fn rules(&self) -> Rules {
        // A poisoned lock only means a panic elsewhere; the data is a plain Arc swap.
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Keeps `account` at `version` as this replica's copy (it was just read from
    /// Redis or committed there).
    pub(super) fn remember(&self, id: &str, version: String, account: Account) {
        let fetched = Instant::now();
        if let Some(mut cached) = self.cache.get_mut(id) {
            cached.standing.update(&account);
            cached.version = version;
            cached.account = Some(account);
            cached.fetched = fetched;
            return;
        }
        if self.cache.len() >= MAX_CACHED_ACCOUNTS {
            let shed: Vec<String> = self
                .cache
                .iter()
                .take(MAX_CACHED_ACCOUNTS / 10)
                .map(|e| e.key().clone())
                .collect();
            for key in shed {
                self.cache.remove(&key);
            }
        }
        self.cache.insert(
            id.to_string(),
            Cached {
                version,
                standing: Standing::of(&account),
                account: Some(account),
                fetched,
            },
        );
    }

    /// Takes this replica's copy of an account out of the cache to work on in
    /// place (the caller is inside the account's stripe lock, so no other
    /// transition of this replica wants it meanwhile; `identify` reads `standing`).
    pub(super) fn take_cached(&self, id: &str) -> Option<(String, Account)> {
        let mut cached = self.cache.get_mut(id)?;
        let account = cached.account.take()?;
        Some((std::mem::take(&mut cached.version), account))
    }

    /// The account as Redis has it now: `(version, account)`, `None` if absent.
    pub(super) async fn fetch(&self, id: &str) -> Result<Option<(String, Account)>, StoreError> {
        let mut conn = self.conn.clone();
        let (version, state): (Option<String>, Option<Vec<u8>>) = self
            .call(
                redis::cmd("HMGET")
                    .arg(account_key(id))
                    .arg("v")
                    .arg("s")
                    .query_async(&mut conn),
            )
            .await?;
        match (version, state) {
            (Some(v), Some(s)) => Ok(Some((checked_version(v)?, decode_state(&s)?))),
            _ => Ok(None),
        }
    }

    /// Commits `account` if Redis still has `version`: `Ok(Ok(new_version))`, or
    /// `Ok(Err(current))` with what Redis has instead.
    /// `index_at`: lower the account's hold-index entry to this expiry (one node).
    pub(super) async fn commit(
        &self,
        id: &str,
        version: &str,
        account: &Account,
        entries: &[Entry],
        index_at: Option<Millis>,
    ) -> Result<Result<String, Option<(String, Account)>>, StoreError> {
        let cap = self.rules().limits.ledger_max_entries;
        let state = encode(account)?;
        let index_at = index_at.map_or(String::new(), |at| at.to_string());
        let mut invocation = self.commit.prepare_invoke();
        invocation.key(account_key(id)).key(ledger_key(id));
        // On one node the hold index is kept in the same atomic step; in a cluster
        // it lives in another slot, so `transact` updates it after the commit.
        if let Conn::Single(_) = self.conn {
            invocation.key(HOLDS_INDEX);
        }
        invocation
            .arg(version)
            .arg(&state)
            .arg(cap)
            .arg(index_at)
            .arg(id);
        for entry in entries {
            let json = serde_json::to_string(entry)
                .map_err(|e| corrupt(format!("cannot encode a ledger entry: {e}")))?;
            invocation.arg(format!("{}-0", entry.seq)).arg(json);
        }
        let mut conn = self.conn.clone();
        let (ok, new_version, current): (i64, String, Vec<u8>) =
            self.call(invocation.invoke_async(&mut conn)).await?;
        if ok == 1 {
            return Ok(Ok(new_version));
        }
        if current.is_empty() {
            return Ok(Err(None));
        }
        Ok(Err(Some((
            checked_version(new_version)?,
            decode_state(&current)?,
        ))))
    }

    /// Applies time and `apply` to an account and commits the result atomically,
    /// retrying on a concurrent change. `fresh` = read Redis first (for reads that
    /// must not be stale); otherwise start from the cache and let the version
    /// check catch staleness.
    pub(super) async fn transact<T>(
        &self,
        id: &str,
        now_ms: Millis,
        start: Start,
        apply: impl FnMut(&mut Account, &Rules) -> T,
    ) -> Result<T, StoreError> {
        Ok(self
            .transact_at(id, now_ms, start, TURN_WAIT, apply, |_| false)
            .await?
            .0)
    }

    /// `transact`, where an outcome that `confirm` picks, computed on the cached
    /// copy without writing, is computed again on Redis's state before it is
    /// answered. A refusal needs no write, so no version check would catch a stale
    /// copy: without this, a key registered or a plan upgraded through another
    /// replica would be refused here until the copy is refreshed.
    pub(super) async fn transact_confirmed<T>(
        &self,
        id: &str,
        now_ms: Millis,
        start: Start,
        apply: impl FnMut(&mut Account, &Rules) -> T,
        confirm: impl Fn(&T) -> bool,
    ) -> Result<T, StoreError> {
        Ok(self
            .transact_at(id, now_ms, start, TURN_WAIT, apply, confirm)
            .await?
            .0)
    }

    /// `transact_confirmed`, also answering the version the account is at after it.
    pub(super) async fn transact_at<T>(
        &self,
        id: &str,
        now_ms: Millis,
        start: Start,
        turn_wait: Duration,
        mut apply: impl FnMut(&mut Account, &Rules) -> T,
        confirm: impl Fn(&T) -> bool,
    ) -> Result<(T, String), StoreError> {
        let fresh = start == Start::Fresh;
        let rules = self.rules();
        let stripe = {
            use std::hash::{BuildHasher, BuildHasherDefault};
            let hasher = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
            hasher.hash_one(id) as usize % LOCK_STRIPES
        };
        // Down: answer at once, not after a turn in the account's queue; and if
        // Redis goes down while this waits, at once then (bounded, as everything).
        #[allow(clippy::indexing_slicing)] // stripe < LOCK_STRIPES, the number of stripes
        let turn = self.stripes[stripe].lock();
        let turn = self
            .health
            .unless_gone(tokio::time::timeout(turn_wait, turn));
        let Ok(_one_at_a_time) = turn.await? else {
            return Err(StoreError::Unavailable(format!(
                "account {id}: the transitions queued before this one did not end in time"
            )));
        };
        let cached = if fresh { None } else { self.take_cached(id) };
        // Whether `current` is this replica's copy rather than what Redis answered.
        let mut from_cache = cached.is_some();
        let mut current = match cached {
            Some(hit) => Some(hit),
            None => self.fetch(id).await?,
        };
        for attempt in 0..self.max_attempts.load(std::sync::atomic::Ordering::Relaxed) {
            let Some((version, mut account)) = current.take() else {
                self.cache.remove(id);
                // An empty Redis says this of every account: is it still ours?
                self.check_marker().await?;
                return Err(StoreError::UnknownAccount(id.to_string()));
            };
            let before = earliest_hold(&account);
            account.apply_time(now_ms, &rules.catalog);
            // A step that changed nothing needs no write. Time alone changes the
            // account only through ledger entries (a refill, an expiry) or by dropping
            // lapsed idempotency records, which every replica drops alike. A hot-path
            // step changes it exactly when it writes entries, so only the other steps
            // pay for a copy to compare with (debug builds check the hot-path rule).
            let timed =
                (start != Start::HotPath || cfg!(debug_assertions)).then(|| account.clone());
            let out = apply(&mut account, &rules);
            let entries = account.take_entries();
            if entries.is_empty() {
                let unchanged = timed.as_ref().is_none_or(|t| *t == account);
                debug_assert!(
                    start != Start::HotPath || unchanged,
                    "a hot-path step changed account {id} without a ledger entry"
                );
                if unchanged {
                    if from_cache && confirm(&out) {
                        from_cache = false;
                        current = self.fetch(id).await?;
                        continue;
                    }
                    // Time may have been applied to it (an expired idempotency
                    // record dropped): every replica applies it alike.
                    self.remember(id, version.clone(), account);
                    return Ok((out, version));
                }
            }
            let after = earliest_hold(&account);
            // The index already says `before` or earlier (see COMMIT_LUA): only an
            // expiry earlier than that, or a first hold, needs writing.
            let index_at = after.filter(|a| before.is_none_or(|b| *a < b));
            let cluster = matches!(self.conn, Conn::Cluster(_));
            match self
                .commit(id, &version, &account, &entries, index_at)
                .await?
            {
                Ok(new_version) => {
                    self.remember(id, new_version.clone(), account);
                    if cluster && (before != after || attempt > 0) {
                        self.index_holds(id, after).await?;
                    }
                    return Ok((out, new_version));
                }
                // Computed again on what Redis has, which is remembered then.
                Err(theirs) => {
                    from_cache = false;
                    current = theirs;
                }
            }
        }
        Err(StoreError::Contended(format!(
            "account {id} changed {} times while one transition was computed",
            self.max_attempts.load(std::sync::atomic::Ordering::Relaxed)
        )))
    }

    /// Points `cg:holds` at an account's earliest hold expiry, or removes it. On
    /// one node the commit script does this atomically; a cluster calls this after
    /// the commit, when the earliest expiry changed (one more round trip then).
    pub(super) async fn index_holds(
        &self,
        id: &str,
        earliest: Option<Millis>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let command = match earliest {
            Some(at) => redis::cmd("ZADD")
                .arg(HOLDS_INDEX)
                .arg(at)
                .arg(id)
                .to_owned(),
            None => redis::cmd("ZREM").arg(HOLDS_INDEX).arg(id).to_owned(),
        };
        self.call(command.query_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    /// One node: `REINDEX_LUA` for one account read at `version`.
    pub(super) async fn reindex(
        &self,
        id: &str,
        version: &str,
        earliest: Option<Millis>,
    ) -> Result<(), StoreError> {
        let mut invocation = self.reindex.prepare_invoke();
        invocation
            .key(account_key(id))
            .key(HOLDS_INDEX)
            .arg(version)
            .arg(earliest.map_or(String::new(), |at| at.to_string()))
            .arg(id);
        let mut conn = self.conn.clone();
        self.call(invocation.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    /// Creates an account unless it exists: `true` when this call created it.
    pub(super) async fn create(&self, account: Account) -> Result<bool, StoreError> {
        let mut account = account;
        let entries = account.take_entries();
        let id = account.id.clone();
        // Never an account on a Redis that lost its data: seeding it anew would
        // hand out the plan's credits again.
        self.check_marker().await?;
        match self.commit(&id, "0", &account, &entries, None).await? {
            Ok(version) => {
                self.remember(&id, version, account);
                self.index_account(&id).await?;
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    /// Lists the account in [`ACCOUNTS_INDEX`] (another slot: its own command).
    async fn index_account(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        self.call(
            redis::cmd("ZADD")
                .arg(ACCOUNTS_INDEX)
                .arg(0)
                .arg(id)
                .query_async::<()>(&mut conn),
        )
        .await
    }
}
