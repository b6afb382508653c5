//! The ledger core: grants, spend order, holds, settle, release, expire.
//!
//! Plain synchronous Rust. It takes `now_ms` (Unix milliseconds) as an argument and
//! knows nothing of tokio, Pingora, Redis or the clock — which is what lets the
//! property tests drive it through random histories. Stores apply it; the gateway
//! calls stores.
//!
//! Invariant, checked after every transition in debug and test builds:
//! `granted + debt == available + held + charged + expired`, and nothing is negative
//! (amounts are unsigned, and every subtraction is checked). Debt comes only from a
//! settle above its hold (`over_hold = "overdraft"`), within the plan's overdraft
//! limit, and the next grant repays it first.
//!
//! # Layout
//! - [`account`]: the `Account` state, its totals, its ledger entries, the invariant.
//! - [`money`]: grants in spend order, holds, settle, release, expiry.
//! - [`admission`]: the one decision whether a hold may be placed — who asks, the
//!   plan's features, the member's locks, idempotency, the quota, the balance, the
//!   number of open holds. The hold and the quote both ask it.
//! - [`adjust`]: an admin's signed adjustments (refunds, chargebacks).
//! - [`onboard`]: an account opened with its members, keys, grants and metadata.
//! - [`events`]: the events a transition causes (`balance.low`, `grant.created`…).
//! - [`members`]: members and their active keys.
//! - [`payments`]: what a paid checkout or invoice does (a grant once, a plan).
//! - [`plan`]: plans, billing cycles, refills and plan changes.
//! - [`limits`]: the caps on what one account's state holds, and its worst-case size.
//! - [`seed`]: accounts the policy file lists, opened alike by every store.
//!
//! Besides money an account carries what decides who may spend it: its plan and
//! billing cycle, its members, its per-cycle quotas, and its journal (the ledger
//! its owner reads). Stores call [`Account::apply_time`] (a due refill, then
//! expiries) before every transition and read, which is how refills happen lazily
//! and exactly once per cycle.

// Money code: an index that could be out of range is a `get` that says what then.
#![deny(clippy::indexing_slicing)]

mod account;
mod adjust;
mod admission;
mod calendar;
mod credits;
mod ended;
mod events;
mod idempotency;
mod journal;
mod limits;
mod members;
mod money;
mod onboard;
mod payments;
mod plan;
mod seed;

pub use account::{
    Account, AccountRejected, GrantOverflow, HoldChanges, Totals, DEFAULT_LEDGER_MAX_ENTRIES,
    MAX_GRANTED,
};
pub use adjust::{AdjustRequest, ADJUST_KIND, REASON_MAX_BYTES};
pub use admission::{entitle, features_allowed, Caller, HoldPlaced, HoldRejected, PREMIUM_FEATURE};
pub use calendar::{cycle_bounds, day_of_month};
pub use credits::{Credits, ParseCreditsError};
pub use events::{Event, EventKind, EventRules, DEFAULT_MAX_PENDING_EVENTS};
pub use idempotency::{IdempotencyRequest, Recorded};
pub use journal::{Entry, EntryKind, Journal, USAGE_MAX_BYTES};
pub use limits::{
    Limits, StateBytes, StateShape, CONTENT_TYPE_MAX_BYTES, DEFAULT_GRANT_RECEIPTS_KEPT,
    DEFAULT_IDEMPOTENCY_RECORDS_KEPT, DEFAULT_IDEMPOTENCY_REPLAY_MAX_BYTES, DRAW_BYTES,
    IDEMPOTENCY_KEY_MAX_BYTES, NAME_MAX_BYTES,
};
pub use members::{Member, MemberTerms, DISABLED_FEATURES_MAX};
pub use money::{
    Draw, EndRejected, Ending, Grant, GrantReceipt, GrantRequest, Hold, HoldEnded, HoldRequest,
    HoldTerms,
};
pub use onboard::{
    OnboardKey, Onboarding, METADATA_KEY_MAX_BYTES, METADATA_MAX_ENTRIES, METADATA_VALUE_MAX_BYTES,
};
pub use payments::{refunded_credits, Paid, Payment, PaymentAction};
pub use plan::{plan_in_force, Catalog, Effective, PlanTerms};
pub use seed::{seed_key_id, SeedAccount, SeedGrant, SeedKey};

/// The `detail` of the ledger entry written when a hold expires.
pub const HOLD_TTL_DETAIL: &str = "hold_ttl";

/// Unix time in milliseconds, always passed in by the caller.
pub type Millis = u64;

/// Spend priority of a grant kind when the policy does not name one.
pub fn default_priority(kind: &str) -> u32 {
    match kind {
        "bonus" => 10,
        "plan" => 20,
        "topup" => 30,
        _ => 25,
    }
}

/// Active keys one member may have. The account's state, key ids included, is
/// written on every hold, so it must stay small.
pub const KEYS_PER_MEMBER: usize = 100;

#[cfg(test)]
mod tests;
