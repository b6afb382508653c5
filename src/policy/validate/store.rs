//! `[store]`: which store keeps the accounts, and what an outage of it does.

use super::Validator;
use crate::policy::raw::RawStore;
use crate::policy::{OnUnavailable, StoreConfig};

/// The stores a policy can name.
#[derive(Clone, Copy)]
enum Kind {
    Memory,
    Redis,
}

impl Validator<'_> {
    pub(super) fn store(&mut self, raw: &RawStore) -> StoreConfig {
        let kind = match &raw.kind {
            None => Some(Kind::Memory),
            Some(kind) => self.choice(
                kind,
                "store kind",
                &[("memory", Kind::Memory), ("redis", Kind::Redis)],
            ),
        };
        match kind {
            // Already an error: nothing else in the section is checked.
            None => StoreConfig::Memory,
            Some(Kind::Memory) => {
                if let Some(url) = &raw.url {
                    self.error(url.span(), "url applies only to kind = \"redis\"");
                }
                StoreConfig::Memory
            }
            Some(Kind::Redis) => {
                let url = match &raw.url {
                    Some(url) => self.expand(url),
                    None => {
                        let at = raw.kind.as_ref().map_or(0..0, |k| k.span());
                        self.error(at, "kind = \"redis\" needs url");
                        String::new()
                    }
                };
                let on_unavailable = raw
                    .on_unavailable
                    .as_ref()
                    .and_then(|o| {
                        self.choice(
                            o,
                            "on_unavailable",
                            &[
                                ("reject", OnUnavailable::Reject),
                                ("allow", OnUnavailable::Allow),
                            ],
                        )
                    })
                    .unwrap_or(OnUnavailable::Reject);
                StoreConfig::Redis {
                    url,
                    cluster: raw.cluster.unwrap_or(false),
                    on_unavailable,
                }
            }
        }
    }
}
