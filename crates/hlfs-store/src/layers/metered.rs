//! Counting what reaches a store: requests of each kind, bytes each way,
//! failures by kind of error, and the retries of the layer above.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{BlobMeta, BlobReader, BlobStore, Result, StoreError};

const KINDS: usize = StoreError::KIND_NAMES.len();

/// Counters of one store, shared by every handle that counts into them.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    puts: AtomicU64,
    put_bytes: AtomicU64,
    gets: AtomicU64,
    get_bytes: AtomicU64,
    heads: AtomicU64,
    lists: AtomicU64,
    deletes: AtomicU64,
    failures: [AtomicU64; KINDS],
    retries: AtomicU64,
}

/// The counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Creates (`put_if_absent`, `put_file_if_absent`), and the bytes they
    /// carried when they succeeded.
    pub puts: u64,
    pub put_bytes: u64,
    /// Ranged reads, and the bytes they returned.
    pub gets: u64,
    pub get_bytes: u64,
    pub heads: u64,
    pub lists: u64,
    pub deletes: u64,
    /// Requests of any kind that returned an error: all of them, and by
    /// the kind of error, in the order of [`StoreError::KIND_NAMES`].
    pub failures: u64,
    pub failures_by_kind: [u64; KINDS],
    /// Requests tried again after a failure (by a `Retrying` layer that
    /// counts into these metrics).
    pub retries: u64,
}

impl StoreMetrics {
    pub fn counts(&self) -> StoreCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StoreCounts {
            puts: get(&self.puts),
            put_bytes: get(&self.put_bytes),
            gets: get(&self.gets),
            get_bytes: get(&self.get_bytes),
            heads: get(&self.heads),
            lists: get(&self.lists),
            deletes: get(&self.deletes),
            failures: self.failures.iter().map(get).sum(),
            failures_by_kind: self.failures.each_ref().map(get),
            retries: get(&self.retries),
        }
    }

    /// A request is being tried again after a failure.
    pub fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    fn count<T>(&self, request: &AtomicU64, result: &Result<T>) {
        request.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            self.failures[e.kind_index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A store that counts every request made through it into a
/// [`StoreMetrics`].
pub struct Metered {
    inner: Arc<dyn BlobStore>,
    metrics: Arc<StoreMetrics>,
}

impl Metered {
    pub fn new(inner: Arc<dyn BlobStore>, metrics: Arc<StoreMetrics>) -> Metered {
        Metered { inner, metrics }
    }
}

impl fmt::Debug for Metered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metered")
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl BlobStore for Metered {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        let result = self.inner.put_if_absent(name, data).await;
        self.metrics.count(&self.metrics.puts, &result);
        if result.is_ok() {
            StoreMetrics::add(&self.metrics.put_bytes, len);
        }
        result
    }

    async fn put_file_if_absent(&self, name: &str, path: &Path) -> Result<()> {
        let result = self.inner.put_file_if_absent(name, path).await;
        self.metrics.count(&self.metrics.puts, &result);
        if result.is_ok() {
            let len = std::fs::metadata(path).map_or(0, |m| m.len());
            StoreMetrics::add(&self.metrics.put_bytes, len);
        }
        result
    }

    async fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Bytes> {
        let result = self.inner.get_range(name, offset, len).await;
        self.metrics.count(&self.metrics.gets, &result);
        if let Ok(data) = &result {
            StoreMetrics::add(&self.metrics.get_bytes, data.len() as u64);
        }
        result
    }

    async fn head(&self, name: &str) -> Result<Option<u64>> {
        let result = self.inner.head(name).await;
        self.metrics.count(&self.metrics.heads, &result);
        result
    }

    async fn list(&self, prefix: &str) -> Result<Vec<BlobMeta>> {
        let result = self.inner.list(prefix).await;
        self.metrics.count(&self.metrics.lists, &result);
        result
    }

    async fn delete(&self, name: &str) -> Result<()> {
        let result = self.inner.delete(name).await;
        self.metrics.count(&self.metrics.deletes, &result);
        result
    }

    async fn sweep_leftovers(&self) -> Result<u64> {
        self.inner.sweep_leftovers().await
    }

    async fn open_reader(self: Arc<Self>, name: &str) -> Result<Arc<dyn BlobReader>> {
        // The store's own reader (a local one keeps the file open), counted.
        let result = self.inner.clone().open_reader(name).await;
        self.metrics.count(&self.metrics.heads, &result);
        Ok(Arc::new(MeteredReader {
            inner: result?,
            metrics: self.metrics.clone(),
        }))
    }
}

struct MeteredReader {
    inner: Arc<dyn BlobReader>,
    metrics: Arc<StoreMetrics>,
}

#[async_trait]
impl BlobReader for MeteredReader {
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let result = self.inner.read_at(offset, len).await;
        self.metrics.count(&self.metrics.gets, &result);
        if result.is_ok() {
            StoreMetrics::add(&self.metrics.get_bytes, len as u64);
        }
        result
    }

    async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let result = self.inner.read_into(offset, buf).await;
        self.metrics.count(&self.metrics.gets, &result);
        if result.is_ok() {
            StoreMetrics::add(&self.metrics.get_bytes, buf.len() as u64);
        }
        result
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemEnv;

    #[tokio::test]
    async fn requests_bytes_and_failures_are_counted() {
        let metrics = Arc::new(StoreMetrics::default());
        let store = Arc::new(Metered::new(MemEnv::new().store(), metrics.clone()));
        store
            .put_if_absent("a/1", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        assert!(store
            .put_if_absent("a/1", Bytes::from_static(b"x"))
            .await
            .is_err());
        assert_eq!(&store.get_range("a/1", 1, 3).await.unwrap()[..], b"ell");
        assert!(store.head("a/2").await.unwrap().is_none());
        assert_eq!(store.list("a/").await.unwrap().len(), 1);
        let reader = store.clone().open_reader("a/1").await.unwrap();
        let mut buf = [0u8; 2];
        reader.read_into(0, &mut buf).await.unwrap();
        store.delete("a/1").await.unwrap();
        assert_eq!(
            metrics.counts(),
            StoreCounts {
                puts: 2,
                put_bytes: 5,
                gets: 2,
                get_bytes: 5,
                heads: 2,
                lists: 1,
                deletes: 1,
                failures: 1,
                failures_by_kind: [1, 0, 0, 0, 0, 0, 0, 0],
                retries: 0,
            }
        );
        assert!(store.get_range("a/9", 0, 1).await.is_err());
        let counts = metrics.counts();
        assert_eq!(counts.failures, 2);
        let not_found = StoreError::KIND_NAMES
            .iter()
            .position(|k| *k == "not_found");
        assert_eq!(counts.failures_by_kind[not_found.unwrap()], 1);
    }
}
