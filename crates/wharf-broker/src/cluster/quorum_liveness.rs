//! Who is still there, for quorum queues: a member node whose link stays down (the leader of
//! each of its groups proposes `NodeDown`, [`watch_members`]), and each consumer a group's
//! record names on this node, held against this node's channels ([`reconcile_consumers`]).
//!
//! The record and the channels can disagree in ways no ordering on one node prevents: a
//! consumer command forwarded to the leader may be held by a slow or cut link and committed
//! after a newer one (a `Checkout` applied after its consumer's `Down` registers a consumer
//! nobody serves, which takes a whole prefetch and holds it for ever); a `Checkout` of a node's
//! earlier run can land after that node's `NodeRestarted`; a `basic.get` whose answer was lost
//! can be committed after the `Down` that was to return it. RabbitMQ's quorum queues meet the
//! same problem with Erlang monitors: the leader learns of a consumer process that is gone,
//! however late its commands came. Here each node compares, every
//! [`CONSUMER_SWEEP_INTERVAL`], what its replica says of its own consumers with its channels,
//! and proposes what sets the record right: `Down` for a consumer whose channel is closed (or
//! of an earlier run), `Cancel` for one its channel no longer has, `Checkout` for a consumer
//! of the channels the record lacks. Each of those commands means the same however often it is
//! applied, and they are proposed under the model lock, as a channel's own are, so a consumer
//! opened again under the same name (channel and tag) has its `Checkout` after them.
//!
//! A finding is acted on only once it is seen on two sweeps in a row (a replica a little
//! behind is not a disagreement), and proposed again only if it outlasts
//! [`SWEEPS_BEFORE_PROPOSING_AGAIN`] sweeps.

use super::quorum::{QueueGroup, consumer_of};
use crate::core::Core;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use wharf_cluster::{NodeId, Transport};
use wharf_model::{ChannelKey, ConnectionId, QuorumCommand, QuorumConsumer, ReplicatedStanding};

/// How long a member's link must be down before the leaders of its queues' groups count its
/// consumers as gone (and what they held goes to other consumers, redelivered).
const NODE_DOWN_AFTER: Duration = Duration::from_secs(5);

/// How often each node holds its groups' records of its consumers against its channels.
const CONSUMER_SWEEP_INTERVAL: Duration = Duration::from_secs(2);

/// Sweeps after which a finding that is still there is proposed again (its command was
/// proposed and taken, and the same disagreement arose again since).
const SWEEPS_BEFORE_PROPOSING_AGAIN: u64 = 15;

/// On each group this node leads, proposes `NodeDown` for a member whose link has been down for
/// [`NODE_DOWN_AFTER`], once per outage (RabbitMQ's quorum queues likewise return what a lost
/// node's consumers held). A node that was only cut off finds its consumers gone when it applies
/// that command, and checks them out again (`QueueMachine::apply`).
pub(crate) async fn watch_members(core: Weak<Core>, transport: Arc<Transport>) {
    let mut down_since: HashMap<NodeId, Instant> = HashMap::new();
    let mut reported: HashSet<(u64, NodeId)> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Some(core) = core.upgrade() else { return };
        let now = Instant::now();
        for member in transport.members().into_iter().filter(|member| !member.this_node) {
            if member.outbound_connected {
                down_since.remove(&member.node);
                reported.retain(|(_, node)| *node != member.node);
            } else {
                down_since.entry(member.node).or_insert(now);
            }
        }
        let gone: Vec<NodeId> = down_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= NODE_DOWN_AFTER)
            .map(|(node, _)| *node)
            .collect();
        for group in core.quorum.all() {
            if group.raft().metrics().borrow().state != openraft::ServerState::Leader {
                continue;
            }
            let members = group.members();
            for node in gone.iter().filter(|node| members.contains(node)) {
                if reported.insert((group.group, *node)) {
                    tracing::info!(queue = %group.name, node, "a member's link is down; its consumers' messages go back");
                    group.submit(QuorumCommand::NodeDown { node: *node }, None);
                }
            }
        }
    }
}

/// A disagreement between a group's record and this node's channels, and what mends it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Finding {
    /// The record names a consumer of a closed channel, or of this node's earlier run.
    Down(QuorumConsumer),
    /// The record names a consumer taking messages that its open channel no longer has.
    Cancel(QuorumConsumer),
    /// A consumer of the channels the record lacks or records as cancelled, with its prefetch.
    Checkout(QuorumConsumer, u32),
}

impl Finding {
    fn command(self) -> QuorumCommand {
        match self {
            Finding::Down(consumer) => QuorumCommand::Down { consumer },
            Finding::Cancel(consumer) => QuorumCommand::Cancel { consumer },
            Finding::Checkout(consumer, prefetch) => QuorumCommand::Checkout { consumer, prefetch },
        }
    }
}

/// What this node knows of its own consumers, for one queue.
struct Here<'a> {
    node: NodeId,
    incarnation: u32,
    /// The queue's consumers on this node's channels: (channel, tag, prefetch).
    consumers: &'a [(ChannelKey, String, u16)],
}

/// The disagreements between `record` (the replica's consumers on this node, each with whether
/// it was cancelled) and `here`; `standing` says where a consumer the record names stands.
fn findings(
    record: &[(QuorumConsumer, bool)],
    here: &Here<'_>,
    standing: impl Fn(ChannelKey, &str) -> ReplicatedStanding,
) -> BTreeSet<Finding> {
    let mut found = BTreeSet::new();
    for (consumer, cancelled) in record {
        if consumer.node != here.node {
            continue;
        }
        if consumer.incarnation != here.incarnation {
            found.insert(Finding::Down(consumer.clone()));
            continue;
        }
        let channel = ChannelKey { connection: ConnectionId(consumer.connection), channel: consumer.channel };
        match standing(channel, &consumer.tag) {
            ReplicatedStanding::ChannelGone => {
                found.insert(Finding::Down(consumer.clone()));
            }
            // A channel's get consumer (tag "") is no consumer of the channel's: it stands as
            // long as its channel does.
            ReplicatedStanding::NotConsuming if !cancelled && !consumer.tag.is_empty() => {
                found.insert(Finding::Cancel(consumer.clone()));
            }
            ReplicatedStanding::NotConsuming | ReplicatedStanding::Consuming => {}
        }
    }
    // A consumer of the channels the record lacks, or records as cancelled (a cancel committed
    // after a later checkout of the same name), takes messages again with a checkout.
    let recorded: BTreeMap<&QuorumConsumer, bool> =
        record.iter().map(|(consumer, cancelled)| (consumer, *cancelled)).collect();
    for (channel, tag, prefetch) in here.consumers {
        let consumer = consumer_of(here.node, here.incarnation, *channel, tag.clone());
        if recorded.get(&consumer).is_none_or(|cancelled| *cancelled) {
            found.insert(Finding::Checkout(consumer, u32::from(*prefetch)));
        }
    }
    found
}

/// Findings over successive sweeps: which are due to be proposed.
#[derive(Default)]
struct Sightings {
    sweep: u64,
    /// What the last sweep found.
    previous: BTreeSet<Finding>,
    /// What was proposed, and on which sweep.
    proposed: BTreeMap<Finding, u64>,
}

impl Sightings {
    /// Takes one sweep's findings; returns those to propose now: seen on the sweep before too,
    /// and not proposed within [`SWEEPS_BEFORE_PROPOSING_AGAIN`] sweeps.
    fn due(&mut self, found: BTreeSet<Finding>) -> Vec<Finding> {
        self.sweep += 1;
        let sweep = self.sweep;
        self.proposed.retain(|finding, at| found.contains(finding) && sweep - *at < SWEEPS_BEFORE_PROPOSING_AGAIN);
        let due: Vec<Finding> = found
            .iter()
            .filter(|finding| self.previous.contains(*finding) && !self.proposed.contains_key(*finding))
            .cloned()
            .collect();
        for finding in &due {
            self.proposed.insert(finding.clone(), sweep);
        }
        self.previous = found;
        due
    }
}

/// Holds `group`'s record of this node's consumers against this node's channels, every
/// [`CONSUMER_SWEEP_INTERVAL`], until the group or the broker is gone (see the module's doc).
pub(crate) async fn reconcile_consumers(group: Weak<QueueGroup>, core: Weak<Core>) {
    let mut sightings = Sightings::default();
    let mut tick = tokio::time::interval(CONSUMER_SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(group), Some(core)) = (group.upgrade(), core.upgrade()) else { return };
        let Some(node) = core.config.cluster.as_ref().map(|cluster| cluster.node_id) else { return };
        // Without a leader nothing proposed would be taken; the replica may be far behind too.
        if group.raft().metrics().borrow().current_leader.is_none() {
            continue;
        }
        let record = group.consumers_at(node);
        // Decided and proposed under the model lock, as the channels' own consumer commands are.
        let model = core.lock_model();
        let consumers = model.replicated_consumers(&group.vhost, &group.name);
        let here = Here { node, incarnation: core.incarnation, consumers: &consumers };
        let found = findings(&record, &here, |channel, tag| model.replicated_standing(channel, tag, &group.name));
        for finding in sightings.due(found) {
            tracing::warn!(queue = %group.name, ?finding, "a quorum queue's record of a consumer here is set right");
            group.submit(finding.command(), None);
        }
        drop(model);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn consumer(incarnation: u32, connection: u64, tag: &str) -> QuorumConsumer {
        QuorumConsumer { node: 1, incarnation, connection, channel: 1, tag: tag.into() }
    }

    fn channel(connection: u64) -> ChannelKey {
        ChannelKey { connection: ConnectionId(connection), channel: 1 }
    }

    /// Channels 1 and 2 are open; channel 1 has consumer "a" of the queue.
    fn standing(key: ChannelKey, tag: &str) -> ReplicatedStanding {
        match (key.connection.0, tag) {
            (1, "a") => ReplicatedStanding::Consuming,
            (1 | 2, _) => ReplicatedStanding::NotConsuming,
            _ => ReplicatedStanding::ChannelGone,
        }
    }

    #[test]
    fn a_record_naming_a_closed_channel_an_earlier_run_or_a_dropped_consumer_is_set_right() {
        let consumers = vec![(channel(1), "a".to_owned(), 10)];
        let here = Here { node: 1, incarnation: 7, consumers: &consumers };
        let record = vec![
            (consumer(7, 1, "a"), false),
            (consumer(7, 2, "b"), false),
            (consumer(7, 2, "cancelled"), true),
            (consumer(7, 2, ""), false),
            (consumer(7, 3, "c"), false),
            (consumer(7, 3, ""), false),
            (consumer(6, 1, "a"), false),
            (QuorumConsumer { node: 2, incarnation: 1, connection: 9, channel: 1, tag: "other".into() }, false),
        ];
        let found: Vec<Finding> = findings(&record, &here, standing).into_iter().collect();
        assert_eq!(
            found,
            vec![
                Finding::Down(consumer(6, 1, "a")),
                Finding::Down(consumer(7, 3, "")),
                Finding::Down(consumer(7, 3, "c")),
                Finding::Cancel(consumer(7, 2, "b")),
            ]
        );
    }

    #[test]
    fn a_consumer_of_the_channels_the_record_lacks_or_counts_cancelled_is_checked_out() {
        let consumers = vec![(channel(1), "a".to_owned(), 10), (channel(1), "b".to_owned(), 0)];
        let here = Here { node: 1, incarnation: 7, consumers: &consumers };
        let record = vec![(consumer(7, 1, "a"), false)];
        let found: Vec<Finding> = findings(&record, &here, standing).into_iter().collect();
        assert_eq!(found, vec![Finding::Checkout(consumer(7, 1, "b"), 0)]);
        // Recorded as cancelled (a cancel committed after a later checkout of the same name).
        let only_a = vec![(channel(1), "a".to_owned(), 10)];
        let here = Here { node: 1, incarnation: 7, consumers: &only_a };
        let record = vec![(consumer(7, 1, "a"), true)];
        let found: Vec<Finding> = findings(&record, &here, standing).into_iter().collect();
        assert_eq!(found, vec![Finding::Checkout(consumer(7, 1, "a"), 10)]);
    }

    #[test]
    fn a_finding_is_proposed_once_seen_twice_and_again_only_if_it_outlasts_the_pause() {
        let mut sightings = Sightings::default();
        let zombie = Finding::Down(consumer(7, 3, "c"));
        let passing = Finding::Cancel(consumer(7, 2, "b"));
        let both: BTreeSet<Finding> = [zombie.clone(), passing.clone()].into();
        assert!(sightings.due(both).is_empty(), "nothing is proposed on a first sighting");
        assert_eq!(sightings.due([zombie.clone()].into()), vec![zombie.clone()], "the one seen twice is proposed");
        for _ in 0..SWEEPS_BEFORE_PROPOSING_AGAIN - 1 {
            assert!(sightings.due([zombie.clone()].into()).is_empty(), "proposed already");
        }
        assert_eq!(sightings.due([zombie.clone()].into()), vec![zombie.clone()], "still there: proposed again");
        assert!(sightings.due([passing.clone()].into()).is_empty());
        assert!(sightings.due([zombie.clone()].into()).is_empty(), "gone in between: seen once again first");
        assert_eq!(sightings.due([zombie.clone()].into()), vec![zombie]);
    }
}
