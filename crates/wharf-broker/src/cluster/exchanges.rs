//! Where an exchange change goes: every path that declares, deletes or binds exchanges (AMQP
//! methods, the management API, a definitions import, MQTT) calls these, and they decide between
//! this node alone (`definitions.rs`, the `_here` functions) and the metadata group.
//!
//! Replicated: declares of durable exchanges, deletes of exchanges that are durable here, and
//! bindings from a durable exchange to another durable exchange, a quorum queue or a homed
//! classic queue (`homed.rs`). Everything else stays on this node: transient exchanges (as a
//! broker alone forgets them at a restart, a node would hold them alone), and bindings to
//! queues of this node alone (exclusive, transient). A passive declare reads this node.

use super::MetaCommand;
use super::command::{internal, table_bytes};
use crate::core::Core;
use crate::definitions::BindingChange;
use wharf_model::{Destination, ModelError};
use wharf_wire::protocol::exchange;

impl Core {
    /// Proposes `command` to the metadata group and waits for its answer (blocking).
    fn replicate(&self, command: MetaCommand) -> Option<Result<(), ModelError>> {
        let group = self.metadata_group()?;
        Some(match group.propose_blocking(command) {
            Ok(answer) => answer.into_model(),
            Err(error) => Err(internal(error)),
        })
    }

    /// Whether `name` is a durable exchange of `vhost` on this node.
    fn is_durable_exchange(&self, vhost: &str, name: &str) -> bool {
        let model = self.lock_model();
        model.vhost(vhost).and_then(|vhost| vhost.exchange(name)).is_some_and(|exchange| exchange.durable)
    }

    /// `exchange.declare` (see `declare_exchange_here`).
    pub fn declare_exchange(&self, vhost: &str, declare: &exchange::Declare) -> Result<(), ModelError> {
        if self.metadata_group().is_some() && declare.durable && !declare.passive {
            let command = MetaCommand::DeclareExchange {
                vhost: vhost.to_owned(),
                name: declare.exchange.to_string(),
                kind: declare.kind.to_string(),
                auto_delete: declare.auto_delete,
                internal: declare.internal,
                arguments: table_bytes(&declare.arguments)?,
            };
            if let Some(result) = self.replicate(command) {
                return result;
            }
        }
        self.declare_exchange_here(vhost, declare)
    }

    /// `exchange.delete` (see `delete_exchange_here`).
    pub fn delete_exchange(&self, vhost: &str, name: &str, if_unused: bool) -> Result<(), ModelError> {
        if self.metadata_group().is_some() && self.is_durable_exchange(vhost, name) {
            let command = MetaCommand::DeleteExchange { vhost: vhost.to_owned(), name: name.to_owned(), if_unused };
            if let Some(result) = self.replicate(command) {
                return result;
            }
        }
        self.delete_exchange_here(vhost, name, if_unused)
    }

    /// A binding change (see `change_binding_here`). On a cluster, a binding from a durable
    /// exchange to a quorum queue or to another durable exchange is a definition every node
    /// holds, so it goes through the metadata group; the rest stays on this node.
    pub fn change_binding(&self, change: &BindingChange<'_>, add: bool) -> Result<(), ModelError> {
        if self.metadata_group().is_none() {
            return self.change_binding_here(change, add);
        }
        let replicated = {
            let model = self.lock_model();
            let vhost = model.vhost(change.vhost);
            let durable_exchange =
                |name: &str| vhost.and_then(|vhost| vhost.exchange(name)).is_some_and(|exchange| exchange.durable);
            durable_exchange(change.source)
                && match change.destination {
                    Destination::Queue(queue) => {
                        vhost.and_then(|vhost| vhost.queue(queue)).is_some_and(|queue| queue.replicated)
                            || self.homed.home_of(change.vhost, queue).is_some()
                    }
                    Destination::Exchange(destination) => durable_exchange(destination),
                }
        };
        if replicated {
            let (vhost, source, routing_key) =
                (change.vhost.to_owned(), change.source.to_owned(), change.routing_key.to_owned());
            let arguments = table_bytes(change.arguments)?;
            let command = match change.destination {
                Destination::Queue(queue) => {
                    MetaCommand::QueueBinding { vhost, source, queue: queue.clone(), routing_key, arguments, add }
                }
                Destination::Exchange(destination) => MetaCommand::ExchangeBinding {
                    vhost,
                    source,
                    destination: destination.clone(),
                    routing_key,
                    arguments,
                    add,
                },
            };
            if let Some(result) = self.replicate(command) {
                return result;
            }
        }
        self.change_binding_here(change, add)
    }
}
