//! Vhosts and policies the management API created, as durable records in the definitions log
//! (definitions format 1, kinds `V` and `Y`, `docs/storage-format.md`): a vhost's key is
//! `vhost\0<name>\0`, a policy's `policy\0<vhost>\0<name>`; each value is the format's version
//! byte, the kind tag and a JSON object. What the configuration defines is not stored: it is
//! applied again at every start and wins over a record of the same name.

use serde_json::json;
use wharf_model::{ApplyTo, Policy};

const VHOST_TAG: u8 = b'V';
const POLICY_TAG: u8 = b'Y';

pub(crate) fn vhost_key(name: &str) -> Vec<u8> {
    format!("vhost\0{name}\0").into_bytes()
}

pub(crate) fn policy_key(vhost: &str, name: &str) -> Vec<u8> {
    format!("policy\0{vhost}\0{name}").into_bytes()
}

/// Whether a definitions key is a vhost's or a policy's record.
pub(crate) fn is_record_kind(kind: &str) -> bool {
    matches!(kind, "vhost" | "policy")
}

fn framed(tag: u8, body: serde_json::Value) -> Vec<u8> {
    let mut value = vec![crate::definition_format::DEFINITIONS_FORMAT_VERSION, tag];
    value.extend_from_slice(body.to_string().as_bytes());
    value
}

fn body(value: &[u8], tag: u8) -> Option<serde_json::Value> {
    match value {
        [version, found, body @ ..]
            if *version == crate::definition_format::DEFINITIONS_FORMAT_VERSION && *found == tag =>
        {
            serde_json::from_slice(body).ok()
        }
        _ => None,
    }
}

/// A vhost's record: its description and tags (shown by the API; they change nothing).
pub(crate) fn encode_vhost(description: &str, tags: &[String]) -> Vec<u8> {
    framed(VHOST_TAG, json!({"description": description, "tags": tags}))
}

/// A stored vhost: (description, tags); `None` if the record is damaged.
pub(crate) fn decode_vhost(value: &[u8]) -> Option<(String, Vec<String>)> {
    let body = body(value, VHOST_TAG)?;
    let description = body.get("description")?.as_str()?.to_owned();
    let tags = body.get("tags")?.as_array()?.iter().filter_map(|tag| tag.as_str().map(str::to_owned)).collect();
    Some((description, tags))
}

/// A policy's record: its pattern, what it applies to, priority and definition (the field table
/// in its wire form, in hex, so every AMQP value type survives).
pub(crate) fn encode_policy(policy: &Policy) -> Option<Vec<u8>> {
    let definition = wharf_wire::frame::encode_field_table(&policy.definition)?;
    let hex: String = definition.iter().map(|byte| format!("{byte:02x}")).collect();
    Some(framed(
        POLICY_TAG,
        json!({
            "pattern": policy.pattern.as_str(),
            "apply_to": policy.apply_to.as_str(),
            "priority": policy.priority,
            "definition": hex,
        }),
    ))
}

/// A stored policy named `name`, checked again as a new one is; `None` if damaged or no longer
/// valid.
pub(crate) fn decode_policy(name: &str, value: &[u8]) -> Option<Policy> {
    let body = body(value, POLICY_TAG)?;
    let hex = body.get("definition")?.as_str()?;
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|index| hex.get(index..index + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
        .collect::<Option<Vec<u8>>>()?;
    let definition = wharf_wire::frame::decode_field_table(&bytes)?;
    let apply_to = ApplyTo::parse(body.get("apply_to")?.as_str()?).ok()?;
    Policy::new(name, body.get("pattern")?.as_str()?, apply_to, body.get("priority")?.as_i64()?, definition).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_wire::types::{AMQPValue, FieldTable};

    #[test]
    fn records_round_trip() {
        let mut definition = FieldTable::default();
        definition.insert("max-length".into(), AMQPValue::LongLongInt(10));
        definition.insert("dead-letter-exchange".into(), AMQPValue::LongString("dlx".into()));
        let policy = Policy::new("limits", "^orders\\.", ApplyTo::Queues, 5, definition.clone()).unwrap();
        let stored = decode_policy("limits", &encode_policy(&policy).unwrap()).unwrap();
        assert_eq!(
            (stored.pattern.as_str(), stored.apply_to, stored.priority, stored.definition),
            ("^orders\\.", ApplyTo::Queues, 5, definition)
        );
        let vhost = encode_vhost("staging", &["test".to_owned()]);
        assert_eq!(decode_vhost(&vhost), Some(("staging".to_owned(), vec!["test".to_owned()])));
        assert_eq!(decode_vhost(&encode_policy(&policy).unwrap()), None, "a policy is not a vhost");
        assert!(decode_policy("limits", b"\x01Y{not json").is_none());
    }
}
