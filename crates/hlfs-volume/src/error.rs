use hlfs_store::StoreError;

/// What can go wrong with a volume. Each message is one line a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("storage error: {0}")]
    Store(#[from] StoreError),
    #[error("corrupt volume: {0}")]
    Corrupt(String),
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
}

pub type Result<T> = std::result::Result<T, VolumeError>;

impl VolumeError {
    pub fn corrupt(what: impl Into<String>) -> Self {
        VolumeError::Corrupt(what.into())
    }
}
