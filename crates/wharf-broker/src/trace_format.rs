//! A message's delivery-trace provenance (`wharf_model::trace`) as stored in its meta (extension
//! tag 2, `docs/storage-format.md`). Strings are cut to 255 bytes (at a character boundary); a
//! history holds at most `TRACE_EVENTS_LIMIT` events, so an encoded one stays under 64 KiB.
//! Decoding checks every length and returns `None` for anything it does not understand.

use std::sync::Arc;
use wharf_model::DeathReason;
use wharf_model::trace::{Origin, Provenance, RequeueCause, TraceEvent, TraceKind, TraceLog};

const PUBLISHED: u8 = 0;
const TRAVELLED: u8 = 1;

const EVENT_PUBLISHED: u8 = 0;
const EVENT_DELIVERED: u8 = 1;
const EVENT_REQUEUED: u8 = 2;
const EVENT_REJECTED: u8 = 3;
const EVENT_DEAD_LETTERED: u8 = 4;
const EVENT_REPLAYED: u8 = 5;
const EVENT_MOVED: u8 = 6;

pub(crate) fn encode_provenance(provenance: &Provenance, out: &mut Vec<u8>) {
    match provenance {
        Provenance::Published(origin) => {
            out.push(PUBLISHED);
            encode_origin(origin, out);
        }
        Provenance::Travelled(log) => {
            out.push(TRAVELLED);
            out.extend_from_slice(&log.dropped.to_le_bytes());
            let events = &log.events[..log.events.len().min(wharf_model::trace::TRACE_EVENTS_LIMIT)];
            out.push(events.len() as u8);
            for event in events {
                encode_event(event, out);
            }
        }
    }
}

pub(crate) fn decode_provenance(bytes: &[u8]) -> Option<Provenance> {
    let mut reader = Reader(bytes);
    let provenance = match reader.byte()? {
        PUBLISHED => Provenance::Published(reader.origin()?),
        TRAVELLED => {
            let dropped = u32::from_le_bytes(reader.take(4)?.try_into().ok()?);
            let count = reader.byte()?;
            let events = (0..count).map(|_| reader.event()).collect::<Option<Vec<_>>>()?;
            Provenance::Travelled(TraceLog { events, dropped })
        }
        _ => return None,
    };
    reader.0.is_empty().then_some(provenance)
}

fn encode_text(text: &str, out: &mut Vec<u8>) {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.push(end as u8);
    out.extend_from_slice(&text.as_bytes()[..end]);
}

fn encode_optional(text: Option<&str>, out: &mut Vec<u8>) {
    match text {
        None => out.push(0),
        Some(text) => {
            out.push(1);
            encode_text(text, out);
        }
    }
}

fn encode_origin(origin: &Origin, out: &mut Vec<u8>) {
    encode_text(&origin.connection, out);
    encode_text(&origin.user, out);
}

fn encode_event(event: &TraceEvent, out: &mut Vec<u8>) {
    out.extend_from_slice(&event.at_ms.to_le_bytes());
    encode_optional(event.queue.as_deref(), out);
    match &event.kind {
        TraceKind::Published(origin) => {
            out.push(EVENT_PUBLISHED);
            encode_origin(origin, out);
        }
        TraceKind::Delivered { connection, consumer_tag } => {
            out.push(EVENT_DELIVERED);
            encode_optional(connection.as_deref(), out);
            encode_optional(consumer_tag.as_deref(), out);
        }
        TraceKind::Requeued(cause) => {
            out.push(EVENT_REQUEUED);
            out.push(match cause {
                RequeueCause::Nack => 0,
                RequeueCause::LeaseExpired => 1,
                RequeueCause::ChannelClosed => 2,
                RequeueCause::Reject => 3,
                RequeueCause::Recover => 4,
            });
        }
        TraceKind::Rejected { by_nack } => {
            out.push(EVENT_REJECTED);
            out.push(u8::from(*by_nack));
        }
        TraceKind::DeadLettered { reason, exchange, routing_key } => {
            out.push(EVENT_DEAD_LETTERED);
            out.push(match reason {
                DeathReason::Rejected => 0,
                DeathReason::Expired => 1,
                DeathReason::MaxLen => 2,
                DeathReason::DeliveryLimit => 3,
            });
            encode_text(exchange, out);
            encode_text(routing_key, out);
        }
        TraceKind::Replayed { exchange, routing_key, user } => {
            out.push(EVENT_REPLAYED);
            encode_text(exchange, out);
            encode_text(routing_key, out);
            encode_text(user, out);
        }
        TraceKind::Moved { to_queue, user } => {
            out.push(EVENT_MOVED);
            encode_text(to_queue, out);
            encode_text(user, out);
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, length: usize) -> Option<&[u8]> {
        if self.0.len() < length {
            return None;
        }
        let (taken, rest) = self.0.split_at(length);
        self.0 = rest;
        Some(taken)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|taken| taken[0])
    }

    fn text(&mut self) -> Option<String> {
        let length = usize::from(self.byte()?);
        String::from_utf8(self.take(length)?.to_vec()).ok()
    }

    fn optional(&mut self) -> Option<Option<String>> {
        match self.byte()? {
            0 => Some(None),
            1 => Some(Some(self.text()?)),
            _ => None,
        }
    }

    fn origin(&mut self) -> Option<Origin> {
        Some(Origin { connection: self.text()?, user: self.text()? })
    }

    fn event(&mut self) -> Option<TraceEvent> {
        let at_ms = u64::from_le_bytes(self.take(8)?.try_into().ok()?);
        let queue = self.optional()?.map(Arc::from);
        let kind = match self.byte()? {
            EVENT_PUBLISHED => TraceKind::Published(self.origin()?),
            EVENT_DELIVERED => TraceKind::Delivered { connection: self.optional()?, consumer_tag: self.optional()? },
            EVENT_REQUEUED => TraceKind::Requeued(match self.byte()? {
                0 => RequeueCause::Nack,
                1 => RequeueCause::LeaseExpired,
                2 => RequeueCause::ChannelClosed,
                3 => RequeueCause::Reject,
                4 => RequeueCause::Recover,
                _ => return None,
            }),
            EVENT_REJECTED => TraceKind::Rejected {
                by_nack: match self.byte()? {
                    0 => false,
                    1 => true,
                    _ => return None,
                },
            },
            EVENT_DEAD_LETTERED => TraceKind::DeadLettered {
                reason: match self.byte()? {
                    0 => DeathReason::Rejected,
                    1 => DeathReason::Expired,
                    2 => DeathReason::MaxLen,
                    3 => DeathReason::DeliveryLimit,
                    _ => return None,
                },
                exchange: self.text()?,
                routing_key: self.text()?,
            },
            EVENT_REPLAYED => {
                TraceKind::Replayed { exchange: self.text()?, routing_key: self.text()?, user: self.text()? }
            }
            EVENT_MOVED => TraceKind::Moved { to_queue: self.text()?, user: self.text()? },
            _ => return None,
        };
        Some(TraceEvent { at_ms, queue, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Provenance {
        let origin = Origin { connection: "orders-service".into(), user: "app".into() };
        let queue: Option<Arc<str>> = Some(Arc::from("orders"));
        let kinds = vec![
            TraceKind::Published(origin),
            TraceKind::Delivered { connection: Some("worker-1".into()), consumer_tag: Some("ctag-1".into()) },
            TraceKind::Delivered { connection: None, consumer_tag: None },
            TraceKind::Requeued(RequeueCause::Nack),
            TraceKind::Requeued(RequeueCause::Reject),
            TraceKind::Requeued(RequeueCause::Recover),
            TraceKind::Requeued(RequeueCause::LeaseExpired),
            TraceKind::Requeued(RequeueCause::ChannelClosed),
            TraceKind::Rejected { by_nack: true },
            TraceKind::Rejected { by_nack: false },
            TraceKind::DeadLettered {
                reason: DeathReason::DeliveryLimit,
                exchange: "dlx".into(),
                routing_key: "orders.dead".into(),
            },
            TraceKind::Replayed { exchange: String::new(), routing_key: "orders".into(), user: "ops".into() },
            TraceKind::Moved { to_queue: "parked".into(), user: "ops".into() },
        ];
        let events = kinds
            .into_iter()
            .enumerate()
            .map(|(index, kind)| TraceEvent { at_ms: 1_000 + index as u64, queue: queue.clone(), kind })
            .collect();
        Provenance::Travelled(TraceLog { events, dropped: 3 })
    }

    #[test]
    fn every_event_round_trips() {
        for provenance in [
            every_kind(),
            Provenance::Published(Origin { connection: "127.0.0.1:1 -> 127.0.0.1:2".into(), user: "guest".into() }),
        ] {
            let mut bytes = Vec::new();
            encode_provenance(&provenance, &mut bytes);
            assert_eq!(decode_provenance(&bytes), Some(provenance.clone()));
            for cut in 0..bytes.len() {
                assert_eq!(decode_provenance(&bytes[..cut]), None, "cut at {cut}");
            }
        }
    }

    #[test]
    fn long_names_are_cut_at_a_character_boundary() {
        let name = "é".repeat(200);
        let provenance = Provenance::Published(Origin { connection: name.clone(), user: "u".into() });
        let mut bytes = Vec::new();
        encode_provenance(&provenance, &mut bytes);
        let Some(Provenance::Published(origin)) = decode_provenance(&bytes) else { panic!("decodes") };
        assert_eq!(origin.connection, "é".repeat(127));
    }
}
