//! MemEnv: crash images, crash points, faults and latency.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hlfs_store::{BlobStore, CrashMode, Fault, FaultOp, JournalDir, MemEnv, StoreError};

const ALL_MODES: [CrashMode; 3] = [
    CrashMode::DropUnsynced,
    CrashMode::KeepRandomPrefix { seed: 7 },
    CrashMode::TornSectors { seed: 7 },
];

/// 1000 synced bytes followed by 4000 unsynced ones, none of them zero.
fn half_synced(env: &MemEnv) -> (Vec<u8>, Vec<u8>) {
    let journal = env.journal();
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

#[test]
fn synced_data_survives_every_mode() {
    for mode in ALL_MODES {
        let env = MemEnv::new();
        let (synced, _) = half_synced(&env);
        let after = env.crash(mode);
        let data = journal_contents(&after, "seg");
        assert!(data.len() >= synced.len(), "{mode:?} lost synced bytes");
        assert_eq!(
            data[..synced.len()],
            synced[..],
            "{mode:?} changed synced bytes"
        );
    }
}

#[test]
fn drop_unsynced_keeps_exactly_the_synced_prefix() {
    let env = MemEnv::new();
    let (synced, _) = half_synced(&env);
    let after = env.crash(CrashMode::DropUnsynced);
    assert_eq!(journal_contents(&after, "seg"), synced);
}

#[test]
fn keep_random_prefix_keeps_a_prefix() {
    let mut lengths = std::collections::BTreeSet::new();
    for seed in 0..50 {
        let env = MemEnv::new();
        let (synced, pending) = half_synced(&env);
        let data = journal_contents(&env.crash(CrashMode::KeepRandomPrefix { seed }), "seg");
        let whole = [synced, pending].concat();
        assert!(whole.starts_with(&data), "seed {seed}: not a prefix");
        lengths.insert(data.len());
    }
    assert!(
        lengths.len() > 10,
        "prefix lengths hardly vary: {lengths:?}"
    );
}

#[test]
fn crash_images_are_deterministic_per_seed() {
    for mode in [
        CrashMode::KeepRandomPrefix { seed: 3 },
        CrashMode::TornSectors { seed: 3 },
    ] {
        let images: Vec<Vec<u8>> = (0..2)
            .map(|_| {
                let env = MemEnv::new();
                half_synced(&env);
                journal_contents(&env.crash(mode), "seg")
            })
            .collect();
        assert_eq!(images[0], images[1], "{mode:?}");
    }
}

#[test]
fn torn_sectors_loses_whole_sectors() {
    let mut saw_hole = false;
    for seed in 0..50 {
        let env = MemEnv::new();
        let (synced, pending) = half_synced(&env);
        let whole = [synced, pending].concat();
        let data = journal_contents(&env.crash(CrashMode::TornSectors { seed }), "seg");
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
async fn crash_keeps_blobs_and_resets_the_env() {
    let env = MemEnv::new();
    let store = env.store();
    store
        .put_if_absent("a/1", Bytes::from_static(b"one"))
        .await
        .unwrap();
    store
        .put_if_absent("a/2", Bytes::from_static(b"two"))
        .await
        .unwrap();
    store.delete("a/1").await.unwrap();
    let _held = env.journal().lock().unwrap();
    env.inject(Fault {
        op: FaultOp::Any,
        name_prefix: String::new(),
        remaining: None,
    });
    env.set_latency(Duration::from_secs(3600));

    let after = env.crash(CrashMode::DropUnsynced);
    assert!(env.is_dead());
    assert!(!after.is_dead());
    assert_eq!(after.durable_ops(), 0);
    // No faults, no latency (the test would hang), no lock.
    let names: Vec<_> = after.store().list("").await.unwrap();
    assert_eq!(names.len(), 1);
    assert_eq!(after.store().get("a/2").await.unwrap(), &b"two"[..]);
    assert!(matches!(
        env.store().get("a/2").await,
        Err(StoreError::Crashed)
    ));
    drop(after.journal().lock().unwrap());
}

#[tokio::test]
async fn crash_after_dies_at_the_next_durable_op() {
    let env = MemEnv::new();
    let store = env.store();
    let journal = env.journal();
    let file = journal.create("seg").unwrap(); // 1
    file.write_at(0, b"synced").unwrap();
    file.sync().unwrap(); // 2
    env.crash_after(4);
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
    assert_eq!(env.durable_ops(), 3);
    store
        .put_if_absent("b/2", Bytes::from_static(b"x"))
        .await
        .unwrap(); // 4
                   // Past the crash point but alive: writes that need no sync still land.
    assert!(!env.is_dead());
    file.write_at(14, b" more").unwrap();
    assert_eq!(file.read_at(0, 100).unwrap(), b"synced pending more");
    // The next durable operation is where the power goes out.
    assert!(matches!(file.sync(), Err(StoreError::Crashed)));
    assert!(env.is_dead());
    assert_eq!(env.durable_ops(), 4);

    // Everything after the crash point fails, reads included.
    assert!(matches!(
        store.put_if_absent("b/3", Bytes::new()).await,
        Err(StoreError::Crashed)
    ));
    assert!(matches!(store.get("b/1").await, Err(StoreError::Crashed)));
    assert!(matches!(store.list("").await, Err(StoreError::Crashed)));
    assert!(matches!(store.head("b/1").await, Err(StoreError::Crashed)));
    assert!(matches!(
        file.write_at(19, b"late"),
        Err(StoreError::Crashed)
    ));
    assert!(matches!(file.read_at(0, 5), Err(StoreError::Crashed)));
    assert!(matches!(journal.list(), Err(StoreError::Crashed)));
    assert!(matches!(journal.create("other"), Err(StoreError::Crashed)));
    assert_eq!(env.durable_ops(), 4);

    // The unsynced bytes at the crash point are still there to be torn.
    let kept = env.crash(CrashMode::KeepRandomPrefix { seed: 1 });
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
    let full = (0..100)
        .map(|seed| journal_contents(&env.crash(CrashMode::KeepRandomPrefix { seed }), "seg"))
        .any(|data| data == b"synced pending more");
    assert!(full, "the writes before the crash point never survived");
    let dropped = journal_contents(&env.crash(CrashMode::DropUnsynced), "seg");
    assert_eq!(dropped, b"synced");
}

#[test]
fn crash_after_a_past_count_dies_at_the_next_durable_op() {
    let env = MemEnv::new();
    let journal = env.journal();
    journal.create("a").unwrap();
    journal.create("b").unwrap();
    env.crash_after(1);
    assert!(!env.is_dead());
    journal.open("a").unwrap();
    assert!(matches!(journal.create("c"), Err(StoreError::Crashed)));
    assert!(env.is_dead());
    assert_eq!(
        env.crash(CrashMode::DropUnsynced).journal().list().unwrap(),
        ["a", "b"]
    );
}

#[test]
fn every_kind_of_durable_op_counts() {
    let env = MemEnv::new();
    let journal = env.journal();
    let file = journal.create("f").unwrap();
    file.write_at(0, b"abc").unwrap();
    assert_eq!(env.durable_ops(), 1);
    file.sync().unwrap();
    file.truncate(1).unwrap();
    journal.remove("f").unwrap();
    assert_eq!(env.durable_ops(), 4);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = env.store();
        store.put_if_absent("x", Bytes::new()).await.unwrap();
        store.delete("x").await.unwrap();
        store.get("missing").await.unwrap_err();
    });
    assert_eq!(env.durable_ops(), 6);
}

#[test]
fn truncate_is_durable_and_overwrites_are_not() {
    let env = MemEnv::new();
    let file = env.journal().create("f").unwrap();
    file.write_at(0, b"0123456789").unwrap();
    file.truncate(4).unwrap();
    let after = env.crash(CrashMode::DropUnsynced);
    assert_eq!(journal_contents(&after, "f"), b"0123");

    let file = after.journal().open("f").unwrap();
    file.write_at(4, b"45").unwrap();
    file.sync().unwrap();
    file.write_at(2, b"xx").unwrap();
    let again = after.crash(CrashMode::DropUnsynced);
    assert_eq!(journal_contents(&again, "f"), b"01");
}

#[test]
fn removed_files_stay_usable_through_open_handles() {
    let env = MemEnv::new();
    let journal = env.journal();
    let file = journal.create("f").unwrap();
    journal.remove("f").unwrap();
    file.write_at(0, b"still here").unwrap();
    assert_eq!(file.read_at(0, 100).unwrap(), b"still here");
    assert!(journal.list().unwrap().is_empty());
    assert!(env
        .crash(CrashMode::KeepRandomPrefix { seed: 0 })
        .journal()
        .list()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn faults_fail_matching_ops_the_given_number_of_times() {
    let env = MemEnv::new();
    let store = env.store();
    env.inject(Fault {
        op: FaultOp::Put,
        name_prefix: "segments/".to_string(),
        remaining: Some(2),
    });
    for _ in 0..2 {
        match store.put_if_absent("segments/1", Bytes::new()).await {
            Err(StoreError::Injected(name)) => assert_eq!(name, "segments/1"),
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
    assert_eq!(env.durable_ops(), 2);

    env.inject(Fault {
        op: FaultOp::Get,
        name_prefix: String::new(),
        remaining: None,
    });
    for _ in 0..5 {
        assert!(matches!(
            store.get_range("manifest/1", 0, 0).await,
            Err(StoreError::Injected(_))
        ));
    }
    env.clear_faults();
    store.get_range("manifest/1", 0, 0).await.unwrap();

    env.inject(Fault {
        op: FaultOp::List,
        name_prefix: "seg".to_string(),
        remaining: Some(1),
    });
    assert!(matches!(
        store.list("segments/").await,
        Err(StoreError::Injected(_))
    ));
    assert!(store.list("manifest/").await.is_ok());
    assert_eq!(store.list("segments/").await.unwrap().len(), 1);
}

#[test]
fn journal_faults() {
    let env = MemEnv::new();
    let journal = env.journal();
    let file = journal.create("seg-1").unwrap();
    let faults = [
        FaultOp::JournalWrite,
        FaultOp::JournalSync,
        FaultOp::JournalRead,
        FaultOp::JournalCreate,
        FaultOp::JournalRemove,
    ];
    for op in faults {
        env.inject(Fault {
            op,
            name_prefix: "seg-".to_string(),
            remaining: Some(1),
        });
    }
    let injected = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Injected(_)));
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

    env.inject(Fault {
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
    let env = MemEnv::new();
    let store = env.store();
    env.set_latency(Duration::from_millis(100));
    let start = Instant::now();
    store.put_if_absent("a", Bytes::new()).await.unwrap();
    store.head("a").await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(200));
    env.set_latency(Duration::ZERO);
    let start = Instant::now();
    store.head("a").await.unwrap();
    assert!(start.elapsed() < Duration::from_millis(100));
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
