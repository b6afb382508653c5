//! Where the store keeps what in Redis: every key name, in one place.
//!
//! All of one account's keys share its hash tag `{acct:ID}`, so that one script may
//! touch them all on Redis Cluster.

/// `cg:{acct:ID}` followed by `suffix` (built on every commit: no formatting machinery).
pub(super) fn account_key_with(id: &str, suffix: &str) -> String {
    let mut key = String::with_capacity(10 + id.len() + suffix.len());
    key.push_str("cg:{acct:");
    key.push_str(id);
    key.push('}');
    key.push_str(suffix);
    key
}

pub(super) fn account_key(id: &str) -> String {
    account_key_with(id, "")
}

pub(super) fn ledger_key(id: &str) -> String {
    account_key_with(id, ":ledger")
}

pub(super) fn key_key(hash: &[u8; 32]) -> String {
    format!("cg:key:{}", hex::encode(hash))
}

pub(super) fn key_id_key(key_id: &str) -> String {
    format!("cg:keyid:{key_id}")
}

pub(super) const HOLDS_INDEX: &str = "cg:holds";

/// The data marker: a random value the first gateway to use this Redis writes. A
/// Redis without it (or with another) lost what this process knew (see `health`).
pub(super) const MARKER: &str = "cg:marker";

/// Every account's id, in a sorted set (all scores 0, so ordered by id), for
/// `GET /admin/accounts` and the export. Added by every account created from this
/// version on.
pub(super) const ACCOUNTS_INDEX: &str = "cg:accounts";
