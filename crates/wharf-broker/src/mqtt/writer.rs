//! The MQTT connection's writer task: turns deliveries into PUBLISH packets and sends them with
//! whatever else the connection queued (acknowledgements, SUBACKs, PINGRESPs, already encoded).
//! Like the AMQP writer it takes no model lock: it gives each delivery a packet id and records it
//! in the connection's [`Flight`], where the session task finds it when the client acknowledges;
//! a delivery at QoS 0 has no acknowledgement, so the writer leaves its tag for the session task
//! to acknowledge once it is written.

use super::convert;
use crate::outbound::{Backlog, Outbound, OutboundDelivery};
use crate::pager::{DeliveryBody, PagedReadFailure};
use bytes::BytesMut;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use wharf_mqtt::{Packet, Publish, QoS, Version, topic};

/// A socket write is flushed once this much is buffered, even if more items are waiting.
const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;

/// A subscription as deliveries need it: its filter (MQTT form), granted QoS, identifier, and
/// the 5.0 options that decide whether and how a message goes out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Granted {
    pub filter: String,
    pub qos: QoS,
    pub identifier: Option<u32>,
    /// Not the session's own publishes.
    pub no_local: bool,
    /// Forwarded with the retain flag the publish had.
    pub retain_as_published: bool,
}

/// A delivery sent at QoS 1 or 2 and not yet acknowledged by the client.
#[derive(Debug, Clone, Copy)]
pub(super) struct InFlight {
    pub delivery_tag: u64,
    pub qos: QoS,
    /// Where the store keeps the message.
    pub stored: Option<wharf_model::StoredAt>,
}

/// What the writer and the session task share about deliveries.
#[derive(Debug)]
pub(super) struct FlightState {
    pub version: Version,
    /// The session's client id (its own publishes carry it when no-local is in use).
    pub client_id: String,
    /// The session's subscriptions (the QoS a delivery goes out at comes from those it matches).
    pub subscriptions: Vec<Granted>,
    /// The next packet id to try.
    pub next_packet_id: u16,
    /// QoS 1 awaiting PUBACK, QoS 2 awaiting PUBREC, by packet id.
    pub in_flight: HashMap<u16, InFlight>,
    /// QoS 2 deliveries the client received (PUBREC) whose PUBREL was sent: awaiting PUBCOMP.
    /// With where the store keeps each message, while its removal may not be durable yet (see
    /// `state.rs`).
    pub released: HashMap<u16, Option<wharf_model::StoredAt>>,
    /// Released deliveries, finished, whose copy may still come back after a crash.
    pub skip: std::collections::HashSet<wharf_model::StoredAt>,
    /// Delivery tags written at QoS 0, for the session task to acknowledge.
    pub written_at_qos_0: Vec<u64>,
    /// The largest packet the client takes (5.0's maximum packet size).
    pub client_packet_bytes_max: u32,
}

/// The packet id a stored message is sent with, from where the store keeps it: the same on every
/// delivery of the message, so one sent again after a reconnect or a broker restart has its
/// original id (section 4.4), and a client that already holds that id for an unfinished QoS 2
/// flow answers it with PUBREC rather than taking the message a second time.
fn packet_id_of(stored: wharf_model::StoredAt) -> u16 {
    let mixed = stored.seq.wrapping_add(stored.log.wrapping_mul(0x9E37_79B9));
    (mixed % u64::from(u16::MAX)) as u16 + 1
}

impl FlightState {
    /// A packet id in use by neither an unacknowledged delivery nor a released one: `preferred`
    /// if it is free, else the next free one.
    fn allocate_packet_id(&mut self, preferred: Option<u16>) -> Option<u16> {
        if let Some(id) = preferred
            && !self.in_flight.contains_key(&id)
            && !self.released.contains_key(&id)
        {
            return Some(id);
        }
        for _ in 0..u16::MAX {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.in_flight.contains_key(&id) && !self.released.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }
}

/// The shared state and the signal that QoS 0 tags wait to be acknowledged.
#[derive(Debug)]
pub(super) struct Flight {
    pub state: Mutex<FlightState>,
    pub qos_0_written: tokio::sync::Notify,
    /// The writer found the connection must end (its consumer was cancelled because its queue
    /// went away, or every packet id is taken); the reason is in `stop_reason`.
    pub stop: tokio::sync::Notify,
    pub stop_reason: Mutex<Option<String>>,
}

impl Flight {
    pub(super) fn new(
        version: Version,
        client_id: String,
        client_packet_bytes_max: u32,
        kept: &super::state::Kept,
    ) -> Flight {
        Flight {
            state: Mutex::new(FlightState {
                version,
                client_id,
                subscriptions: Vec::new(),
                next_packet_id: 1,
                in_flight: HashMap::new(),
                released: kept
                    .released
                    .iter()
                    .map(|(id, stored)| (*id, stored.map(|(log, seq)| wharf_model::StoredAt { log, seq })))
                    .collect(),
                skip: kept.skip.iter().map(|&(log, seq)| wharf_model::StoredAt { log, seq }).collect(),
                written_at_qos_0: Vec::new(),
                client_packet_bytes_max,
            }),
            qos_0_written: tokio::sync::Notify::new(),
            stop: tokio::sync::Notify::new(),
            stop_reason: Mutex::new(None),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, FlightState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks the session to end the connection.
    fn stop(&self, reason: String) {
        *self.stop_reason.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(reason);
        self.stop.notify_one();
    }

    pub(super) fn stop_reason(&self) -> String {
        self.stop_reason.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone().unwrap_or_default()
    }
}

/// How a delivery goes out, from the subscriptions its topic matches.
#[derive(Debug, PartialEq, Eq)]
struct Matched {
    /// The highest QoS of those subscriptions, at most the QoS it was published with; `None`:
    /// every subscription it matches is no-local and it is the session's own publish.
    qos: Option<QoS>,
    /// The identifiers of those subscriptions (5.0).
    identifiers: Vec<u32>,
    /// One of them keeps the publish's retain flag.
    retain_as_published: bool,
}

fn granted_for(subscriptions: &[Granted], topic_name: &str, published: QoS, own: bool) -> Matched {
    let mut granted = None;
    let mut identifiers = Vec::new();
    let mut retain_as_published = false;
    let mut left_out = false;
    for subscription in subscriptions.iter().filter(|subscription| topic::matches(&subscription.filter, topic_name)) {
        if own && subscription.no_local {
            left_out = true;
            continue;
        }
        granted = granted.max(Some(subscription.qos));
        identifiers.extend(subscription.identifier);
        retain_as_published |= subscription.retain_as_published;
    }
    let qos = match granted {
        Some(qos) => Some(qos.min(published)),
        None if left_out => None,
        // Matched by no subscription any more (unsubscribed while it was queued): at most once.
        None => Some(QoS::AtMostOnce),
    };
    Matched { qos, identifiers, retain_as_published }
}

/// A body could not be read back: the connection closes, so its deliveries are requeued.
#[derive(Debug)]
struct Unreadable;

/// Encodes one delivery as a PUBLISH; returns the delivery bytes it carried.
fn encode_delivery(
    buffer: &mut BytesMut,
    outbound: OutboundDelivery,
    flight: &Flight,
    backlog: &Backlog,
) -> Result<u64, Unreadable> {
    let OutboundDelivery { delivery, count_recorded: _, body } = outbound;
    let weight = wharf_model::broker::delivery_bytes(&delivery.message);
    let payload = match body {
        DeliveryBody::Resident(bytes) => bytes,
        DeliveryBody::Paged(read) => {
            let left_the_model = read.left_the_model();
            match read.read() {
                Ok(body) => body,
                Err(PagedReadFailure::QueueGone) => {
                    if !left_the_model {
                        backlog.reports.unsent(delivery.channel, delivery.delivery_tag);
                    }
                    return Ok(weight);
                }
                Err(PagedReadFailure::Unreadable(error)) => {
                    tracing::error!(queue = %delivery.queue, %error, "a paged-out message could not be read back; closing the MQTT connection");
                    return Err(Unreadable);
                }
            }
        }
    };
    let topic_name = topic::to_mqtt(&delivery.message.routing_key);
    let mut state = flight.lock();
    let seen_before = delivery.store.is_some_and(|at| state.skip.remove(&at));
    if seen_before || (delivery.store.is_some() && state.released.values().any(|released| *released == delivery.store))
    {
        // The client has this QoS 2 message (its PUBREC came before a crash that lost the
        // message's removal): it leaves the queue again and is not sent.
        state.written_at_qos_0.push(delivery.delivery_tag);
        drop(state);
        flight.qos_0_written.notify_one();
        return Ok(weight);
    }
    if topic::check_name(&topic_name).is_err() {
        // An AMQP routing key with `*` or `#` has no MQTT topic name: acknowledged, not sent.
        tracing::warn!(queue = %delivery.queue, routing_key = %delivery.message.routing_key, "a message whose routing key is no MQTT topic name was dropped");
        state.written_at_qos_0.push(delivery.delivery_tag);
        drop(state);
        flight.qos_0_written.notify_one();
        return Ok(weight);
    }
    let version = state.version;
    let outward = convert::outgoing(&delivery.message, version.is_v5());
    let own = outward.publisher.as_deref() == Some(state.client_id.as_str());
    let matched = granted_for(&state.subscriptions, &topic_name, outward.qos, own);
    let Some(qos) = matched.qos else {
        // Its own publish, and every subscription it matches is no-local: acknowledged, not sent.
        state.written_at_qos_0.push(delivery.delivery_tag);
        drop(state);
        flight.qos_0_written.notify_one();
        return Ok(weight);
    };
    // A copy for a new subscription always has the flag; a forwarded publish keeps its own only
    // for a retain-as-published subscription (section 3.3.1.3).
    let retained = outward.retained || (outward.published_retained && matched.retain_as_published);
    let mut properties = outward.properties;
    if version.is_v5() {
        properties.subscription_identifiers = matched.identifiers;
    }
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        match state.allocate_packet_id(delivery.store.map(packet_id_of)) {
            Some(id) => id,
            None => {
                // Every id is taken: the client keeps QoS 2 flows open without PUBCOMP. The
                // delivery goes back to the queue when the connection ends.
                drop(state);
                flight.stop("every packet id is in use (QoS 2 flows the client never completes)".into());
                return Ok(weight);
            }
        }
    };
    let publish = Publish {
        dup: delivery.redelivered && qos != QoS::AtMostOnce,
        qos,
        retain: retained,
        topic: topic_name,
        packet_id,
        properties,
        payload,
    };
    let start = buffer.len();
    wharf_mqtt::encode(&Packet::Publish(publish), version, buffer);
    if buffer.len() - start > state.client_packet_bytes_max as usize {
        // Over the client's maximum packet size: discarded, as 5.0 says (section 3.1.2.11.4).
        buffer.truncate(start);
        state.written_at_qos_0.push(delivery.delivery_tag);
        drop(state);
        flight.qos_0_written.notify_one();
        return Ok(weight);
    }
    if qos == QoS::AtMostOnce {
        state.written_at_qos_0.push(delivery.delivery_tag);
    } else {
        state
            .in_flight
            .insert(packet_id, InFlight { delivery_tag: delivery.delivery_tag, qos, stored: delivery.store });
    }
    Ok(weight)
}

/// Runs until every sender is gone or the socket fails, like the AMQP writer (`crate::writer`).
pub(super) async fn run<W: AsyncWrite + Unpin>(
    mut socket: W,
    mut outbound: mpsc::UnboundedReceiver<Outbound>,
    flight: Arc<Flight>,
    backlog: Arc<Backlog>,
) {
    let mut buffer = BytesMut::new();
    let mut recorded = Vec::new();
    let mut failed = false;
    while let Some(first) = outbound.recv().await {
        let mut item = Some(first);
        let mut queued_bytes = 0;
        let mut delivered_bytes = 0;
        let mut wrote_qos_0 = false;
        let mut unreadable = false;
        while let Some(next) = item.take() {
            queued_bytes += next.size_bytes();
            match next {
                Outbound::Frames(bytes) => buffer.extend_from_slice(&bytes),
                Outbound::Deliver(delivery) if failed || unreadable => delivery.body.drop_unsent(),
                Outbound::Deliver(mut delivery) => {
                    recorded.extend(delivery.count_recorded.take());
                    let before = flight.lock().written_at_qos_0.len();
                    match encode_delivery(&mut buffer, delivery, &flight, &backlog) {
                        Ok(weight) => delivered_bytes += weight,
                        Err(Unreadable) => unreadable = true,
                    }
                    wrote_qos_0 |= flight.lock().written_at_qos_0.len() > before;
                }
                // Nothing unroutable comes back to an MQTT publisher.
                Outbound::Return { .. } => {}
                // The session's queue went away (deleted by an administrator, or its vhost):
                // the connection ends, as RabbitMQ ends it.
                Outbound::CancelConsumer { .. } => flight.stop("the session's queue was deleted".into()),
            }
            if buffer.len() < WRITE_BATCH_BYTES_MAX {
                item = outbound.try_recv().ok();
            }
        }
        if unreadable && !failed {
            failed = true;
            backlog.writer_failed.notify_one();
        }
        for ticket in recorded.drain(..) {
            let _ = ticket.await;
        }
        if socket.write_all(&buffer).await.is_err() || socket.flush().await.is_err() {
            outbound.close();
            while let Ok(item) = outbound.try_recv() {
                if let Outbound::Deliver(delivery) = item {
                    delivery.body.drop_unsent();
                }
            }
            return;
        }
        // A burst's buffer is not kept by a connection that goes quiet after it.
        if buffer.capacity() > WRITE_BATCH_BYTES_MAX {
            buffer = BytesMut::new();
        } else {
            buffer.clear();
        }
        backlog.bytes.fetch_sub(queued_bytes, Ordering::Relaxed);
        backlog.drained.notify_waiters();
        if delivered_bytes > 0 {
            backlog.reports.written(delivered_bytes);
        }
        // Told only once written: a QoS 0 delivery is acknowledged when it has left.
        if wrote_qos_0 {
            flight.qos_0_written.notify_one();
        }
    }
    let _ = socket.shutdown().await;
}
