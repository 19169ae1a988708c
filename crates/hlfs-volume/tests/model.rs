//! Reference-model property test: random interleavings of write, read, trim,
//! write-zeroes, flush, FUA, grow, snapshot create/delete/rollback/read,
//! cleaning runs (asked for, and in some cases the automatic cleaner racing
//! every operation), reopen and crash, on volumes of odd sizes and every
//! block size; in some cases the volume is a clone of a parent's snapshot,
//! whose head is meanwhile overwritten and cleaned. Every read
//! is compared with a plain model of the disk; after a crash the recovered
//! image must be one of the states between the last durable point and the
//! last write (a prefix of the writes, in order).
//!
//! `PROPTEST_CASES` sets the number of cases (default 256 per test binary
//! run; CI raises it, and `scripts/model-soak.sh` runs millions).
//!
//! With `HLFS_MODEL_STORE_URI=s3://BUCKET/PREFIX` (or, built with the
//! `rados` feature, `rados://POOL/PREFIX`) the segments and manifests of
//! every case go to that store instead (scripts/test-s3.sh and
//! scripts/test-rados.sh run a reduced number of cases against Ceph).
//! Crashes then become clean reopens: a crashed process's last requests may
//! still land on a real store after it "died", which the in-memory store
//! rules out.

mod common;

use common::{Image, World, SECTOR};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hlfs_store::layers::CrashMode;
use hlfs_store::{BlobStore, S3Store};
use hlfs_volume::{
    AutoClean, Backend, CloneSource, CreateOptions, Durability, GcOptions, OpenOptions, Others,
    Prewrite, View, Volume,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Pos {
    hot: u8,
    delta: u32,
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        at: Pos,
        len: u32,
        seed: u8,
        fua: bool,
    },
    Read {
        at: Pos,
        len: u32,
    },
    Trim {
        at: Pos,
        len: u32,
    },
    Zeroes {
        at: Pos,
        len: u32,
    },
    Flush,
    Grow {
        extra: u32,
    },
    Snapshot,
    DeleteSnapshot(u8),
    Rollback(u8),
    ReadSnapshot {
        which: u8,
        at: Pos,
        len: u32,
    },
    /// A rollback to a moment inside the retention window, if it is on.
    RollbackMoment(u8),
    /// A moment inside the retention window, if it is on, kept as a
    /// snapshot (as a clone of it does first).
    KeepMoment(u8),
    /// A read of a moment inside the retention window, if it is on.
    ReadMoment {
        which: u8,
        at: Pos,
        len: u32,
    },
    /// A cleaning run down to this space target (in tenths), deleting at
    /// once, copying what it gathers every `commit_blocks` blocks (0: at
    /// the end of each pass).
    Gc {
        target_tenths: u8,
        commit_blocks: u8,
    },
    Reopen,
    Crash {
        mode: u8,
        seed: u64,
    },
    /// `import_diff` of a stream from the newest snapshot to a new one,
    /// with data at `at` and zeros after it. With `fresh`, a snapshot is
    /// taken first, so the head has not changed since; otherwise the head
    /// may have, and then it must be refused. With `cut`, the stream is
    /// cut short, which must change nothing.
    ImportDiff {
        at: Pos,
        len: u32,
        seed: u8,
        zero_len: u32,
        cut: bool,
        fresh: bool,
    },
    /// In a clone's case: its parent's head is overwritten and cleaned
    /// (the clone's snapshot's blocks move), and deleting the snapshot the
    /// clone reads is refused.
    ParentChurn {
        at: Pos,
        len: u32,
        seed: u8,
    },
    /// In a clone's case: flatten it (refused while it has snapshots or a
    /// retention window); the parent's snapshot can then be deleted.
    Flatten,
}

#[derive(Debug, Clone)]
struct Config {
    block_shift: u32,
    size: u64,
    segment_blocks: u64,
    tiny_budget: bool,
    hot_spots: Vec<u64>,
    /// Treat the store as remote: several uploads at once, a longer backlog.
    remote: bool,
    /// FLUSH waits for the store (only with `remote`).
    remote_durability: bool,
    /// The automatic cleaner runs all along, racing every operation.
    auto_clean: bool,
    /// The journal is written ahead with zeros after every sync.
    prewrite: bool,
    /// A retention window (ms): an hour (points only at the first
    /// checkpoint and at resets), or short enough to be pruned as it goes.
    retain_ms: Option<u64>,
    /// The case's volume is a clone of a snapshot of a parent whose
    /// contents come from this seed (not on a real store).
    clone_of: Option<u64>,
}

fn config() -> impl Strategy<Value = Config> {
    (
        9u32..=16,
        prop_oneof![1u64..(3 << 20), (1u64 << 30)..(64u64 << 30)],
        prop_oneof![Just(8u64), 16u64..64],
        any::<bool>(),
        proptest::collection::vec(any::<u64>(), 1..5),
        (any::<bool>(), any::<bool>(), proptest::bool::weighted(0.3)),
        proptest::bool::weighted(0.3),
        prop_oneof![5 => Just(None), 3 => Just(Some(3_600_000)), 2 => Just(Some(25))],
        prop_oneof![3 => Just(None), 1 => any::<u64>().prop_map(Some)],
    )
        .prop_map(
            |(
                block_shift,
                size,
                segment_blocks,
                tiny_budget,
                spots,
                (remote, durability, auto_clean),
                prewrite,
                retain_ms,
                clone_of,
            )| {
                Config {
                    block_shift,
                    size,
                    segment_blocks,
                    tiny_budget,
                    hot_spots: spots.into_iter().map(|s| s % size).collect(),
                    remote,
                    remote_durability: remote && durability,
                    auto_clean,
                    prewrite,
                    retain_ms,
                    clone_of,
                }
            },
        )
}

fn pos() -> impl Strategy<Value = Pos> {
    (any::<u8>(), 0u32..200_000).prop_map(|(hot, delta)| Pos { hot, delta })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (pos(), 1u32..150_000, any::<u8>(), proptest::bool::weighted(0.1))
            .prop_map(|(at, len, seed, fua)| Op::Write { at, len, seed, fua }),
        4 => (pos(), 1u32..150_000).prop_map(|(at, len)| Op::Read { at, len }),
        2 => (pos(), 1u32..300_000).prop_map(|(at, len)| Op::Trim { at, len }),
        2 => (pos(), 1u32..300_000).prop_map(|(at, len)| Op::Zeroes { at, len }),
        2 => Just(Op::Flush),
        1 => (0u32..100_000).prop_map(|extra| Op::Grow { extra }),
        1 => Just(Op::Snapshot),
        1 => any::<u8>().prop_map(Op::DeleteSnapshot),
        1 => any::<u8>().prop_map(Op::Rollback),
        2 => (any::<u8>(), pos(), 1u32..100_000).prop_map(|(which, at, len)| Op::ReadSnapshot { which, at, len }),
        2 => (any::<u8>(), pos(), 1u32..100_000).prop_map(|(which, at, len)| Op::ReadMoment { which, at, len }),
        1 => any::<u8>().prop_map(Op::RollbackMoment),
        1 => any::<u8>().prop_map(Op::KeepMoment),
        1 => (10u8..30, prop_oneof![Just(0u8), 1u8..8]).prop_map(
            |(target_tenths, commit_blocks)| Op::Gc {
                target_tenths,
                commit_blocks
            }
        ),
        1 => Just(Op::Reopen),
        1 => (0u8..3, any::<u64>()).prop_map(|(mode, seed)| Op::Crash { mode, seed }),
        1 => (pos(), 1u32..100_000, any::<u8>(), 0u32..50_000, any::<bool>(), any::<bool>()).prop_map(
            |(at, len, seed, zero_len, cut, fresh)| Op::ImportDiff { at, len, seed, zero_len, cut, fresh }
        ),
        1 => (pos(), 1u32..150_000, any::<u8>()).prop_map(|(at, len, seed)| Op::ParentChurn { at, len, seed }),
        1 => Just(Op::Flatten),
    ]
}

/// Resolves a position and length against the current size.
fn place(cfg: &Config, at: &Pos, len: u32, size: u64) -> (u64, u64) {
    if size == 0 {
        return (0, 0);
    }
    let base = cfg.hot_spots[at.hot as usize % cfg.hot_spots.len()];
    let len = (len as u64).min(size);
    let off = (base + at.delta as u64).min(size - len);
    (off, len)
}

fn budget(cfg: &Config) -> OpenOptions {
    OpenOptions {
        // The smallest budget the map allows, so write-back and eviction run all the time.
        map_budget: if cfg.tiny_budget { 1 } else { 64 << 20 },
        durability: if cfg.remote_durability {
            Durability::Remote
        } else {
            Durability::Local
        },
        // Looking every few milliseconds, it cleans between (and during)
        // the case's operations whenever there is garbage. Not on a real
        // store: a listing every few milliseconds would be most of what
        // the case asks of it (asked-for runs still clean there).
        auto_clean: (cfg.auto_clean && std::env::var_os("HLFS_MODEL_STORE_URI").is_none()).then(
            || AutoClean {
                start_above: 1.2,
                target: 1.05,
                every: Duration::from_millis(3),
                copy_rate: 1 << 40,
                busy_rate: 1 << 40,
                grace: Duration::ZERO,
            },
        ),
        prewrite: if cfg.prewrite {
            Prewrite::Always
        } else {
            Prewrite::Off
        },
        ..OpenOptions::default()
    }
}

struct Harness {
    cfg: Config,
    world: World,
    /// The remote store of the case, if it runs on one.
    remote_store: Option<Arc<dyn BlobStore>>,
    vol: Volume,
    model: Image,
    /// States since the last durable point; the first is durable.
    history: Vec<Image>,
    snapshots: Vec<(String, Image)>,
    next_snap: u32,
    /// With a retention window: the state at the end of each operation,
    /// and whether it is durable yet.
    moments: Vec<Moment>,
    /// In a clone's case, its parent (open for writing) and how the
    /// clone's backend finds it.
    parent: Option<(Volume, Others)>,
    /// The clone was flattened: its parent's snapshot is gone.
    flattened: bool,
}

struct Moment {
    at_ms: u64,
    image: Image,
    durable: bool,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

impl Harness {
    fn changed(&mut self) {
        self.history.push(self.model.clone());
    }

    fn durable(&mut self) {
        self.history = vec![self.model.clone()];
        for m in &mut self.moments {
            m.durable = true;
        }
    }

    /// After an operation, with retention on: the state now is a moment,
    /// and the next operation's records fall in a later millisecond.
    async fn moment(&mut self) {
        if self.cfg.retain_ms.is_none() {
            return;
        }
        let at_ms = unix_ms();
        self.moments.push(Moment {
            at_ms,
            image: self.model.clone(),
            durable: self.history.len() == 1,
        });
        while unix_ms() <= at_ms {
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
    }

    async fn reopen(&mut self) {
        self.vol.close().await.expect("close");
        self.open().await;
        self.durable();
        self.verify_all().await;
    }

    fn backend(&self) -> Backend {
        let b = backend(&self.world, &self.remote_store, self.cfg.remote);
        match &self.parent {
            Some((_, others)) => b.with_others(others.clone()),
            None => b,
        }
    }

    async fn open(&mut self) {
        self.vol = Volume::open(self.backend(), &budget(&self.cfg))
            .await
            .expect("reopen");
    }

    async fn snapshot(&mut self) {
        let name = format!("s{}", self.next_snap);
        self.next_snap += 1;
        self.vol.snapshot_create(&name).await.expect("snapshot");
        self.snapshots.push((name, self.model.clone()));
        self.durable();
    }

    async fn run(&mut self, op: &Op) {
        let size = self.model.size;
        match op {
            Op::Write { at, len, seed, fua } => {
                let (off, len) = place(&self.cfg, at, *len, size);
                let data = common::pattern(len as usize, *seed);
                if *fua {
                    self.vol.write_fua(off, &data).await.expect("write_fua");
                } else {
                    self.vol.write(off, &data).await.expect("write");
                }
                self.model.write(off, &data);
                self.changed();
                if *fua {
                    // FUA makes this write durable, and with it every write before it.
                    self.durable();
                }
            }
            Op::Read { at, len } => {
                let (off, len) = place(&self.cfg, at, *len, size);
                let got = self.vol.read(off, len as usize).await.expect("read");
                assert!(
                    got == self.model.read(off, len),
                    "read {off}+{len} differs from the model"
                );
            }
            Op::Trim { at, len } | Op::Zeroes { at, len } => {
                let (off, len) = place(&self.cfg, at, *len, size);
                if matches!(op, Op::Trim { .. }) {
                    self.vol.trim(off, len).await.expect("trim");
                } else {
                    self.vol.write_zeroes(off, len).await.expect("write_zeroes");
                }
                // Applied as up to three records (partial head, partial
                // tail, whole blocks); a crash may keep any prefix of them.
                for (o, l) in common::zero_steps(off, len, 1 << self.cfg.block_shift, size) {
                    self.model.zero(o, l);
                    self.changed();
                }
            }
            Op::Flush => {
                self.vol.flush().await.expect("flush");
                self.durable();
            }
            Op::Grow { extra } => {
                let new_size = size + *extra as u64;
                self.vol.resize(new_size).await.expect("resize");
                self.model.size = new_size;
                self.changed();
            }
            Op::ImportDiff {
                at,
                len,
                seed,
                zero_len,
                cut,
                fresh,
            } => {
                use hlfs_format::rbd_diff::{DiffRecord, BANNER};
                if *fresh || self.snapshots.is_empty() {
                    self.snapshot().await;
                }
                let (from, from_image) = self.snapshots.last().cloned().expect("a snapshot");
                let (off, len) = place(&self.cfg, at, *len, size);
                let zero_len = (*zero_len as u64).min(size - off - len);
                let data = common::pattern(len as usize, *seed);
                let to = format!("s{}", self.next_snap);
                self.next_snap += 1;
                let mut stream = BANNER.to_vec();
                stream.extend(DiffRecord::FromSnapshot(from.clone()).encode());
                stream.extend(DiffRecord::ToSnapshot(to.clone()).encode());
                stream.extend(DiffRecord::Size(size).encode());
                stream.extend(DiffRecord::DataHeader { offset: off, len }.encode());
                stream.extend_from_slice(&data);
                let zero = DiffRecord::Zero {
                    offset: off + len,
                    len: zero_len,
                };
                stream.extend(zero.encode());
                stream.extend(DiffRecord::End.encode());
                if *cut {
                    stream.pop();
                }
                let result = hlfs_volume::import_diff(&self.vol, &stream[..], &|_| {}).await;
                match result {
                    Err(e) if e.to_string().contains("has changed since") => {
                        assert!(!*fresh, "refused after a fresh snapshot: {e}");
                        // Refused before anything changed; a head that
                        // differs from the snapshot must be refused.
                        return;
                    }
                    Err(e) => {
                        assert!(*cut, "import-diff: {e}");
                        assert!(e.to_string().contains("bad diff stream"), "{e}");
                    }
                    Ok(_) => {
                        assert!(!*cut, "a cut stream was applied");
                        // Grown since is the same: the new space reads as
                        // zeros, as the snapshot's would.
                        let same = self.model.size >= from_image.size
                            && common::touched_ranges([&self.model, &from_image].into_iter(), size)
                                .into_iter()
                                .all(|(o, l)| self.model.read(o, l) == from_image.read(o, l));
                        assert!(same, "applied onto a head that differs from {from}");
                        self.model.write(off, &data);
                        self.model.zero(off + len, zero_len);
                        self.snapshots.push((to, self.model.clone()));
                    }
                }
                // Applied or rolled back, it ends with a checkpoint.
                self.durable();
            }
            Op::Snapshot => self.snapshot().await,
            Op::DeleteSnapshot(i) => {
                if self.snapshots.is_empty() {
                    return;
                }
                let (name, _) = self.snapshots.remove(*i as usize % self.snapshots.len());
                self.vol
                    .snapshot_delete(&name)
                    .await
                    .expect("delete snapshot");
            }
            Op::Rollback(i) => {
                if self.snapshots.is_empty() {
                    return;
                }
                let (name, image) = self.snapshots[*i as usize % self.snapshots.len()].clone();
                let auto = self.vol.rollback(&name).await.expect("rollback");
                self.snapshots.push((auto, self.model.clone()));
                self.model = image;
                self.durable();
            }
            Op::ReadSnapshot { which, at, len } => {
                if self.snapshots.is_empty() {
                    return;
                }
                let (name, image) = &self.snapshots[*which as usize % self.snapshots.len()];
                let snap = Volume::open_read_only(
                    self.backend(),
                    &budget(&self.cfg),
                    View::Snapshot(name.clone()),
                )
                .await
                .expect("open snapshot");
                assert_eq!(snap.size(), image.size, "snapshot {name} size");
                let (off, len) = place(&self.cfg, at, *len, image.size);
                let got = snap.read(off, len as usize).await.expect("read snapshot");
                assert!(
                    got == image.read(off, len),
                    "snapshot {name} read {off}+{len} differs"
                );
                assert!(
                    snap.write(off, &[1]).await.is_err(),
                    "snapshot must be read-only"
                );
            }
            Op::RollbackMoment(which) => {
                let Some((at_ms, image)) = self.moment_inside(*which) else {
                    return;
                };
                let auto = self
                    .vol
                    .rollback_to_moment(at_ms)
                    .await
                    .expect("rollback to a moment");
                self.snapshots.push((auto, self.model.clone()));
                self.model = image;
                self.durable();
            }
            Op::KeepMoment(which) => {
                let Some((at_ms, image)) = self.moment_inside(*which) else {
                    return;
                };
                let name = self
                    .vol
                    .offer_for_clone(&CloneSource::Moment(at_ms))
                    .await
                    .expect("keep a moment");
                // Kept before: the same snapshot, and no checkpoint.
                if !self.snapshots.iter().any(|(n, _)| *n == name) {
                    self.snapshots.push((name, image));
                    self.durable();
                }
            }
            Op::ReadMoment { which, at, len } => {
                let Some((at_ms, image)) = self.moment_inside(*which) else {
                    return;
                };
                let view =
                    Volume::open_read_only(self.backend(), &budget(&self.cfg), View::AsOf(at_ms))
                        .await
                        .expect("open a moment");
                assert_eq!(view.moment(), Some(at_ms), "not opened as a moment");
                assert_eq!(view.size(), image.size, "size at moment {at_ms}");
                let (off, len) = place(&self.cfg, at, *len, image.size);
                let got = view.read(off, len as usize).await.expect("read moment");
                assert!(
                    got == image.read(off, len),
                    "moment {at_ms} read {off}+{len} differs"
                );
            }
            Op::Gc {
                target_tenths,
                commit_blocks,
            } => {
                let opts = GcOptions {
                    target: *target_tenths as f64 / 10.0,
                    grace: Duration::ZERO,
                    commit_bytes: match commit_blocks {
                        0 => usize::MAX,
                        n => (*n as usize) << self.cfg.block_shift,
                    },
                    ..GcOptions::default()
                };
                self.vol.gc(&opts, &|_| {}).await.expect("gc");
            }
            Op::ParentChurn { at, len, seed } => {
                let Some((parent, _)) = &self.parent else {
                    return;
                };
                let (off, len) = place(&self.cfg, at, *len, parent.size());
                let data = common::pattern(len as usize, *seed);
                parent.write(off, &data).await.expect("parent write");
                let opts = GcOptions {
                    target: 1.0,
                    grace: Duration::ZERO,
                    ..GcOptions::default()
                };
                parent.gc(&opts, &|_| {}).await.expect("parent gc");
                if self.flattened {
                    return;
                }
                let refused = parent.snapshot_delete(PARENT_SNAPSHOT).await;
                assert!(
                    refused
                        .as_ref()
                        .is_err_and(|e| e.to_string().contains("has clones")),
                    "deleting a cloned snapshot: {refused:?}"
                );
            }
            Op::Flatten => {
                let Some((parent, _)) = &self.parent else {
                    return;
                };
                if self.flattened {
                    return;
                }
                let flattened = self
                    .vol
                    .flatten(hlfs_volume::FlattenOptions::default(), &|_| {})
                    .await;
                if !self.snapshots.is_empty() || self.cfg.retain_ms.is_some() {
                    let e = flattened.expect_err("flattened a clone with snapshots or moments");
                    assert!(e.to_string().contains("before flattening"), "{e}");
                    return;
                }
                flattened.expect("flatten");
                assert!(self.vol.parent().is_none(), "the link stays");
                // Nothing of the clone needs the parent's snapshot now.
                parent
                    .snapshot_delete(PARENT_SNAPSHOT)
                    .await
                    .expect("delete the flattened clone's snapshot");
                let opts = GcOptions {
                    target: 1.0,
                    grace: Duration::ZERO,
                    ..GcOptions::default()
                };
                parent.gc(&opts, &|_| {}).await.expect("parent gc");
                self.flattened = true;
                // Flatten ends with a checkpoint.
                self.durable();
            }
            Op::Reopen => self.reopen().await,
            Op::Crash { .. } if self.remote_store.is_some() => self.reopen().await,
            Op::Crash { mode, seed } => {
                let mode = match mode {
                    0 => CrashMode::DropUnsynced,
                    1 => CrashMode::KeepRandomPrefix { seed: *seed },
                    _ => CrashMode::TornSectors { seed: *seed },
                };
                self.world = self.world.power_cut(mode).await;
                self.open().await;
                let recovered = self.recovered_state().await;
                self.model = self.history[recovered].clone();
                // Moments that were not durable hold what survived of
                // their writes, which states that read the same (a write
                // then zeroed) cannot tell: they are not checked.
                self.moments.retain(|m| m.durable);
                self.durable();
            }
        }
    }

    /// A moment at or after the window's start (the volume keeps those),
    /// chosen by `which`.
    fn moment_inside(&self, which: u8) -> Option<(u64, Image)> {
        let start = unix_ms().saturating_sub(self.cfg.retain_ms?);
        let inside: Vec<&Moment> = self.moments.iter().filter(|m| m.at_ms >= start).collect();
        let m = inside.get(which as usize % inside.len().max(1))?;
        Some((m.at_ms, m.image.clone()))
    }

    /// Which history state the reopened volume holds; panics if none.
    async fn recovered_state(&self) -> usize {
        let size = self.vol.size();
        let ranges = common::touched_ranges(self.history.iter(), size);
        let mut contents = Vec::new();
        for &(off, len) in &ranges {
            contents.push(
                self.vol
                    .read(off, len as usize)
                    .await
                    .expect("read after crash"),
            );
        }
        let matches = |img: &Image| {
            img.size == size
                && ranges
                    .iter()
                    .zip(&contents)
                    .all(|(&(off, len), got)| *got == img.read(off, len))
        };
        // Several states can read the same (e.g. zeroing zeros); the latest
        // one has touched the most, which keeps the allocation check exact.
        match self.history.iter().rposition(matches) {
            Some(i) => i,
            None => panic!(
                "after a crash the volume (size {size}) matches none of the {} states since the last flush",
                self.history.len()
            ),
        }
    }

    /// Every written range and the allocation agree with the model.
    async fn verify_all(&self) {
        assert_eq!(self.vol.size(), self.model.size);
        for (off, len) in common::touched_ranges(std::iter::once(&self.model), self.model.size) {
            let got = self.vol.read(off, len as usize).await.expect("verify read");
            assert!(
                got == self.model.read(off, len),
                "range {off}+{len} differs after reopen"
            );
        }
        let allocated = self.vol.allocated_bytes();
        let bs = 1u64 << self.cfg.block_shift;
        let touched_blocks = self.model.touched_blocks(bs);
        assert!(
            allocated <= touched_blocks * bs,
            "{allocated} bytes allocated but only {touched_blocks} blocks were ever written"
        );
    }
}

/// The case's volume: all in memory, or with its store remote (whose
/// requests are retried as a remote volume retries them).
fn backend(world: &World, remote_store: &Option<Arc<dyn BlobStore>>, remote: bool) -> Backend {
    match remote_store {
        Some(store) => Backend {
            store: store.clone(),
            remote: true,
            retry_budget: Some(Duration::from_secs(30)),
            ..world.backend()
        },
        None => Backend {
            remote,
            ..world.backend()
        },
    }
}

fn remote_store_for_case() -> Option<Arc<dyn BlobStore>> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let base = std::env::var("HLFS_MODEL_STORE_URI").ok()?;
    let uri = format!(
        "{}/case-{}-{}",
        base.trim_end_matches('/'),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    #[cfg(feature = "rados")]
    if uri.starts_with("rados://") {
        let settings = hlfs_store::CephSettings::default();
        let store = hlfs_store::RadosStore::from_uri(&uri, &settings, Duration::from_secs(10))
            .expect("Ceph configuration");
        return Some(Arc::new(store));
    }
    assert!(
        uri.starts_with("s3://"),
        "HLFS_MODEL_STORE_URI={uri:?} is not a store this build has"
    );
    Some(Arc::new(S3Store::from_uri(&uri).expect("S3 configuration")))
}

const PARENT_SNAPSHOT: &str = "golden";

/// A parent volume in a world of its own, written from `seed`, with the
/// snapshot the case's clone is made of; and its image at that snapshot.
/// For a third of the seeds the parent is itself a clone, of a
/// grandparent written from the same seed: the case's clone is then a
/// clone of a clone, and the parent's writes and zeroes fall over its own
/// parent's data.
async fn parent_for_case(
    cfg: &Config,
    create: &CreateOptions,
    seed: u64,
) -> (Volume, Others, Image) {
    let (parent_world, grand_world) = (World::new(), World::new());
    let at = |address: &'static str, env: &World| Backend {
        location: address.into(),
        ..env.backend()
    };
    let (parent_env, grand_env) = (parent_world.env.clone(), grand_world.env.clone());
    let others = Others::from_fn(move |a| match a {
        "memory://parent" => Ok(at("memory://parent", &World::over(parent_env.clone()))),
        "memory://grand" => Ok(at("memory://grand", &World::over(grand_env.clone()))),
        _ => Err(hlfs_volume::VolumeError::NotFound(a.to_string())),
    });
    let mut image = Image::new(cfg.size);
    let mut rng = seed;
    let mut next = move |below: u64| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % below.max(1)
    };
    let parent_backend = others.open("memory://parent").unwrap();
    if seed.is_multiple_of(3) {
        let grand_backend = others.open("memory://grand").unwrap();
        Volume::create(&grand_backend, create)
            .await
            .expect("create grandparent");
        let grand = Volume::open(grand_backend.clone(), &budget(cfg))
            .await
            .expect("open grandparent");
        write_at_random(&grand, &mut image, &mut next, seed).await;
        take_golden(&grand).await;
        grand.close().await.expect("close grandparent");
        hlfs_volume::clone_volume(
            grand_backend,
            PARENT_SNAPSHOT,
            &parent_backend,
            &budget(cfg),
        )
        .await
        .expect("clone of the grandparent");
    } else {
        Volume::create(&parent_backend, create)
            .await
            .expect("create parent");
    }
    let parent = Volume::open(parent_backend, &budget(cfg))
        .await
        .expect("open parent");
    write_at_random(&parent, &mut image, &mut next, seed + 1).await;
    take_golden(&parent).await;
    (parent, others, image)
}

/// Takes the snapshot a clone is made of, and makes `vol` ready for it.
async fn take_golden(vol: &Volume) {
    vol.snapshot_create(PARENT_SNAPSHOT)
        .await
        .expect("snapshot to clone");
    vol.offer_for_clone(&CloneSource::Snapshot(PARENT_SNAPSHOT.into()))
        .await
        .expect("made v4");
}

/// Six writes or zeroes (every third) at places `next` picks, with
/// patterns from `seed`, on `vol` and `image`.
async fn write_at_random(
    vol: &Volume,
    image: &mut Image,
    next: &mut impl FnMut(u64) -> u64,
    seed: u64,
) {
    let size = image.size;
    for i in 0..6 {
        let off = next(size);
        let len = next(200_000).min(size - off);
        if i % 3 == 2 {
            vol.write_zeroes(off, len).await.expect("zeroes");
            image.zero(off, len);
        } else {
            let data = common::pattern(len as usize, (i as u8).wrapping_add(seed as u8));
            vol.write(off, &data).await.expect("write");
            image.write(off, &data);
        }
    }
}

async fn run_case(cfg: Config, ops: Vec<Op>) {
    let world = World::new();
    let remote_store = remote_store_for_case();
    let bs = 1u32 << cfg.block_shift;
    let create = CreateOptions {
        size: cfg.size,
        block_size: bs,
        segment_size: (cfg.segment_blocks * bs as u64).max(64 << 10),
    };
    let mut parent = None;
    let mut model = Image::new(cfg.size);
    match cfg.clone_of.filter(|_| remote_store.is_none()) {
        Some(seed) => {
            let (parent_vol, others, image) = parent_for_case(&cfg, &create, seed).await;
            let clone_backend = Backend {
                location: "memory://clone".into(),
                ..backend(&world, &remote_store, cfg.remote).with_others(others.clone())
            };
            let parent_backend = clone_backend.open_other("memory://parent").unwrap();
            hlfs_volume::clone_volume(
                parent_backend,
                PARENT_SNAPSHOT,
                &clone_backend,
                &budget(&cfg),
            )
            .await
            .expect("clone");
            model = image;
            parent = Some((parent_vol, others));
        }
        None => Volume::create(&backend(&world, &remote_store, cfg.remote), &create)
            .await
            .expect("create"),
    }
    let mut open_backend = backend(&world, &remote_store, cfg.remote);
    if let Some((_, others)) = &parent {
        open_backend = open_backend.with_others(others.clone());
    }
    let vol = Volume::open(open_backend, &budget(&cfg))
        .await
        .expect("open");
    let mut h = Harness {
        cfg,
        world,
        remote_store,
        vol,
        history: vec![model.clone()],
        model,
        snapshots: Vec::new(),
        next_snap: 0,
        moments: Vec::new(),
        parent,
        flattened: false,
    };
    if let Some(window) = h.cfg.retain_ms {
        h.vol.set_retention(window).await.expect("retention on");
        h.durable();
        h.moment().await;
    }
    for op in &ops {
        h.run(op).await;
        h.moment().await;
    }
    h.verify_all().await;
    h.vol.close().await.expect("final close");
    if let Some((parent, _)) = h.parent.take() {
        parent.close().await.expect("close parent");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(256), ..ProptestConfig::default() })]
    #[test]
    fn volume_matches_model(cfg in config(), ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_case(cfg, ops));
    }
}

#[test]
fn sector_size_matches_min_block() {
    assert_eq!(SECTOR as u32, hlfs_format::MIN_BLOCK_SIZE);
}
