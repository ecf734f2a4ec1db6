//! [`Event`]: what an application publishes through the outbox (or straight through the
//! [`ConfirmedPublisher`](crate::ConfirmedPublisher)): a unique id (the AMQP `message-id`, which
//! broker de-duplication and consumers' inboxes key on), a destination exchange and routing key,
//! an optional ordering key, headers and a body.

use std::collections::BTreeMap;

/// Longest exchange name, routing key, ordering key or header name (AMQP short strings).
pub const NAME_BYTES_MAX: usize = 255;

/// An event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Unique id, sent as the AMQP `message-id`. Time-ordered UUIDv7 by default.
    pub id: String,
    /// Destination exchange (`""` is the default exchange: the routing key names a queue).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Events with the same ordering key are published in the order they were written (for
    /// example the order id); sent as the `x-ordering-key` header so a queue declared with
    /// `x-ordered-by: x-ordering-key` keeps that order on the consumer side too.
    pub ordering_key: Option<String>,
    /// Headers (string values).
    pub headers: BTreeMap<String, String>,
    /// The content type, if any (`application/json`, …).
    pub content_type: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// The header an event's ordering key travels in.
pub const ORDERING_KEY_HEADER: &str = "x-ordering-key";

impl Event {
    /// A new event with a fresh time-ordered id.
    pub fn new(exchange: impl Into<String>, routing_key: impl Into<String>, body: impl Into<Vec<u8>>) -> Event {
        Event {
            id: uuid::Uuid::now_v7().to_string(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            ordering_key: None,
            headers: BTreeMap::new(),
            content_type: None,
            body: body.into(),
        }
    }

    /// Sets the id (for events whose id the application already has, such as a command id).
    pub fn with_id(mut self, id: impl Into<String>) -> Event {
        self.id = id.into();
        self
    }

    /// Sets the ordering key.
    pub fn ordered_by(mut self, key: impl Into<String>) -> Event {
        self.ordering_key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Event {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Event {
        self.content_type = Some(content_type.into());
        self
    }

    /// Checks what the broker would refuse, so a bad event is reported when it is written
    /// rather than found by the relay: names within AMQP's limits, an id present.
    pub fn check(&self) -> crate::Result<()> {
        let invalid = |reason: String| crate::SdkError::Invalid { id: self.id.clone(), reason };
        if self.id.is_empty() || self.id.len() > NAME_BYTES_MAX {
            return Err(invalid(format!("the id must be 1 to {NAME_BYTES_MAX} bytes")));
        }
        for (what, value) in [("exchange", &self.exchange), ("routing key", &self.routing_key)] {
            if value.len() > NAME_BYTES_MAX {
                return Err(invalid(format!("the {what} is longer than {NAME_BYTES_MAX} bytes")));
            }
        }
        if let Some(key) = &self.ordering_key
            && key.len() > NAME_BYTES_MAX
        {
            return Err(invalid(format!("the ordering key is longer than {NAME_BYTES_MAX} bytes")));
        }
        if let Some(content_type) = &self.content_type
            && content_type.len() > NAME_BYTES_MAX
        {
            return Err(invalid(format!("the content type is longer than {NAME_BYTES_MAX} bytes")));
        }
        if let Some(name) = self.headers.keys().find(|name| name.is_empty() || name.len() > NAME_BYTES_MAX) {
            return Err(invalid(format!("header name '{name}' must be 1 to {NAME_BYTES_MAX} bytes")));
        }
        Ok(())
    }

    /// The headers as stored in an outbox row (JSON object).
    pub(crate) fn headers_json(&self) -> String {
        serde_json::to_string(&self.headers).unwrap_or_else(|_| "{}".to_owned())
    }

    /// The headers from an outbox row.
    pub(crate) fn headers_from_json(json: &str) -> BTreeMap<String, String> {
        serde_json::from_str(json).unwrap_or_default()
    }
}
