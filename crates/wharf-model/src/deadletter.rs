//! Dead-lettering: why a message left its queue, the `x-death` header in RabbitMQ's format, and
//! the [`Transfer`] the runtime carries out to move a message into other queues (dead letters,
//! and delayed messages that fell due).
//!
//! A transfer is at-least-once: the runtime appends the copies to their queues, waits until they
//! are durable, and only then removes the original from the store. A crash in between leaves the
//! message in both places; never in neither.

use crate::broker::Removed;
use crate::message::Message;
use std::sync::Arc;
use wharf_wire::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

/// Why a message was dead-lettered (RabbitMQ's reason names, plus `delivery_limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathReason {
    /// Rejected or nacked without requeue.
    Rejected,
    /// Its TTL ran out.
    Expired,
    /// Dropped by a length limit.
    MaxLen,
    /// Delivered as many times as the queue's delivery limit allows.
    DeliveryLimit,
}

impl DeathReason {
    /// The name in `x-death`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::MaxLen => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// Where a transfer sends its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferTarget {
    /// Publish through an exchange with each routing key (a dead-letter exchange, or a delayed
    /// exchange routing by its `x-delayed-type`). If that reaches no queue, `fallback` (the
    /// source's automatic dead-letter queue, when the message must never be dropped) is used;
    /// without one the message is dropped.
    Exchange { exchange: String, routing_keys: Vec<String>, fallback: Option<AutoDeadLetterQueue> },
    /// Straight to the source's automatic dead-letter queue (created on first use).
    Queue(AutoDeadLetterQueue),
}

/// A queue's automatic dead-letter queue, `<queue>.dlq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoDeadLetterQueue {
    /// Its name.
    pub name: String,
    /// Durable if the source is.
    pub durable: bool,
}

/// A message to move into other queues.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// The vhost.
    pub vhost: String,
    /// The message as it must arrive (for dead letters: with `x-death`).
    pub message: Arc<Message>,
    /// Where it goes.
    pub target: TransferTarget,
    /// The original, to remove from the store once the copies are durable (none for a refused
    /// publish that is dead-lettered straight away).
    pub source: Option<Removed>,
    /// The reason, for dead letters.
    pub reason: Option<DeathReason>,
}

impl Transfer {
    /// The same transfer with its message's body in memory again (read back from the store).
    pub fn with_body(mut self, body: bytes::Bytes) -> Transfer {
        self.message = Arc::new(self.message.with_body(body));
        self
    }
}

/// The automatic dead-letter queue's name for `queue`, if it fits in a queue name.
pub fn auto_dead_letter_queue_name(queue: &str) -> String {
    let mut name = queue.to_owned();
    // Keep the name within 255 bytes (and on a character boundary).
    while name.len() > 251 {
        name.pop();
    }
    name.push_str(".dlq");
    name
}

fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes().to_vec()))
}

fn key(name: &str) -> ShortString {
    ShortString::try_new(name).unwrap_or_default()
}

/// The message as it leaves `queue` for `reason` at `now_ms`: `x-death` gets an entry for
/// (queue, reason) (or that entry's count goes up and it moves to the front, as RabbitMQ 3.8+),
/// `x-first-death-*` is set once, `x-last-death-*` every time, `x-delivery-count` records the
/// deliveries so far, and `expiration` moves into the entry as `original-expiration` so the copy
/// does not expire again. It is routed with `exchange` and `routing_key`.
pub fn dead_lettered(
    message: &Message,
    queue: &str,
    reason: DeathReason,
    now_ms: u64,
    delivery_count: u32,
    exchange: &str,
    routing_key: &str,
) -> Message {
    let mut properties = message.full_properties().into_owned();
    let mut headers = properties.headers().clone().unwrap_or_default();
    let original_expiration = properties.expiration().clone();
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(array)) => array.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = |death: &AMQPValue| match death {
        AMQPValue::FieldTable(table) => {
            table.inner().get("queue").and_then(crate::settings::text).as_deref() == Some(queue)
                && table.inner().get("reason").and_then(crate::settings::text).as_deref() == Some(reason.as_str())
        }
        _ => false,
    };
    let mut entry = match deaths.iter().position(same) {
        Some(index) => match deaths.remove(index) {
            AMQPValue::FieldTable(table) => table,
            _ => FieldTable::default(),
        },
        None => FieldTable::default(),
    };
    // The header may come from a client: never trust it to leave room for one more.
    let previous = entry.inner().get("count").and_then(crate::settings::integer).unwrap_or(0);
    let count = i64::try_from(previous).unwrap_or(i64::MAX).saturating_add(1);
    entry.insert(key("count"), AMQPValue::LongLongInt(count));
    entry.insert(key("reason"), long_string(reason.as_str()));
    entry.insert(key("queue"), long_string(queue));
    entry.insert(key("time"), AMQPValue::Timestamp(now_ms / 1000));
    entry.insert(key("exchange"), long_string(&message.exchange));
    entry.insert(key("routing-keys"), AMQPValue::FieldArray(FieldArray::from(vec![long_string(&message.routing_key)])));
    if let Some(expiration) = &original_expiration {
        entry.insert(key("original-expiration"), long_string(expiration.as_str()));
    }
    deaths.insert(0, AMQPValue::FieldTable(entry));
    headers.insert(key("x-death"), AMQPValue::FieldArray(FieldArray::from(deaths)));
    if !headers.contains_key("x-first-death-reason") {
        headers.insert(key("x-first-death-reason"), long_string(reason.as_str()));
        headers.insert(key("x-first-death-queue"), long_string(queue));
        headers.insert(key("x-first-death-exchange"), long_string(&message.exchange));
    }
    headers.insert(key("x-last-death-reason"), long_string(reason.as_str()));
    headers.insert(key("x-last-death-queue"), long_string(queue));
    headers.insert(key("x-last-death-exchange"), long_string(&message.exchange));
    if delivery_count > 0 {
        headers.insert(key("x-delivery-count"), AMQPValue::LongLongInt(i64::from(delivery_count)));
    }
    properties = properties.with_headers(headers);
    if original_expiration.is_some() {
        properties = properties_without_expiration(properties);
    }
    let mut moved = message.with_properties(properties);
    moved.exchange = exchange.to_owned();
    moved.routing_key = routing_key.to_owned();
    moved
}

/// Where a dead letter came from, for a replay: the exchange and first routing key of its newest
/// `x-death` entry (the hop that brought it here), or `None` if it has no usable `x-death`.
pub fn death_origin(message: &Message) -> Option<(String, String)> {
    // A paged-out message keeps only its raw properties: parse them again.
    let properties = message.full_properties();
    let Some(AMQPValue::FieldArray(deaths)) =
        properties.headers().as_ref().and_then(|headers| headers.inner().get("x-death"))
    else {
        return None;
    };
    let AMQPValue::FieldTable(newest) = deaths.as_slice().first()? else { return None };
    let exchange = newest.inner().get("exchange").and_then(crate::settings::text)?;
    let routing_key = match newest.inner().get("routing-keys")? {
        AMQPValue::FieldArray(keys) => keys.as_slice().first().and_then(crate::settings::text)?,
        _ => return None,
    };
    Some((exchange, routing_key))
}

/// The header a replay counts itself in (a Wharf extension).
pub const REPLAYED_COUNT_HEADER: &str = "x-replayed-count";

/// The message as a replay sends it: the same message id, properties and headers (`x-death`
/// included), `x-replayed-count` one higher, routed with `exchange` and `routing_key`.
pub fn replayed(message: &Message, exchange: &str, routing_key: &str) -> Message {
    let previous = message
        .full_properties()
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(REPLAYED_COUNT_HEADER))
        .and_then(crate::settings::integer)
        .unwrap_or(0);
    let count = i64::try_from(previous).unwrap_or(i64::MAX).max(0).saturating_add(1);
    let mut copy = message.with_header(REPLAYED_COUNT_HEADER, AMQPValue::LongLongInt(count));
    copy.exchange = exchange.to_owned();
    copy.routing_key = routing_key.to_owned();
    copy
}

fn properties_without_expiration(
    properties: wharf_wire::protocol::BasicProperties,
) -> wharf_wire::protocol::BasicProperties {
    // `BasicProperties` has no setter that clears a field; rebuild it from the others.
    let mut rebuilt = wharf_wire::protocol::BasicProperties::default();
    if let Some(value) = properties.content_type() {
        rebuilt = rebuilt.with_content_type(value.clone());
    }
    if let Some(value) = properties.content_encoding() {
        rebuilt = rebuilt.with_content_encoding(value.clone());
    }
    if let Some(value) = properties.headers() {
        rebuilt = rebuilt.with_headers(value.clone());
    }
    if let Some(value) = properties.delivery_mode() {
        rebuilt = rebuilt.with_delivery_mode(*value);
    }
    if let Some(value) = properties.priority() {
        rebuilt = rebuilt.with_priority(*value);
    }
    if let Some(value) = properties.correlation_id() {
        rebuilt = rebuilt.with_correlation_id(value.clone());
    }
    if let Some(value) = properties.reply_to() {
        rebuilt = rebuilt.with_reply_to(value.clone());
    }
    if let Some(value) = properties.message_id() {
        rebuilt = rebuilt.with_message_id(value.clone());
    }
    if let Some(value) = properties.timestamp() {
        rebuilt = rebuilt.with_timestamp(*value);
    }
    if let Some(value) = properties.kind() {
        rebuilt = rebuilt.with_type(value.clone());
    }
    if let Some(value) = properties.user_id() {
        rebuilt = rebuilt.with_user_id(value.clone());
    }
    if let Some(value) = properties.app_id() {
        rebuilt = rebuilt.with_app_id(value.clone());
    }
    if let Some(value) = properties.cluster_id() {
        rebuilt = rebuilt.with_cluster_id(value.clone());
    }
    rebuilt
}

/// True if sending `message` (already carrying its newest `x-death` entry) to `queue` would close
/// a dead-letter cycle that involves no rejection: RabbitMQ drops such a message rather than let
/// it circle forever (for example two queues that expire into each other).
pub fn closes_cycle(message: &Message, queue: &str) -> bool {
    let properties = message.full_properties();
    let Some(AMQPValue::FieldArray(deaths)) =
        properties.headers().as_ref().and_then(|headers| headers.inner().get("x-death"))
    else {
        return false;
    };
    let field = |death: &AMQPValue, name: &str| match death {
        AMQPValue::FieldTable(table) => table.inner().get(name).and_then(crate::settings::text),
        _ => None,
    };
    let seen_queue = deaths.as_slice().iter().any(|death| field(death, "queue").as_deref() == Some(queue));
    let rejected = deaths.as_slice().iter().any(|death| field(death, "reason").as_deref() == Some("rejected"));
    seen_queue && !rejected
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use wharf_wire::protocol::BasicProperties;

    fn message(properties: BasicProperties) -> Message {
        Message::new(
            "orders".into(),
            "order.received".into(),
            std::sync::Arc::new(properties.clone()),
            wharf_wire::frame::encode_properties(&properties),
            Bytes::from_static(b"{}"),
        )
    }

    fn death(message: &Message, index: usize) -> FieldTable {
        match message.headers().unwrap().inner().get("x-death") {
            Some(AMQPValue::FieldArray(array)) => match &array.as_slice()[index] {
                AMQPValue::FieldTable(table) => table.clone(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn x_death_counts_per_queue_and_reason_and_drops_expiration() {
        let original = message(BasicProperties::default().with_expiration("5000".into()).with_message_id("m".into()));
        let once = dead_lettered(&original, "email", DeathReason::Expired, 7_000, 0, "dlx", "dead");
        assert_eq!(once.exchange, "dlx");
        assert_eq!(once.routing_key, "dead");
        assert!(once.full_properties().expiration().is_none());
        assert_eq!(once.message_id(), Some("m"));
        let entry = death(&once, 0);
        assert_eq!(entry.inner().get("count"), Some(&AMQPValue::LongLongInt(1)));
        assert_eq!(entry.inner().get("time"), Some(&AMQPValue::Timestamp(7)));
        assert_eq!(entry.inner().get("original-expiration").and_then(crate::settings::text).as_deref(), Some("5000"));
        let twice = dead_lettered(&once, "email", DeathReason::Expired, 8_000, 3, "dlx", "dead");
        assert_eq!(death(&twice, 0).inner().get("count"), Some(&AMQPValue::LongLongInt(2)));
        let other = dead_lettered(&twice, "payment", DeathReason::Rejected, 9_000, 1, "dlx", "dead");
        assert_eq!(death(&other, 0).inner().get("reason").and_then(crate::settings::text).as_deref(), Some("rejected"));
        assert_eq!(death(&other, 1).inner().get("count"), Some(&AMQPValue::LongLongInt(2)));
        let headers = other.headers().unwrap().inner();
        assert_eq!(headers.get("x-first-death-queue").and_then(crate::settings::text).as_deref(), Some("email"));
        assert_eq!(headers.get("x-last-death-queue").and_then(crate::settings::text).as_deref(), Some("payment"));
        assert_eq!(headers.get("x-delivery-count"), Some(&AMQPValue::LongLongInt(1)));
        assert!(closes_cycle(&twice, "email"), "expired back into the same queue");
        assert!(!closes_cycle(&other, "email"), "a rejection breaks the cycle");
    }
}
