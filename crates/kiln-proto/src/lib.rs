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

/// `google.bytestream`, with `bytes::Bytes` payloads.
pub mod bytestream {
    tonic::include_proto!("google.bytestream");
}
