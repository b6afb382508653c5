//! The sender: delivers the outbox's events to the policy's webhooks.
//!
//! Each event is `POST`ed as `{"id", "type", "created_at", "account", "data"}`
//! with `creditgate-signature: t=UNIX,v1=HEX`, `HEX` = HMAC-SHA256(secret,
//! `"{t}.{body}"`) — Stripe's scheme, so receivers can reuse its verifiers. The
//! body is the same on every attempt; `t` is the attempt's. An event leaves the
//! outbox once every webhook that wants it answered 2xx, or when it has been
//! retried for `retry_for` (counted failed). Between attempts it waits
//! `retry_base × 2^(attempt-1)` (at most an hour), each wait drawn between half
//! and all of that (jitter), so receivers coming back are not hit all at once.
//!
//! At least once: an event delivered but not yet removed when the process stops
//! is delivered again after the restart (same id; receivers deduplicate on it).
//! Bounded: the sender looks at the oldest [`BATCH`] events only, delivers at
//! most [`CONCURRENCY`] at once, and remembers attempts only of those it looks at.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::live::LiveGateway;
use crate::ledger::Event;
use crate::policy::WebhookConfig;

/// The oldest events the sender considers at once.
pub const BATCH: usize = 1_000;
/// Deliveries in flight at once.
pub const CONCURRENCY: usize = 32;
/// How often the outbox is looked at when nothing is due.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The longest wait between two attempts.
const MAX_BACKOFF_MS: u64 = 3_600_000;

/// The JSON body of an event, the same on every attempt.
pub fn body(event: &Event) -> String {
    let text = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    format!(
        r#"{{"id":{},"type":{},"created_at":{},"account":{},"data":{}}}"#,
        text(&event.id),
        text(event.kind.as_str()),
        crate::views::time(event.at_ms),
        text(&event.account),
        event.data
    )
}

/// The `creditgate-signature` header of `body` signed at `t` (Unix seconds).
pub fn signature_header(secret: &str, t: u64, body: &str) -> String {
    let mac = super::stripe::signature(secret.as_bytes(), t, body.as_bytes());
    format!("t={t},v1={}", hex::encode(mac))
}

/// How long to wait after the `attempts`-th failed attempt: exponential, with jitter.
pub fn backoff_ms(base_ms: u64, attempts: u32, jitter: f64) -> u64 {
    let full = base_ms
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(40))
        .min(MAX_BACKOFF_MS);
    // Between half and all of it.
    let jitter = jitter.clamp(0.0, 1.0);
    (full as f64 * (0.5 + 0.5 * jitter)) as u64
}

/// What the sender remembers of an event it has tried.
struct Tried {
    attempts: u32,
    /// When it may be tried again: on the monotonic clock, which moves even when
    /// the gateway's own clock is a test's manual one.
    next_at: tokio::time::Instant,
    /// Webhooks (by URL) that already took it.
    delivered_to: BTreeSet<String>,
}

/// Runs the sender until `shutdown` turns true. The current policy (reloads
/// included) says where events go; the current store holds the outbox.
pub fn spawn_sender(
    live: Arc<LiveGateway>,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(send_until(live, shutdown))
}

async fn send_until(live: Arc<LiveGateway>, mut shutdown: watch::Receiver<bool>) {
    let client = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("creditgate/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            tracing::error!("webhooks: no HTTP client, events are not delivered: {e}");
            return;
        }
    };
    let mut tried: HashMap<String, Tried> = HashMap::new();
    let mut dropped_seen = 0;
    loop {
        let busy = round(&live, &client, &mut tried, &mut dropped_seen).await;
        if busy {
            if *shutdown.borrow() {
                return;
            }
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One look at the outbox: delivers what is due; returns whether more was due
/// than one round delivers.
async fn round(
    live: &LiveGateway,
    client: &reqwest::Client,
    tried: &mut HashMap<String, Tried>,
    dropped_seen: &mut u64,
) -> bool {
    let gateway = live.current();
    let config = gateway.policy().events.clone();
    let store = gateway.store().clone();
    let metrics = gateway.metrics().clone();
    let now_ms = gateway.clock().now_ms();
    let now = tokio::time::Instant::now();
    drop(gateway);
    let dropped = store.events_dropped();
    metrics
        .events_failed
        .fetch_add(dropped.saturating_sub(*dropped_seen), Ordering::Relaxed);
    *dropped_seen = dropped;
    let (events, pending) = match store.pending_events(BATCH).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!("webhooks: the outbox could not be read: {e}");
            return false;
        }
    };
    metrics
        .events_pending
        .store(pending as u64, Ordering::Relaxed);
    if events.is_empty() || config.webhooks.is_empty() {
        tried.clear();
        return false;
    }
    let looked: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    tried.retain(|id, _| looked.contains(id.as_str()));
    let mut due = events
        .iter()
        .filter(|e| tried.get(&e.id).is_none_or(|t| t.next_at <= now));
    let mut deliveries = JoinSet::new();
    for event in due.by_ref().take(CONCURRENCY) {
        let hooks: Vec<WebhookConfig> = config
            .webhooks
            .iter()
            .filter(|w| w.events.contains(&event.kind))
            .filter(|w| {
                tried
                    .get(&event.id)
                    .is_none_or(|t| !t.delivered_to.contains(&w.url))
            })
            .cloned()
            .collect();
        let (client, event, timeout) = (
            client.clone(),
            event.clone(),
            Duration::from_millis(config.timeout_ms),
        );
        deliveries.spawn(async move {
            let took = deliver(&client, &event, &hooks, timeout, now_ms / 1_000).await;
            (event, took)
        });
    }
    let more_due = due.next().is_some();
    let mut done = Vec::new();
    while let Some(joined) = deliveries.join_next().await {
        let Ok((event, took)) = joined else {
            continue;
        };
        let failed = took.iter().filter(|(_, ok)| !ok).count();
        let entry = tried.entry(event.id.clone()).or_insert(Tried {
            attempts: 0,
            next_at: now,
            delivered_to: BTreeSet::new(),
        });
        entry.delivered_to.extend(
            took.iter()
                .filter(|(_, ok)| *ok)
                .map(|(url, _)| url.clone()),
        );
        if failed == 0 {
            metrics.events_delivered.fetch_add(1, Ordering::Relaxed);
            done.push(event.id.clone());
            continue;
        }
        metrics
            .event_attempts_failed
            .fetch_add(failed as u64, Ordering::Relaxed);
        entry.attempts += 1;
        if now_ms >= event.at_ms.saturating_add(config.retry_for_ms) {
            tracing::warn!(event = %event.id, attempts = entry.attempts, "webhooks: event given up after retry_for");
            metrics.events_failed.fetch_add(1, Ordering::Relaxed);
            done.push(event.id.clone());
            continue;
        }
        let wait = backoff_ms(
            config.retry_base_ms,
            entry.attempts,
            rand::thread_rng().gen(),
        );
        entry.next_at = now + Duration::from_millis(wait);
    }
    if !done.is_empty() {
        metrics
            .events_pending
            .store(pending.saturating_sub(done.len()) as u64, Ordering::Relaxed);
        for id in &done {
            tried.remove(id);
        }
        if let Err(e) = store.events_done(&done).await {
            tracing::warn!(
                "webhooks: delivered events could not be removed (they will be sent again): {e}"
            );
        }
    }
    more_due
}

/// Posts `event` to each of `hooks`; returns each URL and whether it took it.
async fn deliver(
    client: &reqwest::Client,
    event: &Event,
    hooks: &[WebhookConfig],
    timeout: Duration,
    t: u64,
) -> Vec<(String, bool)> {
    let body = body(event);
    let mut took = Vec::with_capacity(hooks.len());
    for hook in hooks {
        let answer = client
            .post(&hook.url)
            .timeout(timeout)
            .header("content-type", "application/json")
            .header(
                "creditgate-signature",
                signature_header(&hook.secret, t, &body),
            )
            .body(body.clone())
            .send()
            .await;
        let ok = match answer {
            Ok(response) if response.status().is_success() => true,
            Ok(response) => {
                tracing::info!(event = %event.id, url = %hook.url, status = response.status().as_u16(), "webhooks: refused, will retry");
                false
            }
            Err(e) => {
                tracing::info!(event = %event.id, url = %hook.url, "webhooks: not delivered, will retry: {e}");
                false
            }
        };
        took.push((hook.url.clone(), ok));
    }
    took
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::EventKind;

    #[test]
    fn the_body_is_the_documented_shape_and_the_signature_stripes_scheme() {
        let event = Event {
            id: "evt_1".into(),
            kind: EventKind::BalanceLow,
            account: "acme".into(),
            at_ms: 1_700_000_000_000,
            data: r#"{"threshold":50}"#.into(),
        };
        let body = body(&event);
        assert_eq!(
            body,
            r#"{"id":"evt_1","type":"balance.low","created_at":"2023-11-14T22:13:20Z","account":"acme","data":{"threshold":50}}"#
        );
        let header = signature_header("s", 1_700_000_000, &body);
        assert_eq!(
            super::super::stripe::verify("s", Some(&header), body.as_bytes(), 1_700_000_000),
            Ok(())
        );
    }

    #[test]
    fn backoff_doubles_within_its_jitter_up_to_an_hour() {
        assert_eq!(backoff_ms(1_000, 1, 1.0), 1_000);
        assert_eq!(backoff_ms(1_000, 1, 0.0), 500);
        assert_eq!(backoff_ms(1_000, 3, 1.0), 4_000);
        assert_eq!(backoff_ms(1_000, 60, 1.0), MAX_BACKOFF_MS);
    }
}
