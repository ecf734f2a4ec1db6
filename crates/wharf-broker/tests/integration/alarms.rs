//! Memory and disk alarms, as RabbitMQ raises them: a connection that publishes while an alarm is
//! raised gets `connection.blocked` (having announced the capability) and is not read from; a
//! consumer on another connection keeps draining; when the alarm clears, `connection.unblocked`
//! comes and what the blocked client sent meanwhile is answered. The hand-driven client sees
//! the frames in the order the server sends them.

use crate::bad_input::{Raw, publish_frames};
use crate::common::*;
use bytes::BytesMut;
use lapin::options::*;
use lapin::types::FieldTable;
use std::sync::Arc;
use wharf_broker::{AlarmState, FixedDiskSpace};
use wharf_wire::frame;
use wharf_wire::protocol::{AMQPClass, BasicProperties, basic, connection, queue, tx};

const BODY_BYTES: usize = 30_000;

/// A client that announces `connection.blocked`, logged in, with channel 1 open.
async fn capable_publisher(broker: &TestBroker) -> Raw {
    let mut raw = Raw::connect(broker).await;
    raw.client_properties = crate::bad_input::modern_client_properties(&["connection.blocked"]);
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    raw.open_channel(1).await;
    raw
}

fn passive_declare() -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: "q".into(),
        passive: true,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

/// Waits for `queue.declare-ok` and returns its message count.
async fn declare_ok(raw: &mut Raw) -> u32 {
    match raw.next_method().await {
        Some(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) => ok.message_count,
        other => panic!("expected queue.declare-ok, got {other:?}"),
    }
}

/// Publishes, is blocked with `reason`, watches a consumer drain the queue, clears the alarm with
/// `clear`, and sees `connection.unblocked` and then the answer to what it sent while blocked.
async fn publisher_is_blocked_until_the_alarm_clears(
    broker: &TestBroker,
    raw: &mut Raw,
    reason: &str,
    queued: usize,
    clear: impl FnOnce(),
) {
    raw.send(&publish_frames(1, &[7; BODY_BYTES], false)).await;
    match raw.next_method().await {
        Some(AMQPClass::Connection(connection::AMQPMethod::Blocked(blocked))) => {
            assert_eq!(blocked.reason.as_str(), reason)
        }
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    // Sent while blocked: the server does not read it yet.
    raw.send_method(1, passive_declare()).await;
    // Consumers on other connections keep draining meanwhile.
    let consumer_connection = broker.connect().await;
    let channel = consumer_connection.create_channel().await.unwrap();
    let mut deliveries = consumer(&channel, "q").await;
    for _ in 0..queued + 1 {
        let delivery = next(&mut deliveries).await;
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    clear();
    // The acks above are settled once the channel answers a later method.
    channel.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    assert_eq!(broker.broker().check_alarms().await, AlarmState::default());
    match raw.next_method().await {
        Some(AMQPClass::Connection(connection::AMQPMethod::Unblocked(_))) => {}
        other => panic!("expected connection.unblocked, got {other:?}"),
    }
    assert_eq!(declare_ok(raw).await, 0, "answered once reading resumed, after the drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_alarm_blocks_publishers_and_consumers_drain_until_it_clears() {
    let broker = TestBroker::start_with(|config| config.memory_high_watermark_bytes = 2 * BODY_BYTES as u64 + 1).await;
    let admin = broker.connect().await.create_channel().await.unwrap();
    admin.queue_declare("q".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let mut raw = capable_publisher(&broker).await;
    for _ in 0..3 {
        raw.send(&publish_frames(1, &[7; BODY_BYTES], false)).await;
    }
    raw.send_method(1, passive_declare()).await;
    assert_eq!(declare_ok(&mut raw).await, 3);
    // Transient bodies in memory count: 90,000 bytes against a watermark of 60,001.
    assert_eq!(broker.broker().check_alarms().await, AlarmState { memory: true, disk: false });
    publisher_is_blocked_until_the_alarm_clears(&broker, &mut raw, "low on memory", 3, || {}).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_alarm_blocks_publishers_until_space_comes_back() {
    let disk = FixedDiskSpace::new(u64::MAX);
    let space = Arc::clone(&disk);
    let broker = TestBroker::start_with(move |config| {
        config.disk_space = space;
        config.disk_free_limit_bytes = Some(1_000_000);
    })
    .await;
    let admin = broker.connect().await.create_channel().await.unwrap();
    admin.queue_declare("q".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let mut raw = capable_publisher(&broker).await;
    disk.set(999_999);
    assert_eq!(broker.broker().check_alarms().await, AlarmState { memory: false, disk: true });
    publisher_is_blocked_until_the_alarm_clears(&broker, &mut raw, "low on disk", 0, || disk.set(1_000_000)).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_bodies_count_against_the_memory_watermark_until_they_finish() {
    let broker = TestBroker::start_with(|config| config.memory_high_watermark_bytes = 100_000).await;
    let mut raw = capable_publisher(&broker).await;
    // A publish announcing 200,000 bytes of body, of which 150,000 are sent.
    let body = vec![1u8; 200_000];
    let mut frames = BytesMut::new();
    let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "".into(),
        routing_key: "nowhere".into(),
        mandatory: false,
        immediate: false,
    }));
    frame::encode_method(&mut frames, 1, &publish).unwrap();
    let properties = frame::encode_properties(&BasicProperties::default());
    frame::encode_content_header(&mut frames, 1, body.len() as u64, &properties);
    frame::encode_body(&mut frames, 1, &body[..150_000], frame::FRAME_MIN_SIZE);
    raw.send(&frames).await;
    raw.open_channel(2).await; // open-ok: everything sent before is handled
    assert!(broker.broker().check_alarms().await.memory, "the unfinished body is counted");
    // The rest arrives: the message is complete (and unroutable, so dropped); nothing is held.
    let mut rest = BytesMut::new();
    frame::encode_body(&mut rest, 1, &body[150_000..], frame::FRAME_MIN_SIZE);
    raw.send(&rest).await;
    raw.open_channel(3).await; // open-ok: everything sent before is handled
    assert!(!broker.broker().check_alarms().await.memory, "a finished body is no longer counted");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_connections_own_transaction_cannot_hold_the_alarm_up() {
    let broker = TestBroker::start_with(|config| config.memory_high_watermark_bytes = 2 * BODY_BYTES as u64 + 1).await;
    let admin = broker.connect().await.create_channel().await.unwrap();
    admin.queue_declare("q".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let mut raw = capable_publisher(&broker).await;
    raw.send_method(1, AMQPClass::Tx(tx::AMQPMethod::Select(tx::Select {}))).await;
    assert!(matches!(raw.next_method().await, Some(AMQPClass::Tx(tx::AMQPMethod::SelectOk(_)))));
    // Three uncommitted publishes: 90,000 bytes in the transaction's buffer, over the watermark.
    for _ in 0..3 {
        raw.send(&publish_frames(1, &[7; BODY_BYTES], false)).await;
    }
    raw.open_channel(2).await; // open-ok: everything sent before is handled
    assert!(broker.broker().check_alarms().await.memory, "the transaction's buffer is counted");
    // The next publish blocks the connection; what it holds can no longer grow, and only frames
    // it cannot send would free it: it leaves the account, and the alarm clears.
    raw.send(&publish_frames(1, &[7; 10], false)).await;
    assert!(matches!(raw.next_method().await, Some(AMQPClass::Connection(connection::AMQPMethod::Blocked(_)))));
    assert_eq!(broker.broker().check_alarms().await, AlarmState::default());
    assert!(matches!(raw.next_method().await, Some(AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)))));
    // Reading resumed: the transaction commits, and the queue has all four.
    raw.send_method(1, AMQPClass::Tx(tx::AMQPMethod::Commit(tx::Commit {}))).await;
    assert!(matches!(raw.next_method().await, Some(AMQPClass::Tx(tx::AMQPMethod::CommitOk(_)))));
    raw.send_method(1, passive_declare()).await;
    assert_eq!(declare_ok(&mut raw).await, 4);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_deliveries_still_count_until_they_are_acked() {
    let broker = TestBroker::start_with(|config| config.memory_high_watermark_bytes = 2 * BODY_BYTES as u64 + 1).await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel.queue_declare("q".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for _ in 0..3 {
        let confirm = channel
            .basic_publish("".into(), "q".into(), BasicPublishOptions::default(), &[7; BODY_BYTES], Default::default())
            .await
            .unwrap();
        confirm.await.unwrap();
    }
    let mut deliveries = consumer(&channel, "q").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next(&mut deliveries).await);
    }
    assert!(broker.broker().check_alarms().await.memory, "delivered but not acked: still in memory");
    for delivery in held {
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    channel.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    assert!(!broker.broker().check_alarms().await.memory, "acked: gone");
    broker.stop().await;
}
