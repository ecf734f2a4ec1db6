//! The metadata group's state machine on a node: it carries each committed [`MetaCommand`] out
//! on this broker (`command.rs`) and records, in the definitions log, the last entry it applied
//! and the group's membership, so a restarted node knows where it stopped.
//!
//! The record is written after the batch's commands took effect (each of them synced on its
//! own), not in the same write: a crash between the two applies the batch's commands again
//! at the restart, which commands are made to survive (see `command.rs`). No command is ever
//! skipped: the record never names an entry that was not applied.
//!
//! Snapshots: the metadata group takes none yet (its policy is `Never`, so no leader ever
//! purges the log and no follower is ever sent one); a node that joins or falls behind replays
//! the log. Building one from the replicated definitions is the next step of the plan
//! (`docs/design/20261205_replication.md`).

use super::command::{MetaAnswer, MetaCommand};
use crate::core::{Core, blocking};
use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use std::io::Cursor;
use std::sync::{Arc, Weak};
use wharf_raft::{Answer, GroupTypes};
use wharf_store::MetaStore;

/// The definitions-log key of the metadata group's applied state.
pub(crate) const APPLIED_KEY: &[u8] = b"cluster\0\0metadata-applied";

/// What the state machine applied: kept in the definitions log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct AppliedState {
    pub last_applied: Option<LogId<u64>>,
    pub membership: StoredMembership<u64, BasicNode>,
}

impl AppliedState {
    /// The state recorded in the definitions log (`None` if the record is unreadable).
    pub fn read(meta: &MetaStore) -> Result<AppliedState, String> {
        match meta.get(APPLIED_KEY) {
            None => Ok(AppliedState::default()),
            Some(value) => match value.split_first() {
                Some((&crate::definition_format::DEFINITIONS_FORMAT_VERSION, json)) => serde_json::from_slice(json)
                    .map_err(|error| format!("the metadata group's applied state is unreadable: {error}")),
                _ => Err("the metadata group's applied state has an unknown format".into()),
            },
        }
    }

    fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut value = vec![crate::definition_format::DEFINITIONS_FORMAT_VERSION];
        serde_json::to_writer(&mut value, self)?;
        Ok(value)
    }
}

/// The metadata group's state machine on this node.
#[derive(Debug, Clone)]
pub(crate) struct MetaMachine {
    /// Weak: the core holds the group, whose tasks hold this machine.
    core: Weak<Core>,
    state: AppliedState,
}

/// A membership's nodes and their addresses.
pub(crate) fn nodes_of(membership: &openraft::Membership<u64, BasicNode>) -> Vec<(u64, String)> {
    membership.nodes().map(|(node, found)| (*node, found.addr.clone())).collect()
}

fn storage_error(error: impl std::fmt::Display) -> StorageError<u64> {
    let error = std::io::Error::other(error.to_string());
    StorageError::IO { source: StorageIOError::write_state_machine(&error) }
}

impl MetaMachine {
    pub fn new(core: &Arc<Core>, state: AppliedState) -> MetaMachine {
        MetaMachine { core: Arc::downgrade(core), state }
    }

    /// Writes the applied state to the definitions log (synced).
    fn record(&self) -> Result<(), String> {
        let Some(core) = self.core.upgrade() else { return Err("the broker is stopping".into()) };
        let value = self.state.encode().map_err(|error| error.to_string())?;
        blocking(|| core.meta.put(APPLIED_KEY, &value)).map_err(|error| {
            core.store_failed(&error);
            error.to_string()
        })
    }
}

impl RaftSnapshotBuilder<GroupTypes> for MetaMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<GroupTypes>, StorageError<u64>> {
        Err(storage_error("the metadata group takes no snapshots (its snapshot policy is Never)"))
    }
}

impl RaftStateMachine<GroupTypes> for MetaMachine {
    type SnapshotBuilder = MetaMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        Ok((self.state.last_applied, self.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Answer>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<GroupTypes>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut answers = Vec::new();
        for entry in entries {
            let answer = match entry.payload {
                EntryPayload::Blank => MetaAnswer::Done { created: false },
                EntryPayload::Membership(membership) => {
                    self.state.membership = StoredMembership::new(Some(entry.log_id), membership);
                    MetaAnswer::Done { created: false }
                }
                EntryPayload::Normal(command) => match serde_json::from_slice::<MetaCommand>(&command.0) {
                    Ok(command) => {
                        let Some(core) = self.core.upgrade() else {
                            return Err(storage_error("the broker is stopping"));
                        };
                        // The kind only: a command's fields can carry a password hash.
                        let kind = command.kind();
                        let index = entry.log_id.index;
                        let answer = blocking(|| command.apply(&core, index));
                        tracing::debug!(index, kind, ?answer, "metadata command applied");
                        answer
                    }
                    Err(error) => {
                        // A command this version cannot read (a newer node wrote it): every node
                        // of this version skips it alike.
                        tracing::error!(index = entry.log_id.index, %error, "a metadata command is unreadable; skipped");
                        MetaAnswer::Failed(format!("the command is unreadable on this node: {error}"))
                    }
                },
            };
            self.state.last_applied = Some(entry.log_id);
            answers.push(Answer(serde_json::to_vec(&answer).map_err(storage_error)?));
        }
        self.record().map_err(storage_error)?;
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> MetaMachine {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        _meta: &SnapshotMeta<u64, BasicNode>,
        _snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        // Unreachable while no node builds one (policy Never, so no log is purged).
        Err(storage_error("the metadata group takes no snapshots"))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<GroupTypes>>, StorageError<u64>> {
        Ok(None)
    }
}
