//! Read-only views of a queue for the management interface: its byte totals and its consumers
//! as they stand. Nothing here changes the queue, so the management API can never disturb the
//! bookkeeping `queue.rs` keeps.

use super::{ChannelKey, Queue};

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

impl Queue {
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
