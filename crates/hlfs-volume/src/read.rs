//! The read path: the map lookup under the map lock only (never the writer
//! lock, so reads are not queued behind writes), then one read per run of
//! blocks stored back to back, each block checked against the CRC in its
//! map entry.

use hlfs_format::{segment_name, Entry};

use crate::core::Core;
use crate::error::{Result, VolumeError};
use crate::options::Extent;

impl Core {
    /// Reads `buf.len()` bytes at `offset`.
    pub(crate) async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        // Cached data is read inline without awaiting anything, so a task
        // looping on reads would never give its thread to others: yield
        // once the task's cooperative budget is spent.
        tokio::task::coop::consume_budget().await;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let shift = self.shift;
        let bs = self.block_size as u64;
        let first = offset >> shift;
        let end = offset + buf.len() as u64;
        let last = (end - 1) >> shift;
        let mut entries = vec![Entry::EMPTY; (last - first + 1) as usize];
        self.map_op(|m, pins| m.lookup(first, &mut entries, pins))
            .await?;
        let parent = self.parent();
        let parent_blocks = parent.as_ref().map_or(0, |p| p.blocks);
        // In a clone, what it has not written is its parent's.
        let from_parent =
            |k: usize| first + (k as u64) < parent_blocks && entries[k].is_unwritten();
        let mut i = 0;
        while i < entries.len() {
            // One read per run of blocks stored back to back, or read from
            // the parent, or reading as zeros.
            let e = entries[i];
            let mut n = 1;
            if from_parent(i) {
                while i + n < entries.len() && from_parent(i + n) {
                    n += 1;
                }
            } else if e.is_empty() {
                while i + n < entries.len() && entries[i + n].is_empty() && !from_parent(i + n) {
                    n += 1;
                }
            } else {
                while i + n < entries.len()
                    && entries[i + n].seg == e.seg
                    && entries[i + n].off as u64 == e.off as u64 + n as u64 * bs
                {
                    n += 1;
                }
            }
            let run_start = (first + i as u64) * bs;
            let lo = run_start.max(offset);
            let hi = (run_start + n as u64 * bs).min(end);
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            if from_parent(i) {
                let parent = parent.as_ref().expect("a clone has its parent");
                // The rest of the parent's last, partial block reads as zeros.
                let (below, past) =
                    dst.split_at_mut((parent.link.size.clamp(lo, hi) - lo) as usize);
                // (A read that starts past the parent's end asks it for
                // nothing: the parent would refuse the offset.)
                if !below.is_empty() {
                    Box::pin(parent.view.read_into(lo, below)).await?;
                }
                past.fill(0);
            } else if e.is_empty() {
                dst.fill(0);
            } else {
                let run_len = n * bs as usize;
                let aligned = lo == run_start && dst.len() == run_len;
                // Whole blocks are read straight into the caller's buffer;
                // a partial first or last block goes through a bounce buffer.
                let mut bounce = Vec::new();
                let data: &mut [u8] = if aligned {
                    dst
                } else {
                    bounce.resize(run_len, 0);
                    &mut bounce
                };
                let verify = |data: &[u8]| {
                    for (k, block) in data.chunks(bs as usize).enumerate() {
                        if crc32c::crc32c(block) != entries[i + k].crc {
                            return Err(VolumeError::corrupt(format!(
                                "block {} ({} offset {}): checksum mismatch",
                                first + (i + k) as u64,
                                segment_name(e.seg),
                                e.off as u64 + k as u64 * bs
                            )));
                        }
                    }
                    Ok(())
                };
                self.segments
                    .read_verified(e.seg, e.off as u64, data, verify)
                    .await?;
                if !aligned {
                    let skip = (lo - run_start) as usize;
                    dst.copy_from_slice(&bounce[skip..skip + dst.len()]);
                }
            }
            i += n;
        }
        Ok(())
    }

    /// Which parts of the volume from `offset` hold data and which are holes,
    /// as maximal runs covering at most `len` bytes. The answer stops early
    /// once it has `limit` runs; ask again from where it ends. Empty
    /// subtrees of the map are skipped whole, so a huge hole costs one step.
    /// In a clone, what it has not written is as its parent has it.
    pub(crate) async fn extents(&self, offset: u64, len: u64, limit: usize) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let bs = self.block_size as u64;
        let end = offset + len;
        let end_block = end.div_ceil(bs);
        // Blocks first..last_excl, clipped to the asked range.
        let bytes =
            |first: u64, last_excl: u64| ((first * bs).max(offset), (last_excl * bs).min(end));
        let mut lba = offset / bs;
        let mut entries = vec![Entry::EMPTY; 512];
        while lba < end_block && out.len() < limit {
            let next = self.map_op(|m, pins| m.next_present(lba, pins)).await?;
            let Some(leaf_start) = next.filter(|&s| s < end_block) else {
                let (lo, hi) = bytes(lba, end_block);
                self.push_unwritten(&mut out, lo, hi).await?;
                break;
            };
            let start = leaf_start.max(lba);
            if start > lba {
                let (lo, hi) = bytes(lba, start);
                self.push_unwritten(&mut out, lo, hi).await?;
            }
            let stop = ((start / 512 + 1) * 512).min(end_block);
            let n = (stop - start) as usize;
            self.map_op(|m, pins| m.lookup(start, &mut entries[..n], pins))
                .await?;
            let mut k = 0;
            while k < n {
                let unwritten = entries[k].is_unwritten();
                let data = !entries[k].is_empty();
                let mut run = 1;
                while k + run < n
                    && entries[k + run].is_unwritten() == unwritten
                    && entries[k + run].is_empty() != data
                {
                    run += 1;
                }
                let first = start + k as u64;
                let (lo, hi) = bytes(first, first + run as u64);
                if unwritten {
                    self.push_unwritten(&mut out, lo, hi).await?;
                } else {
                    push_extent(
                        &mut out,
                        Extent {
                            offset: lo,
                            len: hi - lo,
                            data,
                        },
                    );
                }
                k += run;
            }
            lba = stop;
        }
        Ok(out)
    }

    /// Bytes `lo..hi`, all unwritten: holes, or in a clone its parent's.
    async fn push_unwritten(&self, out: &mut Vec<Extent>, lo: u64, hi: u64) -> Result<()> {
        let from_parent = match self.parent() {
            Some(parent) => {
                let parent_end = parent.link.size.min(hi);
                if lo < parent_end {
                    let asked = Box::pin(parent.view.extents(lo, parent_end - lo, usize::MAX));
                    for x in asked.await? {
                        push_extent(out, x);
                    }
                }
                parent_end.max(lo)
            }
            None => lo,
        };
        if from_parent < hi {
            push_extent(
                out,
                Extent {
                    offset: from_parent,
                    len: hi - from_parent,
                    data: false,
                },
            );
        }
        Ok(())
    }
}

/// Appends `x`, merged into the last run if it continues it.
fn push_extent(out: &mut Vec<Extent>, x: Extent) {
    if x.len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.data == x.data && last.offset + last.len == x.offset => {
            last.len += x.len
        }
        _ => out.push(x),
    }
}
