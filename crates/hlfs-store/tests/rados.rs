//! The conformance suite against a real Ceph cluster, straight to its OSDs
//! through librados. Needs a cluster and a pool: `scripts/test-rados.sh`
//! brings up a single-node Ceph on 127.0.0.1, runs this, and tears it down.
#![cfg(feature = "rados")]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hlfs_store::conformance::run_blob_store_suite;
use hlfs_store::layers::{RetryPolicy, Retrying};
use hlfs_store::time::{Clock, Jitter};
use hlfs_store::{BlobStore, CephSettings, RadosStore, StoreError};

fn test_uri() -> String {
    std::env::var("HLFS_RADOS_TEST_URI")
        .expect("HLFS_RADOS_TEST_URI (e.g. rados://hlfs/conformance) and CEPH_CONF must be set")
}

fn store(uri: &str, piece: Option<u64>) -> RadosStore {
    let store = RadosStore::from_uri(uri, &CephSettings::default(), Duration::from_secs(10))
        .expect("Ceph connection");
    match piece {
        Some(bytes) => store.with_piece_size(bytes),
        None => store,
    }
}

/// As volumes use it: each request made once by the store, retried by the
/// layer around it.
fn retried(store: RadosStore) -> Arc<dyn BlobStore> {
    Arc::new(Retrying::new(
        Arc::new(store),
        RetryPolicy::within(Duration::from_secs(30)),
        Clock::system(),
        Jitter::from_entropy(),
    ))
}

#[tokio::test]
#[ignore = "needs a Ceph cluster; run scripts/test-rados.sh"]
async fn rados_store_passes_the_conformance_suite() {
    run_blob_store_suite(retried(store(&test_uri(), None))).await;
}

#[tokio::test]
#[ignore = "needs a Ceph cluster; run scripts/test-rados.sh"]
async fn blobs_in_pieces_pass_the_conformance_suite() {
    // The suite's large blob (3 MiB) becomes seven pieces.
    let uri = format!("{}-pieces", test_uri());
    run_blob_store_suite(retried(store(&uri, Some(448 << 10)))).await;
}

#[tokio::test]
#[ignore = "needs a Ceph cluster; run scripts/test-rados.sh"]
async fn ranges_across_pieces_read_right_and_damage_is_an_error() {
    let uri = format!("{}-ranges", test_uri());
    let piece = 1000u64;
    let s = store(&uri, Some(piece));
    let data: Bytes = (0..4321u32).map(|i| (i * 7 % 251) as u8).collect();
    s.put_if_absent("segments/a", data.clone()).await.unwrap();
    assert_eq!(s.head("segments/a").await.unwrap(), Some(4321));
    for (offset, len) in [
        (0, 4321),
        (999, 2),
        (1000, 1000),
        (500, 3000),
        (4000, 321),
        (4321, 0),
    ] {
        let got = s.get_range("segments/a", offset, len).await.unwrap();
        assert_eq!(
            got,
            data.slice(offset as usize..(offset + len) as usize),
            "{offset}+{len}"
        );
    }
    assert!(matches!(
        s.get_range("segments/a", 4000, 322).await,
        Err(StoreError::OutOfRange { size: 4321, .. })
    ));
    // A second store has no layout cached: it learns it from the head.
    let fresh = store(&uri, Some(piece));
    assert_eq!(fresh.get("segments/a").await.unwrap(), data);
    let listed = fresh.list("").await.unwrap();
    assert_eq!(listed.len(), 1, "pieces are not listed: {listed:?}");
    assert_eq!(
        (listed[0].name.as_str(), listed[0].size),
        ("segments/a", 4321)
    );
    // A racing create of the same name in pieces loses whole.
    assert!(matches!(
        fresh
            .put_if_absent("segments/a", Bytes::from(vec![9u8; 3000]))
            .await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(fresh.get("segments/a").await.unwrap(), data);
    s.delete("segments/a").await.unwrap();
    assert_eq!(fresh.list("").await.unwrap(), vec![]);
    assert_eq!(fresh.head("segments/a").await.unwrap(), None);
}

/// Pieces no head names go at a sweep once untouched for the stale age:
/// here the head of a blob removed behind the store's back (with Ceph's
/// `rados` tool), as a delete that failed after the head leaves them.
/// Pieces a head names stay, and so do pieces not stale yet.
#[tokio::test]
#[ignore = "needs a Ceph cluster; run scripts/test-rados.sh"]
async fn a_sweep_removes_pieces_no_head_names() {
    let uri = format!("{}-sweep", test_uri());
    let (pool, namespace) = uri
        .strip_prefix("rados://")
        .and_then(|rest| rest.split_once('/'))
        .expect("rados://POOL/NAMESPACE");
    let remove_head = |name: &str| {
        let status = std::process::Command::new("rados")
            .args(["-p", pool, "-N", namespace, "rm", name])
            .status()
            .expect("Ceph's rados tool (Debian: ceph-common)");
        assert!(status.success(), "rados rm {name}: {status}");
    };
    let piece = 1000u64;
    let young = store(&uri, Some(piece));
    let s = store(&uri, Some(piece)).with_stale_piece_age(Duration::ZERO);
    let data: Bytes = (0..4321u32).map(|i| (i % 253) as u8).collect();
    for name in ["segments/kept", "segments/cut"] {
        s.put_if_absent(name, data.clone()).await.unwrap();
    }
    assert_eq!(
        s.sweep_leftovers().await.unwrap(),
        0,
        "every piece is named"
    );
    remove_head("segments/cut");
    assert_eq!(young.sweep_leftovers().await.unwrap(), 0, "not stale yet");
    // Pieces 1 to 4 of the blob cut off: 4321 bytes less its head's 1000.
    assert_eq!(s.sweep_leftovers().await.unwrap(), 3321);
    assert_eq!(s.sweep_leftovers().await.unwrap(), 0);
    assert_eq!(s.get("segments/kept").await.unwrap(), data);
    let names: Vec<String> = s
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["segments/kept"]);
    s.delete("segments/kept").await.unwrap();
}

#[test]
fn rados_addresses_and_settings_are_checked() {
    let settings = CephSettings {
        conf: Some("/nonexistent/ceph.conf".into()),
        ..CephSettings::default()
    };
    for bad in ["rados://", "rados://pool", "s3://b/v"] {
        assert!(
            RadosStore::from_uri(bad, &settings, Duration::from_secs(1)).is_err(),
            "{bad}"
        );
    }
    let err = RadosStore::from_uri("rados://p/v", &settings, Duration::from_secs(1))
        .expect_err("a missing configuration file");
    assert!(err.to_string().contains("/nonexistent/ceph.conf"), "{err}");
}
