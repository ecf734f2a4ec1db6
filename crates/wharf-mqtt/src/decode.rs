//! Decoding: [`Decoder`] takes whole packets off a read buffer. The fixed header's remaining
//! length is read (at most four bytes) and checked against the packet limit before anything is
//! buffered for the packet; then the packet is parsed from a bounded [`Reader`] that cannot run
//! past it, and must use every byte of it.

use crate::error::DecodeError;
use crate::packet::*;
use crate::properties::{Place, Properties};
use bytes::{Buf, Bytes, BytesMut};

/// The largest packet the server takes unless configured otherwise (the whole packet, fixed
/// header included, as MQTT 5.0's maximum packet size counts it).
pub const PACKET_BYTES_MAX_DEFAULT: u32 = 16 * 1024 * 1024;

/// The largest remaining length four bytes can hold (section 1.5.5).
const REMAINING_LENGTH_MAX: u32 = 268_435_455;

/// The largest packet MQTT can carry: the longest remaining length and a five-byte fixed header.
pub const PACKET_BYTES_MAX_LIMIT: u32 = REMAINING_LENGTH_MAX + 5;

/// A cursor over one packet's bytes; every read checks that the bytes are there.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    /// The packet as shared bytes, so binary fields are sliced without copying.
    shared: &'a Bytes,
    /// Where `bytes` starts within `shared`.
    offset: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(shared: &'a Bytes) -> Reader<'a> {
        Reader { bytes: shared, shared, offset: 0 }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], DecodeError> {
        if count > self.bytes.len() {
            return Err(DecodeError::malformed(format!(
                "a field of {count} bytes runs past the end of its packet ({} left)",
                self.bytes.len()
            )));
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        self.offset += count;
        Ok(taken)
    }

    /// The next `length` bytes as a reader of their own (a property list).
    pub(crate) fn sub(&mut self, length: usize) -> Result<Reader<'a>, DecodeError> {
        let start = self.offset;
        let bytes = self.take(length)?;
        Ok(Reader { bytes, shared: self.shared, offset: start })
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// A variable byte integer (at most four bytes).
    pub(crate) fn variable_int(&mut self) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for index in 0..4 {
            let byte = self.u8()?;
            value |= u32::from(byte & 0x7F) << (7 * index);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::malformed("a variable byte integer longer than four bytes"))
    }

    /// Two-byte length and bytes.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let length = usize::from(self.u16()?);
        let start = self.offset;
        self.take(length)?;
        Ok(self.shared.slice(start..start + length))
    }

    /// A UTF-8 string (section 1.5.4): well formed, and without U+0000.
    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let length = usize::from(self.u16()?);
        let bytes = self.take(length)?;
        let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::malformed("a string that is not UTF-8"))?;
        if text.contains('\0') {
            return Err(DecodeError::malformed("a string with the null character"));
        }
        Ok(text.to_owned())
    }

    /// What is left of the packet, as shared bytes (a PUBLISH payload).
    fn rest(&mut self) -> Bytes {
        let start = self.offset;
        self.offset += self.bytes.len();
        self.bytes = &[];
        self.shared.slice(start..)
    }

    /// The packet must end here.
    fn end(&self, packet: &str) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::malformed(format!("{} bytes left over at the end of {packet}", self.bytes.len())))
        }
    }
}

/// Takes packets off a connection's read buffer. It starts knowing no version: the first packet
/// must be CONNECT, and [`Decoder::set_version`] records what it said.
#[derive(Debug, Clone)]
pub struct Decoder {
    version: Option<Version>,
    packet_bytes_max: u32,
}

impl Decoder {
    pub fn new(packet_bytes_max: u32) -> Decoder {
        Decoder { version: None, packet_bytes_max }
    }

    /// A new packet limit (the front end raises it once the client has logged in).
    pub fn set_packet_bytes_max(&mut self, packet_bytes_max: u32) {
        self.packet_bytes_max = packet_bytes_max;
    }

    pub fn set_version(&mut self, version: Version) {
        self.version = Some(version);
    }

    pub fn version(&self) -> Option<Version> {
        self.version
    }

    /// The next whole packet, `None` if more bytes are needed. An error leaves the buffer as it
    /// was; the connection ends after it.
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let Some((first, header_bytes, remaining)) = fixed_header(buffer)? else {
            return Ok(None);
        };
        let size_bytes = header_bytes as u64 + u64::from(remaining);
        if size_bytes > u64::from(self.packet_bytes_max) {
            return Err(DecodeError::TooLarge { size_bytes, limit_bytes: self.packet_bytes_max });
        }
        if (buffer.len() as u64) < size_bytes {
            // Room for the rest, once: the limit was checked above.
            buffer.reserve(size_bytes as usize - buffer.len());
            return Ok(None);
        }
        let type_code = first >> 4;
        let flags = first & 0x0F;
        if self.version.is_none() && type_code != 1 {
            return Err(DecodeError::protocol(format!("the first packet must be CONNECT, not type {type_code}")));
        }
        buffer.advance(header_bytes);
        let body = if type_code == 1 {
            // A CONNECT is copied out: its fields (the password, a will's payload) live as long
            // as the connection, and a slice would keep the whole read buffer with them.
            let body = Bytes::copy_from_slice(&buffer[..remaining as usize]);
            buffer.advance(remaining as usize);
            body
        } else {
            buffer.split_to(remaining as usize).freeze()
        };
        let version = self.version.unwrap_or(Version::V311);
        let packet = parse(type_code, flags, &body, version)?;
        if let Packet::Connect(connect) = &packet {
            if self.version.is_some() {
                return Err(DecodeError::protocol("a second CONNECT"));
            }
            self.version = Some(connect.version);
        }
        Ok(Some(packet))
    }
}

/// The first byte, the fixed header's length and the remaining length; `None` until all of the
/// fixed header is there.
fn fixed_header(buffer: &[u8]) -> Result<Option<(u8, usize, u32)>, DecodeError> {
    let Some(&first) = buffer.first() else { return Ok(None) };
    let mut remaining: u32 = 0;
    for index in 0..4 {
        let Some(&byte) = buffer.get(1 + index) else { return Ok(None) };
        remaining |= u32::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            debug_assert!(remaining <= REMAINING_LENGTH_MAX);
            return Ok(Some((first, 2 + index, remaining)));
        }
    }
    Err(DecodeError::malformed("a remaining length longer than four bytes"))
}

/// The flags every packet but PUBLISH must have (section 2.1.3).
fn check_flags(type_code: u8, flags: u8) -> Result<(), DecodeError> {
    let expected = if matches!(type_code, 6 | 8 | 10) { 0b0010 } else { 0 };
    if flags != expected {
        return Err(DecodeError::malformed(format!("packet type {type_code} with flags {flags:#06b}")));
    }
    Ok(())
}

fn packet_id(reader: &mut Reader<'_>) -> Result<u16, DecodeError> {
    let id = reader.u16()?;
    if id == 0 {
        return Err(DecodeError::malformed("packet identifier 0"));
    }
    Ok(id)
}

fn parse(type_code: u8, flags: u8, body: &Bytes, version: Version) -> Result<Packet, DecodeError> {
    let mut reader = Reader::new(body);
    let v5 = version.is_v5();
    if type_code != 3 {
        if type_code == 0 {
            return Err(DecodeError::malformed("packet type 0 is reserved"));
        }
        check_flags(type_code, flags)?;
    }
    let packet = match type_code {
        1 => Packet::Connect(Box::new(connect(&mut reader)?)),
        2 => {
            let acknowledge = reader.u8()?;
            if acknowledge > 1 {
                return Err(DecodeError::malformed("CONNACK flags other than session present"));
            }
            let code = reader.u8()?;
            // A 3.1.1 return code is read as the 5.0 reason it stands for (what `ConnAck` holds).
            let reason = if v5 {
                code
            } else {
                crate::reason::connack_reason_from_v3(code)
                    .ok_or_else(|| DecodeError::malformed(format!("CONNACK return code {code}")))?
            };
            let properties = if v5 { Properties::read(&mut reader, Place::ConnAck)? } else { Properties::default() };
            Packet::ConnAck(ConnAck { session_present: acknowledge == 1, reason, properties })
        }
        3 => Packet::Publish(publish(&mut reader, flags, v5)?),
        4..=7 => {
            let ack = acknowledgement(&mut reader, v5)?;
            match type_code {
                4 => Packet::PubAck(ack),
                5 => Packet::PubRec(ack),
                6 => Packet::PubRel(ack),
                _ => Packet::PubComp(ack),
            }
        }
        8 => Packet::Subscribe(subscribe(&mut reader, v5)?),
        9 => {
            let packet_id = packet_id(&mut reader)?;
            let properties = if v5 { Properties::read(&mut reader, Place::SubAck)? } else { Properties::default() };
            let mut reasons = Vec::new();
            while !reader.is_empty() {
                let code = reader.u8()?;
                if !v5 && !matches!(code, 0 | 1 | 2 | 0x80) {
                    return Err(DecodeError::malformed(format!("SUBACK return code {code:#x}")));
                }
                reasons.push(code);
            }
            Packet::SubAck(SubAck { packet_id, reasons, properties })
        }
        10 => {
            let packet_id = packet_id(&mut reader)?;
            let properties =
                if v5 { Properties::read(&mut reader, Place::Unsubscribe)? } else { Properties::default() };
            let mut filters = Vec::new();
            while !reader.is_empty() {
                let filter = reader.string()?;
                crate::topic::check_filter(&filter).map_err(DecodeError::protocol)?;
                filters.push(filter);
            }
            if filters.is_empty() {
                return Err(DecodeError::protocol("UNSUBSCRIBE without a topic filter"));
            }
            Packet::Unsubscribe(Unsubscribe { packet_id, filters, properties })
        }
        11 => {
            let packet_id = packet_id(&mut reader)?;
            let mut reasons = Vec::new();
            let properties = if v5 {
                let properties = Properties::read(&mut reader, Place::UnsubAck)?;
                while !reader.is_empty() {
                    reasons.push(reader.u8()?);
                }
                properties
            } else {
                Properties::default()
            };
            Packet::UnsubAck(UnsubAck { packet_id, reasons, properties })
        }
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => {
            // 5.0: no bytes means success without properties.
            let (reason, properties) = if v5 && !reader.is_empty() {
                let reason = reader.u8()?;
                let properties = if reader.is_empty() {
                    Properties::default()
                } else {
                    Properties::read(&mut reader, Place::Disconnect)?
                };
                (reason, properties)
            } else {
                (0, Properties::default())
            };
            Packet::Disconnect(Disconnect { reason, properties })
        }
        15 if v5 => {
            let (reason, properties) = if reader.is_empty() {
                (0, Properties::default())
            } else {
                let reason = reader.u8()?;
                let properties =
                    if reader.is_empty() { Properties::default() } else { Properties::read(&mut reader, Place::Auth)? };
                (reason, properties)
            };
            Packet::Auth(Auth { reason, properties })
        }
        _ => return Err(DecodeError::protocol(format!("unknown packet type {type_code}"))),
    };
    reader.end("the packet")?;
    Ok(packet)
}

fn connect(reader: &mut Reader<'_>) -> Result<Connect, DecodeError> {
    let name = reader.string()?;
    let level = reader.u8()?;
    let version = match (name.as_str(), level) {
        ("MQTT", 4) => Version::V311,
        ("MQTT", 5) => Version::V5,
        ("MQIsdp", 3) => Version::V31,
        _ => return Err(DecodeError::UnsupportedVersion { name, level }),
    };
    let flags = reader.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::malformed("CONNECT's reserved flag is set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos_bits = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos_bits != 0 || will_retain) {
        return Err(DecodeError::malformed("will QoS or retain set without a will"));
    }
    let will_qos = QoS::from_bits(will_qos_bits).ok_or_else(|| DecodeError::malformed("will QoS 3"))?;
    if version != Version::V5 && password_flag && !username_flag {
        return Err(DecodeError::malformed("a password without a user name"));
    }
    let keep_alive_s = reader.u16()?;
    let v5 = version.is_v5();
    let properties = if v5 { Properties::read(reader, Place::Connect)? } else { Properties::default() };
    let client_id = reader.string()?;
    let will = if will_flag {
        let properties = if v5 { Properties::read(reader, Place::Will)? } else { Properties::default() };
        let topic = reader.string()?;
        crate::topic::check_name(&topic).map_err(DecodeError::TopicName)?;
        let payload = reader.binary()?;
        Some(Will { topic, payload, qos: will_qos, retain: will_retain, properties })
    } else {
        None
    };
    let username = if username_flag { Some(reader.string()?) } else { None };
    let password = if password_flag { Some(reader.binary()?) } else { None };
    Ok(Connect { version, client_id, clean_start, keep_alive_s, username, password, will, properties })
}

fn publish(reader: &mut Reader<'_>, flags: u8, v5: bool) -> Result<Publish, DecodeError> {
    let dup = flags & 0x08 != 0;
    let qos = QoS::from_bits((flags >> 1) & 0x03).ok_or_else(|| DecodeError::malformed("PUBLISH with QoS 3"))?;
    let retain = flags & 0x01 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::malformed("PUBLISH with QoS 0 and DUP set"));
    }
    let topic = reader.string()?;
    let packet_id = if qos == QoS::AtMostOnce { 0 } else { packet_id(reader)? };
    let properties = if v5 { Properties::read(reader, Place::Publish)? } else { Properties::default() };
    if topic.is_empty() {
        if properties.topic_alias.is_none() {
            return Err(DecodeError::TopicName("an empty topic name without a topic alias".into()));
        }
    } else {
        crate::topic::check_name(&topic).map_err(DecodeError::TopicName)?;
    }
    if !v5 && properties != Properties::default() {
        return Err(DecodeError::protocol("properties in a 3.1.1 PUBLISH"));
    }
    let payload = reader.rest();
    Ok(Publish { dup, qos, retain, topic, packet_id, properties, payload })
}

fn acknowledgement(reader: &mut Reader<'_>, v5: bool) -> Result<Ack, DecodeError> {
    let packet_id = packet_id(reader)?;
    // 5.0: without a reason code it is success; without properties, none.
    let reason = if v5 && !reader.is_empty() { reader.u8()? } else { 0 };
    let properties =
        if v5 && !reader.is_empty() { Properties::read(reader, Place::Ack)? } else { Properties::default() };
    Ok(Ack { packet_id, reason, properties })
}

fn subscribe(reader: &mut Reader<'_>, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(reader)?;
    let properties = if v5 { Properties::read(reader, Place::Subscribe)? } else { Properties::default() };
    let mut subscriptions = Vec::new();
    while !reader.is_empty() {
        let filter = reader.string()?;
        let options = reader.u8()?;
        let reserved = if v5 { options & 0xC0 } else { options & 0xFC };
        if reserved != 0 {
            return Err(DecodeError::malformed("reserved bits set in subscription options"));
        }
        let qos = QoS::from_bits(options & 0x03).ok_or_else(|| DecodeError::malformed("subscription QoS 3"))?;
        let retain_handling = match (options >> 4) & 0x03 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendAtNewSubscribe,
            2 => RetainHandling::DoNotSend,
            _ => return Err(DecodeError::protocol("retain handling 3")),
        };
        let options = SubscriptionOptions {
            qos,
            no_local: options & 0x04 != 0,
            retain_as_published: options & 0x08 != 0,
            retain_handling,
        };
        // A filter that is not allowed gets its own refusal in SUBACK, not a closed connection.
        subscriptions.push(Subscription { filter, options });
    }
    if subscriptions.is_empty() {
        return Err(DecodeError::protocol("SUBSCRIBE without a subscription"));
    }
    Ok(Subscribe { packet_id, subscriptions, properties })
}
