//! The scheduler's one error type, [`SchedulerError`]: what stops an
//! Execute request before its operation exists, or an Operations call.
//! Errors found while running an action are not errors here: they go into
//! the `ExecuteResponse.status`.

use kiln_cas::CasError;
use kiln_platform::{PlatformError, PlatformErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A malformed request (digest, digest function, Action or Command).
    #[error("{0}")]
    InvalidArgument(String),
    /// A known platform property refused: a malformed value or
    /// combination (`INVALID_ARGUMENT`), or one this Kiln cannot honour
    /// (`FAILED_PRECONDITION`).
    #[error("action {action}: {source}")]
    Platform {
        action: String,
        #[source]
        source: PlatformError,
    },
    /// No registered executor matches what the action asks for.
    #[error("action {action}: no executor matches {unmatched} (pool {pool:?}); registered executors offer: {registered}")]
    NoExecutor {
        action: String,
        pool: String,
        unmatched: String,
        registered: String,
    },
    /// Executors match what the action asks for, but none has the capacity
    /// it would reserve.
    #[error("action {action}: {need} exceeds the capacity of every executor matching {key}; the largest offers {largest}")]
    TooLarge {
        action: String,
        need: String,
        key: String,
        largest: String,
    },
    /// No operation of that name (never existed, deleted or forgotten).
    #[error("operation {0:?} is not known")]
    UnknownOperation(String),
    /// The CAS or Action Cache failed.
    #[error(transparent)]
    Cas(#[from] CasError),
    /// The executor's session with its scheduler failed.
    #[error("executor session: {0}")]
    Session(String),
    /// The scheduler refused the executor's registration (a missing or
    /// wrong token, an invalid registration): retrying will not help.
    #[error("executor registration refused: {0}")]
    Refused(String),
    /// The scheduler is shutting down.
    #[error("the scheduler is shutting down")]
    ShuttingDown,
    /// As many operations as the scheduler keeps are queued or running
    /// (requests merged into another's execution count: each keeps an
    /// operation): `RESOURCE_EXHAUSTED`, with a delay to retry after.
    #[error("{in_flight} operations are queued or running, the most this scheduler keeps (max_queued_executions); retry later")]
    Full { in_flight: usize },
}

/// How long a client is asked to wait when the scheduler is full.
pub const RETRY_WHEN_FULL: std::time::Duration = std::time::Duration::from_secs(5);

impl From<SchedulerError> for tonic::Status {
    fn from(error: SchedulerError) -> tonic::Status {
        let message = error.to_string();
        match error {
            SchedulerError::Platform { source, .. }
                if source.kind == PlatformErrorKind::Unsupported =>
            {
                tonic::Status::failed_precondition(message)
            }
            SchedulerError::InvalidArgument(_) | SchedulerError::Platform { .. } => {
                tonic::Status::invalid_argument(message)
            }
            SchedulerError::NoExecutor { .. } | SchedulerError::TooLarge { .. } => {
                tonic::Status::failed_precondition(message)
            }
            SchedulerError::UnknownOperation(_) => tonic::Status::not_found(message),
            SchedulerError::Cas(cas) => tonic::Status::new(cas.code(), message),
            SchedulerError::ShuttingDown | SchedulerError::Session(_) => {
                tonic::Status::unavailable(message)
            }
            SchedulerError::Refused(_) => tonic::Status::failed_precondition(message),
            SchedulerError::Full { .. } => {
                kiln_proto::status::exhausted_retry_after(message, RETRY_WHEN_FULL)
            }
        }
    }
}
