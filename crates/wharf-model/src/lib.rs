//! `wharf-model`: the broker's semantics without I/O.
//!
//! It owns what AMQP means: vhosts with their exchanges, queues and bindings; RabbitMQ's rules for
//! declaring, comparing, deleting and binding them; routing through direct, fanout, topic and
//! headers exchanges (and exchange-to-exchange bindings); queues of ready and unacknowledged
//! messages; consumers, prefetch, deliveries, acknowledgements and requeues; and the delivery
//! guarantees beyond RabbitMQ (dead-lettering, delivery limits, leases, retry backoff, delayed
//! messages, TTLs and length limits, de-duplication, per-key ordering, policies). It does no I/O
//! and reads no clock (the runtime tells it the time): the runtime (`wharf-broker`) feeds it operations and carries out the
//! [`Effects`] they return, so its behaviour can be tested exhaustively and deterministically.

pub mod broker;
pub mod deadletter;
pub mod dedup;
pub mod error;
pub mod exchange;
pub mod message;
pub mod policy;
mod priority;
pub mod queue;
pub mod quorum;
mod ready;
pub mod settings;
pub mod topic;
pub mod trace;
pub mod vhost;

pub use broker::{
    Admission, BrokerModel, CancelledConsumer, ChannelSummary, ConsumerSummary, Counters, DeletedExchange,
    DeletedQueue, Delivery, Effects, Removed, ReplicatedDelivery, ReplicatedGet, ReplicatedOp, ReplicatedOutcome,
    ReplicatedStanding, StoredAt, UnackedByQueue, WithdrawRefusal, Withdrawn,
};
pub use deadletter::{AutoDeadLetterQueue, DeathReason, Transfer, TransferTarget};
pub use error::{ModelError, Result, Scope};
pub use exchange::{Binding, Destination, Exchange, ExchangeKind};
pub use message::{Body, Message, PagedBody};
pub use policy::{ApplyTo, Policy};
pub use queue::{ChannelKey, ConnectionId, Entry, EntryState, Queue, QueueConsumer, QueueStats};
pub use quorum::{
    ConsumerRecord, QuorumAnswer, QuorumCommand, QuorumConsumer, QuorumDeathReason, QuorumEffect, QuorumMessageId,
    QuorumQueue, QuorumSettings,
};
pub use settings::{ExchangeSettings, Overflow, QueueSettings};
pub use vhost::{Declared, ExchangeDeclare, QueueDeclare, VirtualHost};
