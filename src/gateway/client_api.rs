//! The client APIs on the gateway listener, authenticated by the client's own key:
//! `GET /credits/v1/balance` and `POST /credits/v1/quote`.
//!
//! A quote runs the very `evaluate` a real request runs (match, entitle, price),
//! so what it says is what the request will be held.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use pingora::proxy::Session;
use serde::Deserialize;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::{body, Gateway, RequestCtx};
use crate::policy::RequestFacts;
use crate::store::StoreError;
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

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::UnknownAccount(_) => ApiError::InvalidApiKey,
        StoreError::Unavailable(_) => ApiError::StoreUnavailable,
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
                self.quote_json(ctx, quote).await?
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
            .map_err(store_error)?;
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
            .map_err(store_error)?;
        Ok(views::ledger(&entries, limit))
    }

    async fn quote_json(&self, ctx: &RequestCtx, quote: QuoteRequest) -> Result<Value, ApiError> {
        let Some(identity) = &ctx.identity else {
            return Err(ApiError::MissingApiKey);
        };
        let method = Method::from_bytes(quote.method.as_bytes())
            .map_err(|_| invalid(format!("{:?} is not an HTTP method", quote.method)))?;
        let uri: http::Uri = quote
            .path
            .parse()
            .map_err(|_| invalid(format!("{:?} is not a path", quote.path)))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &quote.headers {
            let name = HeaderName::try_from(name.as_str())
                .map_err(|_| invalid(format!("{name:?} is not a header name")))?;
            let value = HeaderValue::try_from(value.as_str())
                .map_err(|_| invalid(format!("the value of {name} is not a header value")))?;
            headers.insert(name, value);
        }
        let json_body = quote
            .body
            .ok_or_else(|| "the request has no body".to_string());
        let totals = self
            .store
            .totals(&identity.account, self.now_ms())
            .await
            .map_err(store_error)?;
        let refused = |error: ApiError, operation: Option<&str>, credits: Option<Value>| {
            json!({"allowed": false, "operation": operation, "credits": credits,
                   "available": totals.available.to_json(), "error": error.body(&ctx.request_id)["error"]})
        };
        let Some(route) = self.policy.route(uri.path()) else {
            return Ok(refused(ApiError::UnknownOperation, None, None));
        };
        let facts = RequestFacts {
            method: &method,
            headers: &headers,
            query: uri.query(),
            path_params: &route.path_params,
            body: route.needs_body.then_some(&json_body),
        };
        let (index, price) = match self.evaluate(identity, &route, &facts) {
            Ok(priced) => priced,
            Err(error) => {
                let operation = self
                    .policy
                    .select(&route, &facts)
                    .map(|i| self.policy.operations[i].name.as_str());
                return Ok(refused(error, operation, None));
            }
        };
        let operation = self.policy.operations[index].name.as_str();
        if price > totals.available {
            let error = ApiError::InsufficientCredits {
                operation: operation.to_string(),
                required: price,
                available: totals.available,
                held: totals.held,
                plan: identity.plan.clone(),
                upgrade_url: self.policy.gateway.upgrade_url.clone(),
            };
            return Ok(refused(error, Some(operation), Some(price.to_json())));
        }
        Ok(
            json!({"allowed": true, "operation": operation, "credits": price.to_json(), "available": totals.available.to_json()}),
        )
    }
}
