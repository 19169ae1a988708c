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
        let mut i = 0;
        while i < entries.len() {
            // One read per run of blocks stored back to back.
            let e = entries[i];
            let mut n = 1;
            while i + n < entries.len()
                && !e.is_empty()
                && entries[i + n].seg == e.seg
                && entries[i + n].off as u64 == e.off as u64 + n as u64 * bs
            {
                n += 1;
            }
            let run_start = (first + i as u64) * bs;
            let lo = run_start.max(offset);
            let hi = (run_start + n as u64 * bs).min(end);
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            if e.is_empty() {
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
    pub(crate) async fn extents(&self, offset: u64, len: u64, limit: usize) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let bs = self.block_size as u64;
        let end = offset + len;
        let end_block = end.div_ceil(bs);
        // Blocks first..last_excl as a run, clipped to the asked range.
        let push = |out: &mut Vec<Extent>, first: u64, last_excl: u64, data: bool| {
            let lo = (first * bs).max(offset);
            let hi = (last_excl * bs).min(end);
            match out.last_mut() {
                Some(x) if x.data == data && x.offset + x.len == lo => x.len += hi - lo,
                _ => out.push(Extent {
                    offset: lo,
                    len: hi - lo,
                    data,
                }),
            }
        };
        let mut lba = offset / bs;
        let mut entries = vec![Entry::EMPTY; 512];
        let mut runs = 0;
        while lba < end_block && runs < limit {
            let next = self.map_op(|m, pins| m.next_present(lba, pins)).await?;
            let Some(leaf_start) = next.filter(|&s| s < end_block) else {
                push(&mut out, lba, end_block, false);
                break;
            };
            let start = leaf_start.max(lba);
            if start > lba {
                push(&mut out, lba, start, false);
            }
            let stop = ((start / 512 + 1) * 512).min(end_block);
            let n = (stop - start) as usize;
            self.map_op(|m, pins| m.lookup(start, &mut entries[..n], pins))
                .await?;
            for (k, e) in entries[..n].iter().enumerate() {
                push(
                    &mut out,
                    start + k as u64,
                    start + k as u64 + 1,
                    !e.is_empty(),
                );
            }
            lba = stop;
            runs = out.len();
        }
        Ok(out)
    }
}
