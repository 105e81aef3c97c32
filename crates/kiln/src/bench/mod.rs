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

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The API key a bench sends on every call (`--api-key-file`), so it can
/// measure a server that requires keys; none by default.
#[derive(Clone, Default)]
pub struct WithApiKey(Option<MetadataValue<Ascii>>);

impl WithApiKey {
    pub fn read(path: Option<&std::path::Path>) -> anyhow::Result<WithApiKey> {
        let Some(path) = path else {
            return Ok(WithApiKey(None));
        };
        let key = kiln_auth::ApiKey::read(path).map_err(anyhow::Error::msg)?;
        let (_, value) = kiln_auth::Credential::ApiKey(std::sync::Arc::new(key)).metadata();
        Ok(WithApiKey(Some(value)))
    }

    /// Adds the key to a request built by hand.
    fn add_to(&self, headers: &mut http::HeaderMap) {
        if let Some(value) = &self.0 {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert(kiln_auth::API_KEY_HEADER, value.clone());
            headers.extend(metadata.into_headers());
        }
    }
}

impl tonic::service::Interceptor for WithApiKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert(kiln_auth::API_KEY_HEADER, value.clone());
        }
        Ok(request)
    }
}

/// The connection every bench client talks through, with its API key.
pub type Keyed = InterceptedService<Channel, WithApiKey>;
