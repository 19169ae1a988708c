//! An in-memory store and journal for tests. It can fail chosen operations,
//! add latency, and "lose power": [`MemEnv::crash`] returns what a power cut
//! would leave, using exactly the durability the real backends promise.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{
    validate_blob_name, validate_journal_name, BlobMeta, BlobStore, JournalDir, JournalFile,
    JournalLock, Result, StoreError,
};

/// The unit in which [`CrashMode::TornSectors`] loses unsynced data.
const SECTOR: usize = 512;

/// What a power cut does to journal bytes written but not yet synced. Blobs
/// and synced journal bytes always survive.
#[derive(Clone, Copy, Debug)]
pub enum CrashMode {
    /// None of them survive.
    DropUnsynced,
    /// A random-length prefix of them survives.
    KeepRandomPrefix { seed: u64 },
    /// Each 512-byte sector of them independently survives or not, as when
    /// the disk writes pages out of order. A lost sector followed by a kept
    /// one reads as zeros; lost sectors at the end are cut off.
    TornSectors { seed: u64 },
}

/// Make matching operations fail with [`StoreError::Injected`].
#[derive(Clone, Debug)]
pub struct Fault {
    pub op: FaultOp,
    /// Only operations on blobs or journal files whose name starts with this
    /// fail (for `list`, the name is the listed prefix).
    pub name_prefix: String,
    /// How many more operations fail; None fails them forever.
    pub remaining: Option<u32>,
}

/// The operation a [`Fault`] applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    /// `put_if_absent`, `put_file_if_absent`.
    Put,
    /// `get_range` (and so `get` and reader reads).
    Get,
    /// `head` (and so `get` and `open_reader`).
    Head,
    List,
    Delete,
    JournalCreate,
    JournalWrite,
    /// `JournalDir::open`, `JournalFile::read_at` and `len`.
    JournalRead,
    /// `JournalFile::sync` and `truncate` (whose failure is a failed fdatasync).
    JournalSync,
    JournalRemove,
    /// Every operation, including those no other kind covers (journal `list`
    /// and `lock`).
    Any,
}

/// One in-memory world: a blob store and a journal directory sharing a
/// durable-operation counter, faults, latency and crash state.
#[derive(Clone, Default)]
pub struct MemEnv {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    blobs: BTreeMap<String, Bytes>,
    /// Files are shared with their open handles, which keep working after
    /// the name is removed, as on a real filesystem.
    files: BTreeMap<String, Arc<Mutex<MemFile>>>,
    durable_ops: u64,
    crash_after: Option<u64>,
    /// Once set nothing changes any more, so the state is the frozen image a
    /// later `crash` starts from.
    dead: bool,
    faults: Vec<Fault>,
    latency: Duration,
    locked: bool,
}

#[derive(Default)]
struct MemFile {
    data: Vec<u8>,
    /// `data[..synced_len]` is durable.
    synced_len: usize,
}

impl State {
    /// The checks every operation starts with. Operations no `FaultOp`
    /// describes pass `FaultOp::Any`, which only `Any` faults match.
    fn begin(&mut self, op: FaultOp, name: &str) -> Result<()> {
        if self.dead {
            return Err(StoreError::Crashed);
        }
        let hit = self.faults.iter().position(|fault| {
            (fault.op == FaultOp::Any || fault.op == op)
                && name.starts_with(&fault.name_prefix)
                && fault.remaining != Some(0)
        });
        let Some(index) = hit else {
            return Ok(());
        };
        if let Some(remaining) = &mut self.faults[index].remaining {
            *remaining -= 1;
            if *remaining == 0 {
                self.faults.remove(index);
            }
        }
        Err(StoreError::Injected(name.to_string()))
    }

    /// The checks a durable operation starts with: if the crash point has
    /// been reached, the process dies now, before this operation lands, and
    /// everything written since the last durable operation is still there
    /// (unsynced) for the crash image.
    fn begin_durable(&mut self, op: FaultOp, name: &str) -> Result<()> {
        self.begin(op, name)?;
        if self.crash_after.is_some_and(|n| self.durable_ops >= n) {
            self.dead = true;
            return Err(StoreError::Crashed);
        }
        Ok(())
    }

    fn durable_done(&mut self) {
        self.durable_ops += 1;
    }
}

impl MemEnv {
    pub fn new() -> MemEnv {
        MemEnv::default()
    }

    /// The env's blob store. Every call returns a handle to the same blobs.
    pub fn store(&self) -> Arc<MemStore> {
        Arc::new(MemStore { env: self.clone() })
    }

    /// The env's journal directory. Every call returns a handle to the same
    /// files and the same lock.
    pub fn journal(&self) -> Arc<MemJournal> {
        Arc::new(MemJournal { env: self.clone() })
    }

    /// Durable operations completed successfully so far: blob puts and
    /// deletes, journal creates and removes, journal file syncs and truncates.
    pub fn durable_ops(&self) -> u64 {
        self.state.lock().durable_ops
    }

    /// Die when a durable operation is attempted after `n` have completed:
    /// that operation and every later one fail with `Crashed`, and the state
    /// (including what was written but not synced since the `n`-th) is
    /// frozen for [`MemEnv::crash`]. This is a power cut just before a sync
    /// point, the moment with the most unsynced data at stake.
    pub fn crash_after(&self, n: u64) {
        self.state.lock().crash_after = Some(n);
    }

    pub fn is_dead(&self) -> bool {
        self.state.lock().dead
    }

    /// Kill this env (if `crash_after` has not already) and return a new,
    /// independent one holding what a power cut at that point leaves: every
    /// blob, and every journal file's synced bytes plus what `mode` keeps of
    /// the rest. The new env has no faults, latency, lock or crash point, and
    /// its counter starts at 0.
    pub fn crash(&self, mode: CrashMode) -> MemEnv {
        let mut state = self.state.lock();
        state.dead = true;
        let seed = match mode {
            CrashMode::DropUnsynced => 0,
            CrashMode::KeepRandomPrefix { seed } | CrashMode::TornSectors { seed } => seed,
        };
        // Files are visited in name order, so a seed always gives the same image.
        let mut rng = StdRng::seed_from_u64(seed);
        let files = state
            .files
            .iter()
            .map(|(name, file)| {
                let data = after_power_cut(&file.lock(), mode, &mut rng);
                let file = MemFile {
                    synced_len: data.len(),
                    data,
                };
                (name.clone(), Arc::new(Mutex::new(file)))
            })
            .collect();
        MemEnv {
            state: Arc::new(Mutex::new(State {
                blobs: state.blobs.clone(),
                files,
                ..State::default()
            })),
        }
    }

    /// A new, independent env holding this one's blobs and no journal: what
    /// another host sees of a volume in a shared store, or this host after
    /// losing its local disk.
    pub fn store_only(&self) -> MemEnv {
        let blobs = self.state.lock().blobs.clone();
        MemEnv {
            state: Arc::new(Mutex::new(State {
                blobs,
                ..State::default()
            })),
        }
    }

    /// Add a fault; it is checked after the ones already there.
    pub fn inject(&self, fault: Fault) {
        self.state.lock().faults.push(fault);
    }

    pub fn clear_faults(&self) {
        self.state.lock().faults.clear();
    }

    /// Delay every blob store operation by `latency` (journal operations are
    /// synchronous and unaffected).
    pub fn set_latency(&self, latency: Duration) {
        self.state.lock().latency = latency;
    }

    /// Sleep for the configured latency. A dead env answers at once: waiting
    /// to report `Crashed` only slows crash tests down.
    async fn delay(&self) {
        let latency = {
            let state = self.state.lock();
            if state.dead {
                Duration::ZERO
            } else {
                state.latency
            }
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }
}

impl fmt::Debug for MemEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("MemEnv")
            .field("blobs", &state.blobs.len())
            .field("journal_files", &state.files.len())
            .field("durable_ops", &state.durable_ops)
            .field("dead", &state.dead)
            .finish_non_exhaustive()
    }
}

/// The synced prefix of `file` plus what `mode` keeps of the unsynced rest.
fn after_power_cut(file: &MemFile, mode: CrashMode, rng: &mut StdRng) -> Vec<u8> {
    let synced = file.synced_len.min(file.data.len());
    let end = file.data.len();
    match mode {
        CrashMode::DropUnsynced => file.data[..synced].to_vec(),
        CrashMode::KeepRandomPrefix { .. } => {
            let kept = rng.gen_range(synced..=end);
            file.data[..kept].to_vec()
        }
        CrashMode::TornSectors { .. } => {
            let mut image = file.data.clone();
            let mut kept_end = synced;
            let mut pos = synced;
            // Sectors are aligned to the file, as on the disk: a synced
            // prefix ending mid-sector leaves a partial first sector.
            while pos < end {
                let sector_end = ((pos / SECTOR + 1) * SECTOR).min(end);
                if rng.gen_bool(0.5) {
                    kept_end = sector_end;
                } else {
                    image[pos..sector_end].fill(0);
                }
                pos = sector_end;
            }
            image.truncate(kept_end);
            image
        }
    }
}

/// The blob store of a [`MemEnv`].
pub struct MemStore {
    env: MemEnv,
}

impl fmt::Debug for MemStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemStore").field("env", &self.env).finish()
    }
}

#[async_trait]
impl BlobStore for MemStore {
    fn describe(&self) -> String {
        "memory".to_string()
    }

    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<()> {
        validate_blob_name(name)?;
        self.env.delay().await;
        let mut state = self.env.state.lock();
        state.begin_durable(FaultOp::Put, name)?;
        if state.blobs.contains_key(name) {
            return Err(StoreError::AlreadyExists(name.to_string()));
        }
        state.blobs.insert(name.to_string(), data);
        state.durable_done();
        Ok(())
    }

    async fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Bytes> {
        validate_blob_name(name)?;
        self.env.delay().await;
        let mut state = self.env.state.lock();
        state.begin(FaultOp::Get, name)?;
        let blob = state
            .blobs
            .get(name)
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        let size = blob.len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(blob.slice(offset as usize..end as usize)),
            _ => Err(StoreError::OutOfRange {
                name: name.to_string(),
                offset,
                len,
                size,
            }),
        }
    }

    async fn head(&self, name: &str) -> Result<Option<u64>> {
        validate_blob_name(name)?;
        self.env.delay().await;
        let mut state = self.env.state.lock();
        state.begin(FaultOp::Head, name)?;
        Ok(state.blobs.get(name).map(|blob| blob.len() as u64))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<BlobMeta>> {
        self.env.delay().await;
        let mut state = self.env.state.lock();
        state.begin(FaultOp::List, prefix)?;
        Ok(state
            .blobs
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(name, _)| name.starts_with(prefix))
            .map(|(name, blob)| BlobMeta {
                name: name.clone(),
                size: blob.len() as u64,
            })
            .collect())
    }

    async fn delete(&self, name: &str) -> Result<()> {
        validate_blob_name(name)?;
        self.env.delay().await;
        let mut state = self.env.state.lock();
        state.begin_durable(FaultOp::Delete, name)?;
        state.blobs.remove(name);
        state.durable_done();
        Ok(())
    }
}

/// The journal directory of a [`MemEnv`].
pub struct MemJournal {
    env: MemEnv,
}

impl fmt::Debug for MemJournal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemJournal")
            .field("env", &self.env)
            .finish()
    }
}

impl MemJournal {
    fn handle(&self, name: &str, file: Arc<Mutex<MemFile>>) -> Arc<dyn JournalFile> {
        Arc::new(MemJournalFile {
            env: self.env.clone(),
            name: name.to_string(),
            file,
        })
    }
}

impl JournalDir for MemJournal {
    fn create(&self, name: &str) -> Result<Arc<dyn JournalFile>> {
        validate_journal_name(name)?;
        let mut state = self.env.state.lock();
        state.begin_durable(FaultOp::JournalCreate, name)?;
        if state.files.contains_key(name) {
            return Err(StoreError::AlreadyExists(name.to_string()));
        }
        let file = Arc::new(Mutex::new(MemFile::default()));
        state.files.insert(name.to_string(), file.clone());
        state.durable_done();
        Ok(self.handle(name, file))
    }

    fn open(&self, name: &str) -> Result<Arc<dyn JournalFile>> {
        validate_journal_name(name)?;
        let mut state = self.env.state.lock();
        state.begin(FaultOp::JournalRead, name)?;
        let file = state
            .files
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        Ok(self.handle(name, file))
    }

    fn list(&self) -> Result<Vec<String>> {
        let mut state = self.env.state.lock();
        state.begin(FaultOp::Any, "")?;
        Ok(state.files.keys().cloned().collect())
    }

    fn remove(&self, name: &str) -> Result<()> {
        validate_journal_name(name)?;
        let mut state = self.env.state.lock();
        state.begin_durable(FaultOp::JournalRemove, name)?;
        state.files.remove(name);
        state.durable_done();
        Ok(())
    }

    fn local_path(&self, _name: &str) -> Option<PathBuf> {
        None
    }

    fn lock(&self) -> Result<JournalLock> {
        let mut state = self.env.state.lock();
        state.begin(FaultOp::Any, crate::JOURNAL_LOCK_NAME)?;
        if state.locked {
            return Err(StoreError::Locked {
                name: "memory journal".to_string(),
            });
        }
        state.locked = true;
        Ok(JournalLock::new(Box::new(MemLockGuard {
            env: self.env.clone(),
        })))
    }
}

struct MemLockGuard {
    env: MemEnv,
}

impl Drop for MemLockGuard {
    fn drop(&mut self) {
        self.env.state.lock().locked = false;
    }
}

struct MemJournalFile {
    env: MemEnv,
    name: String,
    file: Arc<Mutex<MemFile>>,
}

impl MemJournalFile {
    /// Run `f` on the file if the env is alive and no fault hits. The env lock
    /// is held throughout so that a crash sees each operation whole.
    fn with<T>(&self, op: FaultOp, f: impl FnOnce(&mut State, &mut MemFile) -> T) -> Result<T> {
        let mut state = self.env.state.lock();
        if op == FaultOp::JournalSync {
            state.begin_durable(op, &self.name)?;
        } else {
            state.begin(op, &self.name)?;
        }
        let mut file = self.file.lock();
        Ok(f(&mut state, &mut file))
    }
}

fn offset_to_usize(name: &str, offset: u64) -> Result<usize> {
    usize::try_from(offset)
        .map_err(|_| StoreError::Other(format!("offset {offset} in {name} is too large")))
}

impl JournalFile for MemJournalFile {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let start = offset_to_usize(&self.name, offset)?;
        self.with(FaultOp::JournalWrite, |_, file| {
            let end = start + data.len();
            if file.data.len() < end {
                file.data.resize(end, 0);
            }
            file.data[start..end].copy_from_slice(data);
            // Overwriting synced bytes makes them, and so everything after
            // them, undurable again. The engine only appends, so this is the
            // simple conservative model rather than a per-byte one.
            file.synced_len = file.synced_len.min(start);
        })
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.with(FaultOp::JournalRead, |_, file| {
            let size = file.data.len();
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(size);
            let end = start.saturating_add(len).min(size);
            file.data[start..end].to_vec()
        })
    }

    fn read_exact_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let name = self.name.clone();
        self.with(FaultOp::JournalRead, |_, file| {
            let size = file.data.len();
            let start = usize::try_from(offset)
                .ok()
                .filter(|s| s + buf.len() <= size);
            match start {
                Some(start) => {
                    buf.copy_from_slice(&file.data[start..start + buf.len()]);
                    Ok(())
                }
                None => Err(StoreError::OutOfRange {
                    name,
                    offset,
                    len: buf.len() as u64,
                    size: size as u64,
                }),
            }
        })?
    }

    fn len(&self) -> Result<u64> {
        self.with(FaultOp::JournalRead, |_, file| file.data.len() as u64)
    }

    fn sync(&self) -> Result<()> {
        self.with(FaultOp::JournalSync, |state, file| {
            file.synced_len = file.data.len();
            state.durable_done();
        })
    }

    fn truncate(&self, len: u64) -> Result<()> {
        let len = offset_to_usize(&self.name, len)?;
        self.with(FaultOp::JournalSync, |state, file| {
            file.data.resize(len, 0);
            file.synced_len = len;
            state.durable_done();
        })
    }
}
