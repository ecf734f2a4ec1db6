//! Browsing a queue without consuming it (the DLQ workbench's first tool): a page of the
//! messages a queue holds, each with its place, delivery count and body, read back from the
//! store when it was paged out. Nothing is delivered, counted or moved: a browsed message is
//! exactly where it was, with the same delivery count.

use super::Management;
use super::operations::ManagementError;
use crate::access::{Resource, Right};
use crate::pager;
use bytes::Bytes;
use std::sync::Arc;
use wharf_model::{Body, EntryState, Message};

/// The most messages one page holds.
pub const BROWSE_PAGE_SIZE_MAX: usize = 500;

/// One message as browsing shows it.
#[derive(Debug, Clone)]
pub struct BrowsedMessage {
    /// Its position in the browse order (0 is the next to be delivered).
    pub position: usize,
    /// Its id in the queue (priority level, then arrival): stable while it stays there.
    pub entry_id: u64,
    pub state: EntryState,
    pub exchange: String,
    pub routing_key: String,
    pub properties: wharf_wire::protocol::BasicProperties,
    /// The body, or `None` if it left the queue while the page was read.
    pub payload: Option<Bytes>,
    pub payload_bytes: u64,
    pub redelivered: bool,
    pub delivery_count: u32,
    /// When it entered the queue (ms since the epoch) and when it expires, if ever.
    pub enqueued_at_ms: u64,
    pub expires_at_ms: Option<u64>,
}

/// A page of a queue's messages.
#[derive(Debug, Clone)]
pub struct BrowsePage {
    /// Messages in the queue now (ready, waiting and unacknowledged).
    pub total: usize,
    pub messages: Vec<BrowsedMessage>,
}

/// A queue the management interface may read (browse, trace, take messages from): it exists,
/// and it is not another connection's exclusive queue (the API's connection owns none), which is
/// refused as a `basic.get` on it would be (405, the model's `check_exclusive`).
pub(super) fn readable_queue<'m>(
    model: &'m wharf_model::BrokerModel,
    vhost: &str,
    queue: &str,
) -> Result<&'m wharf_model::Queue, ManagementError> {
    let found = model.vhost(vhost).and_then(|found| found.queue(queue).map(|queue| (found, queue)));
    let (found, queue_found) =
        found.ok_or_else(|| ManagementError::NotFound(format!("no queue '{queue}' in vhost '{vhost}'")))?;
    found.check_exclusive(queue_found, wharf_model::ConnectionId(u64::MAX))?;
    Ok(queue_found)
}

impl Management {
    /// `take` messages of a queue from position `skip` (at most [`BROWSE_PAGE_SIZE_MAX`]),
    /// needing the read permission on it, as a get does.
    pub fn browse(
        &self,
        user: &str,
        vhost: &str,
        queue: &str,
        skip: usize,
        take: usize,
    ) -> Result<BrowsePage, ManagementError> {
        let grant = self.grant(user, vhost)?;
        grant.check(Right::Read, Resource::Queue, queue)?;
        let take = take.min(BROWSE_PAGE_SIZE_MAX);
        let (total, entries) = {
            let model = self.core.lock_model();
            readable_queue(&model, vhost, queue)?.browse(skip, take)
        };
        // Bodies are read after the lock is released; a message acknowledged meanwhile may have
        // lost its record, and is shown without its body rather than failing the page.
        let messages = entries
            .into_iter()
            .enumerate()
            .map(|(index, (entry, state))| {
                let message: &Arc<Message> = &entry.message;
                let payload = match &message.body {
                    Body::Resident { bytes, .. } => Some(bytes.clone()),
                    Body::Paged(paged) => {
                        crate::core::blocking(|| pager::read_paged_body(&self.core.store, paged)).ok()
                    }
                };
                BrowsedMessage {
                    position: skip + index,
                    entry_id: entry.id,
                    state,
                    exchange: message.exchange.clone(),
                    routing_key: message.routing_key.clone(),
                    properties: message.full_properties().into_owned(),
                    payload,
                    payload_bytes: message.body_bytes(),
                    redelivered: entry.redelivered,
                    delivery_count: entry.delivery_count,
                    enqueued_at_ms: entry.enqueued_ms,
                    expires_at_ms: entry.expires_at_ms,
                }
            })
            .collect();
        Ok(BrowsePage { total, messages })
    }
}
