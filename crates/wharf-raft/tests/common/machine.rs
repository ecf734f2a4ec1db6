//! The smallest state machine openraft accepts: it records what it applied and keeps the
//! membership, and its snapshots (itself as JSON) are durable in the group's store log
//! ([`GroupSnapshots`]), so a restarted node starts from its latest one.

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StoredMembership,
};
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use wharf_raft::{Answer, GroupSnapshots, GroupTypes};

#[derive(Debug, Clone)]
pub struct Machine {
    pub state: Arc<Mutex<MachineState>>,
    snapshots: GroupSnapshots,
}

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    pub last_applied: Option<LogId<u64>>,
    pub membership: StoredMembership<u64, openraft::BasicNode>,
    pub applied: Vec<Vec<u8>>,
}

impl Machine {
    /// A machine starting from the latest snapshot `snapshots` holds (empty without one).
    pub fn new(snapshots: GroupSnapshots) -> Machine {
        let state = match snapshots.current() {
            Some((_, data)) => serde_json::from_slice(&data).unwrap(),
            None => MachineState::default(),
        };
        Machine { state: Arc::new(Mutex::new(state)), snapshots }
    }

    /// The commands applied so far, in order.
    pub fn applied(&self) -> Vec<Vec<u8>> {
        self.state.lock().unwrap().applied.clone()
    }
}

impl RaftSnapshotBuilder<GroupTypes> for Machine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<GroupTypes>, StorageError<u64>> {
        let (meta, data) = {
            let state = self.state.lock().unwrap();
            let meta = SnapshotMeta {
                last_log_id: state.last_applied,
                last_membership: state.membership.clone(),
                snapshot_id: format!("{:?}", state.last_applied),
            };
            (meta, serde_json::to_vec(&*state).unwrap())
        };
        self.snapshots.save(&meta, data.clone()).await?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<GroupTypes> for Machine {
    type SnapshotBuilder = Machine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, openraft::BasicNode>), StorageError<u64>> {
        let state = self.state.lock().unwrap();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Answer>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<GroupTypes>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut state = self.state.lock().unwrap();
        let mut answers = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(command) => state.applied.push(command.0),
                EntryPayload::Membership(membership) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), membership)
                }
            }
            answers.push(Answer::default());
        }
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Machine {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let data = snapshot.into_inner();
        let installed: MachineState = serde_json::from_slice(&data).unwrap();
        self.snapshots.save(meta, data).await?;
        *self.state.lock().unwrap() = installed;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<GroupTypes>>, StorageError<u64>> {
        Ok(self
            .snapshots
            .current()
            .map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data.to_vec())) }))
    }
}
