//! A volume whose store is remote: uploads in the background, a store that
//! goes away and comes back, FLUSH with remote durability, and the read
//! cache.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use common::{pattern, World};
use hlfs_store::layers::{CrashMode, Fault, FaultOp};
use hlfs_store::time::{Jitter, ManualClock};
use hlfs_store::{BlobMeta, BlobStore, LocalJournal, StoreError};
use hlfs_volume::{
    Backend, CreateOptions, Durability, OpenOptions, ReadCache, Volume, VolumeError,
};

const SEGMENT: u64 = 256 << 10;

/// Writes `data` from offset 0 in 64 KiB writes, so that segments fill
/// and seal one after another.
async fn write_in_chunks(vol: &Volume, data: &[u8]) {
    for (i, chunk) in data.chunks(64 << 10).enumerate() {
        vol.write(i as u64 * (64 << 10), chunk).await.unwrap();
    }
}

fn options(durability: Durability, store_wait: Duration) -> OpenOptions {
    OpenOptions {
        durability,
        store_wait,
        ..OpenOptions::default()
    }
}

async fn create(backend: &Backend, size: u64) {
    Volume::create(
        backend,
        &CreateOptions {
            size,
            segment_size: SEGMENT,
            ..CreateOptions::default()
        },
    )
    .await
    .unwrap();
}

/// What the store alone holds (another host opening the volume) reads back
/// as `data` from offset 0.
async fn assert_stored(world: &World, opts: &OpenOptions, data: &[u8]) {
    let vol = Volume::open(world.store_only().remote(), opts)
        .await
        .unwrap();
    assert_eq!(vol.read(0, data.len()).await.unwrap(), data);
    vol.close().await.unwrap();
}

fn refuse_uploads(world: &World) {
    world.faults.inject(Fault {
        op: FaultOp::Put,
        name_prefix: String::new(),
        remaining: None,
    });
}

#[tokio::test]
async fn a_store_that_goes_away_delays_uploads_not_flushes_and_service_resumes() {
    let world = World::new();
    create(&world.remote(), 64 << 20).await;
    let opts = options(Durability::Local, Duration::from_millis(500));
    let vol = Volume::open(world.remote(), &opts).await.unwrap();
    refuse_uploads(&world);
    // Writes and flushes go on while the backlog has room: the journal
    // holds them.
    let chunk = 64 << 10;
    let mut written = 0u64;
    let mut refused = None;
    let started = Instant::now();
    while written < 32 * SEGMENT {
        let data = pattern(chunk, (written / chunk as u64) as u8);
        match vol.write(written, &data).await {
            Ok(()) => written += chunk as u64,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
        vol.flush()
            .await
            .expect("a local flush does not need the store");
    }
    let err = refused.expect("writes stop once the upload backlog is full");
    assert!(matches!(err, VolumeError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("injected fault"), "{err}");
    assert!(written >= 4 * SEGMENT, "the backlog took {written} bytes");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Once the store has been away for the whole wait, later writes fail at
    // once (not each after its own wait), and append nothing.
    let again = Instant::now();
    for k in 0..5u64 {
        let late = vol
            .write(written + k * chunk as u64, &pattern(chunk, k as u8))
            .await;
        assert!(matches!(late, Err(VolumeError::Unavailable(_))), "{late:?}");
    }
    assert!(
        again.elapsed() < Duration::from_millis(400),
        "{:?}",
        again.elapsed()
    );
    // The uploads kept trying, and the metrics say so. (The faults here
    // sit above the counting layer, so the failures themselves are not
    // counted; a real store's are, by kind.)
    let counts = vol.store_counts();
    assert!(counts.retries > 0, "{counts:?}");
    // The store comes back: the same volume takes writes again.
    world.faults.clear();
    let more = pattern(chunk, 231);
    // As soon as the next upload attempt succeeds, writes are taken again.
    let back = Instant::now();
    while let Err(e) = vol.write(written, &more).await {
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "service did not resume: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    vol.flush().await.unwrap();
    vol.close().await.unwrap();
    // Everything acknowledged is there, from the store alone.
    let vol = Volume::open(world.store_only().remote(), &opts)
        .await
        .unwrap();
    for off in (0..written).step_by(chunk) {
        assert_eq!(
            vol.read(off, chunk).await.unwrap(),
            pattern(chunk, (off / chunk as u64) as u8),
            "at {off}"
        );
    }
    assert_eq!(vol.read(written, chunk).await.unwrap(), more);
    vol.close().await.unwrap();
}

#[tokio::test]
async fn uploads_are_retried_until_the_store_takes_them() {
    let world = World::new();
    create(&world.remote(), 16 << 20).await;
    let opts = options(Durability::Local, Duration::from_secs(30));
    let vol = Volume::open(world.remote(), &opts).await.unwrap();
    world.faults.inject(Fault {
        op: FaultOp::Put,
        name_prefix: "segments/".into(),
        remaining: Some(3),
    });
    let data = pattern(3 * SEGMENT as usize, 5);
    write_in_chunks(&vol, &data).await;
    vol.close()
        .await
        .expect("close waits for the retried uploads");
    assert_stored(&world, &opts, &data).await;
}

#[tokio::test]
async fn remote_durability_puts_flushed_writes_in_the_store() {
    for durability in [Durability::Remote, Durability::Local] {
        let world = World::new();
        create(&world.remote(), 16 << 20).await;
        let opts = options(durability, Duration::from_secs(30));
        let vol = Volume::open(world.remote(), &opts).await.unwrap();
        vol.write(4096, &pattern(8192, 1)).await.unwrap();
        vol.flush().await.unwrap();
        vol.write(1 << 20, &pattern(4096, 2)).await.unwrap();
        vol.write_fua(2 << 20, &pattern(4096, 3)).await.unwrap();
        // The host dies with its disk: another one opens the volume from
        // the store alone (its claim is on this host, so it may take over).
        let elsewhere = world.store_only();
        let vol2 = Volume::open(elsewhere.remote(), &opts).await.unwrap();
        let first = vol2.read(4096, 8192).await.unwrap();
        let fua = vol2.read(2 << 20, 4096).await.unwrap();
        if durability == Durability::Remote {
            assert_eq!(first, pattern(8192, 1));
            assert_eq!(fua, pattern(4096, 3));
        } else {
            // Local durability keeps flushed writes in the local journal
            // only, until their segment is sealed.
            assert_eq!(first, vec![0; 8192]);
        }
        vol2.close().await.unwrap();
        drop(vol);
    }
}

#[tokio::test]
async fn the_read_cache_serves_stored_segments_and_survives_damage() {
    let dir = tempfile::tempdir().unwrap();
    let world = World::new();
    let backend = || Backend {
        journal: Arc::new(LocalJournal::new(dir.path().join("journal")).unwrap()),
        cache: ReadCache::shared(&dir.path().join("cache"), 1 << 30).unwrap(),
        ..world.remote()
    };
    create(&backend(), 16 << 20).await;
    let opts = options(Durability::Local, Duration::from_secs(30));
    let vol = Volume::open(backend(), &opts).await.unwrap();
    let data = pattern(4 * SEGMENT as usize, 9);
    write_in_chunks(&vol, &data).await;
    vol.close().await.unwrap();
    // Every segment uploaded is also in the cache: with the store refusing
    // reads, they still read back.
    world.faults.inject(Fault {
        op: FaultOp::Get,
        name_prefix: "segments/".into(),
        remaining: None,
    });
    let cache_dir = dir.path().join("cache");
    let cached: Vec<_> = std::fs::read_dir(&cache_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none() && !p.ends_with("LOCK"))
        .collect();
    assert!(cached.len() >= 4, "{cached:?}");
    {
        let vol = Volume::open(backend(), &opts).await.unwrap();
        let before = vol
            .figures()
            .read_cache
            .expect("a remote volume has a read cache");
        assert_eq!(vol.read(0, data.len()).await.unwrap(), data);
        let after = vol.figures().read_cache.unwrap();
        assert!(after.hits > before.hits, "{before:?} -> {after:?}");
        assert_eq!(after.misses, before.misses, "the store refuses reads");
        assert!(after.bytes >= data.len() as u64, "{after:?}");
        vol.close().await.unwrap();
    }
    // Damaged cache files are noticed by the checksums and read again
    // from the store.
    world.faults.clear();
    for path in &cached {
        let mut bytes = std::fs::read(path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        bytes[100] ^= 0xff;
        std::fs::write(path, bytes).unwrap();
    }
    let vol = Volume::open(backend(), &opts).await.unwrap();
    assert_eq!(vol.read(0, data.len()).await.unwrap(), data);
    vol.close().await.unwrap();
}

#[tokio::test]
async fn close_with_the_store_away_fails_in_time_and_the_next_open_finishes_the_uploads() {
    let world = World::new();
    create(&world.remote(), 16 << 20).await;
    let opts = options(Durability::Local, Duration::from_millis(300));
    let vol = Volume::open(world.remote(), &opts).await.unwrap();
    let data = pattern(2 * SEGMENT as usize, 4);
    write_in_chunks(&vol, &data).await;
    vol.flush().await.unwrap();
    refuse_uploads(&world);
    let started = Instant::now();
    let err = vol
        .close()
        .await
        .expect_err("close cannot store the last segment");
    assert!(matches!(err, VolumeError::Unavailable(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The lock is released and the journal kept: once the store is back,
    // the next open uploads what was left and nothing is lost.
    world.faults.clear();
    let vol = Volume::open(world.remote(), &opts).await.unwrap();
    vol.close().await.unwrap();
    assert_stored(&world, &opts, &data).await;
}

#[tokio::test]
async fn recovery_replays_a_journal_left_between_stored_segments() {
    let world = World::new();
    create(&world.remote(), 16 << 20).await;
    let opts = options(Durability::Local, Duration::from_secs(30));
    let vol = Volume::open(world.remote(), &opts).await.unwrap();
    // Segment 2's upload keeps failing while later ones, uploaded at the
    // same time, land.
    world.faults.inject(Fault {
        op: FaultOp::Put,
        name_prefix: "segments/0000000002".into(),
        remaining: None,
    });
    let data = pattern(4 * SEGMENT as usize, 6);
    write_in_chunks(&vol, &data).await;
    vol.flush().await.unwrap();
    let store = world.env.store();
    let started = Instant::now();
    while store.head("segments/0000000003").await.unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "segment 3 never uploaded"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(store.head("segments/0000000002").await.unwrap().is_none());
    // Power cut: segment 2 is only in its (synced) journal, 3 is stored.
    let after = world.power_cut(CrashMode::DropUnsynced).await;
    drop(vol);
    let vol = Volume::open(after.remote(), &opts).await.unwrap();
    assert_eq!(vol.read(0, data.len()).await.unwrap(), data);
    vol.write(0, &pattern(4096, 7)).await.unwrap();
    vol.close().await.unwrap();
    let vol = Volume::open(after.store_only().remote(), &opts)
        .await
        .unwrap();
    assert_eq!(vol.read(0, 4096).await.unwrap(), pattern(4096, 7));
    assert_eq!(
        vol.read(4096, data.len() - 4096).await.unwrap(),
        data[4096..]
    );
    vol.close().await.unwrap();
}

/// A store that tells `after_put` of every create, with whether it landed;
/// where `after_put` says so, a create that landed answers with an error
/// instead, as when a connection drops after the gateway stored the object.
struct Watched {
    inner: Arc<dyn BlobStore>,
    after_put: AfterPut,
}

/// Told a create's name and whether it landed; true loses its answer.
type AfterPut = Box<dyn Fn(&str, bool) -> bool + Send + Sync>;

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl BlobStore for Watched {
    fn describe(&self) -> String {
        "watched".into()
    }
    async fn put_if_absent(&self, name: &str, data: Bytes) -> hlfs_store::Result<()> {
        let put = self.inner.put_if_absent(name, data).await;
        match (self.after_put)(name, put.is_ok()) {
            true => Err(StoreError::Unavailable(format!("{name}: connection reset"))),
            false => put,
        }
    }
    async fn get_range(&self, name: &str, offset: u64, len: u64) -> hlfs_store::Result<Bytes> {
        self.inner.get_range(name, offset, len).await
    }
    async fn head(&self, name: &str) -> hlfs_store::Result<Option<u64>> {
        self.inner.head(name).await
    }
    async fn list(&self, prefix: &str) -> hlfs_store::Result<Vec<BlobMeta>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, name: &str) -> hlfs_store::Result<()> {
        self.inner.delete(name).await
    }

    async fn sweep_leftovers(&self) -> hlfs_store::Result<u64> {
        self.inner.sweep_leftovers().await
    }
}

/// Creates still to lose the answer of, of segments and of manifests.
#[derive(Default)]
struct LostAnswers {
    segments: AtomicU32,
    manifests: AtomicU32,
}

/// The world as a remote store that loses the answers `lost` says.
fn losing_answers(world: &World, lost: &Arc<LostAnswers>) -> Backend {
    let lost = lost.clone();
    Backend {
        store: Arc::new(Watched {
            inner: world.backend().store,
            after_put: Box::new(move |name, landed| landed && lost.lose(name)),
        }),
        ..world.remote()
    }
}

impl LostAnswers {
    fn lose(&self, name: &str) -> bool {
        let left = match name.starts_with("segments/") {
            true => &self.segments,
            false => &self.manifests,
        };
        left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[tokio::test]
async fn creates_whose_answer_was_lost_are_recognised_as_ours() {
    let world = World::new();
    create(&world.remote(), 16 << 20).await;
    let opts = options(Durability::Local, Duration::from_secs(30));
    let lost = Arc::new(LostAnswers {
        segments: AtomicU32::new(2),
        manifests: AtomicU32::new(1),
    });
    let backend = losing_answers(&world, &lost);
    // The claim's manifest lands but reports an error: the open fails, and
    // a second open must not take its own earlier write for another writer.
    let first = Volume::open(backend.clone(), &opts).await;
    assert!(first.is_err(), "the lost answer surfaces");
    let vol = Volume::open(backend, &opts)
        .await
        .expect("an open after a lost answer is not fenced");
    // Segments and a background checkpoint whose answers are lost are
    // retried, found in the store with our bytes and claim, and go on.
    lost.manifests.store(1, Ordering::SeqCst);
    let data = pattern(6 * SEGMENT as usize, 8);
    write_in_chunks(&vol, &data).await;
    vol.close().await.expect("no writer was fenced");
    assert_eq!(lost.segments.load(Ordering::SeqCst), 0);
    assert_eq!(lost.manifests.load(Ordering::SeqCst), 0);
    assert_stored(&world, &opts, &data).await;
}

/// Time moves only when the test moves it: the upload of a refused segment
/// is retried after pauses that double from 100 ms (each within 75% to 125%,
/// from a seeded jitter) up to 5 s, and start again from 100 ms once the
/// store has taken one. No real time passes.
#[tokio::test]
async fn upload_backoff_grows_to_its_cap_and_resets_on_the_injected_clock() {
    let world = World::new();
    let manual = ManualClock::new(1_800_000_000_000);
    let at = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let backend = || {
        let b = world.remote().with_time(manual.clock(), Jitter::seeded(42));
        // When each segment PUT is attempted, on the volume's clock.
        let (clock, at) = (manual.clock(), at.clone());
        let after_put = move |name: &str, _| {
            if name.starts_with("segments/") {
                at.lock().push(clock.now());
            }
            false
        };
        Backend {
            store: Arc::new(Watched {
                inner: b.store.clone(),
                after_put: Box::new(after_put),
            }),
            ..b
        }
    };
    create(&backend(), 16 << 20).await;
    let opts = options(Durability::Local, Duration::from_secs(3600));
    let vol = Volume::open(backend(), &opts).await.unwrap();
    let step = Duration::from_millis(10);
    // Lets the volume's tasks run as far as they can at this time.
    let settle = || async {
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
    };
    // Advances time in small steps until `n` attempts have been made.
    let run_until = |n: usize| {
        let at = at.clone();
        let manual = manual.clone();
        async move {
            for _ in 0..100_000 {
                if at.lock().len() >= n {
                    return;
                }
                settle().await;
                manual.advance(step);
            }
            panic!("only {} of {n} attempts", at.lock().len());
        }
    };
    let refuse = |times| {
        world.faults.inject(Fault {
            op: FaultOp::Put,
            name_prefix: "segments/".into(),
            remaining: Some(times),
        })
    };
    let check_pauses = |from: usize, firsts: &[u64]| {
        let times = at.lock().clone();
        for (k, &ms) in firsts.iter().enumerate() {
            let pause = times[from + k + 1] - times[from + k];
            let lo = Duration::from_millis(ms).mul_f64(0.75);
            let hi = Duration::from_millis(ms).mul_f64(1.25) + step;
            assert!(
                lo <= pause && pause <= hi,
                "pause {} was {pause:?}, not within {lo:?}..{hi:?}",
                k + 1
            );
        }
    };

    // Nine refusals of the first segment, then the store takes it.
    refuse(9);
    let writer = tokio::spawn({
        let vol = vol.clone();
        async move { write_in_chunks(&vol, &pattern(SEGMENT as usize + 4096, 1)).await }
    });
    run_until(10).await;
    writer.await.unwrap();
    check_pauses(0, &[100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    // A second outage starts again from the first pause.
    refuse(2);
    let writer = tokio::spawn({
        let vol = vol.clone();
        async move {
            let data = pattern(SEGMENT as usize, 2);
            for (i, chunk) in data.chunks(64 << 10).enumerate() {
                let off = SEGMENT + 4096 + (i as u64) * (64 << 10);
                vol.write(off, chunk).await.unwrap();
            }
        }
    });
    run_until(13).await;
    writer.await.unwrap();
    check_pauses(10, &[100, 200]);
    // About 22 s went by on the volume's clock, and none on the wall clock.
    assert!(
        manual.now() >= Duration::from_secs(16),
        "{:?}",
        manual.now()
    );
    let closing = tokio::spawn({
        let vol = vol.clone();
        async move { vol.close().await }
    });
    while !closing.is_finished() {
        settle().await;
        manual.advance(step);
    }
    closing.await.unwrap().unwrap();
    assert_eq!(
        at.lock().len(),
        14,
        "the last segment went up at its first attempt"
    );
}

/// A snapshot whose manifest landed but whose answer was lost is not taken
/// twice when the caller tries again: the retry finds the name taken.
#[tokio::test]
async fn a_retried_snapshot_whose_first_answer_was_lost_is_not_taken_twice() {
    let world = World::new();
    create(&world.remote(), 16 << 20).await;
    let opts = options(Durability::Local, Duration::from_secs(30));
    let lost = Arc::new(LostAnswers::default());
    let backend = losing_answers(&world, &lost);
    let vol = Volume::open(backend, &opts).await.unwrap();
    vol.write(0, &pattern(4096, 1)).await.unwrap();
    lost.manifests.store(1, Ordering::SeqCst);
    let lost = vol.snapshot_create("s1").await;
    assert!(lost.is_err(), "the lost answer surfaces: {lost:?}");
    let again = vol.snapshot_create("s1").await;
    assert!(
        matches!(again, Err(VolumeError::SnapshotExists(_))),
        "{again:?}"
    );
    vol.close().await.unwrap();
    let vol = Volume::open(world.store_only().remote(), &opts)
        .await
        .unwrap();
    let names: Vec<_> = vol.snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s1"]);
    vol.close().await.unwrap();
}

/// A volume dropped while an upload is still putting a segment keeps the
/// journal lock until that request is over, so the next writer cannot
/// start under a request of the last one that may still land.
#[tokio::test]
async fn the_journal_lock_outlives_a_dropped_volume_until_its_uploads_requests_end() {
    let world = World::new();
    create(&world.remote(), 16 << 20).await;
    let opts = options(Durability::Local, Duration::from_secs(30));
    let vol = Volume::open(world.remote(), &opts).await.unwrap();
    world.faults.set_latency(Duration::from_millis(400));
    let data = pattern(SEGMENT as usize + 4096, 3);
    write_in_chunks(&vol, &data).await;
    // The full segment's upload is in the store's latency now.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(vol);
    let early = Volume::open(world.remote(), &opts).await;
    assert!(
        matches!(early, Err(VolumeError::Busy(_))),
        "{:?}",
        early.err()
    );
    world.faults.set_latency(Duration::ZERO);
    let started = Instant::now();
    let vol = loop {
        match Volume::open(world.remote(), &opts).await {
            Ok(vol) => break vol,
            Err(VolumeError::Busy(_)) if started.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(vol.read(0, data.len()).await.unwrap(), data);
    vol.close().await.unwrap();
}

/// Two addresses whose journals land in one directory (the cache
/// directory's names are not injective): the second volume's recovery
/// meets the first one's flushed records and refuses, instead of dropping
/// them as a torn tail.
#[tokio::test]
async fn a_journal_of_another_volume_is_refused_not_dropped() {
    let (a, b) = (World::new(), World::new());
    create(&a.remote(), 16 << 20).await;
    let opts = options(Durability::Local, Duration::from_secs(30));
    let vol = Volume::open(a.remote(), &opts).await.unwrap();
    let data = pattern(64 << 10, 3);
    vol.write(0, &data).await.unwrap();
    vol.flush().await.unwrap();
    // A crash: the flushed write is only in A's open journal.
    let after = a.power_cut(CrashMode::DropUnsynced).await;
    drop(vol);
    let shared = after.remote().journal;
    create(&b.remote(), 16 << 20).await;
    let b_on_a_journal = Backend {
        journal: shared,
        ..b.remote()
    };
    let Err(err) = Volume::open(b_on_a_journal, &opts).await else {
        panic!("B must not take A's journal");
    };
    assert!(err.to_string().contains("another volume"), "{err}");
    let vol = Volume::open(after.remote(), &opts).await.unwrap();
    assert_eq!(vol.read(0, data.len()).await.unwrap(), data);
    vol.close().await.unwrap();
}
