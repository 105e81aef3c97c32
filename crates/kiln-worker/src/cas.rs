//! The executor's view of the CAS: a thin client that batches small blobs
//! (within the server's `max_batch_total_size_bytes`) and streams large ones
//! through ByteStream, so callers think in digests.
//!
//! The client runs over a [`GrpcTransport`]: either a tonic `Channel` to a
//! remote server ([`GrpcTransport::from_channel`]) or, for the executor
//! embedded in `kiln serve`, the server's own gRPC service objects called
//! in-process ([`GrpcTransport::from_service`]): the same request encoding,
//! message-size limits and streaming bodies, without HTTP/2 or a socket.

use std::path::Path;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{self, Digest};
use tokio::io::AsyncReadExt;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::Channel;
use tonic::Code;
use tower::util::BoxCloneSyncService;

use crate::error::{format_digest, RunError};

/// Largest gRPC message this client sends or accepts.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Per-blob framing allowance when packing a batch.
const BATCH_OVERHEAD_BYTES: u64 = 256;
/// Batch limit when the server does not state one.
const DEFAULT_MAX_BATCH_BYTES: u64 = 4 * 1024 * 1024 - 64 * 1024;
/// Chunk size of ByteStream writes.
const WRITE_CHUNK_BYTES: usize = 1024 * 1024;

/// The SHA-256 digest of `data` (the only digest function the worker uses),
/// hashed and converted where the server does it.
pub use kiln_cas::wire::digest_of;

/// A blob to upload: bytes in memory or a file on disk, or one the CAS
/// was found to hold already (an output a VM's guest hashed: its bytes
/// never crossed to the host, and the file at the path is a placeholder).
#[derive(Debug, Clone)]
pub enum UploadSource {
    Bytes(Bytes),
    File(std::path::PathBuf),
    Stored(std::path::PathBuf),
}

/// What the generated gRPC clients of [`CasClient`] are sent through: a
/// boxed `http::Request<Body> -> http::Response<Body>` service, cloned per
/// call like a `Channel`.
#[derive(Clone)]
pub struct GrpcTransport(Transport);

impl GrpcTransport {
    /// Over the network: a tonic channel to a (remote) server.
    pub fn from_channel(channel: Channel) -> GrpcTransport {
        GrpcTransport::from_service(channel)
    }

    /// In-process: any gRPC service stack, e.g. a `tonic::service::Routes`
    /// holding the server's own `ContentAddressableStorageServer`,
    /// `ByteStreamServer` and `CapabilitiesServer`. Requests and responses
    /// keep their streaming bodies, so large ByteStream reads and writes
    /// are not buffered whole.
    pub fn from_service<S>(service: S) -> GrpcTransport
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<tonic::codegen::StdError>,
        S::Future: Send + 'static,
    {
        GrpcTransport(BoxCloneSyncService::new(tower::ServiceExt::map_err(
            service,
            |error: S::Error| TransportError(error.into()),
        )))
    }
}

impl From<Channel> for GrpcTransport {
    fn from(channel: Channel) -> GrpcTransport {
        GrpcTransport::from_channel(channel)
    }
}

/// The transport's error: the service's own error, boxed. A named type
/// rather than a bare `Box<dyn Error>`: with the latter as the client's
/// error type, rustc cannot prove the worker's future `Send` for every
/// lifetime (the `tokio::spawn` in kiln-scheduler's `run_action` fails).
/// Display and `source` pass through, so tonic maps it to a `Status` (by
/// the `Status`, connect or hyper error in its source chain, else Unknown
/// with the same message) exactly as it does a `Channel`'s error.
#[derive(Debug)]
pub struct TransportError(tonic::codegen::StdError);

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

type Transport = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, TransportError>;

/// CAS and ByteStream clients on one transport, for one instance name.
#[derive(Clone)]
pub struct CasClient {
    transport: Transport,
    max_batch_bytes: u64,
}

impl CasClient {
    /// Connects the clients and learns the server's batch limit from
    /// `GetCapabilities`. `transport` is a `Channel` or a [`GrpcTransport`].
    pub async fn new(
        transport: impl Into<GrpcTransport>,
        instance_name: &str,
    ) -> Result<CasClient, RunError> {
        let transport = transport.into().0;
        let capabilities = CapabilitiesClient::new(transport.clone())
            .get_capabilities(reapi::GetCapabilitiesRequest {
                instance_name: instance_name.to_string(),
            })
            .await
            .map_err(|status| RunError::cas("GetCapabilities", status))?
            .into_inner();
        let stated = capabilities
            .cache_capabilities
            .map(|c| c.max_batch_total_size_bytes)
            .unwrap_or(0);
        let max_batch_bytes = if stated > 0 {
            stated as u64
        } else {
            DEFAULT_MAX_BATCH_BYTES
        };
        Ok(CasClient {
            transport,
            max_batch_bytes,
        })
    }

    /// The largest batch (sum of blob sizes plus framing) sent in one call.
    pub fn max_batch_bytes(&self) -> u64 {
        self.max_batch_bytes
    }

    /// Whether a blob of this size goes through a batch call.
    pub fn fits_batch(&self, size: i64) -> bool {
        (size as u64) + BATCH_OVERHEAD_BYTES <= self.max_batch_bytes
    }

    fn cas(&self) -> ContentAddressableStorageClient<Transport> {
        ContentAddressableStorageClient::new(self.transport.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn bytestream(&self) -> ByteStreamClient<Transport> {
        ByteStreamClient::new(self.transport.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Splits digests into batches that respect the server's limit.
    pub fn batches(&self, digests: Vec<Digest>) -> Vec<Vec<Digest>> {
        let mut batches = Vec::new();
        let mut current = Vec::new();
        let mut current_bytes = 0u64;
        for digest in digests {
            let cost = digest.size_bytes as u64 + BATCH_OVERHEAD_BYTES;
            if !current.is_empty() && current_bytes + cost > self.max_batch_bytes {
                batches.push(std::mem::take(&mut current));
                current_bytes = 0;
            }
            current_bytes += cost;
            current.push(digest);
        }
        if !current.is_empty() {
            batches.push(current);
        }
        batches
    }

    /// Reads one batch of small blobs. Returns `(digest, Some(bytes))` for
    /// found blobs and `(digest, None)` for blobs the CAS does not have.
    pub async fn batch_read(
        &self,
        instance_name: &str,
        digests: Vec<Digest>,
    ) -> Result<Vec<(Digest, Option<Bytes>)>, RunError> {
        if digests.is_empty() {
            return Ok(Vec::new());
        }
        let response = self
            .cas()
            .batch_read_blobs(reapi::BatchReadBlobsRequest {
                instance_name: instance_name.to_string(),
                digests,
                ..Default::default()
            })
            .await
            .map_err(|status| RunError::cas("BatchReadBlobs", status))?
            .into_inner();
        let mut blobs = Vec::with_capacity(response.responses.len());
        for entry in response.responses {
            let digest = entry.digest.unwrap_or_default();
            let code = entry.status.as_ref().map(|s| s.code).unwrap_or(0);
            if code == Code::NotFound as i32 {
                blobs.push((digest, None));
            } else if code != 0 {
                let message = entry.status.map(|s| s.message).unwrap_or_default();
                return Err(RunError::cas(
                    format!("BatchReadBlobs of {}", format_digest(&digest)),
                    tonic::Status::new(Code::from_i32(code), message),
                ));
            } else {
                let data = Bytes::from(entry.data);
                if digest_of(&data) != digest {
                    return Err(RunError::Internal(format!(
                        "BatchReadBlobs returned data that does not match {}",
                        format_digest(&digest)
                    )));
                }
                blobs.push((digest, Some(data)));
            }
        }
        Ok(blobs)
    }

    /// Opens a ByteStream read of one blob; `Ok(None)` if the CAS lacks it.
    pub async fn read_stream(
        &self,
        instance_name: &str,
        digest: &Digest,
    ) -> Result<Option<tonic::Streaming<kiln_proto::bytestream::ReadResponse>>, RunError> {
        let resource_name = resource_prefix(instance_name)
            + &format!("blobs/{}/{}", digest.hash, digest.size_bytes);
        match self
            .bytestream()
            .read(ReadRequest {
                resource_name,
                read_offset: 0,
                read_limit: 0,
            })
            .await
        {
            Ok(response) => Ok(Some(response.into_inner())),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(RunError::cas(
                format!("ByteStream.Read of {}", format_digest(digest)),
                status,
            )),
        }
    }

    /// Which of `digests` the CAS lacks.
    pub async fn find_missing(
        &self,
        instance_name: &str,
        digests: Vec<Digest>,
    ) -> Result<Vec<Digest>, RunError> {
        self.find_missing_as("", instance_name, digests).await
    }

    /// Which of `digests` the CAS lacks as organisation `org` sees it
    /// (`kiln_auth::FOR_ORG_HEADER`; empty: as this executor sees it).
    pub async fn find_missing_as(
        &self,
        org: &str,
        instance_name: &str,
        digests: Vec<Digest>,
    ) -> Result<Vec<Digest>, RunError> {
        let org = (!org.is_empty())
            .then(|| org.parse::<tonic::metadata::MetadataValue<_>>())
            .transpose()
            .map_err(|_| {
                RunError::Internal(format!("organisation {org:?} is not a header value"))
            })?;
        let mut missing = Vec::new();
        // FindMissingBlobs carries no payload; 10k digests keep it small.
        for chunk in digests.chunks(10_000) {
            let mut request = tonic::Request::new(reapi::FindMissingBlobsRequest {
                instance_name: instance_name.to_string(),
                blob_digests: chunk.to_vec(),
                ..Default::default()
            });
            if let Some(org) = &org {
                request
                    .metadata_mut()
                    .insert(kiln_auth::FOR_ORG_HEADER, org.clone());
            }
            let response = self
                .cas()
                .find_missing_blobs(request)
                .await
                .map_err(|status| RunError::cas("FindMissingBlobs", status))?
                .into_inner();
            missing.extend(response.missing_blob_digests);
        }
        Ok(missing)
    }

    /// Uploads blobs the CAS lacks: FindMissingBlobs first, then
    /// BatchUpdateBlobs for small ones and ByteStream.Write for large ones.
    pub async fn upload(
        &self,
        instance_name: &str,
        blobs: Vec<(Digest, UploadSource)>,
    ) -> Result<(), RunError> {
        let mut unique = std::collections::HashMap::new();
        for (digest, source) in blobs {
            if digest.size_bytes > 0 {
                unique.entry(digest).or_insert(source);
            }
        }
        let missing = self
            .find_missing(instance_name, unique.keys().cloned().collect())
            .await?;
        if let Some(gone) = missing
            .iter()
            .find(|digest| matches!(unique[*digest], UploadSource::Stored(_)))
        {
            return Err(stored_missing(gone));
        }
        let (small, large): (Vec<Digest>, Vec<Digest>) = missing
            .into_iter()
            .partition(|digest| self.fits_batch(digest.size_bytes));
        for batch in self.batches(small) {
            let mut requests = Vec::with_capacity(batch.len());
            for digest in batch {
                let data = match &unique[&digest] {
                    UploadSource::Bytes(bytes) => bytes.to_vec(),
                    UploadSource::File(path) => tokio::fs::read(path)
                        .await
                        .map_err(|e| RunError::io(format!("reading {}", path.display()), e))?,
                    UploadSource::Stored(_) => return Err(stored_missing(&digest)),
                };
                requests.push(reapi::batch_update_blobs_request::Request {
                    digest: Some(digest),
                    data,
                    compressor: 0,
                });
            }
            let response = self
                .cas()
                .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                    instance_name: instance_name.to_string(),
                    requests,
                    ..Default::default()
                })
                .await
                .map_err(|status| RunError::cas("BatchUpdateBlobs", status))?
                .into_inner();
            for entry in response.responses {
                let status = entry.status.unwrap_or_default();
                if status.code != 0 {
                    return Err(RunError::cas(
                        format!(
                            "BatchUpdateBlobs of {}",
                            format_digest(&entry.digest.unwrap_or_default())
                        ),
                        tonic::Status::new(Code::from_i32(status.code), status.message),
                    ));
                }
            }
        }
        for digest in large {
            self.write_one(instance_name, &digest, &unique[&digest])
                .await?;
        }
        Ok(())
    }

    async fn write_one(
        &self,
        instance_name: &str,
        digest: &Digest,
        source: &UploadSource,
    ) -> Result<(), RunError> {
        let resource_name = format!(
            "{}uploads/{}/blobs/{}/{}",
            resource_prefix(instance_name),
            uuid::Uuid::new_v4(),
            digest.hash,
            digest.size_bytes
        );
        let chunks: futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>> =
            match source {
                UploadSource::Bytes(bytes) => {
                    let bytes = bytes.clone();
                    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..bytes.len())
                        .step_by(WRITE_CHUNK_BYTES)
                        .map(|start| {
                            Ok(bytes.slice(start..(start + WRITE_CHUNK_BYTES).min(bytes.len())))
                        })
                        .collect();
                    futures::stream::iter(chunks).boxed()
                }
                UploadSource::File(path) => file_chunks(path).await?,
                UploadSource::Stored(_) => return Err(stored_missing(digest)),
            };
        let total = digest.size_bytes;
        let (error_tx, mut error_rx) = tokio::sync::mpsc::channel::<std::io::Error>(1);
        let requests = write_requests(chunks, resource_name, total, error_tx);
        let result = self.bytestream().write(requests).await;
        if let Ok(error) = error_rx.try_recv() {
            return Err(RunError::io(
                format!("reading the upload of {}", format_digest(digest)),
                error,
            ));
        }
        let committed = result
            .map_err(|status| {
                RunError::cas(
                    format!("ByteStream.Write of {}", format_digest(digest)),
                    status,
                )
            })?
            .into_inner()
            .committed_size;
        if committed != total {
            return Err(RunError::Internal(format!(
                "ByteStream.Write of {} committed {committed} bytes",
                format_digest(digest)
            )));
        }
        Ok(())
    }
}

/// A blob the CAS held when a VM's outputs were collected and lacks now:
/// evicted since, moments ago. Its bytes were only in the VM.
fn stored_missing(digest: &Digest) -> RunError {
    RunError::Internal(format!(
        "output {} was in the CAS when the VM's outputs were collected, and is not now",
        format_digest(digest)
    ))
}

/// The WriteRequests of one upload, as a concrete `'static` stream built
/// outside `write_one`. Why: handing tonic's client-streaming `write` a
/// boxed `dyn Stream` (or closures carrying `write_one`'s lifetimes) makes
/// its future not provably `Send` for every lifetime, so the worker's
/// future could not be given to `tokio::spawn`.
fn write_requests(
    chunks: futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>>,
    resource_name: String,
    total: i64,
    error_tx: tokio::sync::mpsc::Sender<std::io::Error>,
) -> impl Stream<Item = WriteRequest> + Send + 'static {
    let mut offset = 0i64;
    let mut first = true;
    chunks
        .take_while(move |chunk| {
            let ok = match chunk {
                Ok(_) => true,
                Err(e) => {
                    let _ = error_tx.try_send(std::io::Error::new(e.kind(), e.to_string()));
                    false
                }
            };
            futures::future::ready(ok)
        })
        .map(move |chunk| {
            let data = chunk.unwrap_or_default();
            let request = WriteRequest {
                resource_name: if first {
                    resource_name.clone()
                } else {
                    String::new()
                },
                write_offset: offset,
                finish_write: offset + data.len() as i64 == total,
                data: data.clone(),
            };
            first = false;
            offset += data.len() as i64;
            request
        })
}

/// A file read in chunks, so a large upload never sits whole in memory.
async fn file_chunks(
    path: &Path,
) -> Result<futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>>, RunError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| RunError::io(format!("opening {}", path.display()), e))?;
    Ok(futures::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buffer = vec![0u8; WRITE_CHUNK_BYTES];
        let mut filled = 0;
        while filled < buffer.len() {
            match file.read(&mut buffer[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => return Some((Err(e), None)),
            }
        }
        if filled == 0 {
            return None;
        }
        buffer.truncate(filled);
        Some((Ok(Bytes::from(buffer)), Some(file)))
    })
    .boxed())
}

fn resource_prefix(instance_name: &str) -> String {
    if instance_name.is_empty() {
        String::new()
    } else {
        format!("{instance_name}/")
    }
}
