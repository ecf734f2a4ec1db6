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
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, watch};
use wharf_model::{
    BrokerModel, ChannelKey, ConnectionId, Delivery, Destination, Effects, Exchange, ExchangeKind, Queue,
};
use wharf_store::{MetaStore, QueueId, Store, StoreError};

/// What a connection's writer task is asked to send.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// Encoded frames, sent as they are.
    Frames(bytes::Bytes),
    /// A delivery to encode (`basic.deliver` or `basic.get-ok`, header, body).
    Deliver(Delivery),
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
            Outbound::Deliver(delivery) => 64 + wharf_model::broker::delivery_bytes(&delivery.message),
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
}

/// The sending side of a connection's writer queue, counting what it holds.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    pub sender: mpsc::UnboundedSender<Outbound>,
    pub backlog: Arc<Backlog>,
}

impl Outbox {
    /// Queues an item for the writer; fails only once the writer is gone.
    pub fn send(&self, item: Outbound) -> Result<(), mpsc::error::SendError<Outbound>> {
        self.backlog.bytes.fetch_add(item.size_bytes(), Ordering::Relaxed);
        self.sender.send(item)
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
}

/// Written by a clean shutdown after the store is closed; removed at start.
pub(crate) const CLEAN_STOP_MARKER: &str = "clean-stop";

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

impl Core {
    /// Opens the store and the definitions log and rebuilds the broker from them. Blocking (file
    /// I/O): run it off the async runtime's workers.
    pub fn open(config: BrokerConfig) -> Result<Core, BrokerError> {
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
        for vhost in &config.vhosts {
            model.add_vhost(vhost);
        }
        let mut bindings = Vec::new();
        let mut used_store_queues = HashMap::new();
        let mut restored_messages = 0usize;
        for (key, value) in &definitions.entries {
            let Some((kind, vhost_name, rest)) = persist::split_key(key) else {
                tracing::warn!("unreadable definitions key skipped");
                continue;
            };
            model.add_vhost(vhost_name);
            let Some(vhost) = model.vhost_mut(vhost_name) else { continue };
            match kind {
                "exchange" => match serde_json::from_slice::<StoredExchange>(value) {
                    Ok(stored) => match ExchangeKind::parse(&stored.kind) {
                        Ok(kind) => vhost.restore_exchange(Exchange {
                            name: rest.to_owned(),
                            kind,
                            durable: true,
                            auto_delete: stored.auto_delete,
                            internal: stored.internal,
                            arguments: stored.arguments,
                        }),
                        Err(error) => tracing::error!(exchange = rest, %error, "stored exchange skipped"),
                    },
                    Err(error) => tracing::error!(exchange = rest, %error, "stored exchange unreadable"),
                },
                "queue" => match serde_json::from_slice::<StoredQueue>(value) {
                    Ok(stored) => {
                        let mut queue = Queue::new(rest.to_owned(), true, None, stored.auto_delete, stored.arguments);
                        queue.store_queue = Some(stored.store_queue);
                        let store_queue = QueueId(stored.store_queue);
                        used_store_queues.insert(store_queue, ());
                        for message in recovered.queues.get(&store_queue).into_iter().flatten() {
                            match store.read(store_queue, &message.location) {
                                Ok(stored_message) => {
                                    match persist::decode_message(&stored_message.meta, stored_message.body) {
                                        Some(decoded) => {
                                            queue.enqueue_recovered(
                                                Arc::new(decoded),
                                                Some(message.seq),
                                                message.delivery_count,
                                                !clean_stop,
                                            );
                                            restored_messages += 1;
                                        }
                                        None => tracing::error!(
                                            queue = rest,
                                            seq = message.seq,
                                            "stored message unreadable"
                                        ),
                                    }
                                }
                                Err(error) => {
                                    tracing::error!(queue = rest, seq = message.seq, %error, "stored message unreadable")
                                }
                            }
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
        tracing::info!(messages = restored_messages, "broker state recovered");
        let (fatal, _) = watch::channel(None);
        Ok(Core {
            config,
            model: Mutex::new(model),
            store,
            meta,
            connections: Mutex::new(HashMap::new()),
            definitions: Mutex::new(()),
            next_connection: AtomicU64::new(1),
            fatal,
        })
    }

    /// The definitions lock (see the field). Take it before the model lock, never after.
    pub fn definitions(&self) -> MutexGuard<'_, ()> {
        self.definitions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The model, locked. Never hold the guard across an `.await`.
    pub fn model(&self) -> MutexGuard<'_, BrokerModel> {
        self.model.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
        for delivery in effects.deliveries.drain(..) {
            // Lazily durable, like removals; see `CLEAN_STOP_MARKER` for what a crash does.
            self.record_delivery(&delivery);
            let connection = delivery.channel.connection;
            if let Some(outbound) = self.outbound(connection) {
                // A closed connection's channels are closed in the model right after; its
                // unacked deliveries are requeued there, so a failed send loses nothing.
                let _ = outbound.send(Outbound::Deliver(delivery));
            }
        }
        for (ChannelKey { connection, channel }, consumer_tag) in effects.cancelled.drain(..) {
            if let Some(outbound) = self.outbound(connection) {
                let _ = outbound.send(Outbound::CancelConsumer { channel, consumer_tag });
            }
        }
    }

    /// Carries out what the model decided. Anything `send` has not already queued is queued now
    /// (only safe under the model lock; `act` sends first), then store removals, then forgetting
    /// durable queues and exchanges the model deleted.
    pub fn apply(&self, mut effects: Effects) {
        self.send(&mut effects);
        for removed in effects.removed {
            if let (Some(queue), Some(seq)) = (removed.store_queue, removed.store_seq) {
                match self.store.remove(QueueId(queue), seq) {
                    Ok(_) => {}
                    Err(StoreError::UnknownQueue(_)) => {}
                    Err(error) => self.store_failed(&error),
                }
            }
        }
        let durable_queues: Vec<_> = effects.deleted_queues.into_iter().filter(|deleted| deleted.durable).collect();
        let durable_exchanges: Vec<_> =
            effects.deleted_exchanges.into_iter().filter(|(_, exchange)| exchange.durable).collect();
        if durable_queues.is_empty() && durable_exchanges.is_empty() {
            return;
        }
        let _definitions = self.definitions();
        for deleted in durable_queues {
            self.forget_queue(&deleted.vhost, &deleted.name, deleted.store_queue);
        }
        for (vhost, exchange) in durable_exchanges {
            if let Err(error) = self.forget_exchange(&vhost, &exchange.name) {
                tracing::error!(exchange = %exchange.name, %error, "could not remove an exchange definition");
                self.store_failed(&error);
            }
        }
    }

    /// Removes a durable queue's definition (and its bindings' definitions), then its log. The
    /// definition goes first: a crash in between leaves an orphaned log, deleted at startup.
    /// The caller holds the definitions lock.
    pub fn forget_queue(&self, vhost: &str, name: &str, store_queue: Option<u64>) {
        let mut keys = vec![persist::queue_key(vhost, name)];
        keys.extend(self.binding_keys_to(vhost, &Destination::Queue(name.to_owned())));
        let changes: Vec<_> = keys.into_iter().map(|key| wharf_store::MetaChange::Delete { key }).collect();
        if let Err(error) = self.meta.apply(&changes) {
            tracing::error!(queue = name, %error, "could not remove a queue definition");
            self.store_failed(&error);
            return;
        }
        if let Some(queue) = store_queue {
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

    /// Removes a durable exchange's definition and every stored binding from or to it. The caller
    /// holds the definitions lock.
    pub fn forget_exchange(&self, vhost: &str, name: &str) -> Result<(), StoreError> {
        let mut keys = vec![persist::exchange_key(vhost, name)];
        keys.extend(self.binding_keys_to(vhost, &Destination::Exchange(name.to_owned())));
        let changes: Vec<_> = keys.into_iter().map(|key| wharf_store::MetaChange::Delete { key }).collect();
        self.meta.apply(&changes)
    }

    /// Records a delivery's count in the store (lazily durable, like removals).
    pub fn record_delivery(&self, delivery: &Delivery) {
        if let Some((queue, seq)) = delivery.store {
            match self.store.set_delivery_count(QueueId(queue), seq, delivery.delivery_count) {
                Ok(_) | Err(StoreError::UnknownQueue(_)) => {}
                Err(error) => self.store_failed(&error),
            }
        }
    }

    pub fn now_ms(&self) -> u64 {
        now_ms()
    }
}
