//! How an account is stored: its state encoded and decoded, its version checked.

use super::conn::corrupt;
use crate::ledger::Account;
use crate::store::StoreError;

/// An account's version as stored in its `v` field: a decimal counter, or corrupt.
pub(super) fn checked_version(version: String) -> Result<String, StoreError> {
    match version.parse::<u64>() {
        Ok(_) => Ok(version),
        Err(_) => Err(corrupt(format!(
            "an account's version in redis is not a number: {version:?}"
        ))),
    }
}

/// The account as stored in `cg:{acct:ID}` field `s`: MessagePack with field names
/// (a quarter of the cost of JSON to write on every commit, and smaller).
pub(super) fn encode(account: &Account) -> Result<Vec<u8>, StoreError> {
    // Sized for a typical account up front: growing from empty reallocates ~8 times.
    let mut state = Vec::with_capacity(STATE_BYTES_EXPECTED);
    rmp_serde::encode::write_named(&mut state, account)
        .map_err(|e| corrupt(format!("cannot encode the account: {e}")))?;
    Ok(state)
}

/// About the size of an active account's state (grants, a few holds, the ended
/// holds it remembers); larger ones grow the buffer as usual.
const STATE_BYTES_EXPECTED: usize = 2_048;

/// Reads an account's stored state: MessagePack, or JSON as earlier versions wrote it
/// (a JSON object starts with `{`, which no MessagePack map or array does).
pub fn decode_state(state: &[u8]) -> Result<Account, StoreError> {
    let decoded = if state.first() == Some(&b'{') {
        serde_json::from_slice(state).map_err(|e| e.to_string())
    } else {
        rmp_serde::from_slice(state).map_err(|e| e.to_string())
    };
    let mut account: Account =
        decoded.map_err(|e| corrupt(format!("an account in redis does not decode: {e}")))?;
    // This layout keeps every open hold in the state: count them (states written
    // before the aggregates existed have none).
    account.rebuild_aggregates();
    account
        .check_invariant()
        .map_err(|e| corrupt(format!("an account in redis is inconsistent: {e}")))?;
    Ok(account)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Catalog, Credits, HoldRequest, Limits};

    /// A JSON value as MessagePack writes it. serde_json keeps numbers exact
    /// (`arbitrary_precision`) by serializing each as a one-entry map outside JSON,
    /// so a `Value` is never handed to MessagePack as it is: its numbers (all
    /// integers in an account) are written as integers here.
    struct AsMessagePack<'a>(&'a serde_json::Value);

    impl serde::Serialize for AsMessagePack<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::{Error, SerializeMap, SerializeSeq};
            match self.0 {
                serde_json::Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                    (Some(u), _) => s.serialize_u64(u),
                    (None, Some(i)) => s.serialize_i64(i),
                    _ => Err(S::Error::custom(format!("{n} is not an integer"))),
                },
                serde_json::Value::Array(items) => {
                    let mut seq = s.serialize_seq(Some(items.len()))?;
                    for item in items {
                        seq.serialize_element(&AsMessagePack(item))?;
                    }
                    seq.end()
                }
                serde_json::Value::Object(fields) => {
                    let mut map = s.serialize_map(Some(fields.len()))?;
                    for (name, value) in fields {
                        map.serialize_entry(name, &AsMessagePack(value))?;
                    }
                    map.end()
                }
                other => other.serialize(s),
            }
        }
    }

    #[test]
    fn states_read_back_from_messagepack_and_from_earlier_json() {
        let mut account = Account::new("acme", "pro");
        let credits = |text: &str| text.parse::<Credits>().unwrap();
        account.grant("topup", credits("10"), 30, None, 0).unwrap();
        let request = HoldRequest {
            operation: "op".into(),
            request_id: "r".into(),
            amount: credits("1.5"),
            ttl_ms: 1_000,
            max_holds: 8,
            quota: None,
            idempotency: None,
            caller: None,
            terms: crate::ledger::HoldTerms::default(),
        };
        let placed = account.hold(&request, 0, &Catalog::new()).unwrap();
        account
            .settle(placed.hold_id, credits("1"), 1, &Limits::default())
            .unwrap();
        account.hold(&request, 2, &Catalog::new()).unwrap();
        account.take_entries();

        let packed = encode(&account).unwrap();
        assert_ne!(packed.first(), Some(&b'{'));
        assert_eq!(decode_state(&packed).unwrap(), account);
        let json = serde_json::to_vec(&account).unwrap();
        assert_eq!(decode_state(&json).unwrap(), account);
        assert!(decode_state(b"{\"id\":").is_err());
        assert!(decode_state(&packed[..packed.len() / 2]).is_err());
    }

    #[test]
    fn members_active_keys_read_back_and_states_without_them_still_load() {
        let catalog = Catalog::new();
        let mut account = Account::new("acme", "pro");
        account.add_member("ann", false, &catalog).unwrap();
        account.add_key("ann", "key_1").unwrap();
        account.add_key("ann", "key_2").unwrap();
        assert!(account.revoke_key("ann", "key_1"));
        let packed = encode(&account).unwrap();
        let back = decode_state(&packed).unwrap();
        assert_eq!(back, account);
        let keys = back.members["ann"].keys.clone().unwrap();
        assert_eq!(keys.into_iter().collect::<Vec<_>>(), ["key_2"]);

        // As an earlier version wrote it: members without a key list, as
        // MessagePack and as JSON. They load as "not recorded".
        let mut earlier = serde_json::to_value(&account).unwrap();
        earlier["members"]["ann"]
            .as_object_mut()
            .unwrap()
            .remove("keys")
            .unwrap();
        let packed = rmp_serde::to_vec_named(&AsMessagePack(&earlier)).unwrap();
        let json = serde_json::to_vec(&earlier).unwrap();
        for state in [packed, json] {
            let loaded = decode_state(&state).unwrap();
            assert_eq!(loaded.members["ann"].keys, None);
            // And stays so: listing only new keys would refuse the member's older ones.
            let mut loaded = loaded;
            loaded.add_key("ann", "key_3").unwrap();
            assert_eq!(loaded.members["ann"].keys, None);
            assert_eq!(decode_state(&encode(&loaded).unwrap()).unwrap(), loaded);
        }
    }
}
