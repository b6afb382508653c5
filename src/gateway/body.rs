//! Reading a request body before the hold, and forwarding it intact afterwards.
//!
//! Pingora 0.9 forwards a request body from what it reads off the client socket,
//! or from its retry buffer — which holds only 64 KiB (`BODY_BUF_LIMIT`) and,
//! past that, silently sends nothing. A body we read completely to price it is
//! therefore handed back this way (each step verified by experiment on Pingora 0.9.1):
//!
//! 1. [`read_all`] answers `Expect: 100-continue`, reads the whole body (decoding
//!    chunked framing) up to the limit.
//! 2. [`rearm`] re-parses the request head from memory with a one-byte
//!    `Content-Length: 1` placeholder body, reads that byte into the retry buffer,
//!    and restores keep-alive — so Pingora believes there is a small, buffered body.
//! 3. [`swap_in`], called from `request_body_filter`, replaces the placeholder with
//!    the real body on the last call of each upstream attempt (so retries work),
//!    and `upstream_request_filter` sets the real `Content-Length`.
//!
//! An answer written before the body was read (401, 404, 413, …) is followed by
//! [`linger`], which reads and discards the rest of the body, bounded, before the
//! connection closes (see its docs).
//!
//! The end-to-end tests in `tests/it/metering.rs` that send multi-MiB Content-Length,
//! chunked and `Expect` bodies and compare what the backend got byte for byte guard these internals
//! across Pingora upgrades. HTTP/2 clients cannot be re-armed; the gateway refuses
//! body-priced requests from them with a clear error (the listener speaks HTTP/1).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;

/// Why a body could not be read.
#[derive(Debug)]
pub(super) enum BodyError {
    TooLarge,
    /// The client is not HTTP/1 (bodies cannot be re-armed there).
    NotHttp1,
    /// The client sent a broken body or went away.
    Read(String),
}

/// Reads the complete request body, refusing more than `limit` bytes.
pub(super) async fn read_all(session: &mut Session, limit: usize) -> Result<Bytes, BodyError> {
    if !matches!(session.as_downstream(), ServerSession::H1(_)) {
        return Err(BodyError::NotHttp1);
    }
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        // Pingora never answers it itself; without this the client waits ~1 s.
        session
            .as_downstream_mut()
            .write_continue_response()
            .await
            .map_err(|e| BodyError::Read(e.to_string()))?;
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(|e| BodyError::Read(e.to_string()))?
    {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Makes Pingora forward a body that [`read_all`] already consumed (see the module docs).
pub(super) async fn rearm(session: &mut Session) -> Result<(), String> {
    let keepalive = session.get_keepalive();
    let ServerSession::H1(h1) = session.as_downstream_mut() else {
        return Err("not an HTTP/1 session".into());
    };
    let raw = h1.get_headers_raw_bytes();
    let mut head = BytesMut::with_capacity(raw.len() + 24);
    for line in raw.split(|&b| b == b'\n') {
        let trimmed = line.strip_suffix(b"\r").unwrap_or(line);
        if trimmed.is_empty() {
            continue;
        }
        let name = trimmed.split(|&b| b == b':').next().unwrap_or_default();
        let framing = [&b"content-length"[..], b"transfer-encoding", b"expect"];
        if framing.iter().any(|f| name.eq_ignore_ascii_case(f)) {
            continue;
        }
        head.extend_from_slice(trimmed);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"Content-Length: 1\r\n\r\n\0");
    h1.set_pipelined_prefix(head);
    match h1.read_request().await {
        Ok(Some(_)) => {}
        Ok(None) => return Err("the re-armed request did not parse".into()),
        Err(e) => return Err(format!("the re-armed request did not parse: {e}")),
    }
    session.enable_retry_buffering();
    while session
        .read_request_body()
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {}
    session.set_keepalive(keepalive);
    Ok(())
}

/// In `request_body_filter`: the real body goes out on the last call of each
/// upstream attempt; the placeholder byte never does.
pub(super) fn swap_in(saved: &Bytes, body: &mut Option<Bytes>, end_of_stream: bool) {
    *body = end_of_stream.then(|| saved.clone());
}

/// Most request-body bytes [`linger`] reads and throws away after an early answer.
/// A client sending more than this after its answer loses the answer to the reset;
/// one sending less (up to twice the default `max_body_bytes`) can read it.
pub const LINGER_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Longest [`linger`] waits for the next piece of the body (nginx's
/// `lingering_timeout`): a client that stopped sending is not waited for.
pub const LINGER_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest [`linger`] lasts in all (nginx's `lingering_time`), however slowly the
/// client trickles its body.
pub const LINGER_TIME: Duration = Duration::from_secs(30);

/// How [`linger`] ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Lingered {
    /// The whole body was read: the connection closes cleanly.
    Drained { bytes: usize },
    /// More than [`LINGER_MAX_BYTES`] came.
    TooMuch,
    /// The client paused longer than [`LINGER_IDLE_TIMEOUT`], or the whole took
    /// longer than [`LINGER_TIME`].
    TimedOut,
    /// The client closed or sent a broken body.
    Broken,
}

/// After an answer written before the request body was read, reads and discards the
/// rest of the body before the connection closes — what nginx calls a lingering close.
///
/// Closing a socket whose receive buffer still holds unread bytes makes the kernel
/// reset the connection, and a client still sending (Python's http.client and many
/// SDKs write the whole body before they read) then sees a broken pipe or a reset
/// instead of the answer. Draining lets the body end and the close be orderly. It
/// is bounded in bytes ([`LINGER_MAX_BYTES`]), per read ([`LINGER_IDLE_TIMEOUT`]) and
/// in all ([`LINGER_TIME`]): Pingora's own `drain_request_body` has no byte limit and,
/// by default, no deadline. The caller holds no credits meanwhile (answers before
/// admission hold nothing) and has turned keep-alive off: the connection closes
/// after this whatever happened.
pub(super) async fn linger(session: &mut Session) -> Lingered {
    let downstream = session.as_downstream_mut();
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut bytes = 0usize;
    loop {
        let next_read = (tokio::time::Instant::now() + LINGER_IDLE_TIMEOUT).min(deadline);
        match tokio::time::timeout_at(next_read, downstream.read_request_body()).await {
            Err(_) => return Lingered::TimedOut,
            Ok(Err(_)) => return Lingered::Broken,
            Ok(Ok(None)) => return Lingered::Drained { bytes },
            Ok(Ok(Some(chunk))) => {
                bytes = bytes.saturating_add(chunk.len());
                if bytes > LINGER_MAX_BYTES {
                    return Lingered::TooMuch;
                }
            }
        }
    }
}
