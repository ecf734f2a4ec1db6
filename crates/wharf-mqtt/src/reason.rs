//! Reason codes (MQTT 5.0, section 2.4) and the CONNACK return codes of MQTT 3.1.1 they stand in
//! for, so the front end decides once what a refusal means and each version says it its way.

pub const SUCCESS: u8 = 0x00;
pub const GRANTED_QOS_1: u8 = 0x01;
pub const GRANTED_QOS_2: u8 = 0x02;
pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
pub const UNSPECIFIED_ERROR: u8 = 0x80;
pub const MALFORMED_PACKET: u8 = 0x81;
pub const PROTOCOL_ERROR: u8 = 0x82;
pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
pub const NOT_AUTHORIZED: u8 = 0x87;
pub const SERVER_UNAVAILABLE: u8 = 0x88;
pub const SERVER_BUSY: u8 = 0x89;
pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
pub const SESSION_TAKEN_OVER: u8 = 0x8E;
pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
pub const TOPIC_NAME_INVALID: u8 = 0x90;
pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
pub const PACKET_TOO_LARGE: u8 = 0x95;
pub const QUOTA_EXCEEDED: u8 = 0x97;
pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;
/// DISCONNECT with will message (a client's own disconnect that still wants its will sent).
pub const DISCONNECT_WITH_WILL: u8 = 0x04;

/// MQTT 3.1.1's CONNACK return code for a 5.0 reason code (section 3.2.2.3): 3.1.1 has only five
/// refusals, so several reasons share one.
pub fn connack_return_code_v3(reason: u8) -> u8 {
    match reason {
        SUCCESS => 0,
        UNSUPPORTED_PROTOCOL_VERSION => 1,
        CLIENT_IDENTIFIER_NOT_VALID => 2,
        SERVER_UNAVAILABLE | SERVER_BUSY => 3,
        BAD_USER_NAME_OR_PASSWORD | BAD_AUTHENTICATION_METHOD => 4,
        _ => 5,
    }
}

/// The 5.0 reason code a 3.1.1 CONNACK return code stands for; `None` for a code 3.1.1 lacks.
pub fn connack_reason_from_v3(code: u8) -> Option<u8> {
    Some(match code {
        0 => SUCCESS,
        1 => UNSUPPORTED_PROTOCOL_VERSION,
        2 => CLIENT_IDENTIFIER_NOT_VALID,
        3 => SERVER_UNAVAILABLE,
        4 => BAD_USER_NAME_OR_PASSWORD,
        5 => NOT_AUTHORIZED,
        _ => return None,
    })
}

/// The 3.1.1 SUBACK failure code (0x80) for any refusal; granted QoS as they are.
pub fn suback_return_code_v3(reason: u8) -> u8 {
    if reason <= GRANTED_QOS_2 { reason } else { 0x80 }
}
