//! The log writer and group commit.
//!
//! Records are appended to the open segment's journal file under the
//! writer lock. FLUSH syncs every journal file not yet stored, once for
//! every write appended before it started (group commit). A full segment's
//! file is retired: it stays readable and synced by FLUSH until the upload
//! task has it in the store.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hlfs_format::journal_name;
use hlfs_store::JournalFile;
use parking_lot::Mutex;
use tokio::sync::OwnedSemaphorePermit;

use crate::checkpoint::HeadUpdate;
use crate::core::Core;
use crate::error::{Result, VolumeError};
use crate::lifecycle::Need;
use crate::options::Durability;
use crate::upload::Sealing;
use crate::window::Window;

/// Journal bytes are pushed towards the disk in chunks this large as they
/// are appended, so the sync when a segment is sealed finds little left to
/// write and stalls writers for less time. The chunk before is then
/// released from the page cache: the log keeps at most two chunks of a
/// journal in memory, and appends reuse those pages. Taking fresh pages
/// instead costs far more than the copy into them on a virtual machine
/// whose free memory the host reclaims (measured: 250 MB/s into fresh page
/// cache, 2.6 GB/s into reused pages, on the 2-vCPU test machine), and
/// fills memory with data the VM has just written and keeps in its own
/// cache.
const WRITEBACK_CHUNK: u64 = 8 << 20;

/// How long a sync waits at most for the flushes it expects to join it.
const MAX_GATHER: Duration = Duration::from_millis(1);

/// Syncs that do not wait for their batch after a wait that ran out.
const SKIP_AFTER_MISS: u32 = 16;

/// The writer's place in the log. Guarded by `Log::writer`.
pub(crate) struct Writer {
    pub seg: u32,
    pub file: Option<Arc<dyn JournalFile>>,
    pub pos: u64,
    pub next_lsn: u64,
    /// Content changed since the head checkpoint.
    pub changed: bool,
    /// Segments sealed since the head checkpoint, and their bytes: recovery
    /// replays them.
    pub sealed_since_checkpoint: u32,
    pub bytes_since_checkpoint: u64,
    /// The last LSN in a retired journal file.
    pub sealed_lsn: u64,
    /// A Mark of at least this time is due before the next client record:
    /// the head was reset, with a point of this time.
    pub mark_due_ms: Option<u64>,
}

/// Journal files not yet stored: the one appended to and those retired,
/// each with the length of its log (the file may go on with the window).
#[derive(Default)]
struct OpenFiles {
    current: Option<Arc<dyn JournalFile>>,
    retiring: Vec<(Arc<dyn JournalFile>, u64)>,
}

pub(crate) struct Log {
    pub writer: tokio::sync::Mutex<Writer>,
    /// The journal files FLUSH must sync.
    files: Mutex<OpenFiles>,
    /// One fdatasync at a time (see the lock order in `core.rs`).
    sync_turn: tokio::sync::Mutex<()>,
    /// The last LSN appended, and the last one known durable.
    written_lsn: AtomicU64,
    durable_lsn: AtomicU64,
    /// Flushes waiting for a sync now, and how many were waiting when the
    /// last sync ended: the batch the next one can expect.
    flushers: AtomicUsize,
    last_batch: AtomicUsize,
    /// How long the last sync took (µs).
    last_sync_us: AtomicU64,
    /// Syncs left that do not wait for their batch.
    gather_skips: AtomicU32,
    /// Told whenever a flush starts waiting.
    flush_arrived: tokio::sync::Notify,
    /// What the log has done since the volume was opened, for monitoring.
    pub counts: LogCounts,
    /// The journal's pre-written window.
    pub window: Arc<Window>,
    /// Seals append no checkpoint while set (`hold_checkpoints`).
    checkpoints_held: AtomicBool,
    /// A retention window is on: client records follow time marks.
    pub marking: AtomicBool,
    /// The time of the last Mark in the log (0: none yet). Written under
    /// the writer lock; read by points made outside it (`Core::note_head`).
    pub last_mark_ms: AtomicU64,
}

/// Keeps seals from appending a checkpoint while it lives.
pub(crate) struct CheckpointsHeld<'a>(&'a AtomicBool);

impl Drop for CheckpointsHeld<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// What the log has done since the volume was opened (`Volume::figures`).
#[derive(Default)]
pub(crate) struct LogCounts {
    /// Data bytes clients wrote (trims and zeroes carry none).
    pub client_bytes: AtomicU64,
    /// Bytes appended to the log: records, map pages, checkpoints.
    pub appended_bytes: AtomicU64,
    /// Flushes that had writes to make durable, and the journal syncs
    /// that served them: flushes ÷ syncs is the group-commit batch.
    pub flushes: AtomicU64,
    pub syncs: AtomicU64,
    pub sync_micros: AtomicU64,
}

/// Counts a flush among those waiting for a sync while it lives.
struct Waiting<'a>(&'a Log);

impl<'a> Waiting<'a> {
    fn new(log: &'a Log) -> Self {
        log.flushers.fetch_add(1, Ordering::SeqCst);
        log.flush_arrived.notify_waiters();
        Waiting(log)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.flushers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Log {
    /// A log whose next record gets `next_lsn`, in segment `seg`.
    pub fn new(seg: u32, next_lsn: u64, window: Window) -> Log {
        Log {
            writer: tokio::sync::Mutex::new(Writer {
                seg,
                file: None,
                pos: 0,
                next_lsn,
                changed: false,
                sealed_since_checkpoint: 0,
                bytes_since_checkpoint: 0,
                sealed_lsn: 0,
                mark_due_ms: None,
            }),
            files: Mutex::new(OpenFiles::default()),
            sync_turn: tokio::sync::Mutex::new(()),
            written_lsn: AtomicU64::new(0),
            durable_lsn: AtomicU64::new(0),
            flushers: AtomicUsize::new(0),
            last_batch: AtomicUsize::new(0),
            last_sync_us: AtomicU64::new(0),
            gather_skips: AtomicU32::new(0),
            flush_arrived: tokio::sync::Notify::new(),
            counts: LogCounts::default(),
            window: Arc::new(window),
            checkpoints_held: AtomicBool::new(false),
            marking: AtomicBool::new(false),
            last_mark_ms: AtomicU64::new(0),
        }
    }

    /// Seals append no checkpoint of the head until what this returns is
    /// dropped: a cleaning commit is moving roots, and the head's half of
    /// the move alone must not become durable. (Taken under the writer
    /// lock, one at a time.)
    pub fn hold_checkpoints(&self) -> CheckpointsHeld<'_> {
        self.checkpoints_held.store(true, Ordering::SeqCst);
        CheckpointsHeld(&self.checkpoints_held)
    }

    pub fn checkpoints_held(&self) -> bool {
        self.checkpoints_held.load(Ordering::SeqCst)
    }

    /// After recovery: every record up to `lsn` is in the log, and durable.
    pub fn recovered_up_to(&self, lsn: u64) {
        self.written_lsn.store(lsn, Ordering::SeqCst);
        self.durable_lsn.store(lsn, Ordering::SeqCst);
    }

    /// Records up to `lsn` are durable (their file was synced).
    pub fn synced_up_to(&self, lsn: u64) {
        self.durable_lsn.fetch_max(lsn, Ordering::SeqCst);
    }

    /// `file` is the one appended to now (of segment `seg`), its log
    /// ending at `end`.
    pub fn set_current(&self, file: Option<Arc<dyn JournalFile>>, seg: u32, end: u64) {
        self.window.switch_to(file.clone(), seg, end);
        self.files.lock().current = file;
    }

    /// A retired file is in the store: FLUSH no longer syncs it.
    pub fn stored(&self, file: &Arc<dyn JournalFile>) {
        self.files
            .lock()
            .retiring
            .retain(|(f, _)| !Arc::ptr_eq(f, file));
    }

    /// Older files first, so that what a FLUSH makes durable is a prefix;
    /// retired ones with the length to cut them to.
    fn in_log_order(&self) -> Vec<(Arc<dyn JournalFile>, Option<u64>)> {
        let files = self.files.lock();
        files
            .retiring
            .iter()
            .map(|(f, len)| (f.clone(), Some(*len)))
            .chain(files.current.clone().map(|f| (f, None)))
            .collect()
    }
}

impl Core {
    /// Opens journal file `id` as the one appended to.
    pub(crate) fn start_journal(&self, w: &mut Writer, id: u32) -> Result<()> {
        let file = self.backend.journal.create(&journal_name(id))?;
        self.segments.add_journal(id, file.clone());
        w.seg = id;
        w.pos = 0;
        w.file = Some(file.clone());
        self.log.set_current(Some(file), id, 0);
        Ok(())
    }

    /// Appends a complete record, given in parts (header, payload), at the
    /// end of the open segment; returns where it starts.
    pub(crate) fn append(&self, w: &mut Writer, parts: &[&[u8]]) -> Result<u64> {
        let file = w.file.as_ref().ok_or(VolumeError::Closed)?;
        let at = w.pos;
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if at + len > u32::MAX as u64 {
            return Err(VolumeError::InvalidArgument("segment overflow".into()));
        }
        {
            let _window = self.log.window.before_append(at, len);
            file.write_parts_at(at, parts)
                .map_err(|e| self.life.fail(e.into()))?;
            self.log.window.appended(at + len);
        }
        w.pos += len;
        self.log
            .counts
            .appended_bytes
            .fetch_add(len, Ordering::Relaxed);
        // Every chunk this record completed (a 32 MiB write completes four).
        for chunk in at / WRITEBACK_CHUNK..w.pos / WRITEBACK_CHUNK {
            if let Err(e) = file.start_writeback(chunk * WRITEBACK_CHUNK, WRITEBACK_CHUNK) {
                tracing::debug!(error = %e, "early writeback hint failed");
            }
            if chunk > 0 {
                // Waiting for writeback reports a write error of the file
                // once, and a later fdatasync would not see it again: it
                // fails the volume as a failed sync does.
                file.release((chunk - 1) * WRITEBACK_CHUNK, WRITEBACK_CHUNK)
                    .map_err(|e| self.life.fail(e.into()))?;
            }
        }
        self.log.written_lsn.store(w.next_lsn, Ordering::SeqCst);
        w.next_lsn += 1;
        Ok(at)
    }

    /// Retires the open journal file (it stays readable, and FLUSH keeps
    /// syncing it until it is stored) and opens the next one unless `reopen`
    /// is false. The file goes to the upload task as the returned `Sealing`.
    pub(crate) fn rotate(
        &self,
        w: &mut Writer,
        reopen: bool,
        slot: OwnedSemaphorePermit,
        head: Option<HeadUpdate>,
    ) -> Result<Sealing> {
        let file = w.file.take().ok_or(VolumeError::Closed)?;
        // No more zeros in it. Every sync of it from now on (FLUSH's, in
        // log order, and the upload task's) cuts it to its log first: so a
        // record of the next journal is acknowledged only once zeros can no
        // longer sit between the two logs, and a segment holds its log and
        // nothing else.
        self.log.window.switch_to(None, 0, 0);
        let sealing = Sealing {
            seg: w.seg,
            file: file.clone(),
            len: w.pos,
            last_lsn: w.next_lsn - 1,
            head,
            _slot: slot,
        };
        self.log.files.lock().retiring.push((file, w.pos));
        w.sealed_since_checkpoint += 1;
        w.bytes_since_checkpoint += w.pos;
        w.sealed_lsn = sealing.last_lsn;
        if reopen {
            self.start_journal(w, sealing.seg + 1)
                .map_err(|e| self.life.fail(e))?;
        } else {
            w.seg = sealing.seg + 1;
            w.pos = 0;
            self.log.set_current(None, 0, 0);
        }
        Ok(sealing)
    }

    /// Makes every acknowledged write durable: in the local journal (one
    /// sync serves every write appended before it started), and with remote
    /// durability in the store too.
    pub(crate) async fn flush(&self) -> Result<()> {
        if self.life.read_only() {
            return Ok(());
        }
        self.life.check(Need::Sync)?;
        let target = self.log.written_lsn.load(Ordering::SeqCst);
        self.sync_journal(target).await?;
        if self.durability == Durability::Remote {
            self.flush_to_store(target).await?;
        }
        Ok(())
    }

    async fn sync_journal(&self, target: u64) -> Result<()> {
        if self.log.durable_lsn.load(Ordering::SeqCst) >= target {
            return Ok(());
        }
        let _waiting = Waiting::new(&self.log);
        self.log.counts.flushes.fetch_add(1, Ordering::Relaxed);
        let _turn = self.log.sync_turn.lock().await;
        self.life.check(Need::Sync)?;
        if self.log.durable_lsn.load(Ordering::SeqCst) >= target {
            return Ok(());
        }
        self.gather().await;
        // Read the LSN before taking the files: every record up to it is in
        // one of them, or in a segment whose sealing already synced it.
        let upto = self.log.written_lsn.load(Ordering::SeqCst);
        let started = std::time::Instant::now();
        for (file, cut) in self.log.in_log_order() {
            self.sync_file(file, cut).await?;
        }
        // A sync of the window's may have failed meanwhile (its error is
        // this sync's too, but the volume failed first).
        self.life.check(Need::Sync)?;
        let took = started.elapsed().as_micros() as u64;
        self.log.last_sync_us.store(took, Ordering::SeqCst);
        self.log.counts.syncs.fetch_add(1, Ordering::Relaxed);
        self.log
            .counts
            .sync_micros
            .fetch_add(took, Ordering::Relaxed);
        self.log
            .last_batch
            .store(self.log.flushers.load(Ordering::SeqCst), Ordering::SeqCst);
        self.log.synced_up_to(upto);
        self.log.window.after_sync();
        Ok(())
    }

    /// When several clients flush at once, the ones the last sync released
    /// write again and flush a moment later. Without waiting for them, each
    /// sync would serve about half of them, and each client would wait for
    /// two syncs; so a sync waits for as many flushes as the last one
    /// served, or for as long as the last sync took (at most
    /// [`MAX_GATHER`]), whichever comes first. A lone client never waits.
    /// A wait that runs out (the clients did not come back) turns waiting
    /// off for the next [`SKIP_AFTER_MISS`] syncs, which bounds what it can
    /// cost a workload it does not fit, such as one with a fast disk and
    /// timers coarser than its syncs.
    ///
    /// This wait is a matter of speed, not of what is durable, so it uses
    /// the real clock: a test's manual clock must never hold up a flush.
    async fn gather(&self) {
        let expect = self.log.last_batch.load(Ordering::SeqCst);
        if expect <= 1 {
            return;
        }
        if self.log.gather_skips.load(Ordering::SeqCst) > 0 {
            self.log.gather_skips.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let budget =
            Duration::from_micros(self.log.last_sync_us.load(Ordering::SeqCst)).min(MAX_GATHER);
        let deadline = tokio::time::Instant::now() + budget;
        loop {
            let arrived = self.log.flush_arrived.notified();
            tokio::pin!(arrived);
            // Registered before the count is read, so no arrival is missed.
            arrived.as_mut().enable();
            if self.log.flushers.load(Ordering::SeqCst) >= expect {
                return;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                self.log
                    .gather_skips
                    .store(SKIP_AFTER_MISS, Ordering::SeqCst);
                return;
            }
        }
    }

    /// Syncs a retired journal file before its upload. Files are synced in
    /// log order, so what is durable stays a prefix of the log.
    pub(crate) async fn sync_sealed(&self, sealing: &Sealing) -> Result<()> {
        let _turn = self.log.sync_turn.lock().await;
        self.life.check(Need::Sync)?;
        self.sync_file(sealing.file.clone(), Some(sealing.len))
            .await?;
        self.log.synced_up_to(sealing.last_lsn);
        Ok(())
    }

    /// fdatasyncs a journal file off the runtime, first cutting a retired
    /// one to its log (`cut`) if its window goes further: the cut is made
    /// durable by the same sync. A failure stops the volume even if the
    /// caller has gone (a cancelled FLUSH): the kernel reports a writeback
    /// error once, and the next sync would succeed.
    async fn sync_file(&self, file: Arc<dyn JournalFile>, cut: Option<u64>) -> Result<()> {
        let life = self.life.clone();
        let sync = move || match cut {
            Some(len) if file.len()? > len => file.truncate(len),
            _ => file.sync(),
        };
        tokio::task::spawn_blocking(move || sync().map_err(|e| life.fail(e.into())))
            .await
            .map_err(|e| self.life.fail(VolumeError::Failed(e.to_string())))?
    }

    /// Seals the open segment if it holds records up to `target`, and waits
    /// until they are in the store. Concurrent flushes share one seal.
    async fn flush_to_store(&self, target: u64) -> Result<()> {
        if self.uploads.stored_lsn() >= target {
            return Ok(());
        }
        {
            let mut w = self.log.writer.lock().await;
            self.life.check(Need::Sync)?;
            if w.sealed_lsn < target && w.pos > 0 {
                self.seal_in_background(&mut w).await?;
            }
        }
        self.wait_stored(target).await
    }
}
