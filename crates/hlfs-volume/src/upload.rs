//! The upload pipeline: sealed segments into the store, in the background.
//!
//! The upload task (the first task of the volume's runner) syncs sealed
//! journal files in log order, puts up to `parallel` of them in the store
//! at once, retrying each until the store takes it, and finishes them in
//! order: the journal file is retired (into the read cache, for a remote
//! store), and the manifest written if the segment ends with a checkpoint.
//! Writers take a slot in the upload backlog before sealing, which bounds
//! the local journal while the store is slow or away.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesOrdered, StreamExt};
use hlfs_format::{journal_name, segment_name};
use hlfs_store::layers::Outage;
use hlfs_store::{BlobStore, JournalFile, StoreError};
use parking_lot::Mutex;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::checkpoint::HeadUpdate;
use crate::core::Core;
use crate::error::{Result, VolumeError};
use crate::lifecycle::Need;
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
    /// Every record up to this LSN is in the store.
    stored_lsn: watch::Sender<u64>,
    /// Since when, and why, uploads have been failing, while they are.
    outage: Arc<Outage>,
    /// The store as uploads see it: each request retried until it is
    /// taken, reporting to `outage`.
    store: Arc<dyn BlobStore>,
    parallel: usize,
}

impl Uploads {
    pub fn new(backend: &crate::Backend) -> Uploads {
        let outage = Arc::new(Outage::default());
        let (backlog, parallel) = match backend.remote {
            true => (UPLOAD_BACKLOG_REMOTE, PARALLEL_UPLOADS_REMOTE),
            false => (UPLOAD_BACKLOG_LOCAL, 1),
        };
        Uploads {
            mailbox: Mutex::new(None),
            backlog: Arc::new(Semaphore::new(backlog)),
            stored_lsn: watch::Sender::new(0),
            store: backend.uploads(outage.clone()),
            outage,
            parallel,
        }
    }

    pub fn stored_lsn(&self) -> u64 {
        *self.stored_lsn.borrow()
    }

    /// Everything up to `lsn` is in the store (after recovery).
    pub fn set_stored(&self, lsn: u64) {
        self.stored_lsn.send_replace(lsn);
    }

    /// Sealed segments go to this task from now on.
    pub fn start(&self, mailbox: Mailbox<Sealing>) {
        *self.mailbox.lock() = Some(mailbox);
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
        let put = match self.backend.journal.local_path(&journal_name(id)) {
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

    /// Once a segment is in the store (and every one before it): switches
    /// its reads away from the journal and makes its checkpoint, if any,
    /// the head.
    async fn finish_upload(&self, sealing: Sealing) -> Result<()> {
        let len = sealing.file.len().map_err(|e| self.life.fail(e.into()))?;
        self.retire_journal(sealing.seg, len);
        self.log.stored(&sealing.file);
        if let Some(head) = sealing.head {
            let store = self.uploads.store.clone();
            self.write_manifest(&*store, |m| head.apply(m)).await?;
        }
        self.uploads
            .stored_lsn
            .send_modify(|s| *s = (*s).max(sealing.last_lsn));
        Ok(())
    }
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
                core.finish_upload(done?).await?;
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
