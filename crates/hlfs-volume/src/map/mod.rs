//! The block map: a radix tree of [`MapPage`]s from block number to where
//! the block's data lives in the log.
//!
//! - [`tree`]: the head's tree, changed copy-on-write: dirty pages in memory
//!   until written back to the log.
//! - [`pages`]: the cache of clean pages, by location, with the memory
//!   budget every open tree of a process can share (the head, snapshots,
//!   and later clones and diffs).
//! - [`walk`]: a read-only walk over any tree, for `check` and diffs.
//! - [`usage`]: live bytes per segment, kept as the head's tree changes.
//!
//! Nothing here does I/O. When an operation needs a clean page that is not
//! in memory it fails with [`Missing`]; the caller loads the page, adds it to
//! its [`Pins`] and retries. Operations are written so that retrying is
//! harmless.

mod pages;
mod tree;
mod usage;
mod walk;

use std::collections::HashMap;
use std::sync::Arc;

use hlfs_format::{Entry, MapPage, MAP_FANOUT, MAP_SHIFT};

pub use pages::PageCache;
pub(crate) use tree::DirtyTree;
pub(crate) use usage::SegmentUsage;
pub(crate) use walk::TreeWalk;

/// A clean page that must be read from the log before the operation can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missing(pub Entry);

pub type MapResult<T> = Result<T, Missing>;

/// Pages an operation has loaded itself; they stay valid whatever the cache
/// evicts meanwhile.
pub type Pins = HashMap<Entry, Arc<MapPage>>;

/// (level, index): level 0 holds leaves; node `index` at level `l` covers
/// blocks `[index << (9 * (l + 1)), (index + 1) << (9 * (l + 1)))`.
type NodeKey = (u32, u64);

/// Levels needed to address `blocks` blocks.
pub fn depth_for(blocks: u64) -> u32 {
    let mut depth = 1;
    while depth < 8 && blocks > 1u64 << (MAP_SHIFT * depth).min(63) {
        depth += 1;
    }
    depth
}

fn slot(lba: u64, level: u32) -> usize {
    ((lba >> (MAP_SHIFT * level)) & (MAP_FANOUT as u64 - 1)) as usize
}

fn node_index(lba: u64, level: u32) -> u64 {
    lba.checked_shr(MAP_SHIFT * (level + 1)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_grows_with_blocks() {
        assert_eq!(depth_for(1), 1);
        assert_eq!(depth_for(512), 1);
        assert_eq!(depth_for(513), 2);
        assert_eq!(depth_for(1 << 32), 4);
    }
}
