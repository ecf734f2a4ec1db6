//! `wharf-mqtt`: the MQTT 3.1.1 and 5.0 wire format for Wharf. No I/O.
//!
//! It owns the packets (one model for both versions: a 3.1.1 packet is a 5.0 packet without
//! properties or reason codes), decoding with every length checked against a limit before it is
//! buffered, encoding, the reason codes a refusal is answered with, the rules for topic names and
//! filters, and the mapping between MQTT topics and AMQP routing keys that RabbitMQ's MQTT plugin
//! uses. The broker's MQTT front end (`wharf-broker`'s `mqtt` module) feeds it bytes from sockets
//! and acts on the packets; why Wharf has its own codec rather than a client library's is in
//! `docs/design/20261204_mqtt.md`.

mod decode;
mod encode;
mod error;
mod packet;
mod properties;
pub mod reason;
pub mod topic;

pub use decode::{Decoder, PACKET_BYTES_MAX_DEFAULT, PACKET_BYTES_MAX_LIMIT};
pub use encode::encode;
pub use error::DecodeError;
pub use packet::{
    Ack, Auth, ConnAck, Connect, Disconnect, Packet, Publish, QoS, RetainHandling, SubAck, Subscribe, Subscription,
    SubscriptionOptions, UnsubAck, Unsubscribe, Version, Will,
};
pub use properties::{Properties, UserProperty};
