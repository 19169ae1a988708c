//! The volume: a thin virtual disk kept as a log of records.
//!
//! Writes append records to the open segment (a journal file) under the
//! writer lock and update the map; reads only take the map lock for the
//! lookup, so they are never queued behind writes. FLUSH syncs the journal
//! once for every write that arrived before it (group commit). A full segment
//! is sealed: dirty map pages and a checkpoint are appended, the file is
//! synced and handed to the store, and a new manifest points at the
//! checkpoint.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::stream::{FuturesOrdered, StreamExt};

use hlfs_format::{
    crc_of_record, encode_header, encode_record, journal_name, manifest_name, parse_journal_name,
    parse_manifest_name, parse_segment_name, segment_name, Checkpoint, Entry, Manifest, MapPage,
    RecordKind, SnapshotEntry, WriterClaim, FORMAT_VERSION, HEADER_LEN, MAX_BLOCK_SIZE,
    MAX_NAME_LEN, MAX_SEGMENT_SIZE, MIN_BLOCK_SIZE, MIN_SEGMENT_SIZE,
};
use hlfs_store::{JournalFile, JournalLock, StoreError};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::backend::Backend;
use crate::cache::Reservation;
use crate::error::{Result, VolumeError};
use crate::map::{depth_for, MapResult, MapState, Missing, Pins, PAGE_COST};
use crate::segments::{ScanSource, ScanStop, Scanner, Segments};

/// Parameters fixed when a volume is created.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Logical size in bytes.
    pub size: u64,
    /// A power of two from 512 B to 64 KiB.
    pub block_size: u32,
    /// Target size of a sealed segment.
    pub segment_size: u64,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            block_size: 4096,
            segment_size: 64 << 20,
        }
    }
}

/// Settings of one open.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Memory the block map may use for cached and dirty pages.
    pub map_budget: u64,
    /// What FLUSH waits for.
    pub durability: Durability,
    /// How long a write or flush waits for a store that is not accepting
    /// uploads before it fails with an I/O error (the data stays safe in
    /// the local journal, and uploads go on in the background).
    pub store_wait: Duration,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            map_budget: 512 << 20,
            durability: Durability::Local,
            store_wait: Duration::from_secs(30),
        }
    }
}

/// Where a write is once FLUSH (or FUA) has returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// In the local journal, synced; sealed segments reach the store in the
    /// background. A crash of the process loses nothing; losing the local
    /// disk loses what was not uploaded yet.
    #[default]
    Local,
    /// In the store: FLUSH seals the open segment and waits for its upload.
    /// For hosts whose local disk is not trusted; every FLUSH costs a store
    /// request.
    Remote,
}

/// Which image a read-only open shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum View {
    /// The latest state, including unsealed writes.
    Head,
    /// A snapshot by name.
    Snapshot(String),
    /// The newest snapshot taken at or before this time (ms since the epoch).
    AsOf(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub created_ms: u64,
    pub lsn: u64,
    pub automatic: bool,
}

impl From<&SnapshotEntry> for SnapshotInfo {
    fn from(s: &SnapshotEntry) -> Self {
        SnapshotInfo {
            name: s.name.clone(),
            created_ms: s.created_ms,
            lsn: s.lsn,
            automatic: s.automatic,
        }
    }
}

/// A run of the volume that is either all data or all hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub data: bool,
}

/// What `hlfs info` shows.
#[derive(Clone, Debug)]
pub struct VolumeInfo {
    pub uuid: String,
    pub size: u64,
    pub block_size: u32,
    pub segment_size: u64,
    pub allocated_bytes: u64,
    pub stored_bytes: u64,
    pub format_version: u16,
    pub snapshots: Vec<SnapshotInfo>,
    pub writer: Option<String>,
    pub created_ms: u64,
}

/// Journal bytes are pushed towards the disk in chunks this large as they
/// are appended, so the sync when a segment is sealed finds little left to
/// write and stalls writers for less time.
const WRITEBACK_CHUNK: u64 = 8 << 20;

/// Tries at a read-only open of a head that a writer keeps changing.
const HEAD_OPEN_ATTEMPTS: u32 = 10;

/// Bytes per data record at most; larger writes become several records.
const MAX_RECORD_BYTES: usize = 4 << 20;

/// A full segment is sealed alone, and with a checkpoint once this many
/// segments' worth of log has been sealed since the last one: writing every
/// dirty map page at each seal would cost nearly as much as the data under
/// dense random writes, while recovery only replays the log since the last
/// checkpoint.
const CHECKPOINT_EVERY: u64 = 4;

/// Segments sealed since the last checkpoint, at most. FLUSH with remote
/// durability seals short segments; this bounds how many recovery reads.
const MAX_SEGMENTS_BETWEEN_CHECKPOINTS: u32 = 64;

/// Sealed segments waiting for their upload, at most, before writers wait:
/// what bounds the local journal when the store is slow or away. A local
/// store takes a segment as fast as it is synced, so one is enough there.
const UPLOAD_BACKLOG_REMOTE: usize = 4;
const UPLOAD_BACKLOG_LOCAL: usize = 1;

/// Segments uploaded at once to a remote store: one request stream to a
/// gateway is slower than the disks behind it.
const PARALLEL_UPLOADS_REMOTE: usize = 3;

/// Pauses between attempts at an upload the store refused, growing up to
/// the maximum (with jitter).
const UPLOAD_RETRY_FIRST: Duration = Duration::from_millis(100);
const UPLOAD_RETRY_MAX: Duration = Duration::from_secs(5);

struct Writer {
    seg: u32,
    file: Option<Arc<dyn JournalFile>>,
    pos: u64,
    next_lsn: u64,
    /// Content changed since the head checkpoint.
    changed: bool,
    /// Segments sealed since the head checkpoint, and their bytes: recovery
    /// replays them.
    sealed_since_checkpoint: u32,
    bytes_since_checkpoint: u64,
    /// The last LSN in a sealed (retired) journal file.
    sealed_lsn: u64,
    closed: bool,
}

/// Journal files not yet sealed: the one appended to and those being sealed.
#[derive(Default)]
struct OpenFiles {
    current: Option<Arc<dyn JournalFile>>,
    retiring: Vec<Arc<dyn JournalFile>>,
}

impl OpenFiles {
    fn in_log_order(&self) -> Vec<Arc<dyn JournalFile>> {
        self.retiring
            .iter()
            .cloned()
            .chain(self.current.clone())
            .collect()
    }
}

/// A retired journal file on its way into the store.
struct Sealing {
    seg: u32,
    file: Arc<dyn JournalFile>,
    last_lsn: u64,
    /// The checkpoint it ends with, to make the head once it is stored.
    head: Option<HeadUpdate>,
    /// Its place in the upload backlog.
    _slot: OwnedSemaphorePermit,
}

/// Uploads failing: the last error, and when the first one came.
struct Stall {
    why: String,
    since: std::time::Instant,
}

/// The background task that syncs sealed segments and puts them in the
/// store, in order, retrying while the store refuses them.
struct Uploads {
    queue: Mutex<Option<mpsc::UnboundedSender<Sealing>>>,
    /// Taken before a segment is sealed, released once it is stored.
    backlog: Arc<Semaphore>,
    /// Every record up to this LSN is in the store.
    stored_lsn: watch::Sender<u64>,
    /// Why uploads are failing, and since when, while they are.
    stalled: Mutex<Option<Stall>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What a checkpoint changes in the manifest.
#[derive(Clone, Copy)]
struct HeadUpdate {
    checkpoint: Entry,
    size: u64,
    replay_from_seg: u32,
    replay_from_lsn: u64,
}

impl HeadUpdate {
    fn apply(&self, m: &mut Manifest) {
        m.checkpoint = self.checkpoint;
        m.size = self.size;
        m.replay_from_seg = self.replay_from_seg;
        m.replay_from_lsn = self.replay_from_lsn;
        m.next_seg = m.next_seg.max(self.replay_from_seg + 1);
    }
}

struct Inner {
    backend: Backend,
    uuid: [u8; 16],
    block_size: u32,
    shift: u32,
    segment_size: u64,
    read_only: bool,
    size: AtomicU64,
    map: Mutex<MapState>,
    segments: Segments,
    writer: tokio::sync::Mutex<Writer>,
    /// The journal files FLUSH must sync.
    files: Mutex<OpenFiles>,
    uploads: Uploads,
    durability: Durability,
    store_wait: Duration,
    /// This writer's claim, once the manifest carries it.
    claim: Mutex<Option<WriterClaim>>,
    /// Room in the cache directory's limit for this writer's journal.
    journal_room: Mutex<Option<Reservation>>,
    /// Taken while writing a manifest, so that two never race for a number.
    manifest_turn: tokio::sync::Mutex<()>,
    sync_lock: tokio::sync::Mutex<()>,
    written_lsn: AtomicU64,
    durable_lsn: AtomicU64,
    failed: Mutex<Option<String>>,
    manifest: Mutex<Manifest>,
    lock: Mutex<Option<JournalLock>>,
    closed: AtomicBool,
}

/// An open volume. Cheap to clone; every clone is the same volume, and all
/// methods may be called from many tasks at once.
#[derive(Clone)]
pub struct Volume {
    inner: Arc<Inner>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A time (ms since the epoch) as `YYYY-MM-DD hh:mm:ss UTC`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Checks a snapshot name: printable, no separators the CLI or export names use.
pub fn validate_snapshot_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:+".contains(c));
    if ok {
        Ok(())
    } else {
        Err(VolumeError::InvalidArgument(format!(
            "invalid snapshot name {name:?}: use 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 - _ . : + (not starting with -)"
        )))
    }
}

/// Reads the newest manifest of the volume.
async fn latest_manifest(backend: &Backend) -> Result<Manifest> {
    let list = match backend.store.list("manifest/").await {
        Ok(l) => l,
        Err(StoreError::NotFound(_)) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let newest = list
        .iter()
        .filter_map(|b| parse_manifest_name(&b.name))
        .max();
    let Some(seq) = newest else {
        return Err(VolumeError::NotFound(backend.location.clone()));
    };
    let name = manifest_name(seq);
    let bytes = backend.store.get(&name).await?;
    let m = Manifest::decode(&bytes).map_err(|e| VolumeError::corrupt(format!("{name}: {e}")))?;
    if m.seq != seq {
        return Err(VolumeError::corrupt(format!(
            "{name}: says it is manifest {}",
            m.seq
        )));
    }
    Ok(m)
}

impl Volume {
    /// Creates an empty volume.
    pub async fn create(backend: &Backend, opts: &CreateOptions) -> Result<()> {
        let bs = opts.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(VolumeError::InvalidArgument(format!(
                "block size {bs} must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
            )));
        }
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&opts.segment_size) {
            return Err(VolumeError::InvalidArgument(format!(
                "segment size {} must be from {MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE} bytes",
                opts.segment_size
            )));
        }
        if opts.segment_size < 4 * bs as u64 {
            return Err(VolumeError::InvalidArgument(
                "segment size must hold at least 4 blocks".into(),
            ));
        }
        if opts.size > i64::MAX as u64 {
            return Err(VolumeError::InvalidArgument(format!(
                "size {} is too large",
                opts.size
            )));
        }
        match latest_manifest(backend).await {
            Err(VolumeError::NotFound(_)) => {}
            Ok(_) | Err(VolumeError::Corrupt(_)) => {
                return Err(VolumeError::AlreadyExists(backend.location.clone()))
            }
            Err(e) => return Err(e),
        }
        let now = now_ms();
        let m = Manifest {
            volume: *uuid::Uuid::new_v4().as_bytes(),
            seq: 1,
            written_ms: now,
            volume_created_ms: now,
            block_size: bs,
            segment_size: opts.segment_size,
            size: opts.size,
            checkpoint: Entry::EMPTY,
            replay_from_seg: 1,
            replay_from_lsn: 1,
            next_seg: 1,
            writer: None,
            snapshots: Vec::new(),
        };
        match backend
            .store
            .put_if_absent(&manifest_name(1), m.encode().into())
            .await
        {
            Ok(()) => Ok(()),
            Err(StoreError::AlreadyExists(_)) => {
                Err(VolumeError::AlreadyExists(backend.location.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Opens the volume for writing. Recovers from a crash if needed; fails
    /// with `Busy` if another writer holds it.
    pub async fn open(backend: Backend, opts: &OpenOptions) -> Result<Volume> {
        let lock = backend.journal.lock().map_err(|e| match e {
            StoreError::Locked { .. } => VolumeError::Busy(format!(
                "{} is already open for writing by another process on this host",
                backend.location
            )),
            e => e.into(),
        })?;
        let manifest = latest_manifest(&backend).await?;
        let site = backend.writer_site.clone();
        if let Some(w) = &manifest.writer {
            if w.host != site {
                return Err(VolumeError::Busy(format!(
                    "{} is open for writing by process {} on host {} (since {}); stop that writer first",
                    backend.location,
                    w.pid,
                    w.host,
                    utc(w.since_ms)
                )));
            }
            // Same host and we hold the journal lock: that writer is gone.
            tracing::warn!(volume = %backend.location, pid = w.pid, "taking over from a writer that did not close the volume");
        }
        let vol = Volume::load(backend, manifest, false, opts).await?;
        vol.recover().await?;
        *vol.inner.lock.lock() = Some(lock);
        let claim = WriterClaim {
            host: site,
            pid: std::process::id(),
            since_ms: now_ms(),
        };
        *vol.inner.claim.lock() = Some(claim.clone());
        let next_seg = vol.inner.writer.lock().await.seg + 1;
        vol.update_manifest(|m| {
            m.writer = Some(claim);
            m.next_seg = m.next_seg.max(next_seg);
        })
        .await?;
        if let Some(cache) = &vol.inner.backend.cache {
            // The open journal file and a full upload backlog, at most.
            let journal = (UPLOAD_BACKLOG_REMOTE as u64 + 1)
                * (vol.inner.segment_size + MAX_RECORD_BYTES as u64);
            *vol.inner.journal_room.lock() = Some(cache.reserve(journal));
        }
        vol.start_uploads();
        Ok(vol)
    }

    /// Opens an image read-only: the head (replaying unsealed writes in
    /// memory, writing nothing) or a snapshot.
    pub async fn open_read_only(
        backend: Backend,
        opts: &OpenOptions,
        view: View,
    ) -> Result<Volume> {
        let mut manifest = latest_manifest(&backend).await?;
        let snap = match &view {
            View::Head => None,
            View::Snapshot(name) => Some(
                manifest
                    .snapshots
                    .iter()
                    .find(|s| &s.name == name)
                    .cloned()
                    .ok_or_else(|| VolumeError::SnapshotNotFound(name.clone()))?,
            ),
            View::AsOf(t) => Some(
                manifest
                    .snapshots
                    .iter()
                    .filter(|s| s.created_ms <= *t)
                    .max_by_key(|s| (s.created_ms, s.lsn))
                    .cloned()
                    .ok_or_else(|| {
                        VolumeError::SnapshotNotFound(format!(
                            "(none taken at or before {})",
                            utc(*t)
                        ))
                    })?,
            ),
        };
        if let Some(s) = &snap {
            manifest.checkpoint = s.checkpoint;
        }
        if snap.is_some() {
            return Volume::load(backend, manifest, true, opts).await;
        }
        // The head of a volume a writer is using: its journal can be sealed
        // and removed while we read it. Start again from the newer manifest.
        let mut attempt = 1;
        loop {
            let vol = Volume::load(backend.clone(), manifest, true, opts).await?;
            match vol.recover().await {
                Err(VolumeError::Store(StoreError::NotFound(what)))
                    if attempt < HEAD_OPEN_ATTEMPTS =>
                {
                    tracing::debug!(%what, attempt, "the writer sealed a journal while we read it; retrying");
                    attempt += 1;
                    manifest = latest_manifest(&backend).await?;
                }
                result => return result.map(|()| vol),
            }
        }
    }

    /// Builds the in-memory volume from a manifest and its checkpoint.
    async fn load(
        backend: Backend,
        manifest: Manifest,
        read_only: bool,
        opts: &OpenOptions,
    ) -> Result<Volume> {
        let uuid = manifest.volume;
        let segments = Segments::new(backend.store.clone(), backend.cache.clone(), uuid);
        let (cp, cp_lsn) = if manifest.checkpoint.is_empty() {
            (
                Checkpoint {
                    root: Entry::EMPTY,
                    depth: depth_for(manifest.size.div_ceil(manifest.block_size as u64)),
                    size: manifest.size,
                    allocated_blocks: 0,
                    usage: Vec::new(),
                },
                0,
            )
        } else {
            read_checkpoint(&segments, manifest.checkpoint, &uuid).await?
        };
        let mut map = MapState::new(cp.root, cp.depth, opts.map_budget, manifest.block_size);
        map.set_accounting(cp.allocated_blocks, &cp.usage);
        let inner = Inner {
            uuid,
            block_size: manifest.block_size,
            shift: manifest.block_size.trailing_zeros(),
            segment_size: manifest.segment_size,
            read_only,
            size: AtomicU64::new(cp.size),
            map: Mutex::new(map),
            segments,
            writer: tokio::sync::Mutex::new(Writer {
                seg: manifest.next_seg,
                file: None,
                pos: 0,
                next_lsn: manifest.replay_from_lsn.max(cp_lsn + 1),
                changed: false,
                sealed_since_checkpoint: 0,
                bytes_since_checkpoint: 0,
                sealed_lsn: 0,
                closed: read_only,
            }),
            files: Mutex::new(OpenFiles::default()),
            uploads: Uploads {
                queue: Mutex::new(None),
                backlog: Arc::new(Semaphore::new(if backend.remote {
                    UPLOAD_BACKLOG_REMOTE
                } else {
                    UPLOAD_BACKLOG_LOCAL
                })),
                stored_lsn: watch::Sender::new(0),
                stalled: Mutex::new(None),
                task: Mutex::new(None),
            },
            durability: opts.durability,
            store_wait: opts.store_wait,
            claim: Mutex::new(None),
            journal_room: Mutex::new(None),
            manifest_turn: tokio::sync::Mutex::new(()),
            sync_lock: tokio::sync::Mutex::new(()),
            written_lsn: AtomicU64::new(0),
            durable_lsn: AtomicU64::new(0),
            failed: Mutex::new(None),
            manifest: Mutex::new(manifest),
            lock: Mutex::new(None),
            closed: AtomicBool::new(false),
            backend,
        };
        Ok(Volume {
            inner: Arc::new(inner),
        })
    }

    /// Replays the log after the head checkpoint. Writable opens then seal
    /// recovered journals and open one to append to.
    async fn recover(&self) -> Result<()> {
        let inner = &self.inner;
        let m = inner.manifest.lock().clone();
        // Journals first: a writer sealing meanwhile puts the segment in
        // the store before removing its journal, so it shows up in one list
        // or the other (or both), never in neither.
        let mut journals: Vec<u32> = inner
            .backend
            .journal
            .list()?
            .iter()
            .filter_map(|n| parse_journal_name(n))
            .collect();
        journals.sort_unstable();
        let store_segs: Vec<(u32, u64)> = inner
            .backend
            .store
            .list("segments/")
            .await?
            .into_iter()
            .filter_map(|b| parse_segment_name(&b.name).map(|id| (id, b.size)))
            .collect();
        let max_seen = store_segs
            .iter()
            .map(|(s, _)| *s)
            .chain(journals.iter().copied())
            .max()
            .unwrap_or(0);

        let mut w = inner.writer.lock().await;
        let from_lsn = m.replay_from_lsn;
        let mut expected = w.next_lsn;
        let replayed = || store_segs.iter().filter(|(id, _)| *id >= m.replay_from_seg);
        w.sealed_since_checkpoint = replayed().count() as u32;
        w.bytes_since_checkpoint = replayed().map(|(_, size)| size).sum();
        // Every segment since the checkpoint, in log order: stored ones must
        // be whole; in a journal, a torn or corrupt tail ends the log.
        // Uploads run in parallel, so a stored segment can follow one that
        // is still only in its journal.
        let mut ids: Vec<u32> = store_segs
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| *id >= m.replay_from_seg)
            .chain(journals.iter().copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        // (segment, file, valid length, LSN of its first record)
        let mut live_journals: Vec<(u32, Arc<dyn JournalFile>, u64, u64)> = Vec::new();
        let mut ended: Option<u32> = None;
        for id in ids {
            let name = journal_name(id);
            let stored = store_segs
                .iter()
                .find(|(s, _)| *s == id)
                .map(|(_, size)| *size);
            if let Some(size) = stored {
                if journals.contains(&id) && !inner.read_only {
                    // Sealed already; the crash came before the journal was removed.
                    inner.backend.journal.remove(&name)?;
                }
                if id < m.replay_from_seg {
                    continue;
                }
                if let Some(end) = ended {
                    return Err(VolumeError::corrupt(format!(
                        "{} is in the store, but the log ended in segment {end}",
                        segment_name(id)
                    )));
                }
                let reader = inner
                    .backend
                    .store
                    .clone()
                    .open_reader(&segment_name(id))
                    .await?;
                let mut scan = Scanner::new(ScanSource::Store(reader), size);
                loop {
                    match scan.next(&inner.uuid).await? {
                        Ok((off, h, payload)) => {
                            if h.lsn < from_lsn {
                                continue;
                            }
                            if h.lsn != expected {
                                return Err(VolumeError::corrupt(format!(
                                    "{} offset {off}: record LSN {} where {expected} was expected",
                                    segment_name(id),
                                    h.lsn
                                )));
                            }
                            self.apply(id, off, &h, &payload).await?;
                            expected += 1;
                        }
                        Err(ScanStop::End) => break,
                        Err(ScanStop::Invalid { offset, reason }) => {
                            return Err(VolumeError::corrupt(format!(
                                "{} offset {offset}: {reason}",
                                segment_name(id)
                            )));
                        }
                    }
                }
                continue;
            }
            if ended.is_some() || id < m.replay_from_seg {
                if !inner.read_only {
                    tracing::warn!(journal = %name, "dropping journal beyond the end of the recovered log");
                    inner.backend.journal.remove(&name)?;
                }
                continue;
            }
            let (source, file, len) = match inner.backend.journal.open(&name) {
                Ok(file) => {
                    inner.segments.add_journal(id, file.clone());
                    let len = file.len()?;
                    (ScanSource::Journal(file.clone()), Some(file), len)
                }
                // A live writer stored it since the listing: it is whole
                // in the store now.
                Err(StoreError::NotFound(_)) if inner.read_only => {
                    let store = inner.backend.store.clone();
                    let reader = store.open_reader(&segment_name(id)).await?;
                    let size = reader.size();
                    (ScanSource::Store(reader), None, size)
                }
                Err(e) => return Err(e.into()),
            };
            let first_lsn = expected;
            let mut scan = Scanner::new(source, len);
            let valid_len = loop {
                match scan.next(&inner.uuid).await? {
                    Ok((off, h, payload)) => {
                        if h.lsn < from_lsn {
                            continue;
                        }
                        if h.lsn != expected {
                            ended = Some(id);
                            break off;
                        }
                        self.apply(id, off, &h, &payload).await?;
                        expected += 1;
                    }
                    Err(ScanStop::End) => break len,
                    Err(ScanStop::Invalid { offset, reason }) => {
                        tracing::warn!(journal = %name, offset, %reason, "log ends at a torn or corrupt record");
                        ended = Some(id);
                        break offset;
                    }
                }
            };
            if let Some(file) = file {
                live_journals.push((id, file, valid_len, first_lsn));
            }
        }
        w.next_lsn = expected;
        inner.written_lsn.store(expected - 1, Ordering::SeqCst);
        inner.durable_lsn.store(expected - 1, Ordering::SeqCst);
        if inner.read_only {
            return Ok(());
        }
        // Keep appending to the last journal if nothing stored follows it;
        // seal the others.
        let after_all_stored = |id: u32| store_segs.iter().all(|(s, _)| *s < id);
        let last = match live_journals.last() {
            Some(j) if after_all_stored(j.0) => live_journals.pop(),
            _ => None,
        };
        for (id, file, valid_len, _) in live_journals {
            file.truncate(valid_len)?;
            self.hand_to_store(id, &file).await?;
            self.retire_journal(id, valid_len);
            w.sealed_since_checkpoint += 1;
            w.bytes_since_checkpoint += valid_len;
        }
        // Everything before the journal kept for appending is in the store.
        let stored = last.as_ref().map_or(expected, |j| j.3) - 1;
        w.sealed_lsn = stored;
        inner.uploads.stored_lsn.send_replace(stored);
        match last {
            Some((id, file, valid_len, _)) => {
                // Replayed writes may have been acknowledged but never
                // flushed: make them durable before anyone relies on that.
                if file.len()? != valid_len {
                    file.truncate(valid_len)?;
                } else {
                    file.sync()?;
                }
                w.seg = id;
                w.pos = valid_len;
                w.file = Some(file.clone());
                inner.files.lock().current = Some(file);
            }
            None => {
                let id = m.next_seg.max(max_seen + 1);
                self.start_journal(&mut w, id)?;
            }
        }
        w.changed = expected > from_lsn;
        Ok(())
    }

    fn start_journal(&self, w: &mut Writer, id: u32) -> Result<()> {
        let file = self.inner.backend.journal.create(&journal_name(id))?;
        self.inner.segments.add_journal(id, file.clone());
        w.seg = id;
        w.pos = 0;
        w.file = Some(file.clone());
        self.inner.files.lock().current = Some(file);
        Ok(())
    }

    /// Applies one replayed record to the map.
    async fn apply(
        &self,
        seg: u32,
        off: u64,
        h: &hlfs_format::RecordHeader,
        payload: &[u8],
    ) -> Result<()> {
        let bs = self.inner.block_size as u64;
        let blocks = self.size().div_ceil(bs);
        let at = || format!("{} offset {off}", segment_name(seg));
        match h.kind {
            RecordKind::Data => {
                if h.payload_len as u64 != h.arg1.saturating_mul(bs) || h.arg0 + h.arg1 > blocks {
                    return Err(VolumeError::corrupt(format!(
                        "{}: data record does not fit the volume",
                        at()
                    )));
                }
                let base = off + HEADER_LEN as u64;
                let entries: Vec<Entry> = payload
                    .chunks(bs as usize)
                    .enumerate()
                    .map(|(i, block)| Entry {
                        seg,
                        off: (base + i as u64 * bs) as u32,
                        crc: crc32c::crc32c(block),
                    })
                    .collect();
                self.map_op(|m, pins| m.set(h.arg0, &entries, pins)).await
            }
            RecordKind::Zero => {
                if h.arg0 + h.arg1 > blocks {
                    return Err(VolumeError::corrupt(format!(
                        "{}: zero record beyond the volume",
                        at()
                    )));
                }
                self.map_op(|m, pins| m.zero(h.arg0, h.arg0 + h.arg1, pins))
                    .await
            }
            RecordKind::Resize => {
                if h.arg0 < self.size() || h.arg0 > i64::MAX as u64 {
                    return Err(VolumeError::corrupt(format!(
                        "{}: resize record shrinks the volume",
                        at()
                    )));
                }
                self.inner.size.store(h.arg0, Ordering::SeqCst);
                self.inner.map.lock().grow_to(h.arg0.div_ceil(bs));
                Ok(())
            }
            RecordKind::MapPage | RecordKind::Checkpoint => Ok(()),
        }
    }

    /// Runs a map operation, loading the clean pages it finds missing.
    async fn map_op<T>(
        &self,
        mut op: impl FnMut(&mut MapState, &Pins) -> MapResult<T>,
    ) -> Result<T> {
        let mut pins = Pins::new();
        loop {
            let result = op(&mut self.inner.map.lock(), &pins);
            match result {
                Ok(v) => return Ok(v),
                Err(Missing(at)) => {
                    let page =
                        Arc::new(read_page(&self.inner.segments, at, &self.inner.uuid).await?);
                    self.inner.map.lock().insert_clean(at, page.clone());
                    pins.insert(at, page);
                }
            }
        }
    }

    pub fn size(&self) -> u64 {
        self.inner.size.load(Ordering::SeqCst)
    }

    pub fn block_size(&self) -> u32 {
        self.inner.block_size
    }

    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    pub fn location(&self) -> &str {
        &self.inner.backend.location
    }

    pub fn allocated_bytes(&self) -> u64 {
        self.inner.map.lock().allocated_blocks() * self.inner.block_size as u64
    }

    /// Map pages in memory now and the most allowed.
    pub fn map_pages(&self) -> (usize, usize) {
        let m = self.inner.map.lock();
        (m.cached_pages(), m.budget_pages())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(VolumeError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.inner.read_only {
            return Err(VolumeError::ReadOnly);
        }
        if let Some(why) = self.inner.failed.lock().clone() {
            return Err(VolumeError::Failed(why));
        }
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(VolumeError::Closed);
        }
        Ok(())
    }

    /// Stops all further writes after an error that leaves the journal's
    /// state unknown.
    fn fail(&self, err: VolumeError) -> VolumeError {
        let mut failed = self.inner.failed.lock();
        if failed.is_none() {
            tracing::error!(volume = %self.location(), error = %err, "volume failed; refusing further writes");
            *failed = Some(err.to_string());
        }
        err
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        // Cached data is read inline without awaiting anything, so a task
        // looping on reads would never give its thread to others: yield
        // once the task's cooperative budget is spent.
        tokio::task::coop::consume_budget().await;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let shift = self.inner.shift;
        let bs = self.inner.block_size as u64;
        let first = offset >> shift;
        let end = offset + buf.len() as u64;
        let last = (end - 1) >> shift;
        let mut entries = vec![Entry::EMPTY; (last - first + 1) as usize];
        self.map_op(|m, pins| m.lookup(first, &mut entries, pins))
            .await?;
        let mut i = 0;
        while i < entries.len() {
            // One read per run of blocks stored back to back.
            let e = entries[i];
            let mut n = 1;
            while i + n < entries.len()
                && !e.is_empty()
                && entries[i + n].seg == e.seg
                && entries[i + n].off as u64 == e.off as u64 + n as u64 * bs
            {
                n += 1;
            }
            let run_start = (first + i as u64) * bs;
            let lo = run_start.max(offset);
            let hi = (run_start + n as u64 * bs).min(end);
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            if e.is_empty() {
                dst.fill(0);
            } else {
                let run_len = n * bs as usize;
                let aligned = lo == run_start && dst.len() == run_len;
                // Whole blocks are read straight into the caller's buffer;
                // a partial first or last block goes through a bounce buffer.
                let mut bounce = Vec::new();
                let data: &mut [u8] = if aligned {
                    dst
                } else {
                    bounce.resize(run_len, 0);
                    &mut bounce
                };
                let verify = |data: &[u8]| {
                    for (k, block) in data.chunks(bs as usize).enumerate() {
                        if crc32c::crc32c(block) != entries[i + k].crc {
                            return Err(VolumeError::corrupt(format!(
                                "block {} ({} offset {}): checksum mismatch",
                                first + (i + k) as u64,
                                segment_name(e.seg),
                                e.off as u64 + k as u64 * bs
                            )));
                        }
                    }
                    Ok(())
                };
                self.inner
                    .segments
                    .read_verified(e.seg, e.off as u64, data, verify)
                    .await?;
                if !aligned {
                    let skip = (lo - run_start) as usize;
                    dst.copy_from_slice(&bounce[skip..skip + dst.len()]);
                }
            }
            i += n;
        }
        Ok(())
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_into(offset, &mut buf).await?;
        Ok(buf)
    }

    /// Which parts of the volume from `offset` hold data and which are holes,
    /// as maximal runs covering at most `len` bytes. The answer stops early
    /// once it has `limit` runs; ask again from where it ends. Empty
    /// subtrees of the map are skipped whole, so a huge hole costs one step.
    pub async fn extents(&self, offset: u64, len: u64, limit: usize) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let bs = self.inner.block_size as u64;
        let end = offset + len;
        let end_block = end.div_ceil(bs);
        // Blocks first..last_excl as a run, clipped to the asked range.
        let push = |out: &mut Vec<Extent>, first: u64, last_excl: u64, data: bool| {
            let lo = (first * bs).max(offset);
            let hi = (last_excl * bs).min(end);
            match out.last_mut() {
                Some(x) if x.data == data && x.offset + x.len == lo => x.len += hi - lo,
                _ => out.push(Extent {
                    offset: lo,
                    len: hi - lo,
                    data,
                }),
            }
        };
        let mut lba = offset / bs;
        let mut entries = vec![Entry::EMPTY; 512];
        let mut runs = 0;
        while lba < end_block && runs < limit {
            let next = self.map_op(|m, pins| m.next_present(lba, pins)).await?;
            let Some(leaf_start) = next.filter(|&s| s < end_block) else {
                push(&mut out, lba, end_block, false);
                break;
            };
            let start = leaf_start.max(lba);
            if start > lba {
                push(&mut out, lba, start, false);
            }
            let stop = ((start / 512 + 1) * 512).min(end_block);
            let n = (stop - start) as usize;
            self.map_op(|m, pins| m.lookup(start, &mut entries[..n], pins))
                .await?;
            for (k, e) in entries[..n].iter().enumerate() {
                push(
                    &mut out,
                    start + k as u64,
                    start + k as u64 + 1,
                    !e.is_empty(),
                );
            }
            lba = stop;
            runs = out.len();
        }
        Ok(out)
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        tokio::task::coop::consume_budget().await;
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let mut w = self.inner.writer.lock().await;
        self.check_writable()?;
        // Again under the lock: a rollback may have shrunk the volume.
        self.check_range(offset, data.len() as u64)?;
        self.make_room(&mut w).await?;
        let bs = self.inner.block_size as u64;
        let end = offset + data.len() as u64;
        let per_record = (MAX_RECORD_BYTES as u64 / bs).max(1);
        let mut block = offset / bs;
        let end_block = end.div_ceil(bs);
        while block < end_block {
            let n = per_record.min(end_block - block);
            let lo = (block * bs).max(offset);
            let hi = ((block + n) * bs).min(end);
            let src = &data[(lo - offset) as usize..(hi - offset) as usize];
            self.write_blocks(&mut w, block, n, lo - block * bs, src)
                .await?;
            // Per record, so a large write fills segments of the usual size.
            self.after_append(&mut w).await?;
            block += n;
        }
        Ok(())
    }

    /// Writes and returns only once the data is durable.
    pub async fn write_fua(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write(offset, data).await?;
        self.flush().await
    }

    /// Appends one data record for blocks `first..first+n`, whose bytes from
    /// `skip` on are `src` and the rest are kept from what is there now.
    async fn write_blocks(
        &self,
        w: &mut Writer,
        first: u64,
        n: u64,
        skip: u64,
        src: &[u8],
    ) -> Result<()> {
        let bs = self.inner.block_size as usize;
        let len = n as usize * bs;
        let tail = skip as usize + src.len();
        // Whole blocks are written as they came; partial ones are merged
        // with what is there now.
        let mut merged = Vec::new();
        let payload: &[u8] = if skip == 0 && src.len() == len {
            src
        } else {
            merged.resize(len, 0);
            if skip > 0 {
                self.read_old_block(first, &mut merged[..bs]).await?;
            }
            if tail < len && !(n == 1 && skip > 0) {
                self.read_old_block(first + n - 1, &mut merged[len - bs..])
                    .await?;
            }
            merged[skip as usize..tail].copy_from_slice(src);
            &merged
        };
        let crcs: Vec<u32> = payload.chunks(bs).map(crc32c::crc32c).collect();
        let header = encode_header(
            RecordKind::Data,
            &self.inner.uuid,
            w.next_lsn,
            first,
            n,
            payload,
        );
        let at = self.append(w, &[&header, payload])?;
        let base = at + HEADER_LEN as u64;
        let seg = w.seg;
        let entries: Vec<Entry> = crcs
            .iter()
            .enumerate()
            .map(|(i, &crc)| Entry {
                seg,
                off: (base + (i * bs) as u64) as u32,
                crc,
            })
            .collect();
        w.changed = true;
        self.map_op(|m, pins| m.set(first, &entries, pins)).await
    }

    /// The current contents of one block, for read-modify-write. Only the
    /// part inside the volume is read; the rest of a last partial block
    /// stays zero.
    async fn read_old_block(&self, block: u64, dst: &mut [u8]) -> Result<()> {
        let start = block * self.inner.block_size as u64;
        let readable = (self.size() - start).min(dst.len() as u64) as usize;
        self.read_into(start, &mut dst[..readable]).await
    }

    /// Appends a complete record, given in parts (header, payload), at the
    /// end of the open segment.
    fn append(&self, w: &mut Writer, parts: &[&[u8]]) -> Result<u64> {
        let file = w.file.as_ref().ok_or(VolumeError::Closed)?;
        let at = w.pos;
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if at + len > u32::MAX as u64 {
            return Err(VolumeError::InvalidArgument("segment overflow".into()));
        }
        file.write_parts_at(at, parts)
            .map_err(|e| self.fail(e.into()))?;
        w.pos += len;
        if at / WRITEBACK_CHUNK != w.pos / WRITEBACK_CHUNK {
            let chunk = w.pos / WRITEBACK_CHUNK - 1;
            if let Err(e) = file.start_writeback(chunk * WRITEBACK_CHUNK, WRITEBACK_CHUNK) {
                tracing::debug!(error = %e, "early writeback hint failed");
            }
        }
        self.inner.written_lsn.store(w.next_lsn, Ordering::SeqCst);
        w.next_lsn += 1;
        Ok(at)
    }

    /// Seals a segment left full by an earlier append whose seal failed (the
    /// store was away), before appending more: the journal never grows
    /// past a segment (and a record) while uploads are stalled.
    async fn make_room(&self, w: &mut Writer) -> Result<()> {
        if w.pos >= self.inner.segment_size {
            self.seal_in_background(w).await?;
        }
        Ok(())
    }

    /// Housekeeping after appending: write back map pages under memory
    /// pressure, seal a full segment.
    async fn after_append(&self, w: &mut Writer) -> Result<()> {
        if self.inner.map.lock().needs_writeback() {
            self.write_back(w).await?;
        }
        if w.pos >= self.inner.segment_size {
            self.seal_in_background(w).await?;
        }
        Ok(())
    }

    /// Writes every dirty map page to the log, bottom-up. Under memory
    /// pressure this is what bounds the map: scattered writes dirty about as
    /// many inner pages as leaves, so writing back leaves alone would not.
    async fn write_back(&self, w: &mut Writer) -> Result<()> {
        loop {
            let next = self.inner.map.lock().next_dirty();
            let Some((level, index, page)) = next else {
                return Ok(());
            };
            let at = if page.is_empty() {
                Entry::EMPTY
            } else {
                let record = encode_record(
                    RecordKind::MapPage,
                    &self.inner.uuid,
                    w.next_lsn,
                    level as u64,
                    index,
                    &page.encode(),
                );
                let crc = crc_of_record(&record);
                let off = self.append(w, &[&record])?;
                Entry {
                    seg: w.seg,
                    off: off as u32,
                    crc,
                }
            };
            self.inner.map.lock().written_back(level, index, at);
        }
    }

    /// Appends every dirty map page and a checkpoint record describing the
    /// map now; returns where the checkpoint is, its LSN and its contents.
    async fn append_checkpoint(&self, w: &mut Writer) -> Result<(Entry, u64, Checkpoint)> {
        self.write_back(w).await?;
        let cp = {
            let m = self.inner.map.lock();
            Checkpoint {
                root: m.root(),
                depth: m.depth(),
                size: self.size(),
                allocated_blocks: m.allocated_blocks(),
                usage: m.usage(),
            }
        };
        let cp_lsn = w.next_lsn;
        let record = encode_record(
            RecordKind::Checkpoint,
            &self.inner.uuid,
            cp_lsn,
            0,
            0,
            &cp.encode(),
        );
        let crc = crc_of_record(&record);
        let off = self.append(w, &[&record])?;
        let at = Entry {
            seg: w.seg,
            off: off as u32,
            crc,
        };
        Ok((at, cp_lsn, cp))
    }

    /// Writes a checkpoint and seals the open segment with it, then writes
    /// the manifest that makes the checkpoint the head (changed by `edit`,
    /// which gets the checkpoint's place and LSN), all before returning.
    /// Starts a new journal unless `reopen` is false.
    async fn checkpoint(
        &self,
        w: &mut Writer,
        reopen: bool,
        edit: impl FnOnce(&mut Manifest, Entry, u64),
    ) -> Result<()> {
        let slot = self.upload_slot().await?;
        let (cp_at, cp_lsn, cp) = self.append_checkpoint(w).await?;
        let sealing = self.rotate(w, reopen, slot, None)?;
        let last_lsn = sealing.last_lsn;
        self.queue_upload(sealing)?;
        // The manifest may only name a checkpoint that is in the store.
        self.wait_stored(last_lsn).await?;
        let head = HeadUpdate {
            checkpoint: cp_at,
            size: cp.size,
            replay_from_seg: w.seg,
            replay_from_lsn: w.next_lsn,
        };
        self.update_manifest(|m| {
            head.apply(m);
            edit(m, cp_at, cp_lsn);
        })
        .await?;
        w.changed = false;
        w.sealed_since_checkpoint = 0;
        w.bytes_since_checkpoint = 0;
        Ok(())
    }

    /// Seals the open segment without stopping writes for long: it is
    /// switched for a new journal here (with a checkpoint when one is due),
    /// and synced, put in the store and made the head in the background.
    /// Waits while the upload backlog is full, which keeps writers from
    /// outrunning the disk and the store.
    async fn seal_in_background(&self, w: &mut Writer) -> Result<()> {
        let slot = self.upload_slot().await?;
        let due = w.bytes_since_checkpoint + w.pos >= CHECKPOINT_EVERY * self.inner.segment_size
            || w.sealed_since_checkpoint + 1 >= MAX_SEGMENTS_BETWEEN_CHECKPOINTS;
        let head = if due {
            let (cp_at, _, cp) = self.append_checkpoint(w).await?;
            Some((cp_at, cp.size))
        } else {
            None
        };
        let head = head.map(|(checkpoint, size)| HeadUpdate {
            checkpoint,
            size,
            replay_from_seg: w.seg + 1,
            replay_from_lsn: w.next_lsn,
        });
        let checkpointed = head.is_some();
        let sealing = self.rotate(w, true, slot, head)?;
        if checkpointed {
            // Recovery starts after this segment.
            w.changed = false;
            w.sealed_since_checkpoint = 0;
            w.bytes_since_checkpoint = 0;
        }
        self.queue_upload(sealing)
    }

    /// How long to wait for the store now: `store_wait`, less what an
    /// ongoing stall has lasted, so that once the store has been away that
    /// long, callers queued behind one another fail at once instead of each
    /// waiting in turn.
    fn patience(&self) -> Duration {
        match &*self.inner.uploads.stalled.lock() {
            Some(stall) => self.inner.store_wait.saturating_sub(stall.since.elapsed()),
            None => self.inner.store_wait,
        }
    }

    /// A place in the upload backlog, waiting at most `patience` for one.
    async fn upload_slot(&self) -> Result<OwnedSemaphorePermit> {
        let backlog = self.inner.uploads.backlog.clone();
        match tokio::time::timeout(self.patience(), backlog.acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err(_)) => Err(VolumeError::Closed),
            Err(_) => Err(self.store_stalled()),
        }
    }

    /// The error for a write or flush that waited `store_wait` for the store.
    fn store_stalled(&self) -> VolumeError {
        if let Err(e) = self.check_not_failed() {
            return e;
        }
        let why = self.inner.uploads.stalled.lock().as_ref().map_or_else(
            || "uploads are slower than writes".into(),
            |s| s.why.clone(),
        );
        VolumeError::Unavailable(format!(
            "{}: the store has not taken the sealed segments for {} s ({why}); what was flushed is safe in the local journal, and uploads go on",
            self.location(),
            self.inner.store_wait.as_secs()
        ))
    }

    fn queue_upload(&self, sealing: Sealing) -> Result<()> {
        let queue = self.inner.uploads.queue.lock();
        let sent = queue.as_ref().map(|q| q.send(sealing));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => {
                self.check_not_failed()?;
                Err(VolumeError::Closed)
            }
        }
    }

    /// Waits until every record up to `lsn` is in the store, at most
    /// `store_wait`.
    async fn wait_stored(&self, lsn: u64) -> Result<()> {
        let mut stored = self.inner.uploads.stored_lsn.subscribe();
        let failed = || self.inner.failed.lock().is_some();
        let reached = async { stored.wait_for(|&s| s >= lsn || failed()).await.map(|_| ()) };
        match tokio::time::timeout(self.patience(), reached).await {
            Ok(Ok(_)) => self.check_not_failed(),
            Ok(Err(_)) => Err(VolumeError::Closed),
            Err(_) => Err(self.store_stalled()),
        }
    }

    /// Starts the task that puts sealed segments in the store.
    fn start_uploads(&self) {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.inner.uploads.queue.lock() = Some(tx);
        let weak = Arc::downgrade(&self.inner);
        let parallel = match self.inner.backend.remote {
            true => PARALLEL_UPLOADS_REMOTE,
            false => 1,
        };
        let task = tokio::spawn(run_uploads(weak, rx, parallel));
        *self.inner.uploads.task.lock() = Some(task);
    }

    /// Syncs a sealed journal file before its upload. Files are synced in
    /// log order, so what is durable stays a prefix of the log.
    async fn sync_sealed(&self, sealing: &Sealing) -> Result<()> {
        // Syncs of one file take turns with FLUSH: the kernel reports a
        // writeback error to one fsync only, and whoever sees it must stop
        // the volume before the other can report success.
        let _turn = self.inner.sync_lock.lock().await;
        self.check_not_failed()?;
        self.sync_file(sealing.file.clone()).await?;
        self.inner
            .durable_lsn
            .fetch_max(sealing.last_lsn, Ordering::SeqCst);
        Ok(())
    }

    /// fdatasyncs a journal file off the runtime. A failure stops the
    /// volume even if the caller has gone (a cancelled FLUSH): the kernel
    /// reports a writeback error once, and the next sync would succeed.
    async fn sync_file(&self, file: Arc<dyn JournalFile>) -> Result<()> {
        let vol = self.clone();
        tokio::task::spawn_blocking(move || file.sync().map_err(|e| vol.fail(e.into())))
            .await
            .map_err(|e| self.fail(VolumeError::Failed(e.to_string())))?
    }

    /// Once a segment is in the store (and every one before it): switches
    /// its reads away from the journal and makes its checkpoint, if any,
    /// the head.
    async fn after_upload(&self, sealing: Sealing) -> Result<()> {
        let len = sealing.file.len().map_err(|e| self.fail(e.into()))?;
        self.retire_journal(sealing.seg, len);
        self.inner
            .files
            .lock()
            .retiring
            .retain(|f| !Arc::ptr_eq(f, &sealing.file));
        if let Some(head) = sealing.head {
            let volume = Arc::downgrade(&self.inner);
            retrying(&volume, "writing the manifest", |vol| async move {
                vol.update_manifest(|m| head.apply(m)).await
            })
            .await?;
        }
        *self.inner.uploads.stalled.lock() = None;
        self.inner
            .uploads
            .stored_lsn
            .send_modify(|s| *s = (*s).max(sealing.last_lsn));
        Ok(())
    }

    /// A stored segment's journal file is no longer needed: it becomes the
    /// read cache's copy of the segment where there is one, else it goes.
    fn retire_journal(&self, seg: u32, len: u64) {
        let name = journal_name(seg);
        let adopted = match self.inner.backend.journal.local_path(&name) {
            Some(path) => self.inner.segments.adopt(seg, &path, len),
            None => false,
        };
        self.inner.segments.sealed(seg);
        if !adopted {
            // The segment is safe in the store; a leftover journal file is
            // removed by the next recovery.
            if let Err(e) = self.inner.backend.journal.remove(&name) {
                tracing::warn!(error = %e, "could not remove the journal of a stored segment");
            }
        }
    }

    fn check_not_failed(&self) -> Result<()> {
        match self.inner.failed.lock().clone() {
            Some(why) => Err(VolumeError::Failed(why)),
            None => Ok(()),
        }
    }

    /// Retires the open journal file (it stays readable, and FLUSH keeps
    /// syncing it until it is stored) and opens the next one unless `reopen`
    /// is false.
    fn rotate(
        &self,
        w: &mut Writer,
        reopen: bool,
        slot: OwnedSemaphorePermit,
        head: Option<HeadUpdate>,
    ) -> Result<Sealing> {
        let file = w.file.take().ok_or(VolumeError::Closed)?;
        let sealing = Sealing {
            seg: w.seg,
            file: file.clone(),
            last_lsn: w.next_lsn - 1,
            head,
            _slot: slot,
        };
        self.inner.files.lock().retiring.push(file);
        w.sealed_since_checkpoint += 1;
        w.bytes_since_checkpoint += w.pos;
        w.sealed_lsn = sealing.last_lsn;
        if reopen {
            self.start_journal(w, sealing.seg + 1)
                .map_err(|e| self.fail(e))?;
        } else {
            w.seg = sealing.seg + 1;
            w.pos = 0;
            self.inner.files.lock().current = None;
        }
        Ok(sealing)
    }

    /// Puts a synced journal file into the store as a sealed segment.
    async fn hand_to_store(&self, id: u32, file: &Arc<dyn JournalFile>) -> Result<()> {
        let name = segment_name(id);
        let store = &self.inner.backend.store;
        let put = match self.inner.backend.journal.local_path(&journal_name(id)) {
            Some(path) => store.put_file_if_absent(&name, &path).await,
            None => {
                let len = file.len()?;
                let data = file.read_at(0, len as usize)?;
                store.put_if_absent(&name, data.into()).await
            }
        };
        match put {
            Ok(()) => Ok(()),
            Err(StoreError::AlreadyExists(_)) => {
                // An earlier attempt may have landed though its answer was
                // lost; then the stored bytes are ours.
                let len = file.len()?;
                let ours = file.read_at(0, len as usize)?;
                let stored = store.get(&name).await?;
                if stored[..] == ours[..] {
                    return Ok(());
                }
                Err(VolumeError::Fenced(format!(
                    "{name} already exists in {}: another writer has taken over the volume",
                    self.location()
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the next manifest: the current one changed by `edit`. Fails
    /// (and stops the volume) if another writer wrote one first.
    async fn update_manifest(&self, edit: impl FnOnce(&mut Manifest)) -> Result<()> {
        // A background seal and a snapshot command may both write one.
        let _turn = self.inner.manifest_turn.lock().await;
        self.check_not_failed()?;
        let mut m = self.inner.manifest.lock().clone();
        edit(&mut m);
        m.seq += 1;
        m.written_ms = now_ms();
        let name = manifest_name(m.seq);
        let bytes = m.encode();
        let store = &self.inner.backend.store;
        match store.put_if_absent(&name, bytes.clone().into()).await {
            Ok(()) => {
                *self.inner.manifest.lock() = m;
                Ok(())
            }
            Err(StoreError::AlreadyExists(_)) => {
                // A write whose answer was lost may have landed: this one
                // (retried by the store client), or an earlier one. Either
                // carries our claim; another writer's does not.
                let stored = store.get(&name).await?;
                if stored[..] == bytes[..] {
                    *self.inner.manifest.lock() = m;
                    return Ok(());
                }
                let claim = self.inner.claim.lock().clone();
                match Manifest::decode(&stored) {
                    Ok(earlier) if claim.is_some() && earlier.writer == claim => {
                        tracing::info!(manifest = %name, "an earlier manifest write had landed");
                        *self.inner.manifest.lock() = earlier;
                        Err(VolumeError::Store(StoreError::Other(format!(
                            "{name} was written by an earlier attempt whose answer was lost; try again"
                        ))))
                    }
                    _ => Err(self.fail(VolumeError::Fenced(format!(
                        "{name} was written by another writer: {} has been taken over",
                        self.location()
                    )))),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Makes every acknowledged write durable: in the local journal (one
    /// sync serves every write appended before it started), and with remote
    /// durability in the store too.
    pub async fn flush(&self) -> Result<()> {
        if self.inner.read_only {
            return Ok(());
        }
        self.check_not_failed()?;
        let target = self.inner.written_lsn.load(Ordering::SeqCst);
        self.sync_journal(target).await?;
        if self.inner.durability == Durability::Remote {
            self.flush_to_store(target).await?;
        }
        Ok(())
    }

    async fn sync_journal(&self, target: u64) -> Result<()> {
        if self.inner.durable_lsn.load(Ordering::SeqCst) >= target {
            return Ok(());
        }
        let _turn = self.inner.sync_lock.lock().await;
        self.check_not_failed()?;
        if self.inner.durable_lsn.load(Ordering::SeqCst) >= target {
            return Ok(());
        }
        // Read the LSN before taking the files: every record up to it is in
        // one of them, or in a segment whose sealing already synced it.
        let upto = self.inner.written_lsn.load(Ordering::SeqCst);
        let files = self.inner.files.lock().in_log_order();
        // Older files first, so what is durable is always a prefix.
        for file in files {
            self.sync_file(file).await?;
        }
        self.inner.durable_lsn.fetch_max(upto, Ordering::SeqCst);
        Ok(())
    }

    /// Seals the open segment if it holds records up to `target`, and waits
    /// until they are in the store. Concurrent flushes share one seal.
    async fn flush_to_store(&self, target: u64) -> Result<()> {
        if *self.inner.uploads.stored_lsn.borrow() >= target {
            return Ok(());
        }
        {
            let mut w = self.inner.writer.lock().await;
            self.check_not_failed()?;
            if w.sealed_lsn < target && w.pos > 0 {
                self.seal_in_background(&mut w).await?;
            }
        }
        self.wait_stored(target).await
    }

    /// Makes `offset..offset+len` read as zeros and releases its space.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut w = self.inner.writer.lock().await;
        self.check_writable()?;
        // Again under the lock: a rollback may have shrunk the volume.
        self.check_range(offset, len)?;
        self.make_room(&mut w).await?;
        let bs = self.inner.block_size as u64;
        let size = self.size();
        let end = offset + len;
        // The volume's last partial block counts as whole: nothing past the
        // end is visible.
        let full_end = if end == size {
            end.div_ceil(bs)
        } else {
            end / bs
        };
        let full_start = offset.div_ceil(bs);
        if full_start < full_end {
            let head_end = (full_start * bs).min(end);
            if offset < head_end {
                self.write_zero_bytes(&mut w, offset, head_end).await?;
            }
            let tail_start = full_end * bs;
            if tail_start < end {
                self.write_zero_bytes(&mut w, tail_start, end).await?;
            }
            let lsn = w.next_lsn;
            let header = encode_header(
                RecordKind::Zero,
                &self.inner.uuid,
                lsn,
                full_start,
                full_end - full_start,
                &[],
            );
            self.append(&mut w, &[&header])?;
            w.changed = true;
            self.map_op(|m, pins| m.zero(full_start, full_end, pins))
                .await?;
        } else {
            self.write_zero_bytes(&mut w, offset, end).await?;
        }
        self.after_append(&mut w).await
    }

    /// Trim: the range reads as zeros afterwards and holds no space.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len).await
    }

    /// Zeros within at most two partial blocks, by read-modify-write.
    async fn write_zero_bytes(&self, w: &mut Writer, lo: u64, hi: u64) -> Result<()> {
        let bs = self.inner.block_size as u64;
        let zeros = vec![0u8; (hi - lo) as usize];
        let mut block = lo / bs;
        while block * bs < hi {
            let b_lo = (block * bs).max(lo);
            let b_hi = ((block + 1) * bs).min(hi);
            self.write_blocks(
                w,
                block,
                1,
                b_lo - block * bs,
                &zeros[(b_lo - lo) as usize..(b_hi - lo) as usize],
            )
            .await?;
            block += 1;
        }
        Ok(())
    }

    /// Grows the volume to `new_size` bytes; the new space reads as zeros.
    pub async fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let mut w = self.inner.writer.lock().await;
        self.check_writable()?;
        self.make_room(&mut w).await?;
        let size = self.size();
        if new_size < size {
            return Err(VolumeError::InvalidArgument(format!(
                "cannot shrink the volume from {size} to {new_size} bytes"
            )));
        }
        if new_size > i64::MAX as u64 {
            return Err(VolumeError::InvalidArgument(format!(
                "size {new_size} is too large"
            )));
        }
        if new_size == size {
            return Ok(());
        }
        let lsn = w.next_lsn;
        let header = encode_header(RecordKind::Resize, &self.inner.uuid, lsn, new_size, 0, &[]);
        self.append(&mut w, &[&header])?;
        w.changed = true;
        self.inner.size.store(new_size, Ordering::SeqCst);
        self.inner
            .map
            .lock()
            .grow_to(new_size.div_ceil(self.inner.block_size as u64));
        self.after_append(&mut w).await
    }

    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.inner
            .manifest
            .lock()
            .snapshots
            .iter()
            .map(SnapshotInfo::from)
            .collect()
    }

    fn find_snapshot(&self, name: &str) -> Option<SnapshotEntry> {
        let manifest = self.inner.manifest.lock();
        manifest.snapshots.iter().find(|s| s.name == name).cloned()
    }

    /// Takes a snapshot holding every write acknowledged before the call.
    pub async fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo> {
        validate_snapshot_name(name)?;
        self.check_writable()?;
        let mut w = self.inner.writer.lock().await;
        self.check_writable()?;
        if self.find_snapshot(name).is_some() {
            return Err(VolumeError::SnapshotExists(name.to_string()));
        }
        let mut taken = None;
        self.checkpoint(&mut w, true, |m, at, lsn| {
            let s = SnapshotEntry {
                name: name.to_string(),
                checkpoint: at,
                lsn,
                created_ms: now_ms(),
                automatic: false,
            };
            taken = Some(SnapshotInfo::from(&s));
            m.snapshots.push(s);
        })
        .await?;
        Ok(taken.expect("seal ran the edit"))
    }

    pub async fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        let _w = self.inner.writer.lock().await;
        self.check_writable()?;
        if self.find_snapshot(name).is_none() {
            return Err(VolumeError::SnapshotNotFound(name.to_string()));
        }
        self.update_manifest(|m| m.snapshots.retain(|s| s.name != name))
            .await
    }

    /// Makes the head equal to snapshot `name`. The abandoned head is kept
    /// as an automatic snapshot, whose name is returned.
    pub async fn rollback(&self, name: &str) -> Result<String> {
        self.check_writable()?;
        let mut w = self.inner.writer.lock().await;
        self.check_writable()?;
        let target = self
            .find_snapshot(name)
            .ok_or_else(|| VolumeError::SnapshotNotFound(name.to_string()))?;
        let (cp, _) =
            read_checkpoint(&self.inner.segments, target.checkpoint, &self.inner.uuid).await?;
        let auto_name = {
            let m = self.inner.manifest.lock();
            let base: String = format!("before-rollback-to-{name}")
                .chars()
                .take(MAX_NAME_LEN - 24)
                .collect();
            let stamp = now_ms();
            let mut candidate = format!("{base}-{stamp}");
            let mut k = 1;
            while m.snapshots.iter().any(|s| s.name == candidate) {
                candidate = format!("{base}-{stamp}-{k}");
                k += 1;
            }
            candidate
        };
        self.checkpoint(&mut w, true, |m, at, lsn| {
            m.snapshots.push(SnapshotEntry {
                name: auto_name.clone(),
                checkpoint: at,
                lsn,
                created_ms: now_ms(),
                automatic: true,
            });
            m.checkpoint = target.checkpoint;
            m.size = cp.size;
        })
        .await?;
        // Now the manifest's head is the snapshot: switch memory to it.
        {
            let mut map = self.inner.map.lock();
            let budget = (map.budget_pages() * PAGE_COST) as u64;
            *map = MapState::new(cp.root, cp.depth, budget, self.inner.block_size);
            map.set_accounting(cp.allocated_blocks, &cp.usage);
        }
        self.inner.size.store(cp.size, Ordering::SeqCst);
        Ok(auto_name)
    }

    /// Summary for `hlfs info`.
    pub async fn info(&self) -> Result<VolumeInfo> {
        let store = &self.inner.backend.store;
        let mut stored = 0;
        for prefix in ["segments/", "manifest/"] {
            stored += store
                .list(prefix)
                .await?
                .iter()
                .map(|b| b.size)
                .sum::<u64>();
        }
        for name in self.inner.backend.journal.list()? {
            if let Ok(f) = self.inner.backend.journal.open(&name) {
                stored += f.len().unwrap_or(0);
            }
        }
        let m = self.inner.manifest.lock().clone();
        Ok(VolumeInfo {
            uuid: uuid::Uuid::from_bytes(self.inner.uuid).to_string(),
            size: self.size(),
            block_size: self.inner.block_size,
            segment_size: self.inner.segment_size,
            allocated_bytes: self.allocated_bytes(),
            stored_bytes: stored,
            format_version: FORMAT_VERSION,
            snapshots: m.snapshots.iter().map(SnapshotInfo::from).collect(),
            writer: m.writer.map(|w| format!("process {} on {}", w.pid, w.host)),
            created_ms: m.volume_created_ms,
        })
    }

    /// Seals what is unsealed, waits for every upload and releases the
    /// writer claim. Writes after close fail; a volume dropped without
    /// close, or whose uploads could not finish, is recovered on next open.
    pub async fn close(&self) -> Result<()> {
        if self.inner.read_only {
            self.inner.closed.store(true, Ordering::SeqCst);
            return Ok(());
        }
        // Runs to the end even if the caller goes away: half a close would
        // keep the lock and the upload task.
        let vol = self.clone();
        tokio::spawn(async move { vol.close_writer().await })
            .await
            .map_err(|e| VolumeError::Failed(format!("close stopped: {e}")))?
    }

    async fn close_writer(&self) -> Result<()> {
        let mut w = self.inner.writer.lock().await;
        if w.closed {
            return Ok(());
        }
        let closed = self.close_locked(&mut w).await;
        // Whatever happened, this process is done writing: stop uploading
        // and let the next writer in (recovery sorts out what was durable
        // and uploads what is left).
        w.closed = true;
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.uploads.queue.lock().take();
        let task = self.inner.uploads.task.lock().take();
        if let Some(task) = task {
            // Nothing of it may still run once the next writer can get in.
            task.abort();
            let _ = task.await;
        }
        self.inner.lock.lock().take();
        self.inner.journal_room.lock().take();
        closed
    }

    async fn close_locked(&self, w: &mut Writer) -> Result<()> {
        self.check_not_failed()?;
        if w.pos > 0 || w.changed {
            self.checkpoint(w, false, |m, _, _| m.writer = None).await?;
        } else {
            self.wait_stored(w.sealed_lsn).await?;
            if let Some(file) = w.file.take() {
                drop(file);
                self.inner.backend.journal.remove(&journal_name(w.seg))?;
                self.inner.files.lock().current = None;
            }
            self.update_manifest(|m| m.writer = None).await?;
        }
        Ok(())
    }
}

/// The upload task: syncs sealed segments in order, uploads up to
/// `parallel` of them at once, and finishes each (journal retired, manifest
/// written) in order, until the volume is closed or dropped, or fails.
async fn run_uploads(
    volume: Weak<Inner>,
    mut queue: mpsc::UnboundedReceiver<Sealing>,
    parallel: usize,
) {
    let mut uploading = FuturesOrdered::new();
    let mut open = true;
    let stopped = |e: VolumeError| {
        tracing::debug!(error = %e, "uploads stopped");
        if let Some(inner) = volume.upgrade() {
            // Wake whoever waits for an upload: they find the volume failed.
            inner.uploads.stored_lsn.send_modify(|_| {});
        }
    };
    loop {
        tokio::select! {
            biased;
            Some(done) = uploading.next(), if !uploading.is_empty() => {
                let result = match (done, volume.upgrade()) {
                    (Ok(sealing), Some(inner)) => Volume { inner }.after_upload(sealing).await,
                    (Err(e), _) => Err(e),
                    (Ok(_), None) => return,
                };
                if let Err(e) = result {
                    return stopped(e);
                }
            }
            next = queue.recv(), if open && uploading.len() < parallel => {
                let Some(sealing) = next else {
                    open = false;
                    continue;
                };
                let Some(inner) = volume.upgrade() else {
                    return;
                };
                if let Err(e) = (Volume { inner }).sync_sealed(&sealing).await {
                    return stopped(e);
                }
                uploading.push_back(upload(volume.clone(), sealing));
            }
            else => return,
        }
    }
}

/// Puts a synced segment in the store, retrying while the store refuses it.
async fn upload(volume: Weak<Inner>, sealing: Sealing) -> Result<Sealing> {
    let (seg, file) = (sealing.seg, sealing.file.clone());
    let what = format!("uploading {}", segment_name(seg));
    retrying(&volume, &what, |vol| {
        let file = file.clone();
        async move { vol.hand_to_store(seg, &file).await }
    })
    .await?;
    Ok(sealing)
}

/// Runs `op` until it succeeds, pausing longer after each failure of the
/// store. Other errors (a fenced writer, a failed volume) end it, as does
/// the volume being dropped: between attempts only a weak reference is
/// kept.
async fn retrying<F, Fut>(volume: &Weak<Inner>, what: &str, mut op: F) -> Result<()>
where
    F: FnMut(Volume) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut pause = UPLOAD_RETRY_FIRST;
    loop {
        let inner = volume.upgrade().ok_or(VolumeError::Closed)?;
        let vol = Volume { inner };
        match op(vol.clone()).await {
            Ok(()) => return Ok(()),
            // A crashed store (a test's dead process) never comes back.
            Err(VolumeError::Store(e)) if !matches!(e, StoreError::Crashed) => {
                vol.check_not_failed()?;
                let first = {
                    let mut stalled = vol.inner.uploads.stalled.lock();
                    let since = stalled.as_ref().map(|s| s.since);
                    *stalled = Some(Stall {
                        why: format!("{what}: {e}"),
                        since: since.unwrap_or_else(std::time::Instant::now),
                    });
                    since.is_none()
                };
                if first {
                    tracing::warn!(volume = %vol.location(), error = %e, "{what} failed; retrying until the store takes it");
                } else {
                    tracing::debug!(volume = %vol.location(), error = %e, "{what} failed again");
                }
                drop(vol);
                // 75% to 125% of the pause, so retries of many volumes spread out.
                let jitter = pause.mul_f64(rand::random::<f64>() / 2.0);
                tokio::time::sleep(pause.mul_f64(0.75) + jitter).await;
                pause = (pause * 2).min(UPLOAD_RETRY_MAX);
            }
            Err(e) => return Err(vol.fail(e)),
        }
    }
}

/// Reads and decodes the checkpoint record at `at`, returning it and its LSN.
pub(crate) async fn read_checkpoint(
    segments: &Segments,
    at: Entry,
    uuid: &[u8; 16],
) -> Result<(Checkpoint, u64)> {
    let (h, payload) = segments.read_record(at.seg, at.off as u64, uuid).await?;
    let where_ = || format!("checkpoint at {} offset {}", segment_name(at.seg), at.off);
    if h.kind != RecordKind::Checkpoint || h.crc != at.crc {
        return Err(VolumeError::corrupt(format!(
            "{}: not the expected record",
            where_()
        )));
    }
    let cp = Checkpoint::decode(&payload)
        .map_err(|e| VolumeError::corrupt(format!("{}: {e}", where_())))?;
    Ok((cp, h.lsn))
}

/// Reads and decodes the map page record at `at`.
pub(crate) async fn read_page(segments: &Segments, at: Entry, uuid: &[u8; 16]) -> Result<MapPage> {
    let (h, payload) = segments.read_record(at.seg, at.off as u64, uuid).await?;
    let where_ = || format!("map page at {} offset {}", segment_name(at.seg), at.off);
    if h.kind != RecordKind::MapPage || h.crc != at.crc {
        return Err(VolumeError::corrupt(format!(
            "{}: not the expected record",
            where_()
        )));
    }
    MapPage::decode(&payload).map_err(|e| VolumeError::corrupt(format!("{}: {e}", where_())))
}
