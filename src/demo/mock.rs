//! A mock generation backend, steered per request by headers, for the demo and
//! the end-to-end tests:
//!
//! - `x-mock-status: 503`: answer with this status (default 200);
//! - `x-mock-delay-ms: 2000`: wait this long before answering;
//! - `x-mock-body: TEXT`: answer with this body (default: a small JSON result);
//! - `x-mock-fail: reset-before`: reset the connection without answering;
//! - `x-mock-fail: reset-mid-body`: send the headers and half the body, then reset;
//! - `x-mock-usage: 1234`: put `"usage": {"total_tokens": 1234}` in the JSON result
//!   (and in the last event of a stream);
//! - `x-mock-usage-header: 12`: answer with the header `x-usage: 12`;
//! - `x-mock-sse: 100`: stream 100 server-sent events (chunked), each written in
//!   pieces of `x-mock-chunk-bytes` (default 7) so events split at odd places;
//!   with `x-mock-sse-pause-after: 50` the stream waits after 50 events until
//!   [`MockBackend::open_gate`] is called;
//! - `x-mock-resolve: nginx`: resolve the path as nginx does ([`nginx_path`]) and
//!   report it as `"served_path"` in the JSON result — the resource a backend that
//!   decodes and resolves paths itself would serve (`400` when it climbs above the root).
//!
//! It records every request it receives (method, path, headers, body), so tests
//! can check what reached the backend. HTTP/1.1 with keep-alive; request bodies
//! with Content-Length or chunked. Small and strict, not a general server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

/// Requests remembered for `received()`, newest kept.
const RECEIVED_KEPT: usize = 10_000;

/// Largest request head and body the mock accepts.
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// A request as the backend received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct MockBackend {
    pub addr: SocketAddr,
    /// `None`: the mock records nothing (the demo, benches, `creditgate mock-backend`).
    received: Option<Arc<Mutex<std::collections::VecDeque<Received>>>>,
    gate: Arc<Notify>,
    stop: watch::Sender<bool>,
}

impl MockBackend {
    /// Serves on `listener` until dropped.
    /// Serves on `listener` until dropped, remembering the last requests for
    /// [`MockBackend::received`] (tests).
    pub fn start(listener: TcpListener) -> std::io::Result<MockBackend> {
        MockBackend::serve(listener, true)
    }

    /// Serves on `listener` until dropped, remembering nothing (the demo, benches,
    /// `creditgate mock-backend`): a long-running mock must not grow.
    pub fn start_without_recording(listener: TcpListener) -> std::io::Result<MockBackend> {
        MockBackend::serve(listener, false)
    }

    fn serve(listener: TcpListener, record: bool) -> std::io::Result<MockBackend> {
        let addr = listener.local_addr()?;
        let received = record.then(|| Arc::new(Mutex::new(std::collections::VecDeque::new())));
        let (stop, mut stopped) = watch::channel(false);
        let log = received.clone();
        let gate = Arc::new(Notify::new());
        let paused = gate.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stopped.changed() => return,
                };
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(serve_connection(stream, log.clone(), paused.clone()));
                }
            }
        });
        Ok(MockBackend {
            addr,
            received,
            gate,
            stop,
        })
    }

    /// Lets a stream paused by `x-mock-sse-pause-after` go on.
    pub fn open_gate(&self) {
        self.gate.notify_one();
    }

    /// The requests received so far (the last 10,000), oldest first; empty when
    /// the mock does not record.
    pub fn received(&self) -> Vec<Received> {
        self.received
            .as_ref()
            .and_then(|r| r.lock().ok().map(|r| r.iter().cloned().collect()))
            .unwrap_or_default()
    }
}

impl Drop for MockBackend {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    log: Option<Arc<Mutex<std::collections::VecDeque<Received>>>>,
    gate: Arc<Notify>,
) {
    let mut buffer = Vec::with_capacity(4096);
    loop {
        let Some(request) = read_request(&mut stream, &mut buffer).await else {
            return;
        };
        if let Some(Ok(mut log)) = log.as_ref().map(|l| l.lock()) {
            if log.len() >= RECEIVED_KEPT {
                log.pop_front();
            }
            log.push_back(request.clone());
        }
        if !respond(&mut stream, &request, &gate).await {
            return;
        }
    }
}

/// Reads one request; `None` on EOF or anything malformed.
async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Received> {
    let head_len = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buffer.len() > MAX_HEAD_BYTES || !fill(stream, buffer).await {
            return None;
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    parsed.parse(&buffer[..head_len]).ok()?;
    let method = parsed.method?.to_string();
    let path = parsed.path?.to_string();
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    buffer.drain(..head_len);
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let body = if find("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        read_chunked(stream, buffer).await?
    } else {
        let length: usize = find("content-length").map_or(Some(0), |v| v.trim().parse().ok())?;
        if length > MAX_BODY_BYTES {
            return None;
        }
        while buffer.len() < length {
            if !fill(stream, buffer).await {
                return None;
            }
        }
        buffer.drain(..length).collect()
    };
    Some(Received {
        method,
        path,
        headers,
        body,
    })
}

async fn read_chunked(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(at) = buffer.windows(2).position(|w| w == b"\r\n") {
                break at;
            }
            if !fill(stream, buffer).await {
                return None;
            }
        };
        let size_text = std::str::from_utf8(&buffer[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        buffer.drain(..line_end + 2);
        if body.len() + size > MAX_BODY_BYTES {
            return None;
        }
        // The chunk, then its CRLF (for the last chunk: the CRLF ending the trailers).
        while buffer.len() < size + 2 {
            if !fill(stream, buffer).await {
                return None;
            }
        }
        body.extend(buffer.drain(..size));
        buffer.drain(..2);
        if size == 0 {
            return Some(body);
        }
    }
}

async fn fill(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buffer.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// Answers as the request's `x-mock-*` headers say; false when the connection is done.
async fn respond(stream: &mut TcpStream, request: &Received, gate: &Notify) -> bool {
    if let Some(ms) = request
        .header("x-mock-delay-ms")
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms.min(600_000))).await;
    }
    let fail = request.header("x-mock-fail").unwrap_or("");
    if fail == "reset-before" {
        reset(stream);
        return false;
    }
    let status: u16 = request
        .header("x-mock-status")
        .and_then(|v| v.parse().ok())
        .filter(|s| (200..=599).contains(s))
        .unwrap_or(200);
    let usage = request
        .header("x-mock-usage")
        .and_then(|v| v.parse::<u64>().ok());
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Status");
    if let Some(events) = request
        .header("x-mock-sse")
        .and_then(|v| v.parse::<usize>().ok())
    {
        let shape = Stream {
            status,
            reason,
            events,
            usage,
            fail,
        };
        return stream_events(stream, request, gate, shape).await;
    }
    let served_path = if request.header("x-mock-resolve") == Some("nginx") {
        let target = request.path.split('?').next().unwrap_or_default();
        match nginx_path(target) {
            Some(path) => {
                let path = String::from_utf8_lossy(&path).into_owned();
                format!(",\"served_path\":{}", serde_json::Value::String(path))
            }
            None => {
                let body = "{\"error\":\"the path climbs above the root\"}";
                let head = format!("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len());
                return stream
                    .write_all(format!("{head}{body}").as_bytes())
                    .await
                    .is_ok();
            }
        }
    } else {
        String::new()
    };
    let usage_header = request
        .header("x-mock-usage-header")
        .map_or(String::new(), |v| format!("x-usage: {v}\r\n"));
    let usage_json = usage.map_or(String::new(), |u| {
        format!(",\"usage\":{{\"total_tokens\":{u}}}")
    });
    let body = match request.header("x-mock-body") {
        Some(body) => body.to_string(),
        None if status < 300 => format!(
            "{{\"id\":\"gen_{:016x}\",\"status\":\"succeeded\",\"path\":{:?}{served_path}{usage_json}}}",
            rand::random::<u64>(),
            request.path
        ),
        None => format!("{{\"error\":\"mock backend failure\",\"status\":{status}}}"),
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{usage_header}content-length: {}\r\n\r\n",
        body.len()
    );
    if fail == "reset-mid-body" {
        let half = &body.as_bytes()[..body.len() / 2];
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(half).await;
        let _ = stream.flush().await;
        // Give the proxy a moment to read the partial body before the reset.
        tokio::time::sleep(Duration::from_millis(50)).await;
        reset(stream);
        return false;
    }
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    stream.write_all(&out).await.is_ok()
}

/// Streams `events` server-sent events with chunked framing, each event in small
/// pieces; the last event carries the usage. Returns false when the connection is done.
struct Stream<'a> {
    status: u16,
    reason: &'a str,
    events: usize,
    usage: Option<u64>,
    fail: &'a str,
}

async fn stream_events(
    stream: &mut TcpStream,
    request: &Received,
    gate: &Notify,
    shape: Stream<'_>,
) -> bool {
    let Stream {
        status,
        reason,
        events,
        usage,
        fail,
    } = shape;
    let piece_bytes = request
        .header("x-mock-chunk-bytes")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(7)
        .max(1);
    let pause_after = request
        .header("x-mock-sse-pause-after")
        .and_then(|v| v.parse::<usize>().ok());
    let head = format!("HTTP/1.1 {status} {reason}\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n");
    if stream.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    for i in 0..events {
        if pause_after == Some(i) {
            gate.notified().await;
        }
        if fail == "reset-mid-body" && i == events / 2 {
            let _ = stream.flush().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            reset(stream);
            return false;
        }
        let event = match usage {
            Some(u) if i + 1 == events => {
                format!("data: {{\"i\":{i},\"usage\":{{\"total_tokens\":{u}}}}}\n\n")
            }
            _ => format!("data: {{\"i\":{i},\"delta\":\"token {i}\"}}\n\n"),
        };
        for piece in event.as_bytes().chunks(piece_bytes) {
            let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
            chunk.extend_from_slice(piece);
            chunk.extend_from_slice(b"\r\n");
            if stream.write_all(&chunk).await.is_err() {
                return false;
            }
        }
        let _ = stream.flush().await;
    }
    stream.write_all(b"0\r\n\r\n").await.is_ok()
}

/// The path nginx would serve for a request path (without its query): every
/// percent-escape decoded — `%2F` into a separator too —, repeated slashes merged,
/// then `.` and `..` segments resolved. `None` where nginx answers 400: a `..` above
/// the root, or a `%` not followed by two hex digits. Tests use it as the backend
/// that reads a path differently from a gateway that matches it raw.
pub fn nginx_path(path: &str) -> Option<Vec<u8>> {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            decoded.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    let mut segments: Vec<&[u8]> = Vec::new();
    let parts: Vec<&[u8]> = decoded.split(|&b| b == b'/').skip(1).collect();
    let mut trailing_slash = false;
    for (n, part) in parts.iter().enumerate() {
        let last = n + 1 == parts.len();
        match *part {
            b"" => trailing_slash = last,
            b"." => trailing_slash = last,
            b".." => {
                segments.pop()?;
                trailing_slash = last;
            }
            segment => {
                segments.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = Vec::with_capacity(decoded.len());
    for segment in &segments {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    if trailing_slash || segments.is_empty() {
        out.push(b'/');
    }
    Some(out)
}

/// Closes with RST instead of FIN.
fn reset(stream: &mut TcpStream) {
    let _ = stream.set_zero_linger();
}
