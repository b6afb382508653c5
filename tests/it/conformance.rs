//! One scripted scenario, run against every store: the transcripts of what each
//! call answered must be identical. Then a seeded randomized run against a simple
//! reference model of the §1 invariant, on every store at once. The sqlite store
//! is also reopened from its file after each, and must answer as before.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use creditgate::ledger::{
    AdjustRequest, Caller, Credits, Effective, HoldRequest, HoldTerms, MemberTerms, Millis,
    OnboardKey, Onboarding,
};
use creditgate::policy::Policy;
use creditgate::store::local::LocalStore;
use creditgate::store::redis::RedisStore;
use creditgate::store::sqlite;
use creditgate::store::{GrantRequest, HoldOutcome, Store, StoreError};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use crate::harness::TempFile;
use crate::redis_server::{RedisCluster, RedisServer};

const POLICY: &str = r#"
version = 1
[gateway]
ledger_max_entries = 50
[plans.free]
monthly_credits = 10
signup_credits = 2
overdraft_limit = 3
[plans.team]
monthly_credits = 100
seats = 2
quotas = { basic = 2 }
features = ["api"]
[plans.pro]
monthly_credits = 50
features = ["api", "premium"]
[grant_kinds.referral]
priority = 5
[[accounts]]
id = "acme"
plan = "free"
billing_anchor_day = 31
grants = [ { kind = "topup", credits = 5 } ]
keys = [ { member = "alice", key_env = "ALICE" } ]
"#;

fn policy() -> Policy {
    Policy::parse(POLICY, "conformance.toml", &|name| {
        (name == "ALICE").then(|| "sk-alice".to_string())
    })
    .unwrap()
}

fn t(text: &str) -> Millis {
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap()
        .timestamp_millis() as Millis
}

fn c(text: &str) -> Credits {
    text.parse().unwrap()
}

fn hold(amount: &str, request_id: &str, ttl_ms: u64, quota: Option<&str>) -> HoldRequest {
    HoldRequest {
        operation: "op".into(),
        request_id: request_id.into(),
        amount: c(amount),
        ttl_ms,
        max_holds: 3,
        quota: quota.map(str::to_string),
        idempotency: None,
        caller: None,
        terms: creditgate::ledger::HoldTerms::default(),
    }
}

/// A hold on behalf of `member`'s key `key_id`, for an operation requiring `requires`.
fn hold_by(member: &str, key_id: &str, requires: &[&str], request_id: &str) -> HoldRequest {
    HoldRequest {
        caller: Some(Caller {
            member: member.into(),
            key_id: key_id.into(),
            requires: requires.iter().map(|f| f.to_string()).collect(),
        }),
        ..hold("1", request_id, 60_000, None)
    }
}

/// Everything a store answered, one line per call.
struct Transcript(Vec<String>);

impl Transcript {
    fn note(&mut self, what: &str, value: impl std::fmt::Debug) {
        self.0.push(format!("{what}: {value:?}"));
    }
}

/// A store whose every hold is quoted first: the quote (a dry-run hold) must
/// answer what the hold then does, and leave the account as the hold finds it.
struct Quoting(Arc<dyn Store>);

impl std::ops::Deref for Quoting {
    type Target = dyn Store;
    fn deref(&self) -> &dyn Store {
        &*self.0
    }
}

impl Quoting {
    async fn hold(
        &self,
        account: &str,
        request: &HoldRequest,
        now_ms: Millis,
    ) -> Result<HoldOutcome, StoreError> {
        let quoted = self.0.quote(account, request, now_ms).await;
        let again = self.0.quote(account, request, now_ms).await;
        assert_eq!(quoted, again, "a quote changed what the next one sees");
        let held = self.0.hold(account, request, now_ms).await;
        match (&quoted, &held) {
            (Ok(quoted), Ok(held)) => {
                let admitted = held.as_ref().map(|p| p.held).map_err(Clone::clone);
                assert_eq!(quoted.admitted, admitted, "{request:?}");
                if let Ok(placed) = held {
                    assert_eq!(
                        Some(placed.available),
                        quoted.available.checked_sub(placed.held)
                    );
                }
            }
            (Err(quoted), Err(held)) => assert_eq!(quoted, held),
            _ => panic!("quoted {quoted:?}, held {held:?}"),
        }
        held
    }
}

async fn scenario(store: Arc<dyn Store>) -> Vec<String> {
    let store = Quoting(store);
    let p = policy();
    let mut out = Transcript(Vec::new());
    let t0 = t("2026-01-31T10:00:00Z");
    let alice: [u8; 32] = Sha256::digest(b"sk-alice").into();
    out.note("seed", store.seed(&p.accounts[0], t0).await);
    out.note("seed again", store.seed(&p.accounts[0], t0).await);
    out.note("identify", store.identify(&alice, t0).await);
    out.note("identify unknown", store.identify(&[7; 32], t0).await);

    let h1 = store.hold("acme", &hold("3", "r1", 60_000, None), t0).await;
    out.note("hold 3", &h1);
    out.note(
        "hold too much",
        store
            .hold("acme", &hold("20", "r2", 60_000, None), t0)
            .await,
    );
    let h2 = store
        .hold("acme", &hold("0.5", "r3", 60_000, None), t0)
        .await;
    out.note("hold 0.5", &h2);
    let (h1, h2) = (h1.unwrap().unwrap().hold_id, h2.unwrap().unwrap().hold_id);
    out.note(
        "settle 2 of 3",
        store.settle("acme", h1, c("2"), None, t0 + 1).await,
    );
    out.note(
        "settle again",
        store.settle("acme", h1, c("2"), None, t0 + 2).await,
    );
    out.note("release settled", store.release("acme", h1, t0 + 2).await);
    out.note("release unknown", store.release("acme", 999, t0 + 2).await);
    out.note("release", store.release("acme", h2, t0 + 3).await);
    for i in 0..4 {
        out.note(
            "hold under the cap",
            store
                .hold(
                    "acme",
                    &hold("0.001", &format!("c{i}"), 1_000, None),
                    t0 + 4,
                )
                .await,
        );
    }
    out.note("sweep early", store.sweep(t0 + 1_003).await);
    out.note("sweep due", store.sweep(t0 + 1_004).await);
    out.note("totals", store.totals("acme", t0 + 1_005).await);
    // A hold that ends leaves the Redis hold index behind (it is lazy); a later hold
    // that expires after that stale entry must still be swept when it is due.
    let t1 = t0 + 2_000;
    let early = store.hold("acme", &hold("1", "lz1", 1_000, None), t1).await;
    out.note("hold lz1", &early);
    let early = early.unwrap().unwrap().hold_id;
    out.note(
        "settle lz1",
        store.settle("acme", early, c("1"), None, t1 + 1).await,
    );
    out.note(
        "hold lz2",
        store
            .hold("acme", &hold("1", "lz2", 5_000, None), t1 + 2)
            .await,
    );
    out.note("sweep stale", store.sweep(t1 + 1_000).await);
    out.note("sweep before lz2", store.sweep(t1 + 5_001).await);
    out.note("sweep lz2", store.sweep(t1 + 5_002).await);
    out.note("totals after", store.totals("acme", t1 + 5_003).await);
    out.note("totals of nobody", store.totals("nobody", t0).await);

    out.note(
        "create team",
        store.create_account("team", "team", Some(15), t0).await,
    );
    out.note(
        "create again",
        store.create_account("team", "team", None, t0).await,
    );
    out.note(
        "create on no plan",
        store.create_account("x", "gold", None, t0).await,
    );
    out.note(
        "member ann",
        store
            .add_member("team", "ann", &MemberTerms::premium(false), t0)
            .await,
    );
    out.note(
        "member bob",
        store
            .add_member("team", "bob", &MemberTerms::premium(false), t0)
            .await,
    );
    out.note(
        "member cy",
        store
            .add_member("team", "cy", &MemberTerms::premium(false), t0)
            .await,
    );
    out.note(
        "member ann again",
        store
            .add_member("team", "ann", &MemberTerms::premium(false), t0)
            .await,
    );
    out.note(
        "disable bob",
        store
            .update_member("team", "bob", &MemberTerms::premium(true), t0)
            .await,
    );
    out.note(
        "update nobody",
        store
            .update_member("team", "zed", &MemberTerms::premium(true), t0)
            .await,
    );
    out.note(
        "key for ghost",
        store.add_key("team", "ghost", "k0", &[1; 32], t0).await,
    );
    out.note(
        "key for bob",
        store.add_key("team", "bob", "k1", &[2; 32], t0).await,
    );
    out.note("identify bob", store.identify(&[2; 32], t0).await);

    let referral = GrantRequest {
        idempotency_key: "ref-1".into(),
        kind: "referral".into(),
        credits: c("30"),
        priority: 5,
        expires_at_ms: Some(t0 + 10 * 86_400_000),
    };
    out.note("grant", store.grant("team", &referral, t0).await);
    out.note(
        "grant repeat",
        store
            .grant(
                "team",
                &GrantRequest {
                    credits: c("999"),
                    ..referral.clone()
                },
                t0 + 5,
            )
            .await,
    );
    for i in 0..3 {
        let q = store
            .hold(
                "team",
                &hold("0", &format!("q{i}"), 60_000, Some("basic")),
                t0,
            )
            .await;
        out.note("quota hold", &q);
        if let Ok(Ok(placed)) = q {
            out.note(
                "quota settle",
                store.settle("team", placed.hold_id, c("0"), None, t0).await,
            );
        }
    }
    out.note(
        "upgrade",
        store
            .change_plan("team", "pro", Effective::Now, t0 + 10)
            .await,
    );
    out.note(
        "downgrade",
        store
            .change_plan("team", "free", Effective::PeriodEnd, t0 + 11)
            .await,
    );
    out.note(
        "unknown plan",
        store
            .change_plan("team", "gold", Effective::Now, t0 + 12)
            .await,
    );
    out.note("view", store.account("team", t0 + 13).await);

    // Twenty days on: the bonus expired, a refill happened, the downgrade applied.
    let later = t0 + 20 * 86_400_000;
    // Who a key is changes nothing, yet names the plan in force: the downgrade
    // waiting for the refill, once the refill is due, before anything applies it.
    let bob = store.identify(&[2; 32], later).await;
    assert_eq!(
        bob.as_ref()
            .ok()
            .and_then(|i| i.as_ref())
            .map(|i| i.plan.as_str()),
        Some("free"),
        "{bob:?}"
    );
    out.note("identify bob once the refill is due", bob);
    out.note("view later", store.account("team", later).await);
    out.note("view acme later", store.account("acme", later).await);
    let page = store.ledger("team", 5, None, later).await;
    out.note("ledger page", &page);
    let cursor = page.unwrap().last().map(|e| e.seq);
    out.note(
        "ledger next page",
        store.ledger("team", 5, cursor, later).await,
    );
    out.note(
        "ledger all",
        store
            .ledger("acme", 200, None, later)
            .await
            .map(|e| e.len()),
    );
    let open = store
        .hold("team", &hold("1", "open", 60_000, None), later)
        .await;
    out.note("open hold", &open);
    out.note("holds", store.holds(Some("team"), 10, later).await);
    out.note(
        "holds everywhere",
        store.holds(None, 10, later).await.map(|h| h.len()),
    );
    let idem = |fp: &str| {
        Some(creditgate::ledger::IdempotencyRequest {
            key: "order-9".into(),
            fingerprint: fp.into(),
            ttl_ms: 86_400_000,
        })
    };
    let keyed = HoldRequest {
        idempotency: idem("f"),
        ..hold("1", "i1", 60_000, None)
    };
    let placed = store.hold("team", &keyed, later).await;
    out.note("idempotent hold", &placed);
    out.note(
        "same key in flight",
        store.hold("team", &keyed, later).await,
    );
    if let Ok(Ok(p)) = placed {
        out.note(
            "settle keyed",
            store.settle("team", p.hold_id, c("1"), None, later).await,
        );
    }
    out.note(
        "replay while recording",
        store.hold("team", &keyed, later).await,
    );
    let recorded = creditgate::ledger::Recorded {
        status: 200,
        content_type: None,
        body: Some("ok".into()),
    };
    out.note(
        "record",
        store
            .record_response("team", "order-9", &recorded, later)
            .await,
    );
    out.note("replay", store.hold("team", &keyed, later).await);
    out.note(
        "reused",
        store
            .hold(
                "team",
                &HoldRequest {
                    idempotency: idem("g"),
                    ..keyed.clone()
                },
                later,
            )
            .await,
    );

    // The hold re-checks who asks against the state it commits on.
    let by_bob = store
        .hold("team", &hold_by("bob", "k1", &[], "b1"), later)
        .await;
    out.note("hold by bob's key", &by_bob);
    if let Ok(Ok(p)) = by_bob {
        out.note("release", store.release("team", p.hold_id, later).await);
    }
    out.note(
        "feature the plan lacks",
        store
            .hold("team", &hold_by("bob", "k1", &["api"], "b2"), later)
            .await,
    );
    out.note(
        "key not listed",
        store
            .hold("team", &hold_by("ann", "k1", &[], "b3"), later)
            .await,
    );
    out.note(
        "member gone",
        store
            .hold("team", &hold_by("ghost", "k1", &[], "b4"), later)
            .await,
    );
    out.note(
        "upgrade to premium",
        store
            .change_plan("team", "pro", Effective::Now, later)
            .await,
    );
    out.note(
        "premium disabled",
        store
            .hold("team", &hold_by("bob", "k1", &["premium"], "b5"), later)
            .await,
    );
    out.note(
        "enable bob",
        store
            .update_member("team", "bob", &MemberTerms::premium(false), later)
            .await,
    );
    let premium = store
        .hold("team", &hold_by("bob", "k1", &["premium"], "b6"), later)
        .await;
    out.note("premium allowed", &premium);
    if let Ok(Ok(p)) = premium {
        out.note("release", store.release("team", p.hold_id, later).await);
    }
    out.note("revoke", store.revoke_key("k1", later).await);
    out.note("revoke again", store.revoke_key("k1", later).await);
    out.note("identify revoked", store.identify(&[2; 32], later).await);
    out.note(
        "hold by a revoked key",
        store
            .hold("team", &hold_by("bob", "k1", &[], "b7"), later)
            .await,
    );

    // Seeding again leaves an existing account as it is: a revoked seeded key stays revoked.
    let alice_id = creditgate::ledger::seed_key_id(&alice);
    out.note("revoke alice", store.revoke_key(&alice_id, later).await);
    out.note("seed after revoke", store.seed(&p.accounts[0], later).await);
    out.note(
        "identify alice after reseed",
        store.identify(&alice, later).await,
    );
    out.note(
        "hold by alice after reseed",
        store
            .hold("acme", &hold_by("alice", &alice_id, &[], "a1"), later)
            .await,
    );

    // Debt: a partial hold of what is left, settled above it into debt up to the
    // free plan's overdraft limit (3), the rest uncollected; the next grant repays it.
    let overdraft = |amount: &str, id: &str| HoldRequest {
        terms: HoldTerms {
            partial_min: Some(c("0.01")),
            overdraft: true,
            quota_units: 1,
        },
        ..hold(amount, id, 60_000, None)
    };
    let owed = store.hold("acme", &overdraft("1000", "d1"), later).await;
    out.note("partial overdraft hold", &owed);
    if let Ok(Ok(p)) = owed {
        let charge = p.held.checked_add(c("5")).unwrap();
        out.note(
            "settle into debt",
            store.settle("acme", p.hold_id, charge, None, later).await,
        );
    }
    out.note("totals in debt", store.totals("acme", later).await);
    out.note(
        "hold with nothing available",
        store.hold("acme", &overdraft("1", "d2"), later).await,
    );
    let repay = GrantRequest {
        idempotency_key: "repay".into(),
        kind: "topup".into(),
        credits: c("4"),
        priority: 30,
        expires_at_ms: None,
    };
    out.note(
        "grant repays debt",
        store.grant("acme", &repay, later).await,
    );
    out.note("totals repaid", store.totals("acme", later).await);
    out.note(
        "ledger of the debt",
        store.ledger("acme", 4, None, later).await,
    );

    // Adjustments: once per key; a debit past available + overdraft room is refused.
    let adjust = |key: &str, credits: &str, debit: bool| AdjustRequest {
        idempotency_key: key.into(),
        credits: c(credits),
        debit,
        reason: "refund".into(),
    };
    out.note(
        "adjust +2",
        store.adjust("acme", &adjust("a1", "2", false), later).await,
    );
    out.note(
        "adjust again",
        store.adjust("acme", &adjust("a1", "2", false), later).await,
    );
    out.note(
        "adjust key reused",
        store.adjust("acme", &adjust("a1", "3", false), later).await,
    );
    out.note(
        "debit too much",
        store
            .adjust("acme", &adjust("a2", "100", true), later)
            .await,
    );
    out.note(
        "debit into debt",
        store.adjust("acme", &adjust("a3", "5", true), later).await,
    );
    out.note("totals adjusted", store.totals("acme", later).await);

    // One-call onboarding, a member limit held like credits, member removal.
    let limited = MemberTerms {
        monthly_limit: Some(c("2")),
        ..MemberTerms::default()
    };
    let onboarding = Onboarding {
        members: vec![
            ("ann".into(), limited),
            ("bob".into(), MemberTerms::default()),
        ],
        keys: vec![OnboardKey {
            member: "ann".into(),
            key_id: "k-ann".into(),
            key_sha256: [3; 32],
        }],
        grants: vec![GrantRequest {
            idempotency_key: "welcome".into(),
            kind: "topup".into(),
            credits: c("50"),
            priority: 30,
            expires_at_ms: None,
        }],
        metadata: [("customer".to_string(), "cus_1".to_string())].into(),
    };
    out.note(
        "onboard",
        store
            .onboard("crew", "team", None, &onboarding, later)
            .await,
    );
    out.note(
        "onboard again",
        store
            .onboard("crew", "team", None, &onboarding, later)
            .await,
    );
    out.note("identify ann", store.identify(&[3; 32], later).await);
    for i in 0..3 {
        let held = store
            .hold(
                "crew",
                &hold_by("ann", "k-ann", &[], &format!("m{i}")),
                later,
            )
            .await;
        out.note("hold by ann", &held);
    }
    let raised = MemberTerms {
        monthly_limit: Some(c("5")),
        ..MemberTerms::default()
    };
    out.note(
        "raise ann's limit",
        store.update_member("crew", "ann", &raised, later).await,
    );
    out.note(
        "hold after the raise",
        store
            .hold("crew", &hold_by("ann", "k-ann", &[], "m3"), later)
            .await,
    );
    let changes = [
        ("customer".to_string(), None),
        ("tier".to_string(), Some("gold".to_string())),
    ]
    .into();
    out.note(
        "metadata",
        store.update_metadata("crew", &changes, later).await,
    );
    out.note("crew", store.account("crew", later).await);
    out.note(
        "remove ann",
        store.remove_member("crew", "ann", later).await,
    );
    out.note(
        "remove ann again",
        store.remove_member("crew", "ann", later).await,
    );
    out.note("identify removed", store.identify(&[3; 32], later).await);
    out.note(
        "hold by a removed member",
        store
            .hold("crew", &hold_by("ann", "k-ann", &[], "m4"), later)
            .await,
    );
    out.note(
        "accounts",
        store
            .list_accounts(None, 10, later)
            .await
            .map(|v| v.into_iter().map(|a| a.id).collect::<Vec<_>>()),
    );
    out.note(
        "accounts after acme",
        store
            .list_accounts(Some("acme"), 1, later)
            .await
            .map(|v| v.into_iter().map(|a| a.id).collect::<Vec<_>>()),
    );
    out.note("crew ledger", store.ledger("crew", 20, None, later).await);
    let exported = store.export(later, None, 1_000).await;
    out.note("export", &exported);
    let exported = exported.unwrap();
    assert!(exported
        .iter()
        .any(|(a, e)| a == "crew" && e.member.as_deref() == Some("ann")));
    assert!(exported.windows(2).all(|w| w[0].1.at_ms <= w[1].1.at_ms));
    let said = |what: &str| {
        out.0
            .iter()
            .filter(|l| l.starts_with(&format!("{what}: ")))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        said("hold by ann")[2].contains("MemberLimitReached"),
        "{:?}",
        said("hold by ann")
    );
    assert!(said("hold after the raise")[0].contains("Ok(Ok("));
    assert!(said("hold by a removed member")[0].contains("KeyNotActive"));
    assert!(said("debit too much")[0].contains("InsufficientCredits"));
    assert!(said("adjust key reused")[0].contains("IdempotencyKeyReused"));
    assert!(said("identify removed")[0].contains("Ok(None)"));
    out.0
}

async fn memory() -> Arc<dyn Store> {
    Arc::new(LocalStore::new(policy().catalog(), policy().limits()))
}

/// The sqlite store on `file` (created, or reopened with what it holds).
fn sqlite(file: &Path) -> Arc<dyn Store> {
    Arc::new(
        sqlite::open(
            file,
            Duration::from_millis(2),
            policy().catalog(),
            policy().limits(),
        )
        .unwrap(),
    )
}

/// What a store shows of the scenario's accounts at `now`: views, ledgers, holds.
async fn reads(store: &dyn Store, now: Millis) -> Vec<String> {
    let mut out = Transcript(Vec::new());
    for id in ["acme", "team"] {
        out.note("view", store.account(id, now).await);
        out.note("ledger", store.ledger(id, 1_000, None, now).await);
        out.note("holds", store.holds(Some(id), 100, now).await);
    }
    out.note(
        "identify alice",
        store
            .identify(&Sha256::digest(b"sk-alice").into(), now)
            .await,
    );
    out.0
}

async fn redis(url: &str, cluster: bool) -> Arc<dyn Store> {
    Arc::new(
        RedisStore::connect(url, cluster, policy().catalog(), policy().limits())
            .await
            .unwrap(),
    )
}

fn assert_same(reference: &[String], other: &[String], name: &str) {
    for (i, (a, b)) in reference.iter().zip(other).enumerate() {
        assert_eq!(a, b, "{name} differs from the memory store at step {i}");
    }
    assert_eq!(reference.len(), other.len());
}

#[tokio::test]
async fn memory_and_redis_answer_every_scripted_call_identically() {
    let server = RedisServer::start();
    let reference = scenario(memory().await).await;
    let on_redis = scenario(redis(&server.url(), false).await).await;
    assert_same(&reference, &on_redis, "redis");
    assert!(
        reference.iter().any(|l| l.contains("SeatLimit"))
            && reference.iter().any(|l| l.contains("QuotaExhausted"))
    );
    // The debt case happened as the ledger says: 3 of debt, 2 uncollected, repaid.
    let debt = reference
        .iter()
        .find(|l| l.starts_with("settle into debt: "))
        .expect("the scenario settles into debt");
    assert!(
        debt.contains("debt: Credits(3000)") && debt.contains("uncollected: Credits(2000)"),
        "{debt}"
    );
    let repaid = reference
        .iter()
        .find(|l| l.starts_with("totals repaid: "))
        .unwrap();
    assert!(repaid.contains("debt: Credits(0)"), "{repaid}");
    let line = |what: &str| {
        reference
            .iter()
            .find(|l| l.starts_with(&format!("{what}: ")))
            .unwrap_or_else(|| panic!("no {what:?} in the transcript"))
            .clone()
    };
    for (what, answer) in [
        (
            "feature the plan lacks",
            "Ok(Err(PlanRequired { feature: \"api\" }))",
        ),
        ("key not listed", "Ok(Err(KeyNotActive))"),
        ("member gone", "Ok(Err(KeyNotActive))"),
        ("premium disabled", "Ok(Err(PremiumDisabled))"),
        ("hold by a revoked key", "Ok(Err(KeyNotActive))"),
        ("seed after revoke", "Ok(false)"),
        ("identify alice after reseed", "Ok(None)"),
        ("hold by alice after reseed", "Ok(Err(KeyNotActive))"),
    ] {
        assert_eq!(line(what), format!("{what}: {answer}"));
    }
    assert!(line("premium allowed").starts_with("premium allowed: Ok(Ok("));
}

#[tokio::test]
async fn a_redis_cluster_answers_every_scripted_call_identically() {
    let cluster = RedisCluster::start();
    let reference = scenario(memory().await).await;
    let on_cluster = scenario(redis(&cluster.url(), true).await).await;
    assert_same(&reference, &on_cluster, "redis cluster");
}

#[tokio::test]
async fn the_sqlite_store_answers_every_scripted_call_identically_and_again_after_a_reopen() {
    let file = TempFile::new("conformance.db");
    let reference = scenario(memory().await).await;
    let store = sqlite(file.path());
    let on_sqlite = scenario(store.clone()).await;
    assert_same(&reference, &on_sqlite, "sqlite");
    let later = t("2026-02-20T10:00:00Z");
    let before = reads(store.as_ref(), later).await;
    drop(store);
    let reopened = sqlite(file.path());
    let after = reads(reopened.as_ref(), later).await;
    assert_same(&before, &after, "the reopened sqlite store");
    assert!(
        before.iter().any(|l| l.starts_with("ledger: Ok([Entry")),
        "the reads show ledger entries: {before:#?}"
    );
}

/// What the reference model knows: the holds it placed (with whether they may
/// overdraw) and what was charged.
#[derive(Default)]
struct Model {
    open: Vec<(u64, Credits, Millis, bool)>,
    charged: Credits,
}

/// The free plan's overdraft limit in `POLICY`.
const OVERDRAFT_LIMIT: &str = "3";

/// Alice's monthly limit in the model test.
const ALICE_LIMIT: &str = "6";

#[tokio::test]
async fn a_seeded_random_history_agrees_with_the_reference_model_on_every_store() {
    let server = RedisServer::start_unsynced();
    let file = TempFile::new("model.db");
    let stores = [
        memory().await,
        redis(&server.url(), false).await,
        sqlite(file.path()),
    ];
    let p = policy();
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261121);
    let mut now = t("2026-01-31T10:00:00Z");
    for store in &stores {
        store.seed(&p.accounts[0], now).await.unwrap();
    }
    let mut model = Model::default();
    let mut granted_keys = 0;
    // Alice may spend 6 credits a cycle: her holds are admitted against it.
    let alice_id = creditgate::ledger::seed_key_id(&Sha256::digest(b"sk-alice").into());
    let limit = MemberTerms {
        monthly_limit: Some(c(ALICE_LIMIT)),
        ..MemberTerms::default()
    };
    for store in &stores {
        store
            .update_member("acme", "alice", &limit, now)
            .await
            .unwrap()
            .unwrap();
    }
    for step in 0..3_000 {
        let choice = rng.gen_range(0..100);
        let mut answers = Vec::new();
        if choice < 40 {
            let amount = Credits::from_millicredits(rng.gen_range(0..4_000));
            let ttl = rng.gen_range(1..3_600_000);
            let overdraft = rng.gen_bool(0.3);
            let terms = HoldTerms {
                partial_min: rng
                    .gen_bool(0.3)
                    .then(|| Credits::from_millicredits(rng.gen_range(1..2_000))),
                overdraft,
                quota_units: 1,
            };
            // Half the holds are alice's, never overdrawing: her limit binds them.
            let by_alice = !overdraft && rng.gen_bool(0.5);
            let request = HoldRequest {
                operation: "op".into(),
                request_id: format!("r{step}"),
                amount,
                ttl_ms: ttl,
                max_holds: 50,
                quota: None,
                idempotency: None,
                caller: by_alice.then(|| Caller {
                    member: "alice".into(),
                    key_id: alice_id.clone(),
                    requires: Vec::new(),
                }),
                terms,
            };
            for store in &stores {
                let store = Quoting(store.clone());
                answers.push(format!(
                    "{:?}",
                    store.hold("acme", &request, now).await.unwrap()
                ));
            }
            if let Ok(Some((_, h))) = stores[0].holds(Some("acme"), 100, now).await.map(|h| {
                h.into_iter()
                    .find(|(_, h)| h.request_id == request.request_id)
            }) {
                model
                    .open
                    .push((h.id, h.amount, h.expires_at_ms, overdraft));
            }
        } else if choice < 70 && !model.open.is_empty() {
            let (id, held, _, overdraft) =
                model.open.swap_remove(rng.gen_range(0..model.open.len()));
            let settle = rng.gen_bool(0.6);
            let charge = Credits::from_millicredits(rng.gen_range(0..5_000));
            // What an overdraft settle finds beside its hold: the available
            // credits, then room for debt under the limit.
            let before = stores[0].totals("acme", now).await.unwrap();
            for store in &stores {
                let outcome = if settle {
                    store.settle("acme", id, charge, None, now).await
                } else {
                    store.release("acme", id, now).await
                };
                answers.push(format!("{outcome:?}"));
            }
            if settle && answers[0].starts_with("Ok(Ok(") {
                let mut charged = charge.min(held);
                if overdraft {
                    let above = charge.saturating_sub(held);
                    let taken = above.min(before.available);
                    let room = c(OVERDRAFT_LIMIT).saturating_sub(before.debt);
                    let into_debt = above.checked_sub(taken).unwrap().min(room);
                    charged = charged
                        .checked_add(taken)
                        .and_then(|c| c.checked_add(into_debt))
                        .unwrap();
                }
                model.charged = model.charged.checked_add(charged).unwrap();
            }
        } else if choice < 74 {
            // A signed adjustment; a repeated key adjusts nothing.
            let debit = rng.gen_bool(0.5);
            let adjustment = AdjustRequest {
                idempotency_key: format!("adj{}", rng.gen_range(0..step + 1)),
                credits: Credits::from_millicredits(rng.gen_range(1..8_000)),
                debit,
                reason: "model".into(),
            };
            for store in &stores {
                answers.push(format!(
                    "{:?}",
                    store.adjust("acme", &adjustment, now).await.unwrap()
                ));
            }
            if debit && answers[0].ends_with("true))") {
                model.charged = model.charged.checked_add(adjustment.credits).unwrap();
            }
        } else if choice < 80 {
            granted_keys += 1;
            let expires = rng
                .gen_bool(0.5)
                .then(|| now + rng.gen_range(0..40 * 86_400_000));
            let grant = GrantRequest {
                idempotency_key: format!("g{}", granted_keys / 2),
                kind: "referral".into(),
                credits: Credits::from_millicredits(rng.gen_range(0..20_000)),
                priority: 5,
                expires_at_ms: expires,
            };
            for store in &stores {
                answers.push(format!(
                    "{:?}",
                    store.grant("acme", &grant, now).await.unwrap()
                ));
            }
        } else {
            // Clock jumps: minutes to over a month.
            now += rng.gen_range(0..40 * 86_400_000u64);
            model.open.retain(|(_, _, expires, _)| *expires > now);
            for store in &stores {
                answers.push(format!("{:?}", store.totals("acme", now).await.unwrap()));
            }
        }
        assert!(
            answers.windows(2).all(|w| w[0] == w[1]),
            "step {step}: the stores disagree: {answers:?}"
        );
        for store in &stores {
            let totals = store.totals("acme", now).await.unwrap();
            let sum = [
                totals.available,
                totals.held,
                totals.charged,
                totals.expired,
            ]
            .into_iter()
            .try_fold(Credits::ZERO, |a, b| a.checked_add(b))
            .unwrap();
            assert_eq!(
                totals.granted.checked_add(totals.debt).unwrap(),
                sum,
                "step {step}: the invariant broke"
            );
            assert!(
                totals.debt <= c(OVERDRAFT_LIMIT),
                "step {step}: debt {} past the limit",
                totals.debt
            );
            assert_eq!(
                totals.charged, model.charged,
                "step {step}: charged differs from the model"
            );
            let held = model
                .open
                .iter()
                .fold(Credits::ZERO, |a, (_, h, _, _)| a.checked_add(*h).unwrap());
            assert_eq!(
                totals.held, held,
                "step {step}: held differs from the model"
            );
            let view = store.account("acme", now).await.unwrap();
            let alice = &view.members["alice"];
            assert!(
                alice.used.checked_add(alice.held).unwrap() <= c(ALICE_LIMIT),
                "step {step}: alice spent past her limit: {alice:?}"
            );
        }
    }
    // Thousands of entries later, every store shows the same newest entries and
    // exactly `ledger_max_entries` (50) of them, though Redis trims in whole blocks.
    let mut ledgers = Vec::new();
    for store in &stores {
        ledgers.push(store.ledger("acme", 1_000, None, now).await.unwrap());
    }
    assert_eq!(ledgers[0].len(), 50, "the ledger keeps its cap");
    assert!(
        ledgers.windows(2).all(|w| w[0] == w[1]),
        "the stores' ledgers differ"
    );
    // Reopened from its file, the sqlite store has every account as it was.
    let [memory, _, on_sqlite] = stores;
    drop(on_sqlite);
    let reopened = sqlite(file.path());
    assert_eq!(
        reopened.account("acme", now).await,
        memory.account("acme", now).await
    );
    assert_eq!(
        reopened.ledger("acme", 1_000, None, now).await.unwrap(),
        ledgers[0]
    );
    assert_eq!(
        reopened.holds(Some("acme"), 100, now).await,
        memory.holds(Some("acme"), 100, now).await
    );
}
