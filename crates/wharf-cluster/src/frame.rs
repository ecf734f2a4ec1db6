//! The format of a node-to-node link, as pure functions so it can
//! be tested and fuzzed without sockets.
//!
//! A link is one TCP connection, dialed by the node that makes calls on it. It opens with a
//! handshake: the dialer sends [`Hello`] (the magic `WHARFCL1`, its own id, the id it means to
//! reach); the other end answers with [`HelloReply`] (accepted, or refused with a reason) and
//! closes on refusal. Then frames flow: a 4-byte big-endian length of what follows, a kind
//! byte, a 64-bit call id, a 16-bit service number, and the payload. Requests go from the
//! dialer; answers (or failures, whose payload is a UTF-8 message) come back with the request's
//! id, in any order. A length over the link's limit ends the link before anything is buffered.

use crate::config::NodeId;
use crate::error::ClusterError;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The first bytes of a handshake both ways: the protocol and its version.
pub const MAGIC: [u8; 8] = *b"WHARFCL1";
/// The size of a [`Hello`].
pub const HELLO_BYTES: usize = 24;
/// What precedes a handshake reply's reason: magic, status, node id, reason length.
pub const HELLO_REPLY_HEAD_BYTES: usize = 19;
/// A frame's length prefix and fixed header (kind, id, service).
pub const FRAME_HEAD_BYTES: usize = 15;
/// The longest refusal reason sent.
const REASON_BYTES_MAX: usize = 1024;

/// The dialer's half of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The dialing node.
    pub from: NodeId,
    /// The node it means to reach (a node refuses a link meant for another).
    pub to: NodeId,
}

impl Hello {
    /// Its bytes.
    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut bytes = [0u8; HELLO_BYTES];
        bytes[..8].copy_from_slice(&MAGIC);
        bytes[8..16].copy_from_slice(&self.from.to_be_bytes());
        bytes[16..].copy_from_slice(&self.to.to_be_bytes());
        bytes
    }

    /// Reads one; fails on another protocol.
    pub fn decode(bytes: &[u8; HELLO_BYTES]) -> Result<Hello, ClusterError> {
        if bytes[..8] != MAGIC {
            return Err(ClusterError::Protocol("not a Wharf cluster link (bad magic)".into()));
        }
        let mut rest = &bytes[8..];
        Ok(Hello { from: rest.get_u64(), to: rest.get_u64() })
    }
}

/// The answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    /// The answering node.
    pub node: NodeId,
    /// Why the link was refused; `None` if accepted.
    pub refusal: Option<String>,
}

impl HelloReply {
    /// Its bytes (a long reason is cut).
    pub fn encode(&self) -> Vec<u8> {
        let reason = self.refusal.as_deref().unwrap_or("").as_bytes();
        let mut cut = reason.len().min(REASON_BYTES_MAX);
        while !self.refusal.as_deref().unwrap_or("").is_char_boundary(cut) {
            cut -= 1;
        }
        let mut bytes = Vec::with_capacity(HELLO_REPLY_HEAD_BYTES + cut);
        bytes.extend_from_slice(&MAGIC);
        bytes.push(u8::from(self.refusal.is_some()));
        bytes.extend_from_slice(&self.node.to_be_bytes());
        bytes.extend_from_slice(&(cut as u16).to_be_bytes());
        bytes.extend_from_slice(&reason[..cut]);
        bytes
    }

    /// Reads its head: (node, refused, reason length); the reason follows.
    pub fn decode_head(head: &[u8; HELLO_REPLY_HEAD_BYTES]) -> Result<(NodeId, bool, usize), ClusterError> {
        if head[..8] != MAGIC {
            return Err(ClusterError::Protocol("not a Wharf cluster link (bad magic in the reply)".into()));
        }
        let refused = match head[8] {
            0 => false,
            1 => true,
            other => return Err(ClusterError::Protocol(format!("handshake status {other} is unknown"))),
        };
        let mut rest = &head[9..];
        let node = rest.get_u64();
        let reason_bytes = usize::from(rest.get_u16());
        if reason_bytes > REASON_BYTES_MAX {
            return Err(ClusterError::Protocol(format!("a refusal reason of {reason_bytes} bytes")));
        }
        Ok((node, refused, reason_bytes))
    }
}

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A call.
    Request,
    /// A call's answer.
    Answer,
    /// A call's failure: the payload is the handler's message.
    Failure,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Request => 1,
            Kind::Answer => 2,
            Kind::Failure => 3,
        }
    }

    fn from_byte(byte: u8) -> Option<Kind> {
        match byte {
            1 => Some(Kind::Request),
            2 => Some(Kind::Answer),
            3 => Some(Kind::Failure),
            _ => None,
        }
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it is.
    pub kind: Kind,
    /// The call it belongs to (chosen by the dialer, unique on its link).
    pub id: u64,
    /// The service called (an answer repeats its request's).
    pub service: u16,
    /// What the service is given or answers.
    pub payload: Bytes,
}

impl Frame {
    /// Appends the frame to `out`; fails if it would be over `frame_bytes_max`.
    pub fn encode(&self, out: &mut BytesMut, frame_bytes_max: u32) -> Result<(), ClusterError> {
        let body_bytes = (FRAME_HEAD_BYTES - 4) as u64 + self.payload.len() as u64;
        if body_bytes > u64::from(frame_bytes_max) {
            return Err(ClusterError::FrameTooLarge { bytes: body_bytes, limit: frame_bytes_max });
        }
        out.reserve(4 + body_bytes as usize);
        out.put_u32(body_bytes as u32);
        out.put_u8(self.kind.byte());
        out.put_u64(self.id);
        out.put_u16(self.service);
        out.put_slice(&self.payload);
        Ok(())
    }

    /// Takes one whole frame off the front of `buffer`, or `None` if it holds less than one.
    /// Fails (and the link must close) on a length over `frame_bytes_max` or under a header,
    /// checked as soon as the length is there, or an unknown kind.
    pub fn decode(buffer: &mut BytesMut, frame_bytes_max: u32) -> Result<Option<Frame>, ClusterError> {
        if buffer.len() < 4 {
            return Ok(None);
        }
        let body_bytes = u32::from_be_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]);
        if body_bytes > frame_bytes_max {
            return Err(ClusterError::FrameTooLarge { bytes: u64::from(body_bytes), limit: frame_bytes_max });
        }
        if (body_bytes as usize) < FRAME_HEAD_BYTES - 4 {
            return Err(ClusterError::Protocol(format!("a frame of {body_bytes} bytes is shorter than its header")));
        }
        if buffer.len() < 4 + body_bytes as usize {
            // Room for what is still to come, a bounded step at a time: a length alone does not
            // make the buffer grow (memory follows the bytes that actually arrive).
            const RESERVE_STEP_BYTES: usize = 1024 * 1024;
            buffer.reserve((4 + body_bytes as usize - buffer.len()).min(RESERVE_STEP_BYTES));
            return Ok(None);
        }
        let mut frame = buffer.split_to(4 + body_bytes as usize);
        frame.advance(4);
        let kind_byte = frame.get_u8();
        let kind = Kind::from_byte(kind_byte)
            .ok_or_else(|| ClusterError::Protocol(format!("frame kind {kind_byte} is unknown")))?;
        let id = frame.get_u64();
        let service = frame.get_u16();
        Ok(Some(Frame { kind, id, service, payload: frame.freeze() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_back_as_they_were_sent_whatever_the_chunks() {
        let frames = vec![
            Frame { kind: Kind::Request, id: 1, service: 7, payload: Bytes::from_static(b"vote") },
            Frame { kind: Kind::Answer, id: 1, service: 7, payload: Bytes::new() },
            Frame { kind: Kind::Failure, id: u64::MAX, service: u16::MAX, payload: Bytes::from(vec![9u8; 5000]) },
        ];
        let mut wire = BytesMut::new();
        for frame in &frames {
            frame.encode(&mut wire, 1 << 20).unwrap();
        }
        for chunk_bytes in [1, 3, 64, wire.len()] {
            let mut buffer = BytesMut::new();
            let mut decoded = Vec::new();
            for chunk in wire.chunks(chunk_bytes) {
                buffer.extend_from_slice(chunk);
                while let Some(frame) = Frame::decode(&mut buffer, 1 << 20).unwrap() {
                    decoded.push(frame);
                }
            }
            assert_eq!(decoded, frames, "chunks of {chunk_bytes}");
            assert!(buffer.is_empty());
        }
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_from_its_length_alone() {
        let big = Frame { kind: Kind::Request, id: 1, service: 1, payload: Bytes::from(vec![0u8; 100]) };
        assert!(matches!(big.encode(&mut BytesMut::new(), 50), Err(ClusterError::FrameTooLarge { limit: 50, .. })));
        let mut buffer = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert!(matches!(Frame::decode(&mut buffer, 1 << 20), Err(ClusterError::FrameTooLarge { .. })));
        let mut short = BytesMut::from(&[0u8, 0, 0, 3, 1, 0, 0][..]);
        assert!(matches!(Frame::decode(&mut short, 1 << 20), Err(ClusterError::Protocol(_))));
        let mut unknown = BytesMut::new();
        Frame { kind: Kind::Request, id: 1, service: 1, payload: Bytes::new() }.encode(&mut unknown, 64).unwrap();
        unknown[4] = 9;
        assert!(matches!(Frame::decode(&mut unknown, 64), Err(ClusterError::Protocol(_))));
    }

    #[test]
    fn handshakes_name_both_ends_and_a_refusal_says_why() {
        let hello = Hello { from: 3, to: 1 };
        assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
        let mut other = hello.encode();
        other[0] = b'X';
        assert!(Hello::decode(&other).is_err());
        let reply = HelloReply { node: 1, refusal: Some("node 3 is not a member".into()) };
        let bytes = reply.encode();
        let head: [u8; HELLO_REPLY_HEAD_BYTES] = bytes[..HELLO_REPLY_HEAD_BYTES].try_into().unwrap();
        let (node, refused, reason_bytes) = HelloReply::decode_head(&head).unwrap();
        assert_eq!((node, refused), (1, true));
        assert_eq!(&bytes[HELLO_REPLY_HEAD_BYTES..HELLO_REPLY_HEAD_BYTES + reason_bytes], b"node 3 is not a member");
        let long = HelloReply { node: 1, refusal: Some("é".repeat(2000)) }.encode();
        assert!(long.len() <= HELLO_REPLY_HEAD_BYTES + REASON_BYTES_MAX);
        assert!(std::str::from_utf8(&long[HELLO_REPLY_HEAD_BYTES..]).is_ok(), "cut on a character boundary");
    }
}
