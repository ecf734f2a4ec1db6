//! Bad input over a raw socket: each gets the protocol's proper error, closes only what it must,
//! and leaves other connections and stored messages alone. Also heartbeats: a silent peer is
//! closed by the server.

use crate::common;

use bytes::{BufMut, BytesMut};
use common::TestBroker;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wharf_wire::frame::{self, FRAME_MIN_SIZE, encode_body, encode_content_header, encode_method, encode_properties};
use wharf_wire::protocol::{AMQPClass, BasicProperties as Properties, basic, channel, connection};
use wharf_wire::{Frame, FrameDecoder};

/// A hand-driven AMQP client, for sending what no well-behaved client would (and for seeing
/// exactly which frames the server sends, in order).
pub(crate) struct Raw {
    socket: TcpStream,
    buffer: BytesMut,
    decoder: FrameDecoder,
    /// Sent in `connection.start-ok` (capabilities, say).
    pub(crate) client_properties: FieldTable,
    /// What the handshake sends first (0-9-1's header unless a test asks for an older one).
    pub(crate) protocol_header: [u8; 8],
    /// The `connection.start` of the last handshake.
    pub(crate) start: Option<connection::Start>,
}

/// The client properties of a modern client: it announces `authentication_failure_close` and
/// `consumer_cancel_notify`, as pika, lapin and amqplib do (`capabilities` is a table).
pub(crate) fn modern_client_properties(extra_capabilities: &[&str]) -> FieldTable {
    let mut capabilities = FieldTable::default();
    for capability in ["authentication_failure_close", "consumer_cancel_notify"].iter().chain(extra_capabilities) {
        capabilities.insert((*capability).into(), lapin::types::AMQPValue::Boolean(true));
    }
    let mut properties = FieldTable::default();
    properties.insert("capabilities".into(), lapin::types::AMQPValue::FieldTable(capabilities));
    properties
}

/// A safety net so a broken server fails the test instead of hanging it; never a timing claim.
const HANG_GUARD: Duration = Duration::from_secs(30);

impl Raw {
    pub(crate) async fn connect(broker: &TestBroker) -> Raw {
        let address = broker.broker.as_ref().unwrap().local_addr();
        let socket = TcpStream::connect(address).await.unwrap();
        Raw {
            socket,
            buffer: BytesMut::new(),
            decoder: FrameDecoder::new(frame::FRAME_MAX_LIMIT),
            client_properties: modern_client_properties(&[]),
            protocol_header: frame::PROTOCOL_HEADER,
            start: None,
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).await.unwrap();
    }

    /// Closes the client's sending side (the server sees end of stream).
    pub(crate) async fn shutdown(&mut self) {
        self.socket.shutdown().await.unwrap();
    }

    pub(crate) async fn send_method(&mut self, channel: u16, method: AMQPClass) {
        let mut buffer = BytesMut::new();
        encode_method(&mut buffer, channel, &method).unwrap();
        self.send(&buffer).await;
    }

    /// The next frame, or `None` once the server has closed the socket.
    pub(crate) async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buffer).unwrap() {
                return Some(frame);
            }
            let read =
                tokio::time::timeout(HANG_GUARD, self.socket.read_buf(&mut self.buffer)).await.expect("server hung");
            if read.unwrap_or(0) == 0 {
                return None;
            }
        }
    }

    pub(crate) async fn next_method(&mut self) -> Option<AMQPClass> {
        loop {
            match self.next().await? {
                Frame::Method { method, .. } => return Some(*method),
                _ => continue,
            }
        }
    }

    /// Runs the handshake as `user`; returns the `connection.close` if the server refused.
    pub(crate) async fn handshake(&mut self, user: &str, password: &str, heartbeat: u16) -> Option<connection::Close> {
        self.handshake_to("/", user, password, heartbeat).await
    }

    pub(crate) async fn handshake_to(
        &mut self,
        vhost: &str,
        user: &str,
        password: &str,
        heartbeat: u16,
    ) -> Option<connection::Close> {
        self.handshake_with(vhost, user, password, heartbeat, FRAME_MIN_SIZE).await
    }

    /// The handshake asking for a larger `frame_max` (for frames bigger than the minimum).
    pub(crate) async fn handshake_frame_max(
        &mut self,
        user: &str,
        password: &str,
        frame_max: u32,
    ) -> Option<connection::Close> {
        self.handshake_with("/", user, password, 0, frame_max).await
    }

    pub(crate) async fn handshake_with(
        &mut self,
        vhost: &str,
        user: &str,
        password: &str,
        heartbeat: u16,
        frame_max: u32,
    ) -> Option<connection::Close> {
        let header = self.protocol_header;
        self.send(&header).await;
        match self.next_method().await {
            Some(AMQPClass::Connection(connection::AMQPMethod::Start(start))) => self.start = Some(start),
            other => panic!("expected connection.start, got {other:?}"),
        }
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: self.client_properties.clone(),
                mechanism: "PLAIN".into(),
                response: format!("\0{user}\0{password}").into(),
                locale: "en_US".into(),
            })),
        )
        .await;
        match self.next_method().await {
            Some(AMQPClass::Connection(connection::AMQPMethod::Tune(_))) => {}
            Some(AMQPClass::Connection(connection::AMQPMethod::Close(close))) => return Some(close),
            other => panic!("unexpected {other:?}"),
        }
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 16,
                frame_max,
                heartbeat,
            })),
        )
        .await;
        self.decoder.set_frame_max(frame_max);
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open { virtual_host: vhost.into() })),
        )
        .await;
        match self.next_method().await {
            Some(AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => None,
            Some(AMQPClass::Connection(connection::AMQPMethod::Close(close))) => Some(close),
            other => panic!("unexpected {other:?}"),
        }
    }

    pub(crate) async fn open_channel(&mut self, channel: u16) {
        self.send_method(channel, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await;
        assert!(matches!(self.next_method().await, Some(AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))));
    }

    /// Expects `connection.close` with `code`, answers close-ok, and expects the socket to end.
    pub(crate) async fn expect_connection_close(&mut self, code: u16) -> String {
        let text = loop {
            match self.next_method().await {
                Some(AMQPClass::Connection(connection::AMQPMethod::Close(close))) => {
                    assert_eq!(close.reply_code, code, "{}", close.reply_text);
                    break close.reply_text.as_str().to_owned();
                }
                Some(_) => continue,
                None => panic!("socket closed without connection.close {code}"),
            }
        };
        self.send_method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {}))).await;
        assert!(self.next().await.is_none(), "the server closes the socket after close-ok");
        text
    }

    pub(crate) async fn expect_channel_close(&mut self, code: u16) -> String {
        loop {
            match self.next_method().await {
                Some(AMQPClass::Channel(channel::AMQPMethod::Close(close))) => {
                    assert_eq!(close.reply_code, code, "{}", close.reply_text);
                    return close.reply_text.as_str().to_owned();
                }
                Some(_) => continue,
                None => panic!("socket closed instead of channel.close {code}"),
            }
        }
    }
}

pub(crate) fn publish_frames(channel: u16, body: &[u8], immediate: bool) -> BytesMut {
    let mut buffer = BytesMut::new();
    let method = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "".into(),
        routing_key: "q".into(),
        mandatory: false,
        immediate,
    }));
    encode_method(&mut buffer, channel, &method).unwrap();
    encode_content_header(&mut buffer, channel, body.len() as u64, &encode_properties(&Properties::default()));
    encode_body(&mut buffer, channel, body, FRAME_MIN_SIZE);
    buffer
}

/// A healthy client with a stored message, to show bad input elsewhere does not touch it.
async fn bystander(broker: &TestBroker) -> lapin::Connection {
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel.queue_declare("q".into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    channel
        .basic_publish(
            "".into(),
            "q".into(),
            BasicPublishOptions::default(),
            b"precious",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    connection
}

async fn bystander_still_fine(connection: &lapin::Connection) {
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .queue_declare("q".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    assert!(declared.message_count() >= 1, "the stored message is still there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_protocol_header_gets_ours_back_and_a_close() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    raw.send(b"GET / HTTP/1.1\r\n\r\n").await;
    let mut reply = Vec::new();
    tokio::time::timeout(HANG_GUARD, raw.socket.read_to_end(&mut reply)).await.unwrap().unwrap();
    assert_eq!(reply, frame::PROTOCOL_HEADER);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_and_unknown_users_are_refused_with_403() {
    let broker = TestBroker::start().await;
    for (user, password) in [("guest", "wrong"), ("nobody", "guest")] {
        let mut raw = Raw::connect(&broker).await;
        let close = raw.handshake(user, password, 0).await.expect("refused");
        assert_eq!(close.reply_code, 403, "{}", close.reply_text);
        assert!(close.reply_text.as_str().contains("ACCESS_REFUSED"));
    }
    broker.stop().await;
}

/// (Refusing `guest` from a non-loopback address is unit-tested in `connection.rs`: tests only
/// reach the server over loopback.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_users_and_guest_from_loopback_are_accepted() {
    let broker = TestBroker::start_with(|config| {
        config.users.push(wharf_broker::User::with_password("app", "pw", false));
        config.grant_full_access("app");
    })
    .await;
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("app", "pw", 0).await.is_none());
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none(), "guest from loopback is accepted");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_closes_the_connection_with_501_and_nothing_else() {
    let broker = TestBroker::start().await;
    let bystander = bystander(&broker).await;
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    raw.open_channel(1).await;
    // A body frame announcing 1 GiB: refused from its header.
    let mut frame = BytesMut::new();
    frame.put_u8(3);
    frame.put_u16(1);
    frame.put_u32(1 << 30);
    raw.send(&frame).await;
    let text = raw.expect_connection_close(501).await;
    assert!(text.contains("frame_max"), "{text}");
    bystander_still_fine(&bystander).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_get_540_and_malformed_ones_502() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    // basic.999
    raw.send(&[1, 0, 1, 0, 0, 0, 4, 0, 60, 3, 231, 0xCE]).await;
    raw.expect_connection_close(540).await;

    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    raw.open_channel(1).await;
    // basic.publish with its arguments cut short.
    raw.send(&[1, 0, 1, 0, 0, 0, 6, 0, 60, 0, 40, 0, 0, 0xCE]).await;
    raw.expect_connection_close(502).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_frames_get_505_and_unopened_channels_504() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    raw.open_channel(1).await;
    // A body frame with no publish before it.
    let mut buffer = BytesMut::new();
    encode_body(&mut buffer, 1, b"stray", FRAME_MIN_SIZE);
    raw.send(&buffer).await;
    raw.expect_connection_close(505).await;

    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    raw.send_method(7, AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos { prefetch_count: 1, global: false }))).await;
    raw.expect_connection_close(504).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_publishes_get_540_like_rabbitmq() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    raw.open_channel(1).await;
    raw.send(&publish_frames(1, b"now!", true)).await;
    let text = raw.expect_connection_close(540).await;
    assert!(text.contains("immediate"), "{text}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_closes_the_channel_with_406_naming_the_limit() {
    let broker = TestBroker::start_with(|config| config.message_bytes_max = 1_000).await;
    let bystander = bystander(&broker).await;
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    raw.open_channel(1).await;
    raw.send(&publish_frames(1, &[0u8; 5_000], false)).await;
    let text = raw.expect_channel_close(406).await;
    assert!(text.contains("larger than configured max size 1000"), "{text}");
    // The connection lives on: another channel works.
    raw.open_channel(2).await;
    bystander_still_fine(&bystander).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_delivery_tag_closes_the_channel_with_406() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none());
    raw.open_channel(1).await;
    raw.send_method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: 42, multiple: false })))
        .await;
    let text = raw.expect_channel_close(406).await;
    assert!(text.contains("unknown delivery tag 42"), "{text}");
    // Only the channel closed: after close-ok the same number opens again.
    raw.send_method(1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}))).await;
    raw.open_channel(1).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_closed_after_two_missed_heartbeats() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 1).await.is_none());
    // Say nothing. The server sends its own heartbeats, then gives up on us and closes.
    let mut heartbeats = 0;
    while let Some(frame) = raw.next().await {
        if frame == Frame::Heartbeat {
            heartbeats += 1;
        }
    }
    assert!(heartbeats >= 1, "the server sent heartbeats while waiting");
    assert_eq!(broker.broker.as_ref().unwrap().connection_count(), 0);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_sending_is_closed_even_while_deliveries_flow_to_it() {
    let broker = TestBroker::start().await;
    let publisher = broker.connect().await;
    let channel = publisher.create_channel().await.unwrap();
    channel.queue_declare("flood".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 1).await.is_none());
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "flood".into(),
            consumer_tag: "raw".into(),
            no_local: false,
            no_ack: true,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    // Many megabytes of deliveries keep the broker's side of the connection busy (its writer
    // reports written bytes every megabyte); the peer reads them all but sends nothing, not even
    // heartbeats, so two missed heartbeat intervals must still close it.
    // Confirmed a megabyte at a time, so the queue never holds more than that.
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let flooding = tokio::spawn(async move {
        let body = vec![7u8; 16 * 1024];
        loop {
            let mut confirms = Vec::new();
            for _ in 0..64 {
                let options = BasicPublishOptions::default();
                match channel.basic_publish("".into(), "flood".into(), options, &body, BasicProperties::default()).await
                {
                    Ok(confirm) => confirms.push(confirm),
                    Err(_) => return,
                }
            }
            for confirm in confirms {
                if confirm.await.is_err() {
                    return;
                }
            }
        }
    });
    let mut body_bytes = 0usize;
    let closed = tokio::time::timeout(common::PATIENCE, async {
        while let Some(frame) = raw.next().await {
            if let Frame::Body { payload, .. } = frame {
                body_bytes += payload.len();
            }
        }
    })
    .await;
    flooding.abort();
    assert!(closed.is_ok(), "the silent peer was never closed while deliveries flowed");
    assert!(body_bytes > 1024 * 1024, "deliveries flowed to the peer: {body_bytes} bytes");
    publisher.close(200, "done".into()).await.ok();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_never_log_in_do_not_take_the_slots_of_real_clients() {
    let broker = TestBroker::start_with(|config| config.connections_max = 2).await;
    let address = broker.broker.as_ref().unwrap().local_addr();
    // Five times as many sockets as there are connection slots, none saying a word.
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(TcpStream::connect(address).await.unwrap());
    }
    // Real clients still log in, up to the limit, which counts logged-in connections only.
    let first = broker.connect().await;
    let second = broker.connect().await;
    assert!(first.status().connected() && second.status().connected());
    assert_eq!(broker.broker.as_ref().unwrap().connection_count(), 2);
    let third = lapin::Connection::connect(&broker.url(), lapin::ConnectionProperties::default()).await;
    assert!(third.is_err(), "a third logged-in connection is over connections_max");
    // The refusal names the limit, at connection.open.
    let mut raw = Raw::connect(&broker).await;
    let close = raw.handshake("guest", "guest", 0).await.expect("refused");
    assert_eq!(close.reply_code, 530, "{}", close.reply_text);
    assert!(close.reply_text.as_str().contains("connection limit (2)"), "{}", close.reply_text);
    drop(silent);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_beyond_the_handshake_cap_are_closed_at_once() {
    let broker = TestBroker::start_with(|config| config.handshakes_max = 3).await;
    let address = broker.broker.as_ref().unwrap().local_addr();
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(address).await.unwrap());
    }
    // The fourth finds every handshake slot taken: the server closes it without a word.
    let mut fourth = TcpStream::connect(address).await.unwrap();
    let _ = fourth.write_all(&frame::PROTOCOL_HEADER).await;
    let mut reply = Vec::new();
    tokio::time::timeout(HANG_GUARD, fourth.read_to_end(&mut reply)).await.unwrap().ok();
    assert!(reply.is_empty(), "nothing is said to a socket refused at accept");
    drop(silent);
    broker.stop().await;
}

/// A field table nested `depth` levels deep (one entry each), built byte by byte: encoding it
/// with the codec would recurse as deep as the parser does.
fn nested_table_bytes(depth: usize) -> Vec<u8> {
    let mut inner: Vec<u8> = 0u32.to_be_bytes().to_vec();
    for _ in 1..depth {
        let mut entries = vec![1, b'n', b'F'];
        entries.extend_from_slice(&inner);
        let mut table = (entries.len() as u32).to_be_bytes().to_vec();
        table.extend(entries);
        inner = table;
    }
    inner
}

/// A frame of `kind` on `channel` around `payload`.
fn raw_frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![kind];
    frame.extend(channel.to_be_bytes());
    frame.extend((payload.len() as u32).to_be_bytes());
    frame.extend(payload);
    frame.push(0xCE);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_arguments_and_headers_close_only_their_connection() {
    // 2,000 levels: about 14 KB, beyond the ~1,400 that used to abort the whole broker.
    const DEPTH: usize = 2_000;
    let broker = TestBroker::start().await;
    let bystander = broker.connect().await;
    let bystander_channel = bystander.create_channel().await.unwrap();
    bystander_channel
        .queue_declare("kept".into(), QueueDeclareOptions::durable(), FieldTable::default())
        .await
        .unwrap();

    // queue.declare whose arguments nest too deep.
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake_frame_max("guest", "guest", frame::FRAME_MAX_LIMIT).await.is_none());
    raw.open_channel(1).await;
    let mut declare = vec![0, 50, 0, 10, 0, 0, 4];
    declare.extend(b"deep");
    declare.push(0);
    declare.extend(nested_table_bytes(DEPTH));
    raw.send(&raw_frame(1, 1, &declare)).await;
    let text = raw.expect_connection_close(502).await;
    assert!(text.contains("nests deeper than 64 levels"), "{text}");

    // A publish whose headers nest too deep.
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake_frame_max("guest", "guest", frame::FRAME_MAX_LIMIT).await.is_none());
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "kept".into(),
            mandatory: false,
            immediate: false,
        })),
    )
    .await;
    let mut header = vec![0, 60, 0, 0];
    header.extend(0u64.to_be_bytes());
    header.extend([0b0010_0000, 0]);
    header.extend(nested_table_bytes(DEPTH));
    raw.send(&raw_frame(2, 1, &header)).await;
    let text = raw.expect_connection_close(502).await;
    assert!(text.contains("nests deeper than 64 levels"), "{text}");

    // The broker and its other clients carry on.
    let declared = bystander_channel
        .queue_declare(
            "kept".into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(declared.message_count(), 0, "nothing of the refused publish arrived");
    bystander.close(200, "done".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_throttled_per_address_until_their_window_passes() {
    let clock = std::sync::Arc::new(wharf_broker::ManualClock::starting_now());
    let broker = TestBroker::start_with(common::on_clock(&clock)).await;
    // Ten wrong passwords from this address are each refused as wrong.
    for _ in 0..10 {
        let mut raw = Raw::connect(&broker).await;
        let close = raw.handshake("guest", "wrong", 0).await.expect("refused");
        assert_eq!(close.reply_code, 403);
        assert!(close.reply_text.as_str().contains("Login was refused"), "{}", close.reply_text);
    }
    // Then even the right one is refused without being looked at, until the window passes.
    let mut raw = Raw::connect(&broker).await;
    let close = raw.handshake("guest", "guest", 0).await.expect("throttled");
    assert_eq!(close.reply_code, 403);
    assert!(close.reply_text.as_str().contains("too many failed logins"), "{}", close.reply_text);
    clock.advance(59_999);
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_some(), "still throttled a millisecond before");
    clock.advance(1);
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake("guest", "guest", 0).await.is_none(), "the right password works again");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_more_than_its_share_of_handshake_slots() {
    let broker = TestBroker::start_with(|config| {
        config.handshakes_max = 100;
        config.handshakes_per_address_max = 3;
    })
    .await;
    let address = broker.broker.as_ref().unwrap().local_addr();
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(address).await.unwrap());
    }
    // Far below the total cap, but this address has its three: the fourth is closed at once.
    let mut fourth = TcpStream::connect(address).await.unwrap();
    let _ = fourth.write_all(&frame::PROTOCOL_HEADER).await;
    let mut reply = Vec::new();
    tokio::time::timeout(HANG_GUARD, fourth.read_to_end(&mut reply)).await.unwrap().ok();
    assert!(reply.is_empty(), "nothing is said to a socket refused at accept");
    drop(silent);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_vhost_is_refused_with_530_and_configured_ones_open() {
    let broker = TestBroker::start_with(|config| {
        config.vhosts.push("staging".into());
        config.grant_full_access("guest");
    })
    .await;
    let mut raw = Raw::connect(&broker).await;
    let close = raw.handshake_to("nope", "guest", "guest", 0).await.expect("refused");
    assert_eq!(close.reply_code, 530, "{}", close.reply_text);
    assert!(close.reply_text.as_str().contains("vhost 'nope' not found"));
    let mut raw = Raw::connect(&broker).await;
    assert!(raw.handshake_to("staging", "guest", "guest", 0).await.is_none());
    broker.stop().await;
}
