//! Wire types. REAPI and its Google dependencies come from the
//! `bazel-remote-apis` crate; ByteStream and the CAS batch messages that
//! carry blobs are compiled here from Kiln's own protos so their payloads
//! are zero-copy `Bytes`; Kiln's executor protocol is compiled here too.
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

/// The REAPI CAS batch messages that carry blob data, with
/// `bytes::Bytes` payloads: the same on the wire as
/// [`reapi::BatchUpdateBlobsRequest`] and [`reapi::BatchReadBlobsResponse`]
/// (their digests and statuses are the REAPI crate's types).
pub mod cas_batch {
    tonic::include_proto!("kiln.cas.v1");
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use prost::Message;

    use super::{cas_batch, reapi, rpc};

    fn digest(hash: &str, size_bytes: i64) -> Option<reapi::Digest> {
        Some(reapi::Digest {
            hash: hash.into(),
            size_bytes,
        })
    }

    #[test]
    fn batch_update_request_is_reapis_on_the_wire() {
        let reapi = reapi::BatchUpdateBlobsRequest {
            instance_name: "main".into(),
            requests: vec![
                reapi::batch_update_blobs_request::Request {
                    digest: digest("ab", 3),
                    data: b"abc".to_vec(),
                    compressor: reapi::compressor::Value::Zstd as i32,
                },
                reapi::batch_update_blobs_request::Request::default(),
            ],
            digest_function: reapi::digest_function::Value::Blake3 as i32,
        };
        let ours = cas_batch::BatchUpdateBlobsRequest::decode(&reapi.encode_to_vec()[..]).unwrap();
        assert_eq!(ours.instance_name, "main");
        assert_eq!(ours.digest_function, reapi.digest_function);
        assert_eq!(ours.requests.len(), 2);
        assert_eq!(ours.requests[0].digest, reapi.requests[0].digest);
        assert_eq!(ours.requests[0].data, Bytes::from_static(b"abc"));
        assert_eq!(ours.requests[0].compressor, reapi.requests[0].compressor);
        assert_eq!(
            reapi::BatchUpdateBlobsRequest::decode(&ours.encode_to_vec()[..]).unwrap(),
            reapi
        );
    }

    #[test]
    fn batch_read_response_is_reapis_on_the_wire() {
        let ours = cas_batch::BatchReadBlobsResponse {
            responses: vec![
                cas_batch::batch_read_blobs_response::Response {
                    digest: digest("ab", 3),
                    data: Bytes::from_static(b"abc"),
                    compressor: 0,
                    status: Some(rpc::Status::default()),
                },
                cas_batch::batch_read_blobs_response::Response {
                    digest: digest("cd", 9),
                    data: Bytes::new(),
                    compressor: 0,
                    status: Some(rpc::Status {
                        code: 5,
                        message: "blob cd/9 is not in the CAS".into(),
                        details: Vec::new(),
                    }),
                },
            ],
        };
        let reapi = reapi::BatchReadBlobsResponse::decode(&ours.encode_to_vec()[..]).unwrap();
        assert_eq!(reapi.responses[0].data, b"abc");
        assert_eq!(reapi.responses[0].digest, ours.responses[0].digest);
        assert_eq!(reapi.responses[1].status, ours.responses[1].status);
        assert_eq!(
            cas_batch::BatchReadBlobsResponse::decode(&reapi.encode_to_vec()[..]).unwrap(),
            ours
        );
    }
}
