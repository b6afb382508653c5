//! The `creditgate` binary as a user runs it.

use std::process::Command;

fn creditgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_creditgate"))
}

#[test]
fn check_passes_on_every_shipped_policy() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = creditgate()
                .args(["check", "--policy"])
                .arg(&path)
                .env("DEMO_BACKEND_URL", "http://127.0.0.1:9")
                .env("DEMO_KEY", "k")
                .output()
                .unwrap();
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[test]
fn check_prints_operations_and_prices() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/policies/demo.toml");
    let out = creditgate()
        .args(["check", "--policy", path])
        .env("DEMO_BACKEND_URL", "http://127.0.0.1:9")
        .env("DEMO_KEY", "k")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("chat.edit"), "{text}");
    assert!(text.lines().any(|l| l.contains("chat.edit") && l.contains("0.5 credits")), "{text}");
    assert!(text.lines().any(|l| l.contains("models.list") && l.contains(" 0 credits")), "{text}");
}

#[test]
fn check_refuses_a_bad_policy_with_file_line_col() {
    let dir = std::env::temp_dir().join(format!("creditgate-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "version = 1\n[upstreams.main]\nurl = \"http://127.0.0.1:1\"\n[[operations]]\nname = \"a\"\npath = \"/a\"\nupstream = \"nope\"\nprice = 0.0001\n",
    )
    .unwrap();
    let out = creditgate().args(["check", "--policy"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    assert!(err.contains(&format!("{file}:7:12: unknown upstream \"nope\"")), "{err}");
    assert!(err.contains(&format!("{file}:8:9: price: more than 3 decimal places")), "{err}");
    let out = creditgate().args(["check", "--policy", "/nonexistent.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the policy file"));
}
