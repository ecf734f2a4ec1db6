//! MQTT 5.0 properties (section 2.2.2): one struct for every packet's, and the table of which
//! property each packet may carry. Decoding refuses an unknown property, one the packet may not
//! carry, and a repeated one (except user properties and a PUBLISH's subscription identifiers).

use crate::decode::Reader;
use crate::error::DecodeError;
use bytes::{BufMut, Bytes, BytesMut};

/// A user property: a name and value pair, kept in order (names may repeat).
pub type UserProperty = (String, String);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval_s: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval_s: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive_s: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval_s: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<UserProperty>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

/// Where a property list sits, for the table of what it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    Connect,
    ConnAck,
    Publish,
    Will,
    Ack,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
const CONTENT_TYPE: u8 = 0x03;
const RESPONSE_TOPIC: u8 = 0x08;
const CORRELATION_DATA: u8 = 0x09;
const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
const SERVER_KEEP_ALIVE: u8 = 0x13;
const AUTHENTICATION_METHOD: u8 = 0x15;
const AUTHENTICATION_DATA: u8 = 0x16;
const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
const WILL_DELAY_INTERVAL: u8 = 0x18;
const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
const RESPONSE_INFORMATION: u8 = 0x1A;
const SERVER_REFERENCE: u8 = 0x1C;
const REASON_STRING: u8 = 0x1F;
const RECEIVE_MAXIMUM: u8 = 0x21;
const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
const TOPIC_ALIAS: u8 = 0x23;
const MAXIMUM_QOS: u8 = 0x24;
const RETAIN_AVAILABLE: u8 = 0x25;
const USER_PROPERTY: u8 = 0x26;
const MAXIMUM_PACKET_SIZE: u8 = 0x27;
const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

/// Whether `id` may appear in a property list at `place` (the table of section 2.2.2.2).
fn allowed(id: u8, place: Place) -> bool {
    use Place::*;
    match id {
        PAYLOAD_FORMAT_INDICATOR | MESSAGE_EXPIRY_INTERVAL | CONTENT_TYPE | RESPONSE_TOPIC | CORRELATION_DATA => {
            matches!(place, Publish | Will)
        }
        SUBSCRIPTION_IDENTIFIER => matches!(place, Publish | Subscribe),
        SESSION_EXPIRY_INTERVAL => matches!(place, Connect | ConnAck | Disconnect),
        ASSIGNED_CLIENT_IDENTIFIER | SERVER_KEEP_ALIVE | RESPONSE_INFORMATION | MAXIMUM_QOS | RETAIN_AVAILABLE => {
            place == ConnAck
        }
        WILDCARD_SUBSCRIPTION_AVAILABLE | SUBSCRIPTION_IDENTIFIER_AVAILABLE | SHARED_SUBSCRIPTION_AVAILABLE => {
            place == ConnAck
        }
        AUTHENTICATION_METHOD | AUTHENTICATION_DATA => matches!(place, Connect | ConnAck | Auth),
        REQUEST_PROBLEM_INFORMATION | REQUEST_RESPONSE_INFORMATION => place == Connect,
        WILL_DELAY_INTERVAL => place == Will,
        SERVER_REFERENCE => matches!(place, ConnAck | Disconnect),
        REASON_STRING => matches!(place, ConnAck | Ack | SubAck | UnsubAck | Disconnect | Auth),
        RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | MAXIMUM_PACKET_SIZE => matches!(place, Connect | ConnAck),
        TOPIC_ALIAS => place == Publish,
        USER_PROPERTY => true,
        _ => false,
    }
}

/// Sets `slot` once; a second value is a protocol error.
fn once<T>(slot: &mut Option<T>, value: T, name: &str) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::protocol(format!("property {name} given twice")));
    }
    *slot = Some(value);
    Ok(())
}

/// A byte property whose only values are 0 and 1.
fn flag(reader: &mut Reader<'_>, name: &str) -> Result<u8, DecodeError> {
    let value = reader.u8()?;
    if value > 1 {
        return Err(DecodeError::protocol(format!("property {name} is {value}, not 0 or 1")));
    }
    Ok(value)
}

impl Properties {
    /// Reads a property list (its length, then the properties) at `place`.
    pub(crate) fn read(reader: &mut Reader<'_>, place: Place) -> Result<Properties, DecodeError> {
        let length = reader.variable_int()? as usize;
        let mut list = reader.sub(length)?;
        let mut properties = Properties::default();
        while !list.is_empty() {
            let id = list.variable_int()?;
            let id = u8::try_from(id).map_err(|_| DecodeError::protocol(format!("unknown property {id:#x}")))?;
            if !allowed(id, place) {
                return Err(DecodeError::protocol(format!("property {id:#04x} is not allowed in {place:?}")));
            }
            let p = &mut properties;
            match id {
                PAYLOAD_FORMAT_INDICATOR => {
                    let value = flag(&mut list, "payload format indicator")?;
                    once(&mut p.payload_format_indicator, value, "payload format indicator")?
                }
                MESSAGE_EXPIRY_INTERVAL => once(&mut p.message_expiry_interval_s, list.u32()?, "message expiry")?,
                CONTENT_TYPE => once(&mut p.content_type, list.string()?, "content type")?,
                RESPONSE_TOPIC => {
                    let topic = list.string()?;
                    crate::topic::check_name(&topic).map_err(DecodeError::protocol)?;
                    once(&mut p.response_topic, topic, "response topic")?
                }
                CORRELATION_DATA => once(&mut p.correlation_data, list.binary()?, "correlation data")?,
                SUBSCRIPTION_IDENTIFIER => {
                    let value = list.variable_int()?;
                    if value == 0 {
                        return Err(DecodeError::protocol("subscription identifier 0"));
                    }
                    if place == Place::Subscribe && !p.subscription_identifiers.is_empty() {
                        return Err(DecodeError::protocol("subscription identifier given twice"));
                    }
                    p.subscription_identifiers.push(value);
                }
                SESSION_EXPIRY_INTERVAL => once(&mut p.session_expiry_interval_s, list.u32()?, "session expiry")?,
                ASSIGNED_CLIENT_IDENTIFIER => {
                    once(&mut p.assigned_client_identifier, list.string()?, "assigned client identifier")?
                }
                SERVER_KEEP_ALIVE => once(&mut p.server_keep_alive_s, list.u16()?, "server keep alive")?,
                AUTHENTICATION_METHOD => once(&mut p.authentication_method, list.string()?, "authentication method")?,
                AUTHENTICATION_DATA => once(&mut p.authentication_data, list.binary()?, "authentication data")?,
                REQUEST_PROBLEM_INFORMATION => {
                    let value = flag(&mut list, "request problem information")?;
                    once(&mut p.request_problem_information, value, "request problem information")?
                }
                WILL_DELAY_INTERVAL => once(&mut p.will_delay_interval_s, list.u32()?, "will delay")?,
                REQUEST_RESPONSE_INFORMATION => {
                    let value = flag(&mut list, "request response information")?;
                    once(&mut p.request_response_information, value, "request response information")?
                }
                RESPONSE_INFORMATION => once(&mut p.response_information, list.string()?, "response information")?,
                SERVER_REFERENCE => once(&mut p.server_reference, list.string()?, "server reference")?,
                REASON_STRING => once(&mut p.reason_string, list.string()?, "reason string")?,
                RECEIVE_MAXIMUM => {
                    let value = list.u16()?;
                    if value == 0 {
                        return Err(DecodeError::protocol("receive maximum 0"));
                    }
                    once(&mut p.receive_maximum, value, "receive maximum")?
                }
                TOPIC_ALIAS_MAXIMUM => once(&mut p.topic_alias_maximum, list.u16()?, "topic alias maximum")?,
                TOPIC_ALIAS => {
                    let value = list.u16()?;
                    if value == 0 {
                        return Err(DecodeError::protocol("topic alias 0"));
                    }
                    once(&mut p.topic_alias, value, "topic alias")?
                }
                MAXIMUM_QOS => once(&mut p.maximum_qos, list.u8()?, "maximum QoS")?,
                RETAIN_AVAILABLE => once(&mut p.retain_available, flag(&mut list, "retain available")?, "retain")?,
                USER_PROPERTY => {
                    let name = list.string()?;
                    let value = list.string()?;
                    p.user_properties.push((name, value));
                }
                MAXIMUM_PACKET_SIZE => {
                    let value = list.u32()?;
                    if value == 0 {
                        return Err(DecodeError::protocol("maximum packet size 0"));
                    }
                    once(&mut p.maximum_packet_size, value, "maximum packet size")?
                }
                WILDCARD_SUBSCRIPTION_AVAILABLE => {
                    once(&mut p.wildcard_subscription_available, list.u8()?, "wildcard subscription available")?
                }
                SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                    once(&mut p.subscription_identifier_available, list.u8()?, "subscription identifier available")?
                }
                SHARED_SUBSCRIPTION_AVAILABLE => {
                    once(&mut p.shared_subscription_available, list.u8()?, "shared subscription available")?
                }
                _ => return Err(DecodeError::protocol(format!("unknown property {id:#x}"))),
            }
        }
        Ok(properties)
    }

    /// Writes the property list (its length, then the properties).
    pub(crate) fn write(&self, buffer: &mut BytesMut) {
        let mut list = BytesMut::new();
        let put_string = |list: &mut BytesMut, id: u8, value: &str| {
            list.put_u8(id);
            crate::encode::put_string(list, value);
        };
        if let Some(value) = self.payload_format_indicator {
            list.put_u8(PAYLOAD_FORMAT_INDICATOR);
            list.put_u8(value);
        }
        if let Some(value) = self.message_expiry_interval_s {
            list.put_u8(MESSAGE_EXPIRY_INTERVAL);
            list.put_u32(value);
        }
        if let Some(value) = &self.content_type {
            put_string(&mut list, CONTENT_TYPE, value);
        }
        if let Some(value) = &self.response_topic {
            put_string(&mut list, RESPONSE_TOPIC, value);
        }
        if let Some(value) = &self.correlation_data {
            list.put_u8(CORRELATION_DATA);
            crate::encode::put_binary(&mut list, value);
        }
        for value in &self.subscription_identifiers {
            list.put_u8(SUBSCRIPTION_IDENTIFIER);
            crate::encode::put_variable_int(&mut list, *value);
        }
        if let Some(value) = self.session_expiry_interval_s {
            list.put_u8(SESSION_EXPIRY_INTERVAL);
            list.put_u32(value);
        }
        if let Some(value) = &self.assigned_client_identifier {
            put_string(&mut list, ASSIGNED_CLIENT_IDENTIFIER, value);
        }
        if let Some(value) = self.server_keep_alive_s {
            list.put_u8(SERVER_KEEP_ALIVE);
            list.put_u16(value);
        }
        if let Some(value) = &self.authentication_method {
            put_string(&mut list, AUTHENTICATION_METHOD, value);
        }
        if let Some(value) = &self.authentication_data {
            list.put_u8(AUTHENTICATION_DATA);
            crate::encode::put_binary(&mut list, value);
        }
        for (id, value) in [
            (REQUEST_PROBLEM_INFORMATION, self.request_problem_information),
            (REQUEST_RESPONSE_INFORMATION, self.request_response_information),
        ] {
            if let Some(value) = value {
                list.put_u8(id);
                list.put_u8(value);
            }
        }
        if let Some(value) = self.will_delay_interval_s {
            list.put_u8(WILL_DELAY_INTERVAL);
            list.put_u32(value);
        }
        if let Some(value) = &self.response_information {
            put_string(&mut list, RESPONSE_INFORMATION, value);
        }
        if let Some(value) = &self.server_reference {
            put_string(&mut list, SERVER_REFERENCE, value);
        }
        if let Some(value) = &self.reason_string {
            put_string(&mut list, REASON_STRING, value);
        }
        for (id, value) in [
            (RECEIVE_MAXIMUM, self.receive_maximum),
            (TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum),
            (TOPIC_ALIAS, self.topic_alias),
        ] {
            if let Some(value) = value {
                list.put_u8(id);
                list.put_u16(value);
            }
        }
        for (id, value) in [(MAXIMUM_QOS, self.maximum_qos), (RETAIN_AVAILABLE, self.retain_available)] {
            if let Some(value) = value {
                list.put_u8(id);
                list.put_u8(value);
            }
        }
        for (name, value) in &self.user_properties {
            list.put_u8(USER_PROPERTY);
            crate::encode::put_string(&mut list, name);
            crate::encode::put_string(&mut list, value);
        }
        if let Some(value) = self.maximum_packet_size {
            list.put_u8(MAXIMUM_PACKET_SIZE);
            list.put_u32(value);
        }
        for (id, value) in [
            (WILDCARD_SUBSCRIPTION_AVAILABLE, self.wildcard_subscription_available),
            (SUBSCRIPTION_IDENTIFIER_AVAILABLE, self.subscription_identifier_available),
            (SHARED_SUBSCRIPTION_AVAILABLE, self.shared_subscription_available),
        ] {
            if let Some(value) = value {
                list.put_u8(id);
                list.put_u8(value);
            }
        }
        crate::encode::put_variable_int(buffer, list.len() as u32);
        buffer.extend_from_slice(&list);
    }
}
