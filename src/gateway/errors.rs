//! Errors the gateway writes itself: one enum, one JSON shape (§5).
//!
//! Bodies name the operation, amounts and plan of the caller's own account, never
//! another account, a key, an internal address or a stack trace.

use serde_json::{json, Map, Value};

use crate::ledger::{Credits, HoldRejected};
use crate::policy::json::DuplicateKey;
use crate::policy::{PathError, Policy, Refused};
use crate::store::StoreError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiError {
    InvalidRequest {
        source: String,
        message: String,
    },
    RequestTooLarge {
        limit: usize,
    },
    MissingApiKey,
    InvalidApiKey,
    UnknownOperation,
    PlanRequired {
        operation: String,
        feature: String,
        plans: Vec<String>,
    },
    InsufficientCredits {
        operation: String,
        /// The hold the request needs (with `hold = "available"`: at least `min_hold`).
        required: Credits,
        available: Credits,
        held: Credits,
        plan: String,
        upgrade_url: Option<String>,
        /// `required` is an estimate of the most the request can cost, not its
        /// price: the operation is charged its actual usage.
        estimate: bool,
    },
    TooManyHolds {
        limit: usize,
    },
    PremiumDisabled {
        operation: String,
    },
    /// The operation requires a feature disabled for the member.
    FeatureDisabled {
        operation: String,
        feature: String,
    },
    /// The member's monthly limit cannot pay the hold, whatever the account has.
    MemberLimitReached {
        operation: String,
        member: String,
        limit: Credits,
        used: Credits,
    },
    QuotaExhausted {
        operation: String,
        quota: String,
        limit: u64,
        /// Seconds until the refill renews the quota, when known: `Retry-After`.
        refill_in_s: Option<u64>,
    },
    StoreUnavailable,
    /// The store answered, but the account is contended or its state corrupt: a
    /// 500, never forwarded. `detail` is for the log, never for the body.
    StoreFailed {
        detail: String,
    },
    UpstreamUnavailable,
    UpstreamTimeout,
    /// A bug in the gateway; the body says nothing more.
    Internal,
    /// A method the gateway does not serve (`CONNECT`).
    MethodNotAllowed,
    /// The request head was not read within `header_read_timeout`.
    RequestTimeout,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    /// The first request was settled, but its response could not be kept.
    IdempotencyReplayUnavailable,
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::InvalidRequest { .. } => 400,
            ApiError::RequestTooLarge { .. } => 413,
            ApiError::MissingApiKey | ApiError::InvalidApiKey => 401,
            ApiError::InsufficientCredits { .. } | ApiError::MemberLimitReached { .. } => 402,
            ApiError::PlanRequired { .. }
            | ApiError::PremiumDisabled { .. }
            | ApiError::FeatureDisabled { .. } => 403,
            ApiError::QuotaExhausted { .. } => 429,
            ApiError::UnknownOperation => 404,
            ApiError::TooManyHolds { .. } => 429,
            ApiError::UpstreamUnavailable => 502,
            ApiError::StoreUnavailable => 503,
            ApiError::UpstreamTimeout => 504,
            ApiError::Internal | ApiError::StoreFailed { .. } => 500,
            ApiError::MethodNotAllowed => 405,
            ApiError::RequestTimeout => 408,
            ApiError::IdempotencyInProgress
            | ApiError::IdempotencyKeyReused
            | ApiError::IdempotencyReplayUnavailable => 409,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::RequestTooLarge { .. } => "request_too_large",
            ApiError::MissingApiKey => "missing_api_key",
            ApiError::InvalidApiKey => "invalid_api_key",
            ApiError::UnknownOperation => "unknown_operation",
            ApiError::PlanRequired { .. } => "plan_required",
            ApiError::InsufficientCredits { .. } => "insufficient_credits",
            ApiError::TooManyHolds { .. } => "too_many_holds",
            ApiError::PremiumDisabled { .. } => "premium_disabled",
            ApiError::FeatureDisabled { .. } => "feature_disabled",
            ApiError::MemberLimitReached { .. } => "member_limit_reached",
            ApiError::QuotaExhausted { .. } => "quota_exhausted",
            ApiError::StoreUnavailable => "store_unavailable",
            ApiError::StoreFailed { .. } => "store_error",
            ApiError::UpstreamUnavailable => "upstream_unavailable",
            ApiError::UpstreamTimeout => "upstream_timeout",
            ApiError::Internal => "internal_error",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::IdempotencyInProgress => "idempotency_in_progress",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::IdempotencyReplayUnavailable => "idempotency_replay_unavailable",
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::InvalidRequest { source, message } => format!("{source} {message}."),
            ApiError::RequestTooLarge { limit } => {
                format!("The request body is larger than {limit} bytes.")
            }
            ApiError::Internal => "The gateway failed; nothing was charged.".into(),
            ApiError::MethodNotAllowed => "The gateway does not serve this method.".into(),
            ApiError::RequestTimeout => {
                "The request head was not received in time; nothing was charged.".into()
            }
            ApiError::IdempotencyInProgress => "A request with this Idempotency-Key is in progress; retry when it has finished.".into(),
            ApiError::IdempotencyKeyReused => "This Idempotency-Key was used for a different request.".into(),
            ApiError::IdempotencyReplayUnavailable => "The request with this Idempotency-Key succeeded and was charged; its response was too large to replay.".into(),
            ApiError::MissingApiKey => {
                "Send your API key as `Authorization: Bearer KEY` or `x-api-key: KEY`.".into()
            }
            ApiError::InvalidApiKey => "The API key is not valid.".into(),
            ApiError::UnknownOperation => "No operation matches this method and path.".into(),
            ApiError::PlanRequired {
                operation,
                feature,
                plans,
            } if plans.is_empty() => {
                format!("{operation} needs the {feature} feature, which no plan includes.")
            }
            ApiError::PlanRequired {
                operation,
                feature,
                plans,
            } => {
                format!(
                    "{operation} needs the {feature} feature, included in: {}.",
                    plans.join(", ")
                )
            }
            ApiError::InsufficientCredits {
                operation,
                required,
                available,
                estimate: false,
                ..
            } => {
                format!("{operation} needs {required} credits; {available} are available.")
            }
            ApiError::InsufficientCredits {
                operation,
                required,
                available,
                estimate: true,
                ..
            } => {
                format!("{operation} holds up to {required} credits, an estimate of the most it can cost (it is charged its actual usage); {available} are available.")
            }
            ApiError::TooManyHolds { limit } => {
                format!(
                    "This account already has {limit} requests in flight; retry when one finishes."
                )
            }
            ApiError::PremiumDisabled { operation } => {
                format!("{operation} is premium, and premium generation is disabled for you by your team's admin.")
            }
            ApiError::FeatureDisabled { operation, feature } => {
                format!("{operation} needs the {feature} feature, which your team's admin disabled for you.")
            }
            ApiError::MemberLimitReached {
                operation,
                limit,
                used,
                ..
            } => {
                format!("{operation} would pass your monthly limit of {limit} credits, set by your team's admin; {used} are used or held this cycle.")
            }
            ApiError::QuotaExhausted {
                operation,
                quota,
                limit,
                ..
            } => {
                format!("{operation} counts against {quota}: all {limit} for this month are used.")
            }
            ApiError::StoreUnavailable => {
                "The credit store is unavailable; nothing was charged. Retry shortly.".into()
            }
            ApiError::StoreFailed { .. } => {
                "The credit store failed on this account; nothing was charged or forwarded.".into()
            }
            ApiError::UpstreamUnavailable => {
                "The backend could not be reached or failed; nothing was charged.".into()
            }
            ApiError::UpstreamTimeout => {
                "The backend did not answer in time; nothing was charged.".into()
            }
        }
    }

    /// The `Retry-After` of this error, in seconds: when the refill renews an
    /// exhausted quota (if known), and `1` for what passes on its own (an open
    /// hold ending, the store coming back). Other errors are not worth retrying
    /// as they are, so SDKs that retry on 429 are told nothing.
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            ApiError::QuotaExhausted { refill_in_s, .. } => *refill_in_s,
            ApiError::StoreUnavailable | ApiError::TooManyHolds { .. } => Some(1),
            _ => None,
        }
    }

    /// The error a refusal of the policy (match, entitle, price) is answered with.
    pub fn refused(policy: &Policy, refused: Refused) -> ApiError {
        match refused {
            Refused::UnknownOperation => ApiError::UnknownOperation,
            Refused::PlanRequired { operation, feature } => ApiError::PlanRequired {
                operation: policy.operations[operation].name.clone(),
                plans: policy
                    .plans_with_feature(&feature)
                    .into_iter()
                    .map(String::from)
                    .collect(),
                feature,
            },
            Refused::PremiumDisabled { operation } => ApiError::PremiumDisabled {
                operation: policy.operations[operation].name.clone(),
            },
            Refused::FeatureDisabled { operation, feature } => ApiError::FeatureDisabled {
                operation: policy.operations[operation].name.clone(),
                feature,
            },
            Refused::InvalidRequest(e) => ApiError::InvalidRequest {
                source: e.source,
                message: e.message,
            },
        }
    }

    /// The error a hold's rejection is answered with — for the request the hold
    /// refused, and for its quote alike: `operation` is the index of the operation
    /// the hold was for, `plan` the caller's plan (named in a 402). Who asks is
    /// answered as the policy's own refusals are (`401`, `403`), so a hold that
    /// re-checks them answers exactly what the policy would have.
    ///
    /// A `Replay` with a recorded body is not an error: the gateway answers it from
    /// the record before it asks this. Here a replay is one that cannot be answered
    /// — its response was not kept (`409 idempotency_replay_unavailable`) or is
    /// still being recorded (`409 idempotency_in_progress`, retry shortly).
    pub fn rejected(
        policy: &Policy,
        operation: usize,
        rejection: HoldRejected,
        plan: &str,
    ) -> ApiError {
        let name = || policy.operations[operation].name.clone();
        match rejection {
            HoldRejected::InsufficientCredits {
                required,
                available,
                held,
            } => ApiError::InsufficientCredits {
                operation: name(),
                required,
                available,
                held,
                plan: plan.to_string(),
                upgrade_url: policy.gateway.upgrade_url.clone(),
                estimate: policy.operations[operation].price_is_estimate(),
            },
            HoldRejected::TooManyHolds { limit } => ApiError::TooManyHolds { limit },
            HoldRejected::QuotaExhausted { quota, limit } => ApiError::QuotaExhausted {
                operation: name(),
                quota,
                limit,
                refill_in_s: None,
            },
            HoldRejected::IdempotencyInProgress => ApiError::IdempotencyInProgress,
            HoldRejected::IdempotencyKeyReused => ApiError::IdempotencyKeyReused,
            HoldRejected::Replay { response: None, .. } => ApiError::IdempotencyInProgress,
            HoldRejected::Replay {
                response: Some(_), ..
            } => ApiError::IdempotencyReplayUnavailable,
            HoldRejected::KeyNotActive => ApiError::InvalidApiKey,
            HoldRejected::PlanRequired { feature } => {
                ApiError::refused(policy, Refused::PlanRequired { operation, feature })
            }
            HoldRejected::PremiumDisabled => {
                ApiError::refused(policy, Refused::PremiumDisabled { operation })
            }
            HoldRejected::FeatureDisabled { feature } => {
                ApiError::refused(policy, Refused::FeatureDisabled { operation, feature })
            }
            HoldRejected::MemberLimitReached {
                member,
                limit,
                used,
            } => ApiError::MemberLimitReached {
                operation: name(),
                member,
                limit,
                used,
            },
        }
    }

    /// The answer to a store failure, by its kind: an unknown account means the
    /// key's account is gone (401), an outage is a 503, a contended or corrupt
    /// account a 500. (Whether an outage may be forwarded unmetered instead is the
    /// hold's decision, not this one's.)
    pub fn store(error: StoreError) -> ApiError {
        match error {
            StoreError::UnknownAccount(_) => ApiError::InvalidApiKey,
            StoreError::Unavailable(_) => ApiError::StoreUnavailable,
            StoreError::Contended(_) | StoreError::Corrupt(_) => ApiError::StoreFailed {
                detail: error.to_string(),
            },
        }
    }

    /// A body read to match or price whose objects repeat a key: the gateway and
    /// the backend could read different values, so it is refused.
    pub fn duplicate_key(duplicate: &DuplicateKey) -> ApiError {
        ApiError::InvalidRequest {
            source: "body".into(),
            message: duplicate.to_string(),
        }
    }

    /// The JSON body, `{"error": {...}}`.
    pub fn body(&self, request_id: &str) -> Value {
        let mut error = self.fields();
        error.insert("request_id".into(), json!(request_id));
        json!({ "error": error })
    }

    /// The error object without a request id: `type`, `message` and the details
    /// of this type (`creditgate quote` has no request to name).
    pub fn fields(&self) -> Map<String, Value> {
        let mut error = Map::new();
        error.insert("type".into(), json!(self.kind()));
        // The field the OpenAI SDKs (and many tools) read the error's kind from.
        error.insert("code".into(), json!(self.kind()));
        error.insert("message".into(), json!(self.message()));
        match self {
            ApiError::PlanRequired {
                operation,
                feature,
                plans,
            } => {
                error.insert("operation".into(), json!(operation));
                error.insert("feature".into(), json!(feature));
                error.insert("plans".into(), json!(plans));
            }
            ApiError::InsufficientCredits {
                operation,
                required,
                available,
                held,
                plan,
                upgrade_url,
                estimate,
            } => {
                if *estimate {
                    error.insert("estimate".into(), json!(true));
                }
                error.insert("operation".into(), json!(operation));
                error.insert("required".into(), required.to_json());
                error.insert("available".into(), available.to_json());
                error.insert("held".into(), held.to_json());
                error.insert("plan".into(), json!(plan));
                error.insert("upgrade_url".into(), json!(upgrade_url));
            }
            ApiError::TooManyHolds { limit } | ApiError::RequestTooLarge { limit } => {
                error.insert("limit".into(), json!(limit));
            }
            ApiError::PremiumDisabled { operation } => {
                error.insert("operation".into(), json!(operation));
            }
            ApiError::FeatureDisabled { operation, feature } => {
                error.insert("operation".into(), json!(operation));
                error.insert("feature".into(), json!(feature));
            }
            ApiError::MemberLimitReached {
                operation,
                member,
                limit,
                used,
            } => {
                error.insert("operation".into(), json!(operation));
                error.insert("member".into(), json!(member));
                error.insert("limit".into(), limit.to_json());
                error.insert("used".into(), used.to_json());
            }
            ApiError::QuotaExhausted {
                operation,
                quota,
                limit,
                ..
            } => {
                error.insert("operation".into(), json!(operation));
                error.insert("quota".into(), json!(quota));
                error.insert("limit".into(), json!(limit));
            }
            ApiError::InvalidRequest { source, .. } => {
                error.insert("source".into(), json!(source));
            }
            _ => {}
        }
        error
    }
}

/// A path the gateway will not match: the same 400 from the proxy, the quote API and
/// `creditgate quote`.
impl From<PathError> for ApiError {
    fn from(e: PathError) -> ApiError {
        ApiError::InvalidRequest {
            source: "path".into(),
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insufficient_credits_has_every_field() {
        let e = ApiError::InsufficientCredits {
            operation: "image.generate".into(),
            required: "30".parse().unwrap(),
            available: "12.5".parse().unwrap(),
            held: "2".parse().unwrap(),
            plan: "free".into(),
            upgrade_url: Some("https://example.com/billing".into()),
            estimate: false,
        };
        assert_eq!(e.status(), 402);
        let body = e.body("r1");
        assert_eq!(
            body,
            json!({"error": {"type": "insufficient_credits", "code": "insufficient_credits",
                "message": "image.generate needs 30 credits; 12.5 are available.",
                "operation": "image.generate", "required": 30, "available": 12.5, "held": 2,
                "plan": "free", "upgrade_url": "https://example.com/billing", "request_id": "r1"}})
        );
    }

    #[test]
    fn every_rejection_of_a_hold_is_answered_as_the_request_and_its_quote_are() {
        let policy = Policy::parse(
            "version = 1\n[gateway]\nupgrade_url = \"https://example.com/up\"\n\
             [upstreams.u]\nurl = \"http://127.0.0.1:1\"\n\
             [plans.free]\nmonthly_credits = 0\n[plans.pro]\nmonthly_credits = 0\nfeatures = [\"premium\"]\n\
             [[operations]]\nname = \"image.premium\"\npath = \"/p\"\nupstream = \"u\"\nrequires = [\"premium\"]\nprice = 2\n",
            "p.toml",
            &|_| None,
        )
        .unwrap();
        let c = |text: &str| text.parse::<Credits>().unwrap();
        let unkept = crate::ledger::Recorded {
            status: 200,
            content_type: None,
            body: None,
        };
        let cases = [
            (
                HoldRejected::InsufficientCredits {
                    required: c("2"),
                    available: c("1.5"),
                    held: c("0.5"),
                },
                402,
                "insufficient_credits",
            ),
            (
                HoldRejected::TooManyHolds { limit: 4 },
                429,
                "too_many_holds",
            ),
            (
                HoldRejected::QuotaExhausted {
                    quota: "q".into(),
                    limit: 3,
                },
                429,
                "quota_exhausted",
            ),
            (
                HoldRejected::IdempotencyInProgress,
                409,
                "idempotency_in_progress",
            ),
            (
                HoldRejected::IdempotencyKeyReused,
                409,
                "idempotency_key_reused",
            ),
            (
                HoldRejected::Replay {
                    response: None,
                    recording: true,
                },
                409,
                "idempotency_in_progress",
            ),
            (
                HoldRejected::Replay {
                    response: Some(unkept),
                    recording: false,
                },
                409,
                "idempotency_replay_unavailable",
            ),
            (HoldRejected::KeyNotActive, 401, "invalid_api_key"),
            (
                HoldRejected::PlanRequired {
                    feature: "premium".into(),
                },
                403,
                "plan_required",
            ),
            (HoldRejected::PremiumDisabled, 403, "premium_disabled"),
        ];
        for (rejection, status, kind) in cases {
            let error = ApiError::rejected(&policy, 0, rejection.clone(), "free");
            assert_eq!(
                (error.status(), error.kind()),
                (status, kind),
                "{rejection:?}"
            );
        }
        let body = ApiError::rejected(
            &policy,
            0,
            HoldRejected::InsufficientCredits {
                required: c("2"),
                available: c("1.5"),
                held: c("0.5"),
            },
            "free",
        )
        .body("r1");
        assert_eq!(
            body,
            json!({"error": {"type": "insufficient_credits", "code": "insufficient_credits",
                "message": "image.premium needs 2 credits; 1.5 are available.",
                "operation": "image.premium", "required": 2, "available": 1.5, "held": 0.5,
                "plan": "free", "upgrade_url": "https://example.com/up", "request_id": "r1"}})
        );
        // Who asks, refused by the hold, is answered as the policy refuses it.
        assert_eq!(
            ApiError::rejected(
                &policy,
                0,
                HoldRejected::PlanRequired {
                    feature: "premium".into()
                },
                "free"
            ),
            ApiError::refused(
                &policy,
                Refused::PlanRequired {
                    operation: 0,
                    feature: "premium".into()
                }
            )
        );
        assert_eq!(
            ApiError::rejected(&policy, 0, HoldRejected::PremiumDisabled, "pro"),
            ApiError::refused(&policy, Refused::PremiumDisabled { operation: 0 })
        );
    }
}
