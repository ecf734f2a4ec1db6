//! The wire layer's error type. Every variant maps to the AMQP reply code the connection must be
//! closed with, so the broker never has to guess how to answer bad input.

/// Why bytes from the peer could not be turned into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The peer did not open with `AMQP 0 0 9 1`. The server answers with its own protocol header
    /// and closes the socket (the spec's way of saying which version it speaks).
    #[error("unsupported protocol header {0:?}; this server speaks AMQP 0-9-1")]
    BadProtocolHeader([u8; 8]),
    /// A frame announced a payload larger than the negotiated `frame_max`.
    #[error("frame payload of {payload_bytes} bytes exceeds frame_max {frame_max}")]
    FrameTooLarge {
        /// The payload size as announced in the frame header.
        payload_bytes: u32,
        /// The negotiated maximum.
        frame_max: u32,
    },
    /// The byte after the payload was not the frame-end octet 0xCE.
    #[error("frame end octet missing (found 0x{0:02x})")]
    BadFrameEnd(u8),
    /// A frame type the protocol does not define.
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    /// A heartbeat frame on a channel other than 0.
    #[error("heartbeat frame on channel {0}; heartbeats belong on channel 0")]
    HeartbeatOnChannel(u16),
    /// A method this server does not know (class and method ids as received).
    #[error("method {class_id}.{method_id} is not implemented")]
    UnknownMethod {
        /// Class id.
        class_id: u16,
        /// Method id.
        method_id: u16,
    },
    /// A frame whose payload does not parse (truncated fields, bad table, trailing bytes).
    #[error("malformed {what} frame on channel {channel}")]
    Malformed {
        /// Which kind of frame.
        what: &'static str,
        /// The channel it arrived on.
        channel: u16,
    },
    /// A field table (method arguments, message headers) nested deeper than
    /// `nesting::FIELD_NESTING_DEPTH_MAX` levels: refused before it is parsed.
    #[error("a field table in the {what} frame on channel {channel} nests deeper than {max} levels", max = crate::nesting::FIELD_NESTING_DEPTH_MAX)]
    NestedTooDeep {
        /// Which kind of frame.
        what: &'static str,
        /// The channel it arrived on.
        channel: u16,
    },
    /// Bad SASL response bytes.
    #[error("malformed {mechanism} authentication response")]
    BadSaslResponse {
        /// The mechanism named by the client.
        mechanism: &'static str,
    },
}

/// AMQP reply codes (RabbitMQ's set), named as in the specification.
pub mod reply_code {
    /// Success.
    pub const REPLY_SUCCESS: u16 = 200;
    /// Connection forced closed by the server (shutdown).
    pub const CONNECTION_FORCED: u16 = 320;
    /// Invalid path (unknown vhost).
    pub const INVALID_PATH: u16 = 402;
    /// Access refused (authentication, permissions, exclusive consumers).
    pub const ACCESS_REFUSED: u16 = 403;
    /// Not found (queue, exchange).
    pub const NOT_FOUND: u16 = 404;
    /// Resource locked (another connection's exclusive queue).
    pub const RESOURCE_LOCKED: u16 = 405;
    /// Precondition failed (redeclare with different properties, unknown delivery tag).
    pub const PRECONDITION_FAILED: u16 = 406;
    /// Frame error.
    pub const FRAME_ERROR: u16 = 501;
    /// Syntax error.
    pub const SYNTAX_ERROR: u16 = 502;
    /// Command invalid (method not allowed in this state).
    pub const COMMAND_INVALID: u16 = 503;
    /// Channel error (channel not open, or already open).
    pub const CHANNEL_ERROR: u16 = 504;
    /// Unexpected frame (a frame out of sequence).
    pub const UNEXPECTED_FRAME: u16 = 505;
    /// Resource error (limits).
    pub const RESOURCE_ERROR: u16 = 506;
    /// Not allowed.
    pub const NOT_ALLOWED: u16 = 530;
    /// Not implemented.
    pub const NOT_IMPLEMENTED: u16 = 540;
    /// Internal error.
    pub const INTERNAL_ERROR: u16 = 541;
}

impl WireError {
    /// The reply code to close the connection with.
    pub fn reply_code(&self) -> u16 {
        use reply_code::*;
        match self {
            WireError::BadProtocolHeader(_) => FRAME_ERROR,
            WireError::FrameTooLarge { .. }
            | WireError::BadFrameEnd(_)
            | WireError::UnknownFrameType(_)
            | WireError::HeartbeatOnChannel(_) => FRAME_ERROR,
            WireError::UnknownMethod { .. } => NOT_IMPLEMENTED,
            WireError::Malformed { .. } | WireError::NestedTooDeep { .. } => SYNTAX_ERROR,
            WireError::BadSaslResponse { .. } => ACCESS_REFUSED,
        }
    }
}
