//! Admission: the one decision whether a hold may be placed.
//!
//! [`Account::admit`] decides everything a hold decides — the caller's key is still
//! active, the plan has the features the operation requires, none of them is locked
//! for the member, the idempotency key, the quota, the balance, the number of open
//! holds — reading the account and changing nothing. [`Account::hold`] asks it and
//! then draws; the client's quote asks it and stops there, so a quote can never
//! allow what the hold would refuse, nor the other way round.
//!
//! [`entitle`] is the entitlement rule alone. The gateway asks it before it reads a
//! request body (so a 403 is never hidden behind a 413), on its view of the key and
//! the account; `admit` asks it again on the state the hold commits on.

use super::idempotency::Check;
use super::{Account, Catalog, Credits, HoldRequest, Recorded};

/// The plan feature a member with premium disabled cannot use.
pub const PREMIUM_FEATURE: &str = "premium";

/// What the gateway decided a request may do, from its view of the key and the
/// account — which on a shared store may be a few seconds old. [`Account::admit`]
/// checks it again against the account's state in the same atomic step as the
/// hold, so a revoked key, a downgrade or a member's premium switch made through
/// any replica binds every priced request at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub member: String,
    /// The id of the key the request presented (`key_…`), not the key.
    pub key_id: String,
    /// The plan features the operation requires.
    pub requires: Vec<String>,
}

/// A hold that was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldPlaced {
    pub hold_id: u64,
    /// What was held: the request's amount, or under `hold = "available"` what
    /// was available when that was less.
    pub held: Credits,
    /// Available credits after the hold.
    pub available: Credits,
}

/// Why a hold was not placed. Outcomes, not failures: the gateway answers them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldRejected {
    InsufficientCredits {
        required: Credits,
        available: Credits,
        held: Credits,
    },
    TooManyHolds {
        limit: usize,
    },
    QuotaExhausted {
        quota: String,
        limit: u64,
    },
    /// The first request with this idempotency key is still in flight.
    IdempotencyInProgress,
    /// Another request was sent under this idempotency key.
    IdempotencyKeyReused,
    /// This request was settled before: answer it again, charge nothing. `None`
    /// while its response is being recorded, or when it was too large to keep.
    Replay {
        response: Option<Recorded>,
        recording: bool,
    },
    /// The caller's key is no longer active (revoked), or its member is gone.
    KeyNotActive,
    /// The account's plan lacks a feature the operation requires.
    PlanRequired {
        feature: String,
    },
    /// The operation is premium and the member has premium disabled.
    PremiumDisabled,
    /// The operation requires a feature disabled for the member (other than
    /// premium, which is `PremiumDisabled`).
    FeatureDisabled {
        feature: String,
    },
    /// The hold would take the member past its monthly limit: `used` is what it
    /// charged this cycle plus what its open holds hold.
    MemberLimitReached {
        member: String,
        limit: Credits,
        used: Credits,
    },
}

/// The entitlement rule: the plan (with `plan_features`) has every feature the
/// operation `requires`, and a member with premium disabled asks for nothing premium.
/// The first missing feature is named.
pub fn entitle(
    plan_features: &[String],
    requires: &[String],
    premium_disabled: bool,
) -> Result<(), HoldRejected> {
    if let Some(missing) = requires.iter().find(|f| !plan_features.contains(f)) {
        return Err(HoldRejected::PlanRequired {
            feature: missing.clone(),
        });
    }
    if premium_disabled && requires.iter().any(|f| f == PREMIUM_FEATURE) {
        return Err(HoldRejected::PremiumDisabled);
    }
    Ok(())
}

/// The member's own locks besides premium: the first feature the operation
/// requires that `disabled` (the member's `disabled_features`) lists is refused.
/// Asked after [`entitle`], by the gateway before the body and by `admit`.
pub fn features_allowed(requires: &[String], disabled: &[String]) -> Result<(), HoldRejected>
where
{
    match requires.iter().find(|f| disabled.contains(f)) {
        Some(feature) => Err(HoldRejected::FeatureDisabled {
            feature: feature.clone(),
        }),
        None => Ok(()),
    }
}

impl Account {
    /// Whether `request` may be held now, and how much: in the order a refusal is
    /// answered, who asks (a revoked key gets nothing, not even a replay), what the
    /// idempotency key says, the quota, the balance, the number of open holds.
    /// The amount is the request's, or — when its terms allow a partial hold
    /// (`hold = "available"`) and the account cannot pay it all but has at least
    /// the minimum — what is available. Reads only: time must have been applied
    /// first (the store does, and so does [`Account::hold`]).
    pub fn admit(&self, request: &HoldRequest, catalog: &Catalog) -> Result<Credits, HoldRejected> {
        if let Some(caller) = &request.caller {
            self.check_caller(caller, catalog)?;
        }
        if let Some(idem) = &request.idempotency {
            match self.idempotency.check(idem) {
                Check::Proceed => {}
                Check::InProgress => return Err(HoldRejected::IdempotencyInProgress),
                Check::Reused => return Err(HoldRejected::IdempotencyKeyReused),
                Check::Replay(response) => {
                    let recording = response.is_none();
                    return Err(HoldRejected::Replay {
                        response,
                        recording,
                    });
                }
            }
        }
        if let Some(quota) = &request.quota {
            let limit = catalog
                .get(&self.plan)
                .and_then(|t| t.quotas.get(quota))
                .copied();
            if let Some(limit) = limit {
                let used = self.quota_use().get(quota).copied().unwrap_or(0);
                if used.saturating_add(request.terms.quota_units) > limit {
                    return Err(HoldRejected::QuotaExhausted {
                        quota: quota.clone(),
                        limit,
                    });
                }
            }
        }
        // The member's limit caps what may be held for it, as the balance does.
        let member = request
            .caller
            .as_ref()
            .and_then(|c| self.members.get(&c.member).map(|m| (c.member.as_str(), m)));
        let room = member.and_then(|(_, m)| m.room());
        let available = self.available();
        let payable = room.map_or(available, |r| r.min(available));
        let amount = match request.terms.partial_min {
            _ if payable >= request.amount => request.amount,
            Some(min) if payable >= min => payable,
            _ => return Err(self.short(request, room, available, member)),
        };
        if self.open_holds >= request.max_holds {
            return Err(HoldRejected::TooManyHolds {
                limit: request.max_holds,
            });
        }
        Ok(amount)
    }

    /// Why `request` cannot be held: the member's limit when that is what is
    /// short, else the balance.
    fn short(
        &self,
        request: &HoldRequest,
        room: Option<Credits>,
        available: Credits,
        member: Option<(&str, &super::Member)>,
    ) -> HoldRejected {
        let needed = request.terms.partial_min.unwrap_or(request.amount);
        match (room, member) {
            (Some(room), Some((name, m))) if room < needed && room <= available => {
                let limit = m.monthly_limit.unwrap_or(Credits::ZERO);
                HoldRejected::MemberLimitReached {
                    member: name.to_string(),
                    limit,
                    used: m.used.checked_add(m.held).unwrap_or(limit),
                }
            }
            _ => HoldRejected::InsufficientCredits {
                required: request.amount,
                available,
                held: self.held(),
            },
        }
    }

    /// Checks who asks against this state: the key is still active for a member
    /// that still exists, and [`entitle`] on the current plan and the member's locks.
    fn check_caller(&self, caller: &Caller, catalog: &Catalog) -> Result<(), HoldRejected> {
        let member = self
            .members
            .get(&caller.member)
            .ok_or(HoldRejected::KeyNotActive)?;
        // `None`: keys not recorded (an earlier version's state); the store's key
        // record alone decides, as it did then.
        if member
            .keys
            .as_ref()
            .is_some_and(|keys| !keys.contains(&caller.key_id))
        {
            return Err(HoldRejected::KeyNotActive);
        }
        let features = catalog
            .get(&self.plan)
            .map_or(&[][..], |t| t.features.as_slice());
        entitle(features, &caller.requires, member.premium_disabled)?;
        features_allowed(&caller.requires, &member.disabled_features)
    }
}
