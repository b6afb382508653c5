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
//! A JSON request with a `"model"` to an OpenAI path is answered as OpenAI's API
//! answers it (see [`openai`]): `/v1/chat/completions` (a completion, or with
//! `"stream": true` an event stream of chunks, its usage in a last chunk when
//! `stream_options.include_usage` is set — in every chunk with vLLM's
//! `continuous_usage_stats`), `/v1/embeddings`, `/v1/images/generations` (`n`
//! images) and `/v1/videos`. Token counts: `x-mock-prompt-tokens` (default: the
//! body's bytes / 4, rounded up) and `x-mock-completion-tokens` (default 17);
//! `x-mock-sse-pause-after` pauses a stream as above.
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
    // `x-mock-body` says what to answer, whatever the path.
    let openai = request
        .header("x-mock-body")
        .is_none()
        .then(|| openai::answer(request))
        .flatten();
    if let Some(answer) = openai {
        return openai::send(stream, request, gate, answer).await;
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

/// OpenAI-shaped answers, for the examples of LLM, image and video pricing and
/// for the OpenAI SDK as a client.
pub mod openai {
    use serde_json::{json, Value};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    use tokio::sync::Notify;

    use super::Received;

    /// What to send back.
    pub enum Answer {
        Json(Value),
        /// A chat completion as a stream of chunks.
        Stream {
            tokens: u64,
            usage: Value,
            include_usage: bool,
            continuous: bool,
            model: String,
        },
    }

    fn count(request: &Received, header: &str, default: u64) -> u64 {
        request
            .header(header)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(default)
    }

    /// The answer to an OpenAI-shaped request, or `None` for any other.
    pub fn answer(request: &Received) -> Option<Answer> {
        let path = request.path.split('?').next().unwrap_or_default();
        let body: Value = serde_json::from_slice(&request.body).ok()?;
        let model = body.get("model")?.as_str()?.to_string();
        let prompt = count(
            request,
            "x-mock-prompt-tokens",
            (request.body.len() as u64).div_ceil(4),
        );
        let completion = count(request, "x-mock-completion-tokens", 17);
        let id = format!("{:016x}", rand::random::<u64>());
        Some(match path {
            "/v1/chat/completions" => {
                let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion,
                                   "total_tokens": prompt + completion});
                if body.get("stream") == Some(&Value::Bool(true)) {
                    let option = |name: &str| {
                        body.pointer(&format!("/stream_options/{name}")) == Some(&Value::Bool(true))
                    };
                    Answer::Stream {
                        tokens: completion,
                        usage,
                        include_usage: option("include_usage"),
                        continuous: option("continuous_usage_stats"),
                        model,
                    }
                } else {
                    let words = vec!["token"; completion.min(64) as usize].join(" ");
                    Answer::Json(json!({
                        "id": format!("chatcmpl-{id}"), "object": "chat.completion",
                        "created": 1_700_000_000, "model": model,
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": words}}],
                        "usage": usage,
                    }))
                }
            }
            "/v1/embeddings" => Answer::Json(json!({
                "object": "list", "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 0.125]}],
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
            })),
            "/v1/images/generations" => {
                let n = body.get("n").and_then(Value::as_u64).unwrap_or(1).min(10);
                let data: Vec<Value> = (0..n)
                    .map(|i| json!({"url": format!("https://images.example/{id}/{i}.png")}))
                    .collect();
                Answer::Json(json!({"created": 1_700_000_000, "data": data}))
            }
            "/v1/videos" => Answer::Json(json!({
                "id": format!("video_{id}"), "object": "video", "model": model,
                "status": "queued", "progress": 0,
                "seconds": body.get("seconds").cloned().unwrap_or(json!("4")),
                "size": body.get("size").cloned().unwrap_or(json!("720x1280")),
            })),
            _ => return None,
        })
    }

    /// Sends the answer; false when the connection is done.
    pub async fn send(
        stream: &mut TcpStream,
        request: &Received,
        gate: &Notify,
        answer: Answer,
    ) -> bool {
        let (tokens, usage, include_usage, continuous, model) = match answer {
            Answer::Json(body) => {
                let body = body.to_string();
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                return stream
                    .write_all(format!("{head}{body}").as_bytes())
                    .await
                    .is_ok();
            }
            Answer::Stream {
                tokens,
                usage,
                include_usage,
                continuous,
                model,
            } => (tokens, usage, include_usage, continuous, model),
        };
        let pause_after = request
            .header("x-mock-sse-pause-after")
            .and_then(|v| v.parse::<u64>().ok());
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        if stream.write_all(head.as_bytes()).await.is_err() {
            return false;
        }
        let prompt = usage["prompt_tokens"].as_u64().unwrap_or(0);
        let chunk = |delta: Value, finish: Value, usage: Value| {
            let mut event = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                "created": 1_700_000_000, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
            if include_usage {
                event["usage"] = usage;
            }
            format!("data: {event}\n\n")
        };
        let mut events = vec![chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            Value::Null,
        )];
        for i in 0..tokens {
            let so_far = if continuous {
                json!({"prompt_tokens": prompt, "completion_tokens": i + 1,
                       "total_tokens": prompt + i + 1})
            } else {
                Value::Null
            };
            events.push(chunk(json!({"content": " token"}), Value::Null, so_far));
        }
        events.push(chunk(json!({}), json!("stop"), Value::Null));
        if include_usage {
            let last = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                "created": 1_700_000_000, "model": model, "choices": [], "usage": usage});
            events.push(format!("data: {last}\n\n"));
        }
        events.push("data: [DONE]\n\n".to_string());
        for (i, event) in events.iter().enumerate() {
            if pause_after == Some(i as u64) {
                gate.notified().await;
            }
            let mut out = format!("{:x}\r\n", event.len()).into_bytes();
            out.extend_from_slice(event.as_bytes());
            out.extend_from_slice(b"\r\n");
            if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
                return false;
            }
        }
        stream.write_all(b"0\r\n\r\n").await.is_ok()
    }
}

/// Closes with RST instead of FIN.
fn reset(stream: &mut TcpStream) {
    let _ = stream.set_zero_linger();
}
