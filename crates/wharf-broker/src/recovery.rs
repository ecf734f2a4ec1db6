//! Recovery: rebuilding the broker from the data directory at start, in named steps.
//!
//! 1. [`open_storage`]: open the definitions log and the store (which recovers its own files),
//!    and find out whether the last stop was clean; then [`settle_interrupted_moves`]: finish
//!    or undo each workbench move a crash interrupted (`relocate.rs`).
//! 2. [`new_model`]: a model with the configured vhosts and their policies; then
//!    [`restore_vhosts_and_policies`]: those the management API created.
//! 3. [`restore_definition`] for each stored definition: exchanges (with their delayed messages
//!    and de-duplication keys), queues (with their messages, paged beyond the memory budget, and
//!    their keys); bindings are kept for step 4.
//! 4. [`restore_bindings`], once every exchange and queue exists.
//! 5. [`delete_transient_logs`]: every queue's transient log (transient bodies paged out beyond
//!    the memory bound) is deleted with its contents, then its record: transient messages do not
//!    survive a restart, and a log so recorded is never taken for an orphan.
//! 6. [`keep_or_delete_orphaned_logs`]: store logs no definition points at. An empty one is
//!    deleted (a crash between creating a log and recording its definition leaves one); one that
//!    holds messages is never deleted: it becomes the queue `wharf.orphaned-log-<log id>`, said
//!    loudly in the log and counted (`Counters::orphaned_logs_kept`), so an operator can read,
//!    move or purge its messages with any client.
//! 7. The model's own after-recovery work (delivery limits exhausted before the stop, backoffs,
//!    expiries), returned as effects to carry out once the broker runs.

use crate::clock::{Clock, SystemClock};
use crate::config::BrokerConfig;
use crate::core::{Core, CoreParts};
use crate::dedup_logs::DedupLogs;
use crate::definition_format::{self, Definition, StoredBinding, StoredExchange, StoredQueue};
use crate::error::BrokerError;
use crate::persist;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use wharf_model::{BrokerModel, ConnectionId, Effects, Exchange, ExchangeKind, PagedBody, Queue, StoredAt};
use wharf_store::{LogId, MessageLocation, MetaStore, Recovered, RecoveredMessage, Store};
use wharf_wire::types::FieldTable;

/// What recovery does with each live record: (the recovered message, its meta, its body).
type RecordVisitor<'a> = dyn FnMut(&RecoveredMessage, &[u8], &[u8]) + 'a;

impl Core {
    /// Opens the store and the definitions log and rebuilds the broker from them. Blocking (file
    /// I/O): run it off the async runtime's workers.
    pub fn open(config: BrokerConfig) -> Result<(Core, Effects), BrokerError> {
        let mut storage = open_storage(&config)?;
        settle_interrupted_moves(&storage.store, &mut storage.recovered)?;
        let mut model = new_model(&config);
        let dedup_logs = DedupLogs::default();
        let sources = Sources {
            store: &storage.store,
            recovered: &storage.recovered,
            dedup_logs: &dedup_logs,
            now_ms: config.clock.now_ms(),
            clean_stop: storage.clean_stop,
            queue_body_memory_bytes_max: config.queue_body_memory_bytes_max,
        };
        let mut tally = Tally::default();
        restore_vhosts_and_policies(&config, &mut model, &storage.definitions);
        for (key, value) in &storage.definitions {
            restore_definition(&config, &sources, &mut model, &mut tally, key, value);
        }
        restore_bindings(&mut model, std::mem::take(&mut tally.bindings));
        delete_transient_logs(&sources, &storage.meta, std::mem::take(&mut tally.transient_logs))?;
        // The metadata group's Raft log is the cluster's, never an orphan (also on a node started
        // on its own again).
        tally.used_logs.extend(crate::cluster::recorded_log(&storage.meta));
        let metadata_log = match &config.cluster {
            Some(_) => Some(crate::cluster::open_log(&storage.store, &storage.meta, &storage.recovered)?),
            None => None,
        };
        tally.used_logs.extend(metadata_log.as_ref().map(wharf_raft::GroupLog::store_log));
        let kept = keep_or_delete_orphaned_logs(&config, &sources, &storage.meta, &mut model, &mut tally)?;
        model.count_orphaned_logs_kept(kept);
        tracing::info!(messages = tally.messages, paged_out = tally.paged, "broker state recovered");
        model.count_paged_out(tally.paged);
        let startup = model.after_recovery();
        let identities = std::mem::take(&mut tally.identities);
        let core = Core::new(CoreParts {
            config,
            model,
            store: storage.store,
            meta: storage.meta,
            dedup_logs,
            identities,
            mqtt_flow_markers: tally.mqtt_flow_markers,
            metadata_log,
            recovered_quorum: tally.quorum_queues,
        });
        Ok((core, startup))
    }
}

/// The data directory, opened.
struct Storage {
    meta: MetaStore,
    /// The stored definitions, key and value.
    definitions: Vec<(Vec<u8>, Vec<u8>)>,
    store: Store,
    recovered: Recovered,
    /// The last stop was clean: delivery counts are all on disk.
    clean_stop: bool,
}

/// Step 1: opens the definitions log (migrating old definitions) and the store.
fn open_storage(config: &BrokerConfig) -> Result<Storage, BrokerError> {
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
    let clean_stop = recovered.clean_stop;
    // Definitions written before the current format are rewritten first (one atomic batch).
    let migration = definition_format::migrate(&definitions.entries).map_err(|error| {
        BrokerError::Startup(format!("the definitions log cannot be read by this version of Wharf: {error}"))
    })?;
    let definitions = if migration.is_empty() {
        definitions.entries.into_iter().collect()
    } else {
        tracing::info!(changes = migration.len(), "migrating definitions to the current format");
        meta.apply(&migration)?;
        meta.entries().into_iter().collect()
    };
    Ok(Storage { meta, definitions, store, recovered, clean_stop })
}

/// Step 1b: finishes or undoes every workbench move a crash interrupted (`relocate.rs`). A copy
/// carries a marker naming its source and how many stored copies its move wrote. If the source
/// is still live, the move finishes when all of them are here (the source is removed) and is
/// undone otherwise (the copies are removed); a source that is gone was removed durably after
/// every copy was, so the copies stay. The removals are durable before anything is restored.
fn settle_interrupted_moves(store: &Store, recovered: &mut Recovered) -> Result<(), BrokerError> {
    // Source → the copies found.
    let mut moves: BTreeMap<StoredAt, (u32, Vec<StoredAt>)> = BTreeMap::new();
    for (log, messages) in &recovered.queues {
        for message in messages {
            let Some(marker) = recovered.meta(*log, message).and_then(persist::relocation_marker) else { continue };
            let source = StoredAt { log: marker.source_log, seq: marker.source_seq };
            let found = moves.entry(source).or_insert((marker.copies, Vec::new()));
            found.1.push(StoredAt { log: log.0, seq: message.seq });
        }
    }
    let is_live = |recovered: &Recovered, at: StoredAt| {
        recovered
            .queues
            .get(&LogId(at.log))
            .is_some_and(|messages| messages.binary_search_by_key(&at.seq, |message| message.seq).is_ok())
    };
    let mut removals: Vec<StoredAt> = Vec::new();
    let (mut finished, mut undone) = (0u64, 0u64);
    for (source, (copies, found)) in moves {
        if !is_live(recovered, source) {
            continue;
        }
        if found.len() as u64 >= u64::from(copies) {
            removals.push(source);
            finished += 1;
        } else {
            removals.extend(found);
            undone += 1;
        }
    }
    if removals.is_empty() {
        return Ok(());
    }
    tracing::warn!(finished, undone, "settled workbench moves a crash interrupted");
    for at in &removals {
        store.remove_unawaited(LogId(at.log), at.seq)?;
        if let Some(messages) = recovered.queues.get_mut(&LogId(at.log)) {
            messages.retain(|message| message.seq != at.seq);
        }
    }
    store.sync()?.wait()?;
    Ok(())
}

/// Step 2: a model with `/`, the configured vhosts, and their policies.
fn new_model(config: &BrokerConfig) -> BrokerModel {
    // The seed only varies server-chosen names between runs; the system's time is a fine source
    // even under a manual clock.
    let seed = SystemClock.now_ms() ^ u64::from(std::process::id()).rotate_left(32);
    let mut model = BrokerModel::new(seed);
    model.set_now(config.clock.now_ms());
    model.set_trace_events_max(config.message_trace_events_max);
    ensure_vhost(config, &mut model, "/");
    // `/` may exist before any policy was set on it.
    if let Some(vhost) = model.vhost_mut("/") {
        vhost.set_policies(policies_of(config, "/"));
        vhost.set_default_consumer_timeout_ms(config.consumer_timeout_ms);
    }
    for vhost in &config.vhosts {
        ensure_vhost(config, &mut model, vhost);
    }
    model
}

pub(crate) fn policies_of(config: &BrokerConfig, vhost_name: &str) -> Vec<wharf_model::Policy> {
    config.policies.iter().filter(|(vhost, _)| vhost == vhost_name).map(|(_, policy)| policy.clone()).collect()
}

/// Step 2b: the vhosts and policies the management API created (`policy_records.rs`), before
/// any queue or exchange, so their settings take the policies in force. A policy the
/// configuration also defines (by name, in the same vhost) is the configuration's.
fn restore_vhosts_and_policies(config: &BrokerConfig, model: &mut BrokerModel, definitions: &[(Vec<u8>, Vec<u8>)]) {
    let mut stored: BTreeMap<String, Vec<wharf_model::Policy>> = BTreeMap::new();
    for (key, value) in definitions {
        let Some((kind, vhost, rest)) = definition_format::split_key(key) else { continue };
        match kind {
            "vhost" => {
                if crate::policy_records::decode_vhost(value).is_none() {
                    tracing::error!(vhost, "stored vhost record unreadable; the vhost is kept");
                }
                ensure_vhost(config, model, vhost);
            }
            "policy" => match crate::policy_records::decode_policy(rest, value) {
                Some(policy) => stored.entry(vhost.to_owned()).or_default().push(policy),
                None => tracing::error!(vhost, policy = rest, "stored policy unreadable or no longer valid; left out"),
            },
            _ => {}
        }
    }
    for (vhost, policies) in stored {
        ensure_vhost(config, model, &vhost);
        let mut merged = policies_of(config, &vhost);
        for policy in policies {
            if !merged.iter().any(|configured| configured.name == policy.name) {
                merged.push(policy);
            }
        }
        if let Some(found) = model.vhost_mut(&vhost) {
            found.set_policies(merged);
        }
    }
}

/// Adds a vhost (with its configured policies) unless it exists.
pub(crate) fn ensure_vhost(config: &BrokerConfig, model: &mut BrokerModel, name: &str) {
    if model.vhost(name).is_none() {
        model.add_vhost(name);
        if let Some(vhost) = model.vhost_mut(name) {
            vhost.set_policies(policies_of(config, name));
            vhost.set_default_consumer_timeout_ms(config.consumer_timeout_ms);
        }
    }
}

/// What the restoring steps read from.
struct Sources<'a> {
    store: &'a Store,
    recovered: &'a Recovered,
    dedup_logs: &'a DedupLogs,
    now_ms: u64,
    clean_stop: bool,
    queue_body_memory_bytes_max: u64,
}

/// What the restoring steps found along the way.
#[derive(Default)]
struct Tally {
    /// Store logs a definition points at (the rest are orphans).
    used_logs: HashSet<LogId>,
    /// Bindings, restored once every exchange and queue exists: (vhost, binding).
    bindings: Vec<(String, StoredBinding)>,
    /// Transient logs to delete, with the keys of their records: (key, log).
    transient_logs: Vec<(Vec<u8>, u64)>,
    messages: usize,
    paged: u64,
    /// Users and permissions the management API stored (`identities.rs`).
    identities: Vec<crate::identities::StoredIdentity>,
    /// MQTT QoS 2 publishes' markers on queued messages (`mqtt/state.rs`).
    mqtt_flow_markers: crate::mqtt::state::FlowMarkers,
    /// Quorum queues (`cluster/`), their groups to start once the links are up.
    quorum_queues: Vec<crate::cluster::RecoveredQuorumQueue>,
}

impl Sources<'_> {
    /// Hands every live record of a store log to `visit`, reading the log sequentially in chunks
    /// (a queue's backlog is never all in memory at once); unreadable records are reported and
    /// skipped.
    fn read_log(&self, log: LogId, owner: &str, visit: &mut RecordVisitor<'_>) {
        let Some(messages) = self.recovered.queues.get(&log) else { return };
        let locations: Vec<MessageLocation> = messages.iter().map(|message| message.location).collect();
        self.store.read_each(log, &locations, &mut |index, result| match result {
            Ok(record) => visit(&messages[index], record.meta, record.body),
            Err(error) => tracing::error!(owner, seq = messages[index].seq, %error, "stored record unreadable"),
        });
    }

    /// Loads a de-duplication key log: live keys go to `remember` (key, first seen); expired ones
    /// are removed from the store. Returns the live records (seen, seq), for the caller to track
    /// for expiry (`DedupLogs::restore`) with any it adds.
    fn load_dedup_log(
        &self,
        log: u64,
        ttl_ms: u64,
        owner: &str,
        remember: &mut dyn FnMut(&[u8], u64),
    ) -> VecDeque<(u64, u64)> {
        let mut live = VecDeque::new();
        self.read_log(LogId(log), owner, &mut |message, meta, key| {
            let (seq, seen_ms) = (message.seq, message.timestamp_ms);
            if !persist::is_dedup_key(meta) {
                tracing::error!(owner, seq, "a record in a de-duplication log is not a key");
                return;
            }
            if seen_ms.saturating_add(ttl_ms) <= self.now_ms {
                let _ = self.store.remove_unawaited(LogId(log), seq);
                return;
            }
            remember(key, seen_ms);
            live.push_back((seen_ms, seq));
        });
        live
    }
}

/// Step 3: one stored definition back into the model.
fn restore_definition(
    config: &BrokerConfig,
    sources: &Sources<'_>,
    model: &mut BrokerModel,
    tally: &mut Tally,
    key: &[u8],
    value: &[u8],
) {
    // Users and permissions the management API stored are not topology: they go to the
    // identities (and define no vhost).
    if let Some((kind, vhost, rest)) = definition_format::split_key(key)
        && crate::identities::is_identity_kind(kind)
    {
        match crate::identities::decode(kind, vhost, rest, value) {
            Some(identity) => tally.identities.push(identity),
            None => tracing::error!(key = %String::from_utf8_lossy(key), "stored user or permission unreadable"),
        }
        return;
    }
    // A quorum queue of a cluster: its queue, and on a member its group's log (`cluster/`).
    if let Some((kind, vhost, name)) = definition_format::split_key(key)
        && crate::cluster::is_quorum_record(kind)
    {
        ensure_vhost(config, model, vhost);
        let store = sources.store;
        let found =
            crate::cluster::restore_quorum(store, sources.recovered, model, vhost, name, value, &mut tally.used_logs);
        tally.quorum_queues.extend(found);
        return;
    }
    // A classic queue homed on another node of the cluster: its placeholder (on its home, the
    // queue's own record restores it).
    if let Some((kind, vhost, name)) = definition_format::split_key(key)
        && crate::cluster::is_homed_record(kind)
    {
        ensure_vhost(config, model, vhost);
        let own = config.cluster.as_ref().map(|cluster| cluster.node_id);
        crate::cluster::restore_homed(model, own, vhost, name, value);
        return;
    }
    // Vhosts and policies the management API created were restored first; retained MQTT
    // messages and MQTT sessions' state are read by the MQTT front end (`mqtt/retained.rs`,
    // `mqtt/state.rs`).
    if let Some((kind, _, _)) = definition_format::split_key(key)
        && (crate::policy_records::is_record_kind(kind)
            || kind == crate::mqtt::retained::KIND
            || kind == crate::mqtt::state::KIND
            || kind == crate::cluster::KIND)
    {
        return;
    }
    // The vhost exists even if the definition in it turns out unreadable (a transient log's
    // record defines nothing in it).
    if let Some((kind, vhost, _)) = definition_format::split_key(key)
        && kind != "transient-log"
    {
        ensure_vhost(config, model, vhost);
    }
    let definition = match definition_format::decode(key, value) {
        Ok(definition) => definition,
        Err(error) => {
            tracing::error!(key = %String::from_utf8_lossy(key), %error, "stored definition unreadable");
            return;
        }
    };
    match definition {
        Definition::Exchange { vhost, name, stored } => restore_exchange(sources, model, tally, &vhost, &name, stored),
        Definition::Queue { vhost, name, stored } => restore_queue(sources, model, tally, &vhost, &name, stored),
        Definition::Binding { vhost, stored } => tally.bindings.push((vhost, stored)),
        Definition::TransientLog { log, .. } => {
            tally.used_logs.insert(LogId(log));
            tally.transient_logs.push((key.to_vec(), log));
        }
    }
}

/// Step 5: deletes every transient log with its contents, then (once the deletion is durable)
/// its record; a crash in between leaves the record, and the next start deletes nothing more.
/// Log ids are never reused, so a record left behind cannot name another queue's log.
fn delete_transient_logs(
    sources: &Sources<'_>,
    meta: &MetaStore,
    logs: Vec<(Vec<u8>, u64)>,
) -> Result<(), BrokerError> {
    if logs.is_empty() {
        return Ok(());
    }
    let mut records = Vec::with_capacity(logs.len());
    for (key, log) in logs {
        if sources.store.has_log(LogId(log)) {
            let messages = sources.recovered.queues.get(&LogId(log)).map_or(0, Vec::len);
            tracing::info!(
                store_log = log,
                messages,
                "deleting a transient log (transient messages do not survive a restart)"
            );
            sources.store.delete_log(LogId(log))?.wait()?;
        }
        records.push(wharf_store::MetaChange::Delete { key });
    }
    meta.apply(&records)?;
    Ok(())
}

/// A durable exchange, its de-duplication keys, and the delayed messages it holds.
fn restore_exchange(
    sources: &Sources<'_>,
    model: &mut BrokerModel,
    tally: &mut Tally,
    vhost_name: &str,
    name: &str,
    stored: StoredExchange,
) {
    // The logs a definition names are its own even when the definition cannot be used now (an
    // exchange kind no longer known, de-duplication switched off by a policy): never orphans.
    for log in stored.store_log.into_iter().chain(stored.dedup_log) {
        tally.used_logs.insert(LogId(log));
    }
    let kind = match ExchangeKind::parse(&stored.kind) {
        Ok(kind) => kind,
        Err(error) => {
            tracing::error!(exchange = name, %error, "stored exchange skipped");
            return;
        }
    };
    let Some(vhost) = model.vhost_mut(vhost_name) else { return };
    let settings = vhost.exchange_settings(name, kind, &stored.arguments).unwrap_or_else(|error| {
        tracing::error!(exchange = name, %error, "stored exchange arguments no longer valid; using defaults");
        wharf_model::ExchangeSettings::default()
    });
    let exchange = Exchange::new(name, kind, true, stored.auto_delete, stored.internal).with_stored(
        stored.arguments,
        settings,
        stored.store_log,
        stored.dedup_log,
    );
    let dedup_ttl_ms = exchange.settings.deduplication.as_ref().map(|dedup| dedup.ttl_ms);
    vhost.restore_exchange(exchange);
    if let (Some(log), Some(ttl_ms)) = (stored.dedup_log, dedup_ttl_ms) {
        let live = sources.load_dedup_log(log, ttl_ms, name, &mut |key, seen_ms| {
            vhost.restore_exchange_dedup_key(name, key, seen_ms)
        });
        sources.dedup_logs.restore(log, ttl_ms, live);
    }
    if let Some(log) = stored.store_log {
        sources.read_log(LogId(log), name, &mut |stored_message, meta, body| {
            let (seq, stored_ms) = (stored_message.seq, stored_message.timestamp_ms);
            match persist::decode_message(meta, bytes::Bytes::copy_from_slice(body)) {
                Some(message) => {
                    let due_ms = stored_ms.saturating_add(message.delay_ms().unwrap_or(0));
                    model.hold_delayed(vhost_name, name, Arc::new(message), Some(seq), due_ms);
                    tally.messages += 1;
                }
                None => tracing::error!(exchange = name, seq, "stored delayed message unreadable"),
            }
        });
    }
}

/// A durable queue, its messages and its de-duplication keys.
fn restore_queue(
    sources: &Sources<'_>,
    model: &mut BrokerModel,
    tally: &mut Tally,
    vhost_name: &str,
    name: &str,
    stored: StoredQueue,
) {
    let Some(vhost) = model.vhost_mut(vhost_name) else { return };
    let settings = vhost.queue_settings(name, &stored.arguments).unwrap_or_else(|error| {
        tracing::error!(queue = name, %error, "stored queue arguments no longer valid; using defaults");
        wharf_model::QueueSettings::default()
    });
    let dedup_ttl_ms = settings.deduplication.as_ref().map(|dedup| dedup.ttl_ms);
    let mut queue = Queue::new(name.to_owned(), true, None, stored.auto_delete, stored.arguments, settings)
        .with_store_logs(Some(stored.store_log), stored.dedup_log);
    tally.used_logs.insert(LogId(stored.store_log));
    // With de-duplication switched off (by a policy) the key log stays with the queue's
    // definition, unread, in case it is switched on again.
    let key_log = stored.dedup_log.zip(dedup_ttl_ms);
    if let Some(log) = stored.dedup_log {
        tally.used_logs.insert(LogId(log));
    }
    let mut live = match key_log {
        Some((log, ttl_ms)) => {
            sources.load_dedup_log(log, ttl_ms, name, &mut |key, seen_ms| queue.restore_dedup_key(key, seen_ms))
        }
        None => VecDeque::new(),
    };
    let key_log = key_log.map(|(log, _)| (log, &mut live));
    restore_queue_messages(sources, tally, vhost, &mut queue, stored.store_log, key_log);
    if let (Some(log), Some(ttl_ms)) = (stored.dedup_log, dedup_ttl_ms) {
        sources.dedup_logs.restore(log, ttl_ms, live);
    }
    vhost.restore_queue(queue);
}

/// A queue's live messages, in order. The store's scan kept every record's meta: only the bodies
/// that stay in memory are read again (beyond the queue's budget, none). With `key_log` (the
/// queue's de-duplication key log and its live records), a message whose key the log lacks has
/// it written now (`Queue::recover_dedup_key_of` says why).
fn restore_queue_messages(
    sources: &Sources<'_>,
    tally: &mut Tally,
    vhost: &mut wharf_model::VirtualHost,
    queue: &mut Queue,
    log: u64,
    mut key_log: Option<(u64, &mut VecDeque<(u64, u64)>)>,
) {
    let log_id = LogId(log);
    let redelivered = !sources.clean_stop;
    for recovered_message in sources.recovered.queues.get(&log_id).into_iter().flatten() {
        let seq = recovered_message.seq;
        let location = recovered_message.location;
        let page = queue.resident_bytes() >= sources.queue_body_memory_bytes_max;
        let (meta, in_memory) = match sources.recovered.meta(log_id, recovered_message) {
            Some(meta) if page => (std::borrow::Cow::Borrowed(meta), None),
            _ => match sources.store.read(log_id, &location) {
                Ok(stored) => (std::borrow::Cow::Owned(stored.meta), Some(stored.body)),
                Err(error) => {
                    tracing::error!(queue = %queue.name, seq, %error, "stored record unreadable");
                    continue;
                }
            },
        };
        let body_bytes = match &in_memory {
            Some(body) => body.len() as u64,
            None => recovered_message.body_bytes(),
        };
        let paged = PagedBody {
            store_log: log,
            segment_id: location.segment_id,
            offset: location.offset,
            record_bytes: location.record_bytes,
            body_bytes,
        };
        let body = in_memory.map(bytes::Bytes::from).unwrap_or_default();
        let (stored_ms, delivery_count) = (recovered_message.timestamp_ms, recovered_message.delivery_count);
        // A copy a move made (`relocate.rs`) was never admitted by de-duplication either.
        let moved = persist::relocation_marker(&meta).is_some();
        let decoded = persist::decode_message(&meta, body);
        let admitted = decoded.as_ref().filter(|_| !moved);
        if let (Some(decoded), Some((key_log, live))) = (admitted, key_log.as_mut())
            && let Some(key) = queue.recover_dedup_key_of(decoded, stored_ms, sources.now_ms)
        {
            match sources.store.append(LogId(*key_log), stored_ms, &persist::dedup_key_meta(), &key) {
                Ok(append) => live.push_back((stored_ms, append.seq)),
                Err(error) => {
                    tracing::warn!(queue = %queue.name, %error, "a recovered de-duplication key could not be written")
                }
            }
        }
        // The same for the exchange it was published to (restored before any queue).
        if let Some(decoded) = admitted
            && let Some((key, exchange_log)) = vhost.recover_exchange_dedup_key_of(decoded, stored_ms, sources.now_ms)
        {
            match sources.store.append(LogId(exchange_log), stored_ms, &persist::dedup_key_meta(), &key) {
                Ok(append) => sources.dedup_logs.record(exchange_log, stored_ms, append.seq),
                Err(error) => {
                    tracing::warn!(exchange = %decoded.exchange, %error, "a recovered de-duplication key could not be written")
                }
            }
        }
        // Any copy shows the publish reached the store (a crash may have kept it unrecorded).
        if let Some(decoded) = &decoded {
            tally.mqtt_flow_markers.note(vhost.name(), decoded);
        }
        match decoded {
            Some(decoded) if page => {
                queue.enqueue_recovered_paged(decoded, paged, seq, stored_ms, delivery_count, redelivered);
                tally.paged += 1;
                tally.messages += 1;
            }
            Some(decoded) => {
                queue.enqueue_recovered(Arc::new(decoded), Some(seq), stored_ms, delivery_count, redelivered);
                tally.messages += 1;
            }
            None => tracing::error!(queue = %queue.name, seq, "stored message unreadable"),
        }
    }
}

/// Step 4: bindings, once every exchange and queue they join exists.
fn restore_bindings(model: &mut BrokerModel, bindings: Vec<(String, StoredBinding)>) {
    for (vhost_name, stored) in bindings {
        let Some(vhost) = model.vhost_mut(&vhost_name) else { continue };
        if let Err(error) =
            vhost.bind(&stored.source, stored.destination, &stored.routing_key, &stored.arguments, ConnectionId(0))
        {
            tracing::error!(%error, "stored binding no longer applies");
        }
    }
}

/// The queue an orphaned message log is kept as.
pub(crate) fn orphaned_log_queue_name(log: LogId) -> String {
    format!("wharf.orphaned-log-{:016x}", log.0)
}

/// Step 5: store logs no definition points at: a crash between creating a log and recording its
/// definition, or between deleting a definition and its log; or a definition that could not be
/// read. An empty log (or a de-duplication key log, which holds no messages) is deleted; a log
/// holding messages is kept as a durable queue of its own, with its definition written so it
/// stays one. Returns how many were kept.
fn keep_or_delete_orphaned_logs(
    config: &BrokerConfig,
    sources: &Sources<'_>,
    meta: &MetaStore,
    model: &mut BrokerModel,
    tally: &mut Tally,
) -> Result<u64, BrokerError> {
    let mut kept = 0;
    for (log, messages) in &sources.recovered.queues {
        if tally.used_logs.contains(log) {
            continue;
        }
        let holds_messages = messages
            .iter()
            .any(|message| sources.recovered.meta(*log, message).is_none_or(|meta| !persist::is_dedup_key(meta)));
        if !holds_messages {
            tracing::info!(store_log = log.0, "deleting an empty orphaned log");
            sources.store.delete_log(*log)?.wait()?;
            continue;
        }
        // Never over a queue that exists (a client may have declared one by this name).
        let base = orphaned_log_queue_name(*log);
        let taken = |candidate: &str| model.vhost("/").is_some_and(|vhost| vhost.queue(candidate).is_some());
        let name = (1..)
            .map(|attempt| if attempt == 1 { base.clone() } else { format!("{base}-{attempt}") })
            .find(|candidate| !taken(candidate))
            .unwrap_or(base);
        tracing::error!(
            store_log = log.0,
            messages = messages.len(),
            queue = %name,
            "a store log holding messages belongs to no stored definition; kept as a queue of its own (nothing was deleted): read, move or purge it with any client"
        );
        let stored =
            StoredQueue { auto_delete: false, arguments: FieldTable::default(), store_log: log.0, dedup_log: None };
        meta.put(&definition_format::queue_key("/", &name), &definition_format::encode_queue(&stored))?;
        ensure_vhost(config, model, "/");
        restore_queue(sources, model, tally, "/", &name, stored);
        kept += 1;
    }
    Ok(kept)
}
