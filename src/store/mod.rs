//! Where accounts live. A store applies the ledger core atomically per account.
//!
//! One trait, and (for now) one implementation: [`memory::MemoryStore`]. The
//! gateway only ever talks to `dyn Store`. A store never decides prices or
//! HTTP answers; it returns outcomes (`HoldRejected`, `EndRejected`) as values and
//! failures (`StoreError`) as errors.

pub mod memory;

use async_trait::async_trait;

use crate::ledger::{
    Credits, EndRejected, Grant, HoldEnded, HoldPlaced, HoldRejected, HoldRequest, Millis, Totals,
};
use crate::policy::{Plan, SeedAccount};

/// Who a key belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub account: String,
    pub member: String,
    pub plan: String,
}

/// What an account's owner may see of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Balance {
    pub plan: String,
    /// Live grants in spend order.
    pub grants: Vec<Grant>,
    pub totals: Totals,
}

/// A failure of the store itself (not an outcome of the ledger).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("account {0} does not exist")]
    UnknownAccount(String),
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

pub type HoldOutcome = Result<HoldPlaced, HoldRejected>;
pub type EndOutcome = Result<HoldEnded, EndRejected>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The account and member of a key, by the SHA-256 of the key.
    async fn identify(&self, key_sha256: &[u8; 32]) -> Result<Option<Identity>, StoreError>;

    async fn hold(
        &self,
        account: &str,
        request: &HoldRequest,
        now_ms: Millis,
    ) -> Result<HoldOutcome, StoreError>;

    async fn settle(
        &self,
        account: &str,
        hold_id: u64,
        charge: Credits,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError>;

    async fn release(
        &self,
        account: &str,
        hold_id: u64,
        now_ms: Millis,
    ) -> Result<EndOutcome, StoreError>;

    /// The account's totals, after applying time.
    async fn totals(&self, account: &str, now_ms: Millis) -> Result<Totals, StoreError>;

    /// The account's plan, grants and totals, after applying time.
    async fn balance(&self, account: &str, now_ms: Millis) -> Result<Balance, StoreError>;

    /// Creates a seeded account if it does not exist yet (with its plan grant,
    /// signup credits and listed grants, once) and registers its keys.
    /// Returns whether the account was created.
    async fn seed(
        &self,
        seed: &SeedAccount,
        plan: &Plan,
        now_ms: Millis,
    ) -> Result<bool, StoreError>;

    /// Releases every hold past its TTL; returns how many ended.
    async fn sweep(&self, now_ms: Millis) -> Result<usize, StoreError>;
}
