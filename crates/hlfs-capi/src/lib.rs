//! libhlfs: HLFS volumes from C, in the original HLFS library's shape.
//!
//! A handle (`HLFS_CTRL`) names a volume; `hlfs_open` opens it, and reads,
//! writes and the rest go through it, from any number of threads at once.
//! Calls return 0 (or a count of bytes) on success and a negative errno on
//! failure; `hlfs_last_error` says why in words. The library runs its own
//! async runtime, shared by every handle of the process. A panic inside
//! becomes `-EIO`, never an unwinding across the boundary. Settings come
//! from the environment: `HLFS_CACHE_DIR` (journals and read cache of
//! remote volumes) and `HLFS_STORE_TIMEOUT` (seconds a call waits for a
//! store that is away, 30 by default), and for S3 the AWS variables.
//!
//! include/hlfs.h is generated from this file by cbindgen.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use hlfs_volume::{
    Backend, CreateOptions, ErrorKind, OpenOptions, StoreOptions, View, Volume, VolumeError,
};
use tokio::runtime::Runtime;

/// Open read-only (`hlfs_open`).
pub const HLFS_RDONLY: c_int = 0;
/// Open for reading and writing (`hlfs_open`).
pub const HLFS_RDWR: c_int = 1;

/// A volume handle. Opaque; made by `init_hlfs`, freed by `deinit_hlfs`.
pub struct HLFS_CTRL {
    address: String,
    store: StoreOptions,
    open: OpenOptions,
    volume: Mutex<Option<Volume>>,
    last_error: Mutex<String>,
}

/// What `hlfs_stat` fills in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HLFS_STAT_T {
    /// Logical size in bytes.
    pub size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Bytes of the volume that hold data.
    pub allocated_bytes: u64,
    /// Bytes the volume takes in its store (segments, manifests, journal).
    pub stored_bytes: u64,
}

/// Why a call failed: the errno it returns, negated, and the words.
struct Failure {
    errno: c_int,
    message: String,
}

impl From<VolumeError> for Failure {
    fn from(e: VolumeError) -> Failure {
        Failure {
            errno: errno_of(e.kind()),
            message: e.to_string(),
        }
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure {
        errno: libc::EINVAL,
        message: message.into(),
    }
}

/// The errno for an engine error of `kind`: the one place the C API
/// translates errors.
fn errno_of(kind: ErrorKind) -> c_int {
    match kind {
        ErrorKind::NotFound => libc::ENOENT,
        ErrorKind::AlreadyExists => libc::EEXIST,
        ErrorKind::Busy => libc::EBUSY,
        ErrorKind::InvalidInput | ErrorKind::OutOfRange => libc::EINVAL,
        ErrorKind::ReadOnly => libc::EROFS,
        ErrorKind::Unavailable => libc::EAGAIN,
        ErrorKind::Corrupt | ErrorKind::Io => libc::EIO,
        ErrorKind::Closed => libc::EBADF,
    }
}

/// The runtime every handle of the process shares.
fn runtime() -> Result<&'static Runtime, Failure> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("hlfs")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Failure {
            errno: libc::EIO,
            message: format!("cannot start the library's runtime: {e}"),
        })
}

/// Runs `future` to its end on the library's runtime.
fn block_on<T>(future: impl std::future::Future<Output = T>) -> Result<T, Failure> {
    Ok(runtime()?.block_on(future))
}

fn text(ptr: *const c_char, what: &str) -> Result<String, Failure> {
    if ptr.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str()
        .map(str::to_string)
        .map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// `-1`-style errno for calls that return a pointer: sets `errno`.
fn set_errno(errno: c_int) {
    // SAFETY: __errno_location is the calling thread's errno.
    unsafe { *libc::__errno_location() = errno };
}

/// Settings from the environment.
fn settings() -> (StoreOptions, OpenOptions) {
    let timeout = std::env::var("HLFS_STORE_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(30), Duration::from_secs);
    let store = StoreOptions {
        retry_budget: timeout,
        ..StoreOptions::default()
    };
    let open = OpenOptions {
        store_wait: timeout,
        ..OpenOptions::default()
    };
    (store, open)
}

impl HLFS_CTRL {
    fn backend(&self) -> Result<Backend, Failure> {
        Ok(Backend::parse(&self.address, false, &self.store)?)
    }

    /// The open volume.
    fn volume(&self) -> Result<Volume, Failure> {
        self.volume
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Failure {
                errno: libc::EBADF,
                message: format!("{} is not open: call hlfs_open first", self.address),
            })
    }

    /// Makes `volume` the open one, unless one is open already.
    fn set_open(&self, volume: Volume) -> Result<(), Failure> {
        let mut open = self.volume.lock().unwrap_or_else(|e| e.into_inner());
        if open.is_some() {
            return Err(Failure {
                errno: libc::EBUSY,
                message: format!("{} is open already: close it first", self.address),
            });
        }
        *open = Some(volume);
        Ok(())
    }

    fn ensure_closed(&self) -> Result<(), Failure> {
        if self
            .volume
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return Err(Failure {
                errno: libc::EBUSY,
                message: format!("{} is open already: close it first", self.address),
            });
        }
        Ok(())
    }
}

/// Runs a call on a handle: NULL checks, panics and errors become a
/// negative errno, and the handle remembers why.
fn call(ctrl: *mut HLFS_CTRL, f: impl FnOnce(&HLFS_CTRL) -> Result<c_int, Failure>) -> c_int {
    if ctrl.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: a non-NULL handle comes from init_hlfs and is not freed yet.
    let ctrl = unsafe { &*ctrl };
    let result = catch_unwind(AssertUnwindSafe(|| f(ctrl))).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(Failure {
            errno: libc::EIO,
            message: format!("internal error in libhlfs: {why}"),
        })
    });
    match result {
        Ok(n) => n,
        Err(failure) => {
            *ctrl.last_error.lock().unwrap_or_else(|e| e.into_inner()) = failure.message;
            -failure.errno
        }
    }
}

/// A buffer from C: `len` bytes at `ptr` (which may be NULL when `len` is 0).
fn buffer<'a>(ptr: *const c_char, len: u32) -> Result<&'a [u8], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(invalid("the buffer is NULL"));
    }
    if len > i32::MAX as u32 {
        return Err(invalid("at most 2 GiB per call"));
    }
    // SAFETY: the caller passes `len` readable bytes.
    Ok(unsafe { std::slice::from_raw_parts(ptr.cast(), len as usize) })
}

fn buffer_mut<'a>(ptr: *mut c_char, len: u32) -> Result<&'a mut [u8], Failure> {
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() {
        return Err(invalid("the buffer is NULL"));
    }
    if len > i32::MAX as u32 {
        return Err(invalid("at most 2 GiB per call"));
    }
    // SAFETY: the caller passes `len` writable bytes.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr.cast(), len as usize) })
}

/// A handle for the volume at `uri`: a path, `file://`, `s3://` or (when
/// built with HDFS) `hdfs://`. Nothing is opened yet. NULL on failure,
/// with `errno` set (EINVAL for a malformed address).
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn init_hlfs(uri: *const c_char) -> *mut HLFS_CTRL {
    let made = catch_unwind(|| -> Result<HLFS_CTRL, Failure> {
        let address = text(uri, "the address")?;
        let (store, open) = settings();
        // Refuse what cannot be a volume address now, not at hlfs_open.
        if let Some((scheme, _)) = address.split_once("://") {
            if !["file", "s3", "hdfs"].contains(&scheme) {
                return Err(invalid(format!("{address}: unknown scheme {scheme}://")));
            }
        }
        Ok(HLFS_CTRL {
            address,
            store,
            open,
            volume: Mutex::new(None),
            last_error: Mutex::new(String::new()),
        })
    });
    match made {
        Ok(Ok(ctrl)) => Box::into_raw(Box::new(ctrl)),
        Ok(Err(failure)) => {
            set_errno(failure.errno);
            std::ptr::null_mut()
        }
        Err(_) => {
            set_errno(libc::EIO);
            std::ptr::null_mut()
        }
    }
}

/// Closes the volume if it is open and frees the handle, which must not
/// be used again. Returns what closing returned.
///
/// # Safety
/// `ctrl` comes from `init_hlfs` and no other thread uses it any more.
#[no_mangle]
pub unsafe extern "C" fn deinit_hlfs(ctrl: *mut HLFS_CTRL) -> c_int {
    if ctrl.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: the caller's promise, passed on.
    let closed = unsafe { hlfs_close(ctrl) };
    let closed = if closed == -libc::EBADF { 0 } else { closed };
    // SAFETY: made by Box::into_raw in init_hlfs; the caller is done with it.
    drop(unsafe { Box::from_raw(ctrl) });
    closed
}

/// Creates an empty volume at `uri` of `size` bytes, with blocks of
/// `block_size` bytes (a power of two from 512 to 65536; 0 means 4096).
/// 0, or -EEXIST if there is one already, -EINVAL for bad sizes.
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hlfs_create(uri: *const c_char, size: u64, block_size: u32) -> c_int {
    let made = catch_unwind(|| -> Result<(), Failure> {
        let address = text(uri, "the address")?;
        let (store, _) = settings();
        let backend = Backend::parse(&address, true, &store)?;
        let opts = CreateOptions {
            size,
            block_size: if block_size == 0 { 4096 } else { block_size },
            ..CreateOptions::default()
        };
        block_on(Volume::create(&backend, &opts))??;
        Ok(())
    });
    match made {
        Ok(Ok(())) => 0,
        Ok(Err(failure)) => -failure.errno,
        Err(_) => -libc::EIO,
    }
}

/// Opens the volume: `HLFS_RDONLY` (its newest state, read-only) or
/// `HLFS_RDWR` (this process becomes its one writer; -EBUSY if another
/// holds it). -ENOENT if there is no volume.
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hlfs_open(ctrl: *mut HLFS_CTRL, flag: c_int) -> c_int {
    call(ctrl, |c| {
        c.ensure_closed()?;
        let backend = c.backend()?;
        let volume = match flag {
            HLFS_RDONLY => block_on(Volume::open_read_only(backend, &c.open, View::Head))??,
            HLFS_RDWR => block_on(Volume::open(backend, &c.open))??,
            other => {
                return Err(invalid(format!(
                    "flag {other} is neither HLFS_RDONLY nor HLFS_RDWR"
                )))
            }
        };
        c.set_open(volume)?;
        Ok(0)
    })
}

/// Opens snapshot `name` of the volume, read-only.
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hlfs_open_snapshot(ctrl: *mut HLFS_CTRL, name: *const c_char) -> c_int {
    call(ctrl, |c| {
        let name = text(name, "the snapshot name")?;
        c.ensure_closed()?;
        let backend = c.backend()?;
        let view = View::Snapshot(name);
        let volume = block_on(Volume::open_read_only(backend, &c.open, view))??;
        c.set_open(volume)?;
        Ok(0)
    })
}

/// Closes the volume: what was written is made durable and, for a writer,
/// sealed and handed to the store, and the volume is released. The handle
/// can be opened again.
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hlfs_close(ctrl: *mut HLFS_CTRL) -> c_int {
    call(ctrl, |c| {
        let volume = c.volume()?;
        c.volume.lock().unwrap_or_else(|e| e.into_inner()).take();
        block_on(volume.close())??;
        Ok(0)
    })
}

/// Reads `read_len` bytes at `pos` into `read_buf`. Returns `read_len`, or
/// -errno (-EINVAL past the end of the volume). Holes read as zeros.
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hlfs_read(
    ctrl: *mut HLFS_CTRL,
    read_buf: *mut c_char,
    read_len: u32,
    pos: u64,
) -> c_int {
    call(ctrl, |c| {
        let buf = buffer_mut(read_buf, read_len)?;
        block_on(c.volume()?.read_into(pos, buf))??;
        Ok(read_len as c_int)
    })
}

/// Writes `write_len` bytes from `write_buf` at `pos`. Returns
/// `write_len`, or -errno (-EINVAL past the end, -EROFS if read-only).
/// Durable once `hlfs_flush` returns.
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hlfs_write(
    ctrl: *mut HLFS_CTRL,
    write_buf: *const c_char,
    write_len: u32,
    pos: u64,
) -> c_int {
    call(ctrl, |c| {
        let data = buffer(write_buf, write_len)?;
        block_on(c.volume()?.write(pos, data))??;
        Ok(write_len as c_int)
    })
}

/// Makes every write that returned before it durable.
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hlfs_flush(ctrl: *mut HLFS_CTRL) -> c_int {
    call(ctrl, |c| {
        block_on(c.volume()?.flush())??;
        Ok(0)
    })
}

/// Makes `len` bytes at `pos` read as zeros and releases their space.
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hlfs_trim(ctrl: *mut HLFS_CTRL, pos: u64, len: u64) -> c_int {
    call(ctrl, |c| {
        block_on(c.volume()?.trim(pos, len))??;
        Ok(0)
    })
}

/// Makes `len` bytes at `pos` read as zeros (their space is released too).
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hlfs_write_zeroes(ctrl: *mut HLFS_CTRL, pos: u64, len: u64) -> c_int {
    call(ctrl, |c| {
        block_on(c.volume()?.write_zeroes(pos, len))??;
        Ok(0)
    })
}

/// Fills `stat` with the open volume's size and space.
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hlfs_stat(ctrl: *mut HLFS_CTRL, stat: *mut HLFS_STAT_T) -> c_int {
    call(ctrl, |c| {
        if stat.is_null() {
            return Err(invalid("stat is NULL"));
        }
        let info = block_on(c.volume()?.info())??;
        let filled = HLFS_STAT_T {
            size: info.size,
            block_size: info.block_size,
            allocated_bytes: info.allocated_bytes,
            stored_bytes: info.stored_bytes,
        };
        // SAFETY: the caller passes room for an HLFS_STAT_T.
        unsafe { stat.write(filled) };
        Ok(0)
    })
}

/// Takes snapshot `name` of the volume open for writing: it holds every
/// write that returned before the call.
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hlfs_take_snapshot(ctrl: *mut HLFS_CTRL, name: *const c_char) -> c_int {
    call(ctrl, |c| {
        let name = text(name, "the snapshot name")?;
        block_on(c.volume()?.snapshot_create(&name))??;
        Ok(0)
    })
}

/// Deletes snapshot `name`.
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hlfs_delete_snapshot(ctrl: *mut HLFS_CTRL, name: *const c_char) -> c_int {
    call(ctrl, |c| {
        let name = text(name, "the snapshot name")?;
        block_on(c.volume()?.snapshot_delete(&name))??;
        Ok(0)
    })
}

/// Makes the volume open for writing equal to snapshot `name` again; its
/// state before is kept as an automatic snapshot.
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hlfs_rollback(ctrl: *mut HLFS_CTRL, name: *const c_char) -> c_int {
    call(ctrl, |c| {
        let name = text(name, "the snapshot name")?;
        block_on(c.volume()?.rollback(&name))??;
        Ok(0)
    })
}

/// The names of the volume's snapshots, oldest first: `*names` gets an
/// array of `*count` strings, to be freed with `hlfs_free_snapshot_list`.
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hlfs_list_snapshots(
    ctrl: *mut HLFS_CTRL,
    names: *mut *mut *mut c_char,
    count: *mut usize,
) -> c_int {
    call(ctrl, |c| {
        if names.is_null() || count.is_null() {
            return Err(invalid("names and count must not be NULL"));
        }
        let list: Vec<*mut c_char> = c
            .volume()?
            .snapshots()
            .into_iter()
            .map(|s| {
                CString::new(s.name)
                    .expect("snapshot names have no NUL")
                    .into_raw()
            })
            .collect();
        let n = list.len();
        let array = Box::into_raw(list.into_boxed_slice()).cast::<*mut c_char>();
        // SAFETY: the caller passes places for both.
        unsafe {
            names.write(array);
            count.write(n);
        }
        Ok(0)
    })
}

/// Frees what `hlfs_list_snapshots` returned.
///
/// # Safety
/// `names` and `count` are exactly what one `hlfs_list_snapshots` returned,
/// freed once.
#[no_mangle]
pub unsafe extern "C" fn hlfs_free_snapshot_list(names: *mut *mut c_char, count: usize) {
    if names.is_null() {
        return;
    }
    // SAFETY: made by hlfs_list_snapshots from a boxed slice of `count`
    // strings, each from CString::into_raw.
    unsafe {
        let list = Box::from_raw(std::ptr::slice_from_raw_parts_mut(names, count));
        for name in list.iter() {
            drop(CString::from_raw(*name));
        }
    }
}

/// Copies why the last failing call on `ctrl` failed into `buf` (at most
/// `len` bytes, NUL included). Returns the length of the whole message.
///
/// # Safety
/// Pointers as the header describes them: a handle from `init_hlfs` not
/// yet freed, buffers of the lengths given, NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hlfs_last_error(
    ctrl: *mut HLFS_CTRL,
    buf: *mut c_char,
    len: usize,
) -> c_int {
    call(ctrl, |c| {
        let message = c
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !buf.is_null() && len > 0 {
            let n = message.len().min(len - 1);
            // SAFETY: the caller passes `len` writable bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(message.as_ptr(), buf.cast::<u8>(), n);
                *buf.add(n) = 0;
            }
        }
        Ok(message.len().min(i32::MAX as usize) as c_int)
    })
}

/// What a (negative or positive) errno returned by libhlfs means.
#[no_mangle]
pub extern "C" fn hlfs_strerror(err: c_int) -> *const c_char {
    let text: &'static CStr = match err.checked_abs().unwrap_or(0) {
        0 => c"success",
        libc::ENOENT => c"no such volume or snapshot",
        libc::EEXIST => c"it exists already",
        libc::EBUSY => c"another writer holds the volume, or the handle is open already",
        libc::EINVAL => c"invalid argument, or a range beyond the end of the volume",
        libc::EROFS => c"the volume is open read-only",
        libc::EAGAIN => c"the store is unavailable; try again later",
        libc::EIO => c"I/O error, or damaged data",
        libc::EBADF => c"the volume is not open, or was closed",
        _ => c"unknown error",
    };
    text.as_ptr()
}

/// The library's version, e.g. "0.1.0".
#[no_mangle]
pub extern "C" fn hlfs_version() -> *const c_char {
    static VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    VERSION.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_an_errno_and_every_errno_a_text() {
        use ErrorKind::*;
        for kind in [
            NotFound,
            AlreadyExists,
            Busy,
            InvalidInput,
            OutOfRange,
            ReadOnly,
            Unavailable,
            Corrupt,
            Io,
            Closed,
        ] {
            let errno = errno_of(kind);
            // SAFETY: hlfs_strerror returns a static NUL-terminated string.
            let text = unsafe { CStr::from_ptr(hlfs_strerror(-errno)) };
            assert_ne!(text.to_str().unwrap(), "unknown error", "{kind:?}");
        }
    }
}
