//! The gRPC message-size limit on requests, in front of every service: a
//! request message over it is RESOURCE_EXHAUSTED, the code gRPC's
//! status-code guide assigns, refused from its 5-byte prefix before any of
//! it is buffered. tonic's own decoding limit answers OUT_OF_RANGE (meant
//! for reads past the end of a resource), so it is kept at the same value
//! behind this layer only as a backstop.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tonic::body::Body;
use tonic::Status;
use tower::{Layer, Service};

use crate::bytestream_http::PREFIX_BYTES;

/// [`MessageLimit`] as a layer, e.g. for `tonic::transport::Server::layer`.
#[derive(Clone, Copy, Debug)]
pub struct MessageLimitLayer {
    max_message_bytes: usize,
}

impl MessageLimitLayer {
    pub fn new(max_message_bytes: usize) -> Self {
        MessageLimitLayer { max_message_bytes }
    }
}

impl<S> Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;

    fn layer(&self, inner: S) -> MessageLimit<S> {
        MessageLimit::new(inner, self.max_message_bytes)
    }
}

/// A gRPC service whose request messages are at most `max_message_bytes`.
/// Frames pass through unchanged (no copy); only the message prefixes are
/// read.
#[derive(Clone, Debug)]
pub struct MessageLimit<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S> MessageLimit<S> {
    pub fn new(inner: S, max_message_bytes: usize) -> Self {
        MessageLimit {
            inner,
            max_message_bytes,
        }
    }
}

impl<S> Service<http::Request<Body>> for MessageLimit<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> S::Future {
        let uri = request.uri().clone();
        let max_message_bytes = self.max_message_bytes;
        self.inner.call(request.map(|body| {
            Body::new(LimitedBody {
                body,
                uri,
                prefixes: Prefixes::new(max_message_bytes),
                refused: false,
            })
        }))
    }
}

/// A request body that fails with RESOURCE_EXHAUSTED at the first message
/// prefix announcing more than the limit.
struct LimitedBody {
    body: Body,
    /// For the message: which call was refused.
    uri: http::Uri,
    prefixes: Prefixes,
    refused: bool,
}

impl http_body::Body for LimitedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.refused {
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
            if let Err(len) = this.prefixes.check(data) {
                this.refused = true;
                return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                    "{}: a request message of {len} bytes is over the server's limit of {} bytes",
                    this.uri.path(),
                    this.prefixes.max_message_bytes
                )))));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.refused || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Follows the message boundaries of a gRPC body through its frames
/// (a prefix may straddle frames; a frame may hold many messages).
struct Prefixes {
    max_message_bytes: usize,
    prefix: [u8; PREFIX_BYTES],
    prefix_len: usize,
    /// Bytes of the current message not yet seen.
    message_left: usize,
}

impl Prefixes {
    fn new(max_message_bytes: usize) -> Self {
        Prefixes {
            max_message_bytes,
            prefix: [0; PREFIX_BYTES],
            prefix_len: 0,
            message_left: 0,
        }
    }

    /// Takes in the next bytes of the body; the announced length of the
    /// first message over the limit is the error.
    fn check(&mut self, mut data: &[u8]) -> Result<(), usize> {
        while !data.is_empty() {
            if self.message_left > 0 {
                let skipped = self.message_left.min(data.len());
                self.message_left -= skipped;
                data = &data[skipped..];
                continue;
            }
            let taken = (PREFIX_BYTES - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + taken].copy_from_slice(&data[..taken]);
            self.prefix_len += taken;
            data = &data[taken..];
            if self.prefix_len == PREFIX_BYTES {
                let [_, length @ ..] = self.prefix;
                let len = u32::from_be_bytes(length) as usize;
                if len > self.max_message_bytes {
                    return Err(len);
                }
                self.message_left = len;
                self.prefix_len = 0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Prefixes;

    fn message(len: usize) -> Vec<u8> {
        let mut message = vec![0];
        message.extend_from_slice(&(len as u32).to_be_bytes());
        message.resize(5 + len, 7);
        message
    }

    #[test]
    fn messages_up_to_the_limit_pass_in_any_framing() {
        let body: Vec<u8> = [10, 0, 100, 3, 100].into_iter().flat_map(message).collect();
        for frame in [1, 3, 5, 7, 104, body.len()] {
            let mut prefixes = Prefixes::new(100);
            for piece in body.chunks(frame) {
                assert_eq!(prefixes.check(piece), Ok(()), "frames of {frame}");
            }
        }
    }

    #[test]
    fn the_first_message_over_the_limit_is_refused_from_its_prefix() {
        let mut body: Vec<u8> = [10, 100].into_iter().flat_map(message).collect();
        body.extend_from_slice(&message(101)[..5]);
        for frame in [1, 2, 6, body.len()] {
            let mut prefixes = Prefixes::new(100);
            let refused = body
                .chunks(frame)
                .map(|piece| prefixes.check(piece))
                .find(Result::is_err);
            assert_eq!(refused, Some(Err(101)), "frames of {frame}");
        }
    }
}
