//! The cluster link's format under arbitrary bytes (target `cluster_link`): what one node reads
//! from another, a handshake then frames. The first input byte picks the side: the accepting
//! node (reads a `Hello`) or the dialing one (reads a `HelloReply`'s head). Decoding must never
//! panic, never take a frame over its limit, and every frame it returns must encode back to the
//! bytes it came from.

use bytes::BytesMut;
use wharf_cluster::frame::{Frame, HELLO_BYTES, HELLO_REPLY_HEAD_BYTES, Hello, HelloReply, Kind};

/// The limit the fuzzed link runs with (small, so oversize frames are reachable).
const FRAME_BYTES_MAX: u32 = 4096;

pub fn check_cluster_link(data: &[u8]) {
    let Some((&side, stream)) = data.split_first() else { return };
    let rest = if side % 2 == 0 {
        let Some(hello) = stream.get(..HELLO_BYTES) else { return };
        let hello: &[u8; HELLO_BYTES] = hello.try_into().expect("the slice has the length");
        if let Ok(decoded) = Hello::decode(hello) {
            assert_eq!(&decoded.encode(), hello, "a hello encodes back to its bytes");
        }
        &stream[HELLO_BYTES..]
    } else {
        let Some(head) = stream.get(..HELLO_REPLY_HEAD_BYTES) else { return };
        let head: &[u8; HELLO_REPLY_HEAD_BYTES] = head.try_into().expect("the slice has the length");
        match HelloReply::decode_head(head) {
            Ok((_, _, reason_bytes)) => match stream.get(HELLO_REPLY_HEAD_BYTES + reason_bytes..) {
                Some(rest) => rest,
                None => return,
            },
            Err(_) => return,
        }
    };
    let mut buffer = BytesMut::from(rest);
    loop {
        let before = buffer.clone();
        match Frame::decode(&mut buffer, FRAME_BYTES_MAX) {
            Ok(Some(frame)) => {
                let used = before.len() - buffer.len();
                assert!(used <= 4 + FRAME_BYTES_MAX as usize, "took a frame of {used} bytes");
                let mut encoded = BytesMut::new();
                frame.encode(&mut encoded, FRAME_BYTES_MAX).expect("a frame the decoder took encodes");
                assert_eq!(&encoded[..], &before[..used], "round trip");
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// Seeds: a dialer's and an acceptor's view of a link with a few calls.
pub fn cluster_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut calls = BytesMut::new();
    for (kind, id, payload) in [
        (Kind::Request, 1, &b"vote"[..]),
        (Kind::Request, 2, &b""[..]),
        (Kind::Answer, 1, &b"granted"[..]),
        (Kind::Failure, 2, &b"no such service"[..]),
    ] {
        let frame = Frame { kind, id, service: 3, payload: bytes::Bytes::copy_from_slice(payload) };
        frame.encode(&mut calls, FRAME_BYTES_MAX).expect("the seed frames are small");
    }
    let mut accepting = vec![0u8];
    accepting.extend_from_slice(&Hello { from: 2, to: 1 }.encode());
    accepting.extend_from_slice(&calls);
    let mut dialing = vec![1u8];
    dialing.extend_from_slice(&HelloReply { node: 1, refusal: None }.encode());
    dialing.extend_from_slice(&calls);
    let mut refused = vec![1u8];
    refused.extend_from_slice(&HelloReply { node: 1, refusal: Some("node 9 is not a member".into()) }.encode());
    vec![("accepting", accepting), ("dialing", dialing), ("refused", refused)]
}
