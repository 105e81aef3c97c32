//! Statuses on the wire: REAPI's "missing blobs" answer
//! (`FAILED_PRECONDITION` with a `google.rpc.PreconditionFailure`), and a
//! `tonic::Status` as the `google.rpc.Status` an `ExecuteResponse` carries.

use bytes::Bytes;
use prost::Message;

use crate::reapi::Digest;
use crate::{protobuf, rpc};

/// `google.rpc.PreconditionFailure`, which `bazel-remote-apis` does not ship.
#[derive(Clone, PartialEq, Message)]
pub struct PreconditionFailure {
    #[prost(message, repeated, tag = "1")]
    pub violations: Vec<Violation>,
}

/// `google.rpc.PreconditionFailure.Violation`.
#[derive(Clone, PartialEq, Message)]
pub struct Violation {
    #[prost(string, tag = "1")]
    pub r#type: String,
    #[prost(string, tag = "2")]
    pub subject: String,
    #[prost(string, tag = "3")]
    pub description: String,
}

/// `google.rpc.RetryInfo`: when a client may try again.
#[derive(Clone, PartialEq, Message)]
pub struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    pub retry_delay: Option<protobuf::Duration>,
}

/// `type_url` of a packed [`RetryInfo`].
pub const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// `RESOURCE_EXHAUSTED` with `message` and a `RetryInfo` asking the client
/// to wait `delay` before trying again.
pub fn exhausted_retry_after(
    message: impl Into<String>,
    delay: std::time::Duration,
) -> tonic::Status {
    let message = message.into();
    let retry = RetryInfo {
        retry_delay: Some(protobuf::Duration {
            seconds: delay.as_secs() as i64,
            nanos: delay.subsec_nanos() as i32,
        }),
    };
    let details = rpc::Status {
        code: tonic::Code::ResourceExhausted as i32,
        message: message.clone(),
        details: vec![protobuf::Any {
            type_url: RETRY_INFO_TYPE.into(),
            value: retry.encode_to_vec(),
        }],
    };
    tonic::Status::with_details(
        tonic::Code::ResourceExhausted,
        message,
        Bytes::from(details.encode_to_vec()),
    )
}

/// The violation type REAPI defines for a blob missing from the CAS.
pub const VIOLATION_TYPE_MISSING: &str = "MISSING";

/// `type_url` of a packed [`PreconditionFailure`].
pub const PRECONDITION_FAILURE_TYPE: &str = "type.googleapis.com/google.rpc.PreconditionFailure";

/// `missing inputs: HASH/SIZE, ...`: how a missing-blobs status reads.
pub fn missing_blobs_message(digests: &[Digest]) -> String {
    let listed: Vec<String> = digests
        .iter()
        .map(|d| format!("{}/{}", d.hash, d.size_bytes))
        .collect();
    format!("missing inputs: {}", listed.join(", "))
}

/// `FAILED_PRECONDITION` naming `digests`, with one `MISSING` violation
/// per digest (subject `blobs/HASH/SIZE`): the answer that makes Bazel
/// upload the blobs and retry.
pub fn missing_blobs(digests: &[Digest]) -> tonic::Status {
    let message = missing_blobs_message(digests);
    let failure = PreconditionFailure {
        violations: digests
            .iter()
            .map(|digest| Violation {
                r#type: VIOLATION_TYPE_MISSING.into(),
                subject: format!("blobs/{}/{}", digest.hash, digest.size_bytes),
                description: String::new(),
            })
            .collect(),
    };
    let details = rpc::Status {
        code: tonic::Code::FailedPrecondition as i32,
        message: message.clone(),
        details: vec![protobuf::Any {
            type_url: PRECONDITION_FAILURE_TYPE.into(),
            value: failure.encode_to_vec(),
        }],
    };
    tonic::Status::with_details(
        tonic::Code::FailedPrecondition,
        message,
        Bytes::from(details.encode_to_vec()),
    )
}

/// A `tonic::Status` as the `google.rpc.Status` of an ExecuteResponse,
/// keeping its details (a PreconditionFailure).
pub fn to_rpc(status: tonic::Status) -> rpc::Status {
    if !status.details().is_empty() {
        if let Ok(decoded) = rpc::Status::decode(status.details()) {
            return decoded;
        }
    }
    rpc::Status {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: vec![],
    }
}
