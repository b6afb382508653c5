//! How an account's remembered ended holds are stored: one byte string, 9 bytes a
//! hold (its id, little-endian, then how it ended), instead of a list of pairs.
//! The list is most of an account's state, and a Redis replica writes that state
//! on every hold and settle: as bytes it encodes in one step instead of ~130.
//!
//! Reading also accepts what earlier versions wrote — a list of `[id, "Settled"]`
//! pairs — and the bytes as a list of numbers (how JSON writes bytes).

use std::collections::VecDeque;
use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serializer};

use super::Ending;

const WIDTH: usize = 9;

fn code(ending: Ending) -> u8 {
    match ending {
        Ending::Settled => 0,
        Ending::Released => 1,
        Ending::Expired => 2,
    }
}

fn ending(code: u8) -> Option<Ending> {
    match code {
        0 => Some(Ending::Settled),
        1 => Some(Ending::Released),
        2 => Some(Ending::Expired),
        _ => None,
    }
}

pub fn serialize<S: Serializer>(ended: &VecDeque<(u64, Ending)>, s: S) -> Result<S::Ok, S::Error> {
    let mut bytes = Vec::with_capacity(ended.len() * WIDTH);
    for (id, how) in ended {
        bytes.extend_from_slice(&id.to_le_bytes());
        bytes.push(code(*how));
    }
    s.serialize_bytes(&bytes)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VecDeque<(u64, Ending)>, D::Error> {
    d.deserialize_any(EndedVisitor)
}

fn from_bytes<E: de::Error>(bytes: &[u8]) -> Result<VecDeque<(u64, Ending)>, E> {
    if !bytes.len().is_multiple_of(WIDTH) {
        return Err(E::custom("ended holds: not a whole number of records"));
    }
    bytes
        .chunks_exact(WIDTH)
        .map(|record| {
            let (id, how) = record
                .split_first_chunk::<8>()
                .ok_or_else(|| E::custom("ended holds: a record is too short"))?;
            how.first()
                .and_then(|&code| ending(code))
                .map(|how| (u64::from_le_bytes(*id), how))
                .ok_or_else(|| E::custom("ended holds: unknown ending"))
        })
        .collect()
}

/// One element of a list: a pair (the earlier form) or a byte (bytes written as JSON).
#[derive(Deserialize)]
#[serde(untagged)]
enum Element {
    Pair(u64, Ending),
    Byte(u8),
}

struct EndedVisitor;

impl<'de> Visitor<'de> for EndedVisitor {
    type Value = VecDeque<(u64, Ending)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("ended holds as bytes or as a list of [id, ending] pairs")
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Self::Value, E> {
        from_bytes(bytes)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let (mut pairs, mut bytes) = (VecDeque::new(), Vec::new());
        while let Some(element) = seq.next_element::<Element>()? {
            match element {
                Element::Pair(id, how) => pairs.push_back((id, how)),
                Element::Byte(b) => bytes.push(b),
            }
        }
        match (pairs.is_empty(), bytes.is_empty()) {
            (_, true) => Ok(pairs),
            (true, false) => from_bytes(&bytes),
            (false, false) => Err(de::Error::custom("ended holds: pairs and bytes mixed")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Holder {
        #[serde(with = "super")]
        ended: VecDeque<(u64, Ending)>,
    }

    fn sample() -> Holder {
        Holder {
            ended: VecDeque::from([
                (7, Ending::Settled),
                (u64::MAX, Ending::Released),
                (9, Ending::Expired),
            ]),
        }
    }

    #[test]
    fn round_trips_in_messagepack_and_json() {
        let packed = rmp_serde::to_vec_named(&sample()).unwrap();
        assert_eq!(rmp_serde::from_slice::<Holder>(&packed).unwrap(), sample());
        let json = serde_json::to_string(&sample()).unwrap();
        assert_eq!(serde_json::from_str::<Holder>(&json).unwrap(), sample());
        let empty = Holder {
            ended: VecDeque::new(),
        };
        let packed = rmp_serde::to_vec_named(&empty).unwrap();
        assert_eq!(rmp_serde::from_slice::<Holder>(&packed).unwrap(), empty);
    }

    #[test]
    fn reads_the_earlier_list_of_pairs() {
        let earlier =
            r#"{"ended":[[7,"Settled"],[18446744073709551615,"Released"],[9,"Expired"]]}"#;
        assert_eq!(serde_json::from_str::<Holder>(earlier).unwrap(), sample());
    }

    #[test]
    fn refuses_damaged_bytes() {
        assert!(serde_json::from_str::<Holder>(r#"{"ended":[1,2,3]}"#).is_err());
        let bad_ending = format!(
            "{{\"ended\":[{}]}}",
            [1, 0, 0, 0, 0, 0, 0, 0, 9]
                .map(|b: u8| b.to_string())
                .join(",")
        );
        assert!(serde_json::from_str::<Holder>(&bad_ending).is_err());
        assert!(serde_json::from_str::<Holder>(r#"{"ended":[[1,"Settled"],5]}"#).is_err());
    }
}
