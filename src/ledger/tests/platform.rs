//! The ledger for accounts a platform runs: attribution on every entry, signed
//! adjustments, member limits and disabled features, events, payments and refunds.

use super::*;

#[test]
fn entries_say_who_spent_with_which_key_the_usage_and_the_balance_after() {
    let cat = featured();
    let mut a = open("team", None, 0);
    a.add_member("ann", false, &cat).unwrap();
    a.add_key("ann", "key_1").unwrap();
    a.take_entries();
    let h = a.hold(&by("ann", "key_1", &[]), 1, &cat).unwrap();
    a.settle_metered(h.hold_id, c("0.5"), Some(r#"{"tokens":5}"#), 2, &limits())
        .unwrap();
    let h2 = a.hold(&by("ann", "key_1", &[]), 3, &cat).unwrap();
    a.release(h2.hold_id, 4).unwrap();
    let e = a.take_entries();
    let kinds: Vec<_> = e.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EntryKind::Hold,
            EntryKind::Settle,
            EntryKind::Hold,
            EntryKind::Release
        ]
    );
    for entry in &e {
        assert_eq!(entry.member.as_deref(), Some("ann"));
        assert_eq!(entry.key_id.as_deref(), Some("key_1"));
        assert_eq!(entry.operation.as_deref(), Some("op"));
    }
    assert_eq!(e[1].usage.as_deref(), Some(r#"{"tokens":5}"#));
    assert_eq!(e[0].usage, None);
    assert_eq!(e[0].balance_after, Some(c("2499")));
    assert_eq!(e[1].balance_after, Some(c("2499.5")));
    assert_eq!(e[3].balance_after, Some(a.available()));
}

fn adjustment(key: &str, credits: &str, debit: bool) -> AdjustRequest {
    AdjustRequest {
        idempotency_key: key.into(),
        credits: c(credits),
        debit,
        reason: "refund".into(),
    }
}

#[test]
fn adjustments_add_or_debit_once_and_never_past_the_overdraft_limit() {
    let mut cat = catalog();
    cat.get_mut("free").unwrap().overdraft_limit = c("5");
    let mut a = Account::new("a", "free");
    a.grant("topup", c("10"), 30, None, 0).unwrap();
    a.take_entries();
    let (receipt, created) = a
        .adjust(&adjustment("r1", "3", false), 1, &cat, &limits())
        .unwrap();
    assert!(created && !receipt.debit);
    assert_eq!(a.available(), c("13"));
    let (_, again) = a
        .adjust(&adjustment("r1", "3", false), 2, &cat, &limits())
        .unwrap();
    assert!(!again, "a repeated key adjusts nothing");
    assert_eq!(a.available(), c("13"));
    assert_eq!(
        a.adjust(&adjustment("r1", "4", false), 2, &cat, &limits()),
        Err(AccountRejected::IdempotencyKeyReused)
    );
    // 13 available + 5 of overdraft: 19 is refused whole, 17 goes 4 into debt.
    let before = a.totals();
    assert_eq!(
        a.adjust(&adjustment("c1", "19", true), 3, &cat, &limits()),
        Err(AccountRejected::InsufficientCredits {
            required: c("19"),
            available: c("13"),
            overdraft_room: c("5"),
        })
    );
    assert_eq!(a.totals(), before, "a refused adjustment changes nothing");
    a.adjust(&adjustment("c2", "17", true), 4, &cat, &limits())
        .unwrap();
    assert_eq!((a.available(), a.debt()), (c("0"), c("4")));
    a.check_invariant().unwrap();
    a.check_debt(&cat).unwrap();
    // A positive adjustment repays the debt first.
    a.adjust(&adjustment("r2", "6", false), 5, &cat, &limits())
        .unwrap();
    assert_eq!((a.available(), a.debt()), (c("2"), c("0")));
    let e = a.take_entries();
    assert!(e.iter().all(|e| e.kind == EntryKind::Adjust));
    let shown: Vec<_> = e
        .iter()
        .map(|e| (e.credits, e.debit, e.detail.as_deref(), e.repaid))
        .collect();
    assert_eq!(
        shown,
        [
            (c("3"), false, Some("refund"), None),
            (c("17"), true, Some("refund"), None),
            (c("6"), false, Some("refund"), Some(c("4"))),
        ]
    );
}

#[test]
fn a_member_limit_is_held_like_credits_and_resets_with_the_cycle() {
    let cat = featured();
    let mut a = open("team", None, 0);
    let terms = MemberTerms {
        monthly_limit: Some(c("2.5")),
        ..MemberTerms::default()
    };
    a.add_member_with("ann", &terms, &cat).unwrap();
    a.add_key("ann", "key_1").unwrap();
    a.add_member("bob", false, &cat).unwrap();
    a.add_key("bob", "key_2").unwrap();
    let h1 = a.hold(&by("ann", "key_1", &[]), 0, &cat).unwrap();
    let h2 = a.hold(&by("ann", "key_1", &[]), 0, &cat).unwrap();
    // 2 held of 2.5: a third credit would pass the limit, though the account has plenty.
    let refused = HoldRejected::MemberLimitReached {
        member: "ann".into(),
        limit: c("2.5"),
        used: c("2"),
    };
    assert_eq!(
        a.admit(&by("ann", "key_1", &[]), &cat),
        Err(refused.clone())
    );
    assert_eq!(a.hold(&by("ann", "key_1", &[]), 0, &cat), Err(refused));
    a.hold(&by("bob", "key_2", &[]), 0, &cat)
        .expect("a teammate without a limit still spends");
    // A partial hold takes what the limit leaves.
    let partial = HoldRequest {
        terms: HoldTerms {
            partial_min: Some(c("0.1")),
            ..HoldTerms::default()
        },
        ..by("ann", "key_1", &[])
    };
    assert_eq!(a.admit(&partial, &cat), Ok(c("0.5")));
    a.release(h1.hold_id, 1).unwrap();
    a.settle(h2.hold_id, c("0.25"), 1, &limits()).unwrap();
    assert_eq!(
        (a.members["ann"].used, a.members["ann"].held),
        (c("0.25"), c("0"))
    );
    a.hold(&by("ann", "key_1", &[]), 1, &cat).unwrap();
    // The next cycle starts from nothing used.
    let next = a.next_refill_ms;
    a.apply_time(next, &cat);
    assert_eq!(a.members["ann"].used, c("0"));
}

#[test]
fn a_disabled_feature_is_refused_and_premium_keeps_its_own_answer() {
    let cat = featured();
    let mut a = open("team", None, 0);
    let terms = MemberTerms {
        monthly_limit: None,
        disabled_features: ["api".to_string(), "premium".to_string()].into(),
    };
    a.add_member_with("ann", &terms, &cat).unwrap();
    a.add_key("ann", "key_1").unwrap();
    assert!(
        a.members["ann"].premium_disabled,
        "premium in the list is premium_disabled"
    );
    assert_eq!(
        a.hold(&by("ann", "key_1", &["api"]), 0, &cat),
        Err(HoldRejected::FeatureDisabled {
            feature: "api".into()
        })
    );
    assert_eq!(
        a.hold(&by("ann", "key_1", &["premium"]), 0, &cat),
        Err(HoldRejected::PremiumDisabled)
    );
    a.hold(&by("ann", "key_1", &[]), 0, &cat).unwrap();
    assert_eq!(a.members["ann"].terms(), terms);
}

fn all_events(low_balance: &[&str]) -> EventRules {
    EventRules {
        kinds: EventKind::ALL.into_iter().collect(),
        low_balance: low_balance.iter().map(|t| c(t)).collect(),
    }
}

fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

#[test]
fn a_threshold_fires_once_per_crossing_and_rearms_above_it() {
    let rules = all_events(&["50", "10"]);
    let mut a = Account::new("a", "free");
    a.grant("topup", c("60"), 30, None, 0).unwrap();
    // The first look only starts watching: nothing is announced of the past.
    assert_eq!(kinds(&a.take_events(&rules, 0)), vec!["grant.created"]);
    a.take_entries();
    // A hold does not move the balance (available + held); its settle does.
    let h = a.hold(&request("15"), 1, &Catalog::new()).unwrap();
    assert!(a.take_events(&rules, 1).is_empty());
    a.settle(h.hold_id, c("15"), 2, &limits()).unwrap();
    let low = a.take_events(&rules, 2);
    assert_eq!(kinds(&low), vec!["balance.low"]);
    assert!(low[0].data.contains(r#""threshold":50"#), "{}", low[0].data);
    assert!(low[0].data.contains(r#""balance":45"#), "{}", low[0].data);
    // Further down, still above 10: nothing more.
    let h = a.hold(&request("5"), 3, &Catalog::new()).unwrap();
    a.settle(h.hold_id, c("5"), 3, &limits()).unwrap();
    assert!(a.take_events(&rules, 3).is_empty());
    // A released hold leaves the balance as it was: nothing fires or re-arms.
    let h = a.hold(&request("39"), 4, &Catalog::new()).unwrap();
    a.release(h.hold_id, 4).unwrap();
    assert!(a.take_events(&rules, 4).is_empty());
    // Through 10 and to 0 at once: both, in order.
    let h = a.hold(&request("40"), 5, &Catalog::new()).unwrap();
    a.settle(h.hold_id, c("40"), 5, &limits()).unwrap();
    assert_eq!(
        kinds(&a.take_events(&rules, 5)),
        vec!["balance.low", "balance.depleted"]
    );
    // A grant above 50 re-arms both; the next fall through 50 fires again.
    a.grant("topup", c("55"), 30, None, 6).unwrap();
    assert_eq!(kinds(&a.take_events(&rules, 6)), vec!["grant.created"]);
    let h = a.hold(&request("6"), 7, &Catalog::new()).unwrap();
    a.settle(h.hold_id, c("6"), 7, &limits()).unwrap();
    let again = a.take_events(&rules, 7);
    assert_eq!(kinds(&again), vec!["balance.low"]);
    // Ids are unique.
    assert_ne!(again[0].id, low[0].id);
}

#[test]
fn expiries_plan_changes_and_refills_are_events_and_unwanted_kinds_are_not() {
    let catalog: Catalog = [
        ("free".to_string(), PlanTerms::default()),
        (
            "pro".to_string(),
            PlanTerms {
                monthly_credits: c("100"),
                ..PlanTerms::default()
            },
        ),
    ]
    .into_iter()
    .collect();
    let rules = all_events(&[]);
    let mut a = Account::new("a", "free");
    a.grant("topup", c("10"), 30, None, 0).unwrap();
    a.take_events(&rules, 0);
    a.hold(&request("1"), 0, &catalog).unwrap();
    a.apply_time(5_000, &catalog);
    let expired = a.take_events(&rules, 5_000);
    assert_eq!(kinds(&expired), vec!["hold.expired"]);
    assert!(expired[0].data.contains(r#""request_id":"r""#));
    a.change_plan("pro", Effective::Now, 6_000, &catalog)
        .unwrap();
    let changed = a.take_events(&rules, 6_000);
    assert_eq!(kinds(&changed), vec!["plan.changed"]);
    assert!(
        changed[0]
            .data
            .contains(r#""effective":"now","from":"free","reference":null,"to":"pro""#),
        "{}",
        changed[0].data
    );
    let only_grants = EventRules {
        kinds: [EventKind::GrantCreated].into_iter().collect(),
        low_balance: vec![],
    };
    a.change_plan("free", Effective::PeriodEnd, 7_000, &catalog)
        .unwrap();
    assert!(a.take_events(&only_grants, 7_000).is_empty());
}

#[test]
fn a_payment_grants_once_per_key_and_moves_the_plan_once_with_its_reference() {
    let catalog: Catalog = [
        ("free".to_string(), PlanTerms::default()),
        (
            "pro".to_string(),
            PlanTerms {
                monthly_credits: c("100"),
                ..PlanTerms::default()
            },
        ),
    ]
    .into_iter()
    .collect();
    let mut a = Account::new("a", "free");
    let topup = |reference: &str| Payment {
        reference: reference.into(),
        action: PaymentAction::Grant {
            key: "stripe:pi_1".into(),
            kind: "topup".into(),
            credits: c("500"),
            priority: 30,
        },
    };
    let first = a.pay(&topup("evt_1"), 0, &catalog, &limits()).unwrap();
    assert!(matches!(first, Paid::Granted { created: true, .. }));
    let again = a.pay(&topup("evt_2"), 0, &catalog, &limits()).unwrap();
    assert!(matches!(again, Paid::Granted { created: false, .. }));
    assert_eq!(a.available(), c("500"));
    let entries = a.take_entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].request_id.as_deref(), Some("evt_1"));
    let plan = Payment {
        reference: "evt_3".into(),
        action: PaymentAction::Plan { plan: "pro".into() },
    };
    assert_eq!(
        a.pay(&plan, 1, &catalog, &limits()).unwrap(),
        Paid::PlanChanged
    );
    assert_eq!(
        a.pay(&plan, 2, &catalog, &limits()).unwrap(),
        Paid::PlanKept
    );
    assert_eq!(a.plan, "pro");
    let entries = a.take_entries();
    assert!(entries
        .iter()
        .all(|e| e.request_id.as_deref() == Some("evt_3")));
    assert!(entries.iter().any(|e| e.kind == EntryKind::PlanChange));
}

fn paid_topup(a: &mut Account, catalog: &Catalog, intent: &str, credits: &str) {
    let topup = Payment {
        reference: "evt_paid".into(),
        action: PaymentAction::Grant {
            key: format!("stripe:{intent}"),
            kind: "topup".into(),
            credits: c(credits),
            priority: 30,
        },
    };
    a.pay(&topup, 0, catalog, &limits()).unwrap();
    a.take_entries();
}

fn refund(event: &str, intent: &str, amount: u64, amount_refunded: u64) -> Payment {
    Payment {
        reference: event.into(),
        action: PaymentAction::Refund {
            key: format!("stripe:{intent}"),
            amount,
            amount_refunded,
        },
    }
}

#[test]
fn refunded_credits_round_down_and_a_full_refund_takes_exactly_the_grant() {
    assert_eq!(refunded_credits(c("500"), 1000, 1000), c("500"));
    assert_eq!(refunded_credits(c("500"), 1000, 5000), c("500"));
    assert_eq!(refunded_credits(c("500"), 1000, 0), Credits::ZERO);
    assert_eq!(refunded_credits(c("500"), 1000, 300), c("150"));
    // 1 millicredit × 1/3 rounds down to nothing; 10 × 2/3 to 6.
    assert_eq!(refunded_credits(c("0.001"), 3, 1), Credits::ZERO);
    assert_eq!(refunded_credits(c("0.01"), 3, 2), c("0.006"));
    assert_eq!(refunded_credits(c("500"), 0, 0), c("500"));
    let huge = Credits::from_millicredits(u64::MAX);
    assert_eq!(
        refunded_credits(huge, u64::MAX, u64::MAX - 1),
        Credits::from_millicredits(u64::MAX - 1)
    );
}

#[test]
fn a_full_refund_debits_the_grant_once_with_its_event_id() {
    let catalog = catalog();
    let mut a = open("free", None, 0);
    a.take_entries();
    let start = a.available();
    paid_topup(&mut a, &catalog, "pi_1", "500");
    let first = a.pay(
        &refund("evt_r1", "pi_1", 1000, 1000),
        1,
        &catalog,
        &limits(),
    );
    assert_eq!(
        first.unwrap(),
        Paid::Refunded {
            credits: c("500"),
            refunded: c("500"),
            granted: c("500")
        }
    );
    assert_eq!(a.available(), start);
    let entries = a.take_entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].kind, EntryKind::Adjust);
    assert!(entries[0].debit);
    assert_eq!(entries[0].credits, c("500"));
    assert_eq!(entries[0].request_id.as_deref(), Some("evt_r1"));
    // Redelivered, or sent again under another event: nothing more.
    for event in ["evt_r1", "evt_r2"] {
        assert_eq!(
            a.pay(&refund(event, "pi_1", 1000, 1000), 2, &catalog, &limits())
                .unwrap(),
            Paid::AlreadyRefunded {
                refunded: c("500"),
                granted: c("500")
            }
        );
    }
    assert!(a.take_entries().is_empty());
    assert_eq!(a.available(), start);
    a.check_invariant().unwrap();
}

#[test]
fn partial_refunds_debit_only_the_difference_and_never_more_than_granted() {
    let catalog = catalog();
    let mut a = open("free", None, 0);
    a.take_entries();
    let start = a.available();
    paid_topup(&mut a, &catalog, "pi_1", "10");
    // 999 paid; refunded 333, then 666 (running totals), then all of it.
    let steps = [(333, "3.333"), (666, "3.333"), (999, "3.334")];
    for (i, (total, debited)) in steps.into_iter().enumerate() {
        let paid = a
            .pay(
                &refund(&format!("evt_{i}"), "pi_1", 999, total),
                1,
                &catalog,
                &limits(),
            )
            .unwrap();
        assert!(
            matches!(paid, Paid::Refunded { credits, .. } if credits == c(debited)),
            "{paid:?}"
        );
    }
    assert_eq!(a.available(), start);
    // An older event arriving after a newer one changes nothing.
    assert!(matches!(
        a.pay(&refund("evt_0", "pi_1", 999, 333), 2, &catalog, &limits())
            .unwrap(),
        Paid::AlreadyRefunded { .. }
    ));
    let debited: u64 = a
        .take_entries()
        .iter()
        .map(|e| e.credits.millicredits())
        .sum();
    assert_eq!(debited, c("10").millicredits());
    a.check_invariant().unwrap();
}

#[test]
fn a_refund_of_an_unknown_payment_changes_nothing() {
    let catalog = catalog();
    let mut a = open("free", None, 0);
    paid_topup(&mut a, &catalog, "pi_1", "10");
    let before = a.totals();
    assert_eq!(
        a.pay(
            &refund("evt_r", "pi_other", 100, 100),
            1,
            &catalog,
            &limits()
        )
        .unwrap(),
        Paid::UnknownPayment
    );
    // An adjustment's key is not a payment either.
    a.adjust(
        &AdjustRequest {
            idempotency_key: "stripe:pi_adj".into(),
            credits: c("1"),
            debit: true,
            reason: "x".into(),
        },
        1,
        &catalog,
        &limits(),
    )
    .unwrap();
    a.take_entries();
    assert_eq!(
        a.pay(&refund("evt_r", "pi_adj", 100, 100), 1, &catalog, &limits())
            .unwrap(),
        Paid::UnknownPayment
    );
    assert!(a.take_entries().is_empty());
    assert_eq!(a.totals().granted, before.granted);
}

#[test]
fn a_refund_of_spent_credits_goes_into_debt_within_the_overdraft_or_not_at_all() {
    let catalog: Catalog = [
        ("free".to_string(), PlanTerms::default()),
        (
            "tab".to_string(),
            PlanTerms {
                overdraft_limit: c("5"),
                ..PlanTerms::default()
            },
        ),
    ]
    .into_iter()
    .collect();
    let mut a = Account::new("a", "free");
    paid_topup(&mut a, &catalog, "pi_1", "10");
    let hold = a.hold(&request("8"), 0, &catalog).unwrap();
    a.settle(hold.hold_id, c("8"), 1, &limits()).unwrap();
    // 2 available, 10 to take back, no overdraft: refused whole.
    let refused = a.pay(&refund("evt_r", "pi_1", 100, 100), 2, &catalog, &limits());
    assert!(matches!(
        refused,
        Err(AccountRejected::InsufficientCredits { .. })
    ));
    assert_eq!(a.available(), c("2"));
    a.plan = "tab".into();
    // 8 into debt passes a limit of 5 too; half of it (5: 2 then 3 of debt) fits.
    assert!(a
        .pay(&refund("evt_r", "pi_1", 100, 100), 2, &catalog, &limits())
        .is_err());
    assert!(matches!(
        a.pay(&refund("evt_r2", "pi_1", 100, 50), 3, &catalog, &limits())
            .unwrap(),
        Paid::Refunded { credits, .. } if credits == c("5")
    ));
    assert_eq!(a.available(), Credits::ZERO);
    assert_eq!(a.debt(), c("3"));
    a.check_invariant().unwrap();
}

#[test]
fn member_limit_reached_fires_once_per_cycle_when_the_charges_reach_the_limit() {
    let cat = featured();
    let mut a = open("team", None, 0);
    let terms = MemberTerms {
        monthly_limit: Some(c("2")),
        ..MemberTerms::default()
    };
    a.add_member_with("ann", &terms, &cat).unwrap();
    a.add_key("ann", "key_1").unwrap();
    a.add_member_with("bob", &terms, &cat).unwrap();
    a.add_key("bob", "key_2").unwrap();
    let only = EventRules {
        kinds: [EventKind::MemberLimitReached].into_iter().collect(),
        low_balance: vec![],
    };
    a.take_events(&only, 0);
    let spend = |a: &mut Account, member: &str, key: &str, charge: &str, at: Millis| {
        let h = a.hold(&by(member, key, &[]), at, &cat).unwrap();
        a.settle(h.hold_id, c(charge), at, &limits()).unwrap();
    };
    // Holding up to the limit is not reaching it: charges are.
    let h1 = a.hold(&by("ann", "key_1", &[]), 1, &cat).unwrap();
    let h2 = a.hold(&by("ann", "key_1", &[]), 1, &cat).unwrap();
    assert!(a.take_events(&only, 1).is_empty());
    a.settle(h1.hold_id, c("1"), 2, &limits()).unwrap();
    assert!(a.take_events(&only, 2).is_empty());
    a.settle(h2.hold_id, c("1"), 3, &limits()).unwrap();
    let reached = a.take_events(&only, 3);
    assert_eq!(kinds(&reached), vec!["member_limit.reached"]);
    assert_eq!(reached[0].data, r#"{"limit":2,"member":"ann","used":2}"#);
    // Once: further transitions (bob spending under his limit) say nothing of ann.
    spend(&mut a, "bob", "key_2", "0.5", 4);
    assert!(a.take_events(&only, 4).is_empty());
    // A higher limit re-arms it: reached again, told again.
    a.set_member_terms(
        "ann",
        &MemberTerms {
            monthly_limit: Some(c("3")),
            ..MemberTerms::default()
        },
    )
    .unwrap();
    assert!(a.take_events(&only, 5).is_empty());
    spend(&mut a, "ann", "key_1", "1", 6);
    let again = a.take_events(&only, 6);
    assert_eq!(kinds(&again), vec!["member_limit.reached"]);
    assert!(again[0].data.contains(r#""used":3"#), "{}", again[0].data);
    // The refill re-arms it: the next cycle's reaching is told too.
    let next = a.next_refill_ms;
    a.apply_time(next, &cat);
    assert!(a.take_events(&only, next).is_empty());
    for _ in 0..3 {
        spend(&mut a, "ann", "key_1", "1", next + 1);
    }
    assert_eq!(
        kinds(&a.take_events(&only, next + 1)),
        vec!["member_limit.reached"]
    );
    // Not wanted: decided all the same, never told.
    a.apply_time(a.next_refill_ms, &cat);
    a.take_events(&only, a.next_refill_ms);
    let at = a.cycle_start_ms + 1;
    for _ in 0..3 {
        spend(&mut a, "ann", "key_1", "1", at);
    }
    assert!(a.take_events(&EventRules::default(), at).is_empty());
    assert!(a.take_events(&only, at).is_empty());
}
