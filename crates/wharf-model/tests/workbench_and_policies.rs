//! The model's side of the DLQ workbench (taking chosen messages out and putting them back) and
//! of policies and vhosts changed at run time, each operation followed by the model's invariant
//! check (`support::CheckedBroker`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use std::sync::Arc;
use support::CheckedBroker;
use wharf_model::{ApplyTo, ChannelKey, ConnectionId, Message, Policy, QueueDeclare, WithdrawRefusal};
use wharf_wire::protocol::BasicProperties;
use wharf_wire::types::{AMQPValue, FieldTable};

fn message(body: &str) -> Arc<Message> {
    let properties = BasicProperties::default().with_delivery_mode(2);
    Arc::new(Message::new(String::new(), "q".into(), Arc::new(properties), Bytes::new(), Bytes::from(body.to_owned())))
}

fn declare(broker: &mut CheckedBroker, vhost: &str, name: &str, arguments: &FieldTable) {
    broker
        .vhost_mut(vhost)
        .unwrap()
        .declare_queue(&QueueDeclare {
            name,
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments,
            connection: ConnectionId(1),
            store_log: Some(1),
            dedup_log: None,
            server_named: false,
        })
        .unwrap();
}

fn ids(broker: &CheckedBroker, vhost: &str, queue: &str) -> Vec<u64> {
    broker.vhost(vhost).unwrap().queue(queue).unwrap().movable_ids()
}

#[test]
fn a_withdrawn_message_leaves_its_queue_whole_and_a_reinstated_one_comes_back_in_its_place() {
    for traces in [0, 4] {
        let mut broker = CheckedBroker::new(3);
        broker.set_trace_events_max(traces);
        declare(&mut broker, "/", "dlq", &FieldTable::default());
        for (seq, body) in ["a", "b", "c"].into_iter().enumerate() {
            broker.enqueue("/", "dlq", message(body), Some(seq as u64 + 1));
        }
        let key = ChannelKey { connection: ConnectionId(9), channel: 1 };
        broker.open_channel(key, "/").unwrap();
        let (delivered, _) = broker.get(key, "dlq", false).unwrap();
        let delivered = delivered.unwrap();
        let held = ids(&broker, "/", "dlq");
        assert_eq!(held.len(), 2, "the delivered one is not movable");
        let unacked = (1..=3u64).find(|id| !held.contains(id)).unwrap();
        assert_eq!(broker.withdraw("/", "dlq", unacked).unwrap_err(), WithdrawRefusal::Unacknowledged);
        assert_eq!(broker.withdraw("/", "dlq", 999).unwrap_err(), WithdrawRefusal::NotFound);

        let taken = broker.withdraw("/", "dlq", held[0]).unwrap();
        assert_eq!(ids(&broker, "/", "dlq"), [held[1]]);
        assert_eq!(broker.withdraw("/", "dlq", held[0]).unwrap_err(), WithdrawRefusal::NotFound, "once only");
        // Not into another queue of the same name.
        let entry = broker.reinstate("/", "dlq", taken.incarnation + 1, taken.entry).unwrap_err();
        broker.reinstate("/", "dlq", taken.incarnation, entry).unwrap();
        assert_eq!(ids(&broker, "/", "dlq"), held, "back in its place");
        broker.ack(key, delivered.delivery_tag, false).unwrap();
    }
}

fn policy(name: &str, pattern: &str, definition: &[(&str, AMQPValue)]) -> Policy {
    let mut table = FieldTable::default();
    for (key, value) in definition {
        table.insert((*key).into(), value.clone());
    }
    Policy::new(name, pattern, ApplyTo::Queues, 0, table).unwrap()
}

#[test]
fn a_policy_set_at_run_time_trims_existing_queues_and_dead_letters_what_it_drops() {
    let mut broker = CheckedBroker::new(5);
    broker.set_trace_events_max(8);
    declare(&mut broker, "/", "orders", &FieldTable::default());
    for (seq, body) in ["1", "2", "3", "4"].into_iter().enumerate() {
        broker.enqueue("/", "orders", message(body), Some(seq as u64 + 1));
    }
    let limit = policy(
        "limit",
        "^orders$",
        &[("max-length", AMQPValue::LongLongInt(1)), ("dead-letter-exchange", AMQPValue::LongString("dlx".into()))],
    );
    let effects = broker.set_policies("/", vec![limit]);
    assert_eq!(ids(&broker, "/", "orders").len(), 1, "the oldest three are dropped at once");
    assert_eq!(effects.transfers.len(), 3, "and dead-lettered");
    assert!(effects.transfers.iter().all(|transfer| transfer.message.trace.is_some()), "with their traces");
    let queue = broker.vhost("/").unwrap().queue("orders").unwrap();
    assert_eq!(queue.settings.max_length, Some(1));
    broker.set_policies("/", Vec::new());
    assert_eq!(
        broker.vhost("/").unwrap().queue("orders").unwrap().settings.max_length,
        None,
        "a removed policy no longer applies"
    );
}

#[test]
fn removing_a_vhost_closes_its_channels_and_reports_every_queue_and_exchange() {
    let mut broker = CheckedBroker::new(6);
    broker.add_vhost("staging");
    declare(&mut broker, "staging", "jobs", &FieldTable::default());
    broker.enqueue("staging", "jobs", message("x"), Some(1));
    let key = ChannelKey { connection: ConnectionId(4), channel: 1 };
    broker.open_channel(key, "staging").unwrap();
    broker.consume(key, "jobs", "worker", false, false).unwrap();
    let effects = broker.remove_vhost("staging").unwrap();
    assert_eq!(effects.deleted_queues.len(), 1);
    assert!(effects.deleted_exchanges.iter().any(|deleted| deleted.exchange.name == "amq.direct"));
    assert!(broker.vhost("staging").is_none());
    assert!(broker.remove_vhost("staging").is_none());
    assert!(broker.ack(key, 1, false).is_err(), "its channel is gone");
}
