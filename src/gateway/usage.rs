//! Reading actual usage from a response while it streams to the client.
//!
//! Nothing is held back: chunks go to the client as they come, and the meter
//! only looks at copies. An operation names its usage sources in order; the
//! meter reads every one that can apply and the first that the response has
//! wins — so one operation serves a JSON answer (`json:` reads a copy of the body,
//! up to a limit) and an event stream (`sse:` parses it line by line, events split
//! at any byte, keeping the usage of the last event that has one: OpenAI's
//! `stream_options.include_usage`). A `text/event-stream` response is never read
//! as one JSON document. Past its limits the meter gives up on a source and its
//! usage counts as missing — it never grows without bound.
//!
//! What a usage is depends on the rate ([`UsageRate::read`]): one number (any
//! non-negative JSON number of any size and precision, or a string holding a
//! plain decimal; `-0` is 0), or an object whose named fields are such numbers.
//! It is kept exactly ([`Usage`]); anything else is missing.

use pingora::http::ResponseHeader;
use serde_json::Value;

use crate::policy::{SettleRule, Usage, UsageRate, UsageSource};

/// Longest SSE line the meter keeps; longer lines are skipped.
const MAX_SSE_LINE_BYTES: usize = 1 << 20;

pub(super) struct UsageMeter {
    rate: UsageRate,
    sources: Vec<UsageSource>,
    /// The usage each source found so far (headers and events), by position.
    found: Vec<Option<Usage>>,
    /// A copy of the body for the `json:` sources; `None` when there are none,
    /// or the response is an event stream.
    json: Option<JsonCopy>,
    /// The event-stream parser for the `sse:` sources; `None` when there are none.
    sse: Option<SseParser>,
}

struct JsonCopy {
    copy: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

#[derive(Default)]
struct SseParser {
    line: Vec<u8>,
    skipping: bool,
    data: Vec<u8>,
}

impl UsageMeter {
    pub(super) fn new(rule: &SettleRule, json_limit: usize) -> Self {
        let any = |f: fn(&UsageSource) -> bool| rule.usage.iter().any(f);
        UsageMeter {
            rate: rule.rate.clone(),
            sources: rule.usage.clone(),
            found: vec![None; rule.usage.len()],
            json: any(UsageSource::is_json).then(|| JsonCopy {
                copy: Vec::new(),
                limit: json_limit,
                overflowed: false,
            }),
            sse: any(|s| matches!(s, UsageSource::Sse(_))).then(SseParser::default),
        }
    }

    pub(super) fn on_headers(&mut self, response: &ResponseHeader) {
        let stream = response
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        if stream {
            // An event stream is no JSON document: nothing to copy.
            self.json = None;
        }
        for (source, found) in self.sources.iter().zip(self.found.iter_mut()) {
            if let UsageSource::Header(name) = source {
                *found = response
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|text| self.rate.read_text(text));
            }
        }
    }

    pub(super) fn on_body(&mut self, chunk: &[u8]) {
        if let Some(json) = &mut self.json {
            if json.copy.len() + chunk.len() > json.limit {
                json.overflowed = true;
                json.copy = Vec::new();
            } else if !json.overflowed {
                json.copy.extend_from_slice(chunk);
            }
        }
        let Some(sse) = &mut self.sse else { return };
        for piece in chunk.split_inclusive(|&b| b == b'\n') {
            let complete = piece.ends_with(b"\n");
            if !sse.skipping {
                sse.line.extend_from_slice(piece);
                if sse.line.len() > MAX_SSE_LINE_BYTES {
                    sse.line.clear();
                    sse.skipping = true;
                }
            }
            if !complete {
                continue;
            }
            if !std::mem::take(&mut sse.skipping) {
                let line = std::mem::take(&mut sse.line);
                let text = line.strip_suffix(b"\n").unwrap_or(&line);
                let text = text.strip_suffix(b"\r").unwrap_or(text);
                if let Some(event) = sse_line(text, &mut sse.data) {
                    for (source, found) in self.sources.iter().zip(self.found.iter_mut()) {
                        if let UsageSource::Sse(pointer) = source {
                            // Only an event that has a usage replaces the last one.
                            if let Some(usage) =
                                event.pointer(pointer).and_then(|v| self.rate.read(v))
                            {
                                *found = Some(usage);
                            }
                        }
                    }
                }
            }
            sse.line.clear();
        }
    }

    /// The usage, once the response has ended (or as far as it got): that of the
    /// first source, in the policy's order, the response has; `None` when none has.
    pub(super) fn usage(&self) -> Option<Usage> {
        let json: Option<Value> = self
            .json
            .as_ref()
            .filter(|json| !json.overflowed)
            .and_then(|json| serde_json::from_slice(&json.copy).ok());
        self.sources
            .iter()
            .zip(&self.found)
            .find_map(|(source, found)| match source {
                UsageSource::Json(pointer) => json
                    .as_ref()
                    .and_then(|body| body.pointer(pointer))
                    .and_then(|v| self.rate.read(v)),
                UsageSource::Header(_) | UsageSource::Sse(_) => found.clone(),
            })
    }
}

/// Handles one SSE line; on the blank line that ends an event, returns that
/// event's data as JSON, if it is JSON.
fn sse_line(line: &[u8], data: &mut Vec<u8>) -> Option<Value> {
    if line.is_empty() {
        let event = std::mem::take(data);
        return serde_json::from_slice(&event).ok();
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
    use crate::policy::{Exact, Micros, OnMissing, UnitRate};

    fn rule(usage: Vec<UsageSource>, rate: UsageRate) -> SettleRule {
        SettleRule {
            usage,
            rate,
            on_missing: OnMissing::ChargeHold,
        }
    }

    fn per_unit() -> UsageRate {
        UsageRate::PerUnit(Micros::ONE)
    }

    fn one(text: &str) -> Option<Usage> {
        Exact::from_decimal(text).map(Usage::one)
    }

    fn sse(pointer: &str) -> UsageMeter {
        UsageMeter::new(&rule(vec![UsageSource::Sse(pointer.into())], per_unit()), 0)
    }

    fn headers(content_type: &str) -> ResponseHeader {
        let mut response = ResponseHeader::build(200, None).unwrap();
        response
            .insert_header("content-type", content_type)
            .unwrap();
        response
    }

    #[test]
    fn sse_usage_comes_from_the_last_event_that_has_it_at_any_split() {
        let stream = b"data: {\"x\":1}\n\ndata: {\"usage\":{\"total_tokens\":7}}\n\n: comment\n\ndata: {\"usage\":{\"total_tokens\":1234}}\r\n\r\ndata: {\"choices\":[],\"usage\":null}\n\ndata: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut meter = sse("/usage/total_tokens");
            for piece in stream.chunks(split) {
                meter.on_body(piece);
            }
            assert_eq!(meter.usage(), one("1234"), "split {split}");
        }
    }

    #[test]
    fn sse_multi_line_data_joins_lines() {
        let mut meter = sse("/u");
        meter.on_body(b"data: {\"u\":\ndata: 5}\n\n");
        assert_eq!(meter.usage(), one("5"));
    }

    #[test]
    fn json_usage_and_its_limit() {
        let json = |limit| {
            UsageMeter::new(
                &rule(
                    vec![UsageSource::Json("/usage/total_tokens".into())],
                    per_unit(),
                ),
                limit,
            )
        };
        let mut meter = json(1024);
        meter.on_body(b"{\"usage\":{\"total_");
        meter.on_body(b"tokens\":2.5}}");
        assert_eq!(meter.usage(), one("2.5"));
        let mut small = json(8);
        small.on_body(b"{\"usage\":{\"total_tokens\":2}}");
        assert_eq!(small.usage(), None, "past the limit, usage is missing");
        let mut negative = json(1024);
        negative.on_body(b"{\"usage\":{\"total_tokens\":-2}}");
        assert_eq!(negative.usage(), None, "negative usage is not usage");
    }

    /// The shipped chat operation's rule: one operation for JSON and streams.
    fn chat() -> SettleRule {
        let rate = |field: &str, credits: &str| UnitRate {
            field: field.into(),
            pointer: format!("/{field}"),
            credits: Micros::parse(credits).unwrap(),
        };
        rule(
            vec![
                UsageSource::Json("/usage".into()),
                UsageSource::Sse("/usage".into()),
            ],
            UsageRate::Units(vec![
                rate("prompt_tokens", "0.0005"),
                rate("completion_tokens", "0.0015"),
            ]),
        )
    }

    fn tokens(prompt: &str, completion: &str) -> Option<Usage> {
        let rate = chat().rate;
        rate.read(&serde_json::json!({"prompt_tokens": serde_json::from_str::<Value>(prompt).unwrap(),
                                      "completion_tokens": serde_json::from_str::<Value>(completion).unwrap()}))
    }

    #[test]
    fn one_operation_reads_a_json_answer_and_a_stream() {
        let mut json = UsageMeter::new(&chat(), 1 << 20);
        json.on_headers(&headers("application/json"));
        json.on_body(br#"{"choices":[],"usage":{"prompt_tokens":15,"completion_tokens":15,"total_tokens":30}}"#);
        assert_eq!(json.usage(), tokens("15", "15"));

        let mut stream = UsageMeter::new(&chat(), 1 << 20);
        stream.on_headers(&headers("text/event-stream; charset=utf-8"));
        stream
            .on_body(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n");
        stream.on_body(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":17}}\n\ndata: [DONE]\n\n");
        assert_eq!(stream.usage(), tokens("9", "17"));
        assert!(
            stream.json.is_none(),
            "an event stream is never copied as JSON"
        );

        // A JSON answer without usage, and a stream without a usage event: missing.
        let mut bare = UsageMeter::new(&chat(), 1 << 20);
        bare.on_headers(&headers("application/json"));
        bare.on_body(br#"{"choices":[]}"#);
        assert_eq!(bare.usage(), None);
    }

    #[test]
    fn the_first_source_the_response_has_wins() {
        let sources = vec![
            UsageSource::Header(http::HeaderName::from_static("x-usage")),
            UsageSource::Json("/usage".into()),
        ];
        let meter_with = |header: Option<&str>| {
            let mut meter = UsageMeter::new(&rule(sources.clone(), per_unit()), 1 << 20);
            let mut response = headers("application/json");
            if let Some(value) = header {
                response.insert_header("x-usage", value).unwrap();
            }
            meter.on_headers(&response);
            meter.on_body(br#"{"usage": 7}"#);
            meter
        };
        assert_eq!(meter_with(Some("3")).usage(), one("3"));
        assert_eq!(meter_with(None).usage(), one("7"));
        assert_eq!(
            meter_with(Some("lots")).usage(),
            one("7"),
            "a header that is no usage is absent"
        );
    }

    fn json_usage(body: &str) -> Option<Usage> {
        let mut meter = UsageMeter::new(
            &rule(vec![UsageSource::Json("/u".into())], per_unit()),
            1 << 20,
        );
        meter.on_body(format!("{{\"u\":{body}}}").as_bytes());
        meter.usage()
    }

    #[test]
    fn any_non_negative_number_or_decimal_string_is_a_usage() {
        for usage in [
            "0",
            "-0",
            "-0.0",
            "1",
            "1e15",
            "1e18",
            "1E+3",
            "2.5e-3",
            "18446744073709551615",
            "18446744073709551616",
            "1e400",
            "1.1234567",
            "0.0000000000000000000001",
            "\"500\"",
            "\"0.5\"",
            "\"-0\"",
            "\"007\"",
        ] {
            assert!(json_usage(usage).is_some(), "{usage} is a usage");
        }
        for missing in [
            "-1", "-1e-400", "\"-2\"", "\"NaN\"", "\"inf\"", "\"1e3\"", "\" 5\"", "\"5.\"",
            "\".5\"", "\"\"", "true", "null", "[1]", "{}",
        ] {
            assert!(json_usage(missing).is_none(), "{missing} is not a usage");
        }
    }

    #[test]
    fn a_usage_header_is_a_plain_decimal() {
        let source = UsageSource::Header(http::HeaderName::from_static("x-usage"));
        let usage = |value: &str| {
            let mut response = ResponseHeader::build(200, None).unwrap();
            response.insert_header("x-usage", value).unwrap();
            let mut meter = UsageMeter::new(&rule(vec![source.clone()], per_unit()), 0);
            meter.on_headers(&response);
            meter.usage()
        };
        assert_eq!(usage("18446744073709551616"), one("18446744073709551616"));
        assert_eq!(usage("1.1234567"), one("1.1234567"));
        assert_eq!(usage("-0"), one("0"));
        for missing in ["-1", "lots", "1e3", "NaN", ""] {
            assert_eq!(usage(missing), None, "{missing:?}");
        }
    }
}
