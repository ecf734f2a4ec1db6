//! Moving messages out of one queue into others on an operator's request (the DLQ workbench's
//! replay and move), crash-safely: after a `kill -9` at any moment, each message is either still
//! in its source queue or in every queue it was sent to, never both and never neither.
//!
//! A dead-letter transfer (`publish.rs`) is at-least-once: a crash between its copy becoming
//! durable and its source's removal becoming durable leaves the message twice. An operator's
//! replay must not, so a move here runs in steps, and recovery finishes or undoes one that a
//! crash interrupted (`docs/design/20261204_dlq-workbench.md`):
//!
//! 1. the source entry is taken out of its queue in the model (nobody can consume it now);
//! 2. each stored copy is appended with a [`RelocationMarker`]: the source's log and seq, and how
//!    many stored copies the move writes;
//! 3. once every copy is durable, the source's removal is written and synced;
//! 4. only then do the copies enter their queues in the model, so none can be consumed (and
//!    its record removed) before the source's removal is durable.
//!
//! At recovery, a source that is still live with all its marked copies present is removed (the
//! crash came between 3 and its sync); with fewer present (a crash during 2), the copies found
//! are removed. A source no longer live means step 3 was durable: the copies stay. Seqs and log
//! ids are never reused, so a marker can never name another message.

use crate::core::Core;
use crate::persist::{self, RelocationMarker};
use std::sync::Arc;
use wharf_model::{Entry, Message, StoredAt};
use wharf_store::{LogId, StoreError};

/// One message to move: taken out of its queue already (step 1).
#[derive(Debug)]
pub(crate) struct Relocation {
    pub vhost: String,
    /// The queue it was taken from (it is put back there if the move cannot be made), and which
    /// queue of that name it was.
    pub source_queue: String,
    pub source_incarnation: u64,
    /// Where the source is stored, if it is.
    pub source: Option<StoredAt>,
    /// The entry as it was taken out.
    pub entry: Entry,
    /// The message as it must arrive.
    pub message: Arc<Message>,
    /// The queues it goes to (at least one).
    pub targets: Vec<String>,
}

/// A copy appended to a target's log, waiting to enter its queue.
struct Appended {
    queue: String,
    log: u64,
    seq: u64,
    /// Where it was written, once durable (to page its body out in a queue over its bound).
    location: Option<wharf_store::MessageLocation>,
}

/// A relocation whose copies are written (or need no store).
struct Started {
    relocation: Relocation,
    message: Arc<Message>,
    appended: Vec<Appended>,
    tickets: Vec<wharf_store::Ticket<wharf_store::AppendReceipt>>,
}

impl Core {
    /// Carries out `relocations` (steps 2 to 4 above). Returns, for each entry id, `Ok` if it
    /// moved or why not (it is then back in its source queue, or the store failed and the broker
    /// is stopping). Blocks on the store: call it through `blocking`.
    pub(crate) fn relocate(&self, relocations: Vec<Relocation>) -> Vec<(u64, Result<(), String>)> {
        let mut outcomes = Vec::with_capacity(relocations.len());
        let mut started = Vec::with_capacity(relocations.len());
        for relocation in relocations {
            let id = relocation.entry.id;
            match self.start_relocation(relocation) {
                Ok(begun) => started.push(begun),
                Err(refused) => {
                    let (relocation, reason) = *refused;
                    self.put_back(relocation);
                    outcomes.push((id, Err(reason)));
                }
            }
        }
        // Step 3: every copy durable, then every source's removal durable (one sync for all). A
        // relocation whose copies could not all be written (a target deleted meanwhile, say)
        // does not happen: its copies are removed and it goes back, and recovery would undo it
        // the same way (its marker counts a copy that is not there).
        let mut fatal: Option<String> = None;
        let mut failed: Vec<(Started, String)> = Vec::new();
        let mut ready: Vec<Started> = Vec::with_capacity(started.len());
        for mut begun in started {
            let mut problem = None;
            for (index, ticket) in std::mem::take(&mut begun.tickets).into_iter().enumerate() {
                match ticket.wait() {
                    Ok(receipt) => {
                        if let Some(copy) = begun.appended.get_mut(index) {
                            copy.location = Some(receipt.location);
                        }
                    }
                    Err(error) => {
                        self.store_failed(&error);
                        if error.is_fatal() {
                            fatal.get_or_insert_with(|| format!("the store failed while writing the copies: {error}"));
                        }
                        problem.get_or_insert_with(|| format!("a copy could not be written: {error}"));
                    }
                }
            }
            match problem {
                Some(reason) => failed.push((begun, reason)),
                None => ready.push(begun),
            }
        }
        if let Some(reason) = fatal {
            // The store is failing: the broker stops, and recovery settles each move.
            let all = ready
                .iter()
                .map(|begun| begun.relocation.entry.id)
                .chain(failed.iter().map(|(begun, _)| begun.relocation.entry.id));
            outcomes.extend(all.map(|id| (id, Err(reason.clone()))));
            return outcomes;
        }
        for (begun, reason) in failed {
            for copy in &begun.appended {
                self.remove_stored_record(StoredAt { log: copy.log, seq: copy.seq });
            }
            let id = begun.relocation.entry.id;
            self.put_back(begun.relocation);
            outcomes.push((id, Err(reason)));
        }
        let started = ready;
        for begun in &started {
            if let Some(source) = begun.relocation.source {
                self.remove_stored_record(source);
            }
        }
        if started.iter().any(|begun| begun.relocation.source.is_some()) {
            let synced = self.store.sync().and_then(|ticket| ticket.wait());
            if let Err(error) = synced {
                self.store_failed(&error);
                let reason = format!("the store failed while removing the originals: {error}");
                outcomes.extend(started.iter().map(|begun| (begun.relocation.entry.id, Err(reason.clone()))));
                return outcomes;
            }
        }
        // Step 4: the copies enter their queues.
        let mut model = self.lock_model();
        let mut later = Vec::new();
        for begun in started {
            let vhost = &begun.relocation.vhost;
            let mut stored = begun.appended.iter();
            for queue_name in &begun.relocation.targets {
                let copy = match stored.as_slice().first() {
                    Some(copy) if copy.queue == *queue_name => stored.next(),
                    _ => None,
                };
                let store_seq = copy.map(|copy| (copy.log, copy.seq));
                // A queue deleted (or deleted and declared again) since its copy was written lost
                // the copy with its log, as it would have lost it had the copy arrived first.
                let current_log =
                    model.vhost(vhost).and_then(|found| found.queue(queue_name)).and_then(|q| q.store_log);
                if store_seq.is_some_and(|(log, _)| current_log != Some(log)) {
                    continue;
                }
                // A stored copy arriving in a queue over its memory bound leaves its body on disk,
                // as a publish's would (the record is durable and its place known).
                let page_out = copy.and_then(|copy| copy.location.map(|location| (copy, location))).and_then(
                    |(copy, location)| {
                        let queue = model.vhost(vhost).and_then(|found| found.queue(queue_name))?;
                        (queue.resident_bytes() >= self.config.queue_body_memory_bytes_max).then(|| {
                            let paged = wharf_model::PagedBody {
                                store_log: copy.log,
                                segment_id: location.segment_id,
                                offset: location.offset,
                                record_bytes: location.record_bytes,
                                body_bytes: begun.message.body_bytes(),
                            };
                            (queue.next_entry_id(&begun.message), copy.seq, paged)
                        })
                    },
                );
                let mut effects = model.enqueue_stored(
                    vhost,
                    queue_name,
                    Arc::clone(&begun.message),
                    store_seq.map(|(_, seq)| seq),
                    false,
                );
                if let Some((entry_id, seq, paged)) = page_out
                    && model.page_out(vhost, queue_name, entry_id, seq, paged)
                {
                    model.count_paged_out(1);
                }
                self.send(&mut effects);
                later.push(effects);
            }
            outcomes.push((begun.relocation.entry.id, Ok(())));
        }
        drop(model);
        for effects in later {
            self.apply(effects);
        }
        outcomes
    }

    /// Step 2 for one message: its body in memory, space for every stored copy taken all or
    /// nothing, and the copies appended with their marker.
    fn start_relocation(&self, relocation: Relocation) -> Result<Started, Box<(Relocation, String)>> {
        let mut message = Arc::clone(&relocation.message);
        if let Some(paged) = message.paged() {
            // The source's record stays live until step 3, so its body can be read.
            match crate::pager::read_paged_body(&self.store, &paged) {
                Ok(body) => message = Arc::new(message.with_body(body)),
                Err(error) => {
                    self.store_failed(&error);
                    return Err(Box::new((relocation, format!("its body could not be read back: {error}"))));
                }
            }
        }
        let Some(body) = message.bytes_in_memory().cloned() else {
            return Err(Box::new((relocation, "its body is not in memory".into())));
        };
        let stored_targets: Vec<(String, u64)> = {
            let model = self.lock_model();
            let vhost = model.vhost(&relocation.vhost);
            relocation
                .targets
                .iter()
                .filter_map(|name| {
                    let queue = vhost.and_then(|found| found.queue(name))?;
                    let log = queue.store_log.filter(|_| queue.durable && message.persistent())?;
                    Some((name.clone(), log))
                })
                .collect()
        };
        if stored_targets.is_empty() {
            return Ok(Started { relocation, message, appended: Vec::new(), tickets: Vec::new() });
        }
        let marker = relocation.source.map(|source| RelocationMarker {
            source_log: source.log,
            source_seq: source.seq,
            copies: stored_targets.len() as u32,
        });
        let meta = persist::encode_message_meta_marked(&message, marker);
        let record_bytes = wharf_store::Store::record_bytes(meta.len(), body.len());
        let wanted: Vec<(LogId, u64)> = stored_targets.iter().map(|(_, log)| (LogId(*log), record_bytes)).collect();
        let reservations = match self.store.reserve(&wanted) {
            Ok(reservations) => reservations,
            Err(error) => {
                self.store_failed(&error);
                let reason = match error {
                    StoreError::NoSpace { .. } => format!("the disk cannot take the copies: {error}"),
                    error => format!("the store refused the copies: {error}"),
                };
                return Err(Box::new((relocation, reason)));
            }
        };
        let now_ms = self.now_ms();
        let mut appended = Vec::with_capacity(stored_targets.len());
        let mut tickets = Vec::with_capacity(stored_targets.len());
        for ((queue, log), reservation) in stored_targets.into_iter().zip(reservations) {
            match self.store.append_reserved(reservation, now_ms, &meta, &body, None) {
                Ok(pending) => {
                    appended.push(Appended { queue, log, seq: pending.seq, location: None });
                    tickets.push(pending.ticket);
                }
                Err(error) => {
                    // Copies appended so far carry a marker that counts this one: recovery
                    // removes them, since the set is incomplete. The broker is stopping.
                    self.store_failed(&error);
                    return Err(Box::new((relocation, format!("the store failed while writing the copies: {error}"))));
                }
            }
        }
        Ok(Started { relocation, message, appended, tickets })
    }

    /// Puts a message whose move could not start back in its source queue.
    fn put_back(&self, relocation: Relocation) {
        let mut model = self.lock_model();
        // If the queue went meanwhile (or went and was declared again), its log went with it, and
        // the message with both.
        let (vhost, queue, incarnation) = (&relocation.vhost, &relocation.source_queue, relocation.source_incarnation);
        if let Ok(mut effects) = model.reinstate(vhost, queue, incarnation, relocation.entry) {
            self.send(&mut effects);
            drop(model);
            self.apply(effects);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Recovery's half of the protocol, on the states a crash can leave: the data directory is
    //! set up through a running broker, then a move's copies are written straight into the
    //! store as step 2 would have written them before the crash.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::{Broker, BrokerConfig, Selection};
    use bytes::Bytes;
    use wharf_store::{Store, StoreConfig};
    use wharf_wire::protocol::BasicProperties;
    use wharf_wire::types::FieldTable;

    /// A data directory holding `dlq` with one persistent message and an empty `target`.
    /// Returns the store logs of `dlq` and `target` and the message's seq.
    async fn prepared(data_dir: &std::path::Path) -> (u64, u64, u64) {
        let broker = Broker::start(config(data_dir)).await.unwrap();
        let management = broker.management();
        for queue in ["dlq", "target"] {
            management.declare_queue("guest", "/", queue, true, false, &FieldTable::default()).unwrap();
        }
        let properties = BasicProperties::default().with_delivery_mode(2).with_message_id("m-1".into());
        management.publish("guest", "/", "", "dlq", properties, Bytes::from_static(b"poison")).await.unwrap();
        let logs = {
            let model = broker.core().lock_model();
            let vhost = model.vhost("/").unwrap();
            (vhost.queue("dlq").unwrap().store_log.unwrap(), vhost.queue("target").unwrap().store_log.unwrap())
        };
        drop(management);
        broker.shutdown().await;
        let (_, recovered) = open_store(data_dir);
        let seq = recovered.queues[&LogId(logs.0)][0].seq;
        (logs.0, logs.1, seq)
    }

    fn config(data_dir: &std::path::Path) -> BrokerConfig {
        let mut config = BrokerConfig::new(data_dir);
        config.amqp_listen = "127.0.0.1:0".parse().unwrap();
        config
    }

    fn open_store(data_dir: &std::path::Path) -> (Store, wharf_store::Recovered) {
        Store::open(Arc::new(wharf_store::RealFs), data_dir, StoreConfig::default()).unwrap()
    }

    /// Appends a copy of the message to `target` with a marker saying the move wrote `copies`.
    fn write_copy(data_dir: &std::path::Path, (dlq, target, seq): (u64, u64, u64), copies: u32) {
        let (store, _) = open_store(data_dir);
        let properties = BasicProperties::default().with_delivery_mode(2).with_message_id("m-1".into());
        let raw = wharf_wire::frame::encode_properties(&properties);
        let message = Message::new("".into(), "dlq".into(), Arc::new(properties), raw, Bytes::from_static(b"poison"));
        let marker = RelocationMarker { source_log: dlq, source_seq: seq, copies };
        let meta = persist::encode_message_meta_marked(&message, Some(marker));
        store.append(LogId(target), 1, &meta, b"poison").unwrap().wait().unwrap();
        // No clean stop: the process "crashed" right after the copy was durable.
        drop(store);
    }

    async fn message_ids(data_dir: &std::path::Path) -> (Vec<String>, Vec<String>) {
        let broker = Broker::start(config(data_dir)).await.unwrap();
        let management = broker.management();
        let ids = |queue: &str| {
            let page = management.browse("guest", "/", queue, 0, 100).unwrap();
            page.messages
                .iter()
                .map(|message| message.properties.message_id().as_ref().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        let found = (ids("dlq"), ids("target"));
        drop(management);
        broker.shutdown().await;
        found
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_move_whose_copies_are_all_durable_is_finished_at_recovery() {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("data");
        let logs = prepared(&data_dir).await;
        write_copy(&data_dir, logs, 1);
        assert_eq!(message_ids(&data_dir).await, (vec![], vec!["m-1".to_owned()]));
        // And it stays finished: the copy's marker names a source that is gone.
        assert_eq!(message_ids(&data_dir).await, (vec![], vec!["m-1".to_owned()]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_move_missing_a_copy_is_undone_at_recovery() {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("data");
        let logs = prepared(&data_dir).await;
        // The move wrote two copies (to two queues); only one became durable before the crash.
        write_copy(&data_dir, logs, 2);
        assert_eq!(message_ids(&data_dir).await, (vec!["m-1".to_owned()], vec![]));
        assert_eq!(message_ids(&data_dir).await, (vec!["m-1".to_owned()], vec![]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_finished_move_leaves_one_message_in_the_target() {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("data");
        prepared(&data_dir).await;
        let broker = Broker::start(config(&data_dir)).await.unwrap();
        let page = broker.management().browse("guest", "/", "dlq", 0, 10).unwrap();
        let report = broker
            .management()
            .move_messages("guest", "/", "dlq", Selection::Ids(vec![page.messages[0].entry_id]), "target")
            .unwrap();
        assert_eq!(report.moved.len(), 1, "{report:?}");
        broker.shutdown().await;
        assert_eq!(message_ids(&data_dir).await, (vec![], vec!["m-1".to_owned()]));
    }
}
