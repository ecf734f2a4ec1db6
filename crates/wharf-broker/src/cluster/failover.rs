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
//! The survivors do not all start at once. A candidate asks for votes with a vote that is not
//! committed, so no one refuses another for a lease, and with openraft's default leader ids a
//! request of the same term from a higher node id wins over a candidate's own vote: the
//! survivor with the highest id is elected at once when its log is at least as long as the
//! others'. When it is not (under load the followers' logs can differ by the entry in flight),
//! the others refuse it, and if they had started in the same term the split would last until
//! openraft's election timeout (one F1 round in six took 1.4 s so, `docs/benchmarks.md`). So
//! the highest id elects at once and each other survivor waits [`STAGGER`] per place below it,
//! then, while the group still has no other leader, elects, up to [`ATTEMPTS`] times: its
//! second attempt is in a term above the first survivor's, which it learnt from that refusal,
//! so the survivor with the longer log wins. A split costs at most a timeout, never safety:
//! Raft's voting rules are unchanged, only when an election starts is.

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
/// How long a survivor waits per survivor of a higher id before it elects: long enough for an
/// election on a LAN to end (a few milliseconds on loopback), short against openraft's timeout.
const STAGGER: Duration = Duration::from_millis(40);
/// Elections a survivor other than the first starts before it leaves the rest to openraft's
/// timers.
const ATTEMPTS: u32 = 3;

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
            tokio::spawn(elect_in_turn(metadata.raft().clone(), node));
        }
        for group in core.quorum.all() {
            if led_by(group.raft(), node) {
                tracing::info!(queue = %group.name, node, "the queue's leader is gone: electing now");
                group.count_early_election();
                tokio::spawn(elect_in_turn(group.raft().clone(), node));
            }
        }
    }
}

/// Elects in this node's turn among the survivors (see the module's doc).
async fn elect_in_turn(raft: Raft<GroupTypes>, lost: NodeId) {
    let place = {
        let metrics = raft.metrics().borrow().clone();
        let own = metrics.id;
        metrics.membership_config.membership().voter_ids().filter(|voter| *voter != lost && *voter > own).count()
    };
    tokio::time::sleep(STAGGER * place as u32).await;
    // The first survivor elects once: a second attempt would meet the next survivor's first.
    let attempts = if place == 0 { 1 } else { ATTEMPTS };
    for _ in 0..attempts {
        if !leaderless(&raft, lost) {
            return;
        }
        let _ = raft.trigger().elect().await;
        tokio::time::sleep(STAGGER).await;
    }
}

/// Whether the group has, as this node knows, no leader but the lost one.
fn leaderless(raft: &Raft<GroupTypes>, lost: NodeId) -> bool {
    let metrics = raft.metrics().borrow().clone();
    match metrics.state {
        ServerState::Leader | ServerState::Shutdown => false,
        _ => metrics.current_leader.is_none_or(|leader| leader == lost),
    }
}

/// Whether `node` leads the group as this node, a voter and not the leader, last knew it.
fn led_by(raft: &Raft<GroupTypes>, node: NodeId) -> bool {
    let metrics = raft.metrics().borrow().clone();
    let voter = metrics.membership_config.membership().voter_ids().any(|voter| voter == metrics.id);
    let following = !matches!(metrics.state, ServerState::Leader | ServerState::Shutdown);
    voter && following && metrics.current_leader == Some(node)
}
