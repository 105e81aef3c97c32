//! `CasClient` over an in-process `GrpcTransport`: the storage services'
//! own tonic servers called without any listener or socket, as the
//! executor embedded in `kiln serve` uses them.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use kiln_cas::{ByteStreamService, CapabilitiesService, CasService, Storage, StorageLimits};
use kiln_proto::bytestream::byte_stream_server::ByteStreamServer;
use kiln_proto::reapi::capabilities_server::CapabilitiesServer;
use kiln_proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use kiln_store::MemoryStore;
use kiln_worker::cas::{digest_of, CasClient, GrpcTransport, UploadSource};
use kiln_worker::RunError;

/// A transport over the three storage services, no socket anywhere.
/// `max_decoding` is the CAS service's own request-size limit.
fn in_process(max_batch: u64, max_decoding: usize) -> GrpcTransport {
    let limits = StorageLimits {
        max_batch_total_size_bytes: max_batch,
        ..StorageLimits::default()
    };
    let storage = Storage::new(Arc::new(MemoryStore::new(1 << 30)), limits.clone());
    let routes = tonic::service::Routes::new(CapabilitiesServer::new(CapabilitiesService::new(
        limits, None,
    )))
    .add_service(
        ContentAddressableStorageServer::new(CasService::new(storage.clone()))
            .max_decoding_message_size(max_decoding),
    )
    .add_service(ByteStreamServer::new(ByteStreamService::new(storage)))
    .prepare();
    GrpcTransport::from_service(routes)
}

fn pseudo_random(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

#[tokio::test]
async fn small_and_large_blobs_round_trip_without_a_socket() {
    let cas = CasClient::new(in_process(64 * 1024, 4 << 20), "")
        .await
        .expect("GetCapabilities in-process");
    assert_eq!(cas.max_batch_bytes(), 64 * 1024, "the stated limit is read");

    let small = Bytes::from(pseudo_random(1000, 1));
    // Larger than the batch limit: ByteStream.Write in 1 MiB chunks.
    let large = Bytes::from(pseudo_random(5 * 1024 * 1024 + 17, 2));
    let (small_digest, large_digest) = (digest_of(&small), digest_of(&large));
    cas.upload(
        "",
        vec![
            (small_digest.clone(), UploadSource::Bytes(small.clone())),
            (large_digest.clone(), UploadSource::Bytes(large.clone())),
        ],
    )
    .await
    .expect("the upload succeeds");
    assert!(cas
        .find_missing("", vec![small_digest.clone(), large_digest.clone()])
        .await
        .unwrap()
        .is_empty());

    let read = cas
        .batch_read("", vec![small_digest.clone()])
        .await
        .unwrap();
    assert_eq!(read, vec![(small_digest, Some(small))]);

    let mut stream = cas
        .read_stream("", &large_digest)
        .await
        .unwrap()
        .expect("the large blob is there");
    let mut chunks = 0;
    let mut data = Vec::new();
    while let Some(response) = stream.next().await {
        data.extend_from_slice(&response.unwrap().data);
        chunks += 1;
    }
    assert!(data == large, "ByteStream.Read returns the blob");
    assert!(chunks > 1, "the read streams in chunks, not one message");

    let absent = digest_of(b"never uploaded");
    assert!(cas.read_stream("", &absent).await.unwrap().is_none());
}

#[tokio::test]
async fn the_services_own_request_size_limit_applies_in_process() {
    // The CAS states 1 MiB batches but decodes requests of 64 KiB at most:
    // a 200 KiB BatchUpdateBlobs is refused by the service, as it would be
    // over the network.
    let cas = CasClient::new(in_process(1024 * 1024, 64 * 1024), "")
        .await
        .unwrap();
    let blob = Bytes::from(pseudo_random(200 * 1024, 3));
    let error = cas
        .upload("", vec![(digest_of(&blob), UploadSource::Bytes(blob))])
        .await
        .expect_err("the request is over the service's decoding limit");
    match error {
        RunError::Cas { status, .. } => {
            assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}")
        }
        other => panic!("unexpected error {other:?}"),
    }
}
