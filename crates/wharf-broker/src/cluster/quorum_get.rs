//! `basic.get` on a quorum queue: a `Dequeue` command through the queue's group, answered once
//! committed with the oldest ready message (or nothing). Unless no-ack, the group holds the
//! message for the channel's get consumer (tag `""`, node and incarnation as a consumer's) until
//! the channel acks, rejects or closes, as RabbitMQ's quorum queues do. A get whose answer does
//! not come is refused rather than proposed again: a second dequeue would take a second message.

use super::quorum_codec;
use crate::core::Core;
use std::sync::Arc;
use wharf_model::{ChannelKey, ModelError, QuorumAnswer, QuorumCommand, QuorumConsumer, ReplicatedGet};

/// What a quorum queue's get came to.
pub(crate) enum QuorumGet {
    /// The get-ok to send (under the model lock, with the rest of the channel's deliveries).
    Message(wharf_model::Delivery),
    /// get-empty.
    Empty,
}

impl Core {
    /// Whether `queue` of `vhost` is a quorum queue on this cluster's node.
    pub(crate) fn is_quorum_queue(&self, vhost: &str, queue: &str) -> bool {
        self.config.cluster.is_some()
            && self.lock_model().vhost(vhost).and_then(|found| found.queue(queue)).is_some_and(|found| found.replicated)
    }

    /// `basic.get` of quorum queue `queue` for channel `key` (blocking: waits for the commit).
    pub(crate) fn get_from_quorum(
        &self,
        key: ChannelKey,
        vhost: &str,
        queue: &str,
        no_ack: bool,
    ) -> Result<QuorumGet, ModelError> {
        self.require_replica(vhost, queue)?;
        let Some(group) = self.quorum.get(vhost, queue) else {
            return Err(ModelError::not_found(format!("no queue '{queue}' in vhost '{vhost}'")));
        };
        let node = self.config.cluster.as_ref().map_or(0, |cluster| cluster.node_id);
        let consumer = QuorumConsumer {
            node,
            incarnation: self.incarnation,
            connection: key.connection.0,
            channel: key.channel,
            tag: String::new(),
        };
        let receiver = group.propose_and_wait(QuorumCommand::Dequeue { consumer: consumer.clone(), settle: no_ack });
        let handle = tokio::runtime::Handle::current();
        // Bounded: the proposer gives up on a batch after its own timeout; this is a backstop.
        let within = super::PROPOSE_TIMEOUT * 2;
        let answer = crate::core::blocking(|| handle.block_on(tokio::time::timeout(within, receiver)));
        let refused = |text: &str| {
            super::command::internal(format!("basic.get on quorum queue '{queue}' was not answered: {text}"))
        };
        let (id, payload, delivery_count, redelivered, remaining) = match answer {
            Ok(Ok(Ok(QuorumAnswer::Dequeued { id, payload, delivery_count, redelivered, remaining }))) => {
                (id, payload, delivery_count, redelivered, remaining)
            }
            Ok(Ok(Ok(_))) => return Ok(QuorumGet::Empty),
            Ok(Ok(Err(text))) => return Err(refused(&text)),
            Ok(Err(_)) => return Err(refused("the queue's group stopped")),
            Err(_) => return Err(refused("no answer in time")),
        };
        let message = quorum_codec::split_payload(&payload)
            .and_then(|(meta, body)| crate::persist::decode_message(meta, bytes::Bytes::copy_from_slice(body)));
        let give_back = || {
            if !no_ack {
                group.submit(QuorumCommand::Return { consumer: consumer.clone(), ids: vec![id] }, None);
            }
        };
        let Some(message) = message else {
            give_back();
            return Err(super::command::internal(format!("a message of quorum queue '{queue}' is unreadable")));
        };
        let get = ReplicatedGet {
            channel: key,
            queue: queue.to_owned(),
            id,
            message: Arc::new(message),
            delivery_count,
            redelivered,
            no_ack,
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
        };
        match self.lock_model().deliver_replicated_get(get) {
            Some(delivery) => Ok(QuorumGet::Message(delivery)),
            None => {
                // The channel closed meanwhile; its consumers' `Down` went before this hold.
                give_back();
                Ok(QuorumGet::Empty)
            }
        }
    }
}
