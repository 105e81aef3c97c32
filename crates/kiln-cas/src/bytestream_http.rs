//! ByteStream Write and Read framed by hand over the raw HTTP/2 body, so a
//! blob's bytes are never copied between the socket buffer and the store.
//!
//! tonic copies every received DATA frame into its decode buffer and
//! encodes every sent message into its encode buffer; for a 1 GiB blob that
//! is a full extra pass over the data each way. This module owns only the
//! gRPC framing of those two calls: the 5-byte message prefix, the fields of
//! `WriteRequest` (its `data` handed on as slices of the received frames),
//! `ReadResponse` as a small header followed by the file data itself, and
//! the status trailers. What the calls mean stays in [`crate::bytestream`].
//! QueryWriteStatus and calls declaring a `grpc-encoding` go to tonic's
//! generated service unchanged. [`crate::cas_http`] reuses the framing for
//! the CAS batch calls. The same framing is offered to clients
//! ([`write_request_head`], [`MessageReader`], [`read_response_data`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use http::header::CONTENT_TYPE;
use http::HeaderMap;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use kiln_auth::Caller;
use kiln_proto::bytestream::byte_stream_server::{ByteStreamServer, SERVICE_NAME};
use kiln_proto::bytestream::ReadRequest;
use prost::encoding::{self, DecodeContext, WireType};
use prost::Message;
use tonic::body::Body;
use tonic::metadata::GRPC_CONTENT_TYPE;
use tonic::server::NamedService;
use tonic::{Code, Status};
use tower::Service;

use crate::bytestream::{ByteStreamService, ReadStream, WriteChunk, WriteRequests};

const WRITE_PATH: &str = "/google.bytestream.ByteStream/Write";
const READ_PATH: &str = "/google.bytestream.ByteStream/Read";
/// gRPC's message prefix: a compressed flag and a big-endian length.
pub(crate) const PREFIX_BYTES: usize = 5;
/// `WriteRequest.data` and `ReadResponse.data`.
const DATA_FIELD: u32 = 10;
/// Read payloads up to this size are copied in with their header and sent
/// as one DATA frame; larger ones are sent as they are, without a copy.
pub(crate) const COALESCE_BYTES: usize = 16 * 1024;

/// The ByteStream service as the gRPC router sees it: Write and Read framed
/// here, everything else by tonic's generated server around the same
/// [`ByteStreamService`].
#[derive(Clone)]
pub struct ByteStreamHttp {
    service: Arc<ByteStreamService>,
    tonic: ByteStreamServer<ByteStreamService>,
    max_message_bytes: usize,
}

impl ByteStreamHttp {
    /// `max_message_bytes` bounds each received message, as tonic's
    /// `max_decoding_message_size` does (and is applied to tonic's too).
    pub fn new(service: ByteStreamService, max_message_bytes: usize) -> Self {
        let service = Arc::new(service);
        let tonic = ByteStreamServer::from_arc(service.clone())
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        ByteStreamHttp {
            service,
            tonic,
            max_message_bytes,
        }
    }
}

impl NamedService for ByteStreamHttp {
    const NAME: &'static str = SERVICE_NAME;
}

impl Service<http::Request<Body>> for ByteStreamHttp {
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
        let service = self.service.clone();
        let max_message_bytes = self.max_message_bytes;
        let idle = service.idle_timeout();
        let messages = |request: http::Request<Body>| {
            MessageReader::new(request.into_body(), max_message_bytes).with_idle_timeout(idle)
        };
        match request.uri().path() {
            WRITE_PATH if identity => {
                let org = Caller::org_in(request.extensions());
                let messages = messages(request);
                Box::pin(async move { Ok(write(&service, messages, &org).await) })
            }
            READ_PATH if identity => {
                let org = Caller::org_in(request.extensions());
                let messages = messages(request);
                Box::pin(async move { Ok(read(&service, messages, &org).await) })
            }
            _ => self.tonic.call(request),
        }
    }
}

async fn write(
    service: &ByteStreamService,
    messages: MessageReader,
    org: &str,
) -> http::Response<Body> {
    match service.write(FramedWriteRequests(messages), org).await {
        Ok(response) => unary_response(&response),
        Err(status) => status.into_http(),
    }
}

async fn read(
    service: &ByteStreamService,
    mut messages: MessageReader,
    org: &str,
) -> http::Response<Body> {
    let request = match messages.next().await {
        Ok(Some(message)) => match ReadRequest::decode(message) {
            Ok(request) => request,
            Err(e) => return decode_error("ReadRequest", e).into_http(),
        },
        Ok(None) => return Status::internal("Missing request message.").into_http(),
        Err(status) => return status.into_http(),
    };
    match service.read(request, org).await {
        Ok(responses) => grpc_response(Body::new(ReadBody {
            responses,
            pending: None,
            finished: false,
        })),
        Err(e) => Status::from(e).into_http(),
    }
}

/// A `200` carrying gRPC messages; the status follows in the trailers.
pub(crate) fn grpc_response(body: Body) -> http::Response<Body> {
    let mut response = http::Response::new(body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, GRPC_CONTENT_TYPE);
    response
}

/// One message, then `grpc-status: 0`.
pub(crate) fn unary_response(message: &impl Message) -> http::Response<Body> {
    let frames: [Result<Frame<Bytes>, Infallible>; 2] = [
        Ok(Frame::data(framed_message(message))),
        Ok(Frame::trailers(trailers(&Status::new(Code::Ok, "")))),
    ];
    grpc_response(Body::new(StreamBody::new(futures::stream::iter(frames))))
}

/// `grpc-status`, `grpc-message` (percent-encoded) and any details, as
/// tonic writes them.
pub(crate) fn trailers(status: &Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    if let Err(unencodable) = status.add_header(&mut trailers) {
        trailers.clear();
        unencodable
            .add_header(&mut trailers)
            .unwrap_or_else(|_| tracing::error!("a status could not be written as trailers"));
    }
    trailers
}

pub(crate) fn decode_error(message: &str, error: prost::DecodeError) -> Status {
    // Malformed protobuf is INTERNAL, as tonic reports it.
    Status::internal(format!("decoding a {message}: {error}"))
}

/// A body as gRPC messages, each handed out as the slices of the DATA
/// frames it arrived in (a message may span frames, and a frame may hold
/// several messages). Used for requests here, and by clients for responses.
pub struct MessageReader {
    body: Body,
    buffered: Pieces,
    max_message_bytes: usize,
    ended: bool,
    trailers: Option<HeaderMap>,
    /// Longest wait for the next frame; None: unbounded.
    idle_timeout: Option<std::time::Duration>,
}

impl MessageReader {
    /// Messages over `max_message_bytes` are refused before they are
    /// buffered.
    pub fn new(body: Body, max_message_bytes: usize) -> Self {
        MessageReader {
            body,
            buffered: Pieces::default(),
            max_message_bytes,
            ended: false,
            trailers: None,
            idle_timeout: None,
        }
    }

    /// Ends the stream with DEADLINE_EXCEEDED when the peer sends nothing
    /// for `idle` (None: waits for ever).
    pub fn with_idle_timeout(mut self, idle: Option<std::time::Duration>) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// The status in the trailers, once [`MessageReader::next`] has
    /// returned `None` (a response's status, for a client).
    pub fn trailers_status(&self) -> Status {
        self.trailers
            .as_ref()
            .and_then(Status::from_header_map)
            .unwrap_or_else(|| Status::internal("the response ended without a grpc-status"))
    }

    /// The next whole message; `None` once the peer has closed its side
    /// after a whole message.
    pub async fn next(&mut self) -> Result<Option<Pieces>, Status> {
        loop {
            if let Some(message) = self.split_message()? {
                return Ok(Some(message));
            }
            if self.ended {
                return if self.buffered.has_remaining() {
                    Err(Status::internal("Unexpected EOF decoding stream."))
                } else {
                    Ok(None)
                };
            }
            let frame = match self.idle_timeout {
                None => self.body.frame().await,
                Some(idle) => match tokio::time::timeout(idle, self.body.frame()).await {
                    Ok(frame) => frame,
                    Err(_) => {
                        return Err(Status::deadline_exceeded(format!(
                            "the client sent nothing for {idle:?} (bytestream_idle_timeout_ms)"
                        )))
                    }
                },
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.buffered.push(data),
                    Err(frame) => self.trailers = frame.into_trailers().ok(),
                },
                Some(Err(status)) => return Err(status),
                None => self.ended = true,
            }
        }
    }

    fn split_message(&mut self) -> Result<Option<Pieces>, Status> {
        let mut prefix = [0u8; PREFIX_BYTES];
        if !self.buffered.peek(&mut prefix) {
            return Ok(None);
        }
        match prefix[0] {
            0 => {}
            // Only reached without a grpc-encoding header; tonic's wording.
            1 => {
                return Err(Status::internal(
                    "protocol error: received message with compressed-flag but no grpc-encoding was specified",
                ))
            }
            flag => {
                return Err(Status::internal(format!(
                    "protocol error: received message with invalid compression flag: {flag} (valid flags are 0 and 1), while sending request"
                )))
            }
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > self.max_message_bytes {
            return Err(Status::resource_exhausted(format!(
                "a message of {len} bytes is over the server's limit of {} bytes",
                self.max_message_bytes
            )));
        }
        if self.buffered.remaining() < PREFIX_BYTES + len {
            return Ok(None);
        }
        self.buffered.advance(PREFIX_BYTES);
        Ok(Some(self.buffered.split_to(len)))
    }
}

/// A Write call's requests, decoded without copying their data.
struct FramedWriteRequests(MessageReader);

impl WriteRequests for FramedWriteRequests {
    async fn message(&mut self) -> Result<Option<WriteChunk>, Status> {
        match self.0.next().await? {
            Some(message) => decode_write_request(message).map(Some),
            None => Ok(None),
        }
    }
}

/// Decodes `google.bytestream.WriteRequest` by its field numbers;
/// unknown fields are skipped as protobuf requires.
fn decode_write_request(mut message: Pieces) -> Result<WriteChunk, Status> {
    let malformed = |e| decode_error("WriteRequest", e);
    let mut request = WriteChunk::default();
    let context = DecodeContext::default();
    while message.has_remaining() {
        let (tag, wire_type) = encoding::decode_key(&mut message).map_err(malformed)?;
        match tag {
            1 => encoding::string::merge(
                wire_type,
                &mut request.resource_name,
                &mut message,
                context.clone(),
            )
            .map_err(malformed)?,
            2 => encoding::int64::merge(
                wire_type,
                &mut request.write_offset,
                &mut message,
                context.clone(),
            )
            .map_err(malformed)?,
            3 => encoding::bool::merge(
                wire_type,
                &mut request.finish_write,
                &mut message,
                context.clone(),
            )
            .map_err(malformed)?,
            // A repeated scalar field: the last occurrence wins.
            DATA_FIELD => request.data = data_field("WriteRequest", wire_type, &mut message)?,
            _ => encoding::skip_field(wire_type, tag, &mut message, context.clone())
                .map_err(malformed)?,
        }
    }
    Ok(request)
}

/// A `bytes` field's value, as slices of `message`.
fn data_field(name: &str, wire_type: WireType, message: &mut Pieces) -> Result<Vec<Bytes>, Status> {
    let malformed = |e| decode_error(name, e);
    encoding::check_wire_type(WireType::LengthDelimited, wire_type).map_err(malformed)?;
    let len = encoding::decode_varint(message).map_err(malformed)?;
    if len > message.remaining() as u64 {
        return Err(Status::internal(format!(
            "decoding a {name}: its data field of {len} bytes runs past the message's end"
        )));
    }
    Ok(message.split_to(len as usize).parts.into())
}

/// The data of a `ReadResponse`, as slices of the frames it arrived in
/// (for clients).
pub fn read_response_data(mut message: Pieces) -> Result<Vec<Bytes>, Status> {
    let mut data = Vec::new();
    while message.has_remaining() {
        let (tag, wire_type) =
            encoding::decode_key(&mut message).map_err(|e| decode_error("ReadResponse", e))?;
        match tag {
            DATA_FIELD => data = data_field("ReadResponse", wire_type, &mut message)?,
            _ => encoding::skip_field(wire_type, tag, &mut message, DecodeContext::default())
                .map_err(|e| decode_error("ReadResponse", e))?,
        }
    }
    Ok(data)
}

/// `message` with its gRPC prefix, ready to send as a body frame.
pub fn framed_message(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut framed = BytesMut::with_capacity(PREFIX_BYTES + len);
    framed.put_u8(0);
    framed.put_u32(len as u32);
    message
        .encode(&mut framed)
        .expect("the buffer was sized for the message");
    framed.freeze()
}

/// What precedes a `WriteRequest`'s `data` on the wire: the gRPC prefix,
/// the other fields, and `data`'s key and length. A client that sends this
/// and then `data` as separate body frames sends the message without
/// copying its data.
pub fn write_request_head(
    resource_name: &str,
    write_offset: i64,
    finish_write: bool,
    data_len: usize,
) -> Bytes {
    let mut fields = BytesMut::with_capacity(32 + resource_name.len());
    // proto3: fields at their default value are not sent.
    if !resource_name.is_empty() {
        encoding::encode_key(1, WireType::LengthDelimited, &mut fields);
        encoding::encode_varint(resource_name.len() as u64, &mut fields);
        fields.put_slice(resource_name.as_bytes());
    }
    if write_offset != 0 {
        encoding::int64::encode(2, &write_offset, &mut fields);
    }
    if finish_write {
        encoding::bool::encode(3, &finish_write, &mut fields);
    }
    if data_len > 0 {
        encoding::encode_key(DATA_FIELD, WireType::LengthDelimited, &mut fields);
        encoding::encode_varint(data_len as u64, &mut fields);
    }
    let mut head = BytesMut::with_capacity(PREFIX_BYTES + fields.len());
    head.put_u8(0);
    head.put_u32((fields.len() + data_len) as u32);
    head.put_slice(&fields);
    head.freeze()
}

/// Bytes held as the frames they arrived in.
#[derive(Default)]
pub struct Pieces {
    parts: VecDeque<Bytes>,
    len: usize,
}

impl Pieces {
    /// The bytes, as the slices they arrived in.
    pub fn into_parts(self) -> VecDeque<Bytes> {
        self.parts
    }

    fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.len += part.len();
            self.parts.push_back(part);
        }
    }

    /// Copies the first `out.len()` bytes into `out` without consuming
    /// them; false if fewer are held.
    fn peek(&self, out: &mut [u8]) -> bool {
        if self.len < out.len() {
            return false;
        }
        let mut filled = 0;
        for part in &self.parts {
            let n = part.len().min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&part[..n]);
            filled += n;
            if filled == out.len() {
                break;
            }
        }
        true
    }

    /// The first `len` bytes, as slices of the held parts (no copy).
    fn split_to(&mut self, len: usize) -> Pieces {
        assert!(len <= self.len, "split_to past the end");
        let mut taken = Pieces::default();
        while taken.len < len {
            let front = self.parts.front_mut().expect("len counts the parts");
            let want = len - taken.len;
            if front.len() <= want {
                let part = self.parts.pop_front().expect("just looked");
                taken.len += part.len();
                taken.parts.push_back(part);
            } else {
                taken.len += want;
                taken.parts.push_back(front.split_to(want));
            }
        }
        self.len -= len;
        taken
    }
}

impl Buf for Pieces {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |part| &part[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance past the end");
        self.len -= cnt;
        while cnt > 0 {
            let front = self.parts.front_mut().expect("len counts the parts");
            if front.len() <= cnt {
                cnt -= front.len();
                self.parts.pop_front();
            } else {
                front.advance(cnt);
                cnt = 0;
            }
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        match self.parts.front_mut() {
            Some(front) if front.len() >= len => {
                let bytes = front.split_to(len);
                if front.is_empty() {
                    self.parts.pop_front();
                }
                self.len -= len;
                bytes
            }
            _ => {
                let mut copy = BytesMut::with_capacity(len);
                copy.put((&mut *self).take(len));
                copy.freeze()
            }
        }
    }
}

/// A Read call's responses: each as a small header (message prefix, field
/// key, length) followed by the file data as it was read, then the status.
struct ReadBody {
    responses: ReadStream,
    /// Data whose header was just sent.
    pending: Option<Bytes>,
    finished: bool,
}

/// The prefix and field header of a `ReadResponse` carrying `data_len`
/// bytes (a message with empty data is empty, as protobuf encodes it).
fn read_response_header(data_len: usize, spare: usize) -> BytesMut {
    let field = if data_len == 0 {
        0
    } else {
        encoding::key_len(DATA_FIELD) + encoding::encoded_len_varint(data_len as u64)
    };
    let mut header = BytesMut::with_capacity(PREFIX_BYTES + field + spare);
    header.put_u8(0);
    header.put_u32((field + data_len) as u32);
    if data_len > 0 {
        encoding::encode_key(DATA_FIELD, WireType::LengthDelimited, &mut header);
        encoding::encode_varint(data_len as u64, &mut header);
    }
    header
}

impl http_body::Body for ReadBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if let Some(data) = this.pending.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if this.finished {
            return Poll::Ready(None);
        }
        let frame = match ready!(this.responses.as_mut().poll_next(cx)) {
            Some(Ok(response)) => {
                let data = response.data;
                if data.len() <= COALESCE_BYTES {
                    let mut message = read_response_header(data.len(), data.len());
                    message.put_slice(&data);
                    Frame::data(message.freeze())
                } else {
                    let header = read_response_header(data.len(), 0);
                    this.pending = Some(data);
                    Frame::data(header.freeze())
                }
            }
            Some(Err(status)) => {
                this.finished = true;
                Frame::trailers(trailers(&status))
            }
            None => {
                this.finished = true;
                Frame::trailers(trailers(&Status::new(Code::Ok, "")))
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.pending.is_none()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::{BufMut, Bytes, BytesMut};
    use futures::StreamExt;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use kiln_proto::bytestream::{
        QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
        WriteResponse,
    };
    use kiln_store::{DigestFunction, MemoryStore};
    use prost::Message;
    use tonic::body::Body;
    use tonic::{Code, Status};
    use tower::Service;

    use super::{ByteStreamHttp, READ_PATH, WRITE_PATH};
    use crate::{ByteStreamService, Storage, StorageLimits};

    const LIMIT: usize = 4 * 1024 * 1024;

    fn server() -> (ByteStreamHttp, Storage) {
        let storage = Storage::new(
            Arc::new(MemoryStore::new(256 << 20)),
            StorageLimits::default(),
        );
        let service = ByteStreamHttp::new(ByteStreamService::new(storage.clone()), LIMIT);
        (service, storage)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn write_name(data: &[u8]) -> String {
        let digest = DigestFunction::Sha256.digest_of(data);
        format!(
            "main/uploads/4f7b9c2e-1d3a-4b5c-8e6f-7a8b9c0d1e2f/blobs/{}/{}",
            digest.hash_hex(),
            digest.size
        )
    }

    /// gRPC's 5-byte prefix in front of `message`.
    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    /// The WriteRequests that upload `data` in `chunk`-byte pieces.
    fn write_requests(data: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let name = write_name(data);
        let pieces: Vec<&[u8]> = data.chunks(chunk).collect();
        let mut offset = 0;
        pieces
            .iter()
            .enumerate()
            .map(|(i, piece)| {
                let request = WriteRequest {
                    resource_name: if i == 0 { name.clone() } else { String::new() },
                    write_offset: offset,
                    finish_write: i + 1 == pieces.len(),
                    data: Bytes::copy_from_slice(piece),
                };
                offset += piece.len() as i64;
                request.encode_to_vec()
            })
            .collect()
    }

    /// A request whose body arrives as exactly these frames.
    fn request(path: &str, frames: Vec<Result<Vec<u8>, Status>>) -> http::Request<Body> {
        let frames = frames
            .into_iter()
            .map(|frame| frame.map(|bytes| Frame::data(Bytes::from(bytes))));
        http::Request::builder()
            .method("POST")
            .uri(format!("http://127.0.0.1{path}"))
            .header("content-type", "application/grpc")
            .body(Body::new(StreamBody::new(futures::stream::iter(frames))))
            .unwrap()
    }

    /// Splits `stream` into frames of `size` bytes.
    fn frames_of(stream: &[u8], size: usize) -> Vec<Result<Vec<u8>, Status>> {
        stream
            .chunks(size)
            .map(|frame| Ok(frame.to_vec()))
            .collect()
    }

    /// The messages of a response and its status (from the trailers, or
    /// from the headers of a trailers-only response).
    async fn call(
        service: &mut ByteStreamHttp,
        request: http::Request<Body>,
    ) -> (Vec<Bytes>, Status) {
        let response = service.call(request).await.unwrap();
        assert_eq!(response.headers()["content-type"], "application/grpc");
        if let Some(status) = Status::from_header_map(response.headers()) {
            return (Vec::new(), status);
        }
        let collected = response.into_body().collect().await.unwrap();
        let status = Status::from_header_map(collected.trailers().expect("trailers"))
            .expect("grpc-status in the trailers");
        let mut body = collected.to_bytes();
        let mut messages = Vec::new();
        while !body.is_empty() {
            assert_eq!(body[0], 0, "uncompressed");
            let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
            messages.push(body.slice(5..5 + len));
            body = body.slice(5 + len..);
        }
        (messages, status)
    }

    async fn is_stored(storage: &Storage, data: &[u8]) -> bool {
        storage
            .contains(&DigestFunction::Sha256.digest_of(data))
            .await
            .unwrap()
    }

    async fn read(
        service: &mut ByteStreamHttp,
        data: &[u8],
        offset: i64,
        limit: i64,
    ) -> (Vec<u8>, usize, Status) {
        let digest = DigestFunction::Sha256.digest_of(data);
        let read = ReadRequest {
            resource_name: format!("main/blobs/{}/{}", digest.hash_hex(), digest.size),
            read_offset: offset,
            read_limit: limit,
        };
        let (messages, status) = call(
            service,
            request(READ_PATH, vec![Ok(framed(&read.encode_to_vec()))]),
        )
        .await;
        let mut got = Vec::new();
        for message in &messages {
            got.extend_from_slice(&ReadResponse::decode(message.clone()).unwrap().data);
        }
        (got, messages.len(), status)
    }

    async fn query_write_status(
        service: &mut ByteStreamHttp,
        name: &str,
    ) -> Result<QueryWriteStatusResponse, Status> {
        let query = QueryWriteStatusRequest {
            resource_name: name.to_string(),
        };
        let path = "/google.bytestream.ByteStream/QueryWriteStatus";
        let (messages, status) = call(
            service,
            request(path, vec![Ok(framed(&query.encode_to_vec()))]),
        )
        .await;
        match status.code() {
            Code::Ok => Ok(QueryWriteStatusResponse::decode(messages[0].clone()).unwrap()),
            _ => Err(status),
        }
    }

    /// `request` as the caller of organisation `org`.
    fn as_org(mut request: http::Request<Body>, org: &str) -> http::Request<Body> {
        request.extensions_mut().insert(kiln_auth::Caller {
            org: Arc::from(org),
            key_id: None,
            capabilities: kiln_auth::Capabilities::all(),
        });
        request
    }

    #[tokio::test]
    async fn an_organisation_reads_only_what_it_wrote_even_when_stored_already() {
        let (mut service, storage) = server();
        // Large enough for the pipelined path.
        let data = pattern(3 << 20);
        let digest = DigestFunction::Sha256.digest_of(&data);
        let upload = |org: &str| {
            let frames: Vec<u8> = write_requests(&data, 1 << 20)
                .iter()
                .flat_map(|request| framed(request))
                .collect();
            as_org(request(WRITE_PATH, frames_of(&frames, 64 << 10)), org)
        };
        let read_as = |org: &str| {
            let read = ReadRequest {
                resource_name: format!("main/blobs/{}/{}", digest.hash_hex(), digest.size),
                ..Default::default()
            };
            as_org(
                request(READ_PATH, vec![Ok(framed(&read.encode_to_vec()))]),
                org,
            )
        };
        let (_, status) = call(&mut service, upload("acme")).await;
        assert_eq!(status.code(), Code::Ok, "{status:?}");
        for (org, visible) in [("acme", true), ("globex", false), ("", true)] {
            assert_eq!(
                storage.visible_to(org, &digest).await.unwrap(),
                visible,
                "{org:?}"
            );
        }
        let (messages, status) = call(&mut service, read_as("globex")).await;
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert!(messages.is_empty());
        // Stored already, yet globex must send the bytes to see it.
        let (_, status) = call(&mut service, upload("globex")).await;
        assert_eq!(status.code(), Code::Ok, "{status:?}");
        assert!(storage.visible_to("globex", &digest).await.unwrap());
        let (messages, status) = call(&mut service, read_as("globex")).await;
        assert_eq!(status.code(), Code::Ok, "{status:?}");
        let mut got = Vec::new();
        for message in &messages {
            got.extend_from_slice(&ReadResponse::decode(message.clone()).unwrap().data);
        }
        assert!(got == data, "globex read other bytes");
    }

    #[tokio::test]
    async fn an_upload_being_received_reports_its_committed_bytes() {
        let (mut service, _) = server();
        let data = pattern(10_000);
        let name = write_name(&data);
        let first = framed(&write_requests(&data, 4000)[0]);
        let (asked_for_more, first_taken_in) = tokio::sync::oneshot::channel();
        let frames = futures::stream::iter([Ok(Frame::data(Bytes::from(first)))]).chain(
            futures::stream::once(async move {
                // The server asks for more only once it has taken the first
                // message in.
                let _ = asked_for_more.send(());
                futures::future::pending::<Result<Frame<Bytes>, Status>>().await
            }),
        );
        let upload = http::Request::builder()
            .method("POST")
            .uri(format!("http://127.0.0.1{WRITE_PATH}"))
            .header("content-type", "application/grpc")
            .body(Body::new(StreamBody::new(frames)))
            .unwrap();
        let mut writer = service.clone();
        let upload = tokio::spawn(async move { writer.call(upload).await });
        first_taken_in.await.unwrap();
        let status = query_write_status(&mut service, &name).await.unwrap();
        assert_eq!((status.committed_size, status.complete), (4000, false));
        // Gone with its stream (not interrupted by the client, so not parked).
        upload.abort();
        assert!(upload.await.unwrap_err().is_cancelled());
        let status = query_write_status(&mut service, &name).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }

    #[tokio::test]
    async fn a_write_split_across_many_small_frames_is_stored() {
        let (mut service, storage) = server();
        let data = pattern(3 * 1024 * 1024 + 17); // over the inline limit: pipelined
        let stream: Vec<u8> = write_requests(&data, 256 * 1024)
            .iter()
            .flat_map(|message| framed(message))
            .collect();
        // 1000-byte frames: prefixes and field headers straddle frames.
        let (messages, status) =
            call(&mut service, request(WRITE_PATH, frames_of(&stream, 1000))).await;
        assert_eq!(status.code(), Code::Ok, "{status:?}");
        let response = WriteResponse::decode(messages[0].clone()).unwrap();
        assert_eq!(response.committed_size, data.len() as i64);
        assert!(is_stored(&storage, &data).await);
        let (got, _, status) = read(&mut service, &data, 0, 0).await;
        assert_eq!(status.code(), Code::Ok);
        assert!(got == data, "read back what was written");
    }

    #[tokio::test]
    async fn several_messages_in_one_frame_and_one_byte_frames() {
        for frame_size in [usize::MAX, 1] {
            let (mut service, storage) = server();
            let data = pattern(10_000 + frame_size.min(7));
            let stream: Vec<u8> = write_requests(&data, 1500)
                .iter()
                .flat_map(|message| framed(message))
                .collect();
            let frames = frames_of(&stream, frame_size.min(stream.len()));
            let (_, status) = call(&mut service, request(WRITE_PATH, frames)).await;
            assert_eq!(
                status.code(),
                Code::Ok,
                "frames of {frame_size}: {status:?}"
            );
            assert!(is_stored(&storage, &data).await);
        }
    }

    #[tokio::test]
    async fn unknown_fields_are_skipped() {
        let (mut service, storage) = server();
        let data = pattern(5000);
        let known = WriteRequest {
            resource_name: write_name(&data),
            write_offset: 0,
            finish_write: true,
            data: Bytes::from(data.clone()),
        }
        .encode_to_vec();
        // Unknown fields of every wire type, before and after the known ones.
        let mut message = BytesMut::new();
        prost::encoding::uint64::encode(4, &99, &mut message);
        prost::encoding::bytes::encode(11, &vec![7u8; 300], &mut message);
        prost::encoding::fixed32::encode(12, &5, &mut message);
        message.put_slice(&known);
        prost::encoding::fixed64::encode(13, &6, &mut message);
        prost::encoding::string::encode(1000, &"later".to_string(), &mut message);
        let frames = frames_of(&framed(&message), 333);
        let (_, status) = call(&mut service, request(WRITE_PATH, frames)).await;
        assert_eq!(status.code(), Code::Ok, "{status:?}");
        assert!(is_stored(&storage, &data).await);
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_refused_before_it_is_buffered() {
        let (mut service, storage) = server();
        let data = pattern(100);
        // Only the prefix is sent: the refusal must not wait for the body.
        let mut prefix = vec![0];
        prefix.extend_from_slice(&((LIMIT + 1) as u32).to_be_bytes());
        let (_, status) = call(&mut service, request(WRITE_PATH, vec![Ok(prefix)])).await;
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains(&format!("{} bytes", LIMIT + 1))
                && status.message().contains(&LIMIT.to_string()),
            "{}",
            status.message()
        );
        assert!(!is_stored(&storage, &data).await);
    }

    #[tokio::test]
    async fn a_compressed_message_without_an_encoding_is_refused_as_tonic_does() {
        let (mut service, storage) = server();
        let data = pattern(100);
        let mut stream = framed(&write_requests(&data, 100)[0]);
        stream[0] = 1;
        let (_, status) = call(&mut service, request(WRITE_PATH, vec![Ok(stream)])).await;
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert!(
            status.message().contains("compressed-flag"),
            "{}",
            status.message()
        );
        assert!(!is_stored(&storage, &data).await);
    }

    #[tokio::test]
    async fn a_declared_encoding_goes_to_tonic() {
        let (mut service, _) = server();
        let data = pattern(100);
        let mut request = request(WRITE_PATH, vec![Ok(framed(&write_requests(&data, 100)[0]))]);
        request
            .headers_mut()
            .insert("grpc-encoding", http::HeaderValue::from_static("gzip"));
        let (_, status) = call(&mut service, request).await;
        // This server enables no compression; tonic says so.
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    }

    #[tokio::test]
    async fn a_client_gone_mid_upload_leaves_nothing_visible() {
        for len in [200_000, 3 * 1024 * 1024] {
            let (mut service, storage) = server();
            let data = pattern(len);
            let messages = write_requests(&data, 64 * 1024);
            // All but the last message, then the connection fails.
            let mut frames: Vec<Result<Vec<u8>, Status>> = messages[..messages.len() - 1]
                .iter()
                .map(|message| Ok(framed(message)))
                .collect();
            frames.push(Err(Status::cancelled("connection reset")));
            let (_, status) = call(&mut service, request(WRITE_PATH, frames)).await;
            assert_ne!(status.code(), Code::Ok);
            assert!(!is_stored(&storage, &data).await, "{len} bytes");
            // A stream that simply ends without finish_write is no better.
            let frames = messages[..messages.len() - 1]
                .iter()
                .map(|message| Ok(framed(message)))
                .collect();
            let (_, status) = call(&mut service, request(WRITE_PATH, frames)).await;
            assert_ne!(status.code(), Code::Ok);
            assert!(!is_stored(&storage, &data).await, "{len} bytes");
        }
    }

    #[tokio::test]
    async fn a_truncated_message_or_data_field_is_refused() {
        let (mut service, storage) = server();
        let data = pattern(1000);
        let message = framed(&write_requests(&data, 1000)[0]);
        let (_, status) = call(
            &mut service,
            request(WRITE_PATH, vec![Ok(message[..message.len() - 10].to_vec())]),
        )
        .await;
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        // A data field claiming more bytes than its message holds.
        let mut short = BytesMut::new();
        prost::encoding::string::encode(1, &write_name(&data), &mut short);
        prost::encoding::encode_key(10, prost::encoding::WireType::LengthDelimited, &mut short);
        prost::encoding::encode_varint(1000, &mut short);
        short.put_slice(&data[..10]);
        let (_, status) = call(&mut service, request(WRITE_PATH, vec![Ok(framed(&short))])).await;
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert!(
            status.message().contains("data field"),
            "{}",
            status.message()
        );
        assert!(!is_stored(&storage, &data).await);
    }

    #[tokio::test]
    async fn wrong_content_is_refused_with_the_digest_named() {
        let (mut service, storage) = server();
        let data = pattern(3000);
        let mut messages = write_requests(&data, 3000);
        let mut request_message = WriteRequest::decode(&messages[0][..]).unwrap();
        request_message.data =
            Bytes::from(pattern(2999).into_iter().chain([9]).collect::<Vec<u8>>());
        messages[0] = request_message.encode_to_vec();
        let (_, status) = call(
            &mut service,
            request(WRITE_PATH, vec![Ok(framed(&messages[0]))]),
        )
        .await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status
                .message()
                .contains(&DigestFunction::Sha256.digest_of(&data).hash_hex()),
            "{}",
            status.message()
        );
        assert!(!is_stored(&storage, &data).await);
    }

    #[test]
    fn the_client_framing_matches_prost() {
        let data = Bytes::from(pattern(300));
        for (name, offset, finish) in [("a/uploads/u/blobs/x/300", 0, false), ("", 1 << 40, true)] {
            let request = WriteRequest {
                resource_name: name.into(),
                write_offset: offset,
                finish_write: finish,
                data: data.clone(),
            };
            let mut sent = super::write_request_head(name, offset, finish, data.len()).to_vec();
            sent.extend_from_slice(&data);
            assert_eq!(sent, framed(&request.encode_to_vec()));
        }
        let mut response = BytesMut::new();
        prost::encoding::uint32::encode(3, &7, &mut response); // unknown
        response.put_slice(&ReadResponse { data: data.clone() }.encode_to_vec());
        let mut pieces = super::Pieces::default();
        for part in response.freeze().chunks(7) {
            pieces.push(Bytes::copy_from_slice(part));
        }
        let parts = super::read_response_data(pieces).unwrap();
        assert!(parts.len() > 1, "returned as the slices it arrived in");
        assert_eq!(parts.concat(), data.to_vec());
    }

    #[tokio::test]
    async fn reads_honour_offset_and_limit() {
        let (mut service, _) = server();
        let data = pattern(2 * 1024 * 1024 + 5); // three 1 MiB read chunks
        let stream: Vec<u8> = write_requests(&data, 1 << 20)
            .iter()
            .flat_map(|message| framed(message))
            .collect();
        let (_, status) = call(
            &mut service,
            request(WRITE_PATH, frames_of(&stream, 64 * 1024)),
        )
        .await;
        assert_eq!(status.code(), Code::Ok, "{status:?}");
        let (got, messages, status) = read(&mut service, &data, 0, 0).await;
        assert_eq!(status.code(), Code::Ok);
        assert!(got == data);
        assert_eq!(messages, 3);
        let (got, _, _) = read(&mut service, &data, 1000, 5000).await;
        assert!(got == data[1000..6000]);
        let (got, _, _) = read(&mut service, &data, 1 << 20, 0).await;
        assert!(got == data[1 << 20..]);
        // At the end: one empty response, as tonic's path sends.
        let (got, messages, status) = read(&mut service, &data, data.len() as i64, 0).await;
        assert_eq!((got.len(), messages, status.code()), (0, 1, Code::Ok));
        let (_, _, status) = read(&mut service, &data, data.len() as i64 + 1, 0).await;
        assert_eq!(status.code(), Code::OutOfRange);
        assert!(
            status.message().contains("read_offset"),
            "{}",
            status.message()
        );
        let (_, _, status) = read(&mut service, &pattern(10), 0, 0).await;
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
}
