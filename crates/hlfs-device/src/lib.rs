//! An HLFS volume as a block device.
//!
//! [`VolumeDevice`] is how a [`Volume`] is served: it implements the NBD
//! server's [`BlockDevice`] trait, so `hlfs serve` (and the coming control
//! socket and C API, which serve the same volumes) share one adapter. It is
//! also the one place where an engine error becomes an NBD error number:
//! [`nbd_errno`], from the error's kind.

pub mod control;
pub mod metrics;

use async_trait::async_trait;
use hlfs_nbd::proto::{EINVAL, EIO, EPERM};
use hlfs_nbd::{BlockDevice, ChangedRun, DeviceError, DeviceExtent, DeviceResult};
use hlfs_volume::{DiffExtent, ErrorKind, Volume, VolumeError};
use metrics::{ExportMetrics, Op};

/// Zeros written as data at most this much at a time (NO_HOLE zeroing).
const ZERO_CHUNK: u64 = 1 << 20;

/// Block status answers at most this many runs at a time; the client asks
/// again from where the answer ends.
const EXTENTS_PER_REPLY: usize = 1024;

/// The NBD error number for an engine error of `kind`. NBD has a handful:
/// a bad request is EINVAL, a write to a read-only export EPERM, and
/// anything else an I/O error, which a client may retry.
pub fn nbd_errno(kind: ErrorKind) -> u32 {
    match kind {
        ErrorKind::InvalidInput | ErrorKind::OutOfRange => EINVAL,
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::NotFound
        | ErrorKind::AlreadyExists
        | ErrorKind::Busy
        | ErrorKind::Unavailable
        | ErrorKind::Corrupt
        | ErrorKind::Io
        | ErrorKind::Closed => EIO,
    }
}

fn device_error(e: VolumeError) -> DeviceError {
    DeviceError::new(nbd_errno(e.kind()), e.to_string())
}

/// A volume served as a block device.
pub struct VolumeDevice {
    vol: Volume,
    metrics: Option<ExportMetrics>,
}

impl VolumeDevice {
    pub fn new(vol: Volume) -> VolumeDevice {
        VolumeDevice { vol, metrics: None }
    }

    /// A device that records each request into `metrics`.
    pub fn with_metrics(vol: Volume, metrics: ExportMetrics) -> VolumeDevice {
        VolumeDevice {
            vol,
            metrics: Some(metrics),
        }
    }

    /// Runs one request, recording what it cost.
    async fn measured<T>(
        &self,
        op: Op,
        bytes: u64,
        request: impl std::future::Future<Output = hlfs_volume::Result<T>>,
    ) -> DeviceResult<T> {
        let Some(m) = &self.metrics else {
            return request.await.map_err(device_error);
        };
        let started = std::time::Instant::now();
        let out = request.await;
        m.record(op, bytes, out.is_ok(), started.elapsed());
        out.map_err(device_error)
    }

    pub fn volume(&self) -> &Volume {
        &self.vol
    }
}

#[async_trait]
impl BlockDevice for VolumeDevice {
    fn size(&self) -> u64 {
        self.vol.size()
    }

    fn read_only(&self) -> bool {
        self.vol.is_read_only()
    }

    fn block_size(&self) -> u32 {
        self.vol.block_size()
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> DeviceResult<()> {
        let len = buf.len() as u64;
        self.measured(Op::Read, len, self.vol.read_into(offset, buf))
            .await
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> DeviceResult<()> {
        let len = data.len() as u64;
        let written = async {
            match fua {
                true => self.vol.write_fua(offset, data).await,
                false => self.vol.write(offset, data).await,
            }
        };
        self.measured(Op::Write, len, written).await
    }

    async fn flush(&self) -> DeviceResult<()> {
        self.measured(Op::Flush, 0, self.vol.flush()).await
    }

    async fn trim(&self, offset: u64, len: u64) -> DeviceResult<()> {
        self.measured(Op::Trim, len, self.vol.trim(offset, len))
            .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> DeviceResult<()> {
        let zeroed = async {
            if !no_hole {
                return self.vol.write_zeroes(offset, len).await;
            }
            // The client wants the space kept: write zeros as data.
            let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(ZERO_CHUNK) as usize;
                self.vol.write(at, &zeros[..n]).await?;
                at += n as u64;
            }
            Ok(())
        };
        self.measured(Op::WriteZeroes, len, zeroed).await
    }

    async fn extents(&self, offset: u64, len: u64) -> DeviceResult<Vec<DeviceExtent>> {
        let runs = self
            .measured(
                Op::BlockStatus,
                0,
                self.vol.extents(offset, len, EXTENTS_PER_REPLY),
            )
            .await?;
        Ok(runs
            .into_iter()
            .map(|x| DeviceExtent {
                len: x.len,
                allocated: x.data,
            })
            .collect())
    }

    /// Each snapshot is a change set: what changed since it, in the head
    /// (or, on a snapshot's export, in that snapshot). A read-only view
    /// of the head has none (see `Volume::changes_since`).
    fn change_sets(&self) -> Vec<String> {
        if self.vol.is_read_only() && self.vol.snapshot().is_none() {
            return Vec::new();
        }
        // Names starting with '-' are the engine's own (an import's guard).
        self.vol
            .snapshots()
            .into_iter()
            .map(|s| s.name)
            .filter(|name| !name.starts_with('-'))
            .collect()
    }

    async fn changes(&self, set: &str, offset: u64, len: u64) -> DeviceResult<Vec<ChangedRun>> {
        let diff = self
            .measured(Op::BlockStatus, 0, self.vol.changes_since(set))
            .await?;
        Ok(changed_runs(&diff.extents, offset, len, EXTENTS_PER_REPLY))
    }
}

/// The runs of `offset..offset + len` (at most `limit`), changed where
/// `extents` (in order, apart) cover them.
fn changed_runs(extents: &[DiffExtent], offset: u64, len: u64, limit: usize) -> Vec<ChangedRun> {
    let end = offset + len;
    let mut out: Vec<ChangedRun> = Vec::new();
    let push = |out: &mut Vec<ChangedRun>, len: u64, changed: bool| match out.last_mut() {
        Some(last) if last.changed == changed => last.len += len,
        _ => out.push(ChangedRun { len, changed }),
    };
    let mut at = offset;
    let first = extents.partition_point(|e| e.offset + e.len <= offset);
    for e in &extents[first..] {
        if e.offset >= end || out.len() >= limit {
            break;
        }
        if e.offset > at {
            push(&mut out, e.offset - at, false);
            at = e.offset;
        }
        let stop = (e.offset + e.len).min(end);
        push(&mut out, stop - at, true);
        at = stop;
    }
    if at < end && out.len() < limit {
        push(&mut out, end - at, false);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(offset: u64, len: u64, zero: bool) -> DiffExtent {
        DiffExtent { offset, len, zero }
    }

    fn run(len: u64, changed: bool) -> ChangedRun {
        ChangedRun { len, changed }
    }

    #[test]
    fn changed_runs_cover_the_range_asked_and_merge_data_with_zeros() {
        let extents = [
            x(4096, 4096, false),
            x(8192, 4096, true),
            x(65536, 8192, false),
        ];
        assert_eq!(
            changed_runs(&extents, 0, 1 << 20, 100),
            [
                run(4096, false),
                run(8192, true),
                run(65536 - 12288, false),
                run(8192, true),
                run((1 << 20) - 73728, false)
            ]
        );
        // From inside an extent, to inside the next.
        assert_eq!(
            changed_runs(&extents, 10000, 60000, 100),
            [run(2288, true), run(53248, false), run(4464, true)]
        );
        // Past every extent, and with nothing changed.
        assert_eq!(
            changed_runs(&extents, 1 << 19, 4096, 100),
            [run(4096, false)]
        );
        assert_eq!(changed_runs(&[], 0, 512, 100), [run(512, false)]);
        // The limit cuts the answer short after an extent; the client asks
        // again from its end.
        assert_eq!(
            changed_runs(&extents, 0, 1 << 20, 1),
            [run(4096, false), run(4096, true)]
        );
    }
}
