//! The volume: a thin virtual disk kept as a log of records.
//!
//! [`Volume`] is the engine's public face. Each concern lives in its own
//! room (see `core.rs` for the list and the order of locks); this file only
//! says what a caller can do.

use std::sync::Arc;

use hlfs_store::layers::StoreCounts;

use crate::backend::Backend;
use crate::clean::{GcOptions, GcProgress, GcReport};
use crate::clone::{FlattenOptions, FlattenProgress, FlattenReport, FlattenState};
use crate::core::Core;
use crate::diff::Diff;
use crate::error::{Result, VolumeError};
use crate::follow::Follow;
use crate::open::{self, Held};
use crate::options::{
    CreateOptions, Extent, OpenOptions, RetentionInfo, SnapshotInfo, View, VolumeInfo,
};

/// An open volume. Cheap to clone; every clone is the same volume, and all
/// methods may be called from many tasks at once.
#[derive(Clone)]
pub struct Volume {
    engine: Engine,
}

#[derive(Clone)]
enum Engine {
    /// With what a writable open holds: background tasks, the journal
    /// lock. Dropping the last clone releases them.
    Writable {
        core: Arc<Core>,
        held: Arc<Held>,
    },
    View(Arc<Follow>),
}

impl Volume {
    /// Creates an empty volume.
    pub async fn create(backend: &Backend, opts: &CreateOptions) -> Result<()> {
        open::create(backend, opts).await
    }

    /// Opens the volume for writing. Recovers from a crash if needed; fails
    /// with `Busy` if another writer holds it.
    pub async fn open(backend: Backend, opts: &OpenOptions) -> Result<Volume> {
        let (core, held) = open::open(backend, opts).await?;
        Ok(Volume {
            engine: Engine::Writable { core, held },
        })
    }

    /// Opens an image read-only: the head (replaying unsealed writes in
    /// memory, writing nothing) or a snapshot. If the volume's writer
    /// cleans away segments the view reads, the view reopens at the newest
    /// manifest: a snapshot reads the same, the head reads as it is then.
    pub async fn open_read_only(
        backend: Backend,
        opts: &OpenOptions,
        view: View,
    ) -> Result<Volume> {
        let core = open::open_read_only(backend.clone(), opts, view).await?;
        Ok(Volume {
            engine: Engine::View(Arc::new(Follow::new(core, backend, opts.clone()))),
        })
    }

    /// A view of a volume `depth` levels down a chain of clones: a clone's
    /// parent.
    pub(crate) async fn open_view_in_chain(
        backend: Backend,
        opts: &OpenOptions,
        view: View,
        depth: u32,
    ) -> Result<Volume> {
        let core = open::open_read_only_at(backend.clone(), opts, view, depth).await?;
        Ok(Volume {
            engine: Engine::View(Arc::new(Follow::new(core, backend, opts.clone()))),
        })
    }

    /// The engine's state: for a view, as of its latest reopen.
    pub(crate) fn core(&self) -> Arc<Core> {
        match &self.engine {
            Engine::Writable { core, .. } => core.clone(),
            Engine::View(follow) => follow.current(),
        }
    }

    pub fn size(&self) -> u64 {
        self.core().size()
    }

    pub fn block_size(&self) -> u32 {
        self.core().block_size
    }

    /// The snapshot a read-only view shows; None for the head.
    pub fn snapshot(&self) -> Option<&str> {
        match &self.engine {
            Engine::Writable { .. } => None,
            Engine::View(follow) => follow.snapshot(),
        }
    }

    pub fn is_read_only(&self) -> bool {
        matches!(self.engine, Engine::View(_))
    }

    pub fn location(&self) -> &str {
        match &self.engine {
            Engine::Writable { core, .. } => core.location(),
            Engine::View(follow) => follow.location(),
        }
    }

    /// Bytes of the volume that hold data.
    pub fn allocated_bytes(&self) -> u64 {
        self.core().allocated_bytes()
    }

    /// Map pages in memory now and the most allowed, in this volume's page
    /// cache (which other opens may share).
    pub fn map_pages(&self) -> (usize, usize) {
        self.core().pages.pages()
    }

    /// What the volume is doing: counters since it was opened, caches and
    /// the upload backlog now.
    pub fn figures(&self) -> crate::Figures {
        match &self.engine {
            Engine::Writable { core, .. } => core.figures(),
            Engine::View(follow) => crate::Figures {
                view_reopens: follow.reopens(),
                ..follow.current().figures()
            },
        }
    }

    /// Requests made to the volume's store so far, and their bytes, by
    /// every open of this backend.
    pub fn store_counts(&self) -> StoreCounts {
        self.core().backend.metrics.counts()
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match &self.engine {
            Engine::Writable { core, .. } => {
                core.note_client_op();
                core.read_into(offset, buf).await
            }
            Engine::View(follow) => follow.read_into(offset, buf).await,
        }
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
        match &self.engine {
            Engine::Writable { core, .. } => core.extents(offset, len, limit).await,
            Engine::View(follow) => {
                follow
                    .run(|core| async move { core.extents(offset, len, limit).await })
                    .await
            }
        }
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let core = self.core();
        core.note_client_op();
        core.write(offset, data).await
    }

    /// Writes and returns only once the data is durable.
    pub async fn write_fua(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write(offset, data).await?;
        self.flush().await
    }

    /// Makes every acknowledged write durable: in the local journal (one
    /// sync serves every write appended before it started), and with remote
    /// durability in the store too.
    pub async fn flush(&self) -> Result<()> {
        self.core().flush().await
    }

    /// Makes `offset..offset+len` read as zeros and releases its space.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let core = self.core();
        core.note_client_op();
        core.write_zeroes(offset, len).await
    }

    /// Trim: the range reads as zeros afterwards and holds no space.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len).await
    }

    /// Grows the volume to `new_size` bytes; the new space reads as zeros.
    pub async fn resize(&self, new_size: u64) -> Result<()> {
        self.core().resize(new_size).await
    }

    /// Turns the retention window on for `window_ms` (a first retention
    /// point is taken now) or, with 0, off (its points are dropped, and
    /// cleaning may take what only they held).
    pub async fn set_retention(&self, window_ms: u64) -> Result<()> {
        self.core().set_retention(window_ms).await
    }

    /// The retention window, as the manifest this open knows says.
    pub fn retention(&self) -> RetentionInfo {
        self.core().manifests.read(crate::retain::info)
    }

    /// The moment of the retention window a read-only view shows, if it
    /// was opened at one (`View::AsOf` inside the window).
    pub fn moment(&self) -> Option<u64> {
        match &self.engine {
            Engine::Writable { .. } => None,
            Engine::View(follow) => follow.moment(),
        }
    }

    /// The snapshots, oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.core().snapshots()
    }

    /// Takes a snapshot holding every write acknowledged before the call.
    pub async fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo> {
        self.core().snapshot_create(name).await
    }

    pub async fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.core().snapshot_delete(name).await
    }

    /// Makes the head equal to snapshot `name`. The abandoned head is kept
    /// as an automatic snapshot, whose name is returned.
    pub async fn rollback(&self, name: &str) -> Result<String> {
        self.core().rollback(name).await
    }

    /// Makes the head what it was at moment `t` (ms since the epoch) of
    /// the retention window. The abandoned head is kept as an automatic
    /// snapshot, whose name is returned.
    pub async fn rollback_to_moment(&self, t: u64) -> Result<String> {
        self.core().rollback_to_moment(t).await
    }

    /// Cleans segments until stored ≤ `opts.target` × live or nothing more
    /// can be cleaned, telling `progress` after each recount, and deletes
    /// the emptied segments once `opts.grace` has passed, as well as any
    /// other segment nothing reaches, whatever the target.
    pub async fn gc(
        &self,
        opts: &GcOptions,
        progress: &(dyn Fn(&GcProgress) + Send + Sync),
    ) -> Result<GcReport> {
        self.core().gc(opts, progress).await
    }

    /// Copies into a clone what it still reads from its parent, then
    /// drops the link and the parent's pin, telling `progress` as it goes.
    /// Writes go on meanwhile and are never overwritten by a copy. Refused
    /// while the clone has snapshots or a retention window.
    ///
    /// The flatten is a task of the volume's: if one runs, this waits for
    /// it (at its own rates). If the caller stops waiting, it goes on; if
    /// the volume closes or crashes first, the next writable open goes on
    /// with it, at the default rates.
    pub async fn flatten(
        &self,
        opts: FlattenOptions,
        progress: &(dyn Fn(&FlattenProgress) + Send + Sync),
    ) -> Result<FlattenReport> {
        let Engine::Writable { core, held } = &self.engine else {
            return Err(VolumeError::ReadOnly);
        };
        let mut state = crate::clone::start_flatten(core, &held.runner, opts)?;
        loop {
            let now = state.borrow_and_update().clone();
            match now {
                FlattenState::Running(p) => progress(&p),
                FlattenState::Ended(ended) => {
                    return ended.map_err(|(kind, message)| VolumeError::Owner { kind, message })
                }
            }
            if state.changed().await.is_err() {
                // The task was dropped unended: the volume closed.
                return Err(VolumeError::Closed);
            }
        }
    }

    /// Where a running flatten is; None if none runs.
    pub fn flatten_progress(&self) -> Option<FlattenProgress> {
        let Engine::Writable { core, .. } = &self.engine else {
            return None;
        };
        let state = core.flattening.lock().as_ref()?.borrow().clone();
        match state {
            FlattenState::Running(p) => Some(p),
            FlattenState::Ended(_) => None,
        }
    }

    /// Makes this volume ready to be cloned from `source` (its format v4
    /// at least; a moment kept as a snapshot) and returns the snapshot a
    /// clone is to link to (`clone_volume`).
    pub async fn offer_for_clone(&self, source: &crate::CloneSource) -> Result<String> {
        self.core().offer_for_clone(source).await
    }

    /// The parent of a clone, or None.
    pub fn parent(&self) -> Option<crate::ParentInfo> {
        self.core()
            .parent()
            .map(|p| crate::ParentInfo::from(&p.link))
    }

    /// Makes the manifest's head everything written so far, so that what
    /// reads the store alone (`diff` of the head, `space`) sees it all.
    pub async fn checkpoint(&self) -> Result<()> {
        self.core().checkpoint_now().await
    }

    /// What changed since snapshot `from`: in the head as of now (every
    /// write acknowledged before the call), or in the snapshot a read-only
    /// view shows. From map pages alone; answers are kept while the two
    /// roots stay the same.
    pub async fn changes_since(&self, from: &str) -> Result<Arc<Diff>> {
        match &self.engine {
            Engine::Writable { core, .. } => core.changes_since(from).await,
            Engine::View(follow) => {
                follow
                    .run(|core| async move { core.changes_since(from).await })
                    .await
            }
        }
    }

    /// Stops a running cleaning run as soon as it safely can (between
    /// passes, or in its grace period), and refuses new runs: for a server
    /// shutting down.
    pub fn stop_cleaning(&self) {
        self.core().stop_cleaning();
    }

    /// Summary for `hlfs info`.
    pub async fn info(&self) -> Result<VolumeInfo> {
        self.core().info().await
    }

    /// Seals what is unsealed, waits for every upload and releases the
    /// writer claim. Writes after close fail; a volume dropped without
    /// close, or whose uploads could not finish, is recovered on next open.
    pub async fn close(&self) -> Result<()> {
        let (core, held) = match &self.engine {
            Engine::Writable { core, held } => (core.clone(), held.clone()),
            Engine::View(follow) => {
                follow.current().life.closed();
                return Ok(());
            }
        };
        // Runs to the end even if the caller goes away: half a close would
        // keep the lock and the background tasks.
        tokio::spawn(async move { open::close_writer(&core, &held).await })
            .await
            .map_err(|e| crate::VolumeError::Failed(format!("close stopped: {e}")))?
    }
}
