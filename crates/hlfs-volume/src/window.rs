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

use hlfs_format::journal_name;
use hlfs_store::{JournalDir, JournalFile, JournalLock};
use parking_lot::{Mutex, MutexGuard};

use crate::lifecycle::{Lifecycle, Need};
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
    /// Where the filler opens its own handle of the journal to sync: the
    /// kernel reports a writeback error once to each open file, so the
    /// filler's syncs never take one from a FLUSH's (which go through the
    /// log's handle, one at a time under `sync_turn`).
    journal: Arc<dyn JournalDir>,
    /// A filler is running.
    filling: AtomicBool,
    /// A write of zeros failed (a full disk, say): no more filling in this
    /// open. Appends go on as without a window.
    broken: AtomicBool,
    rate: Mutex<SyncRate>,
    /// Zero bytes written ahead since the volume was opened.
    pub prewritten_bytes: AtomicU64,
}

struct Fill {
    file: Option<Arc<dyn JournalFile>>,
    /// Its segment id.
    seg: u32,
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
        journal: Arc<dyn JournalDir>,
    ) -> Window {
        Window {
            mode,
            segment_size,
            life,
            lease,
            journal,
            broken: AtomicBool::new(false),
            fill: Mutex::new(Fill {
                file: None,
                seg: 0,
                ready: 0,
            }),
            ready: AtomicU64::new(0),
            end: AtomicU64::new(0),
            filling: AtomicBool::new(false),
            rate: Mutex::new(SyncRate::default()),
            prewritten_bytes: AtomicU64::new(0),
        }
    }

    /// `file` is the journal appended to now (of segment `seg`), its log
    /// ending at `end`. A filler still at work on the one before stops at
    /// its next piece.
    pub fn switch_to(&self, file: Option<Arc<dyn JournalFile>>, seg: u32, end: u64) {
        let mut fill = self.fill.lock();
        fill.file = file;
        fill.seg = seg;
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
        if !self.note_sync() || self.broken.load(Ordering::SeqCst) {
            return;
        }
        let end = self.end.load(Ordering::SeqCst);
        let ready = self.ready.load(Ordering::SeqCst);
        let short = ready < (end + WINDOW / 2).min(self.segment_size);
        if short && !self.filling.swap(true, Ordering::SeqCst) {
            let window = self.clone();
            tokio::task::spawn_blocking(move || {
                let _done = Filling(&window.filling);
                window.fill_ahead();
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
    fn fill_ahead(&self) {
        let zeros = vec![0u8; PIECE as usize];
        // The filler's own handle of the journal it syncs, by segment.
        let mut own: Option<(u32, Arc<dyn JournalFile>)> = None;
        while self.synced_mode() && self.life.check(Need::Write).is_ok() {
            let (file, seg, to) = {
                let fill = self.fill.lock();
                let Some(file) = fill.file.clone() else {
                    return;
                };
                // Zeros only while the volume holds the journal lock: none
                // lands in a journal a later opener appends to.
                let Some(_lease) = self.lease.lock().upgrade() else {
                    return;
                };
                let end = self.end.load(Ordering::SeqCst);
                let from = fill.ready.max(end);
                let to = (from + PIECE).min(end + WINDOW).min(self.segment_size);
                if to <= from {
                    return;
                }
                if let Err(e) = file.write_at(from, &zeros[..(to - from) as usize]) {
                    // Past the log: nothing written is at stake.
                    tracing::warn!(error = %e, "writing the journal's window failed; going on without one");
                    self.broken.store(true, Ordering::SeqCst);
                    return;
                }
                self.prewritten_bytes
                    .fetch_add(to - from, Ordering::Relaxed);
                (file, fill.seg, to)
            };
            let handle = match &own {
                Some((s, handle)) if *s == seg => handle.clone(),
                _ => match self.journal.open(&journal_name(seg)) {
                    Ok(handle) => own.insert((seg, handle)).1.clone(),
                    // Sealed and stored meanwhile.
                    Err(_) => return,
                },
            };
            if let Err(e) = handle.sync() {
                // It may have lost pages of the log too (which the log's
                // own next sync reports as well).
                self.life.fail(e.into());
                return;
            }
            let mut fill = self.fill.lock();
            match &fill.file {
                Some(current) if Arc::ptr_eq(current, &file) => {
                    fill.ready = fill.ready.max(to);
                    self.ready.store(fill.ready, Ordering::SeqCst);
                }
                _ => return,
            }
        }
    }
}

/// Marks the filler done however it ends.
struct Filling<'a>(&'a AtomicBool);

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(mode: Prewrite) -> Window {
        Window::new(
            mode,
            64 << 20,
            Arc::new(Lifecycle::new("test", false)),
            Arc::new(Mutex::new(Weak::new())),
            hlfs_store::MemEnv::new().journal(),
        )
    }

    /// Synced mode starts once a second holds `SYNCED_RATE` syncs, not
    /// before; `Always` and `Off` do not count.
    #[test]
    fn synced_mode_needs_many_syncs_a_second() {
        let auto = window(Prewrite::Auto);
        for _ in 1..SYNCED_RATE {
            assert!(!auto.note_sync());
        }
        assert!(!auto.synced_mode());
        assert!(auto.note_sync());
        assert!(auto.synced_mode());
        assert!(window(Prewrite::Always).note_sync());
        assert!(!window(Prewrite::Off).note_sync());
    }
}
