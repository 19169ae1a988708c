//! An HLFS volume as a block device.
//!
//! [`VolumeDevice`] is how a [`Volume`] is served: it implements the NBD
//! server's [`BlockDevice`] trait, so `hlfs serve` (and the coming control
//! socket and C API, which serve the same volumes) share one adapter. It is
//! also the one place where an engine error becomes an NBD error number:
//! [`nbd_errno`], from the error's kind.

pub mod control;

use async_trait::async_trait;
use hlfs_nbd::proto::{EINVAL, EIO, EPERM};
use hlfs_nbd::{BlockDevice, DeviceError, DeviceExtent, DeviceResult};
use hlfs_volume::{ErrorKind, Volume, VolumeError};

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
}

impl VolumeDevice {
    pub fn new(vol: Volume) -> VolumeDevice {
        VolumeDevice { vol }
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
        self.vol.read_into(offset, buf).await.map_err(device_error)
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> DeviceResult<()> {
        let written = match fua {
            true => self.vol.write_fua(offset, data).await,
            false => self.vol.write(offset, data).await,
        };
        written.map_err(device_error)
    }

    async fn flush(&self) -> DeviceResult<()> {
        self.vol.flush().await.map_err(device_error)
    }

    async fn trim(&self, offset: u64, len: u64) -> DeviceResult<()> {
        self.vol.trim(offset, len).await.map_err(device_error)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> DeviceResult<()> {
        if !no_hole {
            return self
                .vol
                .write_zeroes(offset, len)
                .await
                .map_err(device_error);
        }
        // The client wants the space kept: write zeros as data.
        let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(ZERO_CHUNK) as usize;
            self.vol
                .write(at, &zeros[..n])
                .await
                .map_err(device_error)?;
            at += n as u64;
        }
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> DeviceResult<Vec<DeviceExtent>> {
        let runs = self
            .vol
            .extents(offset, len, EXTENTS_PER_REPLY)
            .await
            .map_err(device_error)?;
        Ok(runs
            .into_iter()
            .map(|x| DeviceExtent {
                len: x.len,
                allocated: x.data,
            })
            .collect())
    }
}
