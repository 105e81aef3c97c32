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
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::Frame;
use tonic::body::Body;
use tower::{Layer, Service};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

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

/// The index of a request path's label pair in [`RpcTable::methods`]:
/// [`KNOWN`] in order, each service's methods then its `unknown`, and
/// last `unknown`/`unknown`.
fn index_of(path: &str) -> usize {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next(), parts.next());
    let mut offset = 0;
    for (known, methods) in KNOWN {
        if Some(*known) == service && method.is_some() {
            let at = methods.iter().position(|m| Some(*m) == method);
            return offset + at.unwrap_or(methods.len());
        }
        offset += methods.len() + 1;
    }
    offset
}

const UNKNOWN: (&str, &str) = ("unknown", "unknown");

/// The 17 gRPC status codes, 0 to 16.
const CODES: usize = 17;

/// One `(service, method)` label pair's metrics, taken from the families
/// the first time a call needs them (so a method never called is not
/// exported) and kept: a call then costs no hashing and no lock.
struct MethodMetrics {
    service: &'static str,
    method: &'static str,
    seconds: OnceLock<Histogram>,
    calls: [OnceLock<Counter>; CODES],
}

/// Every label pair a call can have, in a fixed order: each known
/// service's methods and its `unknown`, then `unknown`/`unknown`.
struct RpcTable {
    metrics: Arc<Metrics>,
    methods: Vec<MethodMetrics>,
}

impl RpcTable {
    fn new(metrics: Arc<Metrics>) -> RpcTable {
        let pairs = KNOWN
            .iter()
            .flat_map(|(service, methods)| {
                methods
                    .iter()
                    .chain(std::iter::once(&"unknown"))
                    .map(move |method| (*service, *method))
            })
            .chain(std::iter::once(UNKNOWN));
        RpcTable {
            metrics,
            methods: pairs
                .map(|(service, method)| MethodMetrics {
                    service,
                    method,
                    seconds: OnceLock::new(),
                    calls: std::array::from_fn(|_| OnceLock::new()),
                })
                .collect(),
        }
    }

    fn record(&self, index: usize, code: i32, seconds: f64) {
        let entry = &self.methods[index];
        let code = usize::try_from(code)
            .ok()
            .filter(|c| *c < CODES)
            .unwrap_or(tonic::Code::Unknown as usize);
        entry.calls[code]
            .get_or_init(|| {
                self.metrics
                    .rpcs
                    .get_or_create(&RpcLabels {
                        service: entry.service,
                        method: entry.method,
                        code: code_name(code as i32),
                    })
                    .clone()
            })
            .inc();
        entry
            .seconds
            .get_or_init(|| {
                self.metrics
                    .rpc_seconds
                    .get_or_create(&RpcMethodLabels {
                        service: entry.service,
                        method: entry.method,
                    })
                    .clone()
            })
            .observe(seconds);
    }
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
    table: Arc<RpcTable>,
}

impl RpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        RpcMetricsLayer {
            table: Arc::new(RpcTable::new(metrics)),
        }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            table: self.table.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    table: Arc<RpcTable>,
}

impl<S, B> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = Call {
            table: self.table.clone(),
            index: index_of(request.uri().path()),
            started: Instant::now(),
            code: None,
            recorded: false,
        };
        MeteredFuture {
            inner: self.inner.call(request),
            call: Some(call),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's answer, its body metered; no allocation of its
    /// own (the call is timed from the request's arrival).
    pub struct MeteredFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let answer = ready!(this.inner.poll(cx));
        let mut call = this.call.take().expect("polled after it completed");
        Poll::Ready(match answer {
            Ok(response) => {
                call.code = status_in(response.headers());
                if call.code.is_some() {
                    // Trailers-only: the status is all there is.
                    call.record();
                }
                Ok(response.map(|body| Body::new(MeteredBody { body, call })))
            }
            Err(e) => {
                call.code = Some(tonic::Code::Unknown as i32);
                call.record();
                Err(e)
            }
        })
    }
}

/// One call being timed; recorded once, when its status is known or its
/// response (or the future of it) is dropped.
struct Call {
    table: Arc<RpcTable>,
    index: usize,
    started: Instant,
    code: Option<i32>,
    recorded: bool,
}

impl Call {
    fn record(&mut self) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let code = self.code.unwrap_or(tonic::Code::Cancelled as i32);
        self.table
            .record(self.index, code, self.started.elapsed().as_secs_f64());
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
        let table = RpcTable::new(Metrics::new());
        let labels = |path: &str| {
            let entry = &table.methods[index_of(path)];
            (entry.service, entry.method)
        };
        assert_eq!(
            labels("/google.bytestream.ByteStream/Read"),
            ("google.bytestream.ByteStream", "Read")
        );
        assert_eq!(
            labels("/google.bytestream.ByteStream/Steal"),
            ("google.bytestream.ByteStream", "unknown")
        );
        assert_eq!(
            labels("/grpc.health.v1.Health/Watch"),
            ("grpc.health.v1.Health", "Watch")
        );
        assert_eq!(labels("/evil.Service/abc123"), ("unknown", "unknown"));
        assert_eq!(
            labels("/google.bytestream.ByteStream"),
            ("unknown", "unknown")
        );
        assert_eq!(labels("no-slash"), ("unknown", "unknown"));
    }

    #[test]
    fn every_label_pair_has_its_own_index() {
        let table = RpcTable::new(Metrics::new());
        for (index, entry) in table.methods.iter().enumerate() {
            if entry.method != "unknown" {
                let path = format!("/{}/{}", entry.service, entry.method);
                assert_eq!(index_of(&path), index, "{path}");
            }
        }
    }
}
