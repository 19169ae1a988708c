//! Engine behaviour through the public API: concurrency, the single-writer
//! rule, snapshots, bounded map memory, group commit and damage handling.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, World};
use hlfs_format::{manifest_name, Manifest, WriterClaim};
use hlfs_store::layers::{CrashMode, Fault, FaultOp};
use hlfs_store::{BlobStore, JournalDir};
use hlfs_volume::{
    check, Backend, CreateOptions, Durability, OpenOptions, Prewrite, View, Volume, VolumeError,
};

async fn mem_volume(world: &World, size: u64) -> Volume {
    let create = CreateOptions {
        size,
        block_size: 4096,
        segment_size: 1 << 20,
    };
    Volume::create(&world.backend(), &create).await.unwrap();
    Volume::open(world.backend(), &OpenOptions::default())
        .await
        .unwrap()
}

/// Bytes of every blob in the store.
async fn stored_bytes(world: &World) -> u64 {
    world
        .env
        .store()
        .list("")
        .await
        .unwrap()
        .iter()
        .map(|b| b.size)
        .sum()
}

/// Writes the next manifest behind the volume's back, as another writer
/// would, changed by `edit`.
async fn forge_next_manifest(world: &World, edit: impl FnOnce(&mut Manifest)) {
    let store = world.env.store();
    let last = store
        .list("manifest/")
        .await
        .unwrap()
        .last()
        .unwrap()
        .name
        .clone();
    let mut m = Manifest::decode(&store.get(&last).await.unwrap()).unwrap();
    m.seq += 1;
    edit(&mut m);
    store
        .put_if_absent(&manifest_name(m.seq), m.encode().into())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_read_and_write_at_once() {
    let world = World::new();
    let vol = mem_volume(&world, 64 << 20).await;
    // Each task owns a stripe; readers check the stripe holds one whole write.
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let v = vol.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..50u8 {
                let off = t * (4 << 20) + (round as u64 % 7) * 12_345;
                let data = pattern(20_000, round.wrapping_add(t as u8));
                v.write(off, &data).await.unwrap();
                assert_eq!(v.read(off, data.len()).await.unwrap(), data);
                if round % 10 == 0 {
                    v.flush().await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    vol.close().await.unwrap();
}

#[tokio::test]
async fn second_writer_is_refused() {
    let world = World::new();
    let vol = mem_volume(&world, 1 << 20).await;
    match Volume::open(world.backend(), &OpenOptions::default()).await {
        Err(e @ VolumeError::Busy(_)) => assert!(e.to_string().contains("memory"), "{e}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a second writer was let in"),
    }
    // Readers of snapshots and of the head are welcome alongside.
    vol.write(0, b"hello").await.unwrap();
    vol.snapshot_create("s").await.unwrap();
    let snap = Volume::open_read_only(
        world.backend(),
        &OpenOptions::default(),
        View::Snapshot("s".into()),
    )
    .await
    .unwrap();
    assert_eq!(snap.read(0, 5).await.unwrap(), b"hello");
    vol.close().await.unwrap();
    // Closed: the next writer gets in.
    Volume::open(world.backend(), &OpenOptions::default())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
}

#[tokio::test]
async fn writer_on_another_host_is_refused_through_the_manifest() {
    let world = World::new();
    mem_volume(&world, 1 << 20).await.close().await.unwrap();
    // Another host claims the volume: a newer manifest names it as writer.
    forge_next_manifest(&world, |m| {
        m.writer = Some(WriterClaim {
            host: "other-host.example".into(),
            pid: 4242,
            since_ms: 1,
        })
    })
    .await;
    let err = Volume::open(world.backend(), &OpenOptions::default())
        .await
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(matches!(err, VolumeError::Busy(_)), "{text}");
    assert!(
        text.contains("other-host.example") && text.contains("4242"),
        "{text}"
    );
}

#[tokio::test]
async fn a_fenced_writer_stops_instead_of_forking_history() {
    let world = World::new();
    let vol = mem_volume(&world, 4 << 20).await;
    vol.write(0, &pattern(8192, 1)).await.unwrap();
    // Another writer takes over behind our back: its claim is in the next
    // manifest.
    forge_next_manifest(&world, |m| {
        m.writer = Some(WriterClaim {
            host: "other-host.example".into(),
            pid: 4242,
            since_ms: 2,
        })
    })
    .await;
    let err = vol.snapshot_create("x").await.expect_err("fenced");
    assert!(matches!(err, VolumeError::Fenced(_)), "{err}");
    assert!(
        vol.write(0, b"more").await.is_err(),
        "a fenced writer must stop writing"
    );
}

#[tokio::test]
async fn snapshot_cost_does_not_grow_with_volume_size() {
    let mut costs = Vec::new();
    for size in [1u64 << 30, 1 << 40] {
        let world = World::new();
        let vol = mem_volume(&world, size).await;
        for i in 0..64u64 {
            vol.write(i * 7 * 4096, &pattern(4096, i as u8))
                .await
                .unwrap();
        }
        vol.snapshot_create("warm").await.unwrap();
        vol.write(0, &pattern(4096, 9)).await.unwrap();
        let ops = world.faults.durable_ops();
        let bytes = stored_bytes(&world).await;
        let start = Instant::now();
        vol.snapshot_create("s").await.unwrap();
        let elapsed = start.elapsed();
        let bytes_after = stored_bytes(&world).await;
        costs.push((
            world.faults.durable_ops() - ops,
            bytes_after - bytes,
            elapsed,
        ));
    }
    let (small, big) = (costs[0], costs[1]);
    assert_eq!(small.0, big.0, "durable operations per snapshot");
    // A deeper tree has one more page per path: allow a few hundred bytes.
    assert!(
        big.1 <= small.1 + 512,
        "1 TiB snapshot wrote {} bytes, 1 GiB wrote {}",
        big.1,
        small.1
    );
    assert!(big.2 < Duration::from_secs(2));
}

#[tokio::test]
async fn snapshots_by_name_and_as_of_time_and_rollback_keeps_the_head() {
    let world = World::new();
    let vol = mem_volume(&world, 1 << 20).await;
    vol.write(0, b"one").await.unwrap();
    let s1 = vol.snapshot_create("one").await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    vol.write(0, b"two").await.unwrap();
    let s2 = vol.snapshot_create("two").await.unwrap();
    vol.write(0, b"three").await.unwrap();
    assert!(vol.snapshot_create("two").await.is_err(), "duplicate name");
    assert!(vol.snapshot_create("bad/name").await.is_err());

    let opts = OpenOptions::default();
    let open = |view| Volume::open_read_only(world.backend(), &opts, view);
    assert_eq!(
        open(View::AsOf(s1.created_ms))
            .await
            .unwrap()
            .read(0, 3)
            .await
            .unwrap(),
        b"one"
    );
    assert_eq!(
        open(View::AsOf(s2.created_ms + 1000))
            .await
            .unwrap()
            .read(0, 3)
            .await
            .unwrap(),
        b"two"
    );
    assert!(matches!(
        open(View::AsOf(s1.created_ms - 1)).await.err(),
        Some(VolumeError::SnapshotNotFound(_))
    ));

    let kept = vol.rollback("one").await.unwrap();
    assert_eq!(vol.read(0, 5).await.unwrap(), b"one\0\0");
    let names: Vec<_> = vol
        .snapshots()
        .into_iter()
        .map(|s| (s.name, s.automatic))
        .collect();
    assert!(names.contains(&(kept.clone(), true)), "{names:?}");
    assert_eq!(
        open(View::Snapshot(kept))
            .await
            .unwrap()
            .read(0, 5)
            .await
            .unwrap(),
        b"three"
    );
    vol.snapshot_delete("two").await.unwrap();
    assert!(vol.snapshot_delete("two").await.is_err());
    vol.close().await.unwrap();
    let vol = Volume::open(world.backend(), &OpenOptions::default())
        .await
        .unwrap();
    assert_eq!(vol.read(0, 5).await.unwrap(), b"one\0\0");
    assert_eq!(vol.snapshots().len(), 2);
}

#[tokio::test]
async fn group_commit_shares_syncs_between_concurrent_flushes() {
    let world = World::new();
    world.faults.set_latency(Duration::from_millis(1));
    let vol = mem_volume(&world, 16 << 20).await;
    let before = world.faults.durable_ops();
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let v = vol.clone();
        tasks.push(tokio::spawn(async move {
            v.write(t * 4096, &pattern(4096, t as u8)).await.unwrap();
            v.flush().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let syncs = world.faults.durable_ops() - before;
    assert!((1..64).contains(&syncs), "{syncs} syncs for 64 flushes");
}

#[tokio::test]
async fn huge_thin_volume_stays_within_the_map_budget() {
    let world = World::new();
    let create = CreateOptions {
        size: 16 << 40,
        block_size: 4096,
        segment_size: 4 << 20,
    };
    Volume::create(&world.backend(), &create).await.unwrap();
    let budget = OpenOptions {
        map_budget: 1 << 20,
        ..OpenOptions::default()
    };
    let vol = Volume::open(world.backend(), &budget).await.unwrap();
    let blocks = (16u64 << 40) / 4096;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut written = Vec::new();
    let mut peak = 0;
    for i in 0..3000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let block = x % blocks;
        vol.write(block * 4096, &i.to_le_bytes()).await.unwrap();
        written.push((block, i));
        peak = peak.max(vol.map_pages().0);
    }
    let (_, limit) = vol.map_pages();
    assert!(peak <= limit, "{peak} map pages in memory, budget {limit}");
    vol.close().await.unwrap();
    let vol = Volume::open(world.backend(), &budget).await.unwrap();
    let mut last = std::collections::HashMap::new();
    for (b, i) in &written {
        last.insert(*b, *i);
    }
    for (b, i) in last {
        assert_eq!(vol.read(b * 4096, 8).await.unwrap(), i.to_le_bytes());
    }
    assert!(vol.map_pages().0 <= limit);
    assert_eq!(
        vol.allocated_bytes(),
        written
            .iter()
            .map(|w| w.0)
            .collect::<std::collections::HashSet<_>>()
            .len() as u64
            * 4096
    );
}

#[tokio::test]
async fn bad_requests_get_errors_not_panics() {
    let world = World::new();
    let vol = mem_volume(&world, 10_000).await;
    assert!(matches!(
        vol.read(9_000, 2_000).await,
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.write(u64::MAX, b"x").await,
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.trim(10_001, 0).await,
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(vol.resize(5).await.is_err(), "shrinking");
    // The last partial block works like any other.
    vol.write(9_990, &[7; 10]).await.unwrap();
    assert_eq!(
        vol.read(9_985, 15).await.unwrap(),
        [&[0u8; 5][..], &[7; 10]].concat()
    );
    vol.resize(20_000).await.unwrap();
    assert_eq!(
        vol.read(9_990, 20).await.unwrap(),
        [&[7u8; 10][..], &[0; 10]].concat()
    );
    for bs in [0u32, 100, 256, 1 << 17] {
        let create = CreateOptions {
            size: 1 << 20,
            block_size: bs,
            segment_size: 1 << 20,
        };
        let e = Volume::create(&World::new().backend(), &create).await;
        assert!(
            matches!(e, Err(VolumeError::InvalidArgument(_))),
            "block size {bs}"
        );
    }
    vol.close().await.unwrap();
    assert!(matches!(vol.write(0, b"x").await, Err(VolumeError::Closed)));
}

/// A failed journal sync fails the flush and stops writes, and what was
/// acknowledged before is kept: on the memory store and on a real local
/// directory, both through the same fault layer.
#[tokio::test]
async fn store_errors_fail_the_request_and_keep_acknowledged_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.hlfs");
    let world = World::new();
    let local = hlfs_store::layers::Faults::new();
    let on_memory = || world.backend();
    let on_disk = || Backend::local(&path, true).unwrap().with_faults(&local);
    let create = CreateOptions {
        size: 4 << 20,
        segment_size: 1 << 20,
        ..CreateOptions::default()
    };
    type Backends<'a> = Vec<(&'a dyn Fn() -> Backend, &'a hlfs_store::layers::Faults)>;
    let backends: Backends = vec![(&on_memory, &world.faults), (&on_disk, &local)];
    for (backend, faults) in backends {
        Volume::create(&backend(), &create).await.unwrap();
        let vol = Volume::open(backend(), &OpenOptions::default())
            .await
            .unwrap();
        vol.write(0, &pattern(4096, 3)).await.unwrap();
        vol.flush().await.unwrap();
        faults.inject(Fault {
            op: FaultOp::JournalSync,
            name_prefix: String::new(),
            remaining: Some(1),
        });
        vol.write(8192, &pattern(4096, 4)).await.unwrap();
        let err = vol.flush().await.expect_err("sync failure surfaces");
        assert!(matches!(err, VolumeError::Store(_)), "{err}");
        // A failed sync leaves the journal's state unknown: writes stop.
        assert!(matches!(
            vol.write(0, b"x").await,
            Err(VolumeError::Failed(_))
        ));
        drop(vol);
        let vol = Volume::open(backend(), &OpenOptions::default())
            .await
            .unwrap();
        assert_eq!(vol.read(0, 4096).await.unwrap(), pattern(4096, 3));
        vol.close().await.unwrap();
        assert!(check(backend()).await.unwrap().is_ok());
    }
}

/// Every request the engine makes reaches the store through the counting
/// layer: what it stored is what was put.
#[tokio::test]
async fn store_requests_and_bytes_are_counted() {
    let world = World::new();
    let vol = mem_volume(&world, 8 << 20).await;
    let blobs = || async { world.env.store().list("").await.unwrap() };
    let sum = |b: &[hlfs_store::BlobMeta]| b.iter().map(|m| m.size).sum::<u64>();
    let (before, stored_before) = (vol.store_counts(), blobs().await);
    assert!(before.lists >= 1, "the open listed the manifests");
    // Three segments' worth: three seals, uploads and manifests at least.
    for i in 0..3u64 {
        vol.write(i << 20, &pattern(1 << 20, i as u8))
            .await
            .unwrap();
    }
    vol.snapshot_create("s").await.unwrap();
    vol.close().await.unwrap();
    let (after, stored_after) = (vol.store_counts(), blobs().await);
    let puts = after.puts - before.puts;
    assert_eq!(puts, (stored_after.len() - stored_before.len()) as u64);
    assert!(puts >= 4, "{after:?}");
    assert_eq!(
        after.put_bytes - before.put_bytes,
        sum(&stored_after) - sum(&stored_before)
    );
    assert_eq!(after.failures, 0);
}

/// The head and a snapshot opened with one page cache share its budget.
#[tokio::test]
async fn opens_can_share_one_page_cache() {
    let world = World::new();
    let create = CreateOptions {
        size: 1 << 30,
        block_size: 4096,
        segment_size: 1 << 20,
    };
    Volume::create(&world.backend(), &create).await.unwrap();
    let cache = hlfs_volume::PageCache::new(64 * 6200);
    let opts = OpenOptions {
        page_cache: Some(cache.clone()),
        ..OpenOptions::default()
    };
    let vol = Volume::open(world.backend(), &opts).await.unwrap();
    // Scattered blocks: one leaf each.
    for i in 0..200u64 {
        vol.write(i * (2 << 20), &pattern(4096, i as u8))
            .await
            .unwrap();
    }
    vol.snapshot_create("s").await.unwrap();
    let snap = Volume::open_read_only(world.backend(), &opts, View::Snapshot("s".into()))
        .await
        .unwrap();
    for i in (0..200u64).rev() {
        assert_eq!(
            snap.read(i * (2 << 20), 4096).await.unwrap(),
            pattern(4096, i as u8)
        );
        assert_eq!(
            vol.read(i * (2 << 20), 4096).await.unwrap(),
            pattern(4096, i as u8)
        );
    }
    let (pages, budget) = cache.pages();
    assert_eq!(snap.map_pages(), vol.map_pages());
    assert!(pages <= budget, "{pages} pages for a budget of {budget}");
    vol.close().await.unwrap();
}

#[tokio::test]
async fn arc_volume_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>(_: &T) {}
    let world = World::new();
    let vol = Arc::new(mem_volume(&world, 1 << 20).await);
    assert_send_sync(&vol);
    vol.close().await.unwrap();
}

#[tokio::test]
async fn a_torn_journal_tail_is_dropped_on_the_local_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.hlfs");
    let create = CreateOptions {
        size: 1 << 20,
        ..CreateOptions::default()
    };
    Volume::create(&Backend::local(&path, true).unwrap(), &create)
        .await
        .unwrap();
    let vol = Volume::open(
        Backend::local(&path, false).unwrap(),
        &OpenOptions::default(),
    )
    .await
    .unwrap();
    vol.write(0, &pattern(4096, 1)).await.unwrap();
    vol.flush().await.unwrap();
    vol.write(4096, &pattern(4096, 2)).await.unwrap();
    drop(vol); // the process dies: no close

    // Damage the last record (the unflushed write) and add garbage after it.
    let journal_dir = path.join(hlfs_volume::LOCAL_JOURNAL_DIR);
    let journal = std::fs::read_dir(&journal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "journal"))
        .unwrap();
    let mut bytes = std::fs::read(&journal).unwrap();
    let len = bytes.len();
    bytes[len - 100] ^= 1;
    bytes.extend_from_slice(&[0xAA; 300]);
    std::fs::write(&journal, bytes).unwrap();

    let report = check(Backend::local(&path, false).unwrap()).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert!(
        !report.warnings.is_empty(),
        "a torn tail deserves a warning"
    );

    let vol = Volume::open(
        Backend::local(&path, false).unwrap(),
        &OpenOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        vol.read(0, 4096).await.unwrap(),
        pattern(4096, 1),
        "flushed write kept"
    );
    assert_eq!(
        vol.read(4096, 4096).await.unwrap(),
        vec![0; 4096],
        "torn write dropped"
    );
    vol.write(8192, &pattern(4096, 3)).await.unwrap();
    vol.close().await.unwrap();
    let report = check(Backend::local(&path, false).unwrap()).await.unwrap();
    assert!(report.is_ok() && report.warnings.is_empty(), "{report:?}");
}

#[tokio::test]
async fn trim_and_write_zeroes_release_space() {
    let world = World::new();
    let vol = mem_volume(&world, 8 << 20).await;
    vol.write(0, &pattern(2 << 20, 1)).await.unwrap();
    vol.write(4 << 20, &pattern(1 << 20, 2)).await.unwrap();
    assert_eq!(vol.allocated_bytes(), 3 << 20);
    vol.trim(0, 2 << 20).await.unwrap();
    assert_eq!(vol.allocated_bytes(), 1 << 20, "trim releases whole blocks");
    vol.write_zeroes(4 << 20, 1 << 20).await.unwrap();
    assert_eq!(
        vol.allocated_bytes(),
        0,
        "write-zeroes releases whole blocks"
    );
    let holes = vol.extents(0, 8 << 20, 100).await.unwrap();
    assert_eq!(holes.len(), 1);
    assert!(!holes[0].data && holes[0].len == 8 << 20, "{holes:?}");
    vol.close().await.unwrap();
    let vol = Volume::open(world.backend(), &OpenOptions::default())
        .await
        .unwrap();
    assert_eq!(vol.allocated_bytes(), 0, "after reopen too");
    vol.close().await.unwrap();
}

#[tokio::test]
async fn a_failed_sync_while_sealing_stops_the_volume() {
    let world = World::new();
    let vol = mem_volume(&world, 8 << 20).await;
    vol.write(0, &pattern(4096, 1)).await.unwrap();
    vol.flush().await.unwrap();
    // The next sync fails, whoever makes it: the background seal of the
    // full segment or the flush.
    world.faults.inject(Fault {
        op: FaultOp::JournalSync,
        name_prefix: String::new(),
        remaining: Some(1),
    });
    // 1.5 MiB fills the 1 MiB segment: a seal starts in the background.
    let _ = vol.write(4096, &pattern(3 << 19, 2)).await;
    // Let the seal run first, so that it is the one to see the error: the
    // flush after it must not report success on its own clean sync.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        vol.flush().await.is_err(),
        "a lost sync must not be reported as durable"
    );
    assert!(
        vol.write(0, b"x").await.is_err(),
        "the volume stops taking writes"
    );
    assert!(vol.close().await.is_err(), "close reports the failure");
    // ...and releases the volume for the next writer.
    let vol = Volume::open(world.backend(), &OpenOptions::default())
        .await
        .unwrap();
    assert_eq!(
        vol.read(0, 4096).await.unwrap(),
        pattern(4096, 1),
        "flushed data kept"
    );
    vol.close().await.unwrap();
}

/// Releasing written journal pages waits for their writeback, which
/// reports a write error of the file once: a later fdatasync would then
/// succeed over the lost bytes. So a failed release stops the volume as a
/// failed sync does.
#[tokio::test]
async fn a_failed_release_of_journal_pages_stops_the_volume() {
    let world = World::new();
    let create = CreateOptions {
        size: 64 << 20,
        block_size: 4096,
        segment_size: 32 << 20,
    };
    Volume::create(&world.backend(), &create).await.unwrap();
    let vol = Volume::open(world.backend(), &OpenOptions::default())
        .await
        .unwrap();
    vol.write(0, &pattern(4096, 1)).await.unwrap();
    vol.flush().await.unwrap();
    world.faults.inject(Fault {
        op: FaultOp::JournalRelease,
        name_prefix: String::new(),
        remaining: Some(1),
    });
    // The first release comes once two 8 MiB chunks of journal are full.
    let mut failed = false;
    for i in 0..20u64 {
        if vol
            .write((1 + i) << 20, &pattern(1 << 20, 2))
            .await
            .is_err()
        {
            failed = true;
            break;
        }
    }
    assert!(failed, "the write that released the pages failed");
    assert!(vol.flush().await.is_err(), "nothing after it is durable");
    assert!(vol.close().await.is_err(), "close reports the failure");
    let vol = Volume::open(world.backend(), &OpenOptions::default())
        .await
        .unwrap();
    assert_eq!(vol.read(0, 4096).await.unwrap(), pattern(4096, 1));
    vol.close().await.unwrap();
}

#[tokio::test]
async fn recovery_makes_the_writes_it_replays_durable() {
    let world = World::new();
    let vol = mem_volume(&world, 1 << 20).await;
    vol.write(0, &pattern(8192, 3)).await.unwrap();
    // The process dies without a flush but the machine stays up: the
    // journal still holds the write, unsynced.
    drop(vol);
    let vol = Volume::open(world.backend(), &OpenOptions::default())
        .await
        .unwrap();
    assert_eq!(vol.read(0, 8192).await.unwrap(), pattern(8192, 3));
    // A client sees the write and flushes; then the power goes.
    vol.flush().await.unwrap();
    let after = world.power_cut(CrashMode::DropUnsynced).await;
    drop(vol);
    let vol = Volume::open(after.backend(), &OpenOptions::default())
        .await
        .unwrap();
    assert_eq!(
        vol.read(0, 8192).await.unwrap(),
        pattern(8192, 3),
        "a write seen after recovery was lost"
    );
}

/// Writable volumes sharing one page cache keep their dirty pages, together,
/// within its budget.
#[tokio::test]
async fn writers_sharing_a_page_cache_stay_within_its_budget() {
    let cache = hlfs_volume::PageCache::new(64 * 6200);
    let opts = OpenOptions {
        page_cache: Some(cache.clone()),
        ..OpenOptions::default()
    };
    let create = CreateOptions {
        size: 16 << 40,
        block_size: 4096,
        segment_size: 4 << 20,
    };
    let worlds: Vec<World> = (0..3).map(|_| World::new()).collect();
    let mut vols = Vec::new();
    for w in &worlds {
        Volume::create(&w.backend(), &create).await.unwrap();
        vols.push(Volume::open(w.backend(), &opts).await.unwrap());
    }
    let budget = cache.budget_pages();
    for i in 0..300u64 {
        for (k, vol) in vols.iter().enumerate() {
            // Far apart: a new path of pages each time.
            let at = (i * 3 + k as u64) * (1 << 31);
            vol.write(at, &pattern(4096, i as u8)).await.unwrap();
            let (pages, _) = cache.pages();
            assert!(pages <= budget, "{pages} pages in a budget of {budget}");
        }
    }
    for vol in &vols {
        vol.close().await.unwrap();
    }
}

/// Under synced load the journal is written ahead with zeros, except with
/// remote durability (each flush seals its segment, so a window would be
/// cut off at once). `check` takes the zeros past a journal's log as its
/// end, and warns once other bytes follow them.
#[tokio::test]
async fn the_journals_window_and_what_check_says_of_it() {
    for (durability, ahead) in [(Durability::Local, true), (Durability::Remote, false)] {
        let world = World::new();
        let create = CreateOptions {
            size: 16 << 20,
            block_size: 4096,
            segment_size: 1 << 20,
        };
        Volume::create(&world.backend(), &create).await.unwrap();
        let opts = OpenOptions {
            durability,
            prewrite: Prewrite::Always,
            ..OpenOptions::default()
        };
        let vol = Volume::open(world.backend(), &opts).await.unwrap();
        for i in 0..20u64 {
            vol.write(i * 4096, &pattern(4096, i as u8)).await.unwrap();
            vol.flush().await.unwrap();
        }
        // The filler runs on a thread of its own.
        let started = Instant::now();
        while ahead
            && vol.figures().journal_prewritten_bytes == 0
            && started.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let prewritten = vol.figures().journal_prewritten_bytes;
        assert_eq!(prewritten > 0, ahead, "{durability:?}: {prewritten}");
        if !ahead {
            continue;
        }
        let image = world.power_cut(CrashMode::DropUnsynced).await;
        let report = check(image.backend()).await.unwrap();
        assert!(report.is_ok() && report.warnings.is_empty(), "{report:?}");
        let journal = image.env.journal();
        let name = journal
            .list()
            .unwrap()
            .into_iter()
            .find(|n| n.ends_with(".journal"))
            .expect("a journal");
        let file = journal.open(&name).unwrap();
        let len = file.len().unwrap();
        file.write_at(len - 1, b"x").unwrap();
        let report = check(image.backend()).await.unwrap();
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("yet bytes follow")),
            "{report:?}"
        );
        // What was flushed is all there.
        let vol = Volume::open(image.backend(), &OpenOptions::default())
            .await
            .unwrap();
        for i in 0..20u64 {
            assert_eq!(
                vol.read(i * 4096, 4096).await.unwrap(),
                pattern(4096, i as u8)
            );
        }
        vol.close().await.unwrap();
    }
}
