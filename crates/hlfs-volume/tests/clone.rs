//! Clones through the engine's API: the pins that keep a parent's
//! snapshot, and their races with its deletion.

mod common;

/// A flatten that never waits: these tests are about what it copies, on
/// clocks that may not move.
const UNTHROTTLED: hlfs_volume::FlattenOptions = hlfs_volume::FlattenOptions {
    copy_rate: None,
    busy_rate: None,
};

use std::time::Duration;

use common::{pattern, World};
use hlfs_store::time::{Jitter, ManualClock};
use hlfs_store::BlobStore;
use hlfs_volume::{
    clone_volume, Backend, CreateOptions, ErrorKind, OpenOptions, Others, View, Volume,
};

const PARENT: &str = "memory://parent";
const CLONE: &str = "memory://clone";

/// A parent with snapshot `golden` and a clone's world, each found by
/// its address; all on `clock`.
struct Setup {
    parent: World,
    clone: World,
    clock: ManualClock,
}

impl Setup {
    async fn new() -> Setup {
        Setup::with_parent_of(4 << 20).await
    }

    /// A parent of `size` bytes (at least 108 192) whose snapshot
    /// "golden" holds `pattern(100_000, 7)` at 8192, offered for clones.
    async fn with_parent_of(size: u64) -> Setup {
        let s = Setup {
            parent: World::new(),
            clone: World::new(),
            clock: ManualClock::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64,
            ),
        };
        let create = CreateOptions {
            size,
            block_size: 4096,
            segment_size: 64 << 10,
        };
        Volume::create(&s.parent_backend(), &create).await.unwrap();
        let vol = Volume::open(s.parent_backend(), &OpenOptions::default())
            .await
            .unwrap();
        vol.write(8192, &pattern(100_000, 7)).await.unwrap();
        vol.snapshot_create("golden").await.unwrap();
        // A v3 volume is no parent until its writer makes it v4: a binary
        // that knows no pins could delete the snapshot under a clone.
        let refused = s.make_clone().await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("format v3")),
            "{refused:?}"
        );
        assert!(s.pins().await.is_empty(), "a refused clone's pin stays");
        vol.offer_for_clone(&hlfs_volume::CloneSource::Snapshot("golden".into()))
            .await
            .unwrap();
        vol.close().await.unwrap();
        s
    }

    fn others(&self) -> Others {
        let (parent, clone) = (self.parent.env.clone(), self.clone.env.clone());
        let clock = self.clock.clock();
        Others::from_fn(move |address| {
            let env = match address {
                PARENT => parent.clone(),
                CLONE => clone.clone(),
                _ => return Err(hlfs_volume::VolumeError::NotFound(address.into())),
            };
            Ok(Backend {
                location: address.into(),
                ..World::over(env).backend()
            }
            .with_time(clock.clone(), Jitter::seeded(1)))
        })
    }

    fn parent_backend(&self) -> Backend {
        self.others().open(PARENT).unwrap()
    }

    fn clone_backend(&self) -> Backend {
        self.others().open(CLONE).unwrap()
    }

    async fn make_clone(&self) -> hlfs_volume::Result<hlfs_volume::CloneInfo> {
        clone_volume(
            self.parent_backend(),
            "golden",
            &self.clone_backend(),
            &OpenOptions::default(),
        )
        .await
    }

    /// A setup whose golden snapshot has data in every block (pattern
    /// `seed`, returned), so that every step of a flatten copies, and a
    /// clone of it.
    async fn cloned_full_parent(seed: u8) -> (Setup, Vec<u8>) {
        let s = Setup::new().await;
        let parent = Volume::open(s.parent_backend(), &OpenOptions::default())
            .await
            .unwrap();
        let base = pattern(4 << 20, seed);
        parent.write(0, &base).await.unwrap();
        parent.snapshot_delete("golden").await.unwrap();
        parent.snapshot_create("golden").await.unwrap();
        parent.close().await.unwrap();
        s.make_clone().await.unwrap();
        (s, base)
    }

    async fn pins(&self) -> Vec<String> {
        let store = self.parent_backend().store;
        store
            .list("clones/")
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.name)
            .collect()
    }
}

/// A parent whose size ends inside a block: a clone grown past it reads
/// the rest of that block, and what follows, as zeros, wherever a read
/// starts (one starting just past the parent's end asked the parent for
/// nothing at an offset it refused).
#[tokio::test]
async fn a_grown_clone_reads_zeros_past_its_parents_end_inside_a_block() {
    let parent_size = 110_000;
    let s = Setup::with_parent_of(parent_size).await;
    s.make_clone().await.unwrap();
    let clone = Volume::open(s.clone_backend(), &OpenOptions::default())
        .await
        .unwrap();
    clone.resize(200_000).await.unwrap();
    let golden = pattern(100_000, 7);
    let got = clone.read(parent_size + 1, 1000).await.unwrap();
    assert!(got.iter().all(|&b| b == 0), "past the parent's end");
    let got = clone.read(100_000, 20_000).await.unwrap();
    assert_eq!(&got[..8192], &golden[100_000 - 8192..], "the parent's data");
    assert!(got[8192..].iter().all(|&b| b == 0), "then zeros");
    clone.close().await.unwrap();
}

#[tokio::test]
async fn a_clone_is_refused_while_its_snapshot_is_being_deleted() {
    let s = Setup::new().await;
    let lsn = Volume::open_read_only(s.parent_backend(), &OpenOptions::default(), View::Head)
        .await
        .unwrap()
        .snapshots()[0]
        .lsn;
    // A deletion in progress: its mark is in the parent's store.
    let mark = format!("clones/deleting-{lsn}");
    let store = s.parent_backend().store;
    store
        .put_if_absent(&mark, bytes::Bytes::from_static(b"x"))
        .await
        .unwrap();
    let refused = s
        .make_clone()
        .await
        .expect_err("cloned a snapshot being deleted");
    assert_eq!(refused.kind(), ErrorKind::Busy, "{refused}");
    assert!(refused.to_string().contains("being deleted"), "{refused}");
    assert_eq!(
        s.pins().await,
        vec![mark.clone()],
        "the refused clone left its pin"
    );

    // The deletion ends (or died long ago): the clone is made, and then it
    // is the deletion that is refused, its mark removed.
    s.clock.advance(Duration::from_secs(11 * 60));
    s.make_clone().await.expect("a stale mark refuses nothing");
    store.delete(&mark).await.unwrap();
    let parent = Volume::open(s.parent_backend(), &OpenOptions::default())
        .await
        .unwrap();
    let refused = parent.snapshot_delete("golden").await.unwrap_err();
    assert!(refused.to_string().contains(CLONE), "{refused}");
    let pins = s.pins().await;
    assert!(pins.len() == 1 && !pins[0].contains("deleting"), "{pins:?}");
    parent.close().await.unwrap();
}

#[tokio::test]
async fn the_pin_of_a_clone_that_is_gone_goes_once_a_minute_old() {
    let s = Setup::new().await;
    let made = s.make_clone().await.unwrap();
    let clone = Volume::open(s.clone_backend(), &OpenOptions::default())
        .await
        .unwrap();
    assert_eq!(
        clone.read(8192, 100_000).await.unwrap(),
        pattern(100_000, 7),
        "the clone reads its parent's snapshot"
    );
    clone.close().await.unwrap();
    // The clone's store is emptied behind the parent's back.
    for blob in s.clone.env.store().list("").await.unwrap() {
        s.clone.env.store().delete(&blob.name).await.unwrap();
    }
    let parent = Volume::open(s.parent_backend(), &OpenOptions::default())
        .await
        .unwrap();
    let young = parent.snapshot_delete("golden").await.unwrap_err();
    assert!(young.to_string().contains("being made, or gone"), "{young}");
    s.clock.advance(Duration::from_secs(61));
    parent
        .snapshot_delete("golden")
        .await
        .expect("a stale pin holds nothing");
    assert!(s.pins().await.is_empty(), "pin of {} left", made.uuid);
    parent.close().await.unwrap();
}

/// A boot storm: clones of one remote base, open in one process, read all
/// at once with a cold cache. The base's data comes from its store once:
/// the read cache is the process's, keyed by the base's id, and
/// concurrent misses on a chunk wait for one fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_of_one_base_read_it_from_its_store_once() {
    const CLONES: usize = 8;
    const SIZE: u64 = 8 << 20;
    let base = World::new();
    let metrics = std::sync::Arc::new(hlfs_store::layers::StoreMetrics::default());
    let cache = hlfs_volume::ReadCache::scratch(1 << 30).unwrap();
    let (env, counted, shared) = (base.env.clone(), metrics.clone(), cache.clone());
    let worlds: Vec<World> = (0..CLONES).map(|_| World::new()).collect();
    let clone_envs: Vec<_> = worlds.iter().map(|w| w.env.clone()).collect();
    let others = Others::from_fn(move |address| {
        if address == PARENT {
            // A remote store, behind the process's read cache, counted.
            let plain = World::over(env.clone()).backend();
            return Ok(Backend {
                location: address.into(),
                store: std::sync::Arc::new(hlfs_store::layers::Metered::new(
                    plain.store.clone(),
                    counted.clone(),
                )),
                remote: true,
                cache: Some(shared.clone()),
                ..plain
            });
        }
        let i: usize = address
            .strip_prefix("memory://clone-")
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| hlfs_volume::VolumeError::NotFound(address.into()))?;
        Ok(Backend {
            location: address.into(),
            ..World::over(clone_envs[i].clone()).backend()
        })
    });
    let parent_backend = others.open(PARENT).unwrap();
    let create = CreateOptions {
        size: SIZE,
        block_size: 4096,
        segment_size: 1 << 20,
    };
    Volume::create(&parent_backend, &create).await.unwrap();
    let vol = Volume::open(parent_backend.clone(), &OpenOptions::default())
        .await
        .unwrap();
    let data = pattern(SIZE as usize, 3);
    vol.write(0, &data).await.unwrap();
    vol.snapshot_create("golden").await.unwrap();
    vol.offer_for_clone(&hlfs_volume::CloneSource::Snapshot("golden".into()))
        .await
        .unwrap();
    vol.close().await.unwrap();

    let mut clones = Vec::new();
    for i in 0..CLONES {
        let at = others.open(&format!("memory://clone-{i}")).unwrap();
        clone_volume(
            others.open(PARENT).unwrap(),
            "golden",
            &at,
            &OpenOptions::default(),
        )
        .await
        .unwrap();
        clones.push(Volume::open(at, &OpenOptions::default()).await.unwrap());
    }
    let before = metrics.counts();
    let reads = clones.iter().map(|c| async move {
        let mut out = vec![0u8; SIZE as usize];
        for (k, chunk) in out.chunks_mut(256 << 10).enumerate() {
            c.read_into(k as u64 * (256 << 10), chunk).await.unwrap();
        }
        out
    });
    for got in futures::future::join_all(reads).await {
        assert!(got == data, "a clone read something else");
    }
    let fetched = metrics.counts().get_bytes - before.get_bytes;
    // One copy of the data, and its map pages and checkpoints.
    assert!(
        (SIZE..SIZE + SIZE / 8).contains(&fetched),
        "{CLONES} clones fetched {fetched} bytes of a {SIZE}-byte base"
    );
    for c in clones {
        c.close().await.unwrap();
    }
}

/// A flatten never overwrites what the guest writes meanwhile: a writer
/// keeps writing blocks the parent has while the flatten copies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flatten_never_overwrites_a_write_made_meanwhile() {
    let (s, base) = Setup::cloned_full_parent(11).await;
    let clone = Volume::open(s.clone_backend(), &OpenOptions::default())
        .await
        .unwrap();
    // Blocks written before the flatten starts, and while it runs: one
    // 4 KiB write in every 64 KiB, from the end back, so that writes land
    // ahead of the flatten's steps, among them and behind them.
    let mut expected = base.clone();
    let mut write = async |k: u64| {
        let off = (4 << 20) - (k % 64 + 1) * (64 << 10) + 4096 * (k % 16);
        let data = pattern(4096, (k % 200) as u8 + 20);
        clone.write(off, &data).await.unwrap();
        expected[off as usize..off as usize + 4096].copy_from_slice(&data);
    };
    for k in 0..8 {
        write(k).await;
    }
    let flattening = {
        let clone = clone.clone();
        tokio::spawn(async move { clone.flatten(UNTHROTTLED, &|_| {}).await })
    };
    let mut k = 8;
    while !flattening.is_finished() || k < 72 {
        write(k).await;
        k += 1;
        tokio::task::yield_now().await;
    }
    flattening.await.unwrap().expect("flatten");
    assert!(clone.parent().is_none());
    let got = clone.read(0, 4 << 20).await.unwrap();
    let wrong = got
        .chunks(4096)
        .zip(expected.chunks(4096))
        .position(|(g, e)| g != e);
    assert_eq!(wrong, None, "block lost to a copy ({k} writes)");
    clone.close().await.unwrap();
}

/// A flatten copies no faster than its rate, is a task of the volume
/// (closing the volume stops it, its intent stays in the clone's store),
/// and goes on by itself at the clone's next writable open, to the end:
/// the link, the pin and the intent go, and the clone reads the same.
#[tokio::test]
async fn a_flatten_keeps_its_rate_and_goes_on_after_a_stop() {
    let (s, base) = Setup::cloned_full_parent(12).await;
    let intent = || async {
        let store = s.clone_backend().store;
        store.head("clones/flattening").await.unwrap().is_some()
    };
    let settle = async |clone: &Volume, done: u64| {
        for _ in 0..2000 {
            if clone.flatten_progress().map(|p| p.done) == Some(done) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!(
            "the flatten did not get to {done}: {:?}",
            clone.flatten_progress()
        );
    };

    let clone = Volume::open(s.clone_backend(), &OpenOptions::default())
        .await
        .unwrap();
    let slow = hlfs_volume::FlattenOptions {
        copy_rate: Some(1 << 20),
        busy_rate: None,
    };
    let flattening = {
        let clone = clone.clone();
        tokio::spawn(async move { clone.flatten(slow, &|_| {}).await })
    };
    // A step of 1 MiB, then a second's wait on a clock that stands still.
    settle(&clone, 1 << 20).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(clone.flatten_progress().unwrap().done, 1 << 20, "too fast");
    s.clock.advance(Duration::from_secs(1));
    settle(&clone, 2 << 20).await;
    assert!(intent().await, "no intent while flattening");

    clone.close().await.unwrap();
    let stopped = flattening.await.unwrap();
    assert!(
        stopped
            .as_ref()
            .is_err_and(|e| e.kind() == ErrorKind::Closed),
        "{stopped:?}"
    );
    assert!(intent().await, "the intent of a flatten cut off went");

    // Reopened: it goes on by itself, at the default rates.
    let clone = Volume::open(s.clone_backend(), &OpenOptions::default())
        .await
        .unwrap();
    for _ in 0..5000 {
        if clone.parent().is_none() && !intent().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(clone.parent().is_none(), "the flatten did not go on");
    assert!(!intent().await, "the intent of a flatten that ended stays");
    assert!(s.pins().await.is_empty(), "the pin stays");
    assert_eq!(clone.read(0, 4 << 20).await.unwrap(), base);
    let refused = clone.flatten(UNTHROTTLED, &|_| {}).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("not a clone")),
        "{refused:?}"
    );
    clone.close().await.unwrap();
    // The parent's snapshot is free to go.
    let parent = Volume::open(s.parent_backend(), &OpenOptions::default())
        .await
        .unwrap();
    parent.snapshot_delete("golden").await.unwrap();
    parent.close().await.unwrap();
}

/// An intent a writable open cannot act on is removed, not kept: one on a
/// clone that has since taken a snapshot (the flatten would be refused),
/// and one left on a volume whose flatten ended before its removal.
#[tokio::test]
async fn a_flatten_intent_that_cannot_go_on_is_removed_at_open() {
    let (s, _) = Setup::cloned_full_parent(13).await;
    let put_intent = || async {
        let store = s.clone_backend().store;
        store
            .put_if_absent("clones/flattening", bytes::Bytes::from_static(b"x"))
            .await
            .unwrap();
    };
    let intent = || async {
        let store = s.clone_backend().store;
        store.head("clones/flattening").await.unwrap().is_some()
    };
    let opts = OpenOptions::default();
    let open = || Volume::open(s.clone_backend(), &opts);

    let clone = open().await.unwrap();
    clone.snapshot_create("c1").await.unwrap();
    clone.close().await.unwrap();
    put_intent().await;
    let clone = open().await.unwrap();
    assert!(!intent().await, "the intent of a refused flatten stays");
    assert!(
        clone.parent().is_some(),
        "a refused flatten dropped the link"
    );

    clone.snapshot_delete("c1").await.unwrap();
    clone.flatten(UNTHROTTLED, &|_| {}).await.unwrap();
    clone.close().await.unwrap();
    put_intent().await;
    let clone = open().await.unwrap();
    assert!(!intent().await, "the intent of an ended flatten stays");
    clone.close().await.unwrap();
}
