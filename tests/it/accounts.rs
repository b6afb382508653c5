//! Accounts, plans, grants, teams and the admin API, end to end.

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::*;

async fn status_and_json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn seed_000_signup_credits_pay_for_two_pro_and_one_flash_then_402() {
    let gw = start_seed("000-sozdai.toml", |t| t).await;
    let key = gw.open_account("shop", "free", &["owner"]).await.remove(0);
    let card = |quality: &str| {
        gw.call(Method::POST, "/v1/cards", &key)
            .json(&json!({"quality": quality}))
            .send()
    };
    for (quality, remaining) in [("pro", "7"), ("pro", "4"), ("flash", "2")] {
        let resp = card(quality).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-credits-remaining"), remaining);
    }
    let (status, body) = status_and_json(card("pro").await.unwrap()).await;
    assert_eq!(status, 402);
    assert_eq!(
        (
            body["error"]["required"].clone(),
            body["error"]["available"].clone()
        ),
        (json!(3), json!(2))
    );
    assert_eq!(body["error"]["plan"], "free");
    assert_eq!(gw.backend.received().len(), 3);
    let t = gw.settled("shop").await;
    assert_eq!((t.granted, t.charged), (credits("10"), credits("8")));
}

#[tokio::test]
async fn a_referral_bonus_is_spent_first_and_gone_after_60_days() {
    let gw = start_seed("000-sozdai.toml", |t| t).await;
    let key = gw
        .open_account("shop", "subscriber", &["owner"])
        .await
        .remove(0);
    let expires = chrono::DateTime::from_timestamp_millis((gw.now_ms() + 60 * DAY_MS) as i64)
        .unwrap()
        .to_rfc3339();
    let grant = json!({"kind": "bonus", "credits": 30, "expires_at": expires, "idempotency_key": "referral-42"});
    let (status, first) = status_and_json(
        gw.admin(Method::POST, "/admin/accounts/shop/grants")
            .json(&grant)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, first["created"].clone()), (201, json!(true)));
    let (status, again) = status_and_json(
        gw.admin(Method::POST, "/admin/accounts/shop/grants")
            .json(&grant)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, again["created"].clone(), again["grant_id"].clone()),
        (200, json!(false), first["grant_id"].clone())
    );

    gw.call(Method::POST, "/v1/cards", &key)
        .json(&json!({"quality": "pro"}))
        .send()
        .await
        .unwrap();
    gw.settled("shop").await;
    let balance = gw.balance(&key).await;
    assert_eq!(
        balance["available"], 127,
        "100 plan + 30 bonus - 3, and the repeat grant added nothing"
    );
    assert_eq!(balance["grants"][0]["kind"], "bonus");
    assert_eq!(balance["grants"][0]["credits"], 27, "the bonus paid first");
    assert_eq!(
        balance["grants"][1],
        json!({"kind": "plan", "credits": 100, "expires_at": balance["next_refill_at"]})
    );

    gw.advance_days(60);
    let balance = gw.balance(&key).await;
    let kinds: Vec<&str> = balance["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["plan"], "the bonus is gone after 60 days");
    let ledger: Value = gw
        .call(Method::GET, "/credits/v1/ledger?limit=50", &key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expired: Vec<&Value> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "expire" && e["detail"] == "bonus")
        .collect();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0]["credits"], 27);
    let expected_at = chrono::DateTime::parse_from_rfc3339(&expires)
        .unwrap()
        .to_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(
        expired[0]["at"],
        expected_at.as_str(),
        "it expired at its expiry, not when noticed"
    );
    gw.store.check_invariants().unwrap();
}

#[tokio::test]
async fn seed_001_upgrade_grants_450_now_and_downgrade_waits_for_the_refill() {
    let gw = start_seed("001-creative-studio.toml", |t| t).await;
    let key = gw
        .open_account("studio", "starter", &["me"])
        .await
        .remove(0);
    gw.call(Method::POST, "/v1/text/premium", &key)
        .send()
        .await
        .unwrap();
    gw.settled("studio").await;
    assert_eq!(gw.balance(&key).await["available"], 198);

    let (status, account) = status_and_json(
        gw.admin(Method::POST, "/admin/accounts/studio/plan")
            .json(&json!({"plan": "creator", "effective": "now"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{account}");
    assert_eq!(account["plan"], "creator");
    assert_eq!(account["available"], 450, "the Creator allowance at once");
    let resp = gw
        .call(Method::POST, "/v1/images/premium", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "Creator unlocks premium images");

    let (status, account) = status_and_json(
        gw.admin(Method::POST, "/admin/accounts/studio/plan")
            .json(&json!({"plan": "starter", "effective": "period_end"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (
            status,
            account["plan"].clone(),
            account["pending_plan"].clone()
        ),
        (200, json!("creator"), json!("starter"))
    );
    gw.advance_days(31);
    let balance = gw.balance(&key).await;
    assert_eq!(
        (balance["plan"].clone(), balance["available"].clone()),
        (json!("starter"), json!(200))
    );
    let ledger: Value = gw
        .admin(Method::GET, "/admin/accounts/studio/ledger?limit=200")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let types: Vec<&str> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.iter().filter(|t| **t == "plan_change").count(), 3);
    assert!(types.contains(&"refill"));
    assert!(
        types.contains(&"settle")
            && types.contains(&"hold")
            && types.contains(&"grant")
            && types.contains(&"expire")
    );
}

#[tokio::test]
async fn a_team_of_three_shares_one_balance_and_a_fourth_member_is_refused() {
    let gw = start_seed("001-creative-studio.toml", |t| t).await;
    let keys = gw.open_account("team", "team", &["ann", "bob", "cy"]).await;
    let (status, body) = status_and_json(
        gw.admin(Method::POST, "/admin/accounts/team/members")
            .json(&json!({"member": "dee"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["type"].clone()),
        (409, json!("seat_limit"))
    );
    for key in &keys {
        let resp = gw
            .call(Method::POST, "/v1/text/premium", key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    gw.settled("team").await;
    for key in &keys {
        assert_eq!(
            gw.balance(key).await["available"],
            2494,
            "everyone sees the one shared balance"
        );
    }
}

#[tokio::test]
async fn a_member_with_premium_disabled_gets_403_while_a_teammate_succeeds() {
    let gw = start_seed("001-creative-studio.toml", |t| t).await;
    let keys = gw.open_account("team", "team", &["admin", "intern"]).await;
    let resp = gw
        .admin(Method::PATCH, "/admin/accounts/team/members/intern")
        .json(&json!({"premium_disabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, body) = status_and_json(
        gw.call(Method::POST, "/v1/images/premium", &keys[1])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["type"].clone()),
        (403, json!("premium_disabled"))
    );
    assert_eq!(
        gw.call(Method::POST, "/v1/images/premium", &keys[0])
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        gw.call(Method::POST, "/v1/images/basic", &keys[1])
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "free modes still work"
    );
    assert_eq!(gw.backend.received().len(), 2);
}

#[tokio::test]
async fn quotas_count_per_cycle_and_answer_429() {
    let gw = start_seed("001-creative-studio.toml", |t| {
        t.replace("basic_images = 150", "basic_images = 2")
    })
    .await;
    let key = gw.open_account("s", "starter", &["me"]).await.remove(0);
    let basic = || gw.call(Method::POST, "/v1/images/basic", &key).send();
    assert_eq!(basic().await.unwrap().status(), 200);
    let failed = gw
        .call(Method::POST, "/v1/images/basic", &key)
        .header("x-mock-status", "500")
        .send()
        .await
        .unwrap();
    assert_eq!(
        failed.status(),
        500,
        "a failed generation returns its quota unit"
    );
    assert_eq!(basic().await.unwrap().status(), 200);
    gw.settled("s").await;
    let (status, body) = status_and_json(basic().await.unwrap()).await;
    assert_eq!(
        (
            status,
            body["error"]["type"].clone(),
            body["error"]["limit"].clone()
        ),
        (429, json!("quota_exhausted"), json!(2))
    );
    assert_eq!(
        gw.balance(&key).await["quotas"]["basic_images"],
        json!({"used": 2, "limit": 2})
    );
    gw.advance_days(31);
    assert_eq!(
        basic().await.unwrap().status(),
        200,
        "the refill resets the quota"
    );
}

#[tokio::test]
async fn the_ledger_pages_newest_first_with_operation_and_request_id() {
    let gw = start("100").await;
    let mut request_ids = Vec::new();
    for _ in 0..3 {
        let resp = gw.post("/v1/images").send().await.unwrap();
        request_ids.push(header(&resp, "x-request-id").to_string());
        gw.settled("alice").await;
    }
    let page: Value = gw
        .get("/credits/v1/ledger?limit=4")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = page["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 4);
    assert_eq!(entries[0]["type"], "settle");
    assert_eq!(entries[0]["operation"], "image.generate");
    assert_eq!(entries[0]["request_id"], request_ids[2].as_str());
    assert_eq!(entries[0]["credits"], 3);
    assert_eq!(entries[1]["type"], "hold");
    let cursor = page["next_cursor"].as_str().unwrap();
    let rest: Value = gw
        .get(&format!("/credits/v1/ledger?limit=100&cursor={cursor}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rest = rest["entries"].as_array().unwrap();
    assert!(
        rest.iter()
            .all(|e| e["id"].as_u64() < entries[3]["id"].as_u64()),
        "older entries only"
    );
    assert_eq!(
        rest.last().unwrap()["type"],
        "grant",
        "the first entry is the seeded grant"
    );
    let (status, _) =
        status_and_json(gw.get("/credits/v1/ledger?limit=0").send().await.unwrap()).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn one_accounts_key_never_reads_or_spends_another_account() {
    let gw = start("100").await;
    let bob = gw.open_account("bob", "free", &["bob"]).await.remove(0);
    gw.admin(Method::POST, "/admin/accounts/bob/grants")
        .json(&json!({"kind": "topup", "credits": 50, "idempotency_key": "t1"}))
        .send()
        .await
        .unwrap();
    let resp = gw
        .call(Method::POST, "/v1/images", &bob)
        .header("x-creditgate-account", "alice")
        .query(&[("account", "alice")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    gw.settled("bob").await;
    assert_eq!(
        gw.totals("alice").await.charged,
        credits("0"),
        "alice paid nothing"
    );
    assert_eq!(gw.totals("bob").await.charged, credits("3"));
    assert_eq!(
        gw.backend.received()[0].header("x-creditgate-account"),
        Some("bob")
    );
    let balance = gw.balance(&bob).await;
    assert_eq!(
        (balance["account"].clone(), balance["available"].clone()),
        (json!("bob"), json!(47))
    );
    let ledger = gw
        .call(Method::GET, "/credits/v1/ledger?limit=200", &bob)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!ledger.contains("alice"));
    let alice_ledger = gw
        .get("/credits/v1/ledger?limit=200")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !alice_ledger.contains("image.generate"),
        "alice never spent"
    );
}

#[tokio::test]
async fn the_admin_api_without_or_with_a_wrong_token_is_401_and_changes_nothing() {
    let gw = start("100").await;
    let attempts = [
        (
            Method::POST,
            "/admin/accounts",
            json!({"id": "evil", "plan": "free"}),
        ),
        (
            Method::POST,
            "/admin/accounts/alice/grants",
            json!({"kind": "topup", "credits": 1000, "idempotency_key": "x"}),
        ),
        (
            Method::POST,
            "/admin/accounts/alice/plan",
            json!({"plan": "pro", "effective": "now"}),
        ),
        (
            Method::POST,
            "/admin/accounts/alice/keys",
            json!({"member": "alice"}),
        ),
        (Method::GET, "/admin/accounts/alice", json!(null)),
    ];
    for (method, path, body) in attempts {
        for auth in [None, Some("wrong-token"), Some("")] {
            let mut req = gw
                .client
                .request(method.clone(), format!("{}{path}", gw.admin_url))
                .json(&body);
            if let Some(token) = auth {
                req = req.bearer_auth(token);
            }
            let (status, error) = status_and_json(req.send().await.unwrap()).await;
            assert_eq!(
                (status, error["error"]["type"].clone()),
                (401, json!("unauthorized")),
                "{method} {path} {auth:?}"
            );
        }
    }
    let (status, _) = status_and_json(
        gw.admin(Method::GET, "/admin/accounts/evil")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    let account: Value = gw
        .admin(Method::GET, "/admin/accounts/alice")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (account["plan"].clone(), account["available"].clone()),
        (json!("free"), json!(100))
    );
    assert_eq!(
        gw.client
            .get(format!("{}/healthz", gw.admin_url))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "health checks need no token"
    );
}

#[tokio::test]
async fn the_admin_api_refuses_bad_input_with_json_errors() {
    let gw = start("100").await;
    let post = |path: &str, body: &str| {
        gw.admin(Method::POST, path)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let cases: Vec<(&str, &str, u16, &str)> = vec![
        ("/admin/accounts", "not json", 400, "invalid_request"),
        (
            "/admin/accounts",
            r#"{"id": "x", "plan": "gold"}"#,
            400,
            "invalid_request",
        ),
        (
            "/admin/accounts",
            r#"{"id": "x y", "plan": "free"}"#,
            400,
            "invalid_request",
        ),
        (
            "/admin/accounts",
            r#"{"id": "x", "plan": "free", "billing_anchor_day": 32}"#,
            400,
            "invalid_request",
        ),
        (
            "/admin/accounts",
            r#"{"id": "alice", "plan": "free"}"#,
            409,
            "account_exists",
        ),
        (
            "/admin/accounts",
            r#"{"id": "x", "plan": "free", "extra": 1}"#,
            400,
            "invalid_request",
        ),
        (
            "/admin/accounts/nobody/grants",
            r#"{"kind": "topup", "credits": 1, "idempotency_key": "k"}"#,
            404,
            "unknown_account",
        ),
        (
            "/admin/accounts/alice/grants",
            r#"{"kind": "plan", "credits": 1, "idempotency_key": "k"}"#,
            400,
            "invalid_request",
        ),
        (
            "/admin/accounts/alice/grants",
            r#"{"kind": "gift", "credits": 1, "idempotency_key": "k"}"#,
            400,
            "invalid_request",
        ),
        (
            "/admin/accounts/alice/grants",
            r#"{"kind": "topup", "credits": 0.0001, "idempotency_key": "k"}"#,
            400,
            "invalid_request",
        ),
        (
            "/admin/accounts/alice/grants",
            r#"{"kind": "topup", "credits": -5, "idempotency_key": "k"}"#,
            400,
            "invalid_request",
        ),
        (
            "/admin/accounts/alice/grants",
            r#"{"kind": "topup", "credits": 1}"#,
            400,
            "invalid_request",
        ),
        (
            "/admin/accounts/alice/grants",
            r#"{"kind": "topup", "credits": 1, "idempotency_key": "k", "expires_at": "soon"}"#,
            400,
            "invalid_request",
        ),
        (
            "/admin/accounts/alice/plan",
            r#"{"plan": "pro", "effective": "tomorrow"}"#,
            400,
            "invalid_request",
        ),
        (
            "/admin/accounts/alice/members",
            r#"{"member": "alice"}"#,
            409,
            "member_exists",
        ),
        (
            "/admin/accounts/alice/keys",
            r#"{"member": "ghost"}"#,
            404,
            "unknown_member",
        ),
        ("/admin/nothing", "{}", 404, "not_found"),
    ];
    for (path, body, status, kind) in cases {
        let (got, error) = status_and_json(post(path, body).await.unwrap()).await;
        assert_eq!(
            (got, error["error"]["type"].as_str().unwrap_or("")),
            (status, kind),
            "{path} {body}: {error}"
        );
    }
    assert_eq!(
        gw.totals("alice").await.granted,
        credits("100"),
        "nothing changed"
    );
}

#[tokio::test]
async fn revoked_keys_stop_working_and_holds_are_listed_while_in_flight() {
    let gw = start("100").await;
    let resp: Value = gw
        .admin(Method::POST, "/admin/accounts/alice/keys")
        .json(&json!({"member": "alice"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (key, key_id) = (
        resp["key"].as_str().unwrap().to_string(),
        resp["key_id"].as_str().unwrap().to_string(),
    );
    assert!(key.starts_with("cg_") && key.len() > 40);
    let slow = gw
        .call(Method::POST, "/v1/images", &key)
        .header("x-mock-delay-ms", "1500")
        .send();
    let holds_url = "/admin/holds?account=alice";
    let listing = async {
        loop {
            let holds: Value = gw
                .admin(Method::GET, holds_url)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if let Some(h) = holds["holds"].as_array().and_then(|a| a.first()).cloned() {
                return h;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    let (resp, hold) = tokio::join!(slow, listing);
    assert_eq!(resp.unwrap().status(), 200);
    assert_eq!(
        (
            hold["operation"].clone(),
            hold["credits"].clone(),
            hold["account"].clone()
        ),
        (json!("image.generate"), json!(3), json!("alice"))
    );
    let resp = gw
        .admin(Method::DELETE, &format!("/admin/keys/{key_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, body) = status_and_json(
        gw.call(Method::POST, "/v1/images", &key)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["type"].clone()),
        (401, json!("invalid_api_key"))
    );
    assert_eq!(
        gw.post("/v1/images").send().await.unwrap().status(),
        200,
        "other keys still work"
    );
}

#[tokio::test]
async fn a_seeded_key_deleted_stays_revoked_after_a_policy_reload() {
    let sha = |key: &str| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()));
    let policy = move |backend: &str, bob: bool| {
        let bob = if bob {
            format!(
                ", {{ member = \"bob\", key_sha256 = \"{}\" }}",
                sha("sk-seed-bob")
            )
        } else {
            String::new()
        };
        format!(
            "version = 1\n[upstreams.main]\nurl = \"{backend}\"\n\
             [plans.duo]\nmonthly_credits = 100\nseats = 2\n\
             [[operations]]\nname = \"image.generate\"\nmethod = \"POST\"\npath = \"/v1/images\"\nupstream = \"main\"\nprice = 3\n\
             [[accounts]]\nid = \"acme\"\nplan = \"duo\"\n\
             keys = [ {{ member = \"ann\", key_sha256 = \"{}\" }}{bob} ]\n",
            sha("sk-seed-ann")
        )
    };
    let dir = std::env::temp_dir().join(format!("creditgate-reseed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.toml");
    let backend_url = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (f, b) = (file.clone(), backend_url.clone());
    let gw = start_policy_with_file(
        move |backend| {
            *b.lock().unwrap() = backend.to_string();
            let text = policy(backend, false);
            std::fs::write(&f, &text).unwrap();
            text
        },
        |_| None,
        Some(file.clone()),
    )
    .await;
    let images = |key: &'static str| gw.call(Method::POST, "/v1/images", key).send();
    assert_eq!(images("sk-seed-ann").await.unwrap().status(), 200);
    // The second seat goes to a member added through the admin API.
    let resp = gw
        .admin(Method::POST, "/admin/accounts/acme/members")
        .json(&json!({"member": "carol"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let hash: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(b"sk-seed-ann").into();
    let path = format!("/admin/keys/{}", creditgate::ledger::seed_key_id(&hash));
    let resp = gw.admin(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(images("sk-seed-ann").await.unwrap().status(), 401);

    // The file now seeds bob too: a third member, past the plan's two seats.
    let backend = backend_url.lock().unwrap().clone();
    std::fs::write(&file, policy(&backend, true)).unwrap();
    let resp = gw
        .admin(Method::POST, "/admin/policy/reload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, body) = status_and_json(images("sk-seed-ann").await.unwrap()).await;
    assert_eq!(
        (status, body["error"]["type"].clone()),
        (401, json!("invalid_api_key")),
        "the deleted seeded key stays revoked"
    );
    assert_eq!(images("sk-seed-bob").await.unwrap().status(), 401);
    let balance = gw
        .call(Method::GET, "/credits/v1/balance", "sk-seed-ann")
        .send()
        .await
        .unwrap();
    assert_eq!(balance.status(), 401, "not even for what holds nothing");
    let (_, view) = status_and_json(
        gw.admin(Method::GET, "/admin/accounts/acme")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let members: Vec<&String> = view["members"].as_object().unwrap().keys().collect();
    assert_eq!(members, ["ann", "carol"], "the account is left as it is");
    assert_eq!(gw.totals("acme").await.charged, credits("3"));
}
