//! Kiln's REAPI storage services over a [`kiln_store::BlobStore`]:
//! Capabilities, ContentAddressableStorage, ByteStream and ActionCache.
//!
//! Instance names: the Action Cache is partitioned by instance name (the
//! same action under two instance names has two independent entries); the
//! CAS is one content-addressed space shared by all instance names, since a
//! blob's name is its content and sharing it loses nothing.
#![forbid(unsafe_code)]

pub mod action_cache;
pub mod bytestream;
pub mod bytestream_http;
pub mod capabilities;
pub mod cas;
pub mod cas_http;
pub mod counters;
pub mod error;
pub mod message_limit;
pub mod resource;
pub mod storage;
pub mod tenancy;
#[cfg(test)]
mod test_store;
pub mod wire;

pub use action_cache::{platform_headers, AcScope, ActionCacheService, ActionCacheStore};
pub use bytestream::ByteStreamService;
pub use bytestream_http::ByteStreamHttp;
pub use capabilities::CapabilitiesService;
pub use cas::CasService;
pub use cas_http::CasHttp;
pub use counters::CasCounters;
pub use error::CasError;
pub use message_limit::{MessageLimit, MessageLimitLayer};
pub use storage::{Storage, StorageLimits};
pub use tenancy::Tenancy;
