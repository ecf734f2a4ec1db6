//! Changes made through the management interface, each by the path a client's method takes
//! (`definitions.rs` for declarations and bindings, `publish.rs` for publishes, the model's
//! get, purge and delete) and with the same permission checks, made for the API's user on the
//! vhost, as RabbitMQ's management plugin does through its own AMQP channel. Model operations
//! that need a channel run on a channel of a connection id no client has, opened for the
//! operation and closed after it, so whatever it still holds goes back to its queue.

use super::Management;
use crate::access::{Resource, Right, VhostGrant};
use crate::definitions::{BindingChange, QueueRequest};
use crate::pager::{self, DeliveryBody};
use crate::persist::text_argument;
use crate::publish::{PublishRequest, ReservationPool};
use bytes::Bytes;
use std::sync::Arc;
use wharf_model::{ChannelKey, Destination, Effects, Message, ModelError};
use wharf_wire::protocol::{BasicProperties, exchange};
use wharf_wire::types::FieldTable;

/// Why a management operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    /// The vhost, queue or exchange does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The user lacks the permission (or any permission on the vhost).
    #[error("{0}")]
    AccessRefused(String),
    /// The broker refused it as it would refuse the AMQP method; `code` is the AMQP reply code
    /// (406 inequivalent arguments or not empty, 405 locked, …).
    #[error("{text}")]
    Refused { code: u16, text: String },
    /// The request itself is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// A cluster's node could not make the change now: no leader of the metadata group is
    /// reachable from it (a majority of the nodes is down or cut off).
    #[error("{0}")]
    Unavailable(String),
}

impl From<ModelError> for ManagementError {
    fn from(error: ModelError) -> Self {
        match error.code {
            404 => ManagementError::NotFound(error.text),
            403 => ManagementError::AccessRefused(error.text),
            code => ManagementError::Refused { code, text: error.text },
        }
    }
}

/// What `get` does with the messages it took (RabbitMQ's `ackmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// Put them back (`ack_requeue_true`, `reject_requeue_true`): they are marked redelivered.
    Requeue,
    /// Acknowledge them (`ack_requeue_false`): they leave the queue.
    Ack,
    /// Reject them without requeueing (`reject_requeue_false`): dead-lettered if the queue says so.
    Reject,
}

impl AckMode {
    /// RabbitMQ's names.
    pub fn parse(text: &str) -> Option<AckMode> {
        match text {
            "ack_requeue_true" | "reject_requeue_true" => Some(AckMode::Requeue),
            "ack_requeue_false" => Some(AckMode::Ack),
            "reject_requeue_false" => Some(AckMode::Reject),
            _ => None,
        }
    }
}

/// A message taken by `get`.
#[derive(Debug, Clone)]
pub struct GotMessage {
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    /// Messages left in the queue after this one was taken.
    pub message_count: u32,
    pub properties: BasicProperties,
    pub payload: Bytes,
}

/// An exchange to declare.
#[derive(Debug, Clone, Copy)]
pub struct ExchangeSpec<'a> {
    pub name: &'a str,
    /// `direct`, `fanout`, `topic`, `headers` or `x-delayed-message`.
    pub kind: &'a str,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: &'a FieldTable,
}

/// A binding from exchange `source` to a queue or an exchange.
#[derive(Debug, Clone, Copy)]
pub struct BindingSpec<'a> {
    pub source: &'a str,
    pub destination: &'a Destination,
    pub routing_key: &'a str,
    pub arguments: &'a FieldTable,
}

/// What a publish through the API did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    /// It reached at least one queue.
    pub routed: bool,
}

/// The most messages one `get` takes (RabbitMQ puts no bound on `count`; an unbounded one would
/// hold a whole queue in one HTTP response).
pub const GET_COUNT_MAX: u32 = 10_000;

impl Management {
    /// The user's permissions on the vhost: 404 for a vhost that does not exist, 403 without any.
    pub(super) fn grant(&self, user: &str, vhost: &str) -> Result<Arc<VhostGrant>, ManagementError> {
        if !self.vhost_exists(vhost) {
            return Err(ManagementError::NotFound(format!("no vhost '{vhost}'")));
        }
        self.core.access.grant(user, vhost).ok_or_else(|| {
            ManagementError::AccessRefused(format!("access to vhost '{vhost}' refused for user '{user}'"))
        })
    }

    /// The topic-permission check a session makes (`Session::allow_topic`): only for a topic
    /// exchange the user has topic rules on.
    fn allow_topic(
        &self,
        grant: &VhostGrant,
        vhost: &str,
        right: Right,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), ManagementError> {
        if !grant.has_topic_rules(exchange) {
            return Ok(());
        }
        let is_topic = {
            let model = self.core.lock_model();
            let found = model.vhost(vhost).and_then(|found| found.exchange(exchange));
            found.is_some_and(|found| found.kind == wharf_model::ExchangeKind::Topic)
        };
        if is_topic {
            grant.check_topic(right, exchange, routing_key)?;
        }
        Ok(())
    }

    /// Declares a queue (RabbitMQ's `PUT /api/queues/{vhost}/{name}`): refused as `queue.declare`
    /// would be, 406 for a redeclaration with other properties.
    pub fn declare_queue(
        &self,
        user: &str,
        vhost: &str,
        name: &str,
        durable: bool,
        auto_delete: bool,
        arguments: &FieldTable,
    ) -> Result<(), ManagementError> {
        let grant = self.grant(user, vhost)?;
        if name.is_empty() {
            return Err(ManagementError::BadRequest("a queue needs a name".into()));
        }
        let request = QueueRequest {
            vhost,
            name: name.to_owned(),
            passive: false,
            durable,
            exclusive: false,
            auto_delete,
            arguments,
            connection: self.core.connections.allocate_id(),
            server_named: false,
            grant: Some(&grant),
        };
        crate::core::blocking(|| self.core.declare_queue(request))?;
        Ok(())
    }

    /// Deletes a queue; 406 if `if_unused` and it has consumers or `if_empty` and it holds
    /// messages; 404 if it does not exist.
    pub fn delete_queue(
        &self,
        user: &str,
        vhost: &str,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, ManagementError> {
        let grant = self.grant(user, vhost)?;
        grant.check(Right::Configure, Resource::Queue, name)?;
        self.require_queue(vhost, name)?;
        if let Some(deleted) = crate::core::blocking(|| self.core.delete_quorum_queue(vhost, name, if_unused, if_empty))
        {
            return Ok(deleted?);
        }
        crate::core::blocking(|| {
            Ok(self.core.on_scratch_channel(vhost, |model, key| model.delete_queue(key, name, if_unused, if_empty))?)
        })
    }

    /// Removes every ready message of a queue; returns how many.
    pub fn purge_queue(&self, user: &str, vhost: &str, name: &str) -> Result<u32, ManagementError> {
        let grant = self.grant(user, vhost)?;
        grant.check(Right::Read, Resource::Queue, name)?;
        self.require_queue(vhost, name)?;
        if let Some(purged) = self.core.purge_quorum_queue(vhost, name) {
            return Ok(purged?);
        }
        Ok(self.core.on_scratch_channel(vhost, |model, key| model.purge(key, name))?)
    }

    fn require_queue(&self, vhost: &str, name: &str) -> Result<(), ManagementError> {
        let exists = self.core.lock_model().vhost(vhost).is_some_and(|found| found.queue(name).is_some());
        if exists { Ok(()) } else { Err(ManagementError::NotFound(format!("no queue '{name}' in vhost '{vhost}'"))) }
    }

    fn require_exchange(&self, vhost: &str, name: &str) -> Result<(), ManagementError> {
        let exists = self.core.lock_model().vhost(vhost).is_some_and(|found| found.exchange(name).is_some());
        if exists { Ok(()) } else { Err(ManagementError::NotFound(format!("no exchange '{name}' in vhost '{vhost}'"))) }
    }

    /// Declares an exchange (`PUT /api/exchanges/{vhost}/{name}`), as `exchange.declare`.
    pub fn declare_exchange(
        &self,
        user: &str,
        vhost: &str,
        exchange: &ExchangeSpec<'_>,
    ) -> Result<(), ManagementError> {
        let ExchangeSpec { name, kind, durable, auto_delete, internal, arguments } = *exchange;
        let grant = self.grant(user, vhost)?;
        if name.is_empty() {
            return Err(ManagementError::AccessRefused("the default exchange cannot be declared".into()));
        }
        grant.check(Right::Configure, Resource::Exchange, name)?;
        let exists = self.core.lock_model().vhost(vhost).is_some_and(|found| found.exchange(name).is_some());
        if !exists && let Some(alternate) = text_argument(arguments, "alternate-exchange") {
            grant.check(Right::Read, Resource::Exchange, name)?;
            grant.check(Right::Write, Resource::Exchange, &alternate)?;
        }
        let declare = exchange::Declare {
            exchange: name.into(),
            kind: kind.into(),
            passive: false,
            durable,
            auto_delete,
            internal,
            nowait: false,
            arguments: arguments.clone(),
        };
        crate::core::blocking(|| self.core.declare_exchange(vhost, &declare))?;
        Ok(())
    }

    /// Deletes an exchange; 406 if `if_unused` and it has bindings; 404 if it does not exist.
    pub fn delete_exchange(&self, user: &str, vhost: &str, name: &str, if_unused: bool) -> Result<(), ManagementError> {
        let grant = self.grant(user, vhost)?;
        if name.is_empty() || name.starts_with("amq.") {
            return Err(ManagementError::AccessRefused(format!(
                "operation not permitted on the default exchange or the reserved exchange '{name}'"
            )));
        }
        grant.check(Right::Configure, Resource::Exchange, name)?;
        self.require_exchange(vhost, name)?;
        crate::core::blocking(|| self.core.delete_exchange(vhost, name, if_unused))?;
        Ok(())
    }

    /// Adds (`add`) or removes a binding, with `queue.bind`'s or `exchange.bind`'s checks.
    pub fn change_binding(
        &self,
        user: &str,
        vhost: &str,
        binding: &BindingSpec<'_>,
        add: bool,
    ) -> Result<(), ManagementError> {
        let BindingSpec { source, destination, routing_key, arguments } = *binding;
        let grant = self.grant(user, vhost)?;
        let (kind, destination_name) = match destination {
            Destination::Queue(name) => (Resource::Queue, name),
            Destination::Exchange(name) => (Resource::Exchange, name),
        };
        grant.check(Right::Write, kind, destination_name)?;
        grant.check(Right::Read, Resource::Exchange, source)?;
        self.allow_topic(&grant, vhost, Right::Read, source, routing_key)?;
        self.require_exchange(vhost, source)?;
        match destination {
            Destination::Queue(name) => self.require_queue(vhost, name)?,
            Destination::Exchange(name) => self.require_exchange(vhost, name)?,
        }
        let change = BindingChange {
            vhost,
            connection: self.core.connections.allocate_id(),
            source,
            destination,
            routing_key,
            arguments,
        };
        crate::core::blocking(|| self.core.change_binding(&change, add))?;
        Ok(())
    }

    /// Publishes a message (`POST /api/exchanges/{vhost}/{name}/publish`) and waits until it is
    /// durable where it is persistent, as a publisher confirm would.
    pub async fn publish(
        &self,
        user: &str,
        vhost: &str,
        exchange_name: &str,
        routing_key: &str,
        properties: BasicProperties,
        payload: Bytes,
    ) -> Result<PublishOutcome, ManagementError> {
        let grant = self.grant(user, vhost)?;
        grant.check(Right::Write, Resource::Exchange, exchange_name)?;
        if !exchange_name.is_empty() {
            self.require_exchange(vhost, exchange_name)?;
        }
        self.allow_topic(&grant, vhost, Right::Write, exchange_name, routing_key)?;
        // RabbitMQ's validated user id, as over AMQP: only the publisher, unless impersonator.
        if let Some(user_id) = properties.user_id()
            && user_id.as_str() != user
            && !self.core.access.user(user).is_some_and(|found| found.tags.iter().any(|tag| tag == "impersonator"))
        {
            return Err(ManagementError::from(ModelError::precondition_failed(format!(
                "user_id property set to '{user_id}' but authenticated user was '{user}'"
            ))));
        }
        if payload.len() as u64 > self.core.config.message_bytes_max {
            return Err(ManagementError::BadRequest(format!(
                "the payload is {} bytes, over the broker's message_bytes_max of {}",
                payload.len(),
                self.core.config.message_bytes_max
            )));
        }
        let raw_properties = wharf_wire::frame::encode_properties(&properties);
        let origin = self.traces_enabled().then(|| {
            let origin = wharf_model::trace::Origin { connection: "management API".into(), user: user.to_owned() };
            Arc::new(wharf_model::trace::Provenance::Published(origin))
        });
        let message = Message::new(
            exchange_name.to_owned(),
            routing_key.to_owned(),
            Arc::new(properties),
            raw_properties,
            payload,
        )
        .with_trace(origin);
        // Mandatory, so an unroutable publish comes back as a return: that is how "routed" is
        // known. The return goes nowhere.
        let request = PublishRequest { vhost, channel: 0, exchange: exchange_name, routing_key, mandatory: true };
        let published =
            crate::core::blocking(|| self.core.publish(&request, message, &mut ReservationPool::default()))?;
        if published.nack {
            return Err(ManagementError::Refused {
                code: 506,
                text: "the message was refused (a queue's x-overflow, or the store could not take it)".into(),
            });
        }
        for mut durable in published.durable {
            std::future::poll_fn(|context| durable.poll_durable(context)).await.map_err(|error| {
                ManagementError::Refused { code: 541, text: format!("the message could not be stored: {error}") }
            })?;
        }
        Ok(PublishOutcome { routed: published.returned.is_none() })
    }

    /// Takes up to `count` messages from a queue (`POST /api/queues/{vhost}/{name}/get`), then
    /// requeues, acknowledges or rejects them as `ack_mode` says. Like `basic.get`, a take counts
    /// as a delivery: a requeued message comes back marked redelivered.
    pub async fn get(
        &self,
        user: &str,
        vhost: &str,
        queue: &str,
        count: u32,
        ack_mode: AckMode,
    ) -> Result<Vec<GotMessage>, ManagementError> {
        // In a task of its own: if the HTTP request is dropped halfway, the messages taken are
        // still settled and the channel closed, never left unacknowledged.
        let this = self.clone();
        let (user, vhost, queue) = (user.to_owned(), vhost.to_owned(), queue.to_owned());
        let task = tokio::spawn(async move { this.get_now(&user, &vhost, &queue, count, ack_mode).await });
        task.await.map_err(|error| ManagementError::Refused { code: 541, text: format!("the get failed: {error}") })?
    }

    async fn get_now(
        &self,
        user: &str,
        vhost: &str,
        queue: &str,
        count: u32,
        ack_mode: AckMode,
    ) -> Result<Vec<GotMessage>, ManagementError> {
        let grant = self.grant(user, vhost)?;
        grant.check(Right::Read, Resource::Queue, queue)?;
        self.require_queue(vhost, queue)?;
        let count = count.min(GET_COUNT_MAX);
        let key = ChannelKey { connection: self.core.connections.allocate_id(), channel: 1 };
        // Taken unacknowledged on a channel of its own, so every record stays live while the
        // bodies of paged-out messages are read back; settled afterwards.
        let taken = self.core.act(|model| {
            model.open_channel(key, vhost)?;
            // Named for the traces of what it takes and puts back.
            model.name_connection(key.connection, format!("management API ({user})"));
            let mut deliveries = Vec::new();
            let mut effects = Effects::default();
            for _ in 0..count {
                match model.get(key, queue, false) {
                    Ok((Some(delivery), more)) => {
                        deliveries.push(delivery);
                        effects.merge(more);
                    }
                    Ok((None, more)) => {
                        effects.merge(more);
                        break;
                    }
                    Err(error) => {
                        effects.merge(model.close_connection(key.connection));
                        return Ok((Err(error), effects));
                    }
                }
            }
            Ok((Ok(deliveries), effects))
        })?;
        let deliveries = taken?;
        let mut messages = Vec::with_capacity(deliveries.len());
        let mut unreadable = None;
        for delivery in &deliveries {
            // A redelivery is shown only once its count is on file, as for a client.
            if let Some(ticket) = self.core.record_delivery(delivery) {
                let _ = ticket.into_future().await;
            }
            let payload = match pager::delivery_body(&self.core.store, &self.core.fatal, delivery) {
                DeliveryBody::Resident(bytes) => bytes,
                DeliveryBody::Paged(read) => match crate::core::blocking(|| read.read()) {
                    Ok(bytes) => bytes,
                    Err(failure) => {
                        unreadable = Some(format!("{failure:?}"));
                        break;
                    }
                },
            };
            messages.push(GotMessage {
                exchange: delivery.message.exchange.clone(),
                routing_key: delivery.message.routing_key.clone(),
                redelivered: delivery.redelivered,
                message_count: delivery.message_count,
                properties: delivery.message.full_properties().into_owned(),
                payload,
            });
        }
        let settle_mode = if unreadable.is_some() { AckMode::Requeue } else { ack_mode };
        self.core.act(|model| {
            let mut effects = Effects::default();
            for delivery in &deliveries {
                let settled = match settle_mode {
                    AckMode::Requeue => model.reject(key, delivery.delivery_tag, false, true),
                    AckMode::Ack => model.ack(key, delivery.delivery_tag, false),
                    AckMode::Reject => model.reject(key, delivery.delivery_tag, false, false),
                };
                // A settle can only fail for a tag whose lease ran out meanwhile: it is back in its
                // queue already.
                if let Ok(more) = settled {
                    effects.merge(more);
                }
            }
            effects.merge(model.close_connection(key.connection));
            Ok(((), effects))
        })?;
        match unreadable {
            Some(reason) => Err(ManagementError::Refused {
                code: 541,
                text: format!("a stored message could not be read: {reason}"),
            }),
            None => Ok(messages),
        }
    }
}
