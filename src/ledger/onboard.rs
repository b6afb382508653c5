//! Opening an account in one step with everything it starts with (members and
//! their restrictions, keys, grants, metadata), and the metadata an admin keeps
//! on it — all or nothing.

use std::collections::BTreeMap;

use super::{Account, AccountRejected, Catalog, GrantRequest, Limits, MemberTerms, Millis};

/// Most metadata entries an account keeps.
pub const METADATA_MAX_ENTRIES: usize = 32;
/// Longest metadata key, in bytes.
pub const METADATA_KEY_MAX_BYTES: usize = 40;
/// Longest metadata value, in bytes.
pub const METADATA_VALUE_MAX_BYTES: usize = 500;

/// A key made at onboarding: its id, its member and its hash (which only the
/// store keeps; the account lists the id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnboardKey {
    pub member: String,
    pub key_id: String,
    pub key_sha256: [u8; 32],
}

/// What a new account starts with besides its plan.
#[derive(Clone, Debug, Default)]
pub struct Onboarding {
    pub members: Vec<(String, MemberTerms)>,
    pub keys: Vec<OnboardKey>,
    pub grants: Vec<GrantRequest>,
    pub metadata: BTreeMap<String, String>,
}

impl Account {
    /// Gives a just-opened account what `onboarding` lists, in order: metadata,
    /// members (within the plan's seats), their keys, the grants. The first
    /// refusal is returned and the caller drops the account: nothing is created.
    pub fn onboard(
        &mut self,
        onboarding: &Onboarding,
        now_ms: Millis,
        catalog: &Catalog,
        limits: &Limits,
    ) -> Result<(), AccountRejected> {
        let metadata = onboarding
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        self.update_metadata(&metadata)?;
        for (member, terms) in &onboarding.members {
            self.add_member_with(member, terms, catalog)?;
        }
        for key in &onboarding.keys {
            self.add_key(&key.member, &key.key_id)?;
        }
        for grant in &onboarding.grants {
            self.grant_once(grant, now_ms, limits)?;
        }
        Ok(())
    }

    /// Sets (`Some`) or removes (`None`) metadata entries; refused whole when
    /// the account would keep more than [`METADATA_MAX_ENTRIES`]. Sizes of keys
    /// and values are the caller's to check.
    pub fn update_metadata(
        &mut self,
        changes: &BTreeMap<String, Option<String>>,
    ) -> Result<(), AccountRejected> {
        let mut metadata = self.metadata.clone();
        for (key, value) in changes {
            match value {
                Some(v) => metadata.insert(key.clone(), v.clone()),
                None => metadata.remove(key),
            };
        }
        if metadata.len() > METADATA_MAX_ENTRIES {
            return Err(AccountRejected::MetadataLimit {
                limit: METADATA_MAX_ENTRIES,
            });
        }
        self.metadata = metadata;
        Ok(())
    }
}
