//! [`RpcMetricsLayer`]: counts every gRPC call by service, method and
//! status code, and times it from arrival to the end of its response
//! stream (streams included: a ByteStream read is timed until its last
//! chunk).
//!
//! Service and method names come from a fixed list of what Kiln serves;
//! any other path counts as `unknown`, so a client cannot grow the label
//! set. The status is read from the response headers (trailers-only
//! answers) or trailers; a response dropped before its trailers (the
//! client went away) counts as `Cancelled`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::Frame;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::metrics::{Metrics, RpcLabels, RpcMethodLabels};

/// Every gRPC method Kiln serves, as `(service, methods)`.
const KNOWN: &[(&str, &[&str])] = &[
    (
        "build.bazel.remote.execution.v2.ContentAddressableStorage",
        &[
            "FindMissingBlobs",
            "BatchUpdateBlobs",
            "BatchReadBlobs",
            "GetTree",
            "SplitBlob",
            "SpliceBlob",
        ],
    ),
    (
        "build.bazel.remote.execution.v2.ActionCache",
        &["GetActionResult", "UpdateActionResult"],
    ),
    (
        "build.bazel.remote.execution.v2.Execution",
        &["Execute", "WaitExecution"],
    ),
    (
        "build.bazel.remote.execution.v2.Capabilities",
        &["GetCapabilities"],
    ),
    (
        "google.bytestream.ByteStream",
        &["Read", "Write", "QueryWriteStatus"],
    ),
    (
        "google.longrunning.Operations",
        &[
            "ListOperations",
            "GetOperation",
            "DeleteOperation",
            "CancelOperation",
            "WaitOperation",
        ],
    ),
    ("kiln.executor.v1.ExecutorService", &["Session"]),
    ("grpc.health.v1.Health", &["Check", "Watch"]),
];

/// The `(service, method)` labels of a request path.
fn labels_of(path: &str) -> (&'static str, &'static str) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (Some(service), Some(method)) = (parts.next(), parts.next()) else {
        return ("unknown", "unknown");
    };
    for (known, methods) in KNOWN {
        if *known == service {
            let method = methods
                .iter()
                .find(|m| **m == method)
                .copied()
                .unwrap_or("unknown");
            return (known, method);
        }
    }
    ("unknown", "unknown")
}

/// The name of gRPC status `code` (tonic's spelling), bounded.
pub(crate) fn code_name(code: i32) -> &'static str {
    use tonic::Code::*;
    match tonic::Code::from_i32(code) {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

fn status_in(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl RpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        RpcMetricsLayer { metrics }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = labels_of(request.uri().path());
        let call = Call {
            metrics: self.metrics.clone(),
            service,
            method,
            started: Instant::now(),
            code: None,
            recorded: false,
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut call = call;
            let response = match response.await {
                Ok(response) => response,
                Err(e) => {
                    call.code = Some(tonic::Code::Unknown as i32);
                    call.record();
                    return Err(e);
                }
            };
            call.code = status_in(response.headers());
            if call.code.is_some() {
                // Trailers-only: the status is all there is.
                call.record();
            }
            Ok(response.map(|body| Body::new(MeteredBody { body, call })))
        })
    }
}

/// One call being timed; recorded once, when its status is known or its
/// response is dropped.
struct Call {
    metrics: Arc<Metrics>,
    service: &'static str,
    method: &'static str,
    started: Instant,
    code: Option<i32>,
    recorded: bool,
}

impl Call {
    fn record(&mut self) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let code = code_name(self.code.unwrap_or(tonic::Code::Cancelled as i32));
        self.metrics
            .rpcs
            .get_or_create(&RpcLabels {
                service: self.service,
                method: self.method,
                code,
            })
            .inc();
        self.metrics
            .rpc_seconds
            .get_or_create(&RpcMethodLabels {
                service: self.service,
                method: self.method,
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.record();
    }
}

struct MeteredBody {
    body: Body,
    call: Call,
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(code) = frame.trailers_ref().and_then(status_in) {
                    this.call.code = Some(code);
                    this.call.record();
                }
            }
            Some(Err(status)) => {
                this.call.code = Some(status.code() as i32);
                this.call.record();
            }
            None => {
                // Ended without trailers (already recorded if the headers
                // carried the status).
                this.call.code.get_or_insert(tonic::Code::Ok as i32);
                this.call.record();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_known_list_count_as_unknown() {
        assert_eq!(
            labels_of("/google.bytestream.ByteStream/Read"),
            ("google.bytestream.ByteStream", "Read")
        );
        assert_eq!(
            labels_of("/google.bytestream.ByteStream/Steal"),
            ("google.bytestream.ByteStream", "unknown")
        );
        assert_eq!(labels_of("/evil.Service/abc123"), ("unknown", "unknown"));
        assert_eq!(labels_of("no-slash"), ("unknown", "unknown"));
    }
}
