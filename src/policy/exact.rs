//! Exact numbers as requests and responses write them: quantities, table keys and
//! usages.
//!
//! They arrive as JSON numbers (`8`, `2.5E+3`, `18446744073709551616`, `1e400`) or
//! as text holding a plain decimal (`"8"`, `"0.5"`; OpenAI's video API writes
//! `"seconds": "8"`). [`Exact`] keeps the value exactly — any number of digits, any
//! exponent — and never goes through a float. Money needs one operation of it,
//! [`Exact::scaled_ceil`]: the value times integer factors, rounded *up* to a whole
//! unit, or `None` when that does not fit a `u64`. Nothing here panics, and no
//! operation allocates more than a small multiple of the text the number came from
//! (`1e999999999` is never written out).

use std::cmp::Ordering;
use std::fmt;

use serde_json::Value;

use super::Micros;

/// Exponents are kept within ±2^48: beyond that a value is far too large for any
/// price, or so small that it only ever rounds up to the smallest unit, and it
/// equals no table key a policy file can write. Keeping them bounded keeps every
/// exponent sum below `i64::MAX`.
const EXPONENT_LIMIT: i64 = 1 << 48;

/// An exact decimal number: `digits × 10^exponent`, with a sign.
///
/// Always canonical — no leading or trailing zero digits, and zero is positive
/// with no digits (`-0`, `0.000` and `0e5` are all zero) — so two values are
/// equal exactly when their fields are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exact {
    negative: bool,
    /// Significant digits (0..=9), most significant first; empty for zero.
    digits: Vec<u8>,
    exponent: i64,
}

impl Exact {
    pub const ZERO: Exact = Exact {
        negative: false,
        digits: Vec::new(),
        exponent: 0,
    };

    pub fn one() -> Exact {
        Exact {
            negative: false,
            digits: vec![1],
            exponent: 0,
        }
    }

    /// A JSON number as written: `-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`.
    pub fn from_json_number(text: &str) -> Option<Exact> {
        parse(text.as_bytes(), true)
    }

    /// A plain decimal, as text carries a number: `-?[0-9]+(.[0-9]+)?` — no
    /// exponent, no spaces, no `+`, no `NaN`.
    pub fn from_decimal(text: &str) -> Option<Exact> {
        parse(text.as_bytes(), false)
    }

    /// A JSON number, or a JSON string holding a plain decimal.
    pub fn from_json(value: &Value) -> Option<Exact> {
        match value {
            Value::Number(n) => Exact::from_json_number(&n.to_string()),
            Value::String(s) => Exact::from_decimal(s),
            _ => None,
        }
    }

    /// Below zero (`-0` is zero, not negative).
    pub fn is_negative(&self) -> bool {
        self.negative
    }

    pub fn is_zero(&self) -> bool {
        self.digits.is_empty()
    }

    /// How many decimal places the value needs: 0 for `8e3`, 3 for `0.125`.
    pub fn decimals(&self) -> u64 {
        u64::try_from(-self.exponent).unwrap_or(0)
    }

    /// `⌈self × factors × 10^shift⌉`, or `None` when it does not fit a `u64` (or
    /// `self` is negative). Exact at any size: the product is computed digit by
    /// digit, and only the digits below the unit are looked at to round up.
    pub fn scaled_ceil(&self, factors: &[u64], shift: i64) -> Option<u64> {
        if self.negative {
            return None;
        }
        if self.is_zero() || factors.contains(&0) {
            return Some(0);
        }
        let k = self.exponent + shift.clamp(-EXPONENT_LIMIT, EXPONENT_LIMIT);
        // The digits are at least 10^(n-1) and every factor at least 1, so the
        // result is at least 10^(n-1+k): past 10^19 it cannot fit (u64::MAX < 2·10^19).
        if self.digits.len() as i64 - 1 + k > 19 {
            return None;
        }
        let mut product = self.digits.clone();
        for &factor in factors {
            product = mul_small(&product, factor);
        }
        if k >= 0 {
            let whole = to_u64(&product)?;
            let scale = 10u64.checked_pow(u32::try_from(k).ok()?)?;
            return whole.checked_mul(scale);
        }
        let below = usize::try_from(-k).unwrap_or(usize::MAX);
        if below >= product.len() {
            // Entirely below the unit, and not zero: one unit.
            return Some(1);
        }
        let (whole, rest) = product.split_at(product.len() - below);
        let whole = to_u64(whole)?;
        if rest.iter().any(|d| *d != 0) {
            whole.checked_add(1)
        } else {
            Some(whole)
        }
    }
}

/// Terms of a sum whose digits lie this far below its largest digit or more only
/// ever decide whether anything is left below the unit (see [`sum_scaled_ceil`]).
const SUM_SPAN_DIGITS: i64 = 1 << 16;

/// `⌈Σ valueᵢ × factorᵢ × 10^shift⌉`, rounded once — the exact sum, not a sum of
/// rounded terms — or `None` when it does not fit a `u64` (or a value is
/// negative). Exact at any size and precision: the terms are added digit by digit,
/// aligned; a term whose digits all lie more than 20 places below every digit of
/// the others (it can only come from a huge exponent, like `1e-400000`) can no
/// longer carry into them, so it only says that something is left below the unit.
pub fn sum_scaled_ceil(terms: &[(&Exact, u64)], shift: i64) -> Option<u64> {
    let shift = shift.clamp(-EXPONENT_LIMIT, EXPONENT_LIMIT);
    // Each non-zero term's digits (most significant first) and the exponent of its last digit.
    let mut parts: Vec<(Vec<u8>, i64)> = Vec::new();
    for (value, factor) in terms {
        if value.negative {
            return None;
        }
        if value.is_zero() || *factor == 0 {
            continue;
        }
        let digits = mul_small(&value.digits, *factor);
        let low = value.exponent + shift;
        // At least 10^top: past 10^19 it cannot fit a u64.
        if low + digits.len() as i64 - 1 > 19 {
            return None;
        }
        parts.push((digits, low));
    }
    let top_of = |(digits, low): &(Vec<u8>, i64)| low + digits.len() as i64 - 1;
    parts.sort_by_key(|part| std::cmp::Reverse(top_of(part)));
    let Some(top) = parts.first().map(top_of) else {
        return Some(0);
    };
    // Keep terms from the largest down while they reach within 20 places of the
    // lowest digit kept so far or of the span below the top; the rest only count
    // as "something below". Tops only decrease, so once one is dropped all are.
    let mut low = i64::MAX;
    let mut kept = 0;
    for part in &parts {
        let part_top = top_of(part);
        if part_top < top - SUM_SPAN_DIGITS && part_top < low.saturating_sub(20) {
            break;
        }
        low = low.min(part.1);
        kept += 1;
    }
    let something_dropped = kept < parts.len();
    // Positions `low..=top + 20` (room for carries); index 0 is exponent `low`.
    let width = usize::try_from(top - low + 21).ok()?;
    let mut sum = vec![0u64; width];
    for (digits, part_low) in parts.iter().take(kept) {
        let from = usize::try_from(part_low - low).ok()?;
        for (i, d) in digits.iter().rev().enumerate() {
            let slot = sum.get_mut(from + i)?;
            *slot += u64::from(*d);
        }
    }
    let mut carry = 0u64;
    for slot in sum.iter_mut() {
        let t = *slot + carry;
        *slot = t % 10;
        carry = t / 10;
    }
    if carry > 0 {
        return None;
    }
    // Digits at exponent >= 0 are the whole part; below, anything non-zero rounds up.
    let unit = usize::try_from((-low).max(0)).ok()?.min(width);
    let (below, whole) = sum.split_at(unit);
    let whole_digits: Vec<u8> = whole.iter().rev().map(|d| *d as u8).collect();
    let mut value = to_u64(&whole_digits)?;
    if low > 0 {
        value = value.checked_mul(10u64.checked_pow(u32::try_from(low).ok()?)?)?;
    }
    if something_dropped || below.iter().any(|d| *d != 0) {
        value = value.checked_add(1)?;
    }
    Some(value)
}

impl From<Micros> for Exact {
    fn from(value: Micros) -> Exact {
        let text = value.micros().to_string();
        let mut exact = parse(text.as_bytes(), false).unwrap_or(Exact::ZERO);
        if !exact.is_zero() {
            exact.exponent -= 6;
        }
        exact
    }
}

fn parse(bytes: &[u8], json: bool) -> Option<Exact> {
    let digits_from = |at: usize| {
        bytes[at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    let negative = bytes.first() == Some(&b'-');
    let mut at = usize::from(negative);
    let int = &bytes[at..at + digits_from(at)];
    at += int.len();
    // JSON allows no leading zero (`08`); text does (`"08"` is 8).
    if int.is_empty() || json && int.len() > 1 && int[0] == b'0' {
        return None;
    }
    let mut frac: &[u8] = &[];
    if bytes.get(at) == Some(&b'.') {
        frac = &bytes[at + 1..at + 1 + digits_from(at + 1)];
        if frac.is_empty() {
            return None;
        }
        at += 1 + frac.len();
    }
    let mut exponent: i64 = 0;
    if json && matches!(bytes.get(at), Some(b'e' | b'E')) {
        at += 1;
        let below = bytes.get(at) == Some(&b'-');
        if matches!(bytes.get(at), Some(b'-' | b'+')) {
            at += 1;
        }
        let written = &bytes[at..at + digits_from(at)];
        if written.is_empty() {
            return None;
        }
        at += written.len();
        for d in written {
            exponent = (exponent * 10 + i64::from(d - b'0')).min(EXPONENT_LIMIT);
        }
        if below {
            exponent = -exponent;
        }
    }
    if at != bytes.len() {
        return None;
    }
    let mut digits: Vec<u8> = int
        .iter()
        .chain(frac)
        .map(|b| b - b'0')
        .skip_while(|d| *d == 0)
        .collect();
    let trailing = digits.iter().rev().take_while(|d| **d == 0).count();
    digits.truncate(digits.len() - trailing);
    if digits.is_empty() {
        return Some(Exact::ZERO);
    }
    // Text lengths are far below 2^48, so these sums stay within i64.
    let exponent = exponent - frac.len() as i64 + trailing as i64;
    Some(Exact {
        negative,
        digits,
        exponent,
    })
}

/// `digits × factor`, both non-zero, as digits without leading zeros.
fn mul_small(digits: &[u8], factor: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(digits.len() + 20);
    let mut carry: u128 = 0;
    for d in digits.iter().rev() {
        // At most 9 × u64::MAX + a carry below u64::MAX: far inside u128.
        let t = u128::from(*d) * u128::from(factor) + carry;
        out.push((t % 10) as u8);
        carry = t / 10;
    }
    while carry > 0 {
        out.push((carry % 10) as u8);
        carry /= 10;
    }
    out.reverse();
    out
}

/// The digits as a `u64`, or `None` when they do not fit.
fn to_u64(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, d| {
        acc.checked_mul(10)?.checked_add(u64::from(*d))
    })
}

impl Ord for Exact {
    fn cmp(&self, other: &Exact) -> Ordering {
        let sign = |e: &Exact| match (e.negative, e.is_zero()) {
            (true, _) => -1,
            (false, true) => 0,
            (false, false) => 1,
        };
        match sign(self).cmp(&sign(other)) {
            Ordering::Equal => {}
            unequal => return unequal,
        }
        // Same sign, both non-zero: the larger magnitude has its leading digit
        // higher, or the same position and larger digits.
        let magnitude = |e: &Exact| e.digits.len() as i64 + e.exponent;
        let by_size = magnitude(self)
            .cmp(&magnitude(other))
            .then_with(|| self.digits.cmp(&other.digits));
        if self.negative {
            by_size.reverse()
        } else {
            by_size
        }
    }
}

impl PartialOrd for Exact {
    fn partial_cmp(&self, other: &Exact) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Significant digits shown in scientific notation before `…`.
const SHOWN_DIGITS: usize = 24;

/// Plain (`8`, `0.5`, `1000000`) when that is short; else scientific (`1e400`,
/// `1.2345678901234567890123…e-30`), so an error message never repeats a
/// megabyte of digits.
impl fmt::Display for Exact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_zero() {
            return f.write_str("0");
        }
        if self.negative {
            f.write_str("-")?;
        }
        let digit = |d: &u8| char::from(b'0' + d);
        let n = self.digits.len() as i64;
        // Where the decimal point falls, counted in digits from the first one.
        let point = n + self.exponent;
        let plain_len = if self.exponent >= 0 {
            point
        } else if point > 0 {
            n + 1
        } else {
            2 - point + n
        };
        if plain_len <= 40 {
            let mut text = String::new();
            if point <= 0 {
                text.push_str("0.");
                text.extend(std::iter::repeat_n('0', (-point) as usize));
                text.extend(self.digits.iter().map(digit));
            } else {
                for (i, d) in self.digits.iter().enumerate() {
                    if i as i64 == point {
                        text.push('.');
                    }
                    text.push(digit(d));
                }
                text.extend(std::iter::repeat_n('0', (point - n).max(0) as usize));
            }
            return f.write_str(&text);
        }
        let mut text = String::new();
        text.push(digit(&self.digits[0]));
        if n > 1 {
            text.push('.');
            text.extend(self.digits[1..].iter().take(SHOWN_DIGITS - 1).map(digit));
            if self.digits.len() > SHOWN_DIGITS {
                text.push('…');
            }
        }
        write!(f, "{text}e{}", point - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Exact {
        Exact::from_json_number(text).unwrap_or_else(|| panic!("{text} is a JSON number"))
    }

    #[test]
    fn json_numbers_and_plain_decimals_parse_exactly() {
        assert_eq!(json("8"), json("8.0"));
        assert_eq!(json("8"), json("8e0"));
        assert_eq!(json("8"), json("0.8E+1"));
        assert_eq!(json("8"), json("800e-2"));
        assert_eq!(json("0.5"), json("5e-1"));
        assert_eq!(json("-0"), Exact::ZERO);
        assert_eq!(json("-0.0e-7"), Exact::ZERO);
        assert!(!json("-0").is_negative());
        assert!(json("-1e-400").is_negative());
        assert_ne!(json("18446744073709551616"), json("18446744073709551615"));
        assert_eq!(Exact::from_decimal("08"), Some(json("8")));
        assert_eq!(Exact::from_decimal("-0"), Some(Exact::ZERO));
        assert_eq!(Exact::from_decimal("2.50"), Some(json("2.5")));
        for bad in [
            "", "-", "08", "1.", ".5", "+1", "1e", "1e+", "0x10", "1_000", " 1", "1 ", "NaN",
            "inf", "--1", "1.2.3",
        ] {
            assert_eq!(Exact::from_json_number(bad), None, "{bad:?}");
        }
        for bad in ["", "1e3", "1.", ".5", "+1", " 1", "1 ", "NaN", "1,5", "٣"] {
            assert_eq!(Exact::from_decimal(bad), None, "{bad:?}");
        }
        assert_eq!(
            Exact::from(Micros::parse("0.000125").unwrap()),
            json("1.25e-4")
        );
        assert_eq!(Exact::from(Micros::parse("0").unwrap()), Exact::ZERO);
        assert_eq!(Exact::from(Micros::parse("60").unwrap()), json("60"));
        assert_eq!(json("8e3").decimals(), 0);
        assert_eq!(json("0.1250").decimals(), 3);
        assert_eq!(json("125e-5").decimals(), 5);
        assert_eq!(json("0").decimals(), 0);
    }

    #[test]
    fn values_order_by_size() {
        let sorted = [
            "-1e400",
            "-2",
            "-1.5",
            "-1e-400",
            "0",
            "1e-400",
            "0.5",
            "1",
            "1.0000001",
            "2",
            "10",
            "1e400",
        ];
        for pair in sorted.windows(2) {
            assert!(json(pair[0]) < json(pair[1]), "{} < {}", pair[0], pair[1]);
            assert!(json(pair[1]) > json(pair[0]), "{} > {}", pair[1], pair[0]);
        }
        assert_eq!(json("1.50").cmp(&json("15e-1")), Ordering::Equal);
    }

    #[test]
    fn huge_exponents_are_bounded_and_never_expanded() {
        let huge = json("1e999999999999999999999999");
        assert_eq!(huge.scaled_ceil(&[1], 0), None);
        let tiny = json("1e-999999999999999999999999");
        assert_eq!(tiny.scaled_ceil(&[1], 0), Some(1));
        assert_eq!(tiny.scaled_ceil(&[u64::MAX, u64::MAX], 1_000), Some(1));
        assert_eq!(huge.to_string(), format!("1e{EXPONENT_LIMIT}"));
    }

    #[test]
    fn scaled_ceil_rounds_up_and_refuses_what_does_not_fit() {
        assert_eq!(json("1234").scaled_ceil(&[2_000], -3), Some(2_468));
        assert_eq!(json("1.1234567").scaled_ceil(&[2_000], -3), Some(3));
        assert_eq!(json("1.1234567").scaled_ceil(&[], 7), Some(11_234_567));
        assert_eq!(json("1.1234567").scaled_ceil(&[], 6), Some(1_123_457));
        assert_eq!(json("0").scaled_ceil(&[u64::MAX], 400), Some(0));
        assert_eq!(json("1e400").scaled_ceil(&[0], 0), Some(0));
        assert_eq!(
            json("18446744073709551615").scaled_ceil(&[1], 0),
            Some(u64::MAX)
        );
        assert_eq!(json("18446744073709551616").scaled_ceil(&[1], 0), None);
        assert_eq!(json("18446744073709551615").scaled_ceil(&[2], 0), None);
        assert_eq!(
            json("1844674407370955161.5").scaled_ceil(&[1], 1),
            Some(u64::MAX)
        );
        assert_eq!(json("1844674407370955161.51").scaled_ceil(&[1], 1), None);
        assert_eq!(
            json("1e19").scaled_ceil(&[1], 0),
            Some(10_000_000_000_000_000_000)
        );
        assert_eq!(json("1e20").scaled_ceil(&[1], 0), None);
        assert_eq!(json("-1").scaled_ceil(&[1], 0), None);
        assert_eq!(json("2.5").scaled_ceil(&[u64::MAX, u64::MAX], -40), Some(1));
    }

    #[test]
    fn display_is_plain_when_short_and_scientific_when_long() {
        for (text, shown) in [
            ("8", "8"),
            ("8.50", "8.5"),
            ("-0", "0"),
            ("-2.5e1", "-25"),
            ("1e6", "1000000"),
            ("1.5e-3", "0.0015"),
            ("1e400", "1e400"),
            ("1.25e-50", "1.25e-50"),
            (
                "123456789012345678901234567890.5",
                "123456789012345678901234567890.5",
            ),
            (
                "1234567890123456789012345678901234567890123",
                "1.23456789012345678901234…e42",
            ),
        ] {
            assert_eq!(json(text).to_string(), shown, "{text}");
        }
    }
}
