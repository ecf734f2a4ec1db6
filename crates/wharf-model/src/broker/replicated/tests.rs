//! A channel with consumers on a classic and a quorum queue: one sequence of delivery tags for
//! both; settling a quorum queue's delivery (ack, nack, reject, `multiple`) becomes a settle op
//! and leaves the model's queues alone; consume, cancel and a closed channel become checkout,
//! cancel and down ops; a no-ack consumer's delivery is settled at once.

use super::*;
use crate::message::Message;
use crate::queue::ConnectionId;
use crate::vhost::QueueDeclare;
use bytes::Bytes;
use wharf_wire::protocol::BasicProperties;
use wharf_wire::types::FieldTable;

const CHANNEL: ChannelKey = ChannelKey { connection: ConnectionId(1), channel: 1 };

fn message(body: &str) -> Arc<Message> {
    Arc::new(Message::new(
        String::new(),
        "q".into(),
        Arc::new(BasicProperties::default()),
        Bytes::new(),
        Bytes::from(body.to_owned()),
    ))
}

/// A broker with a classic queue `classic` and a quorum queue `quorum`, and channel 1 open.
fn broker() -> BrokerModel {
    broker_with(&FieldTable::default())
}

/// The same, both queues declared with `arguments`.
fn broker_with(arguments: &FieldTable) -> BrokerModel {
    let mut broker = BrokerModel::new(1);
    for name in ["classic", "quorum"] {
        let declare = QueueDeclare {
            name,
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments,
            connection: ConnectionId(1),
            server_named: false,
            store_log: None,
            dedup_log: None,
        };
        broker.vhost_mut("/").unwrap().declare_queue(&declare).unwrap();
    }
    broker.vhost_mut("/").unwrap().queue_mut("quorum").unwrap().replicated = true;
    broker.open_channel(CHANNEL, "/").unwrap();
    broker
}

fn from_group(tag: &str, id: u64, redelivered: bool) -> ReplicatedDelivery {
    ReplicatedDelivery {
        vhost: "/".into(),
        channel: CHANNEL,
        tag: tag.to_owned(),
        queue: "quorum".into(),
        id,
        message: message("m"),
        delivery_count: 1 + u32::from(redelivered),
        redelivered,
    }
}

fn settle(tag: &str, id: u64, outcome: ReplicatedOutcome) -> ReplicatedOp {
    ReplicatedOp::Settle { vhost: "/".into(), queue: "quorum".into(), channel: CHANNEL, tag: tag.into(), id, outcome }
}

#[test]
fn both_kinds_of_queue_share_the_channels_tags_and_a_multiple_ack() {
    let mut broker = broker();
    broker.qos(CHANNEL, 5, false).unwrap();
    let (_, effects) = broker.consume(CHANNEL, "quorum", "qc", false, false).unwrap();
    let checkout = ReplicatedOp::Checkout {
        vhost: "/".into(),
        queue: "quorum".into(),
        channel: CHANNEL,
        tag: "qc".into(),
        prefetch: 5,
    };
    assert_eq!(effects.replicated, vec![checkout]);
    broker.enqueue("/", "classic", message("c1"), None);
    let (_, effects) = broker.consume(CHANNEL, "classic", "cc", false, false).unwrap();
    assert_eq!(effects.deliveries.len(), 1);
    assert!(effects.replicated.is_empty());
    let (sent, effects) = broker.deliver_replicated(from_group("qc", 7, false));
    let sent = sent.unwrap();
    assert!(effects.replicated.is_empty());
    assert_eq!((sent.delivery_tag, sent.redelivered, sent.consumer_tag.as_deref()), (2, false, Some("qc")));
    let (sent, _) = broker.deliver_replicated(from_group("qc", 8, true));
    assert_eq!((sent.unwrap().delivery_tag), 3);
    broker.check_invariants();
    // One ack with `multiple` settles all three: the classic one in the model, the others as ops.
    let effects = broker.ack(CHANNEL, 3, true).unwrap();
    assert_eq!(effects.removed.len(), 1);
    assert_eq!(
        effects.replicated,
        vec![settle("qc", 7, ReplicatedOutcome::Settled), settle("qc", 8, ReplicatedOutcome::Settled)]
    );
    broker.check_invariants();
}

#[test]
fn nacks_and_rejects_say_whether_the_message_goes_back() {
    let mut broker = broker();
    broker.consume(CHANNEL, "quorum", "qc", false, false).unwrap();
    for id in [1, 2] {
        broker.deliver_replicated(from_group("qc", id, false));
    }
    let effects = broker.reject(CHANNEL, 1, false, true).unwrap();
    assert_eq!(effects.replicated, vec![settle("qc", 1, ReplicatedOutcome::Returned)]);
    let effects = broker.reject(CHANNEL, 2, false, false).unwrap();
    assert_eq!(effects.replicated, vec![settle("qc", 2, ReplicatedOutcome::Discarded)]);
    // Settled once: the tag is gone.
    assert!(broker.ack(CHANNEL, 2, false).is_err());
}

#[test]
fn a_cancelled_consumer_settles_what_it_holds_and_a_closed_channel_is_down() {
    let mut broker = broker();
    broker.consume(CHANNEL, "quorum", "qc", false, false).unwrap();
    broker.deliver_replicated(from_group("qc", 1, false));
    broker.deliver_replicated(from_group("qc", 2, false));
    let effects = broker.cancel(CHANNEL, "qc").unwrap();
    let cancel = ReplicatedOp::Cancel { vhost: "/".into(), queue: "quorum".into(), channel: CHANNEL, tag: "qc".into() };
    assert_eq!(effects.replicated, vec![cancel]);
    // A delivery the group made before it saw the cancel finds no consumer: nothing is sent, and
    // the message goes back.
    let (sent, effects) = broker.deliver_replicated(from_group("qc", 3, false));
    assert!(sent.is_none());
    assert_eq!(effects.replicated, vec![settle("qc", 3, ReplicatedOutcome::Returned)]);
    assert_eq!(broker.ack(CHANNEL, 1, false).unwrap().replicated, vec![settle("qc", 1, ReplicatedOutcome::Settled)]);
    broker.consume(CHANNEL, "quorum", "other", false, false).unwrap();
    let effects = broker.close_channel(CHANNEL);
    let down =
        |tag: &str| ReplicatedOp::Down { vhost: "/".into(), queue: "quorum".into(), channel: CHANNEL, tag: tag.into() };
    assert_eq!(effects.replicated, vec![down("other"), down("qc")]);
    // A delivery the group made before it applied the down, or to a consumer it still counts by
    // a late checkout, finds no channel: the consumer is down again, so nothing stays held.
    let (sent, effects) = broker.deliver_replicated(from_group("qc", 5, false));
    assert!(sent.is_none());
    assert_eq!(effects.replicated, vec![down("qc")]);
    broker.check_invariants();
}

#[test]
fn a_no_ack_consumers_delivery_is_settled_as_it_goes_out() {
    let mut broker = broker();
    broker.consume(CHANNEL, "quorum", "qc", true, false).unwrap();
    let (sent, effects) = broker.deliver_replicated(from_group("qc", 4, false));
    assert_eq!(sent.unwrap().delivery_tag, 1);
    assert_eq!(effects.replicated, vec![settle("qc", 4, ReplicatedOutcome::Settled)]);
    assert!(broker.ack(CHANNEL, 1, false).is_err());
    broker.check_invariants();
}

#[test]
fn a_stand_in_is_never_expired_here_and_a_closed_channel_tells_the_queues_it_got_from() {
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), wharf_wire::types::AMQPValue::LongInt(1_000));
    let mut broker = broker_with(&arguments);
    broker.set_now(0);
    for name in ["classic", "quorum"] {
        broker.touch_queue("/", name);
    }
    // A get from the queue held elsewhere, answered or not: the channel's close says so.
    broker.touch_replicated(CHANNEL, "quorum");
    broker.set_now(10_000);
    broker.tick();
    let vhost = broker.vhost("/").unwrap();
    assert!(vhost.queue("classic").is_none(), "the unused classic queue expires");
    assert!(vhost.queue("quorum").is_some(), "a stand-in is deleted only where its queue is held");
    let effects = broker.close_channel(CHANNEL);
    assert_eq!(
        effects.replicated,
        vec![ReplicatedOp::Down { vhost: "/".into(), queue: "quorum".into(), channel: CHANNEL, tag: String::new() }]
    );
}
