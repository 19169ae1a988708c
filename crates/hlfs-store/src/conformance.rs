//! The behaviour every backend must have, as runnable checks. Each backend's
//! tests call these; a failure panics with the store and the broken promise.
//!
//! The blob suite works under a fresh random prefix and deletes what it wrote,
//! so it can run against a shared bucket.

use std::sync::Arc;

use bytes::Bytes;

use crate::{BlobMeta, BlobStore, JournalDir, JournalFile, Result, StoreError};

/// Check `store` against the [`BlobStore`] contract.
pub async fn run_blob_store_suite(store: Arc<dyn BlobStore>) {
    let base = format!("conformance-{:016x}", rand::random::<u64>());
    let t = BlobSuite {
        who: store.describe(),
        store,
        base,
    };
    t.put_get_head_range().await;
    t.put_existing_fails().await;
    t.racing_puts().await;
    t.list_prefixes().await;
    t.delete().await;
    t.empty_blob().await;
    t.large_blob_and_reader().await;
    t.put_file().await;
    t.cleanup().await;
}

struct BlobSuite {
    store: Arc<dyn BlobStore>,
    who: String,
    base: String,
}

/// What a result was, for messages: never the bytes of a large blob.
fn outcome<T: AsRef<[u8]>>(r: &Result<T>) -> String {
    match r {
        Ok(bytes) => format!("Ok({} bytes)", bytes.as_ref().len()),
        Err(e) => format!("Err({e:?})"),
    }
}

impl BlobSuite {
    fn name(&self, rel: &str) -> String {
        format!("{}/{rel}", self.base)
    }

    fn fail(&self, what: &str) -> ! {
        panic!("blob store conformance failed on {}: {what}", self.who)
    }

    async fn put(&self, name: &str, data: impl Into<Bytes>) {
        if let Err(e) = self.store.put_if_absent(name, data.into()).await {
            self.fail(&format!("put_if_absent({name}) of a new name: {e}"));
        }
    }

    async fn get(&self, name: &str) -> Bytes {
        match self.store.get(name).await {
            Ok(data) => data,
            Err(e) => self.fail(&format!("get({name}): {e}")),
        }
    }

    async fn expect_content(&self, name: &str, want: &[u8]) {
        let got = self.get(name).await;
        if got != want {
            self.fail(&format!(
                "get({name}) returned {} bytes that differ from the {} bytes stored",
                got.len(),
                want.len()
            ));
        }
    }

    async fn expect_head(&self, name: &str, want: Option<u64>) {
        match self.store.head(name).await {
            Ok(got) if got == want => {}
            other => self.fail(&format!(
                "head({name}): expected Ok({want:?}), got {other:?}"
            )),
        }
    }

    async fn expect_range(&self, name: &str, offset: u64, len: u64, want: &[u8]) {
        let got = self.store.get_range(name, offset, len).await;
        match &got {
            Ok(data) if data == want => {}
            _ => self.fail(&format!(
                "get_range({name}, {offset}, {len}): expected the {} bytes stored there, got {}",
                want.len(),
                outcome(&got)
            )),
        }
    }

    async fn expect_out_of_range(&self, name: &str, offset: u64, len: u64) {
        let got = self.store.get_range(name, offset, len).await;
        if !matches!(got, Err(StoreError::OutOfRange { .. })) {
            self.fail(&format!(
                "get_range({name}, {offset}, {len}) past the end: expected OutOfRange, got {}",
                outcome(&got)
            ));
        }
    }

    async fn expect_not_found(&self, name: &str) {
        let got = self.store.get(name).await;
        if !matches!(got, Err(StoreError::NotFound(_))) {
            self.fail(&format!(
                "get({name}) of a missing blob: expected NotFound, got {}",
                outcome(&got)
            ));
        }
        let got = self.store.get_range(name, 0, 1).await;
        if !matches!(got, Err(StoreError::NotFound(_))) {
            self.fail(&format!(
                "get_range({name}, 0, 1) of a missing blob: expected NotFound, got {}",
                outcome(&got)
            ));
        }
        self.expect_head(name, None).await;
    }

    /// Lists `prefix`, checking that every blob's age is today's (the
    /// conformance run made them all), as (name, size).
    async fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        let list = match self.store.list(prefix).await {
            Ok(list) => list,
            Err(e) => self.fail(&format!("list({prefix:?}): {e}")),
        };
        let now = crate::epoch_ms(std::time::SystemTime::now());
        const DAY_MS: u64 = 86_400_000;
        for blob in &list {
            if blob.modified_ms.abs_diff(now) > DAY_MS {
                self.fail(&format!(
                    "list({prefix:?}): {} was made at {} ms, not today ({now} ms)",
                    blob.name, blob.modified_ms
                ));
            }
        }
        list.into_iter()
            .map(|BlobMeta { name, size, .. }| (name, size))
            .collect()
    }

    async fn put_get_head_range(&self) {
        let name = self.name("basic/hello");
        self.put(&name, &b"hello world"[..]).await;
        self.expect_content(&name, b"hello world").await;
        self.expect_head(&name, Some(11)).await;
        self.expect_range(&name, 0, 5, b"hello").await;
        self.expect_range(&name, 6, 5, b"world").await;
        self.expect_range(&name, 3, 0, b"").await;
        self.expect_range(&name, 11, 0, b"").await;
        self.expect_out_of_range(&name, 6, 6).await;
        self.expect_out_of_range(&name, 0, 12).await;
        self.expect_out_of_range(&name, 12, 0).await;
        self.expect_out_of_range(&name, u64::MAX, 1).await;
        self.expect_not_found(&self.name("basic/missing")).await;
        self.expect_not_found(&self.name("no-such-dir/missing"))
            .await;
    }

    async fn put_existing_fails(&self) {
        let name = self.name("exists/blob");
        self.put(&name, &b"first"[..]).await;
        match self
            .store
            .put_if_absent(&name, Bytes::from_static(b"second, longer"))
            .await
        {
            Err(StoreError::AlreadyExists(_)) => {}
            other => self.fail(&format!(
                "put_if_absent({name}) over an existing blob: expected AlreadyExists, got {other:?}"
            )),
        }
        self.expect_content(&name, b"first").await;
    }

    async fn racing_puts(&self) {
        const RACERS: usize = 16;
        let name = self.name("race/winner");
        let contents: Vec<Bytes> = (0..RACERS)
            .map(|i| Bytes::from(vec![i as u8 + 1; 64 * 1024 + i]))
            .collect();
        let tasks: Vec<_> = contents
            .iter()
            .map(|data| {
                let store = self.store.clone();
                let name = name.clone();
                let data = data.clone();
                tokio::spawn(async move { store.put_if_absent(&name, data).await })
            })
            .collect();
        let mut winners = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            match task.await.expect("put task panicked") {
                Ok(()) => winners.push(i),
                Err(StoreError::AlreadyExists(_)) => {}
                Err(e) => self.fail(&format!("racing put_if_absent({name}) #{i}: {e}")),
            }
        }
        if winners.len() != 1 {
            self.fail(&format!(
                "{RACERS} racing put_if_absent({name}): expected exactly one to succeed, \
                 got {} ({winners:?})",
                winners.len()
            ));
        }
        self.expect_content(&name, &contents[winners[0]]).await;
    }

    async fn list_prefixes(&self) {
        let blobs = [
            ("list/a", 1),
            ("list/b/c", 2),
            ("list/b/d", 3),
            ("list/bb", 4),
            ("list/b/e/f", 5),
            ("listx/g", 6),
            ("other/h", 7),
        ];
        for (rel, size) in blobs {
            self.put(&self.name(rel), vec![b'x'; size]).await;
        }
        let expect = |prefix: &str, want: &[(&str, u64)]| {
            let want: Vec<(String, u64)> = want
                .iter()
                .map(|&(rel, size)| (self.name(rel), size))
                .collect();
            (self.name(prefix), want)
        };
        let cases = [
            expect(
                "list/",
                &[
                    ("list/a", 1),
                    ("list/b/c", 2),
                    ("list/b/d", 3),
                    ("list/b/e/f", 5),
                    ("list/bb", 4),
                ],
            ),
            expect(
                "list/b",
                &[
                    ("list/b/c", 2),
                    ("list/b/d", 3),
                    ("list/b/e/f", 5),
                    ("list/bb", 4),
                ],
            ),
            expect(
                "list/b/",
                &[("list/b/c", 2), ("list/b/d", 3), ("list/b/e/f", 5)],
            ),
            expect("list/a", &[("list/a", 1)]),
            expect(
                "list",
                &[
                    ("list/a", 1),
                    ("list/b/c", 2),
                    ("list/b/d", 3),
                    ("list/b/e/f", 5),
                    ("list/bb", 4),
                    ("listx/g", 6),
                ],
            ),
            expect("listx/", &[("listx/g", 6)]),
            expect("nothing", &[]),
            expect("nothing/", &[]),
            expect("list/b/c/", &[]),
            expect("list/zzz", &[]),
        ];
        for (prefix, want) in cases {
            let got = self.list(&prefix).await;
            if got != want {
                self.fail(&format!("list({prefix:?}): expected {want:?}, got {got:?}"));
            }
        }
        let all = self.list(&format!("{}/", self.base)).await;
        if !all.windows(2).all(|w| w[0].0 < w[1].0) {
            self.fail(&format!("list of everything is not sorted: {all:?}"));
        }
    }

    async fn delete(&self) {
        let name = self.name("delete/me");
        self.put(&name, &b"doomed"[..]).await;
        if let Err(e) = self.store.delete(&name).await {
            self.fail(&format!("delete({name}): {e}"));
        }
        self.expect_not_found(&name).await;
        if !self.list(&name).await.is_empty() {
            self.fail(&format!("{name} is still listed after delete"));
        }
        if let Err(e) = self.store.delete(&name).await {
            self.fail(&format!(
                "delete({name}) of a missing blob: expected Ok, got {e}"
            ));
        }
        if let Err(e) = self.store.delete(&self.name("never/existed")).await {
            self.fail(&format!(
                "delete of a never-created blob: expected Ok, got {e}"
            ));
        }
        self.put(&name, &b"reborn"[..]).await;
        self.expect_content(&name, b"reborn").await;
    }

    async fn empty_blob(&self) {
        let name = self.name("empty/blob");
        self.put(&name, Bytes::new()).await;
        self.expect_head(&name, Some(0)).await;
        self.expect_content(&name, b"").await;
        self.expect_range(&name, 0, 0, b"").await;
        self.expect_out_of_range(&name, 0, 1).await;
        let listed = self.list(&name).await;
        if listed != [(name.clone(), 0)] {
            self.fail(&format!("list of an empty blob: got {listed:?}"));
        }
    }

    async fn large_blob_and_reader(&self) {
        const SIZE: usize = 3 << 20;
        let name = self.name("large/blob");
        // Bytes with no short period, so a read from the wrong place cannot
        // pass.
        let data: Bytes = (0..SIZE as u32)
            .flat_map(|i| (i.wrapping_mul(2_654_435_761) >> 8).to_le_bytes())
            .take(SIZE)
            .collect::<Vec<u8>>()
            .into();
        self.put(&name, data.clone()).await;
        self.expect_head(&name, Some(SIZE as u64)).await;
        self.expect_content(&name, &data).await;
        let mid = 1_234_567;
        self.expect_range(
            &name,
            mid,
            100_000,
            &data[mid as usize..mid as usize + 100_000],
        )
        .await;
        self.expect_range(&name, SIZE as u64 - 10, 10, &data[SIZE - 10..])
            .await;
        self.expect_out_of_range(&name, SIZE as u64 - 10, 11).await;

        let reader = match self.store.clone().open_reader(&name).await {
            Ok(reader) => reader,
            Err(e) => self.fail(&format!("open_reader({name}): {e}")),
        };
        if reader.size() != SIZE as u64 {
            self.fail(&format!(
                "open_reader({name}).size(): expected {SIZE}, got {}",
                reader.size()
            ));
        }
        for (offset, len) in [(0, 4096), (mid as usize, 65_536), (SIZE - 1, 1), (SIZE, 0)] {
            let got = reader.read_at(offset as u64, len).await;
            match &got {
                Ok(bytes) if bytes[..] == data[offset..offset + len] => {}
                _ => self.fail(&format!(
                    "reader of {name}: read_at({offset}, {len}) expected the stored bytes, got {}",
                    outcome(&got)
                )),
            }
        }
        let mut into = vec![0u8; 65_536];
        match reader.read_into(mid, &mut into).await {
            Ok(()) if into[..] == data[mid as usize..mid as usize + 65_536] => {}
            Ok(()) => self.fail(&format!(
                "reader of {name}: read_into({mid}) returned other bytes"
            )),
            Err(e) => self.fail(&format!("reader of {name}: read_into({mid}): {e}")),
        }
        let mut two = [0u8; 2];
        if !matches!(
            reader.read_into(SIZE as u64 - 1, &mut two).await,
            Err(StoreError::OutOfRange { .. })
        ) {
            self.fail(&format!(
                "reader of {name}: read_into past the end: expected OutOfRange"
            ));
        }
        let got = reader.read_at(SIZE as u64 - 1, 2).await;
        if !matches!(got, Err(StoreError::OutOfRange { .. })) {
            self.fail(&format!(
                "reader of {name}: read_at past the end: expected OutOfRange, got {}",
                outcome(&got)
            ));
        }
        match self
            .store
            .clone()
            .open_reader(&self.name("large/missing"))
            .await
        {
            Err(StoreError::NotFound(_)) => {}
            Err(e) => self.fail(&format!(
                "open_reader of a missing blob: expected NotFound, got {e}"
            )),
            Ok(_) => self.fail("open_reader of a missing blob: expected NotFound, got a reader"),
        }
    }

    async fn put_file(&self) {
        let name = self.name("file/blob");
        let data = b"from a local file".repeat(1000);
        let path =
            std::env::temp_dir().join(format!("hlfs-conformance-{:016x}", rand::random::<u64>()));
        std::fs::write(&path, &data).expect("write a temporary source file");
        let first = self.store.put_file_if_absent(&name, &path).await;
        let second = self.store.put_file_if_absent(&name, &path).await;
        // The caller deletes its file afterwards; the blob must not care.
        std::fs::remove_file(&path).expect("remove the temporary source file");
        if let Err(e) = first {
            self.fail(&format!("put_file_if_absent({name}) of a new name: {e}"));
        }
        if !matches!(second, Err(StoreError::AlreadyExists(_))) {
            self.fail(&format!(
                "put_file_if_absent({name}) over an existing blob: expected AlreadyExists, \
                 got {second:?}"
            ));
        }
        self.expect_content(&name, &data).await;
    }

    async fn cleanup(&self) {
        let prefix = format!("{}/", self.base);
        for (name, _) in self.list(&prefix).await {
            if let Err(e) = self.store.delete(&name).await {
                self.fail(&format!("delete({name}) during cleanup: {e}"));
            }
        }
        let left = self.list(&prefix).await;
        if !left.is_empty() {
            self.fail(&format!("blobs left after deleting them all: {left:?}"));
        }
    }
}

/// Check `dir` against the [`JournalDir`]/[`JournalFile`] contract. The
/// directory should not be in use by anything else (the suite takes its lock).
pub fn run_journal_suite(dir: Arc<dyn JournalDir>) {
    let t = JournalSuite {
        who: format!("{dir:?}"),
        tag: format!("{:08x}", rand::random::<u32>()),
        dir,
    };
    t.create_write_read();
    t.list_and_remove();
    t.lock_is_exclusive();
}

struct JournalSuite {
    dir: Arc<dyn JournalDir>,
    who: String,
    tag: String,
}

impl JournalSuite {
    fn fail(&self, what: &str) -> ! {
        panic!("journal conformance failed on {}: {what}", self.who)
    }

    fn name(&self, rel: &str) -> String {
        format!("suite-{}-{rel}", self.tag)
    }

    fn ok<T>(&self, what: &str, r: Result<T>) -> T {
        r.unwrap_or_else(|e| self.fail(&format!("{what}: {e}")))
    }

    fn expect_read(&self, file: &dyn JournalFile, offset: u64, len: usize, want: &[u8]) {
        // Exact reads agree with read_at wherever the whole range exists.
        if want.len() == len {
            let mut exact = vec![0u8; len];
            self.ok("read_exact_into", file.read_exact_into(offset, &mut exact));
            if exact != want {
                self.fail(&format!(
                    "read_exact_into({offset}, {len}) returned other bytes"
                ));
            }
        } else {
            let mut exact = vec![0u8; len];
            if !matches!(
                file.read_exact_into(offset, &mut exact),
                Err(StoreError::OutOfRange { .. })
            ) {
                self.fail(&format!(
                    "read_exact_into({offset}, {len}) past the end: expected OutOfRange"
                ));
            }
        }
        let got = self.ok("read_at", file.read_at(offset, len));
        if got != want {
            self.fail(&format!(
                "read_at({offset}, {len}): expected {} bytes {:?}, got {} bytes {:?}",
                want.len(),
                String::from_utf8_lossy(&want[..want.len().min(64)]),
                got.len(),
                String::from_utf8_lossy(&got[..got.len().min(64)]),
            ));
        }
    }

    fn expect_len(&self, file: &dyn JournalFile, want: u64) {
        let got = self.ok("len", file.len());
        if got != want {
            self.fail(&format!("len: expected {want}, got {got}"));
        }
    }

    fn list(&self) -> Vec<String> {
        let mut ours = self.ok("list", self.dir.list());
        if !ours.windows(2).all(|w| w[0] < w[1]) {
            self.fail(&format!("list is not sorted: {ours:?}"));
        }
        ours.retain(|name| name.starts_with(&self.name("")));
        ours
    }

    fn create_write_read(&self) {
        let name = self.name("a");
        let file = self.ok("create", self.dir.create(&name));
        self.expect_len(&*file, 0);
        if !self.ok("is_empty", file.is_empty()) {
            self.fail("a new file is not empty");
        }
        match self.dir.create(&name) {
            Err(StoreError::AlreadyExists(_)) => {}
            Err(e) => self.fail(&format!(
                "create of an existing file: expected AlreadyExists, got {e}"
            )),
            Ok(_) => self.fail("create of an existing file: expected AlreadyExists, got Ok"),
        }

        self.ok("write_at", file.write_at(0, b"hello"));
        self.ok("write_at", file.write_at(5, b" world"));
        self.expect_len(&*file, 11);
        self.expect_read(&*file, 0, 11, b"hello world");
        self.expect_read(&*file, 6, 100, b"world");
        self.expect_read(&*file, 11, 10, b"");
        self.expect_read(&*file, 1000, 10, b"");
        self.expect_read(&*file, 2, 0, b"");
        self.ok("sync", file.sync());

        // A second handle sees the same file, both ways.
        let other = self.ok("open", self.dir.open(&name));
        self.expect_read(&*other, 0, 11, b"hello world");
        self.ok("write_at", other.write_at(11, b"!"));
        self.expect_read(&*file, 0, 100, b"hello world!");

        self.ok("truncate", file.truncate(5));
        self.expect_len(&*file, 5);
        self.expect_len(&*other, 5);
        self.expect_read(&*file, 0, 100, b"hello");
        self.ok("write_at", file.write_at(5, b", again"));
        self.expect_read(&*file, 0, 100, b"hello, again");

        // Larger than a page and written at an unaligned offset.
        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        self.ok("write_at", file.write_at(12, &big));
        self.ok("sync", file.sync());
        self.expect_len(&*file, 12 + big.len() as u64);
        self.expect_read(&*file, 12, big.len(), &big);
        self.expect_read(&*file, 12 + 4095, 10_000, &big[4095..14_095]);

        // Several parts land back to back, as one record would.
        let end = 12 + big.len() as u64;
        let parts: [&[u8]; 3] = [b"head|", &big[..70_000], b"|tail"];
        self.ok("write_parts_at", file.write_parts_at(end, &parts));
        self.expect_len(&*file, end + 70_010);
        self.expect_read(&*file, end, 5, b"head|");
        self.expect_read(&*file, end + 5, 70_000, &big[..70_000]);
        self.expect_read(&*file, end + 70_005, 5, b"|tail");

        drop((file, other));
        let reopened = self.ok("open", self.dir.open(&name));
        self.expect_read(&*reopened, 0, 12, b"hello, again");
    }

    fn list_and_remove(&self) {
        let (a, b) = (self.name("a"), self.name("b"));
        drop(self.ok("create", self.dir.create(&b)));
        let listed = self.list();
        if listed != [a.clone(), b.clone()] {
            self.fail(&format!("list: expected [{a}, {b}], got {listed:?}"));
        }
        self.ok("remove", self.dir.remove(&a));
        let listed = self.list();
        if listed != [b.clone()] {
            self.fail(&format!(
                "list after removing {a}: expected [{b}], got {listed:?}"
            ));
        }
        match self.dir.open(&a) {
            Err(StoreError::NotFound(_)) => {}
            Err(e) => self.fail(&format!(
                "open of a removed file: expected NotFound, got {e}"
            )),
            Ok(_) => self.fail("open of a removed file: expected NotFound, got Ok"),
        }
        self.ok("remove of a missing file", self.dir.remove(&a));
        self.ok("remove", self.dir.remove(&b));
        if !self.list().is_empty() {
            self.fail("files left after removing them all");
        }
        match self.dir.open(&self.name("never")) {
            Err(StoreError::NotFound(_)) => {}
            Err(e) => self.fail(&format!(
                "open of a missing file: expected NotFound, got {e}"
            )),
            Ok(_) => self.fail("open of a missing file: expected NotFound, got Ok"),
        }
    }

    fn lock_is_exclusive(&self) {
        let held = self.ok("lock", self.dir.lock());
        match self.dir.lock() {
            Err(StoreError::Locked { .. }) => {}
            Err(e) => self.fail(&format!("second lock: expected Locked, got {e}")),
            Ok(_) => self.fail("second lock while the first is held: expected Locked, got Ok"),
        }
        // The lock file, wherever it lives, is not a journal file.
        let name = self.name("c");
        drop(self.ok("create", self.dir.create(&name)));
        let listed = self.list();
        if listed != [name.clone()] {
            self.fail(&format!(
                "list while locked: expected [{name}], got {listed:?}"
            ));
        }
        let all = self.ok("list", self.dir.list());
        if all.iter().any(|n| n == crate::JOURNAL_LOCK_NAME) {
            self.fail(&format!("list shows the lock file: {all:?}"));
        }
        self.ok("remove", self.dir.remove(&name));
        drop(held);
        let again = self.ok("lock after the holder dropped its guard", self.dir.lock());
        drop(again);
    }
}
