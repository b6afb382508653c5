//! The client APIs on the gateway listener, authenticated by the client's own key:
//! `GET /credits/v1/balance` and `POST /credits/v1/quote`.
//!
//! A quote is a dry run of the request: the very `Policy::evaluate` a real request
//! runs (match, entitle, price), then the hold's own admission check on the hold
//! the request would ask for, placing nothing — so what it says is what the request
//! will be held, or the error it will get.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use pingora::proxy::Session;
use serde::Deserialize;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::{body, places_hold, Gateway, RequestCtx};
use crate::ledger::Credits;
use crate::policy::json::{self, DuplicateKey};
use crate::policy::{
    normalize_path, split_query, Caller, Evaluation, Refused, RequestFacts, Verdict,
};
use crate::views;

pub(super) const PREFIX: &str = "/credits/v1/";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuoteRequest {
    method: String,
    path: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    body: Option<Value>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        source: "quote".into(),
        message: message.into(),
    }
}

impl Gateway {
    pub(super) async fn client_api(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        path: &str,
    ) -> Result<(), ApiError> {
        let method = session.req_header().method.clone();
        let answer = match (method, path) {
            (Method::GET, "/credits/v1/balance") => self.balance_json(ctx).await?,
            (Method::GET, "/credits/v1/ledger") => {
                let query = session.req_header().uri.query().map(str::to_string);
                self.ledger_json(ctx, query.as_deref()).await?
            }
            (Method::POST, "/credits/v1/quote") => {
                let limit = self.policy.gateway.max_body_bytes;
                let bytes = body::read_all(session, limit).await.map_err(|e| match e {
                    body::BodyError::TooLarge => ApiError::RequestTooLarge { limit },
                    _ => invalid("body could not be read"),
                })?;
                let quote: QuoteRequest = serde_json::from_slice(&bytes).map_err(|e| {
                    invalid(format!(
                        "body must be {{\"method\", \"path\", \"headers\"?, \"body\"?}}: {e}"
                    ))
                })?;
                // A key repeated in the quoted body is the request's own error (when
                // the request would read its body); anywhere else, the quote's.
                let duplicate = json::duplicate_key(&bytes).map_err(invalid)?;
                let body_duplicate = match duplicate {
                    None => None,
                    Some(d) => match d.within("body") {
                        Some(in_body) => Some(in_body),
                        None => return Err(invalid(d.to_string())),
                    },
                };
                self.quote_json(ctx, quote, body_duplicate).await?
            }
            _ => return Err(ApiError::UnknownOperation),
        };
        if let Err(e) = self.write_json(session, ctx, 200, answer).await {
            tracing::debug!(request_id = %ctx.request_id, "could not write the answer: {e}");
        }
        Ok(())
    }

    async fn balance_json(&self, ctx: &RequestCtx) -> Result<Value, ApiError> {
        let identity = ctx.identity.as_ref().ok_or(ApiError::MissingApiKey)?;
        let account = self
            .store
            .account(&identity.account, self.now_ms())
            .await
            .map_err(ApiError::store)?;
        Ok(views::balance(&account))
    }

    /// The caller's own account's ledger, newest first.
    async fn ledger_json(&self, ctx: &RequestCtx, query: Option<&str>) -> Result<Value, ApiError> {
        let identity = ctx.identity.as_ref().ok_or(ApiError::MissingApiKey)?;
        let (limit, cursor) = views::page_params(query).map_err(|e| ApiError::InvalidRequest {
            source: "query".into(),
            message: e,
        })?;
        let entries = self
            .store
            .ledger(&identity.account, limit, cursor, self.now_ms())
            .await
            .map_err(ApiError::store)?;
        Ok(views::ledger(&entries, limit))
    }

    /// What the request would get, read-only: `Policy::evaluate` (as a real request
    /// runs it: without the body first, then with it if a step needs it, refusing
    /// a body that repeats a key), then — for a request that places a hold — the
    /// hold's own admission check as a dry run ([`Store::quote`]) on the very
    /// request the hold would send ([`Gateway::hold_request`]): who asks, quota,
    /// balance, open holds, against the account as it is now. Nothing is held.
    ///
    /// [`Store::quote`]: crate::store::Store::quote
    async fn quote_json(
        &self,
        ctx: &RequestCtx,
        quote: QuoteRequest,
        body_duplicate: Option<DuplicateKey>,
    ) -> Result<Value, ApiError> {
        let Some(identity) = &ctx.identity else {
            return Err(ApiError::MissingApiKey);
        };
        let method = Method::from_bytes(quote.method.as_bytes())
            .map_err(|_| invalid(format!("{:?} is not an HTTP method", quote.method)))?;
        let (path, query) = split_query(&quote.path);
        let mut headers = HeaderMap::new();
        for (name, value) in &quote.headers {
            let name = HeaderName::try_from(name.as_str())
                .map_err(|_| invalid(format!("{name:?} is not a header name")))?;
            let value = HeaderValue::try_from(value.as_str())
                .map_err(|_| invalid(format!("the value of {name} is not a header value")))?;
            headers.insert(name, value);
        }
        // The quoted body's length as a client sends it: compact JSON.
        let body_bytes = quote.body.as_ref().map_or(0, |b| b.to_string().len());
        let json_body = quote
            .body
            .ok_or_else(|| "the request has no body".to_string());
        let answer = Answer {
            request_id: &ctx.request_id,
        };
        // The path is normalized as the gateway normalizes it; a path it refuses is
        // the quoted request's own error, like any other.
        let path = match normalize_path(path.as_bytes()) {
            Ok(path) => path,
            Err(e) => {
                let available = self.quote_available(&identity.account).await?;
                return Ok(answer.refused(available, None, None, e.into()));
            }
        };
        let route = self.policy.route(&path);
        let mut facts = RequestFacts {
            method: &method,
            headers: &headers,
            query,
            path_params: route.as_ref().map_or(&[][..], |r| r.path_params.as_slice()),
            body: None,
            body_bytes: None,
        };
        let caller = Caller {
            plan: &identity.plan,
            premium_disabled: identity.premium_disabled,
            disabled_features: &identity.disabled_features,
        };
        let verdict = match self.policy.evaluate(route.as_ref(), &facts, Some(&caller)) {
            Evaluation::Decided(verdict) => verdict,
            Evaluation::NeedsBody => {
                if let Some(duplicate) = &body_duplicate {
                    let available = self.quote_available(&identity.account).await?;
                    let error = ApiError::duplicate_key(duplicate);
                    return Ok(answer.refused(available, None, None, error));
                }
                facts.body = Some(&json_body);
                facts.body_bytes = Some(body_bytes);
                match self.policy.evaluate(route.as_ref(), &facts, Some(&caller)) {
                    Evaluation::Decided(verdict) => verdict,
                    // Unreachable: with the body given, every step can decide.
                    Evaluation::NeedsBody => return Err(ApiError::Internal),
                }
            }
        };
        let (index, price, quota_units) = match verdict {
            Ok(Verdict::Operation {
                index,
                price,
                quota_units,
            }) => (index, price, quota_units),
            // `unmatched = "allow"`: forwarded free, as no operation.
            Ok(Verdict::PassThrough { .. }) => {
                let available = self.quote_available(&identity.account).await?;
                return Ok(json!({"allowed": true, "operation": null, "credits": 0,
                                 "available": available.to_json(), "pass_through": true}));
            }
            Err(refusal) => {
                let operation = match &refusal {
                    Refused::PlanRequired { operation, .. }
                    | Refused::PremiumDisabled { operation }
                    | Refused::FeatureDisabled { operation, .. } => Some(*operation),
                    Refused::InvalidRequest(_) => {
                        route.as_ref().and_then(|r| self.policy.select(r, &facts))
                    }
                    Refused::UnknownOperation => None,
                };
                let operation = operation.map(|i| self.policy.operations[i].name.as_str());
                let available = self.quote_available(&identity.account).await?;
                let error = ApiError::refused(&self.policy, refusal);
                return Ok(answer.refused(available, operation, None, error));
            }
        };
        let op = &self.policy.operations[index];
        let operation = Some(op.name.as_str());
        // A request that places no hold is not asked anything more by the store.
        if !places_hold(op, price) {
            let available = self.quote_available(&identity.account).await?;
            return Ok(answer.allowed(available, operation, price));
        }
        // The quote has no `Idempotency-Key`: it is not the request, only its question.
        let request =
            self.hold_request(identity, index, (price, quota_units), &ctx.request_id, None);
        let quoted = self
            .store
            .quote(&identity.account, &request, self.now_ms())
            .await
            .map_err(ApiError::store)?;
        let estimate = op.price_is_estimate();
        Ok(match quoted.admitted {
            Ok(held) => {
                let mut allowed = answer.allowed(quoted.available, operation, price);
                // Only when they say something: a hold of less than the price
                // (`hold = "available"`), a price that is an estimate.
                if held != price {
                    allowed["held"] = held.to_json();
                }
                if estimate {
                    allowed["estimate"] = json!(true);
                }
                allowed
            }
            Err(rejection) => {
                let error = ApiError::rejected(&self.policy, index, rejection, &identity.plan);
                answer.refused(quoted.available, operation, Some(price), error)
            }
        })
    }

    /// The caller's available credits, for a quote the store is not asked to admit.
    async fn quote_available(&self, account: &str) -> Result<Credits, ApiError> {
        let totals = self
            .store
            .totals(account, self.now_ms())
            .await
            .map_err(ApiError::store)?;
        Ok(totals.available)
    }
}

/// The two shapes of a quote's answer.
struct Answer<'a> {
    request_id: &'a str,
}

impl Answer<'_> {
    fn allowed(&self, available: Credits, operation: Option<&str>, credits: Credits) -> Value {
        json!({"allowed": true, "operation": operation, "credits": credits.to_json(),
               "available": available.to_json()})
    }

    /// `error` is exactly what the request would be answered.
    fn refused(
        &self,
        available: Credits,
        operation: Option<&str>,
        credits: Option<Credits>,
        error: ApiError,
    ) -> Value {
        json!({"allowed": false, "operation": operation, "credits": credits.map(Credits::to_json),
               "available": available.to_json(), "error": error.body(self.request_id)["error"]})
    }
}
