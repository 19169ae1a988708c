//! A read-only view that follows the store when the volume's writer, in
//! another process, cleans away segments the view still points into.
//!
//! The writer deletes a cleaned segment only after a grace period, so a
//! view that finds one missing is older than that: it opens again at the
//! newest manifest and tries once more. A snapshot view reopens the same
//! snapshot, known by name and LSN, whose contents never change (cleaning
//! moves them, never alters them). A head view reopens the head as it is
//! now: newer writes, all of them acknowledged ones. Segment ids are never
//! reused and every item is checked against its CRC, so a stale view finds
//! a segment missing and never reads wrong bytes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::backend::Backend;
use crate::core::{Core, Shows};
use crate::error::{Result, VolumeError};
use crate::open;
use crate::options::{OpenOptions, View};

/// Reopens a view may make for one request before its error stands: a
/// segment missing at the newest manifest too is damage, not cleaning.
const REOPENS_PER_REQUEST: usize = 2;

pub(crate) struct Follow {
    current: RwLock<Arc<Core>>,
    backend: Backend,
    opts: OpenOptions,
    /// What the view shows, and for a snapshot its LSN.
    shows: Shows,
    lsn: u64,
    reopening: tokio::sync::Mutex<()>,
    reopens: AtomicU64,
    /// Set once a reopen found the snapshot deleted: later requests fail
    /// at once instead of reading the store again.
    gone: AtomicBool,
}

impl Follow {
    pub fn new(core: Arc<Core>, backend: Backend, opts: OpenOptions) -> Follow {
        let shows = core.shows.clone();
        let lsn = shows.snapshot().map_or(0, |name| {
            core.snapshots()
                .iter()
                .find(|s| s.name == name)
                .map_or(0, |s| s.lsn)
        });
        Follow {
            current: RwLock::new(core),
            backend,
            opts,
            shows,
            lsn,
            reopening: tokio::sync::Mutex::new(()),
            reopens: AtomicU64::new(0),
            gone: AtomicBool::new(false),
        }
    }

    pub fn current(&self) -> Arc<Core> {
        self.current.read().clone()
    }

    /// Runs `op` on the current view, reopening it when `op` finds a
    /// segment missing.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(Arc<Core>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut reopens = 0;
        loop {
            let core = self.current();
            let result = op(core.clone()).await;
            if !self.reopened_after(&core, &result, &mut reopens).await? {
                return result;
            }
        }
    }

    /// `run` for a read into the caller's buffer.
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut reopens = 0;
        loop {
            let core = self.current();
            core.note_client_op();
            let result = core.read_into(offset, buf).await;
            if !self.reopened_after(&core, &result, &mut reopens).await? {
                return result;
            }
        }
    }

    /// Whether `result`, of a request to `core`, was a missing segment the
    /// view has now reopened past, so that the request should be tried
    /// again.
    async fn reopened_after<T>(
        &self,
        core: &Arc<Core>,
        result: &Result<T>,
        reopens: &mut usize,
    ) -> Result<bool> {
        let Err(VolumeError::SegmentMissing(name)) = result else {
            return Ok(false);
        };
        if *reopens == REOPENS_PER_REQUEST {
            return Ok(false);
        }
        if self.gone.load(Ordering::Relaxed) {
            return Err(VolumeError::SnapshotNotFound(self.gone_name()));
        }
        tracing::info!(volume = %core.location(), segment = %name,
            "a segment this view reads was cleaned away; reopening at the newest manifest");
        self.reopen(core).await?;
        *reopens += 1;
        Ok(true)
    }

    /// What a view whose snapshot or moment is gone says it missed.
    fn gone_name(&self) -> String {
        match &self.shows {
            Shows::Moment { at_ms, .. } => format!(
                "(the moment {} has left the retention window)",
                crate::info::utc(*at_ms)
            ),
            shows => shows.snapshot().unwrap_or_default().to_string(),
        }
    }

    pub fn reopens(&self) -> u64 {
        self.reopens.load(Ordering::Relaxed)
    }

    pub fn location(&self) -> &str {
        &self.backend.location
    }

    pub fn snapshot(&self) -> Option<&str> {
        self.shows.snapshot()
    }

    /// The moment of the retention window the view shows, if it does.
    pub fn moment(&self) -> Option<u64> {
        match self.shows {
            Shows::Moment { at_ms, .. } => Some(at_ms),
            _ => None,
        }
    }

    /// Replaces `stale` with a view of the newest manifest, unless another
    /// request did so first.
    async fn reopen(&self, stale: &Arc<Core>) -> Result<()> {
        let _one_at_a_time = self.reopening.lock().await;
        if !Arc::ptr_eq(&self.current(), stale) {
            return Ok(());
        }
        let view = match &self.shows {
            Shows::Head => View::Head,
            Shows::Snapshot(name) => View::Snapshot(name.clone()),
            Shows::Moment { at_ms, .. } => View::AsOf(*at_ms),
        };
        let fresh = match open::open_read_only(self.backend.clone(), &self.opts, view).await {
            Err(VolumeError::SnapshotNotFound(name)) => {
                self.gone.store(true, Ordering::Relaxed);
                return Err(VolumeError::SnapshotNotFound(name));
            }
            opened => opened?,
        };
        // The same snapshot (by name and LSN), or the same moment from
        // the same point: contents cleaning moved, never changed.
        let same = match &self.shows {
            Shows::Head => true,
            Shows::Snapshot(name) => fresh
                .snapshots()
                .iter()
                .any(|s| &s.name == name && s.lsn == self.lsn),
            Shows::Moment { .. } => fresh.shows == self.shows,
        };
        if !same {
            self.gone.store(true, Ordering::Relaxed);
            return Err(VolumeError::SnapshotNotFound(self.gone_name()));
        }
        // Requests still running on the stale view finish on it.
        *self.current.write() = fresh;
        self.reopens.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
