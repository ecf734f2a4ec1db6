//! [`SimFs`]: an in-memory, fault-injecting file system for crash tests.
//!
//! It keeps, for every file, the bytes the process sees and the bytes that are durable, and for
//! every directory, the entries the process sees and the durable ones. `sync_data` and `sync_dir`
//! make them equal. [`SimFs::crash`] then throws away what a crash may throw away:
//! - [`CrashMode::KeepUnsynced`]: a `kill -9`; the page cache survives, nothing is lost.
//! - [`CrashMode::LoseUnsynced`]: a power loss; every unsynced write and directory change is gone.
//! - [`CrashMode::Random`]: per file, unsynced appended bytes survive whole, not at all, or as a torn
//!   prefix; per directory, unsynced entry changes survive all together or not at all (so a rename
//!   stays atomic).
//!
//! Each mount carries a generation; a crash starts a new generation, and every handle or mount of an
//! older one fails from then on, so a store that was "killed" cannot touch the disk it left behind.
//! Faults on demand: failing syncs, a space limit (`ENOSPC` after a partial write; space allocated
//! ahead with `FsFile::allocate` counts against it and is then never refused to a write), a file
//! system without `fallocate`, flipped bits.

use super::{DirEntry, Fs, FsFile, OpenMode};
use std::collections::BTreeMap;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What a simulated crash does to data that was written but not synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// A process kill: unsynced data survives (it was in the page cache).
    KeepUnsynced,
    /// A power loss: unsynced data and directory changes are lost.
    LoseUnsynced,
    /// Anything between: per file kept, lost or torn; per directory kept or lost.
    Random,
}

/// An in-memory file system that can crash. Cloning gives another handle to the same mount.
#[derive(Debug, Clone)]
pub struct SimFs {
    state: Arc<Mutex<SimState>>,
    generation: u64,
    /// While held, file and directory syncs wait (see [`SimFs::hold_syncs`]).
    sync_gate: Arc<(Mutex<SyncGate>, Condvar)>,
}

/// The gate syncs wait at while a test holds them.
#[derive(Debug, Default)]
struct SyncGate {
    held: bool,
    /// Syncs waiting at the gate now.
    waiting: usize,
}

#[derive(Debug)]
struct SimState {
    generation: u64,
    /// Ordered, so a crash visits inodes in the same order every time and a seed reproduces it.
    inodes: BTreeMap<u64, Inode>,
    next_inode: u64,
    rng_state: u64,
    syncs_to_fail: u64,
    /// Directory opens (for a directory sync) still to fail with EMFILE.
    dir_opens_to_fail: u64,
    syncs_before_failing: u64,
    /// Mutating operations left before a scheduled crash, and its mode.
    crash_after: Option<(u64, CrashMode)>,
    space_bytes_max: Option<u64>,
    sync_count: u64,
    /// Bytes allocated per file inode by `FsFile::allocate` (as with `FALLOC_FL_KEEP_SIZE`): a
    /// file takes the larger of its length and its allocation from the space limit.
    allocated: BTreeMap<u64, u64>,
    /// `FsFile::allocate` fails with `Unsupported`, as on a file system without `fallocate`.
    allocation_unsupported: bool,
}

#[derive(Debug, Clone)]
enum Inode {
    Dir { entries: BTreeMap<String, u64>, durable_entries: BTreeMap<String, u64> },
    File { data: Vec<u8>, durable: Vec<u8> },
}

const ROOT_INODE: u64 = 0;
/// "Too many open files".
const EMFILE: i32 = 24;

fn crashed_error() -> io::Error {
    io::Error::other("simulated crash: this handle belongs to a file system generation that crashed")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{} not found", path.display()))
}

/// Splits a path into its normal components; `..` and prefixes are not used by the store.
fn components(path: &Path) -> io::Result<Vec<String>> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => match name.to_str() {
                Some(name) => parts.push(name.to_owned()),
                None => return Err(io::Error::other("non-UTF-8 path in SimFs")),
            },
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::other("SimFs paths must be plain absolute paths"));
            }
        }
    }
    Ok(parts)
}

impl SimState {
    fn next_random(&mut self) -> u64 {
        // splitmix64: deterministic per seed, good enough to pick crash outcomes.
        self.rng_state = self.rng_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn lookup(&self, path: &Path) -> io::Result<u64> {
        let mut inode = ROOT_INODE;
        for name in components(path)? {
            match self.inodes.get(&inode) {
                Some(Inode::Dir { entries, .. }) => {
                    inode = *entries.get(&name).ok_or_else(|| not_found(path))?;
                }
                _ => return Err(not_found(path)),
            }
        }
        Ok(inode)
    }

    fn parent_and_name(&self, path: &Path) -> io::Result<(u64, String)> {
        let mut parts = components(path)?;
        let name = parts.pop().ok_or_else(|| io::Error::other("path has no file name"))?;
        let parent_path: PathBuf = std::iter::once("/".to_owned()).chain(parts).collect();
        let parent = self.lookup(&parent_path)?;
        match self.inodes.get(&parent) {
            Some(Inode::Dir { .. }) => Ok((parent, name)),
            _ => Err(not_found(&parent_path)),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> io::Result<&mut BTreeMap<String, u64>> {
        match self.inodes.get_mut(&dir) {
            Some(Inode::Dir { entries, .. }) => Ok(entries),
            _ => Err(io::Error::other("not a directory")),
        }
    }

    /// What one file takes from the space limit: its length, or its allocation if larger.
    fn charge(&self, inode: u64, len: usize) -> u64 {
        (len as u64).max(self.allocated.get(&inode).copied().unwrap_or(0))
    }

    /// The space taken by every file reachable from the root (a removed file gives its space
    /// back, as on Linux once its last handle is closed; the store drops its handles on delete).
    fn total_file_bytes(&self) -> u64 {
        let mut total = 0;
        let mut stack = vec![ROOT_INODE];
        while let Some(number) = stack.pop() {
            match self.inodes.get(&number) {
                Some(Inode::Dir { entries, .. }) => stack.extend(entries.values().copied()),
                Some(Inode::File { data, .. }) => total += self.charge(number, data.len()),
                None => {}
            }
        }
        total
    }

    /// Fails with `StorageFull` unless `growth_bytes` more fit under the space limit, given that
    /// the file being changed (taken out of the inode table) takes `charge_now` bytes.
    fn check_room(&self, charge_now: u64, growth_bytes: u64) -> io::Result<()> {
        match self.space_bytes_max {
            Some(max) if self.total_file_bytes() + charge_now + growth_bytes > max => {
                Err(io::Error::new(io::ErrorKind::StorageFull, "simulated ENOSPC: no space left on device"))
            }
            _ => Ok(()),
        }
    }

    fn allocate(&mut self, inode: Inode) -> u64 {
        let number = self.next_inode;
        self.next_inode += 1;
        self.inodes.insert(number, inode);
        number
    }

    fn take_sync_failure(&mut self) -> io::Result<()> {
        self.sync_count += 1;
        if self.syncs_before_failing > 0 {
            self.syncs_before_failing -= 1;
            return Ok(());
        }
        if self.syncs_to_fail > 0 {
            self.syncs_to_fail -= 1;
            return Err(io::Error::other("simulated fsync failure (EIO)"));
        }
        Ok(())
    }

    fn crash_now(&mut self, mode: CrashMode) {
        let state = self;
        state.crash_after = None;
        state.generation += 1;
        let numbers: Vec<u64> = state.inodes.keys().copied().collect();
        for number in numbers {
            let roll = state.next_random();
            let roll_len = state.next_random();
            let Some(inode) = state.inodes.get_mut(&number) else {
                continue;
            };
            match inode {
                Inode::Dir { entries, durable_entries } => {
                    let keep = match mode {
                        CrashMode::KeepUnsynced => true,
                        CrashMode::LoseUnsynced => false,
                        CrashMode::Random => roll.is_multiple_of(2),
                    };
                    if keep {
                        *durable_entries = entries.clone();
                    } else {
                        *entries = durable_entries.clone();
                    }
                }
                Inode::File { data, durable } => {
                    match mode {
                        CrashMode::KeepUnsynced => {}
                        CrashMode::LoseUnsynced => *data = durable.clone(),
                        CrashMode::Random => {
                            if data.starts_with(durable) {
                                // An append-only change: keep a prefix of the unsynced tail, from
                                // nothing to all of it (a torn write is a prefix that stops mid-record).
                                let extra = (data.len() - durable.len()) as u64;
                                let kept = durable.len() + (roll_len % (extra + 1)) as usize;
                                data.truncate(kept);
                            } else if roll.is_multiple_of(2) {
                                *data = durable.clone();
                            }
                        }
                    }
                    *durable = data.clone();
                }
            }
        }
        state.collect_garbage();
    }

    /// Counts a mutating operation toward a scheduled crash; true if the crash happened now.
    fn tick(&mut self) -> bool {
        match &mut self.crash_after {
            Some((0, mode)) => {
                let mode = *mode;
                self.crash_now(mode);
                true
            }
            Some((left, _)) => {
                *left -= 1;
                false
            }
            None => false,
        }
    }

    /// Drops inodes no longer reachable from the root after a crash rewound directories.
    fn collect_garbage(&mut self) {
        let mut reachable = std::collections::HashSet::new();
        let mut stack = vec![ROOT_INODE];
        while let Some(inode) = stack.pop() {
            if !reachable.insert(inode) {
                continue;
            }
            if let Some(Inode::Dir { entries, .. }) = self.inodes.get(&inode) {
                stack.extend(entries.values().copied());
            }
        }
        self.inodes.retain(|number, _| reachable.contains(number));
    }
}

impl SimFs {
    /// A new, empty file system. `seed` makes [`CrashMode::Random`] outcomes reproducible.
    pub fn new(seed: u64) -> Self {
        let mut inodes = BTreeMap::new();
        inodes.insert(ROOT_INODE, Inode::Dir { entries: BTreeMap::new(), durable_entries: BTreeMap::new() });
        SimFs {
            state: Arc::new(Mutex::new(SimState {
                generation: 0,
                inodes,
                next_inode: ROOT_INODE + 1,
                rng_state: seed,
                syncs_to_fail: 0,
                dir_opens_to_fail: 0,
                syncs_before_failing: 0,
                crash_after: None,
                space_bytes_max: None,
                sync_count: 0,
                allocated: BTreeMap::new(),
                allocation_unsupported: false,
            })),
            generation: 0,
            sync_gate: Arc::new((Mutex::new(SyncGate::default()), Condvar::new())),
        }
    }

    /// Makes every file and directory sync wait until [`SimFs::release_syncs`]: the store's
    /// writer then stops inside a batch's sync, and whatever is submitted meanwhile is gathered
    /// into its next batch, so a test can build a batch of its choosing (appends to several
    /// queues at once, say) without relying on timing.
    pub fn hold_syncs(&self) {
        self.sync_gate().held = true;
    }

    /// Lets held and later syncs go on.
    pub fn release_syncs(&self) {
        self.sync_gate().held = false;
        self.sync_gate.1.notify_all();
    }

    /// How many syncs wait at the gate now (see [`SimFs::hold_syncs`]): a test waits for one to
    /// know that the store's writer has written its batch and stopped at the batch's sync.
    pub fn syncs_held(&self) -> usize {
        self.sync_gate().waiting
    }

    fn sync_gate(&self) -> MutexGuard<'_, SyncGate> {
        self.sync_gate.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait_for_sync_gate(&self) {
        let mut gate = self.sync_gate();
        if !gate.held {
            return;
        }
        gate.waiting += 1;
        while gate.held {
            gate = self.sync_gate.1.wait(gate).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        gate.waiting -= 1;
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock only happens in a failing test; keep going with the data.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn live(&self) -> io::Result<MutexGuard<'_, SimState>> {
        let state = self.lock();
        if state.generation != self.generation {
            return Err(crashed_error());
        }
        Ok(state)
    }

    /// Like `live`, for an operation that changes something: it counts toward a scheduled crash.
    fn mutating(&self) -> io::Result<MutexGuard<'_, SimState>> {
        let mut state = self.live()?;
        if state.tick() {
            return Err(crashed_error());
        }
        Ok(state)
    }

    /// This mount as the store's file-system handle.
    pub fn shared(&self) -> Arc<dyn Fs> {
        Arc::new(self.clone())
    }

    /// Simulates a crash. Every mount and handle from before fails from now on; use
    /// [`SimFs::remount`] to get the file system as it is after the crash.
    pub fn crash(&self, mode: CrashMode) {
        self.lock().crash_now(mode);
    }

    /// Schedules a crash: after `operations` more mutating operations (writes, truncations,
    /// syncs, creations, removals, renames) through any mount, the file system crashes in `mode`
    /// and that operation and every later one through the old mounts fail. For crashing in the
    /// middle of something, such as recovery.
    pub fn crash_after_operations(&self, operations: u64, mode: CrashMode) {
        self.lock().crash_after = Some((operations, mode));
    }

    /// Cancels a crash scheduled by [`SimFs::crash_after_operations`] that has not happened yet.
    pub fn cancel_scheduled_crash(&self) {
        self.lock().crash_after = None;
    }

    /// How many crashes the file system went through, scheduled ones included (a scheduled
    /// crash can fire in another thread's operation, after the work it was meant for).
    pub fn crash_count(&self) -> u64 {
        self.lock().generation
    }

    /// A mount of the file system as it is now (after a crash: the surviving state).
    pub fn remount(&self) -> SimFs {
        let generation = self.lock().generation;
        SimFs { state: Arc::clone(&self.state), generation, sync_gate: Arc::clone(&self.sync_gate) }
    }

    /// Makes the next `count` directory syncs fail before they start, as opening the directory
    /// does when the process has no descriptor left (EMFILE).
    pub fn fail_next_dir_opens(&self, count: u64) {
        self.lock().dir_opens_to_fail = count;
    }

    /// Makes the next `count` syncs (file or directory) fail with an I/O error.
    pub fn fail_next_syncs(&self, count: u64) {
        self.fail_syncs_after(0, count);
    }

    /// Lets `successful` more syncs succeed, then makes the `count` after them fail.
    pub fn fail_syncs_after(&self, successful: u64, count: u64) {
        let mut state = self.lock();
        state.syncs_before_failing = successful;
        state.syncs_to_fail = count;
    }

    /// Limits the total bytes of all files; a write past it is cut short and fails with
    /// `StorageFull` (`ENOSPC`). `None` removes the limit.
    pub fn set_space_bytes_max(&self, space_bytes_max: Option<u64>) {
        self.lock().space_bytes_max = space_bytes_max;
    }

    /// Total bytes held by all files (what counts against the space limit): each file's length,
    /// or what was allocated for it if that is more.
    pub fn used_bytes(&self) -> u64 {
        self.lock().total_file_bytes()
    }

    /// With `false`, `FsFile::allocate` fails with `Unsupported`, as on a file system without
    /// `fallocate` (writes then take their space only when they happen).
    pub fn set_allocation_supported(&self, supported: bool) {
        self.lock().allocation_unsupported = !supported;
    }

    /// How many file and directory syncs were requested so far.
    pub fn sync_count(&self) -> u64 {
        self.lock().sync_count
    }

    /// Flips one bit of a file, in both its visible and its durable contents (a media error).
    pub fn flip_bit(&self, path: &Path, offset: u64, bit: u8) -> io::Result<()> {
        let mut state = self.lock();
        let number = state.lookup(path)?;
        match state.inodes.get_mut(&number) {
            Some(Inode::File { data, durable }) => {
                let index = usize::try_from(offset).map_err(io::Error::other)?;
                let mask = 1u8 << (bit % 8);
                let byte =
                    data.get_mut(index).ok_or_else(|| io::Error::other("flip_bit offset past the end of the file"))?;
                *byte ^= mask;
                if let Some(byte) = durable.get_mut(index) {
                    *byte ^= mask;
                }
                Ok(())
            }
            _ => Err(not_found(path)),
        }
    }

    /// The visible contents of a file (for test assertions).
    pub fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = self.lock();
        let number = state.lookup(path)?;
        match state.inodes.get(&number) {
            Some(Inode::File { data, .. }) => Ok(data.clone()),
            _ => Err(not_found(path)),
        }
    }

    /// Appends bytes to a file, durably (for tests that simulate a torn or garbage tail).
    pub fn append_durable(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.lock();
        let number = state.lookup(path)?;
        match state.inodes.get_mut(&number) {
            Some(Inode::File { data, durable }) => {
                data.extend_from_slice(bytes);
                *durable = data.clone();
                Ok(())
            }
            _ => Err(not_found(path)),
        }
    }

    /// Every file path below `path`, sorted (for test assertions).
    pub fn list_files(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        let state = self.lock();
        let mut found = Vec::new();
        let mut stack = vec![(path.to_path_buf(), state.lookup(path)?)];
        while let Some((dir_path, number)) = stack.pop() {
            match state.inodes.get(&number) {
                Some(Inode::Dir { entries, .. }) => {
                    for (name, child) in entries {
                        stack.push((dir_path.join(name), *child));
                    }
                }
                Some(Inode::File { .. }) => found.push(dir_path),
                None => {}
            }
        }
        found.sort();
        Ok(found)
    }
}

impl Fs for SimFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.mutating()?;
        let mut current = ROOT_INODE;
        for name in components(path)? {
            let existing = match state.inodes.get(&current) {
                Some(Inode::Dir { entries, .. }) => entries.get(&name).copied(),
                _ => return Err(io::Error::other("a path component is not a directory")),
            };
            current = match existing {
                Some(child) => child,
                None => {
                    let child =
                        state.allocate(Inode::Dir { entries: BTreeMap::new(), durable_entries: BTreeMap::new() });
                    state.entries_mut(current)?.insert(name, child);
                    child
                }
            };
        }
        Ok(())
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let state = self.live()?;
        let number = state.lookup(path)?;
        match state.inodes.get(&number) {
            Some(Inode::Dir { entries, .. }) => Ok(entries
                .iter()
                .map(|(name, child)| DirEntry {
                    name: name.clone(),
                    is_dir: matches!(state.inodes.get(child), Some(Inode::Dir { .. })),
                })
                .collect()),
            _ => Err(io::Error::other("not a directory")),
        }
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FsFile>> {
        let mut state = self.mutating()?;
        let inode = match (state.lookup(path), mode) {
            (Ok(number), OpenMode::Existing) => match state.inodes.get(&number) {
                Some(Inode::File { .. }) => number,
                _ => return Err(io::Error::other("not a file")),
            },
            (Ok(_), OpenMode::CreateNew) => {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, "file exists"));
            }
            (Err(error), OpenMode::Existing) => return Err(error),
            (Err(_), OpenMode::CreateNew) => {
                let (parent, name) = state.parent_and_name(path)?;
                let number = state.allocate(Inode::File { data: Vec::new(), durable: Vec::new() });
                state.entries_mut(parent)?.insert(name, number);
                number
            }
        };
        Ok(Arc::new(SimFile { fs: self.clone(), inode }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.mutating()?;
        let (parent, name) = state.parent_and_name(path)?;
        state.entries_mut(parent)?.remove(&name).map(|_| ()).ok_or_else(|| not_found(path))
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        // Unlinking the top entry is enough: nothing below it is reachable any more, and a crash
        // before the parent is synced brings the whole tree back, as on a real file system.
        self.remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.mutating()?;
        let (from_parent, from_name) = state.parent_and_name(from)?;
        let (to_parent, to_name) = state.parent_and_name(to)?;
        let number = state.entries_mut(from_parent)?.remove(&from_name).ok_or_else(|| not_found(from))?;
        state.entries_mut(to_parent)?.insert(to_name, number);
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.wait_for_sync_gate();
        let mut state = self.mutating()?;
        if state.dir_opens_to_fail > 0 {
            // The process is out of descriptors: the directory is never opened, nothing synced.
            state.dir_opens_to_fail -= 1;
            return Err(io::Error::from_raw_os_error(EMFILE));
        }
        state.take_sync_failure()?;
        let number = state.lookup(path)?;
        match state.inodes.get_mut(&number) {
            Some(Inode::Dir { entries, durable_entries }) => {
                *durable_entries = entries.clone();
                Ok(())
            }
            _ => Err(io::Error::other("not a directory")),
        }
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        Ok(self.live()?.lookup(path).is_ok())
    }

    fn lock_exclusive(&self, _path: &Path) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        // One process by construction: tests decide which store instance is alive.
        Ok(Box::new(()))
    }
}

#[derive(Debug)]
struct SimFile {
    fs: SimFs,
    inode: u64,
}

impl SimFile {
    fn with_data<T>(
        &self,
        mutating: bool,
        action: impl FnOnce(&mut SimState, &mut Vec<u8>, &mut Vec<u8>) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut state = if mutating { self.fs.mutating()? } else { self.fs.live()? };
        // Take the file out while acting on it so the closure can still read the whole state.
        let Some(Inode::File { mut data, mut durable }) = state.inodes.remove(&self.inode) else {
            return Err(io::Error::other("file no longer exists"));
        };
        let result = action(&mut state, &mut data, &mut durable);
        state.inodes.insert(self.inode, Inode::File { data, durable });
        result
    }
}

impl FsFile for SimFile {
    fn size_bytes(&self) -> io::Result<u64> {
        self.with_data(false, |_, data, _| Ok(data.len() as u64))
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with_data(false, |_, data, _| {
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let end = start.saturating_add(buf.len());
            let source =
                data.get(start..end).ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end"))?;
            buf.copy_from_slice(source);
            Ok(())
        })
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let inode = self.inode;
        self.with_data(true, |state, data, _| {
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let end = start + buf.len();
            // Bytes up to the file's charge (its length or allocation) are already paid for.
            let charge_now = state.charge(inode, data.len());
            let growth = (end as u64).saturating_sub(charge_now);
            // `data` is taken out of the inode table, so the total excludes this file's bytes.
            let used = state.total_file_bytes() + charge_now;
            let (writable, full) = match state.space_bytes_max {
                Some(max) if used + growth > max => {
                    let room = max.saturating_sub(used);
                    let allowed_end = usize::try_from(charge_now.saturating_add(room)).unwrap_or(usize::MAX);
                    let allowed_end = allowed_end.max(start.min(data.len()));
                    (allowed_end.saturating_sub(start).min(buf.len()), true)
                }
                _ => (buf.len(), false),
            };
            if data.len() < start + writable {
                data.resize(start + writable, 0);
            }
            data[start..start + writable].copy_from_slice(&buf[..writable]);
            if full {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "simulated ENOSPC: no space left on device"));
            }
            Ok(())
        })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let inode = self.inode;
        self.with_data(true, |state, data, _| {
            let charge_now = state.charge(inode, data.len());
            state.check_room(charge_now, len.saturating_sub(charge_now))?;
            if len <= data.len() as u64 {
                // Shrinking frees every block past the new end, allocated ones included.
                if let Some(allocated) = state.allocated.get_mut(&inode) {
                    *allocated = (*allocated).min(len);
                }
            }
            data.resize(usize::try_from(len).map_err(io::Error::other)?, 0);
            Ok(())
        })
    }

    fn allocate(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        let inode = self.inode;
        self.with_data(true, |state, data, _| {
            if state.allocation_unsupported {
                return Err(io::Error::new(io::ErrorKind::Unsupported, "simulated: fallocate not supported"));
            }
            let charge_now = state.charge(inode, data.len());
            let end = offset.saturating_add(len_bytes);
            // All or nothing: a refused allocation takes no space.
            state.check_room(charge_now, end.saturating_sub(charge_now))?;
            let allocated = state.allocated.entry(inode).or_insert(0);
            *allocated = (*allocated).max(end);
            Ok(())
        })
    }

    fn release_allocation(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        let inode = self.inode;
        self.with_data(true, |state, data, _| {
            if let Some(allocated) = state.allocated.get_mut(&inode)
                && offset >= data.len() as u64
                && offset.saturating_add(len_bytes) >= *allocated
            {
                *allocated = (*allocated).min(offset);
            }
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.fs.wait_for_sync_gate();
        self.with_data(true, |state, data, durable| {
            state.take_sync_failure()?;
            durable.clone_from(data);
            Ok(())
        })
    }
}

#[cfg(test)]
#[path = "sim_tests.rs"]
mod tests;
