//! [`Queue`]: one queue's definition and its messages: ready (ordered by arrival, so a requeued
//! message goes back to its original place) and unacknowledged, plus the consumers attached to it
//! in round-robin order.

use crate::message::Message;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use wharf_wire::types::FieldTable;

/// Identifies a connection within the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

/// Identifies a channel: its connection and number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelKey {
    /// The connection.
    pub connection: ConnectionId,
    /// The channel number.
    pub channel: u16,
}

/// A message in a queue.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Position in the queue (increasing in arrival order).
    pub id: u64,
    /// The message.
    pub message: Arc<Message>,
    /// Where the store keeps it (persistent messages in durable queues), for removal.
    pub store_seq: Option<u64>,
    /// Delivered before and not acknowledged.
    pub redelivered: bool,
    /// How many times it was delivered.
    pub delivery_count: u32,
}

/// A queue.
#[derive(Debug)]
pub struct Queue {
    /// Its name.
    pub name: String,
    /// Survives a restart (with its persistent messages).
    pub durable: bool,
    /// The connection it belongs to, for exclusive queues.
    pub exclusive_owner: Option<ConnectionId>,
    /// Deleted when its last consumer goes (once it has had one).
    pub auto_delete: bool,
    /// Declared arguments.
    pub arguments: FieldTable,
    /// The store's id for this queue's log, once the runtime created it.
    pub store_queue: Option<u64>,
    pub(crate) ready: BTreeMap<u64, Entry>,
    pub(crate) unacked: HashMap<u64, Entry>,
    pub(crate) next_id: u64,
    /// Consumers in round-robin order.
    pub(crate) consumers: Vec<(ChannelKey, String)>,
    pub(crate) next_consumer: usize,
    pub(crate) had_consumer: bool,
    /// The consumer holding exclusive access, if any.
    pub(crate) exclusive_consumer: Option<(ChannelKey, String)>,
}

impl Queue {
    /// A new, empty queue.
    pub fn new(
        name: String,
        durable: bool,
        exclusive_owner: Option<ConnectionId>,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> Self {
        Queue {
            name,
            durable,
            exclusive_owner,
            auto_delete,
            arguments,
            store_queue: None,
            ready: BTreeMap::new(),
            unacked: HashMap::new(),
            next_id: 1,
            consumers: Vec::new(),
            next_consumer: 0,
            had_consumer: false,
            exclusive_consumer: None,
        }
    }

    /// Adds a message at the tail. Returns its position.
    pub fn enqueue(&mut self, message: Arc<Message>, store_seq: Option<u64>) -> u64 {
        self.enqueue_recovered(message, store_seq, 0, false)
    }

    /// Adds a message found by recovery, with its delivery count. `redelivered` marks a message
    /// that may have been delivered before (after an unclean stop the runtime marks all of them).
    pub fn enqueue_recovered(
        &mut self,
        message: Arc<Message>,
        store_seq: Option<u64>,
        delivery_count: u32,
        redelivered: bool,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.ready.insert(
            id,
            Entry { id, message, store_seq, redelivered: redelivered || delivery_count > 0, delivery_count },
        );
        id
    }

    /// Messages ready for delivery.
    pub fn ready_count(&self) -> usize {
        self.ready.len()
    }

    /// Messages delivered and not yet acknowledged.
    pub fn unacked_count(&self) -> usize {
        self.unacked.len()
    }

    /// Consumers attached.
    pub fn consumer_count(&self) -> usize {
        self.consumers.len()
    }

    /// Puts an unacknowledged message back in its place, marked redelivered.
    pub(crate) fn requeue(&mut self, id: u64) {
        if let Some(mut entry) = self.unacked.remove(&id) {
            entry.redelivered = true;
            self.ready.insert(id, entry);
        }
    }

    /// Removes every ready message (purge); returns them.
    pub(crate) fn take_ready(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.ready).into_values().collect()
    }

    /// Removes every message, ready and unacknowledged (delete); returns them.
    pub(crate) fn take_all(&mut self) -> Vec<Entry> {
        let mut all = self.take_ready();
        all.extend(self.unacked.drain().map(|(_, entry)| entry));
        all
    }
}
