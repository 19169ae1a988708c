//! The block map: a radix tree of [`MapPage`]s from block number to where the
//! block's data lives in the log.
//!
//! Pages are immutable once written to the log and cached by location, so a
//! cached clean page can never be stale. Changing a page makes a dirty copy of
//! it and of every page above it; dirty pages are written back to the log
//! lazily (under memory pressure, and all of them when a segment is sealed).
//! Invariant: the parent of a dirty page is dirty, so a clean page only has
//! clean pages below it and its children are found through its entries.
//!
//! This module does no I/O. When an operation needs a clean page that is not
//! in memory it fails with [`Missing`]; the caller loads the page, adds it to
//! `pins` and retries. Operations are written so that retrying is harmless.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use hlfs_format::{Entry, MapPage, MAP_FANOUT, MAP_SHIFT};
use lru::LruCache;

/// A clean page that must be read from the log before the operation can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missing(pub Entry);

pub type MapResult<T> = Result<T, Missing>;

/// Pages an operation has loaded itself; they stay valid whatever the cache
/// evicts meanwhile.
pub type Pins = HashMap<Entry, Arc<MapPage>>;

/// Memory one cached page costs, for the budget.
pub const PAGE_COST: usize = std::mem::size_of::<[Entry; MAP_FANOUT]>() + 64;

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

/// What a change did to block accounting, applied by the map itself.
pub struct MapState {
    depth: u32,
    /// Where the root page is, when it is not dirty.
    root: Entry,
    dirty: BTreeMap<NodeKey, Arc<MapPage>>,
    clean: LruCache<Entry, Arc<MapPage>>,
    budget_pages: usize,
    block_size: u64,
    allocated_blocks: u64,
    usage: HashMap<u32, u64>,
}

impl MapState {
    pub fn new(root: Entry, depth: u32, budget_bytes: u64, block_size: u32) -> Self {
        let budget_pages = ((budget_bytes / PAGE_COST as u64) as usize).max(MIN_BUDGET_PAGES);
        MapState {
            depth,
            root,
            dirty: BTreeMap::new(),
            clean: LruCache::unbounded(),
            budget_pages,
            block_size: block_size as u64,
            allocated_blocks: 0,
            usage: HashMap::new(),
        }
    }

    pub fn set_accounting(&mut self, allocated_blocks: u64, usage: &[(u32, u64)]) {
        self.allocated_blocks = allocated_blocks;
        self.usage = usage.iter().copied().collect();
    }

    pub fn depth(&self) -> u32 {
        self.depth
    }

    pub fn allocated_blocks(&self) -> u64 {
        self.allocated_blocks
    }

    /// Live data bytes per segment, sorted.
    pub fn usage(&self) -> Vec<(u32, u64)> {
        let mut v: Vec<_> = self
            .usage
            .iter()
            .filter(|(_, &b)| b > 0)
            .map(|(&s, &b)| (s, b))
            .collect();
        v.sort_unstable();
        v
    }

    pub fn cached_pages(&self) -> usize {
        self.dirty.len() + self.clean.len()
    }

    pub fn budget_pages(&self) -> usize {
        self.budget_pages
    }

    /// True when dirty pages take more than half the budget: the writer
    /// should write some back.
    pub fn needs_writeback(&self) -> bool {
        self.dirty.len() > self.budget_pages / 2
    }

    /// Adds a page read from the log to the cache, evicting the least
    /// recently used clean pages beyond the budget.
    pub fn insert_clean(&mut self, at: Entry, page: Arc<MapPage>) {
        self.clean.put(at, page);
        self.evict();
    }

    fn evict(&mut self) {
        while self.dirty.len() + self.clean.len() > self.budget_pages {
            if self.clean.pop_lru().is_none() {
                break;
            }
        }
    }

    /// The page at (level, index) whose location (if clean) is `at`; None for
    /// an empty subtree.
    fn node(&mut self, key: NodeKey, at: Entry, pins: &Pins) -> MapResult<Option<Arc<MapPage>>> {
        if let Some(p) = self.dirty.get(&key) {
            return Ok(Some(p.clone()));
        }
        if at.is_empty() {
            return Ok(None);
        }
        if let Some(p) = self.clean.get(&at) {
            return Ok(Some(p.clone()));
        }
        if let Some(p) = pins.get(&at) {
            return Ok(Some(p.clone()));
        }
        Err(Missing(at))
    }

    /// The leaf holding `lba`, or None if it lies in an empty subtree.
    fn leaf(&mut self, lba: u64, pins: &Pins) -> MapResult<Option<Arc<MapPage>>> {
        let mut at = self.root;
        let mut level = self.depth - 1;
        loop {
            let Some(page) = self.node((level, node_index(lba, level)), at, pins)? else {
                return Ok(None);
            };
            if level == 0 {
                return Ok(Some(page));
            }
            at = page.entries[slot(lba, level)];
            level -= 1;
        }
    }

    /// Where blocks `first..first + out.len()` live.
    pub fn lookup(&mut self, first: u64, out: &mut [Entry], pins: &Pins) -> MapResult<()> {
        let mut i = 0;
        while i < out.len() {
            let lba = first + i as u64;
            let in_leaf = (MAP_FANOUT - slot(lba, 0)).min(out.len() - i);
            match self.leaf(lba, pins)? {
                Some(page) => {
                    let s = slot(lba, 0);
                    out[i..i + in_leaf].copy_from_slice(&page.entries[s..s + in_leaf]);
                }
                None => out[i..i + in_leaf].fill(Entry::EMPTY),
            }
            i += in_leaf;
        }
        Ok(())
    }

    /// Makes the leaf holding `lba` and every page above it dirty.
    fn dirty_path(&mut self, lba: u64, pins: &Pins) -> MapResult<()> {
        let mut at = self.root;
        for level in (0..self.depth).rev() {
            let key = (level, node_index(lba, level));
            if !self.dirty.contains_key(&key) {
                let page = match self.node(key, at, pins)? {
                    Some(clean) => {
                        // The head no longer needs the clean copy: free its budget.
                        self.clean.pop(&at);
                        Arc::new((*clean).clone())
                    }
                    None => Arc::new(MapPage::default()),
                };
                self.dirty.insert(key, page);
            }
            if level > 0 {
                at = self.dirty[&key].entries[slot(lba, level)];
            }
        }
        self.evict();
        Ok(())
    }

    fn account(&mut self, old: Entry, new: Entry) {
        if !old.is_empty() {
            self.allocated_blocks -= 1;
            if let Some(b) = self.usage.get_mut(&old.seg) {
                *b = b.saturating_sub(self.block_size);
            }
        }
        if !new.is_empty() {
            self.allocated_blocks += 1;
            *self.usage.entry(new.seg).or_default() += self.block_size;
        }
    }

    /// Points blocks `first..first + entries.len()` at `entries`.
    pub fn set(&mut self, first: u64, entries: &[Entry], pins: &Pins) -> MapResult<()> {
        // Make every touched path dirty before changing anything, so a
        // Missing page cannot leave the change half done.
        let mut i = 0;
        while i < entries.len() {
            let lba = first + i as u64;
            self.dirty_path(lba, pins)?;
            i += MAP_FANOUT - slot(lba, 0);
        }
        let mut i = 0;
        while i < entries.len() {
            let lba = first + i as u64;
            let s = slot(lba, 0);
            let n = (MAP_FANOUT - s).min(entries.len() - i);
            let mut leaf = self
                .dirty
                .remove(&(0, node_index(lba, 0)))
                .expect("path made dirty");
            let page = Arc::make_mut(&mut leaf);
            for (k, new) in entries[i..i + n].iter().enumerate() {
                let old = std::mem::replace(&mut page.entries[s + k], *new);
                self.account(old, *new);
            }
            self.dirty.insert((0, node_index(lba, 0)), leaf);
            i += n;
        }
        Ok(())
    }

    /// Unmaps blocks `first..end`, visiting only leaves that exist, so that
    /// trimming a huge sparse range costs what it holds, not its size.
    pub fn zero(&mut self, first: u64, end: u64, pins: &Pins) -> MapResult<()> {
        let mut lba = first;
        while lba < end {
            let Some(leaf_start) = self.next_present(lba, pins)? else {
                return Ok(());
            };
            let lba_here = leaf_start.max(lba);
            if lba_here >= end {
                return Ok(());
            }
            let leaf_end = (node_index(lba_here, 0) + 1) << MAP_SHIFT;
            let stop = leaf_end.min(end);
            let s = slot(lba_here, 0);
            let n = (stop - lba_here) as usize;
            let has_data = self
                .leaf(lba_here, pins)?
                .is_some_and(|p| p.entries[s..s + n].iter().any(|e| !e.is_empty()));
            if has_data {
                self.dirty_path(lba_here, pins)?;
                let key = (0, node_index(lba_here, 0));
                let mut leaf = self.dirty.remove(&key).expect("path made dirty");
                let page = Arc::make_mut(&mut leaf);
                for k in s..s + n {
                    let old = std::mem::take(&mut page.entries[k]);
                    self.account(old, Entry::EMPTY);
                }
                self.dirty.insert(key, leaf);
            }
            lba = stop;
        }
        Ok(())
    }

    /// First block of the first existing leaf holding blocks at or after
    /// `from`, skipping empty subtrees.
    pub fn next_present(&mut self, from: u64, pins: &Pins) -> MapResult<Option<u64>> {
        let top = self.depth - 1;
        let root = self.root;
        self.search(top, 0, root, from, pins)
    }

    fn search(
        &mut self,
        level: u32,
        index: u64,
        at: Entry,
        from: u64,
        pins: &Pins,
    ) -> MapResult<Option<u64>> {
        let Some(page) = self.node((level, index), at, pins)? else {
            return Ok(None);
        };
        if level == 0 {
            return Ok(Some(index << MAP_SHIFT));
        }
        let span_shift = MAP_SHIFT * level; // blocks covered by one child
        let node_first = index.checked_shl(MAP_SHIFT * (level + 1)).unwrap_or(0);
        let start_slot = if from > node_first {
            ((from - node_first) >> span_shift).min(MAP_FANOUT as u64) as usize
        } else {
            0
        };
        for s in start_slot..MAP_FANOUT {
            let child = index * MAP_FANOUT as u64 + s as u64;
            let child_at = page.entries[s];
            if child_at.is_empty() && !self.dirty.contains_key(&(level - 1, child)) {
                continue;
            }
            if let Some(found) = self.search(level - 1, child, child_at, from, pins)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Makes the tree deep enough for `blocks` blocks (growing a volume).
    pub fn grow_to(&mut self, blocks: u64) {
        let want = depth_for(blocks);
        while self.depth < want {
            let old_top = self.depth - 1;
            let old_root_dirty = self.dirty.remove(&(old_top, 0));
            let mut new_root = MapPage::default();
            if old_root_dirty.is_none() {
                new_root.entries[0] = self.root;
            }
            if let Some(p) = old_root_dirty {
                self.dirty.insert((old_top, 0), p);
            }
            self.dirty.insert((old_top + 1, 0), Arc::new(new_root));
            self.root = Entry::EMPTY;
            self.depth += 1;
        }
    }

    /// The next dirty page to write back: leaves first, and a parent only
    /// once its children are clean (keys sort by level).
    pub fn next_dirty(&self) -> Option<(u32, u64, Arc<MapPage>)> {
        let ((level, index), page) = self.dirty.iter().next()?;
        Some((*level, *index, page.clone()))
    }

    /// Records that the dirty page (level, index) now lives at `at` (or that
    /// it was empty and needs no page, when `at` is empty).
    pub fn written_back(&mut self, level: u32, index: u64, at: Entry) {
        let page = self
            .dirty
            .remove(&(level, index))
            .expect("written page was dirty");
        if level == self.depth - 1 {
            self.root = at;
        } else {
            let parent = self
                .dirty
                .get_mut(&(level + 1, index >> MAP_SHIFT))
                .expect("parent of a dirty page is dirty");
            Arc::make_mut(parent).entries[(index & (MAP_FANOUT as u64 - 1)) as usize] = at;
        }
        if !at.is_empty() {
            self.clean.put(at, page);
            self.evict();
        }
    }

    /// The root's location; only meaningful when nothing is dirty.
    pub fn root(&self) -> Entry {
        debug_assert!(self.dirty.is_empty());
        self.root
    }
}

/// Smallest budget: enough for a few full paths through the deepest tree.
pub const MIN_BUDGET_PAGES: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    fn e(n: u32) -> Entry {
        Entry {
            seg: 1,
            off: n,
            crc: n,
        }
    }

    #[test]
    fn depth_grows_with_blocks() {
        assert_eq!(depth_for(1), 1);
        assert_eq!(depth_for(512), 1);
        assert_eq!(depth_for(513), 2);
        assert_eq!(depth_for(1 << 32), 4);
    }

    #[test]
    fn set_lookup_zero_in_memory() {
        let pins = Pins::new();
        let mut m = MapState::new(Entry::EMPTY, depth_for(1 << 30), 1 << 20, 4096);
        let entries: Vec<Entry> = (1..=1000).map(e).collect();
        m.set(1_000_000, &entries, &pins).unwrap();
        m.set(77, &[e(5)], &pins).unwrap();
        let mut out = vec![Entry::EMPTY; 1002];
        m.lookup(999_999, &mut out, &pins).unwrap();
        assert!(out[0].is_empty() && out[1001].is_empty());
        assert_eq!(&out[1..1001], &entries[..]);
        assert_eq!(m.allocated_blocks(), 1001);
        m.zero(0, 1_000_500, &pins).unwrap();
        assert_eq!(m.allocated_blocks(), 500);
        m.lookup(999_999, &mut out, &pins).unwrap();
        assert!(out[1..501].iter().all(Entry::is_empty));
        assert_eq!(&out[501..1001], &entries[500..]);
        let mut one = [Entry::EMPTY];
        m.lookup(77, &mut one, &pins).unwrap();
        assert!(one[0].is_empty());
    }
}
