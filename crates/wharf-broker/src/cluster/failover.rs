//! Elections as soon as a leader is gone, not an election timeout later.
//!
//! openraft starts an election when a follower has heard nothing from its leader for the
//! leader's lease plus an election timeout (here 1.5 s + 0.75-1.5 s), and a follower refuses to
//! vote while that lease runs. On loopback or a LAN a killed process's sockets close at once,
//! so its peers can know it is gone within milliseconds; RabbitMQ's quorum queues elect on that
//! signal (Erlang's `nodedown`), which is why their failover takes 1-2 ms on this machine
//! (`docs/benchmarks.md`, F1). Here: when a member's last link to this node ends
//! ([`Transport::link_losses`]) and a ping to it fails too (a link the network dropped between
//! two live nodes answers the ping, and nothing happens), every group on this node that the lost
//! node led starts an election now.
//!
//! Both surviving followers do so at once. A candidate asks for votes with a vote that is not
//! committed, so neither refuses the other for a lease; with openraft's default leader ids a
//! request of the same term from a higher node id wins over a candidate's own vote, so the
//! survivor with the higher id is elected when the logs allow it, and otherwise the ordinary
//! election timeout settles it (a split costs one timeout, never safety: Raft's voting rules
//! are unchanged, only when an election starts is).

use crate::core::Core;
use bytes::Bytes;
use openraft::{Raft, ServerState};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use wharf_cluster::{NodeId, SERVICE_PING, Transport};
use wharf_raft::GroupTypes;

/// How long the ping that confirms a lost node may take: a dead process refuses the connection
/// at once; a node merely slow past this is treated as gone, which costs an election, not data.
const CONFIRM_TIMEOUT: Duration = Duration::from_millis(300);

/// Watches the links until the broker stops; see the module's doc.
pub(crate) async fn elect_on_link_loss(core: Weak<Core>, transport: Arc<Transport>) {
    let mut losses = transport.link_losses();
    loop {
        let node = match losses.recv().await {
            Ok(node) => node,
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        };
        if transport.call_within(node, SERVICE_PING, Bytes::new(), CONFIRM_TIMEOUT).await.is_ok() {
            continue;
        }
        let Some(core) = core.upgrade() else { return };
        if let Some(metadata) = core.metadata_group()
            && led_by(metadata.raft(), node)
        {
            tracing::info!(node, "the metadata group's leader is gone: electing now");
            let _ = metadata.raft().trigger().elect().await;
        }
        for group in core.quorum.all() {
            if led_by(group.raft(), node) {
                tracing::info!(queue = %group.name, node, "the queue's leader is gone: electing now");
                group.count_early_election();
                let _ = group.raft().trigger().elect().await;
            }
        }
    }
}

/// Whether `node` leads the group as this node, a voter and not the leader, last knew it.
fn led_by(raft: &Raft<GroupTypes>, node: NodeId) -> bool {
    let metrics = raft.metrics().borrow().clone();
    let voter = metrics.membership_config.membership().voter_ids().any(|voter| voter == metrics.id);
    let following = !matches!(metrics.state, ServerState::Leader | ServerState::Shutdown);
    voter && following && metrics.current_leader == Some(node)
}
