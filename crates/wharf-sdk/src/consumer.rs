//! The consumer runtime: a typed [`Handler`] runs for each message, with bounded concurrency
//! and prefetch. Its [`Outcome`] decides the acknowledgement: `Ack` on success, `Retry` nacks
//! with requeue (the queue's `x-retry-backoff` and delivery limit apply), `Reject` rejects without
//! requeue (the queue's dead-lettering applies). The runtime reconnects after a connection loss
//! (the broker redelivers what was unacknowledged) and stops gracefully: it cancels the consumer,
//! lets in-flight handlers finish and acknowledges them before it returns.

use crate::{Result, SdkError};
use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// A delivered message, as the handler sees it.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The AMQP `message-id` (the event id for messages from the outbox).
    pub message_id: Option<String>,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// String-valued headers (others are left out).
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
    /// Delivered before.
    pub redelivered: bool,
    /// Deliveries before this one (the broker's `x-delivery-count`; 0 on a first delivery).
    pub delivery_count: u32,
}

/// What to do with a message after its handler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done: acknowledge.
    Ack,
    /// Failed for now: requeue (after the queue's backoff, until its delivery limit).
    Retry,
    /// Can never succeed: reject (to the dead-letter queue).
    Reject,
}

/// Handles messages. Called concurrently, up to the runtime's concurrency.
pub trait Handler: Send + Sync + 'static {
    /// Handles one message.
    fn handle(&self, message: Incoming) -> impl Future<Output = Outcome> + Send;
}

/// How the runtime consumes.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The broker's AMQP URL.
    pub url: String,
    /// The queue to consume from (it must exist).
    pub queue: String,
    /// Unacknowledged messages the broker may send ahead.
    pub prefetch: u16,
    /// Handlers running at once.
    pub concurrency: usize,
    /// The longest wait between reconnection attempts.
    pub reconnect_delay_ms_max: u64,
}

impl ConsumerConfig {
    /// Defaults: prefetch 32, 8 handlers at once, reconnecting with backoff up to 5 s.
    pub fn new(url: impl Into<String>, queue: impl Into<String>) -> ConsumerConfig {
        ConsumerConfig {
            url: url.into(),
            queue: queue.into(),
            prefetch: 32,
            concurrency: 8,
            reconnect_delay_ms_max: 5000,
        }
    }
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(text) => String::from_utf8(text.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}

fn integer(value: &AMQPValue) -> Option<i64> {
    Some(match value {
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::LongLongInt(v) => *v,
        _ => return None,
    })
}

fn incoming(delivery: &lapin::message::Delivery) -> Incoming {
    let table = delivery.properties.headers().clone().unwrap_or_default();
    let headers = table.inner().iter().filter_map(|(name, value)| Some((name.to_string(), text(value)?))).collect();
    let delivery_count = table
        .inner()
        .get("x-delivery-count")
        .and_then(integer)
        .map_or(0, |count| count.clamp(0, i64::from(u32::MAX)) as u32);
    Incoming {
        message_id: delivery.properties.message_id().as_ref().map(|id| id.to_string()),
        exchange: delivery.exchange.to_string(),
        routing_key: delivery.routing_key.to_string(),
        headers,
        body: delivery.data.clone(),
        redelivered: delivery.redelivered,
        delivery_count,
    }
}

/// Consumes `config.queue` with `handler` until `shutdown` turns true.
pub async fn run_consumer<H: Handler>(
    config: ConsumerConfig,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let shutdown = &mut shutdown;
    if config.concurrency == 0 || config.prefetch == 0 {
        return Err(SdkError::Config("the consumer's concurrency and prefetch must be at least 1".into()));
    }
    let handler = Arc::new(handler);
    let mut failures = 0u32;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        match consume_once(&config, &handler, shutdown).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                failures += 1;
                let delay_ms = (50u64 << failures.min(16)).min(config.reconnect_delay_ms_max);
                tracing::warn!(%error, delay_ms, queue = %config.queue, "consumer lost its connection; reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(delay_ms)) => {}
                    () = crate::relay::stopped(shutdown) => {}
                }
            }
        }
    }
}

/// One connection's worth of consuming. `Ok` means a requested stop (everything in flight was
/// handled and settled); `Err` a lost connection.
async fn consume_once<H: Handler>(
    config: &ConsumerConfig,
    handler: &Arc<H>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<()> {
    let connection = Connection::connect(&config.url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(config.prefetch, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(config.queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let mut running = JoinSet::new();
    let outcome = loop {
        tokio::select! {
            () = crate::relay::stopped(shutdown) => {
                let _ = channel.basic_cancel(consumer.tag().as_str().into(), BasicCancelOptions::default()).await;
                break Ok(());
            }
            next = consumer.next() => {
                let delivery = match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(error)) => break Err(SdkError::from(error)),
                    None => break Err(SdkError::Unreachable("the broker ended the consumer".into())),
                };
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { break Ok(()) };
                let handler = Arc::clone(handler);
                running.spawn(async move {
                    // A handler that panics has its message requeued (not left unsettled,
                    // holding a prefetch slot and, on an ordered queue, its key).
                    let handled = std::panic::AssertUnwindSafe(handler.handle(incoming(&delivery)));
                    let outcome = futures_lite::FutureExt::catch_unwind(handled).await.unwrap_or_else(|_| {
                        tracing::error!("a handler panicked; its message is requeued");
                        Outcome::Retry
                    });
                    let settled = match outcome {
                        Outcome::Ack => delivery.ack(BasicAckOptions::default()).await,
                        Outcome::Retry => delivery.nack(BasicNackOptions { multiple: false, requeue: true }).await,
                        Outcome::Reject => delivery.nack(BasicNackOptions { multiple: false, requeue: false }).await,
                    };
                    if let Err(error) = settled {
                        // The connection went: the broker redelivers it, and the inbox (or the
                        // handler's idempotence) makes the second time harmless.
                        tracing::warn!(%error, "could not settle a delivery");
                    }
                    drop(permit);
                });
            }
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    };
    // Graceful: in-flight handlers finish and settle before the connection closes.
    while running.join_next().await.is_some() {}
    let _ = connection.close(200, "consumer stopping".into()).await;
    outcome
}
