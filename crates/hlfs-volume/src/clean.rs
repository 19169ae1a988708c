//! Segment cleaning: space back from segments, whoever holds them.
//!
//! A pass takes victims among the sealed segments (from a recount,
//! [`space`]), scans each once, and gathers the blocks the head or a
//! snapshot holds there, and the pages. Nothing moves until a commit
//! (every 16 MiB gathered, and at the end), which under the writer lock
//! looks every gathered block up again in every root, appends those still
//! held as copy records (format v2, never replayed) into segments of their
//! own, points every root that held one at its one copy, makes the pages
//! dirty in every root that reaches them, and, if a snapshot changed,
//! gives it a checkpoint record of its own, writes pages equal between
//! roots once, and checkpoints the head with the snapshots' new
//! checkpoints in its manifest. The head's own moves wait for its next
//! checkpoint, as its writes do. A commit that fails puts the head's
//! blocks back.
//!
//! Which segments are deleted is decided by the recount alone, never by
//! what a pass believes it moved: a victim is deleted once a recount whose
//! head checkpoint follows its pass's last commit finds nothing in it that
//! any root reaches, and a grace period on the volume's clock has passed
//! since (for readers of older manifests, which then reopen: `follow.rs`).
//! That is
//! safe because reachability only shrinks: every root made later (a
//! snapshot, a rollback's head, the head as it is written) is made of
//! items some root held then and of items in newer segments. A pass that
//! misses an item, or races a snapshot that takes one, leaves its victim
//! live and nothing is lost.
//!
//! Views this process has open of snapshots deleted since are roots too
//! (`stats::ViewRoot`); other views follow the volume (`follow.rs`).
//!
//! See docs/design/cleaning.md for the whole design and what is not built
//! yet (cold segments, the persisted condemned list, retention).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hlfs_format::{parse_segment_name, segment_name, Entry, RecordKind, SnapshotEntry, HEADER_LEN};
use hlfs_store::StoreError;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{checkpoint_of, SharedPages};
use crate::core::Core;
use crate::error::{Result, VolumeError};
use crate::lifecycle::Need;
use crate::log::Writer;
use crate::map::{DirtyTree, SegmentUsage};
use crate::options::AutoClean;
use crate::runner::TaskContext;
use crate::segments::{ScanStop, Scanner};
use crate::stats::{space, SegmentSpace, SpaceStats};
use crate::write::MAX_RECORD_BYTES;

/// What a cleaning run aims at and how it may go about it.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Clean until stored bytes ≤ `target` × live bytes (or nothing more
    /// can be cleaned).
    pub target: f64,
    /// How long a victim stays in the store after the manifest that no
    /// longer needs it, for readers that opened an older one.
    pub grace: Duration,
    /// Live bytes one pass moves at most (it may take one victim more).
    pub pass_bytes: u64,
    /// Bytes of blocks a pass gathers before it copies them, under the
    /// writer lock, in one go: bounds its memory and that hold.
    pub commit_bytes: usize,
    /// Do nothing unless stored is above this × live (the automatic
    /// cleaner's start mark).
    pub start_above: Option<f64>,
    /// Live bytes copied per second at most; `None` copies as fast as the
    /// writer lock allows.
    pub copy_rate: Option<u64>,
    /// While clients are busy (a read or write in the last 100 ms),
    /// bytes scanned and copied per second at most, so that foreground
    /// I/O keeps priority; `None` does not yield. With `start_above`, the
    /// rate rises with stored ÷ live, from this at the target to the copy
    /// rate at the start mark, and above the mark the cleaner does not
    /// yield: steady writes cannot carry stored past it for long.
    pub busy_rate: Option<u64>,
    /// Go on while clients' writes make garbage as fast as passes free it
    /// (the automatic cleaner, which holds its target under steady
    /// writes). Without it, a run stops once a pass gives nothing back.
    pub keep_up: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            target: 1.2,
            grace: Duration::from_secs(60),
            pass_bytes: 64 << 20,
            commit_bytes: 16 << 20,
            start_above: None,
            copy_rate: None,
            busy_rate: None,
            keep_up: false,
        }
    }
}

/// What cleaning has done since the volume was opened.
#[derive(Default)]
pub(crate) struct CleanCounts {
    pub runs: AtomicU64,
    pub passes: AtomicU64,
    pub deleted_segments: AtomicU64,
    pub freed_bytes: AtomicU64,
    pub copied_bytes: AtomicU64,
}

impl CleanCounts {
    fn add(&self, r: &GcReport) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.passes.fetch_add(r.passes as u64, Ordering::Relaxed);
        self.deleted_segments
            .fetch_add(r.deleted_segments as u64, Ordering::Relaxed);
        self.freed_bytes.fetch_add(r.freed_bytes, Ordering::Relaxed);
        self.copied_bytes
            .fetch_add(r.copied_bytes, Ordering::Relaxed);
    }
}

/// Where a cleaning run is, told after each recount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcProgress {
    pub passes: u32,
    /// Stored bytes, not counting victims waiting to be deleted.
    pub stored_bytes: u64,
    pub live_bytes: u64,
    /// Stored bytes the run aims at.
    pub target_bytes: u64,
}

/// Why a cleaning run stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GcStop {
    /// Stored ≤ target × live.
    TargetReached,
    /// What is left to reclaim lies in segments recovery may replay, in
    /// segments too full to be worth copying, or in segments no pass could
    /// empty.
    NothingCleanable,
    /// The volume is closing; emptied segments not deleted yet are found
    /// empty, and deleted first, by the next run.
    Interrupted,
}

/// What a cleaning run did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GcReport {
    pub passes: u32,
    /// Segments deleted, and their bytes.
    pub deleted_segments: u32,
    pub freed_bytes: u64,
    /// Live bytes appended again to empty the victims.
    pub copied_bytes: u64,
    /// Bytes of what cut-off puts left beside the store's blobs (a local
    /// store's staging files), removed.
    #[serde(default)]
    pub swept_bytes: u64,
    pub stored_before: u64,
    pub live_before: u64,
    pub stored_after: u64,
    pub live_after: u64,
    pub stopped: GcStop,
}

/// A cleaner held to a copy rate waits once it is this far ahead of it.
const PACE_SLACK: Duration = Duration::from_millis(10);

/// How a pass ended.
enum Pass {
    /// The data bytes it copied, and the LSN after its last commit: a
    /// recount judges its victims once the head's checkpoint follows it.
    Committed { copied: u64, judge_after_lsn: u64 },
    /// Cleaning was stopped: what it gathered since its last commit is
    /// dropped, and its victims stay; the bytes its commits copied.
    Stopped(u64),
}

/// Clients count as busy for this long after a request of theirs.
const BUSY_WINDOW: Duration = Duration::from_millis(100);

/// Segments more live than this are not worth copying: the copy would be
/// nearly as large, and its own metadata garbage again.
const MAX_VICTIM_USE: f64 = 0.9;

/// A segment a pass emptied, or that nothing reached at all: deleted once
/// a recount has found it empty and its grace is over.
pub(crate) struct Condemned {
    id: u32,
    size: u64,
    waits: Wait,
}

/// What a condemned segment waits for.
#[derive(Clone, Copy)]
enum Wait {
    /// A pass's victim, not judged yet: recounts read the store's head, so
    /// one judges it only once the manifest's head checkpoint follows this
    /// LSN, the one after the pass's last commit (the head's moves out of
    /// it are durable then).
    Judgement { after_lsn: u64 },
    /// Found empty: deleted once this time (ms on the volume's clock) is
    /// past.
    Grace { due_ms: u64 },
}

impl Condemned {
    fn judged(&self) -> bool {
        matches!(self.waits, Wait::Grace { .. })
    }

    fn due_ms(&self) -> Option<u64> {
        match self.waits {
            Wait::Grace { due_ms } => Some(due_ms),
            Wait::Judgement { .. } => None,
        }
    }
}

/// Blocks a pass found live in its victims, to copy at its next commit:
/// where each was, and its bytes (block `i` at `i * block_size`).
#[derive(Default)]
struct Gathered {
    blocks: Vec<Moving>,
    data: Vec<u8>,
    /// When their data was made, at the latest (ms since the epoch): the
    /// age a segment of their copies has.
    made_ms: u64,
}

impl Gathered {
    fn push(&mut self, m: &Moving, block: &[u8]) {
        self.blocks.push(Moving {
            lba: m.lba,
            at: m.at,
        });
        self.data.extend_from_slice(block);
    }

    /// Index ranges of consecutive block numbers.
    fn runs(&self) -> Vec<std::ops::Range<usize>> {
        let mut runs = Vec::new();
        let mut start = 0;
        for i in 1..=self.blocks.len() {
            if i == self.blocks.len() || self.blocks[i].lba != self.blocks[i - 1].lba + 1 {
                runs.push(start..i);
                start = i;
            }
        }
        runs
    }
}

/// A snapshot's tree as a commit rewrites it: pointed at the copies of
/// what it held in the victims, then given a checkpoint record of its own.
struct SnapshotTree {
    /// As the manifest listed it when the commit began.
    entry: SnapshotEntry,
    size: u64,
    blocks: u64,
    tree: parking_lot::Mutex<DirtyTree>,
    /// Its root page when the commit began: the tree changed if its root
    /// moved.
    root: Entry,
}

impl SnapshotTree {
    /// Whether a commit pointed it at a copy.
    fn changed(&self) -> bool {
        let tree = self.tree.lock();
        tree.is_dirty() || tree.root() != self.root
    }
}

/// A block found in a victim.
struct Moving {
    lba: u64,
    at: Entry,
}

impl Core {
    /// Marks clients as busy now; the façade calls it on each read and
    /// write.
    pub(crate) fn note_client_op(&self) {
        let now = self.clock.now().as_nanos() as u64 + 1;
        self.last_client_op.store(now, Ordering::Relaxed);
    }

    /// Whether a client asked for a read or a write within the last
    /// [`BUSY_WINDOW`], before the pass started as well as during it.
    pub(crate) fn clients_busy(&self, now: Duration) -> bool {
        match self.last_client_op.load(Ordering::Relaxed) {
            0 => false,
            last => now.saturating_sub(Duration::from_nanos(last - 1)) < BUSY_WINDOW,
        }
    }

    /// Whether a client asked for a read or a write at `since` or later.
    fn client_op_since(&self, since: Duration) -> bool {
        match self.last_client_op.load(Ordering::Relaxed) {
            0 => false,
            last => Duration::from_nanos(last - 1) >= since,
        }
    }

    /// Cleans until stored ≤ `opts.target` × live, or until nothing more
    /// can be cleaned, deleting the emptied segments once their grace
    /// period is over, and, whatever the target, every segment nothing
    /// reaches (the sweep). One run at a time per volume.
    pub(crate) async fn gc(
        &self,
        opts: &GcOptions,
        progress: &(dyn Fn(&GcProgress) + Send + Sync),
    ) -> Result<GcReport> {
        if !(opts.target >= 1.0 && opts.target.is_finite()) {
            return Err(VolumeError::InvalidArgument(format!(
                "the space target must be a number ≥ 1 (stored ÷ live), not {}",
                opts.target
            )));
        }
        self.life.check(Need::Write)?;
        if *self.cleaning_stopped.borrow() {
            return Err(VolumeError::Closed);
        }
        let mut condemned = self.cleaning.lock().await;
        let report = self.gc_run(opts, progress, &mut condemned).await?;
        self.clean_counts.add(&report);
        Ok(report)
    }

    async fn gc_run(
        &self,
        opts: &GcOptions,
        progress: &(dyn Fn(&GcProgress) + Send + Sync),
        condemned: &mut Vec<Condemned>,
    ) -> Result<GcReport> {
        // Checkpointed first, the recounts are exact: nothing is left for
        // recovery to replay, which would count as wholly live (and hide
        // the garbage its writes made).
        self.checkpoint_now().await?;
        // Best effort: what a crashed put left is never read, and a store
        // that cannot say now will be asked again by the next run.
        let swept_bytes = match self.store.sweep_leftovers().await {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(volume = %self.location(), error = %e, "cannot sweep the store's leftovers");
                0
            }
        };
        // Victims a pass could not empty: not tried again in this run.
        let mut stuck: HashSet<u32> = HashSet::new();
        let mut passes = 0;
        let mut copied_bytes = 0;
        let mut freed_bytes = 0;
        // Of which deleted since the last recount (which still lists them).
        let mut freed_since_recount;
        let mut deleted_segments = 0;
        let mut before = None;
        let mut last_garbage = u64::MAX;
        let mut last_pass_started = None;
        let grace_ms = u64::try_from(opts.grace.as_millis()).unwrap_or(u64::MAX);
        let mut stop = self.cleaning_stopped.subscribe();
        // A user's run checkpoints once before it ends, so that its last
        // passes' victims are judged (and deleted after their grace).
        let mut settled = false;
        let (stats, mut stopped) = 'passes: loop {
            let mut stats = self
                .recount_and_judge(condemned, &mut stuck, grace_ms)
                .await?;
            // The sweep: whatever target, segments nothing reaches go,
            // such as those a crash left between an upload and the
            // manifest that would have named them.
            let now_ms = self.clock.unix_ms();
            for s in &stats.segments {
                let known = condemned.iter().any(|c| c.id == s.id) || stuck.contains(&s.id);
                if s.live_bytes == 0 && !s.recent && s.view_bytes == 0 && !known {
                    condemned.push(Condemned {
                        id: s.id,
                        size: s.size,
                        waits: Wait::Grace {
                            due_ms: now_ms.saturating_add(grace_ms),
                        },
                    });
                }
            }
            // Those whose grace is over go now, so that a long run (one
            // keeping up with writes) gives space back as it goes.
            let due = self.delete_due_in(condemned).await?;
            stats.segments.retain(|s| !due.iter().any(|c| c.id == s.id));
            freed_since_recount = due.iter().map(|c| c.size).sum();
            deleted_segments += due.len() as u32;
            freed_bytes += freed_since_recount;
            // Only what is still listed: a listing may lag a delete.
            let waiting: u64 = condemned
                .iter()
                .filter(|c| stats.segments.iter().any(|s| s.id == c.id))
                .map(|c| c.size)
                .sum();
            let stored = stats
                .stored_bytes
                .saturating_sub(waiting + freed_since_recount);
            let garbage = stored.saturating_sub(stats.live_bytes);
            let target_bytes = (opts.target * stats.live_bytes as f64) as u64;
            let first = before.is_none();
            before.get_or_insert((stats.stored_bytes, stats.live_bytes));
            progress(&GcProgress {
                passes,
                stored_bytes: stored,
                live_bytes: stats.live_bytes,
                target_bytes,
            });
            let below_start = opts
                .start_above
                .is_some_and(|start| stored as f64 <= start * stats.live_bytes as f64);
            let chosen = 'choose: {
                if stored <= target_bytes || (first && below_start) {
                    break 'choose Err(GcStop::TargetReached);
                }
                if *stop.borrow_and_update() {
                    break 'passes (stats, GcStop::Interrupted);
                }
                // A pass that gave nothing back would be followed by
                // another just like it. (Garbage, not stored bytes: clients
                // may be writing meanwhile.) A run keeping up with writes
                // goes on while they make garbage as fast as it frees it:
                // each pass still empties its victims, or leaves them stuck.
                let writing = opts.keep_up
                    && last_pass_started.is_some_and(|since| self.client_op_since(since));
                if garbage >= last_garbage && !writing {
                    break 'choose Err(GcStop::NothingCleanable);
                }
                last_garbage = garbage;
                let skip: HashSet<u32> = condemned
                    .iter()
                    .map(|c| c.id)
                    .chain(stuck.iter().copied())
                    .collect();
                let ages = self.copy_ages.lock();
                match choose_victims(&stats, &skip, opts.pass_bytes, now_ms, &ages) {
                    victims if victims.is_empty() => Err(GcStop::NothingCleanable),
                    victims => Ok(victims),
                }
            };
            let victims = match chosen {
                Ok(victims) => victims,
                // A run keeping up with writes leaves its last victims to
                // the cleaner's next tick, whose run judges them.
                Err(_) if !opts.keep_up && !settled && condemned.iter().any(|c| !c.judged()) => {
                    settled = true;
                    self.checkpoint_now().await?;
                    continue;
                }
                Err(end) => break (stats, end),
            };
            tracing::debug!(
                volume = %self.location(),
                stored,
                live = stats.live_bytes,
                victims = ?victims.iter().map(|v| (v.id, v.live_bytes * 100 / v.size.max(1))).collect::<Vec<_>>(),
                "cleaning pass: victims (id, % live)"
            );
            last_pass_started = Some(self.clock.now());
            let busy_rate = busy_rate_at(opts, stored, stats.live_bytes);
            let mut deleted = Vec::new();
            let pass = self
                .clean_pass(&victims, opts, busy_rate, condemned, &mut deleted)
                .await;
            deleted_segments += deleted.len() as u32;
            freed_bytes += deleted.iter().map(|c| c.size).sum::<u64>();
            let (copied, judge_after_lsn) = match pass? {
                Pass::Committed {
                    copied,
                    judge_after_lsn,
                } => (copied, judge_after_lsn),
                Pass::Stopped(copied) => {
                    copied_bytes += copied;
                    break (stats, GcStop::Interrupted);
                }
            };
            copied_bytes += copied;
            passes += 1;
            condemned.extend(victims.iter().map(|v| Condemned {
                id: v.id,
                size: v.size,
                waits: Wait::Judgement {
                    after_lsn: judge_after_lsn,
                },
            }));
        };
        let (stored_before, live_before) = before.expect("one recount at least");
        // A run keeping up with writes leaves what is not due yet to the
        // cleaner's next ticks, rather than stand still through the grace
        // while clients write. A user's run waits it out.
        while !opts.keep_up && condemned.iter().any(Condemned::judged) {
            let due = condemned
                .iter()
                .filter_map(Condemned::due_ms)
                .min()
                .unwrap_or(0);
            let now = self.clock.unix_ms();
            if due > now {
                tokio::select! {
                    () = self.clock.sleep(Duration::from_millis(due - now)) => {}
                    _ = stop.wait_for(|stop| *stop) => {
                        stopped = GcStop::Interrupted;
                        break;
                    }
                }
            }
            let gone = self.delete_due_in(condemned).await?;
            let bytes: u64 = gone.iter().map(|c| c.size).sum();
            deleted_segments += gone.len() as u32;
            freed_bytes += bytes;
            freed_since_recount += bytes;
        }
        Ok(GcReport {
            passes,
            deleted_segments,
            freed_bytes,
            copied_bytes,
            swept_bytes,
            stored_before,
            live_before,
            stored_after: stats.stored_bytes.saturating_sub(freed_since_recount),
            live_after: stats.live_bytes,
            stopped,
        })
    }

    /// A recount, which judges the victims whose passes' moves the
    /// store's head holds: one that still holds something some root
    /// reaches is kept, and not tried again in this run (`stuck`); the
    /// others wait out their grace from now.
    async fn recount_and_judge(
        &self,
        condemned: &mut Vec<Condemned>,
        stuck: &mut HashSet<u32>,
        grace_ms: u64,
    ) -> Result<SpaceStats> {
        // Read before the recount, whose manifest is then as new or newer.
        let covered = self.manifests.read(|m| m.replay_from_lsn);
        let stats = space(self.backend.clone()).await?;
        self.life.check(Need::Write)?;
        let now_ms = self.clock.unix_ms();
        condemned.retain_mut(|c| {
            if matches!(c.waits, Wait::Judgement { after_lsn } if after_lsn > covered) {
                return true;
            }
            let live = stats
                .segments
                .iter()
                .any(|s| s.id == c.id && s.live_bytes > 0);
            if live {
                tracing::warn!(
                    segment = c.id,
                    "a cleaning pass left items in its victim; it is kept"
                );
                stuck.insert(c.id);
                return false;
            }
            if !c.judged() {
                c.waits = Wait::Grace {
                    due_ms: now_ms.saturating_add(grace_ms),
                };
            }
            true
        });
        Ok(stats)
    }

    /// Deletes the condemned segments whose grace is over, and returns
    /// them. Each was found empty by a recount whose head checkpoint
    /// followed its pass, and nothing can reach it since.
    async fn delete_due_in(&self, condemned: &mut Vec<Condemned>) -> Result<Vec<Condemned>> {
        let now = self.clock.unix_ms();
        let (due, waiting) = std::mem::take(condemned)
            .into_iter()
            .partition(|c| c.due_ms().is_some_and(|due| due <= now));
        *condemned = waiting;
        for c in &due {
            self.delete_segment(c.id).await?;
        }
        Ok(due)
    }

    /// Deletes what runs keeping up with writes left condemned, once due;
    /// returns the bytes still waiting to go, and whether some of them
    /// wait for a run to judge them.
    async fn delete_left_behind(&self) -> Result<(u64, bool)> {
        let mut condemned = self.cleaning.lock().await;
        let due = self.delete_due_in(&mut condemned).await?;
        let counts = &self.clean_counts;
        counts
            .deleted_segments
            .fetch_add(due.len() as u64, Ordering::Relaxed);
        counts
            .freed_bytes
            .fetch_add(due.iter().map(|c| c.size).sum(), Ordering::Relaxed);
        Ok((
            condemned.iter().map(|c| c.size).sum(),
            condemned.iter().any(|c| !c.judged()),
        ))
    }

    /// Makes a cleaning run stop as soon as it safely can, and refuses
    /// runs from now on.
    pub(crate) fn stop_cleaning(&self) {
        self.cleaning_stopped.send_replace(true);
    }

    /// Moves the items of the head and of the snapshots out of `victims`.
    /// The scan only gathers what some root holds (and pages); nothing
    /// moves until a commit, which copies under the writer lock what the
    /// roots still hold then, into segments of their own, and points every
    /// root at the copies in one checkpoint: a pass stopped, or a crash,
    /// before a commit leaves every root where it was.
    async fn clean_pass(
        &self,
        victims: &[&SegmentSpace],
        opts: &GcOptions,
        busy_rate: Option<u64>,
        condemned: &mut Vec<Condemned>,
        deleted: &mut Vec<Condemned>,
    ) -> Result<Pass> {
        let bs = self.block_size as usize;
        let (copy_rate, commit_bytes) = (opts.copy_rate, opts.commit_bytes.max(bs));
        let mut copied = 0;
        let mut pages = Vec::new();
        let started = self.clock.now();
        // The time the pass owes its rates so far.
        let mut owed = Duration::ZERO;
        let mut stop = self.cleaning_stopped.subscribe();
        // The snapshots, to tell which blocks to gather (with the head);
        // loaded again whenever they change, so that a block the head
        // gave up after a snapshot took it is gathered too.
        let mut trees = self.snapshot_trees().await?;
        let made_ms = {
            let ages = self.copy_ages.lock();
            victims
                .iter()
                .map(|v| ages.get(&v.id).copied().unwrap_or(v.made_ms))
                .max()
                .unwrap_or(0)
        };
        let mut gathered = Gathered {
            made_ms,
            ..Gathered::default()
        };
        for v in victims {
            let source = self.segments.scan_source(v.id).await?;
            let mut scan = Scanner::new(source, v.size);
            loop {
                let (off, header, payload) = match scan.next(&self.uuid).await? {
                    Ok(record) => record,
                    Err(ScanStop::End) => break,
                    Err(ScanStop::Unwritten { offset }) => {
                        return Err(VolumeError::corrupt(format!(
                            "{} offset {offset}: zeros where a record should start",
                            segment_name(v.id)
                        )))
                    }
                    Err(ScanStop::Invalid { offset, reason, .. }) => {
                        return Err(VolumeError::corrupt(format!(
                            "{} offset {offset}: {reason}",
                            segment_name(v.id)
                        )))
                    }
                };
                let mut moving_bytes = 0;
                match header.kind {
                    RecordKind::Data | RecordKind::Copy => {
                        let base = off + HEADER_LEN as u64;
                        let moving: Vec<Moving> = payload
                            .chunks(bs)
                            .enumerate()
                            .map(|(k, block)| Moving {
                                lba: header.arg0 + k as u64,
                                at: Entry {
                                    seg: v.id,
                                    off: (base + (k * bs) as u64) as u32,
                                    crc: crc32c::crc32c(block),
                                },
                            })
                            .collect();
                        let listed = self.snapshot_roots();
                        if !trees.iter().map(|t| t.entry.checkpoint).eq(listed) {
                            trees = self.snapshot_trees().await?;
                        }
                        let live = self.held_by_any(&trees, &moving).await?;
                        for (k, m) in moving.iter().enumerate() {
                            if live[k] {
                                gathered.push(m, &payload[k * bs..(k + 1) * bs]);
                                moving_bytes += bs as u64;
                            }
                        }
                    }
                    RecordKind::MapPage => pages.push((
                        header.arg0 as u32,
                        header.arg1,
                        Entry {
                            seg: v.id,
                            off: off as u32,
                            crc: header.crc,
                        },
                    )),
                    _ => {}
                }
                if *stop.borrow_and_update() {
                    // What was gathered since the last commit is dropped:
                    // no root points at anything new.
                    return Ok(Pass::Stopped(copied));
                }
                if gathered.data.len() >= commit_bytes {
                    copied += self
                        .commit_moves(&mut gathered, &mut trees, &[], &[])
                        .await?
                        .0;
                    // Earlier passes' victims need no wait for this one.
                    deleted.extend(self.delete_due_in(condemned).await?);
                }
                // Busy clients: this record's bytes at the busy rate.
                // Otherwise its copies at the copy rate.
                let busy = self.clients_busy(self.clock.now());
                let cost = match (busy, busy_rate, copy_rate) {
                    (true, Some(rate), _) if rate > 0 => {
                        let bytes = (HEADER_LEN + payload.len()) as u64 + moving_bytes;
                        Some(bytes as f64 / rate as f64)
                    }
                    (_, _, Some(rate)) if rate > 0 => Some(moving_bytes as f64 / rate as f64),
                    _ => None,
                };
                if let Some(cost) = cost {
                    owed += Duration::from_secs_f64(cost);
                    // Ahead of the rates by more than a few milliseconds:
                    // wait until they catch up.
                    let ahead = owed.saturating_sub(self.clock.now() - started);
                    if ahead >= PACE_SLACK {
                        tokio::select! {
                            () = self.clock.sleep(ahead) => {}
                            _ = stop.wait_for(|stop| *stop) => return Ok(Pass::Stopped(copied)),
                        }
                    }
                }
            }
        }
        let (last, judge_after_lsn) = self
            .commit_moves(&mut gathered, &mut trees, victims, &pages)
            .await?;
        Ok(Pass::Committed {
            copied: copied + last,
            judge_after_lsn,
        })
    }

    /// The checkpoints of the snapshots, as the manifest lists them now.
    fn snapshot_roots(&self) -> Vec<Entry> {
        self.manifests
            .read(|m| m.snapshots.iter().map(|s| s.checkpoint).collect())
    }

    /// The snapshots' trees, as the manifest lists them now.
    async fn snapshot_trees(&self) -> Result<Vec<SnapshotTree>> {
        let listed = self.manifests.read(|m| m.snapshots.clone());
        let mut trees = Vec::with_capacity(listed.len());
        for entry in listed {
            let (cp, _) = self.segments.read_checkpoint(entry.checkpoint).await?;
            let usage =
                SegmentUsage::from_checkpoint(self.block_size, cp.allocated_blocks, &cp.usage);
            let tree = DirtyTree::new(self.uuid, self.pages.clone(), cp.root, cp.depth, usage);
            trees.push(SnapshotTree {
                entry,
                size: cp.size,
                blocks: cp.size.div_ceil(self.block_size as u64),
                tree: parking_lot::Mutex::new(tree),
                root: cp.root,
            });
        }
        Ok(trees)
    }

    /// Which of the blocks of `moving` the head or one of `trees` holds.
    async fn held_by_any(&self, trees: &[SnapshotTree], moving: &[Moving]) -> Result<Vec<bool>> {
        let mut live = self.held_by_head(moving).await?;
        for held in self.held_by_snapshots(trees, moving).await? {
            for (l, h) in live.iter_mut().zip(held) {
                *l |= h;
            }
        }
        Ok(live)
    }

    /// Which of the blocks of `moving` the head holds now.
    async fn held_by_head(&self, moving: &[Moving]) -> Result<Vec<bool>> {
        let Some(first) = moving.first() else {
            return Ok(Vec::new());
        };
        let mut current = vec![Entry::EMPTY; moving.len()];
        self.map_op(|m, pins| m.lookup(first.lba, &mut current, pins))
            .await?;
        Ok(current
            .iter()
            .zip(moving)
            .map(|(c, m)| *c == m.at)
            .collect())
    }

    /// For each snapshot tree, which of the blocks of `moving` it holds.
    async fn held_by_snapshots(
        &self,
        trees: &[SnapshotTree],
        moving: &[Moving],
    ) -> Result<Vec<Vec<bool>>> {
        let Some(first) = moving.first() else {
            return Ok(vec![Vec::new(); trees.len()]);
        };
        let mut held = Vec::with_capacity(trees.len());
        for t in trees {
            let mut current = vec![Entry::EMPTY; moving.len()];
            // Past a snapshot's size (the volume grew since) it has no
            // blocks, and lookups there would wrap onto its root's slots.
            let within = t.blocks.saturating_sub(first.lba).min(moving.len() as u64) as usize;
            if within > 0 {
                self.tree_op(&t.tree, |m, pins| {
                    m.lookup(first.lba, &mut current[..within], pins)
                })
                .await?;
            }
            held.push(
                current
                    .iter()
                    .zip(moving)
                    .map(|(c, m)| *c == m.at)
                    .collect(),
            );
        }
        Ok(held)
    }

    /// Commits what a pass gathered, under the writer lock, so that no
    /// write, snapshot or rollback comes between its looks and its moves:
    /// the blocks the head or a snapshot still holds are appended as copy
    /// records (never replayed: until the commit's manifest, recovery
    /// finds every root where it was), into a segment of their own (cold
    /// data apart from fresh writes), and every root that held one points
    /// at its one copy; the pages found in the victims (`pages`) move in
    /// every root; each snapshot that changed, or whose checkpoint record
    /// is in a victim, gets a checkpoint record of its own (contents and
    /// LSN the same, only its place changes), pages equal between roots
    /// are written once (`SharedPages`), and a checkpoint of the head
    /// whose manifest points the snapshots at their new records commits.
    /// A commit that moved the head's items alone leaves them to the
    /// head's next checkpoint. Returns the bytes copied, and the LSN after
    /// the commit.
    async fn commit_moves(
        &self,
        gathered: &mut Gathered,
        trees: &mut Vec<SnapshotTree>,
        victims: &[&SegmentSpace],
        pages: &[(u32, u64, Entry)],
    ) -> Result<(u64, u64)> {
        let next = Gathered {
            made_ms: gathered.made_ms,
            ..Gathered::default()
        };
        let gathered = std::mem::replace(gathered, next);
        let mut w = self.log.writer.lock().await;
        self.life.check(Need::Write)?;
        // The snapshots as they are now: those taken since the pass began
        // hold the same old blocks as the head did, and move with it. The
        // pass's trees serve while the snapshots have not changed (only a
        // commit changes those trees); the commit uses them up, so the
        // pass loads them again after it.
        let trees = if trees
            .iter()
            .map(|t| t.entry.checkpoint)
            .eq(self.snapshot_roots())
        {
            std::mem::take(trees)
        } else {
            trees.clear();
            self.snapshot_trees().await?
        };
        // No checkpoint of the head may fall due before the commit's own:
        // it would make the head's new places durable before the
        // snapshots' (and, with a retention window, make a point these
        // trees do not hold).
        let _held = self.log.hold_checkpoints();
        if !gathered.blocks.is_empty() {
            self.allow_format(RecordKind::Copy.version()).await?;
            // Cold data starts a segment of its own.
            if w.pos > 0 {
                self.seal_in_background(&mut w).await?;
            }
        }
        let mut moved_in_head = Vec::new();
        let committed = self
            .commit_locked(
                &mut w,
                &gathered,
                &trees,
                victims,
                pages,
                &mut moved_in_head,
            )
            .await;
        if let Err(e) = &committed {
            self.undo_head_moves(&moved_in_head, e).await;
        }
        committed.map(|copied| (copied, w.next_lsn))
    }

    /// Puts the head's blocks a failed commit moved (block, old place,
    /// copy) back where they were, so that the head and its snapshots stay
    /// equal: the old places are still there, as no victim was condemned.
    /// If that fails too, the volume fails, and recovery (which never
    /// replays copies) finds the head as it was.
    async fn undo_head_moves(&self, moved: &[(u64, Entry, Entry)], why: &VolumeError) {
        for &(block, old, copy) in moved.iter().rev() {
            let undone = self
                .map_op(|m, pins| {
                    let mut now = [Entry::EMPTY];
                    m.lookup(block, &mut now, pins)?;
                    if now[0] == copy {
                        m.set(block, &[old], pins)?;
                    }
                    Ok(())
                })
                .await;
            if let Err(e) = undone {
                self.life.fail(VolumeError::Failed(format!(
                    "a cleaning commit failed ({why}) and could not be undone: {e}"
                )));
                return;
            }
        }
    }

    /// `commit_moves` under the writer lock, noting in `moved_in_head`
    /// each head block it moved.
    async fn commit_locked(
        &self,
        w: &mut Writer,
        gathered: &Gathered,
        trees: &[SnapshotTree],
        victims: &[&SegmentSpace],
        pages: &[(u32, u64, Entry)],
        moved_in_head: &mut Vec<(u64, Entry, Entry)>,
    ) -> Result<u64> {
        let mut shared = SharedPages::new();
        let copied = self
            .copy_gathered(w, gathered, trees, &mut shared, moved_in_head)
            .await?;
        for &(level, index, at) in pages {
            self.map_op(|m, pins| m.move_page(level, index, at, pins))
                .await?;
            for t in trees {
                self.tree_op(&t.tree, |m, pins| m.move_page(level, index, at, pins))
                    .await?;
            }
        }
        // Only the snapshots' moves need a checkpoint now, whose manifest
        // points them at their new records. The head's are made durable by
        // its next checkpoint, as its writes are: until then recovery,
        // which never replays copies, finds the head where it was, in
        // victims that no recount judges before that checkpoint. (A
        // checkpoint writes every dirty map page, a whole map under random
        // writes: one per commit cost as much as the copies.) The copies'
        // segment is sealed, so that fresh writes do not join it.
        let victim_ids: HashSet<u32> = victims.iter().map(|v| v.id).collect();
        let snapshots_moved = trees
            .iter()
            .any(|t| t.changed() || victim_ids.contains(&t.entry.checkpoint.seg));
        if !snapshots_moved {
            if copied > 0 {
                self.seal_in_background(w).await?;
            }
            w.changed |= !pages.is_empty();
            return Ok(copied);
        }
        let mut rerooted = Vec::new();
        for t in trees {
            self.write_back_tree(w, &t.tree, Some(&mut shared))?;
            let unchanged = t.tree.lock().root() == t.root;
            if unchanged && !victim_ids.contains(&t.entry.checkpoint.seg) {
                continue;
            }
            // A moved snapshot is a v2 feature: v1 said a snapshot's LSN
            // is its checkpoint record's.
            self.allow_format(2).await?;
            let cp = checkpoint_of(&t.tree, t.size);
            let (at, _) = self.append_checkpoint_record(w, &cp)?;
            rerooted.push((t.entry.clone(), at));
        }
        self.write_back_tree(w, &self.map, Some(&mut shared))?;
        self.checkpoint(w, true, |m, _, _| {
            for (old, at) in &rerooted {
                if let Some(s) = m.snapshots.iter_mut().find(|s| *s == old) {
                    s.checkpoint = *at;
                }
            }
            Ok(())
        })
        .await?;
        Ok(copied)
    }

    /// Appends the gathered blocks the head or a snapshot of `trees` still
    /// holds as copy records, in runs of consecutive blocks, and points
    /// each root that held one at its copy. Returns the bytes appended.
    async fn copy_gathered(
        &self,
        w: &mut Writer,
        gathered: &Gathered,
        trees: &[SnapshotTree],
        shared: &mut SharedPages,
        moved_in_head: &mut Vec<(u64, Entry, Entry)>,
    ) -> Result<u64> {
        let bs = self.block_size as usize;
        let per_record = (MAX_RECORD_BYTES / bs).max(1);
        let mut copied = 0;
        for run in gathered.runs() {
            let moving = &gathered.blocks[run.clone()];
            let data = &gathered.data[run.start * bs..run.end * bs];
            let by_head = self.held_by_head(moving).await?;
            let held = self.held_by_snapshots(trees, moving).await?;
            let holds = |k: usize| by_head[k] || held.iter().any(|h| h[k]);
            let mut k = 0;
            while k < moving.len() {
                if !holds(k) {
                    k += 1;
                    continue;
                }
                let mut n = 1;
                while k + n < moving.len() && n < per_record && holds(k + n) {
                    n += 1;
                }
                self.make_room(w).await?;
                let lba = moving[k].lba;
                let copies =
                    self.append_blocks(w, RecordKind::Copy, lba, &data[k * bs..(k + n) * bs])?;
                {
                    let mut ages = self.copy_ages.lock();
                    for copy in &copies {
                        let made = ages.entry(copy.seg).or_insert(gathered.made_ms);
                        *made = (*made).max(gathered.made_ms);
                    }
                }
                for (i, copy) in copies.iter().enumerate() {
                    let block = lba + i as u64;
                    if by_head[k + i] {
                        self.map_op(|m, pins| m.set(block, &[*copy], pins)).await?;
                        moved_in_head.push((block, moving[k + i].at, *copy));
                        w.changed = true;
                    }
                    for (t, h) in trees.iter().zip(&held) {
                        if h[k + i] {
                            self.tree_op(&t.tree, |m, pins| m.set(block, &[*copy], pins))
                                .await?;
                        }
                    }
                }
                self.after_append(w).await?;
                // The snapshots' dirty pages count against the map's
                // budget too.
                for t in trees {
                    if t.tree.lock().needs_writeback() {
                        self.write_back_tree(w, &t.tree, Some(shared))?;
                    }
                }
                copied += (n * bs) as u64;
                k += n;
            }
        }
        Ok(copied)
    }

    /// Deletes a segment no root reaches, and forgets it here.
    async fn delete_segment(&self, id: u32) -> Result<()> {
        match self.store.delete(&segment_name(id)).await {
            Ok(()) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.segments.deleted(id);
        self.copy_ages.lock().remove(&id);
        Ok(())
    }
}

/// The cleaning task of a volume opened with [`AutoClean`]: at each tick,
/// a look that costs one listing of the store, and a run when it finds
/// stored above the start mark. Its failures are logged, never fatal: the
/// volume goes on without cleaning until the next tick.
pub(crate) async fn run(core: Arc<Core>, auto: AutoClean, mut cx: TaskContext<()>) -> Result<()> {
    let mut quiet = None;
    loop {
        tokio::select! {
            () = cx.stop.stopped() => return Ok(()),
            () = cx.ticks.next() => {}
        }
        if let Err(e) = core.auto_clean(&auto, &mut quiet).await {
            if core.life.check(Need::Write).is_err() || *core.cleaning_stopped.borrow() {
                return Ok(());
            }
            tracing::warn!(volume = %core.location(), error = %e, "cleaning failed; trying again once more is stored");
        }
    }
}

/// After a run, the automatic cleaner waits until more is stored or the
/// snapshots change (a deleted snapshot makes what it held cleanable),
/// rather than recount every tick: at its target, until stored could pass
/// the start mark; short of it (or failed), until four more segments'
/// worth is stored. (A run among writing clients does not end for want of
/// progress while they write: it keeps up with them.)
struct Quiet {
    below: u64,
    snapshots: Vec<Entry>,
}

impl Quiet {
    fn holds(&self, stored: u64, snapshots: &[Entry]) -> bool {
        stored < self.below && self.snapshots == snapshots
    }
}

impl Core {
    /// One tick of the automatic cleaner.
    async fn auto_clean(&self, auto: &AutoClean, quiet: &mut Option<Quiet>) -> Result<()> {
        // Victims waiting out their grace are space given back already, as
        // a run counts them. Those the last run could not judge yet need a
        // run (its checkpoint, then its recount) whatever is stored.
        let (waiting, unjudged) = self.delete_left_behind().await?;
        let stored: u64 = self
            .store
            .list("segments/")
            .await?
            .iter()
            .filter(|b| parse_segment_name(&b.name).is_some())
            .map(|b| b.size)
            .sum::<u64>()
            .saturating_sub(waiting);
        let snapshots = self.snapshot_roots();
        if !unjudged && quiet.as_ref().is_some_and(|q| q.holds(stored, &snapshots)) {
            return Ok(());
        }
        // The head's data alone: about what is live or less (less what is
        // not stored yet), so a look that finds stored within the mark of
        // it needs no recount.
        let head_live = self.map.lock().usage().live_bytes();
        if !unjudged && stored as f64 <= auto.start_above * head_live as f64 {
            return Ok(());
        }
        let opts = GcOptions {
            target: auto.target,
            grace: auto.grace,
            start_above: Some(auto.start_above),
            copy_rate: Some(auto.copy_rate),
            busy_rate: Some(auto.busy_rate),
            keep_up: true,
            ..GcOptions::default()
        };
        // Quiet if the run fails, as of the snapshots it leaves (its
        // passes move their checkpoints).
        *quiet = Some(Quiet {
            below: stored + 4 * self.segment_size,
            snapshots,
        });
        let report = self.gc(&opts, &|_| {}).await;
        if let Some(q) = quiet.as_mut() {
            q.snapshots = self.snapshot_roots();
        }
        let report = report?;
        if report.passes > 0 || report.deleted_segments > 0 {
            tracing::info!(
                volume = %self.location(),
                passes = report.passes,
                deleted_segments = report.deleted_segments,
                freed_bytes = report.freed_bytes,
                copied_bytes = report.copied_bytes,
                stopped = ?report.stopped,
                "cleaned"
            );
        }
        // At its target, the run counted what is live: no need to look
        // again before stored could pass the start mark.
        if let (GcStop::TargetReached, Some(q)) = (report.stopped, quiet.as_mut()) {
            q.below = (auto.start_above * report.live_after as f64) as u64;
        }
        Ok(())
    }
}

/// The busy rate of a pass that starts with `stored` bytes in the store
/// and `live` bytes live (see `GcOptions::busy_rate`).
fn busy_rate_at(opts: &GcOptions, stored: u64, live: u64) -> Option<u64> {
    let base = opts.busy_rate.filter(|&rate| rate > 0)?;
    let Some(start) = opts.start_above else {
        return Some(base);
    };
    let ratio = stored as f64 / live.max(1) as f64;
    if ratio > start {
        return None;
    }
    let band = start - opts.target;
    let over = if band > 0.0 {
        ((ratio - opts.target) / band).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let top = opts.copy_rate.unwrap_or(u64::MAX).max(base);
    Some(base + ((top - base) as f64 * over) as u64)
}

/// The victims of the next pass: sealed segments recovery does not
/// replay, best first by cost-benefit (space gained × age ÷ cost of copying),
/// until their live bytes reach `pass_bytes`.
fn choose_victims<'a>(
    stats: &'a SpaceStats,
    skip: &HashSet<u32>,
    pass_bytes: u64,
    now_ms: u64,
    copy_ages: &HashMap<u32, u64>,
) -> Vec<&'a SegmentSpace> {
    let mut candidates: Vec<(f64, &SegmentSpace)> = stats
        .segments
        .iter()
        .filter(|s| {
            !s.recent
                && s.view_bytes == 0
                && (s.live_bytes < s.size || s.live_bytes == 0)
                && !skip.contains(&s.id)
        })
        .map(|s| {
            // An empty segment costs nothing to clean: it goes first.
            if s.live_bytes == 0 {
                return (f64::INFINITY, s);
            }
            let u = s.live_bytes as f64 / s.size as f64;
            if u > MAX_VICTIM_USE {
                return (f64::NEG_INFINITY, s);
            }
            let made_ms = copy_ages.get(&s.id).copied().unwrap_or(s.made_ms);
            let age = now_ms.saturating_sub(made_ms) as f64 + 1.0;
            ((1.0 - u) * age / (1.0 + u), s)
        })
        .collect();
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.id.cmp(&b.1.id)));
    let mut victims = Vec::new();
    let mut live = 0;
    for (score, s) in candidates {
        if live >= pass_bytes || score == f64::NEG_INFINITY {
            break;
        }
        live += s.live_bytes;
        victims.push(s);
    }
    victims
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Between the target and the start mark, the automatic cleaner
    /// yields less the more is stored; above the mark, not at all.
    #[test]
    fn the_automatic_cleaner_yields_less_as_stored_rises() {
        let auto = AutoClean::new(1.5);
        let opts = GcOptions {
            target: auto.target,
            start_above: Some(auto.start_above),
            copy_rate: Some(auto.copy_rate),
            busy_rate: Some(auto.busy_rate),
            ..GcOptions::default()
        };
        let live = 100 << 20;
        let at = |ratio: f64| busy_rate_at(&opts, (ratio * live as f64) as u64, live);
        assert_eq!(at(1.2), Some(8 << 20));
        assert_eq!(at(1.45), Some(8 << 20));
        let halfway = at(1.475).unwrap();
        assert!(halfway > 30 << 20 && halfway < 40 << 20, "{halfway}");
        assert_eq!(at(1.5), Some(64 << 20));
        assert_eq!(at(1.51), None);
        let manual = GcOptions {
            busy_rate: Some(1 << 20),
            ..GcOptions::default()
        };
        assert_eq!(busy_rate_at(&manual, 10 * live, live), Some(1 << 20));
        let never = GcOptions {
            busy_rate: Some(0),
            ..opts
        };
        assert_eq!(busy_rate_at(&never, (1.4 * live as f64) as u64, live), None);
    }

    fn seg(id: u32, size: u64, live: u64, made_ms: u64) -> SegmentSpace {
        SegmentSpace {
            id,
            size,
            live_bytes: live,
            snapshot_bytes: 0,
            view_bytes: 0,
            made_ms,
            recent: false,
        }
    }

    #[test]
    fn the_cleaner_stays_quiet_until_something_changes() {
        let snapshots = vec![Entry::EMPTY];
        let quiet = Quiet {
            below: 1000,
            snapshots: snapshots.clone(),
        };
        assert!(quiet.holds(999, &snapshots));
        assert!(!quiet.holds(1000, &snapshots), "more stored");
        assert!(!quiet.holds(999, &[]), "a snapshot went");
    }

    #[test]
    fn victims_are_the_emptiest_and_oldest_and_never_those_views_hold() {
        let mut held = seg(5, 100, 10, 0);
        held.snapshot_bytes = 1;
        let mut viewed = seg(9, 100, 10, 0);
        (viewed.snapshot_bytes, viewed.view_bytes) = (1, 1);
        let mut recent = seg(6, 100, 0, 0);
        recent.recent = true;
        let stats = SpaceStats {
            segments: vec![
                seg(1, 100, 90, 0),
                seg(8, 100, 95, 0),
                seg(2, 100, 10, 500),
                seg(3, 100, 10, 0),
                seg(4, 100, 100, 0),
                held,
                viewed,
                recent,
                seg(7, 100, 0, 900),
            ],
            ..SpaceStats::default()
        };
        let ids = |v: Vec<&SegmentSpace>| v.iter().map(|s| s.id).collect::<Vec<_>>();
        let none = HashSet::new();
        // Empty first, then older before younger at equal use (snapshots'
        // too); full ones, those a view here holds and recent ones never.
        assert_eq!(
            ids(choose_victims(
                &stats,
                &none,
                u64::MAX,
                1000,
                &HashMap::new()
            )),
            [7, 3, 5, 2, 1]
        );
        // Until the pass has its bytes.
        assert_eq!(
            ids(choose_victims(&stats, &none, 25, 1000, &HashMap::new())),
            [7, 3, 5, 2]
        );
        let skip: HashSet<u32> = [3].into();
        assert_eq!(
            ids(choose_victims(&stats, &skip, 1, 1000, &HashMap::new())),
            [7, 5]
        );
        // A segment of cleaning's copies made at 500 holds data made at 0:
        // it ranks as old as its data.
        let copies: HashMap<u32, u64> = [(2, 0)].into();
        assert_eq!(ids(choose_victims(&stats, &skip, 1, 1000, &copies)), [7, 2]);
    }
}
