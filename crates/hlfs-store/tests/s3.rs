//! The conformance suite against a real S3-compatible engine. Needs an
//! endpoint: `scripts/test-s3.sh` brings up a single-node Ceph with its
//! RADOS gateway on 127.0.0.1, runs this, and tears it down.

use std::sync::Arc;

use hlfs_store::conformance::run_blob_store_suite;
use hlfs_store::layers::{RetryPolicy, Retrying};
use hlfs_store::time::{Clock, Jitter};
use hlfs_store::{BlobStore, S3Store};

#[tokio::test]
#[ignore = "needs an S3 endpoint; run scripts/test-s3.sh"]
async fn s3_store_passes_the_conformance_suite() {
    let uri = std::env::var("HLFS_S3_TEST_URI").expect(
        "HLFS_S3_TEST_URI (e.g. s3://hlfs-test/conformance) and AWS_* variables must be set",
    );
    // As volumes use it: each request made once by the store, retried by
    // the layer around it.
    let s3 = Arc::new(S3Store::from_uri(&uri).expect("S3 configuration"));
    let store: Arc<dyn BlobStore> = Arc::new(Retrying::new(
        s3,
        RetryPolicy::within(std::time::Duration::from_secs(30)),
        Clock::system(),
        Jitter::from_entropy(),
    ));
    run_blob_store_suite(store).await;
}

#[test]
fn s3_addresses_are_checked() {
    assert!(S3Store::from_uri("s3://").is_err());
    assert!(S3Store::from_uri("file:///x").is_err());
}
