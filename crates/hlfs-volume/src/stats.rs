//! Where a volume's space goes, from metadata alone (`hlfs gc --stats`, and
//! what deleting a snapshot would free).
//!
//! One walk over the map trees of every root (the head checkpoint and each
//! snapshot), level by level from the top, reads each map page once
//! whatever number of roots share it, and never reads data. Each item (a
//! data block, a map page, a checkpoint) is counted once in the segment
//! that holds it, and remembered as held by one root or by several, which
//! gives the bytes only each root holds. A page is reached only at the
//! node its header names, and a block only at the block number its record
//! names, so items shared by roots meet at the same node.
//!
//! The head is the one the newest manifest names: writes logged since that
//! checkpoint are in the segments recovery would replay, which are counted
//! as wholly live (they cannot be cleaned), and the blocks they replace
//! still count in their older segments. So a served volume's figures can
//! only overstate what is live, never understate it; a closed one's are
//! exact.

use std::collections::{BTreeMap, HashMap};

use hlfs_format::{parse_segment_name, segment_name, Entry, LogCounters, HEADER_LEN, MAP_FANOUT};
use parking_lot::Mutex;

use crate::backend::Backend;
use crate::cache::ReadCache;
use crate::error::{Result, VolumeError};
use crate::manifest::latest_manifest;
use crate::retain;
use crate::segments::Segments;

/// A sealed segment's size and what of it is live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentSpace {
    pub id: u32,
    pub size: u64,
    pub live_bytes: u64,
    /// When the store made it (ms since the epoch, the store's clock).
    pub made_ms: u64,
    /// Of the live bytes, those a snapshot holds (alone or with the head).
    /// A segment with none is held by the head alone, and cleaning can
    /// empty it by moving the head's items.
    pub snapshot_bytes: u64,
    /// Of the live bytes, those a read-only view open in this process
    /// holds (alone or with other roots). Cleaning leaves such a segment
    /// alone: the view would keep it however much the pass copied out.
    pub view_bytes: u64,
    /// Written after the head checkpoint, or after the oldest retention
    /// point: recovery, or the opening of a moment, replays it, so it
    /// counts as wholly live and is no candidate for cleaning.
    pub recent: bool,
}

/// A snapshot and the bytes that deleting it would free.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotSpace {
    pub name: String,
    pub only_bytes: u64,
}

/// Where a volume's space goes. Live bytes are what a cleaning pass would
/// have to copy: each live block's data, and each live map page and
/// checkpoint record whole.
#[derive(Clone, Debug, Default)]
pub struct SpaceStats {
    /// The manifest the figures are of, and when it was written.
    pub manifest_seq: u64,
    pub manifest_written_ms: u64,
    /// Sealed segments, by id.
    pub segments: Vec<SegmentSpace>,
    /// In the order of the manifest (oldest first).
    pub snapshots: Vec<SnapshotSpace>,
    /// Held by the head and by no snapshot.
    pub head_only_bytes: u64,
    /// What the retention window alone keeps: what its points alone hold,
    /// and the segments kept whole for moments to replay (those recovery
    /// would not replay). Turning the window off makes it reclaimable.
    pub retention_bytes: u64,
    /// Live bytes in sealed segments.
    pub live_bytes: u64,
    /// Bytes of sealed segments in the store.
    pub segment_bytes: u64,
    /// Bytes of manifests in the store, and how many there are.
    pub manifest_bytes: u64,
    pub manifests: u64,
    /// Bytes of this machine's journal files for the volume (the open
    /// segment and any not yet stored).
    pub journal_bytes: u64,
    /// `segment_bytes + manifest_bytes + journal_bytes`.
    pub stored_bytes: u64,
    /// Bytes in sealed segments that nothing can read any more.
    pub reclaimable_bytes: u64,
    /// What the log has taken since counting began, as of the manifest
    /// (format v2; None for a v1 volume).
    pub counters: Option<LogCounters>,
}

/// The snapshot views open in this process, by volume: each view's
/// checkpoint and its snapshot's name and LSN. A view whose snapshot is
/// deleted is a root like a snapshot, so that cleaning run by this process
/// (a server) keeps what it reads. Views of snapshots that still exist
/// follow them as readers elsewhere do (`follow.rs`), and so do views of
/// the head.
static VIEWS: Mutex<Vec<ViewRoot>> = Mutex::new(Vec::new());

/// A snapshot view's root, registered while the view is open.
#[derive(Clone, PartialEq)]
pub(crate) struct ViewRoot {
    volume: [u8; 16],
    at: Entry,
    name: String,
    lsn: u64,
}

impl ViewRoot {
    /// Registers the view; the registration ends when what this returns
    /// is dropped.
    pub fn hold(volume: [u8; 16], at: Entry, name: &str, lsn: u64) -> ViewHeld {
        let root = ViewRoot {
            volume,
            at,
            name: name.to_string(),
            lsn,
        };
        VIEWS.lock().push(root.clone());
        ViewHeld(root)
    }
}

/// A registered view (see `ViewRoot::hold`).
pub(crate) struct ViewHeld(ViewRoot);

impl Drop for ViewHeld {
    fn drop(&mut self) {
        let mut views = VIEWS.lock();
        if let Some(i) = views.iter().position(|v| *v == self.0) {
            views.swap_remove(i);
        }
    }
}

/// Bytes of a remote volume's map pages a walk keeps locally at most.
const SCRATCH_CACHE: u64 = 256 << 20;

/// Who holds an item: one root (its index), one view open in this
/// process (its root's index), or several, a view among them or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holders {
    One(usize),
    View(usize),
    Many { view: bool },
}

impl Holders {
    fn join(self, other: Holders) -> Holders {
        if self == other {
            self
        } else {
            Holders::Many {
                view: self.has_view() || other.has_view(),
            }
        }
    }

    fn has_view(self) -> bool {
        matches!(self, Holders::View(_) | Holders::Many { view: true })
    }
}

/// Adds `by` to the holders of `item` (a block, or a page by node and place).
fn hold<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Holders>, item: K, by: Holders) {
    map.entry(item)
        .and_modify(|h| *h = h.join(by))
        .or_insert(by);
}

/// Live bytes per segment, those of them a snapshot holds, and per root
/// the bytes no other root holds.
struct Tally {
    live: HashMap<u32, u64>,
    by_snapshots: HashMap<u32, u64>,
    by_views: HashMap<u32, u64>,
    only: Vec<u64>,
}

impl Tally {
    fn count(&mut self, at: Entry, bytes: u64, by: Holders) {
        *self.live.entry(at.seg).or_default() += bytes;
        if by != Holders::One(HEAD) {
            *self.by_snapshots.entry(at.seg).or_default() += bytes;
        }
        if by.has_view() {
            *self.by_views.entry(at.seg).or_default() += bytes;
        }
        if let Holders::One(root) = by {
            self.only[root] += bytes;
        }
    }
}

/// Whether only views open in this process hold an item.
fn by_view_alone(by: Holders) -> bool {
    matches!(by, Holders::View(_))
}

/// A view of a deleted snapshot whose segments cleaning had moved it from
/// before the deletion (it had not read since, so had not followed): it
/// can no longer read them, and holds nothing.
fn view_cleaned_away(segment: &str) {
    tracing::warn!(
        %segment,
        "a view of a deleted snapshot lost its segments to cleaning before the deletion; it holds nothing"
    );
}

/// The head is root 0; the snapshots follow in the manifest's order.
const HEAD: usize = 0;

/// Accounts for the space of the volume at `backend` without changing it.
pub async fn space(backend: Backend) -> Result<SpaceStats> {
    let store = backend.requests();
    let manifest = latest_manifest(&*store, &backend.location).await?;
    let scratch = match backend.remote {
        true => Some(ReadCache::scratch(SCRATCH_CACHE)?),
        false => None,
    };
    let segments = Segments::new(store.clone(), scratch, manifest.volume);

    // Root 0 is the head, then the snapshots in order, then the views open
    // in this process of snapshots deleted since.
    let views: Vec<Entry> = VIEWS
        .lock()
        .iter()
        .filter(|v| {
            v.volume == manifest.volume
                && !manifest
                    .snapshots
                    .iter()
                    .any(|s| s.name == v.name && s.lsn == v.lsn)
        })
        .map(|v| v.at)
        .collect();
    let roots: Vec<Entry> = std::iter::once(manifest.checkpoint)
        .chain(manifest.snapshots.iter().map(|s| s.checkpoint))
        .chain(views)
        .collect();
    let mut tally = Tally {
        live: HashMap::new(),
        by_snapshots: HashMap::new(),
        by_views: HashMap::new(),
        only: vec![0; roots.len()],
    };
    let first_view = 1 + manifest.snapshots.len();
    let mut checkpoints = HashMap::new();
    for (root, &at) in roots.iter().enumerate() {
        let by = match root < first_view {
            true => Holders::One(root),
            false => Holders::View(root),
        };
        if !at.is_empty() {
            hold(&mut checkpoints, at, by);
        }
    }
    // Pages to visit, by level, as (node index, location) → holders.
    let mut levels: BTreeMap<u32, HashMap<(u64, Entry), Holders>> = BTreeMap::new();
    for (at, by) in checkpoints {
        let (cp, _) = match segments.read_checkpoint(at).await {
            Err(VolumeError::SegmentMissing(name)) if by_view_alone(by) => {
                view_cleaned_away(&name);
                continue;
            }
            read => read?,
        };
        tally.count(at, (HEADER_LEN + cp.encode().len()) as u64, by);
        if !cp.root.is_empty() {
            hold(levels.entry(cp.depth - 1).or_default(), (0, cp.root), by);
        }
    }
    let block_size = manifest.block_size as u64;
    while let Some((level, nodes)) = levels.pop_last() {
        // By node, then place: the copies of one leaf in several roots
        // come together, and reads go forward through each segment.
        let mut nodes: Vec<_> = nodes.into_iter().collect();
        nodes.sort_unstable_by_key(|&((index, at), _)| (index, at.seg, at.off));
        let mut below: HashMap<(u64, Entry), Holders> = HashMap::new();
        let mut blocks: HashMap<Entry, Holders> = HashMap::new();
        let mut leaf_index = None;
        for ((index, at), by) in nodes {
            let page = match segments.read_page(at).await {
                Err(VolumeError::SegmentMissing(name)) if by_view_alone(by) => {
                    view_cleaned_away(&name);
                    continue;
                }
                read => read?,
            };
            tally.count(at, (HEADER_LEN + page.encoded_len()) as u64, by);
            if level > 0 {
                for (slot, child) in page.entries.iter().enumerate() {
                    if !child.is_empty() {
                        let key = (index * MAP_FANOUT as u64 + slot as u64, *child);
                        hold(&mut below, key, by);
                    }
                }
                continue;
            }
            // A block shared by two roots sits in their copies of one leaf.
            if leaf_index != Some(index) {
                for (block, held) in blocks.drain() {
                    tally.count(block, block_size, held);
                }
                leaf_index = Some(index);
            }
            for e in page.entries.iter().filter(|e| !e.is_empty()) {
                hold(&mut blocks, *e, by);
            }
        }
        for (block, held) in blocks {
            tally.count(block, block_size, held);
        }
        // The level below may hold roots already: those of shallower trees
        // (a snapshot taken before the volume grew).
        if level > 0 && !below.is_empty() {
            let next = levels.entry(level - 1).or_default();
            for (key, by) in below {
                hold(next, key, by);
            }
        }
    }

    let mut stats = SpaceStats {
        counters: manifest.counters,
        manifest_seq: manifest.seq,
        manifest_written_ms: manifest.written_ms,
        head_only_bytes: tally.only[HEAD],
        snapshots: manifest
            .snapshots
            .iter()
            .zip(&tally.only[1..])
            .filter(|(s, _)| !retain::is_point(&s.name))
            .map(|(s, &only_bytes)| SnapshotSpace {
                name: s.name.clone(),
                only_bytes,
            })
            .collect(),
        ..SpaceStats::default()
    };
    stats.retention_bytes = manifest
        .snapshots
        .iter()
        .zip(&tally.only[1..])
        .filter(|(s, _)| retain::is_point(&s.name))
        .map(|(_, &only)| only)
        .sum();
    // What recovery replays, and what a moment of the retention window may.
    let replay_floor = retain::replay_floor(&manifest).map_or(manifest.replay_from_seg, |f| {
        f.min(manifest.replay_from_seg)
    });
    for blob in store.list("segments/").await? {
        let Some(id) = parse_segment_name(&blob.name) else {
            continue;
        };
        let recent = id >= replay_floor;
        let counted = tally.live.remove(&id).unwrap_or(0);
        if recent && id < manifest.replay_from_seg {
            stats.retention_bytes += blob.size - counted.min(blob.size);
        }
        let live_bytes = if recent { blob.size } else { counted };
        stats.segments.push(SegmentSpace {
            id,
            size: blob.size,
            live_bytes,
            snapshot_bytes: tally.by_snapshots.get(&id).copied().unwrap_or(0),
            view_bytes: tally.by_views.get(&id).copied().unwrap_or(0),
            made_ms: blob.modified_ms,
            recent,
        });
    }
    if let Some(&missing) = tally.live.keys().min() {
        return Err(VolumeError::corrupt(format!(
            "{} holds live data but is not in the store (`hlfs check` tells more)",
            segment_name(missing)
        )));
    }
    for blob in store.list("manifest/").await? {
        stats.manifests += 1;
        stats.manifest_bytes += blob.size;
    }
    let journal = &backend.journal;
    for name in journal.list()? {
        if let Ok(f) = journal.open(&name) {
            stats.journal_bytes += f.len().unwrap_or(0);
        }
    }
    stats.segment_bytes = stats.segments.iter().map(|s| s.size).sum();
    stats.live_bytes = stats.segments.iter().map(|s| s.live_bytes).sum();
    stats.reclaimable_bytes = stats
        .segments
        .iter()
        .map(|s| s.size.saturating_sub(s.live_bytes))
        .sum();
    stats.stored_bytes = stats.segment_bytes + stats.manifest_bytes + stats.journal_bytes;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use hlfs_store::MemEnv;
    use proptest::prelude::*;

    use super::*;
    use crate::map::TreeWalk;
    use crate::options::{CreateOptions, OpenOptions};
    use crate::volume::Volume;

    #[derive(Debug, Clone)]
    enum Op {
        /// Blocks `first..first+count` get new data.
        Write {
            first: u16,
            count: u8,
        },
        Trim {
            first: u16,
            count: u8,
        },
        Snapshot,
        /// Grows the volume by this many blocks (past 512 blocks, the tree
        /// gets deeper: snapshots from before are shallower).
        Grow(u16),
        /// Deletes the snapshot with this number modulo how many there are.
        Delete(u8),
        Rollback(u8),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u16..2048, 1u8..64).prop_map(|(first, count)| Op::Write { first, count }),
            1 => (0u16..2048, 1u8..64).prop_map(|(first, count)| Op::Trim { first, count }),
            2 => Just(Op::Snapshot),
            1 => (1u16..400).prop_map(Op::Grow),
            1 => any::<u8>().prop_map(Op::Delete),
            1 => any::<u8>().prop_map(Op::Rollback),
            1 => Just(Op::Reopen),
        ]
    }

    /// Every item each root reaches, by a full walk of each root on its
    /// own: item → (bytes, the roots holding it).
    async fn held_by_each_root(backend: &Backend) -> HashMap<Entry, (u64, BTreeSet<usize>)> {
        let store = backend.requests();
        let m = latest_manifest(&*store, "test").await.unwrap();
        let segments = Segments::new(store, None, m.volume);
        let mut items: HashMap<Entry, (u64, BTreeSet<usize>)> = HashMap::new();
        let mut add = |at: Entry, bytes: u64, root: usize| {
            items
                .entry(at)
                .or_insert((bytes, BTreeSet::new()))
                .1
                .insert(root);
        };
        let roots = std::iter::once(m.checkpoint).chain(m.snapshots.iter().map(|s| s.checkpoint));
        for (root, at) in roots.enumerate() {
            if at.is_empty() {
                continue;
            }
            let (cp, _) = segments.read_checkpoint(at).await.unwrap();
            add(at, (HEADER_LEN + cp.encode().len()) as u64, root);
            let mut walk = TreeWalk::new(cp.root, cp.depth);
            while let Some(node) = walk.next_node() {
                let page = segments.read_page(node.at).await.unwrap();
                add(node.at, (HEADER_LEN + page.encode().len()) as u64, root);
                if node.level > 0 {
                    walk.descend(&node, &page);
                    continue;
                }
                for e in page.entries.iter().filter(|e| !e.is_empty()) {
                    add(*e, m.block_size as u64, root);
                }
            }
        }
        items
    }

    async fn run(ops: Vec<Op>) {
        let env = MemEnv::new();
        let backend = Backend::memory(&env);
        let create = CreateOptions {
            // One leaf deep: growing past 512 blocks deepens the tree.
            size: 300 * 4096,
            block_size: 4096,
            segment_size: 256 << 10,
        };
        Volume::create(&backend, &create).await.unwrap();
        // A small map budget, so that pages are written back between
        // checkpoints too.
        let opts = OpenOptions {
            map_budget: 64 << 10,
            ..OpenOptions::default()
        };
        let mut vol = Volume::open(backend.clone(), &opts).await.unwrap();
        let mut taken = 0u32;
        for op in ops {
            let snaps = vol.snapshots();
            // A rollback brings back the snapshot's size.
            let blocks = vol.size() / 4096;
            match op {
                Op::Write { first, count } => {
                    let data = vec![first as u8 ^ count; count as usize * 4096];
                    let data = &data[..(count as u64).min(blocks) as usize * 4096];
                    let count = (count as u64).min(blocks);
                    let at = (first as u64).min(blocks - count) * 4096;
                    vol.write(at, data).await.unwrap();
                }
                Op::Trim { first, count } => {
                    let count = (count as u64).min(blocks);
                    let at = (first as u64).min(blocks - count) * 4096;
                    vol.trim(at, count as u64 * 4096).await.unwrap();
                }
                Op::Grow(extra) => {
                    vol.resize(vol.size() + extra as u64 * 4096).await.unwrap();
                }
                Op::Snapshot => {
                    taken += 1;
                    vol.snapshot_create(&format!("s{taken}")).await.unwrap();
                }
                Op::Delete(n) if !snaps.is_empty() => {
                    let name = &snaps[n as usize % snaps.len()].name;
                    vol.snapshot_delete(name).await.unwrap();
                }
                Op::Rollback(n) if !snaps.is_empty() => {
                    let name = &snaps[n as usize % snaps.len()].name;
                    vol.rollback(name).await.unwrap();
                }
                Op::Delete(_) | Op::Rollback(_) => {}
                Op::Reopen => {
                    vol.close().await.unwrap();
                    vol = Volume::open(backend.clone(), &opts).await.unwrap();
                }
            }
        }
        vol.close().await.unwrap();

        let stats = space(backend.clone()).await.unwrap();
        let items = held_by_each_root(&backend).await;
        let mut live: HashMap<u32, u64> = HashMap::new();
        let mut by_snapshots: HashMap<u32, u64> = HashMap::new();
        let mut only = vec![0u64; 1 + stats.snapshots.len()];
        for (at, (bytes, roots)) in &items {
            *live.entry(at.seg).or_default() += bytes;
            if roots.iter().any(|&r| r != HEAD) {
                *by_snapshots.entry(at.seg).or_default() += bytes;
            }
            if roots.len() == 1 {
                only[*roots.first().unwrap()] += bytes;
            }
        }
        for s in &stats.segments {
            assert!(!s.recent, "a closed volume has nothing to replay");
            assert_eq!(
                s.live_bytes,
                live.remove(&s.id).unwrap_or(0),
                "segment {}",
                s.id
            );
            assert!(s.live_bytes <= s.size);
            assert_eq!(
                s.snapshot_bytes,
                by_snapshots.get(&s.id).copied().unwrap_or(0),
                "snapshot bytes of segment {}",
                s.id
            );
        }
        assert!(live.is_empty(), "live items in unlisted segments: {live:?}");
        assert_eq!(stats.head_only_bytes, only[0]);
        let snapshot_only: Vec<u64> = stats.snapshots.iter().map(|s| s.only_bytes).collect();
        assert_eq!(snapshot_only, only[1..]);
        let data: u64 = items
            .iter()
            .filter(|(_, (bytes, _))| *bytes == 4096)
            .map(|(_, (bytes, _))| bytes)
            .sum();
        assert!(stats.live_bytes >= data);
        assert_eq!(
            stats.reclaimable_bytes,
            stats.segment_bytes - stats.live_bytes
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: crate::proptest_cases(32),
            ..ProptestConfig::default()
        })]

        /// The level-by-level walk that reads each shared page once agrees
        /// with walking every root whole on its own.
        #[test]
        fn space_agrees_with_walking_each_root_alone(ops in proptest::collection::vec(op(), 1..40)) {
            tokio::runtime::Runtime::new().unwrap().block_on(run(ops));
        }
    }
}
