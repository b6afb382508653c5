//! Members of an account and their active keys.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::admission::PREMIUM_FEATURE;
use super::{Account, AccountRejected, Catalog, Credits, KEYS_PER_MEMBER};

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
    /// The most the member may spend per billing cycle: what its holds hold
    /// counts while they are open, what they charge once settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_limit: Option<Credits>,
    /// Plan features the member may not use, besides premium (which
    /// `premium_disabled` says).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disabled_features: Vec<String>,
    /// Charged for the member's requests this billing cycle.
    #[serde(default, skip_serializing_if = "Credits::is_zero_ref")]
    pub used: Credits,
    /// Held by the member's open holds.
    #[serde(default, skip_serializing_if = "Credits::is_zero_ref")]
    pub held: Credits,
    /// `member_limit.reached` was decided for this cycle's spending: not again
    /// until `used` is below the limit (the refill, or a higher limit).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub limit_reached_sent: bool,
}

/// Most features one member may have disabled.
pub const DISABLED_FEATURES_MAX: usize = 32;

/// What an admin sets of a member: its restrictions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberTerms {
    /// Credits per billing cycle; `None`: no limit of its own.
    pub monthly_limit: Option<Credits>,
    /// Plan features the member may not use; `premium` among them is the same
    /// as `premium_disabled`.
    pub disabled_features: BTreeSet<String>,
}

impl MemberTerms {
    /// Terms that only switch premium off (or not): the earlier API's.
    pub fn premium(disabled: bool) -> Self {
        MemberTerms {
            monthly_limit: None,
            disabled_features: match disabled {
                true => BTreeSet::from([PREMIUM_FEATURE.to_string()]),
                false => BTreeSet::new(),
            },
        }
    }
}

impl Member {
    /// A new member, with no keys yet (recorded: keys added later are listed).
    pub fn new(premium_disabled: bool) -> Self {
        Member::with_terms(&MemberTerms::premium(premium_disabled))
    }

    pub fn with_terms(terms: &MemberTerms) -> Self {
        let mut member = Member {
            premium_disabled: false,
            keys: Some(BTreeSet::new()),
            monthly_limit: None,
            disabled_features: Vec::new(),
            used: Credits::ZERO,
            held: Credits::ZERO,
            limit_reached_sent: false,
        };
        member.set_terms(terms);
        member
    }

    /// Sets the member's restrictions (its spending and keys stay).
    pub fn set_terms(&mut self, terms: &MemberTerms) {
        self.monthly_limit = terms.monthly_limit;
        self.premium_disabled = terms.disabled_features.contains(PREMIUM_FEATURE);
        self.disabled_features = terms
            .disabled_features
            .iter()
            .filter(|f| *f != PREMIUM_FEATURE)
            .cloned()
            .collect();
    }

    /// The member's restrictions as an admin set them.
    pub fn terms(&self) -> MemberTerms {
        MemberTerms {
            monthly_limit: self.monthly_limit,
            disabled_features: self.disabled().map(str::to_string).collect(),
        }
    }

    /// Every feature the member may not use, premium included when disabled.
    pub fn disabled(&self) -> impl Iterator<Item = &str> {
        let premium = self.premium_disabled.then_some(PREMIUM_FEATURE);
        premium
            .into_iter()
            .chain(self.disabled_features.iter().map(String::as_str))
    }

    /// Whether the member may not use `feature`.
    pub fn disables(&self, feature: &str) -> bool {
        (self.premium_disabled && feature == PREMIUM_FEATURE)
            || self.disabled_features.iter().any(|f| f == feature)
    }

    /// Whether what the member was charged this cycle reached its monthly limit
    /// (a limit of 0 is never reached: nothing can be charged under it).
    pub fn limit_reached(&self) -> bool {
        self.monthly_limit
            .is_some_and(|limit| !limit.is_zero() && self.used >= limit)
    }

    /// What the member may still hold this cycle; `None` without a limit.
    pub fn room(&self) -> Option<Credits> {
        self.monthly_limit.map(|limit| {
            self.used
                .checked_add(self.held)
                .map_or(Credits::ZERO, |spent| limit.saturating_sub(spent))
        })
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
        self.add_member_with(member, &MemberTerms::premium(premium_disabled), catalog)
    }

    /// Adds a member with its restrictions, within the plan's seats.
    pub fn add_member_with(
        &mut self,
        member: &str,
        terms: &MemberTerms,
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
            .insert(member.to_string(), Member::with_terms(terms));
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

    /// Sets a member's restrictions: its monthly limit and disabled features.
    pub fn set_member_terms(
        &mut self,
        member: &str,
        terms: &MemberTerms,
    ) -> Result<(), AccountRejected> {
        let m = self
            .members
            .get_mut(member)
            .ok_or(AccountRejected::UnknownMember)?;
        m.set_terms(terms);
        Ok(())
    }

    /// Removes a member and, with it, its active keys: no hold is placed for
    /// them from now on. Returns the key ids it had (for the store to drop their
    /// records). Its open holds end as they would have.
    pub fn remove_member(&mut self, member: &str) -> Result<Vec<String>, AccountRejected> {
        let m = self
            .members
            .remove(member)
            .ok_or(AccountRejected::UnknownMember)?;
        Ok(m.keys.map(|k| k.into_iter().collect()).unwrap_or_default())
    }

    /// A new billing cycle: every member's spending starts again.
    pub(super) fn reset_member_use(&mut self) {
        for m in self.members.values_mut() {
            m.used = Credits::ZERO;
            m.limit_reached_sent = false;
        }
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
