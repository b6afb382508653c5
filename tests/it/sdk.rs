//! The OpenAI Python SDK as a client, through the real gateway: what an SDK user
//! sees for a completion, a stream and a 402. The SDK is installed in a virtual
//! environment under the build's temporary folder when it is not there yet
//! (`pip install openai`, from PyPI); without Python 3 the test fails with one line
//! saying so.

use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::*;

/// A Python with the `openai` package: the venv's, made and filled on first use.
fn python_with_openai() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-sdk-venv");
    let python = venv.join("bin").join("python3");
    let has_openai = |python: &Path| {
        Command::new(python)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has_openai(&python) {
        return python;
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .unwrap_or_else(|e| panic!("the OpenAI SDK test needs python3 (with venv): {e}"));
    assert!(
        made.status.success(),
        "python3 -m venv failed (install python3-venv): {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let installed = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "openai",
        ])
        .output()
        .expect("pip runs");
    assert!(
        installed.status.success() && has_openai(&python),
        "pip install openai failed: {}",
        String::from_utf8_lossy(&installed.stderr)
    );
    python
}

#[tokio::test]
async fn the_openai_python_sdk_sees_completions_streams_and_402s() {
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .unwrap();
    let gw = start_seed("llm-chat.toml", |text| text).await;
    let rich = gw.open_account("rich", "pro", &["dev"]).await.remove(0);
    let poor = gw.open_account("poor", "payg", &["dev"]).await.remove(0);
    // Spend the poor account's 5 credits and its overdraft: nothing left to hold.
    let resp = gw
        .call(Method::POST, "/v1/chat/completions", &poor)
        .header("x-mock-completion-tokens", "100000")
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    assert_eq!(gw.settled("poor").await.debt, credits("1"));

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_client.py");
    let url = gw.url.clone();
    let output = tokio::process::Command::new(&python)
        .arg(script)
        .env("CREDITGATE_URL", url)
        .env("RICH_KEY", &rich)
        .env("POOR_KEY", &poor)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "the SDK script failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));

    // Shown with `--nocapture`: what an SDK user sees.
    println!("what the OpenAI SDK saw: {seen:#}");
    let completion = &seen["completion"];
    assert_eq!(completion["operation"], "chat", "{seen}");
    assert_eq!(
        completion["usage"],
        json!({"prompt_tokens": 15, "completion_tokens": 15})
    );
    assert!(completion["content"].as_str().unwrap().contains("token"));
    assert!(completion["held"].as_str().unwrap().parse::<f64>().unwrap() > 0.1);

    let stream = &seen["stream"];
    assert_eq!(
        stream["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 20}),
        "{seen}"
    );
    // A role chunk, 20 token chunks, the finish chunk and the usage chunk.
    assert_eq!(stream["chunks"], 23, "{seen}");
    assert_eq!(
        stream["text"].as_str().unwrap().matches("token").count(),
        20
    );
    // 15 × 0.0005 + 15 × 0.0015, then 10 × 0.0005 + 20 × 0.0015.
    assert_eq!(gw.settled("rich").await.charged, credits("0.065"));

    // The 402 reaches the SDK as an APIStatusError with the gateway's error body.
    let refused = &seen["refused"];
    assert_eq!(refused["class"], "APIStatusError", "{seen}");
    assert_eq!(refused["status"], 402);
    assert_eq!(refused["type"], "insufficient_credits");
    assert_eq!(refused["body"]["estimate"], true);
    assert_eq!(refused["body"]["available"], 0);
    assert!(
        refused["message"].as_str().unwrap().contains("estimate"),
        "{seen}"
    );
}
