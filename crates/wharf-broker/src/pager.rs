//! Paging: dropping the bodies of a durable queue's backlog from memory once their records are
//! written, and reading them back from the store to deliver or move them.
//!
//! A paged delivery's read is decided under the model lock, when the delivery is queued to its
//! connection ([`delivery_body`]): which record, and (as the model said) whether the record is
//! removed once read. The connection's writer carries the read out ([`PagedRead::read`]) on its
//! own task, so the model lock is never held for a `pread`.

use std::sync::atomic::{AtomicBool, Ordering};
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

    /// Applies every page-out waiting (under the model lock).
    pub fn apply(&self, model: &mut BrokerModel) {
        if !self.waiting.swap(false, Ordering::AcqRel) {
            return;
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
