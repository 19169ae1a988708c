//! Storage for HLFS volumes.
//!
//! Two kinds of storage sit under a volume:
//!
//! * a [`BlobStore`]: immutable named blobs (sealed segments, manifests). A
//!   backend only has to create a blob atomically and never modify it, which is
//!   what lets the same engine run on a local directory, on S3 and on HDFS;
//! * a [`JournalDir`]: the local, appendable area where the open segment is
//!   written and made durable with `fdatasync` before it is sealed into the store.
//!
//! [`LocalStore`]/[`LocalJournal`] are the embedded default; [`S3Store`],
//! (with the `hdfs` feature) `HdfsStore` and (with the `rados` feature)
//! `RadosStore` are remote. [`MemEnv`] holds an
//! in-memory store and journal for tests.
//!
//! What is not storage itself comes as [`layers`] around any store: retry,
//! request counting, and for tests fault injection, latency, crash points
//! and power-cut images. Time and randomness come from [`time`], passed in,
//! so tests can move the clock and replay a schedule exactly.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

mod error;
#[cfg(feature = "hdfs")]
mod hdfs;
mod local;
mod mem;
#[cfg(feature = "rados")]
mod rados;
mod s3;

pub mod conformance;
pub mod layers;
pub mod time;

pub use error::{Result, StoreError};
#[cfg(feature = "hdfs")]
pub use hdfs::HdfsStore;
pub use local::{LocalJournal, LocalStore};
pub use mem::{MemEnv, MemJournal, MemStore};
#[cfg(feature = "rados")]
pub use rados::{RadosStore, PIECE_BYTES as RADOS_PIECE_BYTES};
pub use s3::S3Store;

/// Settings for a connection to a Ceph cluster (`rados://` volumes, with
/// the `rados` feature). What is left unset is left to librados:
/// `CEPH_CONF` and Ceph's default places for the configuration file,
/// `CEPH_ARGS` for further options, `admin` for the client id, the keyring
/// the configuration names.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct CephSettings {
    pub conf: Option<PathBuf>,
    pub id: Option<String>,
    pub keyring: Option<PathBuf>,
}

/// A blob's name, size and age, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobMeta {
    pub name: String,
    pub size: u64,
    /// When the store last wrote it, in ms since the epoch (blobs are
    /// written once, so: when it was made), by the store's own clock.
    pub modified_ms: u64,
}

/// A [`std::time::SystemTime`] in ms since the epoch; 0 before it.
pub fn epoch_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Immutable named blobs. Names are `/`-separated relative paths such as
/// `manifest/00000000000000000042` or `segments/0000000007`.
#[async_trait]
pub trait BlobStore: Send + Sync + fmt::Debug {
    /// Where the store is, for messages (never contains credentials).
    fn describe(&self) -> String;

    /// Atomically create `name` with `data`; fails with `AlreadyExists` if the
    /// name exists. When it returns Ok the blob is durable.
    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<()>;

    /// Like `put_if_absent`, with the bytes in a local file the caller will
    /// delete afterwards. Stores on the same filesystem link it instead of
    /// copying.
    async fn put_file_if_absent(&self, name: &str, path: &Path) -> Result<()> {
        let data = tokio::fs::read(path)
            .await
            .map_err(|e| StoreError::io(path.display().to_string(), e))?;
        self.put_if_absent(name, Bytes::from(data)).await
    }

    /// Exactly `len` bytes at `offset`; `OutOfRange` if the blob is shorter.
    async fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Bytes>;

    /// The whole blob.
    async fn get(&self, name: &str) -> Result<Bytes> {
        let size = self
            .head(name)
            .await?
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        self.get_range(name, 0, size).await
    }

    /// The blob's size, or None if it does not exist.
    async fn head(&self, name: &str) -> Result<Option<u64>>;

    /// Every blob whose name starts with `prefix`, sorted by name.
    async fn list(&self, prefix: &str) -> Result<Vec<BlobMeta>>;

    /// Remove a blob. Removing a missing blob is not an error.
    async fn delete(&self, name: &str) -> Result<()>;

    /// Removes what puts cut off by a crash left beside the blobs (never
    /// a blob, nor what a put in flight still writes), and returns the
    /// bytes freed. Every store says what it leaves, even if nothing.
    async fn sweep_leftovers(&self) -> Result<u64>;

    /// A handle for many ranged reads of one blob (the local store keeps the
    /// file open).
    async fn open_reader(self: Arc<Self>, name: &str) -> Result<Arc<dyn BlobReader>>
    where
        // The default reader holds the store; `dyn BlobStore` is 'static.
        Self: 'static,
    {
        let size = self
            .head(name)
            .await?
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        Ok(Arc::new(RangeReader {
            store: self,
            name: name.to_string(),
            size,
        }))
    }
}

/// Ranged reads of one blob.
#[async_trait]
pub trait BlobReader: Send + Sync {
    /// Exactly `len` bytes at `offset`.
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes>;
    /// Exactly `buf.len()` bytes at `offset`, into `buf` (a local store
    /// reads straight into it).
    async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let data = self.read_at(offset, buf.len()).await?;
        buf.copy_from_slice(&data);
        Ok(())
    }
    fn size(&self) -> u64;
}

struct RangeReader<S: ?Sized> {
    store: Arc<S>,
    name: String,
    size: u64,
}

#[async_trait]
impl<S: BlobStore + ?Sized> BlobReader for RangeReader<S> {
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.store.get_range(&self.name, offset, len as u64).await
    }
    fn size(&self) -> u64 {
        self.size
    }
}

/// The local area holding the open segment(s) of a volume. Calls are blocking
/// and short except `JournalFile::sync`, which callers run off the async
/// executor.
pub trait JournalDir: Send + Sync + fmt::Debug {
    /// Create a new empty file; its directory entry is durable on return.
    /// Fails with `AlreadyExists` if it exists.
    fn create(&self, name: &str) -> Result<Arc<dyn JournalFile>>;
    /// Open an existing file for reading and appending.
    fn open(&self, name: &str) -> Result<Arc<dyn JournalFile>>;
    /// Names of the files present, sorted.
    fn list(&self) -> Result<Vec<String>>;
    /// Remove a file (durably). Removing a missing file is not an error.
    fn remove(&self, name: &str) -> Result<()>;
    /// The file's path if it is a real local file (lets a local store link it).
    fn local_path(&self, name: &str) -> Option<PathBuf>;
    /// Take the exclusive writer lock of this journal area. Held until the
    /// guard is dropped; `Locked` if someone else holds it.
    fn lock(&self) -> Result<JournalLock>;
}

/// Proof of holding a [`JournalDir`]'s writer lock; releases it on drop.
pub struct JournalLock {
    _release: Box<dyn Send + Sync>,
}

impl JournalLock {
    pub fn new(release: Box<dyn Send + Sync>) -> Self {
        JournalLock { _release: release }
    }
}

impl fmt::Debug for JournalLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JournalLock")
    }
}

/// One append-only journal file.
pub trait JournalFile: Send + Sync {
    /// Write `data` at `offset` (the engine only ever writes at the end).
    /// Not durable until `sync`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Writes `parts` one after another from `offset`, as one write where
    /// the backend can (a record's header and its data, without copying
    /// them together first).
    fn write_parts_at(&self, offset: u64, parts: &[&[u8]]) -> Result<()> {
        let mut at = offset;
        for part in parts {
            self.write_at(at, part)?;
            at += part.len() as u64;
        }
        Ok(())
    }
    /// Up to `len` bytes at `offset`; shorter only at the end of the file.
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// Exactly `buf.len()` bytes at `offset`; `OutOfRange` past the end.
    fn read_exact_into(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Starts writing `offset..offset+len` to disk without waiting, so that
    /// a later `sync` has less left to do. Only a hint.
    fn start_writeback(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    /// Waits until `offset..offset+len` is written to disk and drops it
    /// from memory (the page cache), so that appending reuses the same
    /// pages instead of taking fresh ones. Durability is still `sync`'s
    /// job, but an error here is a write error of the file that a later
    /// `sync` may no longer report: treat it as a failed sync.
    fn release(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    fn len(&self) -> Result<u64>;
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Make everything written so far durable (fdatasync).
    fn sync(&self) -> Result<()>;
    /// Cut the file to `len` bytes, durably.
    fn truncate(&self, len: u64) -> Result<()>;
}

/// Check that `name` is a valid blob name: a relative, `/`-separated path of
/// non-empty components none of which starts with `.`. That rules out `..`
/// (escaping a local root) and the stores' own hidden entries such as `.tmp`.
/// Every backend applies the same rule so that a volume can move between
/// them.
pub fn validate_blob_name(name: &str) -> Result<()> {
    let invalid = |why: &str| {
        Err(StoreError::Invalid(format!(
            "invalid blob name {name:?}: {why}"
        )))
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.starts_with('/') {
        return invalid("it must be relative");
    }
    if name.contains('\0') {
        return invalid("it contains a NUL byte");
    }
    for component in name.split('/') {
        if component.is_empty() {
            return invalid("it has an empty path component");
        }
        if component == ".." {
            return invalid("it must not contain `..`");
        }
        if component.starts_with('.') {
            return invalid("its components must not start with `.`");
        }
    }
    Ok(())
}

/// Journal file names are single path components; `LOCK` is the lock file and
/// names starting with `.` are left to the filesystem and tools.
pub(crate) fn validate_journal_name(name: &str) -> Result<()> {
    let invalid = |why: &str| {
        Err(StoreError::Invalid(format!(
            "invalid journal file name {name:?}: {why}"
        )))
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.contains(['/', '\0']) {
        return invalid("it must be a single path component");
    }
    if name.starts_with('.') {
        return invalid("it must not start with `.`");
    }
    if name == JOURNAL_LOCK_NAME {
        return invalid("that name is reserved for the lock file");
    }
    Ok(())
}

/// The file in a journal directory that carries the writer lock.
pub(crate) const JOURNAL_LOCK_NAME: &str = "LOCK";
