//! The fault layer: power-cut images, crash points, faults and latency,
//! over the memory store and over a real directory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hlfs_store::layers::{is_power_cut, CrashMode, Fault, FaultOp, Faults};
use hlfs_store::{BlobStore, JournalDir, LocalJournal, LocalStore, MemEnv, StoreError};

/// A memory store and journal behind a fault layer.
struct World {
    env: MemEnv,
    faults: Faults,
    store: Arc<dyn BlobStore>,
    journal: Arc<dyn JournalDir>,
}

impl World {
    fn new() -> World {
        World::over(MemEnv::new())
    }

    fn over(env: MemEnv) -> World {
        let faults = Faults::new();
        World {
            store: faults.store(env.store()),
            journal: faults.journal(env.journal()),
            env,
            faults,
        }
    }

    async fn crash(&self, mode: CrashMode) -> MemEnv {
        self.faults.power_cut(mode).await.unwrap()
    }
}

fn cut<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
    match r {
        Err(e) => is_power_cut(&e),
        Ok(v) => panic!("expected the power cut, got {v:?}"),
    }
}

const ALL_MODES: [CrashMode; 3] = [
    CrashMode::DropUnsynced,
    CrashMode::KeepRandomPrefix { seed: 7 },
    CrashMode::TornSectors { seed: 7 },
];

/// 1000 synced bytes followed by 4000 unsynced ones, none of them zero.
fn half_synced(journal: &dyn JournalDir) -> (Vec<u8>, Vec<u8>) {
    let file = journal.create("seg").unwrap();
    let synced: Vec<u8> = (0..1000u32).map(|i| (i % 200) as u8 + 1).collect();
    let pending: Vec<u8> = (0..4000u32).map(|i| (i % 199) as u8 + 1).collect();
    file.write_at(0, &synced).unwrap();
    file.sync().unwrap();
    file.write_at(1000, &pending).unwrap();
    (synced, pending)
}

fn journal_contents(env: &MemEnv, name: &str) -> Vec<u8> {
    let file = env.journal().open(name).unwrap();
    file.read_at(0, usize::MAX).unwrap()
}

#[tokio::test]
async fn synced_data_survives_every_mode() {
    for mode in ALL_MODES {
        let world = World::new();
        let (synced, _) = half_synced(&*world.journal);
        let after = world.crash(mode).await;
        let data = journal_contents(&after, "seg");
        assert!(data.len() >= synced.len(), "{mode:?} lost synced bytes");
        assert_eq!(
            data[..synced.len()],
            synced[..],
            "{mode:?} changed synced bytes"
        );
    }
}

#[tokio::test]
async fn drop_unsynced_keeps_exactly_the_synced_prefix() {
    let world = World::new();
    let (synced, _) = half_synced(&*world.journal);
    let after = world.crash(CrashMode::DropUnsynced).await;
    assert_eq!(journal_contents(&after, "seg"), synced);
}

#[tokio::test]
async fn keep_random_prefix_keeps_a_prefix() {
    let mut lengths = std::collections::BTreeSet::new();
    for seed in 0..50 {
        let world = World::new();
        let (synced, pending) = half_synced(&*world.journal);
        let data = journal_contents(
            &world.crash(CrashMode::KeepRandomPrefix { seed }).await,
            "seg",
        );
        let whole = [synced, pending].concat();
        assert!(whole.starts_with(&data), "seed {seed}: not a prefix");
        lengths.insert(data.len());
    }
    assert!(
        lengths.len() > 10,
        "prefix lengths hardly vary: {lengths:?}"
    );
}

#[tokio::test]
async fn crash_images_are_deterministic_per_seed() {
    for mode in [
        CrashMode::KeepRandomPrefix { seed: 3 },
        CrashMode::TornSectors { seed: 3 },
    ] {
        let mut images = Vec::new();
        for _ in 0..2 {
            let world = World::new();
            half_synced(&*world.journal);
            images.push(journal_contents(&world.crash(mode).await, "seg"));
        }
        assert_eq!(images[0], images[1], "{mode:?}");
    }
}

#[tokio::test]
async fn torn_sectors_loses_whole_sectors() {
    let mut saw_hole = false;
    for seed in 0..50 {
        let world = World::new();
        let (synced, pending) = half_synced(&*world.journal);
        let whole = [synced, pending].concat();
        let data = journal_contents(&world.crash(CrashMode::TornSectors { seed }).await, "seg");
        assert!(data.len() <= whole.len());
        assert!(data.len() == 1000 || data.len() % 512 == 0 || data.len() == whole.len());
        // Past the synced 1000 bytes, the pieces are [1000, 1024), then whole
        // 512-byte sectors, then [4608, 5000): each all-original or all-zero.
        let mut start = 1000;
        while start < data.len() {
            let end = ((start / 512 + 1) * 512).min(data.len());
            let piece = &data[start..end];
            if piece == &whole[start..end] {
            } else if piece.iter().all(|&b| b == 0) {
                saw_hole = true;
            } else {
                panic!("seed {seed}: sector at {start} is neither kept nor zeroed");
            }
            start = end;
        }
        if data.len() > 1000 {
            assert_eq!(
                data[data.len() - 1],
                whole[data.len() - 1],
                "seed {seed}: a lost sector was left at the end instead of cut off"
            );
        }
    }
    assert!(saw_hole, "no seed produced a hole before a kept sector");
}

#[tokio::test]
async fn a_power_cut_keeps_blobs_and_gives_a_fresh_env() {
    let world = World::new();
    let store = &world.store;
    store
        .put_if_absent("a/1", Bytes::from_static(b"one"))
        .await
        .unwrap();
    store
        .put_if_absent("a/2", Bytes::from_static(b"two"))
        .await
        .unwrap();
    store.delete("a/1").await.unwrap();
    let _held = world.journal.lock().unwrap();
    world.faults.inject(Fault {
        op: FaultOp::Get,
        name_prefix: String::new(),
        remaining: None,
    });
    world.faults.set_latency(Duration::from_secs(3600));

    // The image is read from below the layer: faults and latency (the test
    // would hang) do not apply to it.
    let after = world.crash(CrashMode::DropUnsynced).await;
    assert!(world.faults.is_dead());
    // A fresh env: no lock held, the same blobs.
    let names: Vec<_> = after.store().list("").await.unwrap();
    assert_eq!(names.len(), 1);
    assert_eq!(after.store().get("a/2").await.unwrap(), &b"two"[..]);
    assert!(cut(world.store.get("a/2").await));
    drop(after.journal().lock().unwrap());
    let again = World::over(after);
    assert_eq!(again.faults.durable_ops(), 0);
    assert!(!again.faults.is_dead());
}

#[tokio::test]
async fn crash_after_dies_at_the_next_durable_op() {
    let world = World::new();
    let store = &world.store;
    let journal = &world.journal;
    let faults = &world.faults;
    let file = journal.create("seg").unwrap(); // 1
    file.write_at(0, b"synced").unwrap();
    file.sync().unwrap(); // 2
    faults.crash_after(4);
    store
        .put_if_absent("b/1", Bytes::from_static(b"x"))
        .await
        .unwrap(); // 3
                   // Failed operations are not durable operations.
    store
        .put_if_absent("b/1", Bytes::from_static(b"y"))
        .await
        .unwrap_err();
    file.write_at(6, b" pending").unwrap();
    assert_eq!(faults.durable_ops(), 3);
    store
        .put_if_absent("b/2", Bytes::from_static(b"x"))
        .await
        .unwrap(); // 4
                   // Past the crash point but alive: writes that need no sync still land.
    assert!(!faults.is_dead());
    file.write_at(14, b" more").unwrap();
    assert_eq!(file.read_at(0, 100).unwrap(), b"synced pending more");
    // The next durable operation is where the power goes out.
    assert!(cut(file.sync()));
    assert!(faults.is_dead());
    assert_eq!(faults.durable_ops(), 4);

    // Everything after the crash point fails, reads included.
    assert!(cut(store.put_if_absent("b/3", Bytes::new()).await));
    assert!(cut(store.get("b/1").await));
    assert!(cut(store.list("").await));
    assert!(cut(store.head("b/1").await));
    assert!(cut(file.write_at(19, b"late")));
    assert!(cut(file.read_at(0, 5)));
    assert!(cut(journal.list()));
    assert!(cut(journal.create("other").map(drop)));
    assert_eq!(faults.durable_ops(), 4);

    // The unsynced bytes at the crash point are still there to be torn.
    let kept = world.crash(CrashMode::KeepRandomPrefix { seed: 1 }).await;
    let blobs: Vec<_> = kept
        .store()
        .list("b/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(blobs, ["b/1", "b/2"]);
    let data = journal_contents(&kept, "seg");
    assert!(
        b"synced pending more".starts_with(&data) && data.len() >= 6,
        "{data:?}"
    );
    let mut full = false;
    for seed in 0..100 {
        let image = world.crash(CrashMode::KeepRandomPrefix { seed }).await;
        full |= journal_contents(&image, "seg") == b"synced pending more";
    }
    assert!(full, "the writes before the crash point never survived");
    let dropped = journal_contents(&world.crash(CrashMode::DropUnsynced).await, "seg");
    assert_eq!(dropped, b"synced");
}

#[tokio::test]
async fn crash_after_a_past_count_dies_at_the_next_durable_op() {
    let world = World::new();
    let journal = &world.journal;
    journal.create("a").unwrap();
    journal.create("b").unwrap();
    world.faults.crash_after(1);
    assert!(!world.faults.is_dead());
    journal.open("a").unwrap();
    assert!(cut(journal.create("c").map(drop)));
    assert!(world.faults.is_dead());
    assert_eq!(
        world
            .crash(CrashMode::DropUnsynced)
            .await
            .journal()
            .list()
            .unwrap(),
        ["a", "b"]
    );
}

#[tokio::test]
async fn every_kind_of_durable_op_counts() {
    let world = World::new();
    let journal = &world.journal;
    let file = journal.create("f").unwrap();
    file.write_at(0, b"abc").unwrap();
    assert_eq!(world.faults.durable_ops(), 1);
    file.sync().unwrap();
    file.truncate(1).unwrap();
    journal.remove("f").unwrap();
    assert_eq!(world.faults.durable_ops(), 4);
    let store = &world.store;
    store.put_if_absent("x", Bytes::new()).await.unwrap();
    store.delete("x").await.unwrap();
    store.get("missing").await.unwrap_err();
    assert_eq!(world.faults.durable_ops(), 6);
}

#[tokio::test]
async fn truncate_is_durable_and_overwrites_are_not() {
    let world = World::new();
    let file = world.journal.create("f").unwrap();
    file.write_at(0, b"0123456789").unwrap();
    file.truncate(4).unwrap();
    let after = World::over(world.crash(CrashMode::DropUnsynced).await);
    assert_eq!(journal_contents(&after.env, "f"), b"0123");

    let file = after.journal.open("f").unwrap();
    file.write_at(4, b"45").unwrap();
    file.sync().unwrap();
    file.write_at(2, b"xx").unwrap();
    // The bytes from the overwrite on are not durable; the file keeps its
    // synced length, with zeros where they were (what the engine ever
    // writes over: its window of zeros).
    let again = after.crash(CrashMode::DropUnsynced).await;
    assert_eq!(journal_contents(&again, "f"), b"01\0\0\0\0");
}

#[tokio::test]
async fn removed_files_stay_usable_through_open_handles() {
    let world = World::new();
    let journal = &world.journal;
    let file = journal.create("f").unwrap();
    journal.remove("f").unwrap();
    file.write_at(0, b"still here").unwrap();
    assert_eq!(file.read_at(0, 100).unwrap(), b"still here");
    assert!(journal.list().unwrap().is_empty());
    assert!(world
        .crash(CrashMode::KeepRandomPrefix { seed: 0 })
        .await
        .journal()
        .list()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn faults_fail_matching_ops_the_given_number_of_times() {
    let world = World::new();
    let store = &world.store;
    let faults = &world.faults;
    faults.inject(Fault {
        op: FaultOp::Put,
        name_prefix: "segments/".to_string(),
        remaining: Some(2),
    });
    for _ in 0..2 {
        match store.put_if_absent("segments/1", Bytes::new()).await {
            Err(e @ StoreError::Unavailable(_)) => {
                assert!(e.is_transient());
                assert_eq!(e.to_string(), "injected fault on segments/1");
            }
            other => panic!("expected an injected fault, got {other:?}"),
        }
    }
    // Other names and other ops are untouched; the third put goes through.
    store
        .put_if_absent("manifest/1", Bytes::new())
        .await
        .unwrap();
    store.head("segments/1").await.unwrap();
    store
        .put_if_absent("segments/1", Bytes::new())
        .await
        .unwrap();
    assert_eq!(faults.durable_ops(), 2);

    faults.inject(Fault {
        op: FaultOp::Get,
        name_prefix: String::new(),
        remaining: None,
    });
    for _ in 0..5 {
        assert!(matches!(
            store.get_range("manifest/1", 0, 0).await,
            Err(StoreError::Unavailable(_))
        ));
    }
    faults.clear();
    store.get_range("manifest/1", 0, 0).await.unwrap();

    faults.inject(Fault {
        op: FaultOp::List,
        name_prefix: "seg".to_string(),
        remaining: Some(1),
    });
    assert!(matches!(
        store.list("segments/").await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(store.list("manifest/").await.is_ok());
    assert_eq!(store.list("segments/").await.unwrap().len(), 1);
}

#[test]
fn journal_faults() {
    let world = World::new();
    let journal = &world.journal;
    let file = journal.create("seg-1").unwrap();
    let faults = [
        FaultOp::JournalWrite,
        FaultOp::JournalSync,
        FaultOp::JournalRead,
        FaultOp::JournalCreate,
        FaultOp::JournalRemove,
    ];
    for op in faults {
        world.faults.inject(Fault {
            op,
            name_prefix: "seg-".to_string(),
            remaining: Some(1),
        });
    }
    // A failing disk: not worth retrying.
    let injected = |r: Result<(), StoreError>| matches!(&r, Err(e @ StoreError::Io { .. }) if e.to_string().contains("injected fault") && !e.is_transient());
    assert!(injected(file.write_at(0, b"x")));
    file.write_at(0, b"x").unwrap();
    assert!(injected(file.sync()));
    assert!(injected(file.read_at(0, 1).map(drop)));
    assert!(injected(journal.create("seg-2").map(drop)));
    journal.create("other").unwrap();
    assert!(injected(journal.remove("seg-1")));
    file.sync().unwrap();
    assert_eq!(file.read_at(0, 1).unwrap(), b"x");
    journal.remove("seg-1").unwrap();

    world.faults.inject(Fault {
        op: FaultOp::Any,
        name_prefix: String::new(),
        remaining: Some(2),
    });
    assert!(injected(journal.list().map(drop)));
    assert!(injected(journal.lock().map(drop)));
    journal.lock().unwrap();
}

#[tokio::test]
async fn latency_delays_store_ops() {
    let world = World::new();
    let store = &world.store;
    world.faults.set_latency(Duration::from_millis(100));
    let start = Instant::now();
    store.put_if_absent("a", Bytes::new()).await.unwrap();
    store.head("a").await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(200));
    world.faults.set_latency(Duration::ZERO);
    let start = Instant::now();
    store.head("a").await.unwrap();
    assert!(start.elapsed() < Duration::from_millis(100));
}

/// The same layer over the local store and journal: faults, the crash
/// point and a power-cut image of real files.
#[tokio::test]
async fn the_layer_works_over_a_local_directory() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let store = faults.store(Arc::new(LocalStore::new(dir.path().join("store"))));
    let journal = faults.journal(Arc::new(
        LocalJournal::new(dir.path().join("journal")).unwrap(),
    ));
    faults.inject(Fault {
        op: FaultOp::Put,
        name_prefix: "segments/".into(),
        remaining: Some(1),
    });
    assert!(matches!(
        store
            .put_if_absent("segments/1", Bytes::from_static(b"s1"))
            .await,
        Err(StoreError::Unavailable(_))
    ));
    store
        .put_if_absent("segments/1", Bytes::from_static(b"s1"))
        .await
        .unwrap();
    let (synced, pending) = half_synced(&*journal);
    faults.crash_after(faults.durable_ops());
    assert!(cut(journal.create("late").map(drop)));
    assert!(cut(store.head("segments/1").await));
    let image = faults.power_cut(CrashMode::DropUnsynced).await.unwrap();
    assert_eq!(journal_contents(&image, "seg"), synced);
    assert_eq!(image.store().get("segments/1").await.unwrap(), &b"s1"[..]);
    // The directory itself still holds what was written, unsynced or not.
    let file = LocalJournal::new(dir.path().join("journal"))
        .unwrap()
        .open("seg")
        .unwrap();
    assert_eq!(
        file.read_at(0, usize::MAX).unwrap(),
        [synced, pending].concat()
    );
}

#[test]
fn mem_lock_is_shared_by_journal_handles() {
    let env = MemEnv::new();
    let held = env.journal().lock().unwrap();
    assert!(matches!(
        env.journal().lock(),
        Err(StoreError::Locked { .. })
    ));
    drop(held);
    env.journal().lock().unwrap();
}
