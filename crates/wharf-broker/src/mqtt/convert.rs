//! MQTT messages as AMQP messages and back, as RabbitMQ's MQTT plugin maps them
//! (`mc_mqtt.erl`): QoS 1 and 2 are persistent (delivery mode 2) and QoS 0 is not; content type,
//! correlation data and message expiry have AMQP properties of their own; the response topic
//! travels as the `x-reply-to-topic` header (as a routing key); user properties are headers.
//! Wharf adds headers RabbitMQ has no need for: `x-mqtt-publish-qos` on QoS 2 publishes, so a
//! QoS 2 subscriber receives them at QoS 2; `x-mqtt-retain` on publishes with the retain flag,
//! for retain-as-published subscriptions; and `x-mqtt-publisher` (the client id) once some
//! session subscribed with no-local; `x-mqtt-qos2-flow` on a persistent session's QoS 2
//! publishes, for recovery (`state.rs`). None of them becomes an MQTT 5.0 user property.

use bytes::Bytes;
use std::sync::Arc;
use wharf_model::Message;
use wharf_mqtt::{Properties, Publish, QoS, topic};
use wharf_wire::protocol::BasicProperties;
use wharf_wire::types::{AMQPValue, FieldTable, LongString, ShortString};

/// The header carrying the QoS of a QoS 2 publish.
pub(super) const PUBLISH_QOS_HEADER: &str = "x-mqtt-publish-qos";
/// The header carrying a response topic, as an AMQP routing key (RabbitMQ's name).
const REPLY_TO_TOPIC_HEADER: &str = "x-reply-to-topic";
/// Correlation data that is not a short string (binary, or over 255 bytes), as RabbitMQ keeps it.
const CORRELATION_ID_HEADER: &str = "x-correlation-id";
/// The publishing client id, for no-local subscriptions (added only once one exists).
const PUBLISHER_HEADER: &str = "x-mqtt-publisher";
/// A publish sent with the retain flag, for retain-as-published subscriptions.
const RETAIN_HEADER: &str = "x-mqtt-retain";

/// The AMQP message for an MQTT publish (the topic already resolved from any alias); a
/// `retained` one is a copy of a retained message for a new subscription. `publisher` is the
/// client id, given when some session has a no-local subscription; `flow_marker` that of a
/// persistent session's QoS 2 publish.
pub(super) fn message_from_publish(
    exchange: &str,
    routing_key: String,
    publish: &Publish,
    retained: bool,
    publisher: Option<&str>,
    flow_marker: Option<&str>,
) -> Message {
    let mut properties =
        BasicProperties::default().with_delivery_mode(if publish.qos == QoS::AtMostOnce { 1 } else { 2 });
    let mut headers = FieldTable::default();
    if publish.qos == QoS::ExactlyOnce {
        headers.insert(PUBLISH_QOS_HEADER.into(), AMQPValue::ShortShortUInt(2));
    }
    if retained {
        headers.insert(super::retained::RETAINED_HEADER.into(), AMQPValue::Boolean(true));
    } else if publish.retain {
        headers.insert(RETAIN_HEADER.into(), AMQPValue::Boolean(true));
    }
    if let Some(client_id) = publisher {
        headers.insert(PUBLISHER_HEADER.into(), AMQPValue::LongString(client_id.into()));
    }
    let given = &publish.properties;
    if let Some(content_type) = given.content_type.as_deref().filter(|text| text.len() <= 255 && text.is_ascii()) {
        properties = properties.with_content_type(content_type.into());
    }
    if let Some(data) = &given.correlation_data {
        match std::str::from_utf8(data) {
            Ok(text) if text.len() <= 255 => properties = properties.with_correlation_id(text.into()),
            _ => {
                headers.insert(CORRELATION_ID_HEADER.into(), AMQPValue::LongString(LongString::from(data.to_vec())));
            }
        }
    }
    if let Some(response_topic) = &given.response_topic {
        headers.insert(REPLY_TO_TOPIC_HEADER.into(), AMQPValue::LongString(topic::to_amqp(response_topic).into()));
    }
    if let Some(expiry_s) = given.message_expiry_interval_s {
        properties = properties.with_expiration(ShortString::from((u64::from(expiry_s) * 1000).to_string()));
    }
    for (name, value) in &given.user_properties {
        // An AMQP header name is a short string; a longer name cannot be carried. The flow
        // marker's name is the broker's own: a user property cannot set or remove it.
        if name.len() <= 255 && name != super::state::FLOW_HEADER {
            headers.insert(name.as_str().into(), AMQPValue::LongString(value.as_str().into()));
        }
    }
    if let Some(marker) = flow_marker {
        headers.insert(super::state::FLOW_HEADER.into(), AMQPValue::LongString(marker.into()));
    }
    if !headers.inner().is_empty() {
        properties = properties.with_headers(headers);
    }
    let raw_properties = wharf_wire::frame::encode_properties(&properties);
    // The payload is a slice of the connection's read buffer: copied, so a queued message does
    // not keep the buffer's whole chunk (16 KiB) alive, as the AMQP path copies a body.
    let body = Bytes::copy_from_slice(&publish.payload);
    Message::new(exchange.to_owned(), routing_key, Arc::new(properties), raw_properties, body)
}

/// What a delivered message says about itself for MQTT: the QoS it was published with (an AMQP
/// message: 1 if persistent, else 0) and its 5.0 properties.
pub(super) struct Outward {
    pub qos: QoS,
    /// A retained message's copy for a new subscription: sent with the retain flag.
    pub retained: bool,
    /// It was published with the retain flag (kept for retain-as-published subscriptions).
    pub published_retained: bool,
    /// The MQTT client that published it, if it was told.
    pub publisher: Option<String>,
    pub properties: Properties,
}

/// Reads an AMQP message's properties for delivery over MQTT.
pub(super) fn outgoing(message: &Message, v5: bool) -> Outward {
    let full = message.full_properties();
    let headers = full.headers().as_ref();
    let header = |name: &str| headers.and_then(|table| table.inner().get(name));
    let qos = match header(PUBLISH_QOS_HEADER) {
        Some(AMQPValue::ShortShortUInt(2)) => QoS::ExactlyOnce,
        _ if full.delivery_mode() == &Some(2) => QoS::AtLeastOnce,
        _ => QoS::AtMostOnce,
    };
    let retained = matches!(header(super::retained::RETAINED_HEADER), Some(AMQPValue::Boolean(true)));
    let published_retained = matches!(header(RETAIN_HEADER), Some(AMQPValue::Boolean(true)));
    let publisher = match header(PUBLISHER_HEADER) {
        Some(AMQPValue::LongString(text)) => String::from_utf8(text.as_bytes().to_vec()).ok(),
        _ => None,
    };
    let mut properties = Properties::default();
    if !v5 {
        return Outward { qos, retained, published_retained, publisher, properties };
    }
    properties.content_type = full.content_type().as_ref().map(|text| text.as_str().to_owned());
    properties.correlation_data = match (full.correlation_id(), header(CORRELATION_ID_HEADER)) {
        (Some(id), _) => Some(Bytes::copy_from_slice(id.as_str().as_bytes())),
        (None, Some(AMQPValue::LongString(data))) => Some(Bytes::copy_from_slice(data.as_bytes())),
        _ => None,
    };
    if let Some(AMQPValue::LongString(key)) = header(REPLY_TO_TOPIC_HEADER) {
        properties.response_topic = std::str::from_utf8(key.as_bytes()).ok().map(topic::to_mqtt);
    }
    properties.message_expiry_interval_s = full
        .expiration()
        .as_ref()
        .and_then(|text| text.as_str().parse::<u64>().ok())
        .map(|expiry_ms| u32::try_from(expiry_ms.div_ceil(1000)).unwrap_or(u32::MAX));
    if let Some(table) = headers {
        for (name, value) in table.inner() {
            let name = name.as_str();
            let own = [
                PUBLISH_QOS_HEADER,
                REPLY_TO_TOPIC_HEADER,
                CORRELATION_ID_HEADER,
                super::retained::RETAINED_HEADER,
                RETAIN_HEADER,
                PUBLISHER_HEADER,
                super::state::FLOW_HEADER,
            ];
            // Nor are dead-lettering's summaries (a delayed will comes by dead-lettering).
            if own.contains(&name) || name.starts_with("x-first-death-") || name.starts_with("x-last-death-") {
                continue;
            }
            // Text, numbers and booleans become user properties; tables, arrays and binary do not
            // (as RabbitMQ).
            let text = match value {
                AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok().map(str::to_owned),
                AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
                AMQPValue::Boolean(flag) => Some(flag.to_string()),
                AMQPValue::ShortShortInt(number) => Some(number.to_string()),
                AMQPValue::ShortShortUInt(number) => Some(number.to_string()),
                AMQPValue::ShortInt(number) => Some(number.to_string()),
                AMQPValue::ShortUInt(number) => Some(number.to_string()),
                AMQPValue::LongInt(number) => Some(number.to_string()),
                AMQPValue::LongUInt(number) => Some(number.to_string()),
                AMQPValue::LongLongInt(number) => Some(number.to_string()),
                AMQPValue::Timestamp(number) => Some(number.to_string()),
                _ => None,
            };
            if let Some(text) = text.filter(|text| !text.contains('\0')) {
                properties.user_properties.push((name.to_owned(), text));
            }
        }
    }
    Outward { qos, retained, published_retained, publisher, properties }
}
