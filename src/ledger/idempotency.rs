//! Idempotency keys (§9), kept in the account so they change atomically with holds.
//!
//! A request with a key places its hold *and* an in-flight record in one step. The
//! settle marks the record settled; the gateway then attaches the response it
//! recorded. A release or an expired hold forgets the record, so a retry runs anew.
//! A repeat of a settled request is answered from the record and charged nothing.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::limits::CONTENT_TYPE_MAX_BYTES;
use super::{Limits, Millis};

/// A response recorded for replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub status: u16,
    pub content_type: Option<String>,
    /// `None`: larger than `idempotency_replay_max_bytes` (or not text), not replayable.
    pub body: Option<String>,
}

/// What a request with a key asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyRequest {
    pub key: String,
    /// Tells "the same request again" from "another request under the same key".
    pub fingerprint: String,
    pub ttl_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum State {
    InFlight,
    Settled(Option<Recorded>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    fingerprint: String,
    state: State,
    expires_at_ms: Millis,
}

/// What an account says about a key before placing a hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// Unknown (or forgotten) key: place the hold.
    Proceed,
    InProgress,
    Reused,
    /// Settled: answer this (`None` while the response is being recorded).
    Replay(Option<Recorded>),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idempotency {
    records: BTreeMap<String, Record>,
    settled_order: VecDeque<String>,
}

impl Idempotency {
    pub fn prune(&mut self, now_ms: Millis) {
        self.records.retain(|_, r| r.expires_at_ms > now_ms);
        let records = &self.records;
        self.settled_order.retain(|k| records.contains_key(k));
    }

    pub fn check(&self, request: &IdempotencyRequest) -> Check {
        match self.records.get(&request.key) {
            None => Check::Proceed,
            Some(r) if r.fingerprint != request.fingerprint => Check::Reused,
            Some(Record {
                state: State::InFlight,
                ..
            }) => Check::InProgress,
            Some(Record {
                state: State::Settled(response),
                ..
            }) => Check::Replay(response.clone()),
        }
    }

    pub fn start(&mut self, request: &IdempotencyRequest, now_ms: Millis) {
        let record = Record {
            fingerprint: request.fingerprint.clone(),
            state: State::InFlight,
            expires_at_ms: now_ms.saturating_add(request.ttl_ms),
        };
        self.records.insert(request.key.clone(), record);
    }

    /// Marks the record settled; [`Idempotency::keep_settled`] then forgets the
    /// oldest settled records beyond the limit.
    pub fn settled(&mut self, key: &str) {
        if let Some(r) = self.records.get_mut(key) {
            r.state = State::Settled(None);
            self.settled_order.push_back(key.to_string());
        }
    }

    /// Forgets the oldest settled records beyond `kept`; in-flight records are
    /// bounded by the account's open holds.
    pub fn keep_settled(&mut self, kept: usize) {
        while self.settled_order.len() > kept {
            if let Some(oldest) = self.settled_order.pop_front() {
                self.records.remove(&oldest);
            }
        }
    }

    pub fn forget(&mut self, key: &str) {
        self.records.remove(key);
        self.settled_order.retain(|k| k != key);
    }

    /// Attaches the response to a settled record; false if there is none. A body
    /// larger than `idempotency_replay_max_bytes`, or a content type longer than
    /// [`CONTENT_TYPE_MAX_BYTES`], is not kept: the response is recorded as not
    /// replayable, so the record stays within what the limits count.
    pub fn record(&mut self, key: &str, mut response: Recorded, limits: &Limits) -> bool {
        let too_large = response
            .body
            .as_ref()
            .is_some_and(|b| b.len() > limits.idempotency_replay_max_bytes)
            || response
                .content_type
                .as_ref()
                .is_some_and(|t| t.len() > CONTENT_TYPE_MAX_BYTES);
        if too_large {
            response.body = None;
            response.content_type = None;
        }
        match self.records.get_mut(key) {
            Some(r) if matches!(r.state, State::Settled(_)) => {
                r.state = State::Settled(Some(response));
                true
            }
            _ => false,
        }
    }
}
