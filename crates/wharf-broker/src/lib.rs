//! `wharf-broker`: the runtime that turns the pieces into a broker.
//!
//! It owns sockets and tasks: it accepts AMQP 0-9-1 connections on tokio, runs the handshake,
//! decodes frames with `wharf-wire`, applies every method to the `wharf-model` state machine,
//! carries out the effects (deliveries to connections, removals to the store), writes persistent
//! messages in durable queues through `wharf-store`, and sends publisher confirms and
//! `tx.commit-ok` only after the store reports the covering `fdatasync`. Durable definitions live in
//! the store's definitions log and are rebuilt, with every stored message, at start.

mod config;
mod connection;
mod core;
mod error;
mod persist;
mod server;
mod session;
mod writer;

pub use config::{BrokerConfig, User};
pub use error::BrokerError;
pub use server::Broker;
/// The largest `frame_max` the broker negotiates.
pub use wharf_wire::frame::FRAME_MAX_LIMIT;
