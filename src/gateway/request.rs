//! What the gateway reads of a request head, and what it rewrites in the one it
//! forwards: the key presented, the facts the policy reads, the request-target's
//! path (normalized before anything reads it), the headers a client may not send.
//!
//! Pure functions of Pingora's request header; no store, no policy decision.

use pingora::http::RequestHeader;
use pingora::protocols::http::authority::{raw_target_authority, RawTargetAuthority};
use pingora::{Error, ErrorType, Result};

use super::errors::ApiError;
use crate::policy::{normalize_path, NormalizedPath, PathError, RequestFacts};

/// What the policy reads of a request: its method, headers, query, path and body
/// (parsed, with its length in bytes).
pub(super) fn request_facts<'a>(
    req: &'a RequestHeader,
    path_params: &'a [(String, String)],
    body: Option<(&'a std::result::Result<serde_json::Value, String>, usize)>,
) -> RequestFacts<'a> {
    RequestFacts {
        method: &req.method,
        headers: &req.headers,
        query: req.uri.query(),
        path_params,
        body: body.map(|(json, _)| json),
        body_bytes: body.map(|(_, bytes)| bytes),
    }
}

/// The key from `Authorization: Bearer KEY` or `x-api-key: KEY`.
pub(super) fn presented_key(req: &RequestHeader) -> Option<&[u8]> {
    if let Some(auth) = req.headers.get(http::header::AUTHORIZATION) {
        let auth = auth.as_bytes();
        let scheme = b"bearer ";
        if auth.len() > scheme.len() && auth[..scheme.len()].eq_ignore_ascii_case(scheme) {
            let key = auth[scheme.len()..].trim_ascii();
            return (!key.is_empty()).then_some(key);
        }
    }
    req.headers
        .get("x-api-key")
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|k| !k.is_empty())
}

/// Headers a client must not be able to send to the backend: its own key, and
/// anything that pretends to come from the gateway.
const STRIPPED_REQUEST_HEADERS: [&str; 6] = [
    "authorization",
    "x-api-key",
    "x-creditgate-account",
    "x-creditgate-plan",
    "x-creditgate-features",
    "x-request-id",
];

/// Whether a request header is one the client may not pass to the backend.
pub(super) fn is_stripped(name: &http::HeaderName) -> bool {
    STRIPPED_REQUEST_HEADERS.contains(&name.as_str())
}

/// A request-target in the parts the gateway reads and rewrites.
pub(super) struct Target<'a> {
    /// `scheme://authority` of an absolute-form target; empty for origin-form.
    pub(super) origin: &'a [u8],
    /// The path as the client sent it; `/` when an absolute-form target has none.
    pub(super) path: &'a [u8],
    /// The query with its `?`, or empty. Never rewritten.
    pub(super) query: &'a [u8],
}

/// Splits a request-target, from its raw bytes (the URI holds a lossy copy of a target
/// that is not UTF-8). `None` for a target without a path: `*`, an authority, or a
/// form Pingora finds ambiguous.
pub(super) fn target_parts(raw: &[u8]) -> Option<Target<'_>> {
    let (origin, rest) = if raw.first() == Some(&b'/') {
        raw.split_at(0)
    } else {
        match raw_target_authority(raw) {
            // The classifier splits on ASCII delimiters: its path and query end the target.
            RawTargetAuthority::Absolute { path_and_query, .. }
                if raw.ends_with(path_and_query) =>
            {
                raw.split_at(raw.len() - path_and_query.len())
            }
            _ => return None,
        }
    };
    let (path, query) = rest.split_at(rest.iter().position(|&b| b == b'?').unwrap_or(rest.len()));
    let path = if path.is_empty() { &b"/"[..] } else { path };
    Some(Target {
        origin,
        path,
        query,
    })
}

/// The request's path, normalized: the only path the gateway matches, prices and forwards.
pub(super) fn request_path(req: &RequestHeader) -> std::result::Result<NormalizedPath, ApiError> {
    let target = target_parts(req.raw_path()).ok_or(PathError::NotAbsolute)?;
    Ok(normalize_path(target.path)?)
}

/// Makes the upstream request carry the normalized path, with the query (and an
/// absolute-form target's scheme and authority) as the client sent them. A target
/// already in normal form is left as it is.
pub(super) fn forward_path(req: &mut RequestHeader, path: &NormalizedPath) -> Result<()> {
    let Some(target) = target_parts(req.raw_path()) else {
        // Unreachable: `admit` refused such a target before choosing to forward it.
        return Error::e_explain(ErrorType::InternalError, "the request target has no path");
    };
    if target.path == path.as_str().as_bytes() {
        return Ok(());
    }
    let mut rewritten =
        Vec::with_capacity(target.origin.len() + path.as_str().len() + target.query.len());
    rewritten.extend_from_slice(target.origin);
    rewritten.extend_from_slice(path.as_str().as_bytes());
    rewritten.extend_from_slice(target.query);
    req.set_raw_path(&rewritten)
}

/// The request body as JSON, or why it is not (the policy then names the value
/// that needed it). `Err` refuses a body whose objects repeat a key: the gateway
/// would price one value and the backend might read another.
pub(super) fn parse_json(
    body: &[u8],
) -> std::result::Result<std::result::Result<serde_json::Value, String>, ApiError> {
    crate::policy::json::parse_body(body).map_err(|duplicate| ApiError::duplicate_key(&duplicate))
}
