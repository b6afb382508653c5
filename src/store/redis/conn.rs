//! The connection to Redis (one node or a cluster) and what a failed call means.
//!
//! Every call goes through [`call`], which bounds it by [`CALL_TIMEOUT`] and
//! classifies its failure where it happens: unavailable or corrupt, never guessed later.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::store::StoreError;

/// How long one Redis call may take before the store counts as unavailable. A
/// healthy Redis answers in well under a millisecond; during an outage this
/// bounds how long a request waits for its 503.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_millis(250);

/// One connection kind or the other; both multiplexed, both reconnecting.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

pub(super) fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// What a failed Redis call means. A reply of a shape we never write (a value that
/// is not text where text was stored, a key of another type) is corrupt state:
/// asking again will not help, and it must never pass as an outage (an outage may
/// be forwarded unmetered). Every other failure — no connection, a timeout, a
/// server loading, read-only, out of memory, a cluster resharding — is the store
/// being unavailable.
pub(super) fn failed(e: redis::RedisError) -> StoreError {
    if e.kind() == redis::ErrorKind::TypeError || e.code() == Some("WRONGTYPE") {
        corrupt(e)
    } else {
        unavailable(e)
    }
}

/// Runs one Redis call with the store's timeout.
pub(super) async fn call<T>(
    future: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(failed(e)),
        Err(_) => Err(StoreError::Unavailable(
            "redis did not answer in time".into(),
        )),
    }
}
