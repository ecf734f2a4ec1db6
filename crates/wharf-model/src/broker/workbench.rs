//! The DLQ workbench's operations on the model: taking chosen messages out of a queue (to
//! replay, move or delete them), putting one back when that could not be done, and whether a
//! queue would refuse a message for its length limit. The runtime (`relocate.rs` in
//! `wharf-broker`) owns the store side and the order of the steps that makes a move crash-safe.

use super::{BrokerModel, Effects};
use crate::message::Message;
use crate::queue::Entry;
use crate::settings::Overflow;

/// A message taken out of its queue.
#[derive(Debug)]
pub struct Withdrawn {
    pub entry: Entry,
    /// Which queue of that name it came from.
    pub incarnation: u64,
    /// Deliveries that taking it out made possible.
    pub effects: Effects,
}

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
    /// it. Returns it with the queue's incarnation (for `reinstate`) and what dispatching the
    /// queue again produced (with `x-ordered-by`, the next message of its key may be deliverable
    /// now).
    pub fn withdraw(&mut self, vhost: &str, queue: &str, id: u64) -> Result<Withdrawn, WithdrawRefusal> {
        let name = queue;
        let queue = self.vhosts.get_mut(vhost).and_then(|found| found.queue_mut(name));
        let queue = queue.ok_or(WithdrawRefusal::NotFound)?;
        if queue.is_unacked(id) {
            return Err(WithdrawRefusal::Unacknowledged);
        }
        let entry = queue.withdraw(id).ok_or(WithdrawRefusal::NotFound)?;
        let incarnation = queue.incarnation();
        let effects = self.dispatch(vhost, name);
        Ok(Withdrawn { entry, incarnation, effects })
    }

    /// Puts back a message [`BrokerModel::withdraw`] took, ready in its place, and dispatches.
    /// Only into the queue it came from (`incarnation`): if that queue is gone (deleted, or
    /// deleted and declared again) the entry is handed back, since its store seq means nothing
    /// in another queue's log.
    pub fn reinstate(
        &mut self,
        vhost: &str,
        queue_name: &str,
        incarnation: u64,
        entry: Entry,
    ) -> Result<Effects, Entry> {
        let Some(queue) = self
            .vhosts
            .get_mut(vhost)
            .and_then(|found| found.queue_mut(queue_name))
            .filter(|queue| queue.incarnation() == incarnation)
        else {
            return Err(entry);
        };
        queue.reinstate(entry);
        Ok(self.dispatch(vhost, queue_name))
    }

    /// True if `queue` would refuse `message` for its length limits (`x-overflow`
    /// `reject-publish` or `reject-publish-dlx`), as it would refuse a publish, after
    /// `pending_messages` of `pending_bytes` that are on their way to it.
    pub fn would_refuse(
        &self,
        vhost: &str,
        queue_name: &str,
        message: &Message,
        pending_messages: u64,
        pending_bytes: u64,
    ) -> bool {
        let Some(queue) = self.vhosts.get(vhost).and_then(|found| found.queue(queue_name)) else { return false };
        queue.settings.overflow != Overflow::DropHead
            && queue.would_overflow_with(pending_messages, pending_bytes.saturating_add(message.body_bytes()))
    }
}
