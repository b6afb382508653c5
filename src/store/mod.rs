//! Where accounts live. A store applies the ledger core atomically per account.
//!
//! One trait, three stores from two implementations: [`local::LocalStore`] is the
//! `memory` store (one process, lost on restart) and, with a durable log, the
//! `sqlite` store (one process, an SQLite file: the default, see [`sqlite`]);
//! [`redis::RedisStore`] serves many replicas. All apply the same ledger core. The
//! gateway and the admin API only ever talk to `dyn Store`. A store never decides
//! prices or HTTP answers; it returns outcomes (`HoldRejected`, `EndRejected`,
//! `AccountRejected`) as values and failures (`StoreError`) as errors.
//!
//! Every call applies time first: a due monthly refill, expired grants, holds past
//! their TTL. That is what makes refills lazy and exactly-once per cycle.

// Money code: an index that could be out of range is a `get` that says what then.
#![deny(clippy::indexing_slicing)]

pub mod local;
pub mod redis;
pub mod sqlite;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::ledger::{
    Account, AccountRejected, AdjustRequest, Catalog, Credits, Effective, EndRejected, Entry,
    Event, EventRules, Grant, GrantReceipt, Hold, HoldEnded, HoldPlaced, HoldRejected, HoldRequest,
    Limits, Member, MemberTerms, Millis, Onboarding, Paid, Payment, Recorded, SeedAccount, Totals,
};

/// A new admin grant (the ledger's: the store passes it on as it is).
pub use crate::ledger::GrantRequest;

/// Who a key belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub account: String,
    pub member: String,
    /// The key's id (`key_…`), which holds are checked against (see `ledger::Caller`).
    pub key_id: String,
    pub plan: String,
    pub premium_disabled: bool,
    /// The member's disabled features besides premium.
    pub disabled_features: Vec<String>,
}

/// One quota of an account this cycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaView {
    pub name: String,
    pub used: u64,
    /// `None`: the plan does not limit it.
    pub limit: Option<u64>,
}

/// Everything about an account that its owner or an admin may see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountView {
    pub id: String,
    pub plan: String,
    pub pending_plan: Option<String>,
    pub billing_anchor_day: u8,
    pub next_refill_ms: Millis,
    pub members: BTreeMap<String, Member>,
    /// Live grants in spend order.
    pub grants: Vec<Grant>,
    pub totals: Totals,
    pub quotas: Vec<QuotaView>,
    pub metadata: BTreeMap<String, String>,
}

/// Where an export stands: the last entry read, by the export's order (time,
/// then account, then number).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExportPosition {
    pub at_ms: Millis,
    pub account: String,
    pub seq: u64,
}

impl ExportPosition {
    pub fn of(account: &str, entry: &Entry) -> Self {
        ExportPosition {
            at_ms: entry.at_ms,
            account: account.to_string(),
            seq: entry.seq,
        }
    }
}

/// Keeps the `limit` first entries by export order among those offered, past
/// `after` and from `since_ms` on: what a store that cannot ask for them in
/// order (memory, Redis) walks its ledgers through. Holds at most `limit`.
pub struct ExportPage {
    since_ms: Millis,
    after: Option<ExportPosition>,
    limit: usize,
    kept: BTreeMap<ExportPosition, Entry>,
}

impl ExportPage {
    pub fn new(since_ms: Millis, after: Option<&ExportPosition>, limit: usize) -> Self {
        ExportPage {
            since_ms,
            after: after.cloned(),
            limit: limit.max(1),
            kept: BTreeMap::new(),
        }
    }

    pub fn offer(&mut self, account: &str, entry: &Entry) {
        if entry.at_ms < self.since_ms {
            return;
        }
        let at = ExportPosition::of(account, entry);
        if self.after.as_ref().is_some_and(|after| at <= *after) {
            return;
        }
        if self.kept.len() >= self.limit {
            match self.kept.last_key_value() {
                Some((last, _)) if at < *last => {
                    self.kept.pop_last();
                }
                _ => return,
            }
        }
        self.kept.insert(at, entry.clone());
    }

    pub fn into_entries(self) -> Vec<(String, Entry)> {
        self.kept
            .into_iter()
            .map(|(at, entry)| (at.account, entry))
            .collect()
    }
}

/// A failure of the store itself (not an outcome of the ledger), classified where
/// it happens — never guessed later from a message — because each kind gets its
/// own answer: only an outage may let a request through unmetered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("account {0} does not exist")]
    UnknownAccount(String),
    /// The store did not answer: a timeout, a refused or lost connection, a server
    /// that cannot serve. Answered 503, or forwarded unmetered where the policy
    /// says `on_unavailable = "allow"`; retrying later may succeed.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The store answered, but other writers changed the account every time a
    /// transition was computed, until the retries ran out. Answered 500, never
    /// forwarded: the account is there, and a request through would run free.
    #[error("the account is contended: {0}")]
    Contended(String),
    /// The store answered with state that does not decode (or state that cannot be
    /// encoded). Answered 500, never forwarded, whatever `on_unavailable` says.
    #[error("the store holds state that does not decode: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// The kind, as the metrics label it; `None` for an unknown account, which is
    /// an answer about the data rather than a failure of the store.
    pub fn failure_kind(&self) -> Option<&'static str> {
        match self {
            StoreError::UnknownAccount(_) => None,
            StoreError::Unavailable(_) => Some("unavailable"),
            StoreError::Contended(_) => Some("contended"),
            StoreError::Corrupt(_) => Some("corrupt"),
        }
    }
}

pub type HoldOutcome = Result<HoldPlaced, HoldRejected>;

/// What a hold would do now, asked without placing it (the client's quote).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quoted {
    /// The account's available credits now, before any hold.
    pub available: Credits,
    /// What [`Account::admit`] says of the request: the hold's own answer — the
    /// amount it would hold, or why not.
    pub admitted: Result<Credits, HoldRejected>,
}

impl Quoted {
    /// Asks `account` (time already applied) whether it would admit `request`.
    /// Every store answers a quote with this, so a quote is the hold's own check.
    pub fn of(account: &Account, request: &HoldRequest, catalog: &Catalog) -> Quoted {
        Quoted {
            available: account.available(),
            admitted: account.admit(request, catalog),
        }
    }
}
pub type EndOutcome = Result<HoldEnded, EndRejected>;

/// The ends a store keeps to retry (`Store::pending_ends`), for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingEndsView {
    pub queued: usize,
    pub dropped: u64,
}
pub type AdminOutcome<T> = Result<T, AccountRejected>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The account and member of a key, by the SHA-256 of the key.
    async fn identify(
        &self,
        key_sha256: &[u8; 32],
        now_ms: Millis,
    ) -> Result<Option<Identity>, StoreError>;

    async fn hold(
        &self,
        account: &str,
        request: &HoldRequest,
        now_ms: Millis,
    ) -> Result<HoldOutcome, StoreError>;

    /// A dry-run hold: what [`Store::hold`] would answer for `request` now — who
    /// asks, idempotency, quota, balance, open holds — on the account as the store
    /// has it (time applied), placing nothing and writing nothing a hold would.
    async fn quote(
        &self,
        account: &str,
        request: &HoldRequest,
        now_ms: Millis,
    ) -> Result<Quoted, StoreError>;

    /// Ends a hold charging `charge`; `usage` (JSON text) is what the charge was
    /// metered from, noted on the ledger entry.
    async fn settle(
        &self,
        account: &str,
        hold_id: u64,
        charge: Credits,
        usage: Option<&str>,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError>;

    async fn release(
        &self,
        account: &str,
        hold_id: u64,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError>;

    /// The account's totals.
    async fn totals(&self, account: &str, now_ms: Millis) -> Result<Totals, StoreError>;

    /// The account as its owner or an admin sees it.
    async fn account(&self, account: &str, now_ms: Millis) -> Result<AccountView, StoreError>;

    /// Creates a policy-seeded account with its members and keys if it does not
    /// exist yet (plan grant, signup credits and listed grants, once). An existing
    /// account is left as it is — its members, and its keys, revoked ones included.
    /// Returns whether the account was created.
    async fn seed(&self, seed: &SeedAccount, now_ms: Millis) -> Result<bool, StoreError>;

    /// Whether the store answers at all (`GET /readyz`): one cheap call, no reads.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Releases every hold past its TTL; returns how many ended.
    async fn sweep(&self, now_ms: Millis) -> Result<usize, StoreError>;

    async fn create_account(
        &self,
        id: &str,
        plan: &str,
        billing_anchor_day: Option<u8>,
        now_ms: Millis,
    ) -> Result<AdminOutcome<AccountView>, StoreError>;

    /// Creates an account with everything `onboarding` lists — all of it, or
    /// nothing (`AccountRejected` says why) — and registers its keys.
    async fn onboard(
        &self,
        id: &str,
        plan: &str,
        billing_anchor_day: Option<u8>,
        onboarding: &Onboarding,
        now_ms: Millis,
    ) -> Result<AdminOutcome<AccountView>, StoreError>;

    /// Sets (`Some`) or removes (`None`) metadata entries of an account.
    async fn update_metadata(
        &self,
        account: &str,
        changes: &BTreeMap<String, Option<String>>,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError>;

    /// Accounts in the order of their ids, after `after`: up to `limit`.
    async fn list_accounts(
        &self,
        after: Option<&str>,
        limit: usize,
        now_ms: Millis,
    ) -> Result<Vec<AccountView>, StoreError>;

    /// Removes a member and revokes its keys: off the account first (no replica
    /// places another hold for them), then their lookup records.
    async fn remove_member(
        &self,
        account: &str,
        member: &str,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError>;

    async fn add_member(
        &self,
        account: &str,
        member: &str,
        terms: &MemberTerms,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError>;

    /// Sets a member's restrictions (monthly limit, disabled features).
    async fn update_member(
        &self,
        account: &str,
        member: &str,
        terms: &MemberTerms,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError>;

    /// Registers a key (by its hash) for an existing member: the member's active
    /// keys list it, and a key record maps the hash to it.
    async fn add_key(
        &self,
        account: &str,
        member: &str,
        key_id: &str,
        key_sha256: &[u8; 32],
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError>;

    /// Revokes a key — first off its member's active keys, so no replica places
    /// another hold for it, then its record; `UnknownKey` when there is none with this id.
    async fn revoke_key(
        &self,
        key_id: &str,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError>;

    /// An idempotent grant: `(receipt, created)`.
    async fn grant(
        &self,
        account: &str,
        grant: &GrantRequest,
        now_ms: Millis,
    ) -> Result<AdminOutcome<(GrantReceipt, bool)>, StoreError>;

    /// An idempotent signed adjustment (see `Account::adjust`): `(receipt, created)`.
    async fn adjust(
        &self,
        account: &str,
        adjustment: &AdjustRequest,
        now_ms: Millis,
    ) -> Result<AdminOutcome<(GrantReceipt, bool)>, StoreError>;

    async fn change_plan(
        &self,
        account: &str,
        plan: &str,
        effective: Effective,
        now_ms: Millis,
    ) -> Result<AdminOutcome<()>, StoreError>;

    /// The account's ledger, newest first: up to `limit` entries older than `before_seq`.
    async fn ledger(
        &self,
        account: &str,
        limit: usize,
        before_seq: Option<u64>,
        now_ms: Millis,
    ) -> Result<Vec<Entry>, StoreError>;

    /// Open holds of one account, or of all accounts (bounded by `limit`).
    async fn holds(
        &self,
        account: Option<&str>,
        limit: usize,
        now_ms: Millis,
    ) -> Result<Vec<(String, Hold)>, StoreError>;

    /// Attaches the response of a settled request to its idempotency record.
    async fn record_response(
        &self,
        account: &str,
        key: &str,
        response: &Recorded,
        now_ms: Millis,
    ) -> Result<bool, StoreError>;

    /// Settles and releases the store could not write (an outage) and keeps to
    /// retry when it is back, and how many it had to drop (its queue is bounded).
    fn pending_ends(&self) -> PendingEndsView {
        PendingEndsView::default()
    }

    /// One page of every account's ledger entries from `since_ms` on, in time
    /// order (then account, then entry number), after `after`: up to `limit`.
    /// The export reads page after page, so it holds one page at a time.
    async fn export(
        &self,
        since_ms: Millis,
        after: Option<&ExportPosition>,
        limit: usize,
    ) -> Result<Vec<(String, Entry)>, StoreError>;

    /// Returns once every change made before the call is durable (the sqlite store
    /// commits what it has queued); for a clean stop. The others write as they go.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Applies a payment (a paid Stripe checkout or invoice) to an account:
    /// [`Account::pay`], answered once on disk.
    async fn pay(
        &self,
        account: &str,
        payment: &Payment,
        now_ms: Millis,
    ) -> Result<AdminOutcome<Paid>, StoreError>;

    /// Events waiting in the outbox, oldest first (at most `limit`), and how many
    /// wait in all. A store that keeps no outbox has none.
    async fn pending_events(&self, _limit: usize) -> Result<(Vec<Event>, usize), StoreError> {
        Ok((Vec::new(), 0))
    }

    /// Removes delivered (or given up) events from the outbox. A removal lost in
    /// a crash delivers the event again: at least once.
    async fn events_done(&self, _ids: &[String]) -> Result<(), StoreError> {
        Ok(())
    }

    /// Which events the ledger keeps (none until called) and how many the outbox
    /// keeps at most (past it the oldest are dropped; the count of those is
    /// returned by [`Store::events_dropped`]).
    fn set_events(&self, _rules: EventRules, _max_pending: usize) {}

    /// Events dropped from a full outbox since the start.
    fn events_dropped(&self) -> u64 {
        0
    }

    /// Replaces the plans and the limits on an account's state (a policy reload).
    /// Accounts keep their plan names; a lower limit applies at an account's next
    /// transition that grows what it limits.
    fn set_catalog(&self, catalog: Arc<Catalog>, limits: Limits);
}
