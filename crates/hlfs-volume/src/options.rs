//! What a caller chooses when creating or opening a volume, and the plain
//! values the engine answers with.

use std::sync::Arc;
use std::time::Duration;

use hlfs_format::SnapshotEntry;

use crate::map::PageCache;

/// Parameters fixed when a volume is created.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Logical size in bytes.
    pub size: u64,
    /// A power of two from 512 B to 64 KiB.
    pub block_size: u32,
    /// Target size of a sealed segment.
    pub segment_size: u64,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            block_size: 4096,
            segment_size: 64 << 20,
        }
    }
}

/// Settings of one open.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Memory the block map may use for cached and dirty pages.
    pub map_budget: u64,
    /// A page cache to share with other opens (of this volume or others),
    /// under its own budget; `None` gives this open a cache of
    /// `map_budget`.
    pub page_cache: Option<Arc<PageCache>>,
    /// What FLUSH waits for.
    pub durability: Durability,
    /// How long a write or flush waits for a store that is not accepting
    /// uploads before it fails with an I/O error (the data stays safe in
    /// the local journal, and uploads go on in the background).
    pub store_wait: Duration,
    /// Clean by itself, as a task of the open (for a server); `None`
    /// cleans only when asked (`Volume::gc`).
    pub auto_clean: Option<AutoClean>,
    /// When the journal is written ahead of the log with zeros, so that a
    /// flush has no file metadata to commit.
    pub prewrite: Prewrite,
}

/// When the journal's next bytes are written ahead of the log (zeros,
/// synced), so that the syncs of frequent flushes commit data only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prewrite {
    /// While flushes come many times a second (synced load), not for
    /// sequential writes, which would write their space twice.
    #[default]
    Auto,
    /// Always (for tests of the window).
    Always,
    Off,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            map_budget: 512 << 20,
            page_cache: None,
            durability: Durability::Local,
            store_wait: Duration::from_secs(30),
            auto_clean: None,
            prewrite: Prewrite::Auto,
        }
    }
}

/// When an open volume cleans by itself, and how hard.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoClean {
    /// A run starts once stored ÷ live is above this...
    pub start_above: f64,
    /// ...and cleans down to this (a lower mark, so that runs are worth
    /// their checkpoint and recount; close to the start, as copying grows
    /// the emptier the store is kept).
    pub target: f64,
    /// How often the task looks.
    pub every: Duration,
    /// Live bytes copied per second at most, so that clients' I/O keeps
    /// priority.
    pub copy_rate: u64,
    /// Bytes scanned and copied per second at most while clients are
    /// busy (as `GcOptions::busy_rate`): the cleaner yields to them, yet
    /// goes on under a constant load.
    pub busy_rate: u64,
    /// As `GcOptions::grace`.
    pub grace: Duration,
}

impl AutoClean {
    /// Starts above `space_target` (stored ÷ live, at least 1) and cleans
    /// down to 90 % of the way from 1 to it (1.45 for 1.5), looking every
    /// minute, copying at most 64 MiB/s, and going through at most
    /// 8 MiB/s while clients are busy at the lower mark (more above it).
    pub fn new(space_target: f64) -> AutoClean {
        AutoClean {
            start_above: space_target,
            target: 1.0 + (space_target - 1.0) * 0.9,
            every: Duration::from_secs(60),
            copy_rate: 64 << 20,
            busy_rate: 8 << 20,
            grace: Duration::from_secs(60),
        }
    }
}

/// Where a write is once FLUSH (or FUA) has returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// In the local journal, synced; sealed segments reach the store in the
    /// background. A crash of the process loses nothing; losing the local
    /// disk loses what was not uploaded yet.
    #[default]
    Local,
    /// In the store: FLUSH seals the open segment and waits for its upload.
    /// For hosts whose local disk is not trusted; every FLUSH costs a store
    /// request.
    Remote,
}

pub use crate::retain::RetentionInfo;

/// Which image a read-only open shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum View {
    /// The latest state, including unsealed writes.
    Head,
    /// A snapshot by name.
    Snapshot(String),
    /// The volume as it was at this time (ms since the epoch): inside the
    /// retention window, exactly; outside it, the newest snapshot taken at
    /// or before it.
    AsOf(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub created_ms: u64,
    pub lsn: u64,
    pub automatic: bool,
    /// Addresses of the clones made from it (filled in by `info`).
    pub clones: Vec<String>,
}

impl From<&SnapshotEntry> for SnapshotInfo {
    fn from(s: &SnapshotEntry) -> Self {
        SnapshotInfo {
            name: s.name.clone(),
            created_ms: s.created_ms,
            lsn: s.lsn,
            automatic: s.automatic,
            clones: Vec::new(),
        }
    }
}

/// A run of the volume that is either all data or all hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub data: bool,
}

/// What `hlfs info` shows.
#[derive(Clone, Debug)]
pub struct VolumeInfo {
    pub uuid: String,
    pub size: u64,
    pub block_size: u32,
    pub segment_size: u64,
    pub allocated_bytes: u64,
    pub stored_bytes: u64,
    pub format_version: u16,
    pub snapshots: Vec<SnapshotInfo>,
    pub writer: Option<String>,
    pub created_ms: u64,
    pub retention: RetentionInfo,
    /// A clone's parent snapshot.
    pub parent: Option<crate::ParentInfo>,
}
