//! Creating, opening and closing a volume.
//!
//! Opening for writing takes the journal area's lock, refuses a writer
//! claim from another site, loads the head checkpoint, recovers, writes a
//! manifest carrying our claim and starts the background tasks. Closing
//! seals what is unsealed, waits for every upload, releases the claim and
//! stops the tasks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hlfs_format::{
    journal_name, manifest_name, Checkpoint, Entry, LogCounters, Manifest, Retention, WriterClaim,
    FORMAT_PLAIN, MAX_BLOCK_SIZE, MAX_SEGMENT_SIZE, MIN_BLOCK_SIZE, MIN_SEGMENT_SIZE,
};
use hlfs_store::{JournalLock, StoreError};
use parking_lot::{Mutex, RwLock};

use crate::backend::Backend;
use crate::cache::Reservation;
use crate::clean;
use crate::clone;
use crate::core::{Core, Shows};
use crate::error::{Result, VolumeError};
use crate::info::utc;
use crate::lifecycle::{Lifecycle, Need};
use crate::log::{Log, Writer};
use crate::manifest::{latest_manifest, ManifestLog};
use crate::map::{depth_for, DirtyTree, PageCache, SegmentUsage};
use crate::options::{CreateOptions, Durability, OpenOptions, Prewrite, View};
use crate::runner::Runner;
use crate::segments::Segments;
use crate::snapshot::IMPORT_GUARD;
use crate::stats::ViewRoot;
use crate::upload::{self, Uploads, UPLOAD_BACKLOG_REMOTE};
use crate::window::Window;
use crate::write::MAX_RECORD_BYTES;

/// Tries at a read-only open of a head that a writer keeps changing.
const HEAD_OPEN_ATTEMPTS: u32 = 10;

/// How long close gives the background tasks to stop by themselves.
const TASK_STOP_GRACE: Duration = Duration::from_secs(1);

/// What a writable open holds until the volume is closed or dropped: the
/// background tasks, the journal lock and the journal's room in the cache
/// directory. Dropping it aborts the tasks and lets the next writer in.
pub(crate) struct Held {
    pub runner: Runner,
    /// Shared with the upload task's store requests while they run.
    lock: Mutex<Option<Arc<JournalLock>>>,
    journal_room: Mutex<Option<Reservation>>,
}

impl Held {
    fn new(core: &Arc<Core>) -> Held {
        let life = core.life.clone();
        Held {
            runner: Runner::new(
                core.clock.clone(),
                Arc::new(move |task, e| {
                    tracing::error!(task, error = %e, "a background task failed");
                    life.fail(e);
                }),
            ),
            lock: Mutex::new(None),
            journal_room: Mutex::new(None),
        }
    }
}

/// Creates an empty volume.
pub(crate) async fn create(backend: &Backend, opts: &CreateOptions) -> Result<()> {
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
    let store = backend.requests();
    match latest_manifest(&*store, &backend.location).await {
        Err(VolumeError::NotFound(_)) => {}
        Ok(_) | Err(VolumeError::Corrupt(_)) => {
            return Err(VolumeError::AlreadyExists(backend.location.clone()))
        }
        Err(e) => return Err(e),
    }
    let m = first_manifest(
        FORMAT_PLAIN,
        *uuid::Uuid::new_v4().as_bytes(),
        backend.clock.unix_ms(),
        (bs, opts.segment_size, opts.size),
        None,
    );
    match store
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

/// The first manifest of a new volume (a clone, with `parent`): nothing
/// written yet, `(block size, segment size, size)` as given.
pub(crate) fn first_manifest(
    version: u16,
    volume: [u8; 16],
    now: u64,
    (block_size, segment_size, size): (u32, u64, u64),
    parent: Option<hlfs_format::ParentLink>,
) -> Manifest {
    Manifest {
        version,
        volume,
        seq: 1,
        written_ms: now,
        volume_created_ms: now,
        block_size,
        segment_size,
        size,
        checkpoint: Entry::EMPTY,
        replay_from_seg: 1,
        replay_from_lsn: 1,
        next_seg: 1,
        writer: None,
        snapshots: Vec::new(),
        counters: Some(LogCounters {
            since_ms: now,
            ..LogCounters::default()
        }),
        retention: Retention::default(),
        parent,
    }
}

/// Opens the volume for writing. Recovers from a crash if needed; fails
/// with `Busy` if another writer holds it.
pub(crate) async fn open(backend: Backend, opts: &OpenOptions) -> Result<(Arc<Core>, Arc<Held>)> {
    let lock = backend.journal.lock().map_err(|e| match e {
        StoreError::Locked { .. } => VolumeError::Busy(format!(
            "{} is already open for writing by another process on this host",
            backend.location
        )),
        e => e.into(),
    })?;
    let manifest = latest_manifest(&*backend.requests(), &backend.location).await?;
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
    let core = load(backend, manifest, false, Shows::Head, opts, 0).await?;
    core.recover(None).await?;
    let held = Arc::new(Held::new(&core));
    let lock = Arc::new(lock);
    *held.lock.lock() = Some(lock.clone());
    let claim = WriterClaim {
        host: site,
        pid: std::process::id(),
        since_ms: core.clock.unix_ms(),
    };
    core.manifests.set_claim(claim.clone());
    let next_seg = core.log.writer.lock().await.seg + 1;
    core.write_manifest(&*core.store, |m| {
        m.writer = Some(claim.clone());
        m.next_seg = m.next_seg.max(next_seg);
        Ok(())
    })
    .await?;
    if let Some(cache) = &core.backend.cache {
        // The open journal file and a full upload backlog, at most.
        let journal =
            (UPLOAD_BACKLOG_REMOTE as u64 + 1) * (core.segment_size + MAX_RECORD_BYTES as u64);
        *held.journal_room.lock() = Some(cache.reserve(journal));
    }
    let uploader = core.clone();
    let mailbox = held
        .runner
        .spawn("upload", None, |cx| upload::run(uploader, cx));
    core.uploads.start(mailbox, &lock);
    if let Some(auto) = opts.auto_clean.clone() {
        let cleaner = core.clone();
        let every = auto.every;
        held.runner
            .spawn("clean", Some(every), |cx| clean::run(cleaner, auto, cx));
    }
    if core.snapshots().iter().any(|s| s.name == IMPORT_GUARD) {
        tracing::warn!(volume = %core.location(), "an import-diff was cut off; rolling back what it wrote");
        core.end_import(None).await?;
    }
    let (retaining, first) = core
        .manifests
        .read(|m| (m.retention.window_ms > 0, m.retention.points.is_empty()));
    if retaining {
        core.log.marking.store(true, Ordering::Relaxed);
        if first {
            // The window starts with a point (`hlfs create --retain`).
            let mut w = core.log.writer.lock().await;
            core.checkpoint(&mut w, true, |_, _, _| Ok(())).await?;
        }
    }
    if core.manifests.read(|m| m.version) >= hlfs_format::FORMAT_CLONES {
        // Last: a cut-off import is undone first (its guard is a snapshot).
        // A v4 volume that is no clone may have been one, and left its
        // intent behind when its flatten ended.
        crate::clone::resume_flatten(&core, &held.runner).await?;
    }
    Ok((core, held))
}

/// Opens an image read-only: the head (replaying unsealed writes in
/// memory, writing nothing) or a snapshot.
pub(crate) async fn open_read_only(
    backend: Backend,
    opts: &OpenOptions,
    view: View,
) -> Result<Arc<Core>> {
    open_read_only_at(backend, opts, view, 0).await
}

/// `open_read_only` of a volume `depth` levels down a chain of clones
/// (its parent is opened one level further down).
pub(crate) async fn open_read_only_at(
    backend: Backend,
    opts: &OpenOptions,
    view: View,
    depth: u32,
) -> Result<Arc<Core>> {
    let store = backend.requests();
    let mut manifest = latest_manifest(&*store, &backend.location).await?;
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
        View::AsOf(t) => {
            if let Some(point) = crate::retain::point_for(&manifest, *t) {
                let now = backend.clock.unix_ms();
                if *t > now {
                    return Err(VolumeError::InvalidArgument(format!(
                        "{} is in the future (it is {} now)",
                        utc(*t),
                        utc(now)
                    )));
                }
                return open_moment(backend, manifest, point, *t, opts, depth).await;
            }
            Some(
                manifest
                    .snapshots
                    .iter()
                    .filter(|s| {
                        s.created_ms <= *t
                            && s.name != IMPORT_GUARD
                            && !crate::retain::is_point(&s.name)
                    })
                    .max_by_key(|s| (s.created_ms, s.lsn))
                    .cloned()
                    .ok_or_else(|| {
                        VolumeError::SnapshotNotFound(format!(
                            "(none taken at or before {})",
                            utc(*t)
                        ))
                    })?,
            )
        }
    };
    if let Some(s) = snap {
        manifest.checkpoint = s.checkpoint;
        return load(
            backend,
            manifest,
            true,
            Shows::Snapshot(s.name),
            opts,
            depth,
        )
        .await;
    }
    // The head of a volume a writer is using: its journal can be sealed
    // and removed while we read it. Start again from the newer manifest.
    let mut attempt = 1;
    loop {
        let core = load(backend.clone(), manifest, true, Shows::Head, opts, depth).await?;
        match core.recover(None).await {
            Err(VolumeError::Store(StoreError::NotFound(what))) if attempt < HEAD_OPEN_ATTEMPTS => {
                tracing::debug!(%what, attempt, "the writer sealed a journal while we read it; retrying");
                attempt += 1;
                manifest = latest_manifest(&*store, &backend.location).await?;
            }
            result => return result.map(|()| core),
        }
    }
}

/// Opens moment `t` of the retention window: the tree of `point`, then
/// the log after it up to the first time mark later than `t`.
async fn open_moment(
    backend: Backend,
    mut manifest: Manifest,
    mut point: crate::retain::Point,
    t: u64,
    opts: &OpenOptions,
    depth: u32,
) -> Result<Arc<Core>> {
    let store = backend.requests();
    let mut attempt = 1;
    loop {
        manifest.checkpoint = point.entry.checkpoint;
        manifest.replay_from_seg = point.replay_seg;
        manifest.replay_from_lsn = point.entry.lsn.saturating_add(1);
        let shows = Shows::Moment {
            at_ms: t,
            point: point.entry.name.clone(),
        };
        let opened = match load(backend.clone(), manifest, true, shows, opts, depth).await {
            Ok(core) => core.recover(Some(t)).await.map(|()| core),
            Err(e) => Err(e),
        };
        match opened {
            // A journal the writer stored meanwhile, or a segment of the
            // point's tree that cleaning moved: the newer manifest says
            // where the point is now.
            Err(
                VolumeError::Store(StoreError::NotFound(what)) | VolumeError::SegmentMissing(what),
            ) if attempt < HEAD_OPEN_ATTEMPTS => {
                tracing::debug!(%what, attempt, "the log or the point moved while we read it; retrying");
                attempt += 1;
                manifest = latest_manifest(&*store, &backend.location).await?;
                point = crate::retain::point_for(&manifest, t)
                    .filter(|p| p.entry.name == point.entry.name)
                    .ok_or_else(|| {
                        VolumeError::SnapshotNotFound(format!(
                            "(the moment {} left the retention window)",
                            utc(t)
                        ))
                    })?;
            }
            result => return result,
        }
    }
}

/// Builds the in-memory volume from a manifest and its checkpoint, which
/// for a view of a snapshot is that snapshot's, and for a moment its
/// retention point's (the manifest then says where its replay starts).
/// A clone's parent is opened too, `depth + 1` levels down its chain.
async fn load(
    backend: Backend,
    manifest: Manifest,
    read_only: bool,
    shows: Shows,
    opts: &OpenOptions,
    depth: u32,
) -> Result<Arc<Core>> {
    let uuid = manifest.volume;
    let store = backend.requests();
    let segments = Segments::new(store.clone(), backend.cache.clone(), uuid);
    let (cp, cp_lsn) = if manifest.checkpoint.is_empty() {
        let blocks = manifest.size.div_ceil(manifest.block_size as u64);
        let empty = Checkpoint {
            root: Entry::EMPTY,
            depth: depth_for(blocks),
            size: manifest.size,
            allocated_blocks: 0,
            usage: Vec::new(),
        };
        (empty, 0)
    } else {
        segments.read_checkpoint(manifest.checkpoint).await?
    };
    let pages = match &opts.page_cache {
        Some(shared) => shared.clone(),
        None => PageCache::new(opts.map_budget),
    };
    let parent = match &manifest.parent {
        Some(link) => {
            // The parent's pages share this open's budget.
            let opts = OpenOptions {
                page_cache: Some(pages.clone()),
                ..opts.clone()
            };
            let parent = clone::open_parent(&backend, link, &opts, depth + 1, manifest.block_size);
            Some(Arc::new(Box::pin(parent).await?))
        }
        None => None,
    };
    let usage = SegmentUsage::from_checkpoint(manifest.block_size, cp.allocated_blocks, &cp.usage);
    let map = DirtyTree::new(uuid, pages.clone(), cp.root, cp.depth, usage);
    let life = Arc::new(Lifecycle::new(&backend.location, read_only));
    let uploads = Uploads::new(&backend);
    // With remote durability each FLUSH seals its segment: a window
    // written ahead would be cut off at once.
    let prewrite = match opts.durability {
        Durability::Remote => Prewrite::Off,
        Durability::Local => opts.prewrite,
    };
    let window = Window::new(
        prewrite,
        manifest.segment_size,
        life.clone(),
        uploads.lease(),
        backend.journal.clone(),
    );
    // A moment replays from its point's LSN exactly: cleaning may have
    // moved the point's tree to a later checkpoint record.
    let first_lsn = match shows {
        Shows::Moment { .. } => manifest.replay_from_lsn,
        _ => manifest.replay_from_lsn.max(cp_lsn + 1),
    };
    let log = Log::new(manifest.next_seg, first_lsn, window);
    // Cleaning by this process keeps what a view of a snapshot reads once
    // the snapshot is deleted. Until then, and for a view of the head, the
    // view follows the volume as readers elsewhere do (`follow.rs`).
    let view_root = shows.snapshot().and_then(|name| {
        let s = manifest.snapshots.iter().find(|s| s.name == name)?;
        Some(ViewRoot::hold(uuid, s.checkpoint, name, s.lsn))
    });
    Ok(Arc::new(Core {
        uuid,
        block_size: manifest.block_size,
        shift: manifest.block_size.trailing_zeros(),
        segment_size: manifest.segment_size,
        durability: opts.durability,
        store_wait: opts.store_wait,
        life,
        size: AtomicU64::new(cp.size),
        map: Mutex::new(map),
        pages,
        segments,
        log,
        counted: Mutex::new(manifest.counters.map(|c| (c, 0, 0))),
        manifests: ManifestLog::new(manifest),
        uploads,
        cleaning: tokio::sync::Mutex::new(Vec::new()),
        clean_counts: Default::default(),
        copy_ages: Default::default(),
        last_client_op: AtomicU64::new(0),
        cleaning_stopped: tokio::sync::watch::Sender::new(false),
        view_root,
        shows,
        changes: Mutex::new(Vec::new()),
        parent: RwLock::new(parent),
        flattening: Mutex::new(None),
        clock: backend.clock.clone(),
        store,
        backend,
    }))
}

impl Core {
    /// Seals what is unsealed, waits for its upload and writes the manifest
    /// that releases the writer claim.
    async fn close_locked(&self, w: &mut Writer) -> Result<()> {
        self.life.check(Need::Sync)?;
        if w.pos > 0 || w.changed {
            let release = |m: &mut Manifest, _, _| {
                m.writer = None;
                Ok(())
            };
            return self.checkpoint(w, false, release).await;
        }
        self.wait_stored(w.sealed_lsn).await?;
        if let Some(file) = w.file.take() {
            self.log.set_current(None, 0, 0);
            drop(file);
            self.backend.journal.remove(&journal_name(w.seg))?;
        }
        self.write_manifest(&*self.store, |m| {
            m.writer = None;
            Ok(())
        })
        .await
    }
}

/// Closes a writable volume: see `Volume::close`.
pub(crate) async fn close_writer(core: &Core, held: &Held) -> Result<()> {
    // A cleaning run stops at its next safe point rather than hold the
    // close up (for its grace period, say).
    core.stop_cleaning();
    let mut w = core.log.writer.lock().await;
    if !core.life.begin_close() {
        return Ok(());
    }
    let closed = core.close_locked(&mut w).await;
    // Whatever happened, this process is done writing: stop uploading and
    // let the next writer in (recovery sorts out what was durable and
    // uploads what is left). Nothing of the tasks may still run by then.
    core.life.closed();
    core.uploads.stop();
    held.runner.shutdown(TASK_STOP_GRACE).await;
    held.lock.lock().take();
    held.journal_room.lock().take();
    closed
}
