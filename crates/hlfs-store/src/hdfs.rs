//! Blobs in HDFS, through the pure-Rust `hdfs-native` client (no JVM, no
//! libhdfs).
//!
//! A store is a directory, `hdfs://HOST:PORT/PATH`: blob `a/b` is the file
//! `PATH/a/b`. HDFS has no conditional create that hides the file until it
//! is complete (a file being written is visible, and readable, from the
//! moment it is created), so a blob is written to a unique file under
//! `PATH/.tmp/`, closed, and renamed to its name with `overwrite = false`.
//! The NameNode performs that rename atomically and refuses it if the name
//! exists, which gives create-if-absent, and a reader sees either nothing or
//! the whole blob. `hdfs-native` marks the last packet of every block
//! `syncBlock`, so when `close` returns each replica has fsynced the data.
//!
//! Client settings come from the Hadoop configuration (`HADOOP_CONF_DIR`,
//! or `HADOOP_HOME/etc/hadoop`) when there is one; the user is
//! `HADOOP_USER_NAME`, else the login name. Kerberos uses the ticket cache
//! when the configuration enables it. Nothing of that is ever printed.

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use hdfs_native::file::FileReader;
use hdfs_native::{Client, ClientBuilder, HdfsError, WriteOptions};

use crate::{validate_blob_name, BlobMeta, BlobStore, Result, StoreError};

/// Where blobs are staged before being renamed into place. Its name starts
/// with `.`, so it can never collide with a blob and `list` skips it.
const TMP_DIR: &str = ".tmp";

/// Permission of the directories the store creates (before the cluster's
/// umask), as HDFS itself defaults them.
const DIR_PERMISSION: u32 = 0o755;

/// The Java exceptions, as the NameNode names them, that mean "no such
/// file" to us. `hdfs-native` turns only some of them into
/// `HdfsError::FileNotFound`; reading a path that is missing or is a
/// directory comes back as a remote `FileNotFoundException`, and a path
/// through a file (`a/b` where `a` is a blob) as `ParentNotDirectory`.
const NOT_FOUND_EXCEPTIONS: &[&str] = &[
    "java.io.FileNotFoundException",
    "org.apache.hadoop.fs.ParentNotDirectoryException",
];

/// A directory in HDFS, e.g. `hdfs://namenode:8020/hlfs/vm1`.
pub struct HdfsStore {
    client: Client,
    location: Location,
}

impl fmt::Debug for HdfsStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// A parsed `hdfs://HOST:PORT/PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Location {
    /// A DNS name or IPv4 address, or an IPv6 address in brackets.
    host: String,
    port: u16,
    /// Absolute, without a trailing `/`, never the filesystem root.
    root: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hdfs://{}:{}{}", self.host, self.port, self.root)
    }
}

impl Location {
    /// Parses `hdfs://HOST:PORT/PATH`. The port is required: without one,
    /// `hdfs-native` takes the host for an HA nameservice and needs it in the
    /// Hadoop configuration, which would turn a typo into a confusing error at
    /// first use instead of here.
    fn parse(uri: &str) -> Result<Location> {
        let bad = |why: &str| {
            Err(StoreError::Invalid(format!(
                "{uri:?} is not a valid HDFS address ({why}); expected hdfs://HOST:PORT/PATH"
            )))
        };
        let Some(rest) = uri.strip_prefix("hdfs://") else {
            return bad("it does not start with hdfs://");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return bad("it names no NameNode host");
        }
        if authority.contains('@') {
            return bad("it must not contain a user name; set HADOOP_USER_NAME instead");
        }
        // An IPv6 address contains `:` itself, hence the brackets.
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let Some((addr, after)) = bracketed.split_once(']') else {
                return bad("its IPv6 address has no closing `]`");
            };
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return bad("its IPv6 address is malformed");
            }
            let Some(port) = after.strip_prefix(':') else {
                return bad("it names no port");
            };
            (&authority[..addr.len() + 2], port)
        } else {
            if authority.matches(':').count() > 1 {
                return bad("an IPv6 address must be written in brackets, e.g. [::1]:8020");
            }
            let Some((host, port)) = authority.split_once(':') else {
                return bad("it names no port; the NameNode RPC port is usually 8020 or 9000");
            };
            if host.is_empty() {
                return bad("it names no NameNode host");
            }
            if !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
            {
                return bad("its host name has characters a host name cannot have");
            }
            (host, port)
        };
        let port = match port.parse::<u16>() {
            Ok(0) | Err(_) => return bad("its port is not a number from 1 to 65535"),
            Ok(port) => port,
        };
        if path.contains(['?', '#']) {
            return bad("it must not have a query or fragment");
        }
        let root = path.trim_end_matches('/');
        if root.is_empty() {
            return bad(
                "it names no directory; a volume needs its own, e.g. hdfs://HOST:PORT/hlfs/NAME",
            );
        }
        // HDFS refuses these in path names (DFSUtil.isValidName); better to
        // say so now than on the first write.
        for component in root[1..].split('/') {
            if component.is_empty() {
                return bad("its path has an empty component");
            }
            if component == "." || component == ".." {
                return bad("its path must not contain `.` or `..`");
            }
            if component.contains(':') {
                return bad("its path must not contain `:`");
            }
            if component.contains('\0') {
                return bad("its path must not contain a NUL byte");
            }
        }
        Ok(Location {
            host: host.to_string(),
            port,
            root: root.to_string(),
        })
    }

    /// What the client connects to.
    fn namenode(&self) -> String {
        format!("hdfs://{}:{}", self.host, self.port)
    }

    /// The HDFS path of blob `name` (already validated).
    fn path_of(&self, name: &str) -> String {
        format!("{}/{name}", self.root)
    }

    /// The blob name of a path under the root; None for the root itself and
    /// for paths elsewhere (`/vol10/x` is not in `/vol1`).
    fn name_of<'a>(&self, path: &'a str) -> Option<&'a str> {
        path.strip_prefix(self.root.as_str())?
            .strip_prefix('/')
            .filter(|name| !name.is_empty())
    }

    /// A fresh staging path. 128 random bits: racing writers, in this
    /// process or another, never pick the same one.
    fn temp_path(&self) -> String {
        format!("{}/{TMP_DIR}/{:032x}", self.root, rand::random::<u128>())
    }
}

/// The store-relative directory that `list(prefix)` starts from: the prefix
/// up to its last `/`, since a prefix may end in the middle of a name. None
/// when that part cannot start a valid name, so nothing matches; that also
/// keeps `..` from listing outside the root.
fn listing_dir(prefix: &str) -> Option<&str> {
    let dir = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
    (dir.is_empty() || validate_blob_name(dir).is_ok()).then_some(dir)
}

/// Whether directory `dir` (a store-relative name) can hold blobs whose
/// names start with `prefix`: either the prefix reaches into it or it lies
/// under the prefix.
fn may_hold_matches(dir: &str, prefix: &str) -> bool {
    let as_dir = format!("{dir}/");
    as_dir.starts_with(prefix) || prefix.starts_with(&as_dir)
}

fn is_not_found(e: &HdfsError) -> bool {
    match e {
        HdfsError::FileNotFound(_) => true,
        HdfsError::RPCError(class, _) => NOT_FOUND_EXCEPTIONS.contains(&class.as_str()),
        _ => false,
    }
}

/// `StoreError` for a failed operation on blob `name`, whose full address
/// is `at`: the variants the engine reacts to, else the HDFS message with
/// the address.
fn map_err(name: &str, at: &str, e: HdfsError) -> StoreError {
    match e {
        e if is_not_found(&e) => StoreError::NotFound(name.to_string()),
        HdfsError::AlreadyExists(_) => StoreError::AlreadyExists(name.to_string()),
        e => StoreError::Unavailable(format!("{at}: {e}")),
    }
}

impl HdfsStore {
    /// Parses `hdfs://HOST:PORT/PATH` and builds a client. Nothing is
    /// contacted until the first operation, and the directory is created by
    /// the first put.
    ///
    /// Call it inside the Tokio runtime that will use the store: the client
    /// spawns its connection tasks there. (Outside any runtime `hdfs-native`
    /// starts one of its own, which must then not be dropped from async code.)
    pub fn from_uri(uri: &str) -> Result<HdfsStore> {
        let location = Location::parse(uri)?;
        let client = ClientBuilder::new()
            .with_url(location.namenode())
            .build()
            .map_err(|e| {
                StoreError::Invalid(format!("configuring the HDFS client for {location}: {e}"))
            })?;
        Ok(HdfsStore { client, location })
    }

    /// The full address of an HDFS path, for messages.
    fn at(&self, path: &str) -> String {
        format!("{}{path}", self.location.namenode())
    }

    fn err(&self, name: &str, path: &str, e: HdfsError) -> StoreError {
        map_err(name, &self.at(path), e)
    }

    /// A reader of blob `name` and its size. The NameNode answers both with
    /// one call (the block locations).
    async fn open(&self, name: &str) -> Result<(FileReader, u64)> {
        validate_blob_name(name)?;
        let path = self.location.path_of(name);
        let reader = self
            .client
            .read(&path)
            .await
            .map_err(|e| self.err(name, &path, e))?;
        let size = reader.file_length() as u64;
        Ok((reader, size))
    }

    /// Exactly `len` bytes at `offset` of an open blob. `read_range` panics
    /// past the end of the file, so the range is checked first.
    async fn read(
        &self,
        name: &str,
        reader: &FileReader,
        size: u64,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        let out_of_range = || StoreError::OutOfRange {
            name: name.to_string(),
            offset,
            len,
            size,
        };
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= size)
            .ok_or_else(out_of_range)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        // `end <= size`, which came from a usize, so both fit.
        let (start, count) = (offset as usize, (end - offset) as usize);
        let data = reader
            .read_range(start, count)
            .await
            .map_err(|e| self.err(name, &self.location.path_of(name), e))?;
        if data.len() as u64 != len {
            return Err(out_of_range());
        }
        Ok(data)
    }

    /// Write `data` to a new file at `tmp` and close it: once `close`
    /// returns, the NameNode has the file complete and every replica has
    /// synced its blocks.
    async fn write_temp(&self, name: &str, tmp: &str, data: Bytes) -> Result<()> {
        let options = WriteOptions {
            overwrite: false,
            create_parent: true,
            ..WriteOptions::default()
        };
        let failed =
            |e| StoreError::Unavailable(format!("staging {name} at {}: {e}", self.at(tmp)));
        let mut writer = self.client.create(tmp, options).await.map_err(failed)?;
        if !data.is_empty() {
            writer.write_bytes(data).await.map_err(failed)?;
        }
        writer.close().await.map_err(failed)
    }

    /// Rename the complete file `tmp` to `path`, refusing to replace it. The
    /// first blob of a directory finds no directory to rename into; it is
    /// created then, rather than checked before every put.
    async fn rename_into_place(&self, name: &str, tmp: &str, path: &str) -> Result<()> {
        let failed = |e: HdfsError| match e {
            HdfsError::AlreadyExists(_) => StoreError::AlreadyExists(name.to_string()),
            e => StoreError::Unavailable(format!(
                "renaming {} to {}: {e}",
                self.at(tmp),
                self.at(path)
            )),
        };
        match self.client.rename(tmp, path, false).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => {
                let dir = path
                    .rsplit_once('/')
                    .map_or(self.location.root.as_str(), |(dir, _)| dir);
                self.client
                    .mkdirs(dir, DIR_PERMISSION, true)
                    .await
                    .map_err(|e| {
                        StoreError::Unavailable(format!("creating {}: {e}", self.at(dir)))
                    })?;
                self.client.rename(tmp, path, false).await.map_err(failed)
            }
            Err(e) => Err(failed(e)),
        }
    }

    /// Remove a staging file that will not be renamed. Best effort: the put
    /// already failed, and a leftover in `.tmp` is never read.
    async fn discard(&self, tmp: &str) {
        if let Err(e) = self.client.delete(tmp, false).await {
            tracing::warn!("cannot remove the staging file {}: {e}", self.at(tmp));
        }
    }
}

#[async_trait]
impl BlobStore for HdfsStore {
    fn describe(&self) -> String {
        self.location.to_string()
    }

    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<()> {
        validate_blob_name(name)?;
        let path = self.location.path_of(name);
        // Cheap early answer for the common loser of a race, before uploading
        // a temp copy; the rename below is what decides.
        match self.client.get_file_info(&path).await {
            Ok(_) => return Err(StoreError::AlreadyExists(name.to_string())),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(self.err(name, &path, e)),
        }
        let tmp = self.location.temp_path();
        let result = match self.write_temp(name, &tmp, data).await {
            Ok(()) => self.rename_into_place(name, &tmp, &path).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.discard(&tmp).await;
        }
        result
    }

    async fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Bytes> {
        let (reader, size) = self.open(name).await?;
        self.read(name, &reader, size, offset, len).await
    }

    async fn get(&self, name: &str) -> Result<Bytes> {
        let (reader, size) = self.open(name).await?;
        self.read(name, &reader, size, 0, size).await
    }

    async fn head(&self, name: &str) -> Result<Option<u64>> {
        validate_blob_name(name)?;
        let path = self.location.path_of(name);
        match self.client.get_file_info(&path).await {
            // A directory is not a blob.
            Ok(status) if status.isdir => Ok(None),
            Ok(status) => Ok(Some(status.length as u64)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.err(name, &path, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<BlobMeta>> {
        let Some(start) = listing_dir(prefix) else {
            return Ok(Vec::new());
        };
        let mut dirs = vec![if start.is_empty() {
            self.location.root.clone()
        } else {
            self.location.path_of(start)
        }];
        let mut found = Vec::new();
        while let Some(dir) = dirs.pop() {
            let statuses = match self.client.list_status(&dir, false).await {
                Ok(statuses) => statuses,
                // Never created, or deleted while we list: nothing in it.
                Err(e) if is_not_found(&e) => continue,
                Err(e) => {
                    return Err(StoreError::Unavailable(format!(
                        "listing {}: {e}",
                        self.at(&dir)
                    )))
                }
            };
            for status in statuses {
                // Listing a file gives the file itself, with its own path;
                // the name filter below handles it like any other entry.
                let Some(name) = self.location.name_of(&status.path) else {
                    continue;
                };
                // `.tmp` and anything else hidden: `validate_blob_name`
                // refuses to create such names.
                if name.rsplit('/').next().is_some_and(|c| c.starts_with('.')) {
                    continue;
                }
                if status.isdir {
                    if may_hold_matches(name, prefix) {
                        dirs.push(status.path.clone());
                    }
                } else if name.starts_with(prefix) {
                    found.push(BlobMeta {
                        name: name.to_string(),
                        size: status.length as u64,
                        modified_ms: status.modification_time,
                    });
                }
            }
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    async fn delete(&self, name: &str) -> Result<()> {
        validate_blob_name(name)?;
        let path = self.location.path_of(name);
        // Not recursive: a blob is a file. A missing path answers Ok(false).
        match self.client.delete(&path, false).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // A directory is not a blob, so there is no such blob either.
            Err(HdfsError::RPCError(class, _))
                if class == "org.apache.hadoop.fs.PathIsNotEmptyDirectoryException" =>
            {
                Ok(())
            }
            Err(e) => Err(self.err(name, &path, e)),
        }
    }

    /// Not swept yet: staging files in `.tmp` of puts a crash cut off
    /// (never read; docs/design/cleaning.md).
    async fn sweep_leftovers(&self) -> Result<u64> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(uri: &str) -> Location {
        match Location::parse(uri) {
            Ok(location) => location,
            Err(e) => panic!("{uri:?} should parse: {e}"),
        }
    }

    /// The error message for a bad address; it must name the address.
    fn parse_err(uri: &str) -> String {
        match Location::parse(uri) {
            Ok(location) => panic!("{uri:?} should be refused, parsed as {location:?}"),
            Err(StoreError::Invalid(msg)) => {
                assert!(msg.contains(&format!("{uri:?}")), "{msg}");
                msg
            }
            Err(e) => panic!("{uri:?}: expected StoreError::Invalid, got {e:?}"),
        }
    }

    #[test]
    fn good_addresses_parse() {
        let l = parse_ok("hdfs://namenode:8020/hlfs/vol1");
        assert_eq!(
            l,
            Location {
                host: "namenode".into(),
                port: 8020,
                root: "/hlfs/vol1".into()
            }
        );
        assert_eq!(l.namenode(), "hdfs://namenode:8020");
        assert_eq!(l.to_string(), "hdfs://namenode:8020/hlfs/vol1");

        // Trailing slashes are dropped, so both spellings are one volume.
        assert_eq!(parse_ok("hdfs://namenode:8020/hlfs/vol1//"), l);

        let l = parse_ok("hdfs://10.1.2.3:9000/v");
        assert_eq!(
            (l.host.as_str(), l.port, l.root.as_str()),
            ("10.1.2.3", 9000, "/v")
        );

        let l = parse_ok("hdfs://[::1]:9000/a/b.c/d_e-f");
        assert_eq!(l.host, "[::1]");
        assert_eq!(l.namenode(), "hdfs://[::1]:9000");
        assert_eq!(l.root, "/a/b.c/d_e-f");

        let l = parse_ok("hdfs://nn-1.example.com:65535/.hidden/vol");
        assert_eq!((l.port, l.root.as_str()), (65535, "/.hidden/vol"));
    }

    #[test]
    fn bad_addresses_are_refused_with_a_reason() {
        let cases = [
            ("", "does not start with hdfs://"),
            ("s3://bucket/vol", "does not start with hdfs://"),
            ("HDFS://nn:8020/v", "does not start with hdfs://"),
            ("hdfs://", "no NameNode host"),
            ("hdfs:///vol", "no NameNode host"),
            ("hdfs://:8020/vol", "no NameNode host"),
            ("hdfs://namenode/vol", "no port"),
            ("hdfs://namenode:/vol", "port is not a number"),
            ("hdfs://namenode:http/vol", "port is not a number"),
            ("hdfs://namenode:0/vol", "port is not a number"),
            ("hdfs://namenode:65536/vol", "port is not a number"),
            ("hdfs://namenode:-1/vol", "port is not a number"),
            ("hdfs://namenode:8020", "names no directory"),
            ("hdfs://namenode:8020/", "names no directory"),
            ("hdfs://namenode:8020///", "names no directory"),
            ("hdfs://alice@namenode:8020/vol", "HADOOP_USER_NAME"),
            ("hdfs://alice:secret@namenode:8020/vol", "HADOOP_USER_NAME"),
            ("hdfs://::1:8020/vol", "brackets"),
            ("hdfs://[::1/vol", "no closing"),
            ("hdfs://[]:8020/vol", "IPv6 address is malformed"),
            ("hdfs://[nn]:8020/vol", "IPv6 address is malformed"),
            ("hdfs://[::1]/vol", "no port"),
            ("hdfs://name node:8020/vol", "host name"),
            ("hdfs://namenode:8020/a//b", "empty component"),
            ("hdfs://namenode:8020/a/../b", "`..`"),
            ("hdfs://namenode:8020/a/./b", "`.`"),
            ("hdfs://namenode:8020/a:b", "`:`"),
            ("hdfs://namenode:8020/vol?user=x", "query"),
            ("hdfs://namenode:8020/vol#x", "fragment"),
        ];
        for (uri, why) in cases {
            let msg = parse_err(uri);
            assert!(msg.contains(why), "{uri:?}: {msg:?} should say {why:?}");
            assert!(msg.contains("hdfs://HOST:PORT/PATH"), "{msg}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        for uri in [
            "hdfs://[",
            "hdfs://]",
            "hdfs://[:]:1/x",
            "hdfs://é:1/x",
            "hdfs://h:1é/x",
            "hdfs://h:99999999999999999999/x",
            "hdfs://h:1/\u{0}",
            "hdfs://h:1:2/x",
        ] {
            assert!(Location::parse(uri).is_err(), "{uri:?}");
        }
    }

    #[tokio::test]
    async fn from_uri_builds_a_client_without_contacting_the_cluster() {
        // Port 1 on a reserved name: nothing answers there, and nothing must
        // be asked before the first operation.
        let store = HdfsStore::from_uri("hdfs://namenode.invalid:1/hlfs/vol/").unwrap();
        assert_eq!(store.describe(), "hdfs://namenode.invalid:1/hlfs/vol");
        assert_eq!(format!("{store:?}"), "hdfs://namenode.invalid:1/hlfs/vol");
        assert!(HdfsStore::from_uri("hdfs://namenode.invalid/hlfs/vol").is_err());
    }

    #[tokio::test]
    async fn invalid_names_are_refused_before_any_request() {
        // An unreachable NameNode: only validation can answer these.
        let store = HdfsStore::from_uri("hdfs://namenode.invalid:1/vol").unwrap();
        for name in ["", "/abs", "a//b", "../escape", ".tmp/x", "a/.hidden"] {
            let refused = |r: Result<()>| matches!(r, Err(StoreError::Invalid(m)) if m.contains("invalid blob name"));
            assert!(
                refused(store.put_if_absent(name, Bytes::new()).await),
                "{name:?}"
            );
            assert!(refused(store.delete(name).await), "{name:?}");
            assert!(refused(store.head(name).await.map(|_| ())), "{name:?}");
            assert!(
                refused(store.get_range(name, 0, 1).await.map(|_| ())),
                "{name:?}"
            );
        }
        // A prefix whose directory part is no valid name matches nothing.
        assert_eq!(store.list("../").await.unwrap(), []);
        assert_eq!(store.list(".tmp/").await.unwrap(), []);
    }

    #[test]
    fn names_map_to_paths_under_the_root_and_back() {
        let l = parse_ok("hdfs://nn:8020/hlfs/vol1");
        for name in ["manifest/00000000000000000042", "segments/0000000007", "x"] {
            let path = l.path_of(name);
            assert_eq!(path, format!("/hlfs/vol1/{name}"));
            assert_eq!(l.name_of(&path), Some(name));
        }
        assert_eq!(l.name_of("/hlfs/vol1"), None);
        assert_eq!(l.name_of("/hlfs/vol1/"), None);
        // A sibling whose name merely starts with the root's.
        assert_eq!(l.name_of("/hlfs/vol10/segments/1"), None);
        assert_eq!(l.name_of("/hlfs/other/x"), None);
    }

    #[test]
    fn temp_paths_are_unique_hidden_and_under_the_root() {
        let l = parse_ok("hdfs://nn:8020/hlfs/vol1");
        let a = l.temp_path();
        let b = l.temp_path();
        assert_ne!(a, b);
        for tmp in [&a, &b] {
            let name = l.name_of(tmp).expect("under the root");
            let file = name.strip_prefix(".tmp/").expect("in .tmp");
            assert_eq!(file.len(), 32);
            assert!(file.chars().all(|c| c.is_ascii_hexdigit()), "{file}");
            // Never a blob name, so never listed or clobbered by a put.
            assert!(validate_blob_name(name).is_err());
        }
    }

    #[test]
    fn listing_starts_at_the_prefix_directory() {
        assert_eq!(listing_dir(""), Some(""));
        assert_eq!(listing_dir("list"), Some(""));
        assert_eq!(listing_dir("list/"), Some("list"));
        assert_eq!(listing_dir("list/b"), Some("list"));
        assert_eq!(listing_dir("list/b/"), Some("list/b"));
        assert_eq!(listing_dir("segments/00000"), Some("segments"));
        // Would leave the root, or enter hidden directories.
        assert_eq!(listing_dir("../x"), None);
        assert_eq!(listing_dir("a/../../x"), None);
        assert_eq!(listing_dir(".tmp/"), None);
        assert_eq!(listing_dir("a//b"), None);
    }

    #[test]
    fn listing_descends_only_where_matches_can_be() {
        // The prefix ends mid-name: `list` matches `list/...` and `listx/...`.
        assert!(may_hold_matches("list", "list"));
        assert!(may_hold_matches("listx", "list"));
        assert!(!may_hold_matches("other", "list"));
        // The prefix reaches into the directory.
        assert!(may_hold_matches("list", "list/b"));
        assert!(may_hold_matches("list/b", "list/b/"));
        assert!(!may_hold_matches("list/c", "list/b"));
        // The directory lies under the prefix.
        assert!(may_hold_matches("list/b/e", "list/b"));
        assert!(may_hold_matches("list/bb", "list/b"));
        assert!(may_hold_matches("anything", ""));
        // `list/b/` does not match `list/bb/...`.
        assert!(!may_hold_matches("list/bb", "list/b/"));
    }

    #[test]
    fn hdfs_errors_map_to_what_the_engine_reacts_to() {
        let at = "hdfs://nn:8020/vol/segments/7";
        let not_found = [
            HdfsError::FileNotFound("/vol/segments/7".into()),
            HdfsError::RPCError(
                "java.io.FileNotFoundException".into(),
                "File does not exist: /vol/segments/7".into(),
            ),
            HdfsError::RPCError(
                "org.apache.hadoop.fs.ParentNotDirectoryException".into(),
                "/vol/segments (is not a directory)".into(),
            ),
        ];
        for e in not_found {
            assert!(
                matches!(map_err("segments/7", at, e), StoreError::NotFound(n) if n == "segments/7")
            );
        }
        assert!(matches!(
            map_err("segments/7", at, HdfsError::AlreadyExists("/vol/segments/7".into())),
            StoreError::AlreadyExists(n) if n == "segments/7"
        ));
        let other = map_err(
            "segments/7",
            at,
            HdfsError::RPCError(
                "org.apache.hadoop.security.AccessControlException".into(),
                "Permission denied: user=alice".into(),
            ),
        );
        match other {
            StoreError::Unavailable(msg) => {
                assert!(msg.starts_with(at), "{msg}");
                assert!(msg.contains("Permission denied"), "{msg}");
            }
            e => panic!("expected Unavailable, got {e:?}"),
        }
        let io = map_err(
            "segments/7",
            at,
            HdfsError::IOError(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        );
        assert!(
            matches!(io, StoreError::Unavailable(ref m) if m.starts_with(at)),
            "{io:?}"
        );
    }
}
