//! Wire types. REAPI and its Google dependencies come from the
//! `bazel-remote-apis` crate; ByteStream is compiled here from Kiln's own
//! proto so its payloads are zero-copy `Bytes`; Kiln's executor protocol is
//! compiled here too.
#![forbid(unsafe_code)]

pub use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
pub use bazel_remote_apis::build::bazel::semver;
pub use bazel_remote_apis::google::{longrunning, protobuf, rpc};

/// Kiln's executor protocol (scheduler ⇄ executor processes).
pub mod executor {
    tonic::include_proto!("kiln.executor.v1");
}

/// What Kiln reports about the runner of an action
/// (`ExecutedActionMetadata.auxiliary_metadata`).
pub mod runner {
    tonic::include_proto!("kiln.runner.v1");

    /// The `Any.type_url` of a packed [`RunnerUsage`].
    pub const RUNNER_USAGE_TYPE: &str = "type.googleapis.com/kiln.runner.v1.RunnerUsage";
}

pub mod status;

/// The largest Action, Command or Directory blob Kiln reads into memory to
/// decode: a digest that names a bigger one is refused by its size before
/// anything is read.
pub const MAX_MESSAGE_BLOB_BYTES: u64 = 64 << 20;

/// `google.bytestream`, with `bytes::Bytes` payloads.
pub mod bytestream {
    tonic::include_proto!("google.bytestream");
}

/// The current wall-clock time as a protobuf `Timestamp` (for the
/// timestamps of `ExecutedActionMetadata`).
pub fn timestamp_now() -> protobuf::Timestamp {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    protobuf::Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}
