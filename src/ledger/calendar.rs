//! Billing cycles: monthly, on an anchor day, at 00:00 UTC.
//!
//! A month without the anchor day uses its last day (anchor 31 → 28 or 29 in
//! February, 30 in April). Pure date arithmetic: `now` is always an argument.

use chrono::{Datelike, NaiveDate};

use super::Millis;

/// The anchor day as it falls in `year`-`month`: clamped to the month's last day.
fn anchor_in(year: i32, month: u32, anchor_day: u8) -> Option<NaiveDate> {
    let first_of_next = if month == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)?
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)?
    };
    let last_day = first_of_next.pred_opt()?.day();
    NaiveDate::from_ymd_opt(year, month, u32::from(anchor_day).clamp(1, last_day))
}

fn shift_month(year: i32, month: u32, by: i32) -> (i32, u32) {
    let index = year * 12 + month as i32 - 1 + by;
    (index.div_euclid(12), index.rem_euclid(12) as u32 + 1)
}

fn midnight_ms(date: NaiveDate) -> Millis {
    date.and_hms_opt(0, 0, 0)
        .map_or(0, |t| t.and_utc().timestamp_millis().max(0) as Millis)
}

/// The day of month (UTC) of `now_ms`: the default anchor of a new account.
pub fn day_of_month(now_ms: Millis) -> u8 {
    chrono::DateTime::from_timestamp_millis(now_ms as i64).map_or(1, |t| t.day() as u8)
}

/// The billing cycle containing `now_ms`: `(start, next)` in Unix milliseconds,
/// `start <= now_ms < next`.
pub fn cycle_bounds(anchor_day: u8, now_ms: Millis) -> (Millis, Millis) {
    let today = chrono::DateTime::from_timestamp_millis(now_ms as i64)
        .map_or(NaiveDate::MIN, |t| t.date_naive());
    let (y, m) = (today.year(), today.month());
    let this_month = anchor_in(y, m, anchor_day);
    let (start_y, start_m) = match this_month {
        Some(anchor) if anchor <= today => (y, m),
        _ => shift_month(y, m, -1),
    };
    let (next_y, next_m) = shift_month(start_y, start_m, 1);
    let start = anchor_in(start_y, start_m, anchor_day).map_or(0, midnight_ms);
    let next = anchor_in(next_y, next_m, anchor_day).map_or(Millis::MAX, midnight_ms);
    (start, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> Millis {
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis() as Millis
    }

    fn day(ms: Millis) -> String {
        chrono::DateTime::from_timestamp_millis(ms as i64)
            .unwrap()
            .format("%Y-%m-%d")
            .to_string()
    }

    #[test]
    fn cycles_across_years_month_ends_and_leap_years() {
        // (anchor, now, expected start, expected next)
        let table = [
            (15, "2026-11-21T06:00:00Z", "2026-11-15", "2026-12-15"),
            (15, "2026-11-15T00:00:00Z", "2026-11-15", "2026-12-15"),
            (15, "2026-11-14T23:59:59Z", "2026-10-15", "2026-11-15"),
            (31, "2026-01-31T00:00:00Z", "2026-01-31", "2026-02-28"),
            (31, "2026-02-27T12:00:00Z", "2026-01-31", "2026-02-28"),
            (31, "2026-02-28T00:00:00Z", "2026-02-28", "2026-03-31"),
            (31, "2026-03-30T00:00:00Z", "2026-02-28", "2026-03-31"),
            (31, "2026-04-30T00:00:00Z", "2026-04-30", "2026-05-31"),
            (31, "2028-02-29T00:00:00Z", "2028-02-29", "2028-03-31"),
            (31, "2028-02-28T23:00:00Z", "2028-01-31", "2028-02-29"),
            (29, "2027-02-28T00:00:00Z", "2027-02-28", "2027-03-29"),
            (29, "2028-02-28T00:00:00Z", "2028-01-29", "2028-02-29"),
            (30, "2100-02-28T00:00:00Z", "2100-02-28", "2100-03-30"),
            (1, "2026-12-31T23:59:59Z", "2026-12-01", "2027-01-01"),
            (1, "2027-01-01T00:00:00Z", "2027-01-01", "2027-02-01"),
            (28, "2027-01-05T00:00:00Z", "2026-12-28", "2027-01-28"),
        ];
        for (anchor, now, start, next) in table {
            let (s, n) = cycle_bounds(anchor, ms(now));
            assert_eq!(
                (day(s), day(n)),
                (start.to_string(), next.to_string()),
                "anchor {anchor} at {now}"
            );
            assert!(s <= ms(now) && ms(now) < n);
        }
    }

    #[test]
    fn every_day_of_four_years_is_in_exactly_one_cycle_per_anchor() {
        for anchor in [1u8, 15, 28, 29, 30, 31] {
            let mut at = ms("2026-01-01T12:00:00Z");
            let mut previous = cycle_bounds(anchor, at);
            let mut cycles = 1;
            for _ in 0..(4 * 366) {
                at += 86_400_000;
                let bounds = cycle_bounds(anchor, at);
                if bounds != previous {
                    assert_eq!(
                        bounds.0, previous.1,
                        "cycles are contiguous (anchor {anchor})"
                    );
                    cycles += 1;
                    previous = bounds;
                }
            }
            assert!(
                (48..=50).contains(&cycles),
                "anchor {anchor}: {cycles} cycles in 4 years"
            );
        }
    }
}
