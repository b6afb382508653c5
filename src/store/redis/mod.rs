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

mod cache;
mod codec;
mod conn;
mod health;
mod keys;
mod transact;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use redis::aio::ConnectionManagerConfig;
use redis::Script;

use super::{
    local::view, AccountView, AdminOutcome, EndOutcome, GrantRequest, HoldOutcome, Identity,
    PendingEndsView, Quoted, Store, StoreError,
};
use crate::ledger::{
    Account, AccountRejected, Catalog, Credits, Effective, Entry, GrantReceipt, Hold, HoldRequest,
    Limits, Millis, Recorded, Totals,
};
use cache::{Cached, KeyOwner};
pub use codec::decode_state;
use conn::{call, corrupt, unavailable, Conn, CALL_TIMEOUT};
use health::{Health, PendingEnd, PendingEnds, MARKER_CHECK_INTERVAL, PROBE_INTERVAL};
use keys::{key_id_key, key_key, ledger_key, ACCOUNTS_INDEX, HOLDS_INDEX, MARKER};

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
const COMMIT_LUA: &str = include_str!("commit.lua");

/// The sweep's correction of one index entry (one node): set it to the account's
/// exact earliest hold expiry (ARGV[2]; empty = remove it), but only if the account
/// is still at the version that expiry was read from (ARGV[1]). Otherwise another
/// transition came first and the entry stays as it is, at worst too early: the next
/// sweep looks again. Returns 1 when it corrected the entry.
const REINDEX_LUA: &str = include_str!("reindex.lua");

/// The plans and the limits on an account's state, as the policy last set them.
#[derive(Clone)]
struct Rules {
    catalog: Arc<Catalog>,
    limits: Limits,
}

/// A handle on one store: clones share it (the monitor holds a weak one).
#[derive(Clone)]
pub struct RedisStore(Arc<Shared>);

impl std::ops::Deref for RedisStore {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    conn: Conn,
    stripes: Vec<tokio::sync::Mutex<()>>,
    commit: Script,
    reindex: Script,
    cache: DashMap<String, Cached>,
    keys: DashMap<[u8; 32], KeyOwner>,
    rules: RwLock<Rules>,
    /// Attempts at one transition: `MAX_ATTEMPTS`, or fewer in tests that contend.
    max_attempts: AtomicUsize,
    /// Up, down or lost: whether calls are tried at all (see `health`).
    health: Arc<Health>,
    /// The data marker's value in this Redis, as this process found or wrote it.
    marker: String,
    /// Settles and releases to write when Redis is back.
    pending: PendingEnds,
}

/// The store's monitor, for as long as the store lives: while Redis is up it checks
/// the data marker now and then; once a call finds Redis down (it wakes the monitor)
/// or the marker gone, it probes until Redis is back and recovered (`recover`).
async fn monitor(store: Weak<Shared>, health: Arc<Health>) {
    loop {
        let Some(shared) = store.upgrade() else {
            return;
        };
        let store = RedisStore(shared);
        let pause = if store.health.is_up() && store.pending.len() > 0 {
            // Ends queued while Redis answered (they waited too long for their turn).
            let _ = store.recover().await;
            PROBE_INTERVAL
        } else if store.health.is_up() {
            // A failure marks the store down or lost by itself.
            let _ = store.check_marker().await;
            MARKER_CHECK_INTERVAL
        } else {
            if store.recover().await.is_ok() {
                store.health.up();
            }
            PROBE_INTERVAL
        };
        // Not kept alive by its own monitor while it sleeps.
        drop(store);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = health.woken() => {}
        }
    }
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
        // Load the script once now; `invoke_async` reloads it after a NOSCRIPT.
        let commit = Script::new(COMMIT_LUA);
        let mut loading = conn.clone();
        call(commit.prepare_invoke().load_async(&mut loading)).await?;
        let marker = Self::find_or_write_marker(&conn).await?;
        let health = Arc::new(Health::default());
        let store = RedisStore(Arc::new(Shared {
            conn,
            stripes: (0..LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            commit,
            reindex: Script::new(REINDEX_LUA),
            cache: DashMap::new(),
            keys: DashMap::new(),
            rules: RwLock::new(Rules { catalog, limits }),
            max_attempts: AtomicUsize::new(MAX_ATTEMPTS),
            health: health.clone(),
            marker,
            pending: PendingEnds::default(),
        }));
        tokio::spawn(monitor(Arc::downgrade(&store.0), health));
        Ok(store)
    }

    /// The data marker this Redis carries, written first if it has none. A
    /// process's first start is the only moment one is written: a Redis without it
    /// is taken for a new deployment (said loudly). A running process that finds it
    /// gone answers as unavailable and never writes it again (see `health`).
    async fn find_or_write_marker(conn: &Conn) -> Result<String, StoreError> {
        let mut conn = conn.clone();
        let found: Option<String> =
            call(redis::cmd("GET").arg(MARKER).query_async(&mut conn)).await?;
        if let Some(marker) = found {
            return Ok(marker);
        }
        let keys: i64 = call(redis::cmd("DBSIZE").query_async(&mut conn)).await?;
        let fresh = format!("{:032x}", rand::random::<u128>());
        let written: Option<String> = call(
            redis::cmd("SET")
                .arg(MARKER)
                .arg(&fresh)
                .arg("NX")
                .query_async(&mut conn),
        )
        .await?;
        if written.is_some() {
            tracing::warn!(
                keys_found = keys,
                marker = %fresh,
                "redis carries no creditgate data marker: taking it for a NEW deployment and \
                 marking it. If this Redis lost its data, stop every gateway now and restore it: \
                 accounts would be seeded anew"
            );
            return Ok(fresh);
        }
        // Another replica marked it first.
        let found: Option<String> =
            call(redis::cmd("GET").arg(MARKER).query_async(&mut conn)).await?;
        found.ok_or_else(|| unavailable("redis lost the data marker just written"))
    }

    /// The same store giving up on a transition after `attempts` lost
    /// compare-and-sets (at least one attempt), so that a test can make a
    /// transition contended with one concurrent change instead of 64.
    pub fn with_max_attempts(self, attempts: usize) -> Self {
        self.max_attempts.store(attempts.max(1), Ordering::Relaxed);
        self
    }

    /// Runs one Redis call: at once refused while Redis is down or lost its data,
    /// else under the store's deadline; a call that finds it unavailable marks it
    /// down for every call (fail fast) and wakes the monitor.
    pub(super) async fn call<T>(
        &self,
        future: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        if let Some(refused) = self.health.refusal() {
            return Err(refused);
        }
        let out = call(future).await;
        if let Err(StoreError::Unavailable(_)) = &out {
            self.health.down();
        }
        out
    }

    /// Whether Redis still carries this process's data marker; marks the store
    /// lost when it does not. Asked whenever Redis says an account or key is not
    /// there (an empty Redis says so of every one) and by the monitor.
    pub(super) async fn check_marker(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let found: Option<String> = self
            .call(redis::cmd("GET").arg(MARKER).query_async(&mut conn))
            .await?;
        if found.as_deref() == Some(self.marker.as_str()) {
            Ok(())
        } else {
            self.health.lost();
            Err(health::lost())
        }
    }

    /// Brings the store back after an outage (the monitor's calls pass the gate):
    /// Redis answers, still carries the marker, and every queued end is written —
    /// before any new request runs, so no hold expires ahead of its settle.
    async fn recover(&self) -> Result<(), StoreError> {
        health::recovering(async {
            let mut conn = self.conn.clone();
            self.call(redis::cmd("PING").query_async::<()>(&mut conn))
                .await?;
            self.check_marker().await?;
            while let Some(end) = self.pending.pop() {
                let outcome = match end.charge {
                    Some(charge) => {
                        self.settle_now(
                            &end.account,
                            end.hold_id,
                            charge,
                            end.usage.as_deref(),
                            end.now_ms,
                        )
                        .await
                    }
                    None => {
                        self.release_now(&end.account, end.hold_id, end.now_ms)
                            .await
                    }
                };
                match outcome {
                    Err(e @ StoreError::Unavailable(_)) => {
                        self.pending.push_front(end);
                        return Err(e);
                    }
                    // Other replicas changed the account on every attempt: kept, and
                    // tried again by the monitor's next round (Redis itself is up).
                    Err(StoreError::Contended(_)) => {
                        self.pending.push(end);
                        break;
                    }
                    Ok(Ok(ended)) => tracing::warn!(
                        account = %end.account,
                        hold = end.hold_id,
                        charged = %ended.charged,
                        "an end queued during the outage is written"
                    ),
                    other => tracing::error!(
                        account = %end.account,
                        hold = end.hold_id,
                        "an end queued during the outage could not be written: {other:?}"
                    ),
                }
            }
            Ok(())
        })
        .await
    }

    async fn settle_now(
        &self,
        account: &str,
        hold_id: u64,
        charge: Credits,
        usage: Option<&str>,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError> {
        let settle = |a: &mut Account, rules: &Rules| {
            a.settle_metered(hold_id, charge, usage, now_ms, &rules.limits)
        };
        let ended = self.transact_at(
            account,
            now_ms,
            Start::HotPath,
            transact::END_TURN_WAIT,
            settle,
            |_| false,
        );
        Ok(ended.await?.0)
    }

    async fn release_now(
        &self,
        account: &str,
        hold_id: u64,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError> {
        let release = |a: &mut Account, _: &Rules| a.release(hold_id, now_ms);
        let ended = self.transact_at(
            account,
            now_ms,
            Start::HotPath,
            transact::END_TURN_WAIT,
            release,
            |_| false,
        );
        Ok(ended.await?.0)
    }

    /// An end that failed as unavailable or contended is kept to write later.
    fn keep_to_retry(
        &self,
        outcome: Result<EndOutcome, StoreError>,
        end: PendingEnd,
    ) -> Result<EndOutcome, StoreError> {
        // Neither kind wrote anything: Redis was down, or other replicas changed the
        // account on every attempt. Dropped, either would leave a delivered answer
        // uncharged (its hold expiring); kept, it is written once, later.
        if let Err(StoreError::Unavailable(_) | StoreError::Contended(_)) = &outcome {
            self.pending.push(end);
        }
        outcome
    }

    /// Drops a key's lookup records (its hash's and its id's), if it has any.
    async fn drop_key_records(&self, key_id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let hash: Option<String> = self
            .call(
                redis::cmd("GET")
                    .arg(key_id_key(key_id))
                    .query_async(&mut conn),
            )
            .await?;
        if let Some(hex_hash) = hash {
            let mut bytes = [0u8; 32];
            hex::decode_to_slice(&hex_hash, &mut bytes)
                .map_err(|e| corrupt(format!("key id {key_id} maps to no key hash: {e}")))?;
            self.call(
                redis::cmd("DEL")
                    .arg(key_key(&bytes))
                    .query_async::<()>(&mut conn),
            )
            .await?;
            self.keys.remove(&bytes);
        }
        self.call(
            redis::cmd("DEL")
                .arg(key_id_key(key_id))
                .query_async::<()>(&mut conn),
        )
        .await
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
        let found: (Option<String>, Option<String>, Option<String>) = match self
            .call(
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
                // An empty Redis knows no key: is it still ours?
                self.check_marker().await?;
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
        self.call(record.query_async::<()>(&mut conn)).await?;
        let id = redis::cmd("SET")
            .arg(key_id_key(key_id))
            .arg(hex::encode(hash))
            .to_owned();
        self.call(id.query_async::<()>(&mut conn)).await?;
        self.keys.remove(hash);
        Ok(())
    }

    /// Removes everything this store wrote, for tests that reuse one server; the
    /// data marker is written again (this is no data loss).
    pub async fn flush_for_tests(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        self.call(redis::cmd("FLUSHALL").query_async::<()>(&mut conn))
            .await?;
        let marker = redis::cmd("SET").arg(MARKER).arg(&self.marker).to_owned();
        self.call(marker.query_async::<()>(&mut conn)).await?;
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
                cached.standing.features_disabled(&owner.member),
            )
        };
        let recent = self
            .cache
            .get(&owner.account)
            .filter(|c| c.fetched.elapsed() < IDENTITY_FRESHNESS)
            .map(|c| standing(&c));
        let (plan, premium_disabled, disabled_features) = match recent {
            Some(found) => found,
            None => match self.fetch(&owner.account).await {
                Ok(Some((version, account))) => {
                    let member = account.members.get(&owner.member);
                    let found = (
                        account.plan_at(now_ms).to_string(),
                        member.is_some_and(|m| m.premium_disabled),
                        member
                            .map(|m| m.disabled_features.clone())
                            .unwrap_or_default(),
                    );
                    self.remember(&owner.account, version, account);
                    found
                }
                Ok(None) => {
                    self.check_marker().await?;
                    return Ok(None);
                }
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
            disabled_features,
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
        usage: Option<&str>,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError> {
        let outcome = self
            .settle_now(account, hold_id, charge, usage, now_ms)
            .await;
        let end = PendingEnd {
            account: account.to_string(),
            hold_id,
            charge: Some(charge),
            usage: usage.map(str::to_string),
            now_ms,
        };
        self.keep_to_retry(outcome, end)
    }

    async fn release(
        &self,
        account: &str,
        hold_id: u64,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError> {
        let outcome = self.release_now(account, hold_id, now_ms).await;
        let end = PendingEnd {
            account: account.to_string(),
            hold_id,
            charge: None,
            usage: None,
            now_ms,
        };
        self.keep_to_retry(outcome, end)
    }

    fn pending_ends(&self) -> PendingEndsView {
        PendingEndsView {
            queued: self.pending.len(),
            dropped: self.pending.dropped(),
        }
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
        // Absent: on a Redis that lost its data, every account is. Write nothing then.
        self.check_marker().await?;
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
        // Down or lost: say so at once (`/readyz`), without a call.
        if let Some(refused) = self.health.refusal() {
            return Err(refused);
        }
        let mut conn = self.conn.clone();
        self.call(redis::cmd("PING").query_async::<()>(&mut conn))
            .await
    }

    async fn sweep(&self, now_ms: Millis) -> Result<usize, StoreError> {
        let mut conn = self.conn.clone();
        let due: Vec<String> = self
            .call(
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
                    transact::TURN_WAIT,
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

    async fn onboard(
        &self,
        id: &str,
        plan: &str,
        billing_anchor_day: Option<u8>,
        onboarding: &crate::ledger::Onboarding,
        now_ms: Millis,
    ) -> Result<AdminOutcome<AccountView>, StoreError> {
        let Rules { catalog, limits } = self.rules();
        let Some(terms) = catalog.get(plan) else {
            return Ok(Err(AccountRejected::UnknownPlan));
        };
        let mut account = Account::open(id, plan, billing_anchor_day, terms, now_ms);
        if let Err(refused) = account.onboard(onboarding, now_ms, &catalog, &limits) {
            return Ok(Err(refused));
        }
        let shown = view(&account, &catalog);
        if !self.create(account).await? {
            return Ok(Err(AccountRejected::AccountExists));
        }
        // Listed as active in the account just written; the records make them work.
        for key in &onboarding.keys {
            self.register_key(id, &key.member, &key.key_id, &key.key_sha256)
                .await?;
        }
        Ok(Ok(shown))
    }

    async fn update_metadata(
        &self,
        account: &str,
        changes: &std::collections::BTreeMap<String, Option<String>>,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        self.transact(account, now_ms, Start::Fresh, |a, _| {
            a.update_metadata(changes)
        })
        .await
    }

    async fn list_accounts(
        &self,
        after: Option<&str>,
        limit: usize,
        now_ms: Millis,
    ) -> Result<Vec<AccountView>, StoreError> {
        let mut conn = self.conn.clone();
        let from = after.map_or_else(|| "-".to_string(), |a| format!("({a}"));
        let ids: Vec<String> = self
            .call(
                redis::cmd("ZRANGEBYLEX")
                    .arg(ACCOUNTS_INDEX)
                    .arg(from)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async(&mut conn),
            )
            .await?;
        let mut views = Vec::with_capacity(ids.len());
        for id in ids {
            match self.account(&id, now_ms).await {
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
        // Off the account first: from this commit on no replica places a hold for
        // the member's keys. Then their records; a removal cut off in between
        // leaves records that identify a member no hold accepts.
        let removed = self
            .transact(account, now_ms, Start::Fresh, |a, _| {
                a.remove_member(member)
            })
            .await?;
        let key_ids = match removed {
            Ok(key_ids) => key_ids,
            Err(refused) => return Ok(Err(refused)),
        };
        for key_id in &key_ids {
            self.drop_key_records(key_id).await?;
        }
        Ok(Ok(()))
    }

    async fn add_member(
        &self,
        account: &str,
        member: &str,
        terms: &crate::ledger::MemberTerms,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError> {
        self.transact(account, now_ms, Start::Fresh, |a, rules| {
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
        self.transact(account, now_ms, Start::Fresh, |a, _| {
            a.set_member_terms(member, terms)
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
        let hash: Option<String> = self
            .call(
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
        let owner: (Option<String>, Option<String>) = self
            .call(
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
        self.call(
            redis::cmd("DEL")
                .arg(key_key(&bytes))
                .query_async::<()>(&mut conn),
        )
        .await?;
        self.call(
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

    async fn adjust(
        &self,
        account: &str,
        adjustment: &crate::ledger::AdjustRequest,
        now_ms: Millis,
    ) -> Result<AdminOutcome<(GrantReceipt, bool)>, StoreError> {
        self.transact(account, now_ms, Start::Fresh, |a, rules| {
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
        let rows: Vec<(String, Vec<(String, String)>)> = self
            .call(
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

    async fn export(
        &self,
        since_ms: Millis,
        after: Option<&crate::store::ExportPosition>,
        limit: usize,
    ) -> Result<Vec<(String, Entry)>, StoreError> {
        // Every account's stream, a chunk at a time, through a page that keeps
        // only the first `limit` entries in export order: bounded memory, one
        // walk over the ledgers per page (accounts from ACCOUNTS_INDEX).
        const CHUNK: usize = 500;
        let mut page = crate::store::ExportPage::new(since_ms, after, limit);
        let mut conn = self.conn.clone();
        let mut from = "-".to_string();
        loop {
            let ids: Vec<String> = self
                .call(
                    redis::cmd("ZRANGEBYLEX")
                        .arg(ACCOUNTS_INDEX)
                        .arg(&from)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(CHUNK)
                        .query_async(&mut conn),
                )
                .await?;
            for id in &ids {
                let mut start = "-".to_string();
                loop {
                    let rows: Vec<(String, Vec<(String, String)>)> = self
                        .call(
                            redis::cmd("XRANGE")
                                .arg(ledger_key(id))
                                .arg(&start)
                                .arg("+")
                                .arg("COUNT")
                                .arg(CHUNK)
                                .query_async(&mut conn),
                        )
                        .await?;
                    let full = rows.len() == CHUNK;
                    for (stream_id, fields) in &rows {
                        if let Some((_, json)) = fields.iter().find(|(k, _)| k == "e") {
                            let entry: Entry = serde_json::from_str(json).map_err(|e| {
                                corrupt(format!("a ledger entry does not decode: {e}"))
                            })?;
                            page.offer(id, &entry);
                        }
                        start = format!("({stream_id}");
                    }
                    if !full {
                        break;
                    }
                }
            }
            match ids.last() {
                Some(last) if ids.len() == CHUNK => from = format!("({last}"),
                _ => break,
            }
        }
        Ok(page.into_entries())
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
                    self.call(
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
        payment: &crate::ledger::Payment,
        now_ms: Millis,
    ) -> Result<AdminOutcome<crate::ledger::Paid>, StoreError> {
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
