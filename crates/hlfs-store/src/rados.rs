//! Blobs as objects in a Ceph RADOS pool, through librados: no gateway
//! between the engine and the OSDs.
//!
//! A store is `rados://POOL/NAMESPACE`: each volume lives in its own RADOS
//! namespace of the pool, so listing it walks its own objects only, and a
//! blob named `segments/0000000007` is the object of that name.
//!
//! **Atomic create.** A blob up to [`PIECE_BYTES`] is one write operation:
//! an exclusive create and the data together, so nobody ever sees it half
//! written and of two racing creates exactly one wins. A larger blob (RADOS
//! caps one write at `osd_max_write_size`, 90 MiB by default, and an object
//! at 128 MiB) is cut into pieces: the pieces after the first are written
//! first, as private objects `.pieces/NAME/TAG/I` named by a tag unique to
//! the attempt; then one write operation creates NAME exclusively with the
//! first piece and an attribute naming the tag and the size. That create is
//! the commit: before it the blob does not exist, after it every piece it
//! names is in place, and a losing racer's pieces are never named.
//!
//! **Settings** come the way Ceph's own tools take them: the configuration
//! file from `--ceph-conf` or else `CEPH_CONF` (else Ceph's default places),
//! the client id from `--ceph-id` (else `admin`), the keyring from
//! `--ceph-keyring` or the configuration, and anything else from `CEPH_ARGS`.
//! None of it is ever printed.
//!
//! Each call makes one attempt, bounded by librados's operation timeouts;
//! the [`crate::layers::Retrying`] layer around the store retries.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fmt;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use ceph::rados as ffi;
use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;

use crate::{validate_blob_name, BlobMeta, BlobStore, CephSettings, Result, StoreError};

/// The largest blob written as a single object, and the size of each piece
/// of a larger one: under Ceph's default `osd_max_write_size` (90 MiB), and
/// large enough that a segment of the default 64 MiB, with the record that
/// overflowed it, stays one object.
pub const PIECE_BYTES: u64 = 80 << 20;

/// The attribute on a blob's head object that makes it a blob in pieces:
/// `v1 TAG SIZE PIECE`.
const LAYOUT_XATTR: &str = "hlfs.layout";
/// Objects a blob name can never be (blob names have no component starting
/// with `.`), hidden from listings.
const PIECES_PREFIX: &str = ".pieces/";
/// Stats in flight while listing.
const LIST_STATS_IN_FLIGHT: usize = 16;

/// More pieces than a blob of the largest segment has with the smallest
/// piece the tests use: a damaged attribute cannot send a reader or a
/// delete through billions of objects.
const MAX_PIECES: u64 = 1 << 16;

const LIBRADOS_CREATE_EXCLUSIVE: libc::c_int = 1;

/// A connection to a cluster, shared by every store with the same settings
/// in the process.
struct Cluster(ffi::rados_t);

// librados handles are safe to use from several threads at once.
unsafe impl Send for Cluster {}
unsafe impl Sync for Cluster {}

impl Drop for Cluster {
    fn drop(&mut self) {
        unsafe { ffi::rados_shutdown(self.0) }
    }
}

/// A pool and namespace to do I/O in.
struct IoCtx {
    ctx: ffi::rados_ioctx_t,
    _cluster: Arc<Cluster>,
}

unsafe impl Send for IoCtx {}
unsafe impl Sync for IoCtx {}

impl Drop for IoCtx {
    fn drop(&mut self) {
        unsafe { ffi::rados_ioctx_destroy(self.ctx) }
    }
}

/// A negative errno from librados.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Errno(i32);

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

fn check(ret: libc::c_int) -> std::result::Result<libc::c_int, Errno> {
    if ret < 0 {
        Err(Errno(-ret))
    } else {
        Ok(ret)
    }
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| StoreError::Invalid(format!("{what} {s:?} contains a NUL byte")))
}

/// A store error for a failed librados call about `what`.
fn classify(what: &str, e: Errno) -> StoreError {
    let message = format!("{what}: {e}");
    match e.0 {
        libc::ENOENT => StoreError::NotFound(what.to_string()),
        libc::EEXIST => StoreError::AlreadyExists(what.to_string()),
        // Down OSDs or monitors, a lost session, a full pool: all may clear.
        libc::ETIMEDOUT
        | libc::EAGAIN
        | libc::EINTR
        | libc::ENOTCONN
        | libc::ECONNREFUSED
        | libc::ECONNRESET
        | libc::EHOSTUNREACH
        | libc::ENOSPC
        | libc::EDQUOT => StoreError::Unavailable(message),
        // Not allowed, blocklisted, or too big for the cluster's limits.
        libc::EACCES
        | libc::EPERM
        | libc::ESHUTDOWN
        | libc::EFBIG
        | libc::E2BIG
        | libc::EOPNOTSUPP => StoreError::Refused(message),
        libc::EINVAL | libc::ENAMETOOLONG => StoreError::Invalid(message),
        errno => StoreError::io(what, std::io::Error::from_raw_os_error(errno)),
    }
}

impl Cluster {
    /// Connects with `settings`, or shares the connection already made with
    /// the same ones.
    fn connect(settings: &CephSettings, timeout: Duration) -> Result<Arc<Cluster>> {
        static CLUSTERS: OnceLock<Mutex<HashMap<String, Weak<Cluster>>>> = OnceLock::new();
        let key = format!("{settings:?} {timeout:?}");
        let clusters = CLUSTERS.get_or_init(Default::default);
        let mut clusters = clusters.lock();
        if let Some(cluster) = clusters.get(&key).and_then(Weak::upgrade) {
            return Ok(cluster);
        }
        let cluster = Arc::new(Cluster::connect_new(settings, timeout)?);
        clusters.retain(|_, c| c.strong_count() > 0);
        clusters.insert(key, Arc::downgrade(&cluster));
        Ok(cluster)
    }

    fn connect_new(settings: &CephSettings, timeout: Duration) -> Result<Cluster> {
        // Ceph's tools take `--id ID` and `--name client.ID`: take either.
        let id = settings
            .id
            .as_deref()
            .map(|id| id.strip_prefix("client.").unwrap_or(id));
        let client = format!("client.{}", id.unwrap_or("admin"));
        let id = id.map(|id| cstring("ceph id", id)).transpose()?;
        let mut handle: ffi::rados_t = std::ptr::null_mut();
        let failed = |what: &str, e: Errno| {
            StoreError::Unavailable(format!("connecting to Ceph: {what}: {e}"))
        };
        check(unsafe {
            ffi::rados_create(
                &mut handle,
                id.as_ref().map_or(std::ptr::null(), |id| id.as_ptr()),
            )
        })
        .map_err(|e| failed("creating the client", e))?;
        // From here the handle is released by Drop, connected or not.
        let cluster = Cluster(handle);
        let conf = match &settings.conf {
            Some(path) => Some(cstring("ceph configuration path", &path.to_string_lossy())?),
            None => None,
        };
        check(unsafe {
            ffi::rados_conf_read_file(
                handle,
                conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        })
        .map_err(|e| {
            let which = settings
                .conf
                .as_ref()
                .map_or("CEPH_CONF or the default places".to_string(), |p| {
                    p.display().to_string()
                });
            StoreError::Invalid(format!("reading the Ceph configuration ({which}): {e}"))
        })?;
        let set = |option: &str, value: &str| {
            let (o, v) = (cstring("option", option)?, cstring(option, value)?);
            check(unsafe { ffi::rados_conf_set(handle, o.as_ptr(), v.as_ptr()) })
                .map(drop)
                .map_err(|e| StoreError::Invalid(format!("setting {option}: {e}")))
        };
        // librados's own messages go to its log, not into ours, unless
        // CEPH_ARGS says otherwise.
        set("log_to_stderr", "false")?;
        set("err_to_stderr", "false")?;
        check(unsafe { ffi::rados_conf_parse_env(handle, std::ptr::null()) })
            .map_err(|e| StoreError::Invalid(format!("parsing CEPH_ARGS: {e}")))?;
        // Without these a request to a down OSD or monitor waits forever.
        let secs = timeout.as_secs().max(1).to_string();
        set("rados_osd_op_timeout", &secs)?;
        set("rados_mon_op_timeout", &secs)?;
        set("client_mount_timeout", &secs)?;
        if let Some(keyring) = &settings.keyring {
            set("keyring", &keyring.to_string_lossy())?;
        }
        check(unsafe { ffi::rados_connect(handle) }).map_err(|e| match e.0 {
            // No key for the client, or a key the monitors do not take.
            libc::ENOENT | libc::EACCES | libc::EPERM => StoreError::Refused(format!(
                "connecting to Ceph as {client}: {e} (check --ceph-id and its keyring)"
            )),
            _ => failed(&format!("connecting to the monitors as {client}"), e),
        })?;
        Ok(cluster)
    }
}

impl IoCtx {
    fn open(cluster: Arc<Cluster>, pool: &str, namespace: &str) -> Result<IoCtx> {
        let (p, ns) = (cstring("pool", pool)?, cstring("namespace", namespace)?);
        let mut ctx: ffi::rados_ioctx_t = std::ptr::null_mut();
        check(unsafe { ffi::rados_ioctx_create(cluster.0, p.as_ptr(), &mut ctx) }).map_err(
            |e| match e.0 {
                libc::ENOENT => StoreError::NotFound(format!("Ceph pool {pool:?}")),
                _ => classify(&format!("opening Ceph pool {pool:?}"), e),
            },
        )?;
        let io = IoCtx {
            ctx,
            _cluster: cluster,
        };
        unsafe { ffi::rados_ioctx_set_namespace(io.ctx, ns.as_ptr()) };
        Ok(io)
    }

    /// One write operation: an exclusive create of `oid` with `data`, and
    /// `layout` as its layout attribute if given.
    fn create(
        &self,
        oid: &CStr,
        data: &[u8],
        layout: Option<&str>,
    ) -> std::result::Result<(), Errno> {
        struct Op(ffi::rados_write_op_t);
        impl Drop for Op {
            fn drop(&mut self) {
                unsafe { ffi::rados_release_write_op(self.0) }
            }
        }
        let name = CString::new(LAYOUT_XATTR).expect("no NUL");
        let op = Op(unsafe { ffi::rados_create_write_op() });
        unsafe {
            ffi::rados_write_op_create(op.0, LIBRADOS_CREATE_EXCLUSIVE, std::ptr::null());
            ffi::rados_write_op_write_full(op.0, data.as_ptr().cast(), data.len());
            if let Some(layout) = layout {
                ffi::rados_write_op_setxattr(
                    op.0,
                    name.as_ptr(),
                    layout.as_ptr().cast(),
                    layout.len(),
                );
            }
            check(ffi::rados_write_op_operate(
                op.0,
                self.ctx,
                oid.as_ptr(),
                std::ptr::null_mut(),
                0,
            ))?;
        }
        Ok(())
    }

    /// Reads into `buf` from `offset`; the bytes read (fewer at the end).
    fn read(&self, oid: &CStr, buf: &mut [u8], offset: u64) -> std::result::Result<usize, Errno> {
        let n = check(unsafe {
            ffi::rados_read(
                self.ctx,
                oid.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                offset,
            )
        })?;
        Ok(n as usize)
    }

    /// The object's size and modification time (seconds since the epoch).
    fn stat(&self, oid: &CStr) -> std::result::Result<(u64, u64), Errno> {
        let (mut size, mut mtime) = (0u64, 0 as libc::time_t);
        check(unsafe { ffi::rados_stat(self.ctx, oid.as_ptr(), &mut size, &mut mtime) })?;
        Ok((size, mtime.max(0) as u64))
    }

    /// The layout attribute, or None if the object has none.
    fn layout(&self, oid: &CStr) -> std::result::Result<Option<String>, Errno> {
        let name = CString::new(LAYOUT_XATTR).expect("no NUL");
        let mut buf = [0u8; 256];
        match check(unsafe {
            ffi::rados_getxattr(
                self.ctx,
                oid.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        }) {
            Ok(n) => Ok(Some(
                String::from_utf8_lossy(&buf[..n as usize]).into_owned(),
            )),
            Err(Errno(libc::ENODATA)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn remove(&self, oid: &CStr) -> std::result::Result<(), Errno> {
        match check(unsafe { ffi::rados_remove(self.ctx, oid.as_ptr()) }) {
            Ok(_) | Err(Errno(libc::ENOENT)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every object name in the namespace, in no order.
    fn list(&self) -> std::result::Result<Vec<String>, Errno> {
        struct List(ffi::rados_list_ctx_t);
        impl Drop for List {
            fn drop(&mut self) {
                unsafe { ffi::rados_nobjects_list_close(self.0) }
            }
        }
        let mut ctx: ffi::rados_list_ctx_t = std::ptr::null_mut();
        check(unsafe { ffi::rados_nobjects_list_open(self.ctx, &mut ctx) })?;
        let list = List(ctx);
        let mut names = Vec::new();
        loop {
            let mut entry: *const libc::c_char = std::ptr::null();
            let ret = unsafe {
                ffi::rados_nobjects_list_next(
                    list.0,
                    // The binding declares the out-pointers one level too deep.
                    (&mut entry as *mut *const libc::c_char).cast(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            match check(ret) {
                Ok(_) => {
                    let name = unsafe { CStr::from_ptr(entry) };
                    names.push(name.to_string_lossy().into_owned());
                }
                Err(Errno(libc::ENOENT)) => return Ok(names),
                Err(e) => return Err(e),
            }
        }
    }
}

/// What a stat of a blob's head object tells.
struct Described {
    size: u64,
    modified_ms: u64,
    layout: Option<Layout>,
}

/// Where the bytes of a blob in pieces are.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    tag: String,
    size: u64,
    piece: u64,
}

impl Layout {
    fn encode(&self) -> String {
        format!("v1 {} {} {}", self.tag, self.size, self.piece)
    }

    fn decode(text: &str) -> Option<Layout> {
        let mut words = text.split(' ');
        let (Some("v1"), Some(tag), Some(size), Some(piece), None) = (
            words.next(),
            words.next(),
            words.next(),
            words.next(),
            words.next(),
        ) else {
            return None;
        };
        let layout = Layout {
            tag: tag.to_string(),
            size: size.parse().ok()?,
            piece: piece.parse().ok()?,
        };
        let sane = !layout.tag.is_empty()
            && layout.tag.bytes().all(|b| b.is_ascii_hexdigit())
            && layout.piece > 0
            && layout.size > layout.piece
            && layout.pieces() <= MAX_PIECES;
        sane.then_some(layout)
    }

    fn pieces(&self) -> u64 {
        self.size.div_ceil(self.piece)
    }
}

/// The object holding piece `index` (1 or more) of blob `name`.
fn piece_name(name: &str, tag: &str, index: u64) -> String {
    format!("{PIECES_PREFIX}{name}/{tag}/{index}")
}

/// The blob and tag a piece's object belongs to: the inverse of
/// [`piece_name`]. None for any other object.
fn piece_of(oid: &str) -> Option<(&str, &str)> {
    let rest = oid.strip_prefix(PIECES_PREFIX)?;
    let mut parts = rest.rsplitn(3, '/');
    let (index, tag, name) = (parts.next()?, parts.next()?, parts.next()?);
    let valid = index.parse::<u64>().is_ok_and(|i| i >= 1)
        && !tag.is_empty()
        && tag.bytes().all(|b| b.is_ascii_hexdigit())
        && !name.is_empty();
    valid.then_some((name, tag))
}

/// Pieces untouched for this long, that no head names, are leftovers: a
/// put writes its pieces before its head, within seconds.
const STALE_PIECE_AGE: Duration = Duration::from_secs(600);

/// A namespace of a RADOS pool, e.g. `rados://hlfs/vms/vm1`.
pub struct RadosStore {
    io: Arc<IoCtx>,
    pool: String,
    namespace: String,
    piece: u64,
    /// How long pieces no head names must stay untouched to be swept.
    stale_after: Duration,
}

impl fmt::Debug for RadosStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl RadosStore {
    /// Parses `rados://POOL/NAMESPACE` and connects to the cluster
    /// `settings` name (blocking). Each request to a monitor or an OSD,
    /// connecting included, fails after `timeout`.
    pub fn from_uri(uri: &str, settings: &CephSettings, timeout: Duration) -> Result<RadosStore> {
        let (pool, namespace) = parse_uri(uri)?;
        let cluster = Cluster::connect(settings, timeout)?;
        let io = IoCtx::open(cluster, &pool, &namespace)?;
        Ok(RadosStore {
            io: Arc::new(io),
            pool,
            namespace,
            piece: PIECE_BYTES,
            stale_after: STALE_PIECE_AGE,
        })
    }

    /// The same store, sweeping pieces no head names once untouched for
    /// `age` (for tests, which cannot wait ten minutes).
    pub fn with_stale_piece_age(mut self, age: Duration) -> RadosStore {
        self.stale_after = age;
        self
    }

    /// The same store, cutting blobs into pieces of `bytes` (for tests of
    /// blobs in pieces without writing hundreds of MiB).
    pub fn with_piece_size(mut self, bytes: u64) -> RadosStore {
        self.piece = bytes.max(1);
        self
    }

    fn what(&self, name: &str) -> String {
        format!("{}/{name}", self.describe())
    }

    /// An I/O error: blob `name` is not what its head says.
    fn damage(&self, name: &str, kind: std::io::ErrorKind, why: String) -> StoreError {
        StoreError::io(self.what(name), std::io::Error::new(kind, why))
    }

    /// Runs a blocking librados call off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&IoCtx) -> T + Send + 'static,
    ) -> Result<T> {
        let io = self.io.clone();
        tokio::task::spawn_blocking(move || call(&io))
            .await
            .map_err(|e| StoreError::Unavailable(format!("a librados call failed: {e}")))
    }

    /// The blob's size, age and, if it is in pieces, their layout; None if
    /// the blob does not exist. Not remembered: another process may delete
    /// the blob at any time.
    async fn describe_blob(&self, name: &str) -> Result<Option<Described>> {
        let oid = cstring("blob name", name)?;
        let piece = self.piece;
        let found = self
            .blocking(move |io| -> std::result::Result<_, Errno> {
                let (size, mtime) = match io.stat(&oid) {
                    Ok(stat) => stat,
                    Err(Errno(libc::ENOENT)) => return Ok(None),
                    Err(e) => return Err(e),
                };
                // Only a head object of exactly one piece can have pieces.
                let layout = if size == piece {
                    io.layout(&oid)?
                } else {
                    None
                };
                Ok(Some((size, mtime, layout)))
            })
            .await?
            .map_err(|e| classify(&self.what(name), e))?;
        let Some((size, mtime, text)) = found else {
            return Ok(None);
        };
        let modified_ms = mtime * 1000;
        let Some(text) = text else {
            return Ok(Some(Described {
                size,
                modified_ms,
                layout: None,
            }));
        };
        let layout = Layout::decode(&text)
            .filter(|l| l.piece == size)
            .ok_or_else(|| {
                self.damage(
                    name,
                    std::io::ErrorKind::InvalidData,
                    format!("its layout attribute {text:?} is damaged"),
                )
            })?;
        Ok(Some(Described {
            size: layout.size,
            modified_ms,
            layout: Some(layout),
        }))
    }

    /// Reads `len` bytes at `offset` of object `oid` exactly; Ok(None) if
    /// the object holds fewer.
    async fn read_exact(&self, oid: String, offset: u64, len: u64) -> Result<Option<Bytes>> {
        let what = self.what(&oid);
        let c_oid = cstring("object name", &oid)?;
        let got = self
            .blocking(move |io| {
                let mut buf = BytesMut::zeroed(len as usize);
                let n = io.read(&c_oid, &mut buf, offset)?;
                Ok::<_, Errno>((n as u64 == len).then(|| buf.freeze()))
            })
            .await?;
        got.map_err(|e| match e.0 {
            libc::ENOENT => StoreError::NotFound(oid),
            _ => classify(&what, e),
        })
    }

    async fn remove(&self, oid: String) -> Result<()> {
        let what = self.what(&oid);
        let c_oid = cstring("object name", &oid)?;
        self.blocking(move |io| io.remove(&c_oid))
            .await?
            .map_err(|e| classify(&what, e))
    }
}

/// `rados://POOL/NAMESPACE` as (pool, namespace).
fn parse_uri(uri: &str) -> Result<(String, String)> {
    let rest = uri
        .strip_prefix("rados://")
        .ok_or_else(|| StoreError::Invalid(format!("{uri:?} is not a rados:// address")))?;
    let (pool, namespace) = rest.split_once('/').unwrap_or((rest, ""));
    let namespace = namespace.trim_matches('/');
    if pool.is_empty() {
        return Err(StoreError::Invalid(format!("{uri:?} names no pool")));
    }
    if namespace.is_empty() {
        return Err(StoreError::Invalid(format!(
            "{uri:?} names no volume: use rados://POOL/NAME (each volume is a namespace of the pool)"
        )));
    }
    // librados reads a namespace of "\x01" as every namespace of the pool.
    if uri.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "{uri:?} contains a control character"
        )));
    }
    Ok((pool.to_string(), namespace.to_string()))
}

#[async_trait]
impl BlobStore for RadosStore {
    fn describe(&self) -> String {
        format!("rados://{}/{}", self.pool, self.namespace)
    }

    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<()> {
        validate_blob_name(name)?;
        let what = self.what(name);
        let oid = cstring("blob name", name)?;
        if data.len() as u64 <= self.piece {
            return self
                .blocking(move |io| io.create(&oid, &data, None))
                .await?
                .map_err(|e| classify(&what, e));
        }
        // Writing the pieces of a name that exists is wasted work.
        if self.describe_blob(name).await?.is_some() {
            return Err(StoreError::AlreadyExists(what));
        }
        let layout = Layout {
            tag: format!("{:016x}", rand::random::<u64>()),
            size: data.len() as u64,
            piece: self.piece,
        };
        if layout.pieces() > MAX_PIECES {
            return Err(StoreError::Invalid(format!(
                "{what}: {} bytes is more than {MAX_PIECES} pieces",
                layout.size
            )));
        }
        let piece_of = |i: u64| {
            let start = (i * layout.piece) as usize;
            let end = ((i + 1) * layout.piece).min(layout.size) as usize;
            data.slice(start..end)
        };
        let written = futures::stream::iter(1..layout.pieces())
            .map(|i| {
                let (oid, bytes) = (piece_name(name, &layout.tag, i), piece_of(i));
                async move {
                    let what = self.what(&oid);
                    let c_oid = cstring("object name", &oid)?;
                    self.blocking(move |io| io.create(&c_oid, &bytes, None))
                        .await?
                        .map_err(|e| classify(&what, e))
                }
            })
            .buffer_unordered(4)
            .try_collect::<Vec<()>>()
            .await;
        let committed = match &written {
            Ok(_) => {
                let (head, text) = (piece_of(0), layout.encode());
                self.blocking(move |io| io.create(&oid, &head, Some(&text)))
                    .await
                    .and_then(|r| r.map_err(|e| classify(&what, e)))
            }
            // Not the piece's own error: an AlreadyExists of a piece must
            // not read as the blob existing.
            Err(e) => Err(StoreError::Unavailable(format!(
                "{what}: writing a piece: {e}"
            ))),
        };
        // Take the pieces back only when nothing can name them: a piece
        // failed (the head was never tried) or another create won. After a
        // timeout the head may have landed after all, naming them.
        let orphaned = written.is_err() || matches!(committed, Err(StoreError::AlreadyExists(_)));
        if orphaned {
            for i in 1..layout.pieces() {
                let _ = self.remove(piece_name(name, &layout.tag, i)).await;
            }
        }
        committed
    }

    async fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Bytes> {
        validate_blob_name(name)?;
        let out_of_range = |size| StoreError::out_of_range(name, offset, len, size);
        let end = offset.checked_add(len).ok_or_else(|| out_of_range(0))?;
        // Within the head object: one read, whatever the blob's layout.
        if len > 0 && end <= self.piece {
            if let Some(bytes) = self.read_exact(name.to_string(), offset, len).await? {
                return Ok(bytes);
            }
        }
        let Described { size, layout, .. } = self
            .describe_blob(name)
            .await?
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        if end > size {
            return Err(out_of_range(size));
        }
        if len == 0 {
            return Ok(Bytes::new());
        }
        let Some(layout) = layout else {
            return self
                .read_exact(name.to_string(), offset, len)
                .await?
                .ok_or_else(|| out_of_range(size));
        };
        // The parts of each piece the range covers, read four at a time.
        let first = offset / layout.piece;
        let last = (end - 1) / layout.piece;
        let parts: Vec<Bytes> = futures::stream::iter(first..=last)
            .map(|i| {
                let start = (i * layout.piece).max(offset);
                let stop = ((i + 1) * layout.piece).min(end);
                let oid = match i {
                    0 => name.to_string(),
                    i => piece_name(name, &layout.tag, i),
                };
                async move {
                    self.read_exact(oid.clone(), start - i * layout.piece, stop - start)
                        .await?
                        .ok_or_else(|| {
                            self.damage(
                                name,
                                std::io::ErrorKind::UnexpectedEof,
                                format!("its piece {oid} is short"),
                            )
                        })
                }
            })
            .buffered(4)
            .try_collect()
            .await
            .map_err(|e| match e {
                // The head is there but a piece it names is gone.
                StoreError::NotFound(piece) if piece != name => self.damage(
                    name,
                    std::io::ErrorKind::NotFound,
                    format!("its piece {piece} is missing"),
                ),
                e => e,
            })?;
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().expect("one part"));
        }
        let mut out = BytesMut::with_capacity(len as usize);
        for part in parts {
            out.extend_from_slice(&part);
        }
        Ok(out.freeze())
    }

    async fn head(&self, name: &str) -> Result<Option<u64>> {
        validate_blob_name(name)?;
        Ok(self.describe_blob(name).await?.map(|d| d.size))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<BlobMeta>> {
        let what = format!("listing {}/{prefix}", self.describe());
        let mut names = self
            .blocking(|io| io.list())
            .await?
            .map_err(|e| classify(&what, e))?;
        names.retain(|n| n.starts_with(prefix) && !n.starts_with(PIECES_PREFIX));
        let mut out: Vec<BlobMeta> = futures::stream::iter(names)
            .map(|name| async move {
                // Deleted since it was listed: not there.
                Ok::<_, StoreError>(self.describe_blob(&name).await?.map(|d| BlobMeta {
                    name,
                    size: d.size,
                    modified_ms: d.modified_ms,
                }))
            })
            .buffer_unordered(LIST_STATS_IN_FLIGHT)
            .try_filter_map(|meta| async move { Ok(meta) })
            .try_collect()
            .await?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn delete(&self, name: &str) -> Result<()> {
        validate_blob_name(name)?;
        let layout = match self.describe_blob(name).await? {
            None => return Ok(()),
            Some(d) => d.layout,
        };
        // The head first: once it is gone the blob is, whatever pieces a
        // crash may leave behind.
        self.remove(name.to_string()).await?;
        if let Some(layout) = layout {
            for i in 1..layout.pieces() {
                self.remove(piece_name(name, &layout.tag, i)).await?;
            }
        }
        Ok(())
    }

    /// Pieces no head names, untouched for the stale age: of a put a
    /// crash cut off between its pieces and its head, of a put whose head
    /// never landed after a timeout, or of a delete that failed after
    /// taking the head.
    async fn sweep_leftovers(&self) -> Result<u64> {
        let what = format!("listing {}/{PIECES_PREFIX}", self.describe());
        let names = self
            .blocking(|io| io.list())
            .await?
            .map_err(|e| classify(&what, e))?;
        let mut by_blob: HashMap<(String, String), Vec<String>> = HashMap::new();
        for oid in names {
            if let Some((name, tag)) = piece_of(&oid) {
                let key = (name.to_string(), tag.to_string());
                by_blob.entry(key).or_default().push(oid);
            }
        }
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut freed = 0;
        for ((name, tag), pieces) in by_blob {
            // A blob name that is not valid has no head either; a head
            // whose layout is damaged keeps what it may name.
            let named = validate_blob_name(&name).is_ok()
                && match self.describe_blob(&name).await {
                    Ok(found) => found.and_then(|d| d.layout).is_some_and(|l| l.tag == tag),
                    Err(StoreError::Io { .. }) => true,
                    Err(e) => return Err(e),
                };
            if named {
                continue;
            }
            for oid in pieces {
                let c_oid = cstring("object name", &oid)?;
                let stale_after = self.stale_after.as_secs();
                let removed = self
                    .blocking(move |io| -> std::result::Result<u64, Errno> {
                        let (size, mtime) = match io.stat(&c_oid) {
                            Ok(stat) => stat,
                            Err(Errno(libc::ENOENT)) => return Ok(0),
                            Err(e) => return Err(e),
                        };
                        if now_s.saturating_sub(mtime) < stale_after {
                            return Ok(0);
                        }
                        io.remove(&c_oid)?;
                        Ok(size)
                    })
                    .await?
                    .map_err(|e| classify(&self.what(&oid), e))?;
                freed += removed;
            }
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_name_a_pool_and_a_namespace() {
        assert_eq!(
            parse_uri("rados://hlfs/vms/vm1").unwrap(),
            ("hlfs".to_string(), "vms/vm1".to_string())
        );
        assert_eq!(
            parse_uri("rados://p/v/").unwrap(),
            ("p".to_string(), "v".to_string())
        );
        for bad in [
            "rados://",
            "rados:///v",
            "rados://pool",
            "rados://pool/",
            "s3://b/v",
            "rados://pool/\u{1}",
            "rados://pool/a\0b",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn layouts_round_trip_and_garbage_is_refused() {
        let layout = Layout {
            tag: "00ff".into(),
            size: 300,
            piece: 100,
        };
        assert_eq!(Layout::decode(&layout.encode()), Some(layout.clone()));
        assert_eq!(layout.pieces(), 3);
        for bad in [
            "",
            "v1",
            "v1 00ff 18446744073709551615 1",
            "v2 00ff 300 100",
            "v1 00ff 300",
            "v1 00ff 300 100 9",
            "v1 zz 300 100",
            "v1 00ff 100 100",
            "v1 00ff 300 0",
            "v1 00ff -1 100",
        ] {
            assert_eq!(Layout::decode(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        /// The attribute comes from the store: any bytes decode to a sane
        /// layout or to nothing, never a panic, and every sane layout
        /// survives a round trip.
        #[test]
        fn any_attribute_decodes_to_a_sane_layout_or_nothing(text in "\\PC{0,80}", words in proptest::collection::vec("[v0-9a-f -]{0,20}", 0..6)) {
            for candidate in [text, words.join(" ")] {
                if let Some(layout) = Layout::decode(&candidate) {
                    proptest::prop_assert!(layout.piece > 0 && layout.size > layout.piece);
                    proptest::prop_assert!((2..=MAX_PIECES).contains(&layout.pieces()));
                    proptest::prop_assert_eq!(Layout::decode(&layout.encode()), Some(layout));
                }
            }
        }
    }

    #[test]
    fn errors_map_to_what_the_caller_can_do() {
        assert!(matches!(
            classify("x", Errno(libc::ENOENT)),
            StoreError::NotFound(_)
        ));
        assert!(matches!(
            classify("x", Errno(libc::EEXIST)),
            StoreError::AlreadyExists(_)
        ));
        assert!(classify("x", Errno(libc::ETIMEDOUT)).is_transient());
        assert!(matches!(
            classify("x", Errno(libc::EACCES)),
            StoreError::Refused(_)
        ));
        assert!(matches!(
            classify("x", Errno(libc::EIO)),
            StoreError::Io { .. }
        ));
    }
}
