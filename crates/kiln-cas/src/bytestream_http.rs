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
//! generated service unchanged.

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
const PREFIX_BYTES: usize = 5;
/// `WriteRequest.data` and `ReadResponse.data`.
const DATA_FIELD: u32 = 10;
/// Read payloads up to this size are copied in with their header and sent
/// as one DATA frame; larger ones are sent as they are, without a copy.
const COALESCE_BYTES: usize = 16 * 1024;

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
        let messages = |request: http::Request<Body>| {
            MessageReader::new(request.into_body(), max_message_bytes)
        };
        match request.uri().path() {
            WRITE_PATH if identity => {
                let messages = messages(request);
                Box::pin(async move { Ok(write(&service, messages).await) })
            }
            READ_PATH if identity => {
                let messages = messages(request);
                Box::pin(async move { Ok(read(&service, messages).await) })
            }
            _ => self.tonic.call(request),
        }
    }
}

async fn write(service: &ByteStreamService, messages: MessageReader) -> http::Response<Body> {
    match service.write(FramedWriteRequests(messages)).await {
        Ok(response) => unary_response(&response),
        Err(status) => status.into_http(),
    }
}

async fn read(service: &ByteStreamService, mut messages: MessageReader) -> http::Response<Body> {
    let request = match messages.next().await {
        Ok(Some(message)) => match ReadRequest::decode(message) {
            Ok(request) => request,
            Err(e) => return decode_error("ReadRequest", e).into_http(),
        },
        Ok(None) => return Status::internal("Missing request message.").into_http(),
        Err(status) => return status.into_http(),
    };
    match service.read(request).await {
        Ok(responses) => grpc_response(Body::new(ReadBody {
            responses,
            pending: None,
            finished: false,
        })),
        Err(e) => Status::from(e).into_http(),
    }
}

/// A `200` carrying gRPC messages; the status follows in the trailers.
fn grpc_response(body: Body) -> http::Response<Body> {
    let mut response = http::Response::new(body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, GRPC_CONTENT_TYPE);
    response
}

/// One message, then `grpc-status: 0`.
fn unary_response(message: &impl Message) -> http::Response<Body> {
    let len = message.encoded_len();
    let mut framed = BytesMut::with_capacity(PREFIX_BYTES + len);
    framed.put_u8(0);
    framed.put_u32(len as u32);
    message
        .encode(&mut framed)
        .expect("the buffer was sized for the message");
    let frames: [Result<Frame<Bytes>, Infallible>; 2] = [
        Ok(Frame::data(framed.freeze())),
        Ok(Frame::trailers(trailers(&Status::new(Code::Ok, "")))),
    ];
    grpc_response(Body::new(StreamBody::new(futures::stream::iter(frames))))
}

/// `grpc-status`, `grpc-message` (percent-encoded) and any details, as
/// tonic writes them.
fn trailers(status: &Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    if let Err(unencodable) = status.add_header(&mut trailers) {
        trailers.clear();
        unencodable
            .add_header(&mut trailers)
            .unwrap_or_else(|_| tracing::error!("a status could not be written as trailers"));
    }
    trailers
}

fn decode_error(message: &str, error: prost::DecodeError) -> Status {
    // Malformed protobuf is INTERNAL, as tonic reports it.
    Status::internal(format!("decoding a {message}: {error}"))
}

/// The request body as gRPC messages, each handed out as the slices of
/// the DATA frames it arrived in (a message may span frames, and a frame
/// may hold several messages).
struct MessageReader {
    body: Body,
    buffered: Pieces,
    max_message_bytes: usize,
    ended: bool,
}

impl MessageReader {
    fn new(body: Body, max_message_bytes: usize) -> Self {
        MessageReader {
            body,
            buffered: Pieces::default(),
            max_message_bytes,
            ended: false,
        }
    }

    /// The next whole message; `None` once the client has closed its side
    /// after a whole message.
    async fn next(&mut self) -> Result<Option<Pieces>, Status> {
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
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    // Request trailers carry nothing for gRPC.
                    if let Ok(data) = frame.into_data() {
                        self.buffered.push(data);
                    }
                }
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
                "a ByteStream message of {len} bytes is over the server's limit of {} bytes",
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
            DATA_FIELD => {
                encoding::check_wire_type(WireType::LengthDelimited, wire_type)
                    .map_err(malformed)?;
                let len = encoding::decode_varint(&mut message).map_err(malformed)?;
                if len > message.remaining() as u64 {
                    return Err(Status::internal(format!(
                        "decoding a WriteRequest: its data field of {len} bytes runs past the \
                         message's end"
                    )));
                }
                // A repeated scalar field: the last occurrence wins.
                request.data = message.split_to(len as usize).parts.into();
            }
            _ => encoding::skip_field(wire_type, tag, &mut message, context.clone())
                .map_err(malformed)?,
        }
    }
    Ok(request)
}

/// Bytes held as the frames they arrived in.
#[derive(Default)]
struct Pieces {
    parts: VecDeque<Bytes>,
    len: usize,
}

impl Pieces {
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
