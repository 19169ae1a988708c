//! Every backend in this crate against the shared conformance suites.

use std::sync::Arc;

use hlfs_store::conformance::{run_blob_store_suite, run_journal_suite};
use hlfs_store::layers::{Faults, Metered, RetryPolicy, Retrying, StoreMetrics};
use hlfs_store::time::{Clock, Jitter};
use hlfs_store::{LocalJournal, LocalStore, MemEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_store() {
    let dir = tempfile::tempdir().unwrap();
    // A root that does not exist yet: the store creates it on first put.
    run_blob_store_suite(Arc::new(LocalStore::new(dir.path().join("store")))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mem_store() {
    run_blob_store_suite(MemEnv::new().store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mem_store_with_latency() {
    let faults = Faults::new();
    faults.set_latency(std::time::Duration::from_millis(1));
    run_blob_store_suite(faults.store(MemEnv::new().store())).await;
}

/// The layers keep the contract: a store seen through them behaves as the
/// store itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_store_through_every_layer() {
    let dir = tempfile::tempdir().unwrap();
    let local = Arc::new(LocalStore::new(dir.path().join("store")));
    let metered = Arc::new(Metered::new(local, Arc::new(StoreMetrics::default())));
    let faulty = Faults::new().store(metered);
    let retrying = Retrying::new(
        faulty,
        RetryPolicy::within(std::time::Duration::from_secs(5)),
        Clock::system(),
        Jitter::seeded(0),
    );
    run_blob_store_suite(Arc::new(retrying)).await;
}

#[test]
fn journal_through_the_fault_layer() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(LocalJournal::new(dir.path().join("journal")).unwrap());
    run_journal_suite(Faults::new().journal(journal));
}

#[test]
fn local_journal() {
    let dir = tempfile::tempdir().unwrap();
    run_journal_suite(Arc::new(
        LocalJournal::new(dir.path().join("journal")).unwrap(),
    ));
}

#[test]
fn mem_journal() {
    run_journal_suite(MemEnv::new().journal());
}

/// The suite must catch a store whose put overwrites instead of refusing.
#[tokio::test]
#[should_panic(expected = "expected AlreadyExists")]
async fn suite_catches_an_overwriting_store() {
    use async_trait::async_trait;
    use bytes::Bytes;
    use hlfs_store::{BlobMeta, BlobStore, MemStore, Result};

    #[derive(Debug)]
    struct Overwriting(Arc<MemStore>);

    #[async_trait]
    impl BlobStore for Overwriting {
        fn describe(&self) -> String {
            "overwriting".into()
        }
        async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<()> {
            self.0.delete(name).await?;
            self.0.put_if_absent(name, data).await
        }
        async fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Bytes> {
            self.0.get_range(name, offset, len).await
        }
        async fn head(&self, name: &str) -> Result<Option<u64>> {
            self.0.head(name).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<BlobMeta>> {
            self.0.list(prefix).await
        }
        async fn delete(&self, name: &str) -> Result<()> {
            self.0.delete(name).await
        }

        async fn sweep_leftovers(&self) -> Result<u64> {
            self.0.sweep_leftovers().await
        }
    }

    run_blob_store_suite(Arc::new(Overwriting(MemEnv::new().store()))).await;
}
