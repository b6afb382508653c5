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

use crate::ledger::Credits;
use crate::policy::{usage_charge, Exact, OnClientAbort, OnMissing, OnUpstreamCut, Operation};

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
    /// Charge this much (never more than was held); the rest returns to the account.
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
/// charges the hold, or with a `settle` rule the usage's exact price rounded up and
/// capped at the hold — a missing usage charging the hold or releasing as
/// `on_missing` says.
pub fn decide(
    operation: &Operation,
    status: Option<u16>,
    ending: Ended,
    usage: Option<&Exact>,
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
        Ended::ClientAborted => rule.on_client_abort == OnClientAbort::Settle,
        Ended::UpstreamFailed => rule.on_upstream_cut == OnUpstreamCut::Settle,
        Ended::GatewayFailed => false,
    };
    if !settles {
        return Decision::Release;
    }
    match (&operation.settle, usage) {
        (None, _) => Decision::Settle(held),
        (Some(meter), Some(usage)) => {
            Decision::Settle(usage_charge(usage, meter.credits_per_unit, held))
        }
        (Some(meter), None) => match meter.on_missing {
            OnMissing::ChargeHold => Decision::Settle(held),
            OnMissing::Release => Decision::Release,
        },
    }
}

/// At the response's headers, before the body: whether every way the request can
/// still end — each ending, with a usage or without — releases the hold. Then it is
/// released at once, so the credits return sooner and the response's headers
/// report the balance after the release.
pub fn released_whatever_follows(operation: &Operation, status: u16, held: Credits) -> bool {
    Ended::ALL.into_iter().all(|ending| {
        [None, Some(&Exact::ZERO)]
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
"#;

    fn c(text: &str) -> Credits {
        text.parse().unwrap()
    }

    /// Usages and what each costs at 0.002 a unit with 10 held.
    fn usages() -> Vec<(Option<Exact>, &'static str)> {
        let u = |text: &str| Some(Exact::from_json_number(text).unwrap());
        vec![
            (None, "missing"),
            (u("0"), "0"),
            // 2e-10 credits: rounded up to a millicredit, never dropped.
            (u("0.0000001"), "0.001"),
            (u("1234"), "2.468"),
            (u("1234.5"), "2.469"),
            // 12 credits: capped at the hold.
            (u("6000"), "10"),
            // Too large for any integer: a usage all the same, charged at the hold.
            (u("1e400"), "10"),
        ]
    }

    /// The rules as the policy above states them, written out independently.
    fn expected(
        name: &str,
        status: Option<u16>,
        ending: Ended,
        usage: (Option<&Exact>, &str),
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
            ("metered", (None, _)) => Decision::Settle(held),
            ("metered.release", (None, _)) => Decision::Release,
            ("metered" | "metered.release", (Some(_), charge)) => Decision::Settle(c(charge)),
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
                        "metered" | "metered.release" => c("10"),
                        "counted" => Credits::ZERO,
                        _ => c("3"),
                    };
                    for (usage, charge) in &usages {
                        let usage = (usage.as_ref(), *charge);
                        let decision = decide(op, status, ending, usage.0, held);
                        assert_eq!(
                            decision,
                            expected(&op.name, status, ending, usage, held),
                            "{} {status:?} {ending:?} usage {}",
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
}
