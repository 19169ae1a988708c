//! The conformance suite against a real S3-compatible engine. Needs an
//! endpoint: `scripts/test-s3.sh` brings up a single-node Ceph with its
//! RADOS gateway on 127.0.0.1, runs this, and tears it down.

use std::sync::Arc;

use hlfs_store::conformance::run_blob_store_suite;
use hlfs_store::{BlobStore, S3Store};

#[tokio::test]
#[ignore = "needs an S3 endpoint; run scripts/test-s3.sh"]
async fn s3_store_passes_the_conformance_suite() {
    let uri = std::env::var("HLFS_S3_TEST_URI").expect(
        "HLFS_S3_TEST_URI (e.g. s3://hlfs-test/conformance) and AWS_* variables must be set",
    );
    let store: Arc<dyn BlobStore> = Arc::new(
        S3Store::from_uri(&uri, std::time::Duration::from_secs(30)).expect("S3 configuration"),
    );
    run_blob_store_suite(store).await;
}

#[test]
fn s3_addresses_are_checked() {
    assert!(S3Store::from_uri("s3://", std::time::Duration::from_secs(30)).is_err());
    assert!(S3Store::from_uri("file:///x", std::time::Duration::from_secs(30)).is_err());
}
