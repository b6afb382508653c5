//! Path normalization: the one reading of a request path that the gateway prices,
//! forwards and quotes.
//!
//! A backend does not serve the bytes of a path, it serves what it reads them as:
//! nginx and most web frameworks decode percent-escapes, merge repeated slashes and
//! resolve `.` and `..` before they route. Matching the raw path would price one
//! resource while the backend serves another (`/v1/models/..%2fimages%2fx` priced as a
//! free model read, served as a priced image). So the path is normalized first, the
//! normalized path is matched and priced, and the normalized path is what the backend
//! receives: the path that was priced is the path that is served.
//!
//! What [`normalize_path`] does, in order:
//! - decodes the percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`), so
//!   `%2e%2E` is a `..` segment and `/v1/f%61st` is `/v1/fast`;
//! - keeps every other escape, in uppercase hex (`%3a` becomes `%3A`), and
//!   percent-encodes the characters a path may not carry as they are (non-ASCII text,
//!   `"`, `{`, `|`, ...), so the result is plain ASCII;
//! - merges repeated slashes, then removes `.` and `..` segments; a trailing slash is
//!   kept (`/v1/images/` is not `/v1/images`), and one is left where a final `.` or
//!   `..` was (`/v1/a/..` is `/v1/`), as RFC 3986 does;
//! - refuses what backends read in different ways: an encoded `/` or `\` (`%2F`,
//!   `%5C`), a `\`, a `..` above the root, a `..` right after an empty segment (`//..`:
//!   is the empty segment merged first, or removed by the `..`?), a `%` not followed by
//!   two hex digits, control characters (`%00` included), escapes that do not decode
//!   to UTF-8, a path that does not start with `/`, and a path longer than
//!   [`MAX_PATH_BYTES`].
//!
//! The query is never part of the path and never touched. Matching reads the
//! normalized path with its remaining escapes decoded ([`NormalizedPath::decoded`]):
//! backends decode `%3A` to `:` before routing, so the two are priced alike.
//!
//! Pure: no IO, no HTTP types. Used by the gateway, `POST /credits/v1/quote` and
//! `creditgate quote`, so all three price the same path.

use std::fmt;

/// Longest path accepted, before and after normalization (nginx's default limit on a
/// whole request line is 8 KiB).
pub const MAX_PATH_BYTES: usize = 8 * 1024;

/// A request path in its one normal form. Only [`normalize_path`] makes one, so a
/// value of this type is a path the gateway may match, price and forward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormalizedPath {
    /// What the backend receives: ASCII, escapes only for characters that need them.
    forwarded: String,
    /// `forwarded` with every escape decoded; `None` when it has none.
    decoded: Option<String>,
}

impl NormalizedPath {
    /// The normalized path, as the backend receives it.
    pub fn as_str(&self) -> &str {
        &self.forwarded
    }

    /// The normalized path with its remaining escapes decoded, as the policy matches
    /// it: what a backend that decodes its paths routes on. It has the same segments
    /// as [`Self::as_str`], since an encoded `/` is refused.
    pub fn decoded(&self) -> &str {
        self.decoded.as_deref().unwrap_or(&self.forwarded)
    }
}

impl fmt::Display for NormalizedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.forwarded)
    }
}

/// Why a path is refused. Each message reads after the word "path".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    TooLong,
    /// `%2F` or `%5C`, as written.
    EncodedSeparator(String),
    Backslash,
    AboveRoot,
    /// A `..` right after an empty segment.
    DotDotAfterEmptySegment,
    /// A `%` not followed by two hex digits, at this byte offset.
    BadEscape {
        at: usize,
    },
    ControlCharacter,
    NotUtf8,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathError::NotAbsolute => write!(f, "must start with /"),
            PathError::TooLong => write!(f, "must not be longer than {MAX_PATH_BYTES} bytes"),
            PathError::EncodedSeparator(escape) => write!(
                f,
                "must not contain {escape}: an encoded / or \\ is a separator to some backends and not to others"
            ),
            PathError::Backslash => write!(f, "must not contain \\, which some backends read as /"),
            PathError::AboveRoot => write!(f, "must not climb above the root with .."),
            PathError::DotDotAfterEmptySegment => write!(
                f,
                "must not have .. right after an empty segment (//..), which backends resolve differently"
            ),
            PathError::BadEscape { at } => write!(
                f,
                "has a bad percent-escape at byte {at}: % must be followed by two hex digits"
            ),
            PathError::ControlCharacter => {
                write!(f, "must not contain control characters, plain or percent-encoded")
            }
            PathError::NotUtf8 => write!(f, "must be UTF-8 text once its percent-escapes are decoded"),
        }
    }
}

impl std::error::Error for PathError {}

/// `A-Z a-z 0-9 - . _ ~`: an escape of one of these means the character itself.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Characters a path segment carries as they are: unreserved, sub-delims, `:` and `@`.
fn is_plain(byte: u8) -> bool {
    is_unreserved(byte)
        || matches!(
            byte,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

fn is_control(byte: u8) -> bool {
    byte < 0x20 || byte == 0x7f
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Appends `%XX` in uppercase hex.
fn push_escape(out: &mut String, byte: u8) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(DIGITS[usize::from(byte >> 4)]));
    out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
}

/// The two forms being built, and where each kept segment starts in them.
struct Builder {
    forwarded: String,
    decoded: Vec<u8>,
    /// The segments kept so far: `Some((forwarded start, decoded start))`, or `None`
    /// for an empty segment (merged away, but remembered to spot `//..`).
    segments: Vec<Option<(usize, usize)>>,
}

impl Builder {
    /// Ends the segment that started at `start`: keeps it, or applies `.`, `..` or an
    /// empty segment. `last` says whether the path ends here.
    fn end_segment(&mut self, start: (usize, usize), last: bool) -> Result<(), PathError> {
        let segment = &self.forwarded[start.0..];
        match segment {
            "" => self.segments.push(None),
            "." => self.truncate(start),
            ".." => {
                self.truncate(start);
                match self.segments.pop() {
                    None => return Err(PathError::AboveRoot),
                    Some(None) => return Err(PathError::DotDotAfterEmptySegment),
                    Some(Some(previous)) => self.truncate(previous),
                }
            }
            _ => {
                self.segments.push(Some(start));
                if !last {
                    self.forwarded.push('/');
                    self.decoded.push(b'/');
                }
            }
        }
        Ok(())
    }

    fn truncate(&mut self, to: (usize, usize)) {
        self.forwarded.truncate(to.0);
        self.decoded.truncate(to.1);
    }

    fn position(&self) -> (usize, usize) {
        (self.forwarded.len(), self.decoded.len())
    }
}

/// Normalizes a request path (without its query): see the module docs for the rules.
pub fn normalize_path(raw: &[u8]) -> Result<NormalizedPath, PathError> {
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if raw.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    let mut out = Builder {
        forwarded: String::with_capacity(raw.len()),
        decoded: Vec::with_capacity(raw.len()),
        segments: Vec::new(),
    };
    out.forwarded.push('/');
    out.decoded.push(b'/');
    let mut start = out.position();
    let mut i = 1;
    while i < raw.len() {
        let byte = raw[i];
        match byte {
            b'/' => {
                out.end_segment(start, false)?;
                start = out.position();
            }
            b'%' => {
                let value = match (raw.get(i + 1), raw.get(i + 2)) {
                    (Some(&high), Some(&low)) => hex_value(high)
                        .zip(hex_value(low))
                        .map(|(high, low)| high << 4 | low),
                    _ => None,
                };
                let value = value.ok_or(PathError::BadEscape { at: i })?;
                match value {
                    b'/' | b'\\' => {
                        let written = String::from_utf8_lossy(&raw[i..i + 3]).into_owned();
                        return Err(PathError::EncodedSeparator(written));
                    }
                    _ if is_control(value) => return Err(PathError::ControlCharacter),
                    _ if is_unreserved(value) => out.forwarded.push(char::from(value)),
                    _ => push_escape(&mut out.forwarded, value),
                }
                out.decoded.push(value);
                i += 2;
            }
            b'\\' => return Err(PathError::Backslash),
            _ if is_control(byte) => return Err(PathError::ControlCharacter),
            _ if is_plain(byte) => {
                out.forwarded.push(char::from(byte));
                out.decoded.push(byte);
            }
            // Not allowed as it is in a path (`"`, `{`, a UTF-8 byte, ...): encoded.
            _ => {
                push_escape(&mut out.forwarded, byte);
                out.decoded.push(byte);
            }
        }
        i += 1;
    }
    out.end_segment(start, true)?;
    if out.forwarded.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    // Escapes in segments that `..` removed do not count: only the ones kept.
    let decoded = if out.forwarded.contains('%') {
        Some(String::from_utf8(out.decoded).map_err(|_| PathError::NotUtf8)?)
    } else {
        None
    };
    Ok(NormalizedPath {
        forwarded: out.forwarded,
        decoded,
    })
}

/// A request target as the quote API and `creditgate quote` take it (`/path?query`):
/// the path and the query, without any `#fragment`.
pub fn split_query(target: &str) -> (&str, Option<&str>) {
    let target = target.split('#').next().unwrap_or_default();
    match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    }
}

/// Checks an operation's path pattern: it must be the form of the requests it is
/// meant to match — normalized, with characters rather than escapes — or it could
/// never match one.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let normalized = normalize_path(pattern.as_bytes()).map_err(|e| e.to_string())?;
    if pattern.contains('%') {
        return Err(
            "write characters as they are, not percent-escapes: requests are matched with their escapes decoded"
                .into(),
        );
    }
    if normalized.decoded() != pattern {
        return Err(format!(
            "requests are matched after merging repeated slashes and removing . and .. segments; write {:?}",
            normalized.decoded()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::mock::nginx_path;
    use proptest::prelude::*;

    fn normal(raw: &str) -> Result<String, PathError> {
        normalize_path(raw.as_bytes()).map(|p| p.as_str().to_string())
    }

    #[test]
    fn paths_normalize_as_the_table_says() {
        let table: &[(&str, &str)] = &[
            ("/", "/"),
            ("/v1/fast", "/v1/fast"),
            // The attacks the normalizer exists for.
            ("/v1/f%61st", "/v1/fast"),
            ("/v1/images/../fast", "/v1/fast"),
            ("/v1//fast", "/v1/fast"),
            ("/v1/models/../images/x", "/v1/images/x"),
            ("/v1/models/%2e%2E/images/x", "/v1/images/x"),
            ("/v1/models/.%2e/images/x", "/v1/images/x"),
            ("///v1///fast", "/v1/fast"),
            ("/v1/./fast", "/v1/fast"),
            ("/v1/%2E/fast", "/v1/fast"),
            // Escapes of unreserved characters are decoded, the others kept in uppercase.
            ("/v1/%7e%5F%2D%41z", "/v1/~_-Az"),
            ("/v1/o1%3apro", "/v1/o1%3Apro"),
            ("/v1/a%20b", "/v1/a%20b"),
            ("/v1/100%25", "/v1/100%25"),
            ("/v1/%3F%23", "/v1/%3F%23"),
            // Characters a path may not carry as they are: encoded.
            ("/v1/é", "/v1/%C3%A9"),
            ("/v1/{\"a\"}|^[]", "/v1/%7B%22a%22%7D%7C%5E%5B%5D"),
            ("/v1/a b", "/v1/a%20b"),
            // Sub-delims, `:` and `@` stay as they are.
            ("/v1/a:b@c!$&'()*+,;=", "/v1/a:b@c!$&'()*+,;="),
            // Trailing slashes are kept; a final `.` or `..` leaves one.
            ("/v1/images/", "/v1/images/"),
            ("/v1/images//", "/v1/images/"),
            ("/v1/images/.", "/v1/images/"),
            ("/v1/images/x/..", "/v1/images/"),
            ("/v1/..", "/"),
            ("/.", "/"),
            ("//", "/"),
            ("/v1/a/./b/../../c/", "/v1/c/"),
            // A `.` after an empty segment is harmless: both readings agree.
            ("/v1//./fast", "/v1/fast"),
            ("/...", "/..."),
            ("/a/..b/.c", "/a/..b/.c"),
        ];
        for (raw, want) in table {
            assert_eq!(normal(raw).as_deref(), Ok(*want), "{raw}");
        }
    }

    #[test]
    fn paths_backends_read_differently_are_refused() {
        let table: &[(&str, PathError)] = &[
            ("", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("v1/fast", PathError::NotAbsolute),
            ("http://host/v1/fast", PathError::NotAbsolute),
            (
                "/v1/models/..%2fimages%2fx",
                PathError::EncodedSeparator("%2f".into()),
            ),
            ("/v1/a%2Fb", PathError::EncodedSeparator("%2F".into())),
            ("/v1/a%5cb", PathError::EncodedSeparator("%5c".into())),
            ("/v1/a%5Cb", PathError::EncodedSeparator("%5C".into())),
            ("/v1/a\\b", PathError::Backslash),
            ("/v1\\..\\images", PathError::Backslash),
            ("/..", PathError::AboveRoot),
            ("/v1/../..", PathError::AboveRoot),
            ("/%2e%2e/v1", PathError::AboveRoot),
            ("/v1/a//../b", PathError::DotDotAfterEmptySegment),
            ("/v1/.//../b", PathError::DotDotAfterEmptySegment),
            ("/v1/%", PathError::BadEscape { at: 4 }),
            ("/v1/%4", PathError::BadEscape { at: 4 }),
            ("/v1/%G1", PathError::BadEscape { at: 4 }),
            ("/v1/%+1", PathError::BadEscape { at: 4 }),
            ("/v1/a%00", PathError::ControlCharacter),
            ("/v1/a%0a", PathError::ControlCharacter),
            ("/v1/a%7F", PathError::ControlCharacter),
            ("/v1/a\tb", PathError::ControlCharacter),
            ("/v1/%FF", PathError::NotUtf8),
            ("/v1/%C3", PathError::NotUtf8),
        ];
        for (raw, want) in table {
            assert_eq!(normal(raw).as_ref(), Err(want), "{raw}");
        }
        assert_eq!(
            normalize_path(b"/v1/\xff").map(|p| p.as_str().to_string()),
            Err(PathError::NotUtf8)
        );
    }

    #[test]
    fn long_paths_are_refused_before_and_after_normalization() {
        let longest = format!("/{}", "a".repeat(MAX_PATH_BYTES - 1));
        assert!(normalize_path(longest.as_bytes()).is_ok());
        let longer = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        assert_eq!(normalize_path(longer.as_bytes()), Err(PathError::TooLong));
        // Short enough as written, too long once encoded.
        let grows = format!("/{}", "é".repeat(MAX_PATH_BYTES / 4));
        assert_eq!(normalize_path(grows.as_bytes()), Err(PathError::TooLong));
    }

    #[test]
    fn matching_reads_the_normalized_path_with_its_escapes_decoded() {
        let path = normalize_path(b"/v1/run/o1%3apro/%C3%A9%20x").unwrap();
        assert_eq!(path.as_str(), "/v1/run/o1%3Apro/%C3%A9%20x");
        assert_eq!(path.decoded(), "/v1/run/o1:pro/é x");
        let plain = normalize_path(b"/v1/run/x").unwrap();
        assert_eq!(plain.decoded(), plain.as_str());
        // An escape in a segment that `..` removed leaves nothing to decode.
        let removed = normalize_path(b"/o1%3apro/%2E%2e").unwrap();
        assert_eq!(removed, normalize_path(b"/").unwrap());
    }

    #[test]
    fn a_target_splits_into_path_and_query_without_the_fragment() {
        assert_eq!(split_query("/v1/x?a=1&b"), ("/v1/x", Some("a=1&b")));
        assert_eq!(split_query("/v1/x"), ("/v1/x", None));
        assert_eq!(split_query("/v1/x#frag?no"), ("/v1/x", None));
        assert_eq!(split_query("/v1/x?a=/../#f"), ("/v1/x", Some("a=/../")));
    }

    #[test]
    fn patterns_must_be_normalized_and_unescaped() {
        for good in [
            "/v1/images",
            "/v1/sites/{site}/edits",
            "/v1/{*rest}",
            "/v1/x:y",
            "/",
        ] {
            assert_eq!(check_pattern(good), Ok(()), "{good}");
        }
        for bad in [
            "/v1//images",
            "/v1/./images",
            "/v1/a/../images",
            "/v1/%41",
            "/v1/a%20b",
            "/v1\\images",
            "/..",
        ] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
    }

    /// Pieces of random paths: names, dot segments plain and encoded in mixed case,
    /// empty segments and escapes of every kind (mostly), and what is refused (less).
    fn segment() -> impl Strategy<Value = String> {
        let benign = proptest::sample::select(vec![
            "v1", "images", "a", "", "", ".", "..", "..", "%2e", "%2E%2e", ".%2E", "%2e.",
            "f%61st", "%7E%5f", "o1%3apro", "%3F", "%25", "%2541", "é", "%C3%A9", "{x}",
        ]);
        let refused = proptest::sample::select(vec![
            "%2F", "a%2fb", "%5c", "\\", "%", "%4", "%G1", "%00", "%ff",
        ]);
        prop_oneof![
            8 => benign.prop_map(str::to_string),
            1 => refused.prop_map(str::to_string),
            2 => "[a-z0-9._~:@!$&'()*+,;=-]{1,4}",
            1 => any::<u8>().prop_map(|b| format!("%{b:02x}")),
        ]
    }

    fn raw_path() -> impl Strategy<Value = String> {
        proptest::collection::vec(segment(), 0..10).prop_map(|segments| {
            let mut path = String::from("/");
            path.push_str(&segments.join("/"));
            path
        })
    }

    /// RFC 3986's order (dot segments first, then slashes merged): the other way a
    /// backend may read a path.
    fn dots_then_merge(path: &str) -> Option<Vec<u8>> {
        let decoded = percent_decode(path)?;
        let mut segments: Vec<&[u8]> = Vec::new();
        let parts: Vec<&[u8]> = decoded.split(|&b| b == b'/').skip(1).collect();
        let mut trailing = false;
        for (n, part) in parts.iter().enumerate() {
            let last = n + 1 == parts.len();
            match *part {
                b"." => trailing = last,
                b".." => {
                    segments.pop()?;
                    trailing = last;
                }
                segment => {
                    segments.push(segment);
                    trailing = false;
                }
            }
        }
        let mut out = Vec::new();
        for segment in segments.iter().filter(|s| !s.is_empty()) {
            out.push(b'/');
            out.extend_from_slice(segment);
        }
        if trailing || out.is_empty() || parts.last() == Some(&&b""[..]) {
            out.push(b'/');
        }
        Some(out)
    }

    fn percent_decode(path: &str) -> Option<Vec<u8>> {
        let bytes = path.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let high = hex_value(*bytes.get(i + 1)?)?;
                let low = hex_value(*bytes.get(i + 2)?)?;
                out.push(high << 4 | low);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        Some(out)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        #[test]
        fn a_normalized_path_is_one_every_backend_reads_as_the_gateway_did(raw in raw_path()) {
            let Ok(path) = normalize_path(raw.as_bytes()) else { return Ok(()) };
            let out = path.as_str();
            // Idempotent, and already in the form it describes.
            prop_assert_eq!(&normalize_path(out.as_bytes()).unwrap(), &path);
            prop_assert!(out.starts_with('/') && out.is_ascii());
            prop_assert!(!out.contains("//"), "{}", out);
            for segment in out.split('/') {
                prop_assert!(segment != "." && segment != "..", "{}", out);
            }
            // No escape of an unreserved character, and uppercase hex.
            for escape in out.split('%').skip(1) {
                let hex = &escape.as_bytes()[..2];
                prop_assert!(hex.iter().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()), "{}", out);
                let byte = hex_value(hex[0]).unwrap() << 4 | hex_value(hex[1]).unwrap();
                prop_assert!(!is_unreserved(byte), "{}", out);
            }
            // A backend that decodes everything (`%2F` too) and resolves dot segments
            // serves the same resource from the raw path as from the normalized one —
            // in nginx's order and in RFC 3986's — and that is what the gateway matched.
            let served = nginx_path(&raw);
            prop_assert_eq!(&served, &nginx_path(out));
            prop_assert_eq!(&served, &dots_then_merge(&raw));
            prop_assert_eq!(&served, &dots_then_merge(out));
            prop_assert_eq!(served.as_deref(), Some(path.decoded().as_bytes()));
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_stay_bounded(raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut raw = raw;
            raw.insert(0, b'/');
            if let Ok(path) = normalize_path(&raw) {
                prop_assert!(path.as_str().len() <= MAX_PATH_BYTES);
                prop_assert_eq!(&normalize_path(path.as_str().as_bytes()).unwrap(), &path);
            }
        }
    }
}
