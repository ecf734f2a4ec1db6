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
    /// A message to hand to the channel (`Core::hand_over_get`, under the model lock that sends
    /// the get-ok, so its tag keeps its place among the channel's deliveries).
    Message(ReplicatedGet),
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
        if let Some(home) = self.remote_home(vhost, queue) {
            return self.get_from_home(home, key, vhost, queue, no_ack);
        }
        let Some(group) = self.quorum.get(vhost, queue) else {
            return Err(ModelError::not_found(format!("no queue '{queue}' in vhost '{vhost}'")));
        };
        let consumer = self.get_consumer(key);
        let receiver = group.propose_and_wait(QuorumCommand::Dequeue { consumer: consumer.clone(), settle: no_ack });
        let handle = tokio::runtime::Handle::current();
        // A backstop: each entry ahead of this one in its lane, and the enqueues it waits for,
        // is answered within the proposer's own timeout, but together they may take longer;
        // given up on here, what the dequeue took goes back, as for one whose answer was lost.
        let within = super::PROPOSE_TIMEOUT * 2;
        let answer = crate::core::blocking(|| handle.block_on(tokio::time::timeout(within, receiver)));
        let refused = |text: &str| {
            // The dequeue may have been committed with its answer lost: what it took goes back
            // (a `Down` proposed behind it, so it applies after the dequeue if that ever does).
            if !no_ack {
                group.submit(QuorumCommand::Down { consumer: consumer.clone() }, None);
            }
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
        let Some(message) = message else {
            self.give_back_get(key, vhost, queue, id, no_ack);
            return Err(super::command::internal(format!("a message of quorum queue '{queue}' is unreadable")));
        };
        Ok(QuorumGet::Message(ReplicatedGet {
            channel: key,
            queue: queue.to_owned(),
            id,
            message: Arc::new(message),
            delivery_count,
            redelivered,
            no_ack,
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
        }))
    }

    /// A get's message that did not reach its channel (it closed meanwhile; its consumers'
    /// `Down` went before this hold): back to the queue.
    pub(crate) fn give_back_get(&self, key: ChannelKey, vhost: &str, queue: &str, id: u64, no_ack: bool) {
        if let Some(home) = self.remote_home(vhost, queue).filter(|_| !no_ack) {
            let outcome = wharf_model::ReplicatedOutcome::Returned;
            let settle = wharf_model::ReplicatedOp::Settle {
                vhost: vhost.to_owned(),
                queue: queue.to_owned(),
                channel: key,
                tag: String::new(),
                id,
                outcome,
            };
            self.op_to_home(home, settle);
            return;
        }
        if let Some(group) = self.quorum.get(vhost, queue).filter(|_| !no_ack) {
            group.submit(QuorumCommand::Return { consumer: self.get_consumer(key), ids: vec![id] }, None);
        }
    }

    /// The group's name for channel `key`'s get consumer.
    fn get_consumer(&self, key: ChannelKey) -> QuorumConsumer {
        let node = self.config.cluster.as_ref().map_or(0, |cluster| cluster.node_id);
        QuorumConsumer {
            node,
            incarnation: self.incarnation,
            connection: key.connection.0,
            channel: key.channel,
            tag: String::new(),
        }
    }
}
