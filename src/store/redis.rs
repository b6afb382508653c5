//! The Redis store: many gateway replicas, one truth.
//!
//! All of one account's state lives under one hash tag, so it works on Redis Cluster:
//!
//! - `cg:{acct:ID}` — a hash: `v` (version) and `s` (the account, serialized);
//! - `cg:{acct:ID}:ledger` — the account's ledger, a Stream capped at
//!   `ledger_max_entries`, entry IDs `SEQ-0`.
//!
//! Besides: `cg:key:HEX` (who a key's SHA-256 belongs to), `cg:keyid:ID` (the hash
//! of a key id, for revocation) and `cg:holds` (a sorted set: accounts by their
//! earliest hold expiry, which the sweep reads). On one node that index is kept
//! lazily — never later than the truth, sometimes earlier or stale, corrected by
//! the sweep — so a settle or release writes nothing to it (see `COMMIT_LUA`).
//!
//! **Rust computes, Lua commits.** A transition is computed by the same ledger core
//! the memory store runs — so both stores behave identically by construction — on
//! this replica's cached copy of the account, then committed by one Lua script:
//! compare the version, write the new state, append the new ledger entries. One
//! round trip, atomic. If another replica changed the account first, the script
//! answers the current state in the same reply and the replica computes again.
//! Nothing is ever applied twice: a sweep racing another sweep (or a settle) loses
//! the compare and recomputes from a state where the hold is already gone.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

use super::{
    local::view, AccountView, AdminOutcome, EndOutcome, GrantRequest, HoldOutcome, Identity,
    Quoted, Store, StoreError,
};
use crate::ledger::{
    Account, AccountRejected, Catalog, Credits, Effective, Entry, GrantReceipt, Hold, HoldRequest,
    Limits, Millis, Paid, Payment, Recorded, Totals,
};

/// How long one Redis call may take before the store counts as unavailable. A
/// healthy Redis answers in well under a millisecond; during an outage this
/// bounds how long a request waits for its 503.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);

/// Attempts at one transition before giving up under extreme contention.
const MAX_ATTEMPTS: usize = 64;

/// Accounts cached per replica; past this the cache sheds a tenth of its entries.
const MAX_CACHED_ACCOUNTS: usize = 100_000;

/// How long a cached key lookup or account read is trusted for `identify`.
/// Writes never trust the cache: the version check does, and a hold checks the
/// key, the plan's features and the member's premium switch against the state it
/// commits on (`ledger::Caller`). So the window is left only to what places no
/// hold: free operations, pass-through, the client APIs.
const IDENTITY_FRESHNESS: Duration = Duration::from_secs(5);

/// Transitions of one account on one replica run one at a time, so a replica never
/// races itself (only other replicas): one lock per stripe, accounts hashed to stripes.
const LOCK_STRIPES: usize = 1_024;

/// Where a transition starts, and how `transact` tells whether it must write.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// A hold, settle or release: from the cached copy (the version check catches a
    /// stale one); it changed the account exactly when it wrote ledger entries.
    HotPath,
    /// From the cached copy; compared whole to tell a change (an idempotency record
    /// changes without a ledger entry).
    Cached,
    /// Redis read first, for reads that must not be stale and admin steps; compared whole.
    Fresh,
}

/// Accounts one sweep visits at most.
const SWEEP_BATCH: isize = 500;

/// Accounts one listing of all holds (`GET /admin/holds`) visits at most.
const MAX_LISTED_ACCOUNTS: usize = 10_000;

/// Compare-and-set the account, append its new ledger entries and, when KEYS[3]
/// (the hold index) and ARGV[4] (an expiry) are given, lower the account's entry in
/// the index to that expiry (`ZADD LT`: never raise it), in the same atomic step.
/// Returns `{1, new_version}` or, when the version moved, `{0, version, state}`.
///
/// The index is kept lazily on one node: it must never say an account's earliest
/// hold expires *later* than it does (the sweep would come too late), but an entry
/// that is too early, or for an account with no holds left, only costs the sweep
/// one visit, which corrects it (`REINDEX_LUA`). So an ended hold writes nothing to
/// the index, and a new hold writes only when it may be the earliest.
const COMMIT_LUA: &str = r#"
local current = redis.call('HGET', KEYS[1], 'v') or '0'
if current ~= ARGV[1] then
  return {0, current, redis.call('HGET', KEYS[1], 's') or ''}
end
local next = tostring(tonumber(current) + 1)
redis.call('HSET', KEYS[1], 'v', next, 's', ARGV[2])
for i = 6, #ARGV, 2 do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], ARGV[i], 'e', ARGV[i + 1])
end
if KEYS[3] and ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[3], 'LT', ARGV[4], ARGV[5])
end
return {1, next, ''}
"#;

/// The sweep's correction of one index entry (one node): set it to the account's
/// exact earliest hold expiry (ARGV[2]; empty = remove it), but only if the account
/// is still at the version that expiry was read from (ARGV[1]). Otherwise another
/// transition came first and the entry stays as it is, at worst too early: the next
/// sweep looks again. Returns 1 when it corrected the entry.
const REINDEX_LUA: &str = r#"
if (redis.call('HGET', KEYS[1], 'v') or '0') ~= ARGV[1] then
  return 0
end
if ARGV[2] == '' then
  redis.call('ZREM', KEYS[2], ARGV[3])
else
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
end
return 1
"#;

/// One connection kind or the other; both multiplexed, both reconnecting.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// This replica's copy of one account.
struct Cached {
    version: String,
    /// `None` while a transition of this replica has the account out (it works on
    /// it in place instead of on a copy, and puts it back), or after one failed.
    account: Option<Account>,
    /// What `identify` reads, kept beside the account so it can be read while a
    /// transition has the account out.
    standing: Standing,
    fetched: Instant,
}

/// An account's plan (and the one waiting for its next refill) and the members
/// with premium switched off.
struct Standing {
    plan: String,
    pending_plan: Option<String>,
    next_refill_ms: Millis,
    premium_disabled: Vec<String>,
}

impl Standing {
    fn of(account: &Account) -> Self {
        Standing {
            plan: account.plan.clone(),
            pending_plan: account.pending_plan.clone(),
            next_refill_ms: account.next_refill_ms,
            premium_disabled: Self::disabled(account).cloned().collect(),
        }
    }

    /// The plan in force at `now_ms` (the ledger's rule, as the memory store reads it).
    fn plan_at(&self, now_ms: Millis) -> &str {
        crate::ledger::plan_in_force(
            &self.plan,
            self.pending_plan.as_deref(),
            self.next_refill_ms,
            now_ms,
        )
    }

    fn disabled(account: &Account) -> impl Iterator<Item = &String> {
        account
            .members
            .iter()
            .filter(|(_, m)| m.premium_disabled)
            .map(|(name, _)| name)
    }

    /// Brought up to date with `account`, allocating only for what changed.
    fn update(&mut self, account: &Account) {
        if self.plan != account.plan {
            self.plan.clone_from(&account.plan);
        }
        if self.pending_plan != account.pending_plan {
            self.pending_plan.clone_from(&account.pending_plan);
        }
        self.next_refill_ms = account.next_refill_ms;
        if !Self::disabled(account).eq(self.premium_disabled.iter()) {
            self.premium_disabled = Self::disabled(account).cloned().collect();
        }
    }

    fn premium_disabled(&self, member: &str) -> bool {
        self.premium_disabled.iter().any(|m| m == member)
    }
}

#[derive(Clone)]
struct KeyOwner {
    account: String,
    member: String,
    key_id: String,
    fetched: Instant,
}

/// The plans and the limits on an account's state, as the policy last set them.
#[derive(Clone)]
struct Rules {
    catalog: Arc<Catalog>,
    limits: Limits,
}

pub struct RedisStore {
    conn: Conn,
    stripes: Vec<tokio::sync::Mutex<()>>,
    commit: Script,
    reindex: Script,
    cache: DashMap<String, Cached>,
    keys: DashMap<[u8; 32], KeyOwner>,
    rules: RwLock<Rules>,
    /// Attempts at one transition: `MAX_ATTEMPTS`, or fewer in tests that contend.
    max_attempts: usize,
}

/// `cg:{acct:ID}` followed by `suffix` (built on every commit: no formatting machinery).
fn account_key_with(id: &str, suffix: &str) -> String {
    let mut key = String::with_capacity(10 + id.len() + suffix.len());
    key.push_str("cg:{acct:");
    key.push_str(id);
    key.push('}');
    key.push_str(suffix);
    key
}

fn account_key(id: &str) -> String {
    account_key_with(id, "")
}

fn ledger_key(id: &str) -> String {
    account_key_with(id, ":ledger")
}

fn key_key(hash: &[u8; 32]) -> String {
    format!("cg:key:{}", hex::encode(hash))
}

fn key_id_key(key_id: &str) -> String {
    format!("cg:keyid:{key_id}")
}

const HOLDS_INDEX: &str = "cg:holds";

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// What a failed Redis call means. A reply of a shape we never write (a value that
/// is not text where text was stored, a key of another type) is corrupt state:
/// asking again will not help, and it must never pass as an outage (an outage may
/// be forwarded unmetered). Every other failure — no connection, a timeout, a
/// server loading, read-only, out of memory, a cluster resharding — is the store
/// being unavailable.
fn failed(e: redis::RedisError) -> StoreError {
    if e.kind() == redis::ErrorKind::TypeError || e.code() == Some("WRONGTYPE") {
        corrupt(e)
    } else {
        unavailable(e)
    }
}

/// An account's version as stored in its `v` field: a decimal counter, or corrupt.
fn checked_version(version: String) -> Result<String, StoreError> {
    match version.parse::<u64>() {
        Ok(_) => Ok(version),
        Err(_) => Err(corrupt(format!(
            "an account's version in redis is not a number: {version:?}"
        ))),
    }
}

/// Runs one Redis call with the store's timeout.
async fn call<T>(
    future: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(failed(e)),
        Err(_) => Err(StoreError::Unavailable(
            "redis did not answer in time".into(),
        )),
    }
}

/// The account as stored in `cg:{acct:ID}` field `s`: MessagePack with field names
/// (a quarter of the cost of JSON to write on every commit, and smaller).
fn encode(account: &Account) -> Result<Vec<u8>, StoreError> {
    // Sized for a typical account up front: growing from empty reallocates ~8 times.
    let mut state = Vec::with_capacity(STATE_BYTES_EXPECTED);
    rmp_serde::encode::write_named(&mut state, account)
        .map_err(|e| corrupt(format!("cannot encode the account: {e}")))?;
    Ok(state)
}

/// About the size of an active account's state (grants, a few holds, the ended
/// holds it remembers); larger ones grow the buffer as usual.
const STATE_BYTES_EXPECTED: usize = 2_048;

/// Reads an account's stored state: MessagePack, or JSON as earlier versions wrote it
/// (a JSON object starts with `{`, which no MessagePack map or array does).
pub fn decode_state(state: &[u8]) -> Result<Account, StoreError> {
    let decoded = if state.first() == Some(&b'{') {
        serde_json::from_slice(state).map_err(|e| e.to_string())
    } else {
        rmp_serde::from_slice(state).map_err(|e| e.to_string())
    };
    let mut account: Account =
        decoded.map_err(|e| corrupt(format!("an account in redis does not decode: {e}")))?;
    // This layout keeps every open hold in the state: count them (states written
    // before the aggregates existed have none).
    account.rebuild_aggregates();
    account
        .check_invariant()
        .map_err(|e| corrupt(format!("an account in redis is inconsistent: {e}")))?;
    Ok(account)
}

fn earliest_hold(account: &Account) -> Option<Millis> {
    account.holds().map(|h| h.expires_at_ms).min()
}

impl RedisStore {
    /// Connects to `url` (for a cluster: any node, or several separated by commas).
    pub async fn connect(
        url: &str,
        cluster: bool,
        catalog: Arc<Catalog>,
        limits: Limits,
    ) -> Result<RedisStore, StoreError> {
        let conn = if cluster {
            let nodes: Vec<&str> = url.split(',').map(str::trim).collect();
            let client = redis::cluster::ClusterClient::builder(nodes)
                .connection_timeout(CALL_TIMEOUT)
                .response_timeout(CALL_TIMEOUT)
                .retries(2)
                .build()
                .map_err(unavailable)?;
            Conn::Cluster(call(client.get_async_connection()).await?)
        } else {
            let client = redis::Client::open(url).map_err(unavailable)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(CALL_TIMEOUT)
                .set_response_timeout(CALL_TIMEOUT)
                .set_number_of_retries(1)
                .set_max_delay(200);
            Conn::Single(call(client.get_connection_manager_with_config(config)).await?)
        };
        let store = RedisStore {
            conn,
            stripes: (0..LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            commit: Script::new(COMMIT_LUA),
            reindex: Script::new(REINDEX_LUA),
            cache: DashMap::new(),
            keys: DashMap::new(),
            rules: RwLock::new(Rules { catalog, limits }),
            max_attempts: MAX_ATTEMPTS,
        };
        // Load the script once now; `invoke_async` reloads it after a NOSCRIPT.
        let mut conn = store.conn.clone();
        call(store.commit.prepare_invoke().load_async(&mut conn)).await?;
        Ok(store)
    }

    /// The same store giving up on a transition after `attempts` lost
    /// compare-and-sets (at least one attempt), so that a test can make a
    /// transition contended with one concurrent change instead of 64.
    pub fn with_max_attempts(mut self, attempts: usize) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    fn rules(&self) -> Rules {
        // A poisoned lock only means a panic elsewhere; the data is a plain Arc swap.
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Keeps `account` at `version` as this replica's copy (it was just read from
    /// Redis or committed there).
    fn remember(&self, id: &str, version: String, account: Account) {
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
    fn take_cached(&self, id: &str) -> Option<(String, Account)> {
        let mut cached = self.cache.get_mut(id)?;
        let account = cached.account.take()?;
        Some((std::mem::take(&mut cached.version), account))
    }

    /// The account as Redis has it now: `(version, account)`, `None` if absent.
    async fn fetch(&self, id: &str) -> Result<Option<(String, Account)>, StoreError> {
        let mut conn = self.conn.clone();
        let (version, state): (Option<String>, Option<Vec<u8>>) = call(
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
    async fn commit(
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
            call(invocation.invoke_async(&mut conn)).await?;
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
    async fn transact<T>(
        &self,
        id: &str,
        now_ms: Millis,
        start: Start,
        apply: impl FnMut(&mut Account, &Rules) -> T,
    ) -> Result<T, StoreError> {
        Ok(self
            .transact_at(id, now_ms, start, apply, |_| false)
            .await?
            .0)
    }

    /// `transact`, where an outcome that `confirm` picks, computed on the cached
    /// copy without writing, is computed again on Redis's state before it is
    /// answered. A refusal needs no write, so no version check would catch a stale
    /// copy: without this, a key registered or a plan upgraded through another
    /// replica would be refused here until the copy is refreshed.
    async fn transact_confirmed<T>(
        &self,
        id: &str,
        now_ms: Millis,
        start: Start,
        apply: impl FnMut(&mut Account, &Rules) -> T,
        confirm: impl Fn(&T) -> bool,
    ) -> Result<T, StoreError> {
        Ok(self.transact_at(id, now_ms, start, apply, confirm).await?.0)
    }

    /// `transact_confirmed`, also answering the version the account is at after it.
    async fn transact_at<T>(
        &self,
        id: &str,
        now_ms: Millis,
        start: Start,
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
        #[allow(clippy::indexing_slicing)] // stripe < LOCK_STRIPES, the number of stripes
        let _one_at_a_time = self.stripes[stripe].lock().await;
        let cached = if fresh { None } else { self.take_cached(id) };
        // Whether `current` is this replica's copy rather than what Redis answered.
        let mut from_cache = cached.is_some();
        let mut current = match cached {
            Some(hit) => Some(hit),
            None => self.fetch(id).await?,
        };
        for attempt in 0..self.max_attempts {
            let Some((version, mut account)) = current.take() else {
                self.cache.remove(id);
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
            self.max_attempts
        )))
    }

    /// Points `cg:holds` at an account's earliest hold expiry, or removes it. On
    /// one node the commit script does this atomically; a cluster calls this after
    /// the commit, when the earliest expiry changed (one more round trip then).
    async fn index_holds(&self, id: &str, earliest: Option<Millis>) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let command = match earliest {
            Some(at) => redis::cmd("ZADD")
                .arg(HOLDS_INDEX)
                .arg(at)
                .arg(id)
                .to_owned(),
            None => redis::cmd("ZREM").arg(HOLDS_INDEX).arg(id).to_owned(),
        };
        call(command.query_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    /// One node: `REINDEX_LUA` for one account read at `version`.
    async fn reindex(
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
        call(invocation.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    /// Creates an account unless it exists: `true` when this call created it.
    async fn create(&self, account: Account) -> Result<bool, StoreError> {
        let mut account = account;
        let entries = account.take_entries();
        let id = account.id.clone();
        match self.commit(&id, "0", &account, &entries, None).await? {
            Ok(version) => {
                self.remember(&id, version, account);
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    async fn key_owner(&self, hash: &[u8; 32]) -> Result<Option<KeyOwner>, StoreError> {
        if let Some(owner) = self
            .keys
            .get(hash)
            .filter(|o| o.fetched.elapsed() < IDENTITY_FRESHNESS)
        {
            return Ok(Some(owner.clone()));
        }
        let mut conn = self.conn.clone();
        let found: (Option<String>, Option<String>, Option<String>) = match call(
            redis::cmd("HMGET")
                .arg(key_key(hash))
                .arg("account")
                .arg("member")
                .arg("key_id")
                .query_async(&mut conn),
        )
        .await
        {
            Ok(found) => found,
            // Redis is down: a key seen before still identifies its owner.
            Err(e @ StoreError::Unavailable(_)) => {
                return self.keys.get(hash).map(|o| Some(o.clone())).ok_or(e)
            }
            Err(e) => return Err(e),
        };
        match found {
            (Some(account), Some(member), key_id) => {
                let owner = KeyOwner {
                    account,
                    member,
                    // Every key record has carried its id since keys were stored.
                    key_id: key_id.unwrap_or_default(),
                    fetched: Instant::now(),
                };
                self.keys.insert(*hash, owner.clone());
                Ok(Some(owner))
            }
            _ => {
                self.keys.remove(hash);
                Ok(None)
            }
        }
    }

    async fn register_key(
        &self,
        account: &str,
        member: &str,
        key_id: &str,
        hash: &[u8; 32],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        // Two keys in two slots: two commands (a cluster refuses them in one
        // pipeline). The key works once its record exists; the id only revokes it.
        let record = redis::cmd("HSET")
            .arg(key_key(hash))
            .arg("account")
            .arg(account)
            .arg("member")
            .arg(member)
            .arg("key_id")
            .arg(key_id)
            .to_owned();
        call(record.query_async::<()>(&mut conn)).await?;
        let id = redis::cmd("SET")
            .arg(key_id_key(key_id))
            .arg(hex::encode(hash))
            .to_owned();
        call(id.query_async::<()>(&mut conn)).await?;
        self.keys.remove(hash);
        Ok(())
    }

    /// Removes everything this store wrote, for tests that reuse one server.
    pub async fn flush_for_tests(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        call(redis::cmd("FLUSHALL").query_async::<()>(&mut conn)).await?;
        self.cache.clear();
        self.keys.clear();
        Ok(())
    }
}

#[async_trait]
impl Store for RedisStore {
    // Who a key is needs no write: it reads the cached (or fetched) account without
    // applying time, and names the plan in force at `now_ms` as the ledger rules it.
    async fn identify(
        &self,
        key_sha256: &[u8; 32],
        now_ms: Millis,
    ) -> Result<Option<Identity>, StoreError> {
        let Some(owner) = self.key_owner(key_sha256).await? else {
            return Ok(None);
        };
        // The plan in force and the member's flag, read in place: no copy of the account.
        let standing = |cached: &Cached| {
            (
                cached.standing.plan_at(now_ms).to_string(),
                cached.standing.premium_disabled(&owner.member),
            )
        };
        let recent = self
            .cache
            .get(&owner.account)
            .filter(|c| c.fetched.elapsed() < IDENTITY_FRESHNESS)
            .map(|c| standing(&c));
        let (plan, premium_disabled) = match recent {
            Some(found) => found,
            None => match self.fetch(&owner.account).await {
                Ok(Some((version, account))) => {
                    let found = (
                        account.plan_at(now_ms).to_string(),
                        account
                            .members
                            .get(&owner.member)
                            .is_some_and(|m| m.premium_disabled),
                    );
                    self.remember(&owner.account, version, account);
                    found
                }
                Ok(None) => return Ok(None),
                // Redis is down: an account seen before still answers who it is.
                Err(e @ StoreError::Unavailable(_)) => self
                    .cache
                    .get(&owner.account)
                    .map(|c| standing(&c))
                    .ok_or(e)?,
                Err(e) => return Err(e),
            },
        };
        Ok(Some(Identity {
            premium_disabled,
            account: owner.account,
            member: owner.member,
            key_id: owner.key_id,
            plan,
        }))
    }

    async fn hold(
        &self,
        account: &str,
        request: &HoldRequest,
        now_ms: Millis,
    ) -> Result<HoldOutcome, StoreError> {
        // A hold on the cached copy that commits was checked on Redis's state (the
        // version matched); a refusal writes nothing, so it is checked there again:
        // a top-up, an upgrade or a hold ended through another replica counts at once.
        // (One more read per refusal; a placed hold costs nothing more.)
        self.transact_confirmed(
            account,
            now_ms,
            Start::HotPath,
            |a, rules| a.hold(request, now_ms, &rules.catalog),
            |out| out.is_err(),
        )
        .await
    }

    async fn quote(
        &self,
        account: &str,
        request: &HoldRequest,
        now_ms: Millis,
    ) -> Result<Quoted, StoreError> {
        // Redis's state, as a refused hold confirms it (never this replica's copy,
        // which may be stale), with time applied to a copy: nothing is committed or
        // cached. What time changed is written by the account's next transition.
        let rules = self.rules();
        let Some((_, mut state)) = self.fetch(account).await? else {
            return Err(StoreError::UnknownAccount(account.to_string()));
        };
        state.apply_time(now_ms, &rules.catalog);
        Ok(Quoted::of(&state, request, &rules.catalog))
    }

    async fn settle(
        &self,
        account: &str,
        hold_id: u64,
        charge: Credits,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError> {
        self.transact(account, now_ms, Start::HotPath, |a, rules| {
            a.settle(hold_id, charge, now_ms, &rules.limits)
        })
        .await
    }

    async fn release(
        &self,
        account: &str,
        hold_id: u64,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError> {
        self.transact(account, now_ms, Start::HotPath, |a, _| {
            a.release(hold_id, now_ms)
        })
        .await
    }

    async fn totals(&self, account: &str, now_ms: Millis) -> Result<Totals, StoreError> {
        self.transact(account, now_ms, Start::Fresh, |a, _| a.totals())
            .await
    }

    async fn account(&self, account: &str, now_ms: Millis) -> Result<AccountView, StoreError> {
        self.transact(account, now_ms, Start::Fresh, |a, rules| {
            view(a, &rules.catalog)
        })
        .await
    }

    async fn seed(
        &self,
        seed: &crate::ledger::SeedAccount,
        now_ms: Millis,
    ) -> Result<bool, StoreError> {
        // An existing account is left as it is: a seeded key revoked since stays
        // revoked (its record is not written again), no member is added past seats.
        if self.fetch(&seed.id).await?.is_some() {
            return Ok(false);
        }
        let account = Account::seeded(seed, &self.rules().catalog, now_ms);
        // Key records before the account: a seed cut off in between leaves records
        // of an account that does not exist (their keys identify nobody), and the
        // next start, finding no account, writes them again and creates it.
        for key in &seed.keys {
            self.register_key(
                &seed.id,
                &key.member,
                &crate::ledger::seed_key_id(&key.key_sha256),
                &key.key_sha256,
            )
            .await?;
        }
        // Another replica seeding the same policy may create it first: the same account.
        self.create(account).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        call(redis::cmd("PING").query_async::<()>(&mut conn)).await
    }

    async fn sweep(&self, now_ms: Millis) -> Result<usize, StoreError> {
        let mut conn = self.conn.clone();
        let due: Vec<String> = call(
            redis::cmd("ZRANGEBYSCORE")
                .arg(HOLDS_INDEX)
                .arg("-inf")
                .arg(now_ms)
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_BATCH)
                .query_async(&mut conn),
        )
        .await?;
        let mut ended = 0;
        for id in due {
            // `transact` applies time first: count the holds that expired there.
            let swept = self
                .transact_at(
                    &id,
                    now_ms,
                    Start::Fresh,
                    |a, _| (a.holds_expired_since_taken(), earliest_hold(a)),
                    |_| false,
                )
                .await;
            match swept {
                Ok(((n, earliest), version)) => {
                    ended += n;
                    match self.conn {
                        // The entry was due, and may be stale (the index is lazy):
                        // set it exactly, unless the account moved on meanwhile.
                        Conn::Single(_) => self.reindex(&id, &version, earliest).await?,
                        // Nothing expired, yet the entry was due: it is stale, correct it.
                        Conn::Cluster(_) if n == 0 => self.index_holds(&id, earliest).await?,
                        Conn::Cluster(_) => {}
                    }
                }
                Err(StoreError::UnknownAccount(_)) => self.index_holds(&id, None).await?,
                Err(e) => return Err(e),
            }
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
        let Rules { catalog, .. } = self.rules();
        let Some(terms) = catalog.get(plan) else {
            return Ok(Err(AccountRejected::UnknownPlan));
        };
        let account = Account::open(id, plan, billing_anchor_day, terms, now_ms);
        let shown = view(&account, &catalog);
        if self.create(account).await? {
            Ok(Ok(shown))
        } else {
            Ok(Err(AccountRejected::AccountExists))
        }
    }

    async fn add_member(
        &self,
        account: &str,
        member: &str,
        premium_disabled: bool,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        self.transact(account, now_ms, Start::Fresh, |a, rules| {
            a.add_member(member, premium_disabled, &rules.catalog)
        })
        .await
    }

    async fn update_member(
        &self,
        account: &str,
        member: &str,
        premium_disabled: bool,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        self.transact(account, now_ms, Start::Fresh, |a, _| {
            a.update_member(member, premium_disabled)
        })
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
        // Listed as active first, then its record: a key works once both exist.
        let listed = self
            .transact(account, now_ms, Start::Fresh, |a, _| {
                a.add_key(member, key_id)
            })
            .await?;
        if listed.is_ok() {
            self.register_key(account, member, key_id, key_sha256)
                .await?;
        }
        Ok(listed)
    }

    async fn revoke_key(
        &self,
        key_id: &str,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        let mut conn = self.conn.clone();
        let hash: Option<String> = call(
            redis::cmd("GET")
                .arg(key_id_key(key_id))
                .query_async(&mut conn),
        )
        .await?;
        let Some(hex_hash) = hash else {
            return Ok(Err(AccountRejected::UnknownKey));
        };
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&hex_hash, &mut bytes)
            .map_err(|e| corrupt(format!("key id {key_id} maps to no key hash: {e}")))?;
        let owner: (Option<String>, Option<String>) = call(
            redis::cmd("HMGET")
                .arg(key_key(&bytes))
                .arg("account")
                .arg("member")
                .query_async(&mut conn),
        )
        .await?;
        // Off the member's active keys first: from this commit on, no replica places
        // a hold for the key, whatever it cached. Then the records, so it stops
        // identifying anyone (other replicas' caches forget it within
        // IDENTITY_FRESHNESS). A revocation cut off in between is completed by
        // repeating it: the id is still there.
        if let (Some(account), Some(member)) = owner {
            let revoked = self
                .transact(&account, now_ms, Start::Fresh, |a, _| {
                    a.revoke_key(&member, key_id)
                })
                .await;
            match revoked {
                // An account that is gone has no key to take off.
                Ok(_) | Err(StoreError::UnknownAccount(_)) => {}
                Err(e) => return Err(e),
            }
        }
        call(
            redis::cmd("DEL")
                .arg(key_key(&bytes))
                .query_async::<()>(&mut conn),
        )
        .await?;
        call(
            redis::cmd("DEL")
                .arg(key_id_key(key_id))
                .query_async::<()>(&mut conn),
        )
        .await?;
        self.keys.remove(&bytes);
        Ok(Ok(()))
    }

    async fn grant(
        &self,
        account: &str,
        grant: &GrantRequest,
        now_ms: Millis,
    ) -> Result<AdminOutcome<(GrantReceipt, bool)>, StoreError> {
        self.transact(account, now_ms, Start::Fresh, |a, rules| {
            a.grant_once(grant, now_ms, &rules.limits)
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
        self.transact(account, now_ms, Start::Fresh, |a, rules| {
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
        // Apply time first, so due refills and expiries are in the ledger.
        let next_seq = self
            .transact(account, now_ms, Start::Fresh, |a, _| a.next_seq())
            .await?;
        let end = match before_seq {
            Some(seq) => format!("({seq}-0"),
            None => "+".to_string(),
        };
        // The stream is trimmed in whole blocks (`MAXLEN ~`, far cheaper on every
        // commit than trimming exactly), so it may hold a few entries past the cap:
        // show exactly the newest `ledger_max_entries`, as the memory store does.
        let cap = self.rules().limits.ledger_max_entries;
        let oldest = format!("{}-0", next_seq.saturating_sub(cap as u64));
        let mut conn = self.conn.clone();
        let rows: Vec<(String, Vec<(String, String)>)> = call(
            redis::cmd("XREVRANGE")
                .arg(ledger_key(account))
                .arg(end)
                .arg(oldest)
                .arg("COUNT")
                .arg(limit)
                .query_async(&mut conn),
        )
        .await?;
        rows.into_iter()
            .filter_map(|(_, fields)| fields.into_iter().find(|(k, _)| k == "e").map(|(_, v)| v))
            .map(|json| {
                serde_json::from_str(&json)
                    .map_err(|e| corrupt(format!("a ledger entry does not decode: {e}")))
            })
            .collect()
    }

    async fn holds(
        &self,
        account: Option<&str>,
        limit: usize,
        now_ms: Millis,
    ) -> Result<Vec<(String, Hold)>, StoreError> {
        let mut all = Vec::new();
        // All accounts: page through the hold index, whose entries may be stale
        // (an account with no holds left), so a page can hold fewer than it lists.
        let page = limit.clamp(1, SWEEP_BATCH as usize);
        let mut visited = 0;
        while all.len() < limit && visited < MAX_LISTED_ACCOUNTS {
            let ids: Vec<String> = match account {
                Some(id) if visited == 0 => vec![id.to_string()],
                Some(_) => break,
                None => {
                    let mut conn = self.conn.clone();
                    call(
                        redis::cmd("ZRANGE")
                            .arg(HOLDS_INDEX)
                            .arg(visited)
                            .arg(visited + page - 1)
                            .query_async(&mut conn),
                    )
                    .await?
                }
            };
            if ids.is_empty() {
                break;
            }
            visited += ids.len();
            for id in ids {
                let holds = match self
                    .transact(&id, now_ms, Start::Fresh, |a, _| {
                        a.holds().cloned().collect::<Vec<_>>()
                    })
                    .await
                {
                    Ok(h) => h,
                    Err(StoreError::UnknownAccount(_)) if account.is_none() => continue,
                    Err(e) => return Err(e),
                };
                all.extend(holds.into_iter().map(|h| (id.clone(), h)));
            }
        }
        all.truncate(limit);
        Ok(all)
    }

    async fn record_response(
        &self,
        account: &str,
        key: &str,
        response: &Recorded,
        now_ms: Millis,
    ) -> Result<bool, StoreError> {
        self.transact(account, now_ms, Start::Cached, |a, rules| {
            a.record_response(key, response.clone(), &rules.limits)
        })
        .await
    }

    async fn pay(
        &self,
        account: &str,
        payment: &Payment,
        now_ms: Millis,
    ) -> Result<AdminOutcome<Paid>, StoreError> {
        self.transact(account, now_ms, Start::Fresh, |a, rules| {
            a.pay(payment, now_ms, &rules.catalog, &rules.limits)
        })
        .await
    }

    fn set_catalog(&self, catalog: Arc<Catalog>, limits: Limits) {
        let mut rules = self.rules.write().unwrap_or_else(|e| e.into_inner());
        *rules = Rules { catalog, limits };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Credits, HoldRequest, PlanTerms};

    /// A JSON value as MessagePack writes it. serde_json keeps numbers exact
    /// (`arbitrary_precision`) by serializing each as a one-entry map outside JSON,
    /// so a `Value` is never handed to MessagePack as it is: its numbers (all
    /// integers in an account) are written as integers here.
    struct AsMessagePack<'a>(&'a serde_json::Value);

    impl serde::Serialize for AsMessagePack<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::{Error, SerializeMap, SerializeSeq};
            match self.0 {
                serde_json::Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                    (Some(u), _) => s.serialize_u64(u),
                    (None, Some(i)) => s.serialize_i64(i),
                    _ => Err(S::Error::custom(format!("{n} is not an integer"))),
                },
                serde_json::Value::Array(items) => {
                    let mut seq = s.serialize_seq(Some(items.len()))?;
                    for item in items {
                        seq.serialize_element(&AsMessagePack(item))?;
                    }
                    seq.end()
                }
                serde_json::Value::Object(fields) => {
                    let mut map = s.serialize_map(Some(fields.len()))?;
                    for (name, value) in fields {
                        map.serialize_entry(name, &AsMessagePack(value))?;
                    }
                    map.end()
                }
                other => other.serialize(s),
            }
        }
    }

    #[test]
    fn the_standing_identify_reads_follows_the_account() {
        let mut account = Account::new("team", "free");
        let catalog = Catalog::from([(
            "free".to_string(),
            PlanTerms {
                seats: 5,
                ..PlanTerms::default()
            },
        )]);
        account.add_member("ann", false, &catalog).unwrap();
        account.add_member("bob", false, &catalog).unwrap();
        let mut standing = Standing::of(&account);
        assert_eq!(standing.plan, "free");
        assert!(!standing.premium_disabled("bob"));

        account.update_member("bob", true).unwrap();
        account.plan = "pro".into();
        standing.update(&account);
        assert_eq!(standing.plan, "pro");
        assert!(standing.premium_disabled("bob"));
        assert!(!standing.premium_disabled("ann"));

        account.update_member("bob", false).unwrap();
        standing.update(&account);
        assert!(!standing.premium_disabled("bob"));
    }

    #[test]
    fn states_read_back_from_messagepack_and_from_earlier_json() {
        let mut account = Account::new("acme", "pro");
        let credits = |text: &str| text.parse::<Credits>().unwrap();
        account.grant("topup", credits("10"), 30, None, 0).unwrap();
        let request = HoldRequest {
            operation: "op".into(),
            request_id: "r".into(),
            amount: credits("1.5"),
            ttl_ms: 1_000,
            max_holds: 8,
            quota: None,
            idempotency: None,
            caller: None,
            terms: crate::ledger::HoldTerms::default(),
        };
        let placed = account.hold(&request, 0, &Catalog::new()).unwrap();
        account
            .settle(placed.hold_id, credits("1"), 1, &Limits::default())
            .unwrap();
        account.hold(&request, 2, &Catalog::new()).unwrap();
        account.take_entries();

        let packed = encode(&account).unwrap();
        assert_ne!(packed.first(), Some(&b'{'));
        assert_eq!(decode_state(&packed).unwrap(), account);
        let json = serde_json::to_vec(&account).unwrap();
        assert_eq!(decode_state(&json).unwrap(), account);
        assert!(decode_state(b"{\"id\":").is_err());
        assert!(decode_state(&packed[..packed.len() / 2]).is_err());
    }

    #[test]
    fn members_active_keys_read_back_and_states_without_them_still_load() {
        let catalog = Catalog::new();
        let mut account = Account::new("acme", "pro");
        account.add_member("ann", false, &catalog).unwrap();
        account.add_key("ann", "key_1").unwrap();
        account.add_key("ann", "key_2").unwrap();
        assert!(account.revoke_key("ann", "key_1"));
        let packed = encode(&account).unwrap();
        let back = decode_state(&packed).unwrap();
        assert_eq!(back, account);
        let keys = back.members["ann"].keys.clone().unwrap();
        assert_eq!(keys.into_iter().collect::<Vec<_>>(), ["key_2"]);

        // As an earlier version wrote it: members without a key list, as
        // MessagePack and as JSON. They load as "not recorded".
        let mut earlier = serde_json::to_value(&account).unwrap();
        earlier["members"]["ann"]
            .as_object_mut()
            .unwrap()
            .remove("keys")
            .unwrap();
        let packed = rmp_serde::to_vec_named(&AsMessagePack(&earlier)).unwrap();
        let json = serde_json::to_vec(&earlier).unwrap();
        for state in [packed, json] {
            let loaded = decode_state(&state).unwrap();
            assert_eq!(loaded.members["ann"].keys, None);
            // And stays so: listing only new keys would refuse the member's older ones.
            let mut loaded = loaded;
            loaded.add_key("ann", "key_3").unwrap();
            assert_eq!(loaded.members["ann"].keys, None);
            assert_eq!(decode_state(&encode(&loaded).unwrap()).unwrap(), loaded);
        }
    }
}
