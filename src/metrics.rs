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
use crate::store::{PendingEndsView, StoreError};

/// Upper bounds of the store latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Upper bounds of the request and upstream duration histograms, in seconds: from
/// a refusal answered at once to a long generation.
const DURATION_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// How an upstream answered, as `creditgate_upstream_responses_total` labels it:
/// its status class, or `error` when no response came (refused, reset, timed out).
const UPSTREAM_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// How a policy reload ended, as `creditgate_policy_reloads_total` labels it.
pub const RELOAD_RESULTS: [&str; 4] = ["ok", "invalid", "refused", "failed"];

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

/// A duration histogram of one operation, with `DURATION_BUCKETS`.
#[derive(Default)]
struct Durations {
    buckets: [AtomicU64; DURATION_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Durations {
    fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, operation: &str) {
        let operation = escape(operation);
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{operation=\"{operation}\",le=\"{bound}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{operation=\"{operation}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "{name}_sum{{operation=\"{operation}\"}} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{operation=\"{operation}\"}} {count}");
    }
}

/// What is timed and counted per operation beyond its outcomes.
#[derive(Default)]
struct PerOperation {
    request: Durations,
    upstream: Durations,
    /// Per class, in the order of `UPSTREAM_CLASSES`.
    upstream_responses: [AtomicU64; UPSTREAM_CLASSES.len()],
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
    /// Durations and upstream answers per operation (the operations of the
    /// policies served, `unmatched`, and `other` past `MAX_SERIES`).
    operations: DashMap<String, PerOperation>,
    /// Per result, in the order of `RELOAD_RESULTS`.
    reloads: [AtomicU64; RELOAD_RESULTS.len()],
    /// Webhook events delivered (to every webhook that wants them).
    pub events_delivered: AtomicU64,
    /// Webhook events given up on: retried past `retry_for`, or dropped from a
    /// full outbox.
    pub events_failed: AtomicU64,
    /// Delivery attempts a webhook refused or did not answer.
    pub event_attempts_failed: AtomicU64,
    /// Events waiting in the outbox, as the sender last saw it.
    pub events_pending: AtomicU64,
}

/// How long a request took, and its upstream's part, for the histograms.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub total: Duration,
    /// `None` when the request never reached an upstream.
    pub upstream: Option<Duration>,
    /// The upstream's status; `None` with an `upstream` time means it failed
    /// without a response.
    pub upstream_status: Option<u16>,
}

/// The store's queue of ends to retry (`Store::pending_ends`), appended to `out`.
pub fn render_pending_ends(out: &mut String, pending: PendingEndsView) {
    let _ = writeln!(out, "# HELP creditgate_store_pending_ends Settles and releases the store could not write (an outage) and retries when it is back.\n# TYPE creditgate_store_pending_ends gauge\ncreditgate_store_pending_ends {}", pending.queued);
    let _ = writeln!(out, "# HELP creditgate_store_pending_ends_dropped_total Settles and releases dropped from the full retry queue (their holds expire after hold_ttl).\n# TYPE creditgate_store_pending_ends_dropped_total counter\ncreditgate_store_pending_ends_dropped_total {}", pending.dropped);
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

    /// Times a finished request of `operation` (or `unmatched`), and counts how
    /// its upstream answered if it reached one.
    pub fn timed(&self, operation: &str, timing: Timing) {
        let observe = |per: &PerOperation| {
            per.request.observe(timing.total);
            if let Some(upstream) = timing.upstream {
                per.upstream.observe(upstream);
                let class = match timing.upstream_status {
                    Some(status @ 100..=599) => usize::from(status / 100) - 1,
                    _ => UPSTREAM_CLASSES.len() - 1,
                };
                per.upstream_responses[class].fetch_add(1, Ordering::Relaxed);
            }
        };
        if let Some(per) = self.operations.get(operation) {
            return observe(&per);
        }
        // Operations come from the policy; past the cap, a new name counts as `other`.
        let name = if self.operations.len() < MAX_SERIES {
            operation
        } else {
            "other"
        };
        observe(&self.operations.entry(name.to_string()).or_default());
    }

    /// One policy reload, by its result (one of `RELOAD_RESULTS`).
    pub fn reload(&self, result: &str) {
        if let Some(i) = RELOAD_RESULTS.iter().position(|r| *r == result) {
            self.reloads[i].fetch_add(1, Ordering::Relaxed);
        }
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
        self.render_operations(&mut out);
        out.push_str("# HELP creditgate_policy_reloads_total Policy reloads (SIGHUP or the admin API) by result: ok, invalid (the file does not validate), refused (it changes what needs a restart), failed.\n# TYPE creditgate_policy_reloads_total counter\n");
        for (result, count) in RELOAD_RESULTS.iter().zip(&self.reloads) {
            let _ = writeln!(
                out,
                "creditgate_policy_reloads_total{{result=\"{result}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        for (name, kind, help, value) in [
            ("creditgate_events_delivered_total", "counter", "Webhook events delivered.", &self.events_delivered),
            ("creditgate_events_failed_total", "counter", "Webhook events given up on: retried past retry_for, or dropped from a full outbox.", &self.events_failed),
            ("creditgate_event_attempts_failed_total", "counter", "Webhook delivery attempts that failed (an answer other than 2xx, or none); each is retried.", &self.event_attempts_failed),
            ("creditgate_events_pending", "gauge", "Webhook events waiting in the outbox.", &self.events_pending),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP creditgate_build_info The running version of creditgate.\n# TYPE creditgate_build_info gauge\ncreditgate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out
    }

    /// The per-operation histograms and upstream answers, operations sorted.
    fn render_operations(&self, out: &mut String) {
        let mut names: Vec<String> = self.operations.iter().map(|e| e.key().clone()).collect();
        names.sort();
        out.push_str("# HELP creditgate_request_duration_seconds Time from a request's head to the end of its response, by operation.\n# TYPE creditgate_request_duration_seconds histogram\n");
        for name in &names {
            if let Some(per) = self.operations.get(name) {
                per.request
                    .render(out, "creditgate_request_duration_seconds", name);
            }
        }
        out.push_str("# HELP creditgate_upstream_duration_seconds Time from connecting to the upstream to the end of its response, by operation.\n# TYPE creditgate_upstream_duration_seconds histogram\n");
        for name in &names {
            if let Some(per) = self.operations.get(name) {
                per.upstream
                    .render(out, "creditgate_upstream_duration_seconds", name);
            }
        }
        out.push_str("# HELP creditgate_upstream_responses_total Upstream answers by operation and status class; error: no response (refused, reset, timed out).\n# TYPE creditgate_upstream_responses_total counter\n");
        for name in &names {
            if let Some(per) = self.operations.get(name) {
                for (class, count) in UPSTREAM_CLASSES.iter().zip(&per.upstream_responses) {
                    let _ = writeln!(
                        out,
                        "creditgate_upstream_responses_total{{operation=\"{}\",class=\"{class}\"}} {}",
                        escape(name),
                        count.load(Ordering::Relaxed)
                    );
                }
            }
        }
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
