//! The store's one error type. Services map it to gRPC codes; every variant
//! says what it was doing so the message names the key or path.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The disk (or the store's budget for one blob) is full.
    #[error("out of storage space while {context}: {source}")]
    NoSpace {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Any other I/O failure.
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The blob does not fit this store at all (e.g. bigger than a memory store).
    #[error("{0}")]
    TooLarge(String),
    /// A streaming writer was given a different number of bytes than announced.
    #[error("{0}")]
    SizeMismatch(String),
    /// The store stopped after a failure it cannot recover from while
    /// running (a failed sync): it takes no writes and serves nothing until
    /// it is opened again. The message names the store and the failure.
    #[error("{0}")]
    Stopped(String),
}

impl StoreError {
    /// Wraps an I/O error with what the store was doing, classifying a full
    /// disk (or exhausted quota) as [`StoreError::NoSpace`].
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        match source.raw_os_error() {
            Some(code)
                if code == rustix::io::Errno::NOSPC.raw_os_error()
                    || code == rustix::io::Errno::DQUOT.raw_os_error() =>
            {
                StoreError::NoSpace { context, source }
            }
            _ => StoreError::Io { context, source },
        }
    }
}

impl StoreError {
    /// The same failure again, for reporting it once per item of a batch.
    pub fn duplicate(&self) -> StoreError {
        let copy_io = |source: &io::Error| io::Error::new(source.kind(), source.to_string());
        match self {
            StoreError::NoSpace { context, source } => StoreError::NoSpace {
                context: context.clone(),
                source: copy_io(source),
            },
            StoreError::Io { context, source } => StoreError::Io {
                context: context.clone(),
                source: copy_io(source),
            },
            StoreError::TooLarge(m) => StoreError::TooLarge(m.clone()),
            StoreError::SizeMismatch(m) => StoreError::SizeMismatch(m.clone()),
            StoreError::Stopped(m) => StoreError::Stopped(m.clone()),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
