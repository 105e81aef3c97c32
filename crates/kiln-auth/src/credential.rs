//! [`Credential`]: what a Kiln process that is a client of a Kiln server
//! (`kiln executor`) presents on each call: the shared fleet's executor
//! token, or an API key with the `register-executor` capability.

use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};

use crate::caller::API_KEY_HEADER;
use crate::keys::ApiKey;
use crate::token::{self, ExecutorToken};

#[derive(Clone, Debug)]
pub enum Credential {
    ExecutorToken(ExecutorToken),
    ApiKey(Arc<ApiKey>),
}

impl Credential {
    /// The metadata entry that carries it, marked sensitive so HTTP/2
    /// never indexes it.
    pub fn metadata(&self) -> (&'static str, MetadataValue<Ascii>) {
        match self {
            Credential::ExecutorToken(token) => (token::HEADER, token.header_value()),
            Credential::ApiKey(key) => {
                let mut value: MetadataValue<Ascii> = key
                    .expose()
                    .parse()
                    .expect("a key read by ApiKey::read is printable ASCII");
                value.set_sensitive(true);
                (API_KEY_HEADER, value)
            }
        }
    }

    /// Adds it to an outgoing request's headers.
    pub fn add_to(&self, headers: &mut http::HeaderMap) {
        let (name, value) = self.metadata();
        let mut value = http::HeaderValue::from_bytes(value.as_encoded_bytes())
            .expect("metadata values are valid header values");
        value.set_sensitive(true);
        headers.insert(name, value);
    }
}
