//! The embedded backend: blobs are files under a root directory and the
//! journal is a plain directory of files.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use crate::{
    validate_blob_name, validate_journal_name, BlobMeta, BlobReader, BlobStore, JournalDir,
    JournalFile, JournalLock, Result, StoreError, JOURNAL_LOCK_NAME,
};

/// Where blobs are staged before being linked into place. Its name starts with
/// `.`, so it can never collide with a blob and `list` skips it.
const TMP_DIR: &str = ".tmp";

/// Blobs as files under a root directory: blob `a/b/c` is `root/a/b/c`.
///
/// A blob is created by writing and fsyncing a temporary file and hard-linking
/// it to its final name: `link` fails if the name exists, which gives
/// create-if-absent atomically, and a reader never sees a partial blob.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    /// Directories whose entry is known to be durable in their parent, so each
    /// directory costs its fsyncs once per process rather than once per put.
    durable_dirs: Arc<Mutex<HashSet<PathBuf>>>,
}

impl LocalStore {
    /// A store rooted at `root`. Nothing is created until the first put.
    pub fn new(root: impl Into<PathBuf>) -> LocalStore {
        LocalStore {
            root: root.into(),
            durable_dirs: Arc::default(),
        }
    }

    /// The directory holding the blobs.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, name: &str) -> Result<PathBuf> {
        validate_blob_name(name)?;
        Ok(self.root.join(name))
    }

    /// Make sure directory `dir` inside the root exists and its entry in its
    /// parent is durable. The parent is fsynced even if someone else created
    /// `dir`: they may not have synced it yet.
    fn ensure_durable_dir(&self, dir: &Path) -> io::Result<()> {
        if self.durable_dirs.lock().contains(dir) {
            return Ok(());
        }
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        sync_dir(parent_dir(dir))?;
        self.durable_dirs.lock().insert(dir.to_path_buf());
        Ok(())
    }

    /// Like `ensure_durable_dir` for the root, which may need several levels
    /// created. A root that already exists is taken as durable: its parents
    /// are not ours to open and fsync.
    fn ensure_root(&self) -> io::Result<()> {
        if self.durable_dirs.lock().contains(&self.root) {
            return Ok(());
        }
        if !self.root.is_dir() {
            fs::create_dir_all(&self.root)?;
            sync_dir(parent_dir(&self.root))?;
        }
        self.durable_dirs.lock().insert(self.root.clone());
        Ok(())
    }

    /// Create the root and every directory on the way to `name`, durably, and
    /// return the directory that will hold `name`.
    fn prepare_parent(&self, name: &str) -> Result<PathBuf> {
        self.ensure_root()
            .map_err(|e| StoreError::io(self.root.display().to_string(), e))?;
        let mut dir = self.root.clone();
        if let Some((parents, _)) = name.rsplit_once('/') {
            for component in parents.split('/') {
                dir.push(component);
                self.ensure_durable_dir(&dir)
                    .map_err(|e| StoreError::io(dir.display().to_string(), e))?;
            }
        }
        Ok(dir)
    }

    /// Create blob `name` from a temporary file filled by `fill`.
    fn put_via_temp(
        &self,
        name: &str,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<()> {
        let final_path = self.path_of(name)?;
        let parent = self.prepare_parent(name)?;
        let tmp_dir = self.root.join(TMP_DIR);
        self.ensure_durable_dir(&tmp_dir)
            .map_err(|e| StoreError::io(tmp_dir.display().to_string(), e))?;

        let mut tmp = TempFile::create(&tmp_dir)?;
        let tmp_err = |e| StoreError::io(tmp.path.display().to_string(), e);
        fill(&mut tmp.file).map_err(tmp_err)?;
        tmp.file.sync_all().map_err(tmp_err)?;

        match fs::hard_link(&tmp.path, &final_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::AlreadyExists(name.to_string()))
            }
            Err(e) => return Err(StoreError::io(final_path.display().to_string(), e)),
        }
        drop(tmp);
        sync_dir(&parent).map_err(|e| StoreError::io(parent.display().to_string(), e))
    }

    fn put_file_blocking(&self, name: &str, src: &Path) -> Result<()> {
        let final_path = self.path_of(name)?;
        let parent = self.prepare_parent(name)?;
        match fs::hard_link(src, &final_path) {
            Ok(()) => {
                sync_dir(&parent).map_err(|e| StoreError::io(parent.display().to_string(), e))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(StoreError::AlreadyExists(name.to_string()))
            }
            Err(e) if cannot_link(&e) => {
                tracing::debug!(
                    "cannot link {} to {}: {e}; copying instead",
                    src.display(),
                    final_path.display()
                );
                self.put_via_temp(name, |tmp| {
                    let mut source = File::open(src)?;
                    io::copy(&mut source, tmp)?;
                    Ok(())
                })
            }
            Err(e) => Err(StoreError::io(src.display().to_string(), e)),
        }
    }

    fn list_blocking(&self, prefix: &str) -> Result<Vec<BlobMeta>> {
        // Only the directory named by the prefix up to its last `/` can hold
        // matches. If that part cannot start a valid name nothing matches, and
        // returning early also keeps `..` from walking outside the root.
        let dir_part = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else if validate_blob_name(dir_part).is_ok() {
            self.root.join(dir_part)
        } else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        walk(&start, dir_part, prefix, &mut found)?;
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }
}

/// Collect the regular files under `dir` (whose blob name is `rel`) whose
/// names start with `prefix`.
fn walk(dir: &Path, rel: &str, prefix: &str, found: &mut Vec<BlobMeta>) -> Result<()> {
    let io_err = |e| StoreError::io(dir.display().to_string(), e);
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if is_missing(&e) => return Ok(()),
        Err(e) => return Err(io_err(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err)?;
        // Names that are not UTF-8 or start with `.` are not blobs (`.tmp`,
        // editor droppings); `validate_blob_name` refuses to create them.
        let Ok(file_name) = entry.file_name().into_string() else {
            continue;
        };
        if file_name.starts_with('.') {
            continue;
        }
        let name = if rel.is_empty() {
            file_name
        } else {
            format!("{rel}/{file_name}")
        };
        // A blob deleted while we list is simply not listed.
        let file_type = match entry.file_type() {
            Ok(t) => t,
            Err(e) if is_missing(&e) => continue,
            Err(e) => return Err(io_err(e)),
        };
        if file_type.is_dir() {
            let as_dir = format!("{name}/");
            if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                walk(&entry.path(), &name, prefix, found)?;
            }
        } else if file_type.is_file() && name.starts_with(prefix) {
            match entry.metadata() {
                Ok(meta) => found.push(BlobMeta {
                    name,
                    size: meta.len(),
                    modified_ms: meta.modified().map_or(0, crate::epoch_ms),
                }),
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(io_err(e)),
            }
        }
    }
    Ok(())
}

#[async_trait]
impl BlobStore for LocalStore {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<()> {
        validate_blob_name(name)?;
        let store = self.clone();
        let name = name.to_string();
        blocking(move || {
            // Cheap early answer for the common loser of a race, before
            // writing a temp copy; the link below is what decides.
            if fs::symlink_metadata(store.root.join(&name)).is_ok() {
                return Err(StoreError::AlreadyExists(name));
            }
            store.put_via_temp(&name, |tmp| tmp.write_all(&data))
        })
        .await
    }

    async fn put_file_if_absent(&self, name: &str, path: &Path) -> Result<()> {
        validate_blob_name(name)?;
        let store = self.clone();
        let name = name.to_string();
        let src = path.to_path_buf();
        blocking(move || store.put_file_blocking(&name, &src)).await
    }

    async fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Bytes> {
        let path = self.path_of(name)?;
        let name = name.to_string();
        blocking(move || {
            let (file, size) = open_blob(&path, &name)?;
            read_range(&file, &name, offset, len, size)
        })
        .await
    }

    async fn head(&self, name: &str) -> Result<Option<u64>> {
        let path = self.path_of(name)?;
        blocking(move || match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(meta.len())),
            Ok(_) => Ok(None),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(StoreError::io(path.display().to_string(), e)),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<BlobMeta>> {
        let store = self.clone();
        let prefix = prefix.to_string();
        blocking(move || store.list_blocking(&prefix)).await
    }

    async fn delete(&self, name: &str) -> Result<()> {
        let path = self.path_of(name)?;
        blocking(move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                // A directory is not a blob, so there is no such blob either.
                Err(e) if is_missing(&e) || e.kind() == io::ErrorKind::IsADirectory => {
                    return Ok(())
                }
                Err(e) => return Err(StoreError::io(path.display().to_string(), e)),
            }
            let parent = parent_dir(&path);
            sync_dir(parent).map_err(|e| StoreError::io(parent.display().to_string(), e))
        })
        .await
    }

    /// Staging files of puts a crash cut off: in `.tmp`, of a process
    /// that is gone, untouched for a minute.
    async fn sweep_leftovers(&self) -> Result<u64> {
        let dir = self.root.join(TMP_DIR);
        blocking(move || sweep_stale_temps(&dir, STALE_TEMP_AGE)).await
    }

    async fn open_reader(self: Arc<Self>, name: &str) -> Result<Arc<dyn BlobReader>> {
        let path = self.path_of(name)?;
        let name = name.to_string();
        blocking(move || {
            let (file, size) = open_blob(&path, &name)?;
            Ok(Arc::new(LocalReader { file, name, size }) as Arc<dyn BlobReader>)
        })
        .await
    }
}

/// An open blob file.
struct LocalReader {
    file: File,
    name: String,
    size: u64,
}

#[async_trait]
impl BlobReader for LocalReader {
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        // Deliberately inline rather than in spawn_blocking: reads of sealed
        // segments are almost always served from the page cache in a few
        // microseconds, less than the cost of a hop to the blocking pool.
        read_range(&self.file, &self.name, offset, len as u64, self.size)
    }

    async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_exact(&self.file, &self.name, offset, buf, self.size)
    }

    fn size(&self) -> u64 {
        self.size
    }
}

fn open_blob(path: &Path, name: &str) -> Result<(File, u64)> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if is_missing(&e) => return Err(StoreError::NotFound(name.to_string())),
        Err(e) => return Err(StoreError::io(path.display().to_string(), e)),
    };
    let meta = file
        .metadata()
        .map_err(|e| StoreError::io(path.display().to_string(), e))?;
    if !meta.is_file() {
        return Err(StoreError::NotFound(name.to_string()));
    }
    Ok((file, meta.len()))
}

fn read_range(file: &File, name: &str, offset: u64, len: u64, size: u64) -> Result<Bytes> {
    let len = usize::try_from(len).map_err(|_| StoreError::OutOfRange {
        name: name.to_string(),
        offset,
        len,
        size,
    })?;
    let mut buf = vec![0; len];
    read_exact(file, name, offset, &mut buf, size)?;
    Ok(Bytes::from(buf))
}

/// Fills `buf` from `offset`; `OutOfRange` if the file (of `size` bytes, or
/// shorter than it) ends first.
fn read_exact(file: &File, name: &str, offset: u64, buf: &mut [u8], size: u64) -> Result<()> {
    let len = buf.len() as u64;
    let out_of_range = || StoreError::OutOfRange {
        name: name.to_string(),
        offset,
        len,
        size,
    };
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(out_of_range());
    }
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(out_of_range()),
        Err(e) => Err(StoreError::io(name, e)),
    }
}

/// A staging file untouched for this long, of a process that is gone, is a
/// leftover. (The age covers a directory shared between hosts, whose
/// process ids say nothing here.)
const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes the staging files in `dir` that no put will link any more:
/// named after a process that is not running, and not modified for `age`.
/// Returns their bytes.
fn sweep_stale_temps(dir: &Path, age: std::time::Duration) -> Result<u64> {
    let io_err = |e| StoreError::io(dir.display().to_string(), e);
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if is_missing(&e) => return Ok(0),
        Err(e) => return Err(io_err(e)),
    };
    let mut freed = 0;
    for entry in entries {
        let entry = entry.map_err(io_err)?;
        let pid = entry
            .file_name()
            .to_str()
            .and_then(|n| n.split('.').next())
            .and_then(|p| p.parse::<i32>().ok());
        let Some(pid) = pid else { continue };
        if process_runs(pid) {
            continue;
        }
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            Err(e) if is_missing(&e) => continue,
            Err(e) => return Err(io_err(e)),
        };
        let untouched = meta
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|idle| idle >= age);
        if !meta.is_file() || !untouched {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => freed += meta.len(),
            Err(e) if is_missing(&e) => {}
            Err(e) => return Err(StoreError::io(entry.path().display().to_string(), e)),
        }
    }
    Ok(freed)
}

/// Whether process `pid` exists here (signal 0 checks without sending;
/// EPERM means it runs as another user).
fn process_runs(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing and touches no memory.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A staging file in `.tmp`, removed when dropped: once linked its data lives
/// on under the final name, and on failure it is garbage.
struct TempFile {
    path: PathBuf,
    file: File,
}

impl TempFile {
    fn create(dir: &Path) -> Result<TempFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        // The pid and counter make the name unique within this host; the
        // random part keeps two processes sharing a pid namespace apart.
        let path = dir.join(format!(
            "{}.{}.{:016x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u64>()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| StoreError::io(path.display().to_string(), e))?;
        Ok(TempFile { path, file })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!("cannot remove temporary file {}: {e}", self.path.display());
        }
    }
}

/// Errors of `link` that mean "this filesystem pair cannot link", as opposed
/// to a real problem with the source or destination.
fn cannot_link(e: &io::Error) -> bool {
    // Not a `matches!`: ENOTSUP and EOPNOTSUPP are the same number on Linux.
    const CANNOT_LINK: [i32; 6] = [
        libc::EXDEV,
        libc::EPERM,
        libc::EMLINK,
        libc::ENOTSUP,
        libc::EOPNOTSUPP,
        libc::ENOSYS,
    ];
    e.raw_os_error()
        .is_some_and(|code| CANNOT_LINK.contains(&code))
}

/// NotFound, or a path component that is a file rather than a directory: in
/// both cases the thing asked for does not exist.
fn is_missing(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// The directory holding `path`; `.` for a bare relative name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Make the entries of `dir` (creations, links, removals) durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(StoreError::Unavailable(format!(
            "blocking store task failed: {e}"
        ))),
    }
}

/// The journal area as a plain local directory.
#[derive(Debug)]
pub struct LocalJournal {
    dir: PathBuf,
}

impl LocalJournal {
    /// Open (creating it if needed) the journal directory `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Result<LocalJournal> {
        let dir = dir.into();
        let io_err = |e| StoreError::io(dir.display().to_string(), e);
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(io_err)?;
            // Files created in it are only durable if it is.
            sync_dir(parent_dir(&dir)).map_err(io_err)?;
        }
        Ok(LocalJournal { dir })
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, name: &str) -> Result<PathBuf> {
        validate_journal_name(name)?;
        Ok(self.dir.join(name))
    }

    fn sync(&self) -> Result<()> {
        sync_dir(&self.dir).map_err(|e| StoreError::io(self.dir.display().to_string(), e))
    }
}

impl JournalDir for LocalJournal {
    fn create(&self, name: &str) -> Result<Arc<dyn JournalFile>> {
        let path = self.path_of(name)?;
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::AlreadyExists(name.to_string()))
            }
            Err(e) => return Err(StoreError::io(path.display().to_string(), e)),
        };
        self.sync()?;
        Ok(Arc::new(LocalJournalFile::new(file, &path)))
    }

    fn open(&self, name: &str) -> Result<Arc<dyn JournalFile>> {
        let path = self.path_of(name)?;
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => Ok(Arc::new(LocalJournalFile::new(file, &path))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::NotFound(name.to_string()))
            }
            Err(e) => Err(StoreError::io(path.display().to_string(), e)),
        }
    }

    fn list(&self) -> Result<Vec<String>> {
        let io_err = |e| StoreError::io(self.dir.display().to_string(), e);
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name == JOURNAL_LOCK_NAME || name.starts_with('.') {
                continue;
            }
            match entry.file_type() {
                Ok(t) if t.is_file() => names.push(name),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        names.sort();
        Ok(names)
    }

    fn remove(&self, name: &str) -> Result<()> {
        let path = self.path_of(name)?;
        match fs::remove_file(&path) {
            Ok(()) => self.sync(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(path.display().to_string(), e)),
        }
    }

    fn local_path(&self, name: &str) -> Option<PathBuf> {
        self.path_of(name).ok()
    }

    fn lock(&self) -> Result<JournalLock> {
        let path = self.dir.join(JOURNAL_LOCK_NAME);
        let io_err = |e| StoreError::io(path.display().to_string(), e);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        // flock locks belong to the open file description, so this also
        // excludes a second open in the same process, and the kernel drops
        // the lock when the guard closes the file or the process dies.
        loop {
            // SAFETY: flock only takes a descriptor, which `file` keeps open.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(JournalLock::new(Box::new(file)));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => {
                    return Err(StoreError::Locked {
                        name: self.dir.display().to_string(),
                    })
                }
                _ => return Err(io_err(e)),
            }
        }
    }
}

struct LocalJournalFile {
    file: File,
    name: String,
}

impl LocalJournalFile {
    fn new(file: File, path: &Path) -> Self {
        LocalJournalFile {
            file,
            name: path.display().to_string(),
        }
    }

    fn io_err(&self, e: io::Error) -> StoreError {
        StoreError::io(&self.name, e)
    }
}

impl JournalFile for LocalJournalFile {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| self.io_err(e))
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        // Size the buffer by what is there, so a generous `len` near the end
        // does not allocate and zero memory that will not be read into.
        let available = self.len()?.saturating_sub(offset);
        let want = usize::try_from(available).map_or(len, |available| available.min(len));
        let mut buf = vec![0; want];
        let mut filled = 0;
        while filled < want {
            match self
                .file
                .read_at(&mut buf[filled..], offset + filled as u64)
            {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(e)),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }

    fn read_exact_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_exact(&self.file, &self.name, offset, buf, u64::MAX)
    }

    fn write_parts_at(&self, offset: u64, parts: &[&[u8]]) -> Result<()> {
        use std::os::fd::AsRawFd;
        let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut bufs = &mut slices[..];
        let mut at = offset;
        while !bufs.is_empty() {
            // SAFETY: IoSlice is ABI-compatible with iovec, and the slices
            // outlive the call.
            let n = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    bufs.as_ptr().cast(),
                    bufs.len().min(1024) as libc::c_int,
                    at as libc::off64_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.io_err(e));
            }
            if n == 0 {
                return Err(self.io_err(io::ErrorKind::WriteZero.into()));
            }
            at += n as u64;
            io::IoSlice::advance_slices(&mut bufs, n as usize);
        }
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.file.metadata().map_err(|e| self.io_err(e))?.len())
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.io_err(e))
    }

    fn start_writeback(&self, offset: u64, len: u64) -> Result<()> {
        self.sync_range(offset, len, libc::SYNC_FILE_RANGE_WRITE)
    }

    fn release(&self, offset: u64, len: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        self.sync_range(
            offset,
            len,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )?;
        // SAFETY: a plain syscall on a descriptor this struct owns.
        let rc = unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(self.io_err(io::Error::from_raw_os_error(rc)));
        }
        Ok(())
    }

    fn truncate(&self, len: u64) -> Result<()> {
        self.file.set_len(len).map_err(|e| self.io_err(e))?;
        self.file.sync_data().map_err(|e| self.io_err(e))
    }
}

impl LocalJournalFile {
    fn sync_range(&self, offset: u64, len: u64, flags: libc::c_uint) -> Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a descriptor this struct owns.
        let rc = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                flags,
            )
        };
        if rc != 0 {
            return Err(self.io_err(io::Error::last_os_error()));
        }
        Ok(())
    }
}
