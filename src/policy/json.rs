//! Request bodies as JSON, refusing any that two parsers could read differently.
//!
//! RFC 8259 leaves an object with a repeated key to the parser: serde_json keeps
//! the last value, other parsers keep the first or fail. If the gateway priced
//! `{"n":100,"n":1}` at `n = 1` and the backend did 100 units of work, the meter
//! would be wrong by design, so a body the gateway reads to match or price is
//! refused when any of its objects repeats a key (`"a"` and `"\u0061"` are the same
//! key: keys are compared decoded).
//!
//! How: [`parse_body`] parses the body into a `serde_json::Value` as before, then
//! walks the same bytes a second time with [`duplicate_key`], a serde visitor that
//! builds nothing and only tracks the keys of each object. Two passes rather than
//! one `Value`-building visitor that checks as it inserts, because such a visitor
//! would have to build numbers itself, and how serde_json hands numbers to a
//! visitor depends on its features (`arbitrary_precision` passes them as a private
//! one-key map): the walk never looks at a scalar, so it sees the same keys
//! whatever the number representation, and the `Value` stays serde_json's own.
//! The cost is a second parse of a body that is at most `max_body_bytes`, and only
//! for operations that read the body. Both passes run in serde_json's deserializer
//! with its recursion limit (128 levels), so the walk's nesting is bounded too.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// A key that one object of a JSON document has more than once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DuplicateKey {
    /// The key, decoded (escapes resolved).
    pub key: String,
    /// Where the object is: its path from the document's root, one segment per
    /// object key or array index (empty: the root object).
    pub path: Vec<String>,
}

impl DuplicateKey {
    /// The same duplicate seen from inside the member `segment` of the root, when
    /// it is there: the body of a quote request is the `body` member of its JSON.
    pub fn within(&self, segment: &str) -> Option<DuplicateKey> {
        match self.path.split_first() {
            Some((first, rest)) if first == segment => Some(DuplicateKey {
                key: self.key.clone(),
                path: rest.to_vec(),
            }),
            _ => None,
        }
    }

    /// The object's path as a JSON pointer (RFC 6901), `""` for the root.
    pub fn pointer(&self) -> String {
        self.path
            .iter()
            .map(|segment| format!("/{}", segment.replace('~', "~0").replace('/', "~1")))
            .collect()
    }
}

impl fmt::Display for DuplicateKey {
    /// Reads after the name of what holds the document: "body has the key …".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = serde_json::to_string(&self.key).map_err(|_| fmt::Error)?;
        if self.path.is_empty() {
            write!(f, "has the key {key} more than once")
        } else {
            write!(f, "has the key {key} more than once in {}", self.pointer())
        }
    }
}

/// A request body read as JSON: `Ok(Ok(value))`; `Ok(Err(why))` when it is not
/// JSON (empty, malformed, nested too deep: the policy decides what that means for
/// the value that needed it); `Err` when an object repeats a key.
pub fn parse_body(body: &[u8]) -> Result<Result<Value, String>, DuplicateKey> {
    if body.is_empty() {
        return Ok(Err("the request has no body".into()));
    }
    let value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(e) => return Ok(Err(e.to_string())),
    };
    match duplicate_key(body) {
        Ok(None) => Ok(Ok(value)),
        Ok(Some(duplicate)) => Err(duplicate),
        // The walk reads the grammar the parse just accepted, with the same limits;
        // should it ever disagree, the body is treated as unreadable, never as clean.
        Err(e) => Ok(Err(e)),
    }
}

/// The first key some object of `text` has twice, or `None`; `Err` when `text` is
/// not one JSON document.
pub fn duplicate_key(text: &[u8]) -> Result<Option<DuplicateKey>, String> {
    let mut found = None;
    let mut reader = serde_json::Deserializer::from_slice(text);
    let walked = Walk { found: &mut found }
        .deserialize(&mut reader)
        .and_then(|()| reader.end());
    match (walked, found) {
        (Ok(()), _) => Ok(None),
        (Err(_), Some(mut duplicate)) => {
            // Segments were added while the error travelled out, innermost first.
            duplicate.path.reverse();
            Ok(Some(duplicate))
        }
        (Err(e), None) => Err(e.to_string()),
    }
}

/// Walks one JSON value, remembering in `found` the first repeated key. The error
/// that stops the walk carries nothing; each enclosing object or array adds its
/// segment to `found.path` as the error passes through it.
struct Walk<'a> {
    found: &'a mut Option<DuplicateKey>,
}

impl Walk<'_> {
    fn note_segment(&mut self, segment: impl Into<String>) {
        if let Some(duplicate) = self.found.as_mut() {
            duplicate.path.push(segment.into());
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    // Scalars carry no keys, whatever their representation.
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_i128<E>(self, _: i128) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u128<E>(self, _: u128) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut items: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        loop {
            match items.next_element_seed(Walk {
                found: &mut *self.found,
            }) {
                Ok(Some(())) => index += 1,
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.note_segment(index.to_string());
                    return Err(e);
                }
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut entries: A) -> Result<(), A::Error> {
        // A hashed set, not a list: an object with many keys costs linear time, not
        // quadratic. Keys without escapes are borrowed from the body, not copied.
        let mut seen: HashSet<Cow<'de, str>> = HashSet::new();
        while let Some(Key(key)) = entries.next_key()? {
            if seen.contains(&key) {
                *self.found = Some(DuplicateKey {
                    key: key.into_owned(),
                    path: Vec::new(),
                });
                return Err(de::Error::custom("duplicate key"));
            }
            if let Err(e) = entries.next_value_seed(Walk {
                found: &mut *self.found,
            }) {
                self.note_segment(key.into_owned());
                return Err(e);
            }
            seen.insert(key);
        }
        Ok(())
    }
}

/// An object key, decoded, borrowed from the input when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(key)))
            }
            fn visit_str<E>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key.to_string())))
            }
            fn visit_string<E>(self, key: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key)))
            }
        }

        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn duplicate(text: &str) -> Option<(String, String)> {
        duplicate_key(text.as_bytes())
            .unwrap()
            .map(|d| (d.key.clone(), d.pointer()))
    }

    fn found(key: &str, pointer: &str) -> Option<(String, String)> {
        Some((key.to_string(), pointer.to_string()))
    }

    #[test]
    fn a_repeated_key_is_found_at_any_depth_with_its_path() {
        assert_eq!(duplicate(r#"{"n":100,"n":1}"#), found("n", ""));
        assert_eq!(
            duplicate(r#"{"a":{"b":{"c":1,"d":2,"c":3}}}"#),
            found("c", "/a/b")
        );
        assert_eq!(
            duplicate(r#"{"list":[1,{"x":1},[{"y":1,"y":2}]]}"#),
            found("y", "/list/2/0")
        );
        assert_eq!(duplicate(r#"[{"k":1,"k":1}]"#), found("k", "/0"));
        // Segments that need escaping in a pointer are escaped.
        assert_eq!(
            duplicate(r#"{"a/b":{"c~d":{"e":1,"e":2}}}"#),
            found("e", "/a~1b/c~0d")
        );
        // The value does not matter, nor its type.
        assert_eq!(duplicate(r#"{"x":null,"x":null}"#), found("x", ""));
        assert_eq!(duplicate(r#"{"x":{"y":1},"x":[1]}"#), found("x", ""));
    }

    #[test]
    fn the_same_key_in_sibling_or_nested_objects_is_no_duplicate() {
        for text in [
            r#"{"a":{"x":1},"b":{"x":2},"x":3}"#,
            r#"[{"n":1},{"n":2}]"#,
            r#"{"n":{"n":{"n":1}}}"#,
            r#"{"a":1,"A":2,"a ":3}"#,
            r#"{}"#,
            r#"[]"#,
            r#"7"#,
            r#""n""#,
        ] {
            assert_eq!(duplicate(text), None, "{text}");
        }
    }

    #[test]
    fn keys_are_compared_decoded() {
        assert_eq!(duplicate(r#"{"a":1,"\u0061":2}"#), found("a", ""));
        assert_eq!(duplicate(r#"{"\u00e9":1,"é":2}"#), found("é", ""));
        assert_eq!(duplicate(r#"{"a\/b":1,"a/b":2}"#), found("a/b", ""));
        // A surrogate pair and the character it encodes.
        assert_eq!(duplicate(r#"{"😀":1,"\ud83d\ude00":2}"#), found("😀", ""));
    }

    #[test]
    fn a_body_that_is_not_json_is_not_json() {
        assert!(duplicate_key(b"{\"n\":").is_err());
        assert!(duplicate_key(b"{} {}").is_err());
        assert_eq!(
            parse_body(b""),
            Ok(Err("the request has no body".to_string()))
        );
        assert!(matches!(parse_body(b"{\"n\":"), Ok(Err(_))));
        // A malformed body is not JSON, even if it repeats a key before it breaks.
        assert!(matches!(parse_body(br#"{"n":1,"n":2"#), Ok(Err(_))));
    }

    #[test]
    fn parse_body_answers_the_value_or_the_duplicate() {
        assert_eq!(
            parse_body(br#"{"n":2,"m":{"n":1}}"#),
            Ok(Ok(serde_json::json!({"n": 2, "m": {"n": 1}})))
        );
        let duplicate = parse_body(br#"{"m":{"n":2,"n":1}}"#).unwrap_err();
        assert_eq!(
            duplicate.to_string(),
            r#"has the key "n" more than once in /m"#
        );
        assert_eq!(
            parse_body(br#"{"n":2,"n":1}"#).unwrap_err().to_string(),
            r#"has the key "n" more than once"#
        );
    }

    #[test]
    fn nesting_stays_bounded_by_the_parser() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(duplicate_key(deep.as_bytes()).is_err());
        assert!(matches!(parse_body(deep.as_bytes()), Ok(Err(_))));
        let nested = format!("{}1{}", r#"{"a":"#.repeat(100), "}".repeat(100));
        assert_eq!(duplicate_key(nested.as_bytes()), Ok(None));
    }

    #[test]
    fn within_sees_a_duplicate_from_inside_one_member() {
        let d = duplicate_key(br#"{"body":{"x":{"n":1,"n":2}}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(d.within("body").map(|d| d.pointer()), Some("/x".into()));
        assert_eq!(d.within("headers"), None);
        let top = duplicate_key(br#"{"body":1,"body":2}"#).unwrap().unwrap();
        assert_eq!(top.within("body"), None);
    }

    #[test]
    fn a_duplicate_among_many_keys_is_found() {
        let mut text = String::from("{");
        for i in 0..200_000 {
            text.push_str(&format!("\"k{i}\":{i},"));
        }
        text.push_str("\"k7\":0}");
        assert_eq!(duplicate(&text), found("k7", ""));
    }
}
