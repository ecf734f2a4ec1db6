//! What the consumer runtime does with a delivery once its handler gave an [`Outcome`]: the
//! acknowledgement, retries that work on any broker, and dead letters that carry their reason.
//!
//! **Retries on any broker.** RabbitMQ's classic queues requeue a nacked message at once and
//! count nothing, so a failing message spins. With a [`RetryPolicy`], the runtime publishes a
//! copy (confirmed, every property kept, `x-retry-attempt` raised by one) and acknowledges the
//! original: first straight back to the queue, `immediate` times; then through one wait queue per
//! delay, `<queue>.retry.<delay_ms>` (declared at start with `x-message-ttl` = the delay and
//! dead-lettering back to the queue: a fixed TTL per queue, so a long wait never holds up a short
//! one behind it); then the message is dead-lettered with the reason that it gave up. A copy that
//! cannot be published falls back to a nack with requeue: the message is never lost.
//!
//! **Dead letters with a reason.** AMQP's reject carries no reason. With a
//! [`DeadLetter`](crate::DeadLetter) target, the runtime publishes the copy there with
//! `x-reject-reason` and `x-rejected-from`, then acknowledges; without one, or if that publish
//! fails, it rejects without requeue and the queue's own dead-lettering applies.
//!
//! **Replies.** `Outcome::Reply` publishes the reply to the request's `reply-to` (direct reply-to
//! or a queue), with the request's correlation id (or its message id), then acknowledges it.

use crate::consumer::{ConsumerConfig, DeadLetter, Outcome, REJECT_REASON_HEADER, REJECTED_FROM_HEADER, Reply};
use crate::{Result, SdkError};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use std::sync::Arc;

/// The header that counts a message's attempts after its first.
pub const RETRY_ATTEMPT_HEADER: &str = "x-retry-attempt";

/// How a message whose handler failed for now is tried again.
///
/// The queue must not de-duplicate by message id or keep per-key order: a retry is a copy with
/// the same id at the back of the queue, which a de-duplicating queue drops and which later
/// messages of its key would overtake (the topology helper refuses the combination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries straight away (the copy goes to the back of the queue).
    pub immediate: u32,
    /// Then one try after each of these delays, in milliseconds, in order.
    pub delays_ms: Vec<u64>,
}

impl RetryPolicy {
    /// `immediate` tries straight away, then one after each delay.
    pub fn new(immediate: u32, delays_ms: impl Into<Vec<u64>>) -> RetryPolicy {
        RetryPolicy { immediate, delays_ms: delays_ms.into() }
    }

    /// Tries in all, the first delivery included.
    pub fn attempts_max(&self) -> u64 {
        1 + u64::from(self.immediate) + self.delays_ms.len() as u64
    }

    /// The wait queue for `delay_ms` in front of `queue`.
    pub fn wait_queue(queue: &str, delay_ms: u64) -> String {
        format!("{queue}.retry.{delay_ms}")
    }
}

/// What to do after attempt number `attempt` (0: the first delivery) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Next {
    Now,
    After(u64),
    GiveUp,
}

fn next(policy: &RetryPolicy, attempt: u64) -> Next {
    if attempt < u64::from(policy.immediate) {
        return Next::Now;
    }
    let delayed = attempt - u64::from(policy.immediate);
    match usize::try_from(delayed).ok().and_then(|index| policy.delays_ms.get(index)) {
        Some(delay_ms) => Next::After(*delay_ms),
        None => Next::GiveUp,
    }
}

fn integer(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::ShortShortUInt(value) => Some(u64::from(*value)),
        AMQPValue::ShortUInt(value) => Some(u64::from(*value)),
        AMQPValue::LongUInt(value) => Some(u64::from(*value)),
        AMQPValue::ShortShortInt(value) => u64::try_from(*value).ok(),
        AMQPValue::ShortInt(value) => u64::try_from(*value).ok(),
        AMQPValue::LongInt(value) => u64::try_from(*value).ok(),
        AMQPValue::LongLongInt(value) => u64::try_from(*value).ok(),
        _ => None,
    }
}

/// The attempt a delivery is (0 for a message never retried by a policy).
pub(crate) fn attempt_of(properties: &BasicProperties) -> u64 {
    properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(RETRY_ATTEMPT_HEADER))
        .and_then(integer)
        .unwrap_or(0)
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

/// Settles deliveries for one consumer connection.
#[derive(Debug)]
pub(crate) struct Settler {
    queue: String,
    /// The consumer's connection, to reopen the publishing channel on.
    connection: Arc<Connection>,
    /// A confirming channel for copies (retries, dead letters) and replies; reopened when the
    /// broker closed it (a refused publish closes a channel).
    publishing: tokio::sync::Mutex<Channel>,
    dead_letter: Option<DeadLetter>,
    retry: Option<RetryPolicy>,
}

impl Settler {
    /// Opens what `config` needs on `connection`; declares the retry policy's wait queues.
    pub(crate) async fn open(connection: Arc<Connection>, config: &ConsumerConfig) -> Result<Settler> {
        let publishing = confirming(&connection).await?;
        if let Some(policy) = &config.retry {
            declare_wait_queues(&publishing, &config.queue, policy).await?;
        }
        Ok(Settler {
            queue: config.queue.clone(),
            connection,
            publishing: tokio::sync::Mutex::new(publishing),
            dead_letter: config.dead_letter.clone(),
            retry: config.retry.clone(),
        })
    }

    /// The queue consumed.
    pub(crate) fn queue(&self) -> &str {
        &self.queue
    }

    /// The publishing channel, reopened if the broker closed it.
    async fn channel(&self) -> Result<Channel> {
        let mut publishing = self.publishing.lock().await;
        if !publishing.status().connected() {
            tracing::info!(queue = %self.queue, "reopening the consumer's publishing channel");
            *publishing = confirming(&self.connection).await?;
        }
        Ok(publishing.clone())
    }

    /// Applies `outcome` to `delivery`.
    pub(crate) async fn settle(
        &self,
        delivery: &Delivery,
        outcome: Outcome,
    ) -> std::result::Result<bool, lapin::Error> {
        match outcome {
            Outcome::Ack => delivery.ack(BasicAckOptions::default()).await,
            Outcome::Retry => self.retry(delivery).await,
            Outcome::Reject(reason) => self.reject(delivery, &reason).await,
            Outcome::Reply(reply) => self.reply(delivery, reply).await,
        }
    }

    async fn reply(&self, delivery: &Delivery, reply: Reply) -> std::result::Result<bool, lapin::Error> {
        let request = &delivery.properties;
        let Some(reply_to) = request.reply_to().as_ref().map(|to| to.to_string()) else {
            tracing::warn!("a reply to a request without reply-to: dropped; the request is acknowledged");
            return delivery.ack(BasicAckOptions::default()).await;
        };
        // The requester matches replies by correlation id: the request's own, or its message id.
        let correlation = request.correlation_id().clone().or_else(|| request.message_id().clone());
        let mut properties = BasicProperties::default();
        if let Some(correlation) = correlation {
            properties = properties.with_correlation_id(correlation);
        }
        let short = |value: Option<String>| value.and_then(|value| lapin::types::ShortString::try_new(value).ok());
        if let Some(message_type) = short(reply.message_type) {
            properties = properties.with_type(message_type);
        }
        if let Some(content_type) = short(reply.content_type) {
            properties = properties.with_content_type(content_type);
        }
        let published = async {
            let channel = self.channel().await?;
            let confirm = channel
                .basic_publish(
                    "".into(),
                    reply_to.as_str().into(),
                    BasicPublishOptions::default(),
                    &reply.body,
                    properties,
                )
                .await?;
            Ok::<_, SdkError>(confirm.await?)
        };
        if let Err(error) = published.await {
            // The requester may be gone; the request was handled either way.
            tracing::warn!(%error, reply_to, "could not publish a reply");
        }
        delivery.ack(BasicAckOptions::default()).await
    }

    async fn retry(&self, delivery: &Delivery) -> std::result::Result<bool, lapin::Error> {
        let Some(policy) = &self.retry else {
            return delivery.nack(BasicNackOptions { multiple: false, requeue: true }).await;
        };
        let attempt = attempt_of(&delivery.properties);
        let routing_key = match next(policy, attempt) {
            Next::Now => self.queue.clone(),
            Next::After(delay_ms) => RetryPolicy::wait_queue(&self.queue, delay_ms),
            Next::GiveUp => {
                let reason = format!("failed {} times, the retry policy's limit", attempt + 1);
                return Box::pin(self.reject(delivery, &reason)).await;
            }
        };
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            RETRY_ATTEMPT_HEADER.into(),
            AMQPValue::LongLongInt(i64::try_from(attempt + 1).unwrap_or(i64::MAX)),
        );
        let published = match self.channel().await {
            Ok(channel) => publish(&channel, "", &routing_key, delivery, headers).await,
            Err(error) => Err(error),
        };
        match published {
            Ok(()) => delivery.ack(BasicAckOptions::default()).await,
            Err(error) => {
                tracing::warn!(%error, "could not publish the retry; requeueing instead");
                delivery.nack(BasicNackOptions { multiple: false, requeue: true }).await
            }
        }
    }

    async fn reject(&self, delivery: &Delivery, reason: &str) -> std::result::Result<bool, lapin::Error> {
        let id = delivery.properties.message_id().as_ref().map(|id| id.to_string()).unwrap_or_default();
        if let Some(target) = &self.dead_letter {
            // A message re-driven from the dead-letter queue starts its retries afresh.
            let mut headers = FieldTable::default();
            let original = delivery.properties.headers().clone().unwrap_or_default();
            for (name, value) in original.inner().iter().filter(|(name, _)| name.as_str() != RETRY_ATTEMPT_HEADER) {
                headers.insert(name.clone(), value.clone());
            }
            headers.insert(REJECT_REASON_HEADER.into(), text(reason));
            headers.insert(REJECTED_FROM_HEADER.into(), text(&self.queue));
            let published = match self.channel().await {
                Ok(channel) => publish(&channel, &target.exchange, &target.routing_key, delivery, headers).await,
                Err(error) => Err(error),
            };
            match published {
                Ok(()) => {
                    tracing::warn!(%id, queue = %self.queue, reason, "message rejected; dead-lettered with its reason");
                    return delivery.ack(BasicAckOptions::default()).await;
                }
                Err(error) => tracing::error!(%id, %error, "could not dead-letter the copy; rejecting instead"),
            }
        }
        tracing::warn!(%id, queue = %self.queue, reason, "message rejected");
        delivery.nack(BasicNackOptions { multiple: false, requeue: false }).await
    }
}

/// A new channel on `connection`, in confirm mode.
async fn confirming(connection: &Connection) -> Result<Channel> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(channel)
}

/// The arguments of `queue`'s wait queue for `delay_ms`: the delay as its TTL, dead-lettering
/// back to `queue`.
pub(crate) fn wait_queue_arguments(queue: &str, delay_ms: u64) -> Result<FieldTable> {
    let delay = i32::try_from(delay_ms)
        .map_err(|_| SdkError::Config(format!("a retry delay of {delay_ms} ms is too long (at most 2^31 - 1)")))?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(delay));
    arguments.insert("x-dead-letter-exchange".into(), text(""));
    arguments.insert("x-dead-letter-routing-key".into(), text(queue));
    Ok(arguments)
}

/// Declares `policy`'s wait queues in front of `queue`.
pub(crate) async fn declare_wait_queues(channel: &Channel, queue: &str, policy: &RetryPolicy) -> Result<()> {
    for delay_ms in &policy.delays_ms {
        let name = RetryPolicy::wait_queue(queue, *delay_ms);
        let arguments = wait_queue_arguments(queue, *delay_ms)?;
        channel.queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), arguments).await?;
    }
    Ok(())
}

/// Publishes a copy of `delivery` with `headers`, confirmed and routed (mandatory).
async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    delivery: &Delivery,
    headers: FieldTable,
) -> Result<()> {
    let properties = delivery.properties.clone().with_headers(headers);
    let confirmation = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            &delivery.data,
            properties,
        )
        .await?
        .await?;
    let message_id = delivery.properties.message_id().as_ref().map(|id| id.to_string()).unwrap_or_default();
    match confirmation {
        lapin::Confirmation::Ack(None) => Ok(()),
        lapin::Confirmation::Ack(Some(_)) => Err(SdkError::Unroutable { message_id }),
        lapin::Confirmation::Nack(_) | lapin::Confirmation::NotRequested => Err(SdkError::Nacked { message_id }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_go_immediate_then_delayed_then_give_up() {
        let policy = RetryPolicy::new(2, [100, 1000]);
        let plan: Vec<Next> = (0..6).map(|attempt| next(&policy, attempt)).collect();
        assert_eq!(plan, vec![Next::Now, Next::Now, Next::After(100), Next::After(1000), Next::GiveUp, Next::GiveUp]);
        assert_eq!(policy.attempts_max(), 5);
        assert_eq!(next(&RetryPolicy::new(0, []), 0), Next::GiveUp);
    }
}
