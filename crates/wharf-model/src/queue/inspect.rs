//! Read-only views of a queue for the management interface: its byte totals and its consumers
//! as they stand. Nothing here changes the queue, so the management API can never disturb the
//! bookkeeping `queue.rs` keeps.

use super::{ChannelKey, Entry, Queue};

/// A consumer as its queue sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConsumer {
    /// Its channel.
    pub channel: ChannelKey,
    /// Its tag.
    pub consumer_tag: String,
    /// Its `x-priority`.
    pub priority: i32,
    /// It holds the queue alone (`basic.consume` with `exclusive`).
    pub exclusive: bool,
    /// It receives messages now: always, unless the queue has a single active consumer and
    /// this is not it.
    pub active: bool,
}

/// Where a browsed message is in its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// Ready for delivery.
    Ready,
    /// Held back: waiting out a retry backoff, or behind an earlier message of its key.
    Waiting,
    /// Delivered and not yet acknowledged.
    Unacknowledged,
}

impl EntryState {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryState::Ready => "ready",
            EntryState::Waiting => "waiting",
            EntryState::Unacknowledged => "unacknowledged",
        }
    }
}

impl Queue {
    /// Every message the queue holds, in one order (ready ones in delivery order, then waiting
    /// ones, then unacknowledged ones, each by id), `take` of them from position `skip`, without
    /// touching any: for browsing. Returns the total with the page.
    pub fn browse(&self, skip: usize, take: usize) -> (usize, Vec<(Entry, EntryState)>) {
        let ready_count = self.ready.len();
        let total = ready_count + self.waiting.len() + self.unacked.len();
        let mut page: Vec<(Entry, EntryState)> =
            self.ready.entries_page(skip, take).into_iter().map(|entry| (entry, EntryState::Ready)).collect();
        let mut skip = skip.saturating_sub(ready_count);
        if page.len() < take {
            let waiting = self.waiting.values().skip(skip).take(take - page.len());
            page.extend(waiting.map(|entry| (entry.clone(), EntryState::Waiting)));
            skip = skip.saturating_sub(self.waiting.len());
        }
        if page.len() < take {
            let mut unacked: Vec<&Entry> = self.unacked.values().collect();
            unacked.sort_unstable_by_key(|entry| entry.id);
            let rest = unacked.into_iter().skip(skip).take(take - page.len());
            page.extend(rest.map(|entry| (entry.clone(), EntryState::Unacknowledged)));
        }
        (total, page)
    }

    /// Body bytes of ready and waiting messages (in memory or paged out).
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// The consumers, in round-robin order.
    pub fn consumer_views(&self) -> Vec<QueueConsumer> {
        let single_active = self.settings.single_active_consumer;
        self.consumers
            .iter()
            .zip(&self.consumer_priorities)
            .enumerate()
            .map(|(index, ((channel, tag), priority))| QueueConsumer {
                channel: *channel,
                consumer_tag: tag.clone(),
                priority: *priority,
                exclusive: self
                    .exclusive_consumer
                    .as_ref()
                    .is_some_and(|(owner, exclusive_tag)| owner == channel && exclusive_tag == tag),
                active: !single_active || index == 0,
            })
            .collect()
    }
}
