//! Members of an account and their active keys.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{Account, AccountRejected, Catalog, KEYS_PER_MEMBER};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub premium_disabled: bool,
    /// The ids of the member's active keys. A hold on behalf of a key not listed
    /// here is refused, in the same atomic step as the hold: that is what makes a
    /// revocation bind every replica at once, whatever they cached.
    ///
    /// `None` means "not recorded": a state written by an earlier version, which
    /// kept keys only in the store's key records. The key check is then skipped
    /// for this member (its keys still stop authenticating once their record is
    /// gone), and it stays unrecorded: listing only the keys added from now on
    /// would refuse the member's older keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<BTreeSet<String>>,
}

impl Member {
    /// A new member, with no keys yet (recorded: keys added later are listed).
    pub fn new(premium_disabled: bool) -> Self {
        Member {
            premium_disabled,
            keys: Some(BTreeSet::new()),
        }
    }
}

impl Account {
    /// Adds a member, within the plan's seats.
    pub fn add_member(
        &mut self,
        member: &str,
        premium_disabled: bool,
        catalog: &Catalog,
    ) -> Result<(), AccountRejected> {
        if self.members.contains_key(member) {
            return Err(AccountRejected::MemberExists);
        }
        let seats = catalog.get(&self.plan).map_or(1, |t| t.seats);
        if self.members.len() >= seats as usize {
            return Err(AccountRejected::SeatLimit { seats });
        }
        self.members
            .insert(member.to_string(), Member::new(premium_disabled));
        Ok(())
    }

    pub fn update_member(
        &mut self,
        member: &str,
        premium_disabled: bool,
    ) -> Result<(), AccountRejected> {
        let m = self
            .members
            .get_mut(member)
            .ok_or(AccountRejected::UnknownMember)?;
        m.premium_disabled = premium_disabled;
        Ok(())
    }

    /// Lists a new active key of a member (the store keeps the key's lookup
    /// record beside). A member whose keys were never recorded stays unrecorded
    /// (see [`Member::keys`]).
    pub fn add_key(&mut self, member: &str, key_id: &str) -> Result<(), AccountRejected> {
        let m = self
            .members
            .get_mut(member)
            .ok_or(AccountRejected::UnknownMember)?;
        if let Some(keys) = &mut m.keys {
            if keys.len() >= KEYS_PER_MEMBER && !keys.contains(key_id) {
                return Err(AccountRejected::KeyLimit {
                    limit: KEYS_PER_MEMBER,
                });
            }
            keys.insert(key_id.to_string());
        }
        Ok(())
    }

    /// Takes a key off its member's active keys: no hold is placed on its behalf
    /// from now on. Returns whether it was listed.
    pub fn revoke_key(&mut self, member: &str, key_id: &str) -> bool {
        self.members
            .get_mut(member)
            .and_then(|m| m.keys.as_mut())
            .is_some_and(|keys| keys.remove(key_id))
    }
}
