//! The MQTT front end spoken to byte for byte (a client built on `wharf-mqtt`'s codec), where a
//! test needs exact control: QoS 2 flows with a repeated PUBLISH, reason codes for each kind of
//! bad input, session takeover, and the mapping to AMQP checked from a lapin consumer.

use crate::common::{self, TestBroker};
use bytes::{Bytes, BytesMut};
use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wharf_mqtt::*;

/// The longest a test waits for a packet before failing (a guard against hangs, not a timing).
const PACKET_WAIT: Duration = Duration::from_secs(30);

pub async fn start() -> TestBroker {
    TestBroker::start_with(|config| config.mqtt.listen = Some("127.0.0.1:0".parse().unwrap())).await
}

pub fn mqtt_addr(broker: &TestBroker) -> SocketAddr {
    broker.broker().mqtt_local_addr().unwrap()
}

/// A bare MQTT client.
pub struct RawClient {
    stream: TcpStream,
    decoder: Decoder,
    buffer: BytesMut,
    version: Version,
}

impl RawClient {
    pub async fn open(address: SocketAddr, version: Version) -> RawClient {
        let stream = TcpStream::connect(address).await.unwrap();
        let mut decoder = Decoder::new(PACKET_BYTES_MAX_LIMIT);
        decoder.set_version(version);
        RawClient { stream, decoder, buffer: BytesMut::new(), version }
    }

    /// Opens a connection and logs in as guest; returns the client and the CONNACK.
    pub async fn connect(address: SocketAddr, version: Version, client_id: &str, clean: bool) -> (RawClient, ConnAck) {
        let mut client = RawClient::open(address, version).await;
        client.send(&connect_packet(version, client_id, clean, Some(("guest", "guest")))).await;
        match client.recv().await {
            Some(Packet::ConnAck(ack)) => (client, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn send(&mut self, packet: &Packet) {
        let mut buffer = BytesMut::new();
        encode(packet, self.version, &mut buffer);
        self.stream.write_all(&buffer).await.unwrap();
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next packet; `None` once the server closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        loop {
            if let Some(packet) = self.decoder.decode(&mut self.buffer).unwrap() {
                return Some(packet);
            }
            let read = tokio::time::timeout(PACKET_WAIT, self.stream.read_buf(&mut self.buffer))
                .await
                .expect("no packet from the server");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    pub async fn subscribe(&mut self, packet_id: u16, filter: &str, qos: QoS) -> Vec<u8> {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id,
            subscriptions: vec![Subscription { filter: filter.into(), options: SubscriptionOptions::qos(qos) }],
            properties: Properties::default(),
        }))
        .await;
        match self.recv().await {
            Some(Packet::SubAck(ack)) if ack.packet_id == packet_id => ack.reasons,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

pub fn connect_packet(version: Version, client_id: &str, clean: bool, login: Option<(&str, &str)>) -> Packet {
    Packet::Connect(Box::new(Connect {
        version,
        client_id: client_id.into(),
        clean_start: clean,
        keep_alive_s: 60,
        username: login.map(|(user, _)| user.to_owned()),
        password: login.map(|(_, password)| Bytes::copy_from_slice(password.as_bytes())),
        will: None,
        properties: Properties::default(),
    }))
}

pub fn publish_packet(topic: &str, qos: QoS, packet_id: u16, payload: &'static [u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        properties: Properties::default(),
        payload: Bytes::from_static(payload),
    })
}

/// A lapin consumer on a new queue bound to amq.topic with `binding_key`.
async fn amqp_listener(connection: &lapin::Connection, binding_key: &str) -> lapin::Consumer {
    let channel = connection.create_channel().await.unwrap();
    let queue = channel
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, Default::default())
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.name().clone(),
            "amq.topic".into(),
            binding_key.into(),
            QueueBindOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            Default::default(),
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_publish_reaches_amqp_as_rabbitmq_maps_it_and_is_acknowledged() {
    let broker = start().await;
    let amqp = broker.connect().await;
    let mut listener = amqp_listener(&amqp, "sensors.*.temp").await;
    for version in [Version::V311, Version::V5] {
        let (mut client, ack) = RawClient::connect(mqtt_addr(&broker), version, "pub-1", true).await;
        assert_eq!((ack.reason, ack.session_present), (0, false));
        client.send(&publish_packet("sensors/kitchen/temp", QoS::AtLeastOnce, 7, b"21.5")).await;
        assert_eq!(client.recv().await, Some(Packet::PubAck(Ack::new(7, reason::SUCCESS))));
        let delivery = listener.next().await.unwrap().unwrap();
        assert_eq!(delivery.routing_key.as_str(), "sensors.kitchen.temp");
        assert_eq!(delivery.exchange.as_str(), "amq.topic");
        assert_eq!(delivery.data, b"21.5");
        assert_eq!(delivery.properties.delivery_mode(), &Some(2), "QoS 1 is persistent");
        client.send(&Packet::Disconnect(Disconnect::new(0))).await;
        assert_eq!(client.recv().await, None, "closed after DISCONNECT");
    }
    // 5.0 is told when nothing matched.
    let (mut client, _) = RawClient::connect(mqtt_addr(&broker), Version::V5, "pub-2", true).await;
    client.send(&publish_packet("nobody/listens", QoS::AtLeastOnce, 8, b"x")).await;
    assert_eq!(client.recv().await, Some(Packet::PubAck(Ack::new(8, reason::NO_MATCHING_SUBSCRIBERS))));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqp_publish_reaches_an_mqtt_subscriber_through_wildcards_at_the_lower_qos() {
    let broker = start().await;
    let (mut subscriber, _) = RawClient::connect(mqtt_addr(&broker), Version::V5, "sub-1", true).await;
    assert_eq!(subscriber.subscribe(1, "sensors/+/temp", QoS::AtLeastOnce).await, vec![1]);
    assert_eq!(subscriber.subscribe(2, "alerts/#", QoS::AtMostOnce).await, vec![0]);
    let amqp = broker.connect().await;
    let channel = amqp.create_channel().await.unwrap();
    let persistent = lapin::BasicProperties::default().with_delivery_mode(2).with_content_type("text/plain".into());
    for (key, body) in [("sensors.hall.temp", &b"19"[..]), ("alerts.fire.kitchen", &b"!"[..])] {
        channel
            .basic_publish("amq.topic".into(), key.into(), BasicPublishOptions::default(), body, persistent.clone())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let Some(Packet::Publish(first)) = subscriber.recv().await else { panic!("expected a PUBLISH") };
    assert_eq!(
        (first.topic.as_str(), first.qos, &first.payload[..]),
        ("sensors/hall/temp", QoS::AtLeastOnce, &b"19"[..])
    );
    assert_eq!(first.properties.content_type.as_deref(), Some("text/plain"));
    subscriber.send(&Packet::PubAck(Ack::new(first.packet_id, 0))).await;
    let Some(Packet::Publish(second)) = subscriber.recv().await else { panic!("expected a PUBLISH") };
    assert_eq!(
        (second.topic.as_str(), second.qos),
        ("alerts/fire/kitchen", QoS::AtMostOnce),
        "the subscription's QoS 0"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos_2_publish_sent_twice_before_pubrel_is_routed_once() {
    let broker = start().await;
    let amqp = broker.connect().await;
    let mut listener = amqp_listener(&amqp, "meters.#").await;
    let (mut client, _) = RawClient::connect(mqtt_addr(&broker), Version::V311, "meter-1", false).await;
    client.send(&publish_packet("meters/1", QoS::ExactlyOnce, 42, b"first")).await;
    assert_eq!(client.recv().await, Some(Packet::PubRec(Ack::new(42, 0))));
    // The PUBREC was "lost": the client sends the PUBLISH again, with DUP.
    let Packet::Publish(mut again) = publish_packet("meters/1", QoS::ExactlyOnce, 42, b"first") else { unreachable!() };
    again.dup = true;
    client.send(&Packet::Publish(again)).await;
    assert_eq!(client.recv().await, Some(Packet::PubRec(Ack::new(42, 0))));
    client.send(&Packet::PubRel(Ack::new(42, 0))).await;
    assert_eq!(client.recv().await, Some(Packet::PubComp(Ack::new(42, 0))));
    // After PUBCOMP the id is free again: a new message with it is a new message.
    client.send(&publish_packet("meters/1", QoS::ExactlyOnce, 42, b"second")).await;
    assert_eq!(client.recv().await, Some(Packet::PubRec(Ack::new(42, 0))));
    client.send(&Packet::PubRel(Ack::new(42, 0))).await;
    assert_eq!(client.recv().await, Some(Packet::PubComp(Ack::new(42, 0))));
    assert_eq!(listener.next().await.unwrap().unwrap().data, b"first");
    assert_eq!(listener.next().await.unwrap().unwrap().data, b"second", "the first was routed once");
    // The session's QoS 2 state outlives a reconnect: a PUBLISH repeated on a new connection,
    // before its PUBREL, is not taken again.
    client.send(&publish_packet("meters/1", QoS::ExactlyOnce, 43, b"third")).await;
    assert_eq!(client.recv().await, Some(Packet::PubRec(Ack::new(43, 0))));
    drop(client);
    let (mut client, ack) = RawClient::connect(mqtt_addr(&broker), Version::V311, "meter-1", false).await;
    assert_eq!(ack.reason, 0);
    let Packet::Publish(mut again) = publish_packet("meters/1", QoS::ExactlyOnce, 43, b"third") else { unreachable!() };
    again.dup = true;
    client.send(&Packet::Publish(again)).await;
    assert_eq!(client.recv().await, Some(Packet::PubRec(Ack::new(43, 0))));
    client.send(&Packet::PubRel(Ack::new(43, 0))).await;
    assert_eq!(client.recv().await, Some(Packet::PubComp(Ack::new(43, 0))));
    client.send(&publish_packet("meters/1", QoS::AtLeastOnce, 44, b"fourth")).await;
    assert_eq!(client.recv().await, Some(Packet::PubAck(Ack::new(44, 0))));
    assert_eq!(listener.next().await.unwrap().unwrap().data, b"third");
    assert_eq!(listener.next().await.unwrap().unwrap().data, b"fourth", "the third was routed once");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos_2_subscriber_gets_the_four_part_flow_and_the_message_once() {
    let broker = start().await;
    let (mut subscriber, _) = RawClient::connect(mqtt_addr(&broker), Version::V5, "sub-q2", true).await;
    assert_eq!(subscriber.subscribe(1, "orders/#", QoS::ExactlyOnce).await, vec![2]);
    let (mut publisher, _) = RawClient::connect(mqtt_addr(&broker), Version::V5, "pub-q2", true).await;
    publisher.send(&publish_packet("orders/7", QoS::ExactlyOnce, 1, b"pay")).await;
    assert_eq!(publisher.recv().await, Some(Packet::PubRec(Ack::new(1, 0))));
    let Some(Packet::Publish(delivered)) = subscriber.recv().await else { panic!("expected a PUBLISH") };
    assert_eq!((delivered.qos, &delivered.payload[..]), (QoS::ExactlyOnce, &b"pay"[..]));
    subscriber.send(&Packet::PubRec(Ack::new(delivered.packet_id, 0))).await;
    assert_eq!(subscriber.recv().await, Some(Packet::PubRel(Ack::new(delivered.packet_id, 0))));
    subscriber.send(&Packet::PubComp(Ack::new(delivered.packet_id, 0))).await;
    // Published at QoS 1, it is delivered at QoS 1 whatever the subscription.
    publisher.send(&publish_packet("orders/8", QoS::AtLeastOnce, 2, b"ship")).await;
    let Some(Packet::Publish(next)) = subscriber.recv().await else { panic!("expected a PUBLISH") };
    assert_eq!((next.qos, &next.payload[..]), (QoS::AtLeastOnce, &b"ship"[..]), "nothing else came first");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_mqtt_answer_for_its_case() {
    let broker = start().await;
    let address = mqtt_addr(&broker);
    // Wrong password: 3.1.1 return code 4, 5.0 reason 0x86.
    for version in [Version::V311, Version::V5] {
        let expected = reason::BAD_USER_NAME_OR_PASSWORD;
        let mut client = RawClient::open(address, version).await;
        client.send(&connect_packet(version, "c", true, Some(("guest", "wrong")))).await;
        // 3.1.1's return code 4 reads back as the reason it stands for.
        let reply = client.recv().await;
        assert!(matches!(reply, Some(Packet::ConnAck(ConnAck { reason, .. })) if reason == expected), "{reply:?}");
        assert_eq!(client.recv().await, None);
    }
    // No credentials: refused (anonymous logins are off).
    let mut client = RawClient::open(address, Version::V5).await;
    client.send(&connect_packet(Version::V5, "c", true, None)).await;
    assert!(matches!(
        client.recv().await,
        Some(Packet::ConnAck(ConnAck { reason: reason::BAD_USER_NAME_OR_PASSWORD, .. }))
    ));
    // A protocol level the server does not speak: CONNACK return code 1, then closed.
    let mut client = RawClient::open(address, Version::V311).await;
    client.send_bytes(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 9, 0x02, 0, 10, 0, 0]).await;
    let refusal = ConnAck {
        session_present: false,
        reason: reason::UNSUPPORTED_PROTOCOL_VERSION,
        properties: Properties::default(),
    };
    assert_eq!(client.recv().await, Some(Packet::ConnAck(refusal)), "return code 1");
    assert_eq!(client.recv().await, None);
    // Anything before CONNECT: closed without an answer.
    let mut client = RawClient::open(address, Version::V311).await;
    client.send_bytes(&[0xC0, 0]).await;
    assert_eq!(client.recv().await, None);
    // A remaining length over four bytes, after login: 5.0 is told 0x81, then closed.
    let (mut client, _) = RawClient::connect(address, Version::V5, "bad-1", true).await;
    client.send_bytes(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).await;
    assert_eq!(client.recv().await, Some(Packet::Disconnect(Disconnect::new(reason::MALFORMED_PACKET))));
    assert_eq!(client.recv().await, None);
    // A packet over the limit, known from its header alone: 0x95.
    let (mut client, _) = RawClient::connect(address, Version::V5, "bad-2", true).await;
    client.send_bytes(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    assert_eq!(client.recv().await, Some(Packet::Disconnect(Disconnect::new(reason::PACKET_TOO_LARGE))));
    // An unknown packet type (AUTH in 3.1.1): closed.
    let (mut client, _) = RawClient::connect(address, Version::V311, "bad-3", true).await;
    client.send_bytes(&[0xF0, 0]).await;
    assert_eq!(client.recv().await, None);
    // A wildcard in a PUBLISH topic: 0x90.
    let (mut client, _) = RawClient::connect(address, Version::V5, "bad-4", true).await;
    client.send_bytes(&[0x30, 5, 0, 2, b'a', b'#', 0]).await;
    assert_eq!(client.recv().await, Some(Packet::Disconnect(Disconnect::new(reason::TOPIC_NAME_INVALID))));
    // Filters that are not allowed get their refusal in SUBACK, and the connection goes on.
    let (mut client, _) = RawClient::connect(address, Version::V5, "bad-5", true).await;
    assert_eq!(client.subscribe(1, "a/#/b", QoS::AtLeastOnce).await, vec![reason::TOPIC_FILTER_INVALID]);
    assert_eq!(client.subscribe(2, "ok/+", QoS::AtLeastOnce).await, vec![1]);
    let (mut client, _) = RawClient::connect(address, Version::V311, "bad-6", true).await;
    assert_eq!(client.subscribe(1, "a+", QoS::AtLeastOnce).await, vec![0x80]);
    client.send(&Packet::PingReq).await;
    assert_eq!(client.recv().await, Some(Packet::PingResp), "still connected");
    // AMQP clients were never disturbed.
    let amqp = broker.connect().await;
    assert!(amqp.status().connected());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_client_id_takes_the_session_over() {
    let broker = start().await;
    let address = mqtt_addr(&broker);
    // A 5.0 session that outlives its connection (an expiry); takeover keeps it.
    let persistent = || {
        let Packet::Connect(mut connect) = connect_packet(Version::V5, "device-9", false, Some(("guest", "guest")))
        else {
            unreachable!()
        };
        connect.properties.session_expiry_interval_s = Some(600);
        Packet::Connect(connect)
    };
    let mut first = RawClient::open(address, Version::V5).await;
    first.send(&persistent()).await;
    assert!(matches!(first.recv().await, Some(Packet::ConnAck(ConnAck { reason: 0, .. }))));
    assert_eq!(first.subscribe(1, "cmd/device-9", QoS::AtLeastOnce).await, vec![1]);
    let mut second = RawClient::open(address, Version::V5).await;
    second.send(&persistent()).await;
    let Some(Packet::ConnAck(ack)) = second.recv().await else { panic!("expected CONNACK") };
    assert_eq!((ack.reason, ack.session_present), (0, true), "the session goes on");
    assert_eq!(first.recv().await, Some(Packet::Disconnect(Disconnect::new(reason::SESSION_TAKEN_OVER))));
    assert_eq!(first.recv().await, None);
    // The subscription came along.
    let (mut publisher, _) = RawClient::connect(address, Version::V5, "ops", true).await;
    publisher.send(&publish_packet("cmd/device-9", QoS::AtLeastOnce, 1, b"reboot")).await;
    assert_eq!(publisher.recv().await, Some(Packet::PubAck(Ack::new(1, 0))));
    let Some(Packet::Publish(command)) = second.recv().await else { panic!("expected a PUBLISH") };
    assert_eq!(&command.payload[..], b"reboot");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_is_a_durable_queue_that_keeps_messages_across_a_crash() {
    let mut broker =
        common::CrashableBroker::start(7, |config| config.mqtt.listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let address = broker.broker().mqtt_local_addr().unwrap();
    let (mut device, _) = RawClient::connect(address, Version::V311, "thermostat", false).await;
    assert_eq!(device.subscribe(1, "homes/1/#", QoS::AtLeastOnce).await, vec![1]);
    device.send(&Packet::Disconnect(Disconnect::new(0))).await;
    assert_eq!(device.recv().await, None);
    // A real queue: visible to AMQP, durable.
    let amqp = broker.connect().await;
    let channel = amqp.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    channel.queue_declare("mqtt-subscription-thermostatqos1".into(), passive, Default::default()).await.unwrap();
    let (mut publisher, _) = RawClient::connect(address, Version::V311, "controller", true).await;
    for (id, body) in [(1u16, &b"set 20"[..]), (2, &b"set 21"[..])] {
        publisher
            .send(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: "homes/1/heating".into(),
                packet_id: id,
                properties: Properties::default(),
                payload: Bytes::copy_from_slice(body),
            }))
            .await;
        assert_eq!(publisher.recv().await, Some(Packet::PubAck(Ack::new(id, 0))), "acknowledged once durable");
    }
    drop(publisher);
    drop(amqp);
    broker.crash(wharf_store::CrashMode::LoseUnsynced).await;
    broker.restart().await;
    let address = broker.broker().mqtt_local_addr().unwrap();
    let (mut device, ack) = RawClient::connect(address, Version::V311, "thermostat", false).await;
    assert!(ack.session_present, "the session survived the crash");
    let mut received = Vec::new();
    for _ in 0..2 {
        let Some(Packet::Publish(publish)) = device.recv().await else { panic!("expected a PUBLISH") };
        device.send(&Packet::PubAck(Ack::new(publish.packet_id, 0))).await;
        received.push(publish.payload);
    }
    assert_eq!(received, vec![Bytes::from_static(b"set 20"), Bytes::from_static(b"set 21")]);
    // A clean session ends it: the queue is gone.
    drop(device);
    let (_device, ack) = RawClient::connect(address, Version::V311, "thermostat", true).await;
    assert!(!ack.session_present);
    let amqp = broker.connect().await;
    let channel = amqp.create_channel().await.unwrap();
    let gone = channel.queue_declare("mqtt-subscription-thermostatqos1".into(), passive, Default::default()).await;
    assert_eq!(gone.err().as_ref().and_then(common::reply_code), Some(404));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_is_published_when_a_client_vanishes_and_not_after_a_disconnect() {
    let broker = start().await;
    let address = mqtt_addr(&broker);
    let (mut watcher, _) = RawClient::connect(address, Version::V311, "watcher", true).await;
    assert_eq!(watcher.subscribe(1, "status/#", QoS::AtLeastOnce).await, vec![1]);
    let with_will = |client_id: &str| {
        let Packet::Connect(mut connect) = connect_packet(Version::V311, client_id, true, Some(("guest", "guest")))
        else {
            unreachable!()
        };
        connect.will = Some(Will {
            topic: format!("status/{client_id}"),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        });
        Packet::Connect(connect)
    };
    // A clean DISCONNECT: no will.
    let mut polite = RawClient::open(address, Version::V311).await;
    polite.send(&with_will("polite")).await;
    assert!(matches!(polite.recv().await, Some(Packet::ConnAck(_))));
    polite.send(&Packet::Disconnect(Disconnect::new(0))).await;
    assert_eq!(polite.recv().await, None);
    // The socket just drops: the will goes out.
    let mut rude = RawClient::open(address, Version::V311).await;
    rude.send(&with_will("rude")).await;
    assert!(matches!(rude.recv().await, Some(Packet::ConnAck(_))));
    drop(rude);
    let Some(Packet::Publish(will)) = watcher.recv().await else { panic!("expected the will") };
    assert_eq!(
        (will.topic.as_str(), &will.payload[..]),
        ("status/rude", &b"offline"[..]),
        "only the rude client's will"
    );
    broker.stop().await;
}

fn retained_packet(topic: &str, packet_id: u16, payload: &'static [u8]) -> Packet {
    let Packet::Publish(mut publish) = publish_packet(topic, QoS::AtLeastOnce, packet_id, payload) else {
        unreachable!()
    };
    publish.retain = true;
    Packet::Publish(publish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_reach_new_subscribers_survive_a_restart_and_can_be_cleared() {
    let mut broker = start().await;
    let (mut device, _) = RawClient::connect(mqtt_addr(&broker), Version::V311, "device-1", true).await;
    device.send(&retained_packet("devices/1/status", 1, b"online")).await;
    assert_eq!(device.recv().await, Some(Packet::PubAck(Ack::new(1, 0))), "acknowledged once stored");
    device.send(&retained_packet("devices/2/status", 2, b"offline")).await;
    assert_eq!(device.recv().await, Some(Packet::PubAck(Ack::new(2, 0))));
    drop(device);
    broker.restart_with(|config| config.mqtt.listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let address = mqtt_addr(&broker);
    // A wildcard subscription gets every retained message it matches, with the retain flag.
    let (mut dashboard, _) = RawClient::connect(address, Version::V5, "dashboard", true).await;
    assert_eq!(dashboard.subscribe(1, "devices/+/status", QoS::AtLeastOnce).await, vec![1]);
    let mut retained = Vec::new();
    for _ in 0..2 {
        let Some(Packet::Publish(publish)) = dashboard.recv().await else { panic!("expected a retained PUBLISH") };
        assert!(publish.retain, "sent because of the subscription: retain set");
        dashboard.send(&Packet::PubAck(Ack::new(publish.packet_id, 0))).await;
        retained.push((publish.topic, publish.payload));
    }
    retained.sort();
    assert_eq!(
        retained,
        vec![
            ("devices/1/status".to_owned(), Bytes::from_static(b"online")),
            ("devices/2/status".to_owned(), Bytes::from_static(b"offline"))
        ]
    );
    // A live publish of a retained message goes to existing subscribers without the flag.
    let (mut device, _) = RawClient::connect(address, Version::V311, "device-1", true).await;
    device.send(&retained_packet("devices/1/status", 3, b"")).await;
    assert_eq!(device.recv().await, Some(Packet::PubAck(Ack::new(3, 0))), "an empty retained publish clears");
    let Some(Packet::Publish(live)) = dashboard.recv().await else { panic!("expected the live PUBLISH") };
    assert_eq!((live.retain, &live.payload[..]), (false, &b""[..]));
    dashboard.send(&Packet::PubAck(Ack::new(live.packet_id, 0))).await;
    // A new subscriber now gets only devices/2; then a live message proves nothing else came.
    let (mut late, _) = RawClient::connect(address, Version::V311, "late", true).await;
    assert_eq!(late.subscribe(1, "devices/#", QoS::AtLeastOnce).await, vec![1]);
    let Some(Packet::Publish(only)) = late.recv().await else { panic!("expected a retained PUBLISH") };
    assert_eq!((only.topic.as_str(), only.retain), ("devices/2/status", true));
    late.send(&Packet::PubAck(Ack::new(only.packet_id, 0))).await;
    device.send(&publish_packet("devices/3/status", QoS::AtLeastOnce, 4, b"booting")).await;
    assert_eq!(device.recv().await, Some(Packet::PubAck(Ack::new(4, 0))));
    let Some(Packet::Publish(next)) = late.recv().await else { panic!("expected the live PUBLISH") };
    assert_eq!((next.topic.as_str(), next.retain), ("devices/3/status", false), "devices/1 was cleared");
    // 5.0 retain handling 2: none at subscribe.
    let (mut quiet, _) = RawClient::connect(address, Version::V5, "quiet", true).await;
    quiet
        .send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: "devices/#".into(),
                options: SubscriptionOptions {
                    retain_handling: RetainHandling::DoNotSend,
                    ..SubscriptionOptions::qos(QoS::AtLeastOnce)
                },
            }],
            properties: Properties::default(),
        }))
        .await;
    assert!(matches!(quiet.recv().await, Some(Packet::SubAck(_))));
    device.send(&publish_packet("devices/4/status", QoS::AtLeastOnce, 5, b"up")).await;
    assert_eq!(device.recv().await, Some(Packet::PubAck(Ack::new(5, 0))));
    let Some(Packet::Publish(first)) = quiet.recv().await else { panic!("expected the live PUBLISH") };
    assert_eq!(first.topic, "devices/4/status", "no retained message first");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_gives_each_message_to_one_member_and_a_leaving_members_to_the_others() {
    let broker = start().await;
    let address = mqtt_addr(&broker);
    let (mut first, _) = RawClient::connect(address, Version::V5, "worker-a", true).await;
    let (mut second, _) = RawClient::connect(address, Version::V5, "worker-b", true).await;
    assert_eq!(first.subscribe(1, "$share/workers/jobs/#", QoS::AtLeastOnce).await, vec![1]);
    assert_eq!(second.subscribe(1, "$share/workers/jobs/#", QoS::AtLeastOnce).await, vec![1]);
    let (mut publisher, _) = RawClient::connect(address, Version::V5, "dispatcher", true).await;
    for (id, body) in [(1u16, &b"job 1"[..]), (2, b"job 2"), (3, b"job 3"), (4, b"job 4")] {
        publisher
            .send(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: "jobs/resize".into(),
                packet_id: id,
                properties: Properties::default(),
                payload: Bytes::copy_from_slice(body),
            }))
            .await;
        assert_eq!(publisher.recv().await, Some(Packet::PubAck(Ack::new(id, 0))));
    }
    // Round robin: the first member holds one (at least), unacknowledged, and leaves.
    let Some(Packet::Publish(held)) = first.recv().await else { panic!("expected a PUBLISH") };
    assert_eq!(held.topic, "jobs/resize");
    drop(first);
    // The other member ends up with every job once at least, the held one redelivered.
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < 4 {
        let Some(Packet::Publish(job)) = second.recv().await else { panic!("expected a PUBLISH") };
        second.send(&Packet::PubAck(Ack::new(job.packet_id, 0))).await;
        seen.entry(job.payload.clone()).or_insert(job.dup);
    }
    assert_eq!(seen.get(&held.payload), Some(&true), "the held job came back marked as a redelivery");
    // A shared subscription's queue is a real queue, visible to AMQP.
    let amqp = broker.connect().await;
    let channel = amqp.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    channel.queue_declare("mqtt-shared-workers-jobs/#".into(), passive, Default::default()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos_2_delivery_interrupted_after_pubrec_gets_its_pubrel_again_on_resume() {
    let broker = start().await;
    let address = mqtt_addr(&broker);
    let (mut subscriber, _) = RawClient::connect(address, Version::V311, "ledger", false).await;
    assert_eq!(subscriber.subscribe(1, "ledger/#", QoS::ExactlyOnce).await, vec![2]);
    let (mut publisher, _) = RawClient::connect(address, Version::V311, "bank", true).await;
    publisher.send(&publish_packet("ledger/1", QoS::ExactlyOnce, 1, b"credit")).await;
    assert_eq!(publisher.recv().await, Some(Packet::PubRec(Ack::new(1, 0))));
    let Some(Packet::Publish(delivered)) = subscriber.recv().await else { panic!("expected a PUBLISH") };
    subscriber.send(&Packet::PubRec(Ack::new(delivered.packet_id, 0))).await;
    assert_eq!(subscriber.recv().await, Some(Packet::PubRel(Ack::new(delivered.packet_id, 0))));
    // Gone before its PUBCOMP: the resumed session sends the PUBREL again, not the message.
    drop(subscriber);
    let (mut subscriber, ack) = RawClient::connect(address, Version::V311, "ledger", false).await;
    assert!(ack.session_present);
    assert_eq!(subscriber.recv().await, Some(Packet::PubRel(Ack::new(delivered.packet_id, 0))));
    subscriber.send(&Packet::PubComp(Ack::new(delivered.packet_id, 0))).await;
    // The next message is a new one, with a new packet id.
    publisher.send(&publish_packet("ledger/2", QoS::ExactlyOnce, 2, b"debit")).await;
    assert_eq!(publisher.recv().await, Some(Packet::PubRec(Ack::new(2, 0))));
    let Some(Packet::Publish(next)) = subscriber.recv().await else { panic!("expected a PUBLISH") };
    assert_eq!(&next.payload[..], b"debit");
    assert_ne!(next.packet_id, delivered.packet_id);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dot_in_a_topic_is_a_level_separator_as_in_rabbitmq_and_keeps_the_subscriptions_qos() {
    let broker = start().await;
    let address = mqtt_addr(&broker);
    let (mut subscriber, _) = RawClient::connect(address, Version::V311, "firmware-watch", true).await;
    assert_eq!(subscriber.subscribe(1, "fw/v1.0/status", QoS::AtLeastOnce).await, vec![1]);
    let (mut publisher, _) = RawClient::connect(address, Version::V311, "device", true).await;
    publisher.send(&publish_packet("fw/v1.0/status", QoS::AtLeastOnce, 1, b"ok")).await;
    assert_eq!(publisher.recv().await, Some(Packet::PubAck(Ack::new(1, 0))));
    let Some(Packet::Publish(delivered)) = subscriber.recv().await else { panic!("expected a PUBLISH") };
    assert_eq!((delivered.topic.as_str(), delivered.qos), ("fw/v1/0/status", QoS::AtLeastOnce));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_sessions_queue_ends_its_connection() {
    let broker = start().await;
    // A persistent session's queue is durable and not exclusive: an administrator can delete it.
    let (mut client, _) = RawClient::connect(mqtt_addr(&broker), Version::V311, "doomed-session", false).await;
    assert_eq!(client.subscribe(1, "a/b", QoS::AtLeastOnce).await, vec![1]);
    let amqp = broker.connect().await;
    let channel = amqp.create_channel().await.unwrap();
    channel
        .queue_delete("mqtt-subscription-doomed-sessionqos1".into(), lapin::options::QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(client.recv().await, None, "closed");
    broker.stop().await;
}
