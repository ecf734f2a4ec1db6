//! A session's subscriptions as RabbitMQ's MQTT plugin keeps them: one queue per client id
//! (`mqtt-subscription-<client id>qos1`) bound to the MQTT exchange once per topic filter, so a
//! subscription is a real queue (visible, governed by policies, with every delivery guarantee).
//! A session that outlives its connection has a durable queue that expires (`x-expires`) when the
//! session does; a clean session's queue is exclusive to its connection. Each binding carries the
//! MQTT filter and its options, so a session resumed after a restart knows its subscriptions.
//! Wharf delivers QoS 0 and QoS 1/2 subscriptions from the one queue (RabbitMQ has a second,
//! `…qos0`, for at-most-once subscriptions of clean sessions): see `docs/design/20261204_mqtt.md`.

use super::writer::Granted;
use crate::access::{Resource, Right, VhostGrant};
use crate::core::{Core, blocking};
use crate::definitions::{BindingChange, QueueRequest};
use wharf_model::{ChannelKey, ConnectionId, Destination, ModelError};
use wharf_mqtt::{QoS, RetainHandling, SubscriptionOptions, topic};
use wharf_wire::types::{AMQPValue, FieldTable, LongString};

/// The binding argument holding the MQTT topic filter (the routing key loses `/` versus `.`).
const FILTER_ARGUMENT: &str = "x-mqtt-topic-filter";
/// The binding argument holding the subscription's options (RabbitMQ 4.1's name and fields).
const OPTIONS_ARGUMENT: &str = "x-mqtt-subscription-opts";

/// The queue of a client id's subscriptions.
pub(super) fn queue_name(client_id: &str) -> String {
    format!("mqtt-subscription-{client_id}qos1")
}

/// Who the subscriptions belong to and where they live.
#[derive(Debug)]
pub(super) struct SessionQueue<'a> {
    pub core: &'a Core,
    pub vhost: &'a str,
    pub exchange: &'a str,
    pub queue: String,
    pub connection: ConnectionId,
    pub key: ChannelKey,
    pub grant: &'a VhostGrant,
    /// How long the session outlives its connection (0: it ends with it).
    pub expiry_s: u32,
}

impl SessionQueue<'_> {
    pub fn exists(&self) -> bool {
        self.core.lock_model().vhost(self.vhost).is_some_and(|vhost| vhost.queue(&self.queue).is_some())
    }

    /// Deletes the queue of a session that is not resumed (a clean start), if there is one.
    pub fn discard(&self) -> Result<(), ModelError> {
        if !self.exists() {
            return Ok(());
        }
        let (key, queue) = (self.key, self.queue.as_str());
        blocking(|| self.core.act(|model| Ok(((), model.delete_queue(key, queue, false, false)?.1))))
    }

    /// Declares the queue if it is not there (a durable one keeps its arguments from before).
    pub fn declare(&self) -> Result<(), ModelError> {
        if self.exists() {
            return Ok(());
        }
        let persistent = self.expiry_s > 0;
        let mut arguments = FieldTable::default();
        if persistent && self.expiry_s != u32::MAX {
            arguments.insert("x-expires".into(), AMQPValue::LongLongInt(i64::from(self.expiry_s) * 1000));
        }
        let request = QueueRequest {
            vhost: self.vhost,
            name: self.queue.clone(),
            passive: false,
            durable: persistent,
            exclusive: !persistent,
            auto_delete: false,
            arguments: &arguments,
            connection: self.connection,
            server_named: false,
            grant: Some(self.grant),
        };
        blocking(|| self.core.declare_queue(request)).map(|_| ())
    }

    /// The subscriptions recorded on the queue's bindings (a resumed session's).
    pub fn recorded(&self) -> Vec<Recorded> {
        let model = self.core.lock_model();
        let Some(vhost) = model.vhost(self.vhost) else { return Vec::new() };
        let destination = Destination::Queue(self.queue.clone());
        vhost
            .bindings()
            .filter(|(source, binding)| *source == self.exchange && binding.destination == destination)
            .filter_map(|(_, binding)| {
                let arguments = binding.arguments.inner();
                let filter = match arguments.get(FILTER_ARGUMENT) {
                    Some(AMQPValue::LongString(text)) => String::from_utf8(text.as_bytes().to_vec()).ok()?,
                    _ => topic::to_mqtt(&binding.routing_key),
                };
                let options = match arguments.get(OPTIONS_ARGUMENT) {
                    Some(AMQPValue::FieldTable(options)) => options.inner().clone(),
                    _ => Default::default(),
                };
                let byte = |name: &str| match options.get(name) {
                    Some(AMQPValue::ShortShortUInt(value)) => Some(*value),
                    _ => None,
                };
                let flag = |name: &str| matches!(options.get(name), Some(AMQPValue::Boolean(true)));
                let qos = byte("qos").and_then(QoS::from_bits).unwrap_or(QoS::AtLeastOnce);
                let identifier = match options.get("id") {
                    Some(AMQPValue::LongUInt(id)) => Some(*id),
                    _ => None,
                };
                let retain_handling = match byte("retain-handling") {
                    Some(1) => RetainHandling::SendAtNewSubscribe,
                    Some(2) => RetainHandling::DoNotSend,
                    _ => RetainHandling::SendAtSubscribe,
                };
                Some(Recorded {
                    granted: Granted {
                        filter,
                        qos,
                        identifier,
                        no_local: flag("no-local"),
                        retain_as_published: flag("retain-as-published"),
                    },
                    options: SubscriptionOptions {
                        qos,
                        no_local: flag("no-local"),
                        retain_as_published: flag("retain-as-published"),
                        retain_handling,
                    },
                })
            })
            .collect()
    }

    /// The permission checks RabbitMQ makes for a subscription: configure and write on the
    /// queue (declare, bind), read on the exchange, and the topic's read rule.
    pub fn allow(&self, filter: &str) -> Result<(), ModelError> {
        self.grant.check(Right::Configure, Resource::Queue, &self.queue)?;
        self.grant.check(Right::Write, Resource::Queue, &self.queue)?;
        self.grant.check(Right::Read, Resource::Exchange, self.exchange)?;
        if self.grant.has_topic_rules(self.exchange) {
            self.grant.check_topic(Right::Read, self.exchange, &topic::to_amqp(filter))?;
        }
        Ok(())
    }

    fn change(&self, granted: &Granted, options: &SubscriptionOptions, add: bool) -> Result<(), ModelError> {
        let mut table = FieldTable::default();
        table.insert("qos".into(), AMQPValue::ShortShortUInt(granted.qos as u8));
        table.insert("no-local".into(), AMQPValue::Boolean(options.no_local));
        table.insert("retain-as-published".into(), AMQPValue::Boolean(options.retain_as_published));
        let handling = match options.retain_handling {
            RetainHandling::SendAtSubscribe => 0,
            RetainHandling::SendAtNewSubscribe => 1,
            RetainHandling::DoNotSend => 2,
        };
        table.insert("retain-handling".into(), AMQPValue::ShortShortUInt(handling));
        if let Some(id) = granted.identifier {
            table.insert("id".into(), AMQPValue::LongUInt(id));
        }
        let mut arguments = FieldTable::default();
        arguments.insert(FILTER_ARGUMENT.into(), AMQPValue::LongString(LongString::from(granted.filter.as_str())));
        arguments.insert(OPTIONS_ARGUMENT.into(), AMQPValue::FieldTable(table));
        let destination = Destination::Queue(self.queue.clone());
        let routing_key = topic::to_amqp(&granted.filter);
        let change = BindingChange {
            vhost: self.vhost,
            connection: self.connection,
            source: self.exchange,
            destination: &destination,
            routing_key: &routing_key,
            arguments: &arguments,
        };
        blocking(|| self.core.change_binding(&change, add))
    }

    /// Binds the filter (replacing the binding a subscription to the same filter had).
    pub fn bind(
        &self,
        granted: &Granted,
        options: &SubscriptionOptions,
        previous: Option<&Recorded>,
    ) -> Result<(), ModelError> {
        self.change(granted, options, true)?;
        if let Some(previous) = previous.filter(|previous| previous.granted != *granted || previous.options != *options)
        {
            self.change(&previous.granted, &previous.options, false)?;
        }
        Ok(())
    }

    pub fn unbind(&self, recorded: &Recorded) -> Result<(), ModelError> {
        self.change(&recorded.granted, &recorded.options, false)
    }
}

/// A subscription as the session made it (the binding's arguments come from both parts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Recorded {
    pub granted: Granted,
    pub options: SubscriptionOptions,
}
