//! BatchUpdateBlobs and BatchReadBlobs framed by hand over the raw HTTP/2
//! body (as [`crate::bytestream_http`] does for ByteStream), so a batch's
//! blob data is not copied between the socket buffer and the store.
//!
//! Through tonic, every blob of a BatchUpdateBlobs was copied twice before
//! it was hashed and written: once as tonic joined the received DATA frames
//! into its decode buffer, once as prost copied `data` into its own
//! `Vec<u8>`. Here the request is decoded straight from the frames, each
//! `data` a slice of the frame it arrived in (a blob split across two
//! frames is the one copied). A BatchReadBlobsResponse is sent as small
//! headers with each blob's data after its header as the store handed it
//! out, not copied into one encoded message. What the calls mean stays in
//! [`crate::cas`]; the other CAS calls, and calls declaring a
//! `grpc-encoding`, go to tonic's generated service unchanged.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use http_body::Frame;
use http_body_util::StreamBody;
use kiln_auth::Caller;
use kiln_proto::cas_batch::{self, batch_read_blobs_response};
use kiln_proto::reapi;
use kiln_proto::reapi::content_addressable_storage_server::{
    ContentAddressableStorageServer, SERVICE_NAME,
};
use prost::encoding::{self, WireType};
use prost::Message;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Code, Status};
use tower::Service;

use crate::bytestream_http::{
    decode_error, grpc_response, trailers, unary_response, MessageReader, COALESCE_BYTES,
    PREFIX_BYTES,
};
use crate::cas::CasService;

const BATCH_UPDATE_PATH: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs";
const BATCH_READ_PATH: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs";
/// `BatchReadBlobsResponse.responses`.
const RESPONSES_FIELD: u32 = 1;
/// `BatchReadBlobsResponse.Response`'s fields.
const DIGEST_FIELD: u32 = 1;
const DATA_FIELD: u32 = 2;
const STATUS_FIELD: u32 = 3;
const COMPRESSOR_FIELD: u32 = 4;

/// The CAS service as the gRPC router sees it: the two batch calls framed
/// here, everything else by tonic's generated server around the same
/// [`CasService`].
#[derive(Clone)]
pub struct CasHttp {
    service: Arc<CasService>,
    tonic: ContentAddressableStorageServer<CasService>,
    max_message_bytes: usize,
}

impl CasHttp {
    /// `max_message_bytes` bounds each received message, as tonic's
    /// `max_decoding_message_size` does (and is applied to tonic's too).
    pub fn new(service: CasService, max_message_bytes: usize) -> Self {
        let service = Arc::new(service);
        let tonic = ContentAddressableStorageServer::from_arc(service.clone())
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        CasHttp {
            service,
            tonic,
            max_message_bytes,
        }
    }
}

impl NamedService for CasHttp {
    const NAME: &'static str = SERVICE_NAME;
}

impl Service<http::Request<Body>> for CasHttp {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // Compressed messages are tonic's to accept or refuse.
        let identity = request
            .headers()
            .get("grpc-encoding")
            .is_none_or(|encoding| encoding == "identity");
        let path = request.uri().path();
        if !identity || (path != BATCH_UPDATE_PATH && path != BATCH_READ_PATH) {
            return self.tonic.call(request);
        }
        let update = path == BATCH_UPDATE_PATH;
        let service = self.service.clone();
        let org = Caller::org_in(request.extensions());
        let mut messages = MessageReader::new(request.into_body(), self.max_message_bytes);
        Box::pin(async move {
            let message = match messages.next().await {
                Ok(Some(message)) => message,
                Ok(None) => return Ok(Status::internal("Missing request message.").into_http()),
                Err(status) => return Ok(status.into_http()),
            };
            Ok(match update {
                true => match cas_batch::BatchUpdateBlobsRequest::decode(message) {
                    Ok(request) => match service.batch_update(request, &org).await {
                        Ok(response) => unary_response(&response),
                        Err(e) => Status::from(e).into_http(),
                    },
                    Err(e) => decode_error("BatchUpdateBlobsRequest", e).into_http(),
                },
                false => match reapi::BatchReadBlobsRequest::decode(message) {
                    Ok(request) => match service.batch_read(request, &org).await {
                        Ok(response) => batch_read_response(response),
                        Err(e) => Status::from(e).into_http(),
                    },
                    Err(e) => decode_error("BatchReadBlobsRequest", e).into_http(),
                },
            })
        })
    }
}

/// A BatchReadBlobsResponse as body frames: the message's fields encoded
/// by hand with each blob's `data` last in its entry, so a blob over
/// [`COALESCE_BYTES`] is sent as its own frame, as the store handed it out;
/// smaller ones are copied in with the headers around them.
fn batch_read_response(response: cas_batch::BatchReadBlobsResponse) -> http::Response<Body> {
    let len: usize = response
        .responses
        .iter()
        .map(|entry| encoding::message::encoded_len(RESPONSES_FIELD, entry))
        .sum();
    let mut frames: Vec<Bytes> = Vec::with_capacity(2 * response.responses.len() + 1);
    let mut head = BytesMut::with_capacity(PREFIX_BYTES + 1024);
    head.put_u8(0);
    head.put_u32(len as u32);
    for entry in response.responses {
        let fields_len = entry.encoded_len();
        let batch_read_blobs_response::Response {
            digest,
            data,
            compressor,
            status,
        } = entry;
        encoding::encode_key(RESPONSES_FIELD, WireType::LengthDelimited, &mut head);
        encoding::encode_varint(fields_len as u64, &mut head);
        if let Some(digest) = &digest {
            encoding::message::encode(DIGEST_FIELD, digest, &mut head);
        }
        if let Some(status) = &status {
            encoding::message::encode(STATUS_FIELD, status, &mut head);
        }
        if compressor != 0 {
            encoding::int32::encode(COMPRESSOR_FIELD, &compressor, &mut head);
        }
        if data.is_empty() {
            continue;
        }
        encoding::encode_key(DATA_FIELD, WireType::LengthDelimited, &mut head);
        encoding::encode_varint(data.len() as u64, &mut head);
        if data.len() <= COALESCE_BYTES {
            head.put_slice(&data);
        } else {
            frames.push(head.split().freeze());
            frames.push(data);
        }
    }
    if !head.is_empty() {
        frames.push(head.freeze());
    }
    let frames = frames
        .into_iter()
        .map(|data| Ok::<_, Infallible>(Frame::data(data)))
        .chain([Ok(Frame::trailers(trailers(&Status::new(Code::Ok, ""))))]);
    grpc_response(Body::new(StreamBody::new(futures::stream::iter(frames))))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use kiln_proto::reapi::{
        self, batch_update_blobs_request,
        content_addressable_storage_server::ContentAddressableStorage,
    };
    use kiln_store::{DigestFunction, MemoryStore};
    use prost::Message;
    use tonic::body::Body;
    use tonic::{Code, Status};
    use tower::Service;

    use super::{CasHttp, BATCH_READ_PATH, BATCH_UPDATE_PATH};
    use crate::wire::to_wire;
    use crate::{CasService, Storage, StorageLimits};

    const LIMIT: usize = 4 * 1024 * 1024;

    fn pattern(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| ((i + seed) * 31 % 251) as u8).collect()
    }

    fn wire_digest(data: &[u8]) -> reapi::Digest {
        to_wire(&DigestFunction::Sha256.digest_of(data))
    }

    /// A request whose body is `message`, framed, arriving in `frame`-byte
    /// DATA frames.
    fn request(path: &str, message: &impl Message, frame: usize) -> http::Request<Body> {
        let mut stream = vec![0];
        stream.extend_from_slice(&(message.encoded_len() as u32).to_be_bytes());
        stream.extend_from_slice(&message.encode_to_vec());
        let frames: Vec<Result<Frame<Bytes>, Status>> = stream
            .chunks(frame)
            .map(|part| Ok(Frame::data(Bytes::copy_from_slice(part))))
            .collect();
        http::Request::builder()
            .method("POST")
            .uri(format!("http://127.0.0.1{path}"))
            .header("content-type", "application/grpc")
            .body(Body::new(StreamBody::new(futures::stream::iter(frames))))
            .unwrap()
    }

    /// The one response message of a unary call, or its status.
    async fn call<M: Message + Default>(
        service: &mut CasHttp,
        request: http::Request<Body>,
    ) -> Result<M, Status> {
        let response = service.call(request).await.unwrap();
        assert_eq!(response.headers()["content-type"], "application/grpc");
        if let Some(status) = Status::from_header_map(response.headers()) {
            return Err(status);
        }
        let collected = response.into_body().collect().await.unwrap();
        let status = Status::from_header_map(collected.trailers().expect("trailers"))
            .expect("grpc-status in the trailers");
        assert_eq!(status.code(), Code::Ok, "{status:?}");
        let body = collected.to_bytes();
        assert_eq!(body[0], 0, "uncompressed");
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        assert_eq!(
            body.len(),
            5 + len,
            "one message, its prefix telling its length"
        );
        Ok(M::decode(body.slice(5..)).unwrap())
    }

    fn storage() -> Storage {
        Storage::new(
            Arc::new(MemoryStore::new(256 << 20)),
            StorageLimits::default(),
        )
    }

    /// Blobs of several sizes (one empty), one whose digest does not match
    /// its data, one zstd-compressed and one with an unknown compressor.
    fn update_request() -> (reapi::BatchUpdateBlobsRequest, Vec<Vec<u8>>) {
        let blobs: Vec<Vec<u8>> = [0, 100, 20_000, 70_000, 200_000]
            .iter()
            .enumerate()
            .map(|(seed, &len)| pattern(len, seed))
            .collect();
        let mut requests: Vec<_> = blobs
            .iter()
            .map(|data| batch_update_blobs_request::Request {
                digest: Some(wire_digest(data)),
                data: data.clone(),
                compressor: 0,
            })
            .collect();
        requests.push(batch_update_blobs_request::Request {
            digest: Some(wire_digest(b"what was promised")),
            data: b"something else".to_vec(),
            compressor: 0,
        });
        let compressed = pattern(30_000, 9);
        requests.push(batch_update_blobs_request::Request {
            digest: Some(wire_digest(&compressed)),
            data: zstd::encode_all(&compressed[..], 1).unwrap(),
            compressor: reapi::compressor::Value::Zstd as i32,
        });
        requests.push(batch_update_blobs_request::Request {
            digest: Some(wire_digest(b"odd")),
            data: b"odd".to_vec(),
            compressor: 77,
        });
        let mut all = blobs;
        all.push(compressed);
        let request = reapi::BatchUpdateBlobsRequest {
            instance_name: "main".into(),
            requests,
            ..Default::default()
        };
        (request, all)
    }

    #[tokio::test]
    async fn batch_update_answers_as_tonic_does_whatever_the_framing() {
        let (update, blobs) = update_request();
        // The answer through tonic's generated path, on a store of its own.
        let expected = CasService::new(storage())
            .batch_update_blobs(tonic::Request::new(update.clone()))
            .await
            .unwrap()
            .into_inner();
        let codes: Vec<i32> = expected
            .responses
            .iter()
            .map(|r| r.status.as_ref().unwrap().code)
            .collect();
        assert_eq!(codes, [0, 0, 0, 0, 0, 3, 0, 3], "{expected:?}");
        // Frames small enough that blobs straddle them (copied) and large
        // enough that every blob lies in one (sliced).
        for frame in [7_000, 1 << 20] {
            let storage = storage();
            let mut service = CasHttp::new(CasService::new(storage.clone()), LIMIT);
            let got: reapi::BatchUpdateBlobsResponse =
                call(&mut service, request(BATCH_UPDATE_PATH, &update, frame))
                    .await
                    .unwrap();
            assert_eq!(got, expected, "frames of {frame} bytes");
            for data in &blobs {
                let digest = DigestFunction::Sha256.digest_of(data);
                assert_eq!(
                    storage.read_small(&digest).await.unwrap(),
                    Bytes::copy_from_slice(data),
                    "blob {digest}, frames of {frame} bytes"
                );
            }
        }
    }

    #[tokio::test]
    async fn batch_read_answers_as_tonic_does() {
        let storage = storage();
        let mut service = CasHttp::new(CasService::new(storage.clone()), LIMIT);
        let (update, blobs) = update_request();
        call::<reapi::BatchUpdateBlobsResponse>(
            &mut service,
            request(BATCH_UPDATE_PATH, &update, 1 << 20),
        )
        .await
        .unwrap();
        let mut digests: Vec<reapi::Digest> = blobs.iter().map(|b| wire_digest(b)).collect();
        digests.push(wire_digest(b"never stored"));
        let read = reapi::BatchReadBlobsRequest {
            instance_name: "main".into(),
            digests,
            ..Default::default()
        };
        let expected = CasService::new(storage.clone())
            .batch_read_blobs(tonic::Request::new(read.clone()))
            .await
            .unwrap()
            .into_inner();
        let got: reapi::BatchReadBlobsResponse =
            call(&mut service, request(BATCH_READ_PATH, &read, 1 << 20))
                .await
                .unwrap();
        assert_eq!(got, expected);
        for (response, data) in got.responses.iter().zip(&blobs) {
            assert_eq!(&response.data, data);
            assert_eq!(response.status.as_ref().unwrap().code, 0);
        }
        let last = got.responses.last().unwrap();
        assert_eq!(last.status.as_ref().unwrap().code, Code::NotFound as i32);
        assert!(last.data.is_empty());
    }

    #[tokio::test]
    async fn a_malformed_or_missing_request_is_refused() {
        let mut service = CasHttp::new(CasService::new(storage()), LIMIT);
        // A `requests` entry whose length runs past the message's end.
        let mut stream = vec![0, 0, 0, 0, 3];
        stream.extend_from_slice(&[0x12, 0x7f, 0x0a]);
        let frames = vec![Ok::<_, Status>(Frame::data(Bytes::from(stream)))];
        let malformed = http::Request::builder()
            .method("POST")
            .uri(format!("http://127.0.0.1{BATCH_UPDATE_PATH}"))
            .header("content-type", "application/grpc")
            .body(Body::new(StreamBody::new(futures::stream::iter(frames))))
            .unwrap();
        let status = call::<reapi::BatchUpdateBlobsResponse>(&mut service, malformed)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert!(
            status.message().contains("BatchUpdateBlobsRequest"),
            "{status:?}"
        );
        let empty = http::Request::builder()
            .method("POST")
            .uri(format!("http://127.0.0.1{BATCH_READ_PATH}"))
            .header("content-type", "application/grpc")
            .body(Body::empty())
            .unwrap();
        let status = call::<reapi::BatchReadBlobsResponse>(&mut service, empty)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Internal, "{status:?}");
    }
}
