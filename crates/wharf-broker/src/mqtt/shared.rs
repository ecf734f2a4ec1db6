//! Shared subscriptions (`$share/<group>/<filter>`, MQTT 5.0, also accepted from 3.1.1 clients
//! as most brokers do): one durable queue per group and filter, `mqtt-shared-<group>-<filter>`,
//! bound once to the MQTT exchange and consumed by every member session, so each message goes to
//! one member and a member's unacknowledged messages go to the others when it leaves. The queue
//! expires (`x-expires`, the longest session expiry) once no member has used it that long.
//! A member's shared subscriptions are part of its session: a persistent session records them
//! (`state.rs`) and consumes from them again when it resumes, after a reconnect or a broker
//! restart. As the specification says, no retained messages are sent when a shared
//! subscription is made.

use super::session::Session;
use super::writer::Granted;
use crate::access::{Resource, Right};
use crate::core::blocking;
use crate::definitions::{BindingChange, QueueRequest};
use std::sync::Arc;
use wharf_model::{Destination, ModelError};
use wharf_mqtt::{SubscriptionOptions, reason, topic};
use wharf_wire::types::{AMQPValue, FieldTable, LongString};

/// A session's membership of a shared subscription.
#[derive(Debug, Clone)]
pub(super) struct Shared {
    pub consumer_tag: String,
    pub granted: Granted,
}

impl Shared {
    /// What a persistent session records of it.
    pub(super) fn options(&self) -> super::state::SharedOptions {
        super::state::SharedOptions {
            qos: self.granted.qos as u8,
            retain_as_published: self.granted.retain_as_published,
            identifier: self.granted.identifier,
        }
    }
}

/// The queue of a shared subscription.
fn queue_name(group: &str, filter: &str) -> String {
    format!("mqtt-shared-{group}-{filter}")
}

impl Session {
    /// Joins the shared subscription `text` (`$share/<group>/<filter>`); the SUBACK code.
    pub(super) fn subscribe_shared(
        &mut self,
        text: &str,
        group: &str,
        filter: &str,
        options: SubscriptionOptions,
        identifier: Option<u32>,
    ) -> u8 {
        let queue = queue_name(group, filter);
        if queue.len() > 255 {
            return reason::TOPIC_FILTER_INVALID;
        }
        match self.join(text, &queue, filter, options, identifier) {
            Ok(()) => options.qos as u8,
            Err(error) => {
                tracing::warn!(client_id = %self.client_id, error = %error.text, "MQTT shared subscription refused");
                if error.code == wharf_wire::reply_code::ACCESS_REFUSED {
                    reason::NOT_AUTHORIZED
                } else {
                    reason::UNSPECIFIED_ERROR
                }
            }
        }
    }

    fn join(
        &mut self,
        text: &str,
        queue: &str,
        filter: &str,
        options: SubscriptionOptions,
        identifier: Option<u32>,
    ) -> Result<(), ModelError> {
        self.grant.check(Right::Configure, Resource::Queue, queue)?;
        self.grant.check(Right::Write, Resource::Queue, queue)?;
        self.grant.check(Right::Read, Resource::Queue, queue)?;
        self.grant.check(Right::Read, Resource::Exchange, &self.exchange)?;
        if self.grant.has_topic_rules(&self.exchange) {
            self.grant.check_topic(Right::Read, &self.exchange, &topic::to_amqp(filter))?;
        }
        let core = Arc::clone(&self.core);
        let exists = core.lock_model().vhost(&self.vhost).is_some_and(|vhost| vhost.queue(queue).is_some());
        if !exists {
            let mut arguments = FieldTable::default();
            let expires_ms = i64::from(core.config.mqtt.session_expiry_max_s) * 1000;
            arguments.insert("x-expires".into(), AMQPValue::LongLongInt(expires_ms.max(1)));
            let request = QueueRequest {
                vhost: &self.vhost,
                name: queue.to_owned(),
                passive: false,
                durable: true,
                exclusive: false,
                auto_delete: false,
                arguments: &arguments,
                connection: self.key.connection,
                server_named: false,
                grant: Some(&self.grant),
            };
            match blocking(|| core.declare_queue(request)) {
                Ok(_) => {}
                // Declared meanwhile by another member: use it.
                Err(_) if core.lock_model().vhost(&self.vhost).is_some_and(|vhost| vhost.queue(queue).is_some()) => {}
                Err(error) => return Err(error),
            }
        }
        let mut arguments = FieldTable::default();
        arguments.insert("x-mqtt-topic-filter".into(), AMQPValue::LongString(LongString::from(filter)));
        let destination = Destination::Queue(queue.to_owned());
        let routing_key = topic::to_amqp(filter);
        let change = BindingChange {
            vhost: &self.vhost,
            connection: self.key.connection,
            source: &self.exchange,
            destination: &destination,
            routing_key: &routing_key,
            arguments: &arguments,
        };
        blocking(|| core.change_binding(&change, true))?;
        let granted = Granted {
            filter: filter.to_owned(),
            qos: options.qos,
            identifier,
            no_local: false,
            retain_as_published: options.retain_as_published,
        };
        if let Some(member) = self.shared.get_mut(text) {
            // Subscribing again changes the QoS only.
            member.granted = granted;
        } else {
            let consumer_tag = format!("mqtt-shared:{queue}");
            let key = self.key;
            blocking(|| {
                core.act(|model| Ok(((), model.consume_with_priority(key, queue, &consumer_tag, false, false, 0)?.1)))
            })?;
            self.shared.insert(text.to_owned(), Shared { consumer_tag, granted });
        }
        self.publish_subscriptions();
        Ok(())
    }

    /// Joins again the shared subscriptions a resumed session recorded.
    pub(super) fn rejoin_shared(&mut self, recorded: &std::collections::BTreeMap<String, super::state::SharedOptions>) {
        for (text, stored) in recorded {
            let Ok(topic::ParsedFilter { share_group: Some(group), filter }) = topic::parse_filter(text) else {
                continue;
            };
            let qos = wharf_mqtt::QoS::from_bits(stored.qos).unwrap_or(wharf_mqtt::QoS::AtLeastOnce);
            let options = SubscriptionOptions {
                retain_as_published: stored.retain_as_published,
                ..SubscriptionOptions::qos(qos)
            };
            let (group, filter) = (group.to_owned(), filter.to_owned());
            let code = self.subscribe_shared(text, &group, &filter, options, stored.identifier);
            if code >= 0x80 {
                tracing::warn!(client_id = %self.client_id, subscription = %text, code, "a resumed MQTT session could not join its shared subscription again");
            }
        }
    }

    /// Leaves a shared subscription; `None` if the session is not a member.
    pub(super) fn unsubscribe_shared(&mut self, text: &str) -> Option<u8> {
        let member = self.shared.remove(text)?;
        let key = self.key;
        let core = Arc::clone(&self.core);
        let cancelled = blocking(|| core.act(|model| Ok(((), model.cancel(key, &member.consumer_tag)?))));
        self.publish_subscriptions();
        Some(match cancelled {
            Ok(()) => reason::SUCCESS,
            Err(_) => reason::UNSPECIFIED_ERROR,
        })
    }
}
