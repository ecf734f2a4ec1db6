//! [`Core`]: the state every connection shares (the broker model behind one lock, the store, the
//! definitions log, the registry of connections), and carrying out the model's [`Effects`]:
//! deliveries and server cancels to connections, removals to the store, transfers, forgetting
//! deleted definitions. Recovery, publishing, definitions, confirms and paging are modules of
//! their own that extend `Core`.
//!
//! The model lock is a `std::sync::Mutex` held only for short, non-blocking work (never across an
//! `.await`): routing, enqueueing and dispatching are in-memory; store appends only queue work for
//! the store's writer thread.
//!
//! The runtime must be tokio's multi-threaded one (`Broker::start` refuses another): work that
//! may block (definition writes, waiting for a store log to be created) runs through
//! [`blocking`], which hands the worker's other tasks to another worker first.

use crate::alarms::{AlarmState, Alarms};
use crate::clock::Clock;
use crate::config::BrokerConfig;
use crate::dedup_logs::DedupLogs;
use crate::identities::Identities;
use crate::limits::Limits;
use crate::login_throttle::LoginThrottle;
use crate::outbound::{Connections, Outbound, OutboundDelivery};
use crate::pager::{self, Pager};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;
use wharf_model::{
    BrokerModel, CancelledConsumer, ChannelKey, ConnectionId, DeletedExchange, Delivery, Effects, Removed, StoredAt,
};
use wharf_store::{LogId, MetaStore, Store, StoreError, Ticket};

/// The shared state.
#[derive(Debug)]
pub(crate) struct Core {
    pub config: BrokerConfig,
    /// Where time comes from (the configuration's clock): the model is told the time from it
    /// whenever it is locked, and stored timestamps are taken from it.
    pub clock: Arc<dyn Clock>,
    model: Mutex<BrokerModel>,
    pub store: Store,
    pub meta: MetaStore,
    /// The open connections deliveries are sent to.
    pub connections: Connections,
    /// Held across a definition change in the model and its write to the definitions log, so
    /// the log always describes what the model holds (no declare-ok before the definition is
    /// durable; no binding written after its queue was forgotten).
    definitions: Mutex<()>,
    /// Set when the store reports a fatal error: the broker must stop.
    pub fatal: Arc<watch::Sender<Option<String>>>,
    /// De-duplication key logs: their window and the records to remove once it has passed.
    pub dedup_logs: Arc<DedupLogs>,
    /// Bodies to drop from memory now that their records are written.
    pub pager: Arc<Pager>,
    /// Failed logins by source address (refused for a while after too many).
    pub login_throttle: LoginThrottle,
    /// Who may log in and do what: the configuration's users and permissions over those the
    /// management API stored, compiled.
    pub access: Identities,
    /// Vhost and user limits, and the counts against them.
    pub limits: Arc<Limits>,
    /// The memory and disk alarms.
    pub alarms: Alarms,
    /// What was opened, declared and deleted since start (for metrics).
    pub churn: Churn,
    /// MQTT client ids in use, for taking a session over.
    pub mqtt_clients: crate::mqtt::Clients,
    /// MQTT retained messages (kept in the definitions log).
    pub mqtt_retained: crate::mqtt::Retained,
    /// What persistent MQTT sessions keep besides their queues (in the definitions log).
    pub mqtt_sessions: crate::mqtt::Sessions,
    /// Dead-letter transfers whose original still waits for its copies to be durable before it
    /// is removed: shutdown waits for them, so a clean stop never leaves an original behind to
    /// be dead-lettered a second time after the restart.
    pub transfer_removals: Arc<PendingWork>,
    /// A cluster's node: the metadata group's Raft log until the group starts with it.
    pub metadata_log: Mutex<Option<wharf_raft::GroupLog>>,
    /// A cluster's node: the metadata group, once it runs (`cluster/`); definition changes go
    /// through it from then on.
    pub metadata: Arc<std::sync::OnceLock<Arc<crate::cluster::MetaGroup>>>,
    /// A cluster's node: its links and the Raft groups they carry, once they are up.
    pub cluster_links: std::sync::OnceLock<(Arc<wharf_cluster::Transport>, wharf_raft::Groups)>,
    /// A cluster's node: its quorum queues' groups.
    pub quorum: crate::cluster::QuorumQueues,
    /// A cluster's node: the durable classic queues and their home nodes (`cluster/homed.rs`).
    pub homed: crate::cluster::HomedQueues,
    /// A cluster's node: the traffic of homed queues with other nodes (`cluster/homed_link.rs`).
    pub homed_links: crate::cluster::HomedLinks,
    /// Quorum queues recovery found, whose groups start once the links are up.
    pub recovered_quorum: Mutex<Vec<crate::cluster::RecoveredQuorumQueue>>,
    /// This run of the broker among its restarts (a quorum queue's consumers carry it: connection
    /// ids start again at a restart).
    pub incarnation: u32,
}

/// A count of background work in flight that shutdown must wait for.
#[derive(Debug, Default)]
pub(crate) struct PendingWork {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One piece of [`PendingWork`]; done when dropped (however its task ends).
#[derive(Debug)]
pub(crate) struct PendingGuard(Arc<PendingWork>);

impl PendingWork {
    pub fn start(self: &Arc<Self>) -> PendingGuard {
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        PendingGuard(Arc::clone(self))
    }

    /// Returns once no work is in flight.
    pub async fn settled(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Counts of objects opened, declared and deleted since start; those closed are what was opened
/// less what is open now. Relaxed atomics, touched once per object, never per message.
#[derive(Debug, Default)]
pub(crate) struct Churn {
    pub connections_opened: std::sync::atomic::AtomicU64,
    pub channels_opened: std::sync::atomic::AtomicU64,
    pub queues_declared: std::sync::atomic::AtomicU64,
    pub queues_created: std::sync::atomic::AtomicU64,
    pub queues_deleted: std::sync::atomic::AtomicU64,
}

impl Churn {
    pub fn count(counter: &std::sync::atomic::AtomicU64, by: u64) {
        counter.fetch_add(by, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs work that may block (definition writes, store round trips) without stalling the other
/// tasks of the async worker it is called on: tokio moves them to another worker first. The one
/// bridge from async code to blocking work; it needs the multi-threaded runtime `Broker::start`
/// insists on (from a blocking thread it just runs the work).
pub(crate) fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// Reports a store failure that makes durability impossible on `fatal`: the broker stops. (The
/// free-standing form, for work that carries the sender instead of the whole `Core`.)
pub(crate) fn store_failed(fatal: &watch::Sender<Option<String>>, error: &StoreError) {
    if error.is_fatal() {
        tracing::error!(%error, "the store failed; stopping the broker");
        fatal.send_replace(Some(error.to_string()));
    }
}

/// A number for this run of the broker, different from the runs before it: the time it started
/// (seconds, wrapping) mixed with its process id.
fn incarnation() -> u32 {
    let seconds =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_millis());
    (seconds as u32) ^ std::process::id().rotate_left(16)
}

/// The state `Core::open` rebuilt, assembled into a `Core`.
#[derive(Debug)]
pub(crate) struct CoreParts {
    pub config: BrokerConfig,
    pub model: BrokerModel,
    pub store: Store,
    pub meta: MetaStore,
    pub dedup_logs: DedupLogs,
    /// Users and permissions the management API stored.
    pub identities: Vec<crate::identities::StoredIdentity>,
    /// MQTT QoS 2 markers found on queued messages (`mqtt/state.rs`).
    pub mqtt_flow_markers: crate::mqtt::state::FlowMarkers,
    /// A cluster's node: the metadata group's Raft log, as recovery found it.
    pub metadata_log: Option<wharf_raft::GroupLog>,
    /// Quorum queues recovery found.
    pub recovered_quorum: Vec<crate::cluster::RecoveredQuorumQueue>,
}

impl Core {
    pub fn new(parts: CoreParts) -> Core {
        let (fatal, _) = watch::channel(None);
        let fatal = Arc::new(fatal);
        let connections = Connections::new(
            parts.config.connections_max,
            parts.config.handshakes_max,
            parts.config.handshakes_per_address_max,
        );
        let access = Identities::new(
            parts.identities,
            &parts.config.users,
            &parts.config.permissions,
            &parts.config.topic_permissions,
        );
        let limits = Limits::new(&parts.config.vhost_limits, &parts.config.user_limits);
        let alarms = Alarms::new(
            parts.config.memory_high_watermark_bytes,
            parts.config.disk_free_limit_bytes(),
            Arc::clone(&parts.config.disk_space),
            parts.config.data_dir.clone(),
        );
        let stored = parts.meta.entries();
        let mqtt_retained = crate::mqtt::Retained::load(&stored);
        let mqtt_sessions = crate::mqtt::Sessions::load(
            &parts.meta,
            &stored,
            parts.config.clock.now_ms(),
            |vhost| parts.model.vhost(vhost).is_some(),
            &parts.mqtt_flow_markers,
        );
        let homed = crate::cluster::HomedQueues::from_meta(&parts.meta);
        Core {
            access,
            limits,
            alarms,
            clock: Arc::clone(&parts.config.clock),
            config: parts.config,
            model: Mutex::new(parts.model),
            store: parts.store,
            meta: parts.meta,
            connections,
            definitions: Mutex::new(()),
            fatal,
            dedup_logs: Arc::new(parts.dedup_logs),
            pager: Arc::default(),
            login_throttle: LoginThrottle::default(),
            churn: Churn::default(),
            mqtt_clients: crate::mqtt::Clients::default(),
            mqtt_retained,
            mqtt_sessions,
            transfer_removals: Arc::default(),
            metadata_log: Mutex::new(parts.metadata_log),
            metadata: Arc::default(),
            cluster_links: std::sync::OnceLock::new(),
            quorum: crate::cluster::QuorumQueues::default(),
            homed,
            homed_links: crate::cluster::HomedLinks::default(),
            recovered_quorum: Mutex::new(parts.recovered_quorum),
            incarnation: incarnation(),
        }
    }

    /// The metadata group, when this broker is a cluster's node and the group runs.
    pub fn metadata_group(&self) -> Option<&Arc<crate::cluster::MetaGroup>> {
        self.metadata.get()
    }

    /// Raises or clears the memory and disk alarms for what the broker holds now.
    pub fn check_alarms(&self) -> AlarmState {
        let held_bytes = self.lock_model().held_memory_bytes() + self.homed_links.queued_bytes();
        self.alarms.check(held_bytes)
    }

    /// The definitions lock (see the field). Take it before the model lock, never after.
    pub fn definitions(&self) -> MutexGuard<'_, ()> {
        self.definitions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Locks the model and brings it up to date: tells it the clock's time and applies the
    /// page-outs waiting (bodies whose records are now written). Never hold the guard across an
    /// `.await`.
    pub fn lock_model(&self) -> MutexGuard<'_, BrokerModel> {
        let mut model = self.model.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.pager.apply(&mut model);
        model.set_now(self.clock.now_ms());
        model
    }

    /// Reports a store failure that makes durability impossible: the broker stops.
    pub fn store_failed(&self, error: &StoreError) {
        store_failed(&self.fatal, error);
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
        let mut model = self.lock_model();
        let (value, mut effects) = operation(&mut model)?;
        self.send(&mut effects);
        drop(model);
        self.apply(effects);
        Ok(value)
    }

    /// Runs `operation` on a channel opened for it on `vhost` and closed after it, on a connection
    /// id of its own so that nothing of it stays in the model; carries out the effects of both,
    /// the close's also when the operation is refused. For work done for nobody's channel: the
    /// management API's deletes and purges, and a homed queue's on its home.
    pub fn on_scratch_channel<T>(
        &self,
        vhost: &str,
        operation: impl FnOnce(&mut BrokerModel, ChannelKey) -> wharf_model::Result<(T, Effects)>,
    ) -> wharf_model::Result<T> {
        let key = ChannelKey { connection: self.connections.allocate_id(), channel: 1 };
        self.act(|model| {
            model.open_channel(key, vhost)?;
            let outcome = operation(model, key);
            let closed = model.close_connection(key.connection);
            match outcome {
                Ok((value, mut effects)) => {
                    effects.merge(closed);
                    Ok((Ok(value), effects))
                }
                Err(error) => Ok((Err(error), closed)),
            }
        })?
    }

    /// Queues deliveries and server-side cancels to their connections (non-blocking). Call it
    /// while holding the model lock, so sends keep the model's order. Everything a delivery needs
    /// is decided here, before the writer gets it: its delivery count's ticket, and for a paged
    /// body the read (and for a no-ack one the removal after the read) the writer carries out.
    pub fn send(&self, effects: &mut Effects) {
        if !effects.replicated.is_empty() {
            self.propose_replicated(std::mem::take(&mut effects.replicated));
        }
        for delivery in effects.deliveries.drain(..) {
            let count_recorded = self.record_delivery(&delivery);
            let body = pager::delivery_body(&self.store, &self.fatal, &delivery);
            let connection = delivery.channel.connection;
            let outbound = OutboundDelivery { delivery, count_recorded, body };
            // A closed connection's channels are closed in the model right after; its unacked
            // deliveries are requeued there, so a failed send loses nothing. A paged no-ack
            // delivery that will never be read still has its record removed (it left the model).
            match self.connections.outbox(connection) {
                Some(outbox) => {
                    if let Err(unsent) = outbox.send(Outbound::Deliver(outbound))
                        && let Outbound::Deliver(unsent) = *unsent
                    {
                        unsent.body.drop_unsent();
                    }
                }
                None => outbound.body.drop_unsent(),
            }
        }
        for CancelledConsumer { channel: ChannelKey { connection, channel }, consumer_tag } in
            effects.cancelled.drain(..)
        {
            if let Some(outbox) = self.connections.outbox(connection) {
                let _ = outbox.send(Outbound::CancelConsumer { channel, consumer_tag });
            }
        }
    }

    /// Carries out what the model decided. Anything `send` has not already queued is queued now
    /// (only safe under the model lock; `act` sends first), then store removals, then transfers
    /// (dead letters, due delayed messages), then forgetting durable queues and exchanges the
    /// model deleted.
    pub fn apply(&self, mut effects: Effects) {
        self.send(&mut effects);
        if !effects.deleted_queues.is_empty() {
            Churn::count(&self.churn.queues_deleted, effects.deleted_queues.len() as u64);
        }
        for removed in &effects.removed {
            self.remove_stored(removed);
        }
        let transfers = std::mem::take(&mut effects.transfers);
        let transient_logs: Vec<(String, u64)> = effects
            .deleted_queues
            .iter()
            .filter_map(|deleted| deleted.transient_log.map(|log| (deleted.vhost.clone(), log)))
            .collect();
        if !transient_logs.is_empty() {
            blocking(|| self.forget_transient_logs(&transient_logs));
        }
        let durable_queues: Vec<_> = effects.deleted_queues.into_iter().filter(|deleted| deleted.durable).collect();
        for deleted in &durable_queues {
            self.homed_queue_gone_here(&deleted.vhost, &deleted.name);
        }
        let durable_exchanges: Vec<_> =
            effects.deleted_exchanges.into_iter().filter(|deleted| deleted.exchange.durable).collect();
        if !durable_queues.is_empty() || !durable_exchanges.is_empty() {
            blocking(|| {
                let _definitions = self.definitions();
                for deleted in durable_queues {
                    self.forget_queue(&deleted.vhost, &deleted.name, deleted.store_log, deleted.dedup_log);
                }
                for DeletedExchange { vhost, exchange } in durable_exchanges {
                    if let Err(error) = self.forget_exchange(&vhost, &exchange) {
                        tracing::error!(exchange = %exchange.name, %error, "could not remove an exchange definition");
                        self.store_failed(&error);
                    }
                }
            });
        }
        if !transfers.is_empty() {
            blocking(|| self.transfer(transfers));
        }
    }

    pub fn remove_stored(&self, removed: &Removed) {
        if let Some(stored) = removed.stored {
            self.remove_stored_record(stored);
        }
    }

    /// Records a message's removal in the store (a deleted queue's records went with it).
    pub fn remove_stored_record(&self, stored: StoredAt) {
        match self.store.remove_unawaited(LogId(stored.log), stored.seq) {
            Ok(()) | Err(StoreError::UnknownLog(_)) => {}
            Err(error) => self.store_failed(&error),
        }
    }

    /// Removes de-duplication key records whose window has passed (and the oldest beyond the
    /// bound) from the store.
    pub fn trim_dedup_logs(&self) {
        for (log, seq) in self.dedup_logs.take_expired(self.now_ms()) {
            match self.store.remove_unawaited(LogId(log), seq) {
                Ok(()) | Err(StoreError::UnknownLog(_)) => {}
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
        self.model.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).next_timer_ms()
    }

    /// What the model counted.
    pub fn counters(&self) -> wharf_model::Counters {
        self.lock_model().counters()
    }

    /// Records a delivery's count in the store (synced lazily, like removals; see
    /// `Recovered::clean_stop` for what a crash does). For a redelivery it returns the ticket that
    /// resolves once the count is written: the delivery waits for it, so after `kill -9` the count
    /// of any message a consumer saw again is on file. (A first delivery does not wait: it keeps
    /// the hot path free of store round trips, and losing its count costs at most one extra
    /// delivery.)
    pub fn record_delivery(&self, delivery: &Delivery) -> Option<Ticket<()>> {
        // A transient record is deleted at restart: its count would never be read.
        let StoredAt { log, seq } = delivery.store.filter(|_| !delivery.store_transient)?;
        let recorded = if delivery.delivery_count > 1 {
            self.store.set_delivery_count(LogId(log), seq, delivery.delivery_count).map(Some)
        } else {
            self.store.set_delivery_count_unawaited(LogId(log), seq, delivery.delivery_count).map(|()| None)
        };
        match recorded {
            Ok(ticket) => ticket,
            Err(StoreError::UnknownLog(_)) => None,
            Err(error) => {
                self.store_failed(&error);
                None
            }
        }
    }

    /// The clock's time, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// What a logged-in connection gives its messages for their delivery traces (its name, its
    /// client-provided one if it set one, and its user), and tells the model its name; `None`
    /// when traces are off.
    pub(crate) fn trace_origin(
        &self,
        id: ConnectionId,
        info: &crate::manage::ConnectionInfo,
    ) -> Option<Arc<wharf_model::trace::Provenance>> {
        if self.config.message_trace_events_max == 0 {
            return None;
        }
        let mut connection = info.client_provided_name().unwrap_or_else(|| info.name.clone());
        // Kept in every trace event that names it: cut as it is stored (255 bytes).
        if connection.len() > 255 {
            let mut end = 255;
            while !connection.is_char_boundary(end) {
                end -= 1;
            }
            connection.truncate(end);
        }
        self.lock_model().name_connection(id, connection.clone());
        let origin = wharf_model::trace::Origin { connection, user: info.facts.user.clone() };
        Some(Arc::new(wharf_model::trace::Provenance::Published(origin)))
    }
}
