//! Request/reply over AMQP: a [`Requester`] sends typed requests and awaits their typed replies;
//! a [`Responder`] answers them inside the consumer runtime ([`responding`]).
//!
//! Replies come back through RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to`), which Wharf
//! and RabbitMQ both have: no reply queue to declare or clean up. The requester consumes the
//! pseudo-queue without acks (as direct reply-to requires) on the channel it publishes on, and
//! matches replies to requests by correlation id (the request's message id). A request nobody
//! answers in time fails with [`SdkError::NoReply`]; one that no queue takes fails at once with
//! [`SdkError::Unroutable`].

use crate::consumer::{Handler, Incoming, Outcome, Reply};
use crate::event::Event;
use crate::handler::HandleError;
use crate::message::{JSON, Message};
use crate::{Result, SdkError};
use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// The pseudo-queue of direct reply-to.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Most requests waiting for a reply at once.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 10_000;

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<lapin::message::Delivery>>>>;

/// Sends requests and awaits their replies, over one connection.
#[derive(Debug)]
pub struct Requester {
    connection: Connection,
    channel: Channel,
    waiting: Waiting,
    replies: tokio::task::JoinHandle<()>,
}

impl Requester {
    /// Connects to the broker at `url` and starts listening for replies.
    pub async fn connect(url: &str) -> Result<Requester> {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let mut consumer = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let waiting: Waiting = Arc::default();
        let replies = tokio::spawn({
            let waiting = Arc::clone(&waiting);
            async move {
                let waiting_on_stop = Arc::clone(&waiting);
                while let Some(Ok(delivery)) = consumer.next().await {
                    let Some(correlation) = delivery.properties.correlation_id().as_ref().map(|id| id.to_string())
                    else {
                        tracing::warn!("a reply without a correlation id: dropped");
                        continue;
                    };
                    let waiter = waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&correlation);
                    match waiter {
                        Some(waiter) => {
                            let _ = waiter.send(delivery);
                        }
                        None => tracing::debug!(%correlation, "a reply nobody waits for (late, or a copy): dropped"),
                    }
                }
                // The connection is gone: every request still waiting fails now, not at its
                // timeout (dropping a waiter's sender wakes it with an error).
                waiting_on_stop.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clear();
            }
        });
        Ok(Requester { connection, channel, waiting, replies })
    }

    /// Sends `request` (to its type's exchange and routing key) and waits up to `timeout` for
    /// the reply, decoded as `Resp`.
    pub async fn request<Req: Message, Resp: Message>(&self, request: &Req, timeout: Duration) -> Result<Resp> {
        let event = Event::from_message(request)?;
        let reply = self.request_event(&event, timeout).await?;
        if let Some(kind) = reply.properties.kind().as_ref()
            && kind.as_str() != Resp::TYPE
        {
            return Err(SdkError::Body(format!("a reply of type '{kind}' where '{}' was expected", Resp::TYPE)));
        }
        serde_json::from_slice(&reply.data)
            .map_err(|error| SdkError::Body(format!("the reply is not a valid {}: {error}", Resp::TYPE)))
    }

    /// Sends `event` as a request and waits up to `timeout` for the raw reply.
    pub async fn request_event(&self, event: &Event, timeout: Duration) -> Result<lapin::message::Delivery> {
        event.check()?;
        if self.replies.is_finished() {
            return Err(SdkError::Unreachable("the reply listener stopped (connection lost)".into()));
        }
        // The responder replies with the request's correlation id, or its message id without one.
        let correlation = event.correlation_id.clone().unwrap_or_else(|| event.id.clone());
        let (sender, receiver) = oneshot::channel();
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if waiting.len() >= REQUESTS_IN_FLIGHT_MAX {
                return Err(SdkError::Config(format!("more than {REQUESTS_IN_FLIGHT_MAX} requests waiting at once")));
            }
            if waiting.contains_key(&correlation) {
                return Err(SdkError::Invalid {
                    id: event.id.clone(),
                    reason: format!("a request with correlation id '{correlation}' is already waiting for its reply"),
                });
            }
            waiting.insert(correlation.clone(), sender);
        }
        let forget = || self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&correlation);
        let properties = crate::publisher::properties(event).with_reply_to(DIRECT_REPLY_TO.into());
        let published = async {
            self.channel
                .basic_publish(
                    event.exchange.as_str().into(),
                    event.routing_key.as_str().into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &event.body,
                    properties,
                )
                .await?
                .await
        };
        match published.await {
            Ok(lapin::Confirmation::Ack(None)) => {}
            Ok(lapin::Confirmation::Ack(Some(_))) => {
                forget();
                return Err(SdkError::Unroutable { message_id: event.id.clone() });
            }
            Ok(_) => {
                forget();
                return Err(SdkError::Nacked { message_id: event.id.clone() });
            }
            Err(error) => {
                forget();
                return Err(error.into());
            }
        }
        match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(SdkError::Unreachable("the reply listener stopped (connection lost)".into())),
            Err(_) => {
                forget();
                Err(SdkError::NoReply { id: event.id.clone(), timeout_ms: timeout.as_millis() as u64 })
            }
        }
    }

    /// Closes the connection.
    pub async fn close(self) -> Result<()> {
        self.replies.abort();
        self.connection.close(200, "requester closing".into()).await?;
        Ok(())
    }
}

/// Answers requests of one type.
pub trait Responder<Req: Message, Resp: Message>: Send + Sync + 'static {
    /// The reply to `request`. An error is handled as any handler's: retried or dead-lettered,
    /// and no reply is sent.
    fn respond(
        &self,
        request: Req,
        incoming: &Incoming,
    ) -> impl Future<Output = std::result::Result<Resp, HandleError>> + Send;
}

/// A [`Handler`] for the runtime that decodes each delivery as `Req`, asks `responder` and
/// replies to the request's `reply-to`.
pub fn responding<Req: Message, Resp: Message, R: Responder<Req, Resp>>(responder: R) -> Responding<Req, Resp, R> {
    Responding { responder, types: PhantomData }
}

/// See [`responding`].
pub struct Responding<Req, Resp, R> {
    responder: R,
    types: PhantomData<fn(Req) -> Resp>,
}

impl<Req, Resp, R> std::fmt::Debug for Responding<Req, Resp, R> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Responding")
            .field("request", &std::any::type_name::<Req>())
            .field("reply", &std::any::type_name::<Resp>())
            .finish_non_exhaustive()
    }
}

impl<Req: Message, Resp: Message, R: Responder<Req, Resp>> Handler for Responding<Req, Resp, R> {
    async fn handle(&self, incoming: Incoming) -> Outcome {
        let request = match incoming.decode::<Req>() {
            Ok(request) => request,
            Err(error) => return error.outcome(),
        };
        match self.responder.respond(request, &incoming).await {
            Ok(reply) => match serde_json::to_vec(&reply) {
                Ok(body) => Outcome::Reply(Reply {
                    body,
                    message_type: Some(Resp::TYPE.to_owned()),
                    content_type: Some(JSON.to_owned()),
                }),
                Err(error) => Outcome::Reject(format!("cannot serialise a {}: {error}", Resp::TYPE)),
            },
            Err(error) => error.outcome(),
        }
    }
}
