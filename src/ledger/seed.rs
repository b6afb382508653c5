//! Accounts seeded from the policy file, as the ledger opens them.
//!
//! Every store seeds through [`Account::seeded`], so a seeded account is the same
//! account whichever store holds it.

use super::{Account, Catalog, Credits, Member, Millis};

/// A grant a seeded account starts with.
#[derive(Clone, Debug)]
pub struct SeedGrant {
    pub kind: String,
    pub credits: Credits,
    pub expires_at_ms: Option<Millis>,
    pub priority: u32,
}

/// A key a seeded account's member starts with, by its SHA-256.
#[derive(Clone, Debug)]
pub struct SeedKey {
    pub member: String,
    pub key_sha256: [u8; 32],
}

/// An account the policy file lists, created once when it does not exist yet.
#[derive(Clone, Debug)]
pub struct SeedAccount {
    pub id: String,
    pub plan: String,
    pub billing_anchor_day: Option<u8>,
    pub grants: Vec<SeedGrant>,
    pub keys: Vec<SeedKey>,
}

/// The id a seeded key gets: derived from its hash, so every replica and every
/// restart names it alike.
pub fn seed_key_id(key_sha256: &[u8; 32]) -> String {
    format!("key_seed_{}", hex::encode(&key_sha256[..8]))
}

impl Account {
    /// A policy-seeded account as it is created: the plan grant for the current
    /// cycle, the signup credits and the listed grants, and its members with their
    /// keys listed as active.
    pub fn seeded(seed: &SeedAccount, catalog: &Catalog, now_ms: Millis) -> Account {
        let terms = catalog.get(&seed.plan).cloned().unwrap_or_default();
        let mut account = Account::open(
            &seed.id,
            &seed.plan,
            seed.billing_anchor_day,
            &terms,
            now_ms,
        );
        for g in &seed.grants {
            // Validation bounds amounts far below the overflow limit.
            let _ = account.grant(&g.kind, g.credits, g.priority, g.expires_at_ms, now_ms);
        }
        for key in &seed.keys {
            // Validation checked the seeded members fit the plan's seats.
            account
                .members
                .entry(key.member.clone())
                .or_insert_with(|| Member::new(false));
            // The member exists (just above); a policy lists far fewer keys than the limit.
            let _ = account.add_key(&key.member, &seed_key_id(&key.key_sha256));
        }
        account
    }
}
