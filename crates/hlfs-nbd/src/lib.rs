//! An NBD server (fixed newstyle handshake, structured replies, block
//! status of allocation and of change sets, many requests in flight per connection), generic over a
//! [`BlockDevice`]. It knows nothing about how the device stores its blocks.

pub mod proto;
mod server;
mod transmission;

use async_trait::async_trait;

pub use server::{Catalog, Export, ExportHold, Limits, Server, RESERVE_BYTES};

/// Why a device request failed: the errno the client sees, and a message
/// for the log (and for structured error replies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceError {
    pub errno: u32,
    pub message: String,
}

impl DeviceError {
    pub fn new(errno: u32, message: impl Into<String>) -> Self {
        DeviceError {
            errno,
            message: message.into(),
        }
    }
}

pub type DeviceResult<T> = Result<T, DeviceError>;

/// A run of the device that either holds data or is a hole reading as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceExtent {
    pub len: u64,
    pub allocated: bool,
}

/// A run of the device as a change set sees it: changed since the set
/// began, or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangedRun {
    pub len: u64,
    pub changed: bool,
}

/// What the server serves. All methods may be called from many tasks at
/// once; the server checks ranges against `size` before calling.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// The preferred I/O size (a power of two).
    fn block_size(&self) -> u32;
    async fn read(&self, offset: u64, buf: &mut [u8]) -> DeviceResult<()>;
    /// With `fua`, returns only once the data is durable.
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> DeviceResult<()>;
    /// Makes every completed write durable.
    async fn flush(&self) -> DeviceResult<()>;
    /// The range reads as zeros afterwards and may release its space.
    async fn trim(&self, offset: u64, len: u64) -> DeviceResult<()>;
    /// The range reads as zeros. With `no_hole`, space stays allocated.
    async fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> DeviceResult<()>;
    /// Runs from `offset` covering at most `len` bytes; may cover less (at
    /// least one byte), as a client asks again for the rest.
    async fn extents(&self, offset: u64, len: u64) -> DeviceResult<Vec<DeviceExtent>>;
    /// The change sets a client may ask block status of, by name: served
    /// as the metadata contexts `qemu:dirty-bitmap:NAME`.
    fn change_sets(&self) -> Vec<String>;
    /// Runs from `offset` covering at most `len` bytes (at least one), of
    /// what changed since change set `set` began.
    async fn changes(&self, set: &str, offset: u64, len: u64) -> DeviceResult<Vec<ChangedRun>>;
}

pub mod tls;
