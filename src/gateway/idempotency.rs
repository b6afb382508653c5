//! Idempotency keys: what identifies a request for its `Idempotency-Key` (the
//! key and a fingerprint of the request), and the recorder that keeps a settled
//! request's response so a repeat is answered from it.
//!
//! The record itself lives in the account's state, checked and started by the hold
//! in the same atomic step (`ledger::IdempotencyRequest`); replays are written by
//! `responses.rs`.

use pingora::http::{RequestHeader, ResponseHeader};
use sha2::{Digest, Sha256};

use super::errors::ApiError;
use super::request::target_parts;
use super::{Gateway, RequestCtx};
use crate::ledger::{IdempotencyRequest, Recorded, IDEMPOTENCY_KEY_MAX_BYTES};
use crate::policy::NormalizedPath;

/// The request's `Idempotency-Key` and its fingerprint: method, normalized path and
/// query, and the body — its bytes when the gateway read them, else its declared length.
pub(super) fn idempotency_of(
    req: &RequestHeader,
    path: &NormalizedPath,
    body: Option<&[u8]>,
    ttl_ms: u64,
) -> std::result::Result<Option<IdempotencyRequest>, ApiError> {
    let Some(value) = req.headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value.to_str().ok().map(str::trim).filter(|k| {
        !k.is_empty()
            && k.len() <= IDEMPOTENCY_KEY_MAX_BYTES
            && k.bytes().all(|b| b.is_ascii_graphic())
    });
    let Some(key) = key else {
        return Err(ApiError::InvalidRequest {
            source: "header:idempotency-key".into(),
            message: format!("must be 1 to {IDEMPOTENCY_KEY_MAX_BYTES} visible ASCII characters"),
        });
    };
    let mut hash = Sha256::new();
    hash.update(req.method.as_str());
    hash.update(b"\n");
    hash.update(path.as_str());
    hash.update(target_parts(req.raw_path()).map_or(&[][..], |t| t.query));
    hash.update(b"\n");
    match body {
        Some(bytes) => hash.update(bytes),
        None => hash.update(
            req.headers
                .get(http::header::CONTENT_LENGTH)
                .map_or(&b"-"[..], |v| v.as_bytes()),
        ),
    }
    Ok(Some(IdempotencyRequest {
        key: key.to_string(),
        fingerprint: hex::encode(hash.finalize()),
        ttl_ms,
    }))
}

/// Keeps an idempotent request's response (up to a limit) for replay.
pub(super) struct Recorder {
    key: String,
    status: u16,
    content_type: Option<String>,
    body: Vec<u8>,
    max_bytes: usize,
    too_large: bool,
}

impl Recorder {
    pub(super) fn new(key: String, max_bytes: usize) -> Self {
        Recorder {
            key,
            status: 0,
            content_type: None,
            body: Vec::new(),
            max_bytes,
            too_large: false,
        }
    }

    pub(super) fn head(&mut self, status: u16, response: &ResponseHeader) {
        self.status = status;
        self.content_type = response
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
    }

    pub(super) fn body(&mut self, chunk: &[u8]) {
        if self.too_large || self.body.len() + chunk.len() > self.max_bytes {
            self.too_large = true;
            self.body = Vec::new();
        } else {
            self.body.extend_from_slice(chunk);
        }
    }

    pub(super) fn finish(self) -> (String, Recorded) {
        let body = if self.too_large {
            None
        } else {
            String::from_utf8(self.body).ok()
        };
        (
            self.key,
            Recorded {
                status: self.status,
                content_type: self.content_type,
                body,
            },
        )
    }
}

impl Gateway {
    /// After a settle: attaches the response the recorder kept to the request's
    /// idempotency record, so a repeat is answered from it. A failure only costs the
    /// replay: the repeat then gets `409 idempotency_replay_unavailable`, never a
    /// second charge.
    pub(super) async fn record_response(&self, ctx: &mut RequestCtx) {
        let (Some(recorder), Some(identity)) = (ctx.recorder.take(), &ctx.identity) else {
            return;
        };
        let (key, recorded) = recorder.finish();
        let call = self
            .store
            .record_response(&identity.account, &key, &recorded, self.now_ms());
        if let Err(e) = self.metrics.store(call).await {
            tracing::warn!(request_id = %ctx.request_id, "the response for idempotency could not be recorded: {e}");
        }
    }
}
