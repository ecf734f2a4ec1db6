//! Declaring quorum queues on a cluster: `queue.declare` with `x-queue-type: quorum` (RabbitMQ's
//! name) becomes a command of the metadata group naming the queue's members (every node, or
//! `x-quorum-initial-group-size` of them, the declaring node first); each node carries it out:
//! the queue in its model (marked replicated, so its consumers and deliveries go through the
//! group), its definition in its definitions log (kind `quorum-queue`: the group id, the
//! members, the arguments, and on a member the store log of its group's Raft log), and on a
//! member the group itself. The group's id is the index of the metadata entry that declared it:
//! the same on every node, never reused.
//!
//! RabbitMQ's rules: a quorum queue is durable, neither exclusive nor auto-delete, and has a
//! name the client chose (406 otherwise). On a broker alone, `x-queue-type: quorum` declares a
//! classic queue, as durable as a single node allows (`settings.rs`).

use super::MetaCommand;
use super::command::{internal, table_bytes};
use super::quorum::{GroupStart, start_group};
use crate::core::Core;
use crate::definitions::QueueRequest;
use crate::persist::text_argument;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use wharf_cluster::NodeId;
use wharf_model::{ModelError, Overflow, QueueDeclare, QuorumSettings};
use wharf_store::{LogId, Recovered, Store};
use wharf_wire::types::{AMQPValue, FieldTable};

/// The definitions-log kind of a quorum queue's record.
pub(crate) const KIND: &str = "quorum-queue";

/// A quorum queue's record in a node's definitions log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct QuorumDefinition {
    pub group: u64,
    pub members: Vec<NodeId>,
    /// The queue's arguments, an AMQP field table in its wire form.
    pub arguments: Vec<u8>,
    /// On a member: the store log of the group's Raft log.
    pub log: Option<u64>,
    /// What the group enforces, fixed when the queue was declared (arguments and policies
    /// then): every replica, restarted or not, decides with the same settings.
    #[serde(default)]
    pub settings: StoredSettings,
    /// This node's replica was added after the queue was declared (`replicas.rs`): its group
    /// must never be initialised here, only joined (an initialisation with another membership
    /// at the same log position would fork the group's log).
    #[serde(default)]
    pub joined: bool,
    /// The members it was declared with (`members` changes with `QuorumMembers`): what a
    /// replica started from a metadata snapshot initialises its group with, as the declaration
    /// would have (`meta_snapshot.rs`). Empty in records written before snapshots existed.
    #[serde(default)]
    pub declared_members: Vec<NodeId>,
}

/// [`QuorumSettings`] as a record keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredSettings {
    pub delivery_limit: Option<u32>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub reject_publish: bool,
    /// Absent in records written before quorum queues de-duplicated: none.
    #[serde(default)]
    pub dedup_ttl_ms: Option<u64>,
    /// Absent in records written before quorum queues had them: none.
    #[serde(default)]
    pub retry_backoff_ms: Vec<u64>,
    #[serde(default)]
    pub lease_ms: Option<u64>,
    #[serde(default)]
    pub single_active_consumer: bool,
}

impl From<QuorumSettings> for StoredSettings {
    fn from(settings: QuorumSettings) -> Self {
        StoredSettings {
            delivery_limit: settings.delivery_limit,
            max_length: settings.max_length,
            max_length_bytes: settings.max_length_bytes,
            reject_publish: settings.reject_publish,
            dedup_ttl_ms: settings.dedup_ttl_ms,
            retry_backoff_ms: settings.retry_backoff_ms,
            lease_ms: settings.lease_ms,
            single_active_consumer: settings.single_active_consumer,
        }
    }
}

impl From<StoredSettings> for QuorumSettings {
    fn from(settings: StoredSettings) -> Self {
        QuorumSettings {
            delivery_limit: settings.delivery_limit,
            max_length: settings.max_length,
            max_length_bytes: settings.max_length_bytes,
            reject_publish: settings.reject_publish,
            dedup_ttl_ms: settings.dedup_ttl_ms,
            retry_backoff_ms: settings.retry_backoff_ms,
            lease_ms: settings.lease_ms,
            single_active_consumer: settings.single_active_consumer,
        }
    }
}

pub(crate) fn key(vhost: &str, name: &str) -> Vec<u8> {
    format!("{KIND}\0{vhost}\0{name}").into_bytes()
}

pub(crate) fn encode(definition: &QuorumDefinition) -> Result<Vec<u8>, String> {
    crate::definition_format::encode_record(definition)
}

pub(crate) fn decode(value: &[u8]) -> Option<QuorumDefinition> {
    crate::definition_format::decode_record(value)
}

/// The record of quorum queue `name` in `vhost`, as this node has it.
pub(crate) fn record_of(meta: &wharf_store::MetaStore, vhost: &str, name: &str) -> Option<QuorumDefinition> {
    meta.get(&key(vhost, name)).and_then(|value| decode(&value))
}

/// The same, for a management request about the queue: 404 without one.
pub(crate) fn managed_record(
    meta: &wharf_store::MetaStore,
    vhost: &str,
    name: &str,
) -> Result<QuorumDefinition, crate::manage::ManagementError> {
    record_of(meta, vhost, name)
        .ok_or_else(|| crate::manage::ManagementError::NotFound(format!("no quorum queue '{name}' in vhost '{vhost}'")))
}

/// The store log of a member's group, from a quorum queue's record.
pub(crate) fn quorum_log(value: &[u8]) -> Option<u64> {
    decode(value).and_then(|definition| definition.log)
}

/// Whether a declare asks for a quorum queue.
pub(crate) fn is_quorum(arguments: &FieldTable) -> bool {
    text_argument(arguments, "x-queue-type").as_deref() == Some("quorum")
}

/// What the group's state machine enforces, from the queue's settings.
pub(crate) fn quorum_settings(settings: &wharf_model::QueueSettings) -> QuorumSettings {
    QuorumSettings {
        delivery_limit: settings.delivery_limit,
        max_length: settings.max_length,
        max_length_bytes: settings.max_length_bytes,
        reject_publish: settings.overflow != Overflow::DropHead,
        dedup_ttl_ms: settings.deduplication.as_ref().map(|deduplication| deduplication.ttl_ms),
        retry_backoff_ms: settings.retry_backoff_ms.clone(),
        lease_ms: settings.consumer_timeout_ms,
        single_active_consumer: settings.single_active_consumer,
    }
}

/// The arguments a quorum queue carries out. RabbitMQ refuses any other `x-` argument on a
/// quorum queue (`invalid arg ... of queue type rabbit_quorum_queue`), and so does Wharf: an
/// argument taken and then ignored would be a guarantee silently missing. Of Wharf's own,
/// de-duplication, leases, retry backoff and per-key ordering are built on quorum queues (the
/// window's keys, the timers and the ordering keys are the group's state, `wharf-model`'s
/// `quorum/`), as is single active consumer.
const QUORUM_ARGUMENTS: [&str; 17] = [
    "x-queue-type",
    // Where the leader starts: a placement hint, which Wharf's placement (the declaring node
    // first) may ignore without changing what the queue guarantees.
    "x-queue-leader-locator",
    "x-quorum-initial-group-size",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-delivery-limit",
    "x-message-ttl",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-deduplication",
    "x-deduplication-ttl",
    "x-deduplication-header",
    "x-consumer-timeout",
    "x-retry-backoff",
    "x-single-active-consumer",
    "x-ordered-by",
];

fn refuse_unsupported_arguments(arguments: &FieldTable, name: &str, vhost: &str) -> Result<(), ModelError> {
    for key in arguments.inner().keys() {
        let key = key.as_str();
        if key.starts_with("x-") && !QUORUM_ARGUMENTS.contains(&key) {
            return Err(ModelError::precondition_failed(format!(
                "invalid arg '{key}' for queue '{name}' in vhost '{vhost}' of queue type rabbit_quorum_queue (Wharf's quorum queues take {})",
                QUORUM_ARGUMENTS.join(", ")
            )));
        }
    }
    Ok(())
}

fn initial_group_size(arguments: &FieldTable) -> Result<Option<usize>, ModelError> {
    let Some(value) = arguments.inner().get("x-quorum-initial-group-size") else { return Ok(None) };
    let size = match value {
        AMQPValue::ShortShortInt(size) => i64::from(*size),
        AMQPValue::ShortInt(size) => i64::from(*size),
        AMQPValue::LongInt(size) => i64::from(*size),
        AMQPValue::LongLongInt(size) => *size,
        AMQPValue::ShortShortUInt(size) => i64::from(*size),
        AMQPValue::ShortUInt(size) => i64::from(*size),
        AMQPValue::LongUInt(size) => i64::from(*size),
        _ => -1,
    };
    if size < 1 {
        return Err(ModelError::precondition_failed(
            "invalid arg 'x-quorum-initial-group-size': must be a positive integer",
        ));
    }
    Ok(Some(size as usize))
}

impl Core {
    /// `queue.declare` (see `declare_queue_here`; on a cluster, a quorum queue is declared
    /// through the metadata group).
    pub fn declare_queue(&self, request: QueueRequest<'_>) -> Result<String, ModelError> {
        match self.metadata_group() {
            Some(group) if !request.passive && is_quorum(request.arguments) => {
                let name = request.name.clone();
                if let Some(grant) = request.grant {
                    grant.check(crate::access::Right::Configure, crate::access::Resource::Queue, &name)?;
                }
                if request.server_named || name.is_empty() {
                    return Err(ModelError::precondition_failed("a quorum queue needs a name the client chose"));
                }
                for (refused, property) in [
                    (!request.durable, "non-durable"),
                    (request.exclusive, "exclusive"),
                    (request.auto_delete, "auto-delete"),
                ] {
                    if refused {
                        return Err(ModelError::precondition_failed(format!(
                            "invalid property '{property}' for queue '{name}' in vhost '{}'",
                            request.vhost
                        )));
                    }
                }
                // Checked for a new queue only: one that exists is declared again as it is (the
                // declaration is a no-op then), whatever an older version let it carry.
                let exists = self
                    .lock_model()
                    .vhost(request.vhost)
                    .and_then(|vhost| vhost.queue(&name))
                    .is_some_and(|queue| queue.replicated);
                if !exists {
                    refuse_unsupported_arguments(request.arguments, &name, request.vhost)?;
                }
                let mut members = group.status().voters;
                let node = self.config.cluster.as_ref().map_or(0, |cluster| cluster.node_id);
                members.sort_by_key(|member| (*member != node, *member));
                if let Some(size) = initial_group_size(request.arguments)? {
                    members.truncate(size);
                }
                let command = MetaCommand::DeclareQuorumQueue {
                    vhost: request.vhost.to_owned(),
                    name: name.clone(),
                    arguments: table_bytes(request.arguments)?,
                    members,
                };
                match group.propose_blocking(command) {
                    Ok(answer) => answer.into_model().map(|()| name),
                    Err(error) => Err(internal(error)),
                }
            }
            Some(_) => match self.declare_homed_queue(&request) {
                Some(declared) => declared,
                None => self.declare_queue_here(request),
            },
            None => self.declare_queue_here(request),
        }
    }

    /// Carries out a quorum queue's declaration on this node (the metadata group's state machine
    /// calls it; blocking). Declaring one that exists as a quorum queue is a no-op.
    pub(crate) fn declare_quorum_queue_here(
        self: &Arc<Core>,
        vhost_name: &str,
        name: &str,
        arguments: &[u8],
        members: &[NodeId],
        group: u64,
    ) -> Result<(), ModelError> {
        let declaration = QuorumDeclaration { arguments, members, declared_members: members, group, settings: None };
        self.declare_quorum_queue_as(vhost_name, name, declaration)
    }

    /// [`declare_quorum_queue_here`](Self::declare_quorum_queue_here), also for a quorum queue
    /// a metadata snapshot brings: with the settings its record fixed when it was declared, and
    /// members that may have changed since. This node's replica initialises its group only as
    /// the declaration would have (a declared member, members unchanged); otherwise it joins,
    /// so the group's log cannot fork.
    pub(crate) fn declare_quorum_queue_as(
        self: &Arc<Core>,
        vhost_name: &str,
        name: &str,
        declaration: QuorumDeclaration<'_>,
    ) -> Result<(), ModelError> {
        let QuorumDeclaration { arguments, members, declared_members, group, settings: recorded } = declaration;
        let table = wharf_wire::frame::decode_field_table(arguments)
            .ok_or_else(|| internal("a quorum queue's arguments are unreadable"))?;
        let definitions = self.definitions();
        let settings = {
            let mut model = self.lock_model();
            let vhost =
                model.vhost_mut(vhost_name).ok_or_else(|| ModelError::not_found(format!("no vhost '{vhost_name}'")))?;
            if let Some(existing) = vhost.queue(name) {
                if existing.replicated {
                    return Ok(());
                }
                return Err(ModelError::precondition_failed(format!(
                    "inequivalent arg 'x-queue-type' for queue '{name}' in vhost '{vhost_name}': received 'quorum' but current is 'classic'"
                )));
            }
            let settings = vhost.queue_settings(name, &table)?;
            declare_replicated(vhost, name, &table)?;
            settings
        };
        let node = self.config.cluster.as_ref().map_or(0, |cluster| cluster.node_id);
        let member = members.contains(&node);
        let log = if member {
            let created = self.store.create_log().and_then(|ticket| ticket.wait());
            match created {
                Ok(log) => Some(log),
                Err(error) => {
                    self.store_failed(&error);
                    return Err(crate::definitions::internal_error(&error));
                }
            }
        } else {
            None
        };
        let settings = recorded.unwrap_or_else(|| quorum_settings(&settings));
        let definition = QuorumDefinition {
            group,
            members: members.to_vec(),
            arguments: arguments.to_vec(),
            log: log.map(|log| log.0),
            settings: settings.clone().into(),
            joined: !(declared_members.contains(&node) && declared_members == members),
            declared_members: declared_members.to_vec(),
        };
        let value = encode(&definition).map_err(internal)?;
        if let Err(error) = self.meta.put(&key(vhost_name, name), &value) {
            self.store_failed(&error);
            return Err(crate::definitions::internal_error(&error));
        }
        drop(definitions);
        if let Some(log) = log {
            let group_log = wharf_raft::GroupLog::open(&self.store, log, &Recovered::default())
                .map_err(|error| internal(format!("the queue's log cannot be opened: {error}")))?;
            self.start_quorum_group(vhost_name, name, &definition, settings, group_log)?;
        }
        Ok(())
    }

    /// Starts this node's member of a quorum queue's group (blocking).
    pub(crate) fn start_quorum_group(
        self: &Arc<Core>,
        vhost: &str,
        name: &str,
        definition: &QuorumDefinition,
        settings: QuorumSettings,
        log: wharf_raft::GroupLog,
    ) -> Result<(), ModelError> {
        let Some((transport, groups)) = self.cluster_links.get() else {
            return Err(internal("the cluster's links are not up"));
        };
        let handle = tokio::runtime::Handle::current();
        let start = GroupStart {
            core: self,
            transport,
            groups,
            group: definition.group,
            vhost,
            name,
            members: &definition.members,
            settings,
            log,
            initialize: !definition.joined,
        };
        crate::core::blocking(|| handle.block_on(start_group(start))).map(|_| ()).map_err(internal)
    }
}

/// What a quorum queue is declared with on this node.
#[derive(Debug, Clone)]
pub(crate) struct QuorumDeclaration<'a> {
    /// Its arguments, an AMQP field table in its wire form.
    pub arguments: &'a [u8],
    pub members: &'a [NodeId],
    pub declared_members: &'a [NodeId],
    /// Its group's id: the metadata entry that declared it.
    pub group: u64,
    /// The settings its record fixed; `None`: from its arguments and the policies now.
    pub settings: Option<QuorumSettings>,
}

/// A quorum queue found at recovery: its model queue is restored; on a member, its Raft log is
/// opened for the group to start once the links are up.
#[derive(Debug)]
pub(crate) struct RecoveredQuorumQueue {
    pub vhost: String,
    pub name: String,
    pub definition: QuorumDefinition,
    pub settings: QuorumSettings,
    pub log: Option<wharf_raft::GroupLog>,
}

/// Restores a quorum queue's record (recovery, step 3). Its store log is used, never an orphan.
pub(crate) fn restore(
    store: &Store,
    recovered: &Recovered,
    model: &mut wharf_model::BrokerModel,
    vhost_name: &str,
    name: &str,
    value: &[u8],
    used_logs: &mut std::collections::HashSet<LogId>,
) -> Option<RecoveredQuorumQueue> {
    let Some(definition) = decode(value) else {
        tracing::error!(queue = name, "a quorum queue's record is unreadable");
        return None;
    };
    used_logs.extend(definition.log.map(LogId));
    let table = wharf_wire::frame::decode_field_table(&definition.arguments).unwrap_or_default();
    let vhost = model.vhost_mut(vhost_name)?;
    if let Err(error) = declare_replicated(vhost, name, &table) {
        tracing::error!(queue = name, %error, "a quorum queue could not be restored");
        return None;
    }
    let log = match definition.log {
        Some(log) => match wharf_raft::GroupLog::open(store, LogId(log), recovered) {
            Ok(log) => Some(log),
            Err(error) => {
                tracing::error!(queue = name, %error, "a quorum queue's Raft log cannot be read; its group is not started");
                None
            }
        },
        None => None,
    };
    Some(RecoveredQuorumQueue {
        vhost: vhost_name.to_owned(),
        name: name.to_owned(),
        settings: definition.settings.clone().into(),
        definition,
        log,
    })
}

/// Whether the definitions log has a quorum queue record (never read as a classic queue).
pub(crate) fn is_record_kind(kind: &str) -> bool {
    kind == KIND
}

impl Core {
    /// `queue.delete` of a quorum queue on a cluster: refused as RabbitMQ refuses it when in use
    /// or not empty (by this node's replica), otherwise deleted on every node through the
    /// metadata group. Returns the ready messages it held; `None` if it is not a quorum queue
    /// here.
    pub(crate) fn delete_quorum_queue(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Option<Result<u32, ModelError>> {
        let metadata = self.metadata_group()?;
        if self.homed.home_of(vhost, name).is_some() {
            return self.delete_homed_queue(vhost, name, if_unused, if_empty);
        }
        let group = self.quorum.get(vhost, name);
        let replicated =
            self.lock_model().vhost(vhost).and_then(|found| found.queue(name)).is_some_and(|queue| queue.replicated);
        if !replicated {
            return None;
        }
        let (ready, _, consumers) = group.map_or((0, 0, 0), |group| group.counts());
        if if_unused && consumers > 0 {
            return Some(Err(ModelError::precondition_failed(format!("queue '{name}' in vhost '{vhost}' in use"))));
        }
        if if_empty && ready > 0 {
            return Some(Err(ModelError::precondition_failed(format!("queue '{name}' in vhost '{vhost}' not empty"))));
        }
        let command = MetaCommand::DeleteQuorumQueue { vhost: vhost.to_owned(), name: name.to_owned() };
        Some(match metadata.propose_blocking(command) {
            Ok(answer) => answer.into_model().map(|()| u32::try_from(ready).unwrap_or(u32::MAX)),
            Err(error) => Err(internal(error)),
        })
    }

    /// Carries out a quorum queue's deletion on this node (the metadata group's state machine
    /// calls it; blocking): out of the model (its consumers cancelled), its definition and
    /// bindings forgotten, its group stopped and its log deleted. Deleting one that is gone is a
    /// no-op.
    pub(crate) fn delete_quorum_queue_here(self: &Arc<Core>, vhost: &str, name: &str) -> Result<(), ModelError> {
        let definition = {
            let _definitions = self.definitions();
            let definition = self.meta.get(&key(vhost, name)).and_then(|value| decode(&value));
            if let Err(error) = self.meta.delete(&key(vhost, name)) {
                self.store_failed(&error);
                return Err(crate::definitions::internal_error(&error));
            }
            definition
        };
        // Its bindings' records go with it (`forget_queue`, through the deleted queue: durable).
        self.act(|model| Ok(((), model.remove_replicated_queue(vhost, name))))?;
        self.stop_quorum_group(vhost, name, definition.and_then(|definition| definition.log));
        Ok(())
    }

    /// Stops this node's member of a deleted quorum queue's group and deletes its log (blocking).
    pub(crate) fn stop_quorum_group(&self, vhost: &str, name: &str, log: Option<u64>) {
        if let Some(group) = self.quorum.remove(vhost, name) {
            let handle = tokio::runtime::Handle::current();
            crate::core::blocking(|| handle.block_on(group.shutdown()));
            if let Some((_, groups)) = self.cluster_links.get() {
                groups.remove(group.group);
            }
        }
        if let Some(log) = log {
            match self.store.delete_log(LogId(log)) {
                Ok(_) | Err(wharf_store::StoreError::UnknownLog(_)) => {}
                Err(error) => self.store_failed(&error),
            }
        }
    }

    /// `queue.purge` of a quorum queue: its ready messages removed on every replica; how many.
    /// `None` if it is not a quorum queue here.
    pub(crate) fn purge_quorum_queue(&self, vhost: &str, name: &str) -> Option<Result<u32, ModelError>> {
        if let Some(home) = self.remote_home(vhost, name) {
            return Some(self.purge_at_home(home, vhost, name));
        }
        let group = self.quorum.get(vhost, name)?;
        let receiver = group.propose_and_wait(wharf_model::QuorumCommand::Purge);
        let handle = tokio::runtime::Handle::current();
        // A backstop: each entry ahead of this one in its lane, and the enqueues it waits for,
        // is answered within the proposer's own timeout, but together they may take longer;
        // given up on here, the purge may still be applied, as one whose answer was lost.
        let within = super::PROPOSE_TIMEOUT * 2;
        let answer = crate::core::blocking(|| handle.block_on(tokio::time::timeout(within, receiver)));
        Some(match answer {
            Ok(Ok(Ok(wharf_model::QuorumAnswer::Removed { count }))) => Ok(u32::try_from(count).unwrap_or(u32::MAX)),
            Ok(Ok(Ok(_))) => Ok(0),
            Ok(Ok(Err(text))) => Err(internal(text)),
            Ok(Err(_)) => Err(internal("the quorum queue's group stopped")),
            Err(_) => Err(internal("the quorum queue's group did not answer in time")),
        })
    }
}

/// Puts a quorum queue into a vhost's model: durable, owned by no connection, its messages in
/// its group rather than in a store log of its own.
pub(super) fn declare_replicated(
    vhost: &mut wharf_model::VirtualHost,
    name: &str,
    arguments: &FieldTable,
) -> Result<(), ModelError> {
    let declare = QueueDeclare {
        name,
        passive: false,
        durable: true,
        exclusive: false,
        auto_delete: false,
        arguments,
        connection: wharf_model::ConnectionId(0),
        server_named: false,
        store_log: None,
        dedup_log: None,
    };
    vhost.declare_queue(&declare)?;
    if let Some(queue) = vhost.queue_mut(name) {
        queue.replicated = true;
    }
    Ok(())
}

/// The quorum queues (`vhost/name`) with a replica on `node`, by this node's definitions.
pub(crate) fn queues_on(meta: &wharf_store::MetaStore, node: NodeId) -> Vec<String> {
    let prefix = format!("{KIND}\0").into_bytes();
    meta.entries()
        .into_iter()
        .filter(|(key, _)| key.starts_with(&prefix))
        .filter(|(_, value)| decode(value).is_some_and(|definition| definition.members.contains(&node)))
        .map(|(key, _)| String::from_utf8_lossy(&key[prefix.len()..]).replacen('\0', "/", 1))
        .collect()
}
