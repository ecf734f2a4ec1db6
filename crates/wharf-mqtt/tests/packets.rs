//! The codec against the specification: round trips of every packet in both versions (as a
//! property test for PUBLISH and SUBSCRIBE), decoding at any split of the input, hand-made bytes
//! from the specification's examples, and each kind of bad input answered with its reason code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use wharf_mqtt::*;

fn decoder(version: Version) -> Decoder {
    let mut decoder = Decoder::new(PACKET_BYTES_MAX_DEFAULT);
    decoder.set_version(version);
    decoder
}

fn round_trip(packet: &Packet, version: Version) -> Packet {
    let mut buffer = BytesMut::new();
    encode(packet, version, &mut buffer);
    let mut decoder = if matches!(packet, Packet::Connect(_)) { Decoder::new(1 << 20) } else { decoder(version) };
    let decoded = decoder.decode(&mut buffer).unwrap().expect("a whole packet");
    assert!(buffer.is_empty(), "every byte used");
    decoded
}

fn v5_publish_properties() -> Properties {
    Properties {
        payload_format_indicator: Some(1),
        message_expiry_interval_s: Some(60),
        content_type: Some("application/json".into()),
        response_topic: Some("replies/device-1".into()),
        correlation_data: Some(Bytes::from_static(&[0, 255, 7])),
        subscription_identifiers: vec![3, 268_435_455],
        user_properties: vec![("site".into(), "north".into()), ("site".into(), "south".into())],
        ..Properties::default()
    }
}

#[test]
fn every_packet_round_trips_in_5_0() {
    let packets = vec![
        Packet::Connect(Box::new(Connect {
            version: Version::V5,
            client_id: "device-1".into(),
            clean_start: false,
            keep_alive_s: 30,
            username: Some("guest".into()),
            password: Some(Bytes::from_static(b"guest")),
            will: Some(Will {
                topic: "devices/1/status".into(),
                payload: Bytes::from_static(b"offline"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties { will_delay_interval_s: Some(5), ..Properties::default() },
            }),
            properties: Properties {
                session_expiry_interval_s: Some(3600),
                receive_maximum: Some(20),
                maximum_packet_size: Some(1 << 20),
                topic_alias_maximum: Some(10),
                ..Properties::default()
            },
        })),
        Packet::ConnAck(ConnAck {
            session_present: true,
            reason: 0,
            properties: Properties {
                maximum_qos: Some(2),
                retain_available: Some(1),
                assigned_client_identifier: Some("auto-1".into()),
                shared_subscription_available: Some(1),
                ..Properties::default()
            },
        }),
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: true,
            topic: "a/b".into(),
            packet_id: 7,
            properties: v5_publish_properties(),
            payload: Bytes::from_static(b"21.5"),
        }),
        Packet::PubAck(Ack::new(1, reason::SUCCESS)),
        Packet::PubAck(Ack::new(2, reason::NO_MATCHING_SUBSCRIBERS)),
        Packet::PubRec(Ack::new(3, reason::SUCCESS)),
        Packet::PubRel(Ack::new(4, reason::PACKET_IDENTIFIER_NOT_FOUND)),
        Packet::PubComp(Ack::new(5, reason::SUCCESS)),
        Packet::Subscribe(Subscribe {
            packet_id: 9,
            subscriptions: vec![Subscription {
                filter: "$share/g/a/+".into(),
                options: SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: RetainHandling::DoNotSend,
                },
            }],
            properties: Properties { subscription_identifiers: vec![12], ..Properties::default() },
        }),
        Packet::SubAck(SubAck {
            packet_id: 9,
            reasons: vec![2, reason::TOPIC_FILTER_INVALID],
            properties: Properties::default(),
        }),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 10,
            filters: vec!["a/#".into()],
            properties: Properties::default(),
        }),
        Packet::UnsubAck(UnsubAck {
            packet_id: 10,
            reasons: vec![reason::NO_SUBSCRIPTION_EXISTED],
            properties: Properties::default(),
        }),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect(Disconnect::new(reason::SESSION_TAKEN_OVER)),
        Packet::Auth(Auth {
            reason: 0x18,
            properties: Properties { authentication_method: Some("SCRAM".into()), ..Properties::default() },
        }),
    ];
    for packet in packets {
        assert_eq!(round_trip(&packet, Version::V5), packet);
    }
}

#[test]
fn packets_round_trip_in_3_1_1_without_properties() {
    let connect = Packet::Connect(Box::new(Connect {
        version: Version::V311,
        client_id: "".into(),
        clean_start: true,
        keep_alive_s: 0,
        username: None,
        password: None,
        will: None,
        properties: Properties::default(),
    }));
    assert_eq!(round_trip(&connect, Version::V311), connect);
    let publish = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "t".into(),
        packet_id: 0,
        properties: Properties::default(),
        payload: Bytes::new(),
    });
    assert_eq!(round_trip(&publish, Version::V311), publish);
    // A refusal's reason code becomes 3.1.1's return code.
    let refused = Packet::ConnAck(ConnAck {
        session_present: false,
        reason: reason::BAD_USER_NAME_OR_PASSWORD,
        properties: Properties::default(),
    });
    let mut buffer = BytesMut::new();
    encode(&refused, Version::V311, &mut buffer);
    assert_eq!(&buffer[..], &[0x20, 2, 0, 4]);
    assert_eq!(round_trip(&refused, Version::V311), refused, "return code 4 reads back as its reason");
    let suback = Packet::SubAck(SubAck {
        packet_id: 1,
        reasons: vec![1, reason::NOT_AUTHORIZED],
        properties: Properties::default(),
    });
    let mut buffer = BytesMut::new();
    encode(&suback, Version::V311, &mut buffer);
    assert_eq!(&buffer[..], &[0x90, 4, 0, 1, 1, 0x80]);
}

#[test]
fn a_3_1_1_connect_from_the_specification_decodes() {
    // CONNECT "MQTT" level 4, clean session, keep alive 10 s, client id "c1".
    let bytes = [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10, 0, 2, b'c', b'1'];
    let mut decoder = Decoder::new(1024);
    let Packet::Connect(connect) = decoder.decode(&mut BytesMut::from(&bytes[..])).unwrap().unwrap() else {
        panic!("not a CONNECT")
    };
    assert_eq!((connect.version, connect.client_id.as_str(), connect.keep_alive_s), (Version::V311, "c1", 10));
    assert_eq!(decoder.version(), Some(Version::V311));
}

#[test]
fn packets_decode_at_any_split_of_the_input() {
    let mut bytes = BytesMut::new();
    let publish = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "sensors/1".into(),
        packet_id: 300,
        properties: v5_publish_properties(),
        payload: Bytes::from(vec![7u8; 300]),
    });
    encode(&publish, Version::V5, &mut bytes);
    encode(&Packet::PingReq, Version::V5, &mut bytes);
    for split in 0..bytes.len() {
        let mut decoder = decoder(Version::V5);
        let mut buffer = BytesMut::from(&bytes[..split]);
        let mut decoded = Vec::new();
        while let Some(packet) = decoder.decode(&mut buffer).unwrap() {
            decoded.push(packet);
        }
        buffer.extend_from_slice(&bytes[split..]);
        while let Some(packet) = decoder.decode(&mut buffer).unwrap() {
            decoded.push(packet);
        }
        assert_eq!(decoded, vec![publish.clone(), Packet::PingReq], "split at {split}");
    }
}

fn decode_error(bytes: &[u8], version: Option<Version>) -> DecodeError {
    let mut decoder = Decoder::new(1024);
    if let Some(version) = version {
        decoder.set_version(version);
    }
    decoder.decode(&mut BytesMut::from(bytes)).expect_err("refused")
}

#[test]
fn bad_input_gets_the_reason_code_for_its_case() {
    let v5 = Some(Version::V5);
    // A remaining length over four bytes.
    assert_eq!(decode_error(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], v5).reason_code(), reason::MALFORMED_PACKET);
    // Over the limit, known from the header alone (no payload sent).
    assert!(matches!(decode_error(&[0x30, 0x80, 0x80, 0x01], v5), DecodeError::TooLarge { size_bytes: 16388, .. }));
    // A field running past its packet.
    assert_eq!(decode_error(&[0x30, 3, 0, 9, b'a'], v5).reason_code(), reason::MALFORMED_PACKET);
    // QoS 3; PUBREL without its flags; packet type 0; AUTH in 3.1.1.
    assert_eq!(decode_error(&[0x36, 3, 0, 1, b'a'], v5).reason_code(), reason::MALFORMED_PACKET);
    assert_eq!(decode_error(&[0x60, 2, 0, 1], v5).reason_code(), reason::MALFORMED_PACKET);
    assert_eq!(decode_error(&[0x00, 0], v5).reason_code(), reason::MALFORMED_PACKET);
    assert_eq!(decode_error(&[0xF0, 0], Some(Version::V311)).reason_code(), reason::PROTOCOL_ERROR);
    // A wildcard in a PUBLISH topic.
    assert_eq!(
        decode_error(&[0x30, 4, 0, 2, b'a', b'+'], Some(Version::V311)).reason_code(),
        reason::TOPIC_NAME_INVALID
    );
    // Packet id 0.
    assert_eq!(decode_error(&[0x40, 2, 0, 0], v5).reason_code(), reason::MALFORMED_PACKET);
    // A string that is not UTF-8.
    assert_eq!(decode_error(&[0x30, 4, 0, 2, 0xC3, 0x28], Some(Version::V311)).reason_code(), reason::MALFORMED_PACKET);
    // A property a PUBLISH may not carry (session expiry), and one given twice.
    assert_eq!(decode_error(&[0x30, 9, 0, 1, b'a', 5, 0x11, 0, 0, 0, 1], v5).reason_code(), reason::PROTOCOL_ERROR);
    assert_eq!(decode_error(&[0x30, 8, 0, 1, b'a', 4, 0x01, 1, 0x01, 0], v5).reason_code(), reason::PROTOCOL_ERROR);
    // Before CONNECT, anything else; an unknown protocol level.
    assert_eq!(decode_error(&[0xC0, 0], None).reason_code(), reason::PROTOCOL_ERROR);
    let level_9 = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 9, 0x02, 0, 10, 0, 0];
    assert_eq!(decode_error(&level_9, None).reason_code(), reason::UNSUPPORTED_PROTOCOL_VERSION);
    // CONNECT's reserved flag.
    let reserved = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x03, 0, 10, 0, 0];
    assert_eq!(decode_error(&reserved, None).reason_code(), reason::MALFORMED_PACKET);
    // Bytes left over after a PINGREQ's (empty) body.
    assert_eq!(decode_error(&[0xC0, 1, 0], v5).reason_code(), reason::MALFORMED_PACKET);
}

#[test]
fn a_second_connect_is_a_protocol_error() {
    let connect = Packet::Connect(Box::new(Connect {
        version: Version::V311,
        client_id: "c".into(),
        clean_start: true,
        keep_alive_s: 0,
        username: None,
        password: None,
        will: None,
        properties: Properties::default(),
    }));
    let mut buffer = BytesMut::new();
    encode(&connect, Version::V311, &mut buffer);
    encode(&connect, Version::V311, &mut buffer);
    let mut decoder = Decoder::new(1024);
    assert!(decoder.decode(&mut buffer).unwrap().is_some());
    assert_eq!(decoder.decode(&mut buffer).unwrap_err().reason_code(), reason::PROTOCOL_ERROR);
}

proptest! {
    #[test]
    fn publishes_and_subscribes_round_trip(
        topic in "[a-z0-9/]{1,40}",
        payload in proptest::collection::vec(any::<u8>(), 0..2000),
        qos in 0u8..3,
        packet_id in 1u16..,
        retain in any::<bool>(),
        v5 in any::<bool>(),
        names in proptest::collection::vec("[a-z]{0,8}", 0..4),
        filters in proptest::collection::vec("(\\+|#|[a-z]{1,5})(/[a-z+]{1,4}){0,3}", 1..5),
    ) {
        let version = if v5 { Version::V5 } else { Version::V311 };
        let qos = QoS::from_bits(qos).unwrap();
        let properties = if v5 {
            Properties { user_properties: names.iter().map(|name| (name.clone(), name.to_uppercase())).collect(), ..Properties::default() }
        } else {
            Properties::default()
        };
        let publish = Packet::Publish(Publish {
            dup: false,
            qos,
            retain,
            topic,
            packet_id: if qos == QoS::AtMostOnce { 0 } else { packet_id },
            properties: properties.clone(),
            payload: Bytes::from(payload),
        });
        prop_assert_eq!(round_trip(&publish, version), publish);
        let subscribe = Packet::Subscribe(Subscribe {
            packet_id,
            subscriptions: filters.into_iter().map(|filter| Subscription { filter, options: SubscriptionOptions::qos(qos) }).collect(),
            properties,
        });
        prop_assert_eq!(round_trip(&subscribe, version), subscribe);
    }

    #[test]
    fn random_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        v5 in any::<bool>(),
        connected in any::<bool>(),
    ) {
        let mut decoder = Decoder::new(256);
        if connected {
            decoder.set_version(if v5 { Version::V5 } else { Version::V311 });
        }
        let mut buffer = BytesMut::from(&bytes[..]);
        let mut packets = 0;
        while let Ok(Some(_)) = decoder.decode(&mut buffer) {
            packets += 1;
        }
        // Every packet takes at least its two-byte fixed header.
        prop_assert!(packets <= bytes.len() / 2);
    }
}
