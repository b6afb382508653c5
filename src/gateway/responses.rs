//! The gateway's own responses: its JSON errors and client-API answers, replays of
//! idempotent requests, and the credit headers every response carries.
//!
//! An answer written with the request body unread closes the connection, after a
//! bounded drain of the body (`body::linger`), so a client still sending can read it.

use bytes::Bytes;
use http::HeaderValue;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use super::errors::ApiError;
use super::{body, Gateway, RequestCtx};
use crate::ledger::{Credits, Recorded};

pub(super) const HEADER_OPERATION: &str = "x-credits-operation";
pub(super) const HEADER_HELD: &str = "x-credits-held";
pub(super) const HEADER_REMAINING: &str = "x-credits-remaining";

pub(super) fn header_value(text: &str) -> HeaderValue {
    // Our own values are ids, amounts and policy names, all valid header text;
    // an invalid one degrades to empty rather than failing the request.
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

pub(super) fn credits_value(credits: Credits) -> HeaderValue {
    header_value(credits.decimal().as_str())
}

impl Gateway {
    /// Writes one of the gateway's own JSON errors, with the credit headers.
    pub(super) async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        error: ApiError,
    ) -> Result<()> {
        ctx.answered = true;
        ctx.outcome = Some(error.kind());
        if let ApiError::StoreFailed { detail } = &error {
            tracing::error!(request_id = %ctx.request_id, "store failure, answered 500: {detail}");
        }
        let body = Bytes::from(error.body(&ctx.request_id).to_string());
        let mut resp = ResponseHeader::build(error.status(), Some(7))?;
        resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        if let Some(seconds) = error.retry_after_s() {
            resp.insert_header(http::header::RETRY_AFTER, seconds.to_string())?;
        }
        self.send(session, ctx, resp, body).await
    }

    /// Answers a repeated idempotent request from its recorded response: charged
    /// nothing, marked `idempotent-replayed: true`.
    pub(super) async fn replay(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        recorded: &Recorded,
    ) -> Result<()> {
        ctx.outcome = Some("replayed");
        let body = Bytes::from(recorded.body.clone().unwrap_or_default());
        let mut resp = ResponseHeader::build(recorded.status, Some(8))?;
        if let Some(content_type) = &recorded.content_type {
            resp.insert_header(http::header::CONTENT_TYPE, header_value(content_type))?;
        }
        resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        resp.insert_header("idempotent-replayed", "true")?;
        self.send(session, ctx, resp, body).await
    }

    /// Writes a JSON response the gateway makes itself, with the credit headers.
    pub(super) async fn write_json(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        status: u16,
        json: serde_json::Value,
    ) -> Result<()> {
        let body = Bytes::from(json.to_string());
        let mut resp = ResponseHeader::build(status, Some(6))?;
        resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        self.send(session, ctx, resp, body).await
    }

    /// Writes a whole response of the gateway's own, with the credit headers.
    async fn send(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        mut resp: ResponseHeader,
        body: Bytes,
    ) -> Result<()> {
        self.add_credit_headers(&mut resp, ctx)?;
        let body_unread = !session.is_body_done();
        if body_unread {
            // The request body was not read: the connection cannot be reused.
            session.set_keepalive(None);
        }
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await?;
        if body_unread {
            self.linger(session, ctx).await;
        }
        Ok(())
    }

    /// After an answer written with the request body unread: drains the rest of it,
    /// bounded (`body::linger`), so a client still sending can read the answer. Never
    /// while a hold is open: the wait is the client's, its credits are not held for it.
    async fn linger(&self, session: &mut Session, ctx: &RequestCtx) {
        if ctx.hold.is_some() {
            return;
        }
        let lingered = body::linger(session).await;
        tracing::debug!(request_id = %ctx.request_id, "after an early answer: {lingered:?}");
    }

    /// `x-request-id` always; for an authenticated request also the operation (if
    /// any), what is held for it now and what remains available.
    pub(super) fn add_credit_headers(
        &self,
        resp: &mut ResponseHeader,
        ctx: &RequestCtx,
    ) -> Result<()> {
        resp.insert_header("x-request-id", ctx.request_id_value.clone())?;
        if ctx.identity.is_none() {
            return Ok(());
        }
        if let Some(op) = ctx.operation {
            resp.insert_header(
                HEADER_OPERATION,
                header_value(&self.policy.operations[op].name),
            )?;
        }
        resp.insert_header(HEADER_HELD, credits_value(ctx.held))?;
        if let Some(remaining) = ctx.remaining {
            resp.insert_header(HEADER_REMAINING, credits_value(remaining))?;
        }
        Ok(())
    }
}
