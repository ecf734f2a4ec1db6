//! Acknowledgements of a client's publishes, in the order the publishes came: a PUBACK (QoS 1)
//! or PUBREC (QoS 2) goes out only once the message is durable in every durable queue it
//! reached (each store ticket an `fdatasync`), like a publisher confirm; a PUBCOMP or a repeated
//! PUBREC waits its turn behind them. A store failure ends the connection without the
//! acknowledgement, so the client sends the publish again.

use crate::confirms::Durable;
use crate::outbound::{Outbound, Outbox};
use bytes::BytesMut;
use tokio::sync::{mpsc, watch};
use wharf_mqtt::{Ack, Packet, Version};

/// Publishes waiting for their acknowledgement, at most: the connection stops reading while
/// this many wait (a client that publishes faster than the disk syncs is slowed, not buffered).
pub(super) const WAITING_ACKS_MAX: usize = 4_096;

/// An acknowledgement to send once what it covers is durable. Kept small (not a whole `Packet`):
/// the channel's blocks are allocated per connection, and most devices are idle.
#[derive(Debug)]
pub(super) struct PendingAck {
    kind: AckKind,
    packet_id: u16,
    reason: u8,
    durable: Vec<Durable>,
    /// The store could not take the message (or a queue refused it): the reason already says
    /// so in 5.0; in 3.1.1, which cannot refuse, the connection ends instead.
    refused: bool,
}

/// PUBACK, PUBREC or PUBCOMP.
#[derive(Debug, Clone, Copy)]
enum AckKind {
    Ack,
    Rec,
    Comp,
}

impl PendingAck {
    /// `None` for a packet that is not PUBACK, PUBREC or PUBCOMP.
    pub(super) fn new(packet: &Packet, durable: Vec<Durable>, refused: bool) -> Option<PendingAck> {
        let (kind, ack) = match packet {
            Packet::PubAck(ack) => (AckKind::Ack, ack),
            Packet::PubRec(ack) => (AckKind::Rec, ack),
            Packet::PubComp(ack) => (AckKind::Comp, ack),
            _ => return None,
        };
        Some(PendingAck { kind, packet_id: ack.packet_id, reason: ack.reason, durable, refused })
    }

    fn packet(&self) -> Packet {
        let ack = Ack::new(self.packet_id, self.reason);
        match self.kind {
            AckKind::Ack => Packet::PubAck(ack),
            AckKind::Rec => Packet::PubRec(ack),
            AckKind::Comp => Packet::PubComp(ack),
        }
    }
}

/// Sends acknowledgements in order until the session stops; `failed` is set when the
/// connection must end (a store failure, or a refusal a 3.1.1 client cannot be told).
pub(super) async fn run(
    mut pending: mpsc::Receiver<PendingAck>,
    outbox: Outbox,
    version: Version,
    failed: watch::Sender<Option<String>>,
) {
    while let Some(mut acknowledgement) = pending.recv().await {
        for mut ticket in std::mem::take(&mut acknowledgement.durable) {
            if let Err(error) = std::future::poll_fn(|context| ticket.poll_durable(context)).await {
                failed.send_replace(Some(format!("the message could not be stored: {error}")));
                return;
            }
        }
        if acknowledgement.refused && !version.is_v5() {
            failed.send_replace(Some("a queue refused a publish (MQTT 3.1.1 has no way to say so)".into()));
            return;
        }
        let mut buffer = BytesMut::new();
        wharf_mqtt::encode(&acknowledgement.packet(), version, &mut buffer);
        if outbox.send(Outbound::Frames(buffer.freeze())).is_err() {
            return;
        }
    }
}
