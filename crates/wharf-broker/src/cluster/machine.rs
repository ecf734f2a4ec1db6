//! The metadata group's state machine on a node: it carries each committed [`MetaCommand`] out
//! on this broker (`command.rs`) and records, in the definitions log, the last entry it applied
//! and the group's membership, so a restarted node knows where it stopped.
//!
//! The record is written after the batch's commands took effect (each of them synced on its
//! own), not in the same write: a crash between the two applies the batch's commands again
//! at the restart, which commands are made to survive (see `command.rs`). No command is ever
//! skipped: the record never names an entry that was not applied.
//!
//! Snapshots (`meta_snapshot.rs`): every `--metadata-snapshot-entries` entries the node's
//! replicated definitions are saved as a snapshot in the group's store log (`GroupSnapshots`),
//! and openraft purges the log before it; a node that fell behind the purge (or joins) is sent
//! the leader's snapshot and installs it as a difference with what it holds. The snapshot's data
//! is read in `get_snapshot_builder`, which openraft calls between two applies, so it is the
//! state after exactly the entry it names; `build_snapshot` (in a task of its own) only saves it.
//! An install saves the snapshot first, then changes the definitions, then records the applied
//! state: after a crash in between, [`repair_interrupted_install`] installs it again at the
//! restart, because openraft would otherwise apply the entries after the older applied state,
//! which the purge took away.

use super::command::{MetaAnswer, MetaCommand};
use super::meta_snapshot;
use crate::core::{Core, blocking};
use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use std::io::Cursor;
use std::sync::{Arc, Weak};
use wharf_raft::{Answer, GroupSnapshots, GroupTypes};
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

    /// Writes the state to the definitions log (synced; blocking).
    fn record(&self, core: &Core) -> Result<(), String> {
        let value = self.encode().map_err(|error| error.to_string())?;
        core.meta.put(APPLIED_KEY, &value).map_err(|error| {
            core.store_failed(&error);
            error.to_string()
        })
    }
}

/// At start, before the group does: an install of a snapshot that a crash interrupted (the
/// snapshot saved, its applied state not yet recorded) is made again, and the state recorded.
/// Returns the applied state the group starts from.
pub(crate) fn repair_interrupted_install(
    core: &Arc<Core>,
    snapshots: &GroupSnapshots,
    state: AppliedState,
) -> Result<AppliedState, String> {
    let Some((meta, data)) = snapshots.current() else { return Ok(state) };
    if meta.last_log_id <= state.last_applied {
        return Ok(state);
    }
    tracing::warn!(snapshot = ?meta.last_log_id, applied = ?state.last_applied, "installing the metadata snapshot an earlier run was installing");
    let items = meta_snapshot::decode(&data)?;
    blocking(|| meta_snapshot::install(core, &items))?;
    let state = AppliedState { last_applied: meta.last_log_id, membership: meta.last_membership };
    blocking(|| state.record(core))?;
    Ok(state)
}

/// The metadata group's state machine on this node.
#[derive(Debug, Clone)]
pub(crate) struct MetaMachine {
    /// Weak: the core holds the group, whose tasks hold this machine.
    core: Weak<Core>,
    state: AppliedState,
    /// Its snapshots, in the group's store log.
    snapshots: GroupSnapshots,
}

/// A snapshot read between two applies, saved by openraft's snapshot task.
#[derive(Debug)]
pub(crate) struct MetaSnapshotBuilder {
    snapshots: GroupSnapshots,
    meta: SnapshotMeta<u64, BasicNode>,
    /// The encoded items, or why they could not be read.
    data: Result<Vec<u8>, String>,
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
    pub fn new(core: &Arc<Core>, state: AppliedState, snapshots: GroupSnapshots) -> MetaMachine {
        MetaMachine { core: Arc::downgrade(core), state, snapshots }
    }

    /// Writes the applied state to the definitions log (synced).
    fn record(&self) -> Result<(), String> {
        let Some(core) = self.core.upgrade() else { return Err("the broker is stopping".into()) };
        blocking(|| self.state.record(&core))
    }
}

impl RaftSnapshotBuilder<GroupTypes> for MetaSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<GroupTypes>, StorageError<u64>> {
        let data = self.data.clone().map_err(|error| StorageError::IO {
            source: StorageIOError::write_snapshot(None, openraft::AnyError::error(error)),
        })?;
        self.snapshots.save(&self.meta, data.clone()).await?;
        Ok(Snapshot { meta: self.meta.clone(), snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<GroupTypes> for MetaMachine {
    type SnapshotBuilder = MetaSnapshotBuilder;

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

    async fn get_snapshot_builder(&mut self) -> MetaSnapshotBuilder {
        let data = match self.core.upgrade() {
            Some(core) => blocking(|| meta_snapshot::encode(meta_snapshot::items_of(&core))),
            None => Err("the broker is stopping".into()),
        };
        let snapshot_id = match self.state.last_applied {
            Some(log_id) => format!("metadata-{log_id}"),
            None => "metadata-empty".into(),
        };
        let meta = SnapshotMeta {
            last_log_id: self.state.last_applied,
            last_membership: self.state.membership.clone(),
            snapshot_id,
        };
        MetaSnapshotBuilder { snapshots: self.snapshots.clone(), meta, data }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let data = snapshot.into_inner();
        let items = meta_snapshot::decode(&data).map_err(storage_error)?;
        let Some(core) = self.core.upgrade() else {
            return Err(storage_error("the broker is stopping"));
        };
        // Saved before anything changes: a crash from here on installs it again at the restart
        // (`repair_interrupted_install`).
        self.snapshots.save(meta, data).await?;
        blocking(|| meta_snapshot::install(&core, &items)).map_err(storage_error)?;
        self.state = AppliedState { last_applied: meta.last_log_id, membership: meta.last_membership.clone() };
        self.record().map_err(storage_error)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<GroupTypes>>, StorageError<u64>> {
        Ok(self
            .snapshots
            .current()
            .map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data.to_vec())) }))
    }
}
