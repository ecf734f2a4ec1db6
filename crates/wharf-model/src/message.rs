//! [`Message`]: what a publisher sent, shared (`Arc`) by every queue it was routed to.

use bytes::Bytes;
use wharf_wire::protocol::BasicProperties;
use wharf_wire::types::FieldTable;

/// A published message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Parsed properties (for routing on headers, persistence, ids).
    pub properties: BasicProperties,
    /// The properties exactly as received, delivered unchanged.
    pub raw_properties: Bytes,
    /// The body.
    pub body: Bytes,
}

impl Message {
    /// `delivery_mode = 2`: the publisher asked for it to survive a restart (in durable queues).
    pub fn persistent(&self) -> bool {
        self.properties.delivery_mode() == &Some(2)
    }

    /// The message headers, if any.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }

    /// Body size in bytes.
    pub fn body_bytes(&self) -> u64 {
        self.body.len() as u64
    }
}
