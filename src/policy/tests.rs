use super::*;
use crate::ledger::Credits;

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

/// A path the tests know to be normal.
fn normal(path: &str) -> NormalizedPath {
    normalize_path(path.as_bytes()).unwrap()
}

/// Matches and prices a request against `policy`.
fn quote(
    policy: &Policy,
    method: Method,
    target: &str,
    body: Option<&str>,
) -> Result<(String, Credits), String> {
    let (path, query) = split_query(target);
    let route = policy.route(&normal(path)).ok_or("no route")?;
    let json = body.map(|b| serde_json::from_str(b).map_err(|e: serde_json::Error| e.to_string()));
    let headers = http::HeaderMap::new();
    let facts = RequestFacts {
        method: &method,
        headers: &headers,
        query,
        path_params: &route.path_params,
        body: json.as_ref(),
        body_bytes: None,
    };
    let index = policy.select(&route, &facts).ok_or("no operation")?;
    let op = &policy.operations[index];
    op.price
        .hold_amount(&facts)
        .map(|c| (op.name.clone(), c))
        .map_err(|e| format!("{}: {}", e.source, e.message))
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
        p.plans["pro"].monthly_credits,
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
    let name = |m: Method, t: &str| quote(&p, m, t, None).map(|(n, _)| n);
    assert_eq!(
        name(Method::POST, "/v1/images?tier=4k"),
        Ok("image.premium".into())
    );
    assert_eq!(
        name(Method::POST, "/v1/images?tier=sd"),
        Ok("image.generate".into())
    );
    assert_eq!(
        name(Method::POST, "/v1/sites/s1/edits"),
        Ok("chat.edit".into())
    );
    assert_eq!(
        p.route(&normal("/v1/sites/s1/edits")).unwrap().path_params,
        vec![("site".to_string(), "s1".to_string())]
    );
    assert!(name(Method::GET, "/v1/sites/s1/edits").is_err());
    assert!(name(Method::GET, "/v1/files/a/b/c").is_ok());
    assert!(p.route(&normal("/nope")).is_none());
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

/// Requests are matched normalized, so a pattern in another form could never match.
#[test]
fn patterns_no_normalized_path_can_match_are_refused() {
    for (pattern, says) in [
        ("/v1//files/{*rest}", "write \"/v1/files/{*rest}\""),
        ("/v1/./files/{*rest}", "write \"/v1/files/{*rest}\""),
        ("/v1/x/../files/{*rest}", "write \"/v1/files/{*rest}\""),
        ("/v1/f%69les/{*rest}", "not percent-escapes"),
        ("/v1\\\\files/{*rest}", "must not contain \\,"),
        ("/../files/{*rest}", "above the root"),
    ] {
        let errs = errors(&GOOD.replace("/v1/files/{*rest}", pattern));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("p.toml:45:") && e.contains(says)),
            "{pattern}: {errs:?}"
        );
    }
    // Characters a request would percent-encode are written as they are.
    assert!(parse(&GOOD.replace("/v1/files/{*rest}", "/v1/files:é/{*rest}")).is_ok());
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

const PRICED: &str = r#"
version = 1
[upstreams.main]
url = "http://127.0.0.1:9000"
[plans.free]
monthly_credits = 50

[[operations]]
name = "video"
path = "/v1/video"
upstream = "main"
[operations.price]
credits = 32
per = { from = "body:/duration_seconds", min = 1, max = 60 }
multiplier = { from = "body:/resolution", table = { "720p" = 1, "1080p" = 1, "2k" = 2, "4k" = 4 }, default = 1 }

[[operations]]
name = "image"
path = "/v1/images"
upstream = "main"
[operations.price]
credits = { from = "body:/model", table = { "flux-pro" = 16, "gemini-2.5-flash" = 8 }, default = 18 }
addons = [ { when = { "body:/cover_image" = true }, credits = 1 }, { when = { "body:/hd" = [true, "yes"] }, credits = 0.5 } ]

[[operations]]
name = "chat.tokens"
path = "/v1/chat/{model}"
upstream = "main"
[operations.price]
credits = 0.000125
per = { from = "query:max_tokens", max = 100000 }
multiplier = { from = "path:model", table = { "big" = 1.5, "small" = 1 } }

[[operations]]
name = "strict"
path = "/v1/strict"
upstream = "main"
[operations.price]
credits = { from = "header:x-tier", table = { "a" = 1, "b" = 2 } }
"#;

#[test]
fn price_tables_compute_exactly() {
    let p = parse(PRICED).unwrap();
    let q = |t: &str, b: Option<&str>| quote(&p, Method::POST, t, b).map(|(_, c)| c.to_string());
    assert_eq!(
        q("/v1/video", Some(r#"{"duration_seconds": 8}"#)),
        Ok("256".into())
    );
    assert_eq!(
        q(
            "/v1/video",
            Some(r#"{"duration_seconds": 8, "resolution": "4k"}"#)
        ),
        Ok("1024".into())
    );
    assert_eq!(
        q(
            "/v1/video",
            Some(r#"{"duration_seconds": 2.5, "resolution": "2k"}"#)
        ),
        Ok("160".into())
    );
    assert_eq!(
        q(
            "/v1/video",
            Some(r#"{"duration_seconds": 8, "resolution": null}"#)
        ),
        Ok("256".into()),
        "table default: the value is absent"
    );
    assert!(
        q(
            "/v1/video",
            Some(r#"{"duration_seconds": 8, "resolution": "8k"}"#)
        )
        .unwrap_err()
        .starts_with("body:/resolution: \"8k\" is not one of"),
        "the default is not for values the table does not list"
    );
    assert_eq!(
        q("/v1/images", Some(r#"{"model": "flux-pro"}"#)),
        Ok("16".into())
    );
    assert_eq!(
        q("/v1/images", Some(r#"{}"#)),
        Ok("18".into()),
        "credits default"
    );
    assert_eq!(
        q(
            "/v1/images",
            Some(r#"{"model": "gemini-2.5-flash", "cover_image": true}"#)
        ),
        Ok("9".into())
    );
    assert_eq!(
        q("/v1/images", Some(r#"{"cover_image": true, "hd": "yes"}"#)),
        Ok("19.5".into())
    );
    assert_eq!(
        q("/v1/images", Some(r#"{"cover_image": "true"}"#)),
        Ok("18".into()),
        "JSON types compare strictly"
    );
    // 0.000125 × 1000 × 1.5 = 0.1875 → rounded up to 0.188.
    assert_eq!(q("/v1/chat/big?max_tokens=1000", None), Ok("0.188".into()));
    assert_eq!(q("/v1/chat/small?max_tokens=8", None), Ok("0.001".into()));
    assert_eq!(q("/v1/chat/small?max_tokens=0", None), Ok("0".into()));
}

#[test]
fn bad_request_values_are_400s_naming_the_source() {
    let p = parse(PRICED).unwrap();
    let q = |t: &str, b: Option<&str>| quote(&p, Method::POST, t, b);
    let err = |t: &str, b: Option<&str>| q(t, b).unwrap_err();
    assert!(err("/v1/video", Some("{}")).starts_with("body:/duration_seconds: is required"));
    assert!(err("/v1/video", Some(r#"{"duration_seconds": 61}"#))
        .contains("outside the allowed range 1..60"));
    assert!(err("/v1/video", Some(r#"{"duration_seconds": 0.5}"#))
        .contains("outside the allowed range"));
    assert!(err("/v1/video", Some(r#"{"duration_seconds": -8}"#)).contains("non-negative"));
    assert!(err("/v1/video", Some(r#"{"duration_seconds": "8 s"}"#))
        .contains("\"8 s\" is not a decimal number"));
    assert!(err("/v1/video", Some(r#"{"duration_seconds": 1e300}"#))
        .starts_with("body:/duration_seconds: 1e300 is outside the allowed range 1..60"));
    assert!(err("/v1/video", Some(r#"{"duration_seconds": true}"#))
        .contains("must be a number, or a string holding a decimal, not a boolean"));
    assert!(err("/v1/video", Some(r#"{"duration_seconds": [8]}"#)).contains("not an array"));
    let long = format!(r#"{{"duration_seconds": "{}"}}"#, "x".repeat(100_000));
    assert!(
        err("/v1/video", Some(&long)).len() < 200,
        "a long value is cut short"
    );
    assert!(
        err("/v1/video", None).contains("is required"),
        "no body at all"
    );
    assert!(err("/v1/images", Some(r#"{"model": {"a": 1}}"#)).contains("not an object"));
    assert!(err("/v1/chat/huge?max_tokens=5", None)
        .starts_with("path:model: \"huge\" is not one of: big, small"));
    assert!(err("/v1/chat/big?max_tokens=100001", None).starts_with("query:max_tokens"));
    assert!(err("/v1/chat/big?max_tokens=ten", None).contains("not a decimal"));
    assert!(err("/v1/strict", None).starts_with("header:x-tier: is required"));
}

#[test]
fn a_body_that_is_not_json_is_named() {
    let p = parse(PRICED).unwrap();
    let uri = "/v1/video";
    let route = p.route(&normal(uri)).unwrap();
    let json: Result<serde_json::Value, String> = Err("expected value at line 1 column 1".into());
    let headers = http::HeaderMap::new();
    let facts = RequestFacts {
        method: &Method::POST,
        headers: &headers,
        query: None,
        path_params: &[],
        body: Some(&json),
        body_bytes: None,
    };
    let index = p.select(&route, &facts).unwrap();
    assert!(p.operations[index].needs_body);
    let e = p.operations[index].price.hold_amount(&facts).unwrap_err();
    assert_eq!(e.source, "body:/duration_seconds");
    assert!(e.message.contains("not JSON"));
}

#[test]
fn price_overflow_is_refused_not_wrapped() {
    let text = PRICED
        .replace("credits = 32\n", "credits = 18446744073709\n")
        .replace("max = 60 }", "max = 18446744073709 }");
    let p = parse(&text).unwrap();
    let e = quote(
        &p,
        Method::POST,
        "/v1/video",
        Some(r#"{"duration_seconds": 18446744073709, "resolution": "4k"}"#),
    )
    .unwrap_err();
    assert!(e.contains("too large"), "{e}");
}

#[test]
fn price_table_errors_are_located() {
    let errs = errors(&PRICED.replace("credits = 0.000125", "credits = 0.0000001"));
    assert!(
        errs[0].contains(":30:11: credits: 0.0000001 has more than 6 decimal places"),
        "{errs:?}"
    );
    let errs = errors(&PRICED.replace("credits = 32\n", "credits = 32.0000001\n"));
    assert!(
        errs[0].contains("credits: 32.0000001 has more than 6"),
        "per-unit rates take 6 decimals: {errs:?}"
    );
    let errs = errors(&PRICED.replace(", credits = 0.5 }", ", credits = 0.0005 }"));
    assert!(
        errs[0].contains("addon credits: more than 3 decimal places"),
        "{errs:?}"
    );
    let errs = errors(&PRICED.replace("body:/model", "model"));
    assert!(errs[0].contains("is not a value source"), "{errs:?}");
    let errs = errors(&PRICED.replace("per = { from", "per = { form"));
    assert!(errs[0].contains("unknown field `form`"), "{errs:?}");
    let errs = errors(&PRICED.replace("min = 1, max = 60", "min = 60, max = 1"));
    assert!(errs[0].contains("min is larger than max"), "{errs:?}");
    let errs = errors(&PRICED.replace(
        "credits = { from = \"header:x-tier\", table = { \"a\" = 1, \"b\" = 2 } }",
        "credits = { from = \"header:x-tier\", table = { \"a\" = 0.0001 } }",
    ));
    assert!(
        errs[0].contains("more than 3 decimal places"),
        "a table without per holds amounts: {errs:?}"
    );
}

#[test]
fn settle_rules_validate() {
    let with = |settle: &str| {
        PRICED.replace(
            "[[operations]]\nname = \"strict\"",
            &format!("[operations.settle]\n{settle}\n\n[[operations]]\nname = \"strict\""),
        )
    };
    let p = parse(&with(
        "usage = \"sse:/usage/total_tokens\"\ncredits_per_unit = 0.002\non_missing = \"release\"",
    ))
    .unwrap();
    let settle = p.operations[2].settle.clone().unwrap();
    assert_eq!(
        settle.usage,
        vec![UsageSource::Sse("/usage/total_tokens".into())]
    );
    assert_eq!(
        settle.rate,
        UsageRate::PerUnit(Micros::parse("0.002").unwrap())
    );
    assert_eq!(settle.on_missing, OnMissing::Release);
    let errs = errors(&with("usage = \"body:/x\"\ncredits_per_unit = 1"));
    assert!(errs[0].contains("is not a usage source"), "{errs:?}");
    let errs = errors(&with(
        "usage = \"json:/x\"\ncredits_per_unit = 1\non_missing = \"free\"",
    ));
    assert!(errs[0].contains("on_missing must be"), "{errs:?}");
}

#[test]
fn usage_charges_are_exact_and_rounded_up() {
    let rate = UsageRate::PerUnit(Micros::parse("0.002").unwrap());
    let usage = |text: &str| Usage::one(Exact::from_json_number(text).unwrap());
    let charge = |text: &str| rate.charge(&usage(text)).map(|c| c.to_string());
    assert_eq!(charge("1234").as_deref(), Some("2.468"));
    assert_eq!(charge("0").as_deref(), Some("0"));
    assert_eq!(charge("-0").as_deref(), Some("0"));
    // 0.0022469134 credits: rounded up, not dropped.
    assert_eq!(charge("1.1234567").as_deref(), Some("0.003"));
    assert_eq!(charge("1e-30").as_deref(), Some("0.001"));
    assert_eq!(charge("2.5E+3").as_deref(), Some("5"));
    for huge in ["1e20", "18446744073709551616000", "1e400"] {
        assert_eq!(charge(huge), None, "{huge} is too large for any amount");
    }
    let free = UsageRate::PerUnit(Micros::parse("0").unwrap());
    assert_eq!(free.charge(&usage("1e400")), Some(Credits::ZERO));
}

#[test]
fn a_usage_object_is_priced_per_field_and_the_sum_rounded_once() {
    let rates = UsageRate::Units(vec![
        UnitRate {
            field: "prompt_tokens".into(),
            pointer: "/prompt_tokens".into(),
            credits: Micros::parse("0.0005").unwrap(),
        },
        UnitRate {
            field: "completion_tokens".into(),
            pointer: "/completion_tokens".into(),
            credits: Micros::parse("0.0015").unwrap(),
        },
    ]);
    let read = |json: &str| rates.read(&serde_json::from_str(json).unwrap());
    let cost = |json: &str| {
        read(json)
            .and_then(|u| rates.charge(&u))
            .map(|c| c.to_string())
    };
    // 15 × 0.0005 + 15 × 0.0015 = 0.0075 + 0.0225 = 0.03.
    assert_eq!(
        cost(r#"{"prompt_tokens": 15, "completion_tokens": 15, "total_tokens": 30}"#).as_deref(),
        Some("0.03")
    );
    // Each term alone rounds up (0.0005 and 0.0015 → 0.001 + 0.002); the sum once: 0.002.
    assert_eq!(
        cost(r#"{"prompt_tokens": 1, "completion_tokens": 1}"#).as_deref(),
        Some("0.002")
    );
    // A field absent counts 0; a field that is no number, or none of them, is no usage.
    assert_eq!(cost(r#"{"prompt_tokens": 2}"#).as_deref(), Some("0.001"));
    assert_eq!(
        cost(r#"{"prompt_tokens": "2", "completion_tokens": null}"#).as_deref(),
        Some("0.001")
    );
    for missing in [
        r#"{"prompt_tokens": -1, "completion_tokens": 1}"#,
        r#"{"prompt_tokens": true}"#,
        r#"{"total_tokens": 5}"#,
        "17",
        "null",
    ] {
        assert_eq!(read(missing), None, "{missing}");
    }
}

const NUMBERS: &str = r#"
version = 1
[upstreams.main]
url = "http://127.0.0.1:9000"
[plans.free]
monthly_credits = 50

[[operations]]
name = "batch"
path = "/v1/batch"
upstream = "main"
[operations.price]
credits = 1
multiplier = { from = "body:/n", table = { 1 = 1, 2 = 2, "0.5" = 0.5, "08" = 8, "big" = 5 }, default = 1 }

[[operations]]
name = "lenient"
path = "/v1/lenient"
upstream = "main"
[operations.price]
credits = { from = "query:tier", table = { "a" = 1, "b" = 2 }, default = 0.5, otherwise = 3 }

[[operations]]
name = "tokens"
path = "/v1/tokens"
upstream = "main"
[operations.price]
credits = 0.0015
per = { from = "body:/max_tokens", default = 4096, min = 1, max = 128000 }
"#;

#[test]
fn numeric_table_keys_match_a_number_or_decimal_string_by_exact_value() {
    let p = parse(NUMBERS).unwrap();
    let held =
        |body: &str| quote(&p, Method::POST, "/v1/batch", Some(body)).map(|(_, c)| c.to_string());
    for (n, want) in [
        ("2", "2"),
        ("\"2\"", "2"),
        ("2.0", "2"),
        ("2e0", "2"),
        ("0.2E+1", "2"),
        ("\"2.000\"", "2"),
        ("\"02\"", "2"),
        ("0.5", "0.5"),
        ("5e-1", "0.5"),
        ("\"0.50\"", "0.5"),
        ("8", "8"),
        ("\"8\"", "8"),
        ("\"big\"", "5"),
    ] {
        assert_eq!(
            held(&format!(r#"{{"n": {n}}}"#)),
            Ok(want.into()),
            "n = {n}"
        );
    }
    assert_eq!(held("{}"), Ok("1".into()), "absent: the default");
    assert_eq!(held(r#"{"n": null}"#), Ok("1".into()), "null is absent");
    for n in [
        "10", "\"10\"", "2.5", "-2", "1e400", "\"two\"", "\"2 \"", "true", "\"BIG\"",
    ] {
        let e = held(&format!(r#"{{"n": {n}}}"#)).unwrap_err();
        assert!(e.starts_with("body:/n: "), "n = {n}: {e}");
        assert!(e.contains("is not one of"), "n = {n}: {e}");
    }
}

#[test]
fn default_is_for_an_absent_value_and_otherwise_for_an_unlisted_one() {
    let p = parse(NUMBERS).unwrap();
    let q = |t: &str| quote(&p, Method::GET, t, None).map(|(_, c)| c.to_string());
    assert_eq!(q("/v1/lenient?tier=b"), Ok("2".into()));
    assert_eq!(q("/v1/lenient"), Ok("0.5".into()), "absent: default");
    assert_eq!(
        q("/v1/lenient?tier=z"),
        Ok("3".into()),
        "unlisted: otherwise"
    );
    // Without `otherwise`, an unlisted value is refused, never the default.
    let strict = parse(&NUMBERS.replace(", otherwise = 3", "")).unwrap();
    let e = quote(&strict, Method::GET, "/v1/lenient?tier=z", None).unwrap_err();
    assert!(
        e.starts_with("query:tier: \"z\" is not one of: a, b"),
        "{e}"
    );
    // Without `default`, an absent value is refused, whatever `otherwise` says.
    let no_default = parse(&NUMBERS.replace("default = 0.5, ", "")).unwrap();
    let e = quote(&no_default, Method::GET, "/v1/lenient", None).unwrap_err();
    assert!(e.starts_with("query:tier: is required"), "{e}");
    assert_eq!(
        quote(&no_default, Method::GET, "/v1/lenient?tier=z", None).map(|(_, c)| c.to_string()),
        Ok("3".into())
    );
}

#[test]
fn per_takes_a_default_and_a_quantity_as_a_decimal_string() {
    let p = parse(NUMBERS).unwrap();
    let held =
        |body: &str| quote(&p, Method::POST, "/v1/tokens", Some(body)).map(|(_, c)| c.to_string());
    assert_eq!(held("{}"), Ok("6.144".into()), "4096 × 0.0015");
    assert_eq!(held(r#"{"max_tokens": "1000"}"#), Ok("1.5".into()));
    assert_eq!(held(r#"{"max_tokens": 1e3}"#), Ok("1.5".into()));
    // 1.0000001 × 0.0015 = 0.00150000015: rounded up, never dropped.
    assert_eq!(held(r#"{"max_tokens": 1.0000001}"#), Ok("0.002".into()));
    assert!(held(r#"{"max_tokens": 0}"#)
        .unwrap_err()
        .contains("outside the allowed range 1..128000"));
    assert!(held(r#"{"max_tokens": -0}"#)
        .unwrap_err()
        .contains("outside the allowed range"));
    assert!(held(r#"{"max_tokens": "-5"}"#)
        .unwrap_err()
        .contains("non-negative"));
    assert!(held(r#"{"max_tokens": "5 tokens"}"#)
        .unwrap_err()
        .contains("not a decimal number"));
    // `-0` is 0.
    let free = parse(&NUMBERS.replace("min = 1, ", "")).unwrap();
    assert_eq!(
        quote(
            &free,
            Method::POST,
            "/v1/tokens",
            Some(r#"{"max_tokens": -0}"#)
        )
        .map(|(_, c)| c.to_string()),
        Ok("0".into())
    );
}

#[test]
fn table_and_per_defaults_are_validated() {
    let errs = errors(&NUMBERS.replace("default = 4096", "default = 200000"));
    assert!(
        errs.iter()
            .any(|e| e.contains("per: default 200000 is outside min..max 1..128000")),
        "{errs:?}"
    );
    let errs = errors(&NUMBERS.replace("\"0.5\" = 0.5", "\"1.0\" = 0.5"));
    assert!(
        errs.iter()
            .any(|e| e.contains("multiplier: the keys \"1\" and \"1.0\" are the same number")),
        "{errs:?}"
    );
    let errs = errors(&NUMBERS.replace("otherwise = 3", "otherwise = 0.0001"));
    assert!(
        errs.iter()
            .any(|e| e.contains("more than 3 decimal places")),
        "{errs:?}"
    );
    let errs = errors(&NUMBERS.replace("otherwise = 3", "otherwise = \"x\""));
    assert!(
        errs.iter().any(|e| e.contains("not a decimal number")),
        "{errs:?}"
    );
}

#[test]
fn a_default_without_otherwise_is_noted_not_refused() {
    let p = parse(NUMBERS).unwrap();
    let notes: Vec<String> = p.notes.iter().map(|n| n.to_string()).collect();
    assert_eq!(
        notes,
        vec!["p.toml:14:104: note: default now applies only when body:/n is absent; a value not in the table is refused with 400 — add otherwise = 1 to keep pricing it as before".to_string()],
    );
    let shown = p.operations[1].price.to_string();
    assert_eq!(shown, "query:tier{a: 1, b: 2; default 0.5; otherwise 3}");
    assert_eq!(
        p.operations[2].price.to_string(),
        "0.0015 × body:/max_tokens[1..128000; default 4096]"
    );
}

/// `⌈n × 10^shift⌉` in big integers: the reference the exact code must match.
fn ceil_scaled(n: num_bigint::BigUint, shift: i64) -> num_bigint::BigUint {
    let ten = num_bigint::BigUint::from(10u32);
    if shift >= 0 {
        n * ten.pow(shift as u32)
    } else {
        let d = ten.pow((-shift) as u32);
        (n + &d - 1u32) / d
    }
}

/// A policy pricing `rate × body:/q × body:/m{key: multiplier}`.
fn per_and_table(rate: u64, key: &str, multiplier: u64) -> Policy {
    let text = format!(
        r#"
version = 1
[upstreams.main]
url = "http://127.0.0.1:9000"
[[operations]]
name = "exact"
path = "/v1/exact"
upstream = "main"
[operations.price]
credits = "{}"
per = {{ from = "body:/q" }}
multiplier = {{ from = "body:/m", table = {{ "{key}" = "{}" }} }}
"#,
        Micros::from_micros(rate),
        Micros::from_micros(multiplier)
    );
    parse(&text).unwrap_or_else(|e| panic!("{e}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Any quantity, as a JSON number (exponent or not) or a decimal string, and
    /// a table key written one way and sent another: the hold is the exact product
    /// rounded up to a millicredit, or a 400 when it does not fit; a value that is
    /// not the key's is a 400.
    #[test]
    fn holds_are_the_exact_product_of_any_quantity_and_table_key(
        q_int in prop_oneof![Just("0".to_string()), "[1-9][0-9]{0,22}"],
        q_frac in prop_oneof![Just(String::new()), "[0-9]{1,22}"],
        q_exp in -40i64..40,
        q_form in 0u8..3,
        key_int in prop_oneof![Just("0".to_string()), "[1-9][0-9]{0,5}"],
        key_frac in "[0-9]{0,6}",
        key_zeros in "0{0,2}",
        m_form in 0u8..3,
        rate in prop_oneof![0u64..=2_000_000, any::<u64>()],
        multiplier in prop_oneof![1u64..=10_000_000, any::<u64>()],
    ) {
        let key_point = if key_frac.is_empty() { String::new() } else { format!(".{key_frac}") };
        let policy = per_and_table(rate, &format!("{key_zeros}{key_int}{key_point}"), multiplier);
        // The key's value sent as digits with an exponent, as a plain number, or
        // as a string with trailing zeros.
        let key_digits = format!("{key_int}{key_frac}");
        let key_digits = key_digits.trim_start_matches('0');
        let m = match m_form {
            0 if key_digits.is_empty() => "0e-3".to_string(),
            0 => format!("{key_digits}e-{}", key_frac.len()),
            1 => format!("{key_int}{key_point}"),
            _ => format!("\"{key_int}.{key_frac}00\""),
        };
        let q_point = if q_frac.is_empty() { String::new() } else { format!(".{q_frac}") };
        let (q, shift) = match q_form {
            0 => (format!("{q_int}{q_point}e{q_exp}"), q_exp),
            1 => (format!("{q_int}{q_point}"), 0),
            _ => (format!("\"{q_int}{q_point}\""), 0),
        };
        let body = format!(r#"{{"q": {q}, "m": {m}}}"#);
        let held = quote(&policy, Method::POST, "/v1/exact", Some(&body));
        let digits = num_bigint::BigUint::parse_bytes(format!("{q_int}{q_frac}").as_bytes(), 10).unwrap();
        // q × rate millionths × multiplier millionths = 1e-9 millicredits.
        let expected = ceil_scaled(digits * rate * multiplier, shift - q_frac.len() as i64 - 9);
        match u64::try_from(&expected) {
            Ok(millicredits) => prop_assert_eq!(
                held, Ok(("exact".to_string(), Credits::from_millicredits(millicredits))), "{}", body
            ),
            Err(_) => prop_assert!(held.as_ref().unwrap_err().contains("makes the price too large"), "{} {:?}", body, held),
        }
        // A value beside the key's is not the key.
        let beside = format!(r#"{{"q": {q}, "m": "{key_int}.{key_frac:0<6}1"}}"#);
        let refused = quote(&policy, Method::POST, "/v1/exact", Some(&beside)).unwrap_err();
        prop_assert!(refused.starts_with("body:/m: ") && refused.contains("is not one of"), "{}", refused);
    }
}

// ---- hostile input: never a panic ----

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Arbitrary text is either a policy or a list of located errors.
    #[test]
    fn the_parser_never_panics_on_arbitrary_text(text in ".{0,400}") {
        let _ = parse(&text);
    }

    /// A valid policy with random bytes changed, inserted or removed.
    #[test]
    fn the_parser_never_panics_on_mutated_policies(edits in proptest::collection::vec((0usize..2_000, any::<u8>(), 0u8..3), 1..8)) {
        let mut bytes = PRICED.as_bytes().to_vec();
        for (at, byte, how) in edits {
            let at = at % (bytes.len() + 1);
            match how {
                0 if at < bytes.len() => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                _ if at < bytes.len() => { bytes.remove(at); }
                _ => {}
            }
        }
        if let Ok(text) = String::from_utf8(bytes) {
            if let Err(errors) = parse(&text) {
                prop_assert!(!errors.0.is_empty());
                prop_assert!(errors.0.iter().all(|e| e.line >= 1 && e.col >= 1));
            }
        }
    }

    /// Any JSON body is priced or refused with a named source.
    #[test]
    fn pricing_never_panics_on_arbitrary_bodies(body in json_value(), path in prop_oneof![Just("/v1/video"), Just("/v1/images"), Just("/v1/chat/big?max_tokens=99999999999999999999")]) {
        let p = parse(PRICED).unwrap();
        let text = body.to_string();
        match quote(&p, Method::POST, path, Some(&text)) {
            Ok((_, credits)) => prop_assert!(credits.millicredits() < u64::MAX),
            Err(e) => prop_assert!(e.contains(':')),
        }
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        "[a-z0-9.]{0,8}".prop_map(serde_json::Value::from),
        prop_oneof![Just("flux-pro"), Just("4k"), Just("1080p")].prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("duration_seconds".to_string()),
                    Just("resolution".to_string()),
                    Just("model".to_string()),
                    Just("cover_image".to_string()),
                    Just("hd".to_string()),
                    "[a-z]{1,4}".prop_map(String::from)
                ],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn header_injection_through_the_environment_is_refused() {
    let env = |name: &str| match name {
        "BACKEND_KEY" => Some("secret\r\nx-evil: 1".into()),
        "ALICE_KEY" => Some("alice-secret".into()),
        _ => None,
    };
    let errs = Policy::parse(GOOD, "p.toml", &env).unwrap_err();
    assert!(
        errs.0
            .iter()
            .any(|e| e.message.contains("not a valid header value")),
        "{errs}"
    );
}

#[test]
fn ambiguous_overlapping_patterns_are_refused() {
    let text = format!(
        "{GOOD}\n[[operations]]\nname = \"sites.any\"\npath = \"/v1/sites/{{*rest}}\"\nupstream = \"main\"\nprice = 1\n"
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("invalid path pattern \"/v1/sites/{*rest}\""),
        "{errs:?}"
    );
    // Located at the later pattern, the one that conflicts.
    let line = text
        .lines()
        .position(|l| l.contains("{*rest}") && l.contains("sites"))
        .unwrap()
        + 1;
    assert!(errs[0].starts_with(&format!("p.toml:{line}:")), "{errs:?}");
}

#[test]
fn an_unknown_quota_is_refused() {
    let text = GOOD.replace(
        "requires = [\"premium\"]\nprice = 20",
        "requires = [\"premium\"]\nquota = \"hd_images\"\nprice = 20",
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("unknown quota \"hd_images\": no plan has it"),
        "{errs:?}"
    );
    // Once a plan has it, the same operation validates.
    let text = text.replace(
        "features = [\"premium\"]",
        "features = [\"premium\"]\nquotas = { hd_images = 10 }",
    );
    assert_eq!(
        parse(&text).unwrap().operations[1]
            .quota
            .as_ref()
            .map(|q| q.name.as_str()),
        Some("hd_images")
    );
}

#[test]
fn unmatched_allow_needs_a_default_upstream() {
    let text = GOOD.replace("[gateway]\n", "[gateway]\nunmatched = \"allow\"\n");
    let errs = errors(&text);
    assert!(
        errs.iter()
            .any(|e| e.contains("unmatched = \"allow\" needs default_upstream")),
        "{errs:?}"
    );
    let text = GOOD.replace(
        "[gateway]\n",
        "[gateway]\nunmatched = \"allow\"\ndefault_upstream = \"main\"\n",
    );
    assert_eq!(
        parse(&text).unwrap().gateway.unmatched,
        Unmatched::Allow { upstream: 0 }
    );
}

const SPECIFIC: &str = r#"
version = 1
[upstreams.main]
url = "http://127.0.0.1:9000"
[[operations]]
name = "any"
path = "/v1/{*rest}"
upstream = "main"
price = 1
[[operations]]
name = "one"
path = "/v1/things/{id}"
upstream = "main"
price = 2
[[operations]]
name = "special"
path = "/v1/things/special"
upstream = "main"
price = 3
"#;

#[test]
fn the_most_specific_path_wins_whatever_the_file_order() {
    let p = parse(SPECIFIC).unwrap();
    let name = |t: &str| quote(&p, Method::GET, t, None).map(|(n, _)| n);
    assert_eq!(name("/v1/things/special"), Ok("special".into()));
    assert_eq!(name("/v1/things/t1"), Ok("one".into()));
    assert_eq!(name("/v1/things/t1/parts"), Ok("any".into()));
    assert_eq!(name("/v1/things/special/parts"), Ok("any".into()));
    assert_eq!(name("/v1/other"), Ok("any".into()));
    assert_eq!(
        p.route(&normal("/v1/things/t1")).unwrap().path_params,
        vec![("id".to_string(), "t1".to_string())]
    );
    assert_eq!(
        p.route(&normal("/v1/things/a/b")).unwrap().path_params,
        vec![("rest".to_string(), "things/a/b".to_string())]
    );
}

/// A policy where matching, entitlement and pricing each may or may not need the body.
const STEPS: &str = r#"
version = 1
[upstreams.main]
url = "http://127.0.0.1:9000"
[plans.free]
monthly_credits = 0
[plans.pro]
monthly_credits = 0
features = ["premium"]
[[operations]]
name = "video.premium"
method = "POST"
path = "/v1/videos/premium"
requires = ["premium"]
upstream = "main"
price = { credits = 2, per = { from = "body:/seconds" } }
[[operations]]
name = "mode.patch"
method = "POST"
path = "/v1/modes"
when = { "body:/mode" = "patch", "query:v" = "2" }
upstream = "main"
price = 1
[[operations]]
name = "mode.fixed"
method = "POST"
path = "/v1/modes"
when = { "query:v" = "1" }
upstream = "main"
price = 5
[[operations]]
name = "mode.full"
method = "POST"
path = "/v1/modes"
upstream = "main"
price = 4
"#;

/// `Policy::evaluate` on a request with no body read yet, then (if it asks) with `body`.
fn evaluate(p: &Policy, method: Method, target: &str, plan: &str, body: &str) -> Vec<Evaluation> {
    let (path, query) = split_query(target);
    let route = p.route(&normal(path));
    let headers = http::HeaderMap::new();
    let json = serde_json::from_str(body).map_err(|e: serde_json::Error| e.to_string());
    let caller = Caller {
        plan,
        premium_disabled: false,
        disabled_features: &[],
    };
    let mut out = Vec::new();
    for body in [None, Some(&json)] {
        let facts = RequestFacts {
            method: &method,
            headers: &headers,
            query,
            path_params: route.as_ref().map_or(&[][..], |r| r.path_params.as_slice()),
            body,
            body_bytes: None,
        };
        let evaluation = p.evaluate(route.as_ref(), &facts, Some(&caller));
        let done = evaluation != Evaluation::NeedsBody;
        out.push(evaluation);
        if done {
            break;
        }
    }
    out
}

#[test]
fn evaluation_decides_404_and_403_before_it_needs_the_body() {
    use Evaluation::{Decided, NeedsBody};
    let p = parse(STEPS).unwrap();
    let op = |name: &str| p.operations.iter().position(|o| o.name == name).unwrap();
    let priced = |name: &str, credits: &str| {
        Decided(Ok(Verdict::Operation {
            index: op(name),
            price: credits.parse().unwrap(),
            quota_units: 1,
        }))
    };
    let body = r#"{"seconds": 3, "mode": "patch"}"#;
    // Entitlement comes before the price that reads the body.
    assert_eq!(
        evaluate(&p, Method::POST, "/v1/videos/premium", "free", body),
        vec![Decided(Err(Refused::PlanRequired {
            operation: op("video.premium"),
            feature: "premium".into()
        }))]
    );
    assert_eq!(
        evaluate(&p, Method::POST, "/v1/videos/premium", "pro", body),
        vec![NeedsBody, priced("video.premium", "6")]
    );
    // No operation takes this method or path: nothing to read.
    for (method, target) in [
        (Method::GET, "/v1/videos/premium"),
        (Method::GET, "/v1/modes"),
        (Method::POST, "/v1/nope"),
    ] {
        assert_eq!(
            evaluate(&p, method, target, "pro", body),
            vec![Decided(Err(Refused::UnknownOperation))],
            "{target}"
        );
    }
    // A `when` ruled out by the query needs no body; one that may hold on the body does.
    assert_eq!(
        evaluate(&p, Method::POST, "/v1/modes?v=1", "free", body),
        vec![priced("mode.fixed", "5")]
    );
    assert_eq!(
        evaluate(&p, Method::POST, "/v1/modes?v=2", "free", body),
        vec![NeedsBody, priced("mode.patch", "1")]
    );
    assert_eq!(
        evaluate(
            &p,
            Method::POST,
            "/v1/modes?v=2",
            "free",
            r#"{"mode": "full"}"#
        ),
        vec![NeedsBody, priced("mode.full", "4")]
    );
    // With `unmatched = "allow"`, no match is a free pass-through.
    let allow = parse(&STEPS.replace(
        "version = 1\n",
        "version = 1\n[gateway]\nunmatched = \"allow\"\ndefault_upstream = \"main\"\n",
    ))
    .unwrap();
    assert_eq!(
        evaluate(&allow, Method::GET, "/v1/modes", "free", body),
        vec![Decided(Ok(Verdict::PassThrough { upstream: 0 }))]
    );
    assert_eq!(
        evaluate(&allow, Method::POST, "/v1/modes?v=1", "free", body),
        vec![priced("mode.fixed", "5")]
    );
}

#[test]
fn every_named_choice_refuses_another_value_at_it_listing_the_allowed_ones() {
    // Each setting with a fixed set of values, written wrong: one error each, at
    // the value, with the same words as ever.
    let cases = [
        (
            GOOD.replace("[gateway]\n", "[gateway]\nunmatched = \"maybe\"\n"),
            r#"p.toml:5:13: unmatched must be "deny" or "allow", not "maybe""#,
        ),
        (
            format!("{GOOD}\n[store]\nkind = \"disk\"\n"),
            r#"store kind must be "sqlite", "memory" or "redis", not "disk""#,
        ),
        (
            format!("{GOOD}\n[store]\nkind = \"redis\"\nurl = \"redis://x\"\non_unavailable = \"pass\"\n"),
            r#"on_unavailable must be "reject" or "allow", not "pass""#,
        ),
        (
            GOOD.replace("price = 0\n", "price = 0\ncharge = { on_client_abort = \"refund\" }\n"),
            r#"on_client_abort must be "settle", "release" or "usage_so_far", not "refund""#,
        ),
        (
            GOOD.replace("price = 0\n", "price = 0\ncharge = { on_upstream_cut = \"half\" }\n"),
            r#"on_upstream_cut must be "release" or "settle", not "half""#,
        ),
        (
            GOOD.replace(
                "price = 0\n",
                "price = 0\nsettle = { usage = \"json:/n\", credits_per_unit = 1, on_missing = \"free\" }\n",
            ),
            r#"on_missing must be "charge_hold" or "release", not "free""#,
        ),
    ];
    for (text, expected) in cases {
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].ends_with(expected), "{errs:?}");
        let value = expected.rsplit("not ").next().unwrap();
        let (line, col) = {
            let mut parts = errs[0].split(':').skip(1);
            let line: usize = parts.next().unwrap().parse().unwrap();
            let col: usize = parts.next().unwrap().parse().unwrap();
            (line, col)
        };
        let at = &text.lines().nth(line - 1).unwrap()[col - 1..];
        assert!(at.starts_with(value), "located at the value: {at:?}");
    }
}

#[test]
fn limits_have_defaults_and_ranges() {
    let p = parse(GOOD).unwrap();
    assert_eq!(p.gateway.max_connections, 10_000);
    assert_eq!(
        p.limits(),
        crate::ledger::Limits::default(),
        "the defaults are the ledger's"
    );
    assert_eq!(p.gateway.max_account_state_bytes, 16 << 20);
    let with = |line: &str| GOOD.replace("[gateway]\n", &format!("[gateway]\n{line}\n"));
    let p = parse(&with(
        "max_connections = 2\nidempotency_records_kept = 0\ngrant_receipts_kept = 5",
    ))
    .unwrap();
    assert_eq!(p.gateway.max_connections, 2);
    assert_eq!(p.limits().idempotency_records_kept, 0);
    assert_eq!(p.limits().grant_receipts_kept, 5);
    for (line, message) in [
        (
            "max_connections = 0",
            "max_connections must be between 1 and 1000000",
        ),
        (
            "idempotency_records_kept = -1",
            "idempotency_records_kept must be between 0 and 1000000",
        ),
        (
            "grant_receipts_kept = 1000001",
            "grant_receipts_kept must be between 0 and 1000000",
        ),
        (
            "max_account_state_bytes = \"0\"",
            "max_account_state_bytes must be more than 0",
        ),
    ] {
        assert_eq!(
            errors(&with(line)),
            [format!(
                "p.toml:5:{}: {message}",
                line.find('=').unwrap() + 3
            )]
        );
    }
}

#[test]
fn the_worst_case_of_one_account_state_must_fit_its_bound() {
    let with = |lines: &str| GOOD.replace("[gateway]\n", &format!("[gateway]\n{lines}\n"));
    // 64 records of up to 1 MiB each: 64 MiB, over the 16 MiB default.
    let errs = errors(&with("idempotency_replay_max_bytes = \"1MiB\""));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("p.toml:5:32: one account's state could reach "),
        "at the setting that weighs most: {errs:?}"
    );
    for named in [
        "over max_account_state_bytes (16384 KiB)",
        "idempotency_records_kept × idempotency_replay_max_bytes 6",
        "grant_receipts_kept ",
        "max_holds_per_account ",
        "or raise max_account_state_bytes",
    ] {
        assert!(errs[0].contains(named), "{named:?} in {errs:?}");
    }
    // Lowering what weighs, or raising the bound, is what the error says to do.
    parse(&with(
        "idempotency_replay_max_bytes = \"1MiB\"\nidempotency_records_kept = 8",
    ))
    .unwrap();
    parse(&with(
        "idempotency_replay_max_bytes = \"1MiB\"\nmax_account_state_bytes = \"80MiB\"",
    ))
    .unwrap();
    // A bound written is where the error points.
    let errs = errors(&with("max_account_state_bytes = \"1MiB\""));
    assert!(errs[0].starts_with("p.toml:5:27: "), "{errs:?}");
    // Receipts weigh too: a million of them is far past the bound.
    let errs = errors(&with("grant_receipts_kept = 1000000"));
    assert!(errs[0].starts_with("p.toml:5:23: "), "{errs:?}");
}

/// An operation like the shipped LLM chat, `{when}`, `{usage}` and `{charge}`
/// filled in by each case.
const LLM: &str = r#"
version = 1
[upstreams.u]
url = "http://127.0.0.1:9000"
[plans.p]
monthly_credits = 0
overdraft_limit = 2
[[operations]]
name = "chat"
path = "{path}"
upstream = "u"
{when}
[operations.price]
credits = 0.0015
per = { from = "body:/max_tokens", default = 4096 }
addons = [ { credits = 0.0005, per = { from = "request:body_bytes" } } ]
[operations.settle]
usage = {usage}
units = { prompt_tokens = 0.0005, completion_tokens = 0.0015, "/details/cached" = 0.0001 }
[operations.charge]
{charge}
"#;

fn llm(path: &str, when: &str, usage: &str, charge: &str) -> String {
    LLM.replace("{path}", path)
        .replace("{when}", when)
        .replace("{usage}", usage)
        .replace("{charge}", charge)
}

#[test]
fn llm_pricing_validates_units_sources_holds_and_overdrafts() {
    let text = llm(
        "/v1/chat/completions",
        "",
        r#"["json:/usage", "sse:/usage"]"#,
        "hold = \"available\"\nmin_hold = 0.01\nover_hold = \"overdraft\"",
    );
    let p = parse(&text).unwrap();
    let op = &p.operations[0];
    assert_eq!(
        op.settle.as_ref().unwrap().usage,
        vec![
            UsageSource::Json("/usage".into()),
            UsageSource::Sse("/usage".into())
        ]
    );
    let UsageRate::Units(rates) = &op.settle.as_ref().unwrap().rate else {
        panic!("units")
    };
    let pointers: Vec<&str> = rates.iter().map(|r| r.pointer.as_str()).collect();
    assert_eq!(
        pointers,
        ["/details/cached", "/completion_tokens", "/prompt_tokens"]
    );
    assert_eq!(
        op.charge.hold,
        HoldRule::Available {
            min_hold: Credits::from_millicredits(10)
        }
    );
    assert_eq!(op.charge.over_hold, OverHold::Overdraft);
    // Metered: a client leaving is charged its usage so far unless told otherwise.
    assert_eq!(op.charge.on_client_abort, OnClientAbort::UsageSoFar);
    assert!(op.needs_body, "request:body_bytes is read with the body");
    assert!(op.price_is_estimate());
    assert_eq!(
        p.plans["p"].overdraft_limit,
        Credits::from_millicredits(2_000)
    );
    // A list with both sources: nothing to warn about.
    assert!(p.notes.is_empty(), "{:?}", p.notes);

    for (charge, expected) in [
        (
            "hold = \"available\"",
            "hold = \"available\" needs min_hold",
        ),
        (
            "min_hold = 1",
            "min_hold applies only with hold = \"available\"",
        ),
        ("hold = \"some\"", "hold must be \"full\" or \"available\""),
        (
            "over_hold = \"debt\"",
            "over_hold must be \"cap\" or \"overdraft\"",
        ),
        (
            "hold = \"available\"\nmin_hold = 0",
            "min_hold must be more than 0",
        ),
    ] {
        let errs = errors(&llm("/v1/chat/completions", "", "\"sse:/usage\"", charge));
        assert!(
            errs.iter().any(|e| e.contains(expected)),
            "{charge}: {errs:?}"
        );
    }
    let units_with_header = errors(&llm("/x", "", "\"header:x-usage\"", ""));
    assert!(
        units_with_header[0].contains("a header: usage is one number"),
        "{units_with_header:?}"
    );
    // Holding part of a fixed price, or charging above it, would charge what the
    // account happens to have: refused without a settle rule.
    let fixed = GOOD.replace(
        "price = 0\n",
        "price = 1\ncharge = { hold = \"available\", min_hold = 1, over_hold = \"overdraft\" }\n",
    );
    let errs = errors(&fixed);
    assert_eq!(
        errs.iter()
            .filter(|e| e.contains("needs [operations.settle]"))
            .count(),
        2,
        "{errs:?}"
    );
}

#[test]
fn check_warns_when_an_operation_that_may_stream_settles_from_json_only() {
    let json_only = "\"json:/usage\"";
    let warned = |path: &str, when: &str, usage: &str| {
        let p = parse(&llm(path, when, usage, "")).unwrap();
        p.notes
            .iter()
            .any(|n| n.to_string().contains("may answer with an event stream"))
    };
    // The trap: a chat-shaped path with no `stream` in `when`, or a `when` that
    // allows a stream.
    assert!(warned("/v1/chat/completions", "", json_only));
    assert!(warned("/v1/messages", "", json_only));
    assert!(warned(
        "/v1/generate",
        "when = { \"body:/stream\" = true }",
        json_only
    ));
    // Not a trap: streams ruled out, an sse: source listed, or a path that does not stream.
    assert!(!warned(
        "/v1/chat/completions",
        "when = { \"body:/stream\" = false }",
        json_only
    ));
    assert!(!warned(
        "/v1/chat/completions",
        "",
        r#"["json:/usage", "sse:/usage"]"#
    ));
    assert!(!warned("/v1/embeddings", "", json_only));
}

#[test]
fn addons_take_per_and_quotas_count_units_from_the_request() {
    let text = r#"
version = 1
[upstreams.u]
url = "http://127.0.0.1:9000"
[plans.p]
monthly_credits = 0
quotas = { images = 5 }
[[operations]]
name = "images"
path = "/v1/images"
upstream = "u"
quota = { name = "images", per = { from = "body:/n", default = 1, max = 10 } }
[operations.price]
credits = 2
addons = [ { credits = 0.5, per = { from = "request:body_bytes" } }, { when = { "body:/hd" = true }, credits = 1 } ]
"#;
    let p = parse(text).unwrap();
    let op = &p.operations[0];
    let facts_for = |body: &'static str| {
        let json: Result<serde_json::Value, String> = Ok(serde_json::from_str(body).unwrap());
        (json, body.len())
    };
    let headers = http::HeaderMap::new();
    let (json, bytes) = facts_for(r#"{"n": 3, "hd": true}"#);
    let facts = RequestFacts {
        method: &http::Method::POST,
        headers: &headers,
        query: None,
        path_params: &[],
        body: Some(&json),
        body_bytes: Some(bytes),
    };
    // 2 + 20 bytes × 0.5 + 1.
    assert_eq!(op.price.hold_amount(&facts).unwrap().to_string(), "13");
    let quota = op.quota.as_ref().unwrap();
    assert_eq!(quota.units(&facts), Ok(3));
    let (json, bytes) = facts_for(r#"{"n": 2.5}"#);
    let facts = RequestFacts {
        body: Some(&json),
        body_bytes: Some(bytes),
        ..facts
    };
    let refused = quota.units(&facts).unwrap_err();
    assert_eq!(refused.source, "body:/n");
    assert!(refused.message.contains("whole number"), "{refused:?}");
    assert!(op.price.to_string().contains("0.5 × request:body_bytes"));
    let errs = errors(&text.replace("credits = 0.5, per", "credits = 0.5, perr"));
    assert!(!errs.is_empty());
}

#[test]
fn the_store_is_sqlite_beside_the_policy_file_unless_it_says_otherwise() {
    let sqlite = |path: &str, commit_interval_ms| StoreConfig::Sqlite {
        path: path.into(),
        commit_interval_ms,
    };
    assert_eq!(parse(GOOD).unwrap().store, sqlite("creditgate.db", 2));
    let in_folder = Policy::parse(GOOD, "/etc/creditgate/policy.toml", &env).unwrap();
    assert_eq!(in_folder.store, sqlite("/etc/creditgate/creditgate.db", 2));
    let named = format!(
        "{GOOD}\n[store]\nkind = \"sqlite\"\npath = \"data/credits.db\"\ncommit_interval = \"5ms\"\n"
    );
    let named = Policy::parse(&named, "conf/policy.toml", &env).unwrap();
    assert_eq!(named.store, sqlite("conf/data/credits.db", 5));
    let absolute = format!("{GOOD}\n[store]\npath = \"/var/lib/creditgate/c.db\"\n");
    let absolute = Policy::parse(&absolute, "conf/policy.toml", &env).unwrap();
    assert_eq!(absolute.store, sqlite("/var/lib/creditgate/c.db", 2));
    let memory = format!("{GOOD}\n[store]\nkind = \"memory\"\n");
    assert_eq!(parse(&memory).unwrap().store, StoreConfig::Memory);
}

#[test]
fn store_settings_of_another_kind_or_out_of_bounds_are_refused() {
    for (store, message) in [
        (
            "kind = \"memory\"\npath = \"x.db\"",
            "path applies only to kind = \"sqlite\"",
        ),
        (
            "kind = \"redis\"\nurl = \"redis://h\"\ncommit_interval = \"2ms\"",
            "commit_interval applies only to kind = \"sqlite\"",
        ),
        (
            "url = \"redis://h\"",
            "url applies only to kind = \"redis\"",
        ),
        (
            "commit_interval = \"2s\"",
            "commit_interval must be at most 1000ms",
        ),
        (
            "commit_interval = \"0ms\"",
            "commit_interval must be longer than 0",
        ),
        ("path = \"\"", "path must name a file"),
        (
            "kind = \"disk\"",
            "store kind must be \"sqlite\", \"memory\" or \"redis\", not \"disk\"",
        ),
    ] {
        let errors = errors(&format!("{GOOD}\n[store]\n{store}\n"));
        assert!(
            errors.iter().any(|e| e.contains(message)),
            "{store}: {errors:?}"
        );
    }
}

#[test]
fn events_and_stripe_sections_are_read_and_checked() {
    let good = format!(
        "{GOOD}\n{}",
        r#"
[events]
low_balance = [50, "10.5"]
retry_base = "200ms"
[[events.webhooks]]
url = "https://hooks.example.com/creditgate"
secret = "${BACKEND_KEY}"
events = ["balance.low", "grant.created"]
[[events.webhooks]]
url = "http://127.0.0.1:9/all"
secret = "s2"

[payments.stripe]
webhook_secret = "whsec_test"
[payments.stripe.prices]
"price_topup_500" = { grant = "topup", credits = 500 }
"price_pro" = { plan = "pro" }
"#
    );
    let policy = parse(&good).unwrap();
    let events = &policy.events;
    assert_eq!(
        events.rules.low_balance,
        vec![Credits::from_whole(50).unwrap(), "10.5".parse().unwrap()]
    );
    assert_eq!(events.retry_base_ms, 200);
    assert_eq!(events.webhooks.len(), 2);
    assert_eq!(events.webhooks[0].secret, "sk-backend");
    assert_eq!(events.webhooks[0].events.len(), 2);
    assert_eq!(
        events.webhooks[1].events.len(),
        crate::ledger::EventKind::ALL.len()
    );
    assert_eq!(
        events.rules.kinds.len(),
        crate::ledger::EventKind::ALL.len()
    );
    let stripe = policy.stripe.unwrap();
    assert_eq!(stripe.webhook_secret, "whsec_test");
    assert_eq!(
        stripe.prices["price_topup_500"],
        StripePrice::Grant {
            kind: "topup".into(),
            credits: Credits::from_whole(500).unwrap(),
            priority: 30
        }
    );
    assert_eq!(stripe.prices["price_pro"], StripePrice::Plan("pro".into()));

    // No [events]: no kinds, so the ledger keeps no events.
    assert!(parse(GOOD).unwrap().events.rules.kinds.is_empty());

    let bad = format!(
        "{GOOD}\n{}",
        r#"
[events]
low_balance = [0, 5, 5]
retry_for = "30d"
colour = "red"
"#
    );
    let found = errors(&bad);
    assert!(
        found.iter().any(|e| e.contains("unknown field `colour`")),
        "{found:?}"
    );
    let bad = format!(
        "{GOOD}\n{}",
        r#"
[events]
low_balance = [0, 5, 5]
retry_for = "30d"
[[events.webhooks]]
url = "ftp://x"
secret = ""
events = ["balance.lo"]

[payments.stripe]
webhook_secret = "${STRIPE_SECRET}"
prices = { a = { grant = "gold", credits = 1 }, b = { plan = "platinum" }, c = { plan = "pro", credits = 3 }, d = { grant = "topup", credits = 0 } }
"#
    );
    let found = errors(&bad).join("\n");
    for expected in [
        "a low_balance threshold must be above 0",
        "low_balance lists 5 twice",
        "retry_for must be at most 7d",
        "must be an http:// or https:// URL",
        "a webhook secret must not be empty",
        "unknown event \"balance.lo\": the events are balance.low, balance.depleted",
        "environment variable STRIPE_SECRET is not set",
        "price \"a\": unknown grant kind \"gold\" (the kinds are bonus, plan, topup)",
        "price \"b\": unknown plan \"platinum\"",
        "price \"c\" must be { grant = KIND, credits = N } or { plan = NAME }",
        "price \"d\": credits must be above 0",
    ] {
        assert!(found.contains(expected), "{expected:?} not in\n{found}");
    }
    assert!(found.starts_with("p.toml:"), "{found}");
}
