//! The frame decoder: what the `frame` target checks on any byte stream.
//!
//! - Decoding never panics, and a stream gives the same frames and the same error whether it
//!   arrives at once or in small pieces (a socket may split it anywhere).
//! - Each decoded frame consumes exactly its header's size plus the 8 bytes around the payload,
//!   and no payload is longer than `frame_max` (RabbitMQ's allowance); "need more bytes" consumes
//!   nothing.
//! - A decoded method re-encodes and decodes to the same method; a content header's raw
//!   properties parse to the parsed ones, and re-encode to a stable canonical form.
//! - No table in a decoded method or content header nests deeper than the limit.

use crate::tables::assert_within_limit;
use bytes::BytesMut;
use wharf_wire::frame::{self, FRAME_HEADER_BYTES, FRAME_MAX_LIMIT, FRAME_MIN_SIZE, FRAME_OVERHEAD_BYTES};
use wharf_wire::protocol::{AMQPClass, basic, connection, exchange, queue};
use wharf_wire::types::FieldTable;
use wharf_wire::{Frame, FrameDecoder, WireError};

/// Sizes of the pieces a stream is fed in, picked by the input's first byte.
const STEPS: [usize; 8] = [1, 2, 3, 7, 8, 13, 64, 4096];

/// The `frame` target. The first byte picks `frame_max` and how the stream is split; the rest is
/// the stream of frames, as it follows the protocol header on a connection.
pub fn check_stream(data: &[u8]) {
    let Some((&control, stream)) = data.split_first() else { return };
    let frame_max = if control & 0x80 == 0 { FRAME_MAX_LIMIT } else { FRAME_MIN_SIZE };
    let decoder = FrameDecoder::new(frame_max);
    let (frames, error) = decode_all(&decoder, stream, stream.len().max(1));
    let step = STEPS[usize::from(control) % STEPS.len()];
    let (pieces, piece_error) = decode_all(&decoder, stream, step);
    assert_eq!(debug_all(&pieces), debug_all(&frames), "frames differ when fed {step} bytes at a time");
    assert_eq!(piece_error, error, "the error differs when fed {step} bytes at a time");
    for frame in &frames {
        check_frame(frame);
    }
}

fn debug_all(frames: &[Frame]) -> Vec<String> {
    // Debug, not ==: a float NaN in a table is not equal to itself but prints the same.
    frames.iter().map(|frame| format!("{frame:?}")).collect()
}

/// Decodes `stream` fed `step` bytes at a time until it needs bytes that are not there, or fails.
pub fn decode_all(decoder: &FrameDecoder, stream: &[u8], step: usize) -> (Vec<Frame>, Option<WireError>) {
    let mut buffer = BytesMut::new();
    let mut fed = 0;
    let mut frames = Vec::new();
    loop {
        let before = buffer.len();
        let declared = (before >= FRAME_HEADER_BYTES)
            .then(|| u32::from_be_bytes([buffer[3], buffer[4], buffer[5], buffer[6]]) as usize);
        match decoder.decode(&mut buffer) {
            Ok(Some(frame)) => {
                let consumed = before - buffer.len();
                let declared = declared.expect("a frame decoded from fewer bytes than its header");
                assert_eq!(consumed, declared + FRAME_OVERHEAD_BYTES, "a frame consumed other than its size");
                assert!(declared <= decoder.frame_max() as usize, "a payload over frame_max was accepted");
                if let Frame::Body { payload, .. } = &frame {
                    assert_eq!(payload.len(), declared, "a body frame's payload is not its declared size");
                }
                frames.push(frame);
            }
            Ok(None) => {
                assert_eq!(buffer.len(), before, "\"need more bytes\" consumed bytes");
                if fed == stream.len() {
                    return (frames, None);
                }
                let next = (fed + step).min(stream.len());
                buffer.extend_from_slice(&stream[fed..next]);
                fed = next;
            }
            Err(error) => return (frames, Some(error)),
        }
    }
}

/// Decodes exactly one frame from `bytes`, with no limit on its size.
fn decode_one(bytes: &[u8]) -> Frame {
    let mut buffer = BytesMut::from(bytes);
    let frame = FrameDecoder::new(u32::MAX).decode(&mut buffer);
    let frame = match frame {
        Ok(Some(frame)) => frame,
        other => panic!("a re-encoded frame does not decode: {other:?}"),
    };
    assert!(buffer.is_empty(), "a re-encoded frame left bytes behind");
    frame
}

fn check_frame(frame: &Frame) {
    match frame {
        Frame::Method { channel, method } => {
            for table in method_tables(method) {
                assert_within_limit(table, "a method's arguments");
            }
            let mut out = BytesMut::new();
            frame::encode_method(&mut out, *channel, method)
                .unwrap_or_else(|error| panic!("a decoded method does not encode ({error}): {method:?}"));
            let again = decode_one(&out);
            assert_eq!(format!("{again:?}"), format!("{frame:?}"), "a method changed on a round trip");
        }
        Frame::Header { channel, header } => {
            if let Some(headers) = &header.properties.headers() {
                assert_within_limit(headers, "a content header's headers");
            }
            let reparsed = frame::decode_properties(&header.raw_properties);
            assert_eq!(
                format!("{reparsed:?}"),
                format!("{:?}", Some(&header.properties)),
                "the raw properties do not parse to the parsed ones"
            );
            let canonical = frame::encode_properties(&header.properties);
            let parsed = frame::decode_properties(&canonical)
                .unwrap_or_else(|| panic!("encoded properties do not decode: {:?}", header.properties));
            assert_eq!(format!("{parsed:?}"), format!("{:?}", header.properties), "properties changed on a round trip");
            assert_eq!(frame::encode_properties(&parsed), canonical, "re-encoding properties is not stable");
            if header.class_id == wharf_wire::methods::BASIC_CLASS_ID {
                let mut out = BytesMut::new();
                frame::encode_content_header(&mut out, *channel, header.body_size, &header.raw_properties);
                let again = decode_one(&out);
                assert_eq!(format!("{again:?}"), format!("{frame:?}"), "a content header changed on a round trip");
            }
        }
        Frame::Body { .. } | Frame::Heartbeat => {}
    }
}

/// Every field table a method carries (the nine methods of 0-9-1 that have one).
pub fn method_tables(method: &AMQPClass) -> Vec<&FieldTable> {
    match method {
        AMQPClass::Connection(connection::AMQPMethod::Start(start)) => vec![&start.server_properties],
        AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)) => vec![&start_ok.client_properties],
        AMQPClass::Exchange(exchange::AMQPMethod::Declare(declare)) => vec![&declare.arguments],
        AMQPClass::Exchange(exchange::AMQPMethod::Bind(bind)) => vec![&bind.arguments],
        AMQPClass::Exchange(exchange::AMQPMethod::Unbind(unbind)) => vec![&unbind.arguments],
        AMQPClass::Queue(queue::AMQPMethod::Declare(declare)) => vec![&declare.arguments],
        AMQPClass::Queue(queue::AMQPMethod::Bind(bind)) => vec![&bind.arguments],
        AMQPClass::Queue(queue::AMQPMethod::Unbind(unbind)) => vec![&unbind.arguments],
        AMQPClass::Basic(basic::AMQPMethod::Consume(consume)) => vec![&consume.arguments],
        _ => Vec::new(),
    }
}
