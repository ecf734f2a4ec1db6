//! [`Message`]: what a publisher sent, shared (`Arc`) by every queue it was routed to.

use bytes::Bytes;
use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use wharf_wire::protocol::BasicProperties;
use wharf_wire::types::FieldTable;

/// The empty properties every paged-out message shares (no allocation per message).
fn no_properties() -> Arc<BasicProperties> {
    static EMPTY: OnceLock<Arc<BasicProperties>> = OnceLock::new();
    Arc::clone(EMPTY.get_or_init(|| Arc::new(BasicProperties::default())))
}

/// A published message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Parsed properties (for routing on headers, persistence, ids). Empty for a paged-out
    /// message, which keeps only `raw_properties`: what is read from the parsed properties
    /// (TTL, keys, headers for routing) is taken before a message is paged out, and changes
    /// (`with_header`, dead-lettering) go through [`Message::full_properties`].
    pub properties: Arc<BasicProperties>,
    /// The properties exactly as received, delivered unchanged.
    pub raw_properties: Bytes,
    /// The body; empty when the body is paged out to the store (see `paged`).
    pub body: Bytes,
    /// Set when the body is not held in memory: where the store keeps it. The runtime reads it
    /// back to deliver or move the message.
    pub paged: Option<PagedBody>,
}

/// Where the store keeps a paged-out body: one queue's record of the message. The model does
/// not read it; it carries it to the runtime, which reads the record back (one `pread`) to
/// deliver or move the message. Valid while that record is live, which it is for as long as the
/// entry that was paged is in its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedBody {
    /// The store's queue log holding the record.
    pub store_queue: u64,
    /// The record's segment in that log.
    pub segment_id: u64,
    /// The record's byte offset in the segment.
    pub offset: u64,
    /// The record's length.
    pub record_bytes: u32,
    /// The body's length (what limits and accounting use while it is not in memory).
    pub body_bytes: u64,
}

impl Message {
    /// `delivery_mode = 2`: the publisher asked for it to survive a restart (in durable queues).
    pub fn persistent(&self) -> bool {
        debug_assert!(!self.properties_elided(), "a paged-out message's properties are read with full_properties");
        self.properties.delivery_mode() == &Some(2)
    }

    /// The message headers, if any.
    pub fn headers(&self) -> Option<&FieldTable> {
        debug_assert!(!self.properties_elided(), "a paged-out message's properties are read with full_properties");
        self.properties.headers().as_ref()
    }

    /// True for a paged-out message that keeps only its raw properties.
    fn properties_elided(&self) -> bool {
        self.paged.is_some() && Arc::ptr_eq(&self.properties, &no_properties())
    }

    /// Body size in bytes (whether it is held in memory or paged out).
    pub fn body_bytes(&self) -> u64 {
        match &self.paged {
            Some(paged) => paged.body_bytes,
            None => self.body.len() as u64,
        }
    }

    /// The same message as little as possible in memory: no body (`paged` says where to read
    /// it) and no parsed properties (the raw ones stay, to deliver and to parse again).
    pub fn paged_out(&self, paged: PagedBody) -> Message {
        self.clone().into_paged_out(paged)
    }

    /// A paged-out stand-in made from its parts (what [`Message::into_paged_out`] returns).
    pub(crate) fn paged_stand_in(
        exchange: String,
        routing_key: String,
        raw_properties: Bytes,
        paged: PagedBody,
    ) -> Message {
        Message {
            exchange,
            routing_key,
            properties: no_properties(),
            raw_properties,
            body: Bytes::new(),
            paged: Some(paged),
        }
    }

    /// Like [`Message::paged_out`], reusing this message's allocations.
    pub fn into_paged_out(self, paged: PagedBody) -> Message {
        Message::paged_stand_in(self.exchange, self.routing_key, self.raw_properties, paged)
    }

    /// The same message with its body (read back from the store) and its parsed properties in
    /// memory again.
    pub fn with_body(&self, body: Bytes) -> Message {
        Message {
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            properties: match self.full_properties() {
                Cow::Borrowed(_) => Arc::clone(&self.properties),
                Cow::Owned(properties) => Arc::new(properties),
            },
            raw_properties: self.raw_properties.clone(),
            body,
            paged: None,
        }
    }

    /// The parsed properties, parsed again from the raw ones for a paged-out message.
    pub fn full_properties(&self) -> Cow<'_, BasicProperties> {
        if self.paged.is_some()
            && let Some(properties) = wharf_wire::frame::decode_properties(&self.raw_properties)
        {
            return Cow::Owned(properties);
        }
        Cow::Borrowed(&self.properties)
    }
}

/// Longest header value used as an ordering or de-duplication key; longer values are not keys.
pub const KEY_BYTES_MAX: usize = 1024;

impl Message {
    /// The per-message TTL from the `expiration` property (a decimal number of milliseconds, as
    /// RabbitMQ reads it); `None` when absent or not a number.
    pub fn expiration_ms(&self) -> Option<u64> {
        debug_assert!(!self.properties_elided(), "a paged-out message's properties are read with full_properties");
        self.properties.expiration().as_ref().and_then(|text| text.as_str().trim().parse::<u64>().ok())
    }

    /// The `x-delay` header (for a delayed-message exchange), in ms: an integer of any width or
    /// a decimal string, capped as every duration argument is; `None` unless positive.
    pub fn delay_ms(&self) -> Option<u64> {
        let value = self.headers()?.inner().get("x-delay")?;
        let number = crate::settings::integer(value)
            .or_else(|| crate::settings::text(value).and_then(|text| text.trim().parse().ok()))?;
        (number > 0).then(|| number.min(i128::from(crate::settings::DURATION_MS_MAX)) as u64)
    }

    /// A header's value as text (strings as they are, integers in decimal), for ordering and
    /// de-duplication keys; `None` when absent, of another type, or longer than `KEY_BYTES_MAX`.
    pub fn header_text(&self, name: &str) -> Option<String> {
        let value = self.headers()?.inner().get(name)?;
        let text = crate::settings::text(value).or_else(|| crate::settings::integer(value).map(|n| n.to_string()))?;
        (text.len() <= KEY_BYTES_MAX).then_some(text)
    }

    /// The same message with its properties replaced (re-encoded for the wire).
    pub fn with_properties(&self, properties: BasicProperties) -> Message {
        Message {
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            raw_properties: wharf_wire::frame::encode_properties(&properties),
            properties: Arc::new(properties),
            body: self.body.clone(),
            paged: self.paged,
        }
    }

    /// The same message with one header set.
    pub fn with_header(&self, name: &str, value: wharf_wire::types::AMQPValue) -> Message {
        let properties = self.full_properties().into_owned();
        let mut headers = properties.headers().clone().unwrap_or_default();
        if let Ok(name) = wharf_wire::types::ShortString::try_new(name) {
            headers.insert(name, value);
        }
        self.with_properties(properties.with_headers(headers))
    }
}
