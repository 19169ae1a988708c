//! The errors every store returns. Each variant tells the caller what to do
//! about it; the text is what a user sees.

/// Errors of every store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("read of {name} at offset {offset} length {len} is past its end ({size} bytes)")]
    OutOfRange {
        name: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A local disk or filesystem refused an operation. Trying again does
    /// not help: after a failed fsync the kernel may have dropped the data.
    #[error("I/O error on {name}: {source}")]
    Io {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} is locked by another writer")]
    Locked { name: String },
    /// The request itself is wrong: a bad blob name, address or setting.
    #[error("{0}")]
    Invalid(String),
    /// The store refused the request for a reason trying again will not
    /// fix (access denied, an operation it does not support).
    #[error("{0}")]
    Refused(String),
    /// The store did not do it, but may later: unreachable, timed out,
    /// throttled, or a server error.
    #[error("{0}")]
    Unavailable(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

impl StoreError {
    pub fn io(name: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            name: name.into(),
            source,
        }
    }

    /// A read of `len` bytes at `offset` of blob `name` ends past its
    /// `size`.
    pub fn out_of_range(name: &str, offset: u64, len: u64, size: u64) -> Self {
        StoreError::OutOfRange {
            name: name.to_string(),
            offset,
            len,
            size,
        }
    }

    /// The kinds of error, by the names [`StoreError::kind_name`] gives.
    pub const KIND_NAMES: [&'static str; 8] = [
        "already_exists",
        "not_found",
        "out_of_range",
        "io",
        "locked",
        "invalid",
        "refused",
        "unavailable",
    ];

    /// A stable name for the kind of error (metrics label it so).
    pub fn kind_name(&self) -> &'static str {
        Self::KIND_NAMES[self.kind_index()]
    }

    pub(crate) fn kind_index(&self) -> usize {
        match self {
            StoreError::AlreadyExists(_) => 0,
            StoreError::NotFound(_) => 1,
            StoreError::OutOfRange { .. } => 2,
            StoreError::Io { .. } => 3,
            StoreError::Locked { .. } => 4,
            StoreError::Invalid(_) => 5,
            StoreError::Refused(_) => 6,
            StoreError::Unavailable(_) => 7,
        }
    }

    /// Whether the same request may well succeed if tried again shortly:
    /// what requests someone waits on are retried for.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// Whether the store or the disk failed to do the request: it may
    /// succeed later, if only once a full disk has room again. The other
    /// errors are answers (exists, missing, out of range, locked) or
    /// refusals, which trying again cannot change.
    pub fn is_failure(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Io { .. })
    }
}
