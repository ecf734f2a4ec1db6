//! AMQP 0-9-1 frames: the decoder that turns bytes from a socket into frames, and the encoders
//! for frames going out.
//!
//! A frame is `type u8 | channel u16 | size u32 | payload | 0xCE`. The decoder reads the 7-byte
//! header first and refuses a frame larger than the negotiated `frame_max` *before* buffering its
//! payload, so a peer cannot make the server allocate more than one frame's worth. Like RabbitMQ
//! (whose check has an allowance of one frame's overhead), it accepts a *payload* of up to
//! `frame_max` bytes: several clients size body frames that way, and refusing them would break
//! large messages with those clients. Frames this server sends stay within `frame_max` in all. Bodies are
//! split off the read buffer as `Bytes` without copying. Method and content-header payloads are
//! parsed by `amq-protocol`; the raw property bytes of a content header are kept alongside the
//! parsed ones so a message can be stored and delivered without re-encoding them.

use crate::error::WireError;
use crate::methods;
use crate::nesting;
use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::{AMQPClass, BasicProperties, basic, gen_class, parse_class};
use amq_protocol::types::FieldTable;
use amq_protocol::types::generation::gen_field_table;
use amq_protocol::types::parsing::parse_field_table;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// What a client sends first.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";
/// The AMQP 0-9 header, which RabbitMQ also accepts (and then speaks 0-9-1, as this server does).
pub const PROTOCOL_HEADER_0_9: [u8; 8] = *b"AMQP\x01\x01\x00\x09";
/// The AMQP 0-8 header, which RabbitMQ also accepts.
pub const PROTOCOL_HEADER_0_8: [u8; 8] = *b"AMQP\x01\x01\x08\x00";

/// The protocol version a client asked for in its header. Every one of them is then spoken as
/// 0-9-1, which is a superset in everything a client of the older ones sends; only the version in
/// `connection.start` tells them apart, as in RabbitMQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolVersion {
    /// `AMQP 0 0 9 1`.
    Amqp091,
    /// `AMQP 1 1 0 9`.
    Amqp09,
    /// `AMQP 1 1 8 0`.
    Amqp08,
}

impl ProtocolVersion {
    /// The `version_major` and `version_minor` of `connection.start` for this version: 0-9 for
    /// 0-9-1 too (the 0-9-1 specification says so), 8-0 for 0-8.
    pub fn start_version(self) -> (u8, u8) {
        match self {
            ProtocolVersion::Amqp091 | ProtocolVersion::Amqp09 => (0, 9),
            ProtocolVersion::Amqp08 => (8, 0),
        }
    }
}
/// Frame header: type, channel, payload size.
pub const FRAME_HEADER_BYTES: usize = 7;
/// Header plus the frame-end octet: what a frame costs beyond its payload.
pub const FRAME_OVERHEAD_BYTES: usize = 8;
/// The frame-end octet.
pub const FRAME_END: u8 = 0xCE;
/// The smallest `frame_max` the specification allows; frames up to this size are always accepted,
/// also before tuning.
pub const FRAME_MIN_SIZE: u32 = 4096;
/// The largest `frame_max` this server negotiates (RabbitMQ's default too).
pub const FRAME_MAX_LIMIT: u32 = 131_072;
/// Content-header payload bytes before the properties: class id, weight, body size.
const CONTENT_HEADER_FIXED_BYTES: usize = 12;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;

/// A content header: the size of the body to come and the message's properties.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentHeader {
    /// The content class (60, basic, for everything this server accepts).
    pub class_id: u16,
    /// Total body size in bytes, announced before the body frames.
    pub body_size: u64,
    /// The parsed properties.
    pub properties: BasicProperties,
    /// The property flags and fields exactly as received, for storing and delivering unchanged.
    pub raw_properties: Bytes,
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A method (boxed: method payloads are large and frames move through channels).
    Method {
        /// The channel.
        channel: u16,
        /// The method and its arguments.
        method: Box<AMQPClass>,
    },
    /// A content header (boxed like methods: the parsed properties are large).
    Header {
        /// The channel.
        channel: u16,
        /// The header.
        header: Box<ContentHeader>,
    },
    /// A piece of a message body.
    Body {
        /// The channel.
        channel: u16,
        /// The bytes, shared with the read buffer.
        payload: Bytes,
    },
    /// A heartbeat (always channel 0).
    Heartbeat,
}

impl Frame {
    /// The channel the frame belongs to.
    pub fn channel(&self) -> u16 {
        match self {
            Frame::Method { channel, .. } | Frame::Header { channel, .. } | Frame::Body { channel, .. } => *channel,
            Frame::Heartbeat => 0,
        }
    }
}

/// Checks the 8-byte protocol header a connection starts with. `Ok(None)` until 8 bytes are here.
pub fn decode_protocol_header(buffer: &mut BytesMut) -> Result<Option<ProtocolVersion>, WireError> {
    let known = [
        (PROTOCOL_HEADER, ProtocolVersion::Amqp091),
        (PROTOCOL_HEADER_0_9, ProtocolVersion::Amqp09),
        (PROTOCOL_HEADER_0_8, ProtocolVersion::Amqp08),
    ];
    if buffer.len() < PROTOCOL_HEADER.len() {
        // Fail early on anything that cannot become "AMQP": an HTTP request, TLS, garbage.
        if buffer.len() >= 4 && !known.iter().any(|(header, _)| header.starts_with(&buffer[..])) {
            let mut received = [0u8; 8];
            received[..buffer.len()].copy_from_slice(buffer);
            return Err(WireError::BadProtocolHeader(received));
        }
        return Ok(None);
    }
    let mut received = [0u8; 8];
    received.copy_from_slice(&buffer[..8]);
    let Some((_, version)) = known.iter().find(|(header, _)| *header == received) else {
        return Err(WireError::BadProtocolHeader(received));
    };
    buffer.advance(8);
    Ok(Some(*version))
}

/// Decodes frames from a connection's read buffer.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    frame_max: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder { frame_max: FRAME_MIN_SIZE }
    }
}

impl FrameDecoder {
    /// A decoder accepting payloads up to `frame_max` bytes (clamped to at least [`FRAME_MIN_SIZE`]):
    /// a whole frame may be [`FRAME_OVERHEAD_BYTES`] longer, as RabbitMQ allows.
    pub fn new(frame_max: u32) -> Self {
        FrameDecoder { frame_max: frame_max.max(FRAME_MIN_SIZE) }
    }

    /// The limit in force.
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// Changes the limit (after `connection.tune-ok`).
    pub fn set_frame_max(&mut self, frame_max: u32) {
        self.frame_max = frame_max.max(FRAME_MIN_SIZE);
    }

    /// Takes one frame off the front of `buffer`, or returns `Ok(None)` if more bytes are needed
    /// (having reserved room for the rest of the frame). Errors are fatal for the connection.
    pub fn decode(&self, buffer: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        if buffer.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let frame_type = buffer[0];
        let channel = u16::from_be_bytes([buffer[1], buffer[2]]);
        let size = u32::from_be_bytes([buffer[3], buffer[4], buffer[5], buffer[6]]);
        if !matches!(frame_type, FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT) {
            return Err(WireError::UnknownFrameType(frame_type));
        }
        if size > self.frame_max {
            return Err(WireError::FrameTooLarge { payload_bytes: size, frame_max: self.frame_max });
        }
        let frame_bytes = size as usize + FRAME_OVERHEAD_BYTES;
        if buffer.len() < frame_bytes {
            buffer.reserve(frame_bytes - buffer.len());
            return Ok(None);
        }
        let end = buffer[frame_bytes - 1];
        if end != FRAME_END {
            return Err(WireError::BadFrameEnd(end));
        }
        let mut frame = buffer.split_to(frame_bytes).freeze();
        frame.advance(FRAME_HEADER_BYTES);
        frame.truncate(size as usize);
        let payload = frame;
        match frame_type {
            FRAME_METHOD => decode_method(channel, &payload).map(Some),
            FRAME_HEADER => decode_content_header(channel, payload).map(Some),
            FRAME_BODY => Ok(Some(Frame::Body { channel, payload })),
            _ if channel != 0 => Err(WireError::HeartbeatOnChannel(channel)),
            _ => Ok(Some(Frame::Heartbeat)),
        }
    }
}

fn decode_method(channel: u16, payload: &[u8]) -> Result<Frame, WireError> {
    let malformed = WireError::Malformed { what: "method", channel };
    if payload.len() < 4 {
        return Err(malformed);
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let method_id = u16::from_be_bytes([payload[2], payload[3]]);
    if methods::name(class_id, method_id).is_none() {
        return Err(WireError::UnknownMethod { class_id, method_id });
    }
    let arguments = &payload[4..];
    if let Some(offset) = nesting::method_table_offset(class_id, method_id, arguments)
        && nesting::check_table(&arguments[offset..]).is_err()
    {
        return Err(WireError::NestedTooDeep { what: "method", channel });
    }
    match parse_class(payload) {
        Ok(([], method)) => Ok(Frame::Method { channel, method: Box::new(method) }),
        _ => Err(malformed),
    }
}

fn decode_content_header(channel: u16, payload: Bytes) -> Result<Frame, WireError> {
    let malformed = WireError::Malformed { what: "content header", channel };
    if payload.len() < CONTENT_HEADER_FIXED_BYTES {
        return Err(malformed);
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let body_size = u64::from_be_bytes([
        payload[4],
        payload[5],
        payload[6],
        payload[7],
        payload[8],
        payload[9],
        payload[10],
        payload[11],
    ]);
    let raw_properties = payload.slice(CONTENT_HEADER_FIXED_BYTES..);
    if headers_too_deep(&raw_properties) {
        return Err(WireError::NestedTooDeep { what: "content header", channel });
    }
    let properties = parse_properties(&raw_properties).ok_or(malformed)?;
    Ok(Frame::Header { channel, header: Box::new(ContentHeader { class_id, body_size, properties, raw_properties }) })
}

/// Whether raw properties carry a `headers` table nested deeper than the limit.
fn headers_too_deep(raw_properties: &[u8]) -> bool {
    nesting::properties_table_offset(raw_properties)
        .is_some_and(|offset| nesting::check_table(&raw_properties[offset..]).is_err())
}

/// Parses raw property bytes (flags and fields) as stored or received; `None` if they do not
/// parse, or if their headers nest deeper than `nesting::FIELD_NESTING_DEPTH_MAX`.
pub fn decode_properties(raw: &[u8]) -> Option<BasicProperties> {
    if headers_too_deep(raw) {
        return None;
    }
    parse_properties(raw)
}

/// Parses raw properties whose headers were already checked for depth.
fn parse_properties(raw: &[u8]) -> Option<BasicProperties> {
    match basic::parse_properties(raw) {
        Ok(([], properties)) => Some(properties),
        _ => None,
    }
}

/// Encodes properties to the raw form a content header carries.
pub fn encode_properties(properties: &BasicProperties) -> Bytes {
    let mut out = Vec::with_capacity(64);
    out = match basic::gen_properties(properties)(WriteContext::from(out)) {
        Ok(context) => context.write,
        // Writing to a Vec cannot run out of space; an error here means the properties cannot be
        // represented (a value over its protocol limit), so they are sent empty.
        Err(_) => Vec::from([0u8, 0u8]),
    };
    Bytes::from(out)
}

/// Encodes a field table as AMQP 0-9-1 puts it on the wire (a 32-bit length, then each entry as
/// a short-string name and a tagged value, RabbitMQ's dialect of the tags). Used beyond the wire
/// where a table must be stored in a format that does not move with a library's internals: the
/// wire format is fixed by the protocol. `None` only for a table no peer could have sent (a
/// value over its protocol limit).
pub fn encode_field_table(table: &FieldTable) -> Option<Vec<u8>> {
    match gen_field_table(table)(WriteContext::from(Vec::with_capacity(64))) {
        Ok(context) => Some(context.write),
        Err(_) => None,
    }
}

/// Decodes what [`encode_field_table`] wrote; `None` unless `bytes` is exactly one table, nested
/// no deeper than `nesting::FIELD_NESTING_DEPTH_MAX`.
pub fn decode_field_table(bytes: &[u8]) -> Option<FieldTable> {
    nesting::check_table(bytes).ok()?;
    match parse_field_table(bytes) {
        Ok(([], table)) => Some(table),
        _ => None,
    }
}

fn put_frame_header(out: &mut BytesMut, frame_type: u8, channel: u16, size: usize) {
    out.put_u8(frame_type);
    out.put_u16(channel);
    out.put_u32(size as u32);
}

/// Appends a method frame. Returns an error only for a method whose arguments cannot be encoded
/// (a string over its protocol limit).
pub fn encode_method(out: &mut BytesMut, channel: u16, method: &AMQPClass) -> Result<(), WireError> {
    let payload = match gen_class(method)(WriteContext::from(Vec::with_capacity(64))) {
        Ok(context) => context.write,
        Err(_) => return Err(WireError::Malformed { what: "outgoing method", channel }),
    };
    put_frame_header(out, FRAME_METHOD, channel, payload.len());
    out.put_slice(&payload);
    out.put_u8(FRAME_END);
    Ok(())
}

/// Appends a content header frame for the basic class with properties already encoded.
pub fn encode_content_header(out: &mut BytesMut, channel: u16, body_size: u64, raw_properties: &[u8]) {
    put_frame_header(out, FRAME_HEADER, channel, CONTENT_HEADER_FIXED_BYTES + raw_properties.len());
    out.put_u16(60);
    out.put_u16(0);
    out.put_u64(body_size);
    out.put_slice(raw_properties);
    out.put_u8(FRAME_END);
}

/// Appends the body as as many body frames as `frame_max` requires (none for an empty body).
pub fn encode_body(out: &mut BytesMut, channel: u16, body: &[u8], frame_max: u32) {
    let chunk_bytes = (frame_max.max(FRAME_MIN_SIZE) as usize) - FRAME_OVERHEAD_BYTES;
    for chunk in body.chunks(chunk_bytes) {
        put_frame_header(out, FRAME_BODY, channel, chunk.len());
        out.put_slice(chunk);
        out.put_u8(FRAME_END);
    }
}

/// Appends a heartbeat frame.
pub fn encode_heartbeat(out: &mut BytesMut) {
    put_frame_header(out, FRAME_HEARTBEAT, 0, 0);
    out.put_u8(FRAME_END);
}

/// Appends the protocol header (sent back to a client that asked for another version).
pub fn encode_protocol_header(out: &mut BytesMut) {
    out.put_slice(&PROTOCOL_HEADER);
}
