//! Load generators that measure a running Kiln server from the outside, over
//! its real gRPC API. They live in the binary (`kiln bench ...`) so anyone can
//! check a deployment's numbers against the machine's ceilings.
//!
//! `cas` measures the storage path: ByteStream for large blobs, the batch
//! RPCs for many small ones, and the per-call cost of ByteStream on small
//! blobs (`calls`), which is how Bazel 4 moves every blob. `exec` measures
//! the fixed cost of remote execution with trivial actions; `isolation`
//! what each isolation type adds to it, next to the raw tools.

mod calls;
pub mod cas;
mod data;
pub mod exec;
pub mod isolation;
mod report;

use kiln_auth::Credential;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The API key a bench sends on every call (`--api-key-file`), so it can
/// measure a server that requires keys; none by default.
#[derive(Clone, Default)]
pub struct WithApiKey(Option<Credential>);

impl WithApiKey {
    pub fn read(path: Option<&std::path::Path>) -> anyhow::Result<WithApiKey> {
        let key = path
            .map(kiln_auth::ApiKey::read)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        Ok(WithApiKey(key.as_ref().map(Credential::api_key)))
    }

    /// Adds the key to a request built by hand.
    fn add_to(&self, headers: &mut http::HeaderMap) {
        if let Some(credential) = &self.0 {
            credential.add_to(headers);
        }
    }
}

impl tonic::service::Interceptor for WithApiKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(credential) = &self.0 {
            let (name, value) = credential.metadata();
            request.metadata_mut().insert(name, value);
        }
        Ok(request)
    }
}

/// The connection every bench client talks through, with its API key.
pub type Keyed = InterceptedService<Channel, WithApiKey>;
