//! Match → entitle → price (steps 2 to 4 of a request): what the policy makes of one
//! request before any balance is looked at. The gateway's requests, the client's
//! `POST /credits/v1/quote` and `creditgate quote` all ask this one function, so
//! the three can never disagree on an operation, a refusal or a price.
//!
//! It knows nothing of Pingora, sessions or accounts' balances: the caller passes
//! the request's facts and, when there is one, who is asking.

use super::{Policy, PriceError, RequestFacts, RouteMatch, Unmatched};
use crate::ledger::{entitle, features_allowed, Credits, HoldRejected};

/// Who asks, as far as entitlement is concerned.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    pub plan: &'a str,
    pub premium_disabled: bool,
    /// The member's other disabled features.
    pub disabled_features: &'a [String],
}

/// What a request is, once matched, entitled and priced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The operation at this index of `Policy::operations`, holding `price`
    /// (which may be zero) and using `quota_units` of its quota, if it has one.
    Operation {
        index: usize,
        price: Credits,
        quota_units: u64,
    },
    /// No operation matched and `unmatched = "allow"`: forwarded free to this
    /// upstream (an index into `Policy::upstreams`).
    PassThrough { upstream: usize },
}

/// Why the policy refuses a request, in the order the steps find it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No operation matched (and `unmatched = "deny"`): 404.
    UnknownOperation,
    /// The caller's plan lacks `feature`: 403.
    PlanRequired { operation: usize, feature: String },
    /// The member's premium generation is switched off: 403.
    PremiumDisabled { operation: usize },
    /// A feature the operation requires is disabled for the member: 403.
    FeatureDisabled { operation: usize, feature: String },
    /// A value the price needs is missing or wrong: 400.
    InvalidRequest(PriceError),
}

/// The outcome of [`Policy::evaluate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Evaluation {
    Decided(Result<Verdict, Refused>),
    /// The next step reads the request body, which was not given
    /// (`RequestFacts::body` is `None`): read it and evaluate again with it.
    NeedsBody,
}

/// Which operation a request selects, as far as the facts at hand tell.
enum Selection {
    Operation(usize),
    NoMatch,
    /// An operation's `when` on the body decides, and the body was not given.
    NeedsBody,
}

impl Policy {
    /// Match, entitle and price a request on `route` (`None`: no path pattern
    /// matched). `caller: None` skips entitlement (`creditgate quote` has no account).
    ///
    /// With `facts.body` `None` it goes as far as it can without the body, so a 404
    /// or a 403 is decided before a body is read (and can never be hidden behind a
    /// 413): only a `when` on the body, or a price from the body, answers
    /// [`Evaluation::NeedsBody`].
    pub fn evaluate(
        &self,
        route: Option<&RouteMatch<'_>>,
        facts: &RequestFacts<'_>,
        caller: Option<&Caller<'_>>,
    ) -> Evaluation {
        let selected = match route.map(|r| self.select_known(r, facts)) {
            Some(Selection::Operation(index)) => Some(index),
            Some(Selection::NeedsBody) => return Evaluation::NeedsBody,
            Some(Selection::NoMatch) | None => None,
        };
        let Some(index) = selected else {
            return Evaluation::Decided(match self.gateway.unmatched {
                Unmatched::Deny => Err(Refused::UnknownOperation),
                Unmatched::Allow { upstream } => Ok(Verdict::PassThrough { upstream }),
            });
        };
        let op = &self.operations[index];
        if let Some(caller) = caller {
            // The ledger's one entitlement rule, on this caller's view of its plan.
            let features = self
                .plan(caller.plan)
                .map_or(&[][..], |p| p.features.as_slice());
            let entitled = entitle(features, &op.requires, caller.premium_disabled)
                .and_then(|()| features_allowed(&op.requires, caller.disabled_features));
            match entitled {
                Ok(()) => {}
                Err(HoldRejected::PremiumDisabled) => {
                    return Evaluation::Decided(Err(Refused::PremiumDisabled { operation: index }))
                }
                Err(HoldRejected::FeatureDisabled { feature }) => {
                    return Evaluation::Decided(Err(Refused::FeatureDisabled {
                        operation: index,
                        feature,
                    }))
                }
                Err(HoldRejected::PlanRequired { feature }) => {
                    return Evaluation::Decided(Err(Refused::PlanRequired {
                        operation: index,
                        feature,
                    }))
                }
                // `entitle` answers nothing else.
                Err(_) => return Evaluation::Decided(Err(Refused::UnknownOperation)),
            }
        }
        if op.needs_body && facts.body.is_none() {
            return Evaluation::NeedsBody;
        }
        let priced = op.price.hold_amount(facts).and_then(|price| {
            let quota_units = op.quota.as_ref().map_or(Ok(1), |q| q.units(facts))?;
            Ok(Verdict::Operation {
                index,
                price,
                quota_units,
            })
        });
        Evaluation::Decided(priced.map_err(Refused::InvalidRequest))
    }

    /// `select`, told apart from "cannot tell without the body": the first operation
    /// of the route whose method and `when` match, where a `when` on the body is
    /// only looked at when the body is given — an operation ruled out by its method
    /// or another predicate needs no body to be ruled out.
    fn select_known(&self, route: &RouteMatch<'_>, facts: &RequestFacts<'_>) -> Selection {
        let on_body = |p: &&super::Predicate| p.source.needs_body();
        for &i in route.operations {
            let op = &self.operations[i];
            if op.method.as_ref().is_some_and(|m| m != facts.method) {
                continue;
            }
            if !op
                .when
                .iter()
                .filter(|p| !on_body(p))
                .all(|p| facts.holds(p))
            {
                continue;
            }
            if !op.when.iter().any(|p| on_body(&p)) {
                return Selection::Operation(i);
            }
            if facts.body.is_none() {
                return Selection::NeedsBody;
            }
            if op.when.iter().filter(on_body).all(|p| facts.holds(p)) {
                return Selection::Operation(i);
            }
        }
        Selection::NoMatch
    }
}
