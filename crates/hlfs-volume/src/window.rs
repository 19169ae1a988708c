//! The pre-written window (docs/design/synced-writes.md).
//!
//! Appending to a file changes its size, so each fdatasync after an append
//! commits the file system's metadata as well as flushing the device.
//! Under synced load (many flushes a second), a filler keeps the next
//! [`WINDOW`] bytes past the end of the log written with zeros and synced,
//! a piece at a time, off the writer's path. Appends then land in blocks
//! already written, and a flush has only data to sync. Outside synced
//! load nothing is pre-written, so sequential writes do not pay twice.
//!
//! Zeros never continue the log: a record header of zeros ends a journal's
//! scan (`ScanStop::Unwritten`), and a sealed journal is cut to its log
//! before it becomes a segment.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use hlfs_store::{JournalFile, JournalLock};
use parking_lot::{Mutex, MutexGuard};

use crate::lifecycle::Lifecycle;
use crate::options::Prewrite;

/// How far past the end of the log the filler keeps the journal written.
pub(crate) const WINDOW: u64 = 4 << 20;

/// Zeros written, then synced, at a time.
const PIECE: u64 = 1 << 20;

/// Syncs within one second that put the journal in synced mode...
const SYNCED_RATE: u32 = 50;

/// ...for this long after the last second that had them.
const SYNCED_HOLD: Duration = Duration::from_secs(3);

pub(crate) struct Window {
    mode: Prewrite,
    segment_size: u64,
    life: Arc<Lifecycle>,
    /// The journal lock while the volume holds it: zeros are written only
    /// under it, so none lands in a journal the next opener appends to.
    lease: Arc<Mutex<Weak<JournalLock>>>,
    /// The journal appended to, and how far it is written. Held by the
    /// filler across each write of zeros, and by an append that reaches
    /// past `ready`: the two never write the same bytes.
    fill: Mutex<Fill>,
    /// `Fill::ready`, for appends to read without the lock.
    ready: AtomicU64,
    /// Where the log of the current journal ends, as appends left it.
    end: AtomicU64,
    /// A filler is running.
    filling: AtomicBool,
    rate: Mutex<SyncRate>,
    /// Zero bytes written ahead since the volume was opened.
    pub prewritten_bytes: AtomicU64,
}

struct Fill {
    file: Option<Arc<dyn JournalFile>>,
    /// Bytes `0..ready` of `file` are written and synced: log or zeros.
    ready: u64,
}

#[derive(Default)]
struct SyncRate {
    second: Option<Instant>,
    syncs: u32,
    until: Option<Instant>,
}

/// Held by an append that may write where the filler does.
pub(crate) struct AppendGuard<'a>(
    #[expect(dead_code, reason = "held")] Option<MutexGuard<'a, Fill>>,
);

impl Window {
    pub fn new(
        mode: Prewrite,
        segment_size: u64,
        life: Arc<Lifecycle>,
        lease: Arc<Mutex<Weak<JournalLock>>>,
    ) -> Window {
        Window {
            mode,
            segment_size,
            life,
            lease,
            fill: Mutex::new(Fill {
                file: None,
                ready: 0,
            }),
            ready: AtomicU64::new(0),
            end: AtomicU64::new(0),
            filling: AtomicBool::new(false),
            rate: Mutex::new(SyncRate::default()),
            prewritten_bytes: AtomicU64::new(0),
        }
    }

    /// `file` is the journal appended to now, its log ending at `end`. A
    /// filler still at work on the one before stops at its next piece.
    pub fn switch_to(&self, file: Option<Arc<dyn JournalFile>>, end: u64) {
        let mut fill = self.fill.lock();
        fill.file = file;
        fill.ready = end;
        self.ready.store(end, Ordering::SeqCst);
        self.end.store(end, Ordering::SeqCst);
    }

    /// To hold while appending `at..at + len`.
    pub fn before_append(&self, at: u64, len: u64) -> AppendGuard<'_> {
        if at + len > self.ready.load(Ordering::SeqCst) {
            AppendGuard(Some(self.fill.lock()))
        } else {
            AppendGuard(None)
        }
    }

    /// The log now ends at `end` (called with the append's guard held).
    pub fn appended(&self, end: u64) {
        self.end.store(end, Ordering::SeqCst);
    }

    /// A journal sync served flushes: counts it towards synced mode, and
    /// starts a filler if the window is short.
    pub fn after_sync(self: &Arc<Self>) {
        if !self.note_sync() {
            return;
        }
        let end = self.end.load(Ordering::SeqCst);
        let ready = self.ready.load(Ordering::SeqCst);
        let short = ready < (end + WINDOW / 2).min(self.segment_size);
        if short && !self.filling.swap(true, Ordering::SeqCst) {
            let window = self.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = window.fill_ahead() {
                    // Its fdatasync may have dropped pages of the log:
                    // treated as a failed sync of the journal.
                    window.life.fail(e.into());
                }
                window.filling.store(false, Ordering::SeqCst);
            });
        }
    }

    /// Counts a sync; whether the journal is in synced mode.
    fn note_sync(&self) -> bool {
        match self.mode {
            Prewrite::Off => false,
            Prewrite::Always => true,
            Prewrite::Auto => {
                let now = Instant::now();
                let mut rate = self.rate.lock();
                if rate
                    .second
                    .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1))
                {
                    rate.second = Some(now);
                    rate.syncs = 0;
                }
                rate.syncs += 1;
                if rate.syncs >= SYNCED_RATE {
                    rate.until = Some(now + SYNCED_HOLD);
                }
                rate.until.is_some_and(|until| now < until)
            }
        }
    }

    fn synced_mode(&self) -> bool {
        match self.mode {
            Prewrite::Off => false,
            Prewrite::Always => true,
            Prewrite::Auto => self
                .rate
                .lock()
                .until
                .is_some_and(|until| Instant::now() < until),
        }
    }

    /// Writes and syncs zeros a piece at a time until the window reaches
    /// [`WINDOW`] past the log (or the segment's end), synced mode ends,
    /// or the journal changes.
    fn fill_ahead(&self) -> hlfs_store::Result<()> {
        let zeros = vec![0u8; PIECE as usize];
        while self.synced_mode() && self.life.check(crate::lifecycle::Need::Write).is_ok() {
            let Some(_lease) = self.lease.lock().upgrade() else {
                return Ok(());
            };
            let (file, to) = {
                let fill = self.fill.lock();
                let Some(file) = fill.file.clone() else {
                    return Ok(());
                };
                let end = self.end.load(Ordering::SeqCst);
                let from = fill.ready.max(end);
                let to = (from + PIECE).min(end + WINDOW).min(self.segment_size);
                if to <= from {
                    return Ok(());
                }
                file.write_at(from, &zeros[..(to - from) as usize])?;
                self.prewritten_bytes
                    .fetch_add(to - from, Ordering::Relaxed);
                (file, to)
            };
            file.sync()?;
            let mut fill = self.fill.lock();
            match &fill.file {
                Some(current) if Arc::ptr_eq(current, &file) => {
                    fill.ready = fill.ready.max(to);
                    self.ready.store(fill.ready, Ordering::SeqCst);
                }
                _ => return Ok(()),
            }
        }
        Ok(())
    }
}
