//! The head's map tree: copy-on-write over pages in the log.
//!
//! Changing a page makes a dirty copy of it and of every page above it;
//! dirty pages are written back to the log lazily (under memory pressure,
//! and all of them when a checkpoint is taken). Invariant: the parent of a
//! dirty page is dirty, so a clean page only has clean pages below it and
//! its children are found through its entries. Clean pages come from the
//! shared [`PageCache`]; dirty ones are charged to its budget.

use std::collections::BTreeMap;
use std::sync::Arc;

use hlfs_format::{Entry, MapPage, MAP_FANOUT, MAP_SHIFT};

use super::pages::Pages;
use super::{
    depth_for, node_index, slot, MapResult, Missing, NodeKey, PageCache, Pins, SegmentUsage,
};

/// The head's tree of one volume.
pub(crate) struct DirtyTree {
    volume: [u8; 16],
    cache: Arc<PageCache>,
    depth: u32,
    /// Where the root page is, when it is not dirty.
    root: Entry,
    dirty: BTreeMap<NodeKey, Arc<MapPage>>,
    usage: SegmentUsage,
}

impl DirtyTree {
    /// The tree whose root page is at `root` (empty for an empty tree),
    /// with the usage its checkpoint recorded.
    pub fn new(
        volume: [u8; 16],
        cache: Arc<PageCache>,
        root: Entry,
        depth: u32,
        usage: SegmentUsage,
    ) -> DirtyTree {
        DirtyTree {
            volume,
            cache,
            depth,
            root,
            dirty: BTreeMap::new(),
            usage,
        }
    }

    /// Starts over from another root, dropping every dirty page (a
    /// rollback). Cached clean pages stay: they are keyed by location.
    pub fn reset(&mut self, root: Entry, depth: u32, usage: SegmentUsage) {
        self.cache.lock(self.volume).release_dirty(self.dirty.len());
        self.dirty.clear();
        self.root = root;
        self.depth = depth;
        self.usage = usage;
    }

    fn pages(&self) -> Pages<'_> {
        self.cache.lock(self.volume)
    }

    pub fn depth(&self) -> u32 {
        self.depth
    }

    pub fn usage(&self) -> &SegmentUsage {
        &self.usage
    }

    /// True when dirty pages (of every tree sharing the cache) take more
    /// than half the budget: the writer should write this tree's back.
    pub fn needs_writeback(&self) -> bool {
        !self.dirty.is_empty() && self.pages().dirty_over_half()
    }

    /// The page at (level, index) whose location (if clean) is `at`; None for
    /// an empty subtree.
    fn node(
        &self,
        pages: &mut Pages,
        key: NodeKey,
        at: Entry,
        pins: &Pins,
    ) -> MapResult<Option<Arc<MapPage>>> {
        if let Some(p) = self.dirty.get(&key) {
            return Ok(Some(p.clone()));
        }
        if at.is_empty() {
            return Ok(None);
        }
        if let Some(p) = pages.get(at) {
            return Ok(Some(p));
        }
        if let Some(p) = pins.get(&at) {
            return Ok(Some(p.clone()));
        }
        Err(Missing(at))
    }

    /// The leaf holding `lba`, or None if it lies in an empty subtree.
    fn leaf(&self, pages: &mut Pages, lba: u64, pins: &Pins) -> MapResult<Option<Arc<MapPage>>> {
        let mut at = self.root;
        let mut level = self.depth - 1;
        loop {
            let Some(page) = self.node(pages, (level, node_index(lba, level)), at, pins)? else {
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
    pub fn lookup(&self, first: u64, out: &mut [Entry], pins: &Pins) -> MapResult<()> {
        let mut pages = self.pages();
        let mut i = 0;
        while i < out.len() {
            let lba = first + i as u64;
            let in_leaf = (MAP_FANOUT - slot(lba, 0)).min(out.len() - i);
            match self.leaf(&mut pages, lba, pins)? {
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
    fn dirty_path(&mut self, pages: &mut Pages, lba: u64, pins: &Pins) -> MapResult<()> {
        self.dirty_path_to(pages, 0, lba, pins)
    }

    /// Makes the page at `bottom` holding `lba` and every page above it
    /// dirty.
    fn dirty_path_to(
        &mut self,
        pages: &mut Pages,
        bottom: u32,
        lba: u64,
        pins: &Pins,
    ) -> MapResult<()> {
        let mut at = self.root;
        for level in (bottom..self.depth).rev() {
            let key = (level, node_index(lba, level));
            if !self.dirty.contains_key(&key) {
                let page = match self.node(pages, key, at, pins)? {
                    Some(clean) => {
                        // The head no longer needs the clean copy: free its budget.
                        pages.remove(at);
                        Arc::new((*clean).clone())
                    }
                    None => Arc::new(MapPage::default()),
                };
                self.dirty.insert(key, page);
                pages.add_dirty();
            }
            if level > bottom {
                at = self.dirty[&key].entries[slot(lba, level)];
            }
        }
        Ok(())
    }

    /// If the tree reaches node (level, index) as the clean page at `at`,
    /// makes that page dirty, so that the next write-back puts a copy of
    /// it elsewhere and the tree no longer needs `at`. Returns whether it
    /// did. (Segment cleaning, moving the head's pages out of a victim.)
    pub fn move_page(&mut self, level: u32, index: u64, at: Entry, pins: &Pins) -> MapResult<bool> {
        if level >= self.depth || index.checked_shl(MAP_SHIFT * (level + 1)).is_none() {
            return Ok(false);
        }
        let lba = index << (MAP_SHIFT * (level + 1));
        // Past the tree's reach, lookups would wrap onto the root's slots.
        if node_index(lba, level) != index || node_index(lba, self.depth - 1) != 0 {
            return Ok(false);
        }
        let cache = self.cache.clone();
        let mut pages = cache.lock(self.volume);
        let mut here = self.root;
        for l in (level..self.depth).rev() {
            let key = (l, node_index(lba, l));
            if l == level {
                if self.dirty.contains_key(&key) || here != at {
                    return Ok(false);
                }
                break;
            }
            match self.node(&mut pages, key, here, pins)? {
                Some(page) => here = page.entries[slot(lba, l)],
                None => return Ok(false),
            }
        }
        self.dirty_path_to(&mut pages, level, lba, pins)?;
        Ok(true)
    }

    /// Points blocks `first..first + entries.len()` at `entries`.
    pub fn set(&mut self, first: u64, entries: &[Entry], pins: &Pins) -> MapResult<()> {
        let cache = self.cache.clone();
        let mut pages = cache.lock(self.volume);
        // Make every touched path dirty before changing anything, so a
        // Missing page cannot leave the change half done.
        let mut i = 0;
        while i < entries.len() {
            let lba = first + i as u64;
            self.dirty_path(&mut pages, lba, pins)?;
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
                self.usage.account(old, *new);
            }
            self.dirty.insert((0, node_index(lba, 0)), leaf);
            i += n;
        }
        Ok(())
    }

    /// Unmaps blocks `first..end`, visiting only leaves that exist, so that
    /// trimming a huge sparse range costs what it holds, not its size.
    pub fn zero(&mut self, first: u64, end: u64, pins: &Pins) -> MapResult<()> {
        let cache = self.cache.clone();
        let mut pages = cache.lock(self.volume);
        let mut lba = first;
        while lba < end {
            let Some(leaf_start) = self.search_from(&mut pages, lba, pins)? else {
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
                .leaf(&mut pages, lba_here, pins)?
                .is_some_and(|p| p.entries[s..s + n].iter().any(|e| !e.is_empty()));
            if has_data {
                self.dirty_path(&mut pages, lba_here, pins)?;
                let key = (0, node_index(lba_here, 0));
                let mut leaf = self.dirty.remove(&key).expect("path made dirty");
                let page = Arc::make_mut(&mut leaf);
                for k in s..s + n {
                    let old = std::mem::take(&mut page.entries[k]);
                    self.usage.account(old, Entry::EMPTY);
                }
                self.dirty.insert(key, leaf);
            }
            lba = stop;
        }
        Ok(())
    }

    /// First block of the first existing leaf holding blocks at or after
    /// `from`, skipping empty subtrees.
    pub fn next_present(&self, from: u64, pins: &Pins) -> MapResult<Option<u64>> {
        let mut pages = self.pages();
        self.search_from(&mut pages, from, pins)
    }

    fn search_from(&self, pages: &mut Pages, from: u64, pins: &Pins) -> MapResult<Option<u64>> {
        self.search(pages, self.depth - 1, 0, self.root, from, pins)
    }

    fn search(
        &self,
        pages: &mut Pages,
        level: u32,
        index: u64,
        at: Entry,
        from: u64,
        pins: &Pins,
    ) -> MapResult<Option<u64>> {
        let Some(page) = self.node(pages, (level, index), at, pins)? else {
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
            if let Some(found) = self.search(pages, level - 1, child, child_at, from, pins)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Makes the tree deep enough for `blocks` blocks (growing a volume).
    pub fn grow_to(&mut self, blocks: u64) {
        let want = depth_for(blocks);
        let mut pages = self.cache.lock(self.volume);
        while self.depth < want {
            let old_top = self.depth - 1;
            let mut new_root = MapPage::default();
            if !self.dirty.contains_key(&(old_top, 0)) {
                new_root.entries[0] = self.root;
            }
            self.dirty.insert((old_top + 1, 0), Arc::new(new_root));
            pages.add_dirty();
            self.root = Entry::EMPTY;
            self.depth += 1;
        }
    }

    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    pub fn dirty_pages(&self) -> usize {
        self.dirty.len()
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
        let mut pages = self.cache.lock(self.volume);
        pages.release_dirty(1);
        if !at.is_empty() {
            pages.insert(at, page);
        }
    }

    /// The root's location; only meaningful when nothing is dirty.
    pub fn root(&self) -> Entry {
        debug_assert!(self.dirty.is_empty());
        self.root
    }
}

impl Drop for DirtyTree {
    fn drop(&mut self) {
        self.cache.lock(self.volume).release_dirty(self.dirty.len());
    }
}

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
    fn set_lookup_zero_in_memory() {
        let pins = Pins::new();
        let cache = PageCache::new(1 << 20);
        let mut m = DirtyTree::new(
            [0; 16],
            cache.clone(),
            Entry::EMPTY,
            depth_for(1 << 30),
            SegmentUsage::from_checkpoint(4096, 0, &[]),
        );
        let entries: Vec<Entry> = (1..=1000).map(e).collect();
        m.set(1_000_000, &entries, &pins).unwrap();
        m.set(77, &[e(5)], &pins).unwrap();
        let mut out = vec![Entry::EMPTY; 1002];
        m.lookup(999_999, &mut out, &pins).unwrap();
        assert!(out[0].is_empty() && out[1001].is_empty());
        assert_eq!(&out[1..1001], &entries[..]);
        assert_eq!(m.usage().allocated_blocks(), 1001);
        m.zero(0, 1_000_500, &pins).unwrap();
        assert_eq!(m.usage().allocated_blocks(), 500);
        m.lookup(999_999, &mut out, &pins).unwrap();
        assert!(out[1..501].iter().all(Entry::is_empty));
        assert_eq!(&out[501..1001], &entries[500..]);
        let mut one = [Entry::EMPTY];
        m.lookup(77, &mut one, &pins).unwrap();
        assert!(one[0].is_empty());
        // Dirty pages are charged to the shared budget until dropped.
        assert!(cache.pages().0 > 0);
        drop(m);
        assert_eq!(cache.pages().0, 0);
    }
}
