//! [`AuthLayer`]: in front of every gRPC service, it authenticates the
//! request ([`Authenticator`]), checks the capability its method needs
//! ([`required`]), and hands the [`Caller`] on in the request's
//! extensions. A refused request is answered here, before any service
//! reads it: UNAUTHENTICATED or PERMISSION_DENIED, naming the method and
//! the capability, never the credential.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready};
use tonic::body::Body;
use tower::{Layer, Service};

use crate::caller::{Authenticator, Refusal};
use crate::capability::Capability;

/// What a method needs of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Required {
    /// Nothing: health checks answer load balancers without a key.
    Nothing,
    /// A valid credential (or an open server), no capability in
    /// particular: GetCapabilities, and unknown paths (which tonic then
    /// answers UNIMPLEMENTED).
    Authenticated,
    /// A valid credential carrying this capability.
    Capability(Capability),
}

/// What the method at `path` (`/package.Service/Method`) needs.
pub fn required(path: &str) -> Required {
    use Capability::*;
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Required::Authenticated;
    };
    let capability = match (service, method) {
        ("grpc.health.v1.Health", _) => return Required::Nothing,
        ("build.bazel.remote.execution.v2.ContentAddressableStorage", method) => match method {
            "BatchUpdateBlobs" | "SpliceBlob" => CasWrite,
            _ => CacheRead,
        },
        ("google.bytestream.ByteStream", "Read") => CacheRead,
        ("google.bytestream.ByteStream", _) => CasWrite,
        ("build.bazel.remote.execution.v2.ActionCache", "UpdateActionResult") => AcWrite,
        ("build.bazel.remote.execution.v2.ActionCache", _) => CacheRead,
        ("build.bazel.remote.execution.v2.Execution", _) => Execute,
        ("google.longrunning.Operations", _) => Execute,
        ("kiln.executor.v1.ExecutorService", _) => RegisterExecutor,
        _ => return Required::Authenticated,
    };
    Required::Capability(capability)
}

/// [`AuthService`] as a layer, for `tonic::transport::Server::layer`.
#[derive(Clone)]
pub struct AuthLayer {
    authenticator: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(authenticator: Arc<Authenticator>) -> AuthLayer {
        AuthLayer { authenticator }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Arc<Authenticator>,
}

impl<S> AuthService<S> {
    fn admit(&self, request: &mut http::Request<Body>) -> Result<(), Refusal> {
        let path = request.uri().path();
        let required = required(path);
        if required == Required::Nothing {
            return Ok(());
        }
        let caller = self.authenticator.authenticate(request.headers())?;
        if let Required::Capability(capability) = required {
            if !caller.may(capability) {
                let method = path.rsplit('/').next().unwrap_or(path);
                let hint = match capability {
                    Capability::RegisterExecutor => {
                        "; executors present the executor token (kiln executor \
                         --executor-token-file) or an API key that has it (--api-key-file)"
                    }
                    _ => "",
                };
                return Err(Refusal::PermissionDenied(format!(
                    "{method} needs the capability {capability}, which the credential sent \
                     does not carry (it has: {}){hint}",
                    match caller.capabilities.is_empty() {
                        true => "none".to_string(),
                        false => caller.capabilities.to_string(),
                    }
                )));
            }
        }
        request.extensions_mut().insert(caller);
        Ok(())
    }
}

impl<S> Service<http::Request<Body>> for AuthService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<http::Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        match self.admit(&mut request) {
            Ok(()) => Either::Left(self.inner.call(request)),
            Err(refusal) => {
                tracing::debug!(path = request.uri().path(), ?refusal, "request refused");
                Either::Right(futures::future::ready(Ok(
                    tonic::Status::from(refusal).into_http()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_needs_what_it_touches() {
        use Capability::*;
        for (path, want) in [
            ("/grpc.health.v1.Health/Check", Required::Nothing),
            (
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
                Required::Capability(CacheRead),
            ),
            (
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
                Required::Capability(CasWrite),
            ),
            (
                "/google.bytestream.ByteStream/Read",
                Required::Capability(CacheRead),
            ),
            (
                "/google.bytestream.ByteStream/Write",
                Required::Capability(CasWrite),
            ),
            (
                "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult",
                Required::Capability(AcWrite),
            ),
            (
                "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
                Required::Capability(CacheRead),
            ),
            (
                "/build.bazel.remote.execution.v2.Execution/Execute",
                Required::Capability(Execute),
            ),
            (
                "/google.longrunning.Operations/CancelOperation",
                Required::Capability(Execute),
            ),
            (
                "/kiln.executor.v1.ExecutorService/Session",
                Required::Capability(RegisterExecutor),
            ),
            (
                "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
                Required::Authenticated,
            ),
            ("/no.such.Service/Method", Required::Authenticated),
            ("garbage", Required::Authenticated),
        ] {
            assert_eq!(required(path), want, "{path}");
        }
    }
}
