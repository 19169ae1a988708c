//! What an open volume is doing, for monitoring: read in one go by
//! [`crate::Volume::figures`], which feeds both `hlfs serve --metrics` and
//! the live part of `hlfs info` of a served volume. Counters count since
//! the volume was opened; caches shared by several volumes count for all
//! of them.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::core::Core;

/// Unknown fields are ignored when decoding, so an older CLI can read the
/// figures of a newer server.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    /// Data bytes clients wrote since the volume was opened.
    pub written_bytes: u64,
    /// Bytes appended to the log since then: records, map pages and
    /// checkpoints. Divided by `written_bytes`: the write amplification of
    /// this open, before any cleaning.
    pub log_appended_bytes: u64,
    /// Flushes that had writes to make durable, the journal syncs that
    /// served them (flushes ÷ syncs: the group-commit batch), and the time
    /// those syncs took.
    pub flushes: u64,
    pub journal_syncs: u64,
    pub journal_sync_seconds: f64,
    /// Zeros written ahead of the log under synced load (the journal's
    /// window), so that those syncs commit no file size.
    #[serde(default)]
    pub journal_prewritten_bytes: u64,
    /// Sealed segments waiting for their upload (or their seal), and the
    /// most there may be before writes wait.
    pub upload_backlog_segments: u64,
    pub upload_backlog_limit: u64,
    /// Map pages in memory and the budget's limit; page lookups that found
    /// their page in memory (a map operation that had to read a page looks
    /// the pages above it up again, so these overstate a hit ratio), and
    /// pages read from the log because they were not in memory. The page
    /// cache may be shared with other volumes of this process.
    pub map_pages: u64,
    pub map_page_limit: u64,
    pub map_page_hits: u64,
    pub map_page_misses: u64,
    /// For a volume on a remote store: its read cache (shared by every
    /// volume on the same cache directory).
    pub read_cache: Option<ReadCacheFigures>,
    /// Cleaning runs finished (asked for, or by the automatic cleaner),
    /// their passes, the segments they deleted and those segments' bytes,
    /// and the live bytes they copied.
    #[serde(default)]
    pub gc_runs: u64,
    #[serde(default)]
    pub gc_passes: u64,
    #[serde(default)]
    pub gc_deleted_segments: u64,
    #[serde(default)]
    pub gc_freed_bytes: u64,
    #[serde(default)]
    pub gc_copied_bytes: u64,
    /// For a read-only view: the times it reopened at the newest manifest
    /// because the volume's writer had cleaned away segments it read.
    #[serde(default)]
    pub view_reopens: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadCacheFigures {
    /// Reads served wholly from the cache, and reads that found a chunk
    /// missing: they fetched it, or waited for a fetch under way (a
    /// read-ahead, say).
    pub hits: u64,
    pub misses: u64,
    /// Bytes of segments in the cache.
    pub bytes: u64,
}

impl Core {
    pub(crate) fn figures(&self) -> Figures {
        let counts = &self.log.counts;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let (map_pages, map_page_limit) = self.pages.pages();
        let (map_page_hits, map_page_misses) = self.pages.hits_and_misses();
        let (backlog, backlog_limit) = self.uploads.backlog();
        let clean = &self.clean_counts;
        Figures {
            size_bytes: self.size(),
            allocated_bytes: self.allocated_bytes(),
            written_bytes: load(&counts.client_bytes),
            log_appended_bytes: load(&counts.appended_bytes),
            flushes: load(&counts.flushes),
            journal_syncs: load(&counts.syncs),
            journal_sync_seconds: load(&counts.sync_micros) as f64 / 1e6,
            journal_prewritten_bytes: load(&self.log.window.prewritten_bytes),
            upload_backlog_segments: backlog as u64,
            upload_backlog_limit: backlog_limit as u64,
            map_pages: map_pages as u64,
            map_page_limit: map_page_limit as u64,
            map_page_hits,
            map_page_misses,
            read_cache: self.backend.cache.as_ref().map(|cache| {
                let (hits, misses) = cache.hits_and_misses();
                ReadCacheFigures {
                    hits,
                    misses,
                    bytes: cache.cached_bytes(),
                }
            }),
            gc_runs: load(&clean.runs),
            gc_passes: load(&clean.passes),
            gc_deleted_segments: load(&clean.deleted_segments),
            gc_freed_bytes: load(&clean.freed_bytes),
            gc_copied_bytes: load(&clean.copied_bytes),
            view_reopens: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use hlfs_format::HEADER_LEN;
    use hlfs_store::MemEnv;

    use crate::options::{CreateOptions, OpenOptions};
    use crate::{Backend, Volume};

    #[tokio::test]
    async fn figures_count_what_clients_and_the_log_did() {
        let env = MemEnv::new();
        let backend = Backend::memory(&env);
        let create = CreateOptions {
            size: 64 << 20,
            block_size: 4096,
            segment_size: 1 << 20,
        };
        Volume::create(&backend, &create).await.unwrap();
        let vol = Volume::open(backend, &OpenOptions::default())
            .await
            .unwrap();
        let start = vol.figures();
        assert_eq!(
            (start.written_bytes, start.flushes, start.journal_syncs),
            (0, 0, 0)
        );
        assert_eq!(start.size_bytes, 64 << 20);
        assert!(
            start.read_cache.is_none(),
            "a local volume has no read cache"
        );

        for i in 0..3u64 {
            vol.write(i << 16, &[i as u8 + 1; 65536]).await.unwrap();
        }
        vol.write(1000, &[9; 100]).await.unwrap();
        vol.flush().await.unwrap();
        // Nothing new to make durable: not a flush that waits for a sync.
        vol.flush().await.unwrap();
        let f = vol.figures();
        assert_eq!(f.written_bytes, 3 * 65536 + 100);
        // Four records, the partial block written whole.
        let records = 3 * 65536 + 4096 + 4 * HEADER_LEN as u64;
        assert!(
            f.log_appended_bytes >= records && f.log_appended_bytes < records + 64 * 1024,
            "{f:?}"
        );
        assert_eq!((f.flushes, f.journal_syncs), (1, 1), "{f:?}");
        assert!(f.allocated_bytes == 3 * 65536, "{f:?}");
        assert!(f.upload_backlog_limit >= 1 && f.upload_backlog_segments <= f.upload_backlog_limit);

        // Past a segment: sealed segments take backlog slots until stored,
        // and every byte written is still counted once.
        let big = vec![7u8; 3 << 20];
        vol.write(4 << 20, &big).await.unwrap();
        let f = vol.figures();
        assert_eq!(f.written_bytes, 3 * 65536 + 100 + (3 << 20));
        assert!(f.upload_backlog_segments <= f.upload_backlog_limit, "{f:?}");
        assert!(f.map_pages >= 1 && f.map_pages <= f.map_page_limit, "{f:?}");
        vol.close().await.unwrap();
    }
}
