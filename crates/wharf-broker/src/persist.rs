//! How the runtime stores messages through `wharf-store`: a message's routing information and
//! properties as the store record's meta, and de-duplication key records; also JSON policy
//! definitions (from configuration files) as AMQP values. Durable definitions have a module of
//! their own (`definition_format`).

use bytes::Bytes;
use wharf_model::Message;
use wharf_wire::frame::decode_properties;
use wharf_wire::types::FieldTable;

/// Version byte at the start of a message's meta.
const MESSAGE_META_VERSION: u8 = 1;

/// Encodes what a stored message needs besides its body: exchange, routing key, raw properties.
pub(crate) fn encode_message_meta(message: &Message) -> Vec<u8> {
    let mut meta =
        Vec::with_capacity(3 + message.exchange.len() + message.routing_key.len() + message.raw_properties.len());
    meta.push(MESSAGE_META_VERSION);
    // Exchange names and routing keys are AMQP short strings: at most 255 bytes.
    meta.push(message.exchange.len().min(255) as u8);
    meta.extend_from_slice(&message.exchange.as_bytes()[..message.exchange.len().min(255)]);
    meta.push(message.routing_key.len().min(255) as u8);
    meta.extend_from_slice(&message.routing_key.as_bytes()[..message.routing_key.len().min(255)]);
    meta.extend_from_slice(&message.raw_properties);
    meta
}

/// Rebuilds a message from its stored meta and body; `None` if the meta is not ours.
pub(crate) fn decode_message(meta: &[u8], body: Bytes) -> Option<Message> {
    let (&version, rest) = meta.split_first()?;
    if version != MESSAGE_META_VERSION {
        return None;
    }
    let (&exchange_len, rest) = rest.split_first()?;
    let exchange = rest.get(..exchange_len as usize)?;
    let rest = &rest[exchange_len as usize..];
    let (&key_len, rest) = rest.split_first()?;
    let routing_key = rest.get(..key_len as usize)?;
    let raw_properties = &rest[key_len as usize..];
    Some(Message::new(
        String::from_utf8(exchange.to_vec()).ok()?,
        String::from_utf8(routing_key.to_vec()).ok()?,
        std::sync::Arc::new(decode_properties(raw_properties)?),
        Bytes::copy_from_slice(raw_properties),
        body,
    ))
}

/// Version byte at the start of a de-duplication key record's meta (the body is the key; the
/// record's timestamp is when the key was first seen).
const DEDUP_KEY_META_VERSION: u8 = 0x20;

/// The meta of a de-duplication key record.
pub(crate) fn dedup_key_meta() -> [u8; 1] {
    [DEDUP_KEY_META_VERSION]
}

/// True if a record's meta says it is a de-duplication key.
pub(crate) fn is_dedup_key(meta: &[u8]) -> bool {
    meta == [DEDUP_KEY_META_VERSION]
}

/// A JSON value (from a configuration file) as an AMQP argument value: numbers become signed
/// 64-bit integers, strings long strings, arrays field arrays, objects field tables.
pub fn json_to_amqp(value: &serde_json::Value) -> Option<wharf_wire::types::AMQPValue> {
    use wharf_wire::types::{AMQPValue, FieldArray, LongString, ShortString};
    Some(match value {
        serde_json::Value::Bool(flag) => AMQPValue::Boolean(*flag),
        serde_json::Value::Number(number) => AMQPValue::LongLongInt(number.as_i64()?),
        serde_json::Value::String(text) => AMQPValue::LongString(LongString::from(text.as_bytes().to_vec())),
        serde_json::Value::Array(items) => {
            AMQPValue::FieldArray(FieldArray::from(items.iter().map(json_to_amqp).collect::<Option<Vec<_>>>()?))
        }
        serde_json::Value::Object(map) => {
            let mut table = FieldTable::default();
            for (key, item) in map {
                table.insert(ShortString::try_new(key.as_str()).ok()?, json_to_amqp(item)?);
            }
            AMQPValue::FieldTable(table)
        }
        serde_json::Value::Null => AMQPValue::Void,
    })
}

/// A string argument (`x-dead-letter-exchange`, `alternate-exchange`), if the table has one.
pub(crate) fn text_argument(arguments: &FieldTable, key: &str) -> Option<String> {
    use wharf_wire::types::AMQPValue;
    match arguments.inner().get(key)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_wire::frame::encode_properties;
    use wharf_wire::protocol::BasicProperties;

    #[test]
    fn message_meta_round_trips() {
        let properties = BasicProperties::default().with_delivery_mode(2).with_message_id("id-1".into());
        let message = Message::new(
            "orders".into(),
            "order.received".into(),
            std::sync::Arc::new(properties.clone()),
            encode_properties(&properties),
            Bytes::from_static(b"{}"),
        );
        let meta = encode_message_meta(&message);
        assert_eq!(decode_message(&meta, Bytes::from_static(b"{}")).unwrap(), message);
        assert!(decode_message(&[9, 0, 0], Bytes::new()).is_none(), "unknown version");
        assert!(decode_message(&[1, 200], Bytes::new()).is_none(), "truncated");
    }
}
