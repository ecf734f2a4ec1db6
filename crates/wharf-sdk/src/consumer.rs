//! The consumer runtime: a [`Handler`] runs for each message, with bounded concurrency and
//! prefetch. Its [`Outcome`] decides the acknowledgement (`settle.rs`): `Ack` on success, `Retry`
//! tries it again (by the consumer's [`RetryPolicy`], or a nack with requeue, where the queue's
//! `x-retry-backoff` and delivery limit apply), `Reject(reason)` dead-letters it. With [`ConsumerConfig::dead_letter`] set, the runtime publishes a rejected message there
//! itself (confirmed, every property kept, the reason in `x-reject-reason`) and then acknowledges
//! it, since AMQP's reject cannot carry a reason; otherwise it rejects without requeue and the
//! queue's own dead-lettering applies. The runtime reconnects after a connection loss (the broker
//! redelivers what was unacknowledged) and stops gracefully: it cancels the consumer, lets
//! in-flight handlers finish and settles them before it returns.

use crate::settle::{RetryPolicy, Settler};
use crate::trace::{TRACEPARENT_HEADER, TraceContext};
use crate::{Result, SdkError};
use futures_lite::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

/// A delivered message, as the handler sees it.
#[derive(Debug, Clone, Default)]
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
    /// The AMQP `type` (a typed message's name).
    pub message_type: Option<String>,
    /// The AMQP `correlation-id`.
    pub correlation_id: Option<String>,
    /// The AMQP `reply-to`.
    pub reply_to: Option<String>,
    /// The AMQP `content-type`.
    pub content_type: Option<String>,
    /// The AMQP `timestamp` (seconds since the Unix epoch), if the publisher set one.
    pub timestamp_s: Option<u64>,
    /// The queue it was consumed from.
    pub queue: String,
    /// Every AMQP property as it arrived, headers of every type (`x-death` included).
    pub properties: BasicProperties,
}

/// The header that carries a rejection's reason on a dead-lettered copy.
pub const REJECT_REASON_HEADER: &str = "x-reject-reason";

/// The longest the consumer waits for the broker to answer while it starts, or to take a
/// settlement, before it counts the connection as lost and starts again.
const BROKER_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// The header that names the queue a dead-lettered copy was rejected from.
pub const REJECTED_FROM_HEADER: &str = "x-rejected-from";

impl Incoming {
    /// The message id, or a permanent failure: a message without one cannot be handled exactly
    /// once, and retrying it cannot give it one.
    pub fn id(&self) -> std::result::Result<&str, crate::HandleError> {
        match self.message_id.as_deref() {
            Some(id) if !id.is_empty() => Ok(id),
            _ => Err(crate::HandleError::Permanent("the message has no message-id".into())),
        }
    }
}

/// What to do with a message after its handler ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done: acknowledge.
    Ack,
    /// Failed for now: requeue (after the queue's backoff, until its delivery limit).
    Retry,
    /// Can never succeed: dead-letter it, with the reason.
    Reject(String),
    /// Done, with a reply to the message's `reply-to` (request/reply): the reply is published,
    /// then the request acknowledged.
    Reply(Reply),
}

/// A reply to a request (see [`Outcome::Reply`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reply {
    /// The body.
    pub body: Vec<u8>,
    /// The AMQP `type` (a typed reply's name).
    pub message_type: Option<String>,
    /// The AMQP `content-type`.
    pub content_type: Option<String>,
}

impl Outcome {
    /// `ack`, `retry` or `reject`, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Ack => "ack",
            Outcome::Retry => "retry",
            Outcome::Reject(_) => "reject",
            Outcome::Reply(_) => "reply",
        }
    }
}

/// The trace context a handler runs in (a child of the publisher's, from the `traceparent`
/// header, or the root of a new trace) and its span.
fn handle_span(message: &Incoming) -> (TraceContext, tracing::Span) {
    let parent = message.headers.get(TRACEPARENT_HEADER).and_then(|value| TraceContext::parse(value));
    let context = parent.map_or_else(TraceContext::new_root, |parent| parent.child());
    let span = tracing::info_span!(
        "wharf.handle",
        queue = %message.queue,
        message_id = %message.message_id.as_deref().unwrap_or_default(),
        redelivered = message.redelivered,
        trace_id = %context.trace_id_hex(),
        span_id = %context.span_id_hex(),
        parent_id = %parent.map(|parent| parent.span_id_hex()).unwrap_or_default(),
        outcome = tracing::field::Empty,
    );
    (context, span)
}

/// Where rejected messages go when the runtime dead-letters them itself (to carry the reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The exchange (`""`: the routing key names the queue).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
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
    /// Where rejected messages are published, with their reason; `None` rejects them to the
    /// queue's own dead-lettering (the reason is only logged).
    pub dead_letter: Option<DeadLetter>,
    /// How a message whose handler failed for now is tried again, on any broker; `None` nacks
    /// it with requeue (on Wharf the queue's `x-retry-backoff` and delivery limit then apply).
    pub retry: Option<RetryPolicy>,
    /// Up while consuming, down with the error while the connection is lost.
    pub health: crate::observe::Health,
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
            dead_letter: None,
            retry: None,
            health: crate::observe::Health::new(),
        }
    }

    /// Failed messages are tried again as `policy` says, then dead-lettered with the reason.
    pub fn retry(mut self, policy: RetryPolicy) -> ConsumerConfig {
        self.retry = Some(policy);
        self
    }

    /// Rejected messages go to `routing_key` on `exchange`, carrying the reason.
    pub fn dead_letter_to(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> ConsumerConfig {
        self.dead_letter = Some(DeadLetter { exchange: exchange.into(), routing_key: routing_key.into() });
        self
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

fn incoming(delivery: &lapin::message::Delivery, queue: &str) -> Incoming {
    let table = delivery.properties.headers().clone().unwrap_or_default();
    let headers = table.inner().iter().filter_map(|(name, value)| Some((name.to_string(), text(value)?))).collect();
    let delivery_count = table
        .inner()
        .get("x-delivery-count")
        .and_then(integer)
        .map_or(0, |count| count.clamp(0, i64::from(u32::MAX)) as u32);
    let properties = &delivery.properties;
    let short = |value: &Option<lapin::types::ShortString>| value.as_ref().map(|value| value.to_string());
    Incoming {
        message_id: short(properties.message_id()),
        message_type: short(properties.kind()),
        correlation_id: short(properties.correlation_id()),
        reply_to: short(properties.reply_to()),
        content_type: short(properties.content_type()),
        timestamp_s: *properties.timestamp(),
        queue: queue.to_owned(),
        properties: properties.clone(),
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
                config.health.down(error.to_string());
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
    // Bounded: a broker killed in the middle of the handshake must not leave the consumer
    // waiting for an answer that never comes (seen in the telemetry chaos run).
    let setup = async {
        let connection = Arc::new(Connection::connect(&config.url, ConnectionProperties::default()).await?);
        let channel = connection.create_channel().await?;
        channel.basic_qos(config.prefetch, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(
                config.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let settler = Arc::new(Settler::open(Arc::clone(&connection), config).await?);
        Ok::<_, SdkError>((connection, channel, consumer, settler))
    };
    let (connection, channel, mut consumer, settler) = tokio::time::timeout(BROKER_ANSWER_TIMEOUT, setup)
        .await
        .map_err(|_| SdkError::Unreachable("the broker did not answer while the consumer started".into()))??;
    config.health.up();
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
                let settler = Arc::clone(&settler);
                running.spawn(async move {
                    // A handler that panics has its message requeued (not left unsettled,
                    // holding a prefetch slot and, on an ordered queue, its key).
                    let message = incoming(&delivery, settler.queue());
                    let (context, span) = handle_span(&message);
                    let handled = crate::trace::in_context(context, handler.handle(message));
                    let handled = std::panic::AssertUnwindSafe(handled.instrument(span.clone()));
                    let outcome = futures_lite::FutureExt::catch_unwind(handled).await.unwrap_or_else(|_| {
                        tracing::error!(parent: &span, "a handler panicked; its message is requeued");
                        Outcome::Retry
                    });
                    span.record("outcome", outcome.name());
                    crate::observe::handled(settler.queue(), &outcome);
                    // Bounded like the start: on a connection that died, an acknowledgement may
                    // never be answered, and the consumer waits for its handlers before it
                    // reconnects.
                    match tokio::time::timeout(BROKER_ANSWER_TIMEOUT, settler.settle(&delivery, outcome)).await {
                        Ok(Ok(_)) => {}
                        // The connection went: the broker redelivers it, and the inbox (or the
                        // handler's idempotence) makes the second time harmless.
                        Ok(Err(error)) => tracing::warn!(%error, "could not settle a delivery"),
                        Err(_) => tracing::warn!("settling a delivery timed out; the broker redelivers it"),
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
