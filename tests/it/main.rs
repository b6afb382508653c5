#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed assumption should fail loudly
//! One integration test binary (matklad: builds once, runs fast). Every test
//! starts its own gateway on `127.0.0.1:0` in front of its own mock backend.

mod accounts;
mod cli;
mod conformance;
mod durability;
mod edges;
mod events;
mod harness;
mod llm;
mod metering;
mod numbers;
mod operations;
mod ops;
mod outages;
mod paths;
mod platform;
mod proxy;
mod quotes;
mod redis_server;
mod refusals;
mod replicas;
mod sdk;
mod stream_trap;
