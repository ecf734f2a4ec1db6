//! A typed topology: exchanges, queues, their bindings and their guarantees, declared
//! idempotently, instead of hand-built `FieldTable`s.
//!
//! ```
//! use wharf_sdk::topology::{ExchangeKind, Queue, Topology};
//! let topology = Topology::new()
//!     .exchange("orders", ExchangeKind::Topic)
//!     .queue(
//!         Queue::new("payments")
//!             .bind("orders", "order.#")
//!             .dead_letter_queue("payments.dlq")
//!             .delivery_limit(5)
//!             .ordered_by_key(),
//!     );
//! // topology.declare("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! ```
//!
//! The arguments are RabbitMQ's names where RabbitMQ has the feature (`x-dead-letter-exchange`,
//! `x-delivery-limit`, `x-queue-type`), and Wharf's where only Wharf has it (`x-retry-backoff`,
//! `x-ordered-by`, `x-deduplication`). RabbitMQ refuses a declaration with an argument it does
//! not know only where it checks the argument's type, so declare the Wharf-only guarantees
//! against Wharf. A [`RetryPolicy`]'s wait queues work on both.

use crate::consumer::ConsumerConfig;
use crate::event::ORDERING_KEY_HEADER;
use crate::settle::{RetryPolicy, declare_wait_queues};
use crate::{Result, SdkError};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind as LapinKind};

/// An exchange's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// Routes by exact routing key.
    Direct,
    /// Routes by routing-key pattern (`*` one word, `#` any).
    Topic,
    /// Routes to every bound queue.
    Fanout,
    /// Routes by headers.
    Headers,
}

/// An exchange to declare (durable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    name: String,
    kind: ExchangeKind,
    deduplicated: bool,
}

impl Exchange {
    /// A durable exchange.
    pub fn new(name: impl Into<String>, kind: ExchangeKind) -> Exchange {
        Exchange { name: name.into(), kind, deduplicated: false }
    }

    /// Drops a publish whose message id it has seen (Wharf's `x-deduplication`).
    pub fn deduplicated(mut self) -> Exchange {
        self.deduplicated = true;
        self
    }
}

/// A durable queue to declare, with its bindings and guarantees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    name: String,
    bindings: Vec<(String, String)>,
    dead_letter_queue: Option<String>,
    delivery_limit: Option<i64>,
    retry_backoff_ms: Vec<u64>,
    ordered_by: Option<String>,
    deduplicated: bool,
    quorum: bool,
    retry: Option<RetryPolicy>,
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

impl Queue {
    /// A durable queue.
    pub fn new(name: impl Into<String>) -> Queue {
        Queue {
            name: name.into(),
            bindings: Vec::new(),
            dead_letter_queue: None,
            delivery_limit: None,
            retry_backoff_ms: Vec::new(),
            ordered_by: None,
            deduplicated: false,
            quorum: false,
            retry: None,
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Binds it to `exchange` with `routing_key`.
    pub fn bind(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Queue {
        self.bindings.push((exchange.into(), routing_key.into()));
        self
    }

    /// Dead-letters to the durable queue `name` (declared too): rejected messages, and those over
    /// the delivery limit.
    pub fn dead_letter_queue(mut self, name: impl Into<String>) -> Queue {
        self.dead_letter_queue = Some(name.into());
        self
    }

    /// Deliveries after which a message is dead-lettered (`x-delivery-limit`).
    pub fn delivery_limit(mut self, deliveries: i64) -> Queue {
        self.delivery_limit = Some(deliveries);
        self
    }

    /// Waits before each redelivery of a nacked message, per attempt (Wharf's `x-retry-backoff`).
    pub fn retry_backoff_ms(mut self, steps_ms: impl Into<Vec<u64>>) -> Queue {
        self.retry_backoff_ms = steps_ms.into();
        self
    }

    /// One message per ordering key at a time, in publish order (Wharf's `x-ordered-by` on the
    /// header the SDK sends the ordering key in).
    pub fn ordered_by_key(mut self) -> Queue {
        self.ordered_by = Some(ORDERING_KEY_HEADER.to_owned());
        self
    }

    /// Drops a publish whose message id it has seen (Wharf's `x-deduplication`).
    pub fn deduplicated(mut self) -> Queue {
        self.deduplicated = true;
        self
    }

    /// A quorum queue (`x-queue-type: quorum`).
    pub fn quorum(mut self) -> Queue {
        self.quorum = true;
        self
    }

    /// The SDK's own retries for its consumers: the wait queues are declared with the queue.
    pub fn retry(mut self, policy: RetryPolicy) -> Queue {
        self.retry = Some(policy);
        self
    }

    /// The queue's declaration arguments.
    pub fn arguments(&self) -> Result<FieldTable> {
        let mut arguments = FieldTable::default();
        if let Some(dead_letter) = &self.dead_letter_queue {
            arguments.insert("x-dead-letter-exchange".into(), text(""));
            arguments.insert("x-dead-letter-routing-key".into(), text(dead_letter));
        }
        if let Some(limit) = self.delivery_limit {
            arguments.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
        }
        if !self.retry_backoff_ms.is_empty() {
            let mut steps = FieldArray::default();
            for step in &self.retry_backoff_ms {
                let step = i64::try_from(*step)
                    .map_err(|_| SdkError::Config(format!("a retry backoff step of {step} ms is too long")))?;
                steps.push(AMQPValue::LongLongInt(step));
            }
            arguments.insert("x-retry-backoff".into(), AMQPValue::FieldArray(steps));
        }
        if let Some(header) = &self.ordered_by {
            arguments.insert("x-ordered-by".into(), text(header));
        }
        if self.deduplicated {
            arguments.insert("x-deduplication".into(), AMQPValue::Boolean(true));
        }
        if self.quorum {
            arguments.insert("x-queue-type".into(), text("quorum"));
        }
        Ok(arguments)
    }

    /// A consumer of this queue at `url`, with its dead-letter queue and retry policy wired in.
    pub fn consumer(&self, url: impl Into<String>) -> ConsumerConfig {
        let mut config = ConsumerConfig::new(url, self.name.clone());
        if let Some(dead_letter) = &self.dead_letter_queue {
            config = config.dead_letter_to("", dead_letter.clone());
        }
        if let Some(policy) = &self.retry {
            config = config.retry(policy.clone());
        }
        config
    }
}

/// Exchanges and queues, declared together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    exchanges: Vec<Exchange>,
    queues: Vec<Queue>,
}

impl Topology {
    /// Nothing yet.
    pub fn new() -> Topology {
        Topology::default()
    }

    /// Adds a durable exchange of `kind`.
    pub fn exchange(self, name: impl Into<String>, kind: ExchangeKind) -> Topology {
        self.with_exchange(Exchange::new(name, kind))
    }

    /// Adds an exchange.
    pub fn with_exchange(mut self, exchange: Exchange) -> Topology {
        self.exchanges.push(exchange);
        self
    }

    /// Adds a queue.
    pub fn queue(mut self, queue: Queue) -> Topology {
        self.queues.push(queue);
        self
    }

    /// Declares everything on a connection of its own to `url`.
    pub async fn declare(&self, url: &str) -> Result<()> {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        let declared = self.declare_on(&channel).await;
        let _ = connection.close(200, "topology declared".into()).await;
        declared
    }

    /// Declares everything on `channel`: exchanges, then dead-letter and wait queues, then the
    /// queues and their bindings. Idempotent; a queue that exists with other arguments is refused
    /// by the broker (406 PRECONDITION_FAILED), as a redeclaration always is.
    pub async fn declare_on(&self, channel: &Channel) -> Result<()> {
        for queue in self.queues.iter().filter(|queue| queue.retry.is_some()) {
            // A retry is a copy with the same message id, published to the back of the queue: a
            // de-duplicating queue would drop it (and the original is acknowledged), and on an
            // ordered queue later messages of its key would overtake it.
            if queue.deduplicated || queue.ordered_by.is_some() {
                return Err(SdkError::Config(format!(
                    "queue '{}': the SDK's retry policy cannot go with de-duplication or per-key order on \
                     the same queue; use the queue's own x-retry-backoff there",
                    queue.name
                )));
            }
        }
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        for exchange in &self.exchanges {
            let kind = match exchange.kind {
                ExchangeKind::Direct => LapinKind::Direct,
                ExchangeKind::Topic => LapinKind::Topic,
                ExchangeKind::Fanout => LapinKind::Fanout,
                ExchangeKind::Headers => LapinKind::Headers,
            };
            let mut arguments = FieldTable::default();
            if exchange.deduplicated {
                arguments.insert("x-deduplication".into(), AMQPValue::Boolean(true));
            }
            channel.exchange_declare(exchange.name.as_str().into(), kind, durable, arguments).await?;
        }
        for queue in &self.queues {
            if let Some(dead_letter) = &queue.dead_letter_queue {
                let options = QueueDeclareOptions::durable();
                channel.queue_declare(dead_letter.as_str().into(), options, FieldTable::default()).await?;
            }
            if let Some(policy) = &queue.retry {
                declare_wait_queues(channel, &queue.name, policy).await?;
            }
            channel
                .queue_declare(queue.name.as_str().into(), QueueDeclareOptions::durable(), queue.arguments()?)
                .await?;
            for (exchange, routing_key) in &queue.bindings {
                channel
                    .queue_bind(
                        queue.name.as_str().into(),
                        exchange.as_str().into(),
                        routing_key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        Ok(())
    }
}
