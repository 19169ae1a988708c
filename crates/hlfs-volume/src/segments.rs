//! Reading segments, wherever they are: still in the local journal (open or
//! being sealed) or sealed in the blob store.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use hlfs_format::{
    decode_header, segment_name, verify_record, Checkpoint, Entry, FormatError, MapPage,
    RecordHeader, RecordKind, HEADER_LEN,
};
use hlfs_store::{BlobReader, BlobStore, JournalFile, StoreError};
use lru::LruCache;
use parking_lot::Mutex;

use crate::cache::{ReadCache, SegmentKey};
use crate::error::{Result, VolumeError};

/// Open store readers kept at most (each may hold a file descriptor).
const READER_CACHE: usize = 256;

pub struct Segments {
    store: Arc<dyn BlobStore>,
    /// The read cache, if the store is remote, and the volume's UUID that
    /// keys its entries.
    cache: Option<Arc<ReadCache>>,
    volume: [u8; 16],
    journals: Mutex<HashMap<u32, Arc<dyn JournalFile>>>,
    readers: Mutex<LruCache<u32, Arc<dyn BlobReader>>>,
}

impl Segments {
    pub fn new(store: Arc<dyn BlobStore>, cache: Option<Arc<ReadCache>>, volume: [u8; 16]) -> Self {
        Segments {
            store,
            cache,
            volume,
            journals: Mutex::new(HashMap::new()),
            readers: Mutex::new(LruCache::new(
                NonZeroUsize::new(READER_CACHE).expect("nonzero"),
            )),
        }
    }

    fn key(&self, seg: u32) -> SegmentKey {
        SegmentKey {
            volume: self.volume,
            seg,
        }
    }

    /// Segment `seg` is (still) a journal file.
    pub fn add_journal(&self, seg: u32, file: Arc<dyn JournalFile>) {
        self.journals.lock().insert(seg, file);
    }

    /// Segment `seg` is now sealed in the store. Readers already holding
    /// the journal file keep reading it.
    pub fn sealed(&self, seg: u32) {
        self.journals.lock().remove(&seg);
    }

    /// A source to scan stored segment `seg` from: the read cache, if the
    /// store is remote (a segment uploaded by this host is often still in
    /// it), or the store.
    pub async fn scan_source(&self, seg: u32) -> Result<ScanSource> {
        Ok(match &self.cache {
            Some(cache) => ScanSource::Cached {
                cache: cache.clone(),
                key: self.key(seg),
                store: self.store.clone(),
                name: segment_name(seg),
            },
            None => ScanSource::Store(self.reader(seg).await?),
        })
    }

    /// Segment `seg` was deleted from the store: its open reader and cached
    /// copy go too.
    pub fn deleted(&self, seg: u32) {
        self.readers.lock().pop(&seg);
        if let Some(cache) = &self.cache {
            cache.forget(self.key(seg));
        }
    }

    /// Moves the local file holding all of stored segment `seg` into the
    /// read cache; false if there is no cache or it would not take it.
    pub fn adopt(&self, seg: u32, path: &Path, len: u64) -> bool {
        match &self.cache {
            Some(cache) => cache.adopt(self.key(seg), path, len),
            None => false,
        }
    }

    async fn reader(&self, seg: u32) -> std::result::Result<Arc<dyn BlobReader>, StoreError> {
        if let Some(r) = self.readers.lock().get(&seg) {
            return Ok(r.clone());
        }
        let reader = self.store.clone().open_reader(&segment_name(seg)).await?;
        self.readers.lock().put(seg, reader.clone());
        Ok(reader)
    }

    /// Exactly `len` bytes of segment `seg` at `off`.
    pub async fn read(&self, seg: u32, off: u64, len: usize) -> Result<Bytes> {
        let mut buf = vec![0u8; len];
        self.read_into(seg, off, &mut buf).await?;
        Ok(Bytes::from(buf))
    }

    /// Fills `buf` from segment `seg` at `off`.
    pub async fn read_into(&self, seg: u32, off: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len();
        let past_end = || {
            VolumeError::corrupt(format!(
                "segment {seg}: read of {len} bytes at offset {off} is past its end"
            ))
        };
        let journal = self.journals.lock().get(&seg).cloned();
        let result = match (journal, &self.cache) {
            // The journal is a local file and the bytes were written moments
            // ago: a page-cache read, done inline.
            (Some(file), _) => file.read_exact_into(off, buf),
            (None, Some(cache)) => {
                cache
                    .read_into(self.key(seg), &self.store, &segment_name(seg), off, buf)
                    .await
            }
            (None, None) => match self.reader(seg).await {
                Ok(reader) => reader.read_into(off, buf).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => Ok(()),
            Err(StoreError::OutOfRange { .. }) => Err(past_end()),
            Err(StoreError::NotFound(name)) => Err(VolumeError::SegmentMissing(name)),
            Err(e) => Err(e.into()),
        }
    }

    /// Like `read_into`, then `verify`. Bytes from the read cache that fail
    /// it (a cache file damaged behind our back) are dropped from the cache
    /// and read again from the store.
    pub async fn read_verified(
        &self,
        seg: u32,
        off: u64,
        buf: &mut [u8],
        verify: impl Fn(&[u8]) -> Result<()>,
    ) -> Result<()> {
        self.read_into(seg, off, buf).await?;
        match verify(buf) {
            Err(VolumeError::Corrupt(why)) if self.forget_cached(seg) => {
                tracing::warn!(segment = seg, %why, "cached copy damaged; reading from the store");
                self.read_into(seg, off, buf).await?;
                verify(buf)
            }
            result => result,
        }
    }

    /// Drops the cached copy of `seg`, if its reads come from one.
    fn forget_cached(&self, seg: u32) -> bool {
        if self.journals.lock().contains_key(&seg) {
            return false;
        }
        match &self.cache {
            Some(cache) => cache.forget(self.key(seg)),
            None => false,
        }
    }

    /// Reads and decodes the checkpoint record at `at`, returning it and
    /// its LSN.
    pub async fn read_checkpoint(&self, at: Entry) -> Result<(Checkpoint, u64)> {
        let (h, payload) = self.read_expected(at, RecordKind::Checkpoint).await?;
        let cp = Checkpoint::decode(&payload).map_err(|e| {
            VolumeError::corrupt(format!(
                "checkpoint at {} offset {}: {e}",
                segment_name(at.seg),
                at.off
            ))
        })?;
        Ok((cp, h.lsn))
    }

    /// Reads and decodes the map page record at `at`.
    pub async fn read_page(&self, at: Entry) -> Result<MapPage> {
        let (_, payload) = self.read_expected(at, RecordKind::MapPage).await?;
        MapPage::decode(&payload).map_err(|e| {
            VolumeError::corrupt(format!(
                "map page at {} offset {}: {e}",
                segment_name(at.seg),
                at.off
            ))
        })
    }

    /// The record at `at`, which must be of `kind` and carry `at`'s CRC.
    async fn read_expected(&self, at: Entry, kind: RecordKind) -> Result<(RecordHeader, Bytes)> {
        let (h, payload) = self.read_record(at.seg, at.off as u64).await?;
        if h.kind != kind || h.crc != at.crc {
            let what = match kind {
                RecordKind::Checkpoint => "checkpoint",
                _ => "map page",
            };
            return Err(VolumeError::corrupt(format!(
                "{what} at {} offset {}: not the expected record",
                segment_name(at.seg),
                at.off
            )));
        }
        Ok((h, payload))
    }

    /// Reads and verifies the record whose header is at `off`.
    pub async fn read_record(&self, seg: u32, off: u64) -> Result<(RecordHeader, Bytes)> {
        match self.read_record_once(seg, off).await {
            Err(VolumeError::Corrupt(why)) if self.forget_cached(seg) => {
                tracing::warn!(segment = seg, %why, "cached copy damaged; reading from the store");
                self.read_record_once(seg, off).await
            }
            result => result,
        }
    }

    async fn read_record_once(&self, seg: u32, off: u64) -> Result<(RecordHeader, Bytes)> {
        let volume = &self.volume;
        let head = self.read(seg, off, HEADER_LEN).await?;
        let header = decode_header(&head).map_err(|e| {
            VolumeError::corrupt(format!(
                "segment {seg} offset {off}: bad record header: {e}"
            ))
        })?;
        let payload = self
            .read(seg, off + HEADER_LEN as u64, header.payload_len as usize)
            .await?;
        verify_record(&header, &head, &payload, volume)
            .map_err(|e| VolumeError::corrupt(format!("segment {seg} offset {off}: {e}")))?;
        Ok((header, payload))
    }
}

/// Where a scanned segment's bytes come from.
pub enum ScanSource {
    Journal(Arc<dyn JournalFile>),
    Store(Arc<dyn BlobReader>),
    /// Through the read cache: chunks it holds are read locally, the
    /// others fetched (and kept, with read-ahead as for any reader).
    Cached {
        cache: Arc<ReadCache>,
        key: SegmentKey,
        store: Arc<dyn BlobStore>,
        name: String,
    },
}

impl ScanSource {
    async fn read(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        match self {
            ScanSource::Journal(f) => Ok(f.read_at(off, len)?),
            ScanSource::Store(r) => Ok(r.read_at(off, len).await?.to_vec()),
            ScanSource::Cached {
                cache,
                key,
                store,
                name,
            } => {
                let mut buf = vec![0u8; len];
                cache.read_into(*key, store, name, off, &mut buf).await?;
                Ok(buf)
            }
        }
    }
}

/// Why a scan stopped before the end of a segment.
#[derive(Debug)]
pub enum ScanStop {
    /// Clean end of the segment.
    End,
    /// Zeros at `offset` where a record header would start: space written
    /// ahead of the log (a journal's pre-written window) or never written.
    /// A journal's log ends there; a stored segment never holds it.
    Unwritten { offset: u64 },
    /// The bytes at `offset` are not a valid record (torn or corrupt tail),
    /// or are an intact record of another volume (`other_volume`): never a
    /// torn tail of this one.
    Invalid {
        offset: u64,
        reason: String,
        other_volume: bool,
    },
}

/// Reads a segment's records in order, through a large buffer so that a
/// remote store sees a few big reads rather than one per record.
pub struct Scanner {
    source: ScanSource,
    size: u64,
    pos: u64,
    buf: Vec<u8>,
    buf_start: u64,
}

const SCAN_CHUNK: usize = 8 << 20;

impl Scanner {
    pub fn new(source: ScanSource, size: u64) -> Self {
        Scanner {
            source,
            size,
            pos: 0,
            buf: Vec::new(),
            buf_start: 0,
        }
    }

    /// Makes `pos..pos + len` available in the buffer (or returns false at
    /// the end of the segment).
    async fn fill(&mut self, len: usize) -> Result<bool> {
        if self.pos + len as u64 > self.size {
            return Ok(false);
        }
        let have_end = self.buf_start + self.buf.len() as u64;
        if self.pos >= self.buf_start && self.pos + len as u64 <= have_end {
            return Ok(true);
        }
        let want = (len.max(SCAN_CHUNK) as u64).min(self.size - self.pos) as usize;
        let data = self.source.read(self.pos, want).await?;
        self.buf_start = self.pos;
        self.buf = data;
        Ok(self.buf.len() >= len)
    }

    fn slice(&self, len: usize) -> &[u8] {
        let start = (self.pos - self.buf_start) as usize;
        &self.buf[start..start + len]
    }

    /// The next valid record, with its offset, or why there is none.
    pub async fn next(
        &mut self,
        volume: &[u8; 16],
    ) -> Result<std::result::Result<(u64, RecordHeader, Vec<u8>), ScanStop>> {
        let offset = self.pos;
        if offset == self.size {
            return Ok(Err(ScanStop::End));
        }
        let invalid = |reason: String| {
            Ok(Err(ScanStop::Invalid {
                offset,
                reason,
                other_volume: false,
            }))
        };
        if !self.fill(HEADER_LEN).await? {
            return invalid("truncated record header".into());
        }
        let head = self.slice(HEADER_LEN).to_vec();
        if head.iter().all(|&b| b == 0) {
            return Ok(Err(ScanStop::Unwritten { offset }));
        }
        let header = match decode_header(&head) {
            Ok(h) => h,
            Err(e) => return invalid(format!("bad record header: {e}")),
        };
        let total = HEADER_LEN + header.payload_len as usize;
        if !self.fill(total).await? {
            return invalid("truncated record".into());
        }
        let record = self.slice(total);
        if let Err(e) = verify_record(
            &header,
            &record[..HEADER_LEN],
            &record[HEADER_LEN..],
            volume,
        ) {
            return Ok(Err(ScanStop::Invalid {
                offset,
                reason: e.to_string(),
                other_volume: e == FormatError::WrongVolume,
            }));
        }
        let payload = record[HEADER_LEN..].to_vec();
        self.pos += total as u64;
        Ok(Ok((offset, header, payload)))
    }
}
