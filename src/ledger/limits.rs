//! What one account's state may hold, and how large that can make it.
//!
//! An account's state is kept whole — the Redis store rewrites all of it on every
//! transition — so everything in it that grows with traffic has a cap: open holds
//! (`HoldRequest::max_holds`), settled idempotency records and the size of each
//! recorded response, receipts of admin grants, members (the plan's seats) and
//! their keys ([`KEYS_PER_MEMBER`](super::KEYS_PER_MEMBER)). [`Limits`] carries the caps the ledger applies
//! itself; the stores hold it beside the plans and pass it to the transitions that
//! grow the state. [`Limits::worst_account_state`] is the worst case of all caps
//! together, which the policy checks against its `max_account_state_bytes` at load.
//!
//! The sizes below are of the state as the Redis store encodes it (MessagePack with
//! field names), at the longest strings and the widest numbers each part can have;
//! the tests build such an account through the ledger and measure it.

/// Settled idempotency records an account keeps when the policy names no number.
pub const DEFAULT_IDEMPOTENCY_RECORDS_KEPT: usize = 64;

/// Largest response recorded for replay when the policy names no size.
pub const DEFAULT_IDEMPOTENCY_REPLAY_MAX_BYTES: usize = 64 << 10;

/// Admin-grant receipts an account keeps when the policy names no number.
pub const DEFAULT_GRANT_RECEIPTS_KEPT: usize = 10_000;

/// Longest account id, member name or admin-grant idempotency key the admin API
/// accepts (and the policy, for the accounts it seeds).
pub const NAME_MAX_BYTES: usize = 128;

/// Longest `Idempotency-Key` the gateway accepts.
pub const IDEMPOTENCY_KEY_MAX_BYTES: usize = 255;

/// Longest content type a recorded response keeps; a response with a longer one
/// is recorded as not replayable, as one too large is.
pub const CONTENT_TYPE_MAX_BYTES: usize = 255;

/// The caps the ledger applies to an account's state, from the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Ledger entries kept per account (the journal the stores keep beside the
    /// state, not in it).
    pub ledger_max_entries: usize,
    /// Settled idempotency records kept (oldest forgotten first); in-flight ones
    /// are bounded by the open holds.
    pub idempotency_records_kept: usize,
    /// Largest recorded response body kept for replay; a larger one is recorded
    /// as not replayable.
    pub idempotency_replay_max_bytes: usize,
    /// Receipts of admin grants kept (oldest forgotten first): a grant repeated
    /// with a forgotten key is granted again.
    pub grant_receipts_kept: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            ledger_max_entries: super::DEFAULT_LEDGER_MAX_ENTRIES,
            idempotency_records_kept: DEFAULT_IDEMPOTENCY_RECORDS_KEPT,
            idempotency_replay_max_bytes: DEFAULT_IDEMPOTENCY_REPLAY_MAX_BYTES,
            grant_receipts_kept: DEFAULT_GRANT_RECEIPTS_KEPT,
        }
    }
}

/// What the worst case of one account's state depends on besides [`Limits`]: the
/// policy's other caps and the longest names it uses, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateShape {
    /// Open holds per account (`max_holds_per_account`).
    pub max_holds: usize,
    /// The most members an account can have: the largest plan's seats.
    pub seats: usize,
    /// The plan quotas an account can count.
    pub quotas: usize,
    pub longest_operation: usize,
    pub longest_quota: usize,
    pub longest_plan: usize,
    pub longest_grant_kind: usize,
    /// The longest member name: [`NAME_MAX_BYTES`], or a longer one the policy seeds.
    pub longest_member: usize,
    /// What the names of every feature the plans name take (each with its
    /// string header): the most a member's disabled features can hold.
    pub features_bytes: usize,
}

/// A string's MessagePack header is 1 to 5 bytes; the sizes below count 1 (the
/// strings they were measured with are short) and add this for each name.
const STRING_HEADER_SLACK: usize = 4;

/// An account with no grants, holds, records, receipts or members, its id
/// [`NAME_MAX_BYTES`] long and its plan names empty, remembering the most ended
/// holds it does.
pub const ACCOUNT_BASE_BYTES: usize = 1_116;

/// One counted quota, its name empty.
pub const QUOTA_BYTES: usize = 16;

/// One open hold drawing from one grant, its operation and quota names empty, with
/// an idempotency key [`IDEMPOTENCY_KEY_MAX_BYTES`] long and the in-flight record
/// of that key. Each further grant a hold draws from adds [`DRAW_BYTES`].
pub const HOLD_BYTES: usize = 856;

/// One more grant a hold draws from.
pub const DRAW_BYTES: usize = 32;

/// One settled idempotency record beside its recorded body: the key
/// ([`IDEMPOTENCY_KEY_MAX_BYTES`]) in the records and in their order, the
/// fingerprint, and a content type [`CONTENT_TYPE_MAX_BYTES`] long.
pub const SETTLED_RECORD_BYTES: usize = 928;

/// One admin-grant receipt with its key ([`NAME_MAX_BYTES`]) in the receipts and
/// in their order, and the grant it made (until that is spent), kind names empty.
pub const RECEIPT_BYTES: usize = 464;

/// One member with [`KEYS_PER_MEMBER`](super::KEYS_PER_MEMBER) active keys, its
/// name empty.
pub const MEMBER_BYTES: usize = 2_632;

/// What a hold adds when it was placed for a key: its member's name (empty
/// here) and the key's id, at the longest the stores make (a seeded key's).
pub const HOLD_CALLER_BYTES: usize = 48;

/// What a member's limit and spending add to it: the limit, what it charged
/// and what it holds, each at its widest, and the disabled features' field.
pub const MEMBER_TERMS_BYTES: usize = 72;

/// One metadata entry at the longest key and value, and the field's name.
pub const METADATA_ENTRY_BYTES: usize =
    super::METADATA_KEY_MAX_BYTES + super::METADATA_VALUE_MAX_BYTES + 5;

/// The metadata field's name and map header.
pub const METADATA_FIELD_BYTES: usize = 16;

/// The worst case of one account's state, in bytes, by what bounds each part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateBytes {
    /// Open holds, each with its in-flight idempotency record.
    pub holds: u64,
    /// Settled idempotency records with their recorded responses.
    pub records: u64,
    /// Admin-grant receipts, each with the grant it made.
    pub receipts: u64,
    /// Members and their keys.
    pub members: u64,
    /// The rest: ids, plan names, counters, quota counts, ended holds.
    pub rest: u64,
}

impl StateBytes {
    pub fn total(&self) -> u64 {
        [self.holds, self.records, self.receipts, self.members]
            .into_iter()
            .fold(self.rest, u64::saturating_add)
    }
}

impl Limits {
    /// The most bytes one account's state can take under these limits and
    /// `shape`, as the Redis store encodes it. Grants beyond those of the receipts
    /// kept (plan, seeded and forgotten admin grants, each about a receipt's size),
    /// and draws beyond one a hold, are not counted.
    pub fn worst_account_state(&self, shape: &StateShape) -> StateBytes {
        let name = |len: usize| (len as u64).saturating_add(STRING_HEADER_SLACK as u64);
        let times = |count: usize, each: u64| (count as u64).saturating_mul(each);
        StateBytes {
            holds: times(
                shape.max_holds,
                (HOLD_BYTES as u64)
                    .saturating_add(name(shape.longest_operation))
                    .saturating_add(name(shape.longest_quota))
                    .saturating_add(HOLD_CALLER_BYTES as u64)
                    .saturating_add(name(shape.longest_member)),
            ),
            records: times(
                self.idempotency_records_kept,
                (SETTLED_RECORD_BYTES as u64)
                    .saturating_add(self.idempotency_replay_max_bytes as u64)
                    .saturating_add(STRING_HEADER_SLACK as u64),
            ),
            receipts: times(
                self.grant_receipts_kept,
                (RECEIPT_BYTES as u64).saturating_add(times(2, name(shape.longest_grant_kind))),
            ),
            members: times(
                shape.seats,
                (MEMBER_BYTES as u64)
                    .saturating_add(name(shape.longest_member))
                    .saturating_add(MEMBER_TERMS_BYTES as u64)
                    .saturating_add(shape.features_bytes as u64),
            ),
            rest: (ACCOUNT_BASE_BYTES as u64)
                .saturating_add(METADATA_FIELD_BYTES as u64)
                .saturating_add(times(
                    super::METADATA_MAX_ENTRIES,
                    METADATA_ENTRY_BYTES as u64,
                ))
                .saturating_add(times(2, name(shape.longest_plan)))
                .saturating_add(times(
                    shape.quotas,
                    (QUOTA_BYTES as u64).saturating_add(name(shape.longest_quota)),
                )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::money::ENDED_HOLDS_REMEMBERED;
    use crate::ledger::{
        seed_key_id, Account, Catalog, Credits, Ending, GrantRequest, HoldRequest,
        IdempotencyRequest, Millis, PlanTerms, Recorded, KEYS_PER_MEMBER,
    };

    /// The account as the Redis store writes it.
    fn encoded(a: &Account) -> usize {
        rmp_serde::to_vec_named(a).unwrap().len()
    }

    /// 2100-01-01: times are 9-byte integers, as every time after 2106 is.
    const NOW: Millis = 4_102_444_800_000;

    /// Wider than 32 bits, so it encodes at its widest.
    fn big() -> Credits {
        Credits::from_millicredits(1 << 40)
    }

    fn text(len: usize) -> String {
        "n".repeat(len)
    }

    fn catalog(plan: &str, seats: u32) -> Catalog {
        let terms = PlanTerms {
            seats,
            ..PlanTerms::default()
        };
        Catalog::from([(plan.to_string(), terms)])
    }

    /// An account at its widest with nothing in it: the longest id, counters
    /// past 32 bits, a pending plan, `quotas` counted, the most ended holds.
    fn empty(plan: &str, quotas: &[String]) -> Account {
        let mut a = Account::new(text(NAME_MAX_BYTES), plan);
        a.pending_plan = Some(plan.to_string());
        a.billing_anchor_day = 31;
        a.cycle_start_ms = NOW;
        a.next_grant_id = u64::MAX / 4;
        a.next_hold_id = u64::MAX / 4;
        a.next_seq = u64::MAX / 4;
        a.next_event = u64::MAX / 4;
        a.watched_balance = Some(big());
        a.charged = big();
        a.expired = big();
        a.granted = Credits::from_millicredits(2 << 40);
        for q in quotas {
            a.quota_used.insert(q.clone(), u64::MAX / 4);
        }
        for i in 0..ENDED_HOLDS_REMEMBERED as u64 {
            a.ended.push_back((u64::MAX / 4 + i, Ending::Settled));
        }
        a.check_invariant().unwrap();
        a
    }

    fn hold_request(operation: &str, quota: &str, key: &str, amount: Credits) -> HoldRequest {
        HoldRequest {
            operation: operation.to_string(),
            // As the gateway makes them: 16 random bytes in hex.
            request_id: text(32),
            amount,
            ttl_ms: 600_000,
            max_holds: usize::MAX,
            quota: Some(quota.to_string()),
            idempotency: Some(IdempotencyRequest {
                key: key.to_string(),
                // A SHA-256 in hex, as the gateway makes them.
                fingerprint: text(64),
                ttl_ms: 86_400_000,
            }),
            caller: None,
            terms: crate::ledger::HoldTerms::default(),
        }
    }

    /// A key of the longest length, distinct for each `i`.
    fn key(len: usize, i: usize) -> String {
        let tail = i.to_string();
        format!("{}{tail}", text(len - tail.len()))
    }

    fn grant_request(key: String, kind: &str) -> GrantRequest {
        GrantRequest {
            idempotency_key: key,
            kind: kind.to_string(),
            credits: big(),
            priority: 1_000,
            expires_at_ms: Some(NOW + 86_400_000),
        }
    }

    fn recorded(content_type: usize, body: usize) -> Recorded {
        Recorded {
            status: 599,
            content_type: Some(text(content_type)),
            body: Some(text(body)),
        }
    }

    /// `measured` fits in `size`, which is at most a few bytes more: the sizes
    /// the bound is made of are what an account takes, not guesses.
    fn fits_closely(what: &str, measured: usize, size: usize) {
        assert!(
            measured <= size && size < measured + 16,
            "{what}: measured {measured} bytes, the size says {size}"
        );
    }

    #[test]
    fn an_empty_account_and_a_quota_count_take_their_sizes() {
        let base = encoded(&empty("", &[]));
        fits_closely("an empty account", base, ACCOUNT_BASE_BYTES);
        let one_quota = encoded(&empty("", &[String::new()]));
        fits_closely("a quota", one_quota - base, QUOTA_BYTES);
    }

    #[test]
    fn a_receipt_takes_its_size() {
        let limits = Limits::default();
        let mut a = empty("", &[]);
        let mut before = encoded(&a);
        for i in 0..3 {
            a.grant_once(&grant_request(key(NAME_MAX_BYTES, i), ""), NOW, &limits)
                .unwrap();
            let after = encoded(&a);
            fits_closely("a receipt and its grant", after - before, RECEIPT_BYTES);
            before = after;
        }
    }

    /// An account with `grants` admin grants of `big()` each.
    fn funded(grants: usize) -> Account {
        let mut a = empty("", &[]);
        for i in 0..grants {
            a.grant_once(&grant_request(key(8, i), ""), NOW, &Limits::default())
                .unwrap();
        }
        a
    }

    #[test]
    fn a_hold_with_its_in_flight_record_and_a_draw_take_their_sizes() {
        let mut a = funded(3);
        let before = encoded(&a);
        let one_draw = hold_request("", "", &key(IDEMPOTENCY_KEY_MAX_BYTES, 0), big());
        a.hold(&one_draw, NOW, &Catalog::new()).unwrap();
        let after = encoded(&a);
        let hold = after - before;
        fits_closely("a hold", hold, HOLD_BYTES);
        // From the rest of the first grant, then from the second: two draws.
        let amount = Credits::from_millicredits(big().millicredits() + 1);
        let two_draws = hold_request("", "", &key(IDEMPOTENCY_KEY_MAX_BYTES, 1), amount);
        a.hold(&two_draws, NOW, &Catalog::new()).unwrap();
        let drawn = encoded(&a) - after;
        fits_closely("a second draw", drawn - hold, DRAW_BYTES);
    }

    #[test]
    fn a_settled_record_takes_its_size_beside_its_body() {
        let limits = Limits::default();
        let mut a = funded(1);
        let before = encoded(&a);
        let key = key(IDEMPOTENCY_KEY_MAX_BYTES, 0);
        let request = hold_request("", "", &key, Credits::from_millicredits(1));
        let placed = a.hold(&request, NOW, &Catalog::new()).unwrap();
        // Charging nothing leaves the grant as it was: only the record remains.
        a.settle(placed.hold_id, Credits::ZERO, NOW, &limits)
            .unwrap();
        let body = 1_000;
        assert!(a.record_response(&key, recorded(CONTENT_TYPE_MAX_BYTES, body), &limits));
        let record = encoded(&a) - before;
        fits_closely("a settled record", record - body, SETTLED_RECORD_BYTES);
    }

    #[test]
    fn a_member_with_the_most_keys_takes_its_size() {
        let mut a = empty("", &[]);
        let before = encoded(&a);
        a.add_member("", false, &catalog("", 1)).unwrap();
        for i in 0..KEYS_PER_MEMBER {
            // Seeded key ids are the longest the stores make.
            a.add_key("", &seed_key_id(&[i as u8; 32])).unwrap();
        }
        fits_closely("a member", encoded(&a) - before, MEMBER_BYTES);
    }

    #[test]
    fn a_hold_for_a_key_a_member_s_terms_and_metadata_take_their_sizes() {
        use crate::ledger::{Caller, MemberTerms, METADATA_MAX_ENTRIES};
        let catalog = catalog("", 1);
        // A hold placed for a seeded key (the longest key id) of a member named "".
        let mut a = funded(3);
        a.add_member("", false, &catalog).unwrap();
        let key_id = seed_key_id(&[9; 32]);
        a.add_key("", &key_id).unwrap();
        let mut request = hold_request("", "", &key(IDEMPOTENCY_KEY_MAX_BYTES, 0), big());
        let before = encoded(&a);
        a.hold(&request, NOW, &Catalog::new()).unwrap();
        let plain = encoded(&a) - before;
        request.caller = Some(Caller {
            member: String::new(),
            key_id,
            requires: vec![],
        });
        request.idempotency = Some(IdempotencyRequest {
            key: key(IDEMPOTENCY_KEY_MAX_BYTES, 1),
            fingerprint: text(64),
            ttl_ms: 86_400_000,
        });
        let before = encoded(&a);
        a.hold(&request, NOW, &catalog).unwrap();
        fits_closely(
            "a hold's caller",
            encoded(&a) - before - plain,
            HOLD_CALLER_BYTES,
        );
        // The member's limit, spending and a disabled feature named "".
        let before = encoded(&a);
        let terms = MemberTerms {
            monthly_limit: Some(big()),
            disabled_features: [String::new()].into(),
        };
        a.set_member_terms("", &terms).unwrap();
        a.members.get_mut("").unwrap().used = big();
        fits_closely(
            "a member's terms",
            encoded(&a) - before + 4,
            MEMBER_TERMS_BYTES,
        );
        // Metadata at its most.
        let before = encoded(&a);
        let changes = (0..METADATA_MAX_ENTRIES)
            .map(|i| {
                (
                    key(crate::ledger::METADATA_KEY_MAX_BYTES, i),
                    Some(text(crate::ledger::METADATA_VALUE_MAX_BYTES)),
                )
            })
            .collect();
        a.update_metadata(&changes).unwrap();
        fits_closely(
            "metadata",
            encoded(&a) - before,
            METADATA_FIELD_BYTES + METADATA_MAX_ENTRIES * METADATA_ENTRY_BYTES,
        );
    }

    /// Every limit reached at once, with names of every header width: the account
    /// the ledger builds stays within the worst case it is checked against at
    /// load, and not far under it.
    #[test]
    fn an_account_at_every_limit_stays_within_its_worst_case() {
        let limits = Limits {
            ledger_max_entries: 10,
            idempotency_records_kept: 3,
            idempotency_replay_max_bytes: 2_000,
            grant_receipts_kept: 4,
        };
        let quotas = [text(300), text(2)];
        let shape = StateShape {
            max_holds: 5,
            seats: 2,
            quotas: quotas.len(),
            longest_operation: 40,
            longest_quota: 300,
            longest_plan: 20,
            longest_grant_kind: 7,
            longest_member: NAME_MAX_BYTES,
            features_bytes: 0,
        };
        let plan = text(shape.longest_plan);
        let mut a = empty(&plan, &quotas);
        let catalog = catalog(&plan, 2);
        let terms = crate::ledger::MemberTerms {
            monthly_limit: Some(Credits::from_millicredits(1 << 42)),
            disabled_features: ["premium".to_string()].into(),
        };
        for m in 0..shape.seats {
            let member = key(shape.longest_member, m);
            a.add_member_with(&member, &terms, &catalog).unwrap();
            a.members.get_mut(&member).unwrap().used = big();
            for k in 0..KEYS_PER_MEMBER {
                a.add_key(&member, &seed_key_id(&[(m * 128 + k) as u8; 32]))
                    .unwrap();
            }
        }
        // More receipts than are kept: the oldest are forgotten (their grants
        // spent, as grants outside the receipts kept are not counted).
        for i in 0..limits.grant_receipts_kept + 2 {
            let grant = grant_request(key(NAME_MAX_BYTES, i), &text(7));
            a.grant_once(&grant, NOW, &limits).unwrap();
        }
        for i in 0..2 {
            let spend = hold_request("", &quotas[0], &format!("spend{i}"), big());
            let placed = a.hold(&spend, NOW, &Catalog::new()).unwrap();
            a.settle(placed.hold_id, big(), NOW, &limits).unwrap();
        }
        // More settled records than are kept, each with the largest body kept.
        let operation = text(shape.longest_operation);
        for i in 0..limits.idempotency_records_kept + 2 {
            let key = key(IDEMPOTENCY_KEY_MAX_BYTES, i);
            let request = hold_request(&operation, &quotas[0], &key, Credits::from_millicredits(1));
            let placed = a.hold(&request, NOW, &Catalog::new()).unwrap();
            a.settle(placed.hold_id, Credits::ZERO, NOW, &limits)
                .unwrap();
            let response = recorded(CONTENT_TYPE_MAX_BYTES, limits.idempotency_replay_max_bytes);
            assert!(a.record_response(&key, response, &limits));
        }
        let changes = (0..crate::ledger::METADATA_MAX_ENTRIES)
            .map(|i| {
                (
                    key(crate::ledger::METADATA_KEY_MAX_BYTES, i),
                    Some(text(crate::ledger::METADATA_VALUE_MAX_BYTES)),
                )
            })
            .collect();
        a.update_metadata(&changes).unwrap();
        // Every open hold placed for a key of the member with the longest name.
        let holder = key(shape.longest_member, 0);
        let holder_key = seed_key_id(&[0; 32]);
        for i in 0..shape.max_holds {
            let key = key(IDEMPOTENCY_KEY_MAX_BYTES, 100 + i);
            let mut request =
                hold_request(&operation, &quotas[0], &key, Credits::from_millicredits(1));
            request.caller = Some(crate::ledger::Caller {
                member: holder.clone(),
                key_id: holder_key.clone(),
                requires: vec![],
            });
            a.hold(&request, NOW, &catalog).unwrap();
        }
        assert_eq!(a.grant_receipts.len(), limits.grant_receipts_kept);
        assert_eq!(a.grants.len(), limits.grant_receipts_kept);
        assert_eq!(a.holds.len(), shape.max_holds);

        let worst = limits.worst_account_state(&shape).total();
        let measured = encoded(&a) as u64;
        assert!(measured <= worst, "{measured} > {worst}");
        assert!(
            worst - measured < worst / 20,
            "the worst case {worst} is far over what the account takes, {measured}"
        );
    }

    #[test]
    fn the_oldest_settled_records_and_receipts_past_their_limits_are_forgotten() {
        let limits = Limits {
            idempotency_records_kept: 2,
            grant_receipts_kept: 2,
            ..Limits::default()
        };
        let mut a = funded(1);
        for i in 0..3 {
            let request = hold_request("op", "", &format!("k{i}"), Credits::ZERO);
            let placed = a.hold(&request, NOW, &Catalog::new()).unwrap();
            a.settle(placed.hold_id, Credits::ZERO, NOW, &limits)
                .unwrap();
        }
        let replayable = |a: &Account, key: &str| {
            let request = hold_request("op", "", key, Credits::ZERO);
            a.admit(&request, &Catalog::new()).is_err()
        };
        assert!(!replayable(&a, "k0"), "the oldest record is forgotten");
        assert!(replayable(&a, "k1") && replayable(&a, "k2"));

        for i in 0..3 {
            a.grant_once(&grant_request(format!("g{i}"), "bonus"), NOW, &limits)
                .unwrap();
        }
        let (_, created) = a
            .grant_once(&grant_request("g0".into(), "bonus"), NOW, &limits)
            .unwrap();
        assert!(created, "a forgotten key grants again");
        let (_, created) = a
            .grant_once(&grant_request("g2".into(), "bonus"), NOW, &limits)
            .unwrap();
        assert!(!created, "a kept key does not");
    }

    #[test]
    fn a_response_past_the_limits_is_recorded_as_not_replayable() {
        let limits = Limits {
            idempotency_replay_max_bytes: 10,
            ..Limits::default()
        };
        for (response, kept) in [
            (recorded(CONTENT_TYPE_MAX_BYTES, 10), true),
            (recorded(CONTENT_TYPE_MAX_BYTES, 11), false),
            (recorded(CONTENT_TYPE_MAX_BYTES + 1, 10), false),
        ] {
            let mut a = funded(1);
            let request = hold_request("op", "", "k", Credits::ZERO);
            let placed = a.hold(&request, NOW, &Catalog::new()).unwrap();
            a.settle(placed.hold_id, Credits::ZERO, NOW, &limits)
                .unwrap();
            assert!(a.record_response("k", response.clone(), &limits));
            let replayed = match a.admit(&request, &Catalog::new()) {
                Err(crate::ledger::HoldRejected::Replay { response, .. }) => response,
                other => panic!("{other:?}"),
            };
            let expected = if kept {
                response
            } else {
                Recorded {
                    body: None,
                    content_type: None,
                    ..response
                }
            };
            assert_eq!(replayed, Some(expected));
        }
    }
}
