//! [`Core`]: the state every connection shares: the broker model behind one lock, the store, the
//! definitions log, and the registry of connections that deliveries are sent to. It also owns
//! startup recovery and carrying out the model's [`Effects`].
//!
//! The model lock is a `std::sync::Mutex` held only for short, non-blocking work (never across an
//! `.await`): routing, enqueueing and dispatching are in-memory; store appends only queue work for
//! the store's writer thread.

use crate::config::BrokerConfig;
use crate::error::BrokerError;
use crate::persist::{self, StoredBinding, StoredExchange, StoredQueue};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use tokio::sync::{mpsc, watch};
use wharf_model::{
    Admission, AutoDeadLetterQueue, BrokerModel, ChannelKey, ConnectionId, Delivery, Destination, Effects, Exchange,
    ExchangeKind, Message, ModelError, PagedBody, Queue, QueueDeclare, Removed, Transfer, TransferTarget,
};
use wharf_store::{AppendReceipt, MessageLocation, MetaStore, QueueId, Store, StoreError, Ticket, TicketFuture};

/// What a connection's writer task is asked to send.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// Encoded frames, sent as they are.
    Frames(bytes::Bytes),
    /// A delivery to encode (`basic.deliver` or `basic.get-ok`, header, body), and for a
    /// redelivery the store's ticket for its delivery count: the writer sends it only once the
    /// count is written, so a consumer that crashes on a message cannot outrun its count even if
    /// the broker is killed at that moment. The third field is a paged-out no-ack delivery's
    /// store removal, made by the writer once it has read the body (see `Core::send`).
    Deliver(Delivery, Option<Ticket<()>>, Option<(u64, u64)>),
    /// `basic.cancel` from the server (the queue went away).
    CancelConsumer { channel: u16, consumer_tag: String },
    /// `basic.return` of an unroutable mandatory message, with its content.
    Return { channel: u16, reply_code: u16, reply_text: &'static str, message: Arc<wharf_model::Message> },
}

impl Outbound {
    /// Roughly what the item will occupy on the wire, for the connection's backlog.
    pub fn size_bytes(&self) -> u64 {
        match self {
            Outbound::Frames(bytes) => bytes.len() as u64,
            Outbound::Deliver(delivery, _, _) => 64 + wharf_model::broker::delivery_bytes(&delivery.message),
            Outbound::CancelConsumer { consumer_tag, .. } => 32 + consumer_tag.len() as u64,
            Outbound::Return { message, .. } => 64 + wharf_model::broker::delivery_bytes(message),
        }
    }
}

/// Most bytes waiting for a connection's writer before the server stops reading that
/// connection's socket: a client that sends (publishes that produce returns and confirms) but
/// never reads cannot make the server buffer without bound.
pub(crate) const BACKLOG_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Bytes handed to a connection's writer and not yet written.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    pub bytes: AtomicU64,
    /// Signalled whenever the writer wrote something.
    pub drained: tokio::sync::Notify,
    /// Signalled once when the writer could not read a paged-out body back: the connection must
    /// close.
    pub writer_failed: tokio::sync::Notify,
}

/// The sending side of a connection's writer queue, counting what it holds.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    pub sender: mpsc::UnboundedSender<Outbound>,
    pub backlog: Arc<Backlog>,
}

impl Outbox {
    /// Queues an item for the writer; false only once the writer is gone.
    pub fn send(&self, item: Outbound) -> bool {
        self.backlog.bytes.fetch_add(item.size_bytes(), Ordering::Relaxed);
        self.sender.send(item).is_ok()
    }
}

/// How the core reaches a connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionHandle {
    pub outbound: Outbox,
}

/// The shared state.
#[derive(Debug)]
pub(crate) struct Core {
    pub config: BrokerConfig,
    model: Mutex<BrokerModel>,
    pub store: Store,
    pub meta: MetaStore,
    connections: Mutex<HashMap<ConnectionId, ConnectionHandle>>,
    /// Held across a definition change in the model and its write to the definitions log, so
    /// the log always describes what the model holds (no declare-ok before the definition is
    /// durable; no binding written after its queue was forgotten).
    definitions: Mutex<()>,
    next_connection: AtomicU64,
    /// Set when the store reports a fatal error: the broker must stop.
    pub fatal: watch::Sender<Option<String>>,
    /// De-duplication key logs: their window and the records to remove once it has passed.
    dedup_logs: DedupLogs,
    /// Bodies to drop from memory now that their records are written.
    pager: Arc<Pager>,
}

/// Paging out: a durable queue holding more than `queue_body_memory_bytes_max` of bodies in
/// memory appends further persistent messages with an observer; when the store has written the
/// record, the observer (on the store's writer thread, so it only queues the request here) says
/// where, and the next time anyone takes the model lock the entry's body is dropped. Until then
/// the body stays in memory: it can be delivered before it is written.
#[derive(Debug, Default)]
pub(crate) struct Pager {
    waiting: AtomicBool,
    written: Mutex<Vec<PageOut>>,
}

/// One body to drop: which entry (and which record, so a stale request cannot touch another
/// message), and where the record is.
#[derive(Debug)]
struct PageOut {
    vhost: String,
    queue: String,
    entry_id: u64,
    store_seq: u64,
    paged: PagedBody,
}

impl Pager {
    fn push(&self, page_out: PageOut) {
        self.written.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(page_out);
        self.waiting.store(true, Ordering::Release);
    }

    /// Applies every page-out waiting (under the model lock).
    fn apply(&self, model: &mut BrokerModel) {
        if !self.waiting.swap(false, Ordering::AcqRel) {
            return;
        }
        let written = std::mem::take(&mut *self.written.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        for page_out in written {
            model.page_out(&page_out.vhost, &page_out.queue, page_out.entry_id, page_out.store_seq, page_out.paged);
        }
    }
}

/// Takes out of `effects.removed` the removals of paged-out messages delivered without
/// acknowledgement (the model removes those as it dispatches them): their records must stay
/// until the connection's writer has read the bodies back, so the writer makes the removal. Its
/// segment could otherwise be deleted first and the message lost.
fn take_paged_removals(effects: &mut Effects) -> std::collections::HashSet<(u64, u64)> {
    let mut deferred = std::collections::HashSet::new();
    if effects.removed.is_empty() || !effects.deliveries.iter().any(|delivery| delivery.message.paged.is_some()) {
        return deferred;
    }
    let paged: std::collections::HashSet<(u64, u64)> = effects
        .deliveries
        .iter()
        .filter(|delivery| delivery.message.paged.is_some())
        .filter_map(|delivery| delivery.store)
        .collect();
    effects.removed.retain(|removed| match (removed.store_queue, removed.store_seq) {
        (Some(queue), Some(seq)) if paged.contains(&(queue, seq)) => {
            deferred.insert((queue, seq));
            false
        }
        _ => true,
    });
    deferred
}

/// Where a paged body's record is, for the store.
pub(crate) fn paged_location(paged: &PagedBody) -> (QueueId, MessageLocation) {
    (
        QueueId(paged.store_queue),
        MessageLocation { segment_id: paged.segment_id, offset: paged.offset, record_bytes: paged.record_bytes },
    )
}

/// Reads a paged-out body back from the store (one `pread`, normally from the page cache).
pub(crate) fn read_paged_body(store: &Store, paged: &PagedBody) -> Result<bytes::Bytes, StoreError> {
    let (queue, location) = paged_location(paged);
    let stored = store.read(queue, &location)?;
    if stored.body.len() as u64 != paged.body_bytes {
        return Err(StoreError::Corrupt {
            path: store.dir().to_path_buf(),
            offset: location.offset,
            reason: format!("paged body is {} bytes, expected {}", stored.body.len(), paged.body_bytes),
        });
    }
    Ok(bytes::Bytes::from(stored.body))
}

/// De-duplication key logs by store queue id.
pub(crate) type DedupLogs = Arc<Mutex<HashMap<u64, DedupLog>>>;

/// One de-duplication key log: the keys' window and (first seen, seq) of its records, oldest
/// first.
#[derive(Debug, Default)]
pub(crate) struct DedupLog {
    ttl_ms: u64,
    records: VecDeque<(u64, u64)>,
}

/// A durable queue or exchange gets at most this many key records before the oldest are removed
/// early (the in-memory index is bounded the same way).
const DEDUP_LOG_RECORDS_MAX: usize = wharf_model::dedup::DEDUP_KEYS_MAX;

/// What a publish or a transfer waits on before it counts as durable: store appends, or a chain
/// (the appends, then the de-duplication keys they admitted).
#[derive(Debug)]
pub(crate) enum Durable {
    Append(TicketFuture<AppendReceipt>),
    Chain(tokio::sync::oneshot::Receiver<Result<(), StoreError>>),
    Sync(TicketFuture<()>),
    /// Resolved: the outcome is kept, so polling again hands it out again.
    Done(Result<(), StoreError>),
}

impl Durable {
    pub fn append(ticket: Ticket<AppendReceipt>) -> Self {
        Durable::Append(ticket.into_future())
    }

    pub fn sync(ticket: Ticket<()>) -> Self {
        Durable::Sync(ticket.into_future())
    }

    /// Polls without giving the outcome away: a confirm queue polls a ticket once with its task's
    /// waker (so the store's completion wakes the task) and the task collects it later.
    pub fn poll_durable(&mut self, context: &mut Context<'_>) -> Poll<Result<(), StoreError>> {
        let outcome = match self {
            Durable::Append(ticket) => std::task::ready!(Pin::new(ticket).poll(context)).map(|_| ()),
            Durable::Chain(receiver) => {
                std::task::ready!(Pin::new(receiver).poll(context)).unwrap_or(Err(StoreError::Closed))
            }
            Durable::Sync(ticket) => std::task::ready!(Pin::new(ticket).poll(context)),
            Durable::Done(outcome) => return Poll::Ready(outcome.clone()),
        };
        *self = Durable::Done(outcome.clone());
        Poll::Ready(outcome)
    }

    pub async fn wait(mut self) -> Result<(), StoreError> {
        std::future::poll_fn(|context| self.poll_durable(context)).await
    }
}

/// What putting one message into queues produced.
#[derive(Debug, Default)]
pub(crate) struct Placed {
    /// Store appends of the copies.
    pub tickets: Vec<Ticket<AppendReceipt>>,
    /// De-duplication keys to record (log, key) once the copies are durable.
    pub dedup_records: Vec<(u64, Vec<u8>)>,
    /// A queue refused it (`x-overflow` reject-publish): the publisher gets a nack.
    pub refused: bool,
    /// A queue (or the exchange) dropped it as a duplicate: the confirm waits until what the
    /// store holds is durable, so a duplicate is never confirmed before its original.
    pub duplicate: bool,
    /// A store append failed: the publisher gets a nack.
    pub failed: bool,
    /// Effects to carry out once the model lock is released.
    pub later: Vec<Effects>,
}

/// A queue declaration, from a client or from the broker itself (automatic dead-letter queues).
#[derive(Debug, Clone)]
pub(crate) struct QueueRequest<'a> {
    pub vhost: &'a str,
    pub name: String,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: &'a wharf_wire::types::FieldTable,
    pub connection: ConnectionId,
    pub server_named: bool,
}

fn internal_error(error: &StoreError) -> ModelError {
    ModelError {
        code: wharf_wire::reply_code::INTERNAL_ERROR,
        text: format!("INTERNAL_ERROR - {error}"),
        scope: wharf_model::Scope::Connection,
    }
}

/// Runs blocking work (definitions, store round trips) without stalling the async workers: on a
/// multi-threaded runtime the worker hands its other tasks off first; elsewhere it just runs.
fn off_the_workers<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// What recovery does with each live record: (the recovered message, its meta, its body).
type RecordVisitor<'a> = dyn FnMut(&wharf_store::RecoveredMessage, &[u8], &[u8]) + 'a;

/// Hands every live record of a store log to `visit`, reading the log sequentially in chunks;
/// unreadable records are reported and skipped.
fn read_records(
    store: &Store,
    recovered: &wharf_store::Recovered,
    store_queue: QueueId,
    owner: &str,
    visit: &mut RecordVisitor<'_>,
) {
    let Some(messages) = recovered.queues.get(&store_queue) else { return };
    let locations: Vec<MessageLocation> = messages.iter().map(|message| message.location).collect();
    store.read_each(store_queue, &locations, &mut |index, result| match result {
        Ok(record) => visit(&messages[index], record.meta, record.body),
        Err(error) => tracing::error!(owner, seq = messages[index].seq, %error, "stored record unreadable"),
    });
}

/// Runs `work` now if no async runtime is around, else as a task.
fn spawn_or_run(work: impl std::future::Future<Output = ()> + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(work);
        }
        Err(_) => futures_executor_block_on(work),
    }
}

/// A minimal blocking executor for the rare case without a runtime (startup code paths).
fn futures_executor_block_on(work: impl std::future::Future<Output = ()>) {
    match tokio::runtime::Builder::new_current_thread().build() {
        Ok(runtime) => runtime.block_on(work),
        Err(error) => tracing::error!(%error, "could not run deferred store work"),
    }
}

/// Written by a clean shutdown after the store is closed; removed at start.
pub(crate) const CLEAN_STOP_MARKER: &str = "clean-stop";

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

impl Core {
    /// Opens the store and the definitions log and rebuilds the broker from them. Blocking (file
    /// I/O): run it off the async runtime's workers.
    pub fn open(config: BrokerConfig) -> Result<(Core, Effects), BrokerError> {
        let fs = Arc::clone(&config.fs);
        let (meta, definitions) = MetaStore::open(Arc::clone(&fs), config.data_dir.join("meta"))?;
        for issue in &definitions.issues {
            tracing::error!(?issue, "damage found in the definitions log");
        }
        let (store, recovered) = Store::open(Arc::clone(&fs), &config.data_dir, config.store.clone())?;
        for issue in &recovered.issues {
            tracing::warn!(?issue, "store recovery");
        }
        // Delivery counts are recorded lazily; only a clean stop makes them all durable. After any
        // other stop every recovered message is marked redelivered, so a message a consumer may
        // already have seen is never presented as new.
        let marker = config.data_dir.join(CLEAN_STOP_MARKER);
        let clean_stop = fs.exists(&marker).unwrap_or(false);
        if clean_stop {
            // Must be gone before anything else happens: a crash from here on is unclean.
            fs.remove_file(&marker).and_then(|()| fs.sync_dir(&config.data_dir)).map_err(|error| {
                wharf_store::StoreError::Io {
                    context: "removing the clean-stop marker".into(),
                    source: Arc::new(error),
                }
            })?;
        }
        let seed = now_ms() ^ u64::from(std::process::id()).rotate_left(32);
        let mut model = BrokerModel::new(seed);
        model.set_now(now_ms());
        let add_vhost = |model: &mut BrokerModel, name: &str| {
            if model.vhost(name).is_none() {
                model.add_vhost(name);
                let policies: Vec<_> = config
                    .policies
                    .iter()
                    .filter(|(vhost, _)| vhost == name)
                    .map(|(_, policy)| policy.clone())
                    .collect();
                if let Some(vhost) = model.vhost_mut(name) {
                    vhost.set_policies(policies);
                }
            }
        };
        add_vhost(&mut model, "/");
        if let Some(vhost) = model.vhost_mut("/") {
            let policies: Vec<_> =
                config.policies.iter().filter(|(vhost, _)| vhost == "/").map(|(_, policy)| policy.clone()).collect();
            vhost.set_policies(policies);
        }
        for vhost in &config.vhosts {
            add_vhost(&mut model, vhost);
        }
        let dedup_logs: DedupLogs = Arc::default();
        let mut bindings = Vec::new();
        let mut used_store_queues = HashMap::new();
        let mut restored_messages = 0usize;
        let mut paged_at_start = 0u64;
        // Reads every live record of a store log, sequentially (a queue's backlog is never all
        // in memory at once).
        let read_log = |store_queue: QueueId, owner: &str, visit: &mut RecordVisitor<'_>| {
            read_records(&store, &recovered, store_queue, owner, visit)
        };
        let now = now_ms();
        // Loads a de-duplication key log; expired keys are removed from the store.
        let load_dedup_log = |log: u64, ttl_ms: u64, owner: &str, remember: &mut dyn FnMut(&[u8], u64)| {
            let mut live = VecDeque::new();
            read_log(QueueId(log), owner, &mut |message, meta, key| {
                let (seq, seen_ms) = (message.seq, message.timestamp_ms);
                if !persist::is_dedup_key(meta) {
                    tracing::error!(owner, seq, "a record in a de-duplication log is not a key");
                    return;
                }
                if seen_ms.saturating_add(ttl_ms) <= now {
                    let _ = store.remove_unawaited(QueueId(log), seq);
                    return;
                }
                remember(key, seen_ms);
                live.push_back((seen_ms, seq));
            });
            live.make_contiguous().sort_unstable();
            dedup_logs
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(log, DedupLog { ttl_ms, records: live });
        };
        for (key, value) in &definitions.entries {
            let Some((kind, vhost_name, rest)) = persist::split_key(key) else {
                tracing::warn!("unreadable definitions key skipped");
                continue;
            };
            add_vhost(&mut model, vhost_name);
            match kind {
                "exchange" => match serde_json::from_slice::<StoredExchange>(value) {
                    Ok(stored) => match ExchangeKind::parse(&stored.kind) {
                        Ok(kind) => {
                            let Some(vhost) = model.vhost_mut(vhost_name) else { continue };
                            let mut exchange = Exchange::new(rest, kind, true, stored.auto_delete, stored.internal);
                            exchange.settings =
                                vhost.exchange_settings(rest, kind, &stored.arguments).unwrap_or_else(|error| {
                                    tracing::error!(exchange = rest, %error, "stored exchange arguments no longer valid; using defaults");
                                    wharf_model::ExchangeSettings::default()
                                });
                            exchange.arguments = stored.arguments;
                            exchange.store_queue = stored.store_queue;
                            exchange.dedup_store_queue = stored.dedup_store_queue;
                            let dedup_ttl = exchange.settings.deduplication.as_ref().map(|dedup| dedup.ttl_ms);
                            vhost.restore_exchange(exchange);
                            if let (Some(log), Some(ttl_ms)) = (stored.dedup_store_queue, dedup_ttl) {
                                used_store_queues.insert(QueueId(log), ());
                                load_dedup_log(log, ttl_ms, rest, &mut |key, seen_ms| {
                                    vhost.restore_exchange_dedup_key(rest, key, seen_ms)
                                });
                            }
                            if let Some(log) = stored.store_queue {
                                used_store_queues.insert(QueueId(log), ());
                                read_log(QueueId(log), rest, &mut |stored_message, meta, body| {
                                    let (seq, stored_ms) = (stored_message.seq, stored_message.timestamp_ms);
                                    match persist::decode_message(meta, bytes::Bytes::copy_from_slice(body)) {
                                        Some(message) => {
                                            let due_ms = stored_ms.saturating_add(message.delay_ms().unwrap_or(0));
                                            model.hold_delayed(vhost_name, rest, Arc::new(message), Some(seq), due_ms);
                                            restored_messages += 1;
                                        }
                                        None => {
                                            tracing::error!(exchange = rest, seq, "stored delayed message unreadable")
                                        }
                                    }
                                });
                            }
                        }
                        Err(error) => tracing::error!(exchange = rest, %error, "stored exchange skipped"),
                    },
                    Err(error) => tracing::error!(exchange = rest, %error, "stored exchange unreadable"),
                },
                "queue" => match serde_json::from_slice::<StoredQueue>(value) {
                    Ok(stored) => {
                        let Some(vhost) = model.vhost_mut(vhost_name) else { continue };
                        let settings = vhost.queue_settings(rest, &stored.arguments).unwrap_or_else(|error| {
                            tracing::error!(queue = rest, %error, "stored queue arguments no longer valid; using defaults");
                            wharf_model::QueueSettings::default()
                        });
                        let dedup_ttl = settings.deduplication.as_ref().map(|dedup| dedup.ttl_ms);
                        let mut queue =
                            Queue::new(rest.to_owned(), true, None, stored.auto_delete, stored.arguments, settings);
                        queue.store_queue = Some(stored.store_queue);
                        queue.dedup_store_queue = stored.dedup_store_queue;
                        let store_queue = QueueId(stored.store_queue);
                        used_store_queues.insert(store_queue, ());
                        // The store's scan kept every record's meta: only the bodies that stay
                        // in memory are read again (beyond the queue's budget, none).
                        for recovered_message in recovered.queues.get(&store_queue).into_iter().flatten() {
                            let seq = recovered_message.seq;
                            let location = recovered_message.location;
                            let page = queue.resident_bytes() >= config.queue_body_memory_bytes_max;
                            let (meta, in_memory) = match recovered.meta(store_queue, recovered_message) {
                                Some(meta) if page => (std::borrow::Cow::Borrowed(meta), None),
                                _ => match store.read(store_queue, &location) {
                                    Ok(stored) => (std::borrow::Cow::Owned(stored.meta), Some(stored.body)),
                                    Err(error) => {
                                        tracing::error!(queue = rest, seq, %error, "stored record unreadable");
                                        continue;
                                    }
                                },
                            };
                            let body_bytes = match &in_memory {
                                Some(body) => body.len() as u64,
                                None => recovered_message.body_bytes(),
                            };
                            let paged = PagedBody {
                                store_queue: stored.store_queue,
                                segment_id: location.segment_id,
                                offset: location.offset,
                                record_bytes: location.record_bytes,
                                body_bytes,
                            };
                            let body = in_memory.map(bytes::Bytes::from).unwrap_or_default();
                            match persist::decode_message(&meta, body) {
                                Some(decoded) if page => {
                                    queue.enqueue_recovered_paged(
                                        decoded,
                                        paged,
                                        seq,
                                        recovered_message.timestamp_ms,
                                        recovered_message.delivery_count,
                                        !clean_stop,
                                    );
                                    paged_at_start += 1;
                                    restored_messages += 1;
                                }
                                Some(decoded) => {
                                    queue.enqueue_recovered(
                                        Arc::new(decoded),
                                        Some(seq),
                                        recovered_message.timestamp_ms,
                                        recovered_message.delivery_count,
                                        !clean_stop,
                                    );
                                    restored_messages += 1;
                                }
                                None => tracing::error!(queue = rest, seq, "stored message unreadable"),
                            }
                        }
                        if let (Some(log), Some(ttl_ms)) = (stored.dedup_store_queue, dedup_ttl) {
                            used_store_queues.insert(QueueId(log), ());
                            load_dedup_log(log, ttl_ms, rest, &mut |key, seen_ms| {
                                queue.restore_dedup_key(key, seen_ms)
                            });
                        } else if let Some(log) = stored.dedup_store_queue {
                            // De-duplication was switched off (by a policy): the log stays with
                            // the queue's definition, unread, in case it is switched on again.
                            used_store_queues.insert(QueueId(log), ());
                        }
                        vhost.restore_queue(queue);
                    }
                    Err(error) => tracing::error!(queue = rest, %error, "stored queue unreadable"),
                },
                "binding" => match serde_json::from_slice::<StoredBinding>(value) {
                    Ok(stored) => bindings.push((vhost_name.to_owned(), stored)),
                    Err(error) => tracing::error!(%error, "stored binding unreadable"),
                },
                other => tracing::warn!(kind = other, "unknown definition kind skipped"),
            }
        }
        for (vhost_name, stored) in bindings {
            let Some(vhost) = model.vhost_mut(&vhost_name) else { continue };
            let destination = if stored.destination_is_queue {
                Destination::Queue(stored.destination)
            } else {
                Destination::Exchange(stored.destination)
            };
            if let Err(error) =
                vhost.bind(&stored.source, destination, &stored.routing_key, &stored.arguments, ConnectionId(0))
            {
                tracing::error!(%error, "stored binding no longer applies");
            }
        }
        // Store logs no definition points at: a crash between creating the log and recording
        // the queue, or between deleting the definition and the log.
        for queue in recovered.queues.keys() {
            if !used_store_queues.contains_key(queue) {
                tracing::info!(store_queue = queue.0, "deleting an orphaned queue log");
                store.delete_queue(*queue)?.wait()?;
            }
        }
        tracing::info!(messages = restored_messages, paged_out = paged_at_start, "broker state recovered");
        model.count_paged_out(paged_at_start);
        // Delivery limits exhausted before the stop, backoffs, expiries: carried out once the
        // broker runs.
        let startup = model.after_recovery();
        let (fatal, _) = watch::channel(None);
        let core = Core {
            config,
            model: Mutex::new(model),
            store,
            meta,
            connections: Mutex::new(HashMap::new()),
            definitions: Mutex::new(()),
            next_connection: AtomicU64::new(1),
            fatal,
            dedup_logs,
            pager: Arc::default(),
        };
        Ok((core, startup))
    }

    /// The definitions lock (see the field). Take it before the model lock, never after.
    pub fn definitions(&self) -> MutexGuard<'_, ()> {
        self.definitions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The model, locked. Never hold the guard across an `.await`.
    pub fn model(&self) -> MutexGuard<'_, BrokerModel> {
        let mut model = self.lock_model();
        model.set_now(now_ms());
        model
    }

    /// The model lock; whoever takes it first applies the page-outs that are waiting.
    fn lock_model(&self) -> MutexGuard<'_, BrokerModel> {
        let mut model = self.model.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.pager.apply(&mut model);
        model
    }

    pub fn register(&self, handle: ConnectionHandle) -> Option<ConnectionId> {
        let mut connections = self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if connections.len() >= self.config.connections_max {
            return None;
        }
        let id = ConnectionId(self.next_connection.fetch_add(1, Ordering::Relaxed));
        connections.insert(id, handle);
        Some(id)
    }

    pub fn unregister(&self, id: ConnectionId) {
        self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&id);
    }

    pub fn connection_count(&self) -> usize {
        self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }

    fn outbound(&self, id: ConnectionId) -> Option<Outbox> {
        self.connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&id)
            .map(|handle| handle.outbound.clone())
    }

    /// Reports a store failure that makes durability impossible: the broker stops.
    pub fn store_failed(&self, error: &StoreError) {
        if error.is_fatal() {
            tracing::error!(%error, "the store failed; stopping the broker");
            self.fatal.send_replace(Some(error.to_string()));
        }
    }

    /// Runs a model operation and carries out its effects. Deliveries and server cancels are
    /// queued to their connections *before* the model lock is released: two tasks dispatching to
    /// the same channel then queue their deliveries in the order the model assigned their tags
    /// (queue order), never the other way round. The rest (store removals, forgetting deleted
    /// definitions, which may block) happens after.
    pub fn act<T>(
        &self,
        operation: impl FnOnce(&mut BrokerModel) -> wharf_model::Result<(T, Effects)>,
    ) -> wharf_model::Result<T> {
        let mut model = self.model();
        let (value, mut effects) = operation(&mut model)?;
        self.send(&mut effects);
        drop(model);
        self.apply(effects);
        Ok(value)
    }

    /// Queues deliveries and server-side cancels to their connections (non-blocking). Call it
    /// while holding the model lock, so sends keep the model's order.
    pub fn send(&self, effects: &mut Effects) {
        let deferred = take_paged_removals(effects);
        for delivery in effects.deliveries.drain(..) {
            let recorded = self.record_delivery(&delivery);
            let remove_after_read = delivery.store.filter(|key| deferred.contains(key));
            let connection = delivery.channel.connection;
            match self.outbound(connection) {
                // A closed connection's channels are closed in the model right after; its
                // unacked deliveries are requeued there, so a failed send loses nothing.
                Some(outbound) => {
                    if !outbound.send(Outbound::Deliver(delivery, recorded, remove_after_read))
                        && let Some((queue, seq)) = remove_after_read
                    {
                        self.remove_stored_record(queue, seq);
                    }
                }
                // A no-ack delivery to a connection that is gone left the model already.
                None => {
                    if let Some((queue, seq)) = remove_after_read {
                        self.remove_stored_record(queue, seq);
                    }
                }
            }
        }
        for (ChannelKey { connection, channel }, consumer_tag) in effects.cancelled.drain(..) {
            if let Some(outbound) = self.outbound(connection) {
                let _ = outbound.send(Outbound::CancelConsumer { channel, consumer_tag });
            }
        }
    }

    /// Carries out what the model decided. Anything `send` has not already queued is queued now
    /// (only safe under the model lock; `act` sends first), then store removals, then transfers
    /// (dead letters, due delayed messages), then forgetting durable queues and exchanges the
    /// model deleted.
    pub fn apply(&self, mut effects: Effects) {
        self.send(&mut effects);
        for removed in &effects.removed {
            self.remove_stored(removed);
        }
        let transfers = std::mem::take(&mut effects.transfers);
        let durable_queues: Vec<_> = effects.deleted_queues.into_iter().filter(|deleted| deleted.durable).collect();
        let durable_exchanges: Vec<_> =
            effects.deleted_exchanges.into_iter().filter(|(_, exchange)| exchange.durable).collect();
        if !durable_queues.is_empty() || !durable_exchanges.is_empty() {
            off_the_workers(|| {
                let _definitions = self.definitions();
                for deleted in durable_queues {
                    self.forget_queue(&deleted.vhost, &deleted.name, deleted.store_queue, deleted.dedup_store_queue);
                }
                for (vhost, exchange) in durable_exchanges {
                    if let Err(error) = self.forget_exchange(&vhost, &exchange) {
                        tracing::error!(exchange = %exchange.name, %error, "could not remove an exchange definition");
                        self.store_failed(&error);
                    }
                }
            });
        }
        if !transfers.is_empty() {
            off_the_workers(|| self.transfer(transfers));
        }
    }

    fn remove_stored(&self, removed: &Removed) {
        if let (Some(queue), Some(seq)) = (removed.store_queue, removed.store_seq) {
            self.remove_stored_record(queue, seq);
        }
    }

    /// Records a message's removal in the store (a deleted queue's records went with it).
    pub fn remove_stored_record(&self, queue: u64, seq: u64) {
        match self.store.remove_unawaited(QueueId(queue), seq) {
            Ok(()) | Err(StoreError::UnknownQueue(_)) => {}
            Err(error) => self.store_failed(&error),
        }
    }

    /// Puts a message into `queues` (already routed), appending it to the store for each durable
    /// queue when it is persistent. For a publish (`from_publisher`), each queue admits it first:
    /// a de-duplicating queue that saw its key skips it, a queue whose `x-overflow` refuses
    /// publishes beyond its limits refuses it; the key is remembered only once the message is in.
    /// Deliveries go out under the lock.
    pub fn place(
        &self,
        model: &mut BrokerModel,
        vhost: &str,
        queues: &[String],
        message: &Arc<Message>,
        from_publisher: bool,
        placed: &mut Placed,
    ) {
        if message.paged.is_some() {
            // Callers read a paged body back first (`transfer`); storing the empty body would
            // lose the message.
            tracing::error!(vhost, "a message without its body in memory cannot be placed");
            placed.failed = true;
            return;
        }
        let mut meta = None;
        for queue_name in queues {
            let dedup_key = match model.admit(vhost, queue_name, message, from_publisher) {
                Admission::Duplicate => {
                    placed.duplicate = true;
                    continue;
                }
                Admission::Refused { dead_letter } => {
                    placed.refused = true;
                    if dead_letter {
                        placed.later.push(model.dead_letter_refused(vhost, queue_name, message));
                    }
                    continue;
                }
                Admission::Accept { dedup_key } => dedup_key,
            };
            let Some(queue) = model.vhost(vhost).and_then(|found| found.queue(queue_name)) else { continue };
            let stored = queue.durable && message.persistent();
            let store_seq = match queue.store_queue.filter(|_| stored) {
                Some(store_queue) => {
                    let meta = meta.get_or_insert_with(|| persist::encode_message_meta(message));
                    let appended = if queue.resident_bytes() >= self.config.queue_body_memory_bytes_max {
                        // `next_entry_id` is the id `enqueue` below gives it (same lock).
                        let page_out = (vhost.to_owned(), queue_name.clone(), queue.next_entry_id());
                        let body_bytes = message.body_bytes();
                        let pager = Arc::clone(&self.pager);
                        self.store.append_observed(
                            QueueId(store_queue),
                            now_ms(),
                            meta,
                            &message.body,
                            Box::new(move |result| {
                                if let Ok(receipt) = result {
                                    let (vhost, queue, entry_id) = page_out;
                                    let location = receipt.location;
                                    pager.push(PageOut {
                                        vhost,
                                        queue,
                                        entry_id,
                                        store_seq: receipt.seq,
                                        paged: PagedBody {
                                            store_queue,
                                            segment_id: location.segment_id,
                                            offset: location.offset,
                                            record_bytes: location.record_bytes,
                                            body_bytes,
                                        },
                                    });
                                }
                            }),
                        )
                    } else {
                        self.store.append(QueueId(store_queue), now_ms(), meta, &message.body)
                    };
                    match appended {
                        Ok(pending) => {
                            placed.tickets.push(pending.ticket);
                            Some(pending.seq)
                        }
                        Err(error) => {
                            self.store_failed(&error);
                            placed.failed = true;
                            continue;
                        }
                    }
                }
                None => None,
            };
            let log = queue.dedup_store_queue.filter(|_| stored);
            if let Some(key) = dedup_key {
                model.remember_key(vhost, queue_name, &key);
                if let Some(log) = log {
                    placed.dedup_records.push((log, key));
                }
            }
            let mut effects = model.enqueue(vhost, queue_name, Arc::clone(message), store_seq);
            self.send(&mut effects);
            placed.later.push(effects);
        }
    }

    /// What the publisher (or a transfer) waits on: the appends; when de-duplication keys were
    /// admitted, a chain that appends each key only after every copy is durable (so a key that
    /// survives a crash always stands for a message that survived it) and resolves once the keys
    /// are durable too.
    pub fn durable(&self, placed: &mut Placed) -> Vec<Durable> {
        let tickets = std::mem::take(&mut placed.tickets);
        let records = std::mem::take(&mut placed.dedup_records);
        let mut barrier = Vec::new();
        if std::mem::take(&mut placed.duplicate) {
            // Everything submitted before this sync (the original's appends included) is durable
            // when it resolves.
            match self.store.sync() {
                Ok(ticket) => barrier.push(Durable::sync(ticket)),
                Err(error) => {
                    self.store_failed(&error);
                    placed.failed = true;
                }
            }
        }
        if records.is_empty() {
            return tickets.into_iter().map(Durable::append).chain(barrier).collect();
        }
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let store = self.store.clone();
        let logs = Arc::clone(&self.dedup_logs);
        spawn_or_run(async move {
            for ticket in tickets {
                if let Err(error) = ticket.await {
                    let _ = sender.send(Err(error));
                    return;
                }
            }
            let seen_ms = now_ms();
            let mut pending = Vec::new();
            for (log, key) in records {
                let appended = tokio::task::block_in_place(|| {
                    store.append(QueueId(log), seen_ms, &persist::dedup_key_meta(), &key)
                });
                match appended {
                    Ok(append) => {
                        if let Some(dedup_log) =
                            logs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get_mut(&log)
                        {
                            dedup_log.records.push_back((seen_ms, append.seq));
                        }
                        pending.push(append.ticket);
                    }
                    // The queue was deleted meanwhile: its keys went with it.
                    Err(StoreError::UnknownQueue(_)) => {}
                    Err(error) => {
                        let _ = sender.send(Err(error));
                        return;
                    }
                }
            }
            for ticket in pending {
                if let Err(error) = ticket.await {
                    let _ = sender.send(Err(error));
                    return;
                }
            }
            let _ = sender.send(Ok(()));
        });
        let mut durable = vec![Durable::Chain(receiver)];
        durable.extend(barrier);
        durable
    }

    /// Moves messages into other queues (dead letters, due delayed messages): routes each one,
    /// creates the source's automatic dead-letter queue on first use, puts the copies in, and
    /// removes the original from the store only once every copy is durable. Transfers caused by
    /// these (a full dead-letter queue dropping its head into its own dead-letter exchange) are
    /// carried out in the same loop, not by recursion.
    pub fn transfer(&self, transfers: Vec<Transfer>) {
        let mut pending: VecDeque<Transfer> = transfers.into();
        while let Some(mut transfer) = pending.pop_front() {
            if let Some(paged) = transfer.message.paged {
                // The source's record is live until the copies are durable, so it can be read.
                match read_paged_body(&self.store, &paged) {
                    Ok(body) => transfer.message = Arc::new(transfer.message.with_body(body)),
                    Err(error) => {
                        tracing::error!(vhost = %transfer.vhost, %error, "a paged-out message could not be read back to move it; it stays where it is");
                        self.store_failed(&error);
                        continue;
                    }
                }
            }
            let (mut targets, missing) = self.transfer_targets(&transfer);
            if let Some(auto) = missing {
                match self.ensure_auto_dead_letter_queue(&transfer.vhost, &auto) {
                    Ok(()) => targets = vec![auto.name.clone()],
                    Err(error) => {
                        // The original stays where it is (in the store; it comes back after a
                        // restart): never dropped.
                        tracing::error!(queue = %auto.name, %error, "could not create an automatic dead-letter queue");
                        continue;
                    }
                }
            }
            if targets.is_empty() {
                tracing::debug!(vhost = %transfer.vhost, "a dead letter reached no queue and was dropped");
                if let Some(source) = &transfer.source {
                    self.remove_stored(source);
                }
                continue;
            }
            let mut placed = Placed::default();
            {
                let mut model = self.model();
                self.place(&mut model, &transfer.vhost, &targets, &transfer.message, false, &mut placed);
            }
            for mut effects in std::mem::take(&mut placed.later) {
                pending.extend(std::mem::take(&mut effects.transfers));
                self.apply(effects);
            }
            let durable = self.durable(&mut placed);
            let failed = placed.failed;
            if let Some(source) = transfer.source {
                if failed {
                    continue;
                }
                if durable.is_empty() {
                    self.remove_stored(&source);
                } else {
                    let store = self.store.clone();
                    spawn_or_run(async move {
                        for copy in durable {
                            if copy.wait().await.is_err() {
                                return;
                            }
                        }
                        if let (Some(queue), Some(seq)) = (source.store_queue, source.store_seq) {
                            match store.remove_unawaited(QueueId(queue), seq) {
                                Ok(()) | Err(StoreError::UnknownQueue(_)) => {}
                                Err(error) => tracing::error!(%error, "could not remove a transferred message"),
                            }
                        }
                    });
                }
            }
        }
    }

    /// The queues a transfer reaches, and the automatic dead-letter queue to create first when
    /// it must go there and does not exist yet.
    fn transfer_targets(&self, transfer: &Transfer) -> (Vec<String>, Option<AutoDeadLetterQueue>) {
        let model = self.model();
        let Some(vhost) = model.vhost(&transfer.vhost) else { return (Vec::new(), None) };
        let auto_queue = |auto: &AutoDeadLetterQueue| match vhost.queue(&auto.name) {
            Some(_) => (vec![auto.name.clone()], None),
            None => (Vec::new(), Some(auto.clone())),
        };
        match &transfer.target {
            TransferTarget::Exchange { exchange, routing_keys, fallback } => {
                let mut queues = BTreeSet::new();
                for routing_key in routing_keys {
                    if let Ok(found) = vhost.route_from(exchange, routing_key, transfer.message.headers()) {
                        queues.extend(found);
                    }
                }
                if transfer.reason.is_some() {
                    queues.retain(|queue| !wharf_model::deadletter::closes_cycle(&transfer.message, queue));
                }
                match (queues.is_empty(), fallback) {
                    (true, Some(auto)) => auto_queue(auto),
                    _ => (queues.into_iter().collect(), None),
                }
            }
            TransferTarget::Queue(auto) => auto_queue(auto),
        }
    }

    /// Creates `<queue>.dlq` (durable if its source is; no delivery limit of its own, so dead
    /// letters stay there until someone looks) unless it exists.
    fn ensure_auto_dead_letter_queue(&self, vhost: &str, auto: &AutoDeadLetterQueue) -> Result<(), ModelError> {
        let mut arguments = wharf_wire::types::FieldTable::default();
        arguments.insert("x-delivery-limit".into(), wharf_wire::types::AMQPValue::LongInt(-1));
        let request = QueueRequest {
            vhost,
            name: auto.name.clone(),
            passive: false,
            durable: auto.durable,
            exclusive: false,
            auto_delete: false,
            arguments: &arguments,
            connection: ConnectionId(0),
            server_named: false,
        };
        match self.declare_queue(request) {
            Ok(_) => Ok(()),
            // Declared meanwhile, by someone else, with other arguments: use it as it is.
            Err(_) if self.model().vhost(vhost).is_some_and(|found| found.queue(&auto.name).is_some()) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// `queue.declare`. A new durable queue gets its store log(s) and its durable definition
    /// *before* it appears in the model, all under the definitions lock: nothing can be published
    /// into it, and no declare-ok can be sent for it, before it is fully durable. Bad arguments
    /// are refused (406) before anything is created. Returns the queue's name.
    pub fn declare_queue(&self, request: QueueRequest<'_>) -> Result<String, ModelError> {
        let _definitions = self.definitions();
        let mut name = request.name.clone();
        let server_named = request.server_named;
        let (creates_durable, deduplicates) = {
            let mut model = self.model();
            let vhost =
                model.vhost_mut(request.vhost).ok_or_else(|| ModelError::not_allowed("vhost no longer exists"))?;
            if server_named {
                name = vhost.generate_queue_name();
            }
            let creates = !request.passive && vhost.queue(&name).is_none();
            let settings = if creates { Some(vhost.queue_settings(&name, request.arguments)?) } else { None };
            let deduplicates = settings.is_some_and(|settings| settings.deduplication.is_some());
            (creates && request.durable && !request.exclusive, deduplicates)
        };
        let mut store_queue = None;
        let mut dedup_store_queue = None;
        if creates_durable {
            let create = || {
                self.store.create_queue().and_then(|ticket| ticket.wait()).map_err(|error| {
                    self.store_failed(&error);
                    internal_error(&error)
                })
            };
            let id = create()?;
            let dedup_id = if deduplicates {
                match create() {
                    Ok(dedup_id) => Some(dedup_id),
                    Err(error) => {
                        let _ = self.store.delete_queue(id);
                        return Err(error);
                    }
                }
            } else {
                None
            };
            let stored = persist::StoredQueue {
                auto_delete: request.auto_delete,
                arguments: request.arguments.clone(),
                store_queue: id.0,
                dedup_store_queue: dedup_id.map(|dedup_id| dedup_id.0),
            };
            let value = serde_json::to_vec(&stored).unwrap_or_default();
            if let Err(error) = self.meta.put(&persist::queue_key(request.vhost, &name), &value) {
                let _ = self.store.delete_queue(id);
                if let Some(dedup_id) = dedup_id {
                    let _ = self.store.delete_queue(dedup_id);
                }
                self.store_failed(&error);
                return Err(internal_error(&error));
            }
            store_queue = Some(id.0);
            dedup_store_queue = dedup_id.map(|dedup_id| dedup_id.0);
        }
        let mut model = self.model();
        let declared = model
            .vhost_mut(request.vhost)
            .ok_or_else(|| ModelError::not_allowed("vhost no longer exists"))?
            .declare_queue(&QueueDeclare {
                name: &name,
                passive: request.passive,
                durable: request.durable,
                exclusive: request.exclusive,
                auto_delete: request.auto_delete,
                arguments: request.arguments,
                connection: request.connection,
                server_named,
                store_queue,
                dedup_store_queue,
            });
        match declared {
            Ok(declared) => {
                if let Some(ttl_ms) = model
                    .vhost(request.vhost)
                    .and_then(|vhost| vhost.queue(&declared.name))
                    .and_then(|queue| queue.settings.deduplication.as_ref().map(|dedup| dedup.ttl_ms))
                    && let Some(log) = dedup_store_queue
                {
                    self.register_dedup_log(log, ttl_ms);
                }
                if !request.passive {
                    model.touch_queue(request.vhost, &declared.name);
                }
                Ok(declared.name)
            }
            Err(error) => {
                drop(model);
                if let Some(id) = store_queue {
                    // Refused (a bad name, a limit): take back the log and the definition.
                    self.forget_queue(request.vhost, &name, Some(id), dedup_store_queue);
                }
                Err(error)
            }
        }
    }

    /// Starts tracking a de-duplication key log's records for expiry.
    pub fn register_dedup_log(&self, log: u64, ttl_ms: u64) {
        self.dedup_logs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(log, DedupLog { ttl_ms, records: VecDeque::new() });
    }

    /// Removes de-duplication key records whose window has passed (and the oldest beyond the
    /// bound), so key logs stay proportional to the window.
    pub fn trim_dedup_logs(&self) {
        let now = now_ms();
        let mut removals = Vec::new();
        {
            let mut logs = self.dedup_logs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for (log, dedup_log) in logs.iter_mut() {
                while let Some(&(seen_ms, seq)) = dedup_log.records.front() {
                    if seen_ms.saturating_add(dedup_log.ttl_ms) > now
                        && dedup_log.records.len() <= DEDUP_LOG_RECORDS_MAX
                    {
                        break;
                    }
                    dedup_log.records.pop_front();
                    removals.push((*log, seq));
                }
            }
        }
        for (log, seq) in removals {
            match self.store.remove_unawaited(QueueId(log), seq) {
                Ok(()) | Err(StoreError::UnknownQueue(_)) => {}
                Err(error) => self.store_failed(&error),
            }
        }
    }

    /// Fires the model's due timers and carries out what they caused.
    pub fn tick(&self) {
        let _ = self.act(|model| Ok(((), model.tick())));
    }

    /// When the model's next timer is due (ms since the epoch).
    pub fn next_timer_ms(&self) -> Option<u64> {
        self.lock_model().next_timer_ms()
    }

    /// What the model counted.
    pub fn counters(&self) -> wharf_model::Counters {
        self.model().counters()
    }

    /// Removes a durable queue's definition (and its bindings' definitions), then its logs. The
    /// definition goes first: a crash in between leaves an orphaned log, deleted at startup.
    /// The caller holds the definitions lock.
    pub fn forget_queue(&self, vhost: &str, name: &str, store_queue: Option<u64>, dedup_store_queue: Option<u64>) {
        let mut keys = vec![persist::queue_key(vhost, name)];
        keys.extend(self.binding_keys_to(vhost, &Destination::Queue(name.to_owned())));
        let changes: Vec<_> = keys.into_iter().map(|key| wharf_store::MetaChange::Delete { key }).collect();
        if let Err(error) = self.meta.apply(&changes) {
            tracing::error!(queue = name, %error, "could not remove a queue definition");
            self.store_failed(&error);
            return;
        }
        for queue in store_queue.into_iter().chain(dedup_store_queue) {
            self.dedup_logs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&queue);
            match self.store.delete_queue(QueueId(queue)) {
                Ok(_) | Err(StoreError::UnknownQueue(_)) => {}
                Err(error) => self.store_failed(&error),
            }
        }
    }

    /// Definition keys of stored bindings leading to `destination` (read from the log's map).
    fn binding_keys_to(&self, vhost: &str, destination: &Destination) -> Vec<Vec<u8>> {
        let (is_queue, name) = match destination {
            Destination::Queue(name) => (true, name),
            Destination::Exchange(name) => (false, name),
        };
        self.meta
            .entries()
            .into_iter()
            .filter_map(|(key, value)| {
                let (kind, key_vhost, _) = persist::split_key(&key)?;
                if kind != "binding" || key_vhost != vhost {
                    return None;
                }
                let stored: StoredBinding = serde_json::from_slice(&value).ok()?;
                let matches = (stored.destination_is_queue == is_queue && &stored.destination == name)
                    || (!is_queue && &stored.source == name);
                matches.then_some(key)
            })
            .collect()
    }

    /// Removes a durable exchange's definition and every stored binding from or to it, then its
    /// logs (delayed messages, de-duplication keys). The caller holds the definitions lock.
    pub fn forget_exchange(&self, vhost: &str, exchange: &Exchange) -> Result<(), StoreError> {
        let mut keys = vec![persist::exchange_key(vhost, &exchange.name)];
        keys.extend(self.binding_keys_to(vhost, &Destination::Exchange(exchange.name.clone())));
        let changes: Vec<_> = keys.into_iter().map(|key| wharf_store::MetaChange::Delete { key }).collect();
        self.meta.apply(&changes)?;
        for log in exchange.store_queue.into_iter().chain(exchange.dedup_store_queue) {
            self.dedup_logs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&log);
            match self.store.delete_queue(QueueId(log)) {
                Ok(_) | Err(StoreError::UnknownQueue(_)) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Records a delivery's count in the store (synced lazily, like removals; see
    /// `CLEAN_STOP_MARKER` for what a crash does). For a redelivery it returns the ticket that
    /// resolves once the count is written: the delivery waits for it, so after `kill -9` the count
    /// of any message a consumer saw again is on file. (A first delivery does not wait: it keeps
    /// the hot path free of store round trips, and losing its count costs at most one extra
    /// delivery.)
    pub fn record_delivery(&self, delivery: &Delivery) -> Option<Ticket<()>> {
        let (queue, seq) = delivery.store?;
        let recorded = if delivery.delivery_count > 1 {
            self.store.set_delivery_count(QueueId(queue), seq, delivery.delivery_count).map(Some)
        } else {
            self.store.set_delivery_count_unawaited(QueueId(queue), seq, delivery.delivery_count).map(|()| None)
        };
        match recorded {
            Ok(ticket) => ticket,
            Err(StoreError::UnknownQueue(_)) => None,
            Err(error) => {
                self.store_failed(&error);
                None
            }
        }
    }

    pub fn now_ms(&self) -> u64 {
        now_ms()
    }
}
