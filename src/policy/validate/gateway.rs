//! `[gateway]`: where the gateway listens, what it forwards unmatched, and its
//! limits.

use toml::Spanned;

use super::Validator;
use crate::ledger::DEFAULT_LEDGER_MAX_ENTRIES;
use crate::policy::raw::RawGateway;
use crate::policy::units::parse_size_bytes;
use crate::policy::{GatewayConfig, Unmatched, Upstream};

const DEFAULT_MAX_HOLDS_PER_ACCOUNT: usize = 1_024;

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
                None => 64 << 10,
                Some(size) => parse_size_bytes(size.get_ref()).unwrap_or_else(|e| {
                    self.error(size.span(), format!("idempotency_replay_max_bytes: {e}"));
                    0
                }),
            },
        }
    }

    fn address(&mut self, raw: &Spanned<String>) -> String {
        let address = self.expand(raw);
        if address.parse::<std::net::SocketAddr>().is_err() {
            self.error(raw.span(), format!("{address:?} is not an IP:PORT address"));
        }
        address
    }
}
