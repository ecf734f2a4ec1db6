//! The connection's writer task, a sink: turns [`Outbound`] items into frames, batches them into
//! as few socket writes as possible, and sends heartbeats when the connection is otherwise quiet.
//! It never takes the model lock and decides nothing about messages: what it learns (delivery
//! bytes written, deliveries it could not send) goes to its connection's [`WriterReports`].

use crate::outbound::{Backlog, Outbound, OutboundDelivery, WriterReports};
use crate::pager::{DeliveryBody, PagedReadFailure};
use bytes::BytesMut;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use wharf_store::Ticket;
use wharf_wire::frame::{FRAME_MIN_SIZE, encode_body, encode_content_header, encode_heartbeat, encode_method};
use wharf_wire::protocol::{AMQPClass, basic};

/// A socket write is flushed once this much is buffered, even if more items are waiting.
const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;

/// Settings the connection task updates after tuning.
#[derive(Debug)]
pub(crate) struct WriterSettings {
    /// The negotiated frame_max, for splitting bodies.
    pub frame_max: AtomicU32,
    /// Heartbeat interval in seconds (0: none); a heartbeat goes out after half of it idle.
    pub heartbeat_s: AtomicU32,
    /// The client announced `consumer_cancel_notify`: a consumer the server cancels (its queue
    /// was deleted) is told with `basic.cancel`. Without it, as in RabbitMQ, it is not told.
    pub cancel_notify: AtomicBool,
}

impl WriterSettings {
    /// Before the handshake: the smallest frames, no heartbeats, cancel notifications on.
    pub(crate) fn new() -> Self {
        WriterSettings {
            frame_max: AtomicU32::new(FRAME_MIN_SIZE),
            heartbeat_s: AtomicU32::new(0),
            cancel_notify: AtomicBool::new(true),
        }
    }
}

/// A paged-out body could not be read back (a damaged record, a failing disk): the connection is
/// closed, so its unacknowledged deliveries are requeued, rather than a message sent without its
/// body.
#[derive(Debug)]
struct Unreadable;

/// Encodes one item; returns the delivery bytes it carried (what the model counts as pending).
/// A redelivery's delivery-count ticket joins `recorded`: the batch is written only once they all
/// resolved. A paged-out body is read here, as decided when the delivery was queued (see
/// `pager`), on the connection's own task, so the model lock is never held for it.
fn encode(
    buffer: &mut BytesMut,
    item: Outbound,
    settings: &WriterSettings,
    recorded: &mut Vec<Ticket<()>>,
    reports: &WriterReports,
) -> Result<u64, Unreadable> {
    let frame_max = settings.frame_max.load(Ordering::Relaxed);
    match item {
        Outbound::Frames(bytes) => buffer.extend_from_slice(&bytes),
        Outbound::Deliver(OutboundDelivery { delivery, count_recorded, body }) => {
            recorded.extend(count_recorded);
            let weight = wharf_model::broker::delivery_bytes(&delivery.message);
            let channel = delivery.channel.channel;
            let message = &delivery.message;
            let body = match body {
                DeliveryBody::Resident(bytes) => bytes,
                DeliveryBody::Paged(read) => {
                    let left_the_model = read.left_the_model();
                    match read.read() {
                        Ok(body) => body,
                        Err(PagedReadFailure::QueueGone) => {
                            // Its queue was deleted meanwhile, and its messages with it: nothing
                            // to send. A `basic.get` still gets its answer; a consumer's slot is
                            // freed by its connection (a requeue, so that were the queue somehow
                            // still there, the message would stay in it).
                            if delivery.consumer_tag.is_none() {
                                let empty = AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {}));
                                let _ = encode_method(buffer, channel, &empty);
                            }
                            if !left_the_model {
                                reports.unsent(delivery.channel, delivery.delivery_tag);
                            }
                            return Ok(weight);
                        }
                        Err(PagedReadFailure::Unreadable(error)) => {
                            tracing::error!(queue = %delivery.queue, %error, "a paged-out message could not be read back; closing the connection");
                            return Err(Unreadable);
                        }
                    }
                }
            };
            let method = match &delivery.consumer_tag {
                Some(tag) => AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                    consumer_tag: tag.as_str().into(),
                    delivery_tag: delivery.delivery_tag,
                    redelivered: delivery.redelivered,
                    exchange: message.exchange.as_str().into(),
                    routing_key: message.routing_key.as_str().into(),
                })),
                None => AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                    delivery_tag: delivery.delivery_tag,
                    redelivered: delivery.redelivered,
                    exchange: message.exchange.as_str().into(),
                    routing_key: message.routing_key.as_str().into(),
                    message_count: delivery.message_count,
                })),
            };
            // Names and keys came in as short strings, so the method always encodes.
            if encode_method(buffer, channel, &method).is_ok() {
                encode_content_header(buffer, channel, body.len() as u64, &message.raw_properties);
                encode_body(buffer, channel, &body, frame_max);
            }
            return Ok(weight);
        }
        Outbound::Return { channel, reply_code, reply_text, message } => {
            let method = AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code,
                reply_text: reply_text.into(),
                exchange: message.exchange.as_str().into(),
                routing_key: message.routing_key.as_str().into(),
            }));
            // A returned publish was never stored, so its body is in memory.
            let body = message.bytes_in_memory().cloned().unwrap_or_default();
            if encode_method(buffer, channel, &method).is_ok() {
                encode_content_header(buffer, channel, body.len() as u64, &message.raw_properties);
                encode_body(buffer, channel, &body, frame_max);
            }
        }
        Outbound::CancelConsumer { .. } if !settings.cancel_notify.load(Ordering::Relaxed) => {}
        Outbound::CancelConsumer { channel, consumer_tag } => {
            let method = AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: consumer_tag.into(),
                nowait: true,
            }));
            let _ = encode_method(buffer, channel, &method);
        }
    }
    Ok(0)
}

/// A delivery that will never be written. An acknowledged-mode one stays unacknowledged in the
/// model (requeued when the connection closes); a paged-out no-ack one already left the model, so
/// its record is removed too (see `DeliveryBody::drop_unsent`).
fn drop_unsent(item: Outbound) {
    if let Outbound::Deliver(outbound) = item {
        outbound.body.drop_unsent();
    }
}

/// Runs until every sender is gone (the connection ended) or the socket fails. After each write it
/// reports how many delivery bytes left (see `WriterReports::written`), which lets dispatching to
/// a slow reader resume.
pub(crate) async fn run<W: AsyncWrite + Unpin>(
    mut socket: W,
    mut outbound: mpsc::UnboundedReceiver<Outbound>,
    settings: Arc<WriterSettings>,
    backlog: Arc<Backlog>,
) {
    // Grown by the first writes that need it: an idle connection keeps only what its handshake took.
    let mut buffer = BytesMut::new();
    let mut recorded = Vec::new();
    // A body could not be read back: only control frames go out any more.
    let mut failed = false;
    loop {
        let heartbeat_s = settings.heartbeat_s.load(Ordering::Relaxed);
        let idle = if heartbeat_s == 0 {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(u64::from(heartbeat_s) * 500)
        };
        let first = tokio::select! {
            item = outbound.recv() => match item {
                Some(item) => Some(item),
                None => break,
            },
            () = tokio::time::sleep(idle) => None,
        };
        let mut queued_bytes = first.as_ref().map_or(0, Outbound::size_bytes);
        let encoded = match first {
            Some(item) if failed && matches!(item, Outbound::Deliver(..)) => {
                drop_unsent(item);
                Ok(0)
            }
            Some(item) => encode(&mut buffer, item, &settings, &mut recorded, &backlog.reports),
            None if heartbeat_s > 0 => {
                encode_heartbeat(&mut buffer);
                Ok(0)
            }
            None => continue,
        };
        let mut delivered_bytes = 0;
        let mut unreadable = encoded.is_err();
        if let Ok(weight) = encoded {
            delivered_bytes += weight;
        }
        while buffer.len() < WRITE_BATCH_BYTES_MAX {
            match outbound.try_recv() {
                Ok(item) => {
                    queued_bytes += item.size_bytes();
                    if (failed || unreadable) && matches!(item, Outbound::Deliver(..)) {
                        drop_unsent(item);
                        continue;
                    }
                    match encode(&mut buffer, item, &settings, &mut recorded, &backlog.reports) {
                        Ok(weight) => delivered_bytes += weight,
                        Err(Unreadable) => unreadable = true,
                    }
                }
                Err(_) => break,
            }
        }
        if unreadable && !failed {
            // From here on deliveries are dropped (see `drop_unsent`); the reader closes the
            // connection.
            failed = true;
            backlog.writer_failed.notify_one();
        }
        for ticket in recorded.drain(..) {
            // A failure is the store's to report (it stops the broker); the delivery still goes.
            let _ = ticket.await;
        }
        // The flush is free on a TCP socket; a TLS stream may keep records it could not write yet
        // until flushed.
        if socket.write_all(&buffer).await.is_err() || socket.flush().await.is_err() {
            outbound.close();
            while let Ok(item) = outbound.try_recv() {
                drop_unsent(item);
            }
            return;
        }
        buffer.clear();
        backlog.bytes.fetch_sub(queued_bytes, Ordering::Relaxed);
        backlog.drained.notify_waiters();
        if delivered_bytes > 0 {
            backlog.reports.written(delivered_bytes);
        }
    }
    let _ = socket.shutdown().await;
}
