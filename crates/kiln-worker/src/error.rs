//! The executor's one error type, [`RunError`], and its conversion to a
//! `tonic::Status` at the edge (the scheduler answering `Execute`). Every
//! message names the digest, path or limit involved.

use kiln_proto::reapi::Digest;
use kiln_proto::status;

/// Why an action could not be run to completion. A command that runs and
/// fails is *not* an error: it is an `ActionResult` with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Blobs the action needs (Action, Command, Directory or input file) are
    /// not in the CAS. The client should upload them and retry
    /// (`FAILED_PRECONDITION` with one `PreconditionFailure` violation each).
    #[error("{}", status::missing_blobs_message(.0))]
    MissingInputs(Vec<Digest>),
    /// The action itself is malformed (bad directory entry, output path
    /// escaping the workspace, empty arguments, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// The action asks for something this executor does not have (an
    /// isolation type) or that does not exist (an unknown container image,
    /// credentials a registry refuses): `FAILED_PRECONDITION`, naming it.
    #[error("{0}")]
    Unsupported(String),
    /// A service the action depends on (a container registry) cannot be
    /// reached now: `UNAVAILABLE`, which clients retry.
    #[error("{0}")]
    Unavailable(String),
    /// This executor cannot run the action now for a reason of its own
    /// (its disk is full): a scheduler should retry the action on another
    /// executor rather than fail it (`RESOURCE_EXHAUSTED`).
    #[error("executor unavailable: {0}")]
    ExecutorUnavailable(String),
    /// The CAS answered with an error other than a missing blob.
    #[error("{context}: {status}")]
    Cas {
        context: String,
        status: tonic::Status,
    },
    /// A local failure (I/O on the workspace or cache, a spawn failure).
    #[error("{0}")]
    Internal(String),
}

impl RunError {
    /// Wraps a local I/O error with what was being done; a full disk
    /// becomes [`RunError::ExecutorUnavailable`].
    pub fn io(context: impl std::fmt::Display, error: std::io::Error) -> RunError {
        if error.kind() == std::io::ErrorKind::StorageFull
            || error.kind() == std::io::ErrorKind::QuotaExceeded
        {
            RunError::ExecutorUnavailable(format!("{context}: {error}"))
        } else {
            RunError::Internal(format!("{context}: {error}"))
        }
    }

    pub(crate) fn cas(context: impl Into<String>, status: tonic::Status) -> RunError {
        RunError::Cas {
            context: context.into(),
            status,
        }
    }

    /// Whether a scheduler should retry the action elsewhere.
    pub fn is_retryable_elsewhere(&self) -> bool {
        matches!(self, RunError::ExecutorUnavailable(_))
    }
}

pub(crate) fn format_digest(digest: &Digest) -> String {
    format!("{}/{}", digest.hash, digest.size_bytes)
}

impl From<RunError> for tonic::Status {
    fn from(error: RunError) -> tonic::Status {
        let message = error.to_string();
        match error {
            RunError::MissingInputs(digests) => status::missing_blobs(&digests),
            RunError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            RunError::Unsupported(_) => tonic::Status::failed_precondition(message),
            RunError::Unavailable(_) => tonic::Status::unavailable(message),
            RunError::ExecutorUnavailable(_) => tonic::Status::resource_exhausted(message),
            RunError::Cas { status, .. } => tonic::Status::new(status.code(), message),
            RunError::Internal(_) => tonic::Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_means_retry_elsewhere() {
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let error = RunError::io("writing /cache/x", full);
        assert!(error.is_retryable_elsewhere());
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("/cache/x"));
        let other = RunError::io(
            "x",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert!(!other.is_retryable_elsewhere());
    }

    #[test]
    fn an_unreachable_dependency_is_unavailable() {
        let error = RunError::Unavailable("registry 127.0.0.1:1 is unreachable".into());
        assert!(!error.is_retryable_elsewhere());
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("127.0.0.1:1"));
    }
}
