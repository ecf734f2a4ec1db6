//! The MQTT packet decoder under arbitrary bytes (target `mqtt_packet`): the first input byte
//! picks what the decoder knows (nothing yet, so CONNECT must come first; 3.1.1; 5.0), the rest
//! is a stream from a client. The decoder must never panic, must never take a packet over its
//! limit, and every packet it returns must encode and decode back to itself.

use bytes::BytesMut;
use wharf_mqtt::{Decoder, Packet, Properties, Publish, QoS, Subscribe, Subscription, SubscriptionOptions, Version};

/// The limit the fuzzed decoder runs with (small, so oversize packets are reachable).
const PACKET_BYTES_MAX: u32 = 4096;

pub fn check_mqtt(data: &[u8]) {
    let Some((&mode, stream)) = data.split_first() else { return };
    let mut decoder = Decoder::new(PACKET_BYTES_MAX);
    match mode % 3 {
        1 => decoder.set_version(Version::V311),
        2 => decoder.set_version(Version::V5),
        _ => {}
    }
    let mut buffer = BytesMut::from(stream);
    loop {
        let before = buffer.len();
        match decoder.decode(&mut buffer) {
            Ok(Some(packet)) => {
                let used = before - buffer.len();
                assert!(used as u64 <= u64::from(PACKET_BYTES_MAX), "took a packet of {used} bytes");
                let version = decoder.version().expect("a decoded packet fixes the version");
                round_trip(&packet, version);
            }
            Ok(None) | Err(_) => return,
        }
    }
}

fn round_trip(packet: &Packet, version: Version) {
    let mut encoded = BytesMut::new();
    wharf_mqtt::encode(packet, version, &mut encoded);
    let mut decoder = Decoder::new(wharf_mqtt::PACKET_BYTES_MAX_LIMIT);
    if !matches!(packet, Packet::Connect(_)) {
        decoder.set_version(version);
    }
    let again = decoder.decode(&mut encoded).expect("a packet the decoder took encodes validly");
    assert_eq!(again.as_ref(), Some(packet), "round trip");
    assert!(encoded.is_empty());
}

/// Seeds: what real clients send, in both versions.
pub fn mqtt_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let connect = |version: Version| {
        Packet::Connect(Box::new(wharf_mqtt::Connect {
            version,
            client_id: "device-1".into(),
            clean_start: false,
            keep_alive_s: 30,
            username: Some("guest".into()),
            password: Some(bytes::Bytes::from_static(b"guest")),
            will: Some(wharf_mqtt::Will {
                topic: "status/device-1".into(),
                payload: bytes::Bytes::from_static(b"offline"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties::default(),
            }),
            properties: Properties::default(),
        }))
    };
    let publish = |qos: QoS| {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: "sensors/kitchen/temp".into(),
            packet_id: if qos == QoS::AtMostOnce { 0 } else { 7 },
            properties: Properties::default(),
            payload: bytes::Bytes::from_static(b"21.5"),
        })
    };
    let subscribe = Packet::Subscribe(Subscribe {
        packet_id: 3,
        subscriptions: vec![Subscription { filter: "sensors/+/temp".into(), options: SubscriptionOptions::qos(QoS::ExactlyOnce) }],
        properties: Properties::default(),
    });
    let mut seeds = Vec::new();
    for (name, mode, version) in [("session-3.1.1", 0u8, Version::V311), ("session-5.0", 0, Version::V5)] {
        let mut bytes = vec![mode];
        let mut buffer = BytesMut::new();
        for packet in [connect(version), publish(QoS::AtLeastOnce), publish(QoS::ExactlyOnce), subscribe.clone(), Packet::PingReq] {
            wharf_mqtt::encode(&packet, version, &mut buffer);
        }
        bytes.extend_from_slice(&buffer);
        seeds.push((name, bytes));
    }
    let mut v5_publish = vec![2u8];
    let mut buffer = BytesMut::new();
    let Packet::Publish(mut with_properties) = publish(QoS::AtLeastOnce) else { unreachable!() };
    with_properties.properties.user_properties = vec![("site".into(), "north".into())];
    with_properties.properties.message_expiry_interval_s = Some(60);
    with_properties.properties.topic_alias = Some(1);
    wharf_mqtt::encode(&Packet::Publish(with_properties), Version::V5, &mut buffer);
    v5_publish.extend_from_slice(&buffer);
    seeds.push(("publish-5.0-properties", v5_publish));
    seeds
}
