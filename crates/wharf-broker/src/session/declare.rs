//! `exchange.*` and `queue.*` methods: answered here, carried out by the definitions module
//! (durable definitions) and the model.

use super::{MethodResult, Session};
use crate::access::{Resource, Right};
use crate::definitions::{BindingChange, QueueRequest};
use crate::persist::text_argument;
use wharf_model::broker::{DIRECT_REPLY_TO, DIRECT_REPLY_TO_PREFIX};
use wharf_model::{Destination, ModelError};
use wharf_wire::protocol::{AMQPClass, exchange, queue};
use wharf_wire::types::FieldTable;

impl Session {
    /// A binding change on this connection's vhost.
    fn binding_change<'a>(
        &'a self,
        source: &'a str,
        destination: &'a Destination,
        routing_key: &'a str,
        arguments: &'a FieldTable,
    ) -> BindingChange<'a> {
        BindingChange { vhost: &self.vhost, connection: self.connection, source, destination, routing_key, arguments }
    }

    pub(super) fn exchange_class(&mut self, channel: u16, method: exchange::AMQPMethod) -> MethodResult {
        match method {
            exchange::AMQPMethod::Declare(declare) => {
                if !declare.passive {
                    let name = declare.exchange.as_str();
                    self.allow(Right::Configure, Resource::Exchange, name)?;
                    // The alternate exchange's rights only for an exchange that is new (RabbitMQ).
                    let exists = {
                        let model = self.core.lock_model();
                        model.vhost(&self.vhost).is_some_and(|vhost| vhost.exchange(name).is_some())
                    };
                    if !exists && let Some(alternate) = text_argument(&declare.arguments, "alternate-exchange") {
                        self.allow(Right::Read, Resource::Exchange, name)?;
                        self.allow(Right::Write, Resource::Exchange, &alternate)?;
                    }
                }
                self.core.declare_exchange(&self.vhost, &declare)?;
                if !declare.nowait {
                    self.send(channel, AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})));
                }
                Ok(())
            }
            exchange::AMQPMethod::Delete(delete) => {
                self.allow(Right::Configure, Resource::Exchange, delete.exchange.as_str())?;
                self.core.delete_exchange(&self.vhost, delete.exchange.as_str(), delete.if_unused)?;
                if !delete.nowait {
                    self.send(channel, AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})));
                }
                Ok(())
            }
            exchange::AMQPMethod::Bind(bind) => {
                self.allow_binding(
                    Resource::Exchange,
                    bind.destination.as_str(),
                    bind.source.as_str(),
                    bind.routing_key.as_str(),
                )?;
                let destination = Destination::Exchange(bind.destination.as_str().to_owned());
                let change =
                    self.binding_change(bind.source.as_str(), &destination, bind.routing_key.as_str(), &bind.arguments);
                self.core.change_binding(&change, true)?;
                if !bind.nowait {
                    self.send(channel, AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})));
                }
                Ok(())
            }
            exchange::AMQPMethod::Unbind(unbind) => {
                self.allow_binding(
                    Resource::Exchange,
                    unbind.destination.as_str(),
                    unbind.source.as_str(),
                    unbind.routing_key.as_str(),
                )?;
                let destination = Destination::Exchange(unbind.destination.as_str().to_owned());
                let change = self.binding_change(
                    unbind.source.as_str(),
                    &destination,
                    unbind.routing_key.as_str(),
                    &unbind.arguments,
                );
                self.core.change_binding(&change, false)?;
                if !unbind.nowait {
                    self.send(channel, AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})));
                }
                Ok(())
            }
            _ => Err(ModelError::command_invalid("this exchange method is not valid from a client")),
        }
    }

    pub(super) fn queue_class(&mut self, channel: u16, method: queue::AMQPMethod) -> MethodResult {
        match method {
            queue::AMQPMethod::Declare(declare) if declare.passive && is_direct_reply_to(declare.queue.as_str()) => {
                // RabbitMQ answers a passive declare of the direct reply-to pseudo-queue, and of a
                // reply name whose consumer is there (404 otherwise); nothing is declared.
                let name = declare.queue.as_str();
                let exists = name == DIRECT_REPLY_TO || self.core.lock_model().reply_consumer_exists(&self.vhost, name);
                if !exists {
                    return Err(ModelError::not_found(format!("no queue '{name}' in vhost '{}'", self.vhost)));
                }
                if !declare.nowait {
                    let declare_ok =
                        queue::DeclareOk { queue: declare.queue.clone(), message_count: 0, consumer_count: 0 };
                    self.send(channel, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(declare_ok)));
                }
                Ok(())
            }
            queue::AMQPMethod::Declare(declare) => {
                let declared = self.declare_queue(&declare)?;
                // A queue homed on another node: its counts are the home's (404 while it is down).
                let (message_count, consumer_count) = match self.core.remote_home(&self.vhost, &declared) {
                    Some(home) => self.core.counts_at_home(home, &self.vhost, &declared)?,
                    None => {
                        let model = self.core.lock_model();
                        let queue = model.vhost(&self.vhost).and_then(|vhost| vhost.queue(&declared));
                        queue.map_or((0, 0), |queue| (queue.ready_count() as u32, queue.consumer_count() as u32))
                    }
                };
                if let Some(state) = self.channels.get_mut(&channel) {
                    state.last_queue = declared.clone();
                }
                if !declare.nowait {
                    self.send(
                        channel,
                        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: declared.as_str().into(),
                            message_count,
                            consumer_count,
                        })),
                    );
                }
                Ok(())
            }
            queue::AMQPMethod::Bind(bind) => {
                let queue_name = self.queue_name(channel, bind.queue.as_str());
                self.allow_binding(Resource::Queue, &queue_name, bind.exchange.as_str(), bind.routing_key.as_str())?;
                let destination = Destination::Queue(queue_name);
                let change = self.binding_change(
                    bind.exchange.as_str(),
                    &destination,
                    bind.routing_key.as_str(),
                    &bind.arguments,
                );
                self.core.change_binding(&change, true)?;
                if !bind.nowait {
                    self.send(channel, AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})));
                }
                Ok(())
            }
            queue::AMQPMethod::Unbind(unbind) => {
                let queue_name = self.queue_name(channel, unbind.queue.as_str());
                self.allow_binding(
                    Resource::Queue,
                    &queue_name,
                    unbind.exchange.as_str(),
                    unbind.routing_key.as_str(),
                )?;
                let destination = Destination::Queue(queue_name);
                let change = self.binding_change(
                    unbind.exchange.as_str(),
                    &destination,
                    unbind.routing_key.as_str(),
                    &unbind.arguments,
                );
                self.core.change_binding(&change, false)?;
                self.send(channel, AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})));
                Ok(())
            }
            queue::AMQPMethod::Purge(purge) => {
                let name = self.queue_name(channel, purge.queue.as_str());
                self.allow(Right::Read, Resource::Queue, &name)?;
                let key = self.key(channel);
                let count = match self.core.purge_quorum_queue(&self.vhost, &name) {
                    Some(purged) => purged?,
                    None => self.core.act(|model| model.purge(key, &name))?,
                };
                if !purge.nowait {
                    self.send(
                        channel,
                        AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk { message_count: count })),
                    );
                }
                Ok(())
            }
            queue::AMQPMethod::Delete(delete) => {
                let name = self.queue_name(channel, delete.queue.as_str());
                self.allow(Right::Configure, Resource::Queue, &name)?;
                let key = self.key(channel);
                if let Some(deleted) =
                    self.core.delete_quorum_queue(&self.vhost, &name, delete.if_unused, delete.if_empty)
                {
                    let count = deleted?;
                    if !delete.nowait {
                        let delete_ok = queue::DeleteOk { message_count: count };
                        self.send(channel, AMQPClass::Queue(queue::AMQPMethod::DeleteOk(delete_ok)));
                    }
                    return Ok(());
                }
                // delete-ok goes out once the queue is gone (its store logs too), and before the
                // cancels of its consumers: RabbitMQ's order (py-amqp raises out of
                // queue_delete() if the cancel of its own consumer comes first).
                let mut model = self.core.lock_model();
                let (count, mut effects) = model.delete_queue(key, &name, delete.if_unused, delete.if_empty)?;
                let mut cancels =
                    wharf_model::Effects { cancelled: std::mem::take(&mut effects.cancelled), ..Default::default() };
                self.core.send(&mut effects);
                drop(model);
                self.core.apply(effects);
                if !delete.nowait {
                    self.send(
                        channel,
                        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk { message_count: count })),
                    );
                }
                self.core.send(&mut cancels);
                Ok(())
            }
            _ => Err(ModelError::command_invalid("this queue method is not valid from a client")),
        }
    }

    /// `queue.declare` (see `Core::declare_queue`).
    pub(super) fn declare_queue(&self, declare: &queue::Declare) -> Result<String, ModelError> {
        let name = declare.queue.as_str().to_owned();
        let server_named = name.is_empty() && !declare.passive;
        self.core.declare_queue(QueueRequest {
            vhost: &self.vhost,
            name,
            passive: declare.passive,
            durable: declare.durable,
            exclusive: declare.exclusive,
            auto_delete: declare.auto_delete,
            arguments: &declare.arguments,
            connection: self.connection,
            server_named,
            grant: Some(&self.grant),
        })
    }

    /// A binding change needs write on its destination and read on its source, and on a topic
    /// exchange topic read with the binding key (RabbitMQ's `binding_action`).
    fn allow_binding(
        &self,
        destination_kind: Resource,
        destination: &str,
        source: &str,
        routing_key: &str,
    ) -> MethodResult {
        self.allow(Right::Write, destination_kind, destination)?;
        self.allow(Right::Read, Resource::Exchange, source)?;
        self.allow_topic(Right::Read, source, routing_key)
    }
}

/// The direct reply-to pseudo-queue or one of its reply names (`wharf_model`'s `direct_reply.rs`).
pub(super) fn is_direct_reply_to(name: &str) -> bool {
    name == DIRECT_REPLY_TO || name.starts_with(DIRECT_REPLY_TO_PREFIX)
}
