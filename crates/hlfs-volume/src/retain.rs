//! The retention window: time marks in the log, retention points in the
//! manifest, and finding the point a moment is opened from.
//!
//! While a window of `R` is on, every Data, Zero or Resize record follows
//! a Mark record of the millisecond it was appended in, so a moment `T`
//! holds exactly the records before the first Mark later than `T`. The
//! manifest keeps head checkpoints as retention points (snapshot entries
//! with a reserved name, and their replay segments): one every `R / 256`
//! (at most a minute apart unless that would make over 4096), one at every
//! reset of the head, and none older than the newest at or before
//! `now − R`. A moment is opened from the newest point at or before
//! it, replaying the log after the point up to the moment
//! (`open::open_read_only`). Cleaning keeps every segment from the oldest
//! point's replay segment on (`stats`). docs/design/retention.md has the
//! invariants.

use std::sync::atomic::Ordering;

use hlfs_format::{
    encode_header, Manifest, RecordKind, RetentionPoint, SnapshotEntry, RETENTION_POINT_PREFIX,
};

use crate::core::Core;
use crate::error::{Result, VolumeError};
use crate::lifecycle::Need;
use crate::log::Writer;

/// Points a window keeps, about: one every window ÷ this, or at least
/// every minute (a moment's replay is then at most a minute of writes)
/// up to `MAX_POINTS_PER_WINDOW`, which bounds the manifest.
const POINTS_PER_WINDOW: u64 = 256;
const MAX_POINT_EVERY_MS: u64 = 60_000;
const MAX_POINTS_PER_WINDOW: u64 = 4096;
const MIN_POINT_EVERY_MS: u64 = 1;
/// The most snapshot entries a manifest holds, points included, leaving
/// room below the format's bound.
const MAX_ENTRIES: usize = (1 << 20) - 1024;

/// The longest window: ten years, in milliseconds.
pub const MAX_RETAIN_MS: u64 = 10 * 366 * 86_400_000;

/// How long after a point the next one is due.
fn point_every(window_ms: u64) -> u64 {
    (window_ms / POINTS_PER_WINDOW)
        .min(MAX_POINT_EVERY_MS)
        .max(window_ms / MAX_POINTS_PER_WINDOW)
        .max(MIN_POINT_EVERY_MS)
}

/// Whether `name` is a retention point's snapshot entry.
pub(crate) fn is_point(name: &str) -> bool {
    name.starts_with(RETENTION_POINT_PREFIX)
}

/// A point of `m`: its snapshot entry and replay segment.
pub(crate) struct Point {
    pub entry: SnapshotEntry,
    pub replay_seg: u32,
}

/// The points of `m`, oldest first.
fn points(m: &Manifest) -> Vec<Point> {
    m.retention
        .points
        .iter()
        .filter_map(|p| {
            let entry = m.snapshots.iter().find(|s| s.name == p.name)?.clone();
            Some(Point {
                entry,
                replay_seg: p.replay_seg,
            })
        })
        .collect()
}

/// The point moment `t` is opened from: the newest at or before it.
pub(crate) fn point_for(m: &Manifest, t: u64) -> Option<Point> {
    points(m)
        .into_iter()
        .filter(|p| p.entry.created_ms <= t)
        .max_by_key(|p| (p.entry.created_ms, p.entry.lsn))
}

/// The time of the newest point, if any.
pub(crate) fn newest_point_ms(m: &Manifest) -> Option<u64> {
    points(m).iter().map(|p| p.entry.created_ms).max()
}

/// The first segment a moment of the window may replay: cleaning keeps it
/// and every later one. None without points.
pub(crate) fn replay_floor(m: &Manifest) -> Option<u32> {
    m.retention.points.iter().map(|p| p.replay_seg).min()
}

/// What a volume's retention window is now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RetentionInfo {
    /// The window's length; 0 when off.
    pub window_ms: u64,
    /// The oldest moment that can be opened (the oldest point's time);
    /// None when off or before the first point.
    pub oldest_ms: Option<u64>,
    pub points: usize,
}

pub(crate) fn info(m: &Manifest) -> RetentionInfo {
    let points = points(m);
    RetentionInfo {
        window_ms: m.retention.window_ms,
        oldest_ms: points.iter().map(|p| p.entry.created_ms).min(),
        points: points.len(),
    }
}

impl Core {
    /// Before a record a client's write, zero or resize appends: a Mark of
    /// the millisecond, if retention is on and the last Mark is older.
    /// Marks never go back: a clock that steps back is held at the last.
    pub(crate) fn mark_time(&self, w: &mut Writer) -> Result<()> {
        if !self.log.marking.load(Ordering::Relaxed) {
            return Ok(());
        }
        let now = self.clock.unix_ms();
        let last = self.log.last_mark_ms.load(Ordering::Relaxed);
        let due = w.mark_due_ms.take();
        if due.is_none() && now <= last {
            return Ok(());
        }
        let t = now.max(due.unwrap_or(0)).max(last);
        let header = encode_header(RecordKind::Mark, &self.uuid, w.next_lsn, t, 0, &[]);
        self.append(w, &[&header])?;
        self.log.last_mark_ms.fetch_max(t, Ordering::Relaxed);
        Ok(())
    }

    /// In the manifest that makes a head checkpoint (after its edit): a
    /// new point when one is due, always if the head was `reset` to an
    /// older tree; then the points no moment of the window needs dropped.
    /// Returns the new point's time, if one was made.
    pub(crate) fn note_head(&self, m: &mut Manifest, reset: bool) -> Option<u64> {
        let window = m.retention.window_ms;
        if window == 0 || m.checkpoint.is_empty() {
            return None;
        }
        let newest = points(m).last().map(|p| p.entry.created_ms);
        // Never earlier than a Mark the point holds, nor than the last point.
        let now = self
            .clock
            .unix_ms()
            .max(self.log.last_mark_ms.load(Ordering::Relaxed))
            .max(newest.unwrap_or(0));
        let due = reset || newest.is_none_or(|t| now >= t.saturating_add(point_every(window)));
        let made = (due && m.snapshots.len() < MAX_ENTRIES).then_some(now);
        if made.is_some() {
            let lsn = m.replay_from_lsn - 1;
            let mut name = format!("{RETENTION_POINT_PREFIX}{lsn}");
            let mut k = 1;
            while m.snapshots.iter().any(|s| s.name == name) {
                name = format!("{RETENTION_POINT_PREFIX}{lsn}-{k}");
                k += 1;
            }
            m.snapshots.push(SnapshotEntry {
                name: name.clone(),
                checkpoint: m.checkpoint,
                lsn,
                created_ms: now,
                automatic: true,
            });
            m.retention.points.push(RetentionPoint {
                name,
                replay_seg: m.replay_from_seg,
            });
        }
        let cutoff = now.saturating_sub(window);
        // The newest point at or before the window's start opens its
        // oldest moments; those before it are needed no more.
        let keep_from = points(m)
            .iter()
            .rposition(|p| p.entry.created_ms <= cutoff)
            .unwrap_or(0);
        let dropped: Vec<String> = m.retention.points[..keep_from]
            .iter()
            .map(|p| p.name.clone())
            .collect();
        m.retention.points.drain(..keep_from);
        m.snapshots.retain(|s| !dropped.contains(&s.name));
        made
    }

    /// Turns the retention window on (`window_ms` > 0, with a first point
    /// now) or off (its points go).
    pub(crate) async fn set_retention(&self, window_ms: u64) -> Result<()> {
        if window_ms > MAX_RETAIN_MS {
            return Err(VolumeError::InvalidArgument(format!(
                "a retention window of {window_ms} ms is longer than ten years"
            )));
        }
        self.life.check(Need::Write)?;
        let mut w = self.log.writer.lock().await;
        self.life.check(Need::Write)?;
        if window_ms > 0 {
            self.allow_format(RecordKind::Mark.version()).await?;
        }
        self.checkpoint(&mut w, true, |m, _, _| {
            let was = m.retention.window_ms;
            m.retention.window_ms = window_ms;
            if window_ms == 0 {
                let names: Vec<String> = m.retention.points.drain(..).map(|p| p.name).collect();
                m.snapshots.retain(|s| !names.contains(&s.name));
            } else if was == 0 {
                m.retention.points.clear();
            }
            Ok(())
        })
        .await?;
        self.log.marking.store(window_ms > 0, Ordering::Relaxed);
        Ok(())
    }
}
