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
//! of the channels the record lacks, and `Return` for a message the record says a consumer here
//! holds that its channel does not have unacknowledged (a delivery this node never carried out:
//! decided in entries a snapshot it installed skipped, or a message this node cannot read),
//! compared only while every consumer command this node proposed was answered. Each of those commands means the same however often it is
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
use wharf_model::{
    ChannelKey, ConnectionId, ConsumerRecord, QuorumCommand, QuorumConsumer, QuorumMessageId, ReplicatedStanding,
};

/// How long a member's link must be down before the leaders of its queues' groups count its
/// consumers as gone (and what they held goes to other consumers, redelivered).
const NODE_DOWN_AFTER: Duration = Duration::from_secs(5);

/// How often each node holds its groups' records of its consumers against its channels.
const CONSUMER_SWEEP_INTERVAL: Duration = Duration::from_secs(2);

/// Sweeps after which a finding that is still there is proposed again (its command was
/// proposed and taken, and the same disagreement arose again since).
const SWEEPS_BEFORE_PROPOSING_AGAIN: u64 = 15;

/// On each group this node leads, proposes `NodeDown` for a member whose link has been down for
/// [`NODE_DOWN_AFTER`] (RabbitMQ's quorum queues likewise return what a lost node's consumers
/// held). A node that was only cut off finds its consumers gone when it applies that command,
/// and checks them out again (`QueueMachine::apply`). Proposed once per outage, and again every
/// [`NODE_DOWN_AFTER`] while the group still records consumers of that node: a checkout the node
/// forwarded before it went can be committed after the first `NodeDown`, and would hold its
/// messages until the node came back.
pub(crate) async fn watch_members(core: Weak<Core>, transport: Arc<Transport>) {
    let mut down_since: HashMap<NodeId, Instant> = HashMap::new();
    let mut reported: HashMap<(u64, NodeId), Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Some(core) = core.upgrade() else { return };
        let now = Instant::now();
        for member in transport.members().into_iter().filter(|member| !member.this_node) {
            if member.outbound_connected {
                down_since.remove(&member.node);
                reported.retain(|(_, node), _| *node != member.node);
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
                let due = match reported.get(&(group.group, *node)) {
                    None => true,
                    Some(at) => now.duration_since(*at) >= NODE_DOWN_AFTER && group.consumers_on(*node) > 0,
                };
                if due {
                    tracing::info!(queue = %group.name, node, "a member's link is down; its consumers' messages go back");
                    reported.insert((group.group, *node), now);
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
    /// A message the record says a consumer of an open channel holds, which that channel does
    /// not have unacknowledged: nobody will ever settle it.
    Return(QuorumConsumer, QuorumMessageId),
}

impl Finding {
    fn command(self) -> QuorumCommand {
        match self {
            Finding::Down(consumer) => QuorumCommand::Down { consumer },
            Finding::Cancel(consumer) => QuorumCommand::Cancel { consumer },
            Finding::Checkout(consumer, prefetch) => QuorumCommand::Checkout { consumer, prefetch },
            Finding::Return(consumer, id) => QuorumCommand::Return { consumer, ids: vec![id] },
        }
    }
}

/// The commands for findings due together: one `Return` per consumer for all its messages.
fn commands(due: Vec<Finding>) -> Vec<QuorumCommand> {
    let mut returned: BTreeMap<QuorumConsumer, Vec<QuorumMessageId>> = BTreeMap::new();
    let mut commands = Vec::new();
    for finding in due {
        match finding {
            Finding::Return(consumer, id) => returned.entry(consumer).or_default().push(id),
            other => commands.push(other.command()),
        }
    }
    commands.extend(returned.into_iter().map(|(consumer, ids)| QuorumCommand::Return { consumer, ids }));
    commands
}

/// What this node knows of its own consumers, for one queue.
struct Here<'a> {
    node: NodeId,
    incarnation: u32,
    /// The queue's consumers on this node's channels: (channel, tag, prefetch).
    consumers: &'a [(ChannelKey, String, u16)],
    /// The queue's deliveries unacknowledged on this node's channels: (channel, tag, id).
    unacked: &'a HashSet<(ChannelKey, String, QuorumMessageId)>,
}

/// The disagreements between `record` (the replica's consumers on this node: whether each was
/// cancelled, what each holds) and `here`; `standing` says where a consumer the record names
/// stands.
fn findings(
    record: &[ConsumerRecord],
    here: &Here<'_>,
    standing: impl Fn(ChannelKey, &str) -> ReplicatedStanding,
) -> BTreeSet<Finding> {
    let mut found = BTreeSet::new();
    for ConsumerRecord { consumer, cancelled, holds } in record {
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
                // Its `Down` returns all it holds.
                found.insert(Finding::Down(consumer.clone()));
                continue;
            }
            // A channel's get consumer (tag "") is no consumer of the channel's: it stands as
            // long as its channel does.
            ReplicatedStanding::NotConsuming if !cancelled && !consumer.tag.is_empty() => {
                found.insert(Finding::Cancel(consumer.clone()));
            }
            ReplicatedStanding::NotConsuming | ReplicatedStanding::Consuming => {}
        }
        for id in holds {
            if !here.unacked.contains(&(channel, consumer.tag.clone(), *id)) {
                found.insert(Finding::Return(consumer.clone(), *id));
            }
        }
    }
    // A consumer of the channels the record lacks, or records as cancelled (a cancel committed
    // after a later checkout of the same name), takes messages again with a checkout.
    let recorded: BTreeMap<&QuorumConsumer, bool> =
        record.iter().map(|recorded| (&recorded.consumer, recorded.cancelled)).collect();
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
    /// How many consumer commands this node had proposed to the group at the last sweep.
    mark: Option<u64>,
    sweep: u64,
    /// What the last sweep found.
    previous: BTreeSet<Finding>,
    /// What was proposed, and on which sweep.
    proposed: BTreeMap<Finding, u64>,
}

impl Sightings {
    /// Takes one sweep's findings; returns those to propose now: seen on the sweep before too,
    /// and not proposed within [`SWEEPS_BEFORE_PROPOSING_AGAIN`] sweeps. A `Return` is due only
    /// with `returns_ready`: every consumer command this node proposed before the last sweep
    /// compared its channels was answered, and applied here before this sweep read the record.
    /// Else a settle or a requeue sent before may still be on its way (the record would be
    /// behind the channel), and a `Return` proposed behind a slow requeue could meet the same
    /// message delivered to the consumer again.
    fn due(&mut self, found: BTreeSet<Finding>, returns_ready: bool) -> Vec<Finding> {
        self.sweep += 1;
        let sweep = self.sweep;
        self.proposed.retain(|finding, at| found.contains(finding) && sweep - *at < SWEEPS_BEFORE_PROPOSING_AGAIN);
        let due: Vec<Finding> = found
            .iter()
            .filter(|finding| self.previous.contains(*finding) && !self.proposed.contains_key(*finding))
            .filter(|finding| returns_ready || !matches!(finding, Finding::Return(..)))
            .cloned()
            .collect();
        for finding in &due {
            self.proposed.insert(finding.clone(), sweep);
        }
        self.previous = found;
        due
    }
}

/// A group's record of this node's consumers, and the index its replica had applied before it
/// was read.
type Record = (u64, Vec<ConsumerRecord>);

/// Holds each quorum queue group's record of this node's consumers against this node's
/// channels, every [`CONSUMER_SWEEP_INTERVAL`], until the broker is gone (see the module's
/// doc). One sweep for all groups: the channels are walked once, not once per queue.
pub(crate) async fn reconcile_consumers(core: Weak<Core>) {
    let mut sightings: HashMap<u64, Sightings> = HashMap::new();
    let mut tick = tokio::time::interval(CONSUMER_SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(core) = core.upgrade() else { return };
        let Some(node) = core.config.cluster.as_ref().map(|cluster| cluster.node_id) else { return };
        let groups = core.quorum.all();
        sightings.retain(|group, _| groups.iter().any(|found| found.group == *group));
        // Without a leader nothing proposed would be taken; the replica may be far behind too.
        let records: Vec<(Arc<QueueGroup>, Record)> = groups
            .into_iter()
            .filter(|group| group.raft().metrics().borrow().current_leader.is_some())
            .map(|group| {
                let applied_index = group.applied_index();
                let record = group.consumers_at(node);
                (group, (applied_index, record))
            })
            .collect();
        if records.is_empty() {
            continue;
        }
        // Decided and proposed under the model lock, as the channels' own consumer commands are.
        let model = core.lock_model();
        let mut by_queue = model.replicated_consumers_by_queue();
        let mut unacked_by_queue = model.replicated_unacked_by_queue();
        for (group, (applied_index, record)) in records {
            let queue = (group.vhost.clone(), group.name.clone());
            let consumers = by_queue.remove(&queue).unwrap_or_default();
            let unacked = unacked_by_queue.remove(&queue).unwrap_or_default();
            let here = Here { node, incarnation: core.incarnation, consumers: &consumers, unacked: &unacked };
            let found = findings(&record, &here, |channel, tag| model.replicated_standing(channel, tag, &group.name));
            let seen = sightings.entry(group.group).or_default();
            let returns_ready = seen
                .mark
                .and_then(|mark| group.consumer_commands_applied_by(mark))
                .is_some_and(|by| applied_index >= by);
            // Taken under the model lock, as the channels' own commands are proposed: every
            // command behind what the channels show now is counted in it.
            seen.mark = Some(group.consumer_commands_submitted());
            let due = seen.due(found, returns_ready);
            if !due.is_empty() {
                tracing::warn!(queue = %group.name, ?due, "a quorum queue's record of consumers here is set right");
            }
            for command in commands(due) {
                group.submit(command, None);
            }
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

    fn recorded(consumer: QuorumConsumer, cancelled: bool) -> ConsumerRecord {
        ConsumerRecord { consumer, cancelled, holds: Vec::new() }
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
        let unacked = HashSet::new();
        let here = Here { node: 1, incarnation: 7, consumers: &consumers, unacked: &unacked };
        let record = vec![
            recorded(consumer(7, 1, "a"), false),
            recorded(consumer(7, 2, "b"), false),
            recorded(consumer(7, 2, "cancelled"), true),
            recorded(consumer(7, 2, ""), false),
            recorded(consumer(7, 3, "c"), false),
            recorded(consumer(7, 3, ""), false),
            recorded(consumer(6, 1, "a"), false),
            recorded(QuorumConsumer { node: 2, incarnation: 1, connection: 9, channel: 1, tag: "other".into() }, false),
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
        let unacked = HashSet::new();
        let here = Here { node: 1, incarnation: 7, consumers: &consumers, unacked: &unacked };
        let record = vec![recorded(consumer(7, 1, "a"), false)];
        let found: Vec<Finding> = findings(&record, &here, standing).into_iter().collect();
        assert_eq!(found, vec![Finding::Checkout(consumer(7, 1, "b"), 0)]);
        // Recorded as cancelled (a cancel committed after a later checkout of the same name).
        let only_a = vec![(channel(1), "a".to_owned(), 10)];
        let here = Here { node: 1, incarnation: 7, consumers: &only_a, unacked: &unacked };
        let record = vec![recorded(consumer(7, 1, "a"), true)];
        let found: Vec<Finding> = findings(&record, &here, standing).into_iter().collect();
        assert_eq!(found, vec![Finding::Checkout(consumer(7, 1, "a"), 10)]);
    }

    #[test]
    fn a_message_held_by_a_consumer_here_that_its_channel_does_not_have_is_returned() {
        let consumers = vec![(channel(1), "a".to_owned(), 10)];
        // Channel 1 has messages 1 and 2 of consumer "a" unacknowledged, and 7 of its get.
        let unacked: HashSet<(ChannelKey, String, QuorumMessageId)> =
            [(channel(1), "a".to_owned(), 1), (channel(1), "a".to_owned(), 2), (channel(1), String::new(), 7)].into();
        let here = Here { node: 1, incarnation: 7, consumers: &consumers, unacked: &unacked };
        let record = vec![
            ConsumerRecord { consumer: consumer(7, 1, "a"), cancelled: false, holds: vec![1, 2, 3, 4] },
            ConsumerRecord { consumer: consumer(7, 1, ""), cancelled: false, holds: vec![7, 8] },
            // Cancelled on an open channel: what it holds may still be settled there.
            ConsumerRecord { consumer: consumer(7, 2, "b"), cancelled: true, holds: vec![5] },
            // Its channel is closed: the `Down` returns all it holds.
            ConsumerRecord { consumer: consumer(7, 3, "c"), cancelled: false, holds: vec![6] },
        ];
        let found: Vec<Finding> = findings(&record, &here, standing).into_iter().collect();
        assert_eq!(
            found,
            vec![
                Finding::Down(consumer(7, 3, "c")),
                Finding::Return(consumer(7, 1, ""), 8),
                Finding::Return(consumer(7, 1, "a"), 3),
                Finding::Return(consumer(7, 1, "a"), 4),
                Finding::Return(consumer(7, 2, "b"), 5),
            ]
        );
        assert_eq!(
            commands(found),
            vec![
                QuorumCommand::Down { consumer: consumer(7, 3, "c") },
                QuorumCommand::Return { consumer: consumer(7, 1, ""), ids: vec![8] },
                QuorumCommand::Return { consumer: consumer(7, 1, "a"), ids: vec![3, 4] },
                QuorumCommand::Return { consumer: consumer(7, 2, "b"), ids: vec![5] },
            ]
        );
    }

    #[test]
    fn a_return_is_due_only_once_the_commands_before_the_last_sweep_are_applied() {
        let mut sightings = Sightings::default();
        let held = Finding::Return(consumer(7, 1, "a"), 3);
        let gone = Finding::Down(consumer(7, 3, "c"));
        let both: BTreeSet<Finding> = [held.clone(), gone.clone()].into();
        assert!(sightings.due(both.clone(), true).is_empty());
        assert_eq!(sightings.due(both.clone(), false), vec![gone], "a settle may be on its way: no return yet");
        assert_eq!(sightings.due(both, true), vec![held]);
    }

    #[test]
    fn a_finding_is_proposed_once_seen_twice_and_again_only_if_it_outlasts_the_pause() {
        let mut sightings = Sightings::default();
        let zombie = Finding::Down(consumer(7, 3, "c"));
        let passing = Finding::Cancel(consumer(7, 2, "b"));
        let both: BTreeSet<Finding> = [zombie.clone(), passing.clone()].into();
        assert!(sightings.due(both, true).is_empty(), "nothing is proposed on a first sighting");
        assert_eq!(
            sightings.due([zombie.clone()].into(), true),
            vec![zombie.clone()],
            "the one seen twice is proposed"
        );
        for _ in 0..SWEEPS_BEFORE_PROPOSING_AGAIN - 1 {
            assert!(sightings.due([zombie.clone()].into(), true).is_empty(), "proposed already");
        }
        assert_eq!(sightings.due([zombie.clone()].into(), true), vec![zombie.clone()], "still there: proposed again");
        assert!(sightings.due([passing.clone()].into(), true).is_empty());
        assert!(sightings.due([zombie.clone()].into(), true).is_empty(), "gone in between: seen once again first");
        assert_eq!(sightings.due([zombie.clone()].into(), true), vec![zombie]);
    }
}
