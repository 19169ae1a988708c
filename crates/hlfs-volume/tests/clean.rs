//! Segment cleaning through the public API: space comes back, every read of
//! the head and of every snapshot stays what it was, and readers of older
//! manifests are given their grace period.

mod common;

use std::time::Duration;

use common::{pattern, Image, World};
use hlfs_format::{
    decode_header, manifest_name, parse_segment_name, segment_name, Manifest, RecordKind,
};
use hlfs_store::layers::{CrashMode, Fault, FaultOp};
use hlfs_store::time::{Jitter, ManualClock};
use hlfs_volume::{
    check, space, AutoClean, Backend, CreateOptions, GcOptions, GcReport, GcStop, OpenOptions,
    View, Volume,
};

const BS: u64 = 4096;
const SIZE: u64 = 2 << 20;

fn now_options(target: f64) -> GcOptions {
    GcOptions {
        target,
        grace: Duration::ZERO,
        ..GcOptions::default()
    }
}

/// For a volume on a `ManualClock`: its time only moves when the test
/// moves it, so waits on the store must not run out meanwhile.
fn on_manual_clock() -> OpenOptions {
    OpenOptions {
        store_wait: Duration::from_secs(1 << 20),
        ..OpenOptions::default()
    }
}

/// A new volume on its own in-memory world, whose clock only moves when
/// the test moves it.
async fn created_on_a_manual_clock(seed: u64) -> (ManualClock, Backend) {
    let clock = ManualClock::new(1_700_000_000_000);
    let backend = World::new()
        .backend()
        .with_time(clock.clock(), Jitter::seeded(seed));
    create(&backend).await;
    (clock, backend)
}

/// A volume on a manual clock (its jitter seeded by `seed`), opened, with
/// `churn(rounds, churn_seed)` written: the clock, the backend, the
/// volume, and what it holds.
async fn churned_on_a_manual_clock(
    seed: u64,
    rounds: u8,
    churn_seed: u64,
) -> (ManualClock, Backend, Volume, Image) {
    let (clock, backend) = created_on_a_manual_clock(seed).await;
    let vol = Volume::open(backend.clone(), &on_manual_clock())
        .await
        .unwrap();
    let mut model = Image::new(SIZE);
    churn(&vol, &mut model, rounds, churn_seed).await;
    (clock, backend, vol, model)
}

type Cleaner = tokio::task::JoinHandle<hlfs_volume::Result<GcReport>>;

/// A cleaning run of `vol` in a task of its own.
fn spawn_gc(vol: &Volume, opts: GcOptions) -> Cleaner {
    let vol = vol.clone();
    tokio::spawn(async move { vol.gc(&opts, &|_| {}).await })
}

/// Moves the manual clock 50 ms at a time, letting `cleaner` run between
/// steps, until it is done; with `client`, a block of it is read before
/// each step, as a busy client would. Returns the clock time it took.
async fn advance_until_done(
    clock: &ManualClock,
    cleaner: &Cleaner,
    client: Option<&Volume>,
) -> Duration {
    let step = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    while !cleaner.is_finished() {
        if let Some(vol) = client {
            vol.read(0, BS as usize).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        clock.advance(step);
        waited += step;
        assert!(waited < Duration::from_secs(3600), "cleaning does not end");
    }
    waited
}

async fn create(backend: &Backend) {
    let create = CreateOptions {
        size: SIZE,
        block_size: BS as u32,
        segment_size: 128 << 10,
    };
    Volume::create(backend, &create).await.unwrap();
}

/// The volume opened for writing, with default options.
async fn open(backend: &Backend) -> Volume {
    Volume::open(backend.clone(), &OpenOptions::default())
        .await
        .unwrap()
}

/// `hlfs check` finds nothing wrong.
async fn assert_checks(backend: &Backend) {
    let report = check(backend.clone()).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

/// A new volume on its own in-memory world, opened, and its model.
async fn created_and_opened() -> (World, Backend, Volume, Image) {
    let world = World::new();
    let backend = world.backend();
    create(&backend).await;
    let vol = open(&backend).await;
    (world, backend, vol, Image::new(SIZE))
}

/// Overwrites scattered runs of blocks `rounds` times, in the model too.
/// Options for an automatic cleaner on the manual clock that looks every
/// `every`, starts above 1.5, cleans to 1.2 at any rate and deletes after
/// `grace`.
fn cleaning_by_itself(every: Duration, grace: Duration) -> OpenOptions {
    OpenOptions {
        auto_clean: Some(AutoClean {
            start_above: 1.5,
            target: 1.2,
            every,
            copy_rate: 1 << 40,
            busy_rate: 1 << 40,
            grace,
        }),
        ..on_manual_clock()
    }
}

/// `n` ticks of the automatic cleaner on `clock` (each given time to run),
/// then the volume's figures.
async fn ticks_of(
    clock: &hlfs_store::time::ManualClock,
    vol: &Volume,
    every: Duration,
    n: u32,
) -> hlfs_volume::Figures {
    for _ in 0..n {
        clock.advance(every);
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    vol.figures()
}

async fn churn(vol: &Volume, model: &mut Image, rounds: u8, seed: u64) {
    let mut x = seed;
    for round in 0..rounds {
        for _ in 0..64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let blocks = 1 + (x >> 60);
            let at = ((x >> 20) % (SIZE / BS - blocks)) * BS;
            let data = pattern((blocks * BS) as usize, round ^ (x >> 8) as u8);
            vol.write(at, &data).await.unwrap();
            model.write(at, &data);
        }
        vol.flush().await.unwrap();
    }
}

/// The kinds of record in each stored segment.
async fn record_kinds(backend: &Backend) -> Vec<(String, Vec<RecordKind>)> {
    let store = backend.requests();
    let mut out = Vec::new();
    for blob in store.list("segments/").await.unwrap() {
        let bytes = store.get(&blob.name).await.unwrap();
        let mut kinds = Vec::new();
        let mut off = 0;
        while off < bytes.len() {
            let h = decode_header(&bytes[off..]).unwrap();
            if !kinds.contains(&h.kind) {
                kinds.push(h.kind);
            }
            off += h.record_len() as usize;
        }
        out.push((blob.name, kinds));
    }
    out
}

async fn assert_reads(vol: &Volume, model: &Image, what: &str) {
    let got = vol.read(0, SIZE as usize).await.unwrap();
    assert!(got == model.read(0, SIZE), "{what} differs from the model");
}

async fn assert_snapshot(backend: &Backend, name: &str, model: &Image) {
    let snap = Volume::open_read_only(
        backend.clone(),
        &OpenOptions::default(),
        View::Snapshot(name.into()),
    )
    .await
    .unwrap();
    assert_reads(&snap, model, &format!("snapshot {name}")).await;
}

async fn space_back_keeping_snapshots(backend: Backend) {
    create(&backend).await;
    let vol = open(&backend).await;
    let mut model = Image::new(SIZE);
    churn(&vol, &mut model, 3, 1).await;
    vol.snapshot_create("a").await.unwrap();
    let at_a = model.clone();
    churn(&vol, &mut model, 4, 2).await;

    // With a snapshot: what no root holds comes back; what the snapshot
    // holds stays live.
    let report = vol.gc(&now_options(1.0), &|_| {}).await.unwrap();
    assert!(
        report.passes > 0 && report.deleted_segments > 0,
        "{report:?}"
    );
    assert!(report.stored_after < report.stored_before, "{report:?}");
    assert_eq!(report.stopped, GcStop::NothingCleanable);
    assert_reads(&vol, &model, "the head after cleaning").await;
    assert_snapshot(&backend, "a", &at_a).await;

    // Without it, everything can be cleaned down to the target.
    vol.snapshot_delete("a").await.unwrap();
    let report = vol.gc(&now_options(1.3), &|_| {}).await.unwrap();
    assert_eq!(report.stopped, GcStop::TargetReached, "{report:?}");
    assert!(report.deleted_segments > 0);
    assert_reads(&vol, &model, "the head after the second run").await;

    // What the run says it left is what a recount finds, and a reopen
    // reads the same.
    vol.close().await.unwrap();
    let stats = space(backend.clone()).await.unwrap();
    assert!(
        stats.stored_bytes as f64 <= 1.3 * stats.live_bytes as f64,
        "stored {} live {}",
        stats.stored_bytes,
        stats.live_bytes
    );
    assert_checks(&backend).await;
    let vol = open(&backend).await;
    assert_reads(&vol, &model, "the head after a reopen").await;
    vol.close().await.unwrap();
}

/// Segments a snapshot holds are cleaned too: what only the snapshot
/// holds is copied (records recovery never replays), what it shares with
/// the head and with other snapshots is copied once and stays shared, and
/// every root reads the same before and after, and after a reopen.
#[tokio::test]
async fn cleaning_moves_what_snapshots_hold() {
    let (_world, backend, vol, mut model) = created_and_opened().await;
    let whole = pattern(SIZE as usize, 1);
    vol.write(0, &whole).await.unwrap();
    model.write(0, &whole);
    // Every other 16 KiB overwritten: half of each first segment is dead.
    let quarter = 4 * BS;
    for (i, at) in (0..SIZE).step_by(2 * quarter as usize).enumerate() {
        let data = pattern(quarter as usize, 2 + i as u8);
        vol.write(at, &data).await.unwrap();
        model.write(at, &data);
    }
    vol.snapshot_create("a").await.unwrap();
    vol.snapshot_create("b").await.unwrap();
    let at_a = model.clone();
    // The other halves too: what is left of the first write, only the
    // snapshots hold.
    for (i, at) in (quarter..SIZE).step_by(2 * quarter as usize).enumerate() {
        let data = pattern(quarter as usize, 100 + i as u8);
        vol.write(at, &data).await.unwrap();
        model.write(at, &data);
    }
    // And one block more, which stays in the open journal.
    let data = pattern(BS as usize, 99);
    vol.write(0, &data).await.unwrap();
    model.write(0, &data);
    vol.flush().await.unwrap();
    let before = space(backend.clone()).await.unwrap();
    // A view of a, open in this process (as a server exporting vol@a has
    // one), does not keep a's segments: it follows a to its copies.
    let view_a = Volume::open_read_only(
        backend.clone(),
        &OpenOptions::default(),
        View::Snapshot("a".into()),
    )
    .await
    .unwrap();
    assert_reads(&view_a, &at_a, "the view of a").await;

    // As the automatic cleaner runs: no checkpoint first, so the last
    // writes are still in the open journal when the copies come.
    let opts = GcOptions {
        start_above: Some(1.0),
        ..now_options(1.0)
    };
    let report = vol.gc(&opts, &|_| {}).await.unwrap();
    assert!(report.deleted_segments > 0, "{report:?}");
    let after = space(backend.clone()).await.unwrap();
    // Stored was about 2 × the volume (the first write whole, then both
    // halves again) and live 1.5 × (the head, and the half only the
    // snapshots hold): what is left is within a tenth of live.
    assert!(
        before.stored_bytes as f64 > 1.25 * before.live_bytes as f64,
        "{before:?}"
    );
    assert!(
        (after.stored_bytes as f64) < 1.1 * after.live_bytes as f64,
        "stored {} live {} ({report:?})",
        after.stored_bytes,
        after.live_bytes
    );
    // a and b were equal and still share every page: each alone holds
    // its checkpoint record, nothing more.
    for s in &after.snapshots {
        assert!(s.only_bytes < 1024, "{s:?}");
    }
    assert_reads(&vol, &model, "the head after cleaning").await;
    assert_reads(&view_a, &at_a, "the view of a after cleaning").await;
    assert!(view_a.figures().view_reopens >= 1);
    assert_snapshot(&backend, "a", &at_a).await;
    assert_snapshot(&backend, "b", &at_a).await;
    let changed = vol.changes_since("a").await.unwrap();
    let changed_bytes: u64 = changed.extents.iter().map(|e| e.len).sum();
    assert_eq!(changed_bytes, SIZE / 2 + BS, "{changed:?}");
    assert!(vol.changes_since("b").await.unwrap().extents == changed.extents);
    // Copies are format v2: the manifest says so (or a later version).
    assert!(vol.info().await.unwrap().format_version >= 2);
    vol.close().await.unwrap();
    // Cleaned data is cold: kept apart from what clients wrote.
    for (segment, kinds) in record_kinds(&backend).await {
        assert!(
            !(kinds.contains(&RecordKind::Copy) && kinds.contains(&RecordKind::Data)),
            "{segment} mixes copies with client writes: {kinds:?}"
        );
    }

    assert_checks(&backend).await;
    let vol = open(&backend).await;
    assert_reads(&vol, &model, "the head after a reopen").await;
    assert_snapshot(&backend, "a", &at_a).await;
    vol.rollback("a").await.unwrap();
    assert_reads(&vol, &at_a, "the head rolled back to a").await;
    vol.close().await.unwrap();
}

/// A commit that fails after moving the head's blocks (its manifest
/// cannot be written) puts them back: the head and the snapshot that
/// shared them still share them, and every read and a later run are right.
#[tokio::test]
async fn a_failed_commit_puts_the_heads_blocks_back() {
    let world = World::new();
    let backend = world.backend();
    create(&backend).await;
    let opts = OpenOptions {
        store_wait: Duration::from_millis(300),
        ..OpenOptions::default()
    };
    let vol = Volume::open(backend.clone(), &opts).await.unwrap();
    let mut model = Image::new(SIZE);
    churn(&vol, &mut model, 4, 15).await;
    vol.snapshot_create("s").await.unwrap();
    world.faults.inject(Fault {
        op: FaultOp::Put,
        name_prefix: "manifest/".into(),
        remaining: None,
    });
    let gc = GcOptions {
        start_above: Some(1.0),
        ..now_options(1.0)
    };
    let failed = vol.gc(&gc, &|_| {}).await;
    assert!(failed.is_err(), "{failed:?}");
    world.faults.clear();
    let changed = vol.changes_since("s").await.unwrap();
    assert!(changed.extents.is_empty(), "{changed:?}");
    assert_reads(&vol, &model, "the head after the failed commit").await;
    assert_snapshot(&backend, "s", &model).await;
    let report = vol.gc(&now_options(1.0), &|_| {}).await.unwrap();
    assert!(report.copied_bytes > 0, "{report:?}");
    assert!(vol.changes_since("s").await.unwrap().extents.is_empty());
    vol.close().await.unwrap();
    assert_checks(&backend).await;
    let vol = open(&backend).await;
    assert_reads(&vol, &model, "the head after a reopen").await;
    vol.close().await.unwrap();
}

/// A volume an older binary wrote in format v1 (a v1 manifest, no log
/// counters) opens, reads and is written, snapshotted and rolled back as
/// before, and stays v1 while it needs nothing of v2. Cleaning, whose
/// copies are v2 records, makes it v2, and its log is counted from then.
/// It writes no Mark until its retention window is turned on, which makes
/// it v3 first.
#[tokio::test]
async fn a_v1_volume_stays_v1_until_cleaning_copies() {
    let world = World::new();
    let backend = world.backend();
    create(&backend).await;
    let store = backend.requests();
    let created = store.get(&manifest_name(1)).await.unwrap();
    let created = Manifest::decode(&created).unwrap();
    let v1 = Manifest {
        version: 1,
        counters: None,
        seq: 2,
        ..created
    };
    let bytes = v1.encode();
    assert_eq!(bytes[4..6], 1u16.to_le_bytes());
    store
        .put_if_absent(&manifest_name(2), bytes.into())
        .await
        .unwrap();

    let vol = open(&backend).await;
    let mut model = Image::new(SIZE);
    churn(&vol, &mut model, 3, 12).await;
    vol.snapshot_create("s").await.unwrap();
    let at_s = model.clone();
    churn(&vol, &mut model, 3, 13).await;
    vol.rollback("s").await.unwrap();
    let mut model = at_s.clone();
    churn(&vol, &mut model, 2, 14).await;
    vol.checkpoint().await.unwrap();
    assert_eq!(vol.info().await.unwrap().format_version, 1);
    assert_eq!(space(backend.clone()).await.unwrap().counters, None);

    let report = vol.gc(&now_options(1.0), &|_| {}).await.unwrap();
    assert!(report.copied_bytes > 0, "{report:?}");
    assert_eq!(vol.info().await.unwrap().format_version, 2);
    vol.close().await.unwrap();
    let counters = space(backend.clone()).await.unwrap().counters.unwrap();
    // Counted from the upgrade, in the run: its copies, no client write.
    assert_eq!(counters.written_bytes, 0, "{counters:?}");
    assert!(
        counters.appended_bytes >= report.copied_bytes,
        "{counters:?} {report:?}"
    );
    assert!(
        counters.since_ms >= created.volume_created_ms,
        "{counters:?}"
    );
    assert_checks(&backend).await;
    let vol = open(&backend).await;
    assert_reads(&vol, &model, "the head").await;
    assert_snapshot(&backend, "s", &at_s).await;

    // A v2 volume writes no Mark, and becomes v3 when its retention
    // window is turned on, before its first Mark.
    let has_marks = |kinds: Vec<(String, Vec<RecordKind>)>| {
        kinds.iter().any(|(_, k)| k.contains(&RecordKind::Mark))
    };
    churn(&vol, &mut model, 1, 15).await;
    vol.checkpoint().await.unwrap();
    assert!(!has_marks(record_kinds(&backend).await));
    vol.set_retention(3_600_000).await.unwrap();
    assert_eq!(vol.info().await.unwrap().format_version, 3);
    churn(&vol, &mut model, 1, 16).await;
    vol.close().await.unwrap();
    assert!(has_marks(record_kinds(&backend).await));
    assert_checks(&backend).await;
    let vol = open(&backend).await;
    assert_reads(&vol, &model, "the head of the v3 volume").await;
    vol.close().await.unwrap();
}

#[tokio::test]
async fn cleaning_gives_space_back_and_keeps_every_snapshot() {
    space_back_keeping_snapshots(World::new().backend()).await;
}

#[tokio::test]
async fn cleaning_a_remote_volume_goes_through_its_read_cache() {
    let cache_dir = tempfile::tempdir().unwrap();
    let world = World::new();
    let backend = Backend {
        cache: hlfs_volume::ReadCache::shared(cache_dir.path(), 64 << 20).unwrap(),
        ..world.remote()
    };
    space_back_keeping_snapshots(backend).await;
}

#[tokio::test]
async fn a_bad_target_is_refused() {
    let world = World::new();
    create(&world.backend()).await;
    let vol = Volume::open(world.backend(), &OpenOptions::default())
        .await
        .unwrap();
    for target in [0.5, f64::NAN, f64::INFINITY] {
        let err = vol.gc(&now_options(target), &|_| {}).await.unwrap_err();
        assert!(err.to_string().contains("space target"), "{err}");
    }
    vol.close().await.unwrap();
}

#[tokio::test]
async fn a_reader_of_an_older_manifest_reads_on_through_the_grace_period() {
    let (clock, backend, vol, model) = churned_on_a_manual_clock(1, 4, 3).await;
    vol.snapshot_create("base").await.unwrap();
    vol.snapshot_delete("base").await.unwrap();
    // Opened before cleaning: it reads the segments the cleaner empties.
    let reader = Volume::open_read_only(backend.clone(), &OpenOptions::default(), View::Head)
        .await
        .unwrap();
    let grace = Duration::from_secs(60);
    let opts = GcOptions {
        target: 1.0,
        grace,
        ..GcOptions::default()
    };
    let cleaner = spawn_gc(&vol, opts);
    let mut waited = Duration::ZERO;
    while !cleaner.is_finished() {
        assert_reads(&reader, &model, "the older reader").await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        clock.advance(Duration::from_secs(1));
        waited += Duration::from_secs(1);
        assert!(waited < grace * 10, "cleaning does not end");
    }
    let report = cleaner.await.unwrap().unwrap();
    assert!(report.deleted_segments > 0, "{report:?}");
    assert!(waited >= grace, "deleted after {waited:?}");
    assert_reads(&vol, &model, "the head").await;
    vol.close().await.unwrap();
}

/// What a reader in another process meets: its view points into
/// segments the writer cleaned and deleted after their grace period. (In
/// this process, a view's checkpoint is a root the cleaner keeps; the
/// writes a head view replays are not, which is what this test reads.)
#[tokio::test]
async fn a_view_reopens_when_cleaning_deletes_what_it_reads() {
    let (clock, backend, vol, mut model) = churned_on_a_manual_clock(2, 4, 6).await;
    let head = Volume::open_read_only(backend.clone(), &OpenOptions::default(), View::Head)
        .await
        .unwrap();
    assert_reads(&head, &model, "the head view").await;
    churn(&vol, &mut model, 3, 7).await;
    let cleaner = spawn_gc(&vol, now_options(1.0));
    advance_until_done(&clock, &cleaner, None).await;
    let report = cleaner.await.unwrap().unwrap();
    assert!(report.deleted_segments > 0, "{report:?}");
    // The head view reopened at the newest manifest: it reads the head as
    // it is now.
    assert_reads(&head, &model, "the head view after the deletes").await;
    assert_eq!(head.figures().view_reopens, 1);
    let blocks = head.extents(0, SIZE, 1 << 20).await.unwrap();
    assert!(blocks.iter().any(|e| e.data), "{blocks:?}");
    vol.close().await.unwrap();
}

#[tokio::test]
async fn a_view_open_in_this_process_keeps_its_deleted_snapshot() {
    let (_world, backend, vol, mut model) = created_and_opened().await;
    churn(&vol, &mut model, 2, 4).await;
    vol.snapshot_create("old").await.unwrap();
    let at_old = model.clone();
    let view = Volume::open_read_only(
        backend.clone(),
        &OpenOptions::default(),
        View::Snapshot("old".into()),
    )
    .await
    .unwrap();
    churn(&vol, &mut model, 4, 5).await;
    vol.snapshot_delete("old").await.unwrap();
    let held = vol.gc(&now_options(1.0), &|_| {}).await.unwrap();
    assert_reads(&view, &at_old, "the view of the deleted snapshot").await;
    assert_reads(&vol, &model, "the head").await;
    // Once the view is closed, what only it held goes too.
    view.close().await.unwrap();
    drop(view);
    let freed = vol.gc(&now_options(1.0), &|_| {}).await.unwrap();
    assert!(freed.deleted_segments > 0, "{held:?} then {freed:?}");
    assert!(
        freed.stored_after < held.stored_after,
        "{held:?} then {freed:?}"
    );
    assert_reads(&vol, &model, "the head").await;
    vol.close().await.unwrap();
}

#[tokio::test]
async fn a_stopped_run_leaves_its_emptied_segments_to_the_next() {
    let (_never_moved, backend, vol, model) = churned_on_a_manual_clock(2, 4, 6).await;
    let before = space(backend.clone()).await.unwrap();
    let opts = GcOptions {
        target: 1.0,
        grace: Duration::from_secs(3600),
        ..GcOptions::default()
    };
    let cleaner = spawn_gc(&vol, opts);
    // In its grace period, the run waits on the clock, which stands still.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!cleaner.is_finished());
    vol.stop_cleaning();
    let report = cleaner.await.unwrap().unwrap();
    assert_eq!(report.stopped, GcStop::Interrupted);
    assert_eq!(report.deleted_segments, 0);
    assert!(
        vol.gc(&now_options(1.0), &|_| {}).await.is_err(),
        "runs are refused once stopped"
    );
    assert_reads(&vol, &model, "the head").await;
    vol.close().await.unwrap();
    // The next open's run finds the emptied segments and deletes them.
    let vol = Volume::open(backend.clone(), &on_manual_clock())
        .await
        .unwrap();
    let report = vol.gc(&now_options(1.0), &|_| {}).await.unwrap();
    assert!(report.deleted_segments > 0, "{report:?}");
    assert!(report.stored_after < before.stored_bytes, "{report:?}");
    assert_reads(&vol, &model, "the head after the next run").await;
    vol.close().await.unwrap();
}

#[tokio::test]
async fn the_automatic_cleaner_cleans_by_itself_above_its_start_mark() {
    let (clock, backend) = created_on_a_manual_clock(3).await;
    let every = Duration::from_secs(10);
    let opts = cleaning_by_itself(every, Duration::ZERO);
    let vol = Volume::open(backend.clone(), &opts).await.unwrap();
    let ticks = |n: u32| ticks_of(&clock, &vol, every, n);
    // Written once: below the start mark, the looks cost no run.
    let mut model = Image::new(SIZE);
    churn(&vol, &mut model, 1, 7).await;
    assert_eq!(ticks(3).await.gc_runs, 0);
    // Overwritten: above it, a run starts by itself and ends below it
    // (its victims go once the next tick's run has judged them).
    churn(&vol, &mut model, 5, 8).await;
    let below_the_mark = || async {
        let stats = space(backend.clone()).await.unwrap();
        (stats.stored_bytes as f64) <= 1.5 * stats.live_bytes as f64
    };
    let mut figures = ticks(1).await;
    for _ in 0..50 {
        if figures.gc_deleted_segments > 0 && below_the_mark().await {
            break;
        }
        figures = ticks(1).await;
    }
    assert!(
        figures.gc_runs >= 1 && figures.gc_deleted_segments > 0,
        "{figures:?}"
    );
    assert_reads(&vol, &model, "the head after automatic cleaning").await;
    let stats = space(backend.clone()).await.unwrap();
    assert!(
        (stats.stored_bytes as f64) <= 1.5 * stats.live_bytes as f64,
        "stored {} live {}",
        stats.stored_bytes,
        stats.live_bytes
    );
    // Overwrites a snapshot holds are live: runs cannot reach the mark,
    // and the task goes quiet...
    vol.snapshot_create("held").await.unwrap();
    churn(&vol, &mut model, 5, 9).await;
    let quiet = ticks(5).await;
    let runs = quiet.gc_runs;
    assert_eq!(
        ticks(5).await.gc_runs,
        runs,
        "no run again while nothing changed"
    );
    // ...until the snapshot goes: then it cleans without another write.
    vol.snapshot_delete("held").await.unwrap();
    let mut figures = ticks(1).await;
    for _ in 0..50 {
        if figures.gc_deleted_segments > quiet.gc_deleted_segments {
            break;
        }
        figures = ticks(1).await;
    }
    assert!(
        figures.gc_deleted_segments > quiet.gc_deleted_segments,
        "{quiet:?} then {figures:?}"
    );
    assert_reads(&vol, &model, "the head after the snapshot went").await;
    // Closing stops the task, whatever it is doing.
    vol.close().await.unwrap();
}

#[tokio::test]
async fn a_run_with_a_copy_rate_takes_the_time_its_rate_asks() {
    let (clock, _, vol, model) = churned_on_a_manual_clock(4, 5, 9).await;
    let rate = 256 << 10;
    let opts = GcOptions {
        target: 1.0,
        grace: Duration::ZERO,
        copy_rate: Some(rate),
        ..GcOptions::default()
    };
    let cleaner = spawn_gc(&vol, opts);
    let waited = advance_until_done(&clock, &cleaner, None).await;
    let report = cleaner.await.unwrap().unwrap();
    assert!(report.copied_bytes > 2 * rate, "{report:?}");
    // Paid a record at a time: the last record's pause may come after
    // the clock last moved, never more.
    let asked = Duration::from_secs_f64(report.copied_bytes as f64 / rate as f64);
    assert!(
        waited + Duration::from_secs(1) >= asked,
        "{waited:?} for {asked:?}: {report:?}"
    );
    assert_reads(&vol, &model, "the head").await;
    vol.close().await.unwrap();
}

/// A snapshot taken while a pass runs shares the head's blocks in the
/// victims: the pass stops moving them (and starts again, counting the
/// snapshot), so the head and the snapshot stay equal entry for entry and
/// a diff between them lists nothing.
#[tokio::test]
async fn a_snapshot_taken_during_a_pass_keeps_its_diff_empty() {
    let (clock, _, vol, model) = churned_on_a_manual_clock(4, 5, 9).await;
    let opts = GcOptions {
        target: 1.0,
        grace: Duration::ZERO,
        copy_rate: Some(64 << 10),
        ..GcOptions::default()
    };
    let cleaner = spawn_gc(&vol, opts);
    // Let the pass copy a little and wait on its rate.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(!cleaner.is_finished());
    vol.snapshot_create("mid").await.unwrap();
    advance_until_done(&clock, &cleaner, None).await;
    cleaner.await.unwrap().unwrap();
    let changed = vol.changes_since("mid").await.unwrap();
    assert!(changed.extents.is_empty(), "{:?}", changed.extents);
    assert_reads(&vol, &model, "the head").await;
    vol.close().await.unwrap();
}

/// With a busy rate, a run goes through the victims at that rate while
/// clients read, and at once when they are idle.
#[tokio::test]
async fn a_run_yields_to_busy_clients() {
    let rate = 1 << 20;
    for busy in [false, true] {
        let (clock, _, vol, model) = churned_on_a_manual_clock(4, 5, 9).await;
        let opts = GcOptions {
            target: 1.0,
            grace: Duration::ZERO,
            busy_rate: Some(rate),
            ..GcOptions::default()
        };
        // The churn's writes were clients too: let their window pass. A
        // busy client has just read when the run starts.
        clock.advance(Duration::from_secs(1));
        if busy {
            vol.read(0, BS as usize).await.unwrap();
        }
        let cleaner = spawn_gc(&vol, opts);
        let client = busy.then_some(&vol);
        let waited = advance_until_done(&clock, &cleaner, client).await;
        let report = cleaner.await.unwrap().unwrap();
        assert!(report.copied_bytes > rate, "{report:?}");
        // Busy, each record's bytes and copies at the rate: at least the
        // copies' time. Idle, no pause at all.
        let copies = Duration::from_secs_f64(report.copied_bytes as f64 / rate as f64);
        if busy {
            assert!(
                waited + Duration::from_secs(1) >= copies,
                "busy: {waited:?} for {copies:?}: {report:?}"
            );
        } else {
            assert!(
                waited <= Duration::from_secs(1),
                "idle: {waited:?}: {report:?}"
            );
        }
        assert_reads(&vol, &model, "the head").await;
        vol.close().await.unwrap();
    }
}

/// A snapshot taken while the map was one page deep, then the volume grown
/// past what one page maps: the recount once lost the shallower root, and
/// cleaning deleted the snapshot's segment.
#[tokio::test]
async fn a_snapshot_from_before_the_volume_grew_keeps_its_segments() {
    let world = World::new();
    let backend = world.backend();
    let create = CreateOptions {
        size: 300 * BS,
        block_size: BS as u32,
        segment_size: 128 << 10,
    };
    Volume::create(&backend, &create).await.unwrap();
    let vol = open(&backend).await;
    let mut model = Image::new(300 * BS);
    let data = pattern(8 * BS as usize, 1);
    vol.write(260 * BS, &data).await.unwrap();
    model.write(260 * BS, &data);
    vol.gc(&now_options(1.0), &|_| {}).await.unwrap();
    vol.snapshot_create("small").await.unwrap();
    let at_small = model.clone();
    let data = pattern(33 * BS as usize, 2);
    vol.write(228 * BS, &data).await.unwrap();
    vol.resize(513 * BS).await.unwrap();
    vol.gc(&now_options(1.0), &|_| {}).await.unwrap();
    let snap = Volume::open_read_only(
        backend.clone(),
        &OpenOptions::default(),
        View::Snapshot("small".into()),
    )
    .await
    .unwrap();
    let got = snap.read(0, 300 * BS as usize).await.unwrap();
    assert!(got == at_small.read(0, 300 * BS), "the snapshot differs");
    vol.close().await.unwrap();
}

/// A pass stopped halfway moves nothing it has not committed: the head
/// and a snapshot that shared blocks still share them, and a diff between
/// them stays empty.
#[tokio::test]
async fn a_stopped_pass_keeps_the_head_and_its_snapshots_equal() {
    let (clock, backend, vol, model) = churned_on_a_manual_clock(7, 5, 11).await;
    vol.snapshot_create("s").await.unwrap();
    let opts = GcOptions {
        target: 1.0,
        grace: Duration::ZERO,
        copy_rate: Some(1024),
        ..GcOptions::default()
    };
    let cleaner = spawn_gc(&vol, opts);
    // At 1 KiB/s on a clock that stands still, the pass waits on its pace
    // after its first copies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!cleaner.is_finished());
    vol.stop_cleaning();
    let report = cleaner.await.unwrap().unwrap();
    assert_eq!(report.stopped, GcStop::Interrupted, "{report:?}");
    let changed = vol.changes_since("s").await.unwrap();
    assert!(changed.extents.is_empty(), "{changed:?}");
    assert_reads(&vol, &model, "the head").await;
    assert_snapshot(&backend, "s", &model).await;
    drop(clock);
    vol.close().await.unwrap();
}

#[tokio::test]
async fn a_paced_pass_stops_at_once_when_the_volume_closes() {
    let (_never_moved, backend, vol, model) = churned_on_a_manual_clock(5, 5, 10).await;
    let opts = GcOptions {
        target: 1.0,
        grace: Duration::ZERO,
        copy_rate: Some(1024),
        ..GcOptions::default()
    };
    let cleaner = spawn_gc(&vol, opts);
    // At 1 KiB/s on a clock that stands still, the pass waits on its pace.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!cleaner.is_finished());
    tokio::time::timeout(Duration::from_secs(10), vol.close())
        .await
        .expect("close waits for no paced pass")
        .unwrap();
    let report = cleaner.await.unwrap().unwrap();
    // (Segments found empty before the pass may have gone already.)
    assert_eq!(report.stopped, GcStop::Interrupted, "{report:?}");
    assert_eq!(report.passes, 0, "{report:?}");
    let vol = Volume::open(backend.clone(), &on_manual_clock())
        .await
        .unwrap();
    assert_reads(&vol, &model, "the head after the interrupted pass").await;
    vol.close().await.unwrap();
}

/// A view of moment `t` reads exactly `image`.
async fn assert_moment(backend: &Backend, t: u64, image: &Image, what: &str) {
    let view = Volume::open_read_only(backend.clone(), &on_manual_clock(), View::AsOf(t))
        .await
        .unwrap_or_else(|e| panic!("{what}: moment {t} does not open: {e}"));
    assert_eq!(view.moment(), Some(t), "{what}: {t} is not a moment");
    assert_eq!(view.size(), image.size, "{what}: size at {t}");
    for (off, len) in common::touched_ranges(std::iter::once(image), image.size) {
        let got = view.read(off, len as usize).await.unwrap();
        assert!(
            got == image.read(off, len),
            "{what}: moment {t} differs at {off}+{len}"
        );
    }
}

/// Every moment of a retention window opens as it was, to the
/// millisecond: across writes, trims, growth, a rollback, a reopen,
/// checkpoints, and cleaning passes that delete at once what moments no
/// longer need (moving the trees of the points that remain). Once
/// retention is off, cleaning takes what only the window held.
#[tokio::test]
async fn every_moment_of_the_window_opens_as_it_was() {
    const WINDOW_MS: u64 = 150;
    let (clock, backend) = created_on_a_manual_clock(11).await;
    let now = || clock.clock().unix_ms();
    let mut vol = Volume::open(backend.clone(), &on_manual_clock())
        .await
        .unwrap();
    let before_retention = now();
    clock.advance(Duration::from_millis(1));
    vol.set_retention(WINDOW_MS).await.unwrap();
    let mut model = Image::new(SIZE);
    let mut moments: Vec<(u64, Image)> = vec![(now(), model.clone())];
    let mut snapshot = None;
    let mut deleted = 0;
    let mut held = None;
    let mut x = 7u64;
    for round in 0..9u8 {
        for i in 0..48 {
            clock.advance(Duration::from_millis(1));
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let blocks = 1 + (x >> 61);
            let at = ((x >> 20) % (model.size / BS - blocks)) * BS + (x >> 40) % 1000;
            let data = pattern((blocks * BS) as usize - 1000, round ^ i);
            vol.write(at, &data).await.unwrap();
            model.write(at, &data);
            if i % 8 == 0 {
                moments.push((now(), model.clone()));
            }
        }
        clock.advance(Duration::from_millis(1));
        match round {
            1 => {
                vol.snapshot_create("s").await.unwrap();
                snapshot = Some(model.clone());
            }
            2 => {
                vol.rollback("s").await.unwrap();
                model = snapshot.clone().unwrap();
            }
            3 => {
                vol.close().await.unwrap();
                vol = Volume::open(backend.clone(), &on_manual_clock())
                    .await
                    .unwrap();
            }
            5 => {
                vol.trim(100_000, 300_000).await.unwrap();
                model.zero(100_000, 300_000);
                clock.advance(Duration::from_millis(1));
                vol.resize(SIZE + 5000).await.unwrap();
                model.size = SIZE + 5000;
            }
            _ => {
                vol.flush().await.unwrap();
                let report = vol.gc(&now_options(1.0), &|_| {}).await.unwrap();
                deleted += report.deleted_segments;
            }
        }
        moments.push((now(), model.clone()));
        let start = now() - WINDOW_MS;
        for (t, image) in moments.iter().filter(|(t, _)| *t >= start) {
            assert_moment(&backend, *t, image, &format!("round {round}")).await;
        }
        if round == 6 {
            // A view kept open while later rounds clean beneath it.
            let (t, image) = moments.last().unwrap().clone();
            let view = Volume::open_read_only(backend.clone(), &on_manual_clock(), View::AsOf(t))
                .await
                .unwrap();
            held = Some((view, image));
        }
    }
    let (view, image) = held.take().unwrap();
    assert_reads(
        &view,
        &image,
        "a view of a moment kept open through cleaning",
    )
    .await;
    assert!(deleted > 0, "cleaning never deleted what the window let go");
    let info = vol.retention();
    assert!(
        info.points > 3 && info.oldest_ms.unwrap() <= now() - WINDOW_MS,
        "{info:?}"
    );
    // Before the window began, "as of" is the newest snapshot then: none.
    assert!(Volume::open_read_only(
        backend.clone(),
        &on_manual_clock(),
        View::AsOf(before_retention)
    )
    .await
    .is_err());
    assert_checks(&backend).await;

    // Off: cleaning may take what only the window held.
    vol.flush().await.unwrap();
    let kept = vol.gc(&now_options(1.0), &|_| {}).await.unwrap();
    vol.checkpoint().await.unwrap();
    let held = space(backend.clone()).await.unwrap();
    assert!(
        held.retention_bytes > 256 << 10 && held.snapshots.iter().all(|s| !s.name.starts_with('-')),
        "{held:?}"
    );
    vol.set_retention(0).await.unwrap();
    assert_eq!(vol.retention().points, 0);
    assert_eq!(space(backend.clone()).await.unwrap().retention_bytes, 0);
    let freed = vol.gc(&now_options(1.0), &|_| {}).await.unwrap();
    assert!(
        freed.stored_after < kept.stored_after * 3 / 4,
        "with the window: {kept:?}; without: {freed:?}"
    );
    // "As of" a moment is the newest snapshot then again.
    let (t, _) = moments.last().unwrap();
    let view = Volume::open_read_only(backend.clone(), &on_manual_clock(), View::AsOf(*t))
        .await
        .unwrap();
    assert_eq!(view.moment(), None);
    assert!(
        view.snapshot()
            .is_some_and(|s| s.starts_with("before-rollback-to-s-")),
        "{:?}",
        view.snapshot()
    );
    vol.close().await.unwrap();
    let reopened = open(&backend).await;
    for (off, len) in common::touched_ranges(std::iter::once(&model), model.size) {
        assert!(reopened.read(off, len as usize).await.unwrap() == model.read(off, len));
    }
    reopened.close().await.unwrap();
    assert_checks(&backend).await;
}

/// A writer whose clock is behind the volume's marks and points (a
/// takeover by a host with a slower clock, or a clock stepped back across
/// a restart) never puts its writes into moments already past: a moment
/// between a write and a rollback stays what it was. Moments in the
/// future, and retention points by name, are refused.
#[tokio::test]
async fn a_clock_behind_never_moves_writes_into_past_moments() {
    let (clock, backend) = created_on_a_manual_clock(12).await;
    let now = || clock.clock().unix_ms();
    let vol = Volume::open(backend.clone(), &on_manual_clock())
        .await
        .unwrap();
    vol.set_retention(3_600_000).await.unwrap();
    let mut model = Image::new(SIZE);
    clock.advance(Duration::from_millis(10));
    vol.snapshot_create("empty").await.unwrap();
    clock.advance(Duration::from_millis(10));
    let a = pattern(8192, 1);
    vol.write(0, &a).await.unwrap();
    model.write(0, &a);
    clock.advance(Duration::from_millis(10));
    let between = now();
    let at_between = model.clone();
    clock.advance(Duration::from_millis(10));
    vol.rollback("empty").await.unwrap();
    clock.advance(Duration::from_millis(10));
    let after_rollback = now();
    assert!(vol.snapshot_delete("-retain-1").await.is_err());
    assert!(Volume::open_read_only(
        backend.clone(),
        &on_manual_clock(),
        View::AsOf(now() + 60_000)
    )
    .await
    .is_err());
    vol.close().await.unwrap();

    // Another writer, 25 ms behind: before the rollback by its clock.
    let behind = ManualClock::new(after_rollback - 25);
    let slow = backend.clone().with_time(behind.clock(), Jitter::seeded(3));
    let vol = Volume::open(slow, &on_manual_clock()).await.unwrap();
    vol.write(0, &pattern(4096, 2)).await.unwrap();
    vol.flush().await.unwrap();
    assert_moment(
        &backend,
        between,
        &at_between,
        "between the write and the rollback",
    )
    .await;
    assert_moment(
        &backend,
        after_rollback,
        &Image::new(SIZE),
        "after the rollback",
    )
    .await;
    vol.close().await.unwrap();
    assert_checks(&backend).await;
}

/// A segment that nothing reaches is deleted by any run, even one whose
/// target already holds: here a segment object put back under the name of
/// one a run deleted (as a delete that did not land, or an upload a crash
/// left for no manifest to name, would leave it).
#[tokio::test]
async fn a_segment_nothing_reaches_is_swept_whatever_the_target() {
    let (_world, backend, vol, mut model) = created_and_opened().await;
    churn(&vol, &mut model, 6, 3).await;
    vol.gc(&now_options(1.0), &|_| {}).await.unwrap();
    let store = backend.requests();
    let listed: Vec<u32> = store
        .list("segments/")
        .await
        .unwrap()
        .iter()
        .filter_map(|b| parse_segment_name(&b.name))
        .collect();
    let gone = (1..*listed.iter().max().unwrap())
        .find(|id| !listed.contains(id))
        .expect("the run deleted a segment");
    let live = store.get(&segment_name(listed[0])).await.unwrap();
    store
        .put_if_absent(&segment_name(gone), live)
        .await
        .unwrap();
    let report = vol.gc(&now_options(1000.0), &|_| {}).await.unwrap();
    assert_eq!(report.stopped, GcStop::TargetReached, "{report:?}");
    assert_eq!(
        (report.passes, report.deleted_segments),
        (0, 1),
        "{report:?}"
    );
    assert_eq!(store.head(&segment_name(gone)).await.unwrap(), None);
    assert_reads(&vol, &model, "the head after the sweep").await;
    vol.close().await.unwrap();
    assert_checks(&backend).await;
}

/// A run that keeps up (the automatic cleaner's) goes on while a client
/// overwrites faster than its passes free space, and ends once the client
/// stops; a user's run ends at the first pass that gave nothing back.
#[tokio::test]
async fn a_run_keeping_up_goes_on_while_clients_write() {
    let mut passes_by = Vec::new();
    for keep_up in [false, true] {
        let (clock, backend, vol, mut model) = churned_on_a_manual_clock(5, 6, 11).await;
        clock.advance(Duration::from_secs(1));
        let opts = GcOptions {
            target: 1.0,
            grace: Duration::ZERO,
            // One segment a pass, slowly: a client overwriting 16 KiB
            // every 50 ms makes garbage faster than the passes free it.
            pass_bytes: 1,
            busy_rate: Some(64 << 10),
            keep_up,
            ..GcOptions::default()
        };
        let cleaner = spawn_gc(&vol, opts);
        let mut x = 7u64;
        let mut ended_while_writing = false;
        for step in 0..200u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = ((x >> 20) % (SIZE / BS - 4)) * BS;
            let data = pattern(4 * BS as usize, step as u8);
            vol.write(at, &data).await.unwrap();
            model.write(at, &data);
            tokio::time::sleep(Duration::from_millis(1)).await;
            clock.advance(Duration::from_millis(50));
            if cleaner.is_finished() {
                ended_while_writing = true;
                break;
            }
        }
        vol.flush().await.unwrap();
        assert_eq!(ended_while_writing, !keep_up, "keep_up {keep_up}");
        advance_until_done(&clock, &cleaner, None).await;
        let report = cleaner.await.unwrap().unwrap();
        assert!(report.deleted_segments > 0, "{report:?}");
        passes_by.push(report.passes);
        assert_reads(&vol, &model, "the head after the run").await;
        vol.close().await.unwrap();
        assert_checks(&backend).await;
    }
    assert!(passes_by[1] > passes_by[0], "passes {passes_by:?}");
}

/// The automatic cleaner's run does not stand still through its grace:
/// it ends with its victims condemned, the next tick's run judges them
/// (after a checkpoint that makes the head's moves durable), and a later
/// tick deletes them once the grace is over, not before, without running
/// again meanwhile.
#[tokio::test]
async fn the_automatic_cleaner_deletes_what_its_run_left_once_due() {
    let (clock, backend) = created_on_a_manual_clock(6).await;
    let every = Duration::from_secs(10);
    let grace = Duration::from_secs(60);
    let opts = cleaning_by_itself(every, grace);
    let vol = Volume::open(backend.clone(), &opts).await.unwrap();
    let tick = || ticks_of(&clock, &vol, every, 1);
    let mut model = Image::new(SIZE);
    churn(&vol, &mut model, 6, 10).await;
    let mut figures = tick().await;
    let mut waited = every;
    while figures.gc_runs == 0 {
        assert!(waited < grace, "no run: {figures:?}");
        figures = tick().await;
        waited += every;
    }
    assert!(figures.gc_passes > 0, "{figures:?}");
    assert_eq!(figures.gc_deleted_segments, 0, "deleted before its grace");
    let (run_at, runs) = (waited, figures.gc_runs);
    while figures.gc_deleted_segments == 0 {
        assert!(waited < run_at + 3 * grace, "never deleted: {figures:?}");
        figures = tick().await;
        waited += every;
    }
    assert!(waited >= run_at + grace - every, "deleted after {waited:?}");
    // By a tick, not by another run than the one that judged them: the
    // victims waiting out their grace do not count as stored, so the task
    // stayed quiet.
    assert_eq!(figures.gc_runs, runs + 1, "{figures:?}");
    assert_reads(&vol, &model, "the head after the deletes").await;
    vol.close().await.unwrap();
    assert_checks(&backend).await;
}

/// A pass that copies what it gathers one block at a time commits once per
/// block. Those commits, within the pass and moving the head alone, write
/// no map pages and no checkpoint: beside its copies (and a header each)
/// the log grows as for a pass that commits once, while the head reads the
/// same, before and after a reopen.
#[tokio::test]
async fn commits_within_a_pass_leave_the_map_to_its_end() {
    let mut appended = Vec::new();
    for commit_bytes in [usize::MAX, BS as usize] {
        let (_world, backend, vol, mut model) = created_and_opened().await;
        churn(&vol, &mut model, 6, 21).await;
        let before = vol.figures().log_appended_bytes;
        let opts = GcOptions {
            commit_bytes,
            ..now_options(1.0)
        };
        let report = vol.gc(&opts, &|_| {}).await.unwrap();
        assert!(report.copied_bytes >= 8 * BS, "{report:?}");
        appended.push((
            vol.figures().log_appended_bytes - before,
            report.copied_bytes,
        ));
        assert_reads(&vol, &model, "the head after cleaning").await;
        vol.close().await.unwrap();
        assert_reads(&open(&backend).await, &model, "the head reopened").await;
        assert_checks(&backend).await;
    }
    // What the runs appended beside their copies.
    let [(once, copied), (per_block, commits)] = appended[..] else {
        unreachable!()
    };
    let commits = commits / BS;
    let (once, per_block) = (once - copied, per_block - commits * BS);
    assert!(
        per_block < once + commits * 2 * hlfs_format::HEADER_LEN as u64,
        "{commits} commits appended {per_block} bytes beside their copies, against {once} for one"
    );
}

/// A power cut after commits within a pass, before its last: recovery
/// finds the head where it was (copies are never replayed), in victims
/// that are still there, and the next run cleans them.
#[tokio::test]
async fn a_crash_between_the_commits_of_a_pass_loses_nothing() {
    let (world, _, vol, mut model) = created_and_opened().await;
    churn(&vol, &mut model, 6, 22).await;
    let opts = GcOptions {
        commit_bytes: BS as usize,
        copy_rate: Some(64 * BS),
        ..now_options(1.0)
    };
    let cleaner = spawn_gc(&vol, opts);
    // At 64 blocks a second the pass has made a few commits, not its last.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!cleaner.is_finished(), "the pass ended early");
    let after = world.power_cut(CrashMode::DropUnsynced).await;
    let copies = record_kinds(&after.backend())
        .await
        .into_iter()
        .filter(|(_, kinds)| kinds.contains(&RecordKind::Copy))
        .count();
    assert!(copies > 0, "no commit made it to the store before the cut");
    vol.stop_cleaning();
    cleaner.await.unwrap().unwrap();
    drop(vol);
    let backend = after.backend();
    let vol = open(&backend).await;
    assert_reads(&vol, &model, "the head after the crash").await;
    let report = vol.gc(&now_options(1.0), &|_| {}).await.unwrap();
    assert!(
        report.stored_after * 10 < report.live_after * 11,
        "{report:?}"
    );
    assert_reads(&vol, &model, "the head cleaned again").await;
    vol.close().await.unwrap();
    assert_checks(&backend).await;
}

/// A seal checkpoints once the log since the last checkpoint is four
/// segments and also 64 times the dirty map pages: scattered writes, which
/// dirty every leaf of a 256 MiB volume's map (about 0.8 MiB), run 32 MiB
/// of 1 MiB segments with no checkpoint, where writes to one region (few
/// dirty pages) checkpoint every few segments.
#[tokio::test]
async fn checkpoints_wait_for_log_worth_their_dirty_map() {
    async fn checkpoints_after(scattered: bool) -> usize {
        let world = World::new();
        let backend = world.backend();
        let size = 256 << 20;
        let create = CreateOptions {
            size,
            block_size: BS as u32,
            segment_size: 1 << 20,
        };
        Volume::create(&backend, &create).await.unwrap();
        let vol = open(&backend).await;
        let data = pattern(BS as usize, 3);
        let mut x = 7u64;
        for i in 0..(32 << 20) / BS {
            let block = if scattered {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 20) % (size / BS)
            } else {
                i
            };
            vol.write(block * BS, &data).await.unwrap();
        }
        vol.flush().await.unwrap();
        // Before the close, whose own checkpoint would count.
        let segments = record_kinds(&backend).await;
        let with_checkpoint = segments
            .iter()
            .filter(|(_, kinds)| kinds.contains(&RecordKind::Checkpoint))
            .count();
        vol.close().await.unwrap();
        with_checkpoint
    }
    let scattered = checkpoints_after(true).await;
    let one_region = checkpoints_after(false).await;
    assert!(
        scattered <= 1,
        "{scattered} checkpoints under scattered writes"
    );
    assert!(
        one_region >= 3,
        "{one_region} checkpoints under writes to one region"
    );
}
