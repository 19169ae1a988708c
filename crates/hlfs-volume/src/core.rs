//! The state every room of the engine shares, and the rules of its locks.
//!
//! [`Core`] is one open volume's state. Each room adds the methods of its
//! concern in its own file (`impl Core` in `read.rs`, `write.rs`, `log.rs`,
//! `checkpoint.rs`, `upload.rs`, `snapshot.rs`, `recovery.rs`, `info.rs`);
//! `volume.rs` is the public façade over them. Background tasks hold an
//! `Arc<Core>`, never the façade.
//!
//! # Locks
//!
//! Taken in this order; a lock may be taken while holding those above it,
//! never those below:
//!
//! 0. `cleaning` (async): one cleaning run at a time, held across the
//!    whole run; its passes take the writer lock in turns.
//! 1. `log.writer` (async): the writer's place in the log. Held across
//!    awaits: appends, page loads, checkpoints, waiting for an upload slot
//!    or for an upload (snapshot, close). So nothing an upload needs to
//!    finish may ever take it: the upload task never does.
//! 2. `manifests.turn` (async): one manifest write at a time, held across
//!    its PUT. Taken by checkpoints under the writer lock and by the upload
//!    task without it.
//! 3. `log.sync_turn` (async): one fdatasync at a time, held across it, so
//!    that whoever sees a sync error fails the volume before anyone else
//!    can report a clean sync (the kernel reports a writeback error once).
//!    Taken by FLUSH and by the upload task; never by a holder of 2. The
//!    window's filler syncs through its own handle of the journal instead
//!    (the kernel reports a writeback error to each open file), so its
//!    syncs neither wait for FLUSH's nor take their errors.
//! 4. `log.window.fill` (`parking_lot`): held by the filler across one
//!    write of zeros (up to 1 MiB, on its blocking thread), and by an
//!    append that reaches past the window under lock 1. The filler takes
//!    the lease's mutex inside it, and nothing else.
//! 5. Short locks (`parking_lot`), never held across an await: `map` (the
//!    head's tree), then the page cache inside it; `log.files`;
//!    `manifests.current`; the lifecycle's state; `segments`' tables; the
//!    read cache's state; `changes` (answers of `changes_since`); a clone's
//!    `parent`. None is taken while holding another, except the page cache
//!    under `map`.
//!
//! The upload backlog semaphore is acquired under the writer lock and
//! released by the upload task, which needs only locks 2 and 3 to do so.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hlfs_format::{LogCounters, Manifest};
use hlfs_store::time::Clock;
use hlfs_store::BlobStore;
use parking_lot::{Mutex, RwLock};

use crate::backend::Backend;
use crate::clean::{CleanCounts, Condemned};
use crate::clone::Parent;
use crate::diff::{ChangesKey, Diff};
use crate::error::{Result, VolumeError};
use crate::lifecycle::Lifecycle;
use crate::log::Log;
use crate::manifest::ManifestLog;
use crate::map::{DirtyTree, MapResult, Missing, PageCache, Pins};
use crate::options::Durability;
use crate::segments::Segments;
use crate::stats::ViewHeld;
use crate::upload::Uploads;

/// What an open volume shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Shows {
    Head,
    /// A snapshot, by name.
    Snapshot(String),
    /// A moment of the retention window (ms since the epoch), opened from
    /// the retention point of this name.
    Moment {
        at_ms: u64,
        point: String,
    },
}

impl Shows {
    pub fn snapshot(&self) -> Option<&str> {
        match self {
            Shows::Snapshot(name) => Some(name),
            _ => None,
        }
    }
}

pub(crate) struct Core {
    pub backend: Backend,
    /// The store for requests someone waits on (retried within the store
    /// timeout when it is remote).
    pub store: Arc<dyn BlobStore>,
    pub clock: Clock,
    pub uuid: [u8; 16],
    pub block_size: u32,
    /// log2 of the block size.
    pub shift: u32,
    pub segment_size: u64,
    pub durability: Durability,
    /// How long writes and flushes wait for a store that is away.
    pub store_wait: Duration,
    pub life: Arc<Lifecycle>,
    pub size: AtomicU64,
    /// The head's map tree.
    pub map: Mutex<DirtyTree>,
    pub pages: Arc<PageCache>,
    pub segments: Segments,
    pub log: Log,
    pub manifests: ManifestLog,
    /// The log's counters as the manifest had them when this open (or the
    /// volume's upgrade to v2) began, and this open's counts of written
    /// and appended bytes then: each manifest written carries the sum.
    pub counted: Mutex<Option<(LogCounters, u64, u64)>>,
    pub uploads: Uploads,
    /// One cleaning run at a time; and the segments runs condemned, found
    /// empty by a recount, whose grace is not over yet (a run that keeps
    /// up with writes leaves them to the cleaner's next ticks). A crash
    /// forgets them; the next run's sweep finds them again.
    pub cleaning: tokio::sync::Mutex<Vec<Condemned>>,
    /// What cleaning has done since the volume was opened.
    pub clean_counts: CleanCounts,
    /// When the data in the segments this process's cleaning copied into
    /// was made (ms since the epoch): the newest of their victims'. The
    /// segment's own making time would make old data look young to the
    /// victims' score. Forgotten at close: a reopened volume scores them
    /// by the store's time.
    pub copy_ages: Mutex<std::collections::HashMap<u32, u64>>,
    /// When a client last asked for a read or a write: nanoseconds on the
    /// clock, plus one (0: never). The cleaner yields while it is recent.
    pub last_client_op: AtomicU64,
    /// Set once cleaning must stop (the server is shutting down).
    pub cleaning_stopped: tokio::sync::watch::Sender<bool>,
    /// A read-only view's root, which this process's cleaning keeps.
    #[expect(dead_code, reason = "held only to be dropped with the view")]
    pub view_root: Option<ViewHeld>,
    /// What a read-only view shows (the head for a writable volume).
    pub shows: Shows,
    /// Recent answers of `changes_since`, newest last.
    pub changes: Mutex<Vec<(ChangesKey, Arc<Diff>)>>,
    /// A clone's parent: what its unwritten blocks read.
    pub parent: RwLock<Option<Arc<Parent>>>,
    /// The flatten task's state, once one has started.
    pub flattening: Mutex<Option<tokio::sync::watch::Receiver<crate::clone::FlattenState>>>,
}

impl Core {
    pub fn location(&self) -> &str {
        &self.backend.location
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(VolumeError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// Runs an operation on the head's tree, loading the clean pages it
    /// finds missing (outside the lock) and trying again.
    pub async fn map_op<T>(
        &self,
        op: impl FnMut(&mut DirtyTree, &Pins) -> MapResult<T>,
    ) -> Result<T> {
        self.tree_op(&self.map, op).await
    }

    /// `map_op` on any tree of this volume (a snapshot's, which segment
    /// cleaning rewrites).
    pub async fn tree_op<T>(
        &self,
        tree: &Mutex<DirtyTree>,
        mut op: impl FnMut(&mut DirtyTree, &Pins) -> MapResult<T>,
    ) -> Result<T> {
        let mut pins = Pins::new();
        loop {
            let result = op(&mut tree.lock(), &pins);
            match result {
                Ok(v) => return Ok(v),
                Err(Missing(at)) => {
                    let page = Arc::new(self.segments.read_page(at).await?);
                    self.pages.lock(self.uuid).insert(at, page.clone());
                    pins.insert(at, page);
                }
            }
        }
    }

    /// Writes the next manifest, changed by `edit`, through `store` (see
    /// `ManifestLog::advance`: the edit checks what it relies on).
    /// A v2 manifest also gets the log's counters as of now.
    pub async fn write_manifest(
        &self,
        store: &dyn BlobStore,
        mut edit: impl FnMut(&mut Manifest) -> Result<()>,
    ) -> Result<()> {
        let counts = &self.log.counts;
        let written = counts.client_bytes.load(Ordering::Relaxed);
        let appended = counts.appended_bytes.load(Ordering::Relaxed);
        // A volume just made v2 (or one created so) counts from now on.
        let base = self.counted.lock().unwrap_or((
            LogCounters {
                since_ms: self.clock.unix_ms(),
                ..LogCounters::default()
            },
            written,
            appended,
        ));
        let (from, written_then, appended_then) = base;
        let now = LogCounters {
            since_ms: from.since_ms,
            written_bytes: from.written_bytes + written - written_then,
            appended_bytes: from.appended_bytes + appended - appended_then,
        };
        self.manifests
            .advance(store, &self.life, &self.clock, self.location(), |m| {
                edit(m)?;
                m.counters = (m.version >= 2).then_some(now);
                Ok(())
            })
            .await?;
        if self.manifests.read(|m| m.version >= 2) {
            self.counted.lock().get_or_insert(base);
        }
        Ok(())
    }

    /// Makes the manifest say the volume's format is `version` at least,
    /// before anything of that version is written: binaries that do not
    /// know it then refuse the volume instead of misreading its log.
    pub(crate) async fn allow_format(&self, version: u16) -> Result<()> {
        if self.manifests.read(|m| m.version) >= version {
            return Ok(());
        }
        self.write_manifest(&*self.store, |m| {
            m.version = m.version.max(version);
            Ok(())
        })
        .await
    }
}
