//! Read-only views of channels and consumers for the management interface (RabbitMQ's
//! `/api/channels` and `/api/consumers`): taken under the model lock and returned as owned
//! values, so the caller formats them after the lock is released.

use super::BrokerModel;
use crate::queue::{ChannelKey, QueueConsumer};
use std::collections::HashMap;

/// An open channel as the model holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSummary {
    /// Its connection and number.
    pub key: ChannelKey,
    /// The vhost of its connection.
    pub vhost: String,
    /// `basic.qos` prefetch per consumer (RabbitMQ's `prefetch_count`).
    pub prefetch_count: u16,
    /// `basic.qos` prefetch shared by the channel (`global_prefetch_count`).
    pub global_prefetch_count: u16,
    /// Deliveries not yet acknowledged.
    pub messages_unacknowledged: usize,
    /// Consumers on it.
    pub consumer_count: usize,
}

/// A consumer, with what its channel and its queue know of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSummary {
    /// Its channel.
    pub channel: ChannelKey,
    /// The vhost of its queue.
    pub vhost: String,
    /// The queue it consumes from.
    pub queue: String,
    /// Its tag.
    pub consumer_tag: String,
    /// Deliveries must be acknowledged (not `no-ack`).
    pub ack_required: bool,
    /// Its prefetch (0 is none).
    pub prefetch_count: u16,
    /// Deliveries to it not yet acknowledged.
    pub unacknowledged: u32,
    /// It holds its queue alone.
    pub exclusive: bool,
    /// Its `x-priority`.
    pub priority: i32,
    /// It receives messages now (see `QueueConsumer::active`).
    pub active: bool,
}

impl BrokerModel {
    /// Every open channel, by key.
    pub fn channel_summaries(&self) -> Vec<ChannelSummary> {
        let mut summaries: Vec<ChannelSummary> = self
            .channels
            .iter()
            .map(|(key, channel)| ChannelSummary {
                key: *key,
                vhost: channel.vhost.clone(),
                prefetch_count: channel.prefetch_consumer,
                global_prefetch_count: channel.prefetch_channel,
                messages_unacknowledged: channel.unacked.len(),
                consumer_count: channel.consumers.len(),
            })
            .collect();
        summaries.sort_by_key(|summary| summary.key);
        summaries
    }

    /// Every consumer of a queue (direct reply-to consumers have no queue and are not listed),
    /// by channel and tag.
    pub fn consumer_summaries(&self) -> Vec<ConsumerSummary> {
        // Each queue's view of its consumers, taken once per queue (not once per consumer).
        let mut on_queues: HashMap<(&str, &str), Vec<QueueConsumer>> = HashMap::new();
        let mut summaries = Vec::new();
        for (key, channel) in &self.channels {
            let Some(vhost) = self.vhosts.get(&channel.vhost) else { continue };
            for (tag, consumer) in &channel.consumers {
                let on_queue = on_queues
                    .entry((channel.vhost.as_str(), consumer.queue.as_str()))
                    .or_insert_with(|| {
                        vhost.queue(&consumer.queue).map(|queue| queue.consumer_views()).unwrap_or_default()
                    })
                    .iter()
                    .find(|found| found.channel == *key && found.consumer_tag == *tag);
                summaries.push(ConsumerSummary {
                    channel: *key,
                    vhost: channel.vhost.clone(),
                    queue: consumer.queue.clone(),
                    consumer_tag: tag.clone(),
                    ack_required: !consumer.no_ack,
                    prefetch_count: consumer.prefetch,
                    unacknowledged: consumer.unacked,
                    exclusive: on_queue.is_some_and(|found| found.exclusive),
                    priority: on_queue.map_or(0, |found| found.priority),
                    active: on_queue.is_none_or(|found| found.active),
                });
            }
        }
        summaries.sort_by(|a, b| (a.channel, &a.consumer_tag).cmp(&(b.channel, &b.consumer_tag)));
        summaries
    }
}
