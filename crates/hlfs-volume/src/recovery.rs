//! Recovery: replaying the log after the head checkpoint.
//!
//! Every segment since the checkpoint is replayed in id order, from the
//! store if it is there and from its journal file otherwise (uploads run in
//! parallel, so a stored segment can follow one still in its journal). One
//! routine replays both; what differs is what a bad record means. In a
//! stored segment every record must be valid and in sequence: it was whole
//! when sealed, so a bad one is damage. In a journal, the first torn or
//! corrupt record, or LSN gap, ends the log there: that is how the disk
//! comes back as a prefix of what was written.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hlfs_format::{
    journal_name, parse_journal_name, parse_segment_name, segment_name, Entry, RecordHeader,
    RecordKind, HEADER_LEN,
};
use hlfs_store::{JournalFile, StoreError};

use crate::core::Core;
use crate::error::{Result, VolumeError};
use crate::segments::{ScanSource, ScanStop, Scanner};

/// Where a segment being replayed comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Sealed in the store: any bad record is damage.
    Stored,
    /// A journal file: a bad record ends the log.
    Journal,
}

/// How the replay of one segment ended.
struct Replayed {
    /// Bytes of valid records from the start of the segment.
    valid_len: u64,
    /// The log ends in this segment: nothing after it may be replayed.
    ended: bool,
    /// A time mark past the moment being opened was reached.
    past_moment: bool,
}

impl Core {
    /// Replays the log after the head checkpoint. Writable opens then seal
    /// recovered journals and open one to append to. With `until` (a
    /// read-only view of a moment), the replay stops at the first time
    /// mark later than it.
    pub(crate) async fn recover(&self, until: Option<u64>) -> Result<()> {
        let m = self.manifests.get();
        let read_only = self.life.read_only();
        let journal = &self.backend.journal;
        // Journals first: a writer sealing meanwhile puts the segment in
        // the store before removing its journal, so it shows up in one list
        // or the other (or both), never in neither.
        let mut journals: Vec<u32> = journal
            .list()?
            .iter()
            .filter_map(|n| parse_journal_name(n))
            .collect();
        journals.sort_unstable();
        let store_segs: Vec<(u32, u64)> = self
            .store
            .list("segments/")
            .await?
            .into_iter()
            .filter_map(|b| parse_segment_name(&b.name).map(|id| (id, b.size)))
            .collect();
        let max_seen = store_segs
            .iter()
            .map(|(s, _)| *s)
            .chain(journals.iter().copied())
            .max()
            .unwrap_or(0);

        let mut w = self.log.writer.lock().await;
        let from_lsn = m.replay_from_lsn;
        let mut expected = w.next_lsn;
        let replayed = || store_segs.iter().filter(|(id, _)| *id >= m.replay_from_seg);
        w.sealed_since_checkpoint = replayed().count() as u32;
        w.bytes_since_checkpoint = replayed().map(|(_, size)| size).sum();
        let mut ids: Vec<u32> = replayed()
            .map(|(id, _)| *id)
            .chain(journals.iter().copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        // (segment, file, valid length, LSN of its first record)
        let mut live_journals: Vec<(u32, Arc<dyn JournalFile>, u64, u64)> = Vec::new();
        let mut ended: Option<u32> = None;
        for id in ids {
            let name = journal_name(id);
            let stored = store_segs
                .iter()
                .find(|(s, _)| *s == id)
                .map(|(_, size)| *size);
            if let Some(size) = stored {
                if journals.contains(&id) && !read_only {
                    // Sealed already; the crash came before the journal was removed.
                    journal.remove(&name)?;
                }
                if id < m.replay_from_seg {
                    continue;
                }
                if let Some(end) = ended {
                    return Err(VolumeError::corrupt(format!(
                        "{} is in the store, but the log ended in segment {end}",
                        segment_name(id)
                    )));
                }
                let reader = self.store.clone().open_reader(&segment_name(id)).await?;
                let source = ScanSource::Store(reader);
                let replayed = self
                    .replay(
                        id,
                        source,
                        size,
                        Origin::Stored,
                        from_lsn,
                        until,
                        &mut expected,
                    )
                    .await?;
                if replayed.past_moment {
                    break;
                }
                continue;
            }
            if ended.is_some() || id < m.replay_from_seg {
                if !read_only {
                    tracing::warn!(journal = %name, "dropping journal beyond the end of the recovered log");
                    journal.remove(&name)?;
                }
                continue;
            }
            let (source, file, len) = match journal.open(&name) {
                Ok(file) => {
                    self.segments.add_journal(id, file.clone());
                    let len = file.len()?;
                    (ScanSource::Journal(file.clone()), Some(file), len)
                }
                // A live writer stored it since the listing: it is whole
                // in the store now.
                Err(StoreError::NotFound(_)) if read_only => {
                    let reader = self.store.clone().open_reader(&segment_name(id)).await?;
                    let size = reader.size();
                    (ScanSource::Store(reader), None, size)
                }
                Err(e) => return Err(e.into()),
            };
            let first_lsn = expected;
            let replayed = self
                .replay(
                    id,
                    source,
                    len,
                    Origin::Journal,
                    from_lsn,
                    until,
                    &mut expected,
                )
                .await?;
            if replayed.past_moment {
                break;
            }
            if replayed.ended {
                ended = Some(id);
            }
            if let Some(file) = file {
                live_journals.push((id, file, replayed.valid_len, first_lsn));
            }
        }
        w.next_lsn = expected;
        self.log.recovered_up_to(expected - 1);
        // Points made from here on are no earlier than the newest one.
        if let Some(t) = self.manifests.read(crate::retain::newest_point_ms) {
            self.log.last_mark_ms.fetch_max(t, Ordering::Relaxed);
        }
        // This open's first client record follows a Mark of its own, no
        // earlier than any point: one made by a reset just before a crash
        // may have had none after it yet.
        w.mark_due_ms = Some(self.log.last_mark_ms.load(Ordering::Relaxed));
        if read_only {
            return Ok(());
        }
        // Keep appending to the last journal if nothing stored follows it;
        // seal the others.
        let after_all_stored = |id: u32| store_segs.iter().all(|(s, _)| *s < id);
        let last = match live_journals.last() {
            Some(j) if after_all_stored(j.0) => live_journals.pop(),
            _ => None,
        };
        for (id, file, valid_len, _) in live_journals {
            file.truncate(valid_len)?;
            self.hand_to_store(&*self.store, id, &file).await?;
            self.retire_journal(id, valid_len);
            w.sealed_since_checkpoint += 1;
            w.bytes_since_checkpoint += valid_len;
        }
        // Everything before the journal kept for appending is in the store.
        let stored = last.as_ref().map_or(expected, |j| j.3) - 1;
        w.sealed_lsn = stored;
        self.uploads.set_stored(stored);
        match last {
            Some((id, file, valid_len, _)) => {
                // Replayed writes may have been acknowledged but never
                // flushed: make them durable before anyone relies on that.
                if file.len()? != valid_len {
                    file.truncate(valid_len)?;
                } else {
                    file.sync()?;
                }
                w.seg = id;
                w.pos = valid_len;
                w.file = Some(file.clone());
                self.log.set_current(Some(file), id, valid_len);
            }
            None => {
                let id = m.next_seg.max(max_seen + 1);
                self.start_journal(&mut w, id)?;
            }
        }
        w.changed = expected > from_lsn;
        Ok(())
    }

    /// Replays the records of segment `seg` from LSN `from_lsn` on,
    /// expecting them in sequence from `expected` (which it advances), up
    /// to a time mark later than `until`.
    #[allow(clippy::too_many_arguments)]
    async fn replay(
        &self,
        seg: u32,
        source: ScanSource,
        len: u64,
        origin: Origin,
        from_lsn: u64,
        until: Option<u64>,
        expected: &mut u64,
    ) -> Result<Replayed> {
        let damaged = |offset: u64, why: String| {
            VolumeError::corrupt(format!("{} offset {offset}: {why}", segment_name(seg)))
        };
        let mut scan = Scanner::new(source, len);
        loop {
            let (offset, why) = match scan.next(&self.uuid).await? {
                Ok((off, h, payload)) => {
                    if h.lsn < from_lsn {
                        continue;
                    }
                    if h.lsn == *expected {
                        if h.kind == RecordKind::Mark {
                            if until.is_some_and(|t| h.arg0 > t) {
                                return Ok(Replayed {
                                    valid_len: off,
                                    ended: true,
                                    past_moment: true,
                                });
                            }
                            // Marks never go back, across reopens too.
                            self.log.last_mark_ms.fetch_max(h.arg0, Ordering::Relaxed);
                        }
                        self.apply(seg, off, &h, &payload).await?;
                        *expected += 1;
                        continue;
                    }
                    (
                        off,
                        format!("record LSN {} where {} was expected", h.lsn, *expected),
                    )
                }
                Err(ScanStop::End) => {
                    return Ok(Replayed {
                        valid_len: len,
                        ended: false,
                        past_moment: false,
                    })
                }
                // In a journal, the window written ahead of the log (a
                // journal followed by another was cut to its log before the
                // next one's records were acknowledged), or space a power
                // cut kept from being written: the log ends here, as at a
                // torn record. In a segment, damage.
                Err(ScanStop::Unwritten { offset }) => {
                    (offset, "zeros where a record should start".to_string())
                }
                Err(ScanStop::Invalid {
                    offset,
                    other_volume: true,
                    ..
                }) if origin == Origin::Journal => {
                    // Two addresses that share a journal directory: what is
                    // here is another volume's flushed data. Dropping it as
                    // a torn tail would lose it.
                    return Err(VolumeError::corrupt(format!(
                        "{} offset {offset} holds a record of another volume: its journal directory is shared; move it aside after that volume is safe",
                        journal_name(seg)
                    )));
                }
                Err(ScanStop::Invalid { offset, reason, .. }) => (offset, reason),
            };
            return match origin {
                Origin::Stored => Err(damaged(offset, why)),
                Origin::Journal => {
                    tracing::warn!(journal = %journal_name(seg), offset, reason = %why, "log ends at a torn or corrupt record");
                    Ok(Replayed {
                        valid_len: offset,
                        ended: true,
                        past_moment: false,
                    })
                }
            };
        }
    }

    /// Applies one replayed record to the map.
    async fn apply(&self, seg: u32, off: u64, h: &RecordHeader, payload: &[u8]) -> Result<()> {
        let bs = self.block_size as u64;
        let blocks = self.size().div_ceil(bs);
        let at = || format!("{} offset {off}", segment_name(seg));
        match h.kind {
            RecordKind::Data => {
                if h.payload_len as u64 != h.arg1.saturating_mul(bs) || h.arg0 + h.arg1 > blocks {
                    return Err(VolumeError::corrupt(format!(
                        "{}: data record does not fit the volume",
                        at()
                    )));
                }
                let base = off + HEADER_LEN as u64;
                let entries: Vec<Entry> = payload
                    .chunks(bs as usize)
                    .enumerate()
                    .map(|(i, block)| Entry {
                        seg,
                        off: (base + i as u64 * bs) as u32,
                        crc: crc32c::crc32c(block),
                    })
                    .collect();
                self.map_op(|m, pins| m.set(h.arg0, &entries, pins)).await
            }
            RecordKind::Zero => {
                if h.arg0 + h.arg1 > blocks {
                    return Err(VolumeError::corrupt(format!(
                        "{}: zero record beyond the volume",
                        at()
                    )));
                }
                self.zero_blocks(h.arg0, h.arg0 + h.arg1).await
            }
            RecordKind::Resize => {
                if h.arg0 < self.size() || h.arg0 > i64::MAX as u64 {
                    return Err(VolumeError::corrupt(format!(
                        "{}: resize record shrinks the volume",
                        at()
                    )));
                }
                self.size.store(h.arg0, Ordering::SeqCst);
                self.map.lock().grow_to(h.arg0.div_ceil(bs));
                Ok(())
            }
            // Only map pages point at copies (a snapshot's, or the head's
            // rolled back to one): replay never gives them to the head.
            RecordKind::MapPage | RecordKind::Checkpoint | RecordKind::Copy | RecordKind::Mark => {
                Ok(())
            }
        }
    }
}
