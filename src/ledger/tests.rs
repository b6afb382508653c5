use super::*;
use proptest::prelude::*;

fn c(text: &str) -> Credits {
    text.parse().unwrap()
}

fn request(amount: &str) -> HoldRequest {
    HoldRequest {
        operation: "op".into(),
        request_id: "r".into(),
        amount: c(amount),
        ttl_ms: 1_000,
        max_holds: 64,
    }
}

#[test]
fn spends_bonus_before_plan_before_topup() {
    let mut a = Account::new("a", "free");
    let topup = a.grant("topup", c("10"), 30, None, 0).unwrap();
    let plan = a.grant("plan", c("10"), 20, None, 0).unwrap();
    let bonus = a.grant("bonus", c("10"), 10, Some(60_000), 0).unwrap();
    let placed = a.hold(&request("15"), 0).unwrap();
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
    let h = a.hold(&request("4"), 0).unwrap().hold_id;
    let ended = a.settle(h, c("1.5"), 1).unwrap();
    assert_eq!(ended.charged, c("1.5"));
    assert_eq!(ended.returned, c("2.5"));
    assert_eq!(a.available(), c("8.5"));
    let h = a.hold(&request("2"), 2).unwrap().hold_id;
    assert_eq!(a.settle(h, c("100"), 3).unwrap().charged, c("2"));
    assert_eq!(a.totals().charged, c("3.5"));
}

#[test]
fn a_hold_ends_exactly_once() {
    let mut a = Account::new("a", "free");
    a.grant("plan", c("10"), 20, None, 0).unwrap();
    let h = a.hold(&request("3"), 0).unwrap().hold_id;
    a.settle(h, c("3"), 1).unwrap();
    assert_eq!(
        a.settle(h, c("3"), 2),
        Err(EndRejected::AlreadyEnded(Ending::Settled))
    );
    assert_eq!(
        a.release(h, 2),
        Err(EndRejected::AlreadyEnded(Ending::Settled))
    );
    assert_eq!(a.totals().charged, c("3"));
    let h = a.hold(&request("3"), 3).unwrap().hold_id;
    a.release(h, 4).unwrap();
    assert_eq!(
        a.settle(h, c("3"), 5),
        Err(EndRejected::AlreadyEnded(Ending::Released))
    );
    assert_eq!(a.release(999, 5), Err(EndRejected::UnknownHold));
    assert_eq!(a.available(), c("7"));
}

#[test]
fn insufficient_credits_names_required_available_held() {
    let mut a = Account::new("a", "free");
    a.grant("plan", c("5"), 20, None, 0).unwrap();
    a.hold(&request("2"), 0).unwrap();
    assert_eq!(
        a.hold(&request("3.5"), 0),
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
    a.hold(&r, 0).unwrap();
    a.hold(&r, 0).unwrap();
    assert_eq!(a.hold(&r, 0), Err(HoldRejected::TooManyHolds { limit: 2 }));
}

#[test]
fn hold_past_ttl_expires_and_cannot_be_settled() {
    let mut a = Account::new("a", "free");
    a.grant("plan", c("10"), 20, None, 0).unwrap();
    let h = a.hold(&request("4"), 0).unwrap().hold_id;
    let expired = a.tick(999);
    assert!(expired.is_empty());
    let expired = a.tick(1_000);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].1.ending, Ending::Expired);
    assert_eq!(
        a.settle(h, c("4"), 1_001),
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
    let h = a.hold(&long, 4_000).unwrap().hold_id;
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
        (0u64..15_000, 1u64..4_000).prop_map(|(milli, ttl)| Step::Hold { milli, ttl }),
        (0usize..8, 0u64..20_000).prop_map(|(nth, milli)| Step::Settle { nth, milli }),
        (0usize..8).prop_map(|nth| Step::Release { nth }),
        (0u64..3_000).prop_map(|ms| Step::Advance { ms }),
    ]
}

proptest! {
    /// Random histories never break the §1 invariant, never overspend, and end
    /// every hold exactly once.
    #[test]
    fn invariant_holds_after_every_step(steps in proptest::collection::vec(step(), 1..120)) {
        let mut a = Account::new("p", "free");
        let mut now = 0u64;
        let mut placed: Vec<u64> = Vec::new();
        let mut charged_by_us = Credits::ZERO;
        for s in steps {
            match s {
                Step::Grant { kind, milli, expires_in } => {
                    let kind = ["bonus", "plan", "topup"][kind as usize];
                    a.grant(kind, Credits::from_millicredits(milli), default_priority(kind),
                            expires_in.map(|e| now + e), now).unwrap();
                }
                Step::Hold { milli, ttl } => {
                    let before = a.available();
                    let amount = Credits::from_millicredits(milli);
                    let r = HoldRequest { operation: "op".into(), request_id: "r".into(),
                                          amount, ttl_ms: ttl, max_holds: 16 };
                    match a.hold(&r, now) {
                        Ok(p) => {
                            prop_assert!(amount <= before);
                            placed.push(p.hold_id);
                        }
                        Err(HoldRejected::InsufficientCredits { available, .. }) => {
                            prop_assert!(available < amount)
                        }
                        Err(HoldRejected::TooManyHolds { .. }) => prop_assert_eq!(a.holds().count(), 16),
                    }
                }
                Step::Settle { nth, milli } => {
                    if let Some(&id) = placed.get(nth) {
                        let held = a.holds().find(|h| h.id == id).map(|h| h.amount);
                        match a.settle(id, Credits::from_millicredits(milli), now) {
                            Ok(e) => {
                                prop_assert_eq!(Some(e.charged), held.map(|h| h.min(Credits::from_millicredits(milli))));
                                charged_by_us = charged_by_us.checked_add(e.charged).unwrap();
                            }
                            Err(EndRejected::AlreadyEnded(_)) => {}
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
            prop_assert_eq!(a.totals().charged, charged_by_us);
        }
    }
}
