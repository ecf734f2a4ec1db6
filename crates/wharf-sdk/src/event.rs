//! [`Event`]: what an application publishes through the outbox (or straight through the
//! [`ConfirmedPublisher`](crate::ConfirmedPublisher)): a unique id (the AMQP `message-id`, which
//! broker de-duplication and consumers' inboxes key on), a destination exchange and routing key,
//! an optional ordering key, headers, the AMQP `type`, correlation id and reply-to, and a body.
//! Typed messages become events through [`Event::from_message`](crate::Message).

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
    /// The AMQP `type` property: a typed message's [`TYPE`](crate::Message::TYPE).
    pub message_type: Option<String>,
    /// The AMQP `correlation-id` (request/reply: the request's id on the reply).
    pub correlation_id: Option<String>,
    /// The AMQP `reply-to` (request/reply: where the reply goes).
    pub reply_to: Option<String>,
    /// Not published before this time (ms since the Unix epoch): the relay leaves the row until
    /// then, which works on any broker and keeps the wait in the database, durable.
    pub available_at_ms: Option<i64>,
    /// The body.
    pub body: Vec<u8>,
}

/// A fresh, time-ordered unique id (UUIDv7): what an event gets by default, and a good id for the
/// business object an event is about.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The namespace of ids made from idempotency keys (a fixed random UUID: ids made by another
/// system from the same key never collide with Wharf's).
const ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x8c4f_2a61_93d7_4b1e_a5c2_7e09_d3f6_1b48);

/// The header an event's ordering key travels in.
pub const ORDERING_KEY_HEADER: &str = "x-ordering-key";

impl Event {
    /// A new event with a fresh time-ordered id.
    pub fn new(exchange: impl Into<String>, routing_key: impl Into<String>, body: impl Into<Vec<u8>>) -> Event {
        Event {
            id: new_id(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            ordering_key: None,
            headers: BTreeMap::new(),
            content_type: None,
            message_type: None,
            correlation_id: None,
            reply_to: None,
            available_at_ms: None,
            body: body.into(),
        }
    }

    /// Not published before `delay` from now. The relay looks for rows that came due at its poll
    /// interval (1 s by default), so that is the precision. Later events with the same ordering
    /// key wait behind it.
    pub fn deliver_after(mut self, delay: std::time::Duration) -> Event {
        let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        self.available_at_ms = Some(crate::outbox::now_ms().saturating_add(delay_ms));
        self
    }

    /// Makes the id stable for one business operation: a UUIDv5 of the message type (or, without
    /// one, the exchange and routing key) and `key`. A retried operation that passes the same key
    /// (an HTTP request's idempotency key, a command id) writes an event with the same id, which
    /// the outbox refuses the second time ([`SdkError::Duplicate`](crate::SdkError::Duplicate)),
    /// and which the broker's de-duplication and consumers' inboxes drop if it got out twice.
    pub fn with_idempotency_key(mut self, key: &str) -> Event {
        let scope = match &self.message_type {
            Some(message_type) => format!("type\n{message_type}"),
            None => format!("route\n{}\n{}", self.exchange, self.routing_key),
        };
        self.id = uuid::Uuid::new_v5(&ID_NAMESPACE, format!("{scope}\n{key}").as_bytes()).to_string();
        self
    }

    /// Sets the AMQP `type` property.
    pub fn with_type(mut self, message_type: impl Into<String>) -> Event {
        self.message_type = Some(message_type.into());
        self
    }

    /// Sets the AMQP `correlation-id`.
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Event {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Sets the AMQP `reply-to`.
    pub fn with_reply_to(mut self, reply_to: impl Into<String>) -> Event {
        self.reply_to = Some(reply_to.into());
        self
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
        let properties = [
            ("content type", &self.content_type),
            ("message type", &self.message_type),
            ("correlation id", &self.correlation_id),
            ("reply-to", &self.reply_to),
        ];
        for (what, value) in properties {
            if let Some(value) = value
                && value.len() > NAME_BYTES_MAX
            {
                return Err(invalid(format!("the {what} is longer than {NAME_BYTES_MAX} bytes")));
            }
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

    /// The headers as stored in an outbox row, with the trace context the event is written in
    /// (`trace.rs`), unless the event carries its own: the event is a new span of the trace in
    /// force (a handler's), or the root of a new trace. Returns the JSON and the context.
    pub(crate) fn headers_json_traced(&self) -> (String, Option<crate::trace::TraceContext>) {
        use crate::trace::{TRACEPARENT_HEADER, TraceContext};
        if let Some(own) = self.headers.get(TRACEPARENT_HEADER) {
            return (self.headers_json(), TraceContext::parse(own));
        }
        let context = crate::trace::current().map_or_else(TraceContext::new_root, |current| current.child());
        let mut headers = self.headers.clone();
        headers.insert(TRACEPARENT_HEADER.to_owned(), context.to_string());
        (serde_json::to_string(&headers).unwrap_or_else(|_| "{}".to_owned()), Some(context))
    }

    /// The headers from an outbox row.
    pub(crate) fn headers_from_json(json: &str) -> BTreeMap<String, String> {
        serde_json::from_str(json).unwrap_or_default()
    }
}
