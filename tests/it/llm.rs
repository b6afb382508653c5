//! Pricing the AI APIs people put creditgate in front of, end to end: the shipped
//! example policies (`policies/llm-chat.toml`, `image-api.toml`, `video-api.toml`)
//! through the real gateway, in front of the mock answering as OpenAI's API does.

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::*;

/// A gateway on the shipped LLM chat policy.
async fn llm() -> TestGateway {
    start_seed("llm-chat.toml", |text| text).await
}

/// An account on `plan` with one member; its key.
async fn account(gw: &TestGateway, id: &str, plan: &str) -> String {
    gw.open_account(id, plan, &["dev"]).await.remove(0)
}

async fn top_up(gw: &TestGateway, id: &str, credits: &str, key: &str) {
    let resp = gw
        .admin(Method::POST, &format!("/admin/accounts/{id}/grants"))
        .json(&json!({"kind": "topup", "credits": credits.parse::<Value>().unwrap(), "idempotency_key": key}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
}

/// A chat request for `key`; the mock reports `prompt` and `completion` tokens.
fn chat(
    gw: &TestGateway,
    key: &str,
    body: Value,
    prompt: u64,
    completion: u64,
) -> reqwest::RequestBuilder {
    gw.call(Method::POST, "/v1/chat/completions", key)
        .header("x-mock-prompt-tokens", prompt.to_string())
        .header("x-mock-completion-tokens", completion.to_string())
        .json(&body)
}

fn messages() -> Value {
    json!([{"role": "user", "content": "Say hello."}])
}

/// What the account was charged by everything it sent since `before`.
async fn charged_since(gw: &TestGateway, id: &str, before: Credits) -> Credits {
    gw.settled(id).await.charged.checked_sub(before).unwrap()
}

use creditgate::ledger::Credits;

/// The hold the shipped chat price asks for: max_tokens × 0.0015 + body bytes × 0.0005.
fn chat_hold(max_tokens: u64, body: &Value) -> Credits {
    let millionths = max_tokens * 1_500 + body.to_string().len() as u64 * 500;
    Credits::from_millicredits(millionths.div_ceil(1_000))
}

#[tokio::test]
async fn one_operation_charges_a_json_answer_and_a_stream_each_token_at_its_rate() {
    let gw = llm().await;
    let key = account(&gw, "acme", "pro").await;

    // A JSON answer: 15 prompt tokens at 0.0005 and 15 completion tokens at 0.0015.
    let body = json!({"model": "gpt-4o-mini", "messages": messages(), "max_tokens": 100});
    let resp = chat(&gw, &key, body.clone(), 15, 15).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-credits-operation"), "chat");
    assert_eq!(
        header(&resp, "x-credits-held"),
        chat_hold(100, &body).to_string()
    );
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 15);
    assert_eq!(
        charged_since(&gw, "acme", Credits::ZERO).await,
        credits("0.03")
    );

    // A stream of the same operation: the usage is in its last chunk.
    let before = gw.settled("acme").await.charged;
    let body = json!({"model": "gpt-4o-mini", "messages": messages(), "stream": true,
                      "stream_options": {"include_usage": true}});
    let resp = chat(&gw, &key, body.clone(), 10, 20).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, "content-type").starts_with("text/event-stream"));
    // No max_tokens: the hold assumes the default 4096.
    assert_eq!(
        header(&resp, "x-credits-held"),
        chat_hold(4096, &body).to_string()
    );
    let text = resp.text().await.unwrap();
    assert!(text.contains("\"completion_tokens\":20") && text.ends_with("data: [DONE]\n\n"));
    // 10 × 0.0005 + 20 × 0.0015 = 0.035: not the hold (6.2), as a json:-only rule charged.
    assert_eq!(charged_since(&gw, "acme", before).await, credits("0.035"));

    // Prompt tokens alone, and completion tokens alone: each at its own rate.
    let before = gw.settled("acme").await.charged;
    let body = json!({"model": "m", "messages": messages(), "max_tokens": 10});
    chat(&gw, &key, body.clone(), 1000, 0)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(charged_since(&gw, "acme", before).await, credits("0.5"));
    let before = gw.settled("acme").await.charged;
    chat(&gw, &key, body, 0, 1000)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(charged_since(&gw, "acme", before).await, credits("1.5"));

    // Every settle is in the ledger as the usage's price.
    let ledger: Value = gw
        .call(Method::GET, "/credits/v1/ledger?limit=50", &key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let settled: Vec<String> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "settle")
        .map(|e| e["credits"].to_string())
        .collect();
    assert_eq!(settled, ["1.5", "0.5", "0.035", "0.03"]);
}

#[tokio::test]
async fn an_account_with_less_than_the_estimate_is_admitted_and_charged_the_usage() {
    let gw = llm().await;
    // payg: 5 signup credits, nothing else.
    let key = account(&gw, "small", "payg").await;
    assert_eq!(gw.totals("small").await.available, credits("5"));
    let body = json!({"model": "gpt-4o-mini", "messages": messages()});
    assert!(
        chat_hold(4096, &body) > credits("6"),
        "the estimate is above what the account has"
    );
    // The quote says so: allowed, holding what is available, the price an estimate.
    let quote: Value = gw
        .call(Method::POST, "/credits/v1/quote", &key)
        .json(&json!({"method": "POST", "path": "/v1/chat/completions", "body": body}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&quote["allowed"], &quote["held"], &quote["estimate"]),
        (&json!(true), &json!(5), &json!(true)),
        "{quote}"
    );
    assert_eq!(
        quote["credits"].to_string(),
        chat_hold(4096, &body).to_string()
    );
    let resp = chat(&gw, &key, body, 15, 15).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-credits-held"), "5");
    resp.bytes().await.unwrap();
    let totals = gw.settled("small").await;
    assert_eq!(
        (totals.charged, totals.available),
        (credits("0.03"), credits("4.97"))
    );
}

#[tokio::test]
async fn usage_above_the_hold_overdraws_to_the_plan_limit_and_the_next_top_up_repays_it() {
    let gw = llm().await;
    let key = account(&gw, "owing", "payg").await;
    let body = json!({"model": "gpt-4o-mini", "messages": messages()});
    // 10 prompt + 4000 completion tokens cost 6.005: the hold is the 5 available,
    // then 1 of debt (payg's overdraft_limit); the last 0.005 is not collected.
    let resp = chat(&gw, &key, body.clone(), 10, 4000)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (resp.status().as_u16(), header(&resp, "x-credits-held")),
        (200, "5")
    );
    resp.bytes().await.unwrap();
    let totals = gw.settled("owing").await;
    assert_eq!(
        (totals.charged, totals.available, totals.debt),
        (credits("6"), Credits::ZERO, credits("1"))
    );
    let ledger: Value = gw
        .call(Method::GET, "/credits/v1/ledger?limit=1", &key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let settle = &ledger["entries"][0];
    assert_eq!(
        (&settle["type"], &settle["credits"], &settle["uncollected"]),
        (&json!("settle"), &json!(6), &json!(0.005)),
        "{settle}"
    );
    // At the limit: nothing to hold, so a 402 that says its price is an estimate.
    let resp = chat(&gw, &key, body.clone(), 1, 1).send().await.unwrap();
    assert_eq!(resp.status(), 402);
    let refused: Value = resp.json().await.unwrap();
    assert_eq!(refused["error"]["type"], "insufficient_credits");
    assert_eq!(refused["error"]["estimate"], true, "{refused}");
    assert_eq!(refused["error"]["available"], 0);
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("estimate"),
        "{refused}"
    );
    let balance = gw.balance(&key).await;
    assert_eq!(balance["debt"], 1, "{balance}");
    // A top-up repays the debt first.
    top_up(&gw, "owing", "3", "t1").await;
    let totals = gw.totals("owing").await;
    assert_eq!(
        (totals.available, totals.debt),
        (credits("2"), Credits::ZERO)
    );
    gw.store.check_invariants().unwrap();
    let resp = chat(&gw, &key, body, 15, 15).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    assert_eq!(gw.settled("owing").await.available, credits("1.97"));
}

#[tokio::test]
async fn a_client_abandoning_a_stream_is_charged_the_usage_seen_so_far_or_the_hold() {
    let gw = llm().await;
    let key = account(&gw, "quitter", "pro").await;
    // vLLM's continuous usage: every chunk reports the usage so far. The client
    // reads a few chunks, then leaves while the stream is paused.
    let body = json!({"model": "m", "messages": messages(), "stream": true,
                      "stream_options": {"include_usage": true, "continuous_usage_stats": true}});
    let held = chat_hold(4096, &body);
    let mut resp = chat(&gw, &key, body, 10, 5000)
        .header("x-mock-sse-pause-after", "5")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut seen = String::new();
    while !seen.contains("\"completion_tokens\":4") {
        let chunk = resp.chunk().await.unwrap().expect("the stream goes on");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(resp);
    gw.backend.open_gate();
    let charged = gw.settled("quitter").await.charged;
    // 10 prompt tokens (0.005) and k completion tokens (0.0015 each), k at least
    // the 4 the client saw and short of the 5000 the whole answer has.
    let full = credits("7.505");
    assert!(charged >= credits("0.011") && charged < full, "{charged}");
    assert_ne!(charged, held, "not the hold: the usage seen so far");

    // OpenAI's own streams report usage only at the end: a client leaving before
    // it is charged as on_missing says (charge_hold: the hold).
    let before = charged;
    let body = json!({"model": "m", "messages": messages(), "stream": true,
                      "stream_options": {"include_usage": true}});
    let held = chat_hold(4096, &body);
    let mut resp = chat(&gw, &key, body, 10, 5000)
        .header("x-mock-sse-pause-after", "5")
        .send()
        .await
        .unwrap();
    resp.chunk().await.unwrap();
    drop(resp);
    gw.backend.open_gate();
    assert_eq!(charged_since(&gw, "quitter", before).await, held);
}

#[tokio::test]
async fn embeddings_hold_by_the_input_size_and_charge_its_tokens() {
    let gw = llm().await;
    let key = account(&gw, "embedder", "pro").await;
    let body = json!({"model": "text-embedding-3-small", "input": "The quick brown fox."});
    let resp = gw
        .call(Method::POST, "/v1/embeddings", &key)
        .header("x-mock-prompt-tokens", "100")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = body.to_string().len() as u64;
    let hold = Credits::from_millicredits((bytes * 20).div_ceil(1_000));
    assert_eq!(header(&resp, "x-credits-held"), hold.to_string());
    resp.bytes().await.unwrap();
    // 100 tokens × 0.00002.
    assert_eq!(gw.settled("embedder").await.charged, credits("0.002"));
}

#[tokio::test]
async fn images_are_priced_by_size_and_count_and_count_against_the_quota() {
    let gw = start_seed("image-api.toml", |text| text).await;
    let key = account(&gw, "artist", "free").await;
    let generate = |body: Value| {
        gw.call(Method::POST, "/v1/images/generations", &key)
            .json(&body)
    };
    // 3 low-quality square images: 4 × 3 × 0.25.
    let resp = generate(json!({"model": "gpt-image-1", "prompt": "a fox", "n": 3, "size": "1024x1024", "quality": "low"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-credits-held"), "3");
    let images: Value = resp.json().await.unwrap();
    assert_eq!(images["data"].as_array().unwrap().len(), 3);
    // One tall high-quality image, n absent (1): 6 × 4.
    let resp = generate(
        json!({"model": "gpt-image-1", "prompt": "a fox", "size": "1024x1536", "quality": "high"}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(header(&resp, "x-credits-held"), "24");
    resp.bytes().await.unwrap();
    let totals = gw.settled("artist").await;
    assert_eq!(totals.charged, credits("27"));
    let balance = gw.balance(&key).await;
    assert_eq!(balance["quotas"]["images"]["used"], 4, "{balance}");
    // 17 more images would pass the 20 a month: 429, nothing held.
    let resp =
        generate(json!({"model": "gpt-image-1", "prompt": "a fox", "n": 10, "quality": "low"}))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    let resp =
        generate(json!({"model": "gpt-image-1", "prompt": "a fox", "n": 7, "quality": "low"}))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 429);
    let refused: Value = resp.json().await.unwrap();
    assert_eq!(refused["error"]["type"], "quota_exhausted");
    // A fraction of an image is no count.
    let resp = generate(json!({"model": "gpt-image-1", "prompt": "a fox", "n": 1.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn videos_are_priced_per_second_read_from_a_string() {
    let gw = start_seed("video-api.toml", |text| text).await;
    let key = account(&gw, "director", "creator").await;
    // sora-2-pro at 30 a second × 8 seconds (OpenAI sends "8") × 1.5 for the size.
    for seconds in [json!("8"), json!(8)] {
        let resp = gw
            .call(Method::POST, "/v1/videos", &key)
            .json(&json!({"model": "sora-2-pro", "prompt": "waves", "seconds": seconds, "size": "1792x1024"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-credits-held"), "360", "{seconds}");
        let video: Value = resp.json().await.unwrap();
        assert_eq!(video["object"], "video");
    }
    // The default: sora-2, 4 seconds, 720x1280.
    let resp = gw
        .call(Method::POST, "/v1/videos", &key)
        .json(&json!({"model": "sora-2", "prompt": "waves"}))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&resp, "x-credits-held"), "40");
    resp.bytes().await.unwrap();
    // Polling is free.
    let resp = gw
        .call(Method::GET, "/v1/videos/video_123", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&resp, "x-credits-held"), "0");
    resp.bytes().await.unwrap();
    assert_eq!(gw.settled("director").await.charged, credits("760"));
}
