//! Per-message delivery traces (a Wharf extension): what happened to a message, bounded, so an
//! operator can say why it ended up where it is (who received it, when, what became of each
//! delivery, each dead-letter hop, each replay).
//!
//! Where the events live, chosen so that the path every message takes costs nothing:
//! - A message's [`Provenance`] (`Message::trace`): for a message fresh from a publisher, the
//!   publishing connection's [`Origin`], one `Arc` shared by all its messages (its time is when
//!   it entered its queue); after a hop (dead-letter, replay, move), everything before the hop,
//!   starting with the publish. It is stored with the message (its meta), so it is as durable as
//!   the message.
//! - An entry's own events in its current queue (`Entry::trace`): a delivery and what became of
//!   it, recorded only when it did not end in an ack (requeue, lease expiry, channel closed,
//!   reject), from the facts the channel kept about the delivery. An acked message leaves with
//!   its trace, so the ack path records nothing.
//!
//! Each list holds at most the broker's `trace_events_max` events; past it the oldest after the
//! first (the publish) are dropped and counted.

use crate::deadletter::DeathReason;
use std::sync::Arc;

/// Who published a message: the connection's name (its client-provided name, or its peer
/// address) and the user it logged in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub connection: String,
    pub user: String,
}

/// What a message brought into its current queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    /// Fresh from this publisher: the only event is the publish, at the time it entered its queue.
    Published(Origin),
    /// Everything that happened before the hop that brought it here.
    Travelled(TraceLog),
}

/// A bounded list of events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceLog {
    pub events: Vec<TraceEvent>,
    /// Events dropped to keep the list within its bound (the oldest after the first).
    pub dropped: u32,
}

/// One thing that happened to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    /// When (ms since the epoch, the broker's clock).
    pub at_ms: u64,
    /// The queue it happened in; `None` for the queue the message is in now.
    pub queue: Option<Arc<str>>,
    pub kind: TraceKind,
}

/// Why a delivery came back to its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequeueCause {
    /// The consumer sent `basic.nack` with requeue.
    Nack,
    /// The consumer sent `basic.reject` with requeue.
    Reject,
    /// The consumer sent `basic.recover`.
    Recover,
    /// Its lease ran out (`x-consumer-timeout` or the vhost's default).
    LeaseExpired,
    /// Its channel or connection closed (or went before the delivery could be written to it)
    /// before it was settled.
    ChannelClosed,
}

impl RequeueCause {
    pub fn as_str(self) -> &'static str {
        match self {
            RequeueCause::Nack => "nack",
            RequeueCause::Reject => "reject",
            RequeueCause::Recover => "recover",
            RequeueCause::LeaseExpired => "lease_expired",
            RequeueCause::ChannelClosed => "channel_closed",
        }
    }
}

/// How a consumer settled a delivery without acknowledging it (for its trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `basic.nack`.
    Nack,
    /// `basic.reject`.
    Reject,
    /// `basic.recover` (always with requeue).
    Recover,
    /// Not a consumer's doing: the delivery could not be written to its connection.
    Undelivered,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceKind {
    /// Published by this connection and user.
    Published(Origin),
    /// Delivered to a consumer (`consumer_tag`) or a `basic.get` (`None`) on a connection
    /// (`None` if not known).
    Delivered { connection: Option<String>, consumer_tag: Option<String> },
    /// The delivery came back, unsettled.
    Requeued(RequeueCause),
    /// Refused without requeue by the consumer it was delivered to: `basic.nack` (`by_nack`) or
    /// `basic.reject`.
    Rejected { by_nack: bool },
    /// Left its queue for a dead-letter exchange (or the automatic dead-letter queue).
    DeadLettered { reason: DeathReason, exchange: String, routing_key: String },
    /// Replayed from the workbench by `user` to `exchange` with `routing_key`.
    Replayed { exchange: String, routing_key: String, user: String },
    /// Moved from the workbench by `user` to `to_queue`.
    Moved { to_queue: String, user: String },
}

/// The most events a trace may be configured to keep (a stored history must fit one meta
/// extension; see `docs/storage-format.md`).
pub const TRACE_EVENTS_LIMIT: usize = 48;

impl TraceLog {
    /// Adds an event, dropping the oldest after the first beyond `max`.
    pub fn push(&mut self, event: TraceEvent, max: usize) {
        self.events.push(event);
        self.bound(max);
    }

    fn bound(&mut self, max: usize) {
        let max = max.max(2);
        if self.events.len() > max {
            let excess = self.events.len() - max;
            self.events.drain(1..1 + excess);
            self.dropped = self.dropped.saturating_add(excess as u32);
        }
    }
}

/// The whole trace of a message in queue `queue_name`: what it brought (`provenance`, its publish
/// at `entered_ms` for a fresh one), then its own events there, each marked with the queue when
/// `mark_queue` (for a history that travels on).
pub fn full_trace(
    provenance: Option<&Provenance>,
    entered_ms: u64,
    own: Option<&TraceLog>,
    queue_name: Option<&Arc<str>>,
    max: usize,
) -> TraceLog {
    let mut log = match provenance {
        Some(Provenance::Travelled(history)) => history.clone(),
        Some(Provenance::Published(origin)) => TraceLog {
            events: vec![TraceEvent {
                at_ms: entered_ms,
                queue: queue_name.cloned(),
                kind: TraceKind::Published(origin.clone()),
            }],
            dropped: 0,
        },
        None => TraceLog::default(),
    };
    if let Some(own) = own {
        log.dropped = log.dropped.saturating_add(own.dropped);
        for event in &own.events {
            let mut event = event.clone();
            if event.queue.is_none() {
                event.queue = queue_name.cloned();
            }
            log.events.push(event);
        }
    }
    log.bound(max);
    log
}

/// The provenance a message carries on after a hop from queue `queue_name`: its whole trace
/// there, and the hop.
pub fn carried(
    provenance: Option<&Provenance>,
    entered_ms: u64,
    own: Option<&TraceLog>,
    queue_name: &str,
    hop: TraceEvent,
    max: usize,
) -> Provenance {
    let queue: Arc<str> = Arc::from(queue_name);
    let mut log = full_trace(provenance, entered_ms, own, Some(&queue), usize::MAX);
    let mut hop = hop;
    hop.queue.get_or_insert(queue);
    log.push(hop, max);
    Provenance::Travelled(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(at_ms: u64) -> TraceEvent {
        TraceEvent { at_ms, queue: None, kind: TraceKind::Requeued(RequeueCause::Nack) }
    }

    #[test]
    fn a_log_keeps_its_first_event_and_the_newest_within_its_bound() {
        let mut log = TraceLog::default();
        for at_ms in 0..10 {
            log.push(event(at_ms), 4);
        }
        let times: Vec<u64> = log.events.iter().map(|event| event.at_ms).collect();
        assert_eq!(times, [0, 7, 8, 9]);
        assert_eq!(log.dropped, 6);
    }

    #[test]
    fn a_hop_carries_the_publish_the_events_in_the_queue_and_the_hop() {
        let origin = Origin { connection: "orders-service".into(), user: "app".into() };
        let own = TraceLog { events: vec![event(20)], dropped: 0 };
        let hop = TraceEvent {
            at_ms: 30,
            queue: None,
            kind: TraceKind::DeadLettered {
                reason: DeathReason::Rejected,
                exchange: String::new(),
                routing_key: "orders.dlq".into(),
            },
        };
        let Provenance::Travelled(log) =
            carried(Some(&Provenance::Published(origin.clone())), 10, Some(&own), "orders", hop, 16)
        else {
            panic!("a hop carries a history");
        };
        assert_eq!(log.events.len(), 3);
        assert_eq!(log.events[0].kind, TraceKind::Published(origin));
        assert_eq!(log.events[0].at_ms, 10);
        assert!(log.events.iter().all(|event| event.queue.as_deref() == Some("orders")));
        assert_eq!(log.events[2].at_ms, 30);
    }
}
