//! The settle-or-release decision: how a request's hold ends.
//!
//! Pure, so it can be tested for every status and every way a request can end.

use crate::policy::{ChargeRule, OnClientAbort, OnUpstreamCut};

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Settle,
    Release,
}

/// `status` is the upstream status sent to the client, `None` if there was no
/// upstream response at all.
pub fn decide(rule: &ChargeRule, status: Option<u16>, ended: Ended) -> Decision {
    let Some(status) = status else {
        return Decision::Release;
    };
    if !rule.charges(status) {
        return Decision::Release;
    }
    let settles = match ended {
        Ended::Complete => true,
        Ended::ClientAborted => rule.on_client_abort == OnClientAbort::Settle,
        Ended::UpstreamFailed => rule.on_upstream_cut == OnUpstreamCut::Settle,
        Ended::GatewayFailed => false,
    };
    if settles {
        Decision::Settle
    } else {
        Decision::Release
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_ENDINGS: [Ended; 4] = [
        Ended::Complete,
        Ended::UpstreamFailed,
        Ended::ClientAborted,
        Ended::GatewayFailed,
    ];

    #[test]
    fn default_rule_settles_only_complete_2xx_for_every_status() {
        let rule = ChargeRule::default_rule();
        for status in 100..=599u16 {
            for ended in ALL_ENDINGS {
                let expected = if (200..=299).contains(&status)
                    && matches!(ended, Ended::Complete | Ended::ClientAborted)
                {
                    Decision::Settle
                } else {
                    Decision::Release
                };
                assert_eq!(
                    decide(&rule, Some(status), ended),
                    expected,
                    "{status} {ended:?}"
                );
            }
        }
    }

    #[test]
    fn configured_rules_change_only_what_they_name() {
        let policy = crate::policy::Policy::parse(
            "version = 1\n[upstreams.u]\nurl = \"http://127.0.0.1:1\"\n[[operations]]\nname = \"o\"\npath = \"/o\"\nupstream = \"u\"\nprice = 1\n\
             charge = { on = [\"2xx\", 404, \"3xx\"], on_client_abort = \"release\", on_upstream_cut = \"settle\" }\n",
            "p.toml",
            &|_| None,
        )
        .unwrap();
        let rule = &policy.operations[0].charge;
        for status in 100..=599u16 {
            let charging = (200..=399).contains(&status) || status == 404;
            let expect = |settles: bool| {
                if charging && settles {
                    Decision::Settle
                } else {
                    Decision::Release
                }
            };
            assert_eq!(
                decide(rule, Some(status), Ended::Complete),
                expect(true),
                "{status}"
            );
            assert_eq!(
                decide(rule, Some(status), Ended::ClientAborted),
                expect(false),
                "{status}"
            );
            assert_eq!(
                decide(rule, Some(status), Ended::UpstreamFailed),
                expect(true),
                "{status}"
            );
            assert_eq!(
                decide(rule, Some(status), Ended::GatewayFailed),
                Decision::Release,
                "{status}"
            );
        }
        assert_eq!(decide(rule, None, Ended::UpstreamFailed), Decision::Release);
    }

    #[test]
    fn no_response_always_releases() {
        for ended in ALL_ENDINGS {
            assert_eq!(
                decide(&ChargeRule::default_rule(), None, ended),
                Decision::Release
            );
        }
    }
}
