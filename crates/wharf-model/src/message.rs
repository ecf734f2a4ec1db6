//! [`Message`]: what a publisher sent, shared (`Arc`) by every queue it was routed to.

use bytes::Bytes;
use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use wharf_wire::protocol::BasicProperties;
use wharf_wire::types::FieldTable;

/// The empty properties a paged-out message answers with if asked for its parsed ones (which
/// callers must not do: they use [`Message::full_properties`]).
fn no_properties() -> &'static BasicProperties {
    static EMPTY: OnceLock<BasicProperties> = OnceLock::new();
    EMPTY.get_or_init(BasicProperties::default)
}

/// A published message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// The properties exactly as received, delivered unchanged.
    pub raw_properties: Bytes,
    /// The body and the parsed properties in memory, or where the store keeps the body.
    pub body: Body,
    /// Where it comes from, for its delivery trace (`trace.rs`); `None` when traces are off.
    pub trace: Option<Arc<crate::trace::Provenance>>,
}

/// Where a message's body is.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// In memory, with the parsed properties (for routing on headers, persistence, ids).
    Resident {
        /// Parsed properties. Changes (`with_header`, dead-lettering) go through
        /// [`Message::full_properties`] and [`Message::with_properties`].
        properties: Arc<BasicProperties>,
        /// The body's bytes.
        bytes: Bytes,
    },
    /// Paged out: neither the body nor the parsed properties are in memory (what is read from
    /// the parsed properties, such as TTL, keys and headers for routing, is taken before a
    /// message is paged out; [`Message::full_properties`] parses the raw ones again). The runtime
    /// reads the body back to deliver or move the message.
    Paged(PagedBody),
}

/// Where the store keeps a paged-out body: one queue's record of the message. The model does
/// not read it; it carries it to the runtime, which reads the record back (one `pread`) to
/// deliver or move the message. Valid while that record is live, which it is for as long as the
/// entry that was paged is in its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedBody {
    /// The store log holding the record.
    pub store_log: u64,
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
    /// A message with its body in memory.
    pub fn new(
        exchange: String,
        routing_key: String,
        properties: Arc<BasicProperties>,
        raw_properties: Bytes,
        bytes: Bytes,
    ) -> Message {
        Message { exchange, routing_key, raw_properties, body: Body::Resident { properties, bytes }, trace: None }
    }

    /// The parsed properties of a resident message (see [`no_properties`] for a paged one).
    fn parsed(&self) -> &BasicProperties {
        match &self.body {
            Body::Resident { properties, .. } => properties,
            Body::Paged(_) => {
                debug_assert!(false, "a paged-out message's properties are read with full_properties");
                no_properties()
            }
        }
    }

    /// `delivery_mode = 2`: the publisher asked for it to survive a restart (in durable queues).
    pub fn persistent(&self) -> bool {
        self.parsed().delivery_mode() == &Some(2)
    }

    /// The `message-id` property, if any.
    pub fn message_id(&self) -> Option<&str> {
        self.parsed().message_id().as_ref().map(|id| id.as_str())
    }

    /// The `priority` property (0 when absent), parsed again for a paged-out message.
    pub fn priority(&self) -> u8 {
        match &self.body {
            Body::Resident { properties, .. } => properties.priority().unwrap_or(0),
            Body::Paged(_) => self.full_properties().priority().unwrap_or(0),
        }
    }

    /// The `reply_to` property, if any.
    pub fn reply_to(&self) -> Option<&str> {
        self.parsed().reply_to().as_ref().map(|reply_to| reply_to.as_str())
    }

    /// The message headers, if any.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.parsed().headers().as_ref()
    }

    /// Where the store keeps the body, if it is paged out.
    pub fn paged(&self) -> Option<PagedBody> {
        match &self.body {
            Body::Resident { .. } => None,
            Body::Paged(paged) => Some(*paged),
        }
    }

    /// The body's bytes, if they are in memory.
    pub fn bytes_in_memory(&self) -> Option<&Bytes> {
        match &self.body {
            Body::Resident { bytes, .. } => Some(bytes),
            Body::Paged(_) => None,
        }
    }

    /// Body size in bytes (whether it is held in memory or paged out).
    pub fn body_bytes(&self) -> u64 {
        match &self.body {
            Body::Resident { bytes, .. } => bytes.len() as u64,
            Body::Paged(paged) => paged.body_bytes,
        }
    }

    /// The same message as little as possible in memory: no body (`paged` says where to read
    /// it) and no parsed properties (the raw ones stay, to deliver and to parse again).
    pub fn paged_out(&self, paged: PagedBody) -> Message {
        self.clone().into_paged_out(paged)
    }

    /// A paged-out message made from its parts (what [`Message::into_paged_out`] returns).
    pub(crate) fn paged_from_parts(
        exchange: String,
        routing_key: String,
        raw_properties: Bytes,
        paged: PagedBody,
        trace: Option<Arc<crate::trace::Provenance>>,
    ) -> Message {
        Message { exchange, routing_key, raw_properties, body: Body::Paged(paged), trace }
    }

    /// Like [`Message::paged_out`], reusing this message's allocations.
    pub fn into_paged_out(self, paged: PagedBody) -> Message {
        Message::paged_from_parts(self.exchange, self.routing_key, self.raw_properties, paged, self.trace)
    }

    /// The same message with its body (read back from the store) and its parsed properties in
    /// memory again.
    pub fn with_body(&self, bytes: Bytes) -> Message {
        let properties = match (&self.body, self.full_properties()) {
            (Body::Resident { properties, .. }, Cow::Borrowed(_)) => Arc::clone(properties),
            (_, properties) => Arc::new(properties.into_owned()),
        };
        Message::new(self.exchange.clone(), self.routing_key.clone(), properties, self.raw_properties.clone(), bytes)
            .with_trace(self.trace.clone())
    }

    /// The same message with its provenance set.
    pub fn with_trace(mut self, trace: Option<Arc<crate::trace::Provenance>>) -> Message {
        self.trace = trace;
        self
    }

    /// The parsed properties, parsed again from the raw ones for a paged-out message.
    pub fn full_properties(&self) -> Cow<'_, BasicProperties> {
        match &self.body {
            Body::Resident { properties, .. } => Cow::Borrowed(properties),
            Body::Paged(_) => Cow::Owned(
                wharf_wire::frame::decode_properties(&self.raw_properties).unwrap_or_else(|| no_properties().clone()),
            ),
        }
    }
}

/// Longest header value used as an ordering or de-duplication key; longer values are not keys.
pub const KEY_BYTES_MAX: usize = 1024;

impl Message {
    /// The per-message TTL from the `expiration` property (a decimal number of milliseconds, as
    /// RabbitMQ reads it); `None` when absent or not a number.
    pub fn expiration_ms(&self) -> Option<u64> {
        self.parsed().expiration().as_ref().and_then(|text| text.as_str().trim().parse::<u64>().ok())
    }

    /// The `x-delay` header (for a delayed-message exchange), in ms: an integer of any width or
    /// a decimal string, capped as every duration argument is; `None` unless positive.
    pub fn delay_ms(&self) -> Option<u64> {
        let value = self.headers()?.inner().get("x-delay")?;
        let number = crate::settings::integer(value)
            .or_else(|| crate::settings::text(value).and_then(|text| text.trim().parse().ok()))?;
        (number > 0).then(|| number.min(i128::from(crate::settings::DURATION_MS_MAX)) as u64)
    }

    /// It was dead-lettered at least once (it carries `x-death`).
    pub fn is_dead_lettered(&self) -> bool {
        self.headers().is_some_and(|headers| headers.inner().contains_key("x-death"))
    }

    /// A header's value as text (strings as they are, integers in decimal), for ordering and
    /// de-duplication keys; `None` when absent, of another type, or longer than `KEY_BYTES_MAX`.
    pub fn header_text(&self, name: &str) -> Option<String> {
        let value = self.headers()?.inner().get(name)?;
        let text = crate::settings::text(value).or_else(|| crate::settings::integer(value).map(|n| n.to_string()))?;
        (text.len() <= KEY_BYTES_MAX).then_some(text)
    }

    /// The same message with its properties replaced (re-encoded for the wire).
    /// A paged-out message stays paged out (its new raw properties are parsed again on demand).
    pub fn with_properties(&self, properties: BasicProperties) -> Message {
        let raw_properties = wharf_wire::frame::encode_properties(&properties);
        let body = match &self.body {
            Body::Resident { bytes, .. } => Body::Resident { properties: Arc::new(properties), bytes: bytes.clone() },
            Body::Paged(paged) => Body::Paged(*paged),
        };
        Message {
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            raw_properties,
            body,
            trace: self.trace.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every queued message pays this; `docs/benchmarks.md` states it (168 bytes before `Body`,
    /// 128 before the trace's provenance pointer).
    #[test]
    fn a_message_takes_136_bytes() {
        assert_eq!(std::mem::size_of::<Message>(), 136);
    }
}
