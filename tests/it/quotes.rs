//! For every operation in every shipped policy: a request that selects it is
//! quoted, then sent for real — the quote, the hold and the charge must agree.
//! And a quote is a dry-run hold: whatever the hold refuses, the quote refuses
//! alike (here what one gateway can show; across replicas in `replicas`).

use std::collections::BTreeMap;

use creditgate::policy::{Lookup, Micros, Policy, Price, Scalar, Source};
use serde_json::{json, Value};

use crate::harness::*;

/// A request built to select one operation.
#[derive(Default)]
struct Sample {
    path_params: BTreeMap<String, String>,
    query: BTreeMap<String, String>,
    headers: BTreeMap<String, String>,
    body: Option<Value>,
}

impl Sample {
    /// Sets `source` to `value` unless something already set it.
    fn set(&mut self, source: &Source, value: Value) {
        let text = match &value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        match source {
            Source::Path(name) => {
                self.path_params.entry(name.clone()).or_insert(text);
            }
            Source::Query(name) => {
                self.query.entry(name.clone()).or_insert(text);
            }
            Source::Header(name) => {
                self.headers.entry(name.to_string()).or_insert(text);
            }
            // The body's length: whatever the sample's body is.
            Source::BodyBytes => {}
            Source::Body(pointer) => {
                let body = self.body.get_or_insert_with(|| json!({}));
                if body.pointer(pointer).is_some() {
                    return;
                }
                // Build the objects along the pointer, then set the leaf.
                let mut at = body;
                let parts: Vec<&str> = pointer.split('/').skip(1).collect();
                for (i, part) in parts.iter().enumerate() {
                    let object = at.as_object_mut().expect("sample bodies are objects");
                    at = object
                        .entry(part.to_string())
                        .or_insert(if i + 1 == parts.len() {
                            value.clone()
                        } else {
                            json!({})
                        });
                }
            }
        }
    }

    fn path(&self, pattern: &str) -> String {
        let mut path = String::new();
        for segment in pattern.split('/').skip(1) {
            path.push('/');
            if let Some(name) = segment.strip_prefix("{*").and_then(|s| s.strip_suffix('}')) {
                path.push_str(self.path_params.get(name).map_or("a/b", |v| v.as_str()));
            } else if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                path.push_str(self.path_params.get(name).map_or("x1", |v| v.as_str()));
            } else {
                path.push_str(segment);
            }
        }
        if !self.query.is_empty() {
            let query: Vec<String> = self.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            path.push('?');
            path.push_str(&query.join("&"));
        }
        path
    }
}

fn scalar(value: &Scalar) -> Value {
    match value {
        Scalar::Text(s) => json!(s),
        Scalar::Int(i) => json!(i),
        Scalar::Bool(b) => json!(b),
    }
}

fn micros_json(m: Micros) -> Value {
    serde_json::from_str(&m.to_string()).unwrap()
}

fn sample_for(policy: &Policy, index: usize) -> Sample {
    let op = &policy.operations[index];
    let mut sample = Sample::default();
    for p in &op.when {
        sample.set(&p.source, scalar(&p.any_of[0]));
    }
    if let Price::Rule(rule) = &op.price {
        for lookup in [Some(&rule.credits), rule.multiplier.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Lookup::Table { source, table, .. } = lookup {
                sample.set(source, json!(table[0].key));
            }
        }
        if let Some(per) = &rule.per {
            let q = per.min.unwrap_or(Micros::ONE).max(Micros::ONE);
            let q = per.max.map_or(q, |max| q.min(max));
            sample.set(&per.source, micros_json(q));
        }
        for addon in &rule.addons {
            for p in &addon.when {
                sample.set(&p.source, scalar(&p.any_of[0]));
            }
            if let Some(per) = &addon.per {
                sample.set(&per.source, json!(1));
            }
        }
    }
    if let Some(per) = op.quota.as_ref().and_then(|q| q.per.as_ref()) {
        sample.set(&per.source, json!(1));
    }
    // Metered operations: the mock answers with no usage (a body it is told), so
    // the charge is the hold (`on_missing = "charge_hold"` in every shipped policy).
    if op.settle.is_some() {
        sample
            .headers
            .insert("x-mock-body".into(), r#"{"answer":"no usage"}"#.into());
    }
    sample
}

#[tokio::test]
async fn every_quote_equals_the_hold_and_the_charge_in_every_shipped_policy() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "the demo, compose, five seed policies and three AI API examples: {files:?}"
    );
    let mut exercised = 0;
    for file in files {
        let original = std::fs::read_to_string(&file).unwrap();
        // Every upstream points at the mock; one rich test account per plan.
        let rewrite = |backend: &str| {
            let mut text: String = original
                .lines()
                .map(|l| {
                    if l.starts_with("url = ") {
                        format!("url = \"{backend}\"")
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            let plans = Policy::parse(&text, "p", &|_| Some("x".into()))
                .unwrap()
                .plans
                .keys()
                .cloned()
                .collect::<Vec<_>>();
            for plan in plans {
                text.push_str(&format!(
                    "\n[[accounts]]\nid = \"t-{plan}\"\nplan = \"{plan}\"\ngrants = [ {{ kind = \"topup\", credits = 1000000 }} ]\nkeys = [ {{ member = \"t\", key_env = \"QK_{plan}\" }} ]\n"
                ));
            }
            text
        };
        let env = |name: &str| {
            name.strip_prefix("QK_")
                .map(|plan| format!("key-{plan}"))
                .or_else(|| Some("demo".into()))
        };
        let backend_text = std::cell::RefCell::new(String::new());
        let gw = start_policy(
            |b| {
                let t = rewrite(b);
                *backend_text.borrow_mut() = t.clone();
                t
            },
            env,
        )
        .await;
        let policy = Policy::parse(&backend_text.borrow(), "p", &env).unwrap();
        for (index, op) in policy.operations.iter().enumerate() {
            let (plan, _) = policy
                .plans
                .iter()
                .find(|(_, p)| op.requires.iter().all(|f| p.features.contains(f)))
                .unwrap_or_else(|| panic!("{}: no plan can run {}", file.display(), op.name));
            let key = format!("key-{plan}");
            let account = format!("t-{plan}");
            let sample = sample_for(&policy, index);
            let method = op.method.clone().unwrap_or(http::Method::POST);
            let path = sample.path(&op.path);
            let what = format!("{} {} ({method} {path})", file.display(), op.name);

            let quote: Value = gw
                .client
                .post(format!("{}/credits/v1/quote", gw.url))
                .bearer_auth(&key)
                .json(&json!({"method": method.as_str(), "path": path, "headers": sample.headers, "body": sample.body}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(quote["operation"], op.name.as_str(), "{what}: {quote}");
            assert_eq!(quote["allowed"], true, "{what}: {quote}");

            let before = gw.settled(&account).await.charged;
            let mut request = gw
                .client
                .request(method.clone(), format!("{}{path}", gw.url))
                .bearer_auth(&key);
            for (name, value) in &sample.headers {
                request = request.header(name, value);
            }
            if let Some(body) = &sample.body {
                request = request.body(body.to_string());
            }
            let resp = request.send().await.unwrap();
            assert_eq!(resp.status(), 200, "{what}");
            assert_eq!(header(&resp, "x-credits-operation"), op.name, "{what}");
            let quoted = quote["credits"].to_string();
            assert_eq!(
                header(&resp, "x-credits-held"),
                quoted,
                "{what}: held != quoted"
            );
            resp.bytes().await.unwrap();
            let charged = gw
                .settled(&account)
                .await
                .charged
                .checked_sub(before)
                .unwrap();
            // Metered operations charge usage; the mock reports none, and the
            // shipped policies charge the hold then (on_missing = "charge_hold").
            assert_eq!(charged.to_string(), quoted, "{what}: charged != quoted");
            exercised += 1;
        }
    }
    assert!(exercised >= 50, "only {exercised} operations exercised");
}

/// What `POST /credits/v1/quote` says of `request`, sent with alice's key.
async fn quote(gw: &TestGateway, request: Value) -> Value {
    let resp = gw
        .post("/credits/v1/quote")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// The quote once answered `allowed` for a request the hold then refused with
/// `429 too_many_holds`: it checked the quota and the balance itself, not the
/// number of open holds.
#[tokio::test]
async fn a_quote_while_the_account_has_its_limit_of_holds_open_says_too_many_holds() {
    let gw = start_policy(
        |_| {
            POLICY
                .replace("{CREDITS}", "100")
                .replace("{READ_TIMEOUT}", "30s")
                .replace("[gateway]\n", "[gateway]\nmax_holds_per_account = 1\n")
        },
        |_| None,
    )
    .await;
    let ask = json!({"method": "POST", "path": "/v1/images"});
    assert_eq!(
        quote(&gw, ask.clone()).await,
        json!({"allowed": true, "operation": "image.generate", "credits": 3, "available": 100})
    );
    // A stream the backend pauses keeps the account's one hold open.
    let mut open = gw
        .post("/v1/stream/fixed")
        .header("x-mock-sse", "10")
        .header("x-mock-sse-pause-after", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    let quoted = quote(&gw, ask.clone()).await;
    assert_eq!(
        (
            &quoted["allowed"],
            &quoted["operation"],
            &quoted["error"]["type"]
        ),
        (
            &json!(false),
            &json!("image.generate"),
            &json!("too_many_holds")
        ),
        "{quoted}"
    );
    assert_eq!(quoted["error"]["limit"], 1, "{quoted}");
    assert_eq!(quoted["available"], 97, "{quoted}");
    // The request itself gets exactly that.
    let resp = gw.post("/v1/images").send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], quoted["error"]["type"]);
    assert_eq!(body["error"]["message"], quoted["error"]["message"]);
    assert_eq!(
        gw.totals("alice").await.held,
        credits("3"),
        "the quote held nothing"
    );
    gw.backend.open_gate();
    while open.chunk().await.unwrap().is_some() {}
    gw.settled("alice").await;
    assert_eq!(quote(&gw, ask).await["allowed"], true);
}
