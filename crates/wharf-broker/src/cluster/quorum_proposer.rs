//! A quorum queue group's proposer on this node: one task per group that takes the commands
//! waiting (what this node's channels did, publishes, ticks) and proposes them as one entry at
//! a time, in the order they came, through `propose.rs` (written here if this node leads,
//! forwarded to the leader otherwise). So a consumer's checkout always precedes its settles and
//! its cancel, and a publisher's messages are enqueued in its order.

use super::leader_move::WriteGate;
use super::quorum::SERVICE_QUEUE;
use super::{ReplicationError, propose, quorum_codec};
use openraft::Raft;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
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
}

/// What the proposer proposes through: the group's Raft and the links to its leader.
pub(super) struct Proposer {
    pub raft: Raft<GroupTypes>,
    pub transport: Arc<Transport>,
    pub group: u64,
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
pub(super) async fn run_proposer(
    proposer: Proposer,
    mut proposals: mpsc::UnboundedReceiver<Pending>,
    writes: Arc<WriteGate>,
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
        let mut payload_bytes: usize = batch.iter().map(|pending| payload_len(&pending.command)).sum();
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
            payload_bytes += payload_len(&more.command);
            batch.push(more);
        }
        busy = batch.len() >= BUSY_COMMANDS;
        let writing = writes.enter().await;
        let commands: Vec<QuorumCommand> = batch.iter().map(|pending| pending.command.clone()).collect();
        let bytes = quorum_codec::encode_commands(&commands);
        let deadline = Instant::now() + QUEUE_PROPOSE_TIMEOUT;
        let leader_before = raft.metrics().borrow().current_leader;
        let outcome = propose::propose(&raft, &transport, SERVICE_QUEUE, group, bytes, deadline)
            .await
            .map_err(|error: ReplicationError| error.to_string())
            .and_then(|proposed| quorum_codec::decode_answers(&proposed.answer));
        drop(writing);
        match outcome {
            Ok(answers) if answers.len() == batch.len() => {
                for (pending, answer) in batch.into_iter().zip(answers) {
                    if let Some(waiter) = pending.answer {
                        let _ = waiter.send(Ok(answer));
                    }
                }
            }
            Ok(answers) => {
                // Committed, but the answers cannot be matched to the commands: nothing is
                // proposed again (it was all applied); whoever waits is told it failed.
                let text = format!("{} answers to {} commands", answers.len(), batch.len());
                tracing::error!(group, error = %text, "a quorum queue's answers do not match its commands");
                for pending in batch {
                    if let Some(waiter) = pending.answer {
                        let _ = waiter.send(Err(text.clone()));
                    }
                }
            }
            Err(text) => {
                tracing::warn!(group, error = %text, "quorum queue commands not taken; consumers' are proposed again");
                carried = fail_enqueues(batch, &text);
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

/// The message bytes a command carries.
fn payload_len(command: &QuorumCommand) -> usize {
    match command {
        QuorumCommand::Enqueue { payload, .. } | QuorumCommand::EnqueueKeyed { payload, .. } => payload.len(),
        _ => 0,
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
