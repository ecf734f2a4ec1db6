//! The broker seen from its management interface (`wharf-http`): [`Management`], a handle that
//! lists what the broker holds as owned views (`views.rs`: connections, channels, consumers,
//! vhosts, exchanges, queues, bindings, users, permissions, policies) and changes it through
//! the same paths a client's methods take (`operations.rs`: declare, delete, bind, publish,
//! get, purge, close a connection), with the same permission checks; `browse.rs` and
//! `workbench.rs` are the DLQ workbench (browse; replay, move, delete); `traces.rs` shows
//! per-message delivery traces. It knows nothing of HTTP or
//! JSON: the API crate decides how all of this is shaped on the wire.
//!
//! Views are taken under the model lock and returned as plain values, so formatting, sorting
//! and paging happen after the lock is released.

mod browse;
mod connections;
mod identity_ops;
mod operations;
mod policy_ops;
mod replicated;
mod stats;
mod traces;
mod views;
mod workbench;

pub use browse::{BROWSE_PAGE_SIZE_MAX, BrowsePage, BrowsedMessage};
pub(crate) use connections::{ConnectionFacts, ConnectionInfo};
pub use identity_ops::NewPassword;
pub use operations::{AckMode, BindingSpec, ExchangeSpec, GotMessage, ManagementError, PublishOutcome};
pub use policy_ops::PolicySpec;
pub use stats::BrokerStats;
pub use traces::{TRACE_SEARCH_MESSAGES_MAX, TraceSearch, TraceView};
pub use views::{
    BindingView, ChannelView, ConnectionView, ConsumerView, ExchangeView, Overview, QueueView, UserView, VhostView,
};
pub use workbench::{MOVE_REQUEST_MESSAGES_MAX, MoveReport, ReplayTarget, Selection};

use crate::core::Core;

use std::net::SocketAddr;
use std::sync::Arc;

/// A quorum queue's group on this node, for the management API.
#[derive(Debug, Clone)]
pub struct QuorumQueueView {
    pub vhost: String,
    pub name: String,
    /// The group's id (the index of the metadata entry that declared it).
    pub group: u64,
    /// The nodes holding a replica.
    pub members: Vec<u64>,
    pub status: wharf_raft::GroupStatus,
    /// Messages ready, and delivered and not yet settled, in this node's replica.
    pub ready: u64,
    pub checked_out: u64,
    pub consumers: usize,
    /// Elections this node started in the group as soon as the leader's links closed (without
    /// waiting for an election timeout; `cluster/failover.rs`).
    pub early_elections: u64,
}

/// The management interface's handle on a running broker (`Broker::management`); cheap to clone.
#[derive(Debug, Clone)]
pub struct Management {
    core: Arc<Core>,
    started_at_ms: u64,
    /// Where the broker accepts AMQP and AMQPS (the bound addresses).
    amqp_listen: Option<SocketAddr>,
    amqps_listen: Option<SocketAddr>,
    /// The broker's TLS settings, if it has any (the API over TLS uses them too).
    tls: Option<Arc<crate::tls::ServerTls>>,
    /// Its links to the cluster's other nodes, if it is a cluster's node.
    cluster: Option<Arc<wharf_cluster::Transport>>,
}

/// Where the broker listens and how, for [`Management`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Listeners {
    pub amqp: Option<SocketAddr>,
    pub amqps: Option<SocketAddr>,
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    pub cluster: Option<Arc<wharf_cluster::Transport>>,
}

impl Management {
    pub(crate) fn new(core: Arc<Core>, started_at_ms: u64, listeners: Listeners) -> Management {
        Management {
            core,
            started_at_ms,
            amqp_listen: listeners.amqp,
            amqps_listen: listeners.amqps,
            tls: listeners.tls,
            cluster: listeners.cluster,
        }
    }

    /// The cluster's members as this node sees them (this node first), or `None` for a broker
    /// on its own.
    pub fn cluster_members(&self) -> Option<Vec<wharf_cluster::MemberStatus>> {
        self.cluster.as_ref().map(|cluster| cluster.members())
    }

    /// Adds `node`, reachable at `address`, to the running cluster, or removes it (`None`);
    /// see `cluster/membership.rs`. Refused on a broker on its own.
    pub async fn change_cluster_member(&self, node: u64, address: Option<String>) -> Result<(), ManagementError> {
        let Some(group) = self.core.metadata_group() else {
            return Err(ManagementError::BadRequest("this broker is not a cluster's node".into()));
        };
        group.change_member(&self.core, node, address).await.map_err(|error| match error {
            crate::cluster::MemberChangeError::Refused(text) => ManagementError::BadRequest(text),
            crate::cluster::MemberChangeError::Unavailable(text) => ManagementError::Unavailable(text),
        })
    }

    /// Adds a replica of quorum queue `name` on `node`, or removes it (`cluster/replicas.rs`).
    pub async fn change_quorum_replica(
        &self,
        vhost: &str,
        name: &str,
        node: u64,
        add: bool,
    ) -> Result<(), ManagementError> {
        self.core.change_quorum_replica(vhost, name, node, add).await
    }

    /// Makes `node` the leader of quorum queue `name`'s group (`cluster/leader_move.rs`).
    pub async fn move_quorum_leader(&self, vhost: &str, name: &str, node: u64) -> Result<(), ManagementError> {
        self.core.move_quorum_leader(vhost, name, node).await
    }

    /// The cluster's metadata group as this node sees it, or `None` for a broker on its own.
    pub fn metadata_group(&self) -> Option<wharf_raft::GroupStatus> {
        self.core.metadata_group().map(|group| group.status())
    }

    /// This node's quorum queue groups, by vhost and name: each one's group as this node sees it
    /// and what its replica holds.
    pub fn quorum_queues(&self) -> Vec<QuorumQueueView> {
        let mut views: Vec<QuorumQueueView> = self
            .core
            .quorum
            .all()
            .into_iter()
            .map(|group| {
                let (ready, checked_out, consumers) = group.counts();
                QuorumQueueView {
                    vhost: group.vhost.clone(),
                    name: group.name.clone(),
                    group: group.group,
                    members: group.members(),
                    status: group.status(),
                    ready,
                    checked_out,
                    consumers,
                    early_elections: group.early_elections(),
                }
            })
            .collect();
        views.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        views
    }

    /// A TLS acceptor with the broker's TLS settings in force now (certificates reloaded on
    /// SIGHUP included), if it has TLS settings.
    pub fn tls_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.tls.as_ref().map(|tls| tls.acceptor())
    }
}
