//! Per-message delivery traces as the management interface shows them (`wharf_model::trace`
//! keeps them): one message's by its entry id, or every message with a given message id across
//! the queues of a vhost the user may read.

use super::Management;
use super::operations::ManagementError;
use crate::access::{Resource, Right};
use std::sync::Arc;
use wharf_model::trace::{TraceLog, full_trace};
use wharf_model::{Entry, EntryState};

/// How many messages a search by message id looks at, at most (across all queues).
pub const TRACE_SEARCH_MESSAGES_MAX: usize = 1_000_000;
/// Messages looked at per hold of the model lock during a search.
const SEARCH_CHUNK_MESSAGES: usize = 2_000;

/// One message's trace.
#[derive(Debug, Clone)]
pub struct TraceView {
    pub queue: String,
    pub entry_id: u64,
    pub state: EntryState,
    pub message_id: Option<String>,
    pub delivery_count: u32,
    pub redelivered: bool,
    /// Its events, oldest first, each with the queue it happened in.
    pub trace: TraceLog,
}

/// What a search by message id found.
#[derive(Debug, Clone, Default)]
pub struct TraceSearch {
    pub found: Vec<TraceView>,
    /// Messages looked at.
    pub scanned: usize,
    /// Every message of every readable queue was looked at (not stopped at the bound).
    pub complete: bool,
}

/// A message's trace as shown: what it brought and its own events, within the bound `max`.
fn view(queue: &str, entry: &Entry, state: EntryState, max: usize) -> TraceView {
    let name: Arc<str> = Arc::from(queue);
    let trace = full_trace(entry.message.trace.as_deref(), entry.enqueued_ms, entry.trace.as_deref(), Some(&name), max);
    TraceView {
        queue: queue.to_owned(),
        entry_id: entry.id,
        state,
        message_id: entry.message.full_properties().message_id().as_ref().map(|id| id.to_string()),
        delivery_count: entry.delivery_count,
        redelivered: entry.redelivered,
        trace,
    }
}

impl Management {
    /// True if the broker keeps delivery traces (`message_trace_events_max` above 0).
    pub fn traces_enabled(&self) -> bool {
        self.core.config.message_trace_events_max > 0
    }

    /// The trace of message `entry_id` in `queue` (read permission on the queue, as browsing).
    pub fn trace(&self, user: &str, vhost: &str, queue: &str, entry_id: u64) -> Result<TraceView, ManagementError> {
        let grant = self.grant(user, vhost)?;
        grant.check(Right::Read, Resource::Queue, queue)?;
        let model = self.core.lock_model();
        let (entry, state) = super::browse::readable_queue(&model, vhost, queue)?
            .entry(entry_id)
            .ok_or_else(|| ManagementError::NotFound(format!("no message {entry_id} in queue '{queue}'")))?;
        drop(model);
        Ok(view(queue, &entry, state, self.core.config.message_trace_events_max))
    }

    /// Every message whose message id is `message_id`, in the queues of `vhost` the user may
    /// read, with its trace; looks at no more than [`TRACE_SEARCH_MESSAGES_MAX`] messages.
    pub fn find_traces(&self, user: &str, vhost: &str, message_id: &str) -> Result<TraceSearch, ManagementError> {
        let grant = self.grant(user, vhost)?;
        let queues: Vec<String> = {
            let model = self.core.lock_model();
            let found = model.vhost(vhost).ok_or_else(|| ManagementError::NotFound(format!("no vhost '{vhost}'")))?;
            found
                .queues()
                .filter(|queue| queue.exclusive_owner.is_none())
                .map(|queue| queue.name.clone())
                .filter(|name| grant.check(Right::Read, Resource::Queue, name).is_ok())
                .collect()
        };
        let mut search = TraceSearch { complete: true, ..TraceSearch::default() };
        'queues: for queue in queues {
            let mut skip = 0;
            loop {
                if search.scanned >= TRACE_SEARCH_MESSAGES_MAX {
                    search.complete = false;
                    break 'queues;
                }
                let page = {
                    let model = self.core.lock_model();
                    let Some(found) = model.vhost(vhost).and_then(|found| found.queue(&queue)) else { break };
                    found.browse(skip, SEARCH_CHUNK_MESSAGES).1
                };
                if page.is_empty() {
                    break;
                }
                skip += page.len();
                search.scanned += page.len();
                for (entry, state) in &page {
                    let properties = entry.message.full_properties();
                    if properties.message_id().as_ref().is_some_and(|id| id.as_str() == message_id) {
                        search.found.push(view(&queue, entry, *state, self.core.config.message_trace_events_max));
                    }
                }
            }
        }
        Ok(search)
    }
}
