//! The HLFS engine: a thin virtual disk kept as a log of immutable segments,
//! with a block map whose memory does not grow with the volume, crash
//! recovery to a prefix of what was written, and O(1) snapshots.
//!
//! docs/ARCHITECTURE.md explains the design and its rooms; docs/FORMAT.md
//! the bytes. Each concern has a module of its own:
//!
//! | module | owns |
//! |---|---|
//! | `volume` | the public façade, [`Volume`] |
//! | `follow` | read-only views that reopen when cleaning deletes what they read |
//! | `options` | what callers choose and the values they get back |
//! | `core` | the state the rooms share, and the order of its locks |
//! | `lifecycle` | open, closing, closed, failed: one state, one check |
//! | `open` | create, open (and takeover), close |
//! | `recovery` | replaying the log after the head checkpoint |
//! | `log` | appending records, group commit, retiring journal files |
//! | `write`, `read` | the write and read paths |
//! | `checkpoint` | map write-back, checkpoints, sealing |
//! | `manifest` | the manifest log: compare-and-swap, claim, fencing |
//! | `upload` | the upload task and the backlog writers wait on |
//! | `runner` | the background-task runner |
//! | `snapshot` | snapshots and rollback |
//! | `retain` | the retention window: time marks, retention points |
//! | `clean` | segment cleaning |
//! | `clone` | clones: the parent view, the link, the pins |
//! | `info`, `check` | what a volume says of itself, and verification |
//! | `figures` | what an open volume is doing, for monitoring |
//! | `stats` | where the space goes, from metadata alone |
//! | `diff` | what changed between two roots, from metadata alone |
//! | `segments`, `cache` | reading segments wherever they are; the read cache |
//! | `map` | the block map: dirty tree, page cache, walker, usage |

mod backend;
mod cache;
mod check;
mod checkpoint;
mod clean;
mod clone;
mod core;
mod diff;
mod diff_stream;
mod error;
mod figures;
mod follow;
mod info;
mod lifecycle;
mod log;
mod manifest;
mod map;
mod open;
mod options;
mod read;
mod recovery;
mod retain;
mod runner;
mod segments;
mod snapshot;
mod stats;
mod upload;
mod volume;
mod window;
mod write;

pub use backend::{default_cache_dir, Backend, Others, StoreOptions, LOCAL_JOURNAL_DIR};
pub use cache::ReadCache;
pub use check::{check, CheckReport};
pub use clean::{GcOptions, GcProgress, GcReport, GcStop};
pub use clone::{
    absolute_address, clone_volume, ready_for_clone, CloneInfo, CloneSource, FlattenOptions,
    FlattenProgress, FlattenReport, ParentInfo, MAX_CHAIN_DEPTH,
};
pub use diff::{diff, Diff, DiffExtent};
pub use diff_stream::{export_diff, export_image, import_diff, DiffStreamReport};
pub use error::{ErrorKind, Result, VolumeError};
pub use figures::{Figures, ReadCacheFigures};
pub use hlfs_format::LogCounters;
pub use hlfs_store::{CephSettings, StoreError};
pub use info::utc;
pub use map::PageCache;
pub use options::{
    AutoClean, CreateOptions, Durability, Extent, OpenOptions, Prewrite, RetentionInfo,
    SnapshotInfo, View, VolumeInfo,
};
pub use retain::MAX_RETAIN_MS;
pub use snapshot::validate_snapshot_name;
pub use stats::{space, SegmentSpace, SnapshotSpace, SpaceStats};
pub use volume::Volume;

/// Cases per property in this crate's unit proptests: `PROPTEST_CASES` if
/// set (CI and the soak scripts raise it), else `default`.
#[cfg(test)]
fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default)
}
