use super::*;

const GOOD: &str = r#"
version = 1

[gateway]
listen = "127.0.0.1:8080"
upgrade_url = "https://example.com/billing"

[upstreams.main]
url = "http://127.0.0.1:9000"
set_headers = { authorization = "Bearer ${BACKEND_KEY}" }

[plans.free]
monthly_credits = 50
features = []

[plans.pro]
monthly_credits = "1100"
features = ["premium"]

[[operations]]
name = "chat.edit"
method = "POST"
path = "/v1/sites/{site}/edits"
upstream = "main"
price = 0.5

[[operations]]
name = "image.premium"
method = "POST"
path = "/v1/images"
when = { "query:tier" = ["hd", "4k"] }
upstream = "main"
requires = ["premium"]
price = 20

[[operations]]
name = "image.generate"
method = "POST"
path = "/v1/images"
upstream = "main"
price = 0.1

[[operations]]
name = "files"
path = "/v1/files/{*rest}"
upstream = "main"
price = 0

[[accounts]]
id = "acme"
plan = "free"
grants = [ { kind = "bonus", credits = 30, expires_at = "2026-12-31T00:00:00Z" } ]
keys = [ { member = "alice", key_env = "ALICE_KEY" } ]
"#;

fn env(name: &str) -> Option<String> {
    match name {
        "BACKEND_KEY" => Some("sk-backend".into()),
        "ALICE_KEY" => Some("alice-secret".into()),
        _ => None,
    }
}

fn parse(text: &str) -> Result<Policy, PolicyErrors> {
    Policy::parse(text, "p.toml", &env)
}

fn errors(text: &str) -> Vec<String> {
    parse(text)
        .unwrap_err()
        .0
        .iter()
        .map(|e| e.to_string())
        .collect()
}

struct Req {
    method: Method,
    query: Vec<(String, String)>,
}

impl RequestValues for Req {
    fn method(&self) -> &Method {
        &self.method
    }
    fn header(&self, _name: &HeaderName) -> Option<&str> {
        None
    }
    fn query(&self, name: &str) -> Option<String> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

fn post(query: &[(&str, &str)]) -> Req {
    Req {
        method: Method::POST,
        query: query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

#[test]
fn a_good_policy_validates_with_exact_prices() {
    let p = parse(GOOD).unwrap();
    assert_eq!(p.operations.len(), 4);
    assert_eq!(p.operations[0].price, Price::Fixed("0.5".parse().unwrap()));
    // 0.1 is a float in TOML; it must still be exactly 100 millicredits.
    assert_eq!(
        p.operations[2].price,
        Price::Fixed(Credits::from_millicredits(100))
    );
    assert_eq!(p.upstreams[0].set_headers[0].1, "Bearer sk-backend");
    assert_eq!(
        p.plans[1].monthly_credits,
        Credits::from_whole(1100).unwrap()
    );
    assert_eq!(
        p.accounts[0].grants[0].expires_at_ms,
        Some(1_798_675_200_000)
    );
    assert_eq!(p.gateway.hold_ttl_ms, 600_000);
    assert_eq!(p.gateway.max_body_bytes, 8 << 20);
}

#[test]
fn matching_prefers_file_order_within_a_path_and_checks_when() {
    let p = parse(GOOD).unwrap();
    let m = p
        .match_request("/v1/images", &post(&[("tier", "4k")]))
        .unwrap();
    assert_eq!(m.operation.name, "image.premium");
    let m = p
        .match_request("/v1/images", &post(&[("tier", "sd")]))
        .unwrap();
    assert_eq!(m.operation.name, "image.generate");
    let m = p.match_request("/v1/sites/s1/edits", &post(&[])).unwrap();
    assert_eq!(m.path_params, vec![("site".to_string(), "s1".to_string())]);
    let get = Req {
        method: Method::GET,
        query: vec![],
    };
    assert!(p.match_request("/v1/sites/s1/edits", &get).is_none());
    assert!(p.match_request("/v1/files/a/b/c", &get).is_some());
    assert!(p.match_request("/nope", &get).is_none());
}

#[test]
fn unknown_keys_are_refused_with_their_location() {
    let text = GOOD.replace("upgrade_url", "upgrade_ur1");
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("p.toml:6:1: "), "{errs:?}");
    assert!(errs[0].contains("upgrade_ur1"), "{errs:?}");
}

#[test]
fn dangling_references_are_refused() {
    let text = GOOD
        .replace(
            "upstream = \"main\"\nprice = 0.5",
            "upstream = \"mian\"\nprice = 0.5",
        )
        .replace("requires = [\"premium\"]", "requires = [\"premium+\"]")
        .replace("plan = \"free\"\ngrants", "plan = \"fre\"\ngrants");
    let errs = errors(&text);
    assert!(
        errs.iter()
            .any(|e| e.contains("p.toml:24:12: unknown upstream \"mian\"")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("unknown feature \"premium+\"")),
        "{errs:?}"
    );
    assert!(
        errs.iter().any(|e| e.contains("unknown plan \"fre\"")),
        "{errs:?}"
    );
}

#[test]
fn more_than_three_decimals_is_refused() {
    let errs = errors(&GOOD.replace("price = 0.5", "price = 0.5001"));
    assert!(
        errs[0].contains("p.toml:25:9: price: more than 3 decimal places"),
        "{errs:?}"
    );
    let errs = errors(&GOOD.replace("price = 0.5", "price = \"-1\""));
    assert!(errs[0].contains("negative"), "{errs:?}");
    let errs = errors(&GOOD.replace("price = 0.5", "price = 1e3"));
    assert!(errs[0].contains("not a decimal"), "{errs:?}");
}

#[test]
fn duplicate_names_and_invalid_patterns_are_refused() {
    let errs = errors(&GOOD.replace("name = \"files\"", "name = \"chat.edit\""));
    assert!(
        errs.iter()
            .any(|e| e.contains("duplicate operation name \"chat.edit\"")),
        "{errs:?}"
    );
    let errs = errors(&GOOD.replace("/v1/files/{*rest}", "/v1/files/{*rest}/x"));
    assert!(
        errs.iter().any(|e| e.contains("invalid path pattern")),
        "{errs:?}"
    );
    let errs = errors(&GOOD.replace("/v1/files/{*rest}", "v1/files"));
    assert!(
        errs.iter().any(|e| e.contains("must start with /")),
        "{errs:?}"
    );
}

#[test]
fn missing_environment_and_bad_values_are_refused() {
    let errs = errors(&GOOD.replace("${BACKEND_KEY}", "${NOPE}"));
    assert!(
        errs[0].contains("environment variable NOPE is not set"),
        "{errs:?}"
    );
    let errs = errors(&GOOD.replace("key_env = \"ALICE_KEY\"", "key_sha256 = \"xyz\""));
    assert!(errs[0].contains("64 hex digits"), "{errs:?}");
    let errs = errors(&GOOD.replace("http://127.0.0.1:9000", "ftp://x"));
    assert!(errs[0].contains("must start with http://"), "{errs:?}");
    let errs = errors(&GOOD.replace(
        "method = \"POST\"\npath = \"/v1/sites",
        "method = \"post\"\npath = \"/v1/sites",
    ));
    assert!(errs[0].contains("not an HTTP method"), "{errs:?}");
    let errs = errors(&GOOD.replace("version = 1", "version = 2"));
    assert!(errs[0].contains("only `version = 1`"), "{errs:?}");
    let errs = errors("version = 1\n[gateway]\nhold_ttl = \"10 minutes\"\n");
    assert!(errs[0].starts_with("p.toml:3:12: hold_ttl"), "{errs:?}");
}

#[test]
fn every_status_outside_the_charge_rule_releases() {
    let rule = ChargeRule::default_rule();
    for status in 0..=700u16 {
        assert_eq!(
            rule.charges(status),
            (200..=299).contains(&status),
            "{status}"
        );
    }
}
