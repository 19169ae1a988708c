//! Clones through the engine's API: the pins that keep a parent's
//! snapshot, and their races with its deletion.

mod common;

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
            size: 4 << 20,
            block_size: 4096,
            segment_size: 64 << 10,
        };
        Volume::create(&s.parent_backend(), &create).await.unwrap();
        let vol = Volume::open(s.parent_backend(), &OpenOptions::default())
            .await
            .unwrap();
        vol.write(8192, &pattern(100_000, 7)).await.unwrap();
        vol.snapshot_create("golden").await.unwrap();
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
