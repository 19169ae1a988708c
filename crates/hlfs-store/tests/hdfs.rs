//! The conformance suite against a real HDFS cluster. Needs a NameNode:
//!
//! ```text
//! HLFS_HDFS_TEST_URI=hdfs://namenode:8020/tmp/hlfs-test \
//!     cargo test -p hlfs-store --features hdfs --test hdfs -- --nocapture
//! ```
//!
//! The directory is scratch space: the suite works under a fresh random
//! name in it and deletes the blobs it wrote. The Hadoop client settings and
//! user come from the environment (`HADOOP_CONF_DIR`, `HADOOP_USER_NAME`).
//!
//! No cluster runs where the tests usually do, so without the variable the
//! suite is skipped, and says so on the terminal. A CI job that has a cluster
//! sets `HLFS_REQUIRE_HDFS=1` so that a lost variable fails the job instead of
//! skipping silently.
//!
//! The test is not `#[ignore]`d (unlike the S3 one, which cannot run without
//! its endpoint): ignored, it would never get to say that it was skipped, nor
//! to fail a CI job that requires it.

#![cfg(feature = "hdfs")]

use std::io::Write;
use std::sync::Arc;

use hlfs_store::conformance::run_blob_store_suite;
use hlfs_store::{BlobStore, HdfsStore};

const URI_VAR: &str = "HLFS_HDFS_TEST_URI";

/// Whether this run must exercise a cluster: on CI, when asked to.
fn cluster_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        && std::env::var("HLFS_REQUIRE_HDFS").is_ok_and(|v| v == "1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hdfs_store_passes_the_conformance_suite() {
    let uri = match std::env::var(URI_VAR) {
        Ok(uri) if !uri.is_empty() => uri,
        _ => {
            let why = format!(
                "{URI_VAR} is not set; no HDFS cluster was given \
                 (set it to hdfs://HOST:PORT/PATH, a scratch directory on a live cluster)"
            );
            if cluster_required() {
                panic!("CI=true and HLFS_REQUIRE_HDFS=1, but {why}");
            }
            // Straight to the terminal: the harness captures `eprintln!` of a
            // passing test, and this must not pass unnoticed.
            let _ = writeln!(
                std::io::stderr(),
                "\n!!! hlfs-store: the HDFS conformance suite was NOT RUN: {why}.\n"
            );
            return;
        }
    };
    let store: Arc<dyn BlobStore> =
        Arc::new(HdfsStore::from_uri(&uri).unwrap_or_else(|e| panic!("{URI_VAR}={uri:?}: {e}")));
    run_blob_store_suite(store).await;
}

#[test]
fn hdfs_addresses_are_checked() {
    assert!(HdfsStore::from_uri("hdfs://").is_err());
    assert!(HdfsStore::from_uri("hdfs://namenode/vol").is_err());
    assert!(HdfsStore::from_uri("hdfs://namenode:8020").is_err());
    assert!(HdfsStore::from_uri("s3://bucket/vol").is_err());
    assert!(HdfsStore::from_uri("file:///x").is_err());
}
