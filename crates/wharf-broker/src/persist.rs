//! How the runtime stores messages through `wharf-store`: a message's routing information and
//! properties as the store record's meta, and de-duplication key records; also JSON policy
//! definitions (from configuration files) as AMQP values. Durable definitions have a module of
//! their own (`definition_format`).

use bytes::Bytes;
use wharf_model::Message;
use wharf_wire::frame::decode_properties;
use wharf_wire::types::FieldTable;

/// Version byte at the start of a message's meta: exchange, routing key, raw properties.
const MESSAGE_META_VERSION: u8 = 1;
/// Version byte of a message's meta with extensions between the routing key and the properties
/// (`docs/storage-format.md`): tagged fields, each `[tag][length: u16 LE][value]`.
const MESSAGE_META_VERSION_EXTENDED: u8 = 2;
/// Extension tag: the copy was written by a workbench move ([`RelocationMarker`]).
const EXTENSION_RELOCATION: u8 = 1;
/// Extension tag: the message's delivery-trace provenance (`wharf_model::trace`).
const EXTENSION_TRACE: u8 = 2;
/// Bytes of a relocation marker's value: source log, source seq (u64 LE each), copies (u32 LE).
const RELOCATION_MARKER_BYTES: usize = 20;

/// Written into every stored copy a workbench replay or move makes: which record the copy was
/// made from and how many stored copies the move wrote. Recovery finishes or undoes a move that
/// a crash interrupted (`recovery.rs`, `settle_interrupted_moves`): with the source still live,
/// all `copies` present means the move happened (the source is removed), fewer means it did not
/// (the copies are removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RelocationMarker {
    pub source_log: u64,
    pub source_seq: u64,
    pub copies: u32,
}

/// Encodes what a stored message needs besides its body: exchange, routing key, raw properties.
pub(crate) fn encode_message_meta(message: &Message) -> Vec<u8> {
    encode_message_meta_marked(message, None)
}

/// [`encode_message_meta`], with a relocation marker when the copy is a workbench move's.
pub(crate) fn encode_message_meta_marked(message: &Message, marker: Option<RelocationMarker>) -> Vec<u8> {
    let mut meta =
        Vec::with_capacity(3 + message.exchange.len() + message.routing_key.len() + message.raw_properties.len() + 32);
    let extended = marker.is_some() || message.trace.is_some();
    meta.push(if extended { MESSAGE_META_VERSION_EXTENDED } else { MESSAGE_META_VERSION });
    // Exchange names and routing keys are AMQP short strings: at most 255 bytes.
    meta.push(message.exchange.len().min(255) as u8);
    meta.extend_from_slice(&message.exchange.as_bytes()[..message.exchange.len().min(255)]);
    meta.push(message.routing_key.len().min(255) as u8);
    meta.extend_from_slice(&message.routing_key.as_bytes()[..message.routing_key.len().min(255)]);
    if extended {
        let mut extensions = Vec::with_capacity(3 + RELOCATION_MARKER_BYTES);
        if let Some(marker) = marker {
            extensions.push(EXTENSION_RELOCATION);
            extensions.extend_from_slice(&(RELOCATION_MARKER_BYTES as u16).to_le_bytes());
            extensions.extend_from_slice(&marker.source_log.to_le_bytes());
            extensions.extend_from_slice(&marker.source_seq.to_le_bytes());
            extensions.extend_from_slice(&marker.copies.to_le_bytes());
        }
        if let Some(provenance) = &message.trace {
            let mut value = Vec::new();
            crate::trace_format::encode_provenance(provenance, &mut value);
            // A history is bounded (`TRACE_EVENTS_LIMIT` events of bounded strings) to fit.
            if let Ok(length) = u16::try_from(value.len()) {
                extensions.push(EXTENSION_TRACE);
                extensions.extend_from_slice(&length.to_le_bytes());
                extensions.extend_from_slice(&value);
            }
        }
        meta.extend_from_slice(&(extensions.len() as u32).to_le_bytes());
        meta.extend_from_slice(&extensions);
    }
    meta.extend_from_slice(&message.raw_properties);
    meta
}

/// A message's meta taken apart: exchange, routing key, extensions (empty in version 1), raw
/// properties.
struct MetaParts<'a> {
    exchange: &'a [u8],
    routing_key: &'a [u8],
    extensions: &'a [u8],
    raw_properties: &'a [u8],
}

fn split_meta(meta: &[u8]) -> Option<MetaParts<'_>> {
    let (&version, rest) = meta.split_first()?;
    if version != MESSAGE_META_VERSION && version != MESSAGE_META_VERSION_EXTENDED {
        return None;
    }
    let (&exchange_len, rest) = rest.split_first()?;
    let exchange = rest.get(..exchange_len as usize)?;
    let rest = &rest[exchange_len as usize..];
    let (&key_len, rest) = rest.split_first()?;
    let routing_key = rest.get(..key_len as usize)?;
    let mut rest = &rest[key_len as usize..];
    let mut extensions: &[u8] = &[];
    if version == MESSAGE_META_VERSION_EXTENDED {
        let length = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        extensions = rest.get(4..4usize.checked_add(length)?)?;
        rest = &rest[4 + length..];
    }
    Some(MetaParts { exchange, routing_key, extensions, raw_properties: rest })
}

/// The value of extension `tag`, if the meta has it (unknown tags are skipped).
fn extension(extensions: &[u8], tag: u8) -> Option<&[u8]> {
    let mut rest = extensions;
    while let Some((&found, after)) = rest.split_first() {
        let length = u16::from_le_bytes(after.get(..2)?.try_into().ok()?) as usize;
        let value = after.get(2..2 + length)?;
        if found == tag {
            return Some(value);
        }
        rest = &after[2 + length..];
    }
    None
}

/// The relocation marker of a stored message's meta, if it has one.
pub(crate) fn relocation_marker(meta: &[u8]) -> Option<RelocationMarker> {
    let value = extension(split_meta(meta)?.extensions, EXTENSION_RELOCATION)?;
    if value.len() != RELOCATION_MARKER_BYTES {
        return None;
    }
    Some(RelocationMarker {
        source_log: u64::from_le_bytes(value[0..8].try_into().ok()?),
        source_seq: u64::from_le_bytes(value[8..16].try_into().ok()?),
        copies: u32::from_le_bytes(value[16..20].try_into().ok()?),
    })
}

/// Rebuilds a message from its stored meta and body; `None` if the meta is not ours.
pub(crate) fn decode_message(meta: &[u8], body: Bytes) -> Option<Message> {
    let parts = split_meta(meta)?;
    // A trace that cannot be read is left out rather than losing the message.
    let trace = extension(parts.extensions, EXTENSION_TRACE)
        .and_then(crate::trace_format::decode_provenance)
        .map(std::sync::Arc::new);
    let message = Message::new(
        String::from_utf8(parts.exchange.to_vec()).ok()?,
        String::from_utf8(parts.routing_key.to_vec()).ok()?,
        std::sync::Arc::new(decode_properties(parts.raw_properties)?),
        Bytes::copy_from_slice(parts.raw_properties),
        body,
    );
    Some(message.with_trace(trace))
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
        assert_eq!(relocation_marker(&meta), None);

        let marker = RelocationMarker { source_log: 7, source_seq: 41, copies: 3 };
        let marked = encode_message_meta_marked(&message, Some(marker));
        assert_eq!(marked[0], MESSAGE_META_VERSION_EXTENDED);
        assert_eq!(decode_message(&marked, Bytes::from_static(b"{}")).unwrap(), message);
        assert_eq!(relocation_marker(&marked), Some(marker));
        for cut in 1..marked.len() - message.raw_properties.len() {
            assert_eq!(relocation_marker(&marked[..cut]), None, "a meta cut at {cut} has no marker");
        }
    }
}
