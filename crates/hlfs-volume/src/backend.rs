//! Where a volume lives: a blob store for sealed segments and manifests, and
//! a journal area for the open segment.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hlfs_store::{BlobStore, JournalDir, LocalJournal, LocalStore, MemEnv, S3Store};

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

    /// A volume in an S3 bucket. Its open segment is journalled locally,
    /// under `HLFS_CACHE_DIR` (default `~/.cache/hlfs`), in a directory named
    /// after the address; sealed segments and manifests go to the bucket.
    pub fn s3(address: &str) -> Result<Backend> {
        let store = S3Store::from_uri(address)?;
        let cache = std::env::var_os("HLFS_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hlfs")))
            .ok_or_else(|| {
                VolumeError::InvalidArgument(
                    "set HLFS_CACHE_DIR or HOME for the local journal".into(),
                )
            })?;
        let rel: String = address
            .trim_start_matches("s3://")
            .trim_end_matches('/')
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let journal = LocalJournal::new(cache.join("s3").join(rel).join(LOCAL_JOURNAL_DIR))?;
        Ok(Backend {
            store: Arc::new(store),
            journal: Arc::new(journal),
            location: address.to_string(),
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

    /// Parses a volume address: a path, a `file://` URI, or an `s3://`
    /// URI (whose journal lives in the local cache directory).
    pub fn parse(address: &str, create: bool) -> Result<Backend> {
        if let Some(path) = address.strip_prefix("file://") {
            return Backend::local(&PathBuf::from(path), create);
        }
        if address.starts_with("s3://") {
            return Backend::s3(address);
        }
        if let Some((scheme, _)) = address.split_once("://") {
            return Err(VolumeError::InvalidArgument(format!(
                "volume address {address:?}: the {scheme}:// backend is not available in this build; use a local path or file://"
            )));
        }
        Backend::local(Path::new(address), create)
    }
}
