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
use hlfs_nbd::{BlockDevice, DeviceError, DeviceExtent, DeviceResult};
use hlfs_volume::{ErrorKind, Volume, VolumeError};
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
}
