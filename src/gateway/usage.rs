//! Reading actual usage from a response while it streams to the client.
//!
//! Nothing is held back: chunks go to the client as they come, and the meter
//! only looks at copies. A JSON body is copied up to a limit; a server-sent event
//! stream is parsed line by line (events may be split at any byte), keeping the
//! usage from the last event whose data has the pointer (OpenAI-style
//! `stream_options.include_usage`). Past its limits the meter gives up and the
//! usage counts as missing — it never grows without bound.
//!
//! A usage is any non-negative JSON number — of any size, any precision, with or
//! without an exponent (`1234`, `2.5E+3`, `1e400`) — or a string holding a plain
//! decimal (`"500"`); `-0` is 0. It is kept exactly ([`Exact`]): the charge is
//! computed from it exactly and capped at the hold, so a huge usage is never
//! mistaken for a missing one. Anything else (negative, not a number) is missing.

use pingora::http::ResponseHeader;
use serde_json::Value;

use crate::policy::{Exact, UsageSource};

/// Longest SSE line the meter keeps; longer lines are skipped.
const MAX_SSE_LINE_BYTES: usize = 1 << 20;

pub(super) struct UsageMeter {
    kind: Kind,
    usage: Option<Exact>,
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

/// A usage value: a non-negative JSON number or a string holding a plain decimal.
fn usage_of(value: &Value) -> Option<Exact> {
    Exact::from_json(value).filter(|usage| !usage.is_negative())
}

/// A usage header: a plain decimal, not negative.
fn usage_of_text(text: &str) -> Option<Exact> {
    Exact::from_decimal(text.trim()).filter(|usage| !usage.is_negative())
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
                .and_then(usage_of_text);
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
    pub(super) fn usage(&self) -> Option<Exact> {
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
            Kind::Header | Kind::Sse { .. } => self.usage.clone(),
        }
    }
}

/// Handles one SSE line; on the blank line that ends an event, returns the usage
/// in that event's data, if it has one.
fn sse_line(line: &[u8], data: &mut Vec<u8>, pointer: &str) -> Option<Exact> {
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
            assert_eq!(meter.usage(), Exact::from_decimal("1234"), "split {split}");
        }
    }

    #[test]
    fn sse_multi_line_data_joins_lines() {
        let mut meter = sse("/u");
        meter.on_body(b"data: {\"u\":\ndata: 5}\n\n");
        assert_eq!(meter.usage(), Exact::from_decimal("5"));
    }

    #[test]
    fn json_usage_and_its_limit() {
        let source = UsageSource::Json("/usage/total_tokens".into());
        let mut meter = UsageMeter::new(&source, 1024);
        meter.on_body(b"{\"usage\":{\"total_");
        meter.on_body(b"tokens\":2.5}}");
        assert_eq!(meter.usage(), Exact::from_decimal("2.5"));
        let mut small = UsageMeter::new(&source, 8);
        small.on_body(b"{\"usage\":{\"total_tokens\":2}}");
        assert_eq!(small.usage(), None, "past the limit, usage is missing");
        let mut negative = UsageMeter::new(&source, 1024);
        negative.on_body(b"{\"usage\":{\"total_tokens\":-2}}");
        assert_eq!(negative.usage(), None, "negative usage is not usage");
    }

    fn json_usage(body: &str) -> Option<Exact> {
        let mut meter = UsageMeter::new(&UsageSource::Json("/u".into()), 1 << 20);
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
            let mut meter = UsageMeter::new(&source, 0);
            meter.on_headers(&source, &response);
            meter.usage()
        };
        assert_eq!(
            usage("18446744073709551616"),
            Exact::from_decimal("18446744073709551616")
        );
        assert_eq!(usage("1.1234567"), Exact::from_decimal("1.1234567"));
        assert_eq!(usage("-0"), Some(Exact::ZERO));
        for missing in ["-1", "lots", "1e3", "NaN", ""] {
            assert_eq!(usage(missing), None, "{missing:?}");
        }
    }

    use num_bigint::BigUint;
    use proptest::prelude::*;

    use crate::ledger::Credits;
    use crate::policy::{usage_charge, Micros};

    /// `⌈n × 10^shift⌉` in big integers: the reference the exact code must match.
    fn ceil_scaled(n: BigUint, shift: i64) -> BigUint {
        let ten = BigUint::from(10u32);
        if shift >= 0 {
            n * ten.pow(shift as u32)
        } else {
            let d = ten.pow((-shift) as u32);
            (n + &d - 1u32) / d
        }
    }

    /// A usage as a response may write it: (text in the body, integer digits,
    /// fraction digits, exponent, negative).
    fn usage_text() -> impl Strategy<Value = (String, String, String, i64, bool)> {
        let int = prop_oneof![Just("0".to_string()), "[1-9][0-9]{0,25}"];
        let frac = prop_oneof![Just(String::new()), "[0-9]{1,25}"];
        let exponent = (
            -60i64..60,
            prop_oneof![Just("e"), Just("E")],
            any::<bool>(),
            any::<bool>(),
        );
        (
            int,
            frac,
            proptest::option::of(exponent),
            any::<bool>(),
            any::<bool>(),
            "0{0,3}",
        )
            .prop_map(|(int, frac, exponent, negative, as_string, zeros)| {
                let sign = if negative { "-" } else { "" };
                let point = if frac.is_empty() {
                    String::new()
                } else {
                    format!(".{frac}")
                };
                if as_string {
                    // Text holds a plain decimal: leading zeros allowed, no exponent.
                    let text = format!("\"{sign}{zeros}{int}{point}\"");
                    return (text, int, frac, 0, negative);
                }
                let (exp_text, exp) = match exponent {
                    None => (String::new(), 0),
                    Some((e, letter, plus, leading_zero)) => {
                        let e_sign = if e < 0 {
                            "-"
                        } else if plus {
                            "+"
                        } else {
                            ""
                        };
                        let zero = if leading_zero { "0" } else { "" };
                        (format!("{letter}{e_sign}{zero}{}", e.abs()), e)
                    }
                };
                (
                    format!("{sign}{int}{point}{exp_text}"),
                    int,
                    frac,
                    exp,
                    negative,
                )
            })
    }

    proptest! {
        /// Any usage, as a JSON number or a decimal string, read from a real
        /// response body: the charge is the exact product with the rate, rounded
        /// up to a millicredit, capped at the hold; a negative one is missing.
        #[test]
        fn usage_charges_are_the_exact_product_rounded_up_and_capped(
            (text, int, frac, exp, negative) in usage_text(),
            rate in prop_oneof![0u64..=2_000_000, any::<u64>()],
            held in prop_oneof![0u64..=100_000_000, any::<u64>()],
        ) {
            let mut meter = UsageMeter::new(&UsageSource::Json("/usage".into()), 1 << 20);
            meter.on_body(format!(r#"{{"usage":{text}}}"#).as_bytes());
            let digits = BigUint::parse_bytes(format!("{int}{frac}").as_bytes(), 10).unwrap();
            let zero = digits == BigUint::from(0u32);
            let Some(usage) = meter.usage() else {
                prop_assert!(negative && !zero, "{text} is a usage");
                return Ok(());
            };
            prop_assert!(!negative || zero, "{text} is negative: missing");
            // usage × rate millionths = usage × rate × 1e-3 millicredits.
            let shift = exp - frac.len() as i64 - 3;
            let expected = ceil_scaled(digits * rate, shift).min(BigUint::from(held));
            let charged = usage_charge(&usage, Micros::from_micros(rate), Credits::from_millicredits(held));
            prop_assert_eq!(BigUint::from(charged.millicredits()), expected, "{} at {} micros", text, rate);
        }
    }
}
