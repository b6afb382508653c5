//! The trap a new user fell into, putting creditgate in front of an
//! OpenAI-compatible chat API: a streamed answer has no JSON body, so a settle rule
//! reading usage from `json:` only charged every stream its whole hold (8 credits
//! for 17 tokens), and `check` said nothing. Now `check` warns, and a list of
//! sources charges the stream its usage.

use creditgate::policy::Policy;

use crate::harness::*;

const CHAT: &str = r#"
version = 1
[upstreams.main]
url = "${BACKEND_URL}"
[plans.free]
monthly_credits = 0
[[accounts]]
id = "alice"
plan = "free"
grants = [ { kind = "topup", credits = 100 } ]
keys = [ { member = "alice", key_env = "ALICE_KEY" } ]
[[operations]]
name = "chat"
method = "POST"
path = "/v1/chat/completions"
upstream = "main"
price = 8
[operations.settle]
usage = USAGE
credits_per_unit = 0.002
"#;

#[tokio::test]
async fn a_stream_settled_from_json_only_is_charged_its_hold_and_check_warns() {
    let json_only = CHAT.replace("USAGE", "\"json:/usage/total_tokens\"");
    let policy = Policy::parse(&json_only, "chat.toml", &|_| {
        Some("http://127.0.0.1:1".into())
    })
    .unwrap();
    let notes: Vec<String> = policy.notes.iter().map(|n| n.to_string()).collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("may answer with an event stream") && n.contains("sse:")),
        "check says nothing about the trap: {notes:?}"
    );

    // The trap itself, as it still is for such a policy: 17 tokens, charged 8.
    let stream = |gw: &TestGateway| {
        gw.post("/v1/chat/completions")
            .header("x-mock-sse", "5")
            .header("x-mock-usage", "17")
            .body("{}")
            .send()
    };
    let gw = start_policy(|_| json_only.clone(), |_| None).await;
    stream(&gw).await.unwrap().bytes().await.unwrap();
    assert_eq!(gw.settled("alice").await.charged, credits("8"));

    // Listing the stream's source too: the same stream is charged 17 × 0.002.
    let both = CHAT.replace(
        "USAGE",
        r#"["json:/usage/total_tokens", "sse:/usage/total_tokens"]"#,
    );
    let gw = start_policy(|_| both, |_| None).await;
    stream(&gw).await.unwrap().bytes().await.unwrap();
    assert_eq!(gw.settled("alice").await.charged, credits("0.034"));
}
