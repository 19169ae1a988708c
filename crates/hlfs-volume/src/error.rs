//! What can go wrong with a volume, and what a caller can do about it.
//!
//! Each [`VolumeError`] carries a message a user can act on and, through
//! [`VolumeError::kind`], one of a few [`ErrorKind`]s a program can act on.
//! Those who translate errors for the outside (the NBD server's errno, the
//! command line's exit status, the C API's return codes) start from the
//! kind, each in one place.

use hlfs_store::StoreError;

/// What a caller should do about an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No such volume or snapshot.
    NotFound,
    /// A volume or snapshot by that name exists already.
    AlreadyExists,
    /// Another writer holds the volume, or has taken it over: stop it
    /// first.
    Busy,
    /// The request is malformed: a bad name, size or argument.
    InvalidInput,
    /// The range is outside the volume.
    OutOfRange,
    /// The volume or snapshot is open read-only.
    ReadOnly,
    /// The store is away or slow. Nothing acknowledged is lost: try again
    /// later.
    Unavailable,
    /// The volume's bytes are damaged; `hlfs check` says where.
    Corrupt,
    /// A local I/O error (or the store refused outright). A volume that
    /// hits one while writing stops taking writes until it is reopened.
    Io,
    /// The volume has been closed.
    Closed,
}

/// What can go wrong with a volume. Each message is one line a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Not a `source`: the message already carries the store's, and a
    /// chain printed with its causes would say it twice.
    #[error("storage error: {0}")]
    Store(StoreError),
    #[error("corrupt volume: {0}")]
    Corrupt(String),
    /// A segment the map points into is not in the store: damage, or, for
    /// a read-only view, segment cleaning by the volume's writer since the
    /// view was opened (the view then reopens at the newer manifest).
    #[error("corrupt volume: {0} is missing")]
    SegmentMissing(String),
    #[error("no HLFS volume at {0}")]
    NotFound(String),
    #[error("a volume already exists at {0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Fenced(String),
    #[error("range {offset}+{len} is beyond the end of the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("the volume is open read-only")]
    ReadOnly,
    #[error("no snapshot named {0:?}")]
    SnapshotNotFound(String),
    #[error("a snapshot named {0:?} already exists")]
    SnapshotExists(String),
    #[error("the volume stopped accepting writes after an earlier I/O error: {0}")]
    Failed(String),
    /// The store did not take data in time; nothing acknowledged is lost,
    /// and the operation can be tried again.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("the volume is closed")]
    Closed,
    /// An error the volume's owner answered a command sent to it with (see
    /// `hlfs_device::control`), or a task of the volume's (a flatten) ended
    /// with: its kind and message as the owner gave them.
    #[error("{message}")]
    Owner { kind: ErrorKind, message: String },
}

pub type Result<T> = std::result::Result<T, VolumeError>;

impl VolumeError {
    pub fn corrupt(what: impl Into<String>) -> Self {
        VolumeError::Corrupt(what.into())
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            VolumeError::Store(e) => match e {
                StoreError::AlreadyExists(_) => ErrorKind::AlreadyExists,
                StoreError::NotFound(_) => ErrorKind::NotFound,
                // A blob shorter than what points into it is damage.
                StoreError::OutOfRange { .. } => ErrorKind::Corrupt,
                StoreError::Io { .. } | StoreError::Refused(_) => ErrorKind::Io,
                StoreError::Locked { .. } => ErrorKind::Busy,
                StoreError::Invalid(_) => ErrorKind::InvalidInput,
                StoreError::Unavailable(_) => ErrorKind::Unavailable,
            },
            VolumeError::Corrupt(_) | VolumeError::SegmentMissing(_) => ErrorKind::Corrupt,
            VolumeError::NotFound(_) | VolumeError::SnapshotNotFound(_) => ErrorKind::NotFound,
            VolumeError::AlreadyExists(_) | VolumeError::SnapshotExists(_) => {
                ErrorKind::AlreadyExists
            }
            VolumeError::Busy(_) | VolumeError::Fenced(_) => ErrorKind::Busy,
            VolumeError::OutOfRange { .. } => ErrorKind::OutOfRange,
            VolumeError::InvalidArgument(_) => ErrorKind::InvalidInput,
            VolumeError::ReadOnly => ErrorKind::ReadOnly,
            VolumeError::Failed(_) => ErrorKind::Io,
            VolumeError::Unavailable(_) => ErrorKind::Unavailable,
            VolumeError::Closed => ErrorKind::Closed,
            VolumeError::Owner { kind, .. } => *kind,
        }
    }
}

impl From<StoreError> for VolumeError {
    fn from(e: StoreError) -> Self {
        VolumeError::Store(e)
    }
}
