//! The DLQ workbench's operations on the model: taking chosen messages out of a queue (to
//! replay, move or delete them), putting one back when that could not be done, and whether a
//! queue would refuse a message for its length limit. The runtime (`relocate.rs` in
//! `wharf-broker`) owns the store side and the order of the steps that makes a move crash-safe.

use super::{BrokerModel, Effects};
use crate::message::Message;
use crate::queue::Entry;
use crate::settings::Overflow;

/// Why a message could not be taken out of its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithdrawRefusal {
    /// No such queue, or no message with that id in it.
    NotFound,
    /// It is delivered to a consumer and not settled yet.
    Unacknowledged,
}

impl BrokerModel {
    /// Takes message `id` (ready, or waiting out a retry backoff) out of `queue` for good. The
    /// caller now owns it: it must remove it from the store, move it, or [`BrokerModel::reinstate`]
    /// it.
    pub fn withdraw(&mut self, vhost: &str, queue: &str, id: u64) -> Result<Entry, WithdrawRefusal> {
        let queue = self.vhosts.get_mut(vhost).and_then(|found| found.queue_mut(queue));
        let queue = queue.ok_or(WithdrawRefusal::NotFound)?;
        if queue.is_unacked(id) {
            return Err(WithdrawRefusal::Unacknowledged);
        }
        let entry = queue.withdraw(id).ok_or(WithdrawRefusal::NotFound)?;
        Ok(entry)
    }

    /// Puts back a message [`BrokerModel::withdraw`] took, ready in its place, and dispatches.
    /// If the queue is gone meanwhile the entry is handed back.
    pub fn reinstate(&mut self, vhost: &str, queue_name: &str, entry: Entry) -> Result<Effects, Entry> {
        let Some(queue) = self.vhosts.get_mut(vhost).and_then(|found| found.queue_mut(queue_name)) else {
            return Err(entry);
        };
        queue.reinstate(entry);
        Ok(self.dispatch(vhost, queue_name))
    }

    /// True if `queue` would refuse `message` for its length limits (`x-overflow`
    /// `reject-publish` or `reject-publish-dlx`), as it would refuse a publish.
    pub fn would_refuse(&self, vhost: &str, queue_name: &str, message: &Message) -> bool {
        let Some(queue) = self.vhosts.get(vhost).and_then(|found| found.queue(queue_name)) else { return false };
        queue.settings.overflow != Overflow::DropHead && queue.would_overflow(message.body_bytes())
    }
}
