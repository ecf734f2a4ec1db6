//! A quorum queue group's proposers on this node: tasks that take the commands waiting (what
//! this node's channels did, publishes, ticks) and propose them as one entry at a time, in the
//! order they came, through `propose.rs` (written here if this node leads, forwarded to the
//! leader otherwise).
//!
//! Two lanes, each its own task with one entry in flight ([`Lanes`]): the messages' (enqueues)
//! and the consumers' (everything else: checkouts, settles, returns, cancels, downs, gets,
//! purges, ticks). So a consumer's checkout always precedes its settles and its cancel, a
//! requeue precedes the same channel's next `basic.get`, and a publisher's messages are
//! enqueued in its order, while a group busy both ways has two entries in flight, one of each,
//! instead of one (a lane waits for its entry's commit before it proposes the next). An enqueue
//! and a consumer's command mean the same in either order (which consumer a message goes to may
//! differ, as it would from two nodes), with two exceptions: a `basic.get` or a purge must come
//! after the publishes sent before it (RabbitMQ keeps a channel's commands in order, and a
//! client may publish and then get). So a get or a purge waits until the messages lane has
//! answered every enqueue handed to it before (committed, or failed and nacked), and only they
//! wait. Several entries in flight in one lane were tried and
//! taken back (docs/design/20261205_replication.md, "Seventh session"): a consumer command
//! proposed again after a failed entry could then land after a later one, a checkout after its
//! own `Down`; with one lane for consumers' commands that cannot happen.

use super::leader_move::WriteGate;
use super::quorum::SERVICE_QUEUE;
use super::{ReplicationError, propose, quorum_codec};
use openraft::Raft;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use wharf_cluster::Transport;
use wharf_model::{QuorumAnswer, QuorumCommand};
use wharf_raft::GroupTypes;

/// Commands one entry carries at most.
const COMMANDS_PER_ENTRY_MAX: usize = 1_024;

/// Message bytes one entry carries at most (a batch stops growing past it): an entry is sent
/// whole in one Raft message, and a follower that waits on one message too long starts an
/// election.
const ENTRY_PAYLOAD_BYTES_MAX: usize = 1024 * 1024;

/// Commands in an entry that say the group is busy: the next entry lingers for more.
const BUSY_COMMANDS: usize = 32;

/// How long a busy group's next entry waits for more commands (each entry costs a round of
/// Raft messages and a `fdatasync` on every member, whatever it carries).
const LINGER: Duration = Duration::from_millis(2);

/// The longest pause before proposing again what a group did not take.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How long a queue command may wait for a leader and its commit.
const QUEUE_PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A command waiting to be proposed, and who waits for its answer.
pub(super) struct Pending {
    pub command: QuorumCommand,
    pub answer: Option<oneshot::Sender<Result<QuorumAnswer, String>>>,
    /// Its number in its lane (from 1).
    seq: u64,
    /// A get or a purge: proposed only once the messages lane has answered this many enqueues.
    after_messages: u64,
}

/// How far a lane answered: the seq up to which its commands were committed, or failed without
/// being carried to the next entry.
type Answered = Arc<watch::Sender<u64>>;

/// What the proposer proposes through: the group's Raft and the links to its leader.
#[derive(Clone)]
pub(super) struct Proposer {
    pub raft: Raft<GroupTypes>,
    pub transport: Arc<Transport>,
    pub group: u64,
}

/// Which lane a command goes through: the messages' (enqueues) or the consumers' (the rest).
fn is_message_command(command: &QuorumCommand) -> bool {
    matches!(command, QuorumCommand::Enqueue { .. } | QuorumCommand::EnqueueKeyed { .. })
}

/// Whether a command must come after the enqueues this node proposed before it.
fn follows_enqueues(command: &QuorumCommand) -> bool {
    matches!(command, QuorumCommand::Dequeue { .. } | QuorumCommand::Purge)
}

/// A group's two proposers on this node, each fed in order (see the module's doc).
pub(super) struct Lanes {
    messages: mpsc::UnboundedSender<Pending>,
    consumers: mpsc::UnboundedSender<Pending>,
    /// Commands handed to the messages lane and to the consumers' so far. Numbered and sent
    /// under this lock, so each lane receives its commands in the order of their seqs.
    submitted: Mutex<(u64, u64)>,
    consumers_answered: Answered,
    /// The consumers lane's recent entries: (its last command's seq, its log index).
    consumers_committed: Committed,
}

/// A lane's recent committed entries, oldest first: (the seq of its last command, its index).
type Committed = Arc<Mutex<VecDeque<(u64, u64)>>>;

/// Committed entries a lane remembers (see [`Lanes::consumer_commands_applied_by`]).
const COMMITTED_KEPT: usize = 256;

impl Lanes {
    /// Starts the two proposers of a group.
    pub(super) fn start(proposer: Proposer, writes: Arc<WriteGate>) -> Lanes {
        let (messages, messages_waiting) = mpsc::unbounded_channel();
        let (consumers, consumers_waiting) = mpsc::unbounded_channel();
        let (messages_answered, consumers_answered): (Answered, Answered) =
            (Arc::new(watch::Sender::new(0)), Arc::new(watch::Sender::new(0)));
        let enqueues_answered = messages_answered.subscribe();
        let messages_lane = Lane { answered: messages_answered, enqueues_answered: None, committed: None };
        let consumers_committed = Committed::default();
        let consumers_lane = Lane {
            answered: Arc::clone(&consumers_answered),
            enqueues_answered: Some(enqueues_answered),
            committed: Some(Arc::clone(&consumers_committed)),
        };
        tokio::spawn(run_proposer(proposer.clone(), messages_waiting, Arc::clone(&writes), messages_lane));
        tokio::spawn(run_proposer(proposer, consumers_waiting, writes, consumers_lane));
        Lanes { messages, consumers, submitted: Mutex::new((0, 0)), consumers_answered, consumers_committed }
    }

    /// Queues `command` behind what its lane has waiting; false if that proposer stopped.
    pub(super) fn send(
        &self,
        command: QuorumCommand,
        answer: Option<oneshot::Sender<Result<QuorumAnswer, String>>>,
    ) -> bool {
        let mut submitted = self.submitted.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let after_messages = if follows_enqueues(&command) { submitted.0 } else { 0 };
        let (lane, count) = if is_message_command(&command) {
            (&self.messages, &mut submitted.0)
        } else {
            (&self.consumers, &mut submitted.1)
        };
        *count += 1;
        let sent = lane.send(Pending { command, answer, seq: *count, after_messages }).is_ok();
        if !sent {
            // Never to be answered: not counted.
            *count -= 1;
        }
        sent
    }

    /// How many consumer commands this node handed to the group so far: a mark for
    /// [`Lanes::consumer_commands_applied_by`].
    pub(super) fn consumer_commands_submitted(&self) -> u64 {
        self.submitted.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).1
    }

    /// If the first `mark` consumer commands were all answered: a log index by which the
    /// committed ones were applied (this node's replica reflects them once it applied that far).
    /// The index may be later than the exact one (entries older than [`COMMITTED_KEPT`] are
    /// forgotten), never earlier.
    pub(super) fn consumer_commands_applied_by(&self, mark: u64) -> Option<u64> {
        if *self.consumers_answered.borrow() < mark {
            return None;
        }
        let committed = self.consumers_committed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let by = committed.iter().find(|(seq, _)| *seq >= mark).or(committed.back());
        Some(by.map_or(0, |(_, index)| *index))
    }
}

/// What a proposer task knows of its lane.
struct Lane {
    answered: Answered,
    /// The consumers' lane: how far the messages lane has answered (gets and purges wait on it).
    enqueues_answered: Option<watch::Receiver<u64>>,
    /// The consumers' lane: its recent committed entries.
    committed: Option<Committed>,
}

/// Proposes what waits, one entry at a time, in order.
///
/// A batch the group did not take (no leader in time, or a leader lost before it answered) is
/// handled by kind: an enqueue is failed (its publisher is nacked and publishes again; proposing
/// it again here could put it in twice, since an unanswered one may have been committed), while
/// what consumers did (checkouts, settles, cancels, downs) is proposed again until the group
/// takes it: those commands mean the same however often they are applied, and dropping one would
/// leave a message held by a consumer that settled it.
///
/// While this node hands the group over (`leader_move.rs`) a batch waits at the gate, and is
/// then proposed to the next leader.
async fn run_proposer(
    proposer: Proposer,
    mut proposals: mpsc::UnboundedReceiver<Pending>,
    writes: Arc<WriteGate>,
    mut lane: Lane,
) {
    let Proposer { raft, transport, group } = proposer;
    let mut carried: Vec<Pending> = Vec::new();
    let mut busy = false;
    loop {
        let mut batch = std::mem::take(&mut carried);
        if batch.is_empty() {
            match proposals.recv().await {
                Some(first) => batch.push(first),
                None => return,
            }
        }
        let mut payload_bytes: usize = batch.iter().map(|pending| quorum_codec::payload_len(&pending.command)).sum();
        // Busy (the last entry was large): linger a little for more, so entries stay large;
        // idle: propose at once, so a lone publish is not held back.
        let linger_until = busy.then(|| tokio::time::Instant::now() + LINGER);
        while batch.len() < COMMANDS_PER_ENTRY_MAX && payload_bytes < ENTRY_PAYLOAD_BYTES_MAX {
            let more = match proposals.try_recv() {
                Ok(more) => Some(more),
                Err(_) => match linger_until {
                    Some(until) => tokio::time::timeout_at(until, proposals.recv()).await.ok().flatten(),
                    None => None,
                },
            };
            let Some(more) = more else { break };
            payload_bytes += quorum_codec::payload_len(&more.command);
            batch.push(more);
        }
        busy = batch.len() >= BUSY_COMMANDS;
        // A get or a purge in the batch: the enqueues handed over before it are answered first.
        // The messages lane answers each batch within its deadline, so this wait is bounded; if
        // that lane stopped (the group shut down), nothing more will be answered there.
        let after_messages = batch.iter().map(|pending| pending.after_messages).max().unwrap_or(0);
        if let Some(answered) = lane.enqueues_answered.as_mut().filter(|_| after_messages > 0) {
            let _ = answered.wait_for(|answered| *answered >= after_messages).await;
        }
        let last_seq = batch.last().map_or(0, |pending| pending.seq);
        let writing = writes.enter().await;
        let bytes = quorum_codec::encode_commands(batch.iter().map(|pending| &pending.command));
        let deadline = Instant::now() + QUEUE_PROPOSE_TIMEOUT;
        let leader_before = raft.metrics().borrow().current_leader;
        let outcome = propose::propose(&raft, &transport, SERVICE_QUEUE, group, bytes, deadline)
            .await
            .map_err(|error: ReplicationError| error.to_string())
            .and_then(|proposed| {
                quorum_codec::decode_answers(&proposed.answer).map(|answers| (proposed.index, answers))
            });
        drop(writing);
        if let (Ok((index, _)), Some(committed)) = (&outcome, &lane.committed) {
            let mut committed = committed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if committed.len() == COMMITTED_KEPT {
                committed.pop_front();
            }
            committed.push_back((last_seq, *index));
        }
        match outcome {
            Ok((_, answers)) if answers.len() == batch.len() => {
                lane.answered.send_replace(last_seq);
                for (pending, answer) in batch.into_iter().zip(answers) {
                    if let Some(waiter) = pending.answer {
                        let _ = waiter.send(Ok(answer));
                    }
                }
            }
            Ok((_, answers)) => {
                // Committed, but the answers cannot be matched to the commands: nothing is
                // proposed again (it was all applied); whoever waits is told it failed.
                let text = format!("{} answers to {} commands", answers.len(), batch.len());
                tracing::error!(group, error = %text, "a quorum queue's answers do not match its commands");
                lane.answered.send_replace(last_seq);
                for pending in batch {
                    if let Some(waiter) = pending.answer {
                        let _ = waiter.send(Err(text.clone()));
                    }
                }
            }
            Err(text) => {
                tracing::warn!(group, error = %text, "quorum queue commands not taken; consumers' are proposed again");
                carried = fail_enqueues(batch, &text);
                // Answered: what failed, up to the first command carried to the next entry.
                let answered = carried.first().map_or(last_seq, |first| first.seq - 1);
                lane.answered.send_replace(answered);
                if raft.metrics().borrow().state == openraft::ServerState::Shutdown {
                    return;
                }
                // Before trying again: a new leader (at once, when the old one died and the group
                // elected), or else a pause (the group is unreachable, or slow).
                let _ = raft
                    .wait(Some(RETRY_PAUSE))
                    .metrics(
                        |metrics| metrics.current_leader.is_some() && metrics.current_leader != leader_before,
                        "a new leader",
                    )
                    .await;
            }
        }
    }
}

/// Fails the enqueues of a batch the group did not take; returns the rest, to propose again.
fn fail_enqueues(batch: Vec<Pending>, text: &str) -> Vec<Pending> {
    let mut again = Vec::new();
    for pending in batch {
        // A purge is not proposed again either: applied twice, it would remove what was
        // published (and confirmed) in between; nor a get (twice, it would take two messages).
        if matches!(
            pending.command,
            QuorumCommand::Enqueue { .. }
                | QuorumCommand::EnqueueKeyed { .. }
                | QuorumCommand::Purge
                | QuorumCommand::Dequeue { .. }
        ) {
            if let Some(waiter) = pending.answer {
                let _ = waiter.send(Err(text.to_owned()));
            }
        } else {
            again.push(pending);
        }
    }
    again
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_model::QuorumConsumer;

    /// Enqueues take one lane; everything a consumer does, gets and purges included, the other,
    /// in its order; gets and purges also wait for the enqueues before them.
    #[test]
    fn enqueues_take_one_lane_and_the_rest_the_other() {
        let consumer = QuorumConsumer { node: 1, incarnation: 1, connection: 1, channel: 1, tag: "c".into() };
        let payload: Arc<[u8]> = Arc::from(&b"m"[..]);
        let messages = [
            QuorumCommand::Enqueue { payload: Arc::clone(&payload), expires_at_ms: None, order_key: None },
            QuorumCommand::EnqueueKeyed {
                payload,
                expires_at_ms: None,
                key: Arc::from(&b"k"[..]),
                now_ms: 1,
                order_key: None,
            },
        ];
        let consumers = [
            QuorumCommand::Dequeue { consumer: consumer.clone(), settle: false },
            QuorumCommand::Purge,
            QuorumCommand::Checkout { consumer: consumer.clone(), prefetch: 1 },
            QuorumCommand::Cancel { consumer: consumer.clone() },
            QuorumCommand::Down { consumer: consumer.clone() },
            QuorumCommand::Settle { consumer: consumer.clone(), ids: vec![1] },
            QuorumCommand::Return { consumer: consumer.clone(), ids: vec![1] },
            QuorumCommand::Discard { consumer, ids: vec![1] },
            QuorumCommand::NodeDown { node: 1 },
            QuorumCommand::NodeRestarted { node: 1, incarnation: 2 },
            QuorumCommand::Tick { now_ms: 1 },
        ];
        assert!(messages.iter().all(is_message_command));
        assert!(!consumers.iter().any(is_message_command));
        let waiting: Vec<bool> = consumers.iter().map(follows_enqueues).collect();
        assert_eq!(waiting, [true, true, false, false, false, false, false, false, false, false, false]);
    }
}
