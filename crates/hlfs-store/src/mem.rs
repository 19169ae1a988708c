//! An in-memory store and journal for tests. Fault injection, latency,
//! crash points and power-cut images come from the [`crate::layers::Faults`]
//! layer, which works over this store as over any other.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use crate::{
    validate_blob_name, validate_journal_name, BlobMeta, BlobStore, JournalDir, JournalFile,
    JournalLock, Result, StoreError,
};

/// One in-memory world: a blob store and a journal directory.
#[derive(Clone, Default)]
pub struct MemEnv {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    blobs: BTreeMap<String, Bytes>,
    /// When each blob was put (ms since the epoch); blobs an env was made
    /// with count as made then.
    made_ms: BTreeMap<String, u64>,
    /// Files are shared with their open handles, which keep working after
    /// the name is removed, as on a real filesystem.
    files: BTreeMap<String, Arc<Mutex<Vec<u8>>>>,
    locked: bool,
}

impl MemEnv {
    pub fn new() -> MemEnv {
        MemEnv::default()
    }

    /// An env holding these blobs and journal files.
    pub fn with_contents(
        blobs: BTreeMap<String, Bytes>,
        files: BTreeMap<String, Vec<u8>>,
    ) -> MemEnv {
        let files = files
            .into_iter()
            .map(|(name, data)| (name, Arc::new(Mutex::new(data))))
            .collect();
        let now = crate::epoch_ms(std::time::SystemTime::now());
        let made_ms = blobs.keys().map(|name| (name.clone(), now)).collect();
        MemEnv {
            state: Arc::new(Mutex::new(State {
                blobs,
                made_ms,
                files,
                locked: false,
            })),
        }
    }

    /// The env's blob store. Every call returns a handle to the same blobs.
    pub fn store(&self) -> Arc<MemStore> {
        Arc::new(MemStore { env: self.clone() })
    }

    /// The env's journal directory. Every call returns a handle to the same
    /// files and the same lock.
    pub fn journal(&self) -> Arc<MemJournal> {
        Arc::new(MemJournal { env: self.clone() })
    }

    /// A new, independent env holding this one's blobs and no journal: what
    /// another host sees of a volume in a shared store, or this host after
    /// losing its local disk.
    pub fn store_only(&self) -> MemEnv {
        MemEnv::with_contents(self.state.lock().blobs.clone(), BTreeMap::new())
    }
}

impl fmt::Debug for MemEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("MemEnv")
            .field("blobs", &state.blobs.len())
            .field("journal_files", &state.files.len())
            .finish_non_exhaustive()
    }
}

/// The blob store of a [`MemEnv`].
pub struct MemStore {
    env: MemEnv,
}

impl fmt::Debug for MemStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemStore").field("env", &self.env).finish()
    }
}

#[async_trait]
impl BlobStore for MemStore {
    fn describe(&self) -> String {
        "memory".to_string()
    }

    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<()> {
        validate_blob_name(name)?;
        let mut state = self.env.state.lock();
        if state.blobs.contains_key(name) {
            return Err(StoreError::AlreadyExists(name.to_string()));
        }
        state.blobs.insert(name.to_string(), data);
        let now = crate::epoch_ms(std::time::SystemTime::now());
        state.made_ms.insert(name.to_string(), now);
        Ok(())
    }

    async fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Bytes> {
        validate_blob_name(name)?;
        let state = self.env.state.lock();
        let blob = state
            .blobs
            .get(name)
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        let size = blob.len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(blob.slice(offset as usize..end as usize)),
            _ => Err(StoreError::OutOfRange {
                name: name.to_string(),
                offset,
                len,
                size,
            }),
        }
    }

    async fn head(&self, name: &str) -> Result<Option<u64>> {
        validate_blob_name(name)?;
        let state = self.env.state.lock();
        Ok(state.blobs.get(name).map(|blob| blob.len() as u64))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<BlobMeta>> {
        let state = self.env.state.lock();
        Ok(state
            .blobs
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(name, _)| name.starts_with(prefix))
            .map(|(name, blob)| BlobMeta {
                name: name.clone(),
                size: blob.len() as u64,
                modified_ms: state.made_ms.get(name).copied().unwrap_or(0),
            })
            .collect())
    }

    async fn delete(&self, name: &str) -> Result<()> {
        validate_blob_name(name)?;
        let mut state = self.env.state.lock();
        state.blobs.remove(name);
        state.made_ms.remove(name);
        Ok(())
    }

    /// A put in memory is whole or absent: nothing is left over.
    async fn sweep_leftovers(&self) -> Result<u64> {
        Ok(0)
    }
}

/// The journal directory of a [`MemEnv`].
pub struct MemJournal {
    env: MemEnv,
}

impl fmt::Debug for MemJournal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemJournal")
            .field("env", &self.env)
            .finish()
    }
}

impl JournalDir for MemJournal {
    fn create(&self, name: &str) -> Result<Arc<dyn JournalFile>> {
        validate_journal_name(name)?;
        let mut state = self.env.state.lock();
        if state.files.contains_key(name) {
            return Err(StoreError::AlreadyExists(name.to_string()));
        }
        let file = Arc::new(Mutex::new(Vec::new()));
        state.files.insert(name.to_string(), file.clone());
        Ok(Arc::new(MemJournalFile {
            name: name.to_string(),
            data: file,
        }))
    }

    fn open(&self, name: &str) -> Result<Arc<dyn JournalFile>> {
        validate_journal_name(name)?;
        let state = self.env.state.lock();
        let file = state
            .files
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        Ok(Arc::new(MemJournalFile {
            name: name.to_string(),
            data: file,
        }))
    }

    fn list(&self) -> Result<Vec<String>> {
        Ok(self.env.state.lock().files.keys().cloned().collect())
    }

    fn remove(&self, name: &str) -> Result<()> {
        validate_journal_name(name)?;
        self.env.state.lock().files.remove(name);
        Ok(())
    }

    fn local_path(&self, _name: &str) -> Option<PathBuf> {
        None
    }

    fn lock(&self) -> Result<JournalLock> {
        let mut state = self.env.state.lock();
        if state.locked {
            return Err(StoreError::Locked {
                name: "memory journal".to_string(),
            });
        }
        state.locked = true;
        Ok(JournalLock::new(Box::new(MemLockGuard {
            env: self.env.clone(),
        })))
    }
}

struct MemLockGuard {
    env: MemEnv,
}

impl Drop for MemLockGuard {
    fn drop(&mut self) {
        self.env.state.lock().locked = false;
    }
}

struct MemJournalFile {
    name: String,
    data: Arc<Mutex<Vec<u8>>>,
}

fn offset_to_usize(name: &str, offset: u64) -> Result<usize> {
    usize::try_from(offset)
        .map_err(|_| StoreError::Invalid(format!("offset {offset} in {name} is too large")))
}

impl JournalFile for MemJournalFile {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let start = offset_to_usize(&self.name, offset)?;
        let mut file = self.data.lock();
        let end = start + data.len();
        if file.len() < end {
            file.resize(end, 0);
        }
        file[start..end].copy_from_slice(data);
        Ok(())
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let file = self.data.lock();
        let size = file.len();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(size);
        let end = start.saturating_add(len).min(size);
        Ok(file[start..end].to_vec())
    }

    fn read_exact_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let file = self.data.lock();
        let size = file.len();
        match usize::try_from(offset)
            .ok()
            .filter(|s| s + buf.len() <= size)
        {
            Some(start) => {
                buf.copy_from_slice(&file[start..start + buf.len()]);
                Ok(())
            }
            None => Err(StoreError::OutOfRange {
                name: self.name.clone(),
                offset,
                len: buf.len() as u64,
                size: size as u64,
            }),
        }
    }

    fn len(&self) -> Result<u64> {
        Ok(self.data.lock().len() as u64)
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn truncate(&self, len: u64) -> Result<()> {
        let len = offset_to_usize(&self.name, len)?;
        self.data.lock().resize(len, 0);
        Ok(())
    }
}
