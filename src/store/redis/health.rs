//! Whether Redis may be used now, shared by every call of one store: fail fast.
//!
//! After one call fails as unavailable, every call fails at once — no request waits
//! out its own deadline behind a dead or paused server, however many requests its
//! account has queued — until the store's monitor answers that Redis is back: a
//! PING, the data marker still there, the ends queued meanwhile written. A Redis
//! that answers without the marker lost its data (restarted empty, flushed): that
//! is an outage too, until the marker is back (a restore) or the process restarts.
//!
//! Settles and releases that could not be written wait in a bounded queue here,
//! written by the monitor before anything else when Redis returns, so a delivered
//! answer is not left free by a hold that expires after the outage.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use crate::ledger::{Credits, Millis};
use crate::store::StoreError;

/// How often the monitor probes a Redis it counts as down.
pub(super) const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// How often the monitor checks that Redis still has the data marker while all
/// is well (a Redis restarted empty between two calls fails none of them).
pub(super) const MARKER_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Ends kept to retry at most; past it the oldest is dropped (and counted): its
/// hold then expires after `hold_ttl`, as every hold did before this queue.
pub(super) const MAX_PENDING_ENDS: usize = 10_000;

const UP: u8 = 0;
const DOWN: u8 = 1;
const LOST: u8 = 2;

tokio::task_local! {
    /// Set while the monitor brings the store back: its own calls pass the gate.
    static RECOVERING: ();
}

/// Runs `future` as the monitor's recovery: its calls are not refused as down.
pub(super) async fn recovering<F: std::future::Future>(future: F) -> F::Output {
    RECOVERING.scope((), future).await
}

fn is_recovering() -> bool {
    RECOVERING.try_with(|_| ()).is_ok()
}

#[derive(Default)]
pub(super) struct Health {
    state: AtomicU8,
    /// Wakes the monitor at once when a call finds Redis down.
    wake: Notify,
    /// Wakes every transition waiting for its account's turn when Redis goes down
    /// or loses its data: they fail at once instead of in turn.
    gone: Notify,
}

impl Health {
    /// The error every call answers now without trying, if any.
    pub(super) fn refusal(&self) -> Option<StoreError> {
        if is_recovering() {
            return None;
        }
        match self.state.load(Ordering::Acquire) {
            UP => None,
            DOWN => Some(StoreError::Unavailable(
                "redis is down: waiting for it to answer again".into(),
            )),
            _ => Some(lost()),
        }
    }

    /// A call failed as unavailable: fail the others at once, probe.
    pub(super) fn down(&self) {
        if self
            .state
            .compare_exchange(UP, DOWN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::error!(
                "redis is unavailable: every store call fails at once until it answers again"
            );
            self.wake.notify_one();
        }
    }

    /// Redis answers but its data marker is gone.
    pub(super) fn lost(&self) {
        if self.state.swap(LOST, Ordering::AcqRel) != LOST {
            tracing::error!(
                "redis lost its data (the creditgate marker is gone): answering as unavailable until it is restored; never seeding it anew"
            );
            self.wake.notify_one();
            self.gone.notify_waiters();
        }
    }

    pub(super) fn up(&self) {
        if self.state.swap(UP, Ordering::AcqRel) != UP {
            tracing::warn!("redis answers again");
        }
    }

    pub(super) fn is_up(&self) -> bool {
        self.state.load(Ordering::Acquire) == UP
    }

    /// Waits for `turn` unless Redis goes down (or is down) first: then the
    /// refusal every call answers. A transition waiting for its account's turn
    /// waits at most for the call in progress to time out.
    pub(super) async fn unless_gone<T>(
        &self,
        turn: impl std::future::Future<Output = T>,
    ) -> Result<T, StoreError> {
        let gone = self.gone.notified();
        tokio::pin!(gone);
        // Registered before the state is read: a change after it wakes it.
        gone.as_mut().enable();
        if let Some(refused) = self.refusal() {
            return Err(refused);
        }
        tokio::select! {
            got = turn => Ok(got),
            _ = gone => Err(self.refusal().unwrap_or_else(|| {
                StoreError::Unavailable("redis went down while this call waited".into())
            })),
        }
    }

    pub(super) async fn woken(&self) {
        self.wake.notified().await;
    }
}

pub(super) fn lost() -> StoreError {
    StoreError::Unavailable(
        "redis lost its data: the creditgate data marker is gone (restarted empty?)".into(),
    )
}

/// A settle (`charge` given) or release that could not be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PendingEnd {
    pub(super) account: String,
    pub(super) hold_id: u64,
    pub(super) charge: Option<Credits>,
    /// A settle's usage units, for its ledger entry.
    pub(super) usage: Option<String>,
    /// When it was asked: it is applied at that time, not later.
    pub(super) now_ms: Millis,
}

#[derive(Default)]
pub(super) struct PendingEnds {
    queue: Mutex<VecDeque<PendingEnd>>,
    dropped: AtomicU64,
}

impl PendingEnds {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<PendingEnd>> {
        // A poisoned lock only means a panic elsewhere; the queue stays consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `end`, dropping the oldest when full.
    pub(super) fn push(&self, end: PendingEnd) {
        let mut queue = self.queue();
        if queue.len() >= MAX_PENDING_ENDS {
            if let Some(old) = queue.pop_front() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    account = %old.account,
                    hold = old.hold_id,
                    "the queue of ends to retry is full: dropped the oldest, its hold expires after hold_ttl"
                );
            }
        }
        queue.push_back(end);
    }

    /// Puts back an end that failed again, first in line.
    pub(super) fn push_front(&self, end: PendingEnd) {
        let mut queue = self.queue();
        if queue.len() >= MAX_PENDING_ENDS {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queue.push_front(end);
    }

    pub(super) fn pop(&self) -> Option<PendingEnd> {
        self.queue().pop_front()
    }

    pub(super) fn len(&self) -> usize {
        self.queue().len()
    }

    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(hold_id: u64) -> PendingEnd {
        PendingEnd {
            account: "a".into(),
            hold_id,
            charge: None,
            usage: None,
            now_ms: 0,
        }
    }

    #[test]
    fn the_queue_is_bounded_and_counts_what_it_drops() {
        let ends = PendingEnds::default();
        for id in 0..(MAX_PENDING_ENDS as u64 + 3) {
            ends.push(end(id));
        }
        assert_eq!(ends.len(), MAX_PENDING_ENDS);
        assert_eq!(ends.dropped(), 3);
        assert_eq!(ends.pop(), Some(end(3)));
        ends.push_front(end(3));
        assert_eq!(ends.pop(), Some(end(3)));
    }

    #[tokio::test]
    async fn down_refuses_every_call_but_the_recovery() {
        let health = Health::default();
        assert!(health.refusal().is_none());
        health.down();
        assert!(health.refusal().is_some());
        assert!(recovering(async { health.refusal() }).await.is_none());
        health.lost();
        assert_eq!(health.refusal(), Some(lost()));
        health.up();
        assert!(health.refusal().is_none());
    }
}
