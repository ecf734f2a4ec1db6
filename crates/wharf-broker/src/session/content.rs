//! Content assembly: a `basic.publish` waits for its content header and body frames, checked
//! against `message_bytes_max` and the announced size, then is published (or buffered by a
//! transaction).

use super::Stop;
use super::tx::{TX_OPS_MAX, TxOp};
use super::{Session, connection_error};
use crate::confirms::PendingConfirm;
use crate::publish::{PublishRequest, Published, ReservationPool};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use wharf_model::broker::DIRECT_REPLY_TO;
use wharf_model::{Message, ModelError};
use wharf_wire::methods::{BASIC_CLASS_ID, MethodId};
use wharf_wire::protocol::basic;
use wharf_wire::{ContentHeader, reply_code};

/// A publish waiting for its content.
#[derive(Debug)]
pub(super) enum Content {
    Header(basic::Publish),
    Body { publish: basic::Publish, header: Box<ContentHeader>, chunks: Vec<Bytes>, received: u64 },
}

impl Session {
    pub(super) fn content_header(&mut self, channel: u16, header: Box<ContentHeader>) -> Result<(), Stop> {
        let message_bytes_max = self.core.config.message_bytes_max;
        let Some(state) = self.channels.get_mut(&channel) else {
            return Err(unexpected_content(channel));
        };
        if state.closing {
            return Ok(());
        }
        let Some(Content::Header(publish)) = state.content.take() else {
            return Err(unexpected_content(channel));
        };
        if header.class_id != BASIC_CLASS_ID {
            return Err(unexpected_content(channel));
        }
        if header.body_size > message_bytes_max {
            let error = ModelError::precondition_failed(format!(
                "message size {} is larger than configured max size {message_bytes_max}",
                header.body_size
            ));
            self.channel_error(channel, &error, MethodId::BASIC_PUBLISH);
            return Ok(());
        }
        // RabbitMQ's validated user id: a message may name only its publisher as `user_id`, unless
        // the publisher has the `impersonator` tag.
        if let Some(user_id) = header.properties.user_id()
            && user_id.as_str() != self.grant.user()
            && !self.impersonator
        {
            let error = ModelError::precondition_failed(format!(
                "user_id property set to '{user_id}' but authenticated user was '{}'",
                self.grant.user()
            ));
            self.channel_error(channel, &error, MethodId::BASIC_PUBLISH);
            return Ok(());
        }
        if header.body_size == 0 {
            let message = message_from(&publish, &header, Bytes::new()).with_trace(self.origin.clone());
            return self.complete(channel, publish, message);
        }
        state.content = Some(Content::Body { publish, header, chunks: Vec::new(), received: 0 });
        Ok(())
    }

    pub(super) async fn content_body(&mut self, channel: u16, payload: Bytes) -> Result<(), Stop> {
        let Some(state) = self.channels.get_mut(&channel) else {
            return Err(unexpected_content(channel));
        };
        if state.closing {
            return Ok(());
        }
        let Some(Content::Body { publish, header, mut chunks, received }) = state.content.take() else {
            return Err(unexpected_content(channel));
        };
        if payload.is_empty() {
            // Legal but empty: keeping it would let a peer grow `chunks` forever.
            state.content = Some(Content::Body { publish, header, chunks, received });
            return Ok(());
        }
        let received = received + payload.len() as u64;
        if received > header.body_size {
            let error = connection_error(
                reply_code::FRAME_ERROR,
                "FRAME_ERROR",
                format!("body frames exceed the announced body size {}", header.body_size),
            );
            return Err(Stop::Error { error, cause: MethodId::BASIC_PUBLISH });
        }
        chunks.push(payload);
        if received < header.body_size {
            state.content = Some(Content::Body { publish, header, chunks, received });
            return Ok(());
        }
        // A body that came in one frame is a slice of the connection's read buffer: copied, so a
        // queued message does not keep the buffer's whole chunk alive (measured: RSS with a
        // 200,000-message backlog halves, 690 to 350 MiB, and publishing is no slower).
        let body = if chunks.len() == 1 {
            Bytes::copy_from_slice(&chunks.pop().unwrap_or_default())
        } else {
            let mut joined = BytesMut::with_capacity(received as usize);
            for chunk in &chunks {
                joined.extend_from_slice(chunk);
            }
            joined.freeze()
        };
        let message = message_from(&publish, &header, body).with_trace(self.origin.clone());
        self.complete(channel, publish, message)
    }

    /// A whole message arrived: publish it now, or keep it for the transaction's commit.
    pub(super) fn complete(&mut self, channel: u16, publish: basic::Publish, message: Message) -> Result<(), Stop> {
        // A request asking for a direct reply gets this channel's reply name (406 without a
        // reply consumer), as RabbitMQ rewrites it when the request is published.
        let message = if message.reply_to() == Some(DIRECT_REPLY_TO) {
            let named = self.core.lock_model().reply_to_name(self.key(channel));
            let name = match named {
                Ok(name) => name,
                Err(error) => return self.fail(channel, error, MethodId::BASIC_PUBLISH),
            };
            let mut properties = message.full_properties().into_owned();
            properties = properties.with_reply_to(name.as_str().into());
            message.with_properties(properties)
        } else {
            message
        };
        if let Some(state) = self.channels.get_mut(&channel)
            && let Some(buffer) = state.tx.as_mut()
        {
            if buffer.len() >= TX_OPS_MAX {
                let error =
                    ModelError::precondition_failed(format!("a transaction holds at most {TX_OPS_MAX} operations"));
                return self.fail(channel, error, MethodId::BASIC_PUBLISH);
            }
            state.tx_bytes += message.body_bytes();
            buffer.push(TxOp::Publish(Box::new((publish, message))));
            return Ok(());
        }
        // Appending only queues work for the store's writer, unless the writer is far behind:
        // then it may wait, and the runtime moves other tasks off this worker meanwhile. (Doing
        // that for every publish cost ~20% more CPU per message and extra latency: each
        // hand-off wakes another thread.)
        let published = if self.core.store.under_back_pressure() {
            crate::core::blocking(|| self.publish(channel, &publish, message, &mut ReservationPool::default()))
        } else {
            self.publish(channel, &publish, message, &mut ReservationPool::default())
        };
        match published {
            Ok(Published { durable, nack, returned, .. }) => {
                match self.channels.get_mut(&channel).and_then(|state| state.confirms.as_mut()) {
                    Some(confirms) => {
                        confirms.last_tag += 1;
                        confirms.queue.push(PendingConfirm {
                            tag: confirms.last_tag,
                            tickets: durable,
                            failed: nack,
                            returned,
                        });
                    }
                    None => {
                        if let Some(returned) = returned {
                            let _ = self.outbound.send(returned);
                        }
                    }
                }
                Ok(())
            }
            Err(error) => self.fail(channel, error, MethodId::BASIC_PUBLISH),
        }
    }

    /// Publishes a whole message received on `channel` (see `Core::publish`), with the space a
    /// transaction took ahead in `pool`.
    pub(super) fn publish(
        &self,
        channel: u16,
        publish: &basic::Publish,
        message: Message,
        pool: &mut ReservationPool,
    ) -> Result<Published, ModelError> {
        let request = PublishRequest {
            vhost: &self.vhost,
            channel,
            exchange: publish.exchange.as_str(),
            routing_key: publish.routing_key.as_str(),
            mandatory: publish.mandatory,
        };
        self.core.publish(&request, message, pool)
    }
}

fn message_from(publish: &basic::Publish, header: &ContentHeader, body: Bytes) -> Message {
    Message::new(
        publish.exchange.as_str().to_owned(),
        publish.routing_key.as_str().to_owned(),
        Arc::new(header.properties.clone()),
        // Copied out of the connection's read buffer (see `content_body`).
        Bytes::copy_from_slice(&header.raw_properties),
        body,
    )
}

fn unexpected_content(channel: u16) -> Stop {
    let error = connection_error(
        reply_code::UNEXPECTED_FRAME,
        "UNEXPECTED_FRAME",
        format!("content frame on channel {channel} without a publish in progress"),
    );
    Stop::Error { error, cause: MethodId::BASIC_PUBLISH }
}
