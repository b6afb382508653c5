//! creditgate: a credit-metering reverse proxy for AI generation APIs.
//!
//! # Layout
//! Modules in reading order:
//! - [`clock`]: the only place that reads the wall clock (tests move a manual one).
//! - [`ledger`]: money and the account state machine (grants, holds). No IO, no clock.
//! - [`policy`]: the policy file, validated; path normalization; route matching; prices.
//! - [`store`]: where accounts live (memory); applies the ledger atomically.
//! - [`views`]: the JSON shapes of accounts and ledger entries, for both APIs.
//! - [`gateway`]: the Pingora proxy — the only module besides `main.rs` that knows Pingora.
//! - [`admin`]: the admin API (axum) on `admin_listen`.
//! - [`metrics`]: counters for `/metrics`.
//! - [`demo`]: the built-in mock generation backend used by `creditgate demo` and the tests.

pub mod admin;
pub mod clock;
pub mod demo;
pub mod gateway;
pub mod ledger;
pub mod metrics;
pub mod policy;
pub mod store;
pub mod views;
