//! The write path: writes, write-zeroes (and trim) and growing, each as
//! records appended under the writer lock, then the map updated.
//!
//! Blocks only partly covered are read first (read-modify-write). Writes
//! over 4 MiB become several records. Trim and write-zeroes append one zero
//! record for the whole blocks, however many, and a data record for each
//! partial block at either end. In a clone, zeroed blocks its parent has
//! get zero entries in the map, so that they no longer read the parent's.

use std::sync::atomic::Ordering;

use hlfs_format::{encode_header, Entry, RecordKind, HEADER_LEN, MAP_FANOUT};

use crate::core::Core;
use crate::error::{Result, VolumeError};
use crate::lifecycle::Need;
use crate::log::Writer;

/// Bytes per data record at most; larger writes become several records.
pub(crate) const MAX_RECORD_BYTES: usize = 4 << 20;

impl Core {
    /// Writes `data` at `offset`.
    pub(crate) async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        tokio::task::coop::consume_budget().await;
        self.life.check(Need::Write)?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let mut w = self.log.writer.lock().await;
        self.life.check(Need::Write)?;
        // Again under the lock: a rollback may have shrunk the volume.
        self.check_range(offset, data.len() as u64)?;
        self.make_room(&mut w).await?;
        self.log
            .counts
            .client_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let bs = self.block_size as u64;
        let end = offset + data.len() as u64;
        let per_record = (MAX_RECORD_BYTES as u64 / bs).max(1);
        let mut block = offset / bs;
        let end_block = end.div_ceil(bs);
        while block < end_block {
            let n = per_record.min(end_block - block);
            let lo = (block * bs).max(offset);
            let hi = ((block + n) * bs).min(end);
            let src = &data[(lo - offset) as usize..(hi - offset) as usize];
            self.write_blocks(&mut w, block, n, lo - block * bs, src)
                .await?;
            // Per record, so a large write fills segments of the usual size.
            self.after_append(&mut w).await?;
            block += n;
        }
        Ok(())
    }

    /// Appends one data record for blocks `first..first+n`, whose bytes from
    /// `skip` on are `src` and the rest are kept from what is there now;
    /// returns where the blocks now are.
    pub(crate) async fn write_blocks(
        &self,
        w: &mut Writer,
        first: u64,
        n: u64,
        skip: u64,
        src: &[u8],
    ) -> Result<Vec<Entry>> {
        let bs = self.block_size as usize;
        let len = n as usize * bs;
        let tail = skip as usize + src.len();
        // Whole blocks are written as they came; partial ones are merged
        // with what is there now.
        let mut merged = Vec::new();
        let payload: &[u8] = if skip == 0 && src.len() == len {
            src
        } else {
            merged.resize(len, 0);
            if skip > 0 {
                self.read_old_block(first, &mut merged[..bs]).await?;
            }
            if tail < len && !(n == 1 && skip > 0) {
                self.read_old_block(first + n - 1, &mut merged[len - bs..])
                    .await?;
            }
            merged[skip as usize..tail].copy_from_slice(src);
            &merged
        };
        self.mark_time(w)?;
        let entries = self.append_blocks(w, RecordKind::Data, first, payload)?;
        w.changed = true;
        self.map_op(|m, pins| m.set(first, &entries, pins)).await?;
        Ok(entries)
    }

    /// Appends whole blocks from block `first` on as one record of `kind`
    /// (`Data`, or `Copy` for segment cleaning); returns where each block
    /// now is, for the map.
    pub(crate) fn append_blocks(
        &self,
        w: &mut Writer,
        kind: RecordKind,
        first: u64,
        payload: &[u8],
    ) -> Result<Vec<Entry>> {
        let bs = self.block_size as usize;
        let n = (payload.len() / bs) as u64;
        let crcs: Vec<u32> = payload.chunks(bs).map(crc32c::crc32c).collect();
        let header = encode_header(kind, &self.uuid, w.next_lsn, first, n, payload);
        let at = self.append(w, &[&header, payload])?;
        let base = at + HEADER_LEN as u64;
        let seg = w.seg;
        Ok(crcs
            .iter()
            .enumerate()
            .map(|(i, &crc)| Entry {
                seg,
                off: (base + (i * bs) as u64) as u32,
                crc,
            })
            .collect())
    }

    /// The current contents of one block, for read-modify-write. Only the
    /// part inside the volume is read; the rest of a last partial block
    /// stays zero.
    async fn read_old_block(&self, block: u64, dst: &mut [u8]) -> Result<()> {
        let start = block * self.block_size as u64;
        let readable = (self.size() - start).min(dst.len() as u64) as usize;
        self.read_into(start, &mut dst[..readable]).await
    }

    /// Makes `offset..offset+len` read as zeros and releases its space.
    pub(crate) async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.life.check(Need::Write)?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut w = self.log.writer.lock().await;
        self.life.check(Need::Write)?;
        // Again under the lock: a rollback may have shrunk the volume.
        self.check_range(offset, len)?;
        self.make_room(&mut w).await?;
        let bs = self.block_size as u64;
        let size = self.size();
        let end = offset + len;
        // The volume's last partial block counts as whole: nothing past the
        // end is visible.
        let full_end = if end == size {
            end.div_ceil(bs)
        } else {
            end / bs
        };
        let full_start = offset.div_ceil(bs);
        if full_start < full_end {
            let head_end = (full_start * bs).min(end);
            if offset < head_end {
                self.write_zero_bytes(&mut w, offset, head_end).await?;
            }
            let tail_start = full_end * bs;
            if tail_start < end {
                self.write_zero_bytes(&mut w, tail_start, end).await?;
            }
            self.mark_time(&mut w)?;
            let header = encode_header(
                RecordKind::Zero,
                &self.uuid,
                w.next_lsn,
                full_start,
                full_end - full_start,
                &[],
            );
            self.append(&mut w, &[&header])?;
            w.changed = true;
            self.zero_blocks(full_start, full_end).await?;
        } else {
            self.write_zero_bytes(&mut w, offset, end).await?;
        }
        self.after_append(&mut w).await
    }

    /// Makes blocks `first..end` read as zeros in the map: unwritten, or in
    /// a clone, over its parent's blocks, zero entries (unwritten would
    /// show the parent's).
    pub(crate) async fn zero_blocks(&self, first: u64, end: u64) -> Result<()> {
        let over_parent = end.min(self.parent_blocks()).max(first);
        let zeros = [Entry::ZERO; MAP_FANOUT];
        let mut at = first;
        while at < over_parent {
            // A leaf at a time, so a long range never needs all its paths
            // dirty at once.
            let n = (MAP_FANOUT as u64 - at % MAP_FANOUT as u64).min(over_parent - at);
            self.map_op(|m, pins| m.set(at, &zeros[..n as usize], pins))
                .await?;
            at += n;
        }
        if over_parent < end {
            self.map_op(|m, pins| m.zero(over_parent, end, pins))
                .await?;
        }
        Ok(())
    }

    /// Zeros within at most two partial blocks, by read-modify-write.
    async fn write_zero_bytes(&self, w: &mut Writer, lo: u64, hi: u64) -> Result<()> {
        let bs = self.block_size as u64;
        let zeros = vec![0u8; (hi - lo) as usize];
        let mut block = lo / bs;
        while block * bs < hi {
            let b_lo = (block * bs).max(lo);
            let b_hi = ((block + 1) * bs).min(hi);
            self.write_blocks(
                w,
                block,
                1,
                b_lo - block * bs,
                &zeros[(b_lo - lo) as usize..(b_hi - lo) as usize],
            )
            .await?;
            block += 1;
        }
        Ok(())
    }

    /// Grows the volume to `new_size` bytes; the new space reads as zeros.
    pub(crate) async fn resize(&self, new_size: u64) -> Result<()> {
        self.life.check(Need::Write)?;
        let mut w = self.log.writer.lock().await;
        self.life.check(Need::Write)?;
        self.make_room(&mut w).await?;
        let size = self.size();
        if new_size < size {
            return Err(VolumeError::InvalidArgument(format!(
                "cannot shrink the volume from {size} to {new_size} bytes"
            )));
        }
        if new_size > i64::MAX as u64 {
            return Err(VolumeError::InvalidArgument(format!(
                "size {new_size} is too large"
            )));
        }
        if new_size == size {
            return Ok(());
        }
        self.mark_time(&mut w)?;
        let header = encode_header(RecordKind::Resize, &self.uuid, w.next_lsn, new_size, 0, &[]);
        self.append(&mut w, &[&header])?;
        w.changed = true;
        self.size.store(new_size, Ordering::SeqCst);
        self.map
            .lock()
            .grow_to(new_size.div_ceil(self.block_size as u64));
        self.after_append(&mut w).await
    }
}
