//! The broker seen from its management interface (`wharf-http`): [`Management`], a handle that
//! lists what the broker holds as owned views (`views.rs`: connections, channels, consumers,
//! vhosts, exchanges, queues, bindings, users, permissions, policies) and changes it through
//! the same paths a client's methods take (`operations.rs`: declare, delete, bind, publish,
//! get, purge, close a connection), with the same permission checks. It knows nothing of HTTP or
//! JSON: the API crate decides how all of this is shaped on the wire.
//!
//! Views are taken under the model lock and returned as plain values, so formatting, sorting
//! and paging happen after the lock is released.

mod connections;
mod operations;
mod stats;
mod views;

pub(crate) use connections::{ConnectionFacts, ConnectionInfo};
pub use operations::{AckMode, BindingSpec, ExchangeSpec, GotMessage, ManagementError, PublishOutcome};
pub use stats::BrokerStats;
pub use views::{
    BindingView, ChannelView, ConnectionView, ConsumerView, ExchangeView, Overview, QueueView, UserView, VhostView,
};

use crate::core::Core;
use std::net::SocketAddr;
use std::sync::Arc;

/// The management interface's handle on a running broker (`Broker::management`); cheap to clone.
#[derive(Debug, Clone)]
pub struct Management {
    core: Arc<Core>,
    started_at_ms: u64,
    /// Where the broker accepts AMQP and AMQPS (the bound addresses).
    amqp_listen: Option<SocketAddr>,
    amqps_listen: Option<SocketAddr>,
}

impl Management {
    pub(crate) fn new(
        core: Arc<Core>,
        started_at_ms: u64,
        amqp_listen: Option<SocketAddr>,
        amqps_listen: Option<SocketAddr>,
    ) -> Management {
        Management { core, started_at_ms, amqp_listen, amqps_listen }
    }
}
