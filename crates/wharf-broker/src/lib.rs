//! `wharf-broker`: the runtime that turns the pieces into a broker.
//!
//! It owns sockets and tasks: it accepts AMQP 0-9-1 connections on tokio, runs the handshake,
//! decodes frames with `wharf-wire`, applies every method to the `wharf-model` state machine,
//! carries out the effects (deliveries to connections, removals to the store), writes persistent
//! messages in durable queues through `wharf-store`, and sends publisher confirms and
//! `tx.commit-ok` only after the store reports the covering `fdatasync`. Durable definitions live in
//! the store's definitions log and are rebuilt, with every stored message, at start.

mod access;
mod alarms;
mod cert_name;
mod clock;
mod cluster;
mod config;
mod confirms;
mod connection;
mod core;
mod dedup_logs;
mod definition_format;
mod definitions;
mod definitions_import;
mod error;
mod identities;
mod limits;
mod login;
mod login_throttle;
mod manage;
mod mqtt;
mod outbound;
mod pager;
mod password;
mod peer_address;
mod persist;
mod policy_records;
mod publish;
mod recovery;
mod relocate;
mod server;
mod session;
mod tls;
mod trace_format;
mod writer;

pub use access::{Permission, PermissionError, TopicPermission};
pub use alarms::{AlarmState, DiskSpace, FixedDiskSpace, RealDiskSpace};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{
    BrokerConfig, CONSUMER_TIMEOUT_MS_DEFAULT, ClusterTlsFiles, ConfigError, FRAME_MAX_MIN, GROUP_COMMIT_DELAY_US_MAX,
    MQTT_SESSION_EXPIRY_MAX_S_DEFAULT, MqttConfig, QUEUE_BODY_MEMORY_BYTES_MAX_DEFAULT, TlsConfig, User, UserLimits,
    VhostLimits,
};
pub use definitions_import::{
    DEFINITIONS_BYTES_MAX, Definitions, DefinitionsError, ImportedBinding, ImportedExchange, ImportedQueue, Topology,
};
pub use error::BrokerError;
pub use manage::{
    AckMode, BROWSE_PAGE_SIZE_MAX, BindingSpec, BindingView, BrokerStats, BrowsePage, BrowsedMessage, ChannelView,
    ConnectionView, ConsumerView, ExchangeSpec, ExchangeView, GotMessage, MOVE_REQUEST_MESSAGES_MAX, Management,
    ManagementError, MoveReport, NewPassword, Overview, PolicySpec, PublishOutcome, QueueView, QuorumQueueView,
    ReplayTarget, Selection, TRACE_SEARCH_MESSAGES_MAX, TraceSearch, TraceView, UserView, VhostView,
};
pub use password::{HashingAlgorithm, PasswordError, PasswordHash};
pub use persist::json_to_amqp;
pub use server::Broker;
pub use wharf_cluster::{ClusterConfig, MemberStatus, NodeId, parse_cluster_node};
/// Per-message delivery traces, as the management interface shows them.
pub use wharf_model::trace;
pub use wharf_model::{ApplyTo, Counters, Policy, QueueStats};
pub use wharf_store::{HistogramSnapshot, StoreStats};

/// A policy from JSON (a configuration file): `definition` is an object of RabbitMQ-style keys
/// without `x-` (`{"delivery-limit": 5, "dead-letter-exchange": "dlx"}`). Refused with the reason
/// when the pattern, a key or a value is bad.
pub fn policy_from_json(
    name: &str,
    pattern: &str,
    apply_to: &str,
    priority: i64,
    definition: &serde_json::Value,
) -> Result<Policy, String> {
    let apply_to = ApplyTo::parse(apply_to).map_err(|error| error.text)?;
    let Some(wharf_wire::types::AMQPValue::FieldTable(table)) = persist::json_to_amqp(definition) else {
        return Err(format!("policy '{name}': the definition must be an object of keys and values"));
    };
    Policy::new(name, pattern, apply_to, priority, table).map_err(|error| error.text)
}
/// The largest `frame_max` the broker negotiates.
pub use wharf_wire::frame::FRAME_MAX_LIMIT;
