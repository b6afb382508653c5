//! `[grant_kinds.NAME]` (the spend priority of each grant kind) and
//! `[[accounts]]` (accounts seeded at start, with their grants and keys).

use std::collections::{BTreeMap, HashSet};

use sha2::{Digest, Sha256};
use toml::Spanned;

use super::Validator;
use crate::ledger::{default_priority, Catalog, NAME_MAX_BYTES};
use crate::policy::raw::{RawAccount, RawGrantKind};
use crate::policy::{SeedAccount, SeedGrant, SeedKey};
impl Validator<'_> {
    pub(super) fn grant_kinds(
        &mut self,
        raw: &BTreeMap<String, Spanned<RawGrantKind>>,
    ) -> Vec<(String, u32)> {
        let mut kinds: Vec<(String, u32)> = ["bonus", "plan", "topup"]
            .iter()
            .map(|k| (k.to_string(), default_priority(k)))
            .collect();
        for (name, kind) in raw {
            let priority = kind.get_ref().priority.get_ref();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                self.error(
                    kind.span(),
                    format!("grant kind {name:?}: use letters, digits and _"),
                );
            }
            match u32::try_from(*priority).ok().filter(|p| *p <= 1_000) {
                Some(p) => match kinds.iter_mut().find(|(k, _)| k == name) {
                    Some(existing) => existing.1 = p,
                    None => kinds.push((name.clone(), p)),
                },
                None => self.error(
                    kind.get_ref().priority.span(),
                    "priority must be between 0 and 1000",
                ),
            }
        }
        kinds
    }

    pub(super) fn accounts(
        &mut self,
        raw: &[Spanned<RawAccount>],
        plans: &Catalog,
        grant_kinds: &[(String, u32)],
    ) -> Vec<SeedAccount> {
        let mut out = Vec::new();
        let mut ids = HashSet::new();
        let mut key_hashes = HashSet::new();
        for account in raw {
            let account = account.get_ref();
            let id = account.id.get_ref().clone();
            if id.is_empty()
                || id.len() > NAME_MAX_BYTES
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                self.error(
                    account.id.span(),
                    "account ids are 1 to 128 letters, digits, '-', '_' or '.'",
                );
            }
            if !ids.insert(id.clone()) {
                self.error(account.id.span(), format!("duplicate account {id:?}"));
            }
            if !plans.contains_key(account.plan.get_ref()) {
                self.error(
                    account.plan.span(),
                    format!("unknown plan {:?}", account.plan.get_ref()),
                );
            }
            let billing_anchor_day = account.billing_anchor_day.as_ref().and_then(|d| {
                let day = u8::try_from(*d.get_ref())
                    .ok()
                    .filter(|d| (1..=31).contains(d));
                if day.is_none() {
                    self.error(d.span(), "billing_anchor_day must be between 1 and 31");
                }
                day
            });
            let mut grants = Vec::new();
            for grant in &account.grants {
                let g = grant.get_ref();
                let kind = g.kind.get_ref().clone();
                let kind_priority = grant_kinds
                    .iter()
                    .find(|(k, _)| *k == kind)
                    .map(|(_, p)| *p);
                if kind_priority.is_none() {
                    let known: Vec<&str> = grant_kinds.iter().map(|(k, _)| k.as_str()).collect();
                    self.error(g.kind.span(), format!("unknown grant kind {kind:?}: use one of {} or declare it in [grant_kinds]", known.join(", ")));
                }
                let credits = self.amount(&g.credits, "credits").unwrap_or_default();
                let expires_at_ms =
                    g.expires_at.as_ref().and_then(
                        |at| match chrono::DateTime::parse_from_rfc3339(at.get_ref()) {
                            Ok(t) if t.timestamp_millis() >= 0 => Some(t.timestamp_millis() as u64),
                            _ => {
                                self.error(
                                    at.span(),
                                    format!(
                                        "{:?} is not an RFC 3339 time like 2026-12-31T00:00:00Z",
                                        at.get_ref()
                                    ),
                                );
                                None
                            }
                        },
                    );
                let priority = match &g.priority {
                    None => kind_priority.unwrap_or_else(|| default_priority(&kind)),
                    Some(p) => u32::try_from(*p.get_ref())
                        .ok()
                        .filter(|p| *p <= 1_000)
                        .unwrap_or_else(|| {
                            self.error(p.span(), "priority must be between 0 and 1000");
                            0
                        }),
                };
                grants.push(SeedGrant {
                    kind,
                    credits,
                    expires_at_ms,
                    priority,
                });
            }
            let mut keys = Vec::new();
            for key in &account.keys {
                let k = key.get_ref();
                let hash = match (&k.key_env, &k.key_sha256) {
                    (Some(var), None) => match (self.env)(var.get_ref()) {
                        Some(key) if !key.is_empty() => Some(Sha256::digest(key.as_bytes()).into()),
                        // `check --no-env`: one placeholder key per variable, so two
                        // members naming the same variable still share a key.
                        None if self.placeholders => Some(
                            Sha256::digest(format!("{}:{}", super::PLACEHOLDER, var.get_ref()))
                                .into(),
                        ),
                        _ => {
                            self.error(
                                var.span(),
                                format!("environment variable {} is not set", var.get_ref()),
                            );
                            None
                        }
                    },
                    (None, Some(hex_hash)) => {
                        let mut hash = [0u8; 32];
                        match hex::decode_to_slice(hex_hash.get_ref(), &mut hash) {
                            Ok(()) => Some(hash),
                            Err(_) => {
                                self.error(
                                    hex_hash.span(),
                                    "key_sha256 must be 64 hex digits (the SHA-256 of the key)",
                                );
                                None
                            }
                        }
                    }
                    _ => {
                        self.error(
                            key.span(),
                            "a key needs exactly one of key_env or key_sha256",
                        );
                        None
                    }
                };
                if let Some(hash) = hash {
                    if !key_hashes.insert(hash) {
                        self.error(key.span(), "this key is already used by another member");
                    }
                    keys.push(SeedKey {
                        member: k.member.get_ref().clone(),
                        key_sha256: hash,
                    });
                }
            }
            let mut members: Vec<&str> = keys.iter().map(|k| k.member.as_str()).collect();
            members.sort();
            members.dedup();
            if let Some(plan) = plans.get(account.plan.get_ref()) {
                if members.len() > plan.seats as usize {
                    self.error(
                        account.id.span(),
                        format!(
                            "{} members but plan {} has {} seats",
                            members.len(),
                            account.plan.get_ref(),
                            plan.seats
                        ),
                    );
                }
            }
            out.push(SeedAccount {
                id,
                plan: account.plan.get_ref().clone(),
                billing_anchor_day,
                grants,
                keys,
            });
        }
        out
    }
}
