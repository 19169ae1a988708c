//! LocalStore and LocalJournal specifics beyond the conformance suites.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use bytes::Bytes;
use hlfs_store::{BlobStore, JournalDir, LocalJournal, LocalStore, StoreError};

#[tokio::test]
async fn put_file_links_instead_of_copying() {
    let dir = tempfile::tempdir().unwrap();
    let journal = LocalJournal::new(dir.path().join("journal")).unwrap();
    let store = LocalStore::new(dir.path().join("store"));

    let file = journal.create("open-segment").unwrap();
    file.write_at(0, b"segment bytes").unwrap();
    file.sync().unwrap();
    let src = journal.local_path("open-segment").unwrap();
    let src_inode = std::fs::metadata(&src).unwrap().ino();

    store
        .put_file_if_absent("segments/0001", &src)
        .await
        .unwrap();
    let blob = dir.path().join("store/segments/0001");
    assert_eq!(std::fs::metadata(&blob).unwrap().ino(), src_inode);

    assert!(matches!(
        store.put_file_if_absent("segments/0001", &src).await,
        Err(StoreError::AlreadyExists(name)) if name == "segments/0001"
    ));
    journal.remove("open-segment").unwrap();
    assert_eq!(
        store.get("segments/0001").await.unwrap(),
        &b"segment bytes"[..]
    );
    // Nothing is left behind in the staging area.
    assert_eq!(
        std::fs::read_dir(dir.path().join("store")).unwrap().count(),
        1
    );
}

#[tokio::test]
async fn put_file_of_a_missing_source_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path());
    let err = store
        .put_file_if_absent("x", &dir.path().join("nope"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    assert_eq!(store.head("x").await.unwrap(), None);
}

#[tokio::test]
async fn put_leaves_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path());
    store
        .put_if_absent("a/b", Bytes::from_static(b"1"))
        .await
        .unwrap();
    store
        .put_if_absent("a/b", Bytes::from_static(b"2"))
        .await
        .unwrap_err();
    let tmp: Vec<_> = std::fs::read_dir(dir.path().join(".tmp"))
        .unwrap()
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");
    assert_eq!(std::fs::read(dir.path().join("a/b")).unwrap(), b"1");
}

#[tokio::test]
async fn bad_names_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path().join("store"));
    for name in [
        "",
        "/abs",
        "../escape",
        "a/../b",
        "a/..",
        ".tmp/x",
        "a/.hidden",
        "a//b",
        "a/",
        ".",
    ] {
        let put = store.put_if_absent(name, Bytes::from_static(b"x")).await;
        assert!(
            matches!(put, Err(StoreError::Invalid(_))),
            "put {name:?}: {put:?}"
        );
        let get = store.get_range(name, 0, 0).await;
        assert!(
            matches!(get, Err(StoreError::Invalid(_))),
            "get {name:?}: {get:?}"
        );
        let head = store.head(name).await;
        assert!(
            matches!(head, Err(StoreError::Invalid(_))),
            "head {name:?}: {head:?}"
        );
        let delete = store.delete(name).await;
        assert!(
            matches!(delete, Err(StoreError::Invalid(_))),
            "delete {name:?}: {delete:?}"
        );
    }
    let message = store.head("../x").await.unwrap_err().to_string();
    assert!(
        message.contains("..") && message.contains("invalid blob name"),
        "{message}"
    );
    assert!(!dir.path().join("escape").exists());
    // A prefix no valid name can start with lists nothing, and walks nothing.
    assert!(store.list("../").await.unwrap().is_empty());
}

#[tokio::test]
async fn list_skips_the_staging_area_and_foreign_dotfiles() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path());
    store
        .put_if_absent("a", Bytes::from_static(b"1"))
        .await
        .unwrap();
    std::fs::write(dir.path().join(".tmp/123.0.stale"), b"junk").unwrap();
    std::fs::write(dir.path().join(".DS_Store"), b"junk").unwrap();
    let names: Vec<_> = store
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["a"]);
}

#[tokio::test]
async fn missing_root_is_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(dir.path().join("not-yet")));
    assert!(store.list("").await.unwrap().is_empty());
    assert_eq!(store.head("a").await.unwrap(), None);
    store.delete("a").await.unwrap();
    assert!(matches!(
        store.clone().open_reader("a").await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store.describe(),
        dir.path().join("not-yet").display().to_string()
    );
}

#[test]
fn journal_lock_excludes_other_instances_on_the_same_dir() {
    let dir = tempfile::tempdir().unwrap();
    let first = LocalJournal::new(dir.path()).unwrap();
    let second = LocalJournal::new(dir.path()).unwrap();
    let held = first.lock().unwrap();
    match second.lock() {
        Err(StoreError::Locked { name }) => assert_eq!(name, dir.path().display().to_string()),
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(held);
    let _held = second.lock().unwrap();
    assert!(matches!(first.lock(), Err(StoreError::Locked { .. })));
}

#[test]
fn journal_names_are_single_components() {
    let dir = tempfile::tempdir().unwrap();
    let journal = LocalJournal::new(dir.path()).unwrap();
    for name in ["", "a/b", "../x", ".hidden", "LOCK"] {
        assert!(
            matches!(journal.create(name), Err(StoreError::Invalid(_))),
            "{name:?}"
        );
        assert_eq!(journal.local_path(name), None, "{name:?}");
    }
    assert_eq!(journal.local_path("seg"), Some(dir.path().join("seg")));
}

#[test]
fn journal_read_at_huge_len_is_cheap() {
    let dir = tempfile::tempdir().unwrap();
    let journal = LocalJournal::new(dir.path()).unwrap();
    let file = journal.create("f").unwrap();
    file.write_at(0, b"abc").unwrap();
    assert_eq!(file.read_at(1, usize::MAX).unwrap(), b"bc");
    assert_eq!(file.read_at(u64::MAX, usize::MAX).unwrap(), b"");
}

/// Pages of `path` in `range` that are in the page cache.
fn resident_pages(path: &std::path::Path, range: std::ops::Range<usize>) -> usize {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = range.end;
    // SAFETY: a read-only shared mapping of a file we keep open, only
    // passed to mincore, never dereferenced.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    // SAFETY: sysconf only reads a value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `vec` has one byte per page of the mapping.
    let rc = unsafe { libc::mincore(map, len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0);
    // SAFETY: unmapping what was mapped above.
    unsafe { libc::munmap(map, len) };
    vec[range.start / page..]
        .iter()
        .filter(|&&b| b & 1 == 1)
        .count()
}

#[test]
fn released_journal_bytes_leave_the_page_cache_and_still_read_back() {
    // On a disk, not a tmpfs TMPDIR, whose pages are never dropped.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let journal = LocalJournal::new(dir.path().join("journal")).unwrap();
    let file = journal.create("open-segment").unwrap();
    let chunk = 4 << 20;
    let data: Vec<u8> = (0..2 * chunk).map(|i| (i % 251) as u8).collect();
    file.write_at(0, &data).unwrap();
    let path = journal.local_path("open-segment").unwrap();
    assert!(resident_pages(&path, 0..chunk) > 0, "just written");

    file.release(0, chunk as u64).unwrap();
    assert_eq!(resident_pages(&path, 0..chunk), 0, "released");
    assert!(
        resident_pages(&path, chunk..2 * chunk) > 0,
        "only the range given is released"
    );
    assert_eq!(file.read_at(0, 2 * chunk).unwrap(), data);
}

/// What a put cut off by a crash leaves in `.tmp` goes at the next sweep;
/// staging files of a running process, or touched within the last minute,
/// and the blobs stay.
#[tokio::test]
async fn sweep_removes_staging_files_of_processes_that_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path());
    store
        .put_if_absent("segments/0000000001", Bytes::from_static(b"blob"))
        .await
        .unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let gone = child.id();
    child.wait().unwrap();
    let tmp = dir.path().join(".tmp");
    let stage = |name: String, len: usize, old: bool| {
        let path = tmp.join(name);
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(len as u64).unwrap();
        if old {
            let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
            file.set_modified(hour_ago).unwrap();
        }
        path
    };
    let cut_off = stage(format!("{gone}.0.00000000000000aa"), 4096, true);
    let fresh = stage(format!("{gone}.1.00000000000000bb"), 10, false);
    let running = stage(
        format!("{}.2.00000000000000cc", std::process::id()),
        10,
        true,
    );
    let foreign = stage("notes.txt".to_string(), 10, true);
    assert_eq!(store.sweep_leftovers().await.unwrap(), 4096);
    assert!(!cut_off.exists());
    for kept in [&fresh, &running, &foreign] {
        assert!(kept.exists(), "{}", kept.display());
    }
    assert_eq!(
        store.get("segments/0000000001").await.unwrap(),
        Bytes::from_static(b"blob")
    );
    assert_eq!(store.sweep_leftovers().await.unwrap(), 0);
}
