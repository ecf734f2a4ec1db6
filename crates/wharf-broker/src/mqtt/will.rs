//! Wills: published when a connection ends without a normal DISCONNECT, at once, or after the
//! 5.0 will delay interval (or when the session ends, if that comes first) unless the client
//! connects again before then.
//!
//! A delayed will waits durably, as RabbitMQ 3.13 keeps it: in a queue of its own,
//! `mqtt-will-<client id>`, with a message TTL of the delay and the MQTT exchange as its
//! dead-letter exchange, so it outlives a broker restart and the broker's TTL timers publish it
//! (dead-lettered with the will's topic as routing key) when the delay is over. A new connection
//! with the client id deletes the queue, and the will with it. The queue expires on its own
//! well after the delay.
//!
//! What a delayed will loses on the way: its own message expiry (the queue's TTL must be the
//! only one running, or the will would go out early), and its retain flag is carried as a
//! header for retain-as-published subscriptions but not kept as the topic's retained message.

use super::convert;
use super::session::Session;
use crate::core::{Core, blocking};
use crate::definitions::QueueRequest;
use crate::publish::{PublishRequest, ReservationPool};
use wharf_model::{ChannelKey, ModelError};
use wharf_mqtt::{Publish, topic};
use wharf_wire::types::{AMQPValue, FieldTable, LongString};

/// The queue a delayed will waits in.
pub(super) fn queue_name(client_id: &str) -> String {
    format!("mqtt-will-{client_id}")
}

/// Deletes the delayed will of `client_id`, if one waits: the client connected again in time.
pub(super) fn cancel(core: &Core, vhost: &str, client_id: &str, key: ChannelKey) {
    let queue = queue_name(client_id);
    let exists = core.lock_model().vhost(vhost).is_some_and(|found| found.queue(&queue).is_some());
    if !exists {
        return;
    }
    match blocking(|| core.act(|model| Ok(((), model.delete_queue(key, &queue, false, false)?.1)))) {
        Ok(()) => tracing::info!(%client_id, "the delayed MQTT will is cancelled: the client connected again"),
        Err(error) => tracing::warn!(%client_id, error = %error.text, "a delayed MQTT will could not be cancelled"),
    }
}

impl Session {
    /// Publishes the will (the connection ended without a normal DISCONNECT), or parks it for
    /// its delay. Not waited on: nobody is left to acknowledge it to.
    pub fn send_will(&mut self) {
        let Some(will) = self.will.take() else { return };
        let routing_key = topic::to_amqp(&will.topic);
        if let Err(error) = self.allow_publish(&routing_key) {
            tracing::warn!(client_id = %self.client_id, topic = %will.topic, %error, "MQTT will not sent: not allowed");
            return;
        }
        let delay_s = will.properties.will_delay_interval_s.unwrap_or(0).min(self.expiry_s);
        let publish = Publish {
            dup: false,
            qos: will.qos,
            retain: will.retain,
            topic: will.topic,
            packet_id: 0,
            properties: will.properties,
            payload: will.payload,
        };
        if delay_s > 0 {
            if let Err(error) = self.park_will(&publish, &routing_key, delay_s) {
                tracing::warn!(client_id = %self.client_id, error = %error.text, "MQTT will not kept for its delay; sent now");
            } else {
                return;
            }
        }
        let message =
            convert::message_from_publish(&self.exchange, routing_key.clone(), &publish, false, self.publisher(), None)
                .with_trace(self.origin.clone());
        let request = PublishRequest {
            vhost: &self.vhost,
            channel: 1,
            exchange: &self.exchange,
            routing_key: &routing_key,
            mandatory: false,
        };
        let core = &self.core;
        if let Err(error) = blocking(|| core.publish(&request, message, &mut ReservationPool::default())) {
            tracing::warn!(client_id = %self.client_id, error = %error.text, "MQTT will not sent");
        }
        if publish.retain
            && let Err(super::retained::NotKept::Store(error)) = core.mqtt_retained.keep(core, &self.vhost, &publish)
        {
            core.store_failed(&error);
        }
    }

    /// Puts the will in its own queue, to be dead-lettered to the MQTT exchange after `delay_s`.
    fn park_will(&self, publish: &Publish, routing_key: &str, delay_s: u32) -> Result<(), ModelError> {
        let core = &self.core;
        let queue = queue_name(&self.client_id);
        // A will left from an earlier connection is replaced.
        cancel(core, &self.vhost, &self.client_id, self.key);
        let delay_ms = i64::from(delay_s) * 1000;
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay_ms));
        arguments
            .insert("x-dead-letter-exchange".into(), AMQPValue::LongString(LongString::from(self.exchange.as_str())));
        arguments.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(LongString::from(routing_key)));
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(delay_ms * 2 + 60_000));
        let request = QueueRequest {
            vhost: &self.vhost,
            name: queue.clone(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: &arguments,
            connection: self.key.connection,
            server_named: false,
            // The broker's own queue: the user's right to publish the will was checked.
            grant: None,
        };
        blocking(|| core.declare_queue(request))?;
        let mut parked = publish.clone();
        parked.properties.message_expiry_interval_s = None;
        let message = convert::message_from_publish(
            &self.exchange,
            routing_key.to_owned(),
            &parked,
            false,
            self.publisher(),
            None,
        )
        .with_trace(self.origin.clone());
        let request =
            PublishRequest { vhost: &self.vhost, channel: 1, exchange: "", routing_key: &queue, mandatory: false };
        blocking(|| core.publish(&request, message, &mut ReservationPool::default()))?;
        tracing::info!(client_id = %self.client_id, delay_s, "MQTT will kept for its delay");
        Ok(())
    }
}
