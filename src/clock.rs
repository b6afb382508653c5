//! The only place creditgate reads the wall clock. Everything else takes `now_ms`
//! from a [`Clock`], so tests can move time (a bonus expiring after 60 days, a
//! monthly refill) without waiting for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::ledger::Millis;

#[derive(Clone)]
pub struct Clock(Source);

#[derive(Clone)]
enum Source {
    System,
    Manual(Arc<AtomicU64>),
}

impl Clock {
    pub fn system() -> Self {
        Clock(Source::System)
    }

    /// A clock that reads `now`; the caller moves it.
    pub fn manual(now: Arc<AtomicU64>) -> Self {
        Clock(Source::Manual(now))
    }

    /// Unix time in milliseconds.
    pub fn now_ms(&self) -> Millis {
        match &self.0 {
            Source::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as Millis),
            Source::Manual(now) => now.load(Ordering::SeqCst),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}
