//! Clean map pages in memory, by location, under one memory budget.
//!
//! A page written to the log never changes, so a page cached by where it is
//! can never be stale, and any tree that reaches that location (the head, a
//! snapshot, later a clone or a diff) can use the cached copy. Dirty pages
//! live in their tree but are charged to the same budget, so one budget
//! bounds every tree that shares the cache. Keys carry the volume's UUID:
//! one cache may serve several volumes.

use std::fmt;
use std::sync::Arc;

use hlfs_format::{Entry, MapPage, MAP_FANOUT};
use lru::LruCache;
use parking_lot::{Mutex, MutexGuard};

/// Memory one page in memory costs, for the budget.
pub const PAGE_COST: usize = std::mem::size_of::<[Entry; MAP_FANOUT]>() + 64;

/// Smallest budget: enough for a few full paths through the deepest tree.
const MIN_BUDGET_PAGES: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PageKey {
    volume: [u8; 16],
    at: Entry,
}

/// The shared cache of clean pages and the budget of every tree using it.
pub struct PageCache {
    state: Mutex<CacheState>,
}

struct CacheState {
    clean: LruCache<PageKey, Arc<MapPage>>,
    budget_pages: usize,
    /// Dirty pages of every tree using the cache.
    dirty_pages: usize,
    /// Lookups of a clean page that found it, and that did not.
    hits: u64,
    misses: u64,
}

impl PageCache {
    /// A cache whose pages, clean and dirty, take at most about
    /// `budget_bytes` of memory.
    pub fn new(budget_bytes: u64) -> Arc<PageCache> {
        let budget_pages = ((budget_bytes / PAGE_COST as u64) as usize).max(MIN_BUDGET_PAGES);
        Arc::new(PageCache {
            state: Mutex::new(CacheState {
                clean: LruCache::unbounded(),
                budget_pages,
                dirty_pages: 0,
                hits: 0,
                misses: 0,
            }),
        })
    }

    /// Pages in memory now (clean and dirty) and the most allowed.
    pub fn pages(&self) -> (usize, usize) {
        let state = self.state.lock();
        (state.clean.len() + state.dirty_pages, state.budget_pages)
    }

    /// Lookups that found their page in memory, and that had to read it,
    /// over every tree using the cache.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        let state = self.state.lock();
        (state.hits, state.misses)
    }

    pub fn budget_pages(&self) -> usize {
        self.state.lock().budget_pages
    }

    /// The cache as seen by one volume's trees, locked for one operation.
    pub(crate) fn lock(&self, volume: [u8; 16]) -> Pages<'_> {
        Pages {
            state: self.state.lock(),
            volume,
        }
    }
}

impl fmt::Debug for PageCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (pages, budget) = self.pages();
        f.debug_struct("PageCache")
            .field("pages", &pages)
            .field("budget_pages", &budget)
            .finish()
    }
}

/// The locked cache, for one volume's pages.
pub(crate) struct Pages<'a> {
    state: MutexGuard<'a, CacheState>,
    volume: [u8; 16],
}

impl Pages<'_> {
    fn key(&self, at: Entry) -> PageKey {
        PageKey {
            volume: self.volume,
            at,
        }
    }

    /// The clean page at `at`, if cached; it becomes the most recently used.
    pub fn get(&mut self, at: Entry) -> Option<Arc<MapPage>> {
        let key = self.key(at);
        let found = self.state.clean.get(&key).cloned();
        match found {
            Some(_) => self.state.hits += 1,
            None => self.state.misses += 1,
        }
        found
    }

    /// Adds a clean page, evicting the least recently used beyond the budget.
    pub fn insert(&mut self, at: Entry, page: Arc<MapPage>) {
        let key = self.key(at);
        self.state.clean.put(key, page);
        self.evict();
    }

    /// Drops a clean page nobody needs any more, freeing its budget.
    pub fn remove(&mut self, at: Entry) {
        let key = self.key(at);
        self.state.clean.pop(&key);
    }

    /// A tree made a page dirty.
    pub fn add_dirty(&mut self) {
        self.state.dirty_pages += 1;
        self.evict();
    }

    /// A tree's dirty pages were written back or dropped.
    pub fn release_dirty(&mut self, n: usize) {
        self.state.dirty_pages = self.state.dirty_pages.saturating_sub(n);
    }

    /// Dirty pages take more than half the budget.
    pub fn dirty_over_half(&self) -> bool {
        self.state.dirty_pages > self.state.budget_pages / 2
    }

    fn evict(&mut self) {
        let state = &mut *self.state;
        while state.dirty_pages + state.clean.len() > state.budget_pages {
            if state.clean.pop_lru().is_none() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(n: u32) -> Entry {
        Entry {
            seg: 1,
            off: n,
            crc: n,
        }
    }

    #[test]
    fn the_budget_bounds_clean_and_dirty_pages_of_every_volume() {
        let cache = PageCache::new(40 * PAGE_COST as u64);
        let page = Arc::new(MapPage::default());
        {
            let mut a = cache.lock([1; 16]);
            for n in 0..30 {
                a.insert(at(n), page.clone());
            }
        }
        {
            let mut b = cache.lock([2; 16]);
            // The same location in another volume is another page.
            assert!(b.get(at(29)).is_none());
            for n in 0..20 {
                b.insert(at(n), page.clone());
            }
            for _ in 0..10 {
                b.add_dirty();
            }
        }
        assert_eq!(cache.pages(), (40, 40));
        // The oldest pages of the first volume went first.
        let mut a = cache.lock([1; 16]);
        assert!(a.get(at(0)).is_none());
        assert!(a.get(at(29)).is_some());
        a.release_dirty(10);
        drop(a);
        assert_eq!(cache.pages().0, 30);
    }
}
