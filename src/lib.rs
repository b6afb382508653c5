//! creditgate: a credit-metering reverse proxy for AI generation APIs.
//!
//! # Layout
//! Modules in reading order:
//! - [`ledger`]: money and the account state machine (grants, holds). No IO, no clock.
//! - [`policy`]: the policy file, validated; route matching; prices.
//! - [`store`]: where accounts live (memory); applies the ledger atomically.
//! - [`gateway`]: the Pingora proxy — the only module besides `main.rs` that knows Pingora.
//! - [`demo`]: the built-in mock generation backend used by `creditgate demo` and the tests.

pub mod demo;
pub mod gateway;
pub mod ledger;
pub mod policy;
pub mod store;
