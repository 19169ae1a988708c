//! The control socket: how a command reaches the process that owns a
//! served volume (docs/design/online-control.md).
//!
//! The owner (`hlfs serve`) binds `control.sock` in the volume's journal
//! directory, mode 0600, and answers only its own user (or root). The CLI
//! finds the socket from the volume's address, as the journal is found, and
//! sends its command there instead of opening the volume itself. A frame is
//! a little-endian `u32` length, at most [`MAX_FRAME`], then that many bytes
//! of JSON. One request, one reply, per connection.

use std::io;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use hlfs_volume::{
    Backend, CloneSource, DiffStreamReport, ErrorKind, Figures, FlattenProgress, FlattenReport,
    GcReport, VolumeError,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// The protocol this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Bytes of JSON in one frame at most.
pub const MAX_FRAME: u32 = 64 << 10;

/// How long a client may take to send its request once connected. The
/// command itself is not bounded: a snapshot of a remote volume waits for
/// its upload.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The socket's file name in the journal directory.
const SOCKET_NAME: &str = "control.sock";

/// Longest path `bind` takes (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// What a command asks of a volume's owner.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    SnapshotCreate {
        name: String,
    },
    SnapshotDelete {
        name: String,
    },
    Rollback {
        name: String,
    },
    Resize {
        size: u64,
    },
    /// Roll back to a moment of the retention window (ms since the epoch).
    RollbackToMoment {
        at_ms: u64,
    },
    /// Set the retention window (`hlfs retain`): its length, 0 for off.
    Retain {
        window_ms: u64,
    },
    /// How the served volume is doing now (`hlfs info` of a served volume).
    Status,
    /// Make the manifest's head everything written so far (`hlfs diff` of
    /// a served volume's head reads the store next).
    Checkpoint,
    /// A cleaning run (`hlfs gc`): until stored ≤ `target` × live, deleting
    /// emptied segments `grace_ms` after the manifest that freed them.
    Gc {
        target: f64,
        grace_ms: u64,
    },
    /// Apply the RBD diff stream in the file at `path` (`hlfs import-diff`
    /// of a served volume: the owner reads the file, on the same host).
    ImportDiff {
        path: String,
    },
    /// Copy into a clone what it reads from its parent, and drop the link
    /// (`hlfs flatten` of a served clone), copying at most `copy_rate`
    /// bytes per second; answered when the flatten ends. If one runs
    /// already, the answer waits for it.
    Flatten {
        #[serde(default)]
        copy_rate: Option<u64>,
    },
    /// Make the volume ready to be cloned from `source` (`hlfs clone` of a
    /// served volume): answers with the snapshot the clone links to.
    OfferForClone {
        source: CloneSource,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    pub command: Command,
}

/// What the owner answers a command that succeeded.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// Done; for snapshot create and rollback, the name of what it made.
    Done(Option<String>),
    Status(Live),
    Gc(GcReport),
    Imported(DiffStreamReport),
    Flattened(FlattenReport),
}

impl Answer {
    /// The name a command that changes the volume answers with.
    pub fn into_name(self) -> Result<Option<String>, VolumeError> {
        match self {
            Answer::Done(name) => Ok(name),
            other => Err(other.unexpected()),
        }
    }

    /// The report a cleaning run answers with.
    pub fn into_gc_report(self) -> Result<GcReport, VolumeError> {
        match self {
            Answer::Gc(report) => Ok(report),
            other => Err(other.unexpected()),
        }
    }

    /// The report an import answers with.
    pub fn into_import_report(self) -> Result<DiffStreamReport, VolumeError> {
        match self {
            Answer::Imported(report) => Ok(report),
            other => Err(other.unexpected()),
        }
    }

    /// The report a flatten answers with.
    pub fn into_flatten_report(self) -> Result<FlattenReport, VolumeError> {
        match self {
            Answer::Flattened(report) => Ok(report),
            other => Err(other.unexpected()),
        }
    }

    fn unexpected(&self) -> VolumeError {
        let what = match self {
            Answer::Done(_) => "a command's result",
            Answer::Status(_) => "its status",
            Answer::Gc(_) => "a cleaning report",
            Answer::Imported(_) => "an import's report",
            Answer::Flattened(_) => "a flatten's report",
        };
        VolumeError::Owner {
            kind: ErrorKind::Io,
            message: format!("the volume's server answered with {what}, not what was asked"),
        }
    }
}

/// A served volume's figures now, as its server sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Live {
    /// The serving process.
    pub pid: u32,
    /// The export it is served as, and the clients connected to it.
    pub export: String,
    pub connections: u64,
    pub figures: Figures,
    /// Where a flatten of the volume is, while one runs.
    #[serde(default)]
    pub flatten: Option<FlattenProgress>,
}

/// The owner's answer, or an error with its kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    Done { name: Option<String> },
    Status { live: Live },
    Gc { report: GcReport },
    Imported { report: DiffStreamReport },
    Flattened { report: FlattenReport },
    Error { kind: String, message: String },
}

/// A stable name for each error kind on the wire.
fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::NotFound => "not_found",
        ErrorKind::AlreadyExists => "already_exists",
        ErrorKind::Busy => "busy",
        ErrorKind::InvalidInput => "invalid_input",
        ErrorKind::OutOfRange => "out_of_range",
        ErrorKind::ReadOnly => "read_only",
        ErrorKind::Unavailable => "unavailable",
        ErrorKind::Corrupt => "corrupt",
        ErrorKind::Io => "io",
        ErrorKind::Closed => "closed",
    }
}

/// The kind a name stands for; one this build does not know (from a newer
/// owner) is an I/O error.
fn kind_of(name: &str) -> ErrorKind {
    [
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::Busy,
        ErrorKind::InvalidInput,
        ErrorKind::OutOfRange,
        ErrorKind::ReadOnly,
        ErrorKind::Unavailable,
        ErrorKind::Corrupt,
        ErrorKind::Io,
        ErrorKind::Closed,
    ]
    .into_iter()
    .find(|&k| kind_name(k) == name)
    .unwrap_or(ErrorKind::Io)
}

impl Reply {
    pub fn of(result: Result<Answer, VolumeError>) -> Reply {
        match result {
            Ok(Answer::Done(name)) => Reply::Done { name },
            Ok(Answer::Status(live)) => Reply::Status { live },
            Ok(Answer::Gc(report)) => Reply::Gc { report },
            Ok(Answer::Imported(report)) => Reply::Imported { report },
            Ok(Answer::Flattened(report)) => Reply::Flattened { report },
            Err(e) => Reply::Error {
                kind: kind_name(e.kind()).to_string(),
                message: e.to_string(),
            },
        }
    }

    pub fn into_result(self) -> Result<Answer, VolumeError> {
        match self {
            Reply::Done { name } => Ok(Answer::Done(name)),
            Reply::Status { live } => Ok(Answer::Status(live)),
            Reply::Gc { report } => Ok(Answer::Gc(report)),
            Reply::Imported { report } => Ok(Answer::Imported(report)),
            Reply::Flattened { report } => Ok(Answer::Flattened(report)),
            Reply::Error { kind, message } => Err(VolumeError::Owner {
                kind: kind_of(&kind),
                message,
            }),
        }
    }
}

/// Decodes a request frame's bytes; garbage is an error, never a panic.
pub fn decode_request(bytes: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("malformed request: {e}"))
}

/// Decodes a reply frame's bytes; garbage is an error, never a panic.
pub fn decode_reply(bytes: &[u8]) -> Result<Reply, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("malformed reply: {e}"))
}

async fn read_frame(stream: &mut UnixStream) -> io::Result<Vec<u8>> {
    let len = stream.read_u32_le().await?;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    let mut buf = vec![0; len as usize];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame(stream: &mut UnixStream, json: &[u8]) -> io::Result<()> {
    stream.write_u32_le(json.len() as u32).await?;
    stream.write_all(json).await?;
    stream.flush().await
}

/// Where the owner of the volume at `backend` listens, if its journal is a
/// local directory: `control.sock` in it, found from its canonical path so
/// that every spelling of the address finds the same socket. A path too
/// long for a socket is replaced by one in this user's private directory
/// (`/tmp/hlfs-UID`), named by a hash of the canonical path.
pub fn socket_path(backend: &Backend) -> Option<PathBuf> {
    let path = backend.journal.local_path(SOCKET_NAME)?;
    let dir = path.parent()?;
    let path = std::fs::canonicalize(dir)
        .map(|d| d.join(SOCKET_NAME))
        .unwrap_or(path);
    if path.as_os_str().len() <= MAX_SOCKET_PATH {
        return Some(path);
    }
    let bytes = path.as_os_str().as_encoded_bytes();
    let hash = (u64::from(crc32c::crc32c(bytes)) << 32)
        | u64::from(crc32c::crc32c_append(0x9e37_79b9, bytes));
    Some(private_dir().join(format!("{hash:016x}.sock")))
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// `/tmp/hlfs-UID`, for sockets whose natural path is too long.
fn private_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/hlfs-{}", euid()))
}

/// Makes sure the private directory is ours alone before a socket in it is
/// trusted: a real directory (not a link), owned by this user, that nobody
/// else may enter. Created so if missing.
fn check_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != euid() || meta.mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a private directory of this user's; remove it",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Checks the directory of a socket outside the journal directory.
fn check_socket_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if dir == private_dir() => check_private_dir(dir),
        _ => Ok(()),
    }
}

/// Binds the control socket at `path`. Call only while holding the
/// volume's journal lock: that proves a socket file already there is a dead
/// owner's, so it is replaced.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    check_socket_dir(path)?;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// What the owner does with a command.
#[async_trait]
pub trait Owner: Send + Sync {
    async fn run(&self, command: Command) -> Result<Answer, VolumeError>;
}

/// Answers commands on `listener` until `stop` turns true, then waits for
/// the commands already running to answer. Each connection is one request
/// and one reply; a peer of another user, a malformed frame or a newer
/// protocol gets an error reply or is closed, and nothing else changes.
pub async fn serve(
    listener: UnixListener,
    owner: std::sync::Arc<dyn Owner>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut running = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let owner = owner.clone();
        running.spawn(async move {
            if let Err(e) = answer(stream, &*owner).await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
        while running.try_join_next().is_some() {}
    }
    drop(listener);
    while running.join_next().await.is_some() {}
}

/// Whether the peer is this user or root: the only ones an owner takes
/// commands from, and the only owners a client trusts.
fn trusted(stream: &UnixStream) -> bool {
    stream
        .peer_cred()
        .is_ok_and(|c| c.uid() == euid() || c.uid() == 0)
}

async fn answer(mut stream: UnixStream, owner: &dyn Owner) -> io::Result<()> {
    let reply = if !trusted(&stream) {
        Reply::Error {
            kind: kind_name(ErrorKind::Busy).into(),
            message: "the volume's owner takes commands only from its own user".into(),
        }
    } else {
        let bytes = tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request in time"))??;
        match decode_request(&bytes) {
            Err(message) => Reply::Error {
                kind: kind_name(ErrorKind::InvalidInput).into(),
                message,
            },
            Ok(r) if r.version != PROTOCOL_VERSION => Reply::Error {
                kind: kind_name(ErrorKind::InvalidInput).into(),
                message: format!(
                    "the volume's owner speaks control protocol {PROTOCOL_VERSION}, not {}: run the same hlfs version",
                    r.version
                ),
            },
            Ok(r) => Reply::of(owner.run(r.command).await),
        }
    };
    let json = serde_json::to_vec(&reply).expect("a reply always encodes");
    write_frame(&mut stream, &json).await
}

/// A connection to a volume's owner.
pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// Connects to the owner of the volume at `backend`, if a process on
    /// this host serves it; None if nobody listens (the volume is not
    /// served, or its server died and the caller may take over).
    pub async fn connect(backend: &Backend) -> io::Result<Option<Client>> {
        let Some(path) = socket_path(backend) else {
            return Ok(None);
        };
        if path.parent() == Some(&private_dir()) && !private_dir().exists() {
            return Ok(None);
        }
        check_socket_dir(&path)?;
        match UnixStream::connect(&path).await {
            Ok(stream) if trusted(&stream) => Ok(Some(Client { stream })),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} belongs to another user: not the volume's server",
                    path.display()
                ),
            )),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("connecting to {}: {e}", path.display()),
            )),
        }
    }

    /// Sends `command` and waits for the owner's answer.
    pub async fn call(mut self, command: Command) -> Result<Answer, VolumeError> {
        let request = Request {
            version: PROTOCOL_VERSION,
            command,
        };
        let lost = |e: io::Error| VolumeError::Owner {
            kind: ErrorKind::Io,
            message: format!("the volume's server did not answer: {e}"),
        };
        let json = serde_json::to_vec(&request).expect("a request always encodes");
        write_frame(&mut self.stream, &json).await.map_err(lost)?;
        let bytes = read_frame(&mut self.stream).await.map_err(lost)?;
        decode_reply(&bytes)
            .map_err(|message| VolumeError::Owner {
                kind: ErrorKind::Io,
                message,
            })?
            .into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_and_replies_round_trip_as_json() {
        let r = Request {
            version: PROTOCOL_VERSION,
            command: Command::SnapshotCreate {
                name: "before-upgrade".into(),
            },
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"command":{"op":"snapshot_create","name":"before-upgrade"}}"#
        );
        assert_eq!(decode_request(json.as_bytes()).unwrap(), r);
        let err = Reply::of(Err(VolumeError::SnapshotExists("x".into())));
        let back = decode_reply(&serde_json::to_vec(&err).unwrap()).unwrap();
        let e = back.into_result().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(e.to_string(), "a snapshot named \"x\" already exists");
        let status = Request {
            version: PROTOCOL_VERSION,
            command: Command::Status,
        };
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(json, r#"{"version":1,"command":{"op":"status"}}"#);
        assert_eq!(decode_request(json.as_bytes()).unwrap(), status);
        let live = Live {
            pid: 7,
            export: "vm1".into(),
            connections: 2,
            figures: Figures {
                written_bytes: 1 << 20,
                journal_sync_seconds: 0.25,
                ..Figures::default()
            },
            flatten: Some(FlattenProgress {
                done: 1 << 20,
                total: 4 << 20,
            }),
        };
        let reply = Reply::of(Ok(Answer::Status(live.clone())));
        let back = decode_reply(&serde_json::to_vec(&reply).unwrap()).unwrap();
        assert_eq!(back.into_result().unwrap(), Answer::Status(live));
        assert!(Answer::Status(Live {
            pid: 1,
            export: String::new(),
            connections: 0,
            figures: Figures::default(),
            flatten: None,
        })
        .into_name()
        .is_err());
        let gc = Request {
            version: PROTOCOL_VERSION,
            command: Command::Gc {
                target: 1.5,
                grace_ms: 60_000,
            },
        };
        let json = serde_json::to_string(&gc).unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"command":{"op":"gc","target":1.5,"grace_ms":60000}}"#
        );
        assert_eq!(decode_request(json.as_bytes()).unwrap(), gc);
        let report = GcReport {
            passes: 2,
            deleted_segments: 3,
            freed_bytes: 3 << 20,
            copied_bytes: 1 << 20,
            swept_bytes: 4096,
            stored_before: 10 << 20,
            live_before: 5 << 20,
            stored_after: 7 << 20,
            live_after: 5 << 20,
            stopped: hlfs_volume::GcStop::TargetReached,
        };
        let reply = Reply::of(Ok(Answer::Gc(report.clone())));
        let back = decode_reply(&serde_json::to_vec(&reply).unwrap()).unwrap();
        assert_eq!(
            back.into_result().unwrap().into_gc_report().unwrap(),
            report
        );
        assert!(Answer::Done(None).into_gc_report().is_err());
        let import = decode_request(
            br#"{"version":1,"command":{"op":"import_diff","path":"/backups/vm1-2.diff"}}"#,
        )
        .unwrap();
        assert_eq!(
            import.command,
            Command::ImportDiff {
                path: "/backups/vm1-2.diff".into()
            }
        );
        let imported = DiffStreamReport {
            from: Some("s1".into()),
            to: Some("s2".into()),
            size: 4 << 20,
            data_bytes: 1 << 20,
            zero_bytes: 4096,
            diffs: 1,
        };
        let reply = Reply::of(Ok(Answer::Imported(imported.clone())));
        let back = decode_reply(&serde_json::to_vec(&reply).unwrap()).unwrap();
        assert_eq!(
            back.into_result().unwrap().into_import_report().unwrap(),
            imported
        );
        assert!(Answer::Done(None).into_import_report().is_err());
        assert!(decode_request(br#"{"version":1,"command":{"op":"gc","target":"all"}}"#).is_err());
        assert_eq!(
            decode_request(br#"{"version":1,"command":{"op":"checkpoint"}}"#).unwrap(),
            Request {
                version: PROTOCOL_VERSION,
                command: Command::Checkpoint
            }
        );
        assert_eq!(
            decode_request(br#"{"version":1,"command":{"op":"retain","window_ms":3600000}}"#)
                .unwrap()
                .command,
            Command::Retain {
                window_ms: 3_600_000
            }
        );
        assert!(
            decode_request(br#"{"version":1,"command":{"op":"retain","window_ms":"1h"}}"#).is_err()
        );
        assert_eq!(
            decode_request(
                br#"{"version":1,"command":{"op":"rollback_to_moment","at_ms":1796637600000}}"#
            )
            .unwrap()
            .command,
            Command::RollbackToMoment {
                at_ms: 1_796_637_600_000
            }
        );
        assert_eq!(
            decode_request(
                br#"{"version":1,"command":{"op":"offer_for_clone","source":{"moment":1796637600000}}}"#
            )
            .unwrap()
            .command,
            Command::OfferForClone {
                source: CloneSource::Moment(1_796_637_600_000)
            }
        );
        assert_eq!(
            decode_request(
                br#"{"version":1,"command":{"op":"offer_for_clone","source":{"snapshot":"gold"}}}"#
            )
            .unwrap()
            .command,
            Command::OfferForClone {
                source: CloneSource::Snapshot("gold".into())
            }
        );
        assert!(decode_request(
            br#"{"version":1,"command":{"op":"offer_for_clone","source":{"head":0}}}"#
        )
        .is_err());
        assert_eq!(
            decode_request(br#"{"version":1,"command":{"op":"flatten"}}"#)
                .unwrap()
                .command,
            Command::Flatten { copy_rate: None }
        );
        assert_eq!(
            decode_request(br#"{"version":1,"command":{"op":"flatten","copy_rate":1048576}}"#)
                .unwrap()
                .command,
            Command::Flatten {
                copy_rate: Some(1 << 20)
            }
        );
        assert!(decode_request(br#"{"version":1,"command":{"op":"format_disk"}}"#).is_err());
        assert!(decode_request(br#"{"version":1,"command":{"op":"resize","size":-1}}"#).is_err());
        assert!(
            decode_request(br#"{"version":1,"command":{"op":"resize","size":1},"x":0}"#).is_err()
        );
        assert_eq!(kind_of("from_the_future"), ErrorKind::Io);
    }

    #[tokio::test]
    async fn a_path_too_long_for_a_socket_gets_a_short_one_both_sides_agree_on() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir
            .path()
            .join("a-directory-name-of-some-length".repeat(4))
            .join("vm.hlfs");
        let backend = Backend::local(&deep, true).unwrap();
        let path = socket_path(&backend).unwrap();
        assert!(path.as_os_str().len() <= MAX_SOCKET_PATH, "{path:?}");
        assert_eq!(
            socket_path(&Backend::local(&deep, false).unwrap()),
            Some(path.clone())
        );
        let listener = bind(&path).unwrap();
        assert!(Client::connect(&backend).await.unwrap().is_some());
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        assert!(
            Client::connect(&backend).await.unwrap().is_none(),
            "nobody listens"
        );
    }

    #[test]
    fn every_spelling_of_an_address_finds_one_socket() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("vm.hlfs");
        let backend = Backend::local(&vol, true).unwrap();
        let roundabout = dir.path().join(".").join("sub").join("..").join("vm.hlfs");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let other = Backend::local(&roundabout, false).unwrap();
        assert_eq!(socket_path(&backend), socket_path(&other));
        let canonical = std::fs::canonicalize(&vol)
            .unwrap()
            .join("journal/control.sock");
        assert_eq!(socket_path(&backend), Some(canonical));
    }

    #[test]
    fn a_private_directory_others_can_enter_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("hlfs-private");
        check_private_dir(&private).unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = check_private_dir(&private).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&private, &link).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(
            check_private_dir(&link).is_err(),
            "a link is not a directory"
        );
    }

    proptest! {
        #[test]
        fn garbage_is_an_error_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&bytes);
            let _ = decode_reply(&bytes);
        }
    }
}
