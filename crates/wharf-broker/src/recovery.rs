//! Recovery: rebuilding the broker from the data directory at start. The definitions log gives
//! vhosts, exchanges, queues and bindings; the store gives every live message (with its stored time
//! and delivery count), delayed messages and de-duplication keys.

use crate::clock::Clock;
use crate::config::BrokerConfig;
use crate::core::{Core, CoreParts};
use crate::dedup_logs::DedupLogs;
use crate::error::BrokerError;
use crate::persist::{self, StoredBinding, StoredExchange, StoredQueue};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use wharf_model::{BrokerModel, ConnectionId, Destination, Effects, Exchange, ExchangeKind, PagedBody, Queue};
use wharf_store::{MessageLocation, MetaStore, QueueId, Store};

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

/// Written by a clean shutdown after the store is closed; removed at start.
pub(crate) const CLEAN_STOP_MARKER: &str = "clean-stop";

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
        // The seed only varies server-chosen names between runs; the system's time is a fine
        // source even under a manual clock.
        let seed = crate::clock::SystemClock.now_ms() ^ u64::from(std::process::id()).rotate_left(32);
        let mut model = BrokerModel::new(seed);
        model.set_now(config.clock.now_ms());
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
        let dedup_logs = DedupLogs::default();
        let mut bindings = Vec::new();
        let mut used_store_queues = HashMap::new();
        let mut restored_messages = 0usize;
        let mut paged_at_start = 0u64;
        // Reads every live record of a store log, sequentially (a queue's backlog is never all
        // in memory at once).
        let read_log = |store_queue: QueueId, owner: &str, visit: &mut RecordVisitor<'_>| {
            read_records(&store, &recovered, store_queue, owner, visit)
        };
        let now = config.clock.now_ms();
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
            dedup_logs.restore(log, ttl_ms, live);
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
        let core = Core::new(CoreParts { config, model, store, meta, dedup_logs });
        Ok((core, startup))
    }
}
