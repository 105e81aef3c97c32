//! [`Credential`]: what a Kiln process that is a client of a Kiln server
//! (`kiln executor`, `kiln bench`) presents on each call: the shared
//! fleet's executor token, or an API key. The header is built once and
//! cloned onto each request (a reference-counted copy, no parsing).

use tonic::metadata::{Ascii, MetadataValue};

use crate::caller::API_KEY_HEADER;
use crate::keys::ApiKey;
use crate::token::{self, ExecutorToken};

#[derive(Clone)]
pub struct Credential {
    name: &'static str,
    /// The value for tonic requests, and the same for raw HTTP ones.
    value: MetadataValue<Ascii>,
    header: http::HeaderValue,
}

impl Credential {
    /// The executor token, as `authorization: Bearer …`.
    pub fn executor_token(token: &ExecutorToken) -> Credential {
        Credential::new(token::HEADER, token.header_value())
    }

    /// An API key, as `x-buildbuddy-api-key`.
    pub fn api_key(key: &ApiKey) -> Credential {
        let mut value: MetadataValue<Ascii> = key
            .expose()
            .parse()
            .expect("a key read by ApiKey::read is printable ASCII");
        // HTTP/2 never indexes it.
        value.set_sensitive(true);
        Credential::new(API_KEY_HEADER, value)
    }

    fn new(name: &'static str, value: MetadataValue<Ascii>) -> Credential {
        let mut header = http::HeaderValue::from_bytes(value.as_encoded_bytes())
            .expect("metadata values are valid header values");
        header.set_sensitive(true);
        Credential {
            name,
            value,
            header,
        }
    }

    /// The metadata entry that carries it.
    pub fn metadata(&self) -> (&'static str, MetadataValue<Ascii>) {
        (self.name, self.value.clone())
    }

    /// Adds it to an outgoing request's headers.
    pub fn add_to(&self, headers: &mut http::HeaderMap) {
        headers.insert(self.name, self.header.clone());
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}: <redacted>)", self.name)
    }
}
