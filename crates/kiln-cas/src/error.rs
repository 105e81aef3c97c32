//! The storage services' error type and its mapping to gRPC status codes.
//! Every message names the digest, resource or limit involved.

use kiln_store::StoreError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CasError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
    /// The store cannot serve until the server restarts (it stopped
    /// after a failed sync): clients should retry elsewhere or later.
    #[error("{0}")]
    Unavailable(String),
}

impl CasError {
    /// A store failure while doing `what` (e.g. "storing blob abc/12").
    pub fn store(what: impl std::fmt::Display, error: StoreError) -> CasError {
        let message = format!("{what}: {error}");
        match error {
            StoreError::NoSpace { .. } | StoreError::TooLarge(_) => {
                CasError::ResourceExhausted(message)
            }
            StoreError::SizeMismatch(_) => CasError::InvalidArgument(message),
            StoreError::Io { .. } => CasError::Internal(message),
            StoreError::Stopped(_) => CasError::Unavailable(message),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            CasError::InvalidArgument(_) => Code::InvalidArgument,
            CasError::NotFound(_) => Code::NotFound,
            CasError::OutOfRange(_) => Code::OutOfRange,
            CasError::ResourceExhausted(_) => Code::ResourceExhausted,
            CasError::Unimplemented(_) => Code::Unimplemented,
            CasError::Internal(_) => Code::Internal,
            CasError::Unavailable(_) => Code::Unavailable,
        }
    }

    /// As a `google.rpc.Status`, for per-item results in batch responses.
    pub fn to_rpc_status(&self) -> kiln_proto::rpc::Status {
        kiln_proto::rpc::Status {
            code: self.code() as i32,
            message: self.to_string(),
            details: Vec::new(),
        }
    }
}

impl From<CasError> for Status {
    /// The service edge: failures that are the server's problem (disk full,
    /// I/O errors) are logged for operators; client mistakes only at debug.
    fn from(error: CasError) -> Status {
        match error {
            CasError::Internal(_) | CasError::ResourceExhausted(_) | CasError::Unavailable(_) => {
                tracing::warn!(code = ?error.code(), %error, "storage request failed")
            }
            _ => tracing::debug!(code = ?error.code(), %error, "storage request refused"),
        }
        Status::new(error.code(), error.to_string())
    }
}

impl From<crate::resource::ResourceError> for CasError {
    fn from(error: crate::resource::ResourceError) -> CasError {
        CasError::InvalidArgument(error.to_string())
    }
}

pub type Result<T, E = CasError> = std::result::Result<T, E>;
