use super::*;
use proptest::prelude::*;

fn c(text: &str) -> Credits {
    text.parse().unwrap()
}

fn limits() -> Limits {
    Limits::default()
}

/// An admin grant of `credits` under `key`.
fn grant_request(
    key: &str,
    kind: &str,
    credits: &str,
    priority: u32,
    expires_at_ms: Option<Millis>,
) -> GrantRequest {
    GrantRequest {
        idempotency_key: key.into(),
        kind: kind.into(),
        credits: c(credits),
        priority,
        expires_at_ms,
    }
}

fn request(amount: &str) -> HoldRequest {
    HoldRequest {
        operation: "op".into(),
        request_id: "r".into(),
        amount: c(amount),
        ttl_ms: 1_000,
        max_holds: 64,
        quota: None,
        idempotency: None,
        caller: None,
        terms: HoldTerms::default(),
    }
}

#[test]
fn spends_bonus_before_plan_before_topup() {
    let mut a = Account::new("a", "free");
    let topup = a.grant("topup", c("10"), 30, None, 0).unwrap();
    let plan = a.grant("plan", c("10"), 20, None, 0).unwrap();
    let bonus = a.grant("bonus", c("10"), 10, Some(60_000), 0).unwrap();
    let placed = a.hold(&request("15"), 0, &Catalog::new()).unwrap();
    let hold = a.holds().next().unwrap();
    assert_eq!(
        hold.draws,
        vec![
            Draw {
                grant_id: bonus,
                amount: c("10")
            },
            Draw {
                grant_id: plan,
                amount: c("5")
            },
        ]
    );
    assert_eq!(placed.available, c("15"));
    assert!(a
        .grants()
        .iter()
        .any(|g| g.id == topup && g.left == c("10")));
}

#[test]
fn earlier_expiry_then_older_grant_first_within_a_priority() {
    let mut a = Account::new("a", "free");
    let never = a.grant("bonus", c("1"), 10, None, 0).unwrap();
    let late = a.grant("bonus", c("1"), 10, Some(9_000), 0).unwrap();
    let soon = a.grant("bonus", c("1"), 10, Some(5_000), 0).unwrap();
    let never_newer = a.grant("bonus", c("1"), 10, None, 0).unwrap();
    let order: Vec<u64> = a.grants().iter().map(|g| g.id).collect();
    assert_eq!(order, vec![soon, late, never, never_newer]);
}

#[test]
fn settle_charges_min_of_actual_and_held_and_returns_the_rest() {
    let mut a = Account::new("a", "free");
    a.grant("plan", c("10"), 20, None, 0).unwrap();
    let h = a.hold(&request("4"), 0, &Catalog::new()).unwrap().hold_id;
    let ended = a.settle(h, c("1.5"), 1, &limits()).unwrap();
    assert_eq!(ended.charged, c("1.5"));
    assert_eq!(ended.returned, c("2.5"));
    assert_eq!(a.available(), c("8.5"));
    let h = a.hold(&request("2"), 2, &Catalog::new()).unwrap().hold_id;
    assert_eq!(a.settle(h, c("100"), 3, &limits()).unwrap().charged, c("2"));
    assert_eq!(a.totals().charged, c("3.5"));
}

#[test]
fn a_hold_ends_exactly_once() {
    let mut a = Account::new("a", "free");
    a.grant("plan", c("10"), 20, None, 0).unwrap();
    let h = a.hold(&request("3"), 0, &Catalog::new()).unwrap().hold_id;
    a.settle(h, c("3"), 1, &limits()).unwrap();
    assert_eq!(
        a.settle(h, c("3"), 2, &limits()),
        Err(EndRejected::AlreadyEnded(Ending::Settled))
    );
    assert_eq!(
        a.release(h, 2),
        Err(EndRejected::AlreadyEnded(Ending::Settled))
    );
    assert_eq!(a.totals().charged, c("3"));
    let h = a.hold(&request("3"), 3, &Catalog::new()).unwrap().hold_id;
    a.release(h, 4).unwrap();
    assert_eq!(
        a.settle(h, c("3"), 5, &limits()),
        Err(EndRejected::AlreadyEnded(Ending::Released))
    );
    assert_eq!(a.release(999, 5), Err(EndRejected::UnknownHold));
    assert_eq!(a.available(), c("7"));
}

#[test]
fn insufficient_credits_names_required_available_held() {
    let mut a = Account::new("a", "free");
    a.grant("plan", c("5"), 20, None, 0).unwrap();
    a.hold(&request("2"), 0, &Catalog::new()).unwrap();
    assert_eq!(
        a.hold(&request("3.5"), 0, &Catalog::new()),
        Err(HoldRejected::InsufficientCredits {
            required: c("3.5"),
            available: c("3"),
            held: c("2"),
        })
    );
}

#[test]
fn holds_per_account_are_bounded() {
    let mut a = Account::new("a", "free");
    a.grant("plan", c("100"), 20, None, 0).unwrap();
    let mut r = request("1");
    r.max_holds = 2;
    a.hold(&r, 0, &Catalog::new()).unwrap();
    a.hold(&r, 0, &Catalog::new()).unwrap();
    assert_eq!(
        a.hold(&r, 0, &Catalog::new()),
        Err(HoldRejected::TooManyHolds { limit: 2 })
    );
}

#[test]
fn hold_past_ttl_expires_and_cannot_be_settled() {
    let mut a = Account::new("a", "free");
    a.grant("plan", c("10"), 20, None, 0).unwrap();
    let h = a.hold(&request("4"), 0, &Catalog::new()).unwrap().hold_id;
    let expired = a.tick(999);
    assert!(expired.is_empty());
    let expired = a.tick(1_000);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].1.ending, Ending::Expired);
    assert_eq!(
        a.settle(h, c("4"), 1_001, &limits()),
        Err(EndRejected::AlreadyEnded(Ending::Expired))
    );
    assert_eq!(a.available(), c("10"));
}

#[test]
fn grant_expires_at_the_exact_boundary_even_while_held() {
    let mut a = Account::new("a", "free");
    a.grant("bonus", c("30"), 10, Some(5_000), 0).unwrap();
    let mut long = request("10");
    long.ttl_ms = 60_000;
    let h = a.hold(&long, 4_000, &Catalog::new()).unwrap().hold_id;
    a.tick(4_999);
    assert_eq!(a.available(), c("20"));
    a.tick(5_000);
    assert_eq!(a.available(), c("0"));
    assert_eq!(a.totals().expired, c("20"));
    // Released after its grant expired: the 10 held credits expire too.
    assert_eq!(a.release(h, 5_001).unwrap().returned, c("10"));
    assert_eq!(a.totals().expired, c("30"));
    assert_eq!(a.available(), c("0"));
}

#[test]
fn refuses_grants_that_would_overflow() {
    let mut a = Account::new("a", "free");
    let huge = Credits::from_millicredits(u64::MAX / 4);
    a.grant("plan", huge, 20, None, 0).unwrap();
    assert_eq!(a.grant("plan", c("1"), 20, None, 0), Err(GrantOverflow));
    a.check_invariant().unwrap();
}

#[derive(Clone, Debug)]
enum Step {
    Grant {
        kind: u8,
        milli: u64,
        expires_in: Option<u64>,
    },
    Hold {
        milli: u64,
        ttl: u64,
        /// `hold = "available"` with this `min_hold`.
        partial_min: Option<u64>,
        /// `over_hold = "overdraft"`.
        overdraft: bool,
    },
    Settle {
        nth: usize,
        milli: u64,
    },
    Release {
        nth: usize,
    },
    Advance {
        ms: u64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..3, 0u64..20_000, proptest::option::of(0u64..5_000)).prop_map(
            |(kind, milli, expires_in)| Step::Grant {
                kind,
                milli,
                expires_in
            }
        ),
        (
            0u64..15_000,
            1u64..4_000,
            proptest::option::of(1u64..3_000),
            any::<bool>()
        )
            .prop_map(|(milli, ttl, partial_min, overdraft)| Step::Hold {
                milli,
                ttl,
                partial_min,
                overdraft
            }),
        (0usize..8, 0u64..40_000).prop_map(|(nth, milli)| Step::Settle { nth, milli }),
        (0usize..8).prop_map(|nth| Step::Release { nth }),
        (0u64..3_000).prop_map(|ms| Step::Advance { ms }),
    ]
}

/// The overdraft limit of the plan the random histories run on, in millicredits.
const OVERDRAFT_MILLI: u64 = 5_000;

proptest! {
    /// Random histories — partial holds, settles above the hold into debt, grants
    /// repaying it — never break the invariant (`granted + debt == available +
    /// held + charged + expired`), never take the debt past the plan's limit,
    /// never overspend, and end every hold exactly once.
    #[test]
    fn invariant_holds_after_every_step(steps in proptest::collection::vec(step(), 1..120)) {
        let mut a = Account::new("p", "free");
        let catalog = Catalog::from([(
            "free".to_string(),
            PlanTerms {
                overdraft_limit: Credits::from_millicredits(OVERDRAFT_MILLI),
                ..Default::default()
            },
        )]);
        let mut now = 0u64;
        let mut placed: Vec<u64> = Vec::new();
        let mut charged_by_us = Credits::ZERO;
        for s in steps {
            match s {
                Step::Grant { kind, milli, expires_in } => {
                    let kind = ["bonus", "plan", "topup"][kind as usize];
                    let (debt, available) = (a.debt(), a.available());
                    let amount = Credits::from_millicredits(milli);
                    a.grant(kind, amount, default_priority(kind),
                            expires_in.map(|e| now + e), now).unwrap();
                    // Debt is repaid first; only the rest becomes available.
                    let repaid = debt.min(amount);
                    prop_assert_eq!(a.debt(), debt.checked_sub(repaid).unwrap());
                    if expires_in.is_some_and(|e| e > 0) {
                        prop_assert_eq!(a.available(), available.checked_add(amount).unwrap().checked_sub(repaid).unwrap());
                    }
                }
                Step::Hold { milli, ttl, partial_min, overdraft } => {
                    let before = a.available();
                    let amount = Credits::from_millicredits(milli);
                    let terms = HoldTerms {
                        partial_min: partial_min.map(Credits::from_millicredits),
                        overdraft,
                        quota_units: 1,
                    };
                    let r = HoldRequest { operation: "op".into(), request_id: "r".into(),
                                          amount, ttl_ms: ttl, max_holds: 16, quota: None , idempotency: None, caller: None,
                                          terms };
                    match a.hold(&r, now, &catalog) {
                        Ok(p) => {
                            // The whole amount when it fits; else what is available, at least the minimum.
                            let expected = if amount <= before { amount } else { before };
                            prop_assert_eq!(p.held, expected);
                            prop_assert!(amount <= before || partial_min.is_some_and(|m| before.millicredits() >= m));
                            placed.push(p.hold_id);
                        }
                        Err(HoldRejected::InsufficientCredits { available, required, .. }) => {
                            prop_assert_eq!(required, amount);
                            prop_assert!(available < amount);
                            prop_assert!(partial_min.is_none_or(|m| available.millicredits() < m));
                        }
                        Err(HoldRejected::TooManyHolds { .. }) => prop_assert_eq!(a.holds().count(), 16),
                        Err(other) => prop_assert!(false, "nothing else was asked for: {other:?}"),
                    }
                }
                Step::Settle { nth, milli } => {
                    if let Some(&id) = placed.get(nth) {
                        let hold = a.holds().find(|h| h.id == id).cloned();
                        let (available, debt) = (a.available(), a.debt());
                        let charge = Credits::from_millicredits(milli);
                        match a.settle(id, charge, now, &limits()) {
                            Ok(e) => {
                                let hold = hold.unwrap();
                                let within = hold.amount.min(charge);
                                let expected = match hold.overdraft_limit {
                                    None => (within, Credits::ZERO, Credits::ZERO),
                                    Some(limit) => {
                                        let above = charge.saturating_sub(hold.amount);
                                        let taken = above.min(available);
                                        let rest = above.checked_sub(taken).unwrap();
                                        let into_debt = rest.min(limit.saturating_sub(debt));
                                        let charged = within.checked_add(taken).unwrap().checked_add(into_debt).unwrap();
                                        (charged, into_debt, rest.checked_sub(into_debt).unwrap())
                                    }
                                };
                                prop_assert_eq!((e.charged, e.debt, e.uncollected), expected);
                                prop_assert_eq!(a.debt(), debt.checked_add(e.debt).unwrap());
                                charged_by_us = charged_by_us.checked_add(e.charged).unwrap();
                            }
                            Err(EndRejected::AlreadyEnded(_)) => prop_assert!(hold.is_none()),
                            Err(EndRejected::UnknownHold) => prop_assert!(false, "placed hold unknown"),
                        }
                    }
                }
                Step::Release { nth } => {
                    if let Some(&id) = placed.get(nth) {
                        if let Ok(e) = a.release(id, now) {
                            prop_assert_eq!(e.charged, Credits::ZERO);
                        }
                    }
                }
                Step::Advance { ms } => {
                    now += ms;
                    a.tick(now);
                }
            }
            prop_assert!(a.check_invariant().is_ok(), "{:?}", a.check_invariant());
            prop_assert!(a.check_debt(&catalog).is_ok(), "{:?}", a.check_debt(&catalog));
            prop_assert_eq!(a.totals().charged, charged_by_us);
        }
    }
}

#[test]
fn an_overdraft_settle_charges_above_the_hold_into_debt_up_to_the_limit() {
    let catalog = Catalog::from([(
        "free".to_string(),
        PlanTerms {
            overdraft_limit: c("2"),
            ..Default::default()
        },
    )]);
    let mut a = Account::new("a", "free");
    a.grant("topup", c("5"), 30, None, 0).unwrap();
    let overdraft = HoldRequest {
        terms: HoldTerms {
            overdraft: true,
            ..HoldTerms::default()
        },
        ..request("4")
    };
    let h = a.hold(&overdraft, 0, &catalog).unwrap().hold_id;
    // 4 held, 1 more available, then 2 of debt; 3 past the limit are not charged.
    let ended = a.settle(h, c("10"), 1, &limits()).unwrap();
    assert_eq!(
        (ended.charged, ended.debt, ended.uncollected),
        (c("7"), c("2"), c("3"))
    );
    assert_eq!((a.available(), a.debt()), (Credits::ZERO, c("2")));
    let settle = entries(&mut a).remove(0);
    assert_eq!(
        (settle.kind, settle.credits, settle.uncollected),
        (EntryKind::Settle, c("7"), Some(c("3")))
    );
    // At the limit, a second overdraft hold has nothing to hold: 402.
    assert!(matches!(
        a.hold(&overdraft, 2, &catalog),
        Err(HoldRejected::InsufficientCredits { .. })
    ));
    // The next grant repays the debt first.
    a.grant("topup", c("3"), 30, None, 3).unwrap();
    assert_eq!((a.available(), a.debt()), (c("1"), Credits::ZERO));
    let grant = entries(&mut a).remove(0);
    assert_eq!((grant.credits, grant.repaid), (c("3"), Some(c("2"))));
    a.check_invariant().unwrap();
    // Without `overdraft` a settle above the hold is capped at it, as always.
    let h = a.hold(&request("1"), 4, &catalog).unwrap().hold_id;
    let ended = a.settle(h, c("10"), 5, &limits()).unwrap();
    assert_eq!((ended.charged, ended.debt), (c("1"), Credits::ZERO));
}

#[test]
fn a_refill_repays_debt_before_anything_is_available() {
    let mut catalog = catalog();
    for terms in catalog.values_mut() {
        terms.overdraft_limit = c("100");
    }
    let mut a = open("free", Some(1), at("2025-01-10T00:00:00Z"));
    let overdraft = HoldRequest {
        terms: HoldTerms {
            overdraft: true,
            ..HoldTerms::default()
        },
        ..request("1")
    };
    let now = at("2025-01-11T00:00:00Z");
    let h = a.hold(&overdraft, now, &catalog).unwrap().hold_id;
    let monthly = catalog["free"].monthly_credits;
    // All 60 the account has (the plan's 50 and the signup 10), then 30 of debt.
    a.settle(h, c("90"), now, &limits()).unwrap();
    assert_eq!((a.available(), a.debt()), (Credits::ZERO, c("30")));
    a.apply_time(at("2025-02-01T00:00:00Z"), &catalog);
    assert_eq!(a.debt(), Credits::ZERO);
    assert_eq!(a.available(), monthly.checked_sub(c("30")).unwrap());
    let refill = entries(&mut a)
        .into_iter()
        .find(|e| e.kind == EntryKind::Refill)
        .unwrap();
    assert_eq!(refill.repaid, Some(c("30")));
    a.check_invariant().unwrap();
    a.check_debt(&catalog).unwrap();
}

#[test]
fn hold_available_holds_what_there_is_down_to_min_hold() {
    let mut a = Account::new("a", "free");
    a.grant("topup", c("5"), 30, None, 0).unwrap();
    let partial = |min: &str| HoldRequest {
        terms: HoldTerms {
            partial_min: Some(c(min)),
            ..HoldTerms::default()
        },
        ..request("8")
    };
    // The quote's check says what the hold then does: 5 of the 8 asked.
    assert_eq!(a.admit(&partial("0.01"), &Catalog::new()), Ok(c("5")));
    let placed = a.hold(&partial("0.01"), 0, &Catalog::new()).unwrap();
    assert_eq!((placed.held, placed.available), (c("5"), Credits::ZERO));
    let ended = a.settle(placed.hold_id, c("0.03"), 1, &limits()).unwrap();
    assert_eq!((ended.charged, a.available()), (c("0.03"), c("4.97")));
    // Below min_hold: the 402 names the whole amount.
    assert_eq!(
        a.admit(&partial("4.98"), &Catalog::new()),
        Err(HoldRejected::InsufficientCredits {
            required: c("8"),
            available: c("4.97"),
            held: Credits::ZERO
        })
    );
    // Enough for all of it: all of it.
    a.grant("topup", c("10"), 30, None, 2).unwrap();
    assert_eq!(a.admit(&partial("0.01"), &Catalog::new()), Ok(c("8")));
}

#[test]
fn a_hold_uses_its_quota_units() {
    let catalog = catalog();
    let mut a = open("creator", None, at("2025-01-10T00:00:00Z"));
    let now = at("2025-01-10T00:00:01Z");
    let limit = catalog["creator"].quotas["basic_images"];
    let images = |n: u64| HoldRequest {
        quota: Some("basic_images".into()),
        terms: HoldTerms {
            quota_units: n,
            ..HoldTerms::default()
        },
        ..request("0")
    };
    assert!(matches!(
        a.hold(&images(limit + 1), now, &catalog),
        Err(HoldRejected::QuotaExhausted { .. })
    ));
    let h = a.hold(&images(limit - 1), now, &catalog).unwrap().hold_id;
    assert_eq!(a.quota_use()["basic_images"], limit - 1);
    a.settle(h, Credits::ZERO, now, &limits()).unwrap();
    assert_eq!(a.quota_use()["basic_images"], limit - 1);
    assert!(a.hold(&images(2), now, &catalog).is_err());
    a.hold(&images(1), now, &catalog).unwrap();
    a.check_invariant().unwrap();
}

// ---- accounts over time: refills, plan changes, members, quotas, the journal ----

const DAY: u64 = 86_400_000;

fn at(text: &str) -> Millis {
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap()
        .timestamp_millis() as Millis
}

fn terms(monthly: &str, seats: u32, quotas: &[(&str, u64)]) -> PlanTerms {
    PlanTerms {
        monthly_credits: c(monthly),
        quotas: quotas.iter().map(|(q, n)| (q.to_string(), *n)).collect(),
        seats,
        signup_credits: None,
        keep_unused_on_upgrade: false,
        features: vec![],
        ..Default::default()
    }
}

fn catalog() -> Catalog {
    let mut cat = Catalog::new();
    cat.insert(
        "free".into(),
        PlanTerms {
            signup_credits: Some(c("10")),
            ..terms("50", 1, &[])
        },
    );
    cat.insert("starter".into(), terms("200", 1, &[("basic_images", 2)]));
    cat.insert("creator".into(), terms("450", 1, &[("basic_images", 500)]));
    cat.insert("team".into(), terms("2500", 3, &[]));
    cat
}

fn open(plan: &str, anchor: Option<u8>, now: Millis) -> Account {
    Account::open("acct", plan, anchor, &catalog()[plan], now)
}

/// The ledger entries written since the last call, newest first.
fn entries(a: &mut Account) -> Vec<Entry> {
    let mut e = a.take_entries();
    e.reverse();
    e
}

fn plan_left(a: &Account) -> Credits {
    a.grants()
        .iter()
        .filter(|g| g.kind == "plan" && !g.expired)
        .map(|g| g.left)
        .fold(Credits::ZERO, |x, y| x.checked_add(y).unwrap())
}

#[test]
fn opening_grants_the_plan_for_this_cycle_and_signup_credits_once() {
    let a = open("free", None, at("2026-11-21T10:00:00Z"));
    assert_eq!(
        a.billing_anchor_day, 21,
        "the anchor defaults to the creation day"
    );
    assert_eq!(a.next_refill_ms, at("2026-12-21T00:00:00Z"));
    assert_eq!(a.available(), c("60"));
    let kinds: Vec<(&str, Credits)> = a
        .grants()
        .iter()
        .map(|g| (g.kind.as_str(), g.left))
        .collect();
    assert_eq!(
        kinds,
        vec![("bonus", c("10")), ("plan", c("50"))],
        "signup bonus is spent first"
    );
}

#[test]
fn refills_reset_the_plan_grant_once_per_cycle_across_month_ends() {
    let cat = catalog();
    let mut a = open("starter", Some(31), at("2026-01-31T08:00:00Z"));
    let p = a
        .hold(
            &HoldRequest {
                amount: c("150"),
                ..request("0")
            },
            at("2026-01-31T09:00:00Z"),
            &cat,
        )
        .unwrap();
    a.settle(p.hold_id, c("150"), at("2026-01-31T09:00:00Z"), &limits())
        .unwrap();
    assert_eq!(plan_left(&a), c("50"));
    // February has no 31st: the cycle turns on the 28th, not before.
    a.refill_if_due(at("2026-02-27T23:59:59Z"), &cat);
    assert_eq!(plan_left(&a), c("50"));
    a.refill_if_due(at("2026-02-28T00:00:00Z"), &cat);
    assert_eq!(
        plan_left(&a),
        c("200"),
        "reset to the allowance, nothing rolls over"
    );
    assert_eq!(a.totals().expired, c("50"));
    a.refill_if_due(at("2026-02-28T12:00:00Z"), &cat);
    a.refill_if_due(at("2026-03-30T23:00:00Z"), &cat);
    assert_eq!(
        a.totals().granted,
        c("400"),
        "exactly one refill in the February cycle"
    );
    a.refill_if_due(at("2026-03-31T00:00:00Z"), &cat);
    assert_eq!(a.totals().granted, c("600"));
    assert_eq!(a.next_refill_ms, at("2026-04-30T00:00:00Z"));
    a.check_invariant().unwrap();
    let kinds: Vec<EntryKind> = entries(&mut a).iter().map(|e| e.kind).collect();
    assert_eq!(
        &kinds[..4],
        &[
            EntryKind::Refill,
            EntryKind::Expire,
            EntryKind::Refill,
            EntryKind::Expire
        ]
    );
}

#[test]
fn an_account_idle_for_three_months_gets_one_refill() {
    let cat = catalog();
    let mut a = open("starter", Some(15), at("2026-01-15T00:00:00Z"));
    a.refill_if_due(at("2026-04-20T00:00:00Z"), &cat);
    assert_eq!(
        a.totals().granted,
        c("400"),
        "one refill, not three stacked"
    );
    assert_eq!(a.available(), c("200"));
    assert_eq!(a.cycle_start_ms, at("2026-04-15T00:00:00Z"));
    assert_eq!(a.next_refill_ms, at("2026-05-15T00:00:00Z"));
    a.check_invariant().unwrap();
}

#[test]
fn leap_day_refills() {
    let cat = catalog();
    let mut a = open("starter", Some(29), at("2028-01-29T00:00:00Z"));
    a.refill_if_due(at("2028-02-29T00:00:00Z"), &cat);
    assert_eq!(a.totals().granted, c("400"));
    assert_eq!(a.next_refill_ms, at("2028-03-29T00:00:00Z"));
    let mut b = open("starter", Some(29), at("2027-01-29T00:00:00Z"));
    b.refill_if_due(at("2027-02-28T00:00:00Z"), &cat);
    assert_eq!(b.totals().granted, c("400"), "no 29th in 2027: the 28th");
}

#[test]
fn a_bonus_is_spent_before_plan_credits_and_expires_on_time() {
    let cat = catalog();
    let t0 = at("2026-03-01T00:00:00Z");
    let mut a = open("starter", Some(1), t0);
    a.grant(
        "bonus",
        c("30"),
        default_priority("bonus"),
        Some(t0 + 60 * DAY),
        t0,
    )
    .unwrap();
    let p = a
        .hold(
            &HoldRequest {
                amount: c("20"),
                ..request("0")
            },
            t0 + DAY,
            &cat,
        )
        .unwrap();
    a.settle(p.hold_id, c("20"), t0 + DAY, &limits()).unwrap();
    assert_eq!(plan_left(&a), c("200"), "the bonus paid");
    a.refill_if_due(t0 + 60 * DAY - 1, &cat);
    a.tick(t0 + 60 * DAY - 1);
    assert!(a
        .grants()
        .iter()
        .any(|g| g.kind == "bonus" && g.left == c("10")));
    a.tick(t0 + 60 * DAY);
    assert!(
        !a.grants().iter().any(|g| g.kind == "bonus"),
        "gone at the exact boundary"
    );
    let expire = entries(&mut a)
        .into_iter()
        .find(|e| e.kind == EntryKind::Expire && e.detail.as_deref() == Some("bonus"))
        .unwrap();
    assert_eq!((expire.credits, expire.at_ms), (c("10"), t0 + 60 * DAY));
    a.check_invariant().unwrap();
}

#[test]
fn upgrades_apply_now_and_downgrades_at_the_next_refill() {
    let cat = catalog();
    let t0 = at("2026-05-10T00:00:00Z");
    let mut a = open("starter", Some(10), t0);
    let p = a
        .hold(
            &HoldRequest {
                amount: c("120"),
                ..request("0")
            },
            t0,
            &cat,
        )
        .unwrap();
    a.settle(p.hold_id, c("120"), t0, &limits()).unwrap();
    a.change_plan("creator", Effective::Now, t0 + DAY, &cat)
        .unwrap();
    assert_eq!(a.plan, "creator");
    assert_eq!(plan_left(&a), c("450"), "the new allowance at once");
    assert_eq!(a.totals().expired, c("80"));
    a.change_plan("starter", Effective::PeriodEnd, t0 + 2 * DAY, &cat)
        .unwrap();
    assert_eq!(
        (a.plan.as_str(), a.pending_plan.as_deref()),
        ("creator", Some("starter"))
    );
    a.refill_if_due(at("2026-06-10T00:00:00Z"), &cat);
    assert_eq!(
        (a.plan.as_str(), a.pending_plan.as_deref()),
        ("starter", None)
    );
    assert_eq!(plan_left(&a), c("200"));
    assert_eq!(
        a.change_plan("platinum", Effective::Now, t0, &cat),
        Err(AccountRejected::UnknownPlan)
    );
    let changes = entries(&mut a)
        .into_iter()
        .filter(|e| e.kind == EntryKind::PlanChange)
        .count();
    assert_eq!(
        changes, 3,
        "upgrade, scheduled downgrade, applied downgrade"
    );
    a.check_invariant().unwrap();
}

#[test]
fn seats_limit_members() {
    let cat = catalog();
    let mut a = open("team", None, 0);
    for m in ["ann", "bob", "cy"] {
        a.add_member(m, false, &cat).unwrap();
    }
    assert_eq!(
        a.add_member("dee", false, &cat),
        Err(AccountRejected::SeatLimit { seats: 3 })
    );
    assert_eq!(
        a.add_member("ann", false, &cat),
        Err(AccountRejected::MemberExists)
    );
    a.update_member("bob", true).unwrap();
    assert!(a.members["bob"].premium_disabled);
    assert_eq!(
        a.update_member("zed", true),
        Err(AccountRejected::UnknownMember)
    );
}

#[test]
fn quotas_are_held_settled_released_and_reset_by_the_refill() {
    let cat = catalog();
    let t0 = at("2026-07-01T00:00:00Z");
    let mut a = open("starter", Some(1), t0);
    let basic = HoldRequest {
        amount: c("0"),
        quota: Some("basic_images".into()),
        ..request("0")
    };
    let first = a.hold(&basic, t0, &cat).unwrap();
    let second = a.hold(&basic, t0, &cat).unwrap();
    assert_eq!(
        a.hold(&basic, t0, &cat),
        Err(HoldRejected::QuotaExhausted {
            quota: "basic_images".into(),
            limit: 2
        })
    );
    a.release(second.hold_id, t0).unwrap();
    let third = a.hold(&basic, t0, &cat).unwrap();
    a.settle(first.hold_id, c("0"), t0, &limits()).unwrap();
    a.settle(third.hold_id, c("0"), t0, &limits()).unwrap();
    assert_eq!(a.quota_use()["basic_images"], 2);
    assert!(a.hold(&basic, t0, &cat).is_err());
    a.refill_if_due(at("2026-08-01T00:00:00Z"), &cat);
    assert!(
        a.hold(&basic, at("2026-08-01T00:00:00Z"), &cat).is_ok(),
        "a new cycle, a new allowance"
    );
    let unnamed = HoldRequest {
        quota: Some("premium_llm".into()),
        ..basic
    };
    for _ in 0..10 {
        assert!(
            a.hold(&unnamed, t0, &cat).is_ok(),
            "a quota the plan does not name is unlimited"
        );
    }
}

#[test]
fn grants_with_the_same_idempotency_key_add_nothing() {
    let mut a = Account::new("a", "free");
    let (first, created) = a
        .grant_once(
            &grant_request("ref-1", "bonus", "30", 10, Some(99)),
            0,
            &limits(),
        )
        .unwrap();
    assert!(created);
    let (again, created) = a
        .grant_once(
            &grant_request("ref-1", "bonus", "999", 10, None),
            5,
            &limits(),
        )
        .unwrap();
    assert!(!created);
    assert_eq!(first, again, "the first grant is returned");
    assert_eq!(a.totals().granted, c("30"));
    a.grant_once(
        &grant_request("ref-2", "topup", "5", 30, None),
        5,
        &limits(),
    )
    .unwrap();
    assert_eq!(a.totals().granted, c("35"));
}

#[test]
fn the_journal_pages_newest_first_and_is_capped() {
    let mut a = Account::new("a", "free");
    let mut journal = Journal::new(5);
    for i in 0..8u64 {
        a.grant("topup", c("1"), 30, None, i).unwrap();
    }
    journal.append(a.take_entries());
    assert!(a.take_entries().is_empty(), "taken once");
    let page = journal.page(3, None);
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![8, 7, 6]
    );
    let next = journal.page(3, Some(6));
    assert_eq!(
        next.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![5, 4],
        "only 5 entries are kept"
    );
    let p = a.hold(&request("2"), 10, &Catalog::new()).unwrap();
    a.settle(p.hold_id, c("1.5"), 11, &limits()).unwrap();
    journal.append(a.take_entries());
    let latest = &journal.page(1, None)[0];
    assert_eq!(
        (
            latest.seq,
            latest.kind,
            latest.credits,
            latest.operation.as_deref(),
            latest.request_id.as_deref()
        ),
        (10, EntryKind::Settle, c("1.5"), Some("op"), Some("r"))
    );
}

#[test]
fn an_account_survives_serialization_whole() {
    let cat = catalog();
    let mut a = open("starter", Some(3), at("2026-03-03T00:00:00Z"));
    a.add_member("ann", true, &cat).unwrap();
    let bonus = grant_request("k", "bonus", "7.5", 10, Some(at("2026-09-01T00:00:00Z")));
    a.grant_once(&bonus, 0, &limits()).unwrap();
    let p = a
        .hold(
            &HoldRequest {
                quota: Some("basic_images".into()),
                ..request("1.25")
            },
            at("2026-03-04T00:00:00Z"),
            &cat,
        )
        .unwrap();
    let text = serde_json::to_string(&a).unwrap();
    let mut back: Account = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_string(&back).unwrap(), text);
    assert_eq!(back.totals(), a.totals());
    back.settle(p.hold_id, c("1"), at("2026-03-04T00:00:00Z"), &limits())
        .unwrap();
    assert_eq!(back.quota_use()["basic_images"], 1);
    back.check_invariant().unwrap();
}

#[derive(Clone, Debug)]
enum Life {
    Spend { milli: u64, settle: bool },
    Bonus { milli: u64, days: u64 },
    Days { n: u64 },
    Upgrade,
    Downgrade,
}

fn life() -> impl Strategy<Value = Life> {
    prop_oneof![
        (0u64..300_000, any::<bool>()).prop_map(|(milli, settle)| Life::Spend { milli, settle }),
        (0u64..50_000, 1u64..90).prop_map(|(milli, days)| Life::Bonus { milli, days }),
        (0u64..70).prop_map(|n| Life::Days { n }),
        Just(Life::Upgrade),
        Just(Life::Downgrade),
    ]
}

proptest! {
    /// Months of random use with refills, expiring bonuses and plan changes keep
    /// the invariant, and the plan grant never exceeds the plan's allowance.
    #[test]
    fn invariant_holds_across_refills_and_plan_changes(steps in proptest::collection::vec(life(), 1..80)) {
        let cat = catalog();
        let mut now = at("2026-01-31T00:00:00Z");
        let mut a = open("starter", Some(31), now);
        for step in steps {
            a.refill_if_due(now, &cat);
            match step {
                Life::Spend { milli, settle } => {
                    let r = HoldRequest { amount: Credits::from_millicredits(milli), ttl_ms: 3 * DAY, ..request("0") };
                    if let Ok(p) = a.hold(&r, now, &cat) {
                        if settle { a.settle(p.hold_id, r.amount, now, &limits()).unwrap(); }
                    }
                }
                Life::Bonus { milli, days } => {
                    a.grant("bonus", Credits::from_millicredits(milli), 10, Some(now + days * DAY), now).unwrap();
                }
                Life::Days { n } => now += n * DAY,
                Life::Upgrade => a.change_plan("creator", Effective::Now, now, &cat).unwrap(),
                Life::Downgrade => a.change_plan("starter", Effective::PeriodEnd, now, &cat).unwrap(),
            }
            prop_assert!(a.check_invariant().is_ok(), "{:?}", a.check_invariant());
            let allowance = cat[&a.plan].monthly_credits;
            prop_assert!(plan_left(&a) <= allowance.max(c("450")));
            prop_assert!(a.next_refill_ms > now || a.next_refill_ms > a.cycle_start_ms);
        }
    }
}

#[test]
fn idempotency_keys_follow_their_hold() {
    let cat = Catalog::new();
    let mut a = Account::new("a", "free");
    a.grant("topup", c("100"), 30, None, 0).unwrap();
    let idem = |key: &str, fingerprint: &str| {
        Some(IdempotencyRequest {
            key: key.into(),
            fingerprint: fingerprint.into(),
            ttl_ms: 1_000_000,
        })
    };
    let first = HoldRequest {
        idempotency: idem("k", "f"),
        ttl_ms: 60_000,
        ..request("3")
    };
    let placed = a.hold(&first, 0, &cat).unwrap();
    assert_eq!(
        a.hold(&first, 1, &cat),
        Err(HoldRejected::IdempotencyInProgress)
    );
    a.settle(placed.hold_id, c("3"), 2, &limits()).unwrap();
    assert_eq!(
        a.hold(&first, 3, &cat),
        Err(HoldRejected::Replay {
            response: None,
            recording: true
        })
    );
    let recorded = Recorded {
        status: 200,
        content_type: Some("application/json".into()),
        body: Some("{}".into()),
    };
    assert!(a.record_response("k", recorded.clone(), &limits()));
    assert_eq!(
        a.hold(&first, 4, &cat),
        Err(HoldRejected::Replay {
            response: Some(recorded),
            recording: false
        })
    );
    let other = HoldRequest {
        idempotency: idem("k", "another request"),
        ..first.clone()
    };
    assert_eq!(
        a.hold(&other, 5, &cat),
        Err(HoldRejected::IdempotencyKeyReused)
    );
    assert_eq!(a.totals().charged, c("3"), "repeats charge nothing");

    let second = HoldRequest {
        idempotency: idem("k2", "f"),
        ttl_ms: 60_000,
        ..request("3")
    };
    let placed = a.hold(&second, 6, &cat).unwrap();
    a.release(placed.hold_id, 7).unwrap();
    assert!(
        a.hold(&second, 8, &cat).is_ok(),
        "after a release the repeat runs anew"
    );
    assert!(
        a.hold(&first, 1_000_001, &cat).is_ok(),
        "a key is forgotten after its TTL"
    );
    a.check_invariant().unwrap();
}

#[test]
fn a_plan_can_keep_the_unused_allowance_on_upgrade() {
    let mut cat = catalog();
    cat.get_mut("creator").unwrap().keep_unused_on_upgrade = true;
    let t0 = at("2026-05-10T00:00:00Z");
    let mut a = open("starter", Some(10), t0);
    let p = a
        .hold(
            &HoldRequest {
                amount: c("120"),
                ..request("0")
            },
            t0,
            &cat,
        )
        .unwrap();
    a.settle(p.hold_id, c("120"), t0, &limits()).unwrap();
    a.change_plan("creator", Effective::Now, t0 + DAY, &cat)
        .unwrap();
    assert_eq!(
        plan_left(&a),
        c("530"),
        "80 unused + 450 new, until the refill"
    );
    assert_eq!(a.totals().expired, c("0"));
    a.refill_if_due(at("2026-06-10T00:00:00Z"), &cat);
    assert_eq!(
        plan_left(&a),
        c("450"),
        "at the refill only the new allowance remains"
    );
    a.check_invariant().unwrap();
}

/// A hold on behalf of `member`'s key `key_id` for an operation requiring `requires`.
fn by(member: &str, key_id: &str, requires: &[&str]) -> HoldRequest {
    HoldRequest {
        caller: Some(Caller {
            member: member.into(),
            key_id: key_id.into(),
            requires: requires.iter().map(|f| f.to_string()).collect(),
        }),
        ..request("1")
    }
}

/// The team plan with the `premium` feature, the free plan without.
fn featured() -> Catalog {
    let mut cat = catalog();
    cat.get_mut("team").unwrap().features = vec!["premium".into(), "api".into()];
    cat
}

#[test]
fn a_hold_refuses_a_key_that_is_no_longer_active() {
    let cat = featured();
    let mut a = open("team", None, 0);
    a.add_member("ann", false, &cat).unwrap();
    a.add_key("ann", "key_1").unwrap();
    a.add_key("ann", "key_2").unwrap();
    a.hold(&by("ann", "key_1", &[]), 0, &cat).unwrap();
    assert!(a.revoke_key("ann", "key_1"));
    assert!(!a.revoke_key("ann", "key_1"), "revoked once");
    let before = a.totals();
    assert_eq!(
        a.hold(&by("ann", "key_1", &[]), 0, &cat),
        Err(HoldRejected::KeyNotActive)
    );
    assert_eq!(a.totals(), before, "nothing held");
    a.hold(&by("ann", "key_2", &[]), 0, &cat).unwrap();
    assert_eq!(
        a.hold(&by("ann", "key_9", &[]), 0, &cat),
        Err(HoldRejected::KeyNotActive),
        "a key never listed"
    );
    assert_eq!(
        a.hold(&by("bob", "key_2", &[]), 0, &cat),
        Err(HoldRejected::KeyNotActive),
        "a member that is gone"
    );
    assert_eq!(
        a.add_key("bob", "key_3"),
        Err(AccountRejected::UnknownMember)
    );
}

#[test]
fn a_revoked_key_gets_no_replay_either() {
    let cat = featured();
    let mut a = open("team", None, 0);
    a.add_member("ann", false, &cat).unwrap();
    a.add_key("ann", "key_1").unwrap();
    let keyed = HoldRequest {
        idempotency: Some(IdempotencyRequest {
            key: "k".into(),
            fingerprint: "f".into(),
            ttl_ms: 60_000,
        }),
        ..by("ann", "key_1", &[])
    };
    let placed = a.hold(&keyed, 0, &cat).unwrap();
    a.settle(placed.hold_id, c("1"), 1, &limits()).unwrap();
    a.revoke_key("ann", "key_1");
    assert_eq!(a.hold(&keyed, 2, &cat), Err(HoldRejected::KeyNotActive));
}

#[test]
fn a_hold_refuses_a_feature_the_current_plan_lacks() {
    let cat = featured();
    let mut a = open("team", None, 0);
    a.add_member("ann", false, &cat).unwrap();
    a.add_key("ann", "key_1").unwrap();
    a.hold(&by("ann", "key_1", &["api", "premium"]), 0, &cat)
        .unwrap();
    a.change_plan("free", Effective::Now, 1, &cat).unwrap();
    assert_eq!(
        a.hold(&by("ann", "key_1", &["api", "premium"]), 1, &cat),
        Err(HoldRejected::PlanRequired {
            feature: "api".into()
        }),
        "the first feature missing, in the operation's order"
    );
    a.hold(&by("ann", "key_1", &[]), 1, &cat).unwrap();
    // A plan the policy no longer has offers no feature.
    let mut gone = open("team", None, 0);
    gone.add_member("ann", false, &cat).unwrap();
    gone.add_key("ann", "key_1").unwrap();
    assert_eq!(
        gone.hold(&by("ann", "key_1", &["api"]), 0, &Catalog::new()),
        Err(HoldRejected::PlanRequired {
            feature: "api".into()
        })
    );
}

#[test]
fn a_hold_refuses_premium_to_a_member_with_premium_disabled() {
    let cat = featured();
    let mut a = open("team", None, 0);
    a.add_member("ann", false, &cat).unwrap();
    a.add_key("ann", "key_1").unwrap();
    a.hold(&by("ann", "key_1", &["premium"]), 0, &cat).unwrap();
    a.update_member("ann", true).unwrap();
    assert_eq!(
        a.hold(&by("ann", "key_1", &["premium"]), 0, &cat),
        Err(HoldRejected::PremiumDisabled)
    );
    a.hold(&by("ann", "key_1", &["api"]), 0, &cat)
        .expect("operations that are not premium still pass");
}

#[test]
fn members_from_earlier_states_skip_the_key_check_and_stay_unrecorded() {
    let cat = featured();
    let mut a = open("team", None, 0);
    a.members.insert(
        "old".into(),
        Member {
            keys: None,
            ..Member::new(false)
        },
    );
    a.hold(&by("old", "key_any", &[]), 0, &cat)
        .expect("keys not recorded: the store's key record decides alone");
    a.add_key("old", "key_new").unwrap();
    assert!(!a.revoke_key("old", "key_any"));
    assert_eq!(a.members["old"].keys, None);
    a.hold(&by("old", "key_any", &[]), 0, &cat).unwrap();
    a.update_member("old", true).unwrap();
    assert_eq!(
        a.hold(&by("old", "key_any", &["premium"]), 0, &cat),
        Err(HoldRejected::PremiumDisabled),
        "the other checks still apply"
    );
}

#[test]
fn a_member_has_a_bounded_number_of_keys() {
    let cat = featured();
    let mut a = open("team", None, 0);
    a.add_member("ann", false, &cat).unwrap();
    for i in 0..KEYS_PER_MEMBER {
        a.add_key("ann", &format!("key_{i}")).unwrap();
    }
    assert_eq!(
        a.add_key("ann", "key_more"),
        Err(AccountRejected::KeyLimit {
            limit: KEYS_PER_MEMBER
        })
    );
    a.add_key("ann", "key_0")
        .expect("adding a listed key again is no new key");
    a.revoke_key("ann", "key_0");
    a.add_key("ann", "key_more").unwrap();
}

// ---- admission: one decision for the hold and the quote ----

#[test]
fn entitlement_names_the_first_missing_feature_then_premium() {
    let features = vec!["api".to_string(), "premium".to_string()];
    let needs = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(entitle(&features, &needs(&["api"]), false), Ok(()));
    assert_eq!(
        entitle(&features[..1], &needs(&["lipsync", "premium"]), true),
        Err(HoldRejected::PlanRequired {
            feature: "lipsync".into()
        }),
        "a missing feature is answered before a locked one"
    );
    assert_eq!(
        entitle(&features, &needs(&["premium"]), true),
        Err(HoldRejected::PremiumDisabled)
    );
    assert_eq!(entitle(&features, &needs(&["api"]), true), Ok(()));
}

#[derive(Clone, Debug)]
enum Probe {
    Grant(u64),
    Hold {
        milli: u64,
        quota: bool,
        key: u8,
        requires_premium: bool,
        idempotency: Option<u8>,
    },
    End {
        nth: usize,
        settle: bool,
    },
    Premium(bool),
    Revoke(u8),
}

fn probe() -> impl Strategy<Value = Probe> {
    prop_oneof![
        (0u64..5_000).prop_map(Probe::Grant),
        (
            0u64..4_000,
            any::<bool>(),
            0u8..3,
            any::<bool>(),
            proptest::option::of(0u8..3)
        )
            .prop_map(
                |(milli, quota, key, requires_premium, idempotency)| Probe::Hold {
                    milli,
                    quota,
                    key,
                    requires_premium,
                    idempotency
                }
            ),
        (0usize..6, any::<bool>()).prop_map(|(nth, settle)| Probe::End { nth, settle }),
        any::<bool>().prop_map(Probe::Premium),
        (0u8..3).prop_map(Probe::Revoke),
    ]
}

proptest! {
    /// `admit` (what the quote asks) answers exactly what `hold` answers on the same
    /// state, and changes nothing — across keys revoked, premium switched, quotas,
    /// idempotency keys, balances and the open-hold limit.
    #[test]
    fn admit_answers_what_the_hold_does_and_changes_nothing(
        probes in proptest::collection::vec(probe(), 1..60)
    ) {
        let mut cat = featured();
        if let Some(team) = cat.get_mut("team") {
            team.quotas.insert("basic".into(), 2);
        }
        let mut a = open("team", None, 0);
        a.add_member("ann", false, &cat).unwrap();
        for k in 0..3 {
            a.add_key("ann", &format!("key_{k}")).unwrap();
        }
        let mut placed = Vec::new();
        for p in probes {
            match p {
                Probe::Grant(milli) => {
                    a.grant("topup", Credits::from_millicredits(milli), 30, None, 0).unwrap();
                }
                Probe::Hold { milli, quota, key, requires_premium, idempotency } => {
                    let mut request = by(
                        "ann",
                        &format!("key_{key}"),
                        if requires_premium { &["premium"] } else { &[] },
                    );
                    request.amount = Credits::from_millicredits(milli);
                    request.max_holds = 4;
                    request.quota = quota.then(|| "basic".to_string());
                    request.idempotency = idempotency.map(|i| IdempotencyRequest {
                        key: format!("idem-{i}"),
                        fingerprint: format!("fp-{milli}"),
                        ttl_ms: 60_000,
                    });
                    let before = a.clone();
                    let admitted = a.admit(&request, &cat);
                    prop_assert_eq!(&a, &before, "admit changed the account");
                    let held = a.hold(&request, 0, &cat);
                    prop_assert_eq!(admitted.clone(), held.clone().map(|p| p.held));
                    if let Ok(h) = held {
                        placed.push(h.hold_id);
                    }
                }
                Probe::End { nth, settle } => {
                    if let Some(&id) = placed.get(nth) {
                        let _ = if settle { a.settle(id, Credits::from_millicredits(1), 0, &limits()) } else { a.release(id, 0) };
                    }
                }
                Probe::Premium(disabled) => a.update_member("ann", disabled).unwrap(),
                Probe::Revoke(k) => {
                    a.revoke_key("ann", &format!("key_{k}"));
                }
            }
        }
    }
}

// ---- a partial copy: what a shared store computes on ----

#[test]
fn a_partial_copy_decides_on_aggregates_and_reports_its_hold_changes() {
    let cat = Catalog::new();
    let mut full = Account::new("a", "free");
    full.grant("topup", c("10"), 30, None, 0).unwrap();
    let h1 = full.hold(&request("3"), 0, &cat).unwrap().hold_id;
    let h2 = full.hold(&request("4"), 0, &cat).unwrap().hold_id;

    let mut part = full.clone();
    let mut side = part.take_holds();
    assert!(part.partial());
    part.know_holds(side.remove(&h1));
    assert_eq!(
        part.totals(),
        full.totals(),
        "the aggregates carry the totals"
    );
    assert_eq!(
        part.hold(&request("4"), 0, &cat),
        Err(HoldRejected::InsufficientCredits {
            required: c("4"),
            available: c("3"),
            held: c("7")
        }),
        "admission needs no hold records"
    );
    let h3 = part.hold(&request("3"), 0, &cat).unwrap().hold_id;
    part.settle(h1, c("1"), 1, &limits()).unwrap();
    assert_eq!(
        part.take_hold_changes(),
        HoldChanges {
            placed: vec![h3],
            ended: vec![h1]
        }
    );
    let h4 = part.hold(&request("0.5"), 1, &cat).unwrap().hold_id;
    part.release(h4, 1).unwrap();
    assert_eq!(
        part.take_hold_changes(),
        HoldChanges::default(),
        "placed and ended between two takes: nothing to write"
    );

    full.hold(&request("3"), 0, &cat).unwrap();
    full.settle(h1, c("1"), 1, &limits()).unwrap();
    assert_eq!(part.totals(), full.totals());
    part.check_invariant().unwrap();
    assert_eq!(
        full.take_hold_changes(),
        HoldChanges::default(),
        "a full copy keeps its holds with it and reports nothing"
    );
    assert!(
        part.settle(h2, c("1"), 2, &limits()).is_err(),
        "a hold the copy does not know must be loaded first"
    );
}

#[test]
fn aggregates_are_rebuilt_for_states_that_kept_every_hold() {
    let cat = catalog();
    let mut a = open("starter", None, 0);
    a.hold(
        &HoldRequest {
            quota: Some("basic_images".into()),
            ..request("5")
        },
        0,
        &cat,
    )
    .unwrap();
    a.take_entries();
    let expected = a.clone();
    let mut json = serde_json::to_value(&a).unwrap();
    let object = json.as_object_mut().unwrap();
    for field in ["held", "open_holds", "quota_held"] {
        object.remove(field);
    }
    for grant in object["grants"].as_array_mut().unwrap() {
        grant.as_object_mut().unwrap().remove("drawn");
    }
    let mut earlier: Account = serde_json::from_value(json).unwrap();
    assert!(
        earlier.check_invariant().is_err(),
        "no aggregates: inconsistent"
    );
    earlier.rebuild_aggregates();
    assert_eq!(earlier, expected);
    assert_eq!(earlier.quota_use().get("basic_images"), Some(&1));
}

// Accounts a platform runs: attribution, adjustments, member limits, events,
// payments and refunds.
mod platform;
