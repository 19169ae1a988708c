//! Where a volume lives: a blob store for sealed segments and manifests, and
//! a journal area for the open segment; and the clock and randomness the
//! engine runs on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hlfs_store::layers::{Faults, Metered, RetryPolicy, Retrying, StoreMetrics};
use hlfs_store::time::{Clock, Jitter};
use hlfs_store::{BlobStore, JournalDir, LocalJournal, LocalStore, MemEnv, S3Store};

use crate::cache::ReadCache;
use crate::error::{Result, VolumeError};

#[derive(Clone, Debug)]
pub struct Backend {
    /// The store, seen through the layers every request takes (counting,
    /// and in tests faults); requests to it are made once. The engine adds
    /// retries on top: see [`Backend::requests`], and the upload task's
    /// store, which retries until the store takes each request.
    pub store: Arc<dyn BlobStore>,
    pub journal: Arc<dyn JournalDir>,
    /// How the user named the volume, for messages.
    pub location: String,
    /// The store is across a network: uploads may stall, so more sealed
    /// segments may wait for theirs.
    pub remote: bool,
    /// Local copies of sealed segments' bytes, for a remote store.
    pub cache: Option<Arc<ReadCache>>,
    /// Who writes through this backend, as recorded in the writer claim: a
    /// writer with the same site holds the same journal's lock, so it may
    /// take over a claim left by one that did not close.
    pub writer_site: String,
    /// How long a request the engine waits on (a read, a listing, a
    /// manifest) is retried while the store is away; `None` makes each
    /// request once, which suits a local store.
    pub retry_budget: Option<Duration>,
    /// What every request to the store adds up to.
    pub metrics: Arc<StoreMetrics>,
    /// The time the engine reads and sleeps on.
    pub clock: Clock,
    /// The randomness that spreads retries.
    pub jitter: Jitter,
    /// How the addresses of other volumes (a clone's parent, a pin's
    /// clone) are opened: with the store options this one was made with.
    pub others: Others,
}

/// Opens a volume address as a backend.
type Opener = dyn Fn(&str) -> Result<Backend> + Send + Sync;

/// How a backend opens the addresses of other volumes.
#[derive(Clone)]
pub struct Others(Arc<Opener>);

impl Others {
    /// Addresses parsed with these store options.
    pub fn parsed_with(opts: StoreOptions) -> Others {
        Others(Arc::new(move |address| {
            Backend::parse(address, false, &opts)
        }))
    }

    /// Addresses looked up by `open` (tests: volumes in memory).
    pub fn from_fn(open: impl Fn(&str) -> Result<Backend> + Send + Sync + 'static) -> Others {
        Others(Arc::new(open))
    }

    /// The backend at `address`, opening the addresses it names the same
    /// way.
    pub fn open(&self, address: &str) -> Result<Backend> {
        Ok((self.0)(address)?.with_others(self.clone()))
    }
}

impl std::fmt::Debug for Others {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Others")
    }
}

/// Settings for volumes whose store is remote.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Holds remote volumes' journals and the read cache.
    pub cache_dir: PathBuf,
    /// Bytes the cache directory may hold.
    pub cache_size: u64,
    /// How long a store request is retried (with backoff and jitter) before
    /// it fails.
    pub retry_budget: Duration,
    /// How to reach a Ceph cluster, for `rados://` volumes.
    pub ceph: hlfs_store::CephSettings,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_dir: default_cache_dir(),
            cache_size: 10 << 30,
            retry_budget: Duration::from_secs(30),
            ceph: hlfs_store::CephSettings::default(),
        }
    }
}

/// `HLFS_CACHE_DIR`, else `~/.cache/hlfs`, else `.hlfs-cache`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("HLFS_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hlfs")))
        .unwrap_or_else(|| PathBuf::from(".hlfs-cache"))
}

/// Subdirectory of a local volume holding its journal.
pub const LOCAL_JOURNAL_DIR: &str = "journal";

impl Backend {
    /// A backend over `store` and `journal`, counting requests to the store.
    fn over(
        store: Arc<dyn BlobStore>,
        journal: Arc<dyn JournalDir>,
        location: String,
        writer_site: String,
    ) -> Backend {
        let metrics = Arc::new(StoreMetrics::default());
        Backend {
            store: Arc::new(Metered::new(store, metrics.clone())),
            journal,
            location,
            remote: false,
            cache: None,
            writer_site,
            retry_budget: None,
            metrics,
            clock: Clock::system(),
            jitter: Jitter::from_entropy(),
            others: Others::parsed_with(StoreOptions::default()),
        }
    }

    /// The backend of another volume's address, opened as this one was.
    pub fn open_other(&self, address: &str) -> Result<Backend> {
        self.others.open(address)
    }

    /// The same backend, opening other volumes' addresses with `others`.
    pub fn with_others(mut self, others: Others) -> Backend {
        self.others = others;
        self
    }

    /// The store for requests someone waits on: retried within
    /// `retry_budget`, if there is one.
    pub fn requests(&self) -> Arc<dyn BlobStore> {
        match self.retry_budget {
            Some(budget) => Arc::new(
                Retrying::new(
                    self.store.clone(),
                    RetryPolicy::within(budget),
                    self.clock.clone(),
                    self.jitter.clone(),
                )
                .counting_in(self.metrics.clone()),
            ),
            None => self.store.clone(),
        }
    }

    /// The same backend with its store and journal behind `faults`.
    pub fn with_faults(mut self, faults: &Faults) -> Backend {
        self.store = faults.store(self.store);
        self.journal = faults.journal(self.journal);
        self
    }

    /// The same backend on another clock and source of randomness.
    pub fn with_time(mut self, clock: Clock, jitter: Jitter) -> Backend {
        self.clock = clock;
        self.jitter = jitter;
        self
    }

    /// A volume in a local directory. With `create`, the directory is made
    /// if missing; otherwise a missing directory is `NotFound`.
    pub fn local(path: &Path, create: bool) -> Result<Backend> {
        let location = path.display().to_string();
        if create {
            std::fs::create_dir_all(path).map_err(|e| {
                VolumeError::InvalidArgument(format!("cannot create {location}: {e}"))
            })?;
        } else if !path.is_dir() {
            return Err(VolumeError::NotFound(location));
        }
        let journal = LocalJournal::new(path.join(LOCAL_JOURNAL_DIR))?;
        Ok(Backend::over(
            Arc::new(LocalStore::new(path)),
            Arc::new(journal),
            location,
            hostname(),
        ))
    }

    /// A volume in an S3 bucket. Its open segment is journalled locally, in
    /// the cache directory, in a directory named after the address; sealed
    /// segments and manifests go to the bucket, and ranges read from them
    /// are kept in the cache directory's read cache.
    pub fn s3(address: &str, opts: &StoreOptions) -> Result<Backend> {
        let store = S3Store::from_uri(address)?;
        Backend::remote(address, Arc::new(store), opts)
    }

    /// A volume in a remote store, with its journal and read cache under
    /// the cache directory.
    fn remote(address: &str, store: Arc<dyn BlobStore>, opts: &StoreOptions) -> Result<Backend> {
        let cache_dir = &opts.cache_dir;
        let (scheme, rest) = address.split_once("://").unwrap_or(("", address));
        let rel: String = rest
            .trim_end_matches('/')
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let journal_dir = cache_dir.join(scheme).join(rel).join(LOCAL_JOURNAL_DIR);
        let journal = LocalJournal::new(&journal_dir)?;
        let cache = ReadCache::shared(&cache_dir.join("segments"), opts.cache_size)?;
        Ok(Backend {
            remote: true,
            cache,
            retry_budget: Some(opts.retry_budget),
            ..Backend::over(
                store,
                Arc::new(journal),
                address.to_string(),
                remote_site(&journal_dir),
            )
        })
    }

    /// A volume in a test environment.
    pub fn memory(env: &MemEnv) -> Backend {
        Backend::over(env.store(), env.journal(), "memory".into(), hostname())
    }

    /// Parses a volume address: a path, a `file://` URI, or an `s3://` (or,
    /// built with the `hdfs` or `rados` feature, `hdfs://` or `rados://`)
    /// URI, whose journal and read cache live in the local cache directory.
    pub fn parse(address: &str, create: bool, opts: &StoreOptions) -> Result<Backend> {
        Ok(Backend::parse_only(address, create, opts)?
            .with_others(Others::parsed_with(opts.clone())))
    }

    fn parse_only(address: &str, create: bool, opts: &StoreOptions) -> Result<Backend> {
        if let Some(path) = address.strip_prefix("file://") {
            return Backend::local(&PathBuf::from(path), create);
        }
        if address.starts_with("s3://") {
            return Backend::s3(address, opts);
        }
        #[cfg(feature = "rados")]
        if address.starts_with("rados://") {
            // A request to a stopped OSD fails in time for the retry layer
            // to try it again within its budget; and an 80 MiB piece has
            // time to cross a slow link.
            let timeout = (opts.retry_budget / 3).max(Duration::from_secs(10));
            let store = hlfs_store::RadosStore::from_uri(address, &opts.ceph, timeout)?;
            return Backend::remote(address, Arc::new(store), opts);
        }
        #[cfg(feature = "hdfs")]
        if address.starts_with("hdfs://") {
            let store = hlfs_store::HdfsStore::from_uri(address)?;
            // The HDFS client retries its own requests (and fails over
            // between NameNodes): no second layer of retries for them.
            return Ok(Backend {
                retry_budget: None,
                ..Backend::remote(address, Arc::new(store), opts)?
            });
        }
        if let Some((scheme, _)) = address.split_once("://") {
            let hint = match scheme {
                "hdfs" => "; build hlfs with `--features hdfs` for it",
                "rados" => "; build hlfs with `--features rados` for it",
                _ => "",
            };
            return Err(VolumeError::InvalidArgument(format!(
                "volume address {address:?}: the {scheme}:// backend is not available in this build (local paths, file:// and s3:// are){hint}"
            )));
        }
        Backend::local(Path::new(address), create)
    }
}

/// A remote volume's writer site: the host and its journal directory, or a
/// checksum of the directory if the whole would not fit the manifest.
fn remote_site(journal_dir: &Path) -> String {
    let site = format!("{}:{}", hostname(), journal_dir.display());
    if site.len() <= hlfs_format::MAX_NAME_LEN {
        return site;
    }
    let crc = crc32c::crc32c(journal_dir.as_os_str().as_encoded_bytes());
    format!("{}:journal-{crc:08x}", hostname())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // or truncates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_writer_sites_name_the_journal_and_fit_a_manifest() {
        let short = remote_site(Path::new("/var/cache/hlfs/s3/b_vm/journal"));
        assert!(
            short.ends_with(":/var/cache/hlfs/s3/b_vm/journal"),
            "{short}"
        );
        let deep = PathBuf::from(format!("/{}/journal", "d".repeat(400)));
        let long = remote_site(&deep);
        assert!(long.len() <= hlfs_format::MAX_NAME_LEN, "{long}");
        assert_ne!(long, remote_site(&deep.join("other")));
    }
}
