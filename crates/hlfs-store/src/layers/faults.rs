//! Faults for tests, around any store and journal area: chosen operations
//! fail, store requests take longer, the "power" goes at the n-th durable
//! operation, and [`Faults::power_cut`] returns what a power cut would
//! leave of everything written through the layer.
//!
//! The layer keeps, per journal file, how much of it the last sync made
//! durable: that is all a power-cut image needs, so images can be taken of
//! the memory store and of a real directory alike.
//!
//! The crash point is exact when durable operations run one at a time, as
//! in the tests (one runtime thread, journal operations under the layer's
//! lock). Store requests running at once on several threads may let one
//! more land than `crash_after` says; every image is still one a real power
//! cut could leave.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{
    BlobMeta, BlobReader, BlobStore, JournalDir, JournalFile, JournalLock, MemEnv, Result,
    StoreError,
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

/// Make matching operations fail: store requests as a store that is away
/// would ([`StoreError::Unavailable`]), journal operations as a failing
/// disk would ([`StoreError::Io`]). Both messages say "injected fault".
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
    /// `JournalFile::release`, whose failure is a write error of the file.
    JournalRelease,
    JournalRemove,
    /// Every operation, including those no other kind covers (journal `list`
    /// and `lock`).
    Any,
}

/// What every operation is told once the power is cut: the process is
/// dead, so nothing it tries lands any more, and trying again is useless.
const POWER_CUT: &str = "the power was cut (crash test)";

/// Whether `error` is the one a store gives once [`Faults`] has cut the
/// power.
pub fn is_power_cut(error: &StoreError) -> bool {
    matches!(error, StoreError::Refused(m) if m.ends_with(POWER_CUT))
}

/// The fault plan and crash state shared by every store and journal this
/// handle wraps. Cheap to clone; clones share everything. One handle wraps
/// one store and one journal area.
#[derive(Clone, Default)]
pub struct Faults {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    faults: Vec<Fault>,
    latency: Duration,
    durable_ops: u64,
    crash_after: Option<u64>,
    /// Once set nothing passes any more, so what lies below is the frozen
    /// image `power_cut` starts from.
    dead: bool,
    /// Bytes of each journal file (by name) that the last sync made
    /// durable. Files the layer never saw written count as whole.
    synced: HashMap<String, u64>,
    /// Each journal file's length at its last sync. Bytes written over
    /// since, and lost to a power cut, read as zeros up to it (the engine
    /// writes over synced bytes only in the zeros of its pre-written
    /// window); past it, the file ends where the crash mode cuts it.
    durable_len: HashMap<String, u64>,
    store: Option<Arc<dyn BlobStore>>,
    journal: Option<Arc<dyn JournalDir>>,
}

/// What an operation is, for matching faults and for the crash point.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Durable {
    Yes,
    No,
}

impl State {
    /// The checks every operation starts with; a durable one first dies if
    /// the crash point has been reached, before it lands.
    fn begin(&mut self, op: FaultOp, name: &str, durable: Durable) -> Result<()> {
        let journal_op = matches!(
            op,
            FaultOp::JournalCreate
                | FaultOp::JournalWrite
                | FaultOp::JournalRead
                | FaultOp::JournalSync
                | FaultOp::JournalRelease
                | FaultOp::JournalRemove
        );
        if self.dead {
            return Err(dead(name));
        }
        let hit = self.faults.iter().position(|fault| {
            (fault.op == FaultOp::Any || fault.op == op)
                && name.starts_with(&fault.name_prefix)
                && fault.remaining != Some(0)
        });
        if let Some(index) = hit {
            if let Some(remaining) = &mut self.faults[index].remaining {
                *remaining -= 1;
                if *remaining == 0 {
                    self.faults.remove(index);
                }
            }
            return Err(match journal_op || op == FaultOp::Any {
                true => StoreError::io(name, std::io::Error::other("injected fault")),
                false => StoreError::Unavailable(format!("injected fault on {name}")),
            });
        }
        if durable == Durable::Yes && self.crash_after.is_some_and(|n| self.durable_ops >= n) {
            self.dead = true;
            return Err(dead(name));
        }
        Ok(())
    }

    fn landed(&mut self, durable: Durable) {
        if durable == Durable::Yes {
            self.durable_ops += 1;
        }
    }
}

fn dead(name: &str) -> StoreError {
    StoreError::Refused(format!("{name}: {POWER_CUT}"))
}

impl Faults {
    pub fn new() -> Faults {
        Faults::default()
    }

    /// `store` behind this layer.
    pub fn store(&self, store: Arc<dyn BlobStore>) -> Arc<dyn BlobStore> {
        self.state.lock().store = Some(store.clone());
        Arc::new(FaultyStore {
            inner: store,
            faults: self.clone(),
        })
    }

    /// `journal` behind this layer.
    pub fn journal(&self, journal: Arc<dyn JournalDir>) -> Arc<dyn JournalDir> {
        self.state.lock().journal = Some(journal.clone());
        Arc::new(FaultyJournal {
            inner: journal,
            faults: self.clone(),
        })
    }

    /// Adds a fault; it is checked after the ones already there.
    pub fn inject(&self, fault: Fault) {
        self.state.lock().faults.push(fault);
    }

    pub fn clear(&self) {
        self.state.lock().faults.clear();
    }

    /// Delays every blob store request by `latency` (journal operations are
    /// synchronous and unaffected).
    pub fn set_latency(&self, latency: Duration) {
        self.state.lock().latency = latency;
    }

    /// Durable operations completed so far: blob creates and deletes,
    /// journal creates and removes, journal file syncs and truncates.
    pub fn durable_ops(&self) -> u64 {
        self.state.lock().durable_ops
    }

    /// Cut the power when a durable operation is attempted after `n` have
    /// completed: that operation and every later one fail, and what lies
    /// below (including what was written but not synced since the `n`-th)
    /// stays as it was for [`Faults::power_cut`]. This is a power cut just
    /// before a sync point, the moment with the most unsynced data at stake.
    pub fn crash_after(&self, n: u64) {
        self.state.lock().crash_after = Some(n);
    }

    pub fn is_dead(&self) -> bool {
        self.state.lock().dead
    }

    /// Cuts the power (if the crash point has not already) and returns,
    /// as a new independent memory env, what it leaves of the store and
    /// journal this layer wraps: every blob, and every journal file's synced
    /// bytes plus what `mode` keeps of the rest.
    pub async fn power_cut(&self, mode: CrashMode) -> Result<MemEnv> {
        let (store, journal, synced, durable_len) = {
            let mut state = self.state.lock();
            state.dead = true;
            (
                state.store.clone(),
                state.journal.clone(),
                state.synced.clone(),
                state.durable_len.clone(),
            )
        };
        let mut blobs = BTreeMap::new();
        if let Some(store) = store {
            for blob in store.list("").await? {
                let data = store.get(&blob.name).await?;
                blobs.insert(blob.name, data);
            }
        }
        let mut files = BTreeMap::new();
        if let Some(journal) = journal {
            let seed = match mode {
                CrashMode::DropUnsynced => 0,
                CrashMode::KeepRandomPrefix { seed } | CrashMode::TornSectors { seed } => seed,
            };
            // Files are visited in name order, so a seed always gives the
            // same image.
            let mut rng = StdRng::seed_from_u64(seed);
            for name in journal.list()? {
                let data = match journal.open(&name) {
                    Ok(file) => file.read_at(0, usize::MAX)?,
                    Err(StoreError::NotFound(_)) => continue,
                    Err(e) => return Err(e),
                };
                let durable = synced.get(&name).map_or(data.len(), |&n| n as usize);
                let mut after = after_power_cut(data, durable, mode, &mut rng);
                let len = durable_len.get(&name).map_or(0, |&n| n as usize);
                if after.len() < len {
                    after.resize(len, 0);
                }
                files.insert(name, after);
            }
        }
        Ok(MemEnv::with_contents(blobs, files))
    }

    /// Sleeps for the configured latency. A dead layer answers at once:
    /// waiting to report the power cut only slows crash tests down.
    async fn delay(&self) {
        let latency = {
            let state = self.state.lock();
            match state.dead {
                true => Duration::ZERO,
                false => state.latency,
            }
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }

    /// Runs a blob store request through the checks.
    async fn request<T, F>(&self, op: FaultOp, name: &str, durable: Durable, run: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        self.delay().await;
        self.state.lock().begin(op, name, durable)?;
        let result = run.await;
        if result.is_ok() {
            self.state.lock().landed(durable);
        }
        result
    }

    /// Runs a journal operation through the checks. The state stays locked
    /// throughout, so a power cut sees each operation whole.
    fn journal_op<T>(
        &self,
        op: FaultOp,
        name: &str,
        durable: Durable,
        run: impl FnOnce(&mut State) -> Result<T>,
    ) -> Result<T> {
        let mut state = self.state.lock();
        state.begin(op, name, durable)?;
        let result = run(&mut state);
        if result.is_ok() {
            state.landed(durable);
        }
        result
    }
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("Faults")
            .field("faults", &state.faults)
            .field("durable_ops", &state.durable_ops)
            .field("dead", &state.dead)
            .finish_non_exhaustive()
    }
}

/// The synced prefix of `data` plus what `mode` keeps of the unsynced rest.
fn after_power_cut(mut data: Vec<u8>, synced: usize, mode: CrashMode, rng: &mut StdRng) -> Vec<u8> {
    let end = data.len();
    let synced = synced.min(end);
    match mode {
        CrashMode::DropUnsynced => data.truncate(synced),
        CrashMode::KeepRandomPrefix { .. } => {
            let kept = rng.gen_range(synced..=end);
            data.truncate(kept);
        }
        CrashMode::TornSectors { .. } => {
            let mut kept_end = synced;
            let mut pos = synced;
            // Sectors are aligned to the file, as on the disk: a synced
            // prefix ending mid-sector leaves a partial first sector.
            while pos < end {
                let sector_end = ((pos / SECTOR + 1) * SECTOR).min(end);
                if rng.gen_bool(0.5) {
                    kept_end = sector_end;
                } else {
                    data[pos..sector_end].fill(0);
                }
                pos = sector_end;
            }
            data.truncate(kept_end);
        }
    }
    data
}

struct FaultyStore {
    inner: Arc<dyn BlobStore>,
    faults: Faults,
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStore")
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl BlobStore for FaultyStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<()> {
        let put = self.inner.put_if_absent(name, data);
        self.faults
            .request(FaultOp::Put, name, Durable::Yes, put)
            .await
    }

    async fn put_file_if_absent(&self, name: &str, path: &Path) -> Result<()> {
        let put = self.inner.put_file_if_absent(name, path);
        self.faults
            .request(FaultOp::Put, name, Durable::Yes, put)
            .await
    }

    async fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Bytes> {
        let get = self.inner.get_range(name, offset, len);
        self.faults
            .request(FaultOp::Get, name, Durable::No, get)
            .await
    }

    async fn head(&self, name: &str) -> Result<Option<u64>> {
        let head = self.inner.head(name);
        self.faults
            .request(FaultOp::Head, name, Durable::No, head)
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<BlobMeta>> {
        let list = self.inner.list(prefix);
        self.faults
            .request(FaultOp::List, prefix, Durable::No, list)
            .await
    }

    async fn delete(&self, name: &str) -> Result<()> {
        let delete = self.inner.delete(name);
        self.faults
            .request(FaultOp::Delete, name, Durable::Yes, delete)
            .await
    }

    async fn sweep_leftovers(&self) -> Result<u64> {
        self.inner.sweep_leftovers().await
    }

    async fn open_reader(self: Arc<Self>, name: &str) -> Result<Arc<dyn BlobReader>> {
        let open = self.inner.clone().open_reader(name);
        let reader = self
            .faults
            .request(FaultOp::Head, name, Durable::No, open)
            .await?;
        Ok(Arc::new(FaultyReader {
            inner: reader,
            name: name.to_string(),
            faults: self.faults.clone(),
        }))
    }
}

struct FaultyReader {
    inner: Arc<dyn BlobReader>,
    name: String,
    faults: Faults,
}

#[async_trait]
impl BlobReader for FaultyReader {
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let read = self.inner.read_at(offset, len);
        self.faults
            .request(FaultOp::Get, &self.name, Durable::No, read)
            .await
    }

    async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let read = self.inner.read_into(offset, buf);
        self.faults
            .request(FaultOp::Get, &self.name, Durable::No, read)
            .await
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }
}

struct FaultyJournal {
    inner: Arc<dyn JournalDir>,
    faults: Faults,
}

impl fmt::Debug for FaultyJournal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyJournal")
            .field("inner", &self.inner)
            .finish()
    }
}

impl FaultyJournal {
    fn wrap(&self, name: &str, file: Arc<dyn JournalFile>) -> Arc<dyn JournalFile> {
        Arc::new(FaultyFile {
            inner: file,
            name: name.to_string(),
            faults: self.faults.clone(),
        })
    }
}

impl JournalDir for FaultyJournal {
    fn create(&self, name: &str) -> Result<Arc<dyn JournalFile>> {
        let file = self
            .faults
            .journal_op(FaultOp::JournalCreate, name, Durable::Yes, |state| {
                let file = self.inner.create(name)?;
                state.synced.insert(name.to_string(), 0);
                state.durable_len.insert(name.to_string(), 0);
                Ok(file)
            })?;
        Ok(self.wrap(name, file))
    }

    fn open(&self, name: &str) -> Result<Arc<dyn JournalFile>> {
        let file = self
            .faults
            .journal_op(FaultOp::JournalRead, name, Durable::No, |_| {
                self.inner.open(name)
            })?;
        Ok(self.wrap(name, file))
    }

    fn list(&self) -> Result<Vec<String>> {
        self.faults
            .journal_op(FaultOp::Any, "", Durable::No, |_| self.inner.list())
    }

    fn remove(&self, name: &str) -> Result<()> {
        self.faults
            .journal_op(FaultOp::JournalRemove, name, Durable::Yes, |state| {
                self.inner.remove(name)?;
                state.synced.remove(name);
                state.durable_len.remove(name);
                Ok(())
            })
    }

    fn local_path(&self, name: &str) -> Option<PathBuf> {
        self.inner.local_path(name)
    }

    fn lock(&self) -> Result<JournalLock> {
        self.faults
            .journal_op(FaultOp::Any, crate::JOURNAL_LOCK_NAME, Durable::No, |_| {
                self.inner.lock()
            })
    }
}

struct FaultyFile {
    inner: Arc<dyn JournalFile>,
    name: String,
    faults: Faults,
}

impl FaultyFile {
    /// Bytes from `offset` on are no longer durable. Overwriting synced
    /// bytes makes them, and so everything after them, undurable again
    /// (and a power cut reads them as zeros up to the synced length): the
    /// engine writes over synced bytes only in its window of zeros, so this
    /// is the simple conservative model rather than a per-byte one. A file first seen now counts as synced up to
    /// where it is written.
    fn unsync_from(&self, state: &mut State, offset: u64) {
        let synced = state.synced.entry(self.name.clone()).or_insert(offset);
        *synced = (*synced).min(offset);
    }
}

impl JournalFile for FaultyFile {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.faults
            .journal_op(FaultOp::JournalWrite, &self.name, Durable::No, |state| {
                self.inner.write_at(offset, data)?;
                self.unsync_from(state, offset);
                Ok(())
            })
    }

    fn write_parts_at(&self, offset: u64, parts: &[&[u8]]) -> Result<()> {
        self.faults
            .journal_op(FaultOp::JournalWrite, &self.name, Durable::No, |state| {
                self.inner.write_parts_at(offset, parts)?;
                self.unsync_from(state, offset);
                Ok(())
            })
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.faults
            .journal_op(FaultOp::JournalRead, &self.name, Durable::No, |_| {
                self.inner.read_at(offset, len)
            })
    }

    fn read_exact_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.faults
            .journal_op(FaultOp::JournalRead, &self.name, Durable::No, |_| {
                self.inner.read_exact_into(offset, buf)
            })
    }

    fn start_writeback(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.start_writeback(offset, len)
    }

    fn release(&self, offset: u64, len: u64) -> Result<()> {
        self.faults
            .journal_op(FaultOp::JournalRelease, &self.name, Durable::No, |_| {
                self.inner.release(offset, len)
            })
    }

    fn len(&self) -> Result<u64> {
        self.faults
            .journal_op(FaultOp::JournalRead, &self.name, Durable::No, |_| {
                self.inner.len()
            })
    }

    fn sync(&self) -> Result<()> {
        self.faults
            .journal_op(FaultOp::JournalSync, &self.name, Durable::Yes, |state| {
                let len = self.inner.len()?;
                self.inner.sync()?;
                state.synced.insert(self.name.clone(), len);
                state.durable_len.insert(self.name.clone(), len);
                Ok(())
            })
    }

    fn truncate(&self, len: u64) -> Result<()> {
        self.faults
            .journal_op(FaultOp::JournalSync, &self.name, Durable::Yes, |state| {
                self.inner.truncate(len)?;
                state.synced.insert(self.name.clone(), len);
                state.durable_len.insert(self.name.clone(), len);
                Ok(())
            })
    }
}
