//! `[gateway]`: where the gateway listens, what it forwards unmatched, and its
//! limits — and the bound on what one account's state may hold under them.

use std::collections::BTreeSet;

use toml::Spanned;

use super::Validator;
use crate::ledger::{
    Catalog, StateShape, DEFAULT_GRANT_RECEIPTS_KEPT, DEFAULT_IDEMPOTENCY_RECORDS_KEPT,
    DEFAULT_IDEMPOTENCY_REPLAY_MAX_BYTES, DEFAULT_LEDGER_MAX_ENTRIES, NAME_MAX_BYTES,
};
use crate::policy::raw::RawGateway;
use crate::policy::units::parse_size_bytes;
use crate::policy::{GatewayConfig, Operation, SeedAccount, Unmatched, Upstream};

const DEFAULT_MAX_HOLDS_PER_ACCOUNT: usize = 1_024;

/// Client connections served at once when the policy names no number: far more
/// than the requests one process serves at once, far fewer than it has descriptors.
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// A client has this long from a request's first byte to send its whole head.
const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;

/// A client may pause this long between two reads of its request body.
const DEFAULT_BODY_READ_TIMEOUT_MS: u64 = 60_000;

/// A kept-alive connection may wait this long, idle, for its next request; then
/// it is closed and its `max_connections` slot freed (nginx's default is 75 s).
const DEFAULT_KEEPALIVE_TIMEOUT_MS: u64 = 60_000;

/// The bound on the worst case of one account's state when the policy names none.
/// The defaults' worst case fits under it; a typical account is a few KiB.
const DEFAULT_MAX_ACCOUNT_STATE_BYTES: u64 = 16 << 20;
impl Validator<'_> {
    pub(super) fn gateway(&mut self, raw: &RawGateway, upstreams: &[Upstream]) -> GatewayConfig {
        let listen = raw
            .listen
            .as_ref()
            .map_or_else(|| "127.0.0.1:8080".to_string(), |l| self.address(l));
        let admin_listen = raw.admin_listen.as_ref().map(|l| self.address(l));
        let upstream_index = |name: &Spanned<String>, v: &mut Self| {
            let found = upstreams.iter().position(|u| u.name == *name.get_ref());
            if found.is_none() {
                v.error(
                    name.span(),
                    format!("unknown upstream {:?}", name.get_ref()),
                );
            }
            found
        };
        let default_upstream = raw
            .default_upstream
            .as_ref()
            .and_then(|n| upstream_index(n, self));
        let unmatched = match raw.unmatched.as_ref().map(|u| {
            let allow = self.choice(u, "unmatched", &[("deny", false), ("allow", true)]);
            (allow, u.span())
        }) {
            None | Some((None | Some(false), _)) => Unmatched::Deny,
            Some((Some(true), span)) => match default_upstream {
                Some(upstream) => Unmatched::Allow { upstream },
                None => {
                    self.error(span, "unmatched = \"allow\" needs default_upstream");
                    Unmatched::Deny
                }
            },
        };
        let max_body_bytes = match &raw.max_body_bytes {
            None => 8 << 20,
            Some(size) => parse_size_bytes(size.get_ref()).unwrap_or_else(|e| {
                self.error(size.span(), format!("max_body_bytes: {e}"));
                0
            }),
        };
        let ledger_max_entries = self.count(
            &raw.ledger_max_entries,
            "ledger_max_entries",
            1..=1_000_000,
            DEFAULT_LEDGER_MAX_ENTRIES,
        );
        let max_holds_per_account = self.count(
            &raw.max_holds_per_account,
            "max_holds_per_account",
            1..=1_000_000,
            DEFAULT_MAX_HOLDS_PER_ACCOUNT,
        );
        GatewayConfig {
            listen,
            admin_listen,
            unmatched,
            max_body_bytes,
            hold_ttl_ms: self.duration_ms(&raw.hold_ttl, 600_000, "hold_ttl"),
            upgrade_url: raw.upgrade_url.as_ref().map(|u| self.expand(u)),
            max_holds_per_account,
            ledger_max_entries,
            shutdown_grace_ms: self.duration_ms(&raw.shutdown_grace, 30_000, "shutdown_grace"),
            idempotency_ttl_ms: self.duration_ms(
                &raw.idempotency_ttl,
                86_400_000,
                "idempotency_ttl",
            ),
            idempotency_replay_max_bytes: match &raw.idempotency_replay_max_bytes {
                None => DEFAULT_IDEMPOTENCY_REPLAY_MAX_BYTES,
                Some(size) => parse_size_bytes(size.get_ref()).unwrap_or_else(|e| {
                    self.error(size.span(), format!("idempotency_replay_max_bytes: {e}"));
                    0
                }),
            },
            idempotency_records_kept: self.count(
                &raw.idempotency_records_kept,
                "idempotency_records_kept",
                0..=1_000_000,
                DEFAULT_IDEMPOTENCY_RECORDS_KEPT,
            ),
            grant_receipts_kept: self.count(
                &raw.grant_receipts_kept,
                "grant_receipts_kept",
                0..=1_000_000,
                DEFAULT_GRANT_RECEIPTS_KEPT,
            ),
            max_account_state_bytes: match &raw.max_account_state_bytes {
                None => DEFAULT_MAX_ACCOUNT_STATE_BYTES,
                Some(size) => match parse_size_bytes(size.get_ref()) {
                    Ok(0) => {
                        self.error(size.span(), "max_account_state_bytes must be more than 0");
                        DEFAULT_MAX_ACCOUNT_STATE_BYTES
                    }
                    Ok(bytes) => bytes as u64,
                    Err(e) => {
                        self.error(size.span(), format!("max_account_state_bytes: {e}"));
                        DEFAULT_MAX_ACCOUNT_STATE_BYTES
                    }
                },
            },
            max_connections: self.count(
                &raw.max_connections,
                "max_connections",
                1..=1_000_000,
                DEFAULT_MAX_CONNECTIONS,
            ),
            header_read_timeout_ms: self.duration_ms(
                &raw.header_read_timeout,
                DEFAULT_HEADER_READ_TIMEOUT_MS,
                "header_read_timeout",
            ),
            body_read_timeout_ms: self.duration_ms(
                &raw.body_read_timeout,
                DEFAULT_BODY_READ_TIMEOUT_MS,
                "body_read_timeout",
            ),
            keepalive_timeout_ms: self.duration_ms(
                &raw.keepalive_timeout,
                DEFAULT_KEEPALIVE_TIMEOUT_MS,
                "keepalive_timeout",
            ),
        }
    }

    fn address(&mut self, raw: &Spanned<String>) -> String {
        let (address, placeholder) = self.expand_with_placeholders(raw);
        if !placeholder && address.parse::<std::net::SocketAddr>().is_err() {
            self.error(raw.span(), format!("{address:?} is not an IP:PORT address"));
        }
        address
    }
}

impl Validator<'_> {
    /// Checks the worst case of one account's state — every limit reached at once,
    /// with the policy's longest names — against `max_account_state_bytes`: the
    /// Redis store rewrites the whole state on every transition, so no setting may
    /// let it grow past what that can bear. The error names what to lower.
    pub(super) fn account_state(
        &mut self,
        raw: &RawGateway,
        gateway: &GatewayConfig,
        plans: &Catalog,
        operations: &[Operation],
        grant_kinds: &[(String, u32)],
        accounts: &[SeedAccount],
    ) {
        let longest = |names: &mut dyn Iterator<Item = usize>| names.max().unwrap_or(0);
        let quotas: BTreeSet<&str> = plans
            .values()
            .flat_map(|p| p.quotas.keys().map(String::as_str))
            .collect();
        let shape = StateShape {
            max_holds: gateway.max_holds_per_account,
            seats: longest(&mut plans.values().map(|p| p.seats as usize)),
            quotas: quotas.len(),
            longest_operation: longest(&mut operations.iter().map(|o| o.name.len())),
            longest_quota: longest(&mut quotas.iter().map(|q| q.len())),
            longest_plan: longest(&mut plans.keys().map(String::len)),
            longest_grant_kind: longest(&mut grant_kinds.iter().map(|(k, _)| k.len())),
            longest_member: longest(
                &mut accounts
                    .iter()
                    .flat_map(|a| a.keys.iter().map(|k| k.member.len()))
                    .chain([NAME_MAX_BYTES]),
            ),
            // A member may have any feature a plan names disabled.
            features_bytes: {
                let features: std::collections::BTreeSet<&str> = plans
                    .values()
                    .flat_map(|p| p.features.iter().map(String::as_str))
                    .collect();
                features.iter().map(|f| f.len() + 4).sum()
            },
        };
        let worst = gateway.limits().worst_account_state(&shape);
        let bound = gateway.max_account_state_bytes;
        if worst.total() <= bound {
            return;
        }
        // The parts, largest first, each with the settings that bound it.
        let mut parts = [
            (
                worst.records,
                "idempotency_records_kept × idempotency_replay_max_bytes",
                raw.idempotency_replay_max_bytes
                    .as_ref()
                    .map(Spanned::span)
                    .or_else(|| raw.idempotency_records_kept.as_ref().map(Spanned::span)),
            ),
            (
                worst.receipts,
                "grant_receipts_kept",
                raw.grant_receipts_kept.as_ref().map(Spanned::span),
            ),
            (
                worst.holds,
                "max_holds_per_account",
                raw.max_holds_per_account.as_ref().map(Spanned::span),
            ),
            (worst.members, "the plans' seats", None),
        ];
        parts.sort_by_key(|(bytes, _, _)| std::cmp::Reverse(*bytes));
        let listed: Vec<String> = parts
            .iter()
            .map(|(bytes, settings, _)| format!("{settings} {}", kib(*bytes)))
            .collect();
        let at = raw
            .max_account_state_bytes
            .as_ref()
            .map(Spanned::span)
            .or_else(|| parts.first().and_then(|(_, _, span)| span.clone()))
            .unwrap_or(0..0);
        self.error(
            at,
            format!(
                "one account's state could reach {} with these limits, over \
                 max_account_state_bytes ({}): lower the largest of {} (the rest takes {}), \
                 or raise max_account_state_bytes",
                kib(worst.total()),
                kib(bound),
                listed.join(", "),
                kib(worst.rest),
            ),
        );
    }
}

/// Bytes as whole KiB, rounded up: `"4097 KiB"`.
fn kib(bytes: u64) -> String {
    format!("{} KiB", bytes.div_ceil(1024))
}
