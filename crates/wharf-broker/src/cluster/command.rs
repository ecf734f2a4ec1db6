//! The metadata group's commands: each definition change a cluster replicates, as the *semantic*
//! change (declare this exchange, put this user) rather than the definitions-log records one node
//! wrote for it, because those records name node-local things (store logs, password salts made
//! on the spot). Every node carries a committed command out with the code a broker alone runs
//! (`definitions.rs`, `manage/identity_ops.rs`, `manage/policy_ops.rs`), so what it writes to its
//! own definitions log, its model and its connections is what a single node would.
//!
//! Why commands are all "set to this" or "remove this": a node applies a command, then records
//! that it did (`machine.rs`); a crash between the two makes it apply the command again at its
//! restart, which must leave the same state. A command's outcome on a node depends only on the
//! replicated state before it (and on the node's own configuration, which the operator keeps
//! alike on every node), so every node reaches the same outcome; the client is answered with
//! the leader's.

use crate::core::Core;
use crate::definitions::BindingChange;
use crate::manage::{Listeners, Management, ManagementError, NewPassword, PolicySpec};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use wharf_model::{ApplyTo, ConnectionId, Destination, ModelError, Scope};
use wharf_wire::protocol::exchange;
use wharf_wire::types::FieldTable;

/// A definition change the metadata group replicates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum MetaCommand {
    PutVhost {
        name: String,
        description: String,
        tags: Vec<String>,
    },
    DeleteVhost {
        name: String,
    },
    /// A user with its password already hashed where the change was asked for (a salt made on
    /// each node would give each node another hash); `None` keeps the user's password.
    PutUser {
        name: String,
        password_hash: Option<StoredHash>,
        tags: Vec<String>,
    },
    DeleteUser {
        name: String,
    },
    PutPermission {
        user: String,
        vhost: String,
        configure: String,
        write: String,
        read: String,
    },
    DeletePermission {
        user: String,
        vhost: String,
    },
    PutTopicPermission {
        user: String,
        vhost: String,
        exchange: String,
        write: String,
        read: String,
    },
    DeleteTopicPermissions {
        user: String,
        vhost: String,
    },
    PutPolicy {
        vhost: String,
        name: String,
        pattern: String,
        apply_to: String,
        priority: i64,
        /// The definition as an AMQP field table in its wire form.
        definition: Vec<u8>,
    },
    DeletePolicy {
        vhost: String,
        name: String,
    },
    /// A durable exchange (transient ones stay on the node that declared them).
    DeclareExchange {
        vhost: String,
        name: String,
        kind: String,
        auto_delete: bool,
        internal: bool,
        /// Its arguments as an AMQP field table in its wire form.
        arguments: Vec<u8>,
    },
    DeleteExchange {
        vhost: String,
        name: String,
        if_unused: bool,
    },
    /// A quorum queue on `members` (`quorum_declare.rs`); its group's id is this entry's index.
    DeclareQuorumQueue {
        vhost: String,
        name: String,
        arguments: Vec<u8>,
        members: Vec<u64>,
    },
    /// A quorum queue deleted on every node.
    DeleteQuorumQueue {
        vhost: String,
        name: String,
    },
    /// A quorum queue's replicas are now on `members` (`replicas.rs`).
    QuorumMembers {
        vhost: String,
        name: String,
        members: Vec<u64>,
    },
    /// A durable classic queue on its home node, reached from every other node (`homed.rs`).
    DeclareHomedQueue {
        vhost: String,
        name: String,
        home: u64,
        arguments: Vec<u8>,
    },
    /// A homed classic queue deleted on every node.
    DeleteHomedQueue {
        vhost: String,
        name: String,
    },
    /// A binding from an exchange to a quorum or homed queue (`add`), or its removal.
    QueueBinding {
        vhost: String,
        source: String,
        queue: String,
        routing_key: String,
        arguments: Vec<u8>,
        add: bool,
    },
    /// A binding between two exchanges (`add`), or its removal.
    ExchangeBinding {
        vhost: String,
        source: String,
        destination: String,
        routing_key: String,
        arguments: Vec<u8>,
        add: bool,
    },
}

/// A password hash as RabbitMQ exports it: (hash in base64, algorithm name); an empty hash is a
/// user without a password.
pub(crate) type StoredHash = (String, String);

/// What a command came to on the node that answered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum MetaAnswer {
    /// Done; `created` when it made something new (a vhost, user, permission or policy).
    Done {
        created: bool,
    },
    /// Refused as the AMQP method would be.
    Model {
        code: u16,
        text: String,
        connection_scope: bool,
    },
    /// Refused as the management call would be.
    NotFound(String),
    AccessRefused(String),
    Refused {
        code: u16,
        text: String,
    },
    BadRequest(String),
    /// The command could not be read or carried out at all.
    Failed(String),
}

impl MetaAnswer {
    fn of_management(result: Result<bool, ManagementError>) -> MetaAnswer {
        match result {
            Ok(created) => MetaAnswer::Done { created },
            Err(ManagementError::NotFound(text)) => MetaAnswer::NotFound(text),
            Err(ManagementError::AccessRefused(text)) => MetaAnswer::AccessRefused(text),
            Err(ManagementError::Refused { code, text }) => MetaAnswer::Refused { code, text },
            Err(ManagementError::BadRequest(text)) => MetaAnswer::BadRequest(text),
            Err(ManagementError::Unavailable(text)) => MetaAnswer::Failed(text),
        }
    }

    pub(crate) fn of_model(result: Result<(), ModelError>) -> MetaAnswer {
        match result {
            Ok(()) => MetaAnswer::Done { created: false },
            Err(error) => MetaAnswer::Model {
                code: error.code,
                text: error.text,
                connection_scope: error.scope == Scope::Connection,
            },
        }
    }

    /// The answer as a management call's result.
    pub fn into_management(self) -> Result<bool, ManagementError> {
        match self {
            MetaAnswer::Done { created } => Ok(created),
            MetaAnswer::Model { code, text, .. } => {
                Err(ManagementError::from(ModelError { code, text, scope: Scope::Channel }))
            }
            MetaAnswer::NotFound(text) => Err(ManagementError::NotFound(text)),
            MetaAnswer::AccessRefused(text) => Err(ManagementError::AccessRefused(text)),
            MetaAnswer::Refused { code, text } => Err(ManagementError::Refused { code, text }),
            MetaAnswer::BadRequest(text) => Err(ManagementError::BadRequest(text)),
            MetaAnswer::Failed(text) => Err(ManagementError::Refused { code: 541, text }),
        }
    }

    /// The answer as an AMQP method's result.
    pub fn into_model(self) -> Result<(), ModelError> {
        let scoped = |code: u16, text: String, connection: bool| ModelError {
            code,
            text,
            scope: if connection { Scope::Connection } else { Scope::Channel },
        };
        match self {
            MetaAnswer::Done { .. } => Ok(()),
            MetaAnswer::Model { code, text, connection_scope } => Err(scoped(code, text, connection_scope)),
            MetaAnswer::NotFound(text) => Err(ModelError::not_found(text)),
            MetaAnswer::AccessRefused(text) => Err(scoped(403, text, false)),
            MetaAnswer::Refused { code, text } => Err(scoped(code, text, false)),
            MetaAnswer::BadRequest(text) => Err(ModelError::precondition_failed(text)),
            MetaAnswer::Failed(text) => Err(internal(text)),
        }
    }
}

/// 541 on the connection: the command could not be carried out at all.
pub(crate) fn internal(detail: impl std::fmt::Display) -> ModelError {
    ModelError {
        code: wharf_wire::reply_code::INTERNAL_ERROR,
        text: format!("INTERNAL_ERROR - {detail}"),
        scope: Scope::Connection,
    }
}

fn table(bytes: &[u8], what: &str) -> Result<FieldTable, String> {
    wharf_wire::frame::decode_field_table(bytes).ok_or_else(|| format!("the command's {what} is not a field table"))
}

impl MetaCommand {
    /// The command's name, for logs (its fields can hold a password hash).
    pub fn kind(&self) -> &'static str {
        match self {
            MetaCommand::PutVhost { .. } => "put vhost",
            MetaCommand::DeleteVhost { .. } => "delete vhost",
            MetaCommand::PutUser { .. } => "put user",
            MetaCommand::DeleteUser { .. } => "delete user",
            MetaCommand::PutPermission { .. } => "put permission",
            MetaCommand::DeletePermission { .. } => "delete permission",
            MetaCommand::PutTopicPermission { .. } => "put topic permission",
            MetaCommand::DeleteTopicPermissions { .. } => "delete topic permissions",
            MetaCommand::PutPolicy { .. } => "put policy",
            MetaCommand::DeletePolicy { .. } => "delete policy",
            MetaCommand::DeclareExchange { .. } => "declare exchange",
            MetaCommand::DeleteExchange { .. } => "delete exchange",
            MetaCommand::DeclareQuorumQueue { .. } => "declare quorum queue",
            MetaCommand::DeleteQuorumQueue { .. } => "delete quorum queue",
            MetaCommand::QuorumMembers { .. } => "quorum queue members",
            MetaCommand::DeclareHomedQueue { .. } => "declare homed queue",
            MetaCommand::DeleteHomedQueue { .. } => "delete homed queue",
            MetaCommand::QueueBinding { .. } => "queue binding",
            MetaCommand::ExchangeBinding { .. } => "exchange binding",
        }
    }

    /// Carries the command out on this node, as a broker alone would (blocking: definitions-log
    /// writes; run off the async workers).
    pub fn apply(self, core: &Arc<Core>, index: u64) -> MetaAnswer {
        let management = Management::new(Arc::clone(core), 0, Listeners::default());
        match self {
            MetaCommand::PutVhost { name, description, tags } => {
                MetaAnswer::of_management(management.put_vhost_here(&name, &description, &tags))
            }
            MetaCommand::DeleteVhost { name } => {
                MetaAnswer::of_management(management.delete_vhost_here(&name).map(|()| false))
            }
            MetaCommand::PutUser { name, password_hash, tags } => {
                let password = match password_hash {
                    Some((password_hash, hashing_algorithm)) => NewPassword::Hash { password_hash, hashing_algorithm },
                    None => NewPassword::Keep,
                };
                MetaAnswer::of_management(management.put_user_here(&name, password, tags))
            }
            MetaCommand::DeleteUser { name } => {
                MetaAnswer::of_management(management.delete_user_here(&name).map(|()| false))
            }
            MetaCommand::PutPermission { user, vhost, configure, write, read } => {
                MetaAnswer::of_management(management.put_permission_here(crate::Permission {
                    user,
                    vhost,
                    configure,
                    write,
                    read,
                }))
            }
            MetaCommand::DeletePermission { user, vhost } => {
                MetaAnswer::of_management(management.delete_permission_here(&user, &vhost).map(|()| false))
            }
            MetaCommand::PutTopicPermission { user, vhost, exchange, write, read } => MetaAnswer::of_management(
                management
                    .put_topic_permission_here(crate::TopicPermission { user, vhost, exchange, write, read })
                    .map(|()| false),
            ),
            MetaCommand::DeleteTopicPermissions { user, vhost } => {
                MetaAnswer::of_management(management.delete_topic_permissions_here(&user, &vhost).map(|()| false))
            }
            MetaCommand::PutPolicy { vhost, name, pattern, apply_to, priority, definition } => {
                let spec = match (ApplyTo::parse(&apply_to), table(&definition, "policy definition")) {
                    (Ok(apply_to), Ok(definition)) => PolicySpec { pattern, apply_to, priority, definition },
                    (Err(error), _) => return MetaAnswer::BadRequest(error.text),
                    (_, Err(error)) => return MetaAnswer::Failed(error),
                };
                MetaAnswer::of_management(management.put_policy_here(&vhost, &name, spec))
            }
            MetaCommand::DeletePolicy { vhost, name } => {
                MetaAnswer::of_management(management.delete_policy_here(&vhost, &name).map(|()| false))
            }
            MetaCommand::DeclareExchange { vhost, name, kind, auto_delete, internal, arguments } => {
                let arguments = match table(&arguments, "exchange arguments") {
                    Ok(arguments) => arguments,
                    Err(error) => return MetaAnswer::Failed(error),
                };
                let declare = exchange::Declare {
                    exchange: name.as_str().into(),
                    kind: kind.as_str().into(),
                    passive: false,
                    durable: true,
                    auto_delete,
                    internal,
                    nowait: false,
                    arguments,
                };
                MetaAnswer::of_model(core.declare_exchange_here(&vhost, &declare))
            }
            MetaCommand::DeleteExchange { vhost, name, if_unused } => {
                MetaAnswer::of_model(core.delete_exchange_here(&vhost, &name, if_unused))
            }
            MetaCommand::DeclareQuorumQueue { vhost, name, arguments, members } => {
                MetaAnswer::of_model(core.declare_quorum_queue_here(&vhost, &name, &arguments, &members, index))
            }
            MetaCommand::QuorumMembers { vhost, name, members } => {
                core.set_quorum_members_here(&vhost, &name, &members)
            }
            MetaCommand::DeleteQuorumQueue { vhost, name } => {
                MetaAnswer::of_model(core.delete_quorum_queue_here(&vhost, &name))
            }
            MetaCommand::DeclareHomedQueue { vhost, name, home, arguments } => {
                MetaAnswer::of_model(core.declare_homed_queue_here(&vhost, &name, home, &arguments))
            }
            MetaCommand::DeleteHomedQueue { vhost, name } => {
                MetaAnswer::of_model(core.delete_homed_queue_here(&vhost, &name))
            }
            MetaCommand::QueueBinding { vhost, source, queue, routing_key, arguments, add } => {
                bind(core, &vhost, &source, &Destination::Queue(queue), &routing_key, &arguments, add)
            }
            MetaCommand::ExchangeBinding { vhost, source, destination, routing_key, arguments, add } => {
                bind(core, &vhost, &source, &Destination::Exchange(destination), &routing_key, &arguments, add)
            }
        }
    }
}

/// Adds or removes a binding to either kind of destination, its arguments in wire form.
fn bind(
    core: &Core,
    vhost: &str,
    source: &str,
    destination: &Destination,
    routing_key: &str,
    arguments: &[u8],
    add: bool,
) -> MetaAnswer {
    let arguments = match table(arguments, "binding arguments") {
        Ok(arguments) => arguments,
        Err(error) => return MetaAnswer::Failed(error),
    };
    let change =
        BindingChange { vhost, connection: ConnectionId(0), source, destination, routing_key, arguments: &arguments };
    MetaAnswer::of_model(core.change_binding_here(&change, add))
}

/// A field table in its wire form, for a command.
pub(crate) fn table_bytes(table: &FieldTable) -> Result<Vec<u8>, ModelError> {
    wharf_wire::frame::encode_field_table(table)
        .ok_or_else(|| ModelError::precondition_failed("the arguments cannot be encoded as a field table"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn answers_keep_their_meaning_through_both_forms() {
        let refused = MetaAnswer::Model { code: 406, text: "PRECONDITION_FAILED - x".into(), connection_scope: false };
        let error = refused.clone().into_model().unwrap_err();
        assert_eq!((error.code, error.scope), (406, Scope::Channel));
        assert!(matches!(refused.into_management(), Err(ManagementError::Refused { code: 406, .. })));
        assert!(matches!(MetaAnswer::NotFound("no".into()).into_management(), Err(ManagementError::NotFound(_))));
        assert_eq!(MetaAnswer::NotFound("no".into()).into_model().unwrap_err().code, 404);
        assert!(MetaAnswer::Done { created: true }.into_management().unwrap());
        let forced = MetaAnswer::Model { code: 530, text: "NOT_ALLOWED".into(), connection_scope: true };
        assert_eq!(forced.into_model().unwrap_err().scope, Scope::Connection);
    }

    #[test]
    fn commands_travel_as_json_unchanged() {
        let command = MetaCommand::PutPolicy {
            vhost: "/".into(),
            name: "p".into(),
            pattern: "^q".into(),
            apply_to: "queues".into(),
            priority: 3,
            definition: table_bytes(&FieldTable::default()).unwrap(),
        };
        let bytes = serde_json::to_vec(&command).unwrap();
        assert_eq!(serde_json::from_slice::<MetaCommand>(&bytes).unwrap(), command);
    }
}
