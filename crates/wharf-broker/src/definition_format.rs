//! The byte format of durable definitions (exchanges, queues, bindings) in the store's
//! definitions log: keys, versioned values, and the migration of data directories written before
//! this format existed. `docs/storage-format.md` describes the bytes; a golden test pins them.
//!
//! Why a format of our own: the values used to be JSON written through amq-protocol's serde
//! derives, so an upgrade of that crate could change what is on disk without anyone deciding to,
//! and nothing pinned the bytes. Arguments are now stored as AMQP field tables in their wire form
//! (fixed by the protocol), everything else as plain length-prefixed fields.
//!
//! Every value starts with the format version (`1`) and a kind tag. A value starting with `{` is
//! the old JSON: [`migrate`] rewrites those at start, before anything else reads them.

use wharf_model::Destination;
use wharf_store::MetaChange;
use wharf_wire::frame::{decode_field_table, encode_field_table};
use wharf_wire::types::FieldTable;

/// The version byte every value starts with.
pub(crate) const DEFINITIONS_FORMAT_VERSION: u8 = 1;

/// Kind tags, the second byte of a value (the key's first part says the same; a mismatch is
/// damage).
const EXCHANGE_TAG: u8 = b'E';
const QUEUE_TAG: u8 = b'Q';
const BINDING_TAG: u8 = b'B';
/// A queue's transient log: not a definition to restore but a log to delete at the next start
/// (transient messages do not survive a restart). Recorded so that recovery never takes it for
/// an orphaned log and keeps transient messages as `wharf.orphaned-log-…` queues.
const TRANSIENT_LOG_TAG: u8 = b'T';

/// Arguments longer than this (encoded) are named in a binding's key by length and checksum
/// instead of spelled out, so every key stays well under the definitions log's key limit.
const BINDING_KEY_ARGUMENTS_BYTES_MAX: usize = 1024;

/// A durable exchange as stored, with the store logs it owns.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredExchange {
    pub kind: String,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    /// A delayed-message exchange's log of waiting messages.
    pub store_log: Option<u64>,
    /// A de-duplicating exchange's log of seen keys.
    pub dedup_log: Option<u64>,
}

/// A durable queue as stored, with its message log (and key log, if it de-duplicates).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredQueue {
    pub auto_delete: bool,
    pub arguments: FieldTable,
    pub store_log: u64,
    pub dedup_log: Option<u64>,
}

/// A durable binding as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredBinding {
    pub source: String,
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
}

impl StoredExchange {
    /// How a durable exchange of the model is stored.
    pub fn of(exchange: &wharf_model::Exchange) -> Self {
        StoredExchange {
            kind: exchange.kind.as_str().to_owned(),
            auto_delete: exchange.auto_delete,
            internal: exchange.internal,
            arguments: exchange.arguments.clone(),
            store_log: exchange.store_log,
            dedup_log: exchange.dedup_log,
        }
    }
}

impl StoredBinding {
    /// How a durable binding of the model is stored.
    pub fn of(source: &str, binding: &wharf_model::Binding) -> Self {
        StoredBinding {
            source: source.to_owned(),
            destination: binding.destination.clone(),
            routing_key: binding.routing_key.clone(),
            arguments: binding.arguments.clone(),
        }
    }
}

/// One stored definition, decoded.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Definition {
    Exchange {
        vhost: String,
        name: String,
        stored: StoredExchange,
    },
    Queue {
        vhost: String,
        name: String,
        stored: StoredQueue,
    },
    Binding {
        vhost: String,
        stored: StoredBinding,
    },
    /// The transient log `log` of queue `queue` (which may not be durable).
    TransientLog {
        vhost: String,
        queue: String,
        log: u64,
    },
}

/// Why a stored definition could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FormatError {
    #[error("the key is not kind, vhost and name")]
    BadKey,
    #[error("definition format version {0} is not one this broker reads (it reads {DEFINITIONS_FORMAT_VERSION})")]
    UnknownVersion(u8),
    #[error("the value is damaged: {0}")]
    Damaged(&'static str),
    #[error("the old JSON value is unreadable: {0}")]
    Legacy(String),
}

pub(crate) fn exchange_key(vhost: &str, name: &str) -> Vec<u8> {
    format!("exchange\0{vhost}\0{name}").into_bytes()
}

pub(crate) fn queue_key(vhost: &str, name: &str) -> Vec<u8> {
    format!("queue\0{vhost}\0{name}").into_bytes()
}

/// A transient log's key names it by its log id (one queue may have had several, one per
/// incarnation, and a name may be reused before a deleted one's record is gone).
pub(crate) fn transient_log_key(vhost: &str, log: u64) -> Vec<u8> {
    format!("transient-log\0{vhost}\0{log}").into_bytes()
}

/// A binding's key holds everything that makes it unique, arguments included (as the hex of
/// their wire form, or when long by length and CRC32C; the value always holds them whole).
pub(crate) fn binding_key(vhost: &str, stored: &StoredBinding) -> Vec<u8> {
    let encoded = encode_field_table(&stored.arguments).unwrap_or_default();
    let arguments = if stored.arguments.inner().is_empty() {
        String::new()
    } else if encoded.len() > BINDING_KEY_ARGUMENTS_BYTES_MAX {
        format!("#{}:{:08x}", encoded.len(), crc32c::crc32c(&encoded))
    } else {
        encoded.iter().map(|byte| format!("{byte:02x}")).collect()
    };
    let (destination_kind, destination) = destination_parts(&stored.destination);
    format!(
        "binding\0{vhost}\0{}\0{destination_kind}\0{destination}\0{}\0{arguments}",
        stored.source, stored.routing_key
    )
    .into_bytes()
}

fn destination_parts(destination: &Destination) -> (&'static str, &str) {
    match destination {
        Destination::Queue(name) => ("q", name),
        Destination::Exchange(name) => ("e", name),
    }
}

/// Splits a definitions key into its kind, vhost and the rest.
pub(crate) fn split_key(key: &[u8]) -> Option<(&str, &str, &str)> {
    let text = std::str::from_utf8(key).ok()?;
    let mut parts = text.splitn(3, '\0');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

/// Writes fields in the format's encodings.
struct Writer(Vec<u8>);

impl Writer {
    fn new(tag: u8) -> Self {
        Writer(vec![DEFINITIONS_FORMAT_VERSION, tag])
    }

    /// A short string: a length byte, then the bytes (names and keys are AMQP short strings, at
    /// most 255 bytes; longer never reaches here).
    fn short_string(&mut self, text: &str) {
        let bytes = &text.as_bytes()[..text.len().min(255)];
        self.0.push(bytes.len() as u8);
        self.0.extend_from_slice(bytes);
    }

    fn flags(&mut self, flags: &[bool]) {
        self.0.push(flags.iter().enumerate().fold(0u8, |byte, (bit, &set)| byte | (u8::from(set) << bit)));
    }

    /// A field table in its wire form (which carries its own 32-bit length).
    fn table(&mut self, table: &FieldTable) {
        self.0.extend(encode_field_table(table).unwrap_or_else(|| vec![0, 0, 0, 0]));
    }

    fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_be_bytes());
    }

    fn optional_u64(&mut self, value: Option<u64>) {
        match value {
            Some(value) => {
                self.0.push(1);
                self.u64(value);
            }
            None => self.0.push(0),
        }
    }
}

/// Reads fields back, every length checked against what is left.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
        if self.0.len() < count {
            return Err(FormatError::Damaged(what));
        }
        let (taken, rest) = self.0.split_at(count);
        self.0 = rest;
        Ok(taken)
    }

    fn byte(&mut self, what: &'static str) -> Result<u8, FormatError> {
        Ok(self.take(1, what)?[0])
    }

    fn short_string(&mut self, what: &'static str) -> Result<String, FormatError> {
        let length = self.byte(what)? as usize;
        let bytes = self.take(length, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FormatError::Damaged(what))
    }

    fn table(&mut self, what: &'static str) -> Result<FieldTable, FormatError> {
        let length_bytes = self.take(4, what)?;
        let length = u32::from_be_bytes([length_bytes[0], length_bytes[1], length_bytes[2], length_bytes[3]]) as usize;
        let entries = self.take(length, what)?;
        let mut whole = Vec::with_capacity(4 + length);
        whole.extend_from_slice(length_bytes);
        whole.extend_from_slice(entries);
        decode_field_table(&whole).ok_or(FormatError::Damaged(what))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FormatError> {
        let bytes = self.take(8, what)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(bytes);
        Ok(u64::from_be_bytes(array))
    }

    fn optional_u64(&mut self, what: &'static str) -> Result<Option<u64>, FormatError> {
        match self.byte(what)? {
            0 => Ok(None),
            1 => self.u64(what).map(Some),
            _ => Err(FormatError::Damaged(what)),
        }
    }

    fn end(&self) -> Result<(), FormatError> {
        if self.0.is_empty() { Ok(()) } else { Err(FormatError::Damaged("trailing bytes")) }
    }
}

/// A cluster record (a quorum or homed queue's) as the definitions log keeps it: the format
/// version, then JSON.
pub(crate) fn encode_record<T: serde::Serialize>(record: &T) -> Result<Vec<u8>, String> {
    let mut value = vec![DEFINITIONS_FORMAT_VERSION];
    serde_json::to_writer(&mut value, record).map_err(|error| error.to_string())?;
    Ok(value)
}

/// A record [`encode_record`] wrote; `None` if unreadable or of another format version.
pub(crate) fn decode_record<T: serde::de::DeserializeOwned>(value: &[u8]) -> Option<T> {
    match value.split_first() {
        Some((&DEFINITIONS_FORMAT_VERSION, json)) => serde_json::from_slice(json).ok(),
        _ => None,
    }
}

pub(crate) fn encode_exchange(stored: &StoredExchange) -> Vec<u8> {
    let mut writer = Writer::new(EXCHANGE_TAG);
    writer.short_string(&stored.kind);
    writer.flags(&[stored.auto_delete, stored.internal]);
    writer.table(&stored.arguments);
    writer.optional_u64(stored.store_log);
    writer.optional_u64(stored.dedup_log);
    writer.0
}

pub(crate) fn encode_queue(stored: &StoredQueue) -> Vec<u8> {
    let mut writer = Writer::new(QUEUE_TAG);
    writer.flags(&[stored.auto_delete]);
    writer.table(&stored.arguments);
    writer.u64(stored.store_log);
    writer.optional_u64(stored.dedup_log);
    writer.0
}

pub(crate) fn encode_binding(stored: &StoredBinding) -> Vec<u8> {
    let mut writer = Writer::new(BINDING_TAG);
    writer.short_string(&stored.source);
    let (destination_kind, destination) = destination_parts(&stored.destination);
    writer.0.push(if destination_kind == "q" { 0 } else { 1 });
    writer.short_string(destination);
    writer.short_string(&stored.routing_key);
    writer.table(&stored.arguments);
    writer.0
}

pub(crate) fn encode_transient_log(queue: &str, log: u64) -> Vec<u8> {
    let mut writer = Writer::new(TRANSIENT_LOG_TAG);
    writer.short_string(queue);
    writer.u64(log);
    writer.0
}

/// Decodes a stored definition in the current format.
pub(crate) fn decode(key: &[u8], value: &[u8]) -> Result<Definition, FormatError> {
    let (kind, vhost, name) = split_key(key).ok_or(FormatError::BadKey)?;
    let mut reader = Reader(value);
    let version = reader.byte("version")?;
    if version != DEFINITIONS_FORMAT_VERSION {
        return Err(FormatError::UnknownVersion(version));
    }
    let tag = reader.byte("kind")?;
    let (vhost, name) = (vhost.to_owned(), name.to_owned());
    let definition = match (kind, tag) {
        ("exchange", EXCHANGE_TAG) => {
            let kind = reader.short_string("exchange kind")?;
            let flags = reader.byte("flags")?;
            let stored = StoredExchange {
                kind,
                auto_delete: flags & 1 != 0,
                internal: flags & 2 != 0,
                arguments: reader.table("arguments")?,
                store_log: reader.optional_u64("delayed log")?,
                dedup_log: reader.optional_u64("de-duplication log")?,
            };
            Definition::Exchange { vhost, name, stored }
        }
        ("queue", QUEUE_TAG) => {
            let flags = reader.byte("flags")?;
            let stored = StoredQueue {
                auto_delete: flags & 1 != 0,
                arguments: reader.table("arguments")?,
                store_log: reader.u64("message log")?,
                dedup_log: reader.optional_u64("de-duplication log")?,
            };
            Definition::Queue { vhost, name, stored }
        }
        ("binding", BINDING_TAG) => {
            let source = reader.short_string("source")?;
            let destination_kind = reader.byte("destination kind")?;
            let destination_name = reader.short_string("destination")?;
            let destination = match destination_kind {
                0 => Destination::Queue(destination_name),
                1 => Destination::Exchange(destination_name),
                _ => return Err(FormatError::Damaged("destination kind")),
            };
            let routing_key = reader.short_string("routing key")?;
            let arguments = reader.table("arguments")?;
            Definition::Binding { vhost, stored: StoredBinding { source, destination, routing_key, arguments } }
        }
        ("transient-log", TRANSIENT_LOG_TAG) => {
            let queue = reader.short_string("queue")?;
            let log = reader.u64("transient log")?;
            if name != log.to_string() {
                return Err(FormatError::Damaged("the key's log id and the value's differ"));
            }
            Definition::TransientLog { vhost, queue, log }
        }
        _ => return Err(FormatError::Damaged("the key's kind and the value's kind differ")),
    };
    reader.end()?;
    Ok(definition)
}

/// The old JSON values, read only to migrate them (their field names are the old format's).
mod legacy {
    use serde::Deserialize;
    use wharf_wire::types::FieldTable;

    #[derive(Deserialize)]
    pub(super) struct Exchange {
        pub kind: String,
        pub auto_delete: bool,
        pub internal: bool,
        pub arguments: FieldTable,
        #[serde(default, rename = "store_queue")]
        pub store_log: Option<u64>,
        #[serde(default, rename = "dedup_store_queue")]
        pub dedup_log: Option<u64>,
    }

    #[derive(Deserialize)]
    pub(super) struct Queue {
        pub auto_delete: bool,
        pub arguments: FieldTable,
        #[serde(rename = "store_queue")]
        pub store_log: u64,
        #[serde(default, rename = "dedup_store_queue")]
        pub dedup_log: Option<u64>,
    }

    #[derive(Deserialize)]
    pub(super) struct Binding {
        pub source: String,
        pub destination_is_queue: bool,
        pub destination: String,
        pub routing_key: String,
        pub arguments: FieldTable,
    }
}

/// Whether a value is the old JSON format (always an object).
fn is_legacy(value: &[u8]) -> bool {
    value.first() == Some(&b'{')
}

/// Reads one old JSON definition.
fn decode_legacy(key: &[u8], value: &[u8]) -> Result<Definition, FormatError> {
    let (kind, vhost, name) = split_key(key).ok_or(FormatError::BadKey)?;
    let legacy_error = |error: serde_json::Error| FormatError::Legacy(error.to_string());
    let (vhost, name) = (vhost.to_owned(), name.to_owned());
    Ok(match kind {
        "exchange" => {
            let old: legacy::Exchange = serde_json::from_slice(value).map_err(legacy_error)?;
            let stored = StoredExchange {
                kind: old.kind,
                auto_delete: old.auto_delete,
                internal: old.internal,
                arguments: old.arguments,
                store_log: old.store_log,
                dedup_log: old.dedup_log,
            };
            Definition::Exchange { vhost, name, stored }
        }
        "queue" => {
            let old: legacy::Queue = serde_json::from_slice(value).map_err(legacy_error)?;
            let stored = StoredQueue {
                auto_delete: old.auto_delete,
                arguments: old.arguments,
                store_log: old.store_log,
                dedup_log: old.dedup_log,
            };
            Definition::Queue { vhost, name, stored }
        }
        "binding" => {
            let old: legacy::Binding = serde_json::from_slice(value).map_err(legacy_error)?;
            let destination = if old.destination_is_queue {
                Destination::Queue(old.destination)
            } else {
                Destination::Exchange(old.destination)
            };
            let stored = StoredBinding {
                source: old.source,
                destination,
                routing_key: old.routing_key,
                arguments: old.arguments,
            };
            Definition::Binding { vhost, stored }
        }
        _ => return Err(FormatError::BadKey),
    })
}

/// The key and value a definition is stored under in the current format.
pub(crate) fn encode(definition: &Definition) -> (Vec<u8>, Vec<u8>) {
    match definition {
        Definition::Exchange { vhost, name, stored } => (exchange_key(vhost, name), encode_exchange(stored)),
        Definition::Queue { vhost, name, stored } => (queue_key(vhost, name), encode_queue(stored)),
        Definition::Binding { vhost, stored } => (binding_key(vhost, stored), encode_binding(stored)),
        Definition::TransientLog { vhost, queue, log } => {
            (transient_log_key(vhost, *log), encode_transient_log(queue, *log))
        }
    }
}

/// The changes that bring a definitions log to the current format: each old JSON value is
/// rewritten (a binding also under its new key, the old key deleted). Applied as one batch, so a
/// crash leaves the log all old or all new. A value in a version this broker does not know stops
/// the migration: starting anyway could take that definition's logs for orphans and delete them.
pub(crate) fn migrate<'a>(
    entries: impl IntoIterator<Item = (&'a Vec<u8>, &'a Vec<u8>)>,
) -> Result<Vec<MetaChange>, FormatError> {
    let mut changes = Vec::new();
    for (key, value) in entries {
        if !is_legacy(value) {
            match value.first() {
                Some(&DEFINITIONS_FORMAT_VERSION) => continue,
                Some(&version) => return Err(FormatError::UnknownVersion(version)),
                None => return Err(FormatError::Damaged("an empty value")),
            }
        }
        let definition = match decode_legacy(key, value) {
            Ok(definition) => definition,
            Err(error) => {
                // Left as it is: recovery reports it as unreadable, and keeps a log it named that
                // holds messages as an orphaned-log queue.
                tracing::error!(key = %String::from_utf8_lossy(key), %error, "an old definition could not be migrated");
                continue;
            }
        };
        let (new_key, new_value) = encode(&definition);
        if &new_key != key {
            changes.push(MetaChange::Delete { key: key.clone() });
        }
        changes.push(MetaChange::Put { key: new_key, value: new_value });
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_wire::types::{AMQPValue, FieldArray, LongString};

    fn arguments() -> FieldTable {
        let mut table = FieldTable::default();
        table.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(LongString::from(&b"dlx"[..])));
        table.insert("x-delivery-limit".into(), AMQPValue::LongInt(5));
        table.insert(
            "x-retry-backoff".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(1000), AMQPValue::LongInt(5000)])),
        );
        table
    }

    /// One of each kind, with every optional field both ways across them.
    fn samples() -> Vec<Definition> {
        vec![
            Definition::Exchange {
                vhost: "/".into(),
                name: "later".into(),
                stored: StoredExchange {
                    kind: "x-delayed-message".into(),
                    auto_delete: false,
                    internal: true,
                    arguments: arguments(),
                    store_log: Some(7),
                    dedup_log: Some(8),
                },
            },
            Definition::Exchange {
                vhost: "staging".into(),
                name: "orders".into(),
                stored: StoredExchange {
                    kind: "topic".into(),
                    auto_delete: true,
                    internal: false,
                    arguments: FieldTable::default(),
                    store_log: None,
                    dedup_log: None,
                },
            },
            Definition::Queue {
                vhost: "/".into(),
                name: "orders.email".into(),
                stored: StoredQueue { auto_delete: false, arguments: arguments(), store_log: 1, dedup_log: Some(2) },
            },
            Definition::Binding {
                vhost: "/".into(),
                stored: StoredBinding {
                    source: "orders".into(),
                    destination: Destination::Queue("orders.email".into()),
                    routing_key: "order.#".into(),
                    arguments: FieldTable::default(),
                },
            },
            Definition::Binding {
                vhost: "/".into(),
                stored: StoredBinding {
                    source: "orders".into(),
                    destination: Destination::Exchange("audit".into()),
                    routing_key: "order.*".into(),
                    arguments: arguments(),
                },
            },
            Definition::TransientLog { vhost: "/".into(), queue: "amq.gen-scratch".into(), log: 9 },
        ]
    }

    /// The golden file: each sample's key and value, as `u32 key length, key, u32 value length,
    /// value`, in the order of `samples`.
    fn golden_bytes() -> Vec<u8> {
        let mut out = Vec::new();
        for definition in samples() {
            let (key, value) = encode(&definition);
            out.extend_from_slice(&(key.len() as u32).to_be_bytes());
            out.extend_from_slice(&key);
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(&value);
        }
        out
    }

    const GOLDEN_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/definitions-format-1.bin");

    #[test]
    fn the_format_writes_exactly_the_golden_bytes() {
        // To regenerate after a deliberate format change (which needs a new version byte and a
        // migration): WHARF_WRITE_GOLDEN=1 cargo test -p wharf-broker definition_format
        if std::env::var_os("WHARF_WRITE_GOLDEN").is_some() {
            std::fs::write(GOLDEN_PATH, golden_bytes()).unwrap();
        }
        let golden = std::fs::read(GOLDEN_PATH).unwrap();
        assert_eq!(golden_bytes(), golden, "the definitions format changed: bump its version and migrate");
    }

    #[test]
    fn the_golden_bytes_decode_to_the_samples() {
        let golden = std::fs::read(GOLDEN_PATH).unwrap();
        let mut reader = Reader(&golden);
        let mut decoded = Vec::new();
        while !reader.0.is_empty() {
            let key_length = u32::from_be_bytes(reader.take(4, "").unwrap().try_into().unwrap()) as usize;
            let key = reader.take(key_length, "").unwrap().to_vec();
            let value_length = u32::from_be_bytes(reader.take(4, "").unwrap().try_into().unwrap()) as usize;
            let value = reader.take(value_length, "").unwrap();
            decoded.push(decode(&key, value).unwrap());
        }
        assert_eq!(decoded, samples());
    }

    #[test]
    fn damage_and_unknown_versions_are_refused_not_misread() {
        let (key, value) = encode(&samples()[2]);
        for cut in 0..value.len() {
            assert!(decode(&key, &value[..cut]).is_err(), "a value cut at {cut} must not decode");
        }
        let mut trailing = value.clone();
        trailing.push(0);
        assert_eq!(decode(&key, &trailing), Err(FormatError::Damaged("trailing bytes")));
        let mut newer = value.clone();
        newer[0] = 9;
        assert_eq!(decode(&key, &newer), Err(FormatError::UnknownVersion(9)));
        let (exchange_key, _) = encode(&samples()[0]);
        assert!(decode(&exchange_key, &value).is_err(), "a queue's value under an exchange's key");
        let entries = std::collections::BTreeMap::from([(key.clone(), newer)]);
        assert_eq!(migrate(&entries), Err(FormatError::UnknownVersion(9)), "migration stops at an unknown version");
    }

    #[test]
    fn a_transient_log_record_names_its_log_in_key_and_value_alike() {
        let value = encode_transient_log("scratch", 9);
        assert!(decode(&transient_log_key("/", 10), &value).is_err(), "a key naming another log is damage");
        assert_eq!(
            decode(&transient_log_key("/", 9), &value),
            Ok(Definition::TransientLog { vhost: "/".into(), queue: "scratch".into(), log: 9 })
        );
    }

    #[test]
    fn old_json_values_migrate_to_the_same_definitions() {
        let old_queue = br#"{"auto_delete":false,"arguments":{"x-delivery-limit":{"LongInt":5}},"store_queue":3}"#;
        let old_binding = br#"{"source":"orders","destination_is_queue":false,"destination":"audit","routing_key":"order.*","arguments":{}}"#;
        let old_binding_key = b"binding\0/\0orders\0e\0audit\0order.*\0{}".to_vec();
        let entries = std::collections::BTreeMap::from([
            (queue_key("/", "work"), old_queue.to_vec()),
            (old_binding_key.clone(), old_binding.to_vec()),
        ]);
        let changes = migrate(&entries).unwrap();
        let mut delivery_limit = FieldTable::default();
        delivery_limit.insert("x-delivery-limit".into(), AMQPValue::LongInt(5));
        let queue = Definition::Queue {
            vhost: "/".into(),
            name: "work".into(),
            stored: StoredQueue { auto_delete: false, arguments: delivery_limit, store_log: 3, dedup_log: None },
        };
        let binding = Definition::Binding {
            vhost: "/".into(),
            stored: StoredBinding {
                source: "orders".into(),
                destination: Destination::Exchange("audit".into()),
                routing_key: "order.*".into(),
                arguments: FieldTable::default(),
            },
        };
        let (binding_key, binding_value) = encode(&binding);
        let (queue_key, queue_value) = encode(&queue);
        assert_eq!(
            changes,
            vec![
                MetaChange::Delete { key: old_binding_key },
                MetaChange::Put { key: binding_key, value: binding_value },
                MetaChange::Put { key: queue_key, value: queue_value },
            ]
        );
        // Migrated values are left alone the next time.
        let migrated: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = changes
            .into_iter()
            .filter_map(|change| match change {
                MetaChange::Put { key, value } => Some((key, value)),
                MetaChange::Delete { .. } => None,
            })
            .collect();
        assert_eq!(migrate(&migrated), Ok(Vec::new()));
    }
}
