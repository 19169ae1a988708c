//! The HLFS engine: a thin virtual disk kept as a log of immutable segments,
//! with a block map whose memory does not grow with the volume, crash
//! recovery to a prefix of what was written, and O(1) snapshots.
//!
//! docs/ARCHITECTURE.md explains the design; docs/FORMAT.md the bytes.

mod backend;
mod cache;
mod check;
mod error;
mod map;
mod segments;
mod volume;

pub use backend::{default_cache_dir, Backend, StoreOptions, LOCAL_JOURNAL_DIR};
pub use cache::ReadCache;
pub use check::{check, CheckReport};
pub use error::{Result, VolumeError};
pub use volume::{
    utc, validate_snapshot_name, CreateOptions, Durability, Extent, OpenOptions, SnapshotInfo,
    View, Volume, VolumeInfo,
};
