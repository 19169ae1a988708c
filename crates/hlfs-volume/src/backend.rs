//! Where a volume lives: a blob store for sealed segments and manifests, and
//! a journal area for the open segment.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hlfs_store::{BlobStore, JournalDir, LocalJournal, LocalStore, MemEnv};

use crate::error::{Result, VolumeError};

#[derive(Clone, Debug)]
pub struct Backend {
    pub store: Arc<dyn BlobStore>,
    pub journal: Arc<dyn JournalDir>,
    /// How the user named the volume, for messages.
    pub location: String,
}

/// Subdirectory of a local volume holding its journal.
pub const LOCAL_JOURNAL_DIR: &str = "journal";

impl Backend {
    /// A volume in a local directory. With `create`, the directory is made
    /// if missing; otherwise a missing directory is `NotFound`.
    pub fn local(path: &Path, create: bool) -> Result<Backend> {
        let location = path.display().to_string();
        if create {
            std::fs::create_dir_all(path).map_err(|e| {
                VolumeError::InvalidArgument(format!("cannot create {location}: {e}"))
            })?;
        } else if !path.is_dir() {
            return Err(VolumeError::NotFound(location));
        }
        let journal = LocalJournal::new(path.join(LOCAL_JOURNAL_DIR))?;
        Ok(Backend {
            store: Arc::new(LocalStore::new(path)),
            journal: Arc::new(journal),
            location,
        })
    }

    /// A volume in a test environment.
    pub fn memory(env: &MemEnv) -> Backend {
        Backend {
            store: env.store(),
            journal: env.journal(),
            location: "memory".into(),
        }
    }

    /// Parses a volume address: a path, or a `file://` URI. Distributed
    /// engines are named with `s3://` and `hdfs://`.
    pub fn parse(address: &str, create: bool) -> Result<Backend> {
        if let Some(path) = address.strip_prefix("file://") {
            return Backend::local(&PathBuf::from(path), create);
        }
        if let Some((scheme, _)) = address.split_once("://") {
            return Err(VolumeError::InvalidArgument(format!(
                "volume address {address:?}: the {scheme}:// backend is not available in this build; use a local path or file://"
            )));
        }
        Backend::local(Path::new(address), create)
    }
}
