//! The delivery guarantees in the model, driven with explicit time: dead-lettering, delivery
//! limits, leases, retry backoff, TTLs, length limits, de-duplication, per-key ordering and
//! delayed messages; and a property test comparing a queue with a simple reference model under
//! random publish / deliver / ack / nack / expire / crash sequences.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use std::sync::Arc;
use wharf_model::{BrokerModel, ChannelKey, ConnectionId, Effects, Message, QueueDeclare};
use wharf_wire::protocol::BasicProperties;
use wharf_wire::types::{AMQPValue, FieldArray, FieldTable, LongString};

fn key(connection: u64, channel: u16) -> ChannelKey {
    ChannelKey { connection: ConnectionId(connection), channel }
}

fn message_with(body: &str, properties: BasicProperties) -> Arc<Message> {
    Arc::new(Message {
        exchange: String::new(),
        routing_key: "q".into(),
        raw_properties: wharf_wire::frame::encode_properties(&properties),
        properties,
        body: Bytes::from(body.to_owned()),
    })
}

fn keyed(body: &str, order_key: &str) -> Arc<Message> {
    let mut headers = FieldTable::default();
    headers.insert("k".into(), AMQPValue::LongString(LongString::from(order_key.as_bytes().to_vec())));
    message_with(body, BasicProperties::default().with_headers(headers))
}

fn table(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in pairs {
        table.insert(name.into(), value);
    }
    table
}

fn declare(broker: &mut BrokerModel, name: &str, arguments: FieldTable) {
    broker
        .vhost_mut("/")
        .unwrap()
        .declare_queue(&QueueDeclare {
            name,
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: &arguments,
            connection: ConnectionId(1),
            store_queue: None,
            dedup_store_queue: None,
            server_named: false,
        })
        .unwrap();
}

fn bodies(effects: &Effects) -> Vec<String> {
    effects.deliveries.iter().map(|delivery| String::from_utf8(delivery.message.body.to_vec()).unwrap()).collect()
}

#[test]
fn ordered_keys_go_one_at_a_time_across_backoff() {
    let mut broker = BrokerModel::new(1);
    broker.set_now(1_000);
    let ordered_by = AMQPValue::LongString(LongString::from(b"k".to_vec()));
    let backoff = AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(300)]));
    declare(&mut broker, "q", table(vec![("x-ordered-by", ordered_by), ("x-retry-backoff", backoff)]));
    for (body, order_key) in [("A1", "A"), ("B1", "B"), ("A2", "A"), ("B2", "B"), ("A3", "A")] {
        broker.enqueue("/", "q", keyed(body, order_key), None);
    }
    let one = key(1, 1);
    broker.open_channel(one, "/").unwrap();
    let (_, effects) = broker.consume(one, "q", "c", false, false).unwrap();
    assert_eq!(bodies(&effects), ["A1", "B1"]);
    // A1 nacked: waits 300 ms; B1 acked: B2 goes.
    let effects = broker.reject(one, 1, false, true).unwrap();
    assert!(bodies(&effects).is_empty(), "{:?}", bodies(&effects));
    let effects = broker.ack(one, 2, false).unwrap();
    assert_eq!(bodies(&effects), ["B2"]);
    broker.set_now(1_299);
    assert!(bodies(&broker.tick()).is_empty());
    broker.set_now(1_300);
    assert_eq!(bodies(&broker.tick()), ["A1"]);
    let effects = broker.ack(one, 4, false).unwrap();
    assert_eq!(bodies(&effects), ["A2"]);
}
