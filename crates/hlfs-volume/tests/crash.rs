//! Crash tests: scripted scenarios are cut off at every durable operation of
//! the store (journal syncs, segment puts, manifest puts, file creates and
//! removes), under each crash mode (unsynced data dropped, a random prefix of
//! it kept, or random sectors of it kept). Every crash image must open, hold
//! every acknowledged flush, equal a prefix of the writes in order, keep every
//! acknowledged snapshot intact, leak nothing a cleaning run's sweep does
//! not take back, and pass `check`.

mod common;

/// A flatten that never waits: these tests are about what it copies, on
/// clocks that may not move.
const UNTHROTTLED: hlfs_volume::FlattenOptions = hlfs_volume::FlattenOptions {
    copy_rate: None,
    busy_rate: None,
};

use common::{pattern, zero_steps, Image, World};
use hlfs_store::layers::CrashMode;
use std::time::Duration;

use hlfs_volume::{
    check, space, Backend, CreateOptions, GcOptions, OpenOptions, Others, Prewrite, View, Volume,
    VolumeError,
};

#[derive(Clone, Debug)]
enum Step {
    Write(u64, usize, u8),
    Fua(u64, usize, u8),
    Zero(u64, u64),
    Flush,
    Snapshot(&'static str),
    Grow(u64),
    Rollback(&'static str),
    Reopen,
    /// A cleaning run down to this space target, deleting at once,
    /// copying what it gathers every three blocks.
    Gc(f64),
    /// Retention on, with a window of an hour: every durable state after
    /// it is a moment that must open as it was.
    Retain,
    /// A rollback to the durable moment of this index (since `Retain`).
    RollbackToMoment(usize),
    /// The durable moment of this index kept as a snapshot, as a clone of
    /// it does first (`offer_for_clone`).
    KeepMoment(usize),
    /// `import_diff` of the stream `import_stream` makes, from snapshot
    /// `from` (the head must not have changed since) to snapshot `to`;
    /// with `cut`, of the stream cut short, which must fail and change
    /// nothing.
    ImportDiff {
        from: &'static str,
        to: &'static str,
        cut: bool,
    },
    /// Flatten a clone (ends with a checkpoint).
    Flatten,
}

/// What `import_stream` writes: data (offset, length, pattern seed) and
/// zeroed ranges, none aligned to blocks.
const IMPORT_DATA: [(u64, usize, u8); 2] = [(20_481, 20_000, 21), (300_003, 70_000, 22)];
const IMPORT_ZERO: (u64, u64) = (100_001, 50_000);

/// An RBD diff stream of `IMPORT_DATA` and `IMPORT_ZERO` from `from` to
/// `to`.
fn import_stream(from: &str, to: &str) -> Vec<u8> {
    use hlfs_format::rbd_diff::{DiffRecord, BANNER};
    let mut s = BANNER.to_vec();
    s.extend(DiffRecord::FromSnapshot(from.to_string()).encode());
    s.extend(DiffRecord::ToSnapshot(to.to_string()).encode());
    s.extend(DiffRecord::Size(SIZE).encode());
    for (offset, len, seed) in IMPORT_DATA {
        s.extend(
            DiffRecord::DataHeader {
                offset,
                len: len as u64,
            }
            .encode(),
        );
        s.extend(pattern(len, seed));
    }
    let (offset, len) = IMPORT_ZERO;
    s.extend(DiffRecord::Zero { offset, len }.encode());
    s.extend(DiffRecord::End.encode());
    s
}

const BS: u32 = 4096;
const SIZE: u64 = 5 << 20;

fn scenarios() -> Vec<(&'static str, Vec<Step>)> {
    use Step::*;
    vec![
        (
            "writes, flushes and a sealed segment",
            vec![
                Write(0, 4096, 1),
                Write(10_000, 3000, 2),
                Flush,
                Write(4096 * 3, 8192, 3),
                Fua(100_000, 70_000, 4),
                // 128 KiB of writes fill the 64 KiB segments: seals.
                Write(1 << 20, 130_000, 5),
                Write(5, 10, 6),
                Flush,
                Write(2 << 20, 4096, 7),
            ],
        ),
        (
            "snapshot, zeroes, grow, rollback and reopen",
            vec![
                Write(0, 50_000, 1),
                Snapshot("a"),
                Zero(1000, 30_000),
                Write(40_000, 9_000, 2),
                Grow(SIZE + 12_345),
                Write(SIZE, 12_345, 3),
                Flush,
                Rollback("a"),
                Write(8192, 4096, 4),
                Reopen,
                Write(3 << 20, 100_000, 5),
                Zero(0, SIZE),
            ],
        ),
        (
            "cleaning around a snapshot",
            vec![
                Write(0, 200_000, 1),
                Flush,
                Snapshot("s"),
                Write(0, 300_000, 2),
                // Half of each 64 KiB segment of write 2 dies.
                Write(0, 32_768, 3),
                Write(65_536, 32_768, 4),
                Write(131_072, 32_768, 5),
                Write(196_608, 32_768, 6),
                Flush,
                Gc(1.0),
                Write(4096, 8192, 7),
                Flush,
                Write(0, 300_000, 8),
                Gc(1.5),
                Write(50_000, 10_000, 9),
            ],
        ),
        (
            "cleaning what snapshots hold",
            vec![
                Write(0, 262_144, 1),
                // Half of each 64 KiB segment of write 1 dies before the
                // snapshots...
                Write(0, 32_768, 2),
                Write(65_536, 32_768, 3),
                Write(131_072, 32_768, 4),
                Write(196_608, 32_768, 5),
                Flush,
                Snapshot("s"),
                Snapshot("t"),
                // ...and the other half after them: only they hold it.
                Write(32_768, 32_768, 6),
                Write(98_304, 32_768, 7),
                Write(163_840, 32_768, 8),
                Write(229_376, 32_768, 9),
                Flush,
                Gc(1.0),
                Write(4096, 8192, 10),
                Gc(1.0),
            ],
        ),
        (
            "a retention window, a rollback and cleaning in it",
            vec![
                Write(0, 262_144, 1),
                // Half of each 64 KiB segment of write 1 dies before the
                // window starts: cleaning may take it.
                Write(0, 32_768, 2),
                Write(65_536, 32_768, 3),
                Write(131_072, 32_768, 4),
                Write(196_608, 32_768, 5),
                Flush,
                Retain,
                Write(32_768, 32_768, 6),
                Flush,
                Snapshot("a"),
                Write(4096, 8192, 7),
                Fua(300_000, 70_000, 8),
                Rollback("a"),
                Write(8192, 4096, 9),
                Flush,
                KeepMoment(2),
                RollbackToMoment(3),
                Gc(1.0),
                Write(0, 100_000, 10),
                Flush,
                Gc(1.0),
                Write(12_288, 4096, 11),
            ],
        ),
        (
            "an import-diff, and one cut off",
            vec![
                Write(0, 50_000, 1),
                Flush,
                Snapshot("a"),
                ImportDiff {
                    from: "a",
                    to: "b",
                    cut: false,
                },
                ImportDiff {
                    from: "b",
                    to: "c",
                    cut: true,
                },
                Write(0, 4096, 4),
            ],
        ),
    ]
}

/// Model of what the run acknowledged.
struct Expect {
    model: Image,
    history: Vec<Image>,
    snapshots: Vec<(String, Image)>,
    /// With retention on: the durable states, each at its moment.
    moments: Option<Vec<(u64, Image)>>,
}

impl Expect {
    fn changed(&mut self) {
        self.history.push(self.model.clone());
    }
    fn durable(&mut self) {
        self.history = vec![self.model.clone()];
    }

    /// With retention on, the state now is a moment to check; the next
    /// step's records fall in a later millisecond.
    async fn moment(&mut self) {
        let Some(moments) = &mut self.moments else {
            return;
        };
        let now = unix_ms();
        moments.push((now, self.model.clone()));
        while unix_ms() <= now {
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn options(prewrite: Prewrite) -> OpenOptions {
    // The smallest map budget, so map pages are written back as the run goes.
    OpenOptions {
        map_budget: 1,
        prewrite,
        ..OpenOptions::default()
    }
}

/// Runs `steps` until the store dies; returns what must survive.
async fn run(world: &World, steps: &[Step], ctx: &Ctx) -> Expect {
    let mut e = Expect {
        model: ctx.start(),
        history: vec![ctx.start()],
        snapshots: Vec::new(),
        moments: None,
    };
    let Ok(mut vol) = Volume::open(ctx.backend(world), &options(ctx.prewrite)).await else {
        return e;
    };
    for step in steps {
        // What the state is if this step lands, whether or not it is acknowledged.
        let mut after = e.model.clone();
        let mut kept = None;
        let result: Result<(), VolumeError> = match step {
            Step::Write(off, len, seed) | Step::Fua(off, len, seed) => {
                let data = pattern(*len, *seed);
                after.write(*off, &data);
                e.history.push(after.clone());
                if matches!(step, Step::Fua(..)) {
                    vol.write_fua(*off, &data).await
                } else {
                    vol.write(*off, &data).await
                }
            }
            Step::Zero(off, len) => {
                for (o, l) in zero_steps(*off, *len, BS as u64, after.size) {
                    after.zero(o, l);
                    e.history.push(after.clone());
                }
                vol.write_zeroes(*off, *len).await
            }
            Step::Flush => vol.flush().await,
            Step::Snapshot(name) => vol.snapshot_create(name).await.map(|_| ()),
            Step::Grow(size) => {
                after.size = *size;
                e.history.push(after.clone());
                vol.resize(*size).await
            }
            Step::Rollback(name) => {
                let target = e
                    .snapshots
                    .iter()
                    .find(|(n, _)| n == name)
                    .expect("scripted")
                    .1
                    .clone();
                after = target;
                e.history.push(after.clone());
                vol.rollback(name).await.map(|_| ())
            }
            Step::Gc(target) => {
                let opts = GcOptions {
                    target: *target,
                    grace: Duration::ZERO,
                    // Several commits per pass, each a sync point: those
                    // within a pass that moved the head alone do not
                    // checkpoint.
                    commit_bytes: 3 * BS as usize,
                    ..GcOptions::default()
                };
                vol.gc(&opts, &|_| {}).await.map(drop)
            }
            Step::Retain => vol.set_retention(3_600_000).await,
            Step::Flatten => vol.flatten(UNTHROTTLED, &|_| {}).await.map(drop),
            Step::RollbackToMoment(i) => {
                let (at, image) = e.moments.as_ref().expect("scripted")[*i].clone();
                after = image;
                e.history.push(after.clone());
                vol.rollback_to_moment(at).await.map(drop)
            }
            Step::KeepMoment(i) => {
                let (at, image) = e.moments.as_ref().expect("scripted")[*i].clone();
                let source = hlfs_volume::CloneSource::Moment(at);
                vol.offer_for_clone(&source).await.map(|name| {
                    kept = Some((name, image));
                })
            }
            Step::ImportDiff { from, to, cut } => {
                let mut stream = import_stream(from, to);
                if *cut {
                    stream.truncate(stream.len() - 100);
                } else {
                    for (offset, len, seed) in IMPORT_DATA {
                        after.write(offset, &pattern(len, seed));
                    }
                    after.zero(IMPORT_ZERO.0, IMPORT_ZERO.1);
                    // All or nothing: no state in between.
                    e.history.push(after.clone());
                }
                match hlfs_volume::import_diff(&vol, &stream[..], &|_| {}).await {
                    Ok(_) if *cut => panic!("a cut stream was applied"),
                    Err(VolumeError::InvalidArgument(_)) if *cut => Ok(()),
                    result => result.map(drop),
                }
            }
            Step::Reopen => match vol.close().await {
                Ok(()) => match Volume::open(ctx.backend(world), &options(ctx.prewrite)).await {
                    Ok(v) => {
                        vol = v;
                        Ok(())
                    }
                    Err(err) => Err(err),
                },
                Err(err) => Err(err),
            },
        };
        if result.is_err() {
            // Not acknowledged: it may or may not have landed (its state is
            // already in the history), and nothing after it ran.
            return e;
        }
        e.model = after;
        match step {
            Step::KeepMoment(_) => {
                e.snapshots.extend(kept);
                e.durable();
                e.moment().await;
            }
            Step::Retain => {
                e.moments = Some(Vec::new());
                e.durable();
                e.moment().await;
            }
            Step::Fua(..)
            | Step::Flatten
            | Step::Flush
            | Step::Reopen
            | Step::Rollback(_)
            | Step::RollbackToMoment(_) => {
                e.durable();
                e.moment().await;
            }
            Step::Snapshot(name)
            | Step::ImportDiff {
                to: name,
                cut: false,
                ..
            } => {
                e.snapshots.push((name.to_string(), e.model.clone()));
                e.durable();
                e.moment().await;
            }
            Step::ImportDiff { cut: true, .. } => e.durable(),
            _ => e.changed(),
        }
    }
    e
}

async fn verify(after: World, e: &Expect, what: &str, ctx: &Ctx) {
    let vol = Volume::open(ctx.backend(&after), &options(ctx.prewrite))
        .await
        .unwrap_or_else(|err| panic!("{what}: crash image does not open: {err}"));
    let size = vol.size();
    let ranges = common::touched_ranges(e.history.iter(), size);
    let mut got = Vec::new();
    for &(off, len) in &ranges {
        got.push(vol.read(off, len as usize).await.expect("read"));
    }
    let matches = |img: &Image| {
        img.size == size
            && ranges
                .iter()
                .zip(&got)
                .all(|(&(off, len), data)| *data == img.read(off, len))
    };
    assert!(
        e.history.iter().any(matches),
        "{what}: recovered image (size {size}) is not a prefix of the writes after the last flush"
    );
    for (name, image) in &e.snapshots {
        let snap = Volume::open_read_only(
            ctx.backend(&after),
            &options(ctx.prewrite),
            View::Snapshot(name.clone()),
        )
        .await
        .unwrap_or_else(|err| panic!("{what}: snapshot {name} lost: {err}"));
        for (off, len) in common::touched_ranges(std::iter::once(image), image.size) {
            assert!(
                snap.read(off, len as usize).await.expect("read snapshot") == image.read(off, len),
                "{what}: snapshot {name} changed"
            );
        }
    }
    assert!(
        vol.snapshots().iter().all(|s| !s.name.starts_with('-')),
        "{what}: an import guard outlived its open"
    );
    for (t, image) in e.moments.iter().flatten() {
        let view =
            Volume::open_read_only(ctx.backend(&after), &options(ctx.prewrite), View::AsOf(*t))
                .await
                .unwrap_or_else(|err| panic!("{what}: moment {t} lost: {err}"));
        assert_eq!(view.moment(), Some(*t), "{what}: {t} is no moment");
        assert_eq!(view.size(), image.size, "{what}: size at moment {t}");
        for (off, len) in common::touched_ranges(std::iter::once(image), image.size) {
            assert!(
                view.read(off, len as usize).await.expect("read moment") == image.read(off, len),
                "{what}: moment {t} changed"
            );
        }
    }
    // Nothing leaks: whatever the crash left that nothing reaches (copies
    // of a cleaning pass not committed, segments of an abandoned head),
    // a run at a target that already holds sweeps.
    let sweep = GcOptions {
        target: 1e6,
        grace: Duration::ZERO,
        ..GcOptions::default()
    };
    vol.gc(&sweep, &|_| {}).await.expect("sweep after recovery");
    let leaked: Vec<u32> = space(ctx.backend(&after))
        .await
        .expect("space after the sweep")
        .segments
        .iter()
        .filter(|s| s.live_bytes == 0 && !s.recent)
        .map(|s| s.id)
        .collect();
    assert!(leaked.is_empty(), "{what}: segments {leaked:?} leaked");
    vol.close().await.expect("close after recovery");
    let report = check(ctx.backend(&after)).await.expect("check");
    assert!(report.is_ok(), "{what}: check found {:?}", report.problems);
}

/// Every scenario as the journal is written today, and with its window
/// written ahead after each sync: a power cut then leaves zeros past the
/// log, and overwritten window bytes not yet synced go back to zeros.
/// (The window's filler runs beside the steps, so the sync points of a
/// run may fall in another order from one run to the next: each run is a
/// legal one, and each is checked.)
#[tokio::test]
async fn crash_at_every_sync_point() {
    for prewrite in [Prewrite::Off, Prewrite::Always] {
        for (name, steps) in scenarios() {
            let ctx = Ctx {
                prewrite,
                parent: None,
            };
            crash_scenario(&format!("{name} (prewrite {prewrite:?})"), &steps, &ctx).await;
        }
    }
}

/// A clone of a parent's snapshot: partial writes over the parent's
/// blocks, zeroes over them, a snapshot, then a flatten. The parent (in a
/// world of its own) does not crash.
#[tokio::test]
async fn crash_of_a_clone_at_every_sync_point() {
    use Step::*;
    let ctx = Ctx {
        prewrite: Prewrite::Off,
        parent: Some(parent().await),
    };
    let steps = vec![
        Write(10_000, 3000, 1),
        Zero(200_000, 20_000),
        Flush,
        Snapshot("c1"),
        Write(1 << 20, 70_000, 2),
        Reopen,
        Fua(3 << 20, 5000, 3),
    ];
    crash_scenario("a clone written and zeroed", &steps, &ctx).await;
    let steps = vec![
        Write(10_000, 3000, 1),
        Zero(200_000, 20_000),
        Flatten,
        Write(1 << 20, 70_000, 2),
        Flush,
    ];
    crash_scenario("a clone flattened", &steps, &ctx).await;
}

/// A parent volume with data over most of its snapshot `golden`, and how
/// clones find it.
async fn parent() -> (Others, Image) {
    let world = World::new();
    let at = |w: &World| Backend {
        location: "memory://parent".into(),
        ..w.backend()
    };
    let create = CreateOptions {
        size: SIZE,
        block_size: BS,
        segment_size: 64 << 10,
    };
    Volume::create(&at(&world), &create).await.unwrap();
    let vol = Volume::open(at(&world), &OpenOptions::default())
        .await
        .unwrap();
    let mut image = Image::new(SIZE);
    for (off, len, seed) in [
        (0, 300_000, 41),
        (1 << 20, 1 << 20, 42),
        (3 << 20, 100_000, 43),
    ] {
        let data = pattern(len, seed);
        vol.write(off, &data).await.unwrap();
        image.write(off, &data);
    }
    vol.snapshot_create("golden").await.unwrap();
    vol.offer_for_clone(&hlfs_volume::CloneSource::Snapshot("golden".into()))
        .await
        .unwrap();
    vol.close().await.unwrap();
    let env = world.env.clone();
    let others = Others::from_fn(move |address| match address {
        "memory://parent" => Ok(at(&World::over(env.clone()))),
        _ => Err(VolumeError::NotFound(address.to_string())),
    });
    (others, image)
}

/// How a scenario's volume is made and opened.
struct Ctx {
    prewrite: Prewrite,
    /// For a clone: how it finds its parent, and the parent's snapshot.
    parent: Option<(Others, Image)>,
}

impl Ctx {
    fn backend(&self, world: &World) -> Backend {
        match &self.parent {
            Some((others, _)) => world.backend().with_others(others.clone()),
            None => world.backend(),
        }
    }

    fn start(&self) -> Image {
        match &self.parent {
            Some((_, image)) => image.clone(),
            None => Image::new(SIZE),
        }
    }

    async fn make(&self, world: &World, create: &CreateOptions) {
        match &self.parent {
            Some(_) => {
                let backend = self.backend(world);
                let parent = backend.open_other("memory://parent").unwrap();
                hlfs_volume::clone_volume(parent, "golden", &backend, &options(self.prewrite))
                    .await
                    .unwrap();
            }
            None => Volume::create(&world.backend(), create).await.unwrap(),
        }
    }
}

async fn crash_scenario(name: &str, steps: &[Step], ctx: &Ctx) {
    // Count the durable operations a full run makes.
    let world = World::new();
    let create = CreateOptions {
        size: SIZE,
        block_size: BS,
        segment_size: 64 << 10,
    };
    ctx.make(&world, &create).await;
    let base = world.faults.durable_ops();
    let e = run(&world, steps, ctx).await;
    assert_eq!(
        e.snapshots.len(),
        steps
            .iter()
            .filter(|s| matches!(
                s,
                Step::Snapshot(_) | Step::KeepMoment(_) | Step::ImportDiff { cut: false, .. }
            ))
            .count(),
        "{name}: a full run did not take every snapshot"
    );
    let total = world.faults.durable_ops() - base;
    assert!(total > 10, "{name}: only {total} sync points");
    for n in 0..=total {
        for (k, mode) in [
            CrashMode::DropUnsynced,
            CrashMode::KeepRandomPrefix { seed: n },
            CrashMode::TornSectors { seed: n * 7 + 1 },
        ]
        .into_iter()
        .enumerate()
        {
            let world = World::new();
            ctx.make(&world, &create).await;
            world.faults.crash_after(base + n);
            let e = run(&world, steps, ctx).await;
            let image = world.power_cut(mode).await;
            verify(
                image,
                &e,
                &format!("{name}: crash after sync point {n} (mode {k})"),
                ctx,
            )
            .await;
        }
    }
}
