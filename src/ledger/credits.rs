//! `Credits`: money as an integer count of millicredits.
//!
//! Floats never touch money. Parsing `"0.5"` is exact, arithmetic is checked, and
//! formatting never prints trailing zeros (`3`, `0.5`, `12.125`).

use std::fmt;
use std::str::FromStr;

/// Millicredits per credit.
const SCALE: u64 = 1_000;

/// An amount of credits, stored as whole millicredits.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Credits(u64);

/// Why a decimal string is not an amount of credits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseCreditsError {
    #[error("not a decimal number")]
    NotDecimal,
    #[error("negative amounts are not allowed")]
    Negative,
    #[error("more than 3 decimal places (credits are exact to 0.001)")]
    TooPrecise,
    #[error("amount is too large")]
    TooLarge,
}

impl Credits {
    pub const ZERO: Credits = Credits(0);

    pub const fn from_millicredits(millicredits: u64) -> Self {
        Credits(millicredits)
    }

    pub const fn millicredits(self) -> u64 {
        self.0
    }

    /// Whole credits, e.g. from a TOML integer.
    pub fn from_whole(credits: u64) -> Option<Self> {
        credits.checked_mul(SCALE).map(Credits)
    }

    /// For serde's `skip_serializing_if`.
    pub fn is_zero_ref(&self) -> bool {
        self.is_zero()
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn checked_add(self, other: Credits) -> Option<Credits> {
        self.0.checked_add(other.0).map(Credits)
    }

    pub fn checked_sub(self, other: Credits) -> Option<Credits> {
        self.0.checked_sub(other.0).map(Credits)
    }

    /// `self - other`, or zero when `other` is larger.
    pub fn saturating_sub(self, other: Credits) -> Credits {
        Credits(self.0.saturating_sub(other.0))
    }

    pub fn min(self, other: Credits) -> Credits {
        Credits(self.0.min(other.0))
    }

    /// The amount as a JSON number written exactly as its decimal text (`0.5`,
    /// `3`, `18446744073709551.615`), never through a float: serde_json's
    /// `arbitrary_precision` feature keeps a number's text.
    pub fn to_json(self) -> serde_json::Value {
        // The decimal text is a valid JSON number, so this cannot fail.
        self.decimal()
            .as_str()
            .parse::<serde_json::Number>()
            .map_or(serde_json::Value::Null, serde_json::Value::Number)
    }
}

/// A [`Credits`] amount written out on the stack, without trailing zeros: `3`,
/// `0.5`, `12.125`. The gateway writes two on every response, so no allocation.
pub struct Decimal {
    bytes: [u8; 24],
    len: usize,
}

impl Decimal {
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and '.' are ever written, within the buffer.
        std::str::from_utf8(self.bytes.get(..self.len).unwrap_or_default()).unwrap_or("")
    }
}

impl Credits {
    /// This amount as decimal text (see [`Decimal`]); `Display` writes the same.
    pub fn decimal(self) -> Decimal {
        use std::io::Write as _;
        let mut bytes = [0u8; 24];
        let mut rest: &mut [u8] = &mut bytes;
        let (whole, mut frac) = (self.0 / SCALE, self.0 % SCALE);
        // The longest amount, u64::MAX millicredits, is 17 digits, a point and 3
        // decimals: it always fits, so the write cannot fail.
        let _ = if frac == 0 {
            write!(rest, "{whole}")
        } else {
            let mut width = 3;
            while frac % 10 == 0 {
                frac /= 10;
                width -= 1;
            }
            write!(rest, "{whole}.{frac:0width$}")
        };
        let len = 24 - rest.len();
        Decimal { bytes, len }
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.decimal().as_str())
    }
}

impl FromStr for Credits {
    type Err = ParseCreditsError;

    /// Parses `12`, `0.5`, `12.125` exactly. Refuses signs other than a leading
    /// `+`, exponents, and more than 3 decimal places.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let text = text.strip_prefix('+').unwrap_or(text);
        if text.starts_with('-') {
            return Err(ParseCreditsError::Negative);
        }
        let text = text.replace('_', "");
        let (whole, frac) = match text.split_once('.') {
            Some((w, f)) => (w, f),
            None => (text.as_str(), ""),
        };
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !all_digits(whole) || !all_digits(frac) {
            return Err(ParseCreditsError::NotDecimal);
        }
        let frac = frac.trim_end_matches('0');
        if frac.len() > 3 {
            return Err(ParseCreditsError::TooPrecise);
        }
        let whole: u64 = whole.parse().map_err(|_| ParseCreditsError::TooLarge)?;
        let frac_milli: u64 = format!("{frac:0<3}")
            .parse()
            .map_err(|_| ParseCreditsError::NotDecimal)?;
        whole
            .checked_mul(SCALE)
            .and_then(|m| m.checked_add(frac_milli))
            .map(Credits)
            .ok_or(ParseCreditsError::TooLarge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exactly() {
        assert_eq!("0.5".parse::<Credits>(), Ok(Credits(500)));
        assert_eq!("12.125".parse::<Credits>(), Ok(Credits(12_125)));
        assert_eq!("3".parse::<Credits>(), Ok(Credits(3_000)));
        assert_eq!("3.000".parse::<Credits>(), Ok(Credits(3_000)));
        assert_eq!("0.001".parse::<Credits>(), Ok(Credits(1)));
        assert_eq!("1_000".parse::<Credits>(), Ok(Credits(1_000_000)));
    }

    #[test]
    fn refuses_bad_amounts() {
        assert_eq!(
            "0.0005".parse::<Credits>(),
            Err(ParseCreditsError::TooPrecise)
        );
        assert_eq!("-1".parse::<Credits>(), Err(ParseCreditsError::Negative));
        assert_eq!("1e3".parse::<Credits>(), Err(ParseCreditsError::NotDecimal));
        assert_eq!("".parse::<Credits>(), Err(ParseCreditsError::NotDecimal));
        assert_eq!(".5".parse::<Credits>(), Err(ParseCreditsError::NotDecimal));
        assert_eq!("nan".parse::<Credits>(), Err(ParseCreditsError::NotDecimal));
        assert_eq!(
            "99999999999999999999".parse::<Credits>(),
            Err(ParseCreditsError::TooLarge)
        );
    }

    #[test]
    fn displays_without_trailing_zeros() {
        assert_eq!(Credits(3_000).to_string(), "3");
        assert_eq!(Credits(500).to_string(), "0.5");
        assert_eq!(Credits(12_125).to_string(), "12.125");
        assert_eq!(Credits(10).to_string(), "0.01");
        assert_eq!(Credits(0).to_string(), "0");
        assert_eq!(Credits(1).to_string(), "0.001");
        assert_eq!(Credits(1_010).to_string(), "1.01");
        assert_eq!(Credits(100_000).to_string(), "100");
        assert_eq!(Credits(u64::MAX).to_string(), "18446744073709551.615");
        assert_eq!(
            Credits(u64::MAX).decimal().as_str(),
            "18446744073709551.615"
        );
        assert_eq!(Credits(500).to_json().to_string(), "0.5");
    }

    #[test]
    fn json_amounts_are_written_exactly_never_through_a_float() {
        for text in [
            "18446744073709551.615",
            "9999999999999.999",
            "0.001",
            "3",
            "12.125",
        ] {
            let credits: Credits = text.parse().unwrap();
            assert_eq!(credits.to_json().to_string(), text);
            assert_eq!(
                serde_json::json!({ "c": credits.to_json() }).to_string(),
                format!("{{\"c\":{text}}}")
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn decimal_text_reads_back_exactly(milli in proptest::prelude::any::<u64>()) {
            let text = Credits(milli).to_string();
            proptest::prop_assert_eq!(text.parse::<Credits>(), Ok(Credits(milli)));
            proptest::prop_assert!(!text.contains('.') || !text.ends_with('0'));
        }
    }

    #[test]
    fn arithmetic_is_checked() {
        assert_eq!(Credits(u64::MAX).checked_add(Credits(1)), None);
        assert_eq!(Credits(1).checked_sub(Credits(2)), None);
        assert_eq!(Credits::from_whole(u64::MAX), None);
    }
}
