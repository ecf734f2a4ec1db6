//! Frames going out: what a connection's writer is asked to send ([`Outbound`]), the queue that
//! carries it there and counts what it holds ([`Outbox`], [`Backlog`]), what the writer reports
//! back to its connection ([`WriterReports`]), and the registry of open connections the core
//! sends deliveries through ([`Connections`]).
//!
//! Everything the writer needs is decided before an item reaches it; the writer only encodes and
//! writes. What it learns while writing (delivery bytes written, deliveries it could not send) it
//! leaves in its connection's [`WriterReports`], and the connection's own task tells the model.

use crate::manage::ConnectionInfo;
use crate::pager::DeliveryBody;
use crate::peer_address::address_block;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use wharf_model::{ChannelKey, ConnectionId, Delivery};
use wharf_store::Ticket;
use wharf_wire::frame::encode_method;
use wharf_wire::protocol::AMQPClass;

/// What a connection's writer task is asked to send.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// Encoded frames, sent as they are.
    Frames(bytes::Bytes),
    /// A delivery to encode (`basic.deliver` or `basic.get-ok`, header, body).
    Deliver(OutboundDelivery),
    /// `basic.cancel` from the server (the queue went away).
    CancelConsumer { channel: u16, consumer_tag: String },
    /// `basic.return` of an unroutable mandatory message, with its content.
    Return { channel: u16, reply_code: u16, reply_text: &'static str, message: Arc<wharf_model::Message> },
}

/// A delivery on its way to the socket, with everything decided about it.
#[derive(Debug)]
pub(crate) struct OutboundDelivery {
    pub delivery: Delivery,
    /// For a redelivery, the store's ticket for its delivery count: the writer sends it only
    /// once the count is written, so a consumer that crashes on a message cannot outrun its count
    /// even if the broker is killed at that moment.
    pub count_recorded: Option<Ticket<()>>,
    /// Where the body comes from: memory, or a read of its record (see `pager`).
    pub body: DeliveryBody,
}

impl Outbound {
    /// Roughly what the item will occupy on the wire, for the connection's backlog.
    pub fn size_bytes(&self) -> u64 {
        match self {
            Outbound::Frames(bytes) => bytes.len() as u64,
            Outbound::Deliver(outbound) => 64 + wharf_model::broker::delivery_bytes(&outbound.delivery.message),
            Outbound::CancelConsumer { consumer_tag, .. } => 32 + consumer_tag.len() as u64,
            Outbound::Return { message, .. } => 64 + wharf_model::broker::delivery_bytes(message),
        }
    }
}

/// Most bytes waiting for a connection's writer before the server stops reading that
/// connection's socket: a client that sends (publishes that produce returns and confirms) but
/// never reads cannot make the server buffer without bound.
pub(crate) const BACKLOG_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Delivery bytes the writer lets pile up before asking its connection to tell the model they
/// were written. The model stops dispatching to a connection once `CONNECTION_PENDING_BYTES_MAX`
/// (16 MiB) is pending; reporting in steps well below that keeps dispatching going (a connection
/// that is paused has at least 16 MiB written and unreported, so a report is always due), and
/// saves taking the model lock after every socket write.
pub(crate) const WRITTEN_REPORT_BYTES: u64 = 1024 * 1024;

/// Bytes handed to a connection's writer and not yet written, and what the writer reports back.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    pub bytes: AtomicU64,
    /// Signalled whenever the writer wrote something.
    pub drained: tokio::sync::Notify,
    /// Signalled once when the writer could not read a paged-out body back: the connection must
    /// close.
    pub writer_failed: tokio::sync::Notify,
    /// What the writer learnt that the model must hear (see [`WriterReports`]).
    pub reports: WriterReports,
}

/// The writer's mailbox to its connection's task: delivery bytes written and deliveries that
/// could not be sent. `ready` is signalled when there is something to act on.
#[derive(Debug, Default)]
pub(crate) struct WriterReports {
    /// Delivery bytes written since the last report to the model.
    written_bytes: AtomicU64,
    /// Consumer deliveries not sent because their queue and its records are gone: each frees its
    /// channel's slot (by a requeue, a no-op for a message whose queue was deleted).
    unsent: Mutex<Vec<UnsentDelivery>>,
    /// `unsent` holds something (checked before every frame the connection handles).
    unsent_waiting: AtomicBool,
    pub ready: tokio::sync::Notify,
}

impl WriterReports {
    /// The writer wrote `bytes` of deliveries.
    pub fn written(&self, bytes: u64) {
        let before = self.written_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before < WRITTEN_REPORT_BYTES && before + bytes >= WRITTEN_REPORT_BYTES {
            self.ready.notify_one();
        }
    }

    /// A consumer delivery was not sent (its queue's records are gone).
    pub fn unsent(&self, channel: ChannelKey, delivery_tag: u64) {
        self.unsent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(UnsentDelivery { channel, delivery_tag });
        self.unsent_waiting.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// Whether unsent deliveries wait to be reported.
    pub fn has_unsent(&self) -> bool {
        self.unsent_waiting.load(Ordering::Acquire)
    }

    /// Takes what is to be reported: written bytes once they reach [`WRITTEN_REPORT_BYTES`]
    /// (none before), and the unsent deliveries.
    pub fn take(&self) -> Reports {
        let written = if self.written_bytes.load(Ordering::Acquire) >= WRITTEN_REPORT_BYTES {
            self.written_bytes.swap(0, Ordering::AcqRel)
        } else {
            0
        };
        let unsent = {
            let mut unsent = self.unsent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            self.unsent_waiting.store(false, Ordering::Release);
            std::mem::take(&mut *unsent)
        };
        Reports { written_bytes: written, unsent }
    }
}

/// What the writer reported, for the model.
#[derive(Debug, Default)]
pub(crate) struct Reports {
    /// Delivery bytes written.
    pub written_bytes: u64,
    /// Consumer deliveries not sent.
    pub unsent: Vec<UnsentDelivery>,
}

/// A consumer delivery the writer did not send.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UnsentDelivery {
    pub channel: ChannelKey,
    pub delivery_tag: u64,
}

/// The sending side of a connection's writer queue, counting what it holds.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    pub sender: mpsc::UnboundedSender<Outbound>,
    pub backlog: Arc<Backlog>,
}

impl Outbox {
    /// Queues an item for the writer; gives it back once the writer is gone.
    pub fn send(&self, item: Outbound) -> Result<(), Box<Outbound>> {
        // Counted before it is queued: the writer subtracts it once written, possibly before
        // `send` returns.
        let size_bytes = item.size_bytes();
        self.backlog.bytes.fetch_add(size_bytes, Ordering::Relaxed);
        self.sender.send(item).map_err(|unsent| {
            self.backlog.bytes.fetch_sub(size_bytes, Ordering::Relaxed);
            Box::new(unsent.0)
        })
    }
}

/// The open connections, by id: how the core reaches a connection to deliver to it; and the count
/// of sockets still in their handshake, capped apart from logged-in connections.
#[derive(Debug)]
pub(crate) struct Connections {
    open: Mutex<HashMap<ConnectionId, Registered>>,
    /// Cluster proxies' outboxes (see [`Connections::register_proxy`]).
    proxies: Mutex<HashMap<ConnectionId, Outbox>>,
    next_id: AtomicU64,
    /// Most logged-in connections at once (the configuration's `connections_max`).
    connections_max: usize,
    /// Sockets accepted and not yet logged in.
    handshaking: Arc<Mutex<Handshaking>>,
    /// Most of those at once (the configuration's `handshakes_max`).
    handshakes_max: usize,
    /// Most of those from one address (`handshakes_per_address_max`), so one host cannot take
    /// every handshake slot.
    handshakes_per_address_max: usize,
}

/// A registered client connection: where its deliveries go, and what the management interface
/// shows of it.
#[derive(Debug)]
struct Registered {
    outbox: Outbox,
    info: Arc<ConnectionInfo>,
}

/// Sockets in their handshake, in all and by source address (an IPv6 address by its /64).
#[derive(Debug, Default)]
struct Handshaking {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// A socket's place among those in their handshake, given back when dropped.
#[derive(Debug)]
pub(crate) struct HandshakeSlot {
    handshaking: Arc<Mutex<Handshaking>>,
    address: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut handshaking = self.handshaking.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        handshaking.total = handshaking.total.saturating_sub(1);
        if let Some(count) = handshaking.by_address.get_mut(&self.address) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                handshaking.by_address.remove(&self.address);
            }
        }
    }
}

impl Connections {
    pub fn new(connections_max: usize, handshakes_max: usize, handshakes_per_address_max: usize) -> Self {
        Connections {
            open: Mutex::new(HashMap::new()),
            proxies: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            connections_max,
            handshaking: Arc::default(),
            handshakes_max,
            handshakes_per_address_max,
        }
    }

    /// A slot for a socket from `address` that starts its handshake; `None` when
    /// `handshakes_max` sockets, or `handshakes_per_address_max` from that address, already are.
    pub fn begin_handshake(&self, address: IpAddr) -> Option<HandshakeSlot> {
        let address = address_block(address);
        let mut handshaking = self.handshaking.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let from_address = handshaking.by_address.get(&address).copied().unwrap_or(0);
        if handshaking.total >= self.handshakes_max || from_address >= self.handshakes_per_address_max {
            return None;
        }
        handshaking.total += 1;
        handshaking.by_address.insert(address, from_address + 1);
        Some(HandshakeSlot { handshaking: Arc::clone(&self.handshaking), address })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionId, Registered>> {
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a client connection's outbox and what the management interface shows of it, and
    /// gives it an id; `None` when `connections_max` are open.
    pub fn register(&self, outbox: Outbox, info: Arc<ConnectionInfo>) -> Option<ConnectionId> {
        let mut open = self.lock();
        if open.len() >= self.connections_max {
            return None;
        }
        let id = ConnectionId(self.next_id.fetch_add(1, Ordering::Relaxed));
        info.id.store(id.0, Ordering::Relaxed);
        open.insert(id, Registered { outbox, info });
        Some(id)
    }

    /// Registers the outbox of a cluster's proxy connection (a consumer's connection on another
    /// node, `cluster/homed_link.rs`): reachable for deliveries, not a client connection (not
    /// counted against `connections_max`, not listed; its node's connection is).
    pub fn register_proxy(&self, outbox: Outbox) -> ConnectionId {
        let id = self.allocate_id();
        self.proxies.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(id, outbox);
        id
    }

    /// A connection id no client has: the management interface's own channels use it.
    pub fn allocate_id(&self) -> ConnectionId {
        ConnectionId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// What the management interface shows of every client connection.
    pub fn infos(&self) -> Vec<Arc<ConnectionInfo>> {
        self.lock().values().map(|registered| Arc::clone(&registered.info)).collect()
    }

    pub fn unregister(&self, id: ConnectionId) {
        if self.lock().remove(&id).is_none() {
            self.proxies.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&id);
        }
    }

    /// Client connections open.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// The outbox of an open connection.
    pub fn outbox(&self, id: ConnectionId) -> Option<Outbox> {
        if let Some(registered) = self.lock().get(&id) {
            return Some(registered.outbox.clone());
        }
        self.proxies.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&id).cloned()
    }
}

/// Encodes one method frame (a reply the server builds itself).
pub(crate) fn method_frame(channel: u16, method: &AMQPClass) -> Bytes {
    let mut buffer = BytesMut::with_capacity(64);
    if encode_method(&mut buffer, channel, method).is_err() {
        // Only over-long strings fail to encode; the replies built here never carry one.
        tracing::error!(?method, "could not encode a method");
    }
    buffer.freeze()
}

/// Reply texts are short strings: cut at 255 bytes, on a character boundary.
pub(crate) fn truncate(text: &str) -> String {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
