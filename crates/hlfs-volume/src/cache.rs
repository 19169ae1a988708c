//! A local cache of stored segments' bytes, for volumes whose store is
//! remote, so that a VM reading back what it wrote sees local-disk latency.
//!
//! A sealed segment never changes, and an entry is named by its volume's
//! UUID and segment number, so a cached range can never be stale. Each
//! cached segment is a sparse local file of the segment's size plus a small
//! record of which 1 MiB chunks are present; both survive restarts. Misses
//! fetch whole chunks, and neighbouring missing chunks in one ranged GET, so
//! nearby reads share requests. A segment just uploaded from the journal is
//! adopted whole: its journal file is renamed into the cache.
//!
//! One cache serves every volume of a process that uses the same directory
//! (a lock file keeps other processes out; they read from the store
//! directly). Whole segments are evicted, least recently used first, to stay
//! under the size limit. Every byte read is verified against the map's
//! checksums by the caller, which drops an entry that fails and reads the
//! store again, so a damaged cache file costs a refetch, not data.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use hlfs_store::{BlobStore, StoreError};
use lru::LruCache;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// Unit of presence and of fetching.
const CHUNK: u64 = 1 << 20;
/// Neighbouring missing chunks are fetched in one request, up to this much.
const MAX_FETCH: u64 = 8 << 20;
/// A reader whose reads follow each other through a segment is fetched
/// for ahead of its reads: first this much, doubling with each further
/// read of the stream up to `READAHEAD_MAX`.
const READAHEAD_FIRST: u64 = 4 << 20;
const READAHEAD_MAX: u64 = 32 << 20;
/// How far before the end of the last read, or after it, a read still
/// continues the stream (several reads of one stream are in flight at
/// once, and records have headers between their data).
const STREAM_BEHIND: u64 = 8 << 20;
const STREAM_GAP: u64 = 1 << 20;
/// Read-ahead fetches in flight at once over the whole cache; each holds
/// at most `MAX_FETCH` bytes in memory.
const READAHEAD_PARALLEL: usize = 4;
const SIDECAR_SUFFIX: &str = ".present";
const LOCK_NAME: &str = "LOCK";

type Result<T> = std::result::Result<T, StoreError>;

/// Names one segment of one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SegmentKey {
    pub volume: [u8; 16],
    pub seg: u32,
}

impl SegmentKey {
    fn file_name(&self) -> String {
        let hex: String = self.volume.iter().map(|b| format!("{b:02x}")).collect();
        format!("{hex}-{:010}", self.seg)
    }

    fn parse(name: &str) -> Option<SegmentKey> {
        let (hex, seg) = name.split_once('-')?;
        if hex.len() != 32 || seg.len() != 10 {
            return None;
        }
        let mut volume = [0u8; 16];
        for (i, byte) in volume.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(SegmentKey {
            volume,
            seg: seg.parse().ok()?,
        })
    }
}

pub struct ReadCache {
    dir: PathBuf,
    /// Bytes the directory may hold: cached segments plus what open
    /// volumes reserved for their journals.
    limit: u64,
    reserved: AtomicU64,
    /// Reads found wholly present, and reads that found a chunk missing
    /// (and fetched it, or waited for a fetch under way).
    hits: AtomicU64,
    misses: AtomicU64,
    /// Places for read-ahead fetches in flight.
    readahead: Arc<tokio::sync::Semaphore>,
    state: Mutex<State>,
    _lock: File,
    /// A private cache in a temporary directory, removed when dropped.
    scratch: bool,
}

impl Drop for ReadCache {
    fn drop(&mut self) {
        if self.scratch {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl std::fmt::Debug for ReadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadCache({}, limit {})", self.dir.display(), self.limit)
    }
}

struct State {
    /// Most recently used last.
    entries: LruCache<SegmentKey, Arc<Entry>>,
    /// Bytes present over all entries.
    bytes: u64,
}

struct Entry {
    key: SegmentKey,
    size: u64,
    file: File,
    chunks: Mutex<Chunks>,
    /// Bytes of this entry present.
    cached: AtomicU64,
    /// Signalled when a fetch ends, for readers waiting on its chunks.
    fetched: Notify,
    /// How the entry has been read lately, to read ahead of a stream.
    stream: Mutex<Stream>,
}

/// The last reads of one entry: where the last ended, and how many in a
/// row continued the one before.
#[derive(Default)]
struct Stream {
    end: Option<u64>,
    run: u32,
}

impl Stream {
    /// Records a read of `len` bytes at `off`; returns how far past its
    /// end to fetch ahead (0 unless reads follow each other).
    fn read(&mut self, off: u64, len: u64) -> u64 {
        let continues = self
            .end
            .is_some_and(|end| off + STREAM_BEHIND >= end && off <= end + STREAM_GAP);
        self.run = if continues {
            self.run.saturating_add(1)
        } else {
            0
        };
        self.end = Some(self.end.filter(|_| continues).unwrap_or(0).max(off + len));
        match self.run {
            0 | 1 => 0,
            n => (READAHEAD_FIRST << (n - 2).min(3)).min(READAHEAD_MAX),
        }
    }
}

struct Chunks {
    present: Vec<bool>,
    fetching: Vec<bool>,
}

impl Entry {
    /// The entry of segment `key` (`size` bytes, in `file`) whose chunks
    /// `present` says are there.
    fn new(key: SegmentKey, size: u64, file: File, present: Vec<bool>) -> Entry {
        let chunk_len = |i: usize| (size - i as u64 * CHUNK).min(CHUNK);
        let cached = (0..present.len())
            .filter(|&i| present[i])
            .map(chunk_len)
            .sum();
        Entry {
            key,
            size,
            file,
            chunks: Mutex::new(Chunks {
                fetching: vec![false; present.len()],
                present,
            }),
            cached: AtomicU64::new(cached),
            fetched: Notify::new(),
            stream: Mutex::new(Stream::default()),
        }
    }

    fn chunk_len(&self, i: usize) -> u64 {
        chunk_len(self.size, i)
    }
}

/// Bytes of chunk `i` of a segment of `size` bytes (the last may be short).
fn chunk_len(size: u64, i: usize) -> u64 {
    (size - i as u64 * CHUNK).min(CHUNK)
}

/// Part of a cache's limit set aside for a volume's journal.
pub struct Reservation {
    cache: Arc<ReadCache>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.cache.reserved.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// Chunks `i..j` of an entry being fetched by one reader.
struct FetchClaim {
    entry: Arc<Entry>,
    i: usize,
    j: usize,
}

impl FetchClaim {
    /// Marks chunks `i..j` of `entry` as being fetched; dropping the claim,
    /// whatever becomes of the fetch, unmarks them and wakes their waiters.
    /// Called with the entry's chunks locked (`chunks`).
    fn mark(entry: &Arc<Entry>, chunks: &mut Chunks, i: usize, j: usize) -> FetchClaim {
        chunks.fetching[i..j].iter_mut().for_each(|f| *f = true);
        FetchClaim {
            entry: entry.clone(),
            i,
            j,
        }
    }
}

impl Drop for FetchClaim {
    fn drop(&mut self) {
        let mut chunks = self.entry.chunks.lock();
        chunks.fetching[self.i..self.j]
            .iter_mut()
            .for_each(|f| *f = false);
        drop(chunks);
        self.entry.fetched.notify_waiters();
    }
}

/// Caches in use in this process, by directory.
static OPEN: Mutex<Vec<(PathBuf, Weak<ReadCache>)>> = Mutex::new(Vec::new());

impl ReadCache {
    /// The process's cache in `dir`, opened (and made) on first use; a
    /// private, temporary one if another process holds it.
    pub fn shared(
        dir: &Path,
        limit: u64,
    ) -> std::result::Result<Option<Arc<ReadCache>>, StoreError> {
        let io = |e| StoreError::io(dir.display().to_string(), e);
        std::fs::create_dir_all(dir).map_err(io)?;
        let dir = dir.canonicalize().map_err(io)?;
        let mut open = OPEN.lock();
        open.retain(|(_, c)| c.strong_count() > 0);
        if let Some(cache) = open
            .iter()
            .find(|(d, _)| *d == dir)
            .and_then(|(_, c)| c.upgrade())
        {
            return Ok(Some(cache));
        }
        let Some(cache) = ReadCache::open(&dir, limit)? else {
            tracing::info!(dir = %dir.display(), "the read cache is in use by another process; using a private one");
            return ReadCache::scratch(limit).map(Some);
        };
        let cache = Arc::new(cache);
        open.push((dir, Arc::downgrade(&cache)));
        Ok(Some(cache))
    }

    /// An empty cache of its own in a temporary directory, removed when it
    /// is dropped: fetches in large ranges for a reader that must see the
    /// store itself (`check`).
    pub fn scratch(limit: u64) -> std::result::Result<Arc<ReadCache>, StoreError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hlfs-scratch-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let io = |e| StoreError::io(dir.display().to_string(), e);
        std::fs::create_dir_all(&dir).map_err(io)?;
        let mut cache = ReadCache::open(&dir, limit)?.ok_or_else(|| StoreError::Locked {
            name: dir.display().to_string(),
        })?;
        cache.scratch = true;
        Ok(Arc::new(cache))
    }

    /// Opens the cache in `dir`, keeping what earlier runs cached; None if
    /// another process has it open.
    fn open(dir: &Path, limit: u64) -> Result<Option<ReadCache>> {
        let io = |e| StoreError::io(dir.display().to_string(), e);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_NAME))
            .map_err(io)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Ok(None);
        }
        let mut found = Vec::new();
        let mut keep = std::collections::HashSet::new();
        for item in std::fs::read_dir(dir).map_err(io)? {
            let item = item.map_err(io)?;
            let name = item.file_name().to_string_lossy().into_owned();
            let Some(key) = name
                .strip_suffix(SIDECAR_SUFFIX)
                .and_then(SegmentKey::parse)
            else {
                continue;
            };
            match load_entry(dir, key) {
                Some(entry) => {
                    let used = item.metadata().and_then(|m| m.modified()).ok();
                    keep.insert(key.file_name());
                    keep.insert(name);
                    found.push((used, entry));
                }
                None => tracing::debug!(entry = %name, "dropping an unreadable cache entry"),
            }
        }
        // Whatever is not a readable entry (left by a crash) goes.
        for item in std::fs::read_dir(dir).map_err(io)?.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            if name != LOCK_NAME && !keep.contains(&name) {
                let _ = std::fs::remove_file(item.path());
            }
        }
        found.sort_by_key(|(used, _)| *used);
        let mut state = State {
            entries: LruCache::unbounded(),
            bytes: 0,
        };
        for (_, entry) in found {
            state.bytes += entry.cached.load(Ordering::Relaxed);
            state.entries.put(entry.key, Arc::new(entry));
        }
        let cache = ReadCache {
            dir: dir.to_path_buf(),
            limit,
            state: Mutex::new(state),
            _lock: lock,
            scratch: false,
            reserved: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            readahead: Arc::new(tokio::sync::Semaphore::new(READAHEAD_PARALLEL)),
        };
        cache.evict(None);
        Ok(Some(cache))
    }

    /// Sets aside `bytes` of the limit for a volume's journal until the
    /// returned reservation is dropped, evicting to make room.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Reservation {
        self.reserved.fetch_add(bytes, Ordering::SeqCst);
        self.evict(None);
        Reservation {
            cache: self.clone(),
            bytes,
        }
    }

    /// What cached segments may use now.
    fn room(&self) -> u64 {
        self.limit
            .saturating_sub(self.reserved.load(Ordering::SeqCst))
    }

    /// Reads found wholly in the cache, and reads that found a chunk
    /// missing, by every volume using it.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Bytes cached now.
    pub fn cached_bytes(&self) -> u64 {
        self.state.lock().bytes
    }

    fn data_path(&self, key: SegmentKey) -> PathBuf {
        self.dir.join(key.file_name())
    }

    fn sidecar_path(&self, key: SegmentKey) -> PathBuf {
        self.dir
            .join(format!("{}{SIDECAR_SUFFIX}", key.file_name()))
    }

    /// Fills `buf` with segment `key` (blob `name` of `store`) from `off`,
    /// fetching the chunks that are missing.
    pub async fn read_into(
        self: &Arc<Self>,
        key: SegmentKey,
        store: &Arc<dyn BlobStore>,
        name: &str,
        off: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let entry = self.entry(key, store, name).await?;
        let len = buf.len() as u64;
        if off.checked_add(len).is_none_or(|end| end > entry.size) {
            return Err(StoreError::OutOfRange {
                name: name.to_string(),
                offset: off,
                len,
                size: entry.size,
            });
        }
        if len == 0 {
            return Ok(());
        }
        let first = (off / CHUNK) as usize;
        let last = ((off + len - 1) / CHUNK) as usize;
        let ahead = entry.stream.lock().read(off, len);
        if ahead > 0 {
            let end = (off + len + ahead).min(entry.size);
            self.read_ahead(&entry, store, name, last + 1, end.div_ceil(CHUNK) as usize);
        }
        self.fetch_missing(&entry, store, name, first, last).await?;
        entry
            .file
            .read_exact_at(buf, off)
            .map_err(|e| StoreError::io(self.data_path(key).display().to_string(), e))
    }

    /// The entry for `key`, made (empty, sized from the store) if missing.
    async fn entry(
        &self,
        key: SegmentKey,
        store: &Arc<dyn BlobStore>,
        name: &str,
    ) -> Result<Arc<Entry>> {
        if let Some(entry) = self.state.lock().entries.get(&key) {
            return Ok(entry.clone());
        }
        let size = store
            .head(name)
            .await?
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        let mut state = self.state.lock();
        if let Some(entry) = state.entries.get(&key) {
            return Ok(entry.clone());
        }
        let path = self.data_path(key);
        let io = |e| StoreError::io(path.display().to_string(), e);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        file.set_len(size).map_err(io)?;
        let n = size.div_ceil(CHUNK) as usize;
        let entry = Arc::new(Entry::new(key, size, file, vec![false; n]));
        state.entries.put(key, entry.clone());
        Ok(entry)
    }

    /// Makes chunks `first..=last` of `entry` present: fetches runs of
    /// missing ones, and waits for those another reader is fetching.
    async fn fetch_missing(
        &self,
        entry: &Arc<Entry>,
        store: &Arc<dyn BlobStore>,
        name: &str,
        first: usize,
        last: usize,
    ) -> Result<()> {
        // The common case, a warm cache, without registering for wake-ups.
        if entry.chunks.lock().present[first..=last].iter().all(|&p| p) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        loop {
            // Registered before looking, so a fetch ending in between still
            // wakes us.
            let fetched = entry.fetched.notified();
            tokio::pin!(fetched);
            fetched.as_mut().enable();
            let run = {
                let mut chunks = entry.chunks.lock();
                let Some(i) = (first..=last).find(|&i| !chunks.present[i]) else {
                    return Ok(());
                };
                if chunks.fetching[i] {
                    None
                } else {
                    let mut j = i + 1;
                    while j <= last
                        && !chunks.present[j]
                        && !chunks.fetching[j]
                        && (j - i + 1) as u64 * CHUNK <= MAX_FETCH
                    {
                        j += 1;
                    }
                    Some(FetchClaim::mark(entry, &mut chunks, i, j))
                }
            };
            match run {
                None => fetched.await,
                Some(claim) => self.fetch_claimed(claim, store, name).await?,
            }
        }
    }

    /// Fetches the chunks of `claim` and records them present.
    async fn fetch_claimed(
        &self,
        claim: FetchClaim,
        store: &Arc<dyn BlobStore>,
        name: &str,
    ) -> Result<()> {
        let (entry, i, j) = (claim.entry.clone(), claim.i, claim.j);
        let entry = &entry;
        let fetched = self.fetch(entry, store, name, i, j).await;
        let bitmap = {
            let mut chunks = entry.chunks.lock();
            if fetched.is_ok() {
                chunks.present[i..j].iter_mut().for_each(|p| *p = true);
            }
            chunks.present.clone()
        };
        drop(claim);
        fetched?;
        let bytes: u64 = (i..j).map(|k| entry.chunk_len(k)).sum();
        {
            // Counted together, so an eviction in between cannot take away
            // bytes that were never added; and only an entry still in the
            // cache records its chunks.
            let mut state = self.state.lock();
            entry.cached.fetch_add(bytes, Ordering::Relaxed);
            let current = state.entries.peek(&entry.key);
            if current.is_some_and(|c| Arc::ptr_eq(c, entry)) {
                state.bytes += bytes;
                self.write_sidecar(entry, &bitmap);
            }
        }
        self.evict(Some(entry.key));
        Ok(())
    }

    /// Starts fetching the missing chunks `from..to` of `entry` in the
    /// background, in runs of up to `MAX_FETCH`, as far as the read-ahead
    /// places allow: a reader coming to them waits for these fetches
    /// instead of making its own. A failed read-ahead only leaves its
    /// chunks missing.
    fn read_ahead(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        store: &Arc<dyn BlobStore>,
        name: &str,
        from: usize,
        to: usize,
    ) {
        let mut at = from;
        while at < to {
            let Ok(place) = self.readahead.clone().try_acquire_owned() else {
                return;
            };
            let run = {
                let mut chunks = entry.chunks.lock();
                let Some(i) = (at..to).find(|&k| !chunks.present[k] && !chunks.fetching[k]) else {
                    return;
                };
                let mut j = i + 1;
                while j < to
                    && !chunks.present[j]
                    && !chunks.fetching[j]
                    && (j - i + 1) as u64 * CHUNK <= MAX_FETCH
                {
                    j += 1;
                }
                // Claimed here, before the task exists: a task dropped
                // before it runs still gives its chunks back.
                FetchClaim::mark(entry, &mut chunks, i, j)
            };
            at = run.j;
            let (cache, store, name) = (self.clone(), store.clone(), name.to_string());
            tokio::spawn(async move {
                let _place = place;
                if let Err(e) = cache.fetch_claimed(run, &store, &name).await {
                    tracing::debug!(blob = %name, error = %e, "read-ahead failed");
                }
            });
        }
    }

    /// Reads chunks `i..j` from the store into the entry's file.
    async fn fetch(
        &self,
        entry: &Entry,
        store: &Arc<dyn BlobStore>,
        name: &str,
        i: usize,
        j: usize,
    ) -> Result<()> {
        let lo = i as u64 * CHUNK;
        let hi = (j as u64 * CHUNK).min(entry.size);
        let data = store.get_range(name, lo, hi - lo).await?;
        entry
            .file
            .write_all_at(&data, lo)
            .map_err(|e| StoreError::io(self.data_path(entry.key).display().to_string(), e))
    }

    /// Records which chunks are present, for the next run. Not synced: a
    /// record that outlives its data after a power cut reads as damaged
    /// bytes, which the caller's checksums catch.
    fn write_sidecar(&self, entry: &Entry, present: &[bool]) {
        let mut bytes = Vec::with_capacity(16 + present.len().div_ceil(8));
        bytes.extend_from_slice(&entry.size.to_le_bytes());
        let mut bits = vec![0u8; present.len().div_ceil(8)];
        for (i, _) in present.iter().enumerate().filter(|(_, p)| **p) {
            bits[i / 8] |= 1 << (i % 8);
        }
        bytes.extend_from_slice(&bits);
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let path = self.sidecar_path(entry.key);
        if let Err(e) = std::fs::write(&path, &bytes) {
            tracing::debug!(path = %path.display(), error = %e, "could not record cached chunks");
        }
    }

    /// Takes the file at `path`, holding all `len` bytes of segment `key`,
    /// as its cached copy. False if it would not fit or could not be moved.
    pub fn adopt(&self, key: SegmentKey, path: &Path, len: u64) -> bool {
        if len > self.room() || len == 0 {
            return false;
        }
        self.forget(key);
        let data_path = self.data_path(key);
        if std::fs::rename(path, &data_path).is_err() {
            return false;
        }
        let file = match OpenOptions::new().read(true).write(true).open(&data_path) {
            Ok(f) => f,
            Err(_) => {
                let _ = std::fs::remove_file(&data_path);
                return false;
            }
        };
        let n = len.div_ceil(CHUNK) as usize;
        let entry = Arc::new(Entry::new(key, len, file, vec![true; n]));
        self.write_sidecar(&entry, &vec![true; n]);
        {
            let mut state = self.state.lock();
            state.bytes += len;
            state.entries.put(key, entry);
        }
        self.evict(Some(key));
        true
    }

    /// Drops the cached copy of `key`; false if there was none.
    pub fn forget(&self, key: SegmentKey) -> bool {
        let mut state = self.state.lock();
        let Some(entry) = state.entries.pop(&key) else {
            return false;
        };
        state.bytes -= entry.cached.load(Ordering::Relaxed).min(state.bytes);
        // Under the lock: a new entry for the key must not find (and
        // truncate) the old files, nor lose its own to a late removal.
        self.remove_files(key);
        true
    }

    fn remove_files(&self, key: SegmentKey) {
        let _ = std::fs::remove_file(self.sidecar_path(key));
        let _ = std::fs::remove_file(self.data_path(key));
    }

    /// Evicts least recently used segments until under the limit, never
    /// `keep` (the one being read).
    fn evict(&self, keep: Option<SegmentKey>) {
        let mut state = self.state.lock();
        let mut kept = None;
        while state.bytes > self.room() {
            let Some((key, entry)) = state.entries.pop_lru() else {
                break;
            };
            if Some(key) == keep {
                kept = Some((key, entry));
                continue;
            }
            state.bytes -= entry.cached.load(Ordering::Relaxed).min(state.bytes);
            // Under the lock, as in `forget`.
            self.remove_files(key);
        }
        if let Some((key, entry)) = kept {
            state.entries.put(key, entry);
        }
    }
}

/// Reads back an entry a previous run left; None if anything is off.
fn load_entry(dir: &Path, key: SegmentKey) -> Option<Entry> {
    let sidecar = std::fs::read(dir.join(format!("{}{SIDECAR_SUFFIX}", key.file_name()))).ok()?;
    if sidecar.len() < 12 {
        return None;
    }
    let (body, crc) = sidecar.split_at(sidecar.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let size = u64::from_le_bytes(body[..8].try_into().ok()?);
    let n = size.div_ceil(CHUNK) as usize;
    let bits = &body[8..];
    if bits.len() != n.div_ceil(8) {
        return None;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(key.file_name()))
        .ok()?;
    if file.metadata().ok()?.len() != size {
        return None;
    }
    let present: Vec<bool> = (0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect();
    Some(Entry::new(key, size, file, present))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use hlfs_store::MemEnv;

    #[test]
    fn keys_round_trip_through_file_names() {
        let key = SegmentKey {
            volume: *b"0123456789abcdef",
            seg: 42,
        };
        assert_eq!(SegmentKey::parse(&key.file_name()), Some(key));
        assert_eq!(SegmentKey::parse("nothex-0000000001"), None);
    }

    async fn store_with(name: &str, data: &[u8]) -> Arc<dyn BlobStore> {
        let env = MemEnv::new();
        let store = env.store();
        store
            .put_if_absent(name, Bytes::copy_from_slice(data))
            .await
            .unwrap();
        store
    }

    #[tokio::test]
    async fn reads_fetch_once_survive_reopen_and_evict_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(3 * CHUNK + 100))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let store = store_with("segments/0000000001", &data).await;
        let key = SegmentKey {
            volume: [1; 16],
            seg: 1,
        };
        {
            let cache = Arc::new(ReadCache::open(dir.path(), 64 << 20).unwrap().unwrap());
            // A second process cannot share the directory.
            assert!(ReadCache::open(dir.path(), 64 << 20).unwrap().is_none());
            let mut buf = vec![0u8; 5000];
            cache
                .read_into(key, &store, "segments/0000000001", CHUNK - 10, &mut buf)
                .await
                .unwrap();
            assert_eq!(
                buf,
                data[(CHUNK - 10) as usize..(CHUNK - 10) as usize + 5000]
            );
            assert_eq!(cache.cached_bytes(), 2 * CHUNK);
            let mut tail = vec![0u8; 100];
            cache
                .read_into(key, &store, "segments/0000000001", 3 * CHUNK, &mut tail)
                .await
                .unwrap();
            assert_eq!(tail, data[3 * CHUNK as usize..]);
            assert_eq!(cache.cached_bytes(), 2 * CHUNK + 100);
            let past = cache
                .read_into(key, &store, "segments/0000000001", 3 * CHUNK, &mut buf)
                .await;
            assert!(
                matches!(past, Err(StoreError::OutOfRange { .. })),
                "{past:?}"
            );
        }
        // Reopened, the chunks are there without the store.
        let empty: Arc<dyn BlobStore> = MemEnv::new().store();
        let cache = Arc::new(ReadCache::open(dir.path(), 64 << 20).unwrap().unwrap());
        assert_eq!(cache.cached_bytes(), 2 * CHUNK + 100);
        let mut buf = vec![0u8; 4096];
        cache
            .read_into(key, &empty, "segments/0000000001", CHUNK, &mut buf)
            .await
            .unwrap();
        assert_eq!(buf, data[CHUNK as usize..CHUNK as usize + 4096]);
        // A chunk it never fetched is not there.
        let miss = cache
            .read_into(key, &empty, "segments/0000000001", 2 * CHUNK, &mut buf)
            .await;
        assert!(miss.is_err());
        drop(cache);
        // A smaller limit evicts on open.
        let cache = Arc::new(ReadCache::open(dir.path(), CHUNK).unwrap().unwrap());
        assert_eq!(cache.cached_bytes(), 0);
        drop(cache);
        // Room reserved for a journal comes out of the cached bytes.
        let cache = Arc::new(ReadCache::open(dir.path(), 64 << 20).unwrap().unwrap());
        cache
            .read_into(key, &store, "segments/0000000001", 0, &mut buf)
            .await
            .unwrap();
        assert_eq!(cache.cached_bytes(), CHUNK);
        let journal = cache.reserve(64 << 20);
        assert_eq!(cache.cached_bytes(), 0);
        drop(journal);
        assert_eq!(cache.room(), 64 << 20);
    }

    #[tokio::test]
    async fn adopted_files_are_read_locally_and_forgotten_on_demand() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ReadCache::open(dir.path(), 64 << 20).unwrap().unwrap());
        let elsewhere = tempfile::tempdir_in(dir.path()).unwrap();
        let journal = elsewhere.path().join("0000000007.journal");
        let data = vec![9u8; 3000];
        std::fs::write(&journal, &data).unwrap();
        let key = SegmentKey {
            volume: [2; 16],
            seg: 7,
        };
        assert!(cache.adopt(key, &journal, 3000));
        assert!(!journal.exists());
        let empty: Arc<dyn BlobStore> = MemEnv::new().store();
        let mut buf = vec![0u8; 3000];
        cache
            .read_into(key, &empty, "segments/0000000007", 0, &mut buf)
            .await
            .unwrap();
        assert_eq!(buf, data);
        assert!(cache.forget(key));
        assert_eq!(cache.cached_bytes(), 0);
        assert!(cache
            .read_into(key, &empty, "segments/0000000007", 0, &mut buf)
            .await
            .is_err());
    }

    #[test]
    fn one_cache_per_directory_in_a_process_and_a_private_one_when_taken() {
        let dir = tempfile::tempdir().unwrap();
        let a = ReadCache::shared(dir.path(), 1 << 20).unwrap().unwrap();
        let b = ReadCache::shared(dir.path(), 1 << 20).unwrap().unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "volumes of one process share the cache"
        );
        drop((a, b));
        // Held elsewhere (flock is per open file, so this stands for
        // another process): a private, temporary cache instead.
        let held = ReadCache::open(dir.path(), 1 << 20).unwrap().unwrap();
        let private = ReadCache::shared(dir.path(), 1 << 20).unwrap().unwrap();
        assert_ne!(private.dir, held.dir);
        let scratch_dir = private.dir.clone();
        drop(private);
        assert!(
            !scratch_dir.exists(),
            "a private cache is removed when dropped"
        );
    }

    #[tokio::test]
    async fn a_reader_that_goes_away_mid_fetch_does_not_strand_others() {
        let dir = tempfile::tempdir().unwrap();
        let faults = hlfs_store::layers::Faults::new();
        let store: Arc<dyn BlobStore> = faults.store(MemEnv::new().store());
        store
            .put_if_absent("segments/0000000001", Bytes::from(vec![7u8; 8192]))
            .await
            .unwrap();
        faults.set_latency(std::time::Duration::from_millis(200));
        let cache = Arc::new(ReadCache::open(dir.path(), 64 << 20).unwrap().unwrap());
        let key = SegmentKey {
            volume: [4; 16],
            seg: 1,
        };
        let mut buf = vec![0u8; 4096];
        let cancelled = tokio::time::timeout(
            std::time::Duration::from_millis(250),
            cache.read_into(key, &store, "segments/0000000001", 0, &mut buf),
        )
        .await;
        assert!(
            cancelled.is_err(),
            "the first read should still be fetching"
        );
        let again = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            cache.read_into(key, &store, "segments/0000000001", 0, &mut buf),
        )
        .await;
        assert!(matches!(again, Ok(Ok(()))), "{again:?}");
        assert_eq!(buf, vec![7u8; 4096]);
    }

    /// Chunks of `key` present now.
    fn present(cache: &ReadCache, key: SegmentKey) -> Vec<bool> {
        let entry = cache.state.lock().entries.peek(&key).unwrap().clone();
        let present = entry.chunks.lock().present.clone();
        present
    }

    #[tokio::test]
    async fn a_sequential_reader_is_fetched_for_ahead_and_a_random_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(48 * CHUNK)).map(|i| (i * 13 % 251) as u8).collect();
        let metrics = Arc::new(hlfs_store::layers::StoreMetrics::default());
        let store: Arc<dyn BlobStore> = Arc::new(hlfs_store::layers::Metered::new(
            store_with("segments/0000000001", &data).await,
            metrics.clone(),
        ));
        let cache = Arc::new(ReadCache::open(dir.path(), 1 << 30).unwrap().unwrap());
        let key = |seg| SegmentKey {
            volume: [2; 16],
            seg,
        };
        let name = "segments/0000000001";
        let mut buf = vec![0u8; CHUNK as usize];
        // Random reads: each fetches what it reads, nothing more.
        for chunk in [40u64, 3, 27, 11] {
            cache
                .read_into(key(1), &store, name, chunk * CHUNK + 99, &mut buf[..4096])
                .await
                .unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(present(&cache, key(1)).iter().filter(|p| **p).count(), 4);

        // Reads chunk `chunk` whole and checks it.
        let read_chunk = |chunk: u64| {
            let (cache, store) = (cache.clone(), store.clone());
            let want = data[(chunk * CHUNK) as usize..((chunk + 1) * CHUNK) as usize].to_vec();
            async move {
                let mut buf = vec![0u8; CHUNK as usize];
                cache
                    .read_into(key(1), &store, name, chunk * CHUNK, &mut buf)
                    .await
                    .unwrap();
                assert_eq!(buf, want, "chunk {chunk}");
            }
        };
        // A stream of 1 MiB reads from chunk 12 on: from its third read,
        // chunks ahead of it are fetched before it asks.
        for chunk in 12..15u64 {
            read_chunk(chunk).await;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !present(&cache, key(1))[15..19].iter().all(|p| *p) {
            assert!(
                std::time::Instant::now() < deadline,
                "nothing was read ahead"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let (hits_before, _) = cache.hits_and_misses();
        let gets_before = metrics.counts().gets;
        for chunk in 15..19u64 {
            read_chunk(chunk).await;
        }
        // Served from what was read ahead, with no request of their own,
        // and the window grew with the stream.
        assert_eq!(cache.hits_and_misses().0, hits_before + 4);
        while !present(&cache, key(1))[19..27].iter().all(|p| *p) {
            assert!(
                std::time::Instant::now() < deadline,
                "the window did not grow"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            metrics.counts().gets > gets_before,
            "read-ahead made the requests"
        );
        // Behind the stream, only the random reads' chunks.
        let ahead = present(&cache, key(1));
        assert_eq!(ahead[..12].iter().filter(|p| **p).count(), 2, "{ahead:?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        /// Whatever a crash or a stranger leaves in the directory, opening
        /// the cache neither panics nor keeps an entry that does not check.
        #[test]
        fn garbage_presence_records_are_dropped(
            sidecar in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            data_len in 0u64..(3 << 20),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let key = SegmentKey { volume: [3; 16], seg: 5 };
            std::fs::write(dir.path().join(format!("{}{SIDECAR_SUFFIX}", key.file_name())), &sidecar).unwrap();
            let f = File::create(dir.path().join(key.file_name())).unwrap();
            f.set_len(data_len).unwrap();
            std::fs::write(dir.path().join("stray"), b"x").unwrap();
            let cache = ReadCache::open(dir.path(), 1 << 30).unwrap().unwrap();
            let kept = cache.state.lock().entries.len();
            // A random record is kept only if it checks and fits its file.
            if kept == 1 {
                let e = cache.state.lock().entries.peek(&key).unwrap().clone();
                proptest::prop_assert_eq!(e.size, data_len);
            }
            proptest::prop_assert!(!dir.path().join("stray").exists());
        }
    }
}
