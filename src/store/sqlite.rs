//! The sqlite store's durable log: one SQLite file in WAL mode, written by one
//! thread that groups many transitions into each commit, and read by a second
//! connection for ledger pages.
//!
//! The state lives in memory, in a [`LocalStore`], where the ledger core computes
//! on it; this module persists it and loads it back at start. It never computes a
//! transition itself.
//!
//! # Nothing is answered before it is on disk
//! A call that changes an account queues the account here (a [`Change`]) while it
//! holds the account's lock, then waits, unlocked, for its [`Pending`] ack. The
//! writer thread takes everything queued — it blocks for the first item, then
//! takes more until the queue is empty or `commit_interval` has passed since the
//! first — and snapshots each distinct account once, under its lock: its state,
//! and the ledger entries it wrote since the last snapshot. Everything goes into
//! ONE transaction; one commit (one fsync) then answers every ack of the batch.
//! Every item was queued before its account was snapshotted, so its change is in
//! that commit. The file has an account's state and its entries, or neither.
//!
//! If a commit fails (disk full, an I/O error), memory is ahead of the file: every
//! waiting call and every later one is answered `StoreError::Unavailable`, and
//! `ping` (so `/readyz`) fails, until a restart loads memory from the file again.
//!
//! # The file
//! - `accounts(id, state, updated_at_ms)`: each account's whole state, as
//!   MessagePack with field names (the Redis store's encoding).
//! - `keys(key_sha256, key_id, account, member)`: who each API key (by its
//!   SHA-256) belongs to.
//! - `ledger(account, seq, at_ms, type, credits, operation, request_id, detail,
//!   uncollected, repaid, member, key_id, usage, balance_after, debit)`: every
//!   ledger entry, append-only and never trimmed; amounts in millicredits.
//! - the view `ledger_readable`: the ledger with RFC 3339 times and decimal credits.
//!
//! `PRAGMA application_id` marks the file as creditgate's and `PRAGMA
//! user_version` records its format: an older format is migrated in one
//! transaction at start, a newer one refused. An exclusive lock on the file keeps
//! a second gateway from serving the same file (each would trust its own memory).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};
use tokio::sync::oneshot;

use super::local::{Kept, KeyEntry, LocalStore, Stored, Tables, Unwritten};
use super::StoreError;
use crate::ledger::{Account, Catalog, Credits, Entry, EntryKind, Event, EventKind, Limits};

/// The format this build writes. Files of an older format are migrated.
pub const FORMAT: u32 = 3;

/// Marks a file as a creditgate store ("CGDB").
const APPLICATION_ID: i32 = 0x4347_4442;

/// Step `i` takes a file from format `i` to `i + 1`; format 0 is an empty file.
const MIGRATIONS: [&str; FORMAT as usize] = [FORMAT_1, FORMAT_2, FORMAT_3];

const FORMAT_1: &str = "
CREATE TABLE accounts (
    id TEXT PRIMARY KEY NOT NULL,
    state BLOB NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE TABLE keys (
    key_sha256 BLOB PRIMARY KEY NOT NULL,
    key_id TEXT NOT NULL UNIQUE,
    account TEXT NOT NULL,
    member TEXT NOT NULL
);
CREATE TABLE ledger (
    account TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    type TEXT NOT NULL,
    credits INTEGER NOT NULL,
    operation TEXT,
    request_id TEXT,
    detail TEXT,
    uncollected INTEGER,
    repaid INTEGER,
    PRIMARY KEY (account, seq)
) WITHOUT ROWID;
CREATE VIEW ledger_readable AS
SELECT account,
       seq,
       strftime('%Y-%m-%dT%H:%M:%S', at_ms / 1000, 'unixepoch')
           || printf('.%03dZ', at_ms % 1000) AS at,
       type,
       printf('%d.%03d', credits / 1000, credits % 1000) AS credits,
       operation,
       request_id,
       detail,
       CASE WHEN uncollected IS NULL THEN NULL
            ELSE printf('%d.%03d', uncollected / 1000, uncollected % 1000) END AS uncollected,
       CASE WHEN repaid IS NULL THEN NULL
            ELSE printf('%d.%03d', repaid / 1000, repaid % 1000) END AS repaid
FROM ledger;
";

/// Format 2: who spent (member, key id), the usage a settle was metered from,
/// the balance after each entry, whether credits left the account (a negative
/// adjustment); an index for the export, in time order across accounts.
const FORMAT_2: &str = "
ALTER TABLE ledger ADD COLUMN member TEXT;
ALTER TABLE ledger ADD COLUMN key_id TEXT;
ALTER TABLE ledger ADD COLUMN usage TEXT;
ALTER TABLE ledger ADD COLUMN balance_after INTEGER;
ALTER TABLE ledger ADD COLUMN debit INTEGER NOT NULL DEFAULT 0;
CREATE INDEX ledger_by_time ON ledger (at_ms, account, seq);
DROP VIEW ledger_readable;
CREATE VIEW ledger_readable AS
SELECT account,
       seq,
       strftime('%Y-%m-%dT%H:%M:%S', at_ms / 1000, 'unixepoch')
           || printf('.%03dZ', at_ms % 1000) AS at,
       type,
       CASE WHEN debit THEN '-' ELSE '' END
           || printf('%d.%03d', credits / 1000, credits % 1000) AS credits,
       operation,
       request_id,
       member,
       key_id,
       usage,
       CASE WHEN balance_after IS NULL THEN NULL
            ELSE printf('%d.%03d', balance_after / 1000, balance_after % 1000) END AS balance_after,
       detail,
       CASE WHEN uncollected IS NULL THEN NULL
            ELSE printf('%d.%03d', uncollected / 1000, uncollected % 1000) END AS uncollected,
       CASE WHEN repaid IS NULL THEN NULL
            ELSE printf('%d.%03d', repaid / 1000, repaid % 1000) END AS repaid
FROM ledger;
";

/// Format 3: the events outbox — events waiting for delivery, written in the
/// transaction of the account change that caused them, deleted once delivered.
const FORMAT_3: &str = "
CREATE TABLE outbox (
    id TEXT PRIMARY KEY NOT NULL,
    account TEXT NOT NULL,
    type TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    data TEXT NOT NULL
);
";

const PUT_EVENT: &str =
    "INSERT OR IGNORE INTO outbox (id, account, type, at_ms, data) VALUES (?1, ?2, ?3, ?4, ?5)";
const DROP_EVENT: &str = "DELETE FROM outbox WHERE id = ?1";

const PUT_STATE: &str = "INSERT INTO accounts (id, state, updated_at_ms) VALUES (?1, ?2, ?3)
     ON CONFLICT (id) DO UPDATE SET state = excluded.state, updated_at_ms = excluded.updated_at_ms";
const PUT_ENTRY: &str = "INSERT INTO ledger
     (account, seq, at_ms, type, credits, operation, request_id, detail, uncollected, repaid,
      member, key_id, usage, balance_after, debit)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)";
const PUT_KEY: &str =
    "INSERT OR REPLACE INTO keys (key_sha256, key_id, account, member) VALUES (?1, ?2, ?3, ?4)";
const DROP_KEY: &str = "DELETE FROM keys WHERE key_sha256 = ?1";
const EXPORT: &str = "SELECT account, seq, at_ms, type, credits, operation, request_id, detail, uncollected, repaid, member, key_id, usage, balance_after, debit FROM ledger
     WHERE at_ms >= ?1 AND (at_ms, account, seq) > (?2, ?3, ?4)
     ORDER BY at_ms, account, seq LIMIT ?5";
const PAGE: &str = "SELECT seq, at_ms, type, credits, operation, request_id, detail, uncollected, repaid, member, key_id, usage, balance_after, debit FROM ledger
     WHERE account = ?1 AND seq >= ?2 AND seq < ?3 ORDER BY seq DESC LIMIT ?4";

/// How long a connection waits for a lock another process holds (a backup or
/// Litestream checkpointing) before the statement fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the store file could not be opened. Each is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: cannot open the store file: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: the store file is in use by another creditgate process (one file serves one gateway)")]
    InUse { path: PathBuf },
    #[error("{path}: not a creditgate store (an SQLite file of another application)")]
    Foreign { path: PathBuf },
    #[error("{path}: store format {found} is newer than this build reads (formats 1 to {FORMAT}); run a newer creditgate")]
    Newer { path: PathBuf, found: i64 },
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path}: account {account:?} does not decode: {detail}")]
    Corrupt {
        path: PathBuf,
        account: String,
        detail: String,
    },
}

/// Opens (or creates) the store file at `path`, migrates an older format, loads
/// every account and key into memory, and starts the writer.
pub fn open(
    path: &Path,
    commit_interval: Duration,
    catalog: Arc<Catalog>,
    limits: Limits,
) -> Result<LocalStore, OpenError> {
    let lock = lock(path)?;
    let sqlite = |source| OpenError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let mut writer = connect(path, OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(sqlite)?;
    // WAL: readers never wait for the writer. FULL: each commit is fsynced.
    writer
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
        .map_err(sqlite)?;
    writer
        .pragma_update(None, "synchronous", "FULL")
        .map_err(sqlite)?;
    migrate(&mut writer, path, &MIGRATIONS)?;
    let tables = Arc::new(load(&writer, path)?);
    let reader = connect(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sqlite)?;
    let (queue, queued) = mpsc::channel();
    let failure = Arc::new(OnceLock::new());
    let thread = {
        let (tables, failure) = (tables.clone(), failure.clone());
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                Writer {
                    connection: writer,
                    tables,
                    failure,
                    dropped: Vec::new(),
                }
                .run(queued, commit_interval)
            })
            .map_err(|source| OpenError::Io {
                path: path.to_path_buf(),
                source,
            })?
    };
    let log = SqliteLog {
        queue: Some(queue),
        writer: Some(thread),
        failure,
        reader: Arc::new(Mutex::new(reader)),
        _lock: lock,
    };
    Ok(LocalStore::with_log(tables, Some(log), catalog, limits))
}

/// An exclusive lock on the store file, held for the store's life. A separate
/// descriptor, closed only after SQLite's connections (the field order of
/// [`SqliteLog`]): closing a descriptor of the file drops the process's SQLite locks.
fn lock(path: &Path) -> Result<File, OpenError> {
    let io = |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(OpenError::InUse {
            path: path.to_path_buf(),
        }),
        Err(TryLockError::Error(e)) => Err(io(e)),
    }
}

fn connect(path: &Path, access: OpenFlags) -> rusqlite::Result<Connection> {
    let connection = Connection::open_with_flags(path, access | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    connection.busy_timeout(BUSY_TIMEOUT)?;
    Ok(connection)
}

/// Brings the file to the format `steps` lead to, in one transaction: a file
/// left half-migrated by a crash is not possible.
fn migrate(connection: &mut Connection, path: &Path, steps: &[&str]) -> Result<(), OpenError> {
    let sqlite = |source| OpenError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let tx = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sqlite)?;
    let number = |sql: &str| tx.query_row(sql, [], |r| r.get::<_, i64>(0));
    let application = number("PRAGMA application_id").map_err(sqlite)?;
    let found = number("PRAGMA user_version").map_err(sqlite)?;
    let objects = number("SELECT count(*) FROM sqlite_master").map_err(sqlite)?;
    let empty = application == 0 && found == 0 && objects == 0;
    if application != i64::from(APPLICATION_ID) && !empty {
        return Err(OpenError::Foreign {
            path: path.to_path_buf(),
        });
    }
    let Some(todo) = usize::try_from(found).ok().and_then(|f| steps.get(f..)) else {
        return Err(OpenError::Newer {
            path: path.to_path_buf(),
            found,
        });
    };
    for step in todo {
        tx.execute_batch(step).map_err(sqlite)?;
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)
        .map_err(sqlite)?;
    tx.pragma_update(None, "user_version", steps.len() as i64)
        .map_err(sqlite)?;
    tx.commit().map_err(sqlite)
}

/// Every account and key in the file.
fn load(connection: &Connection, path: &Path) -> Result<Tables, OpenError> {
    let sqlite = |source| OpenError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let tables = Tables::default();
    let mut accounts = connection
        .prepare("SELECT id, state FROM accounts")
        .map_err(sqlite)?;
    let mut rows = accounts.query([]).map_err(sqlite)?;
    while let Some(row) = rows.next().map_err(sqlite)? {
        let id: String = row.get(0).map_err(sqlite)?;
        let state = row.get_ref(1).and_then(|s| Ok(s.as_blob()?));
        let account = state
            .map_err(|e| e.to_string())
            .and_then(|s| rmp_serde::from_slice::<Account>(s).map_err(|e| e.to_string()))
            .and_then(|a| match a.id == id {
                true => Ok(a),
                false => Err(format!("its state is account {:?}'s", a.id)),
            })
            .map_err(|detail| OpenError::Corrupt {
                path: path.to_path_buf(),
                account: id.clone(),
                detail,
            })?;
        tables.accounts.insert(
            id,
            Stored::new(account, Kept::Unwritten(Unwritten::default())),
        );
    }
    let mut events = connection
        .prepare("SELECT id, account, type, at_ms, data FROM outbox ORDER BY rowid")
        .map_err(sqlite)?;
    let mut rows = events.query([]).map_err(sqlite)?;
    let mut loaded = Vec::new();
    while let Some(row) = rows.next().map_err(sqlite)? {
        let kind: String = row.get(2).map_err(sqlite)?;
        let id: String = row.get(0).map_err(sqlite)?;
        let Some(kind) = EventKind::parse(&kind) else {
            return Err(OpenError::Corrupt {
                path: path.to_path_buf(),
                account: row.get(1).map_err(sqlite)?,
                detail: format!("event {id} has an unknown type {kind:?}"),
            });
        };
        loaded.push(Event {
            id,
            account: row.get(1).map_err(sqlite)?,
            kind,
            at_ms: row.get::<_, i64>(3).map_err(sqlite)?.max(0) as u64,
            data: row.get(4).map_err(sqlite)?,
        });
    }
    tables.outbox().push(loaded);
    let mut keys = connection
        .prepare("SELECT key_sha256, key_id, account, member FROM keys")
        .map_err(sqlite)?;
    let mut rows = keys.query([]).map_err(sqlite)?;
    while let Some(row) = rows.next().map_err(sqlite)? {
        let hash: [u8; 32] = row.get(0).map_err(sqlite)?;
        let (key_id, account, member): (String, String, String) = (
            row.get(1).map_err(sqlite)?,
            row.get(2).map_err(sqlite)?,
            row.get(3).map_err(sqlite)?,
        );
        tables.register(&account, &member, &key_id, &hash);
    }
    Ok(tables)
}

/// What the writer must snapshot: an account, the key records named.
#[derive(Debug)]
pub(super) struct Change {
    pub(super) account: Option<String>,
    pub(super) keys: Vec<[u8; 32]>,
    /// Events delivered (or dropped): deleted from the outbox table.
    pub(super) delivered: Vec<String>,
}

impl Change {
    pub(super) fn account(id: &str) -> Change {
        Change {
            account: Some(id.to_string()),
            keys: Vec::new(),
            delivered: Vec::new(),
        }
    }

    pub(super) fn delivered(ids: Vec<String>) -> Change {
        Change {
            account: None,
            keys: Vec::new(),
            delivered: ids,
        }
    }

    pub(super) fn with_keys(self, keys: Vec<[u8; 32]>) -> Change {
        Change { keys, ..self }
    }
}

type Ack = oneshot::Sender<Result<(), StoreError>>;

struct Queued {
    change: Change,
    /// `None`: nobody waits (time alone changed the account).
    ack: Option<Ack>,
}

/// What a call awaits before it answers: the commit that wrote its change.
#[derive(Default)]
pub(super) struct Pending(Option<oneshot::Receiver<Result<(), StoreError>>>);

impl Pending {
    pub(super) async fn written(self) -> Result<(), StoreError> {
        match self.0 {
            None => Ok(()),
            Some(ack) => ack.await.unwrap_or_else(|_| Err(writer_stopped())),
        }
    }
}

fn writer_stopped() -> StoreError {
    StoreError::Unavailable("the store's writer stopped".into())
}

/// The durable log of a [`LocalStore`]: the writer's queue, the read connection.
pub struct SqliteLog {
    /// Taken (closed) on drop, which stops the writer once it has written all.
    queue: Option<mpsc::Sender<Queued>>,
    writer: Option<JoinHandle<()>>,
    /// Why the writer failed, once it has: the store then answers nothing.
    failure: Arc<OnceLock<String>>,
    reader: Arc<Mutex<Connection>>,
    /// Declared last: dropped after the connections (see [`lock`]).
    _lock: File,
}

impl SqliteLog {
    pub(super) fn usable(&self) -> Result<(), StoreError> {
        match self.failure.get() {
            None => Ok(()),
            Some(reason) => Err(StoreError::Unavailable(reason.clone())),
        }
    }

    /// Queues `change` for the next commit; with `wait`, the ack to await.
    ///
    /// The queue is unbounded, and bounded all the same: every item that waits has
    /// a call waiting for it (at most one per request in flight), and the writer
    /// takes the whole queue each time it commits.
    pub(super) fn queue(&self, change: Change, wait: bool) -> Result<Pending, StoreError> {
        let (ack, pending) = if wait {
            let (ack, pending) = oneshot::channel();
            (Some(ack), Pending(Some(pending)))
        } else {
            (None, Pending::default())
        };
        let queue = self.queue.as_ref().ok_or_else(writer_stopped)?;
        queue
            .send(Queued { change, ack })
            .map_err(|_| writer_stopped())?;
        Ok(pending)
    }

    /// A ledger page, newest first: up to `limit` entries numbered in `shown` and
    /// below `before_seq`, from the file and from `unwritten` (entries that may not
    /// be committed yet, copied before the file is read: one committed in between
    /// is in both, and counted once).
    pub(super) async fn ledger(
        &self,
        account: &str,
        limit: usize,
        before_seq: Option<u64>,
        shown: Range<u64>,
        unwritten: Vec<Entry>,
    ) -> Result<Vec<Entry>, StoreError> {
        let below = before_seq.map_or(shown.end, |b| b.min(shown.end));
        let wanted = shown.start..below;
        let (reader, account, range) = (self.reader.clone(), account.to_string(), wanted.clone());
        let on_disk = tokio::task::spawn_blocking(move || {
            // A panic elsewhere while holding it leaves the connection usable.
            let reader = reader.lock().unwrap_or_else(|e| e.into_inner());
            read_page(&reader, &account, range, limit)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("the ledger read failed: {e}")))??;
        let mut page: BTreeMap<u64, Entry> = on_disk.into_iter().map(|e| (e.seq, e)).collect();
        for entry in unwritten {
            if wanted.contains(&entry.seq) {
                page.insert(entry.seq, entry);
            }
        }
        Ok(page.into_values().rev().take(limit).collect())
    }
}

impl SqliteLog {
    /// A page of the export, from the file (the `ledger_by_time` index).
    pub(super) async fn export(
        &self,
        since_ms: u64,
        after: Option<&super::ExportPosition>,
        limit: usize,
    ) -> Result<Vec<(String, Entry)>, StoreError> {
        let reader = self.reader.clone();
        let after = after.cloned().unwrap_or(super::ExportPosition {
            at_ms: 0,
            account: String::new(),
            seq: 0,
        });
        tokio::task::spawn_blocking(move || {
            let reader = reader.lock().unwrap_or_else(|e| e.into_inner());
            let unavailable = |e: rusqlite::Error| {
                StoreError::Unavailable(format!("the ledger could not be exported: {e}"))
            };
            let mut export = reader.prepare_cached(EXPORT).map_err(unavailable)?;
            let mut rows = export
                .query(params![
                    int(since_ms),
                    int(after.at_ms),
                    after.account,
                    int(after.seq),
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ])
                .map_err(unavailable)?;
            let mut page = Vec::new();
            while let Some(row) = rows.next().map_err(unavailable)? {
                let account: String = row.get(0).map_err(unavailable)?;
                let entry = entry_from_row(row, 1, &account)?;
                page.push((account, entry));
            }
            Ok(page)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("the ledger export failed: {e}")))?
    }
}

impl Drop for SqliteLog {
    fn drop(&mut self) {
        // Closing the queue ends the writer after it has written what was queued.
        self.queue.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// A value as SQLite stores it. Amounts are below `MAX_GRANTED` (a quarter of
/// `u64::MAX`), sequence numbers count entries and times are real dates, so none
/// reaches `i64::MAX`; one that did would be stored capped, never fail the commit.
fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn read_page(
    reader: &Connection,
    account: &str,
    seqs: Range<u64>,
    limit: usize,
) -> Result<Vec<Entry>, StoreError> {
    let unavailable = |e: rusqlite::Error| {
        StoreError::Unavailable(format!(
            "the ledger could not be read from the store file: {e}"
        ))
    };
    let mut page = reader.prepare_cached(PAGE).map_err(unavailable)?;
    let mut rows = page
        .query(params![
            account,
            int(seqs.start),
            int(seqs.end),
            i64::try_from(limit).unwrap_or(i64::MAX)
        ])
        .map_err(unavailable)?;
    let mut entries = Vec::new();
    while let Some(row) = rows.next().map_err(unavailable)? {
        entries.push(entry_from_row(row, 0, account)?);
    }
    Ok(entries)
}

/// The entry in `row`, its columns (`seq, at_ms, type, credits, operation,
/// request_id, detail, uncollected, repaid, member, key_id, usage,
/// balance_after, debit`) from column `at` on.
fn entry_from_row(row: &rusqlite::Row, at: usize, account: &str) -> Result<Entry, StoreError> {
    let unavailable = |e: rusqlite::Error| {
        StoreError::Unavailable(format!(
            "the ledger could not be read from the store file: {e}"
        ))
    };
    let seq: i64 = row.get(at).map_err(unavailable)?;
    let corrupt = |what: &str| {
        StoreError::Corrupt(format!(
            "ledger entry {seq} of account {account:?} has {what}"
        ))
    };
    let unsigned = |v: i64, what: &str| u64::try_from(v).map_err(|_| corrupt(what));
    let amount = |column: usize, what: &str| -> Result<Option<Credits>, StoreError> {
        row.get::<_, Option<i64>>(at + column)
            .map_err(unavailable)?
            .map(|c| unsigned(c, what).map(Credits::from_millicredits))
            .transpose()
    };
    let text = |column: usize| {
        row.get::<_, Option<String>>(at + column)
            .map_err(unavailable)
    };
    let kind: String = row.get(at + 2).map_err(unavailable)?;
    Ok(Entry {
        seq: unsigned(seq, "a negative number")?,
        at_ms: unsigned(row.get(at + 1).map_err(unavailable)?, "a negative time")?,
        kind: entry_kind(&kind).ok_or_else(|| corrupt(&format!("the unknown type {kind:?}")))?,
        credits: amount(3, "negative credits")?.unwrap_or(Credits::ZERO),
        operation: text(4)?,
        request_id: text(5)?,
        detail: text(6)?,
        uncollected: amount(7, "negative uncollected credits")?,
        repaid: amount(8, "negative repaid credits")?,
        member: text(9)?,
        key_id: text(10)?,
        usage: text(11)?,
        balance_after: amount(12, "a negative balance")?,
        debit: row.get::<_, i64>(at + 13).map_err(unavailable)? != 0,
    })
}

/// The kind a `type` column names, by the names the ledger's API writes.
fn entry_kind(name: &str) -> Option<EntryKind> {
    use serde::de::value::{Error, StrDeserializer};
    serde::Deserialize::deserialize(StrDeserializer::<Error>::new(name)).ok()
}

/// One account as the writer found it: its state and its new ledger entries.
struct Snapshot {
    id: String,
    state: Vec<u8>,
    entries: Arc<Vec<Entry>>,
    events: Vec<Event>,
}

/// The one thread that writes the file.
struct Writer {
    connection: Connection,
    tables: Arc<Tables>,
    failure: Arc<OnceLock<String>>,
    /// Events a full outbox dropped, to delete with the next commit.
    dropped: Vec<String>,
}

impl Writer {
    fn run(mut self, queued: mpsc::Receiver<Queued>, commit_interval: Duration) {
        let mut batch = Vec::new();
        while let Ok(first) = queued.recv() {
            let started = Instant::now();
            batch.push(first);
            while started.elapsed() < commit_interval {
                match queued.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            let outcome = match self.failure.get() {
                Some(reason) => Err(reason.clone()),
                None => self.commit(&batch),
            };
            if let Err(reason) = &outcome {
                if self.failure.set(reason.clone()).is_ok() {
                    tracing::error!(
                        "{reason}; the store answers nothing until creditgate is restarted"
                    );
                }
            }
            for item in batch.drain(..) {
                if let Some(ack) = item.ack {
                    // A caller that stopped waiting has nothing to be told.
                    let _ = ack.send(outcome.clone().map_err(StoreError::Unavailable));
                }
            }
        }
    }

    /// Snapshots what `batch` names and writes it in one transaction.
    fn commit(&mut self, batch: &[Queued]) -> Result<(), String> {
        let mut ids: Vec<&str> = batch
            .iter()
            .filter_map(|q| q.change.account.as_deref())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut hashes: Vec<&[u8; 32]> = batch.iter().flat_map(|q| &q.change.keys).collect();
        hashes.sort_unstable();
        hashes.dedup();
        let mut snapshots = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(snapshot) = self.snapshot(id)? {
                snapshots.push(snapshot);
            }
        }
        let keys: Vec<([u8; 32], Option<KeyEntry>)> = hashes
            .into_iter()
            .map(|h| (*h, self.tables.keys.get(h).map(|k| k.value().clone())))
            .collect();
        let mut delivered: Vec<String> = std::mem::take(&mut self.dropped);
        delivered.extend(
            batch
                .iter()
                .flat_map(|q| q.change.delivered.iter().cloned()),
        );
        let written = self.write(&snapshots, &keys, &delivered);
        if written.is_err() {
            self.dropped = delivered;
        }
        written.map_err(|e| format!("the store file could not be written: {e}"))?;
        self.forget_taken(&snapshots);
        // Committed: the sender may deliver them now. Those a full outbox drops
        // are deleted from the file with the next commit.
        let events = snapshots.into_iter().flat_map(|s| s.events);
        let dropped = self.tables.outbox().push(events);
        self.dropped.extend(dropped);
        Ok(())
    }

    /// After a commit: the entries it wrote are on disk, so the accounts need not
    /// keep them for ledger reads. (Only this thread snapshots, so `taken` is still
    /// this commit's; the pointer check keeps that true should it ever change.)
    fn forget_taken(&self, snapshots: &[Snapshot]) {
        for snapshot in snapshots.iter().filter(|s| !s.entries.is_empty()) {
            if let Some(mut stored) = self.tables.accounts.get_mut(&snapshot.id) {
                if let Kept::Unwritten(unwritten) = &mut stored.ledger {
                    if Arc::ptr_eq(&unwritten.taken, &snapshot.entries) {
                        unwritten.taken = Arc::default();
                    }
                }
            }
        }
    }

    /// The account's state and the entries it wrote since the last snapshot,
    /// taken together under its lock.
    fn snapshot(&self, id: &str) -> Result<Option<Snapshot>, String> {
        let Some(mut stored) = self.tables.accounts.get_mut(id) else {
            return Ok(None);
        };
        let mut state = Vec::with_capacity(STATE_BYTES_EXPECTED);
        rmp_serde::encode::write_named(&mut state, &stored.account)
            .map_err(|e| format!("account {id:?} cannot be encoded: {e}"))?;
        let (entries, events) = match &mut stored.ledger {
            Kept::Unwritten(unwritten) => {
                unwritten.taken = Arc::new(std::mem::take(&mut unwritten.fresh));
                (
                    unwritten.taken.clone(),
                    std::mem::take(&mut unwritten.events),
                )
            }
            Kept::Journal(_) => (Arc::default(), Vec::new()),
        };
        Ok(Some(Snapshot {
            id: id.to_string(),
            state,
            entries,
            events,
        }))
    }

    fn write(
        &mut self,
        snapshots: &[Snapshot],
        keys: &[([u8; 32], Option<KeyEntry>)],
        delivered: &[String],
    ) -> rusqlite::Result<()> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| int(d.as_millis() as u64));
        let tx = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut put_state = tx.prepare_cached(PUT_STATE)?;
            let mut put_entry = tx.prepare_cached(PUT_ENTRY)?;
            for snapshot in snapshots {
                put_state.execute(params![snapshot.id, snapshot.state, now_ms])?;
                for e in snapshot.entries.iter() {
                    put_entry.execute(params![
                        snapshot.id,
                        int(e.seq),
                        int(e.at_ms),
                        e.kind.as_str(),
                        int(e.credits.millicredits()),
                        e.operation,
                        e.request_id,
                        e.detail,
                        e.uncollected.map(|c| int(c.millicredits())),
                        e.repaid.map(|c| int(c.millicredits())),
                        e.member,
                        e.key_id,
                        e.usage,
                        e.balance_after.map(|c| int(c.millicredits())),
                        i64::from(e.debit),
                    ])?;
                }
            }
            let mut put_event = tx.prepare_cached(PUT_EVENT)?;
            for snapshot in snapshots {
                for e in &snapshot.events {
                    put_event.execute(params![
                        e.id,
                        e.account,
                        e.kind.as_str(),
                        int(e.at_ms),
                        e.data
                    ])?;
                }
            }
            let mut drop_event = tx.prepare_cached(DROP_EVENT)?;
            for id in delivered {
                drop_event.execute(params![id])?;
            }
            let mut put_key = tx.prepare_cached(PUT_KEY)?;
            let mut drop_key = tx.prepare_cached(DROP_KEY)?;
            for (hash, key) in keys {
                match key {
                    Some(k) => {
                        put_key.execute(params![&hash[..], k.key_id, k.account, k.member])?
                    }
                    None => drop_key.execute(params![&hash[..]])?,
                };
            }
        }
        tx.commit()
    }
}

/// About the size of an active account's state; larger ones grow the buffer.
const STATE_BYTES_EXPECTED: usize = 2_048;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{HoldRequest, PlanTerms};
    use crate::store::{GrantRequest, Store};

    /// A fresh folder for one test's files, removed afterwards.
    struct Folder(PathBuf);

    impl Folder {
        fn new(name: &str) -> Folder {
            let dir = std::env::temp_dir()
                .join(format!("creditgate-sqlite-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Folder(dir)
        }

        fn file(&self) -> PathBuf {
            self.0.join("store.db")
        }
    }

    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn catalog() -> Arc<Catalog> {
        let free = PlanTerms {
            monthly_credits: Credits::ZERO,
            quotas: Default::default(),
            seats: 2,
            signup_credits: None,
            keep_unused_on_upgrade: false,
            features: vec![],
            ..Default::default()
        };
        Arc::new(Catalog::from([("free".to_string(), free)]))
    }

    fn open_at(file: &Path) -> Result<LocalStore, OpenError> {
        let limits = Limits {
            ledger_max_entries: 100,
            ..Limits::default()
        };
        open(file, Duration::from_millis(2), catalog(), limits)
    }

    const T0: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

    #[tokio::test]
    async fn what_was_acknowledged_is_there_after_a_reopen_and_readable_with_sql() {
        let folder = Folder::new("reopen");
        let store = open_at(&folder.file()).unwrap();
        store
            .create_account("a", "free", None, T0)
            .await
            .unwrap()
            .unwrap();
        store
            .add_member("a", "ann", &crate::ledger::MemberTerms::default(), T0)
            .await
            .unwrap()
            .unwrap();
        store
            .add_key("a", "ann", "key_1", &[7; 32], T0)
            .await
            .unwrap()
            .unwrap();
        let topup = GrantRequest {
            idempotency_key: "pay-1".into(),
            kind: "topup".into(),
            credits: "12.5".parse().unwrap(),
            priority: 30,
            expires_at_ms: None,
        };
        store.grant("a", &topup, T0).await.unwrap().unwrap();
        let request = HoldRequest {
            operation: "image.generate".into(),
            request_id: "req-1".into(),
            amount: "3".parse().unwrap(),
            ttl_ms: 60_000,
            max_holds: 8,
            quota: None,
            idempotency: None,
            caller: None,
            terms: crate::ledger::HoldTerms::default(),
        };
        let placed = store.hold("a", &request, T0 + 1).await.unwrap().unwrap();
        store
            .settle("a", placed.hold_id, "2.25".parse().unwrap(), None, T0 + 2)
            .await
            .unwrap()
            .unwrap();
        let open_hold = store.hold("a", &request, T0 + 3).await.unwrap().unwrap();
        let before = store.account("a", T0 + 4).await.unwrap();
        let ledger = store.ledger("a", 100, None, T0 + 4).await.unwrap();
        drop(store);

        let store = open_at(&folder.file()).unwrap();
        assert_eq!(store.account("a", T0 + 4).await.unwrap(), before);
        assert_eq!(store.ledger("a", 100, None, T0 + 4).await.unwrap(), ledger);
        let who = store.identify(&[7; 32], T0 + 4).await.unwrap().unwrap();
        assert_eq!((who.member.as_str(), who.key_id.as_str()), ("ann", "key_1"));
        let (_, created) = store.grant("a", &topup, T0 + 5).await.unwrap().unwrap();
        assert!(!created, "the top-up is not granted twice");
        // The hold left open expires by its TTL, as on any store.
        assert_eq!(store.sweep(T0 + 3 + 60_000).await.unwrap(), 1);
        let totals = store.totals("a", T0 + 3 + 60_000).await.unwrap();
        assert_eq!(totals.held, Credits::ZERO);
        assert_eq!(totals.available.to_string(), "10.25");
        store.check_invariants().unwrap();
        drop(store);

        let sql = Connection::open(folder.file()).unwrap();
        let rows: Vec<(String, String, Option<String>, String)> = sql
            .prepare("SELECT at, type, request_id, credits FROM ledger_readable WHERE account = 'a' ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let expected = [
            ("2026-01-01T00:00:00.000Z", "grant", None, "12.500"),
            ("2026-01-01T00:00:00.001Z", "hold", Some("req-1"), "3.000"),
            ("2026-01-01T00:00:00.002Z", "settle", Some("req-1"), "2.250"),
            ("2026-01-01T00:00:00.003Z", "hold", Some("req-1"), "3.000"),
            ("2026-01-01T00:01:00.003Z", "expire", Some("req-1"), "3.000"),
        ];
        let tail: Vec<_> = rows.iter().skip(rows.len() - expected.len()).collect();
        for (row, want) in tail.iter().zip(expected) {
            assert_eq!(
                (
                    row.0.as_str(),
                    row.1.as_str(),
                    row.2.as_deref(),
                    row.3.as_str()
                ),
                want
            );
        }
        assert_eq!(open_hold.hold_id, placed.hold_id + 1);
    }

    /// Ledger pages read while the writer commits: every page is whole (numbers
    /// without a gap) and never older than one read before it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ledger_page_read_while_the_writer_commits_misses_no_entry() {
        let folder = Folder::new("pages");
        let store = Arc::new(open_at(&folder.file()).unwrap());
        store
            .create_account("a", "free", None, T0)
            .await
            .unwrap()
            .unwrap();
        let topup = GrantRequest {
            idempotency_key: "pay".into(),
            kind: "topup".into(),
            credits: Credits::from_whole(1_000).unwrap(),
            priority: 30,
            expires_at_ms: None,
        };
        store.grant("a", &topup, T0).await.unwrap().unwrap();
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..300 {
                    let request = HoldRequest {
                        operation: "op".into(),
                        request_id: format!("r{i}"),
                        amount: Credits::from_whole(1).unwrap(),
                        ttl_ms: 60_000,
                        max_holds: 8,
                        quota: None,
                        idempotency: None,
                        caller: None,
                        terms: crate::ledger::HoldTerms::default(),
                    };
                    let placed = store.hold("a", &request, T0).await.unwrap().unwrap();
                    store
                        .settle("a", placed.hold_id, request.amount, None, T0)
                        .await
                        .unwrap()
                        .unwrap();
                }
            })
        };
        let mut newest = 0;
        while !writer.is_finished() {
            let page = store.ledger("a", 20, None, T0).await.unwrap();
            let seqs: Vec<u64> = page.iter().map(|e| e.seq).collect();
            assert!(
                seqs.windows(2).all(|w| w[1] + 1 == w[0]),
                "a page with a gap: {seqs:?}"
            );
            let top = seqs.first().copied().unwrap_or(0);
            assert!(
                top >= newest,
                "a page older than the one before: {top} < {newest}"
            );
            newest = top;
        }
        writer.await.unwrap();
    }

    #[test]
    fn a_newer_format_a_foreign_file_and_a_file_in_use_are_refused_in_one_line() {
        let folder = Folder::new("refused");
        let file = folder.file();
        let store = open_at(&file).unwrap();
        let in_use = open_at(&file).err().unwrap().to_string();
        assert_eq!(
            in_use,
            format!(
                "{}: the store file is in use by another creditgate process (one file serves one gateway)",
                file.display()
            )
        );
        drop(store);
        Connection::open(&file)
            .unwrap()
            .pragma_update(None, "user_version", 7)
            .unwrap();
        let newer = open_at(&file).err().unwrap().to_string();
        assert_eq!(
            newer,
            format!(
                "{}: store format 7 is newer than this build reads (formats 1 to {FORMAT}); run a newer creditgate",
                file.display()
            )
        );
        let foreign = folder.0.join("other.db");
        Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE notes (text TEXT)")
            .unwrap();
        let refused = open_at(&foreign).err().unwrap().to_string();
        assert!(refused.ends_with("not a creditgate store (an SQLite file of another application)"));
        assert!(!refused.contains('\n'));
    }

    #[test]
    fn an_older_format_is_migrated_in_one_transaction_keeping_its_data() {
        let folder = Folder::new("migrate");
        let file = folder.file();
        let mut db = Connection::open(&file).unwrap();
        let steps = [FORMAT_1, "ALTER TABLE accounts ADD COLUMN note TEXT"];
        migrate(&mut db, &file, &steps[..1]).unwrap();
        db.execute("INSERT INTO accounts VALUES ('a', x'00', 1)", [])
            .unwrap();
        // A step that fails leaves the file as it was: format 1, its data intact.
        let broken = [
            FORMAT_1,
            "ALTER TABLE accounts ADD COLUMN x TEXT; SELECT nonsense",
        ];
        assert!(migrate(&mut db, &file, &broken).is_err());
        let format = |db: &Connection| {
            db.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
                .unwrap()
        };
        assert_eq!(format(&db), 1);
        assert!(db.prepare("SELECT x FROM accounts").is_err());
        migrate(&mut db, &file, &steps).unwrap();
        assert_eq!(format(&db), 2);
        let kept: (String, Option<String>) = db
            .query_row("SELECT id, note FROM accounts", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(kept, ("a".to_string(), None));
        // And a file this build wrote is at this build's format.
        let fresh = folder.0.join("fresh.db");
        drop(open_at(&fresh).unwrap());
        assert_eq!(
            format(&Connection::open(&fresh).unwrap()),
            i64::from(FORMAT)
        );
    }

    #[test]
    fn every_entry_type_reads_back_as_the_kind_it_was_written_from() {
        for kind in [
            EntryKind::Grant,
            EntryKind::Hold,
            EntryKind::Settle,
            EntryKind::Release,
            EntryKind::Expire,
            EntryKind::Refill,
            EntryKind::PlanChange,
            EntryKind::Adjust,
        ] {
            assert_eq!(entry_kind(kind.as_str()), Some(kind));
        }
        assert_eq!(entry_kind("refund"), None);
    }
}
