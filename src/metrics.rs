//! Counters for `/metrics` (Prometheus text format), kept with atomics.
//!
//! Every label set is bounded: operations come from the policy (plus `unmatched`),
//! outcomes from a fixed list. Nothing here grows with traffic.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use dashmap::DashMap;

use crate::ledger::Credits;
use crate::store::StoreError;

/// Upper bounds of the store latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The kinds of store failure, as `creditgate_store_errors_total` labels them.
const STORE_FAILURE_KINDS: [&str; 3] = ["unavailable", "contended", "corrupt"];

/// Most distinct (operation, outcome) pairs counted; past it they count as `other`.
const MAX_SERIES: usize = 4_096;

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    /// Per operation: its outcomes and their counts (a handful each). Keyed by
    /// the operation alone so counting a request looks up a `&str`, allocating
    /// nothing once the series exists.
    requests: DashMap<String, Mutex<Vec<(&'static str, u64)>>>,
    series: AtomicUsize,
    held_milli: AtomicU64,
    settled_milli: AtomicU64,
    released_milli: AtomicU64,
    expired_holds: AtomicU64,
    holds_in_flight: AtomicI64,
    store_latency: Histogram,
    /// Per kind, in the order of `STORE_FAILURE_KINDS`.
    store_errors: [AtomicU64; STORE_FAILURE_KINDS.len()],
    unmetered: AtomicU64,
}

impl Metrics {
    /// One finished request: its operation (or `unmatched`) and how it ended
    /// (`settled`, `released`, `free`, or the error type the gateway answered).
    pub fn request(&self, operation: &str, outcome: &'static str) {
        if !self.count_or_add(operation, outcome, false) {
            // Past MAX_SERIES, a new pair counts as `other`, which always may.
            self.count_or_add("other", outcome, true);
        }
    }

    /// Counts one (operation, outcome); false, counting nothing, when that would
    /// start a new series past `MAX_SERIES` and `always` is not set.
    fn count_or_add(&self, operation: &str, outcome: &'static str, always: bool) -> bool {
        let bump = |outcomes: &Mutex<Vec<(&'static str, u64)>>| {
            // A poisoned lock only means a panic elsewhere; the counts are plain numbers.
            let mut outcomes = outcomes.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, n)) = outcomes.iter_mut().find(|(o, _)| *o == outcome) {
                *n += 1;
                return true;
            }
            if !always && self.series.load(Ordering::Relaxed) >= MAX_SERIES {
                return false;
            }
            self.series.fetch_add(1, Ordering::Relaxed);
            outcomes.push((outcome, 1));
            true
        };
        if let Some(outcomes) = self.requests.get(operation) {
            return bump(&outcomes);
        }
        if !always && self.series.load(Ordering::Relaxed) >= MAX_SERIES {
            return false;
        }
        bump(&self.requests.entry(operation.to_string()).or_default())
    }

    pub fn held(&self, credits: Credits) {
        self.held_milli
            .fetch_add(credits.millicredits(), Ordering::Relaxed);
        self.holds_in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn expired_holds(&self, n: usize) {
        self.expired_holds.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// One store call: how long it took, and how it failed, if it did. An unknown
    /// account is an answer, not a failure of the store.
    pub fn store_call(&self, took: Duration, error: Option<&StoreError>) {
        let seconds = took.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.store_latency.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.store_latency.count.fetch_add(1, Ordering::Relaxed);
        self.store_latency
            .sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        let kind = error.and_then(StoreError::failure_kind);
        if let Some(i) = kind.and_then(|k| STORE_FAILURE_KINDS.iter().position(|&s| s == k)) {
            self.store_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs a store call and records how long it took and whether it failed.
    pub async fn store<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let out = call.await;
        self.store_call(started.elapsed(), out.as_ref().err());
        out
    }

    /// A hold this gateway placed has ended (or was given up on).
    pub fn hold_ended(&self, charged: Credits, returned: Credits) {
        self.settled_milli
            .fetch_add(charged.millicredits(), Ordering::Relaxed);
        self.released_milli
            .fetch_add(returned.millicredits(), Ordering::Relaxed);
        self.holds_in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn unmetered(&self) -> u64 {
        self.unmetered.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let credits = |milli: &AtomicU64| {
            Credits::from_millicredits(milli.load(Ordering::Relaxed)).to_string()
        };
        out.push_str("# HELP creditgate_requests_total Requests by operation and outcome.\n# TYPE creditgate_requests_total counter\n");
        let mut series: Vec<((String, &'static str), u64)> = Vec::new();
        for entry in self.requests.iter() {
            let outcomes = entry.value().lock().unwrap_or_else(|e| e.into_inner());
            series.extend(
                outcomes
                    .iter()
                    .map(|(outcome, n)| ((entry.key().clone(), *outcome), *n)),
            );
        }
        series.sort();
        for ((operation, outcome), n) in series {
            let _ = writeln!(
                out,
                "creditgate_requests_total{{operation=\"{}\",outcome=\"{outcome}\"}} {n}",
                escape(&operation)
            );
        }
        for (name, help, value) in [
            (
                "creditgate_credits_held_total",
                "Credits held for requests.",
                credits(&self.held_milli),
            ),
            (
                "creditgate_credits_settled_total",
                "Credits charged when holds were settled.",
                credits(&self.settled_milli),
            ),
            (
                "creditgate_credits_released_total",
                "Credits returned when holds were released.",
                credits(&self.released_milli),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let _ = writeln!(out, "# HELP creditgate_holds_expired_total Holds released by the sweep after hold_ttl.\n# TYPE creditgate_holds_expired_total counter\ncreditgate_holds_expired_total {}", self.expired_holds.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP creditgate_holds_in_flight Holds this gateway placed and has not ended.\n# TYPE creditgate_holds_in_flight gauge\ncreditgate_holds_in_flight {}", self.holds_in_flight.load(Ordering::Relaxed));
        out.push_str("# HELP creditgate_store_errors_total Store calls that failed, by kind: unavailable (no answer), contended (retries exhausted), corrupt (state that does not decode).\n# TYPE creditgate_store_errors_total counter\n");
        for (kind, count) in STORE_FAILURE_KINDS.iter().zip(&self.store_errors) {
            let _ = writeln!(
                out,
                "creditgate_store_errors_total{{kind=\"{kind}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP creditgate_unmetered_total Requests forwarded without a hold because the store was unavailable.\n# TYPE creditgate_unmetered_total counter\ncreditgate_unmetered_total {}", self.unmetered.load(Ordering::Relaxed));
        out.push_str("# HELP creditgate_store_latency_seconds Latency of store calls.\n# TYPE creditgate_store_latency_seconds histogram\n");
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "creditgate_store_latency_seconds_bucket{{le=\"{bound}\"}} {}",
                self.store_latency.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.store_latency.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "creditgate_store_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "creditgate_store_latency_seconds_sum {}",
            self.store_latency.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "creditgate_store_latency_seconds_count {count}");
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_of(metrics: &Metrics, operation: &str, outcome: &str) -> Option<u64> {
        let line = format!(
            "creditgate_requests_total{{operation=\"{operation}\",outcome=\"{outcome}\"}} "
        );
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()).map(|n| n.parse().unwrap()))
    }

    #[test]
    fn requests_are_counted_per_operation_and_outcome() {
        let metrics = Metrics::default();
        metrics.request("image", "settled");
        metrics.request("image", "settled");
        metrics.request("image", "released");
        metrics.request("video", "settled");
        assert_eq!(count_of(&metrics, "image", "settled"), Some(2));
        assert_eq!(count_of(&metrics, "image", "released"), Some(1));
        assert_eq!(count_of(&metrics, "video", "settled"), Some(1));
    }

    #[test]
    fn store_errors_are_counted_by_kind() {
        let metrics = Metrics::default();
        let took = Duration::from_micros(300);
        metrics.store_call(took, None);
        metrics.store_call(took, Some(&StoreError::Unavailable("down".into())));
        metrics.store_call(took, Some(&StoreError::Unavailable("down".into())));
        metrics.store_call(took, Some(&StoreError::Corrupt("garbage".into())));
        metrics.store_call(took, Some(&StoreError::UnknownAccount("gone".into())));
        let text = metrics.render();
        let count = |kind: &str| {
            let prefix = format!("creditgate_store_errors_total{{kind=\"{kind}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .map(str::to_string)
        };
        assert_eq!(count("unavailable").as_deref(), Some("2"));
        assert_eq!(count("contended").as_deref(), Some("0"));
        assert_eq!(count("corrupt").as_deref(), Some("1"));
        assert!(
            text.contains("creditgate_store_latency_seconds_count 5"),
            "{text}"
        );
        // Every sample line is a valid Prometheus series: name, optional labels, value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let name = series.split('{').next().unwrap();
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "{line}"
            );
        }
    }

    #[test]
    fn series_past_the_cap_count_as_other() {
        let metrics = Metrics::default();
        for i in 0..MAX_SERIES {
            metrics.request(&format!("op{i}"), "settled");
        }
        metrics.request("op0", "settled");
        metrics.request("late", "settled");
        metrics.request("op1", "released");
        assert_eq!(count_of(&metrics, "op0", "settled"), Some(2));
        assert_eq!(count_of(&metrics, "late", "settled"), None);
        assert_eq!(count_of(&metrics, "other", "settled"), Some(1));
        assert_eq!(count_of(&metrics, "other", "released"), Some(1));
    }
}
