//! Paging: dropping the bodies of a queue's backlog from memory once their records are written,
//! and reading them back from the store to deliver or move them.
//!
//! Persistent messages of a durable queue are paged from the queue's own message log. Transient
//! ones (any message of a non-durable queue, and `delivery_mode` 1 ones of a durable queue) are
//! written, once the queue is over its bound, to its *transient log*: a store log created for it
//! the first time it needs one ([`Core::create_transient_logs`]), recorded in the definitions log
//! as transient so that the next start deletes it with its contents instead of keeping it as an
//! orphan, and deleted with the queue ([`Core::forget_transient_logs`]).
//!
//! A paged delivery's read is decided under the model lock, when the delivery is queued to its
//! connection ([`delivery_body`]): which record, and (as the model said) whether the record is
//! removed once read. The connection's writer carries the read out ([`PagedRead::read`]) on its
//! own task, so the model lock is never held for a `pread`.

use crate::core::Core;
use crate::definition_format;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use wharf_model::{Body, BrokerModel, Delivery, PagedBody, StoredAt};
use wharf_store::{LogId, MessageLocation, Store, StoreError};

/// Paging out: a durable queue holding more than `queue_body_memory_bytes_max` of bodies in
/// memory appends further persistent messages with an observer; when the store has written the
/// record, the observer (on the store's writer thread, so it only queues the request here) says
/// where, and the next time anyone takes the model lock the entry's body is dropped. Until then
/// the body stays in memory: it can be delivered before it is written.
#[derive(Debug, Default)]
pub(crate) struct Pager {
    waiting: AtomicBool,
    written: Mutex<Vec<PageOut>>,
    /// Transient records the store failed to write (their bodies stay in memory), to count.
    failed: AtomicU64,
}

/// One body to drop: which entry (and which record, so a stale request cannot touch another
/// message), and where the record is.
#[derive(Debug)]
pub(crate) struct PageOut {
    pub vhost: String,
    pub queue: String,
    pub entry_id: u64,
    pub store_seq: u64,
    pub paged: PagedBody,
}

impl Pager {
    pub fn push(&self, page_out: PageOut) {
        self.written.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(page_out);
        self.waiting.store(true, Ordering::Release);
    }

    /// A transient record was not written: its body stays in memory (counted at `apply`).
    pub fn push_failure(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.waiting.store(true, Ordering::Release);
    }

    /// Applies every page-out waiting (under the model lock).
    pub fn apply(&self, model: &mut BrokerModel) {
        if !self.waiting.swap(false, Ordering::AcqRel) {
            return;
        }
        for _ in 0..self.failed.swap(0, Ordering::Relaxed) {
            model.count_transient_page_out_failure();
        }
        let written = std::mem::take(&mut *self.written.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        for page_out in written {
            model.page_out(&page_out.vhost, &page_out.queue, page_out.entry_id, page_out.store_seq, page_out.paged);
        }
    }
}

/// Where a paged body's record is, for the store.
pub(crate) fn paged_location(paged: &PagedBody) -> (LogId, MessageLocation) {
    (
        LogId(paged.store_log),
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

/// Where a delivery's body comes from.
#[derive(Debug)]
pub(crate) enum DeliveryBody {
    /// The message's own bytes, in memory.
    Resident(bytes::Bytes),
    /// A read of the message's record (its body was paged out).
    Paged(PagedRead),
}

/// A paged body to read back for a delivery, decided when the delivery was queued.
#[derive(Debug)]
pub(crate) struct PagedRead {
    store: Store,
    /// Where a fatal store failure met by the removal is reported (the broker stops).
    fatal: Arc<watch::Sender<Option<String>>>,
    paged: PagedBody,
    /// A no-ack delivery left the model when it was dispatched: its record is removed once read
    /// (or once it is certain it will never be read).
    remove_after_read: Option<StoredAt>,
}

/// Why a paged body could not be read.
#[derive(Debug)]
pub(crate) enum PagedReadFailure {
    /// The queue was deleted meanwhile, its records with it: there is nothing to send.
    QueueGone,
    /// The record is unreadable (damage, a failing disk): the connection must close, so its
    /// unacknowledged deliveries are requeued, rather than a message be sent without its body.
    Unreadable(StoreError),
}

/// Where a delivery's body comes from; for a paged no-ack delivery the model said its record is
/// removed once read (`Delivery::remove_record_after_read`), and the read carries that out.
pub(crate) fn delivery_body(
    store: &Store,
    fatal: &Arc<watch::Sender<Option<String>>>,
    delivery: &Delivery,
) -> DeliveryBody {
    match &delivery.message.body {
        Body::Resident { bytes, .. } => DeliveryBody::Resident(bytes.clone()),
        Body::Paged(paged) => DeliveryBody::Paged(PagedRead {
            store: store.clone(),
            fatal: Arc::clone(fatal),
            paged: *paged,
            remove_after_read: delivery.store.filter(|_| delivery.remove_record_after_read),
        }),
    }
}

impl DeliveryBody {
    /// The delivery will never be written (its connection is gone or failed): a paged no-ack
    /// delivery's record is removed as it would have been once sent (no-ack is at most once).
    pub fn drop_unsent(self) {
        if let DeliveryBody::Paged(read) = self {
            read.remove_record();
        }
    }
}

impl PagedRead {
    /// Reads the body (one `pread`, normally from the page cache), then makes the removal that
    /// was waiting for the read.
    pub fn read(self) -> Result<bytes::Bytes, PagedReadFailure> {
        match read_paged_body(&self.store, &self.paged) {
            Ok(body) => {
                self.remove_record();
                Ok(body)
            }
            Err(StoreError::UnknownLog(queue)) if !self.store.has_log(LogId(queue)) => Err(PagedReadFailure::QueueGone),
            Err(error) => Err(PagedReadFailure::Unreadable(error)),
        }
    }

    /// Whether the message already left the model (a no-ack delivery).
    pub fn left_the_model(&self) -> bool {
        self.remove_after_read.is_some()
    }

    fn remove_record(&self) {
        if let Some(StoredAt { log, seq }) = self.remove_after_read {
            match self.store.remove_unawaited(LogId(log), seq) {
                Ok(()) | Err(StoreError::UnknownLog(_)) => {}
                Err(error) => crate::core::store_failed(&self.fatal, &error),
            }
        }
    }
}

impl Core {
    /// Creates the transient logs queues asked for (see `Placed::transient_logs_wanted`): each
    /// log is created, then recorded as transient in the definitions log, and only then given to
    /// its queue, so no transient record is ever written to a log the next start could take for
    /// an orphan (a crash before the record leaves an empty log, which recovery deletes). A
    /// queue gone meanwhile gets none: the log is forgotten again. Blocking (store and
    /// definitions-log round trips): call it without the model lock, off the async workers. On a
    /// failure the queue keeps its bodies in memory (it asks once per queue: the memory alarm
    /// still bounds what it holds).
    pub fn create_transient_logs(&self, wanted: Vec<(String, String, u64)>) {
        for (vhost, queue, incarnation) in wanted {
            let log = match self.store.create_log().and_then(|ticket| ticket.wait()) {
                Ok(log) => log.0,
                Err(error) => {
                    tracing::error!(%vhost, %queue, %error, "could not create a transient log; the queue keeps its bodies in memory");
                    self.store_failed(&error);
                    continue;
                }
            };
            let key = definition_format::transient_log_key(&vhost, log);
            if let Err(error) = self.meta.put(&key, &definition_format::encode_transient_log(&queue, log)) {
                tracing::error!(%vhost, %queue, %error, "could not record a transient log; the queue keeps its bodies in memory");
                self.store_failed(&error);
                let _ = self.store.delete_log(LogId(log));
                continue;
            }
            let attached = self.lock_model().attach_transient_log(&vhost, &queue, incarnation, log);
            if attached {
                tracing::debug!(%vhost, %queue, store_log = log, "transient log created");
            } else {
                self.forget_transient_logs(&[(vhost, log)]);
            }
        }
    }

    /// Deletes transient logs (of deleted queues) with their contents, then their records in the
    /// definitions log: a crash in between leaves a record naming a deleted log, which the next
    /// start drops. Blocking.
    pub fn forget_transient_logs(&self, logs: &[(String, u64)]) {
        for (vhost, log) in logs {
            match self.store.delete_log(LogId(*log)).and_then(|ticket| ticket.wait()) {
                Ok(()) | Err(StoreError::UnknownLog(_)) => {}
                Err(error) => {
                    // The record stays, so the next start deletes the log.
                    tracing::error!(store_log = log, %error, "could not delete a transient log");
                    self.store_failed(&error);
                    continue;
                }
            }
            if let Err(error) = self.meta.delete(&definition_format::transient_log_key(vhost, *log)) {
                tracing::error!(store_log = log, %error, "could not remove a transient log's record");
                self.store_failed(&error);
            }
        }
    }
}
