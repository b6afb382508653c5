//! The settle-or-release decision: what a request's ending costs.
//!
//! [`decide`] is the only place that turns an ending into money. It reads the
//! operation's rules — which statuses charge, what a client leaving or an upstream
//! cutting the body means (`charge`), what actual usage costs and what a missing one
//! means (`settle`) — and returns the amount to settle, or a release. The gateway
//! calls it when the request ends (`Gateway::end_hold`), and at the response's
//! headers asks [`released_whatever_follows`], which asks `decide` about every
//! ending still possible, so an early release can never disagree with a late one.
//!
//! It lives beside the gateway rather than in `policy/`: the policy says what the
//! rules are; the endings it judges (a status seen or not, a client gone, an
//! upstream cut, the gateway failing) are what the proxy observes. It is pure — no
//! Pingora, no store, no clock — so it is tested for every status, every ending and
//! every kind of usage.

use crate::ledger::{Credits, MAX_GRANTED};
use crate::policy::{
    Exact, OnClientAbort, OnMissing, OnUpstreamCut, Operation, OverHold, SettleRule, Usage,
};

/// How the request ended, as far as the hold is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The response was delivered completely.
    Complete,
    /// The upstream failed: refused, timed out, reset before or during the body.
    /// With no status that is "no response"; with one, the body was cut.
    UpstreamFailed,
    /// The client went away while the response was being delivered.
    ClientAborted,
    /// The gateway itself failed (a bug, or a shutdown cutting the request off).
    GatewayFailed,
}

impl Ended {
    /// Every way a request can end.
    pub const ALL: [Ended; 4] = [
        Ended::Complete,
        Ended::UpstreamFailed,
        Ended::ClientAborted,
        Ended::GatewayFailed,
    ];
}

/// How the hold ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Charge this much; the rest of the hold returns to the account. Never more
    /// than was held, unless the operation may overdraw (`over_hold =
    /// "overdraft"`): then the ledger takes what is above the hold from what is
    /// available and as debt, within the plan's limit.
    Settle(Credits),
    /// Charge nothing.
    Release,
}

/// What the hold of a request for `operation` ends as. `status` is the upstream's
/// status as sent to the client (`None`: no response at all); `usage` what the
/// response reported (`None`: missing, or not read); `held` what was held.
///
/// A status that does not charge releases; a charging one settles when the response
/// was delivered, and as `on_client_abort` / `on_upstream_cut` say when the client
/// left or the upstream cut the body; a gateway failure releases. A settlement
/// charges the hold, or with a `settle` rule the usage's exact price rounded up —
/// capped at the hold, or under `over_hold = "overdraft"` not capped here (a usage
/// too large for any amount is charged the most any account can be) — a missing
/// usage charging the hold or releasing as `on_missing` says. A client that left
/// under `on_client_abort = "settle"` is charged in full (the hold): the usage the
/// end of the response would report was never seen; under `"usage_so_far"` it is
/// charged the usage seen before it left, or as `on_missing` says.
pub fn decide(
    operation: &Operation,
    status: Option<u16>,
    ending: Ended,
    usage: Option<&Usage>,
    held: Credits,
) -> Decision {
    let rule = &operation.charge;
    let Some(status) = status else {
        return Decision::Release;
    };
    if !rule.charges(status) {
        return Decision::Release;
    }
    let settles = match ending {
        Ended::Complete => true,
        Ended::ClientAborted => rule.on_client_abort != OnClientAbort::Release,
        Ended::UpstreamFailed => rule.on_upstream_cut == OnUpstreamCut::Settle,
        Ended::GatewayFailed => false,
    };
    if !settles {
        return Decision::Release;
    }
    let Some(meter) = &operation.settle else {
        return Decision::Settle(held);
    };
    if ending == Ended::ClientAborted && rule.on_client_abort == OnClientAbort::Settle {
        return Decision::Settle(held);
    }
    match usage {
        Some(usage) => Decision::Settle(usage_charge(operation, meter, usage, held)),
        None => match meter.on_missing {
            OnMissing::ChargeHold => Decision::Settle(held),
            OnMissing::Release => Decision::Release,
        },
    }
}

/// What a usage costs under the operation's rules: its exact price rounded up,
/// capped at the hold unless the operation may overdraw. A price too large for
/// any amount is the hold, or under overdraft the most any account can be charged.
fn usage_charge(operation: &Operation, rule: &SettleRule, usage: &Usage, held: Credits) -> Credits {
    let price = rule.rate.charge(usage);
    match operation.charge.over_hold {
        OverHold::Cap => price.map_or(held, |price| price.min(held)),
        OverHold::Overdraft => price.map_or(MAX_GRANTED, |price| price.min(MAX_GRANTED)),
    }
}

/// At the response's headers, before the body: whether every way the request can
/// still end — each ending, with a usage or without — releases the hold. Then it is
/// released at once, so the credits return sooner and the response's headers
/// report the balance after the release.
pub fn released_whatever_follows(operation: &Operation, status: u16, held: Credits) -> bool {
    let zero = Usage::one(Exact::ZERO);
    Ended::ALL.into_iter().all(|ending| {
        [None, Some(&zero)]
            .into_iter()
            .all(|usage| decide(operation, Some(status), ending, usage, held) == Decision::Release)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    /// Fixed prices under the default and a configured charge rule, usage metered
    /// both ways `on_missing` says, and a free operation that counts a quota.
    const POLICY: &str = r#"
version = 1
[upstreams.u]
url = "http://127.0.0.1:1"
[plans.p]
monthly_credits = 0
quotas = { q = 1 }
[[operations]]
name = "fixed"
path = "/fixed"
upstream = "u"
price = 3
[[operations]]
name = "lenient"
path = "/lenient"
upstream = "u"
price = 3
charge = { on = ["2xx", 404, "3xx"], on_client_abort = "release", on_upstream_cut = "settle" }
[[operations]]
name = "metered"
path = "/metered"
upstream = "u"
price = 10
settle = { usage = "json:/usage", credits_per_unit = 0.002, on_missing = "charge_hold" }
[[operations]]
name = "metered.release"
path = "/metered/release"
upstream = "u"
price = 10
settle = { usage = "header:x-usage", credits_per_unit = 0.002, on_missing = "release" }
[[operations]]
name = "counted"
path = "/counted"
upstream = "u"
price = 0
quota = "q"
[[operations]]
name = "overdraft"
path = "/overdraft"
upstream = "u"
price = 10
settle = { usage = ["json:/usage", "sse:/usage"], credits_per_unit = 0.002 }
charge = { over_hold = "overdraft", on_client_abort = "settle" }
"#;

    fn c(text: &str) -> Credits {
        text.parse().unwrap()
    }

    /// Usages and what each costs at 0.002 a unit with 10 held: capped at the
    /// hold, and not capped (`over_hold = "overdraft"`).
    fn usages() -> Vec<(Option<Usage>, (&'static str, &'static str))> {
        let u = |text: &str| Some(Usage::one(Exact::from_json_number(text).unwrap()));
        let most = MAX_GRANTED.to_string();
        let most: &'static str = Box::leak(most.into_boxed_str());
        vec![
            (None, ("missing", "missing")),
            (u("0"), ("0", "0")),
            // 2e-10 credits: rounded up to a millicredit, never dropped.
            (u("0.0000001"), ("0.001", "0.001")),
            (u("1234"), ("2.468", "2.468")),
            (u("1234.5"), ("2.469", "2.469")),
            // 12 credits: capped at the hold, or charged above it.
            (u("6000"), ("10", "12")),
            // Too large for any integer: a usage all the same, charged at the hold,
            // or the most any account can be charged (the ledger charges what it can).
            (u("1e400"), ("10", most)),
        ]
    }

    /// The rules as the policy above states them, written out independently.
    fn expected(
        name: &str,
        status: Option<u16>,
        ending: Ended,
        usage: (Option<&Usage>, (&str, &str)),
        held: Credits,
    ) -> Decision {
        let Some(status) = status else {
            return Decision::Release;
        };
        let lenient = name == "lenient";
        let charging = if lenient {
            (200..=399).contains(&status) || status == 404
        } else {
            (200..=299).contains(&status)
        };
        let settles = match ending {
            Ended::Complete => true,
            Ended::ClientAborted => !lenient,
            Ended::UpstreamFailed => lenient,
            Ended::GatewayFailed => false,
        };
        if !charging || !settles {
            return Decision::Release;
        }
        match (name, usage) {
            ("metered" | "overdraft", (None, _)) => Decision::Settle(held),
            ("metered.release", (None, _)) => Decision::Release,
            // A client leaving a metered response charges its usage so far
            // (their default), except under `on_client_abort = "settle"`: in full.
            ("overdraft", _) if ending == Ended::ClientAborted => Decision::Settle(held),
            ("metered" | "metered.release", (Some(_), (capped, _))) => Decision::Settle(c(capped)),
            ("overdraft", (Some(_), (_, uncapped))) => Decision::Settle(c(uncapped)),
            _ => Decision::Settle(held),
        }
    }

    #[test]
    fn every_status_ending_and_usage_settles_or_releases_as_the_rules_say() {
        let policy = Policy::parse(POLICY, "decision.toml", &|_| None).unwrap();
        let usages = usages();
        let statuses = std::iter::once(None).chain((100..=599u16).map(Some));
        let mut settled = 0;
        for status in statuses {
            for ending in Ended::ALL {
                for op in &policy.operations {
                    let held = match op.name.as_str() {
                        "metered" | "metered.release" | "overdraft" => c("10"),
                        "counted" => Credits::ZERO,
                        _ => c("3"),
                    };
                    for (usage, charge) in &usages {
                        let usage = (usage.as_ref(), *charge);
                        let decision = decide(op, status, ending, usage.0, held);
                        assert_eq!(
                            decision,
                            expected(&op.name, status, ending, usage, held),
                            "{} {status:?} {ending:?} usage {:?}",
                            op.name,
                            usage.1
                        );
                        if decision != Decision::Release {
                            settled += 1;
                        }
                    }
                }
            }
        }
        // Not vacuous: both answers occur (and the counted operation settles 0).
        assert!(settled > 1_000, "{settled}");
        let counted = &policy.operations[4];
        assert_eq!(
            decide(counted, Some(200), Ended::Complete, None, Credits::ZERO),
            Decision::Settle(Credits::ZERO),
            "a free request that counts a quota settles, so the quota is counted"
        );
    }

    #[test]
    fn a_hold_is_released_at_the_headers_exactly_when_its_status_never_charges() {
        let policy = Policy::parse(POLICY, "decision.toml", &|_| None).unwrap();
        for op in &policy.operations {
            for status in 100..=599u16 {
                assert_eq!(
                    released_whatever_follows(op, status, c("3")),
                    !op.charge.charges(status),
                    "{} {status}",
                    op.name
                );
            }
        }
        // A charging status with `on_missing = "release"` is not released early:
        // the usage may still come in the body.
        let release_on_missing = &policy.operations[3];
        assert!(!released_whatever_follows(release_on_missing, 200, c("10")));
    }

    #[test]
    fn the_default_rule_settles_a_complete_or_abandoned_2xx_only() {
        let policy = Policy::parse(POLICY, "decision.toml", &|_| None).unwrap();
        let fixed = &policy.operations[0];
        for status in 100..=599u16 {
            for ending in Ended::ALL {
                let settles = (200..=299).contains(&status)
                    && matches!(ending, Ended::Complete | Ended::ClientAborted);
                assert_eq!(
                    decide(fixed, Some(status), ending, None, c("3")),
                    if settles {
                        Decision::Settle(c("3"))
                    } else {
                        Decision::Release
                    },
                    "{status} {ending:?}"
                );
            }
        }
    }

    use num_bigint::BigUint;
    use proptest::prelude::*;

    use crate::policy::{
        ChargeRule, Micros, OnMissing, Price, SettleRule, UnitRate, UsageRate, UsageSource,
    };

    /// `⌈n × 10^shift⌉` in big integers: the reference the exact code must match.
    fn ceil_scaled(n: BigUint, shift: i64) -> BigUint {
        let ten = BigUint::from(10u32);
        if shift >= 0 {
            n * ten.pow(shift as u32)
        } else {
            let d = ten.pow((-shift) as u32);
            (n + &d - 1u32) / d
        }
    }

    /// A metered operation priced per field of a usage object `{f0, f1, ...}`.
    fn priced_per_field(rates: &[u64], over_hold: OverHold) -> Operation {
        let units = rates
            .iter()
            .enumerate()
            .map(|(i, rate)| UnitRate {
                field: format!("f{i}"),
                pointer: format!("/f{i}"),
                credits: Micros::from_micros(*rate),
            })
            .collect();
        let mut charge = ChargeRule::default_rule();
        charge.over_hold = over_hold;
        Operation {
            name: "llm".into(),
            method: None,
            path: "/llm".into(),
            when: Vec::new(),
            upstream: 0,
            requires: Vec::new(),
            quota: None,
            price: Price::Fixed(Credits::ZERO),
            settle: Some(SettleRule {
                usage: vec![
                    UsageSource::Json("/usage".into()),
                    UsageSource::Sse("/usage".into()),
                ],
                rate: UsageRate::Units(units),
                on_missing: OnMissing::ChargeHold,
            }),
            charge,
            needs_body: false,
        }
    }

    /// A usage number as a response writes it: (JSON text, digits, exponent of the last digit).
    fn number() -> impl Strategy<Value = (String, String, i64)> {
        ("[1-9][0-9]{0,14}", "[0-9]{0,12}", -30i64..30, any::<bool>()).prop_map(
            |(int, frac, exp, as_string)| {
                let point = if frac.is_empty() {
                    String::new()
                } else {
                    format!(".{frac}")
                };
                let digits = format!("{int}{frac}");
                if as_string {
                    // A string holds a plain decimal: no exponent.
                    (format!("\"{int}{point}\""), digits, -(frac.len() as i64))
                } else {
                    (
                        format!("{int}{point}e{exp}"),
                        digits,
                        exp - frac.len() as i64,
                    )
                }
            },
        )
    }

    proptest! {
        /// Random usage objects and rates, read from a real JSON answer or a real
        /// event stream: the charge is the exact decimal sum Σ value × rate rounded
        /// up once to a millicredit, capped at the hold — or under `over_hold =
        /// "overdraft"` not capped but at the most any account can be charged.
        #[test]
        fn a_usage_object_is_charged_the_exact_sum_rounded_up_and_capped(
            fields in proptest::collection::vec(number(), 1..5),
            rates in proptest::collection::vec(prop_oneof![0u64..=5_000, 0u64..=5_000_000], 5),
            held in prop_oneof![0u64..=100_000, any::<u64>()],
            overdraft in any::<bool>(),
            as_stream in any::<bool>(),
        ) {
            let rates = &rates[..fields.len()];
            let over_hold = if overdraft { OverHold::Overdraft } else { OverHold::Cap };
            let op = priced_per_field(rates, over_hold);
            let object: Vec<String> = fields
                .iter()
                .enumerate()
                .map(|(i, (text, _, _))| format!("\"f{i}\":{text}"))
                .collect();
            let usage_json = format!("{{{}}}", object.join(","));
            let mut meter = super::super::usage::UsageMeter::new(op.settle.as_ref().unwrap(), 1 << 20);
            let mut response = pingora::http::ResponseHeader::build(200, None).unwrap();
            let content_type = if as_stream { "text/event-stream" } else { "application/json" };
            response.insert_header("content-type", content_type).unwrap();
            meter.on_headers(&response);
            if as_stream {
                meter.on_body(format!("data: {{\"usage\":null}}\n\ndata: {{\"usage\":{usage_json}}}\n\ndata: [DONE]\n\n").as_bytes());
            } else {
                meter.on_body(format!("{{\"usage\":{usage_json}}}").as_bytes());
            }
            let usage = meter.usage();
            prop_assert!(usage.is_some(), "{usage_json} is a usage");
            let held = Credits::from_millicredits(held);
            let decision = decide(&op, Some(200), Ended::Complete, usage.as_ref(), held);

            // value × rate millionths of a credit = value × rate × 1e-3 millicredits,
            // summed exactly at the lowest exponent, then rounded up once.
            let lowest = fields.iter().map(|(_, _, e)| e - 3).min().unwrap();
            let mut sum = BigUint::from(0u32);
            for ((_, digits, exp), rate) in fields.iter().zip(rates) {
                let digits = BigUint::parse_bytes(digits.as_bytes(), 10).unwrap();
                sum += digits * *rate * BigUint::from(10u32).pow((exp - 3 - lowest) as u32);
            }
            let exact = ceil_scaled(sum, lowest);
            let cap = if overdraft { MAX_GRANTED } else { held };
            let expected = exact.min(BigUint::from(cap.millicredits()));
            prop_assert_eq!(
                decision,
                Decision::Settle(Credits::from_millicredits(expected.try_into().unwrap())),
                "{} at {:?}", usage_json, rates
            );
        }
    }
}
