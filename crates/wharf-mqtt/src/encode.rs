//! Encoding: a packet written for the version its connection speaks (3.1.1 leaves properties
//! and reason codes out, and says a CONNACK refusal with its own return codes).

use crate::packet::*;
use crate::properties::Properties;
use crate::reason;
use bytes::{BufMut, BytesMut};

pub(crate) fn put_variable_int(buffer: &mut BytesMut, mut value: u32) {
    loop {
        let mut byte = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        buffer.put_u8(byte);
        if value == 0 {
            return;
        }
    }
}

/// A string of at most 65,535 bytes; a longer one is cut at a character boundary (only text the
/// server makes up itself, such as a reason string, could be longer: names from clients came in
/// through the same two-byte length).
pub(crate) fn put_string(buffer: &mut BytesMut, value: &str) {
    let mut end = value.len().min(usize::from(u16::MAX));
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    buffer.put_u16(end as u16);
    buffer.extend_from_slice(&value.as_bytes()[..end]);
}

pub(crate) fn put_binary(buffer: &mut BytesMut, value: &[u8]) {
    let end = value.len().min(usize::from(u16::MAX));
    buffer.put_u16(end as u16);
    buffer.extend_from_slice(&value[..end]);
}

/// Appends `packet`, encoded for `version`, to `buffer`.
pub fn encode(packet: &Packet, version: Version, buffer: &mut BytesMut) {
    let v5 = version.is_v5();
    let mut body = BytesMut::new();
    let mut flags = 0u8;
    let properties_v5 = |body: &mut BytesMut, properties: &Properties| {
        if v5 {
            properties.write(body);
        }
    };
    match packet {
        Packet::Connect(connect) => {
            let (name, level) = match connect.version {
                Version::V31 => ("MQIsdp", 3),
                Version::V311 => ("MQTT", 4),
                Version::V5 => ("MQTT", 5),
            };
            put_string(&mut body, name);
            body.put_u8(level);
            let mut connect_flags = 0u8;
            if connect.clean_start {
                connect_flags |= 0x02;
            }
            if let Some(will) = &connect.will {
                connect_flags |= 0x04 | ((will.qos as u8) << 3);
                if will.retain {
                    connect_flags |= 0x20;
                }
            }
            if connect.password.is_some() {
                connect_flags |= 0x40;
            }
            if connect.username.is_some() {
                connect_flags |= 0x80;
            }
            body.put_u8(connect_flags);
            body.put_u16(connect.keep_alive_s);
            properties_v5(&mut body, &connect.properties);
            put_string(&mut body, &connect.client_id);
            if let Some(will) = &connect.will {
                properties_v5(&mut body, &will.properties);
                put_string(&mut body, &will.topic);
                put_binary(&mut body, &will.payload);
            }
            if let Some(username) = &connect.username {
                put_string(&mut body, username);
            }
            if let Some(password) = &connect.password {
                put_binary(&mut body, password);
            }
        }
        Packet::ConnAck(ack) => {
            body.put_u8(u8::from(ack.session_present));
            body.put_u8(if v5 { ack.reason } else { reason::connack_return_code_v3(ack.reason) });
            properties_v5(&mut body, &ack.properties);
        }
        Packet::Publish(publish) => {
            flags = ((publish.qos as u8) << 1) | u8::from(publish.retain);
            if publish.dup {
                flags |= 0x08;
            }
            put_string(&mut body, &publish.topic);
            if publish.qos != QoS::AtMostOnce {
                body.put_u16(publish.packet_id);
            }
            properties_v5(&mut body, &publish.properties);
            body.extend_from_slice(&publish.payload);
        }
        Packet::PubAck(ack) | Packet::PubRec(ack) | Packet::PubRel(ack) | Packet::PubComp(ack) => {
            if matches!(packet, Packet::PubRel(_)) {
                flags = 0b0010;
            }
            body.put_u16(ack.packet_id);
            // 5.0 lets a success without properties end after the packet id.
            if v5 && (ack.reason != reason::SUCCESS || ack.properties != Properties::default()) {
                body.put_u8(ack.reason);
                ack.properties.write(&mut body);
            }
        }
        Packet::Subscribe(subscribe) => {
            flags = 0b0010;
            body.put_u16(subscribe.packet_id);
            properties_v5(&mut body, &subscribe.properties);
            for subscription in &subscribe.subscriptions {
                put_string(&mut body, &subscription.filter);
                let options = subscription.options;
                let mut byte = options.qos as u8;
                if v5 {
                    byte |= u8::from(options.no_local) << 2
                        | u8::from(options.retain_as_published) << 3
                        | (options.retain_handling as u8) << 4;
                }
                body.put_u8(byte);
            }
        }
        Packet::SubAck(ack) => {
            body.put_u16(ack.packet_id);
            properties_v5(&mut body, &ack.properties);
            for code in &ack.reasons {
                body.put_u8(if v5 { *code } else { reason::suback_return_code_v3(*code) });
            }
        }
        Packet::Unsubscribe(unsubscribe) => {
            flags = 0b0010;
            body.put_u16(unsubscribe.packet_id);
            properties_v5(&mut body, &unsubscribe.properties);
            for filter in &unsubscribe.filters {
                put_string(&mut body, filter);
            }
        }
        Packet::UnsubAck(ack) => {
            body.put_u16(ack.packet_id);
            if v5 {
                ack.properties.write(&mut body);
                body.extend_from_slice(&ack.reasons);
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(disconnect) => {
            // 3.1.1's DISCONNECT is only ever sent by clients and has no body.
            if v5 && (disconnect.reason != reason::SUCCESS || disconnect.properties != Properties::default()) {
                body.put_u8(disconnect.reason);
                disconnect.properties.write(&mut body);
            }
        }
        Packet::Auth(auth) => {
            body.put_u8(auth.reason);
            auth.properties.write(&mut body);
        }
    }
    buffer.reserve(5 + body.len());
    buffer.put_u8(packet.type_code() << 4 | flags);
    put_variable_int(buffer, body.len() as u32);
    buffer.extend_from_slice(&body);
}
