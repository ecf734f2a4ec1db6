//! Snapshots of the metadata group: the replicated definitions as they stand after an applied
//! entry, so the group's log can be purged and a node that fell behind (or joins) is brought up
//! to date without replaying the cluster's whole history.
//!
//! A snapshot is the list of definitions a node's definitions log holds *for the cluster*
//! ([`items_of`]), each as the command that would declare it from nothing, in dependency order
//! (vhosts, users, permissions, topic permissions, policies, exchanges, quorum queues, homed
//! queues, exchange bindings, queue bindings). Commands rather than the log's records, because
//! records name node-local things (store logs, a quorum record's `log` and `joined`); and the
//! node that installs a snapshot carries its items out with the code a committed command runs
//! (`command.rs`), so its model, its connections and its definitions log change as they would
//! have entry by entry.
//!
//! What is replicated shares the definitions log with what is not, so items are chosen by kind:
//! vhosts, policies, users, permissions, topic permissions, exchanges, quorum and homed queues,
//! and bindings to an exchange or to a quorum or homed queue. A node's own classic queues, their
//! bindings, transient logs, MQTT state and the group's own records stay out. Users and policies
//! a node's configuration file defines are not records either: each node keeps its own, as
//! without snapshots.
//!
//! Installing ([`install`]) is a difference, not a reload: first what this node holds and the
//! snapshot does not (or holds otherwise, where a definition cannot change in place: an
//! exchange, a homed queue, a quorum queue of another group) is deleted, in reverse dependency
//! order; then what the snapshot holds and this node does not is declared, in order, against
//! what the deletions left (a deleted exchange takes its bindings with it; they come back if
//! the snapshot has them). Every step is "set to this" or "remove this", so a crash half-way is
//! repaired by installing the same snapshot again (`machine.rs` does, at the restart, when the
//! saved snapshot is newer than what the node recorded as applied).
//!
//! A quorum queue's item carries its group id, its members now and at its declaration, and the
//! settings its record fixed then (policies may have changed since): its replica here
//! initialises its group only as the declaration would have, and otherwise waits to be joined.
//!
//! Known limits, each rare (the node must have fallen behind a purge), left as they are:
//! - a difference cannot see a definition deleted and declared again alike while the node was
//!   behind: what the deletion would have removed of the node's own (a homed queue's messages on
//!   its home, bindings from a recreated exchange to this node's own classic queues, the node's
//!   own queues in a recreated vhost) stays. Only quorum queues carry an incarnation (their
//!   group id); vhost, exchange and homed-queue records would need one;
//! - definitions a node wrote before it was a cluster member, and those a `--definitions` file
//!   declares at each start, count as replicated: an install that does not hold them deletes
//!   them (keep such files alike on every node);
//! - a quorum queue recorded before records kept their declared members starts its replica
//!   from a snapshot waiting to be joined, never initialising its group.

use super::command::{MetaAnswer, MetaCommand, table_bytes};
use super::quorum_declare::{QuorumDeclaration, StoredSettings};
use crate::core::Core;
use crate::definition_format::{self, Definition};
use crate::identities::StoredIdentity;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use wharf_cluster::NodeId;
use wharf_model::Destination;

/// The encoding's version: a node refuses a snapshot of a version it does not know.
const SNAPSHOT_FORMAT_VERSION: u32 = 1;

/// A snapshot's data, as it travels and as it is saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotData {
    version: u32,
    items: Vec<MetaItem>,
}

/// One replicated definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum MetaItem {
    /// A definition one command declares whole: a vhost, a user, a permission, a topic
    /// permission, a policy, an exchange, a homed queue, a binding (`add`).
    Declared(MetaCommand),
    /// A quorum queue, with what its declaration fixed.
    QuorumQueue {
        vhost: String,
        name: String,
        group: u64,
        members: Vec<NodeId>,
        declared_members: Vec<NodeId>,
        arguments: Vec<u8>,
        settings: StoredSettings,
    },
}

impl MetaItem {
    /// Its place in dependency order.
    fn rank(&self) -> u8 {
        match self {
            MetaItem::Declared(command) => match command {
                MetaCommand::PutVhost { .. } => 0,
                MetaCommand::PutUser { .. } => 1,
                MetaCommand::PutPermission { .. } => 2,
                MetaCommand::PutTopicPermission { .. } => 3,
                MetaCommand::PutPolicy { .. } => 4,
                MetaCommand::DeclareExchange { .. } => 5,
                MetaCommand::DeclareHomedQueue { .. } => 7,
                MetaCommand::ExchangeBinding { .. } => 8,
                MetaCommand::QueueBinding { .. } => 9,
                _ => 10,
            },
            MetaItem::QuorumQueue { .. } => 6,
        }
    }

    /// What names the definition: two items with one key are the same definition, possibly with
    /// other properties. A binding is named by all of it.
    fn key(&self) -> (u8, Vec<String>) {
        let parts: Vec<&String> = match self {
            MetaItem::QuorumQueue { vhost, name, .. } => vec![vhost, name],
            MetaItem::Declared(command) => match command {
                MetaCommand::PutVhost { name, .. } | MetaCommand::PutUser { name, .. } => vec![name],
                MetaCommand::PutPermission { user, vhost, .. } => vec![user, vhost],
                MetaCommand::PutTopicPermission { user, vhost, exchange, .. } => vec![user, vhost, exchange],
                MetaCommand::PutPolicy { vhost, name, .. }
                | MetaCommand::DeclareExchange { vhost, name, .. }
                | MetaCommand::DeclareHomedQueue { vhost, name, .. } => vec![vhost, name],
                MetaCommand::QueueBinding { vhost, source, queue: destination, routing_key, arguments, .. }
                | MetaCommand::ExchangeBinding { vhost, source, destination, routing_key, arguments, .. } => {
                    let arguments = format!("{arguments:?}");
                    return (
                        self.rank(),
                        vec![vhost.clone(), source.clone(), destination.clone(), routing_key.clone(), arguments],
                    );
                }
                _ => vec![],
            },
        };
        (self.rank(), parts.into_iter().cloned().collect())
    }

    /// Whether a declaration with other properties changes this one in place, with no delete
    /// first: a put of a vhost, user, permission or policy, and a quorum queue of the same group
    /// (its members change through `QuorumMembers`).
    fn changes_in_place(&self, theirs: &MetaItem) -> bool {
        match (self, theirs) {
            (MetaItem::QuorumQueue { group: ours, .. }, MetaItem::QuorumQueue { group: theirs, .. }) => ours == theirs,
            (MetaItem::Declared(command), _) => matches!(
                command,
                MetaCommand::PutVhost { .. }
                    | MetaCommand::PutUser { .. }
                    | MetaCommand::PutPermission { .. }
                    | MetaCommand::PutTopicPermission { .. }
                    | MetaCommand::PutPolicy { .. }
            ),
            _ => false,
        }
    }

    /// The command that removes it.
    fn delete_command(&self) -> Option<MetaCommand> {
        let command = match self {
            MetaItem::QuorumQueue { vhost, name, .. } => {
                MetaCommand::DeleteQuorumQueue { vhost: vhost.clone(), name: name.clone() }
            }
            MetaItem::Declared(command) => match command.clone() {
                MetaCommand::PutVhost { name, .. } => MetaCommand::DeleteVhost { name },
                MetaCommand::PutUser { name, .. } => MetaCommand::DeleteUser { name },
                MetaCommand::PutPermission { user, vhost, .. } => MetaCommand::DeletePermission { user, vhost },
                // Only all of a user's topic permissions on a vhost can go; the others come back
                // in the declarations that follow (they are compared with what is left).
                MetaCommand::PutTopicPermission { user, vhost, .. } => {
                    MetaCommand::DeleteTopicPermissions { user, vhost }
                }
                MetaCommand::PutPolicy { vhost, name, .. } => MetaCommand::DeletePolicy { vhost, name },
                MetaCommand::DeclareExchange { vhost, name, .. } => {
                    MetaCommand::DeleteExchange { vhost, name, if_unused: false }
                }
                MetaCommand::DeclareHomedQueue { vhost, name, .. } => MetaCommand::DeleteHomedQueue { vhost, name },
                MetaCommand::QueueBinding { vhost, source, queue, routing_key, arguments, .. } => {
                    MetaCommand::QueueBinding { vhost, source, queue, routing_key, arguments, add: false }
                }
                MetaCommand::ExchangeBinding { vhost, source, destination, routing_key, arguments, .. } => {
                    MetaCommand::ExchangeBinding { vhost, source, destination, routing_key, arguments, add: false }
                }
                _ => return None,
            },
        };
        Some(command)
    }
}

/// The replicated definitions this node's definitions log holds, in dependency order. A record
/// this node cannot read is left out and logged (recovery leaves it out of the broker too).
pub(crate) fn items_of(core: &Core) -> Vec<MetaItem> {
    let entries = {
        let _definitions = core.definitions();
        core.meta.entries()
    };
    let replicated_queues: HashSet<(&str, &str)> = entries
        .keys()
        .filter_map(|key| definition_format::split_key(key))
        .filter(|(kind, ..)| *kind == super::quorum_declare::KIND || *kind == super::homed::KIND)
        .map(|(_, vhost, name)| (vhost, name))
        .collect();
    let mut items = Vec::new();
    for (key, value) in &entries {
        let Some((kind, vhost, rest)) = definition_format::split_key(key) else { continue };
        let item = match kind {
            "vhost" => crate::policy_records::decode_vhost(value).map(|(description, tags)| {
                MetaItem::Declared(MetaCommand::PutVhost { name: vhost.to_owned(), description, tags })
            }),
            "policy" => crate::policy_records::decode_policy(rest, value).and_then(|policy| {
                Some(MetaItem::Declared(MetaCommand::PutPolicy {
                    vhost: vhost.to_owned(),
                    name: policy.name,
                    pattern: policy.pattern.as_str().to_owned(),
                    apply_to: policy.apply_to.as_str().to_owned(),
                    priority: policy.priority,
                    definition: table_bytes(&policy.definition).ok()?,
                }))
            }),
            "user" | "permission" | "topic-permission" => crate::identities::decode(kind, vhost, rest, value)
                .map(|identity| MetaItem::Declared(identity_command(identity))),
            "exchange" | "binding" => match definition_format::decode(key, value) {
                Ok(Definition::Exchange { vhost, name, stored }) => {
                    table_bytes(&stored.arguments).ok().map(|arguments| {
                        MetaItem::Declared(MetaCommand::DeclareExchange {
                            vhost,
                            name,
                            kind: stored.kind,
                            auto_delete: stored.auto_delete,
                            internal: stored.internal,
                            arguments,
                        })
                    })
                }
                Ok(Definition::Binding { vhost, stored }) => {
                    let replicated = match &stored.destination {
                        Destination::Exchange(_) => true,
                        Destination::Queue(queue) => replicated_queues.contains(&(vhost.as_str(), queue.as_str())),
                    };
                    if !replicated {
                        continue;
                    }
                    table_bytes(&stored.arguments).ok().map(|arguments| {
                        MetaItem::Declared(match stored.destination {
                            Destination::Queue(queue) => MetaCommand::QueueBinding {
                                vhost,
                                source: stored.source,
                                queue,
                                routing_key: stored.routing_key,
                                arguments,
                                add: true,
                            },
                            Destination::Exchange(destination) => MetaCommand::ExchangeBinding {
                                vhost,
                                source: stored.source,
                                destination,
                                routing_key: stored.routing_key,
                                arguments,
                                add: true,
                            },
                        })
                    })
                }
                _ => None,
            },
            super::quorum_declare::KIND => super::quorum_declare::decode(value).map(|record| MetaItem::QuorumQueue {
                vhost: vhost.to_owned(),
                name: rest.to_owned(),
                group: record.group,
                members: record.members,
                declared_members: record.declared_members,
                arguments: record.arguments,
                settings: record.settings,
            }),
            super::homed::KIND => super::homed::decode(value).map(|record| {
                MetaItem::Declared(MetaCommand::DeclareHomedQueue {
                    vhost: vhost.to_owned(),
                    name: rest.to_owned(),
                    home: record.home,
                    arguments: record.arguments,
                })
            }),
            _ => continue,
        };
        match item {
            Some(item) => items.push(item),
            None => {
                tracing::error!(kind, vhost, "a definition record is unreadable; left out of the metadata snapshot")
            }
        }
    }
    items.sort_by_key(MetaItem::rank);
    items
}

fn identity_command(identity: StoredIdentity) -> MetaCommand {
    match identity {
        StoredIdentity::User(user) => {
            let (hash, algorithm) = user.password.to_rabbitmq();
            MetaCommand::PutUser { name: user.name, password_hash: Some((hash, algorithm.to_owned())), tags: user.tags }
        }
        StoredIdentity::Permission(permission) => MetaCommand::PutPermission {
            user: permission.user,
            vhost: permission.vhost,
            configure: permission.configure,
            write: permission.write,
            read: permission.read,
        },
        StoredIdentity::TopicPermission(permission) => MetaCommand::PutTopicPermission {
            user: permission.user,
            vhost: permission.vhost,
            exchange: permission.exchange,
            write: permission.write,
            read: permission.read,
        },
    }
}

/// A snapshot's data: this node's replicated definitions, encoded.
pub(crate) fn encode(items: Vec<MetaItem>) -> Result<Vec<u8>, String> {
    serde_json::to_vec(&SnapshotData { version: SNAPSHOT_FORMAT_VERSION, items }).map_err(|error| error.to_string())
}

/// The items of a snapshot's data.
pub(crate) fn decode(data: &[u8]) -> Result<Vec<MetaItem>, String> {
    let decoded: SnapshotData =
        serde_json::from_slice(data).map_err(|error| format!("the metadata snapshot is unreadable: {error}"))?;
    if decoded.version != SNAPSHOT_FORMAT_VERSION {
        return Err(format!("the metadata snapshot's format {} is not known to this node", decoded.version));
    }
    Ok(decoded.items)
}

/// Makes this node's replicated definitions those of `theirs` (blocking: each change is
/// synced). An error is a change this node could not make (its store failed); a change the
/// broker refused is logged and the others are still made, as a committed command's refusal
/// would be.
pub(crate) fn install(core: &Arc<Core>, theirs: &[MetaItem]) -> Result<(), String> {
    let wanted: HashMap<(u8, Vec<String>), &MetaItem> = theirs.iter().map(|item| (item.key(), item)).collect();
    let mut changes = 0usize;
    for ours in items_of(core).iter().rev() {
        let keep = match wanted.get(&ours.key()) {
            Some(theirs) => *theirs == ours || ours.changes_in_place(theirs),
            None => false,
        };
        if keep {
            continue;
        }
        if let Some(command) = ours.delete_command() {
            carry_out(core, command)?;
            changes += 1;
        }
    }
    let held: BTreeMap<(u8, Vec<String>), MetaItem> =
        items_of(core).into_iter().map(|item| (item.key(), item)).collect();
    for item in theirs {
        let ours = held.get(&item.key());
        if ours == Some(item) {
            continue;
        }
        match item {
            MetaItem::Declared(command) => carry_out(core, command.clone())?,
            MetaItem::QuorumQueue { vhost, name, group, members, declared_members, arguments, settings } => {
                match ours {
                    // The same group: only its members can differ (the rest is fixed at its
                    // declaration).
                    Some(MetaItem::QuorumQueue { members: held_members, group: held_group, .. })
                        if held_group == group =>
                    {
                        if held_members == members {
                            continue;
                        }
                        let command = MetaCommand::QuorumMembers {
                            vhost: vhost.clone(),
                            name: name.clone(),
                            members: members.clone(),
                        };
                        carry_out(core, command)?;
                    }
                    // Another group of that name is still here: its deletion above was refused.
                    Some(MetaItem::QuorumQueue { .. }) => {
                        return Err(format!("quorum queue '{name}' in vhost '{vhost}' of another group is still here"));
                    }
                    _ => {
                        let declaration = QuorumDeclaration {
                            arguments,
                            members,
                            declared_members,
                            group: *group,
                            settings: Some(settings.clone().into()),
                        };
                        let answer = MetaAnswer::of_model(core.declare_quorum_queue_as(vhost, name, declaration));
                        checked("declare quorum queue", answer)?;
                    }
                }
            }
        }
        changes += 1;
    }
    tracing::info!(items = theirs.len(), changes, "metadata snapshot installed");
    Ok(())
}

fn carry_out(core: &Arc<Core>, command: MetaCommand) -> Result<(), String> {
    let kind = command.kind();
    // No command here declares a quorum queue (those go through `declare_quorum_queue_as`), so
    // the index, which only names a new quorum queue's group, is never read.
    checked(kind, command.apply(core, 0))
}

fn checked(kind: &str, answer: MetaAnswer) -> Result<(), String> {
    match answer {
        MetaAnswer::Done { .. } => Ok(()),
        MetaAnswer::Failed(error) => Err(format!("{kind}: {error}")),
        // A store failure comes back as an internal error, not as `Failed`: the install stops
        // there (and is made again), rather than recording definitions it did not make.
        MetaAnswer::Model { code, text, .. } | MetaAnswer::Refused { code, text }
            if code == wharf_wire::reply_code::INTERNAL_ERROR =>
        {
            Err(format!("{kind}: {text}"))
        }
        refused => {
            tracing::warn!(kind, ?refused, "a change of a metadata snapshot was refused on this node");
            Ok(())
        }
    }
}
