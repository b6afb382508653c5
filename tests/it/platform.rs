//! Accounts a platform runs (§13), end to end on the memory and sqlite stores:
//! one-call onboarding, member limits under concurrency, disabled features,
//! adjustments, attribution in both ledger APIs, member removal, the export.

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::*;

/// The harness policy with a team plan of three seats.
fn team_policy(_backend: &str) -> String {
    POLICY
        .replace("{CREDITS}", "0")
        .replace("{READ_TIMEOUT}", "2s")
        .replace(
            "[plans.pro]",
            "[plans.team]\nmonthly_credits = 0\nseats = 3\nfeatures = [\"premium\", \"api\"]\n\n[plans.pro]",
        )
        .replace(
            "[[operations]]\nname = \"image.generate\"",
            "[[operations]]\nname = \"api.models\"\nmethod = \"GET\"\npath = \"/v1/api-models\"\nupstream = \"main\"\nrequires = [\"api\"]\nprice = 0\n\n[[operations]]\nname = \"image.generate\"",
        )
}

async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Onboards a team of three in one call: ann may spend 60 credits a month
/// (20 images at 3), bob has premium disabled, cy has no limit.
async fn onboard(gw: &TestGateway) -> (String, String, String) {
    let (status, body) = json_of(
        gw.admin(Method::POST, "/admin/accounts")
            .json(&json!({
                "id": "acme",
                "plan": "team",
                "members": [
                    {"member": "ann", "monthly_limit": 60},
                    {"member": "bob", "disabled_features": ["premium", "api"]},
                    {"member": "cy"}
                ],
                "keys": [{"member": "ann"}, {"member": "bob"}, {"member": "cy"}],
                "grants": [{"kind": "topup", "credits": 1000, "idempotency_key": "order-1"}],
                "metadata": {"stripe_customer": "cus_123"}
            }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["metadata"]["stripe_customer"], "cus_123");
    assert_eq!(body["members"]["ann"]["monthly_limit"], json!(60));
    assert_eq!(body["members"]["bob"]["premium_disabled"], json!(true));
    assert_eq!(body["available"], json!(1000));
    let keys = body["keys"].as_array().unwrap();
    let key = |m: &str| {
        keys.iter().find(|k| k["member"] == m).unwrap()["key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    (key("ann"), key("bob"), key("cy"))
}

async fn platform_story(gw: TestGateway) {
    let (ann, bob, cy) = onboard(&gw).await;
    // The keys work at once.
    let resp = gw
        .call(Method::POST, "/v1/images", &cy)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // 200 concurrent requests by ann, whose limit pays for exactly 20.
    let calls = (0..200).map(|_| {
        let request = gw.call(Method::POST, "/v1/images", &ann).send();
        async move { request.await.unwrap() }
    });
    let answers = futures_util::future::join_all(calls).await;
    let mut served = 0;
    let mut refused = None;
    for resp in answers {
        match resp.status().as_u16() {
            200 => served += 1,
            402 => refused = Some(resp.json::<Value>().await.unwrap()),
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(served, 20, "exactly what ann's limit pays for");
    let refused = refused.unwrap();
    assert_eq!(refused["error"]["type"], "member_limit_reached");
    assert_eq!(refused["error"]["member"], "ann");
    assert_eq!(refused["error"]["limit"], json!(60));
    // A teammate still can, and the account has plenty.
    let resp = gw
        .call(Method::POST, "/v1/images", &cy)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let t = gw.settled("acme").await;
    assert_eq!(t.charged, credits("66"));
    let (_, view) = json_of(
        gw.admin(Method::GET, "/admin/accounts/acme")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(view["members"]["ann"]["used"], json!(60));
    // A quote says the same as the hold.
    let (status, quote) = json_of(
        gw.call(Method::POST, "/credits/v1/quote", &ann)
            .json(&json!({"method": "POST", "path": "/v1/images"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(quote["error"]["type"], "member_limit_reached", "{quote}");

    // Premium disabled for bob: 403 premium_disabled.
    let resp = gw
        .call(Method::POST, "/v1/images/premium", &bob)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(
        (status, body["error"]["type"].clone()),
        (403, json!("premium_disabled"))
    );

    // Another disabled feature, on a free operation (no hold): 403 feature_disabled.
    let resp = gw
        .call(Method::GET, "/v1/api-models", &bob)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(
        (
            status,
            body["error"]["type"].clone(),
            body["error"]["feature"].clone()
        ),
        (403, json!("feature_disabled"), json!("api"))
    );
    let resp = gw
        .call(Method::GET, "/v1/api-models", &cy)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "a teammate may");

    // Attribution on the client's ledger.
    let (_, ledger) = json_of(
        gw.call(Method::GET, "/credits/v1/ledger?limit=5", &cy)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let settle = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "settle")
        .unwrap()
        .clone();
    assert_eq!(settle["member"], "cy");
    assert!(settle["key_id"].as_str().unwrap().starts_with("key_"));
    assert_eq!(settle["operation"], "image.generate");
    assert!(settle["request_id"].is_string());
    assert_eq!(settle["balance_after"], json!(934));

    // A refund: a positive adjustment, once.
    let refund =
        json!({"credits": 15, "reason": "refund: failed batch", "idempotency_key": "refund-1"});
    for expected in [201, 200] {
        let (status, body) = json_of(
            gw.admin(Method::POST, "/admin/accounts/acme/adjustments")
                .json(&refund)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, expected, "{body}");
        assert_eq!(body["available"], json!(949));
    }
    // A chargeback past what is available and the (zero) overdraft: 409.
    let (status, body) = json_of(
        gw.admin(Method::POST, "/admin/accounts/acme/adjustments")
            .json(&json!({"credits": "-950", "reason": "chargeback", "idempotency_key": "cb-1"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["type"].clone()),
        (409, json!("insufficient_credits"))
    );
    let (_, ledger) = json_of(
        gw.admin(Method::GET, "/admin/accounts/acme/ledger?limit=1")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let adjust = &ledger["entries"][0];
    assert_eq!(
        (
            adjust["type"].clone(),
            adjust["credits"].clone(),
            adjust["detail"].clone()
        ),
        (json!("adjust"), json!(15), json!("refund: failed batch"))
    );

    // Metadata, the account list, the key list.
    let (status, _) = json_of(
        gw.admin(Method::PATCH, "/admin/accounts/acme")
            .json(&json!({"metadata": {"tier": "gold", "stripe_customer": null}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let (_, list) = json_of(
        gw.admin(Method::GET, "/admin/accounts?limit=200")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let acme = list["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["account"] == "acme")
        .unwrap()
        .clone();
    assert_eq!(acme["metadata"], json!({"tier": "gold"}));
    let (_, keys) = json_of(
        gw.admin(Method::GET, "/admin/accounts/acme/keys")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let keys = keys["keys"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 3);
    assert!(keys.iter().all(|k| k.get("key").is_none()), "never a key");

    // Removing a member revokes its keys at once.
    let (status, _) = json_of(
        gw.admin(Method::DELETE, "/admin/accounts/acme/members/cy")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let resp = gw
        .call(Method::POST, "/v1/images", &cy)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // The export has every entry, in time order, as NDJSON and as CSV.
    let text = gw
        .admin(
            Method::GET,
            "/admin/ledger/export?format=ndjson&since=2000-01-01T00:00:00Z",
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let acme_lines = lines.iter().filter(|l| l["account"] == "acme").count();
    let (_, all) = json_of(
        gw.admin(Method::GET, "/admin/accounts/acme/ledger?limit=200")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(acme_lines, all["entries"].as_array().unwrap().len());
    assert!(lines
        .windows(2)
        .all(|w| w[0]["at"].as_str() <= w[1]["at"].as_str()));
    let csv = gw
        .admin(Method::GET, "/admin/ledger/export?format=csv")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(csv.starts_with("account,id,at,type,credits,"));
    assert_eq!(csv.lines().count(), lines.len() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_runs_its_accounts_on_the_memory_store() {
    platform_story(start_policy(team_policy, |_| None).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_runs_its_accounts_on_the_sqlite_store() {
    let file = TempFile::new("platform.db");
    platform_story(start_policy_on_sqlite(team_policy, file.path()).await).await;
}
