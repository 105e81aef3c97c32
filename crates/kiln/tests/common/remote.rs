//! A REAPI client for tests that drive `kiln serve` directly: digests,
//! uploads, Execute and the wait for its response, with every wait
//! bounded.

use std::process::Child;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_proto::longrunning::{operation, Operation};
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{self, batch_update_blobs_request, execution_stage, Digest};
use prost::Message;
use tonic::transport::Channel;
use tonic::Streaming;

/// Upper bound for anything that could hang; never a pass/fail threshold.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// The SHA-256 digest of `data`.
pub fn digest(data: &[u8]) -> Digest {
    kiln_cas::wire::digest_of(data)
}

/// `message` with API key `key` (if any) in the header Bazel sends it in.
pub fn with_key<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("x-buildbuddy-api-key", key.parse().unwrap());
    }
    request
}

/// A Platform of `properties`, in order.
pub fn platform(properties: &[(&str, &str)]) -> reapi::Platform {
    reapi::Platform {
        properties: properties
            .iter()
            .map(|(name, value)| reapi::platform::Property {
                name: name.to_string(),
                value: value.to_string(),
            })
            .collect(),
    }
}

/// Uploads `blobs` with BatchUpdateBlobs, a hundred at a time.
pub async fn upload(channel: &Channel, blobs: &[Vec<u8>]) {
    upload_as(channel, None, blobs).await
}

/// [`upload`], as the caller of API key `key`.
pub async fn upload_as(channel: &Channel, key: Option<&str>, blobs: &[Vec<u8>]) {
    for chunk in blobs.chunks(100) {
        let request = reapi::BatchUpdateBlobsRequest {
            requests: chunk
                .iter()
                .map(|data| batch_update_blobs_request::Request {
                    digest: Some(digest(data)),
                    data: data.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let responses = ContentAddressableStorageClient::new(channel.clone())
            .batch_update_blobs(with_key(request, key))
            .await
            .unwrap()
            .into_inner()
            .responses;
        for response in responses {
            let status = response.status.unwrap_or_default();
            assert_eq!(
                status.code, 0,
                "uploading {:?}: {status:?}",
                response.digest
            );
        }
    }
}

/// Uploads an action running `arguments` with platform `properties`, on
/// the input root `root` (default: the empty directory) whose blobs are
/// `blobs`; returns the action's digest.
pub async fn upload_action(
    channel: &Channel,
    arguments: Vec<String>,
    root: Option<Digest>,
    blobs: Vec<Vec<u8>>,
    properties: &[(&str, &str)],
) -> Digest {
    upload_action_as(channel, None, arguments, root, blobs, properties).await
}

/// [`upload_action`], as the caller of API key `key`.
pub async fn upload_action_as(
    channel: &Channel,
    key: Option<&str>,
    arguments: Vec<String>,
    root: Option<Digest>,
    blobs: Vec<Vec<u8>>,
    properties: &[(&str, &str)],
) -> Digest {
    let command = reapi::Command {
        arguments,
        ..Default::default()
    }
    .encode_to_vec();
    let empty = reapi::Directory::default().encode_to_vec();
    let action = reapi::Action {
        command_digest: Some(digest(&command)),
        input_root_digest: Some(root.unwrap_or_else(|| digest(&empty))),
        platform: Some(platform(properties)),
        ..Default::default()
    }
    .encode_to_vec();
    let action_digest = digest(&action);
    let mut all = blobs;
    all.extend([command, empty, action]);
    upload_as(channel, key, &all).await;
    action_digest
}

/// Executes the uploaded action `action_digest`, with `headers` as
/// request metadata.
pub async fn execute(
    channel: Channel,
    action_digest: Digest,
    skip_cache_lookup: bool,
    headers: &[(&'static str, &str)],
) -> Result<Streaming<Operation>, tonic::Status> {
    let mut request = tonic::Request::new(reapi::ExecuteRequest {
        action_digest: Some(action_digest),
        skip_cache_lookup,
        ..Default::default()
    });
    for (name, value) in headers {
        request.metadata_mut().insert(*name, value.parse().unwrap());
    }
    ExecutionClient::new(channel)
        .execute(request)
        .await
        .map(tonic::Response::into_inner)
}

/// The operation's response once it completes.
pub async fn completed(mut stream: Streaming<Operation>) -> reapi::ExecuteResponse {
    let mut last = None;
    while let Some(operation) = tokio::time::timeout(HANG_GUARD, stream.next())
        .await
        .expect("the operation never completed")
    {
        last = Some(operation.unwrap());
    }
    let last = last.expect("the stream ended without an operation");
    assert!(last.done);
    assert_eq!(stage(&last), execution_stage::Value::Completed);
    let Some(operation::Result::Response(any)) = last.result else {
        panic!("no response: {last:?}");
    };
    reapi::ExecuteResponse::decode(any.value.as_slice()).unwrap()
}

/// The stage an operation's metadata reports.
pub fn stage(operation: &Operation) -> execution_stage::Value {
    let metadata = operation.metadata.as_ref().expect("operation metadata");
    let metadata = reapi::ExecuteOperationMetadata::decode(metadata.value.as_slice()).unwrap();
    execution_stage::Value::try_from(metadata.stage).unwrap()
}

/// The exit status of a process expected to stop on its own.
pub fn wait_bounded(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}
