//! The JSON shapes of accounts, grants, holds and ledger entries, shared by the
//! client API (`/credits/v1/*`) and the admin API — so both say the same thing the
//! same way. Amounts are JSON numbers without trailing zeros; times are RFC 3339.

use serde_json::{json, Value};

use crate::ledger::{Entry, GrantReceipt, Hold, Member, Millis};
use crate::store::AccountView;

pub fn time(ms: Millis) -> Value {
    chrono::DateTime::from_timestamp_millis(ms as i64).map_or(Value::Null, |t| {
        json!(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    })
}

/// What the account's owner sees: `GET /credits/v1/balance`.
pub fn balance(a: &AccountView) -> Value {
    let grants: Vec<Value> = a
        .grants
        .iter()
        .map(|g| json!({"kind": g.kind, "credits": g.left.to_json(), "expires_at": g.expires_at_ms.map_or(Value::Null, time)}))
        .collect();
    let quotas: serde_json::Map<String, Value> = a
        .quotas
        .iter()
        .map(|q| (q.name.clone(), json!({"used": q.used, "limit": q.limit})))
        .collect();
    json!({
        "account": a.id,
        "plan": a.plan,
        "grants": grants,
        "held": a.totals.held.to_json(),
        "available": a.totals.available.to_json(),
        "debt": a.totals.debt.to_json(),
        "quotas": quotas,
        "next_refill_at": time(a.next_refill_ms),
    })
}

/// What an admin sees: the balance plus members, totals and the pending plan.
pub fn account(a: &AccountView) -> Value {
    let mut v = balance(a);
    let members: serde_json::Map<String, Value> = a
        .members
        .iter()
        .map(|(name, m)| (name.clone(), member(m)))
        .collect();
    v["members"] = Value::Object(members);
    v["pending_plan"] = json!(a.pending_plan);
    v["billing_anchor_day"] = json!(a.billing_anchor_day);
    v["metadata"] = json!(a.metadata);
    v["totals"] = json!({
        "granted": a.totals.granted.to_json(),
        "available": a.totals.available.to_json(),
        "held": a.totals.held.to_json(),
        "charged": a.totals.charged.to_json(),
        "expired": a.totals.expired.to_json(),
        "debt": a.totals.debt.to_json(),
    });
    v
}

/// An entry's credits as a signed JSON number: negative when they left the
/// account (a negative adjustment).
pub fn signed_credits(e: &Entry) -> Value {
    match e.debit && !e.credits.is_zero() {
        true => format!("-{}", e.credits)
            .parse::<serde_json::Number>()
            .map_or(Value::Null, Value::Number),
        false => e.credits.to_json(),
    }
}

/// A usage noted on an entry, as the JSON it was written from.
fn usage(e: &Entry) -> Value {
    e.usage
        .as_deref()
        .and_then(|u| serde_json::from_str(u).ok())
        .unwrap_or(Value::Null)
}

/// A member's restrictions and spending this cycle.
pub fn member(m: &Member) -> Value {
    json!({
        "premium_disabled": m.premium_disabled,
        "disabled_features": m.disabled().collect::<Vec<_>>(),
        "monthly_limit": m.monthly_limit.map_or(Value::Null, |l| l.to_json()),
        "used": m.used.to_json(),
        "held": m.held.to_json(),
    })
}

pub fn entry(e: &Entry) -> Value {
    let mut entry = json!({
        "id": e.seq,
        "at": time(e.at_ms),
        "type": e.kind.as_str(),
        "credits": signed_credits(e),
        "operation": e.operation,
        "request_id": e.request_id,
        "member": e.member,
        "key_id": e.key_id,
        "usage": usage(e),
        "balance_after": e.balance_after.map_or(Value::Null, |b| b.to_json()),
        "detail": e.detail,
    });
    // Only on the entries they concern: a settle past the overdraft limit, a
    // grant or refill that repaid debt.
    if let Some(uncollected) = e.uncollected {
        entry["uncollected"] = uncollected.to_json();
    }
    if let Some(repaid) = e.repaid {
        entry["repaid"] = repaid.to_json();
    }
    entry
}

/// A page of the ledger, newest first, with the cursor of the next page.
pub fn ledger(entries: &[Entry], limit: usize) -> Value {
    let next_cursor = if entries.len() == limit {
        entries.last().map(|e| e.seq.to_string())
    } else {
        None
    };
    json!({"entries": entries.iter().map(entry).collect::<Vec<_>>(), "next_cursor": next_cursor})
}

pub fn grant(r: &GrantReceipt) -> Value {
    json!({
        "grant_id": r.grant_id,
        "kind": r.kind,
        "credits": r.credits.to_json(),
        "priority": r.priority,
        "expires_at": r.expires_at_ms.map_or(Value::Null, time),
        "granted_at": time(r.granted_at_ms),
    })
}

pub fn hold(account: &str, h: &Hold) -> Value {
    json!({
        "account": account,
        "hold_id": h.id,
        "operation": h.operation,
        "request_id": h.request_id,
        "credits": h.amount.to_json(),
        "quota": h.quota,
        "expires_at": time(h.expires_at_ms),
    })
}

/// Parses `?limit=&cursor=` for ledger pages: limit 1..=200 (default 50).
pub fn page_params(query: Option<&str>) -> Result<(usize, Option<u64>), String> {
    let mut limit = 50;
    let mut cursor = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|l| (1..=200).contains(l))
                    .ok_or("limit must be between 1 and 200")?;
            }
            "cursor" => {
                cursor = Some(
                    v.parse()
                        .map_err(|_| "cursor must be a next_cursor from a previous page")?,
                )
            }
            _ => {}
        }
    }
    Ok((limit, cursor))
}

/// The CSV header of the ledger export.
pub const EXPORT_CSV_HEADER: &str = "account,id,at,type,credits,operation,request_id,member,key_id,usage,balance_after,detail,uncollected,repaid\n";

/// One exported entry as a line of NDJSON (with its newline).
pub fn export_ndjson(account: &str, e: &Entry, out: &mut String) {
    let mut line = entry(e);
    line["account"] = json!(account);
    out.push_str(&line.to_string());
    out.push('\n');
}

/// One exported entry as a CSV record (RFC 4180; with its newline).
pub fn export_csv(account: &str, e: &Entry, out: &mut String) {
    let text = |v: Value| match v {
        Value::Null => String::new(),
        Value::String(s) => s,
        other => other.to_string(),
    };
    let fields = [
        account.to_string(),
        e.seq.to_string(),
        text(time(e.at_ms)),
        e.kind.as_str().to_string(),
        text(signed_credits(e)),
        e.operation.clone().unwrap_or_default(),
        e.request_id.clone().unwrap_or_default(),
        e.member.clone().unwrap_or_default(),
        e.key_id.clone().unwrap_or_default(),
        e.usage.clone().unwrap_or_default(),
        e.balance_after.map(|b| b.to_string()).unwrap_or_default(),
        e.detail.clone().unwrap_or_default(),
        e.uncollected.map(|b| b.to_string()).unwrap_or_default(),
        e.repaid.map(|b| b.to_string()).unwrap_or_default(),
    ];
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if field.contains([',', '"', '\n', '\r']) {
            out.push('"');
            out.push_str(&field.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(field);
        }
    }
    out.push('\n');
}
