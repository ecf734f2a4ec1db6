//! The protocol corners where RabbitMQ's behaviour differs from a strict reading of the
//! specification and clients rely on RabbitMQ's: older protocol headers, a body frame whose
//! payload is exactly `frame_max`, `connection.update-secret`, closes that cross, and
//! `channel_max` counting open channels rather than bounding their numbers.

use crate::bad_input::Raw;
use crate::common::TestBroker;
use bytes::{BufMut, BytesMut};
use wharf_wire::frame::{FRAME_MIN_SIZE, encode_content_header, encode_method, encode_properties};
use wharf_wire::protocol::{AMQPClass, BasicProperties, basic, channel, connection, queue};
use wharf_wire::types::FieldTable;

/// A plain `queue.declare` of `name`.
fn declare_method(name: &str) -> AMQPClass {
    let declare = queue::Declare {
        queue: name.into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    };
    AMQPClass::Queue(queue::AMQPMethod::Declare(declare))
}

async fn declare(raw: &mut Raw, channel: u16, name: &str) {
    raw.send_method(channel, declare_method(name)).await;
    assert!(matches!(raw.next_method().await, Some(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_)))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_0_9_and_0_8_protocol_headers_are_accepted_and_spoken_as_0_9_1() {
    let broker = TestBroker::start().await;
    for (header, version) in [(*b"AMQP\x01\x01\x00\x09", (0, 9)), (*b"AMQP\x01\x01\x08\x00", (8, 0))] {
        let mut raw = Raw::connect(&broker).await;
        raw.protocol_header = header;
        assert!(raw.handshake("guest", "guest", 0).await.is_none(), "the handshake completes");
        let start = raw.start.take().unwrap();
        assert_eq!((start.version_major, start.version_minor), version, "connection.start names the version asked for");
        raw.open_channel(1).await;
        declare(&mut raw, 1, "older-header").await;
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_frame_with_a_payload_of_exactly_frame_max_bytes_is_accepted() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake_frame_max("guest", "guest", FRAME_MIN_SIZE).await.is_none());
    raw.open_channel(1).await;
    declare(&mut raw, 1, "full-frames").await;
    // Two body frames of frame_max payload bytes each (8 bytes over frame_max in all, as several
    // clients size them), then basic.get reads the message back whole.
    let body: Vec<u8> = (0..2 * FRAME_MIN_SIZE).map(|index| index as u8).collect();
    let mut frames = BytesMut::new();
    let publish =
        basic::Publish { exchange: "".into(), routing_key: "full-frames".into(), mandatory: false, immediate: false };
    encode_method(&mut frames, 1, &AMQPClass::Basic(basic::AMQPMethod::Publish(publish))).unwrap();
    encode_content_header(&mut frames, 1, body.len() as u64, &encode_properties(&BasicProperties::default()));
    for chunk in body.chunks(FRAME_MIN_SIZE as usize) {
        frames.put_u8(3);
        frames.put_u16(1);
        frames.put_u32(chunk.len() as u32);
        frames.put_slice(chunk);
        frames.put_u8(0xCE);
    }
    raw.send(&frames).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get { queue: "full-frames".into(), no_ack: true })),
    )
    .await;
    let mut received = Vec::new();
    loop {
        match raw.next().await.expect("connection stays open") {
            wharf_wire::Frame::Method { method, .. } => match *method {
                AMQPClass::Basic(basic::AMQPMethod::GetOk(_)) => {}
                other => panic!("expected basic.get-ok, got {other:?}"),
            },
            wharf_wire::Frame::Header { header, .. } => assert_eq!(header.body_size, body.len() as u64),
            wharf_wire::Frame::Body { payload, .. } => {
                received.extend_from_slice(&payload);
                if received.len() == body.len() {
                    break;
                }
            }
            wharf_wire::Frame::Heartbeat => {}
        }
    }
    assert_eq!(received, body);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_secret_is_answered_and_the_connection_goes_on() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    let update = connection::UpdateSecret { new_secret: "guest".into(), reason: "token refresh".into() };
    raw.send_method(0, AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(update))).await;
    assert!(matches!(raw.next_method().await, Some(AMQPClass::Connection(connection::AMQPMethod::UpdateSecretOk(_)))));
    raw.open_channel(1).await;
    declare(&mut raw, 1, "after-update-secret").await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_closed_by_both_sides_at_once_can_be_reopened_at_once() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    raw.open_channel(1).await;
    // An unknown delivery tag makes the server close channel 1; the client closes it too before
    // it has read the server's close, so the two closes cross.
    let ack = basic::Ack { delivery_tag: 99, multiple: false };
    raw.send_method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(ack))).await;
    let close = channel::Close { reply_code: 200, reply_text: "bye".into(), class_id: 0, method_id: 0 };
    raw.send_method(1, AMQPClass::Channel(channel::AMQPMethod::Close(close))).await;
    raw.expect_channel_close(406).await;
    raw.send_method(1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}))).await;
    assert!(matches!(raw.next_method().await, Some(AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)))));
    // The same number opens again at once: the stray close-ok is not an error.
    raw.open_channel(1).await;
    declare(&mut raw, 1, "reopened").await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_max_counts_open_channels_and_does_not_bound_their_numbers() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    // The test client asks for channel_max 16.
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    raw.open_channel(2000).await;
    for number in 1..16 {
        raw.open_channel(number).await;
    }
    raw.send_method(17, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await;
    let text = raw.expect_connection_close(530).await;
    assert!(text.contains("channel_max (16)"), "{text}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_is_explained_only_to_clients_that_announce_authentication_failure_close() {
    let broker = TestBroker::start().await;
    let mut modern = Raw::connect(&broker).await;
    let close = modern.handshake("guest", "wrong", 0).await.expect("refused with a close");
    assert_eq!(close.reply_code, 403);
    // Without the capability RabbitMQ closes the socket without a word; so does Wharf.
    let mut older = Raw::connect(&broker).await;
    older.client_properties = FieldTable::default();
    older.send(&older.protocol_header.clone()).await;
    assert!(matches!(older.next_method().await, Some(AMQPClass::Connection(connection::AMQPMethod::Start(_)))));
    let start_ok = connection::StartOk {
        client_properties: FieldTable::default(),
        mechanism: "PLAIN".into(),
        response: "\0guest\0wrong".into(),
        locale: "en_US".into(),
    };
    older.send_method(0, AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok))).await;
    assert!(older.next().await.is_none(), "the socket ends without connection.close");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_queue_cancels_consumers_only_for_clients_that_announce_consumer_cancel_notify() {
    let broker = TestBroker::start().await;
    for notify in [true, false] {
        let mut raw = Raw::connect(&broker).await;
        if !notify {
            raw.client_properties = FieldTable::default();
        }
        assert!(raw.handshake("guest", "guest", 0).await.is_none());
        raw.open_channel(1).await;
        declare(&mut raw, 1, "doomed").await;
        let consume = basic::Consume {
            queue: "doomed".into(),
            consumer_tag: "watcher".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        };
        raw.send_method(1, AMQPClass::Basic(basic::AMQPMethod::Consume(consume))).await;
        assert!(matches!(raw.next_method().await, Some(AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_)))));
        let delete = queue::Delete { queue: "doomed".into(), if_unused: false, if_empty: false, nowait: false };
        raw.send_method(1, AMQPClass::Queue(queue::AMQPMethod::Delete(delete))).await;
        // delete-ok comes first (RabbitMQ's order: py-amqp raises out of queue_delete() if the
        // cancel of its own consumer comes before it), then the cancel if the client asked for
        // it; a declare sent now shows whether one came in between.
        assert!(matches!(raw.next_method().await, Some(AMQPClass::Queue(queue::AMQPMethod::DeleteOk(_)))));
        raw.send_method(1, declare_method("marker")).await;
        match raw.next_method().await {
            Some(AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel))) => {
                assert!(notify, "basic.cancel sent to a client that did not ask for it");
                assert_eq!(cancel.consumer_tag.as_str(), "watcher");
                assert!(matches!(raw.next_method().await, Some(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_)))));
            }
            Some(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_))) => assert!(!notify, "no basic.cancel was sent"),
            other => panic!("unexpected {other:?}"),
        }
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_client_close_the_connection_answers_every_further_close_and_drops_other_frames() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    raw.open_channel(1).await;
    let close = || {
        let close = connection::Close { reply_code: 200, reply_text: "bye".into(), class_id: 0, method_id: 0 };
        AMQPClass::Connection(connection::AMQPMethod::Close(close))
    };
    // Several threads of a client closing at once, and a publish still being written after the
    // close: every close gets its close-ok, the rest is dropped without an error.
    raw.send_method(0, close()).await;
    raw.send(&crate::bad_input::publish_frames(1, b"late", false)).await;
    raw.send_method(0, close()).await;
    for _ in 0..2 {
        assert!(matches!(raw.next_method().await, Some(AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)))));
    }
    raw.shutdown().await;
    assert!(raw.next().await.is_none(), "the server ends once the client has closed its side");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_channel_cannot_be_reopened_before_its_close_ok() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    raw.open_channel(1).await;
    let ack = basic::Ack { delivery_tag: 99, multiple: false };
    raw.send_method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(ack))).await;
    raw.expect_channel_close(406).await;
    raw.send_method(1, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await;
    let text = raw.expect_connection_close(504).await;
    assert!(text.contains("second 'channel.open' seen"), "{text}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_ok_the_server_did_not_ask_for_is_an_error_as_in_rabbitmq() {
    let broker = TestBroker::start().await;
    // On a channel that was never opened: 504.
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    raw.send_method(3, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}))).await;
    let text = raw.expect_connection_close(504).await;
    assert!(text.contains("expected 'channel.open'"), "{text}");
    // On an open channel the server did not close: 503.
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    raw.open_channel(1).await;
    raw.send_method(1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}))).await;
    raw.expect_connection_close(503).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_recover_without_requeue_is_refused_with_540_and_no_recover_ok() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    raw.open_channel(1).await;
    raw.send_method(1, AMQPClass::Basic(basic::AMQPMethod::Recover(basic::Recover { requeue: false }))).await;
    match raw.next_method().await {
        Some(AMQPClass::Connection(connection::AMQPMethod::Close(close))) => {
            assert_eq!(close.reply_code, 540);
            assert_eq!(close.reply_text.as_str(), "NOT_IMPLEMENTED - requeue=false");
        }
        other => panic!("expected connection.close 540 first, got {other:?}"),
    }
    broker.stop().await;
}
