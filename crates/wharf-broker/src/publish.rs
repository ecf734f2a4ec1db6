//! Publishing: the only path by which a message reaches the store. Routing a publish (delayed
//! exchanges included), admitting it to each queue, appending persistent copies, enqueueing them,
//! and what the publisher waits on ([`Durable`]) before its confirm; also transfers (dead letters
//! and due delayed messages), which put copies into queues the same way.

use crate::confirms::Durable;
use crate::core::{Core, blocking};
use crate::definitions::QueueRequest;
use crate::outbound::Outbound;
use crate::pager::PageOut;
use crate::persist;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use wharf_model::broker::DIRECT_REPLY_TO_PREFIX;
use wharf_model::{
    Admission, AutoDeadLetterQueue, BrokerModel, ConnectionId, Effects, Message, ModelError, Transfer, TransferTarget,
};
use wharf_model::{ExchangeKind, PagedBody};
use wharf_store::{AppendReceipt, LogId, SpaceReservation, Store, StoreError, Ticket};

/// Reply code and text of a `basic.return` for an unroutable mandatory message.
const NO_ROUTE: (u16, &str) = (312, "NO_ROUTE");

/// A publish from a client, as the channel received it.
#[derive(Debug)]
pub(crate) struct PublishRequest<'a> {
    pub vhost: &'a str,
    pub channel: u16,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub mandatory: bool,
}

/// A de-duplication key to record in a key log once the copies it admitted are durable.
#[derive(Debug)]
pub(crate) struct DedupRecord {
    /// The key log (a queue's or an exchange's).
    pub log: u64,
    pub key: Vec<u8>,
    /// Its space, taken with the copies' (so a full disk cannot fail the record once the
    /// message is in its queues and the publisher waits for it).
    pub reservation: Option<SpaceReservation>,
}

/// The size of a de-duplication key's record in its key log.
fn key_record_bytes(key: &[u8]) -> u64 {
    Store::record_bytes(persist::dedup_key_meta().len(), key.len())
}

/// Space a transaction took for its publishes before applying any (see `session/tx.rs`); a
/// copy takes its reservation from here first.
#[derive(Debug, Default)]
pub(crate) struct ReservationPool(pub Vec<SpaceReservation>);

impl ReservationPool {
    fn take(&mut self, log: LogId, record_bytes: u64) -> Option<SpaceReservation> {
        let index = self.0.iter().position(|held| held.log() == log && held.record_bytes() >= record_bytes)?;
        Some(self.0.swap_remove(index))
    }
}

/// A queue that admitted a message: what storing its copy takes.
struct Copy<'a> {
    queue: &'a String,
    dedup_key: Option<Vec<u8>>,
    /// The queue's message log, when the copy is stored.
    store_log: Option<u64>,
    /// The queue's key log, when the copy is stored and de-duplicated.
    key_log: Option<u64>,
    /// The queue's transient log, when the copy is transient and the queue is over its memory
    /// bound: the body is written there and dropped from memory (see [`Core::append_transient`]).
    transient_log: Option<u64>,
    page_out: Option<PageOutTarget>,
}

/// What a publish produced, for its confirm.
#[derive(Debug)]
pub(crate) struct Published {
    /// What to wait on before the publish counts as durable.
    pub durable: Vec<Durable>,
    /// The publisher gets a nack: a store append failed, or a queue refused the message
    /// (`x-overflow` reject-publish).
    pub nack: bool,
    /// The store could not take the message (the cause of a nack that a transaction, which has
    /// no nacks, must report otherwise).
    pub failed: bool,
    /// The `basic.return` of an unroutable mandatory publish.
    pub returned: Option<Outbound>,
}

/// What putting one message into queues produced.
#[derive(Debug, Default)]
pub(crate) struct Placed {
    /// Store appends of the copies.
    pub tickets: Vec<Ticket<AppendReceipt>>,
    /// Copies enqueued into quorum queues: each done once its group committed it.
    pub replicated: Vec<crate::confirms::ReplicatedEnqueue>,
    /// De-duplication keys to record (log, key) once the copies are durable.
    pub dedup_records: Vec<DedupRecord>,
    /// A queue refused it (`x-overflow` reject-publish): the publisher gets a nack.
    pub refused: bool,
    /// A queue (or the exchange) dropped it as a duplicate: the confirm waits until what the
    /// store holds is durable, so a duplicate is never confirmed before its original.
    pub duplicate: bool,
    /// A store append failed: the publisher gets a nack.
    pub failed: bool,
    /// Effects to carry out once the model lock is released.
    pub later: Vec<Effects>,
    /// Queues over their memory bound that need a transient log: (vhost, queue, incarnation).
    /// Created once the model lock is released ([`Core::create_transient_logs`]).
    pub transient_logs_wanted: Vec<(String, String, u64)>,
}

impl Core {
    /// Puts a message into queues: for each durable queue, a persistent copy is appended to the
    /// store. For a publish (`from_publisher`), each queue admits it first: a de-duplicating
    /// queue that saw its key skips it, a queue whose `x-overflow` refuses publishes beyond its
    /// limits refuses it; the key is remembered only once the message is in. Then the space for
    /// every stored copy (and key record) is taken, all or nothing, before any copy goes in: a
    /// message the store cannot take whole goes nowhere and its publisher is nacked, since a copy
    /// delivered from one queue could not be taken back. Deliveries go out under the lock.
    /// `pool` holds space a transaction took ahead.
    #[allow(clippy::too_many_arguments)]
    pub fn place(
        &self,
        model: &mut BrokerModel,
        vhost: &str,
        queues: &[String],
        message: &Arc<Message>,
        from_publisher: bool,
        placed: &mut Placed,
        pool: &mut ReservationPool,
    ) {
        let Some(body) = message.bytes_in_memory() else {
            // Callers read a paged body back first (`transfer`); storing the empty body would
            // lose the message.
            tracing::error!(vhost, "a message without its body in memory cannot be placed");
            placed.failed = true;
            return;
        };
        let mut copies = Vec::with_capacity(queues.len());
        let mut replicated_meta = None;
        for queue_name in queues {
            // A quorum queue's copy goes to its group, which decides admission (length limits)
            // and holds the message; the model's queue holds none (`cluster/quorum.rs`).
            if let Some(queue) =
                model.vhost(vhost).and_then(|found| found.queue(queue_name)).filter(|queue| queue.replicated)
            {
                // A classic queue homed on another node: the home admits and stores it, and
                // answers once it is durable there (`cluster/homed_link.rs`).
                if let Some(home) = self.remote_home(vhost, queue_name) {
                    let meta = replicated_meta.get_or_insert_with(|| persist::encode_message_meta(message));
                    placed.replicated.push(self.publish_to_home(home, vhost, queue_name, from_publisher, meta, body));
                    continue;
                }
                // Its expiry and de-duplication time are stamped here, by this node's clock: every
                // replica then agrees. A dead letter is not de-duplicated (as a classic queue's).
                let now_ms = self.clock.now_ms();
                let expires_at_ms = queue.ttl_ms_for(message).map(|ttl_ms| now_ms.saturating_add(ttl_ms));
                let dedup_key = if from_publisher { queue.dedup_key_of(message) } else { None };
                let meta = replicated_meta.get_or_insert_with(|| persist::encode_message_meta(message));
                let order_key = queue.order_key_of(message);
                let enqueue =
                    crate::cluster::ReplicatedEnqueue { meta, body, expires_at_ms, dedup_key, now_ms, order_key };
                placed.replicated.push(self.enqueue_replicated(vhost, queue_name, enqueue));
                continue;
            }
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
            let store_log = queue.store_log.filter(|_| stored);
            let over_bound = queue.resident_bytes() >= self.config.queue_body_memory_bytes_max;
            // A transient copy beyond the bound goes to the queue's transient log; the first one
            // to find none asks for it (this copy, and those until it exists, stay in memory).
            let transient_log = queue.transient_log.filter(|_| over_bound && !stored);
            let wants_transient_log = over_bound && !stored && queue.transient_log.is_none();
            // `next_entry_id` is the id `enqueue` below gives it (same lock, each queue once).
            let page_out = store_log.or(transient_log).filter(|_| over_bound).map(|_| PageOutTarget {
                vhost: vhost.to_owned(),
                queue: queue_name.clone(),
                entry_id: queue.next_entry_id(message),
            });
            let key_log = queue.dedup_log.filter(|_| stored && dedup_key.is_some());
            if wants_transient_log && let Some(incarnation) = model.wants_transient_log(vhost, queue_name) {
                placed.transient_logs_wanted.push((vhost.to_owned(), queue_name.clone(), incarnation));
            }
            copies.push(Copy { queue: queue_name, dedup_key, store_log, key_log, transient_log, page_out });
        }
        let meta = copies
            .iter()
            .any(|copy| copy.store_log.is_some() || copy.transient_log.is_some())
            .then(|| persist::encode_message_meta(message));
        let record_bytes = Store::record_bytes(meta.as_ref().map_or(0, Vec::len), body.len());
        let mut wanted = Vec::new();
        let mut held = Vec::new();
        for copy in &copies {
            let records = [
                copy.store_log.map(|log| (LogId(log), record_bytes)),
                copy.key_log.zip(copy.dedup_key.as_ref()).map(|(log, key)| (LogId(log), key_record_bytes(key))),
            ];
            for (log, bytes) in records.into_iter().flatten() {
                match pool.take(log, bytes) {
                    Some(reservation) => held.push(Some(reservation)),
                    None => {
                        wanted.push((log, bytes));
                        held.push(None);
                    }
                }
            }
        }
        let mut fresh = match self.store.reserve(&wanted) {
            Ok(fresh) => fresh.into_iter(),
            Err(error) => {
                self.store_failed(&error);
                placed.failed = true;
                return;
            }
        };
        let mut reservations = held.into_iter().map(|reservation| reservation.or_else(|| fresh.next()));
        for copy in copies {
            let mut store_seq = None;
            let mut transient_record = false;
            if let (Some(log), Some(meta)) = (copy.store_log, &meta) {
                let reservation = reservations.next().flatten();
                match self.append_copy(log, message, meta, reservation, copy.page_out, placed) {
                    Some(seq) => store_seq = Some(seq),
                    None => continue,
                }
            } else if let (Some(log), Some(meta), Some(target)) = (copy.transient_log, &meta, copy.page_out) {
                store_seq = self.append_transient(model, log, message, meta, target);
                transient_record = store_seq.is_some();
            }
            if let Some(key) = copy.dedup_key {
                model.remember_key(vhost, copy.queue, &key);
                if let Some(log) = copy.key_log {
                    let reservation = reservations.next().flatten();
                    placed.dedup_records.push(DedupRecord { log, key, reservation });
                }
            }
            let mut effects = model.enqueue_stored(vhost, copy.queue, Arc::clone(message), store_seq, transient_record);
            self.send(&mut effects);
            placed.later.push(effects);
        }
    }

    /// Appends one persistent copy of `message` to a store log (a queue's, or a delayed-message
    /// exchange's), into `reservation` when it has one; its ticket joins `placed`. With
    /// `page_out`, the copy's body is dropped from memory once its record is written (see
    /// `Pager`). On a store failure the publisher gets a nack, and `None` is returned.
    fn append_copy(
        &self,
        log: u64,
        message: &Message,
        meta: &[u8],
        reservation: Option<SpaceReservation>,
        page_out: Option<PageOutTarget>,
        placed: &mut Placed,
    ) -> Option<u64> {
        let Some(body) = message.bytes_in_memory() else {
            // `place` and `publish` only store messages whose body is in memory.
            tracing::error!(log, "a message without its body in memory cannot be stored");
            placed.failed = true;
            return None;
        };
        let now_ms = self.now_ms();
        let observer = page_out.map(|target| self.page_out_observer(log, message.body_bytes(), target));
        let appended = match (reservation, observer) {
            (Some(reservation), observer) => self.store.append_reserved(reservation, now_ms, meta, body, observer),
            (None, Some(observer)) => self.store.append_observed(LogId(log), now_ms, meta, body, observer),
            (None, None) => self.store.append(LogId(log), now_ms, meta, body),
        };
        match appended {
            Ok(pending) => {
                placed.tickets.push(pending.ticket);
                Some(pending.seq)
            }
            Err(error) => {
                self.store_failed(&error);
                placed.failed = true;
                None
            }
        }
    }

    /// What drops a body from memory once its record in `log` is written (see `Pager`). For a
    /// transient record that could not be written, the body stays in memory and is counted.
    fn page_out_observer(
        &self,
        log: u64,
        body_bytes: u64,
        target: PageOutTarget,
    ) -> wharf_store::Observer<AppendReceipt> {
        let pager = Arc::clone(&self.pager);
        Box::new(move |result| match result {
            Ok(receipt) => {
                let location = receipt.location;
                pager.push(PageOut {
                    vhost: target.vhost,
                    queue: target.queue,
                    entry_id: target.entry_id,
                    store_seq: receipt.seq,
                    paged: PagedBody {
                        store_log: log,
                        segment_id: location.segment_id,
                        offset: location.offset,
                        record_bytes: location.record_bytes,
                        body_bytes,
                    },
                });
            }
            Err(_) => pager.push_failure(),
        })
    }

    /// Writes a transient copy's body to its queue's transient log, to be dropped from memory
    /// once written. Nothing waits on the record (no confirm: a transient message promises
    /// nothing across a crash, and the log is deleted at the next start), and it takes no
    /// reservation. A record the store refuses (a full disk, a body over the store's limit)
    /// leaves the body in memory, counted and logged, rather than nacking the publish: memory
    /// stays guarded by the memory alarm, which counts it, and a full spill disk does not turn
    /// into refused transient traffic. Returns the record's seq if it was taken.
    fn append_transient(
        &self,
        model: &mut BrokerModel,
        log: u64,
        message: &Message,
        meta: &[u8],
        target: PageOutTarget,
    ) -> Option<u64> {
        let body = message.bytes_in_memory()?;
        let observer = self.page_out_observer(log, message.body_bytes(), target);
        match self.store.append_observed(LogId(log), self.now_ms(), meta, body, observer) {
            // Dropping the ticket leaves the append to complete on its own.
            Ok(pending) => Some(pending.seq),
            Err(error) => {
                model.count_transient_page_out_failure();
                let failures = model.counters().transient_page_out_failures;
                // Logged at the 1st, 2nd, 4th, ... failure: a full disk must not flood the log.
                if failures.is_power_of_two() {
                    tracing::warn!(store_log = log, failures, %error, "a transient message over its queue's memory bound could not be paged out; kept in memory");
                }
                self.store_failed(&error);
                None
            }
        }
    }

    /// What the publisher (or a transfer) waits on: the appends; when de-duplication keys were
    /// admitted, a chain that appends each key only after every copy is durable (so a key that
    /// survives a crash always stands for a message that survived it) and resolves once the keys
    /// are durable too.
    pub fn durable(&self, placed: &mut Placed) -> Vec<Durable> {
        let tickets = std::mem::take(&mut placed.tickets);
        let records = std::mem::take(&mut placed.dedup_records);
        let mut barrier: Vec<Durable> = placed.replicated.drain(..).map(Durable::Replicated).collect();
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
        let clock = Arc::clone(&self.clock);
        tokio::spawn(async move {
            for ticket in tickets {
                if let Err(error) = ticket.await {
                    let _ = sender.send(Err(error));
                    return;
                }
            }
            let seen_ms = clock.now_ms();
            let mut pending = Vec::new();
            for DedupRecord { log, key, reservation } in records {
                let meta = persist::dedup_key_meta();
                let appended = blocking(|| match reservation {
                    Some(reservation) => store.append_reserved(reservation, seen_ms, &meta, &key, None),
                    None => store.append(LogId(log), seen_ms, &meta, &key),
                });
                match appended {
                    Ok(append) => {
                        logs.record(log, seen_ms, append.seq);
                        pending.push(append.ticket);
                    }
                    // The queue was deleted meanwhile: its keys went with it.
                    Err(StoreError::UnknownLog(_)) => {}
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
            if let Some(paged) = transfer.message.paged() {
                // The source's record is live until the copies are durable, so it can be read.
                match crate::pager::read_paged_body(&self.store, &paged) {
                    Ok(body) => transfer = transfer.with_body(body),
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
                let mut model = self.lock_model();
                let pool = &mut ReservationPool::default();
                self.place(&mut model, &transfer.vhost, &targets, &transfer.message, false, &mut placed, pool);
            }
            self.create_transient_logs(std::mem::take(&mut placed.transient_logs_wanted));
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
                    let pending = self.transfer_removals.start();
                    tokio::spawn(async move {
                        let _pending = pending;
                        for copy in durable {
                            if copy.wait().await.is_err() {
                                return;
                            }
                        }
                        if let Some(stored) = source.stored {
                            match store.remove_unawaited(LogId(stored.log), stored.seq) {
                                Ok(()) | Err(StoreError::UnknownLog(_)) => {}
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
        let model = self.lock_model();
        let Some(vhost) = model.vhost(&transfer.vhost) else { return (Vec::new(), None) };
        let auto_queue = |auto: &AutoDeadLetterQueue| match vhost.queue(&auto.name) {
            Some(_) => (vec![auto.name.clone()], None),
            None => (Vec::new(), Some(auto.clone())),
        };
        match &transfer.target {
            TransferTarget::Exchange { exchange, routing_keys, fallback } => {
                let mut queues: BTreeSet<String> = BTreeSet::new();
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
            grant: None,
        };
        match self.declare_queue(request) {
            Ok(_) => Ok(()),
            // Declared meanwhile, by someone else, with other arguments: use it as it is.
            Err(_) if self.lock_model().vhost(vhost).is_some_and(|found| found.queue(&auto.name).is_some()) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Routes a client's publish and puts it in every queue it reaches, appending it to the store
    /// for each durable queue when it is persistent. A publish to a de-duplicating exchange whose
    /// key was seen goes nowhere (and is confirmed); one to a delayed-message exchange with a
    /// positive `x-delay` is held (in the exchange's log when durable) until it is due.
    /// `pool` holds space a transaction took ahead for its publishes (empty otherwise).
    pub fn publish(
        &self,
        request: &PublishRequest<'_>,
        message: Message,
        pool: &mut ReservationPool,
    ) -> Result<Published, ModelError> {
        let message = Arc::new(message);
        let vhost_name = request.vhost;
        let exchange_name = request.exchange;
        let mut placed = Placed::default();
        let mut model = self.lock_model();
        if exchange_name.is_empty() && request.routing_key.starts_with(DIRECT_REPLY_TO_PREFIX) {
            // A direct reply: straight to its reply consumer, nothing stored (so nothing for a
            // confirm to wait on); unroutable if that consumer is gone.
            let delivered = model.deliver_reply(vhost_name, request.routing_key, Arc::clone(&message));
            model.count_publish(delivered.is_some(), request.mandatory);
            let returned = match delivered {
                Some(mut effects) => {
                    self.send(&mut effects);
                    None
                }
                None => request.mandatory.then(|| Outbound::Return {
                    channel: request.channel,
                    reply_code: NO_ROUTE.0,
                    reply_text: NO_ROUTE.1,
                    message,
                }),
            };
            return Ok(Published { durable: Vec::new(), nack: false, failed: false, returned });
        }
        let vhost = model.vhost(vhost_name).ok_or_else(|| ModelError::not_allowed("vhost no longer exists"))?;
        let queues = vhost.route(exchange_name, request.routing_key, message.headers())?;
        // Sender-selected distribution: BCC routes (above) but no recipient sees it.
        let message = match message.headers() {
            Some(headers) if headers.contains_key("BCC") => {
                let mut properties = message.full_properties().into_owned();
                if let Some(headers) = properties.headers().clone() {
                    let mut kept = wharf_wire::types::FieldTable::default();
                    for (name, value) in headers.inner().iter().filter(|(name, _)| name.as_str() != "BCC") {
                        kept.insert(name.clone(), value.clone());
                    }
                    properties = properties.with_headers(kept);
                }
                Arc::new(message.with_properties(properties))
            }
            _ => message,
        };
        let exchange = vhost.exchange(exchange_name).map(|exchange| ExchangeLogs {
            durable: exchange.durable,
            delayed_log: exchange.store_log,
            dedup_log: exchange.dedup_log,
            kind: exchange.kind,
        });
        let stored = |durable: bool| durable && message.persistent();
        let held_delayed =
            exchange.is_some_and(|logs| logs.kind == ExchangeKind::DelayedMessage) && message.delay_ms().is_some();
        model.count_publish(!queues.is_empty() || held_delayed, request.mandatory);
        let exchange_key = match model.admit_to_exchange(vhost_name, exchange_name, &message) {
            Admission::Duplicate => {
                placed.duplicate = true;
                drop(model);
                let durable = self.durable(&mut placed);
                return Ok(Published { durable, nack: placed.failed, failed: placed.failed, returned: None });
            }
            Admission::Accept { dedup_key } => dedup_key,
            Admission::Refused { .. } => None,
        };
        // The exchange remembers a key only once the publish went through whole; its key
        // record goes to the exchange's log (after the copies are durable), in space taken now,
        // before any copy goes in, so that a full disk cannot fail it after the message did.
        let key_log = exchange.filter(|logs| stored(logs.durable)).and_then(|logs| logs.dedup_log);
        let mut key_reservation = None;
        if let (Some(log), Some(key)) = (key_log, &exchange_key) {
            let bytes = key_record_bytes(key);
            key_reservation = match pool.take(LogId(log), bytes) {
                Some(reservation) => Some(reservation),
                None => match self.store.reserve(&[(LogId(log), bytes)]) {
                    Ok(mut held) => held.pop(),
                    Err(error) => {
                        self.store_failed(&error);
                        return Ok(Published { durable: Vec::new(), nack: true, failed: true, returned: None });
                    }
                },
            };
        }
        let remember = |model: &mut BrokerModel, placed: &mut Placed, reservation: Option<SpaceReservation>| {
            if let Some(key) = &exchange_key {
                model.remember_exchange_key(vhost_name, exchange_name, key);
                if let Some(log) = key_log {
                    placed.dedup_records.push(DedupRecord { log, key: key.clone(), reservation });
                }
            }
        };
        let delay = exchange.filter(|logs| logs.kind == ExchangeKind::DelayedMessage).and_then(|_| message.delay_ms());
        if let (Some(delay_ms), Some(logs)) = (delay, exchange) {
            let mut store_seq = None;
            if let Some(log) = logs.delayed_log.filter(|_| stored(logs.durable)) {
                let meta = persist::encode_message_meta(&message);
                match self.append_copy(log, &message, &meta, None, None, &mut placed) {
                    Some(seq) => store_seq = Some(seq),
                    None => return Ok(Published { durable: Vec::new(), nack: true, failed: true, returned: None }),
                }
            }
            remember(&mut model, &mut placed, key_reservation);
            let due_ms = model.now_ms().saturating_add(delay_ms);
            model.hold_delayed(vhost_name, exchange_name, Arc::clone(&message), store_seq, due_ms);
            drop(model);
            let durable = self.durable(&mut placed);
            return Ok(Published { durable, nack: placed.failed, failed: placed.failed, returned: None });
        }
        self.place(&mut model, vhost_name, &queues, &message, true, &mut placed, pool);
        // Remembered only if the publish reached a queue and went through whole: a message
        // that was returned unroutable (or refused) must not make its retry a "duplicate".
        if !queues.is_empty() && !placed.refused && !placed.failed {
            remember(&mut model, &mut placed, key_reservation);
        }
        drop(model);
        for effects in std::mem::take(&mut placed.later) {
            self.apply(effects);
        }
        if !placed.transient_logs_wanted.is_empty() {
            let wanted = std::mem::take(&mut placed.transient_logs_wanted);
            blocking(|| self.create_transient_logs(wanted));
        }
        let returned = (queues.is_empty() && request.mandatory).then(|| Outbound::Return {
            channel: request.channel,
            reply_code: NO_ROUTE.0,
            reply_text: NO_ROUTE.1,
            message: Arc::clone(&message),
        });
        let durable = self.durable(&mut placed);
        Ok(Published { durable, nack: placed.failed || placed.refused, failed: placed.failed, returned })
    }
}

/// The queue entry whose body is dropped once its record is written.
#[derive(Debug)]
struct PageOutTarget {
    vhost: String,
    queue: String,
    entry_id: u64,
}

/// What routing needs to know of the exchange a publish names.
#[derive(Debug, Clone, Copy)]
struct ExchangeLogs {
    durable: bool,
    /// A delayed-message exchange's log of waiting messages.
    delayed_log: Option<u64>,
    /// A de-duplicating exchange's log of seen keys.
    dedup_log: Option<u64>,
    kind: ExchangeKind,
}
