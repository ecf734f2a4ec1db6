//! `wharf-wire`: the AMQP 0-9-1 wire format for Wharf, and the only crate that imports
//! `amq-protocol`.
//!
//! It owns frames (decode with limits checked before buffering, encode), the method table, SASL
//! response parsing and the reply codes errors map to. It does no I/O: the broker feeds it bytes
//! from sockets and writes out what it encodes. Other crates reach the protocol's method and value
//! types through the re-exports below, so swapping the codec touches only this crate.

mod error;
pub mod frame;
pub mod methods;
pub mod nesting;
pub mod sasl;

pub use error::{WireError, reply_code};
pub use frame::{ContentHeader, Frame, FrameDecoder};

/// The protocol's method classes and their argument structs (`AMQPClass`, `basic::Publish`, …).
pub use amq_protocol::protocol;
/// The protocol's value types (`FieldTable`, `AMQPValue`, `ShortString`, …).
pub use amq_protocol::types;
