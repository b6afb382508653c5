//! `POST /webhooks/stripe` on the gateway listener: Stripe's events in, verified
//! as Stripe specifies, turned into payments the ledger applies ([`Payment`]).
//!
//! The signature is checked before anything is read of the body: the
//! `Stripe-Signature` header's `t` and every `v1` (HMAC-SHA256 with the endpoint's
//! secret of `"{t}.{payload}"`, compared in constant time), and `t` within 5
//! minutes of now. Anything that fails is a 400 that changes nothing. Events:
//! - `checkout.session.completed` with `payment_status = "paid"` and the metadata
//!   `creditgate_account` and `creditgate_price` (a key of `prices`) → what the
//!   price buys: a grant, made once per payment intent (the session's id when it
//!   has none), or the plan;
//! - `invoice.paid` with `subscription_details.metadata.creditgate_account` (or
//!   under `parent`, as newer API versions put it) and a line whose price maps to
//!   a plan → that plan, now, unless the account is on it already (renewals);
//! - `charge.refunded` with `metadata.creditgate_account` (the checkout's
//!   `payment_intent_data.metadata`, which Stripe copies to the charge) → a debit
//!   of the payment intent's grant in proportion to `amount_refunded` / `amount`
//!   (a running total: only what was not debited yet); a payment intent, or an
//!   account, creditgate did not grant is 200, ignored;
//! - anything else → 200, ignored.
//!
//! Every ledger entry a payment writes carries the Stripe event's id. Nothing here
//! calls Stripe.

use hmac::{Hmac, Mac};
use pingora::proxy::Session;
use serde_json::{json, Value};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::errors::ApiError;
use super::{body, Gateway, RequestCtx};
use crate::ledger::{AccountRejected, Paid, Payment, PaymentAction};
use crate::policy::{StripeConfig, StripePrice};
use crate::store::StoreError;

/// Where Stripe posts its events.
pub(super) const PATH: &str = "/webhooks/stripe";

/// Stripe's own tolerance for the signature's timestamp.
pub const TOLERANCE_S: u64 = 300;

/// Stripe's events are a few KiB; this bounds what is read before verifying.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Why a `Stripe-Signature` is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureError {
    Missing,
    Malformed,
    OutsideTolerance,
    NoMatch,
}

impl SignatureError {
    fn message(&self) -> &'static str {
        match self {
            SignatureError::Missing => "is missing",
            SignatureError::Malformed => "must be t=TIMESTAMP,v1=HEX[,v1=HEX…]",
            SignatureError::OutsideTolerance => "is more than 5 minutes from now",
            SignatureError::NoMatch => "matches no v1 signature of the payload",
        }
    }
}

/// HMAC-SHA256 of `"{t}.{payload}"` under `secret`: the scheme Stripe signs with,
/// and creditgate's own webhooks too.
pub fn signature(secret: &[u8], t: u64, payload: &[u8]) -> [u8; 32] {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return [0; 32],
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac.finalize().into_bytes().into()
}

/// Verifies a `Stripe-Signature` header for `payload` at `now_s`, as Stripe's
/// libraries do: any `v1` may match (several during a secret's rotation), other
/// schemes (`v0`) are not used.
pub fn verify(
    secret: &str,
    header: Option<&str>,
    payload: &[u8],
    now_s: u64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        let (key, value) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match key {
            "t" if t.is_none() => {
                t = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| SignatureError::Malformed)?,
                )
            }
            "t" => return Err(SignatureError::Malformed),
            // A v1 that is not hex matches nothing, like Stripe's compare.
            "v1" => v1.extend(hex::decode(value).ok()),
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if v1.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if now_s.abs_diff(t) > TOLERANCE_S {
        return Err(SignatureError::OutsideTolerance);
    }
    let expected = signature(secret.as_bytes(), t, payload);
    // Every candidate is compared, in constant time each.
    let matched = v1.iter().fold(0u8, |any, given| {
        any | expected.as_slice().ct_eq(given).unwrap_u8()
    });
    match matched {
        1 => Ok(()),
        _ => Err(SignatureError::NoMatch),
    }
}

fn invalid(source: &str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        source: source.into(),
        message: message.into(),
    }
}

fn text<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

/// What a verified event asks for: a payment to an account, or nothing.
enum Wanted {
    Pay { account: String, payment: Payment },
    Ignore(&'static str),
}

/// The payment a verified Stripe event makes, decided from the event alone.
fn wanted(config: &StripeConfig, event: &Value) -> Result<Wanted, ApiError> {
    let id = text(event, "/id").ok_or_else(|| invalid("event", "has no id"))?;
    let kind = text(event, "/type").unwrap_or_default();
    let object = event.pointer("/data/object").unwrap_or(&Value::Null);
    let price = |price_id: &str| config.prices.get(price_id);
    match kind {
        "checkout.session.completed" => {
            if text(object, "/payment_status") != Some("paid") {
                return Ok(Wanted::Ignore("not paid"));
            }
            let (Some(account), Some(price_id)) = (
                text(object, "/metadata/creditgate_account"),
                text(object, "/metadata/creditgate_price"),
            ) else {
                return Ok(Wanted::Ignore("no creditgate metadata"));
            };
            let bought = price(price_id).ok_or_else(|| {
                invalid(
                    "metadata.creditgate_price",
                    format!("{price_id:?} is not a price of [payments.stripe]"),
                )
            })?;
            let paid_by = text(object, "/payment_intent")
                .or_else(|| text(object, "/id"))
                .unwrap_or(id);
            let action = match bought {
                StripePrice::Grant {
                    kind,
                    credits,
                    priority,
                } => PaymentAction::Grant {
                    key: format!("stripe:{paid_by}"),
                    kind: kind.clone(),
                    credits: *credits,
                    priority: *priority,
                },
                StripePrice::Plan(plan) => PaymentAction::Plan { plan: plan.clone() },
            };
            Ok(Wanted::Pay {
                account: account.to_string(),
                payment: Payment {
                    reference: id.to_string(),
                    action,
                },
            })
        }
        "invoice.paid" => {
            let account = text(object, "/subscription_details/metadata/creditgate_account")
                .or_else(|| {
                    text(
                        object,
                        "/parent/subscription_details/metadata/creditgate_account",
                    )
                });
            let Some(account) = account else {
                return Ok(Wanted::Ignore("no creditgate metadata"));
            };
            let lines = object
                .pointer("/lines/data")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice);
            let plan = lines.iter().find_map(|line| {
                let price_id = text(line, "/price/id")
                    .or_else(|| text(line, "/pricing/price_details/price"))?;
                match price(price_id)? {
                    StripePrice::Plan(plan) => Some(plan.clone()),
                    StripePrice::Grant { .. } => None,
                }
            });
            let Some(plan) = plan else {
                return Ok(Wanted::Ignore("no line's price is a plan"));
            };
            Ok(Wanted::Pay {
                account: account.to_string(),
                payment: Payment {
                    reference: id.to_string(),
                    action: PaymentAction::Plan { plan },
                },
            })
        }
        "charge.refunded" => {
            // The checkout's `payment_intent_data.metadata` is on the charge:
            // Stripe copies a payment intent's metadata to its charge.
            let (Some(account), Some(intent)) = (
                text(object, "/metadata/creditgate_account"),
                text(object, "/payment_intent"),
            ) else {
                return Ok(Wanted::Ignore("no creditgate metadata"));
            };
            let amount = |field: &str| {
                object
                    .get(field)
                    .and_then(Value::as_u64)
                    .ok_or_else(|| invalid(field, "must be a whole number at least 0"))
            };
            let (amount, amount_refunded) = (amount("amount")?, amount("amount_refunded")?);
            if amount == 0 {
                return Ok(Wanted::Ignore("nothing was paid"));
            }
            Ok(Wanted::Pay {
                account: account.to_string(),
                payment: Payment {
                    reference: id.to_string(),
                    action: PaymentAction::Refund {
                        key: format!("stripe:{intent}"),
                        amount,
                        amount_refunded,
                    },
                },
            })
        }
        _ => Ok(Wanted::Ignore("not an event creditgate acts on")),
    }
}

impl Gateway {
    /// Answers `POST /webhooks/stripe` (the caller has checked the path).
    pub(super) async fn stripe_webhook(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), ApiError> {
        let Some(config) = &self.policy.stripe else {
            return Err(ApiError::UnknownOperation);
        };
        if session.req_header().method != http::Method::POST {
            return Err(ApiError::UnknownOperation);
        }
        let payload = body::read_all(session, MAX_BODY_BYTES)
            .await
            .map_err(|e| match e {
                body::BodyError::TooLarge => ApiError::RequestTooLarge {
                    limit: MAX_BODY_BYTES,
                },
                _ => invalid("body", "could not be read"),
            })?;
        let header = session
            .req_header()
            .headers
            .get("stripe-signature")
            .and_then(|v| v.to_str().ok());
        let now_s = self.now_ms() / 1_000;
        verify(&config.webhook_secret, header, &payload, now_s)
            .map_err(|e| invalid("Stripe-Signature", e.message()))?;
        let event: Value = serde_json::from_slice(&payload)
            .map_err(|e| invalid("body", format!("is not a Stripe event: {e}")))?;
        let event_id = text(&event, "/id").unwrap_or_default().to_string();
        let answer = match wanted(config, &event)? {
            Wanted::Ignore(why) => {
                tracing::info!(stripe_event = %event_id, why, "stripe event ignored");
                json!({"received": true, "ignored": why})
            }
            Wanted::Pay { account, payment } => {
                let refund = matches!(payment.action, PaymentAction::Refund { .. });
                let paid = match self.store.pay(&account, &payment, self.now_ms()).await {
                    // A refund for an account creditgate does not have was not
                    // paid to it: nothing to take back.
                    Err(StoreError::UnknownAccount(_)) if refund => Ok(Paid::UnknownPayment),
                    Err(StoreError::UnknownAccount(_)) => {
                        return Err(invalid(
                            "metadata.creditgate_account",
                            format!("{account:?} is not an account"),
                        ))
                    }
                    Err(other) => return Err(ApiError::store(other)),
                    Ok(paid) => paid,
                }
                .map_err(|rejected| match rejected {
                    AccountRejected::UnknownPlan => {
                        invalid("price", "names a plan the policy no longer has")
                    }
                    AccountRejected::InsufficientCredits {
                        required,
                        available,
                        overdraft_room,
                    } => {
                        tracing::warn!(
                            stripe_event = %payment.reference, account,
                            "stripe refund refused: debiting {required} credits passes the overdraft limit"
                        );
                        invalid(
                            "payment",
                            format!(
                                "the refund would debit {required} credits; the account has \
                                 {available} available and {overdraft_room} of overdraft room"
                            ),
                        )
                    }
                    other => invalid("payment", format!("was refused: {other:?}")),
                })?;
                let (effect, credits) = match &paid {
                    Paid::Granted { created: true, .. } => (Some("granted"), None),
                    Paid::Granted { created: false, .. } => (Some("already_granted"), None),
                    Paid::PlanChanged => (Some("plan_changed"), None),
                    Paid::PlanKept => (Some("plan_kept"), None),
                    Paid::Refunded { credits, .. } => (Some("refunded"), Some(*credits)),
                    Paid::AlreadyRefunded { .. } => (Some("already_refunded"), None),
                    Paid::UnknownPayment => (None, None),
                };
                match effect {
                    Some(effect) => {
                        tracing::info!(stripe_event = %payment.reference, account, effect, "stripe payment");
                        let mut answer =
                            json!({"received": true, "account": account, "effect": effect});
                        if let Some(credits) = credits {
                            answer["credits"] = credits.to_json();
                        }
                        answer
                    }
                    None => {
                        let why = "not a payment creditgate granted";
                        tracing::info!(stripe_event = %payment.reference, account, why, "stripe refund ignored");
                        json!({"received": true, "ignored": why})
                    }
                }
            }
        };
        if let Err(e) = self.write_json(session, ctx, 200, answer).await {
            tracing::debug!(request_id = %ctx.request_id, "could not write the answer: {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(secret: &str, t: u64, payload: &[u8]) -> String {
        format!(
            "t={t},v1={}",
            hex::encode(signature(secret.as_bytes(), t, payload))
        )
    }

    #[test]
    fn a_signature_verifies_as_stripe_specifies() {
        let body = br#"{"id":"evt_1"}"#;
        let now = 1_700_000_000;
        let good = header("whsec_x", now, body);
        assert_eq!(verify("whsec_x", Some(&good), body, now), Ok(()));
        // Several v1 (a rotation), a v0 beside them: any v1 may match.
        let several = format!(
            "t={now},v0=00,v1=abcd,{}",
            &good[good.find("v1=").unwrap()..]
        );
        assert_eq!(verify("whsec_x", Some(&several), body, now), Ok(()));
        assert_eq!(
            verify("whsec_x", None, body, now),
            Err(SignatureError::Missing)
        );
        for malformed in ["", "v1=ab", "t=x,v1=ab", "t=1,t=2,v1=ab", "t=1", "garbage"] {
            assert_eq!(
                verify("whsec_x", Some(malformed), body, 1),
                Err(SignatureError::Malformed),
                "{malformed}"
            );
        }
        assert_eq!(
            verify("whsec_other", Some(&good), body, now),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            verify("whsec_x", Some(&good), br#"{"id":"evt_2"}"#, now),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(verify("whsec_x", Some(&good), body, now + 300), Ok(()));
        assert_eq!(
            verify("whsec_x", Some(&good), body, now + 301),
            Err(SignatureError::OutsideTolerance)
        );
        assert_eq!(
            verify("whsec_x", Some(&good), body, now - 301),
            Err(SignatureError::OutsideTolerance)
        );
    }
}
