//! What a group looks like from one node, for operators (the management API and `wharf admin`
//! will show it per group): its leader, term, members, how far this node's log and state
//! machine are, and, on the leader, how far behind each follower is.

use crate::GroupTypes;
use openraft::{Raft, ServerState};
use std::collections::BTreeMap;

/// One group as this node sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    /// This node's role: "leader", "follower", "candidate", "learner" or "shutdown".
    pub role: &'static str,
    /// The leader this node knows of, if any.
    pub leader: Option<u64>,
    /// The current term.
    pub term: u64,
    /// The index of this node's last log entry.
    pub last_log_index: Option<u64>,
    /// The index of the last entry its state machine applied.
    pub applied_index: Option<u64>,
    /// The index of the last entry this node's latest snapshot covers (`None`: none taken).
    pub snapshot_index: Option<u64>,
    /// The index of the last entry purged from this node's log (after a snapshot).
    pub purged_index: Option<u64>,
    /// The voting members.
    pub voters: Vec<u64>,
    /// The members that receive the log but do not vote.
    pub learners: Vec<u64>,
    /// On the leader: entries each other member is behind it (`None`: unknown yet).
    pub lag: BTreeMap<u64, Option<u64>>,
}

impl GroupStatus {
    /// The status of `raft` now.
    pub fn of(raft: &Raft<GroupTypes>) -> GroupStatus {
        let metrics = raft.metrics().borrow().clone();
        let role = match metrics.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let membership = metrics.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let learners: Vec<u64> = membership.learner_ids().collect();
        let last = metrics.last_log_index.unwrap_or(0);
        let lag = metrics
            .replication
            .iter()
            .flatten()
            .filter(|(node, _)| **node != metrics.id)
            .map(|(node, matched)| (*node, Some(last.saturating_sub(matched.map_or(0, |matched| matched.index)))))
            .collect();
        GroupStatus {
            role,
            leader: metrics.current_leader,
            term: metrics.current_term,
            last_log_index: metrics.last_log_index,
            applied_index: metrics.last_applied.map(|applied| applied.index),
            snapshot_index: metrics.snapshot.map(|snapshot| snapshot.index),
            purged_index: metrics.purged.map(|purged| purged.index),
            voters,
            learners,
            lag,
        }
    }
}
