//! Live bytes per segment and blocks allocated, kept up to date as the
//! head's tree changes and saved in every checkpoint, so that segment
//! cleaning can choose victims without a scan.

use std::collections::HashMap;

use hlfs_format::Entry;

#[derive(Clone, Debug)]
pub(crate) struct SegmentUsage {
    block_size: u64,
    allocated_blocks: u64,
    live: HashMap<u32, u64>,
}

impl SegmentUsage {
    /// Usage as a checkpoint recorded it.
    pub fn from_checkpoint(block_size: u32, allocated_blocks: u64, live: &[(u32, u64)]) -> Self {
        SegmentUsage {
            block_size: block_size as u64,
            allocated_blocks,
            live: live.iter().copied().collect(),
        }
    }

    pub fn allocated_blocks(&self) -> u64 {
        self.allocated_blocks
    }

    /// Live data bytes per segment, sorted by segment.
    pub fn live(&self) -> Vec<(u32, u64)> {
        let mut v: Vec<_> = self
            .live
            .iter()
            .filter(|(_, &b)| b > 0)
            .map(|(&s, &b)| (s, b))
            .collect();
        v.sort_unstable();
        v
    }

    /// Live data bytes over every segment.
    pub fn live_bytes(&self) -> u64 {
        self.live.values().sum()
    }

    /// A block that pointed at `old` now points at `new`.
    pub fn account(&mut self, old: Entry, new: Entry) {
        if !old.is_empty() {
            self.allocated_blocks -= 1;
            if let Some(b) = self.live.get_mut(&old.seg) {
                *b = b.saturating_sub(self.block_size);
            }
        }
        if !new.is_empty() {
            self.allocated_blocks += 1;
            *self.live.entry(new.seg).or_default() += self.block_size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_between_segments_are_counted_on_both_sides() {
        let e = |seg| Entry {
            seg,
            off: 0,
            crc: 0,
        };
        let mut u = SegmentUsage::from_checkpoint(4096, 2, &[(1, 8192)]);
        u.account(e(1), e(2));
        u.account(Entry::EMPTY, e(2));
        u.account(e(1), Entry::EMPTY);
        assert_eq!(u.allocated_blocks(), 2);
        assert_eq!(u.live(), [(2, 8192)]);
    }
}
