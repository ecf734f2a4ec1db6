//! Field tables: what the `field_table` target checks, and the depth of a decoded value.
//!
//! A table that decodes must re-encode, decode again to the same value, and re-encode to the same
//! bytes (a canonical form, so nothing is lost or invented on a round trip through storage); and
//! no table that decodes may nest deeper than the limit the non-recursive walk enforces, whatever
//! the walk and the parser each make of odd bytes.

use amq_protocol::auth::{Credentials as ClientCredentials, SASLMechanism};
use wharf_wire::frame::{decode_field_table, encode_field_table};
use wharf_wire::nesting::{self, FIELD_NESTING_DEPTH_MAX};
use wharf_wire::sasl;
use wharf_wire::types::{AMQPValue, FieldTable};

/// How deeply tables and arrays nest in `table` (the table itself is level 1), found without
/// recursion so a broken limit shows up as a failed assertion, not a stack overflow here.
pub fn depth(table: &FieldTable) -> usize {
    let mut deepest = 1;
    let mut stack: Vec<(&AMQPValue, usize)> = table.inner().values().map(|value| (value, 1)).collect();
    while let Some((value, level)) = stack.pop() {
        match value {
            AMQPValue::FieldTable(inner) => {
                deepest = deepest.max(level + 1);
                stack.extend(inner.inner().values().map(|value| (value, level + 1)));
            }
            AMQPValue::FieldArray(items) => {
                deepest = deepest.max(level + 1);
                stack.extend(items.as_slice().iter().map(|value| (value, level + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// Asserts that a table decoded from untrusted bytes respects the nesting limit.
pub fn assert_within_limit(table: &FieldTable, what: &str) {
    let depth = depth(table);
    assert!(depth <= FIELD_NESTING_DEPTH_MAX, "{what}: a table nested {depth} levels deep got past the limit");
}

/// The `field_table` target: `data` as a whole table (the stored and wire form), and as the
/// entries of one without its length (the form AMQPLAIN uses).
pub fn check_field_table(data: &[u8]) {
    let decoded = decode_field_table(data);
    if nesting::check_table(data).is_err() {
        assert!(decoded.is_none(), "a table the walk refused was decoded");
    }
    if let Some(table) = decoded {
        assert_within_limit(&table, "decode_field_table");
        assert_round_trip(&table);
    }
    // The entry walk must agree with the table walk on the same entries.
    if let Ok(length) = u32::try_from(data.len()) {
        let mut framed = length.to_be_bytes().to_vec();
        framed.extend_from_slice(data);
        assert_eq!(
            nesting::check_table_entries(data).is_ok(),
            nesting::check_table(&framed).is_ok(),
            "the entry walk and the table walk disagree"
        );
    }
}

/// A decoded table encodes, decodes back to the same value, and encodes to the same bytes again.
pub fn assert_round_trip(table: &FieldTable) {
    let encoded = encode_field_table(table).unwrap_or_else(|| panic!("a decoded table does not encode: {table:?}"));
    let again = decode_field_table(&encoded).unwrap_or_else(|| panic!("a re-encoded table does not decode: {table:?}"));
    // Debug, not ==: a float NaN is not equal to itself but prints the same.
    assert_eq!(format!("{again:?}"), format!("{table:?}"), "a table changed on a round trip");
    assert_eq!(encode_field_table(&again).as_deref(), Some(&encoded[..]), "re-encoding is not stable");
}

/// The `sasl` target: any response under any mechanism name is a clean answer, and what PLAIN
/// and AMQPLAIN accept holds to their limits and reads back from the canonical form.
pub fn check_sasl(data: &[u8]) {
    let Some((&selector, response)) = data.split_first() else { return };
    let mechanism = match selector % 4 {
        0 => "PLAIN",
        1 => "AMQPLAIN",
        2 => "EXTERNAL",
        _ => "plain",
    };
    let Ok(parsed) = sasl::parse_response(mechanism, response) else { return };
    let Some(credentials) = parsed else {
        assert!(!matches!(mechanism, "PLAIN" | "AMQPLAIN"), "{mechanism} reported as unsupported");
        return;
    };
    assert!(matches!(mechanism, "PLAIN" | "AMQPLAIN"), "{mechanism} is not offered but a response parsed");
    assert!(credentials.username.len() <= sasl::CREDENTIAL_BYTES_MAX, "user name over the limit");
    assert!(credentials.password.len() <= sasl::CREDENTIAL_BYTES_MAX, "password over the limit");
    // The same credentials as a stock client sends them parse to the same credentials.
    let client = ClientCredentials::new(credentials.username.as_str().into(), credentials.password.as_str().into());
    let canonical =
        client.sasl_auth_string(if mechanism == "PLAIN" { SASLMechanism::Plain } else { SASLMechanism::AMQPlain });
    let again = sasl::parse_response(mechanism, canonical.as_bytes());
    assert_eq!(again, Ok(Some(credentials)), "the canonical form of accepted credentials does not parse the same");
}
