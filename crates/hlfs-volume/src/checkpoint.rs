//! Map write-back, checkpoints and sealing.
//!
//! Dirty map pages are appended to the log under memory pressure and
//! before a checkpoint record, which describes the whole map (root, depth,
//! size, usage). A full segment is sealed: switched for a new journal file
//! under the writer lock, then synced, stored and, if it ends with a
//! checkpoint, made the head by the upload task. Every fourth segment's
//! worth of log gets a checkpoint, which bounds what recovery replays.

use std::collections::HashMap;
use std::sync::Arc;

use hlfs_format::{crc_of_record, encode_record, Checkpoint, Entry, Manifest, MapPage, RecordKind};
use parking_lot::Mutex;

use crate::core::Core;
use crate::error::Result;
use crate::lifecycle::Need;
use crate::log::Writer;
use crate::map::DirtyTree;

/// Map pages written by one commit, by node (level, index): see
/// `Core::write_back_tree`.
pub(crate) type SharedPages = HashMap<(u32, u64), Vec<(Arc<MapPage>, Entry)>>;

/// A full segment is sealed alone, and with a checkpoint once this many
/// segments' worth of log has been sealed since the last one: writing every
/// dirty map page at each seal would cost nearly as much as the data under
/// dense random writes, while recovery only replays the log since the last
/// checkpoint.
const CHECKPOINT_EVERY: u64 = 4;

/// And once the log since the last checkpoint is this many times the map
/// pages a checkpoint would write: random writes dirty a whole map (3 MiB
/// per GiB of volume), which with small segments cost a tenth of the log.
const LOG_PER_DIRTY_PAGE_BYTES: u64 = 64;

/// Whatever the map, a checkpoint once this much log would be replayed.
const MAX_LOG_BETWEEN_CHECKPOINTS: u64 = 1 << 30;

/// Segments sealed since the last checkpoint, at most. FLUSH with remote
/// durability seals short segments; this bounds how many recovery reads.
const MAX_SEGMENTS_BETWEEN_CHECKPOINTS: u32 = 64;

/// What a checkpoint changes in the manifest.
#[derive(Clone, Copy)]
pub(crate) struct HeadUpdate {
    pub checkpoint: Entry,
    pub size: u64,
    pub replay_from_seg: u32,
    pub replay_from_lsn: u64,
}

impl HeadUpdate {
    pub fn apply(&self, m: &mut Manifest) {
        m.checkpoint = self.checkpoint;
        m.size = self.size;
        m.replay_from_seg = self.replay_from_seg;
        m.replay_from_lsn = self.replay_from_lsn;
        m.next_seg = m.next_seg.max(self.replay_from_seg + 1);
    }
}

/// What a checkpoint record of `tree` (whose pages are all written back)
/// says, for a volume of `size` bytes.
pub(crate) fn checkpoint_of(tree: &Mutex<DirtyTree>, size: u64) -> Checkpoint {
    let m = tree.lock();
    Checkpoint {
        root: m.root(),
        depth: m.depth(),
        size,
        allocated_blocks: m.usage().allocated_blocks(),
        usage: m.usage().live(),
    }
}

impl Core {
    /// Seals a segment left full by an earlier append whose seal failed (the
    /// store was away), before appending more: the journal never grows
    /// past a segment (and a record) while uploads are stalled.
    pub(crate) async fn make_room(&self, w: &mut Writer) -> Result<()> {
        if w.pos >= self.segment_size {
            self.seal_in_background(w).await?;
        }
        Ok(())
    }

    /// Housekeeping after appending: write back map pages under memory
    /// pressure, seal a full segment.
    pub(crate) async fn after_append(&self, w: &mut Writer) -> Result<()> {
        if self.map.lock().needs_writeback() {
            self.write_back(w).await?;
        }
        if w.pos >= self.segment_size {
            self.seal_in_background(w).await?;
        }
        Ok(())
    }

    /// Writes every dirty map page to the log, bottom-up. Under memory
    /// pressure this is what bounds the map: scattered writes dirty about as
    /// many inner pages as leaves, so writing back leaves alone would not.
    async fn write_back(&self, w: &mut Writer) -> Result<()> {
        self.write_back_tree(w, &self.map, None)
    }

    /// Writes every dirty page of `tree` to the log, bottom-up. With
    /// `shared`, a page equal to one written there for the same node is
    /// not written again: the trees point at one copy, so roots that
    /// shared pages before a cleaning pass rewrote them share them after.
    pub(crate) fn write_back_tree(
        &self,
        w: &mut Writer,
        tree: &Mutex<DirtyTree>,
        mut shared: Option<&mut SharedPages>,
    ) -> Result<()> {
        loop {
            let next = tree.lock().next_dirty();
            let Some((level, index, page)) = next else {
                return Ok(());
            };
            let same = shared.as_deref().and_then(|written| {
                written
                    .get(&(level, index))?
                    .iter()
                    .find(|(p, _)| **p == *page)
                    .map(|&(_, at)| at)
            });
            let at = if page.is_empty() {
                Entry::EMPTY
            } else if let Some(at) = same {
                at
            } else {
                let record = encode_record(
                    RecordKind::MapPage,
                    &self.uuid,
                    w.next_lsn,
                    level as u64,
                    index,
                    &page.encode(),
                );
                let crc = crc_of_record(&record);
                let off = self.append(w, &[&record])?;
                let at = Entry {
                    seg: w.seg,
                    off: off as u32,
                    crc,
                };
                if let Some(written) = shared.as_deref_mut() {
                    written.entry((level, index)).or_default().push((page, at));
                }
                at
            };
            tree.lock().written_back(level, index, at);
        }
    }

    /// Appends a checkpoint record of `cp`; returns where it is and its
    /// LSN.
    pub(crate) fn append_checkpoint_record(
        &self,
        w: &mut Writer,
        cp: &Checkpoint,
    ) -> Result<(Entry, u64)> {
        let cp_lsn = w.next_lsn;
        let record = encode_record(
            RecordKind::Checkpoint,
            &self.uuid,
            cp_lsn,
            0,
            0,
            &cp.encode(),
        );
        let crc = crc_of_record(&record);
        let off = self.append(w, &[&record])?;
        let at = Entry {
            seg: w.seg,
            off: off as u32,
            crc,
        };
        Ok((at, cp_lsn))
    }

    /// Appends every dirty map page and a checkpoint record describing the
    /// map now; returns where the checkpoint is, its LSN and its contents.
    async fn append_checkpoint(&self, w: &mut Writer) -> Result<(Entry, u64, Checkpoint)> {
        self.write_back(w).await?;
        let cp = checkpoint_of(&self.map, self.size());
        let (at, cp_lsn) = self.append_checkpoint_record(w, &cp)?;
        Ok((at, cp_lsn, cp))
    }

    /// Writes a checkpoint and seals the open segment with it, then writes
    /// the manifest that makes the checkpoint the head (changed by `edit`,
    /// which gets the checkpoint's place and LSN, and may refuse), all
    /// before returning. Starts a new journal unless `reopen` is false.
    pub(crate) async fn checkpoint(
        &self,
        w: &mut Writer,
        reopen: bool,
        mut edit: impl FnMut(&mut Manifest, Entry, u64) -> Result<()>,
    ) -> Result<()> {
        let slot = self.upload_slot().await?;
        let (cp_at, cp_lsn, cp) = self.append_checkpoint(w).await?;
        let sealing = self.rotate(w, reopen, slot, None)?;
        let last_lsn = sealing.last_lsn;
        self.queue_upload(sealing)?;
        // The manifest may only name a checkpoint that is in the store.
        self.wait_stored(last_lsn).await?;
        let head = HeadUpdate {
            checkpoint: cp_at,
            size: cp.size,
            replay_from_seg: w.seg,
            replay_from_lsn: w.next_lsn,
        };
        let mut reset_point = None;
        self.write_manifest(&*self.store.clone(), |m| {
            head.apply(m);
            edit(m, cp_at, cp_lsn)?;
            // An edit that points the head at another tree reset it: the
            // writes after the reset follow a Mark no earlier than its
            // point, so no moment before it replays across the reset.
            let reset = m.checkpoint != cp_at;
            reset_point = self.note_head(m, reset).filter(|_| reset);
            Ok(())
        })
        .await?;
        if reset_point.is_some() {
            w.mark_due_ms = reset_point;
        }
        w.changed = false;
        w.sealed_since_checkpoint = 0;
        w.bytes_since_checkpoint = 0;
        Ok(())
    }

    /// Makes the manifest's head everything written so far (a checkpoint,
    /// if anything changed since the last), so that readers of the store
    /// alone (a recount, a diff of the head) see all of it.
    pub(crate) async fn checkpoint_now(&self) -> Result<()> {
        let mut w = self.log.writer.lock().await;
        self.life.check(Need::Write)?;
        if w.changed {
            return self.checkpoint(&mut w, true, |_, _, _| Ok(())).await;
        }
        // A seal may have ended with a checkpoint the upload task has yet
        // to make the head: the manifest names it once its segment is
        // stored.
        self.wait_stored(w.sealed_lsn).await
    }

    /// How much log a seal lets pass before it checkpoints: a few
    /// segments, or more while the map pages a checkpoint would write are
    /// many, so that they stay a small part of what is written.
    fn log_between_checkpoints(&self) -> u64 {
        // At most: sparse pages take less.
        let pages = (self.map.lock().dirty_pages() * MapPage::MAX_ENCODED_LEN) as u64;
        (CHECKPOINT_EVERY * self.segment_size)
            .max((LOG_PER_DIRTY_PAGE_BYTES * pages).min(MAX_LOG_BETWEEN_CHECKPOINTS))
    }

    /// Seals the open segment without stopping writes for long: it is
    /// switched for a new journal here (with a checkpoint when one is due),
    /// and synced, put in the store and made the head in the background.
    /// Waits while the upload backlog is full, which keeps writers from
    /// outrunning the disk and the store.
    pub(crate) async fn seal_in_background(&self, w: &mut Writer) -> Result<()> {
        let slot = self.upload_slot().await?;
        let due = !self.log.checkpoints_held()
            && (w.bytes_since_checkpoint + w.pos >= self.log_between_checkpoints()
                || w.sealed_since_checkpoint + 1 >= MAX_SEGMENTS_BETWEEN_CHECKPOINTS);
        let head = if due {
            let (checkpoint, _, cp) = self.append_checkpoint(w).await?;
            Some(HeadUpdate {
                checkpoint,
                size: cp.size,
                replay_from_seg: w.seg + 1,
                replay_from_lsn: w.next_lsn,
            })
        } else {
            None
        };
        let checkpointed = head.is_some();
        let sealing = self.rotate(w, true, slot, head)?;
        if checkpointed {
            // Recovery starts after this segment.
            w.changed = false;
            w.sealed_since_checkpoint = 0;
            w.bytes_since_checkpoint = 0;
        }
        self.queue_upload(sealing)
    }
}
