//! Why a packet could not be decoded, and the reason code each case is answered with: a CONNACK
//! refusal before the session exists, a DISCONNECT (5.0) or closing the connection (3.1.1) after.

use crate::reason;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes break the packet's structure: a remaining length over four bytes, a length
    /// running past the packet, a reserved flag set, a string that is not UTF-8, a QoS of 3, …
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// Well formed, but not allowed here: a property in the wrong packet or repeated, a packet
    /// id of 0, an unknown packet type, a second CONNECT, …
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The packet is over the limit the server announced (checked before it is buffered).
    #[error("packet of {size_bytes} bytes is over the {limit_bytes}-byte limit")]
    TooLarge { size_bytes: u64, limit_bytes: u32 },
    /// CONNECT with a protocol name or level the server does not speak.
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedVersion { name: String, level: u8 },
    /// A PUBLISH topic name with wildcards, empty without an alias, or with a NUL.
    #[error("topic name not allowed: {0}")]
    TopicName(String),
}

impl DecodeError {
    /// The 5.0 reason code this error is answered with.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => reason::MALFORMED_PACKET,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::UnsupportedVersion { .. } => reason::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::TopicName(_) => reason::TOPIC_NAME_INVALID,
        }
    }

    pub(crate) fn malformed(text: impl Into<String>) -> DecodeError {
        DecodeError::Malformed(text.into())
    }

    pub(crate) fn protocol(text: impl Into<String>) -> DecodeError {
        DecodeError::Protocol(text.into())
    }
}
