//! What changed between two roots of a volume (`hlfs diff`), from their map
//! trees alone: no data is read, subtrees the two roots share (the same
//! page location at the same node) are skipped whole, so the cost grows
//! with what changed, not with the volume.
//!
//! Block `x` is in the diff when the two roots' entries for it differ: it
//! was written (even with the same bytes), trimmed or zeroed in between.
//! It is a zero extent when it reads as zeros in the newer root. Both
//! roots come from one manifest (docs/design/diffs.md).

use std::sync::Arc;

use hlfs_format::{Checkpoint, Entry, MapPage, MAP_FANOUT, MAP_SHIFT};

use crate::backend::Backend;
use crate::cache::ReadCache;
use crate::core::Core;
use crate::error::{Result, VolumeError};
use crate::manifest::latest_manifest;
use crate::map::depth_for;
use crate::segments::Segments;

/// A run of bytes that changed: all data, or all zeros now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiffExtent {
    pub offset: u64,
    pub len: u64,
    pub zero: bool,
}

/// The changes from one root to another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diff {
    /// The newer root's size: extents lie below it.
    pub size: u64,
    /// The older root's size. When it is larger, the blocks past `size`
    /// are gone, and no extent says so.
    pub from_size: u64,
    pub extents: Vec<DiffExtent>,
}

/// Bytes of a remote volume's map pages a diff keeps locally at most.
const SCRATCH_CACHE: u64 = 256 << 20;

/// One side of a node in the walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// An empty subtree: every block a hole.
    Empty,
    /// A page written to the log.
    Page(Entry),
    /// Above a shallower tree's root (it was grown since): a page whose
    /// slot 0 leads down to the root page at `root_level`, empty elsewhere.
    Above { root: Entry, root_level: u32 },
}

/// The children of one side of the node at `level`.
async fn children(segments: &Segments, side: Side, level: u32) -> Result<Vec<Side>> {
    let mut out = vec![Side::Empty; MAP_FANOUT];
    match side {
        Side::Empty => {}
        Side::Page(at) => {
            let page = segments.read_page(at).await?;
            for (slot, e) in page.entries.iter().enumerate() {
                if !e.is_empty() {
                    out[slot] = Side::Page(*e);
                }
            }
        }
        Side::Above { root, root_level } => {
            out[0] = if level - 1 == root_level {
                Side::Page(root)
            } else {
                side
            };
        }
    }
    Ok(out)
}

/// The leaf entries of one side.
async fn leaf(segments: &Segments, side: Side) -> Result<MapPage> {
    match side {
        Side::Page(at) => segments.read_page(at).await,
        _ => Ok(MapPage::default()),
    }
}

/// A root's tree: where its root page is, how deep it is, its size.
struct Root {
    root: Entry,
    depth: u32,
    size: u64,
}

impl Root {
    /// The side of the top node of a walk `depth` levels deep.
    fn top(&self, depth: u32) -> Side {
        if self.root.is_empty() {
            Side::Empty
        } else if self.depth == depth {
            Side::Page(self.root)
        } else {
            Side::Above {
                root: self.root,
                root_level: self.depth - 1,
            }
        }
    }
}

async fn root_of(
    segments: &Segments,
    checkpoint: Entry,
    size: u64,
    block_size: u32,
) -> Result<Root> {
    if checkpoint.is_empty() {
        return Ok(Root {
            root: Entry::EMPTY,
            depth: depth_for(size.div_ceil(block_size as u64)),
            size,
        });
    }
    let (cp, _): (Checkpoint, u64) = segments.read_checkpoint(checkpoint).await?;
    Ok(Root {
        root: cp.root,
        depth: cp.depth,
        size: cp.size,
    })
}

/// The changes from snapshot `from` to snapshot `to` of the volume at
/// `backend`, or to its head when `to` is None. The head is that of the
/// newest manifest: refused while a writer holds the volume, unless
/// `head_checkpointed` says its writer has just made the manifest's head
/// everything written (`Volume::checkpoint`), as a server does when asked.
pub async fn diff(
    backend: Backend,
    from: &str,
    to: Option<&str>,
    head_checkpointed: bool,
) -> Result<Diff> {
    let store = backend.requests();
    let manifest = latest_manifest(&*store, &backend.location).await?;
    let snapshot = |name: &str| {
        manifest
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| VolumeError::SnapshotNotFound(name.to_string()))
    };
    let from_snap = snapshot(from)?;
    let (to_checkpoint, to_size) = match to {
        Some(name) => (snapshot(name)?.checkpoint, None),
        None => {
            if let Some(w) = manifest.writer.as_ref().filter(|_| !head_checkpointed) {
                return Err(VolumeError::Busy(format!(
                    "{} is held by process {} on {}, out of this command's reach: its latest writes are not in its manifest; run the diff where it is served, or diff a snapshot (hlfs diff VOLUME@SNAP --from {from})",
                    backend.location, w.pid, w.host
                )));
            }
            (manifest.checkpoint, Some(manifest.size))
        }
    };
    let scratch = match backend.remote {
        true => Some(ReadCache::scratch(SCRATCH_CACHE)?),
        false => None,
    };
    let segments = Segments::new(store, scratch, manifest.volume);
    let bs = manifest.block_size;
    let a = root_of(&segments, from_snap.checkpoint, 0, bs).await?;
    let b = root_of(&segments, to_checkpoint, to_size.unwrap_or(0), bs).await?;
    let parent_blocks = manifest
        .parent
        .as_ref()
        .map_or(0, |l| l.size.div_ceil(bs as u64));
    walk(&segments, bs, a, b, parent_blocks).await
}

/// What identifies a diff's answer: the two roots it compares, and the
/// size of the newer (an empty root's extent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChangesKey {
    from: Entry,
    to: Entry,
    size: u64,
}

/// Answers `changes_since` keeps, for a client that asks about one range
/// after another, or about several snapshots in turn.
const CHANGES_KEPT: usize = 4;

impl Core {
    /// What changed from snapshot `from` to what this volume shows: the
    /// head of a writable volume, as of a checkpoint taken now (so every
    /// write acknowledged before the call is in it), or the snapshot a
    /// read-only view shows. A read-only view of the head has replayed
    /// writes no manifest's root holds, so it has no answer.
    pub(crate) async fn changes_since(&self, from: &str) -> Result<Arc<Diff>> {
        if self.life.read_only() && self.shows.snapshot().is_none() {
            return Err(VolumeError::InvalidArgument(
                "a read-only view of the head or of a moment has no changes to list: open a snapshot, or the volume for writing".into(),
            ));
        }
        if !self.life.read_only() {
            self.checkpoint_now().await?;
        }
        // One manifest gives both roots (docs/design/diffs.md).
        let (from_checkpoint, to) = self.manifests.read(|m| {
            let from = m.snapshots.iter().find(|s| s.name == from);
            (from.map(|s| s.checkpoint), m.checkpoint)
        });
        let from_checkpoint =
            from_checkpoint.ok_or_else(|| VolumeError::SnapshotNotFound(from.to_string()))?;
        let key = ChangesKey {
            from: from_checkpoint,
            to,
            size: self.size(),
        };
        if let Some((_, known)) = self.changes.lock().iter().find(|(k, _)| *k == key) {
            return Ok(known.clone());
        }
        let bs = self.block_size;
        let a = root_of(&self.segments, key.from, 0, bs).await?;
        let b = root_of(&self.segments, key.to, key.size, bs).await?;
        let answer = Arc::new(walk(&self.segments, bs, a, b, self.parent_blocks()).await?);
        let mut kept = self.changes.lock();
        if kept.len() >= CHANGES_KEPT {
            kept.remove(0);
        }
        kept.push((key, answer.clone()));
        Ok(answer)
    }
}

/// The blocks whose entries differ between roots `a` and `b`, as extents
/// below `b`'s size. In a clone, blocks below `parent_blocks` that `b`
/// has not written are its parent's data, not zeros.
async fn walk(segments: &Segments, bs: u32, a: Root, b: Root, parent_blocks: u64) -> Result<Diff> {
    let depth = a.depth.max(b.depth);
    let from_size = a.size;
    let mut changes = Changes::new(bs as u64, b.size);
    // Depth first, left to right, so blocks come out in order.
    let mut stack = vec![(depth - 1, 0u64, a.top(depth), b.top(depth))];
    while let Some((level, index, a_side, b_side)) = stack.pop() {
        if a_side == b_side {
            continue;
        }
        if level == 0 {
            let (old, new) = (leaf(segments, a_side).await?, leaf(segments, b_side).await?);
            for (slot, (o, n)) in old.entries.iter().zip(new.entries.iter()).enumerate() {
                if o != n {
                    let lba = (index << MAP_SHIFT) + slot as u64;
                    let reads_parent = n.is_unwritten() && lba < parent_blocks;
                    changes.block(lba, n.is_empty() && !reads_parent);
                }
            }
            continue;
        }
        let (olds, news) = (
            children(segments, a_side, level).await?,
            children(segments, b_side, level).await?,
        );
        for slot in (0..MAP_FANOUT).rev() {
            if olds[slot] != news[slot] {
                let child = index * MAP_FANOUT as u64 + slot as u64;
                stack.push((level - 1, child, olds[slot], news[slot]));
            }
        }
    }
    Ok(changes.finish(from_size))
}

/// Changed blocks, in order, merged into extents.
struct Changes {
    block_size: u64,
    size: u64,
    extents: Vec<DiffExtent>,
}

impl Changes {
    fn new(block_size: u64, size: u64) -> Changes {
        Changes {
            block_size,
            size,
            extents: Vec::new(),
        }
    }

    fn block(&mut self, lba: u64, zero: bool) {
        let offset = lba * self.block_size;
        if offset >= self.size {
            // Past the newer root's end: nothing there to read.
            return;
        }
        let len = self.block_size.min(self.size - offset);
        match self.extents.last_mut() {
            Some(last) if last.offset + last.len == offset && last.zero == zero => last.len += len,
            _ => self.extents.push(DiffExtent { offset, len, zero }),
        }
    }

    fn finish(self, from_size: u64) -> Diff {
        Diff {
            from_size,
            size: self.size,
            extents: self.extents,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hlfs_store::MemEnv;
    use proptest::prelude::*;

    use super::*;
    use crate::clean::GcOptions;
    use crate::options::{CreateOptions, OpenOptions, View};
    use crate::volume::Volume;

    const BS: u64 = 4096;

    #[derive(Debug, Clone)]
    enum Op {
        Write { first: u16, count: u8 },
        Trim { first: u16, count: u8 },
        Grow(u16),
        Snapshot,
        Rollback(u8),
        Gc,
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0u16..3000, 1u8..40).prop_map(|(first, count)| Op::Write { first, count }),
            2 => (0u16..3000, 1u8..200).prop_map(|(first, count)| Op::Trim { first, count }),
            1 => (1u16..600).prop_map(Op::Grow),
            3 => Just(Op::Snapshot),
            1 => any::<u8>().prop_map(Op::Rollback),
            1 => Just(Op::Gc),
            1 => Just(Op::Reopen),
        ]
    }

    /// A block's state: the write that put its bytes there, or a hole.
    type State = (u64, BTreeMap<u64, u64>);

    async fn run(ops: Vec<Op>) {
        let env = MemEnv::new();
        let backend = Backend::memory(&env);
        // One leaf deep at first: growing past 512 blocks deepens the
        // tree, so diffs across a resize compare trees of two depths.
        let create = CreateOptions {
            size: 300 * BS,
            block_size: BS as u32,
            segment_size: 256 << 10,
        };
        Volume::create(&backend, &create).await.unwrap();
        let opts = OpenOptions {
            map_budget: 64 << 10,
            ..OpenOptions::default()
        };
        let mut vol = Volume::open(backend.clone(), &opts).await.unwrap();
        // (size in blocks, block → write number) now and at each snapshot.
        let mut head: State = (300, BTreeMap::new());
        let mut snaps: Vec<(String, State)> = Vec::new();
        let mut writes = 0u64;
        for op in ops {
            let blocks = head.0;
            match op {
                Op::Write { first, count } => {
                    let count = (count as u64).min(blocks);
                    let first = (first as u64).min(blocks - count);
                    writes += 1;
                    vol.write(first * BS, &vec![writes as u8; (count * BS) as usize])
                        .await
                        .unwrap();
                    for b in first..first + count {
                        head.1.insert(b, writes);
                    }
                }
                Op::Trim { first, count } => {
                    let count = (count as u64).min(blocks);
                    let first = (first as u64).min(blocks - count);
                    vol.trim(first * BS, count * BS).await.unwrap();
                    for b in first..first + count {
                        head.1.remove(&b);
                    }
                }
                Op::Grow(extra) => {
                    head.0 += extra as u64;
                    vol.resize(head.0 * BS).await.unwrap();
                }
                Op::Snapshot => {
                    let name = format!("s{}", snaps.len());
                    vol.snapshot_create(&name).await.unwrap();
                    snaps.push((name, head.clone()));
                }
                Op::Rollback(n) if !snaps.is_empty() => {
                    let (name, state) = snaps[n as usize % snaps.len()].clone();
                    let auto = vol.rollback(&name).await.unwrap();
                    snaps.push((auto, head.clone()));
                    head = state;
                }
                Op::Rollback(_) => {}
                Op::Gc => {
                    let gc = GcOptions {
                        target: 1.0,
                        grace: std::time::Duration::ZERO,
                        ..GcOptions::default()
                    };
                    vol.gc(&gc, &|_| {}).await.unwrap();
                }
                Op::Reopen => {
                    vol.close().await.unwrap();
                    vol = Volume::open(backend.clone(), &opts).await.unwrap();
                }
            }
        }
        // The owner's answer for the head, checkpointing as it goes.
        let mut live = Vec::new();
        for (name, _) in &snaps {
            live.push(vol.changes_since(name).await.unwrap());
        }
        vol.close().await.unwrap();
        for ((name, _), live) in snaps.iter().zip(&live) {
            let stored = diff(backend.clone(), name, None, false).await.unwrap();
            assert_eq!(**live, stored, "changes since {name} in the head");
        }
        // A view of the newest snapshot answers as a diff to it does.
        if let Some((newest, _)) = snaps.last() {
            let view = View::Snapshot(newest.clone());
            let view = Volume::open_read_only(backend.clone(), &opts, view)
                .await
                .unwrap();
            for (name, _) in &snaps {
                let stored = diff(backend.clone(), name, Some(newest), false)
                    .await
                    .unwrap();
                assert_eq!(*view.changes_since(name).await.unwrap(), stored);
            }
        }

        // Every pair of snapshots, and each snapshot to the head.
        let mut roots: Vec<(Option<&str>, &State)> =
            snaps.iter().map(|(n, s)| (Some(n.as_str()), s)).collect();
        roots.push((None, &head));
        for (from, from_state) in &snaps {
            for (to, to_state) in &roots {
                let got = diff(backend.clone(), from, *to, false).await.unwrap();
                assert_eq!(got.size, to_state.0 * BS);
                let mut expected = Vec::new();
                for b in 0..to_state.0 {
                    let (old, new) = (from_state.1.get(&b), to_state.1.get(&b));
                    if old != new {
                        expected.push((b, new.is_none()));
                    }
                }
                let mut listed = Vec::new();
                let mut end = 0;
                for e in &got.extents {
                    assert!(
                        e.offset >= end && e.len > 0,
                        "extents in order: {:?}",
                        got.extents
                    );
                    end = e.offset + e.len;
                    assert!(end <= got.size);
                    for b in e.offset / BS..end.div_ceil(BS) {
                        listed.push((b, e.zero));
                    }
                }
                assert_eq!(listed, expected, "diff from {from} to {to:?}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: crate::proptest_cases(32),
            ..ProptestConfig::default()
        })]

        /// A diff lists exactly the blocks whose last write (or hole)
        /// differs between the two roots, across writes, trims, growth,
        /// rollbacks, cleaning and reopens.
        #[test]
        fn a_diff_is_exactly_what_changed(ops in proptest::collection::vec(op(), 1..40)) {
            tokio::runtime::Runtime::new().unwrap().block_on(run(ops));
        }
    }

    /// A 1 MiB volume created at `backend` with segments of
    /// `segment_size`, opened, with an empty snapshot "a".
    async fn with_snapshot_a(backend: &Backend, segment_size: u64) -> Volume {
        let create = CreateOptions {
            size: 1 << 20,
            segment_size,
            ..CreateOptions::default()
        };
        Volume::create(backend, &create).await.unwrap();
        let vol = Volume::open(backend.clone(), &OpenOptions::default())
            .await
            .unwrap();
        vol.snapshot_create("a").await.unwrap();
        vol
    }

    /// A write that seals a segment with a checkpoint leaves that
    /// checkpoint to the upload task to make the head; the owner's answer
    /// must wait for it, or it misses what the checkpoint holds.
    #[tokio::test]
    async fn the_owner_answers_after_a_checkpoint_still_being_uploaded() {
        let segment = 64 << 10;
        // Some count of blocks ends with the write that seals the fourth
        // segment, with a checkpoint, and nothing after it.
        for blocks in 60..68u64 {
            let faults = hlfs_store::layers::Faults::new();
            let backend = Backend::memory(&MemEnv::new()).with_faults(&faults);
            let vol = with_snapshot_a(&backend, segment).await;
            faults.set_latency(std::time::Duration::from_millis(20));
            for b in 0..blocks {
                vol.write(b * BS, &[1; BS as usize]).await.unwrap();
            }
            let changed = vol.changes_since("a").await.unwrap();
            assert_eq!(
                changed.extents,
                [DiffExtent {
                    offset: 0,
                    len: blocks * BS,
                    zero: false
                }],
                "after {blocks} blocks"
            );
            faults.set_latency(std::time::Duration::ZERO);
            vol.close().await.unwrap();
        }
    }

    #[tokio::test]
    async fn the_head_of_a_volume_being_written_is_refused() {
        let backend = Backend::memory(&MemEnv::new());
        let vol = with_snapshot_a(&backend, CreateOptions::default().segment_size).await;
        let err = diff(backend.clone(), "a", None, false).await.unwrap_err();
        assert!(err.to_string().contains("diff a snapshot"), "{err}");
        assert!(matches!(
            diff(backend.clone(), "nope", Some("a"), false).await,
            Err(VolumeError::SnapshotNotFound(_))
        ));
        // Its writer's checkpoint makes the head readable from the store.
        vol.write(0, &[7; 4096]).await.unwrap();
        vol.checkpoint().await.unwrap();
        let changed = diff(backend.clone(), "a", None, true).await.unwrap();
        assert_eq!(
            changed.extents,
            [DiffExtent {
                offset: 0,
                len: 4096,
                zero: false
            }]
        );
        vol.close().await.unwrap();
        assert_eq!(
            diff(backend.clone(), "a", None, false)
                .await
                .unwrap()
                .extents,
            changed.extents
        );
        // A read-only view of the head replayed writes no root holds.
        let head = Volume::open_read_only(backend, &OpenOptions::default(), View::Head)
            .await
            .unwrap();
        let err = head.changes_since("a").await.unwrap_err();
        assert!(err.to_string().contains("open a snapshot"), "{err}");
    }
}
