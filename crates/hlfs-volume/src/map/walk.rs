//! A read-only walk over a map tree written to the log, page by page, for
//! `check` and (coming) diffs. It does no I/O: the caller reads each page
//! it is given and says whether to go below it, so a walk can skip a
//! subtree it has seen already, or one two trees share.

use hlfs_format::{Entry, MapPage, MAP_FANOUT, MAP_SHIFT};

/// A page of the tree: where it is and what it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NodeRef {
    /// 0 for leaves.
    pub level: u32,
    /// Its number among the pages of its level, left to right.
    pub index: u64,
    pub at: Entry,
}

impl NodeRef {
    /// The block number of a leaf's `slot`.
    pub fn lba(&self, slot: usize) -> u64 {
        debug_assert_eq!(self.level, 0);
        (self.index << MAP_SHIFT) + slot as u64
    }
}

/// Depth-first, left to right, over the pages of one tree.
pub(crate) struct TreeWalk {
    stack: Vec<NodeRef>,
}

impl TreeWalk {
    /// A walk of the tree whose root page is at `root`, `depth` levels
    /// deep. An empty root has no pages.
    pub fn new(root: Entry, depth: u32) -> TreeWalk {
        let mut stack = Vec::new();
        if !root.is_empty() {
            stack.push(NodeRef {
                level: depth - 1,
                index: 0,
                at: root,
            });
        }
        TreeWalk { stack }
    }

    /// The next page to visit.
    pub fn next_node(&mut self) -> Option<NodeRef> {
        self.stack.pop()
    }

    /// Visit the children of `node` (an inner page, whose contents are
    /// `page`) next; empty subtrees are skipped.
    pub fn descend(&mut self, node: &NodeRef, page: &MapPage) {
        if node.level == 0 {
            return;
        }
        for (slot, child) in page.entries.iter().enumerate().rev() {
            if !child.is_empty() {
                self.stack.push(NodeRef {
                    level: node.level - 1,
                    index: node.index * MAP_FANOUT as u64 + slot as u64,
                    at: *child,
                });
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
    fn visits_pages_left_to_right_and_only_where_asked() {
        let mut root = MapPage::default();
        root.entries[3] = at(30);
        root.entries[1] = at(10);
        let mut walk = TreeWalk::new(at(1), 2);
        let top = walk.next_node().unwrap();
        assert_eq!((top.level, top.index), (1, 0));
        walk.descend(&top, &root);
        let first = walk.next_node().unwrap();
        assert_eq!((first.level, first.index, first.at), (0, 1, at(10)));
        assert_eq!(first.lba(5), 512 + 5);
        // A leaf has nothing below it.
        walk.descend(&first, &root);
        assert_eq!(walk.next_node().unwrap().index, 3);
        assert!(walk.next_node().is_none());
        assert!(TreeWalk::new(Entry::EMPTY, 3).next_node().is_none());
    }
}
