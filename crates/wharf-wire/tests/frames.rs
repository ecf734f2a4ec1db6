//! Frames: round trips, incremental decoding at any split, and every kind of bad input mapped to
//! its error (never a panic, never an allocation beyond the limit).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use wharf_wire::frame::{
    self, FRAME_MIN_SIZE, ProtocolVersion, decode_protocol_header, encode_body, encode_content_header,
    encode_heartbeat, encode_method, encode_properties,
};
use wharf_wire::protocol::{AMQPClass, BasicProperties, basic, queue};
use wharf_wire::types::{AMQPValue, FieldTable, ShortString};
use wharf_wire::{Frame, FrameDecoder, WireError, reply_code};

fn decode_all(decoder: &FrameDecoder, buffer: &mut BytesMut) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some(frame) = decoder.decode(buffer).unwrap() {
        frames.push(frame);
    }
    frames
}

fn publish() -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: ShortString::from("orders"),
        routing_key: ShortString::from("order.received"),
        mandatory: true,
        immediate: false,
    }))
}

fn declare() -> AMQPClass {
    let mut arguments = FieldTable::default();
    arguments.insert(ShortString::from("x-max-length"), AMQPValue::LongLongInt(10));
    arguments.insert(ShortString::from("x-dead-letter-exchange"), AMQPValue::LongString("dlx".into()));
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: ShortString::from("payment"),
        passive: false,
        durable: true,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments,
    }))
}

#[test]
fn methods_round_trip() {
    let decoder = FrameDecoder::new(FRAME_MIN_SIZE);
    let mut buffer = BytesMut::new();
    for (channel, method) in [(1, publish()), (7, declare())] {
        encode_method(&mut buffer, channel, &method).unwrap();
        let frames = decode_all(&decoder, &mut buffer);
        assert_eq!(frames, vec![Frame::Method { channel, method: Box::new(method) }]);
        assert!(buffer.is_empty());
    }
}

#[test]
fn a_message_round_trips_and_its_body_is_split_by_frame_max() {
    let decoder = FrameDecoder::new(FRAME_MIN_SIZE);
    let mut headers = FieldTable::default();
    headers.insert(ShortString::from("x-delay"), AMQPValue::LongInt(5_000));
    let properties = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2)
        .with_message_id(ShortString::from("order-42"))
        .with_headers(headers);
    let raw = encode_properties(&properties);
    let body: Vec<u8> = (0..10_000u32).map(|index| index as u8).collect();
    let mut buffer = BytesMut::new();
    encode_method(&mut buffer, 3, &publish()).unwrap();
    encode_content_header(&mut buffer, 3, body.len() as u64, &raw);
    encode_body(&mut buffer, 3, &body, FRAME_MIN_SIZE);
    let frames = decode_all(&decoder, &mut buffer);
    assert_eq!(frames.len(), 1 + 1 + 3, "10,000 bytes need three 4,096-byte frames");
    let Frame::Header { header, .. } = &frames[1] else { panic!("expected a header") };
    assert_eq!(header.body_size, 10_000);
    assert_eq!(header.properties, properties);
    assert_eq!(header.raw_properties, raw, "raw properties kept byte for byte");
    let received: Vec<u8> = frames[2..]
        .iter()
        .flat_map(|frame| match frame {
            Frame::Body { payload, .. } => payload.to_vec(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(received, body);
}

#[test]
fn a_payload_of_exactly_frame_max_is_accepted_and_one_byte_more_is_refused() {
    // RabbitMQ's check allows a payload of frame_max (8 bytes of allowance for the frame's own
    // overhead); clients that size body frames that way must not be cut off.
    let decoder = FrameDecoder::new(FRAME_MIN_SIZE);
    let body_frame = |payload_bytes: usize| {
        let mut buffer = BytesMut::new();
        buffer.put_u8(3);
        buffer.put_u16(1);
        buffer.put_u32(payload_bytes as u32);
        buffer.put_bytes(7, payload_bytes);
        buffer.put_u8(0xCE);
        buffer
    };
    let mut exact = body_frame(FRAME_MIN_SIZE as usize);
    let Some(Frame::Body { payload, .. }) = decoder.decode(&mut exact).unwrap() else { panic!("expected a body") };
    assert_eq!(payload.len(), FRAME_MIN_SIZE as usize);
    let error = decoder.decode(&mut body_frame(FRAME_MIN_SIZE as usize + 1)).unwrap_err();
    assert!(matches!(error, WireError::FrameTooLarge { payload_bytes: 4097, frame_max: FRAME_MIN_SIZE }), "{error:?}");
}

#[test]
fn an_oversized_frame_is_refused_from_its_header_alone() {
    let decoder = FrameDecoder::new(FRAME_MIN_SIZE);
    let mut buffer = BytesMut::new();
    // Only the 7-byte header of a 1 GiB body frame: refused before any payload arrives.
    buffer.put_u8(3);
    buffer.put_u16(1);
    buffer.put_u32(1 << 30);
    let error = decoder.decode(&mut buffer).unwrap_err();
    assert!(matches!(error, WireError::FrameTooLarge { frame_max: FRAME_MIN_SIZE, .. }), "{error:?}");
    assert_eq!(error.reply_code(), reply_code::FRAME_ERROR);
    assert!(buffer.capacity() < 1 << 20, "nothing was reserved for the oversized frame");
}

#[test]
fn structural_errors_map_to_their_reply_codes() {
    let decoder = FrameDecoder::new(FRAME_MIN_SIZE);
    let cases: Vec<(Vec<u8>, u16)> = vec![
        // Unknown frame type 9.
        (vec![9, 0, 1, 0, 0, 0, 0, 0xCE], reply_code::FRAME_ERROR),
        // Missing frame-end octet.
        (vec![8, 0, 0, 0, 0, 0, 0, 0x00], reply_code::FRAME_ERROR),
        // Heartbeat on channel 5.
        (vec![8, 0, 5, 0, 0, 0, 0, 0xCE], reply_code::FRAME_ERROR),
        // basic.999: unknown method.
        (vec![1, 0, 1, 0, 0, 0, 4, 0, 60, 3, 231, 0xCE], reply_code::NOT_IMPLEMENTED),
        // class 77: unknown class.
        (vec![1, 0, 1, 0, 0, 0, 4, 0, 77, 0, 10, 0xCE], reply_code::NOT_IMPLEMENTED),
        // basic.publish with its arguments cut off.
        (vec![1, 0, 1, 0, 0, 0, 6, 0, 60, 0, 40, 0, 0, 0xCE], reply_code::SYNTAX_ERROR),
        // A method frame too short to hold class and method ids.
        (vec![1, 0, 1, 0, 0, 0, 2, 0, 60, 0xCE], reply_code::SYNTAX_ERROR),
        // A content header too short for its fixed fields.
        (vec![2, 0, 1, 0, 0, 0, 3, 0, 60, 0, 0xCE], reply_code::SYNTAX_ERROR),
    ];
    for (bytes, code) in cases {
        let mut buffer = BytesMut::from(&bytes[..]);
        let error = decoder.decode(&mut buffer).expect_err(&format!("{bytes:?} must be refused"));
        assert_eq!(error.reply_code(), code, "{bytes:?}: {error}");
    }
}

#[test]
fn trailing_bytes_after_a_method_are_a_syntax_error() {
    let decoder = FrameDecoder::new(FRAME_MIN_SIZE);
    let mut encoded = BytesMut::new();
    encode_method(&mut encoded, 1, &publish()).unwrap();
    // Grow the payload by one byte and fix the size field.
    let mut bytes = encoded.to_vec();
    let end = bytes.pop().unwrap();
    bytes.push(0);
    bytes.push(end);
    let size = (bytes.len() - 8) as u32;
    bytes[3..7].copy_from_slice(&size.to_be_bytes());
    let error = decoder.decode(&mut BytesMut::from(&bytes[..])).unwrap_err();
    assert!(matches!(error, WireError::Malformed { what: "method", channel: 1 }), "{error:?}");
}

#[test]
fn the_protocol_header_is_checked() {
    let mut good = BytesMut::from(&frame::PROTOCOL_HEADER[..]);
    good.put_u8(8);
    assert_eq!(decode_protocol_header(&mut good).unwrap(), Some(ProtocolVersion::Amqp091));
    assert_eq!(good.len(), 1, "only the header is consumed");
    // RabbitMQ's older headers: 0-9 and 0-8, spoken as 0-9-1, with 0-8's version in connection.start.
    let mut older = BytesMut::from(&b"AMQP\x01\x01\x00\x09AMQP\x01\x01\x08\x00"[..]);
    assert_eq!(decode_protocol_header(&mut older).unwrap(), Some(ProtocolVersion::Amqp09));
    assert_eq!(decode_protocol_header(&mut older).unwrap(), Some(ProtocolVersion::Amqp08));
    assert_eq!(ProtocolVersion::Amqp09.start_version(), (0, 9));
    assert_eq!(ProtocolVersion::Amqp08.start_version(), (8, 0));
    assert_eq!(decode_protocol_header(&mut BytesMut::from(&b"AMQP\x01\x01"[..])).unwrap(), None);
    assert_eq!(decode_protocol_header(&mut BytesMut::from(&b"AMQ"[..])).unwrap(), None);
    for bad in [&b"GET / HTTP/1.1"[..], b"AMQP\x01\x01\x00\x0a", b"AMQP\x00\x00\x09\x02", b"\x16\x03\x01\x02\x00"] {
        let error = decode_protocol_header(&mut BytesMut::from(bad)).unwrap_err();
        assert!(matches!(error, WireError::BadProtocolHeader(_)), "{bad:?}");
    }
}

fn sample_stream() -> Vec<u8> {
    let mut buffer = BytesMut::new();
    encode_method(&mut buffer, 1, &declare()).unwrap();
    encode_method(&mut buffer, 1, &publish()).unwrap();
    encode_content_header(&mut buffer, 1, 5_000, &encode_properties(&BasicProperties::default().with_priority(3)));
    encode_body(&mut buffer, 1, &[42u8; 5_000], FRAME_MIN_SIZE);
    encode_heartbeat(&mut buffer);
    buffer.to_vec()
}

proptest! {
    #[test]
    fn decoding_is_the_same_at_any_split(cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        let stream = sample_stream();
        let decoder = FrameDecoder::new(FRAME_MIN_SIZE);
        let expected = decode_all(&decoder, &mut BytesMut::from(&stream[..]));
        let mut points: Vec<usize> = cuts.iter().map(|cut| cut.index(stream.len())).collect();
        points.sort_unstable();
        points.push(stream.len());
        let mut buffer = BytesMut::new();
        let mut frames = Vec::new();
        let mut from = 0;
        for to in points {
            buffer.extend_from_slice(&stream[from..to]);
            from = to;
            frames.extend(decode_all(&decoder, &mut buffer));
        }
        prop_assert_eq!(frames, expected);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let decoder = FrameDecoder::new(FRAME_MIN_SIZE);
        let mut buffer = BytesMut::from(&bytes[..]);
        // Decode until the input runs out or is refused; either is fine, a panic is not.
        while let Ok(Some(_)) = decoder.decode(&mut buffer) {}
        let mut header = BytesMut::from(&bytes[..]);
        let _ = decode_protocol_header(&mut header);
    }

    #[test]
    fn properties_encode_decode_reencode_to_the_same_bytes(
        content_type in proptest::option::of("[a-z/+.-]{0,40}"),
        delivery_mode in proptest::option::of(1u8..=2),
        priority in proptest::option::of(0u8..=9),
        message_id in proptest::option::of("[ -~]{0,60}"),
        timestamp in proptest::option::of(any::<u64>()),
        header_values in proptest::collection::vec(("[a-z-]{1,20}", any::<i64>()), 0..5),
    ) {
        let mut properties = BasicProperties::default();
        if let Some(value) = content_type { properties = properties.with_content_type(ShortString::from(value)); }
        if let Some(value) = delivery_mode { properties = properties.with_delivery_mode(value); }
        if let Some(value) = priority { properties = properties.with_priority(value); }
        if let Some(value) = message_id { properties = properties.with_message_id(ShortString::from(value)); }
        if let Some(value) = timestamp { properties = properties.with_timestamp(value); }
        if !header_values.is_empty() {
            let mut headers = FieldTable::default();
            for (key, value) in header_values {
                headers.insert(ShortString::from(key), AMQPValue::LongLongInt(value));
            }
            properties = properties.with_headers(headers);
        }
        let raw = encode_properties(&properties);
        let decoded = frame::decode_properties(&raw).expect("our own encoding parses");
        prop_assert_eq!(&decoded, &properties);
        prop_assert_eq!(encode_properties(&decoded), raw);
    }
}

#[test]
fn a_field_table_encodes_as_on_the_wire_and_decodes_back() {
    use wharf_wire::frame::{decode_field_table, encode_field_table};
    use wharf_wire::types::{AMQPValue, FieldArray, FieldTable, LongString};
    let mut inner = FieldTable::default();
    inner.insert("depth".into(), AMQPValue::LongInt(2));
    let mut table = FieldTable::default();
    table.insert("x-max-length".into(), AMQPValue::LongLongInt(1000));
    table.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(LongString::from(&b"dlx"[..])));
    table.insert(
        "x-steps".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(5), AMQPValue::Boolean(true)])),
    );
    table.insert("nested".into(), AMQPValue::FieldTable(inner));
    let bytes = encode_field_table(&table).unwrap();
    // The wire form: a 32-bit length of what follows, then the entries.
    assert_eq!(u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize, bytes.len() - 4);
    assert_eq!(decode_field_table(&bytes), Some(table));
    assert_eq!(encode_field_table(&FieldTable::default()).unwrap(), vec![0, 0, 0, 0]);
    assert_eq!(decode_field_table(&bytes[..bytes.len() - 1]), None, "truncated");
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert_eq!(decode_field_table(&trailing), None, "trailing bytes");
}

/// A field value: scalars, strings, and (to `levels` more levels) tables and arrays of them.
fn nested_value(levels: u32) -> impl Strategy<Value = AMQPValue> {
    use wharf_wire::types::{FieldArray, LongString};
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        "[a-z]{0,8}".prop_map(|text| AMQPValue::LongString(LongString::from(text.into_bytes()))),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(levels, 256, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3)
                .prop_map(|values| AMQPValue::FieldArray(FieldArray::from(values))),
            proptest::collection::btree_map("[a-z]{1,4}", inner, 0..3).prop_map(|entries| {
                let mut table = FieldTable::default();
                for (name, value) in entries {
                    table.insert(ShortString::from(name), value);
                }
                AMQPValue::FieldTable(table)
            }),
        ]
    })
}

/// How many tables and arrays deep a value nests (a scalar: 0).
fn nesting_of(value: &AMQPValue) -> usize {
    match value {
        AMQPValue::FieldTable(table) => 1 + table.inner().values().map(nesting_of).max().unwrap_or(0),
        AMQPValue::FieldArray(array) => 1 + array.as_slice().iter().map(nesting_of).max().unwrap_or(0),
        _ => 0,
    }
}

/// `value` wrapped in `levels` more single-entry tables.
fn wrapped(mut value: AMQPValue, levels: usize) -> AMQPValue {
    for _ in 0..levels {
        let mut table = FieldTable::default();
        table.insert("w".into(), value);
        value = AMQPValue::FieldTable(table);
    }
    value
}

proptest! {
    /// Nested tables and arrays of any shape: one nested up to the limit round-trips through the
    /// stored-table codec exactly; one nested deeper is refused, never parsed.
    #[test]
    fn nested_tables_round_trip_up_to_the_limit_and_are_refused_beyond(
        value in nested_value(6),
        extra in 0usize..70,
    ) {
        use wharf_wire::frame::{decode_field_table, encode_field_table};
        use wharf_wire::nesting::FIELD_NESTING_DEPTH_MAX;
        let mut table = FieldTable::default();
        table.insert("root".into(), wrapped(value, extra));
        let depth = 1 + table.inner().values().map(nesting_of).max().unwrap_or(0);
        let bytes = encode_field_table(&table).unwrap();
        if depth <= FIELD_NESTING_DEPTH_MAX {
            prop_assert_eq!(decode_field_table(&bytes), Some(table));
        } else {
            prop_assert_eq!(decode_field_table(&bytes), None);
        }
    }
}
