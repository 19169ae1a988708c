//! The upload pipeline: sealed segments into the store, in the background.
//!
//! The upload task (the first task of the volume's runner) syncs sealed
//! journal files in log order, puts up to `parallel` of them in the store
//! at once, retrying each until the store takes it, and finishes them in
//! order: the journal file is retired (into the read cache, for a remote
//! store), and the manifest written if the segment ends with a checkpoint.
//! Writers take a slot in the upload backlog before sealing, which bounds
//! the local journal while the store is slow or away.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};
use hlfs_format::{journal_name, segment_name};
use hlfs_store::layers::{Outage, RetryPolicy, Retrying};
use hlfs_store::{BlobMeta, BlobStore, JournalFile, JournalLock, StoreError};
use parking_lot::Mutex;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::checkpoint::HeadUpdate;
use crate::core::Core;
use crate::error::{Result, VolumeError};
use crate::lifecycle::Need;
use crate::manifest::stored_after_refusal;
use crate::runner::{Mailbox, TaskContext};

/// Sealed segments waiting for their upload, at most, before writers wait:
/// what bounds the local journal when the store is slow or away. A local
/// store takes a segment as fast as it is synced, so one is enough there.
pub(crate) const UPLOAD_BACKLOG_REMOTE: usize = 4;
const UPLOAD_BACKLOG_LOCAL: usize = 1;

/// Segments uploaded at once to a remote store: one request stream to a
/// gateway is slower than the disks behind it.
const PARALLEL_UPLOADS_REMOTE: usize = 3;

/// A retired journal file on its way into the store.
pub(crate) struct Sealing {
    pub seg: u32,
    pub file: Arc<dyn JournalFile>,
    /// Where its log ends: the file may go on with its pre-written window.
    pub len: u64,
    pub last_lsn: u64,
    /// The checkpoint it ends with, to make the head once it is stored.
    pub head: Option<HeadUpdate>,
    /// Its place in the upload backlog.
    pub _slot: OwnedSemaphorePermit,
}

/// What writers and the upload task share.
pub(crate) struct Uploads {
    mailbox: Mutex<Option<Mailbox<Sealing>>>,
    /// Taken before a segment is sealed, released once it is stored.
    backlog: Arc<Semaphore>,
    backlog_limit: usize,
    /// Every record up to this LSN is in the store.
    stored_lsn: watch::Sender<u64>,
    /// Since when, and why, uploads have been failing, while they are.
    outage: Arc<Outage>,
    /// The store as uploads see it: each request retried until it is
    /// taken, reporting to `outage`.
    store: Arc<dyn BlobStore>,
    parallel: usize,
    /// The journal lock, held by the open volume; each store request of an
    /// upload that changes the store holds it too, until it is over.
    lease: Arc<Mutex<Weak<JournalLock>>>,
}

impl Uploads {
    pub fn new(backend: &crate::Backend) -> Uploads {
        let outage = Arc::new(Outage::default());
        let (backlog, parallel) = match backend.remote {
            true => (UPLOAD_BACKLOG_REMOTE, PARALLEL_UPLOADS_REMOTE),
            false => (UPLOAD_BACKLOG_LOCAL, 1),
        };
        let lease = Arc::new(Mutex::new(Weak::new()));
        let leased = Leased {
            inner: backend.store.clone(),
            lease: lease.clone(),
        };
        let store = Retrying::new(
            Arc::new(leased),
            RetryPolicy::until_done(),
            backend.clock.clone(),
            backend.jitter.clone(),
        )
        .reporting_to(outage.clone())
        .counting_in(backend.metrics.clone());
        Uploads {
            mailbox: Mutex::new(None),
            backlog: Arc::new(Semaphore::new(backlog)),
            backlog_limit: backlog,
            stored_lsn: watch::Sender::new(0),
            store: Arc::new(store),
            outage,
            parallel,
            lease,
        }
    }

    /// Sealed segments not yet in the store (or being sealed), and the
    /// most there may be before writers wait.
    pub fn backlog(&self) -> (usize, usize) {
        let free = self.backlog.available_permits();
        (self.backlog_limit.saturating_sub(free), self.backlog_limit)
    }

    pub fn stored_lsn(&self) -> u64 {
        *self.stored_lsn.borrow()
    }

    /// Everything up to `lsn` is in the store (after recovery).
    pub fn set_stored(&self, lsn: u64) {
        self.stored_lsn.send_replace(lsn);
    }

    /// The journal lock, as the volume holds it (for the window's filler).
    pub fn lease(&self) -> Arc<Mutex<Weak<JournalLock>>> {
        self.lease.clone()
    }

    /// Sealed segments go to this task from now on, which holds `lock`
    /// during each store request.
    pub fn start(&self, mailbox: Mailbox<Sealing>, lock: &Arc<JournalLock>) {
        *self.mailbox.lock() = Some(mailbox);
        *self.lease.lock() = Arc::downgrade(lock);
    }

    /// No more segments are taken.
    pub fn stop(&self) {
        self.mailbox.lock().take();
    }
}

impl Core {
    /// How long to wait for the store now: `store_wait`, less what an
    /// ongoing outage has lasted, so that once the store has been away that
    /// long, callers queued behind one another fail at once instead of each
    /// waiting in turn.
    fn patience(&self) -> Duration {
        match self.uploads.outage.since() {
            Some(since) => self
                .store_wait
                .saturating_sub(self.clock.now().saturating_sub(since)),
            None => self.store_wait,
        }
    }

    /// A place in the upload backlog, waiting at most `patience` for one.
    pub(crate) async fn upload_slot(&self) -> Result<OwnedSemaphorePermit> {
        let backlog = self.uploads.backlog.clone();
        match self
            .clock
            .timeout(self.patience(), backlog.acquire_owned())
            .await
        {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err(_)) => Err(VolumeError::Closed),
            Err(_) => Err(self.store_stalled()),
        }
    }

    /// The error for a write or flush that waited `store_wait` for the store.
    fn store_stalled(&self) -> VolumeError {
        if let Err(e) = self.life.check(Need::Sync) {
            return e;
        }
        let why = self
            .uploads
            .outage
            .why()
            .unwrap_or_else(|| "uploads are slower than writes".into());
        VolumeError::Unavailable(format!(
            "{}: the store has not taken the sealed segments for {} s ({why}); what was flushed is safe in the local journal, and uploads go on",
            self.location(),
            self.store_wait.as_secs()
        ))
    }

    pub(crate) fn queue_upload(&self, sealing: Sealing) -> Result<()> {
        let mailbox = self.uploads.mailbox.lock();
        match mailbox.as_ref().map(|m| m.send(sealing)) {
            Some(Ok(())) => Ok(()),
            _ => {
                self.life.check(Need::Sync)?;
                Err(VolumeError::Closed)
            }
        }
    }

    /// Waits until every record up to `lsn` is in the store, at most
    /// `store_wait`.
    pub(crate) async fn wait_stored(&self, lsn: u64) -> Result<()> {
        let mut stored = self.uploads.stored_lsn.subscribe();
        let reached = async {
            tokio::select! {
                r = stored.wait_for(|&s| s >= lsn) => r.map(|_| ()),
                () = self.life.failed() => Ok(()),
            }
        };
        match self.clock.timeout(self.patience(), reached).await {
            Ok(Ok(())) => self.life.check(Need::Sync),
            Ok(Err(_)) => Err(VolumeError::Closed),
            Err(_) => Err(self.store_stalled()),
        }
    }

    /// Puts a synced journal file into the store as a sealed segment.
    pub(crate) async fn hand_to_store(
        &self,
        store: &dyn BlobStore,
        id: u32,
        file: &Arc<dyn JournalFile>,
    ) -> Result<()> {
        let name = segment_name(id);
        let mut conflicts = 0;
        loop {
            let put = match self.backend.journal.local_path(&journal_name(id)) {
                Some(path) => store.put_file_if_absent(&name, &path).await,
                None => {
                    let len = file.len()?;
                    let data = file.read_at(0, len as usize)?;
                    store.put_if_absent(&name, data.into()).await
                }
            };
            match put {
                Ok(()) => return Ok(()),
                Err(StoreError::AlreadyExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
            // An earlier attempt may have landed though its answer was
            // lost; then the stored bytes are ours.
            let Some(stored) =
                stored_after_refusal(store, &name, &self.clock, &mut conflicts).await?
            else {
                continue;
            };
            let len = file.len()?;
            let ours = file.read_at(0, len as usize)?;
            if stored[..] == ours[..] {
                return Ok(());
            }
            return Err(VolumeError::Fenced(format!(
                "{name} already exists in {}: another writer has taken over the volume",
                self.location()
            )));
        }
    }

    /// A stored segment's journal file is no longer needed: it becomes the
    /// read cache's copy of the segment where there is one, else it goes.
    pub(crate) fn retire_journal(&self, seg: u32, len: u64) {
        let name = journal_name(seg);
        let adopted = match self.backend.journal.local_path(&name) {
            Some(path) => self.segments.adopt(seg, &path, len),
            None => false,
        };
        self.segments.sealed(seg);
        if !adopted {
            // The segment is safe in the store; a leftover journal file is
            // removed by the next recovery.
            if let Err(e) = self.backend.journal.remove(&name) {
                tracing::warn!(error = %e, "could not remove the journal of a stored segment");
            }
        }
    }
}

/// Once a segment is in the store (and every one before it): switches its
/// reads away from the journal and makes its checkpoint, if any, the head.
async fn finish_upload(core: &Arc<Core>, sealing: Sealing) -> Result<()> {
    core.retire_journal(sealing.seg, sealing.len);
    core.log.stored(&sealing.file);
    if let Some(head) = sealing.head {
        let store = core.uploads.store.clone();
        core.write_manifest(&*store, |m| {
            head.apply(m);
            core.note_head(m, false);
            Ok(())
        })
        .await?;
    }
    core.uploads
        .stored_lsn
        .send_modify(|s| *s = (*s).max(sealing.last_lsn));
    Ok(())
}

/// The upload task: syncs sealed segments in order, uploads up to
/// `parallel` of them at once, and finishes each in order, until the volume
/// stops it. An error here fails the volume.
pub(crate) async fn run(core: Arc<Core>, mut cx: TaskContext<Sealing>) -> Result<()> {
    let mut uploading = FuturesOrdered::new();
    let parallel = core.uploads.parallel;
    loop {
        tokio::select! {
            biased;
            () = cx.stop.stopped() => return Ok(()),
            Some(done) = uploading.next(), if !uploading.is_empty() => {
                finish_upload(&core, done?).await?;
            }
            next = cx.inbox.recv(), if uploading.len() < parallel => {
                let Some(sealing) = next else {
                    return Ok(());
                };
                core.sync_sealed(&sealing).await?;
                uploading.push_back(upload(core.clone(), sealing));
            }
        }
    }
}

/// Puts a synced segment in the store; its store retries until it is taken.
async fn upload(core: Arc<Core>, sealing: Sealing) -> Result<Sealing> {
    let store = core.uploads.store.clone();
    core.hand_to_store(&*store, sealing.seg, &sealing.file)
        .await?;
    Ok(sealing)
}

/// The store as the upload task uses it: each request runs to its end even
/// if the task is aborted meanwhile (the volume dropped without close), and
/// holds the journal lock until then. So the next writer cannot open the
/// volume while a request of this one (a link of a journal file into the
/// store, a PUT) may still land. Pauses between retries hold nothing.
struct Leased {
    inner: Arc<dyn BlobStore>,
    lease: Arc<Mutex<Weak<JournalLock>>>,
}

impl Leased {
    /// Runs `request` on its own task, holding the journal lock.
    async fn run<T, F>(&self, request: F) -> hlfs_store::Result<T>
    where
        T: Send + 'static,
        F: Future<Output = hlfs_store::Result<T>> + Send + 'static,
    {
        let Some(lease) = self.lease.lock().upgrade() else {
            return Err(StoreError::Refused(
                "the volume is closed: no more uploads".into(),
            ));
        };
        tokio::spawn(async move {
            let result = request.await;
            drop(lease);
            result
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("an upload request stopped: {e}")))?
    }
}

impl std::fmt::Debug for Leased {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leased")
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl BlobStore for Leased {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn put_if_absent(&self, name: &str, data: Bytes) -> hlfs_store::Result<()> {
        let (inner, name) = (self.inner.clone(), name.to_string());
        self.run(async move { inner.put_if_absent(&name, data).await })
            .await
    }

    async fn put_file_if_absent(&self, name: &str, path: &Path) -> hlfs_store::Result<()> {
        let (inner, name, path) = (self.inner.clone(), name.to_string(), path.to_path_buf());
        self.run(async move { inner.put_file_if_absent(&name, &path).await })
            .await
    }

    async fn get_range(&self, name: &str, offset: u64, len: u64) -> hlfs_store::Result<Bytes> {
        self.inner.get_range(name, offset, len).await
    }

    async fn head(&self, name: &str) -> hlfs_store::Result<Option<u64>> {
        self.inner.head(name).await
    }

    async fn list(&self, prefix: &str) -> hlfs_store::Result<Vec<BlobMeta>> {
        self.inner.list(prefix).await
    }

    async fn delete(&self, name: &str) -> hlfs_store::Result<()> {
        let (inner, name) = (self.inner.clone(), name.to_string());
        self.run(async move { inner.delete(&name).await }).await
    }

    async fn sweep_leftovers(&self) -> hlfs_store::Result<u64> {
        let inner = self.inner.clone();
        self.run(async move { inner.sweep_leftovers().await }).await
    }
}
