//! Direct reply-to (RabbitMQ's `amq.rabbitmq.reply-to`): RPC replies without a reply queue.
//!
//! A client consumes from the pseudo-queue `amq.rabbitmq.reply-to` in no-ack mode; requests it
//! publishes on that channel with `reply_to = "amq.rabbitmq.reply-to"` get a per-channel name
//! instead (`reply_name`), and a reply published to the default exchange with that name as its
//! routing key goes straight to the consumer: no queue, no store, no acknowledgement, as in
//! RabbitMQ. The name carries the channel's key and its generation, so a reply for a channel
//! that was closed (or closed and opened again) reaches nobody. Such a reply is unroutable: it
//! is dropped, or returned to a mandatory publisher (the most useful answer for the server side
//! of an RPC; RabbitMQ drops it).

use super::channel_not_open;
use super::{BrokerModel, Delivery, Effects, delivery_bytes};
use crate::error::{ModelError, Result};
use crate::message::Message;
use crate::queue::{ChannelKey, ConnectionId};
use std::sync::Arc;

/// The pseudo-queue a reply consumer consumes from, and the `reply_to` value that asks for it.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// The prefix of the per-channel names replies are published to.
pub const DIRECT_REPLY_TO_PREFIX: &str = "amq.rabbitmq.reply-to.";

/// A channel's reply consumer.
#[derive(Debug, Clone)]
pub(super) struct ReplyConsumer {
    pub(super) tag: String,
}

/// The name replies to channel `key` (opened as `generation`) are published to.
fn reply_name(key: ChannelKey, generation: u64) -> String {
    format!("{DIRECT_REPLY_TO_PREFIX}{:x}.{:x}.{generation:x}", key.connection.0, key.channel)
}

/// The channel and generation a reply name stands for, if it is one of ours.
fn parse_reply_name(name: &str) -> Option<(ChannelKey, u64)> {
    let mut parts = name.strip_prefix(DIRECT_REPLY_TO_PREFIX)?.split('.');
    let connection = u64::from_str_radix(parts.next()?, 16).ok()?;
    let channel = u16::from_str_radix(parts.next()?, 16).ok()?;
    let generation = u64::from_str_radix(parts.next()?, 16).ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((ChannelKey { connection: ConnectionId(connection), channel }, generation))
}

impl BrokerModel {
    /// `basic.consume` from `amq.rabbitmq.reply-to`: no-ack only, one per channel (RabbitMQ's
    /// 406s otherwise). Returns the consumer tag (generated if empty).
    pub fn consume_replies(&mut self, key: ChannelKey, tag: &str, no_ack: bool) -> Result<String> {
        let channel = self.channels.get_mut(&key).ok_or_else(|| channel_not_open(key))?;
        if channel.consumers.contains_key(tag) || channel.reply_consumer.as_ref().is_some_and(|reply| reply.tag == tag)
        {
            return Err(ModelError::not_allowed(format!("attempt to reuse consumer tag '{tag}'")));
        }
        if !no_ack {
            return Err(ModelError::precondition_failed("reply consumer cannot acknowledge"));
        }
        if channel.reply_consumer.is_some() {
            return Err(ModelError::precondition_failed("reply consumer already set"));
        }
        let tag = if tag.is_empty() {
            channel.generated_tags += 1;
            format!("amq.ctag-{:x}-{}-{}", key.connection.0, key.channel, channel.generated_tags)
        } else {
            tag.to_owned()
        };
        channel.reply_consumer = Some(ReplyConsumer { tag: tag.clone() });
        Ok(tag)
    }

    /// Cancels the channel's reply consumer if `tag` is its tag; returns whether it was.
    pub(super) fn cancel_reply_consumer(&mut self, key: ChannelKey, tag: &str) -> bool {
        let Some(channel) = self.channels.get_mut(&key) else { return false };
        if channel.reply_consumer.as_ref().is_some_and(|reply| reply.tag == tag) {
            channel.reply_consumer = None;
            return true;
        }
        false
    }

    /// The name to put in the `reply_to` of a request published on `key` with
    /// `reply_to = "amq.rabbitmq.reply-to"`; 406 if the channel has no reply consumer.
    pub fn reply_to_name(&self, key: ChannelKey) -> Result<String> {
        let channel = self.channels.get(&key).ok_or_else(|| channel_not_open(key))?;
        if channel.reply_consumer.is_none() {
            return Err(ModelError::precondition_failed("fast reply consumer does not exist"));
        }
        Ok(reply_name(key, channel.generation))
    }

    /// True if `name` (in `vhost`) reaches a live reply consumer: what a passive
    /// `queue.declare` of a reply name answers.
    pub fn reply_consumer_exists(&self, vhost: &str, name: &str) -> bool {
        self.reply_target(vhost, name).is_some()
    }

    fn reply_target(&self, vhost: &str, name: &str) -> Option<ChannelKey> {
        let (key, generation) = parse_reply_name(name)?;
        let channel = self.channels.get(&key)?;
        (channel.generation == generation && channel.vhost == vhost && channel.reply_consumer.is_some()).then_some(key)
    }

    /// A reply published to `name` in `vhost`: delivered at once to its reply consumer (the
    /// effects), or `None` if that consumer is gone (the reply is unroutable).
    pub fn deliver_reply(&mut self, vhost: &str, name: &str, message: Arc<Message>) -> Option<Effects> {
        let key = self.reply_target(vhost, name)?;
        let channel = self.channels.get_mut(&key)?;
        let tag = channel.reply_consumer.as_ref()?.tag.clone();
        let delivery_tag = channel.next_delivery_tag;
        channel.next_delivery_tag += 1;
        *self.pending_bytes.entry(key.connection).or_insert(0) += delivery_bytes(&message);
        let mut effects = Effects::default();
        effects.deliveries.push(Delivery {
            channel: key,
            consumer_tag: Some(tag),
            delivery_tag,
            redelivered: false,
            queue: name.to_owned(),
            message,
            message_count: 0,
            delivery_count: 1,
            store: None,
            remove_record_after_read: false,
            store_transient: false,
        });
        Some(effects)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_names_round_trip_and_strangers_are_not_ours() {
        let key = ChannelKey { connection: ConnectionId(0x2a), channel: 7 };
        let name = reply_name(key, 99);
        assert!(name.starts_with(DIRECT_REPLY_TO_PREFIX));
        assert_eq!(parse_reply_name(&name), Some((key, 99)));
        for stranger in ["amq.rabbitmq.reply-to", "amq.rabbitmq.reply-to.x.1.2", "amq.rabbitmq.reply-to.1.2.3.4", "q"] {
            assert_eq!(parse_reply_name(stranger), None, "{stranger}");
        }
    }
}
