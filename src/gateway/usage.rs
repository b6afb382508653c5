//! Reading actual usage from a response while it streams to the client.
//!
//! Nothing is held back: chunks go to the client as they come, and the meter
//! only looks at copies. A JSON body is copied up to a limit; a server-sent event
//! stream is parsed line by line (events may be split at any byte), keeping the
//! usage from the last event whose data has the pointer (OpenAI-style
//! `stream_options.include_usage`). Past its limits the meter gives up and the
//! usage counts as missing — it never grows without bound.

use pingora::http::ResponseHeader;
use serde_json::Value;

use crate::policy::{Micros, UsageSource};

/// Longest SSE line the meter keeps; longer lines are skipped.
const MAX_SSE_LINE_BYTES: usize = 1 << 20;

pub(super) struct UsageMeter {
    kind: Kind,
    usage: Option<Micros>,
}

enum Kind {
    Json {
        pointer: String,
        copy: Vec<u8>,
        limit: usize,
        overflowed: bool,
    },
    Header,
    Sse {
        pointer: String,
        line: Vec<u8>,
        skipping: bool,
        data: Vec<u8>,
    },
}

/// A usage value: a non-negative JSON number (or numeric string) with ≤ 6 decimals.
fn usage_of(value: &Value) -> Option<Micros> {
    match value {
        Value::Number(n) => Micros::parse(&n.to_string()).ok(),
        Value::String(s) => Micros::parse(s).ok(),
        _ => None,
    }
}

impl UsageMeter {
    pub(super) fn new(source: &UsageSource, json_limit: usize) -> Self {
        let kind = match source {
            UsageSource::Json(pointer) => Kind::Json {
                pointer: pointer.clone(),
                copy: Vec::new(),
                limit: json_limit,
                overflowed: false,
            },
            UsageSource::Header(_) => Kind::Header,
            UsageSource::Sse(pointer) => Kind::Sse {
                pointer: pointer.clone(),
                line: Vec::new(),
                skipping: false,
                data: Vec::new(),
            },
        };
        UsageMeter { kind, usage: None }
    }

    pub(super) fn on_headers(&mut self, source: &UsageSource, response: &ResponseHeader) {
        if let (Kind::Header, UsageSource::Header(name)) = (&self.kind, source) {
            self.usage = response
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Micros::parse(v).ok());
        }
    }

    pub(super) fn on_body(&mut self, chunk: &[u8]) {
        match &mut self.kind {
            Kind::Header => {}
            Kind::Json {
                copy,
                limit,
                overflowed,
                ..
            } => {
                if copy.len() + chunk.len() > *limit {
                    *overflowed = true;
                    copy.clear();
                } else if !*overflowed {
                    copy.extend_from_slice(chunk);
                }
            }
            Kind::Sse {
                pointer,
                line,
                skipping,
                data,
            } => {
                for piece in chunk.split_inclusive(|&b| b == b'\n') {
                    let complete = piece.ends_with(b"\n");
                    if !*skipping {
                        line.extend_from_slice(piece);
                        if line.len() > MAX_SSE_LINE_BYTES {
                            line.clear();
                            *skipping = true;
                        }
                    }
                    if !complete {
                        continue;
                    }
                    if !std::mem::take(skipping) {
                        let text = line.strip_suffix(b"\n").unwrap_or(line);
                        let text = text.strip_suffix(b"\r").unwrap_or(text);
                        if let Some(found) = sse_line(text, data, pointer) {
                            self.usage = Some(found);
                        }
                    }
                    line.clear();
                }
            }
        }
    }

    /// The usage, once the response has ended; `None` when missing or unreadable.
    pub(super) fn usage(&self) -> Option<Micros> {
        match &self.kind {
            Kind::Json {
                pointer,
                copy,
                overflowed: false,
                ..
            } => {
                let json: Value = serde_json::from_slice(copy).ok()?;
                json.pointer(pointer).and_then(usage_of)
            }
            Kind::Json { .. } => None,
            Kind::Header | Kind::Sse { .. } => self.usage,
        }
    }
}

/// Handles one SSE line; on the blank line that ends an event, returns the usage
/// in that event's data, if it has one.
fn sse_line(line: &[u8], data: &mut Vec<u8>, pointer: &str) -> Option<Micros> {
    if line.is_empty() {
        let event = std::mem::take(data);
        let json: Value = serde_json::from_slice(&event).ok()?;
        return json.pointer(pointer).and_then(usage_of);
    }
    if let Some(value) = line.strip_prefix(b"data:") {
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if !data.is_empty() {
            data.push(b'\n');
        }
        if data.len() + value.len() <= MAX_SSE_LINE_BYTES {
            data.extend_from_slice(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(pointer: &str) -> UsageMeter {
        UsageMeter::new(&UsageSource::Sse(pointer.into()), 0)
    }

    #[test]
    fn sse_usage_comes_from_the_last_event_that_has_it_at_any_split() {
        let stream = b"data: {\"x\":1}\n\ndata: {\"usage\":{\"total_tokens\":7}}\n\n: comment\n\ndata: {\"usage\":{\"total_tokens\":1234}}\r\n\r\ndata: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut meter = sse("/usage/total_tokens");
            for piece in stream.chunks(split) {
                meter.on_body(piece);
            }
            assert_eq!(
                meter.usage(),
                Some(Micros::parse("1234").unwrap()),
                "split {split}"
            );
        }
    }

    #[test]
    fn sse_multi_line_data_joins_lines() {
        let mut meter = sse("/u");
        meter.on_body(b"data: {\"u\":\ndata: 5}\n\n");
        assert_eq!(meter.usage(), Some(Micros::parse("5").unwrap()));
    }

    #[test]
    fn json_usage_and_its_limit() {
        let source = UsageSource::Json("/usage/total_tokens".into());
        let mut meter = UsageMeter::new(&source, 1024);
        meter.on_body(b"{\"usage\":{\"total_");
        meter.on_body(b"tokens\":2.5}}");
        assert_eq!(meter.usage(), Some(Micros::parse("2.5").unwrap()));
        let mut small = UsageMeter::new(&source, 8);
        small.on_body(b"{\"usage\":{\"total_tokens\":2}}");
        assert_eq!(small.usage(), None, "past the limit, usage is missing");
        let mut negative = UsageMeter::new(&source, 1024);
        negative.on_body(b"{\"usage\":{\"total_tokens\":-2}}");
        assert_eq!(negative.usage(), None, "negative usage is not usage");
    }
}
