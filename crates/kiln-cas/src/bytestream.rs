//! The ByteStream service: streamed, resumable blob uploads and ranged
//! downloads, plain or zstd-compressed.
//!
//! Nothing is buffered whole: a large upload is hashed and written to the
//! store chunk by chunk on a blocking thread while the next chunks arrive,
//! and a large download is read ahead on a blocking thread into a small
//! bounded queue. An interrupted upload is parked so the client can ask
//! QueryWriteStatus and resume from the committed offset.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use kiln_auth::Caller;
use kiln_proto::bytestream::{
    byte_stream_server::ByteStream, QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest,
    ReadResponse, WriteRequest, WriteResponse,
};
use kiln_store::{Blob, BlobWriter, Digest, Hasher};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::counters::CasCounters;
use crate::error::{CasError, Result};
use crate::resource::{abbreviated, BlobResource, Compressor};
use crate::storage::Storage;

/// Uploads up to this size are handled on the receiving task; larger ones
/// get a blocking thread so hashing and disk writes overlap the network.
const INLINE_UPLOAD_BYTES: u64 = 1024 * 1024;
/// Chunks queued between the network and the hashing/writing thread.
const PIPELINE_DEPTH: usize = 8;
/// Interrupted uploads kept for resumption, and for how long.
const MAX_PARKED_UPLOADS: usize = 1024;
const PARKED_UPLOAD_TTL: Duration = Duration::from_secs(15 * 60);

/// One WriteRequest as the upload logic sees it. Its data may be in
/// several pieces: the zero-copy receive path
/// ([`crate::bytestream_http`]) hands over slices of the HTTP/2 frames the
/// message arrived in.
#[derive(Debug, Default)]
pub(crate) struct WriteChunk {
    pub resource_name: String,
    pub write_offset: i64,
    pub finish_write: bool,
    pub data: Vec<Bytes>,
}

impl WriteChunk {
    fn data_len(&self) -> usize {
        self.data.iter().map(Bytes::len).sum()
    }
}

impl From<WriteRequest> for WriteChunk {
    fn from(request: WriteRequest) -> Self {
        WriteChunk {
            resource_name: request.resource_name,
            write_offset: request.write_offset,
            finish_write: request.finish_write,
            data: vec![request.data],
        }
    }
}

/// Where an upload's WriteRequests come from: tonic's decoder, or the
/// zero-copy framing of [`crate::bytestream_http`].
pub(crate) trait WriteRequests: Send {
    /// The next request; `None` when the client closed its side.
    fn message(&mut self) -> impl Future<Output = Result<Option<WriteChunk>, Status>> + Send;
}

impl WriteRequests for Streaming<WriteRequest> {
    async fn message(&mut self) -> Result<Option<WriteChunk>, Status> {
        Ok(Streaming::message(self).await?.map(WriteChunk::from))
    }
}

pub struct ByteStreamService {
    storage: Storage,
    parked: Arc<Mutex<HashMap<String, Upload>>>,
    /// Uploads whose stream is being received now, by resource name, with
    /// the bytes each has committed, for QueryWriteStatus.
    receiving: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl ByteStreamService {
    pub fn new(storage: Storage) -> Self {
        ByteStreamService {
            storage,
            parked: Arc::default(),
            receiving: Mutex::default(),
        }
    }
}

/// An upload in progress: hashes and writes what arrives.
struct Upload {
    digest: Digest,
    compressor: Compressor,
    hasher: Option<Hasher>,
    writer: Box<dyn BlobWriter>,
    /// Uncompressed bytes written so far.
    committed: u64,
    /// `committed`, readable while the upload runs on another thread.
    progress: Arc<AtomicU64>,
    decoder: Option<zstd::stream::raw::Decoder<'static>>,
    last_active: Instant,
}

impl Upload {
    fn new(digest: Digest, compressor: Compressor, writer: Box<dyn BlobWriter>) -> Result<Self> {
        let mut upload = Upload {
            digest,
            compressor,
            hasher: Some(digest.function.hasher()),
            writer,
            committed: 0,
            progress: Arc::default(),
            decoder: None,
            last_active: Instant::now(),
        };
        upload.restart_frame()?;
        Ok(upload)
    }

    /// A resumed compressed upload starts a new zstd frame.
    fn restart_frame(&mut self) -> Result<()> {
        if self.compressor == Compressor::Zstd {
            self.decoder = Some(
                zstd::stream::raw::Decoder::new()
                    .map_err(|e| CasError::Internal(format!("starting a zstd decoder: {e}")))?,
            );
        }
        Ok(())
    }

    fn accept(&mut self, data: &[u8]) -> Result<()> {
        match self.decoder.as_mut() {
            None => self.accept_plain(data),
            Some(_) => {
                use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                let mut input = InBuffer::around(data);
                let mut scratch = vec![0u8; 128 * 1024];
                while input.pos() < data.len() {
                    let mut output = OutBuffer::around(&mut scratch[..]);
                    let decoder = self.decoder.as_mut().expect("checked above");
                    decoder.run(&mut input, &mut output).map_err(|e| {
                        CasError::InvalidArgument(format!(
                            "blob {}: invalid zstd data: {e}",
                            self.digest
                        ))
                    })?;
                    let produced = output.pos();
                    if produced == 0 && input.pos() < data.len() {
                        continue;
                    }
                    self.accept_plain(&scratch[..produced])?;
                }
                Ok(())
            }
        }
    }

    fn accept_plain(&mut self, data: &[u8]) -> Result<()> {
        if self.committed + data.len() as u64 > self.digest.size {
            return Err(CasError::InvalidArgument(format!(
                "blob {}: received more than its {} bytes",
                self.digest, self.digest.size
            )));
        }
        self.hasher
            .as_mut()
            .expect("hasher lives until finish")
            .update(data);
        self.writer
            .write(data)
            .map_err(|e| CasError::store(format_args!("writing blob {}", self.digest), e))?;
        self.committed += data.len() as u64;
        self.progress.store(self.committed, Ordering::Relaxed);
        Ok(())
    }

    /// Verifies the digest and makes the blob visible.
    fn finish(mut self) -> Result<()> {
        if let Some(mut decoder) = self.decoder.take() {
            use zstd::stream::raw::{Operation, OutBuffer};
            let mut scratch = vec![0u8; 128 * 1024];
            loop {
                let mut output = OutBuffer::around(&mut scratch[..]);
                let remaining = decoder.flush(&mut output).map_err(|e| {
                    CasError::InvalidArgument(format!(
                        "blob {}: invalid zstd data: {e}",
                        self.digest
                    ))
                })?;
                let produced = output.pos();
                if produced > 0 {
                    let chunk = scratch[..produced].to_vec();
                    self.accept_plain(&chunk)?;
                }
                if remaining == 0 || produced == 0 {
                    break;
                }
            }
        }
        if self.committed != self.digest.size {
            return Err(CasError::InvalidArgument(format!(
                "blob {}: upload finished after {} of {} bytes",
                self.digest, self.committed, self.digest.size
            )));
        }
        let actual = self
            .hasher
            .take()
            .expect("finish runs once")
            .finish(self.committed);
        if actual != self.digest {
            return Err(CasError::InvalidArgument(format!(
                "blob {}: content does not match its digest (got {actual}); nothing was stored",
                self.digest
            )));
        }
        let digest = self.digest;
        self.writer
            .commit()
            .map_err(|e| CasError::store(format_args!("storing blob {digest}"), e))
    }
}

/// An upload's entry in [`ByteStreamService::receiving`], removed when its
/// stream is done with (by then it is parked, stored or dropped).
struct Receiving<'a> {
    receiving: &'a Mutex<HashMap<String, Arc<AtomicU64>>>,
    name: String,
    progress: Arc<AtomicU64>,
}

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        let mut receiving = self.receiving.lock();
        // A later stream under the same name may have taken the entry over.
        if receiving
            .get(&self.name)
            .is_some_and(|progress| Arc::ptr_eq(progress, &self.progress))
        {
            receiving.remove(&self.name);
        }
    }
}

/// What the receiving loop did with a stream of WriteRequests.
enum Received {
    Finished,
    /// The stream ended or failed before `finish_write`.
    Interrupted(Status),
}

impl ByteStreamService {
    /// How long a Write may go without data from its client.
    pub(crate) fn idle_timeout(&self) -> Option<std::time::Duration> {
        self.storage.limits.idle_timeout
    }

    fn park(&self, resource_name: String, mut upload: Upload) {
        upload.last_active = Instant::now();
        let mut parked = self.parked.lock();
        parked.retain(|_, u| u.last_active.elapsed() < PARKED_UPLOAD_TTL);
        if parked.len() >= MAX_PARKED_UPLOADS {
            if let Some(oldest) = parked
                .iter()
                .min_by_key(|(_, u)| u.last_active)
                .map(|(k, _)| k.clone())
            {
                parked.remove(&oldest);
            }
        }
        parked.insert(resource_name, upload);
    }

    /// Makes `upload` visible to QueryWriteStatus under `name` while the
    /// returned guard lives.
    fn receiving(&self, name: &str, upload: &Upload) -> Receiving<'_> {
        let progress = upload.progress.clone();
        self.receiving
            .lock()
            .insert(name.to_string(), progress.clone());
        Receiving {
            receiving: &self.receiving,
            name: name.to_string(),
            progress,
        }
    }

    /// The upload to continue: a parked one at `write_offset`, or a new one.
    async fn resume_or_start(
        &self,
        resource: &BlobResource,
        name: &str,
        write_offset: i64,
    ) -> Result<Upload> {
        if let Some(mut upload) = self.parked.lock().remove(name) {
            if write_offset as u64 == upload.committed {
                upload.restart_frame()?;
                return Ok(upload);
            }
            if write_offset != 0 {
                let committed = upload.committed;
                self.parked.lock().insert(name.to_string(), upload);
                return Err(CasError::InvalidArgument(format!(
                    "{name}: write_offset {write_offset} does not match the {committed} bytes committed"
                )));
            }
        } else if write_offset != 0 {
            return Err(CasError::InvalidArgument(format!(
                "{name}: write_offset {write_offset} but no upload is in progress; start at 0"
            )));
        }
        let digest = resource.digest;
        let writer = self
            .storage
            .store
            .writer(digest.key(), digest.size)
            .await
            .map_err(|e| CasError::store(format_args!("starting upload of blob {digest}"), e))?;
        Upload::new(digest, resource.compressor, writer)
    }

    /// Receives one upload: checks, hashes and stores what `stream` brings,
    /// and makes the blob visible only once its digest is verified.
    /// The blob becomes visible to organisation `org` (see
    /// [`Storage::admit`]) once its bytes are verified; a blob it can see
    /// already ends the upload at once.
    pub(crate) async fn write(
        &self,
        mut stream: impl WriteRequests,
        org: &str,
    ) -> Result<WriteResponse, Status> {
        let first = stream
            .message()
            .await?
            .ok_or_else(|| CasError::InvalidArgument("Write stream carried no request".into()))?;
        let name = first.resource_name.clone();
        let resource = BlobResource::parse_write(&name).map_err(CasError::from)?;
        let digest = resource.digest;
        let complete_response = WriteResponse {
            committed_size: match resource.compressor {
                Compressor::Identity => digest.size as i64,
                Compressor::Zstd => -1,
            },
        };
        if self.storage.visible_to(org, &digest).await? {
            return Ok(complete_response);
        }
        if first.write_offset < 0 {
            return Err(CasError::InvalidArgument(format!(
                "{name}: write_offset {} is negative",
                first.write_offset
            ))
            .into());
        }
        let upload = self
            .resume_or_start(&resource, &name, first.write_offset)
            .await?;
        let _receiving = self.receiving(&name, &upload);
        let (upload, received, outcome) = if digest.size <= INLINE_UPLOAD_BYTES {
            receive_inline(upload, first, &mut stream).await
        } else {
            receive_pipelined(upload, first, &mut stream).await
        };
        match (received, outcome) {
            (_, Err(e)) => Err(e.into()), // bad data: the upload is dropped, nothing stored
            (Received::Interrupted(status), Ok(())) => {
                tracing::debug!(resource = %name, committed = upload.committed, "upload interrupted; parked for resumption");
                self.park(name, upload);
                Err(status)
            }
            (Received::Finished, Ok(())) => {
                let finished = if digest.size <= INLINE_UPLOAD_BYTES {
                    upload.finish()
                } else {
                    tokio::task::spawn_blocking(move || upload.finish())
                        .await
                        .map_err(|e| CasError::Internal(format!("finishing blob {digest}: {e}")))?
                };
                finished?;
                self.storage.counters.written(digest.size);
                self.storage.admit(org, &[digest]).await?;
                Ok(complete_response)
            }
        }
    }
}

/// The WriteRequests of one upload, checked as they arrive: each offset
/// must be the first request's offset plus the payload bytes seen since
/// (compressed bytes, for compressed uploads), and a later request may
/// leave `resource_name` empty or repeat it, never change it.
struct Requests<'a, S> {
    stream: &'a mut S,
    first: Option<WriteChunk>,
    resource_name: String,
    expected: i64,
    digest: Digest,
}

/// What the next request of an upload brought.
enum Next {
    Data {
        data: Vec<Bytes>,
        finish: bool,
    },
    /// The stream ended or failed before `finish_write`.
    Interrupted(Status),
    /// A request that breaks the protocol; the upload is abandoned.
    Invalid(CasError),
}

impl<'a, S: WriteRequests> Requests<'a, S> {
    fn new(stream: &'a mut S, first: WriteChunk, digest: Digest) -> Self {
        Requests {
            stream,
            resource_name: first.resource_name.clone(),
            expected: first.write_offset,
            first: Some(first),
            digest,
        }
    }

    async fn next(&mut self) -> Next {
        let request = match self.first.take() {
            Some(request) => request,
            None => match self.stream.message().await {
                Ok(Some(request)) => request,
                Ok(None) => {
                    return Next::Interrupted(Status::invalid_argument(format!(
                        "blob {}: stream ended without finish_write",
                        self.digest
                    )))
                }
                Err(status) => return Next::Interrupted(status),
            },
        };
        if !request.resource_name.is_empty() && request.resource_name != self.resource_name {
            return Next::Invalid(CasError::InvalidArgument(format!(
                "blob {}: a WriteRequest names {:?} in a stream that began with {:?}; one Write stream uploads one resource",
                self.digest,
                abbreviated(&request.resource_name),
                abbreviated(&self.resource_name)
            )));
        }
        if request.write_offset != self.expected {
            return Next::Invalid(CasError::InvalidArgument(format!(
                "blob {}: write_offset {} where {} was expected",
                self.digest, request.write_offset, self.expected
            )));
        }
        self.expected += request.data_len() as i64;
        Next::Data {
            data: request.data,
            finish: request.finish_write,
        }
    }
}

async fn receive_inline(
    mut upload: Upload,
    first: WriteChunk,
    stream: &mut impl WriteRequests,
) -> (Upload, Received, Result<()>) {
    let mut requests = Requests::new(stream, first, upload.digest);
    loop {
        match requests.next().await {
            Next::Data { data, finish } => {
                if let Err(e) = data.iter().try_for_each(|piece| upload.accept(piece)) {
                    return (upload, Received::Finished, Err(e));
                }
                if finish {
                    return (upload, Received::Finished, Ok(()));
                }
            }
            Next::Interrupted(status) => return (upload, Received::Interrupted(status), Ok(())),
            Next::Invalid(e) => return (upload, Received::Finished, Err(e)),
        }
    }
}

async fn receive_pipelined(
    upload: Upload,
    first: WriteChunk,
    stream: &mut impl WriteRequests,
) -> (Upload, Received, Result<()>) {
    let mut requests = Requests::new(stream, first, upload.digest);
    let (sender, mut receiver) = mpsc::channel::<Vec<Bytes>>(PIPELINE_DEPTH);
    let worker = tokio::task::spawn_blocking(move || {
        let mut upload = upload;
        while let Some(chunk) = receiver.blocking_recv() {
            if let Err(e) = chunk.iter().try_for_each(|piece| upload.accept(piece)) {
                return (upload, Err(e));
            }
        }
        (upload, Ok(()))
    });
    let received = loop {
        match requests.next().await {
            Next::Data { data, finish } => {
                if data.iter().any(|piece| !piece.is_empty()) && sender.send(data).await.is_err() {
                    break Received::Finished; // the worker failed; its error is reported below
                }
                if finish {
                    break Received::Finished;
                }
            }
            Next::Interrupted(status) => break Received::Interrupted(status),
            Next::Invalid(e) => {
                drop(sender);
                let (upload, _) = join(worker).await;
                return (upload, Received::Finished, Err(e));
            }
        }
    };
    drop(sender);
    let (upload, outcome) = join(worker).await;
    (upload, received, outcome)
}

async fn join(worker: tokio::task::JoinHandle<(Upload, Result<()>)>) -> (Upload, Result<()>) {
    match worker.await {
        Ok(result) => result,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

pub(crate) type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

impl ByteStreamService {
    /// Opens a (ranged, possibly compressed) download: the responses to
    /// stream, or why there are none.
    /// A blob organisation `org` may not see is NOT_FOUND, as an absent
    /// one is.
    pub(crate) async fn read(&self, request: ReadRequest, org: &str) -> Result<ReadStream> {
        let resource = BlobResource::parse_read(&request.resource_name)?;
        let digest = resource.digest;
        // bytestream.proto: an offset outside the resource is OUT_OF_RANGE.
        if request.read_offset < 0 || request.read_offset as u64 > digest.size {
            return Err(CasError::OutOfRange(format!(
                "blob {digest}: read_offset {} is outside the blob's {} bytes",
                request.read_offset, digest.size
            )));
        }
        if request.read_limit < 0 {
            return Err(CasError::InvalidArgument(format!(
                "blob {digest}: read_limit {} is negative",
                request.read_limit
            )));
        }
        if resource.compressor != Compressor::Identity && request.read_limit != 0 {
            return Err(CasError::InvalidArgument(format!(
                "blob {digest}: read_limit must be 0 for compressed reads"
            )));
        }
        let hidden = !org.is_empty() && !self.storage.visible_to(org, &digest).await?;
        let blob = match hidden {
            true => None,
            false => self.storage.open(&digest).await?,
        }
        .ok_or_else(|| CasError::NotFound(format!("blob {digest} is not in the CAS")))?;
        let offset = request.read_offset as u64;
        let len = match request.read_limit {
            0 => digest.size - offset,
            limit => (limit as u64).min(digest.size - offset),
        };
        let chunk = self.storage.limits.read_chunk_bytes as u64;
        let in_memory = matches!(blob, Blob::Memory(_) | Blob::Pieces(_));
        if resource.compressor == Compressor::Identity && len <= chunk {
            // Small: answered at once, no hop.
            let mut responses = Vec::with_capacity(2);
            for range in message_ranges(&blob, offset, len, chunk) {
                let data = blob
                    .read_range(range.0, range.1)
                    .map_err(|e| CasError::Internal(format!("reading blob {digest}: {e}")))?;
                responses.push(Ok(ReadResponse { data }));
            }
            let sent: u64 = responses
                .iter()
                .map(|r| r.as_ref().map_or(0, |r| r.data.len() as u64))
                .sum();
            CasCounters::add(&self.storage.counters.bytes_read, sent);
            return Ok(Box::pin(futures::stream::iter(responses)));
        }
        let (sender, receiver) = mpsc::channel(4);
        let sender = ChunkSender {
            sender,
            idle: self.storage.limits.idle_timeout,
            runtime: tokio::runtime::Handle::current(),
            stalled: Arc::default(),
        };
        let stalled = sender.stalled.clone();
        let compressor = resource.compressor;
        if compressor == Compressor::Identity && in_memory {
            // In memory: each message a slice of it, queued by a task under
            // the same idle bound as a disk read, so a client that stops
            // reading does not hold the memory (a recent blob's pieces).
            tokio::spawn(async move {
                for (at, this) in message_ranges(&blob, offset, len, chunk) {
                    let Ok(data) = blob.read_range(at, this) else {
                        return; // in memory: never fails
                    };
                    if !sender.send_async(Ok(ReadResponse { data })).await {
                        return;
                    }
                }
            });
        } else {
            tokio::task::spawn_blocking(move || {
                let result = match compressor {
                    Compressor::Identity => stream_plain(&blob, offset, len, chunk, &sender),
                    Compressor::Zstd => stream_zstd(&blob, offset, len, chunk, &sender),
                };
                if let Err(e) = result {
                    sender.send(Err(Status::internal(format!("reading blob {digest}: {e}"))));
                }
            });
        }
        // A read given up on because its client stopped reading ends with
        // an error after what was queued, never as a complete blob.
        let idle = self.storage.limits.idle_timeout.unwrap_or_default();
        let ended = futures::stream::once(async move {
            stalled.load(Ordering::Relaxed).then(|| {
                Err(Status::deadline_exceeded(format!(
                    "blob {digest}: the client read nothing for {idle:?} (bytestream_idle_timeout_ms)"
                )))
            })
        })
        .filter_map(std::future::ready);
        let counters = self.storage.counters.clone();
        let counted = ReceiverStream::new(receiver).inspect(move |message| {
            if let Ok(response) = message {
                CasCounters::add(&counters.bytes_read, response.data.len() as u64);
            }
        });
        Ok(Box::pin(counted.chain(ended)))
    }
}

/// Where a download's reading thread puts its messages. A client that
/// stops reading does not hold the thread for longer than the idle
/// timeout: the read is given up (`stalled`) and the thread freed.
struct ChunkSender {
    sender: mpsc::Sender<Result<ReadResponse, Status>>,
    idle: Option<std::time::Duration>,
    runtime: tokio::runtime::Handle,
    stalled: Arc<AtomicBool>,
}

impl ChunkSender {
    /// Queues `message`; false when the client went away or stopped
    /// reading for the idle timeout. Blocking.
    fn send(&self, message: Result<ReadResponse, Status>) -> bool {
        let message = match self.sender.try_send(message) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(message)) => message,
        };
        self.runtime.block_on(self.send_async(message))
    }

    /// [`ChunkSender::send`] from a task.
    async fn send_async(&self, message: Result<ReadResponse, Status>) -> bool {
        let Some(idle) = self.idle else {
            return self.sender.send(message).await.is_ok();
        };
        match tokio::time::timeout(idle, self.sender.send(message)).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                self.stalled.store(true, Ordering::Relaxed);
                false
            }
        }
    }
}

/// The (offset, length) of each message of a small or in-memory read:
/// at most `chunk` long, and none straddling two of a blob's pieces, so
/// each is a slice of memory. An empty read is one empty message.
fn message_ranges(
    blob: &Blob,
    offset: u64,
    len: u64,
    chunk: u64,
) -> impl Iterator<Item = (u64, u64)> + Send + 'static {
    let blob = blob.clone();
    let end = offset + len;
    let mut at = Some(offset);
    std::iter::from_fn(move || {
        let from = at?;
        let this = chunk.min(end - from).min(blob.contiguous_len(from).max(1));
        at = (from + this < end).then_some(from + this);
        Some((from, this))
    })
}

/// Disk reads are this many message chunks at a time: fewer, larger reads
/// keep the disk streaming, and the messages are zero-copy slices.
const CHUNKS_PER_READ: u64 = 4;

fn stream_plain(
    blob: &Blob,
    offset: u64,
    len: u64,
    chunk: u64,
    sender: &ChunkSender,
) -> std::io::Result<()> {
    let mut at = offset;
    while at < offset + len {
        let this = (chunk * CHUNKS_PER_READ).min(offset + len - at);
        let data = blob.read_range(at, this)?;
        at += this;
        let mut sent = 0;
        while sent < data.len() {
            let piece = data.slice(sent..(sent + chunk as usize).min(data.len()));
            sent += piece.len();
            if !sender.send(Ok(ReadResponse { data: piece })) {
                return Ok(()); // the client went away or stopped reading
            }
        }
    }
    Ok(())
}

fn stream_zstd(
    blob: &Blob,
    offset: u64,
    len: u64,
    chunk: u64,
    sender: &ChunkSender,
) -> std::io::Result<()> {
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1)?;
    let mut at = offset;
    let send = |data: Vec<u8>| {
        sender.send(Ok(ReadResponse {
            data: Bytes::from(data),
        }))
    };
    while at < offset + len {
        let this = chunk.min(offset + len - at);
        std::io::Write::write_all(&mut encoder, &blob.read_range(at, this)?)?;
        at += this;
        let produced = std::mem::take(encoder.get_mut());
        if !produced.is_empty() && !send(produced) {
            return Ok(());
        }
    }
    let tail = encoder.finish()?;
    send(tail);
    Ok(())
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let org = Caller::org_of(&request);
        Ok(Response::new(
            ByteStreamService::read(self, request.into_inner(), &org).await?,
        ))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let org = Caller::org_of(&request);
        Ok(Response::new(
            ByteStreamService::write(self, request.into_inner(), &org).await?,
        ))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let org = Caller::org_of(&request);
        let name = request.into_inner().resource_name;
        let resource = BlobResource::parse_write(&name).map_err(CasError::from)?;
        let in_progress = match self.parked.lock().get(&name) {
            Some(upload) => Some(upload.committed),
            None => self
                .receiving
                .lock()
                .get(&name)
                .map(|progress| progress.load(Ordering::Relaxed)),
        };
        if let Some(committed) = in_progress {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: committed as i64,
                complete: false,
            }));
        }
        let digest = resource.digest;
        if !self.storage.visible_to(&org, &digest).await? {
            // bytestream.proto: a resource whose first Write has not reached
            // the service is NOT_FOUND.
            return Err(CasError::NotFound(format!(
                "{name}: no upload of blob {digest} is in progress under this name, and the blob is not in the CAS"
            ))
            .into());
        }
        Ok(Response::new(QueryWriteStatusResponse {
            committed_size: digest.size as i64,
            complete: true,
        }))
    }
}
