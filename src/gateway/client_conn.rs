//! A client connection as the gateway serves it: Pingora's TCP stream, wrapped to
//! bound how long a client may take before a request is admitted, and to answer
//! Pingora's own early refusals in JSON.
//!
//! Pingora's read timeout applies to each read, so a client sending its request
//! head a byte at a time never trips it, and a kept-alive connection waits for its
//! next request forever. Neither may hold a `max_connections` slot for long:
//! - **the head**: from the connection's start (its first request) or a request's
//!   first byte (the next ones) until the gateway's first hook runs, at most
//!   `header_read_timeout`; past it the client gets a JSON `408` and the
//!   connection closes;
//! - **idle between requests**: at most `keepalive_timeout`; past it the
//!   connection closes quietly (to the client, an ordinary keep-alive close).
//!
//! Once a request is admitted, its body reads are bounded by Pingora's own
//! per-read timeout (`body_read_timeout`), and nothing here applies: a request
//! whose hold is placed is never cut by these deadlines.
//!
//! Pingora writes some answers before any hook of the gateway runs — a `400` for a
//! request head it cannot parse, a `405` for `CONNECT` — with an empty body, and
//! its `ProxyHttp` API offers no hook to shape them. Written while no request is
//! admitted, they are recognised here by their status line and replaced by the
//! gateway's JSON error of that status (`invalid_request`, `method_not_allowed`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora::proxy::Session;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;

use super::errors::ApiError;

/// The client-side deadlines of a connection, from the policy.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    pub header_read: Duration,
    pub keepalive: Duration,
}

/// Where a connection's current request is, shared between the stream (which
/// reads and writes) and the gateway's hooks (which know when a request is
/// admitted and when it ended). One number: the request's sequence number times
/// two, plus one while it is admitted — so the stream sees every change, even
/// one that happened between two of its reads.
#[derive(Debug, Default)]
pub struct Progress(AtomicU64);

impl Progress {
    fn admitted(value: u64) -> bool {
        value % 2 == 1
    }

    /// The gateway's first hook runs: the request's head was read.
    fn admit(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (!Progress::admitted(v)).then_some(v + 1)
            });
    }

    /// The request ended: the connection waits for the next one.
    fn end(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Progress::admitted(v).then_some(v + 1)
            });
    }
}

/// Finds the connection of `session` and marks its request admitted.
pub(super) fn admitted(session: &Session) {
    if let Some(progress) = progress_of(session) {
        progress.admit();
    }
}

/// Finds the connection of `session` and marks its request ended.
pub(super) fn ended(session: &Session) {
    if let Some(progress) = progress_of(session) {
        progress.end();
    }
}

fn progress_of(session: &Session) -> Option<&Progress> {
    let stream = session.as_downstream().stream()?;
    let conn = stream.as_any().downcast_ref::<ClientConn>()?;
    Some(&conn.progress)
}

/// What the stream is timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// A request's head, until it is admitted.
    Head,
    /// The next request's first byte.
    Idle,
}

pub struct ClientConn {
    inner: TcpStream,
    progress: Arc<Progress>,
    deadlines: Deadlines,
    /// The `Progress` value the timer was armed for, what it times, and the timer.
    armed: Option<(u64, Wait, Pin<Box<Sleep>>)>,
    /// Whether a byte of the head being timed has been read.
    head_begun: bool,
    /// Bytes of a replaced early refusal not yet written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl std::fmt::Debug for ClientConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConn")
            .field("progress", &self.progress)
            .finish()
    }
}

impl ClientConn {
    pub fn new(inner: TcpStream, deadlines: Deadlines) -> Self {
        let mut conn = ClientConn {
            inner,
            progress: Arc::default(),
            deadlines,
            armed: None,
            head_begun: false,
            replacement: None,
        };
        // The first request's head is timed from the connection's start.
        conn.arm(0, Wait::Head);
        conn
    }

    fn arm(&mut self, progress: u64, wait: Wait) {
        let after = match wait {
            Wait::Head => self.deadlines.header_read,
            Wait::Idle => self.deadlines.keepalive,
        };
        self.armed = Some((progress, wait, Box::pin(tokio::time::sleep(after))));
        self.head_begun = false;
    }

    /// The deadline that applies now, re-armed when the request moved on.
    /// `None` while a request is admitted.
    fn deadline(&mut self) -> Option<Wait> {
        let progress = self.progress.0.load(Ordering::Acquire);
        if Progress::admitted(progress) {
            self.armed = None;
            return None;
        }
        match &self.armed {
            Some((armed_for, wait, _)) if *armed_for == progress => Some(*wait),
            _ => {
                // A request ended since: the connection is idle until the next one.
                self.arm(progress, Wait::Idle);
                Some(Wait::Idle)
            }
        }
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        match self.armed.as_mut() {
            Some((_, _, sleep)) => sleep.as_mut().poll(cx).is_ready(),
            None => false,
        }
    }

    /// Writes what is left of a replaced answer; ready when all of it is written.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = self.replacement.as_mut() {
            if *written >= bytes.len() {
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Takes an answer Pingora writes while no request is admitted (its own early
    /// refusal) and queues the gateway's JSON answer of the same status instead.
    /// Later writes of that answer (its body) are swallowed.
    fn replace(&mut self, written: &[u8]) {
        if self.replacement.is_none() {
            let status = status_of(written).unwrap_or(400);
            self.replacement = Some((early_answer(status), 0));
        }
    }

    /// Whether a write now is Pingora's own early answer: one written after a
    /// request's head began and before any hook admitted it. (Writes after a
    /// request ended and before the next one begins — Pingora finishing the last
    /// response — pass through.)
    fn early(&mut self) -> bool {
        self.replacement.is_some() || (self.deadline() == Some(Wait::Head) && self.head_begun)
    }
}

/// The status code of an HTTP/1 status line at the start of `bytes`.
fn status_of(bytes: &[u8]) -> Option<u16> {
    let line = bytes.strip_prefix(b"HTTP/1.")?;
    let code = line.get(2..5)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// The gateway's JSON answer to a request Pingora refused before any hook ran.
fn early_answer(status: u16) -> Vec<u8> {
    let error = match status {
        405 => ApiError::MethodNotAllowed,
        408 => ApiError::RequestTimeout,
        _ => ApiError::InvalidRequest {
            source: "head".into(),
            message: "is not a valid HTTP/1.1 request head".into(),
        },
    };
    let body = error.body(&super::new_request_id()).to_string();
    let reason = http::StatusCode::from_u16(error.status())
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        error.status(),
        body.len()
    )
    .into_bytes()
}

impl AsyncRead for ClientConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let wait = this.deadline();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    if wait == Some(Wait::Idle) {
                        // The next request's first byte: its head is timed from here.
                        let progress = this.progress.0.load(Ordering::Acquire);
                        this.arm(progress, Wait::Head);
                    }
                    this.head_begun = wait.is_some();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match wait {
                Some(wait) if this.expired(cx) => {
                    this.armed = None;
                    match wait {
                        // Idle too long: an end of stream, which Pingora takes as
                        // the client closing its kept-alive connection.
                        Wait::Idle => Poll::Ready(Ok(())),
                        // The head took too long: answer 408 (written on the
                        // shutdown Pingora does next), then fail the read.
                        Wait::Head => {
                            // (A connection that sent nothing is closed silently.)
                            if this.head_begun {
                                this.replacement = Some((early_answer(408), 0));
                            }
                            Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the request head was not read within header_read_timeout",
                            )))
                        }
                    }
                }
                _ => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for ClientConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.early() {
            this.replace(buf);
            // Written as far as the socket takes it now; flush and shutdown finish it.
            if let Poll::Ready(Err(e)) = this.poll_replacement(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.early() {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            this.replace(&all);
            if let Poll::Ready(Err(e)) = this.poll_replacement(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(all.len()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_replacement(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_replacement(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

#[async_trait]
impl Shutdown for ClientConn {
    async fn shutdown(&mut self) {
        if let Err(e) = AsyncWriteExt::shutdown(self).await {
            tracing::debug!("closing a client connection: {e}");
        }
    }
}

impl UniqueID for ClientConn {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ClientConn {}

#[async_trait]
impl Peek for ClientConn {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl GetTimingDigest for ClientConn {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ClientConn {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for ClientConn {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_line_is_read_and_anything_else_is_not() {
        assert_eq!(status_of(b"HTTP/1.1 400 Bad Request\r\n"), Some(400));
        assert_eq!(status_of(b"HTTP/1.0 405 Method Not Allowed\r\n"), Some(405));
        assert_eq!(status_of(b"HTTP/1.1 4"), None);
        assert_eq!(status_of(b"hello"), None);
    }

    #[test]
    fn an_early_answer_is_a_whole_json_response_with_its_status() {
        for (status, kind) in [
            (400, "invalid_request"),
            (405, "method_not_allowed"),
            (408, "request_timeout"),
        ] {
            let text = String::from_utf8(early_answer(status)).unwrap();
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(
                head.contains(&format!("Content-Length: {}", body.len())),
                "{head}"
            );
            assert!(head.contains("Content-Type: application/json"), "{head}");
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(json["error"]["type"], kind);
            assert_eq!(json["error"]["code"], kind);
        }
    }

    #[test]
    fn progress_moves_admitted_then_ended_once_each() {
        let p = Progress::default();
        p.admit();
        p.admit();
        assert_eq!(p.0.load(Ordering::Relaxed), 1);
        p.end();
        p.end();
        assert_eq!(p.0.load(Ordering::Relaxed), 2);
        assert!(!Progress::admitted(2));
    }
}
