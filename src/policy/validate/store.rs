//! `[store]`: which store keeps the accounts, where, and what an outage of it does.

use super::Validator;
use crate::policy::raw::RawStore;
use crate::policy::{OnUnavailable, StoreConfig};

/// The stores a policy can name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Memory,
    Redis,
}

/// The longest `commit_interval`: a longer one only delays every answer.
const MAX_COMMIT_INTERVAL_MS: u64 = 1_000;

impl Validator<'_> {
    pub(super) fn store(&mut self, raw: &RawStore) -> StoreConfig {
        let kind = match &raw.kind {
            // The default: durable, embedded, one node.
            None => Some(Kind::Sqlite),
            Some(kind) => self.choice(
                kind,
                "store kind",
                &[
                    ("sqlite", Kind::Sqlite),
                    ("memory", Kind::Memory),
                    ("redis", Kind::Redis),
                ],
            ),
        };
        // Settings of one kind named under another are mistakes, never ignored.
        if kind.is_some_and(|k| k != Kind::Redis) {
            for (name, given) in [
                ("url", raw.url.as_ref().map(|v| v.span())),
                (
                    "on_unavailable",
                    raw.on_unavailable.as_ref().map(|v| v.span()),
                ),
            ] {
                if let Some(span) = given {
                    self.error(span, format!("{name} applies only to kind = \"redis\""));
                }
            }
        }
        if kind.is_some_and(|k| k != Kind::Sqlite) {
            for (name, given) in [
                ("path", raw.path.as_ref().map(|v| v.span())),
                (
                    "commit_interval",
                    raw.commit_interval.as_ref().map(|v| v.span()),
                ),
            ] {
                if let Some(span) = given {
                    self.error(span, format!("{name} applies only to kind = \"sqlite\""));
                }
            }
        }
        match kind {
            // Already an error: nothing else in the section is checked.
            None => StoreConfig::Memory,
            Some(Kind::Sqlite) => self.sqlite_store(raw),
            Some(Kind::Memory) => StoreConfig::Memory,
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

    /// The SQLite file (relative to the policy file's folder) and the writer's
    /// commit interval (bounded: a longer one only delays every answer).
    fn sqlite_store(&mut self, raw: &RawStore) -> StoreConfig {
        let path = match &raw.path {
            Some(path) => {
                let text = self.expand(path);
                if text.trim().is_empty() {
                    self.error(path.span(), "path must name a file");
                }
                text
            }
            None => "creditgate.db".to_string(),
        };
        let folder = std::path::Path::new(self.file)
            .parent()
            .unwrap_or(std::path::Path::new(""));
        let commit_interval_ms = self.duration_ms(&raw.commit_interval, 2, "commit_interval");
        if commit_interval_ms > MAX_COMMIT_INTERVAL_MS {
            if let Some(span) = raw.commit_interval.as_ref().map(|v| v.span()) {
                self.error(
                    span,
                    format!("commit_interval must be at most {MAX_COMMIT_INTERVAL_MS}ms"),
                );
            }
        }
        StoreConfig::Sqlite {
            path: folder.join(path),
            commit_interval_ms: commit_interval_ms.min(MAX_COMMIT_INTERVAL_MS),
        }
    }
}
